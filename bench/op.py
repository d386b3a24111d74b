"""The fused op against eager timm-style ``relu(drop_path(x, p, True) + r)`` and ``torch.compile`` of
it, forward, backward and forward+backward, next to a plain ``copy_`` (the floor), on the best device
present (``--device`` to choose).

Bytes counted (DESIGN.md, "Physical floor"): forward ``keep*|x| + |r| + |out|``; ReLU backward
``|g| + |out| + |g_r| + |g_x|`` (the gradients are written whole, zeros in dropped rows). Eager and
compiled code move more; their GB/s uses the same minimal count, so the columns compare times.
On the CPU a fresh output allocation costs page faults: it is measured as ``clone - copy_`` and
reported separately. On CUDA "device ms" is the kernels' time alone (profiler), beside the end-to-end
time: their gap is host overhead the GPU waited for.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from bench.timing import device_time_per_call, measure_side_by_side
from stochdepth_kernels import available_backends, fused_drop_path_add

RESULTS = Path(__file__).parent / "results"
# (shape, dtype): ResNet-50's stage-2 output on the CPU; >= 64 MiB tensors on a GPU.
DEFAULT_CASES = {
    "cpu": [((64, 256, 28, 28), "float32")],
    "cuda": [((128, 256, 28, 28), "float32"), ((256, 256, 28, 28), "bfloat16"), ((256, 197, 768), "bfloat16")],
}
EAGER, COMPILED = "eager timm", "torch.compile(eager timm)"


def eager_timm(x, r, p):
    from timm.layers import drop_path

    return torch.relu(drop_path(x, p, True) + r)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs="+", help="one case of this shape instead of the defaults")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_folder(result: dict) -> str:
    """bench/results/<device>/: the device name (and CPU thread count), as a file name."""
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    return slug if result["device_type"] == "cuda" else f"{slug}-{result['threads']}threads"


def candidates_for(device: torch.device, p: float, with_compile: bool) -> dict:
    fused = {f"stochdepth {name}": (lambda x, r, name=name: fused_drop_path_add(x, r, p, activation="relu",
                                                                              backend=name))
             for name in available_backends(device) if name != "reference"}
    eager = lambda x, r: eager_timm(x, r, p)  # noqa: E731
    return {**fused, EAGER: eager, **({COMPILED: torch.compile(eager)} if with_compile else {})}


def _replayable(backwards: dict) -> dict:
    """The backward calls that can run again on one graph: torch.compile donates its saved buffers,
    so its backward runs once per forward and is timed only inside forward+backward."""
    kept = {}
    for name, backward in backwards.items():
        try:
            backward()
            backward()
        except RuntimeError:
            continue
        kept[name] = backward
    return kept


def bench_case(device: torch.device, shape, dtype: torch.dtype, p: float, candidates: dict, samples: int):
    x, r = torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)
    grad, dst = torch.randn_like(x), torch.empty_like(x)
    tensor_bytes = x.numel() * x.element_size()
    bytes_moved = {"forward": (3 - p) * tensor_bytes, "backward": 4 * tensor_bytes}
    bytes_moved["forward+backward"] = bytes_moved["forward"] + bytes_moved["backward"]

    timings, device_times = {}, {}

    def measure(pass_name, fns):
        timings[pass_name] = measure_side_by_side(fns, device, samples=samples)
        if device.type == "cuda":
            device_times[pass_name] = {name: device_time_per_call(fn, device) for name, fn in fns.items()}

    measure("copy", {"copy": lambda: dst.copy_(x), "clone": lambda: x.clone()})
    floor = timings.pop("copy")
    copy_s = floor["copy"].median_s
    copy_gbps = 2 * tensor_bytes / copy_s / 1e9
    with torch.no_grad():
        measure("forward", {n: (lambda fn=fn: fn(x, r)) for n, fn in candidates.items()})
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    backward_only = {n: (lambda out=fn(xg, rg): torch.autograd.grad(out, (xg, rg), grad, retain_graph=True))
                     for n, fn in candidates.items()}
    measure("backward", _replayable(backward_only))
    del backward_only
    measure("forward+backward", {n: (lambda fn=fn: torch.autograd.grad(fn(xg, rg), (xg, rg), grad))
                                 for n, fn in candidates.items()})

    rows = [{"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "name": "copy_ (floor)",
             "pass": "copy", "median_ms": copy_s * 1e3, "gbps": copy_gbps}]
    for pass_name, pass_timings in timings.items():
        for name, t in pass_timings.items():
            rows.append({"shape": list(shape), "dtype": rows[0]["dtype"], "name": name, "pass": pass_name,
                         "median_ms": t.median_s * 1e3, "gbps": bytes_moved[pass_name] / t.median_s / 1e9})
    copy_device = device_times.get("copy", {}).get("copy")
    for row in rows:
        row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
        seconds = copy_device if row["pass"] == "copy" else device_times.get(row["pass"], {}).get(row["name"])
        if seconds:
            row["device_ms"] = seconds * 1e3
            row["device_pct_of_copy"] = 100 * copy_device / seconds * (
                1 if row["pass"] == "copy" else bytes_moved[row["pass"]] / (2 * tensor_bytes))
        same_pass = {other["name"]: other for other in rows if other["pass"] == row["pass"]}
        for baseline in (EAGER, COMPILED):
            if baseline in same_pass:
                row[f"speedup_vs_{baseline}"] = same_pass[baseline]["median_ms"] / row["median_ms"]
    allocation_ms = max(floor["clone"].median_s - copy_s, 0.0) * 1e3
    return rows, allocation_ms, tensor_bytes


def run(args) -> dict:
    device = torch.device(args.device)
    cases = [(tuple(args.shape), args.dtype)] if args.shape else DEFAULT_CASES[device.type]
    candidates = candidates_for(device, args.p, not args.no_compile)
    rows, allocations = [], []
    for shape, dtype in cases:
        case_rows, allocation_ms, tensor_bytes = bench_case(device, shape, getattr(torch, dtype), args.p,
                                                            candidates, args.samples)
        rows += case_rows
        allocations.append({"shape": list(shape), "dtype": dtype, "tensor_mib": tensor_bytes / 2**20,
                            "allocation_ms": allocation_ms})
    env = ([f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}"] if "THP_MEM_ALLOC_ENABLE" in os.environ else [])
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "benchmark": "op",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type,
        "threads": torch.get_num_threads(),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "torch": torch.__version__, "triton": triton_version,
        "command": " ".join(env + [args.command]),
        "p": args.p, "activation": "relu", "samples": args.samples,
        "allocations": allocations,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    thp = "on" if result["thp_mem_alloc_enable"] == "1" else "off"
    where = (f"{result['device']}" if result["device_type"] == "cuda"
             else f"{result['device']}, {result['threads']} threads, THP_MEM_ALLOC_ENABLE {thp}")
    lines = [f"Op benchmark: {where}; torch {result['torch']}, triton {result['triton']}; {result['date']}",
             f"`{result['command']}`; p={result['p']}, ReLU; median of {result['samples']} samples", ""]
    for alloc in result["allocations"]:
        lines.append(f"- {tuple(alloc['shape'])} {alloc['dtype']} ({alloc['tensor_mib']:.0f} MiB): a fresh output "
                     f"allocation costs {alloc['allocation_ms']:.2f} ms (clone - copy_), inside every op's time")
    with_device = any("device_ms" in row for row in result["rows"])
    device_header = (" device ms | device % of copy_ |", "---|---|") if with_device else ("", "")
    lines += ["", "| shape | dtype | implementation | pass | median ms | GB/s (min bytes) | % of copy_ |"
                  f"{device_header[0]} vs eager | vs compile |",
              f"|---|---|---|---|---|---|---|{device_header[1]}---|---|"]
    for row in result["rows"]:
        eager, compiled = row.get(f"speedup_vs_{EAGER}"), row.get(f"speedup_vs_{COMPILED}")
        device = (f" {row['device_ms']:.3f} | {row['device_pct_of_copy']:.0f}% |" if "device_ms" in row
                  else " - | - |") if with_device else ""
        lines.append(f"| {tuple(row['shape'])} | {row['dtype']} | {row['name']} | {row['pass']} | {row['median_ms']:.3f} | "
                     f"{row['gbps']:.1f} | {row['pct_of_copy']:.0f}% |{device} {f'{eager:.2f}x' if eager else '-'} | "
                     f"{f'{compiled:.2f}x' if compiled else '-'} |")
    return "\n".join(lines)


def write_results(result: dict, table: str, output: Path) -> None:
    """Prints ``table`` and writes it (``.md``) and ``result`` (``.json``) at ``output``."""
    print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(table + "\n")
    print(f"\nwritten: {output} and {output.with_suffix('.md')}")


def main(argv=None, command: str = "python -m bench.op") -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = " ".join([command, *argv])
    result = run(args)
    name = "op_thp.json" if result["thp_mem_alloc_enable"] == "1" else "op.json"
    write_results(result, markdown(result), args.output or RESULTS / device_folder(result) / name)


if __name__ == "__main__":
    main()
