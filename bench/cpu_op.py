"""The fused CPU kernel against eager timm-style ``relu(drop_path(x, p, True) + r)`` and
``torch.compile`` of it, forward and forward+backward, next to a plain ``copy_`` (the floor).

Bytes counted (DESIGN.md, "Physical floor"): forward ``keep*|x| + |r| + |out|``; forward+backward
adds the ReLU backward's ``|g| + |out| + |g_r| + keep*|g_x|`` (eager and compiled move more).
A fresh output allocation costs page faults on the CPU; it is measured as ``clone - copy_`` and
reported separately.
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

from bench.timing import measure_side_by_side
from stochdepth_kernels import fused_drop_path_add

RESULTS = Path(__file__).parent / "results"


def eager_timm(x, r, p):
    from timm.layers import drop_path

    return torch.relu(drop_path(x, p, True) + r)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 256, 28, 28])
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_folder(result: dict) -> str:
    """bench/results/<device>/: the CPU model and thread count, as a file name."""
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    return f"{slug}-{result['threads']}threads"


def forward_backward(fn, x, r, grad):
    def step():
        x.grad = r.grad = None
        fn(x, r).backward(grad)
    return step


def run(args) -> dict:
    device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    shape, p = tuple(args.shape), args.p
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    grad, dst = torch.randn(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    tensor_bytes = x.numel() * x.element_size()
    keep = 1.0 - p
    bytes_forward = (keep + 2) * tensor_bytes
    bytes_backward = (3 + keep) * tensor_bytes

    fused = lambda x, r: fused_drop_path_add(x, r, p, activation="relu")  # noqa: E731
    eager = lambda x, r: eager_timm(x, r, p)  # noqa: E731
    candidates = {"stochdepth fused (cpu)": fused, "eager timm": eager}
    if not args.no_compile:
        candidates["torch.compile(eager timm)"] = torch.compile(eager)

    floor = measure_side_by_side({"copy": lambda: dst.copy_(x), "clone": lambda: x.clone()}, device, runs=args.runs)
    copy_s = floor["copy"].median_s
    copy_gbps = 2 * tensor_bytes / copy_s / 1e9
    rows = [{"name": "copy_ (floor)", "pass": "copy", "median_ms": copy_s * 1e3, "gbps": copy_gbps}]
    allocation_ms = max(floor["clone"].median_s - copy_s, 0.0) * 1e3

    with torch.no_grad():
        forward = measure_side_by_side({name: (lambda fn=fn: fn(x, r)) for name, fn in candidates.items()},
                                       device, runs=args.runs)
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    both = measure_side_by_side({name: forward_backward(fn, xg, rg, grad) for name, fn in candidates.items()},
                                device, runs=args.runs)
    for pass_name, timings, moved in (("forward", forward, bytes_forward),
                                      ("forward+backward", both, bytes_forward + bytes_backward)):
        for name, t in timings.items():
            rows.append({"name": name, "pass": pass_name, "median_ms": t.median_s * 1e3,
                         "gbps": moved / t.median_s / 1e9})

    for row in rows:
        row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
        same_pass = {r_["name"]: r_ for r_ in rows if r_["pass"] == row["pass"]}
        for baseline in ("eager timm", "torch.compile(eager timm)"):
            if baseline in same_pass:
                row[f"speedup_vs_{baseline}"] = same_pass[baseline]["median_ms"] / row["median_ms"]
    return {
        "benchmark": "cpu_op",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(),
        "threads": torch.get_num_threads(),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "torch": torch.__version__,
        "command": " ".join(([f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}"]
                             if "THP_MEM_ALLOC_ENABLE" in os.environ else [])
                            + ["python", "-m", "bench", *sys.argv[1:]]),
        "shape": list(shape), "dtype": args.dtype, "p": p, "activation": "relu",
        "tensor_mib": tensor_bytes / 2**20,
        "allocation_ms": allocation_ms,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    thp = "on" if result["thp_mem_alloc_enable"] == "1" else "off"
    head = (f"CPU op benchmark: {result['device']}, {result['threads']} threads, torch {result['torch']}, "
            f"{result['date']}, THP_MEM_ALLOC_ENABLE {thp}\n`{result['command']}`\nshape {tuple(result['shape'])} {result['dtype']}, p={result['p']}, ReLU; "
            f"one {result['tensor_mib']:.0f} MiB output allocation (page faults) costs "
            f"{result['allocation_ms']:.1f} ms, included in every op's time below\n")
    lines = ["| implementation | pass | median ms | GB/s (min bytes) | % of copy_ | vs eager | vs compile |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        eager = row.get("speedup_vs_eager timm")
        compiled = row.get("speedup_vs_torch.compile(eager timm)")
        lines.append(f"| {row['name']} | {row['pass']} | {row['median_ms']:.2f} | {row['gbps']:.1f} | "
                     f"{row['pct_of_copy']:.0f}% | {f'{eager:.2f}x' if eager else '-'} | "
                     f"{f'{compiled:.2f}x' if compiled else '-'} |")
    return head + "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    name = "cpu_op_thp.json" if result["thp_mem_alloc_enable"] == "1" else "cpu_op.json"
    output = args.output or RESULTS / device_folder(result) / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(result) + "\n")
    print(f"\nwritten: {output} and {output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
