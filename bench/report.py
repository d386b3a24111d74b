"""The op benchmark's outputs: its JSON schema, the markdown tables and the files written.

The summary has one line per case and pass: the fastest of this package's backends, its bandwidth
against the copy floor, its speed-ups, and the run's noise (this package's first backend timed twice
side by side). The full table has every implementation.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.implementations import AGAIN, COMPILED, EAGER, TORCHVISION, is_ours

# Key -> type of the op result, of each entry of "tensors" and of each entry of "rows".
OP_SCHEMA = {
    "benchmark": str, "date": str, "device": str, "device_type": str, "threads": int, "thp_mem_alloc_enable": str,
    "torch": str, "triton": (str, type(None)), "command": str, "samples": int, "tensors": list, "rows": list,
}
TENSOR_SCHEMA = {"label": str, "shape": list, "dtype": str, "tensor_mib": float, "buffers": int, "copy": dict,
                 "allocation_ms": float, "copy_gbps": float}
ROW_SCHEMA = {"label": str, "shape": list, "dtype": str, "p": float, "activation": str, "tensor_mib": float,
              "pass": str, "implementation": str, "median_ms": float, "min_ms": float, "calls_per_sample": int, "gbps": float,
              "pct_of_copy": float}
OPTIONAL_ROW_KEYS = {"speedup_vs_eager": float, "speedup_vs_compile": float, "device_ms": float,
                     "device_pct_of_copy": float}


def _check(entry: dict, schema: dict, where: str, optional: dict | None = None) -> None:
    for key, kind in schema.items():
        if key not in entry:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
            raise ValueError(f"{where}: {key}={entry[key]!r} is not {kind}")
    for key, kind in (optional or {}).items():
        if key in entry and not isinstance(entry[key], kind):
            raise ValueError(f"{where}: {key}={entry[key]!r} is not {kind}")


def check_op_schema(result: dict) -> None:
    """Raises ValueError naming the first key that is missing or of the wrong type."""
    _check(result, OP_SCHEMA, "result")
    for i, tensor in enumerate(result["tensors"]):
        _check(tensor, TENSOR_SCHEMA, f"tensors[{i}]")
    for i, row in enumerate(result["rows"]):
        _check(row, ROW_SCHEMA, f"rows[{i}]", OPTIONAL_ROW_KEYS)


def _case_key(row: dict) -> tuple:
    return row["label"], row["dtype"], row["p"], row["activation"], row["pass"]


def summary_rows(result: dict) -> list[dict]:
    """Per case and pass: the fastest of this package's backends, with its speed-ups against eager
    timm, torchvision and torch.compile, and the noise (second timing of the first backend / first - 1)."""
    cases: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        cases.setdefault(_case_key(row), {})[row["implementation"]] = row
    summary = []
    for by_name in cases.values():
        ours = [row for name, row in by_name.items() if is_ours(name)]
        if not ours:
            continue
        best = min(ours, key=lambda row: row["median_ms"])
        first = ours[0]
        again = by_name.get(first["implementation"] + AGAIN)
        line = {**best, "noise": again["median_ms"] / first["median_ms"] - 1 if again else None}
        for key, baseline in (("eager", EAGER), ("torchvision", TORCHVISION), ("compile", COMPILED)):
            line[f"vs_{key}"] = by_name[baseline]["median_ms"] / best["median_ms"] if baseline in by_name else None
        summary.append(line)
    return summary


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def heading(result: dict) -> str:
    if result["device_type"] == "cuda":
        where = result["device"]
    else:
        thp = "on" if result["thp_mem_alloc_enable"] == "1" else "off"
        where = f"{result['device']}, {result['threads']} threads, THP_MEM_ALLOC_ENABLE {thp}"
    return (f"Op benchmark: {where}; torch {result['torch']}, triton {result['triton']}; {result['date']}\n"
            f"`{result['command']}`; median of {result['samples']} samples")


def floor_table(result: dict) -> str:
    lines = ["| tensor | shape | dtype | MiB | buffers | copy_ ms | copy_ GB/s | fresh allocation ms |",
             "|---|---|---|---|---|---|---|---|"]
    for t in result["tensors"]:
        lines.append(f"| {t['label']} | {tuple(t['shape'])} | {t['dtype']} | {t['tensor_mib']:.1f} | {t['buffers']} | "
                     f"{t['copy']['median_ms']:.3f} | {t['copy_gbps']:.1f} | {t['allocation_ms']:.2f} |")
    return "\n".join(lines)


def _case_cells(row: dict) -> str:
    """The leading table cells naming a row's case and pass."""
    return f"| {row['label']} | {row['dtype']} | {row['p']} | {row['activation']} | {row['pass']} |"


def summary_table(result: dict, where=lambda line: True) -> str:
    """The summary as markdown, the lines for which ``where(line)`` holds."""
    lines = ["| tensor | dtype | p | act | pass | fastest | ms | GB/s | % of copy_ | vs eager timm | vs torchvision "
             "| vs compile | noise |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in summary_rows(result):
        if not where(line):
            continue
        noise = "-" if line["noise"] is None else f"{100 * line['noise']:+.1f}%"
        device = f" (device {line['device_pct_of_copy']:.0f}%)" if "device_pct_of_copy" in line else ""
        lines.append(f"{_case_cells(line)} {line['implementation'].split()[-1]} | {line['median_ms']:.3f} | {line['gbps']:.1f} | "
                     f"{line['pct_of_copy']:.0f}%{device} | {_ratio(line['vs_eager'])} | {_ratio(line['vs_torchvision'])} | "
                     f"{_ratio(line['vs_compile'])} | {noise} |")
    return "\n".join(lines)


def full_table(result: dict) -> str:
    with_device = any("device_ms" in row for row in result["rows"])
    lines = ["| tensor | dtype | p | act | pass | implementation | median ms | min ms | GB/s | % of copy_ |"
             + (" device ms | device % of copy_ |" if with_device else "") + " vs eager | vs compile |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_device else "") + "---|---|"]
    for row in result["rows"]:
        device = ((f" {row['device_ms']:.3f} | {row.get('device_pct_of_copy', 0):.0f}% |" if "device_ms" in row
                   else " - | - |") if with_device else "")
        lines.append(f"{_case_cells(row)} {row['implementation']} | {row['median_ms']:.3f} | {row['min_ms']:.3f} | {row['gbps']:.1f} | "
                     f"{row['pct_of_copy']:.0f}% |{device} {_ratio(row.get('speedup_vs_eager'))} | "
                     f"{_ratio(row.get('speedup_vs_compile'))} |")
    return "\n".join(lines)


def op_markdown(result: dict) -> str:
    """Heading, copy floor, summary, then every row."""
    return "\n\n".join([heading(result), "GB/s counts docs/design.md's minimal bytes for every implementation.",
                        "Copy floor (measured in this run):", floor_table(result), "Summary:", summary_table(result),
                        "Every implementation:", full_table(result)])


def write_results(result: dict, markdown: str, output: Path, printed: str | None = None) -> list[Path]:
    """Prints ``printed`` (default: ``markdown``), writes ``result`` at ``output`` (JSON) and
    ``markdown`` beside it (``.md``); returns the paths."""
    print(printed or markdown)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown + "\n")
    return [output, output.with_suffix(".md")]


def write_op_results(result: dict, output: Path, plots: bool = True) -> list[Path]:
    """Checks ``result`` against the schema, prints the summary, writes JSON, markdown and (``plots``)
    the plots."""
    check_op_schema(result)
    written = write_results(result, op_markdown(result), output,
                            printed="\n" + heading(result) + "\n\n" + summary_table(result))
    if plots:
        from bench.plots import plot_bandwidth, plot_speedups

        written += [plot_bandwidth(result, output.with_name(f"{output.stem}_bandwidth.png")),
                    plot_speedups(result, output.with_name(f"{output.stem}_speedup.png"))]
    print("\nwritten: " + ", ".join(str(path) for path in written))
    return written
