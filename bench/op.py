"""The op benchmark: this package's backends against eager timm-style ``act(drop_path(x) + r)``,
torchvision's ``stochastic_depth`` + add and ``torch.compile`` of the eager expression, forward,
backward and forward+backward, on tensors of real models (bench/cases.py), next to a ``copy_`` of
the same tensor measured in the same run (the floor).

GB/s uses docs/design.md's minimal byte count for every implementation (eager and compiled code move
more), so the columns compare times. Inputs rotate through enough buffer sets to span twice the
last-level cache, so no call finds its inputs cached. On the CPU a fresh output allocation costs
page faults, measured as ``clone - copy_``; on CUDA "device ms" is the kernels' time alone
(profiler), beside the end-to-end time: their gap is host time the GPU waited for.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bench import cases
from bench.cases import PASSES, Case, last_level_cache_bytes, minimal_bytes, rotating_buffers
from bench.implementations import BASELINES, implementations
from bench.report import write_op_results
from bench.timing import device_time_per_call, measure_side_by_side

RESULTS = Path(__file__).parent / "results"
# Samples per measurement. Fewer on a GPU to keep the full grid (108 cases) near five minutes: an
# H100 ran 24 cases in ~85 s at 7 samples, the noise column within a few percent on large tensors.
SAMPLES = {"cpu": 10, "cuda": 7}
DEVICE_TIME_P = 0.1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="two tensors, fp32, p=0.1, ReLU, few samples")
    parser.add_argument("--batch", type=int, help="batch of every tensor (default: per device, bench/cases.py)")
    parser.add_argument("--tensor", nargs="+", choices=list(cases.MODEL_TENSORS), help="tensors to run")
    parser.add_argument("--dtype", nargs="+", choices=sorted(cases.ELEMENT_BYTES), help="dtypes to run")
    parser.add_argument("--case", nargs="+", type=tensor_dtype, metavar="TENSOR:DTYPE",
                        help="(tensor, dtype) pairs to run instead of --tensor x --dtype, e.g. 'ViT-B/16 tokens:bfloat16'")
    parser.add_argument("--p", type=float, nargs="+", help="drop probabilities to run")
    parser.add_argument("--activation", nargs="+", choices=cases.ACTIVATIONS, help="activations to run")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, help="passes to time (default: all)")
    parser.add_argument("--backend", nargs="+", help="this package's backends to run (default: every kernel)")
    parser.add_argument("--samples", type=int, help="samples per measurement (default: 10 on a CPU, 7 on a GPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and markdown only")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results (tables, plots beside)")
    args = parser.parse_args(argv)
    if args.case and (args.tensor or args.dtype):
        parser.error("--case replaces --tensor and --dtype: give one or the other")
    return args


def tensor_dtype(text: str) -> tuple[str, str]:
    """'TENSOR:DTYPE' -> (tensor, dtype), both checked against the benchmark's tensors and dtypes."""
    label, _, dtype = text.rpartition(":")
    if label not in cases.MODEL_TENSORS or dtype not in cases.ELEMENT_BYTES:
        raise argparse.ArgumentTypeError(f"expected TENSOR:DTYPE with TENSOR in {list(cases.MODEL_TENSORS)} and "
                                         f"DTYPE in {sorted(cases.ELEMENT_BYTES)}, got {text!r}")
    return label, dtype


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


def environment(device: torch.device, command: str) -> dict:
    """What a result was measured with: date, device, versions, the command as run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "threads": torch.get_num_threads(),
        "thp_mem_alloc_enable": thp, "torch": torch.__version__, "triton": triton_version,
        "command": " ".join(([f"THP_MEM_ALLOC_ENABLE={thp}"] if thp else []) + [command]),
    }


def _rotating(fn, argument_sets):
    """A call of ``fn`` on the next of ``argument_sets``, round and round."""
    sets = itertools.cycle(argument_sets)
    return lambda: fn(*next(sets))


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


class TensorBench:
    """The measurements on one tensor (shape, dtype): its copy floor once, then every case on it."""

    def __init__(self, device: torch.device, shape: tuple[int, ...], dtype: str, samples: int):
        self.device, self.samples = device, samples
        self.dtype = getattr(torch, dtype)
        example = torch.empty(shape, dtype=self.dtype, device=device)
        set_bytes = 3 * example.numel() * example.element_size()  # x, r, grad
        count = rotating_buffers(set_bytes, last_level_cache_bytes(device))
        self.sets = [tuple(torch.randn(shape, dtype=self.dtype, device=device) for _ in range(3))
                     for _ in range(count)]
        for x, r, _ in self.sets:
            x.requires_grad_()
            r.requires_grad_()

    def _measure(self, fns: dict, device_time: bool = True) -> dict:
        timings = measure_side_by_side(fns, self.device, samples=self.samples)
        result = {name: {"median_ms": t.median_s * 1e3, "min_ms": t.min_s * 1e3, "calls_per_sample": t.calls_per_sample}
                  for name, t in timings.items()}
        if self.device.type == "cuda" and device_time:
            for name, fn in fns.items():
                result[name]["device_ms"] = device_time_per_call(fn, self.device) * 1e3
        return result

    def floor(self) -> dict:
        """``copy_`` of x into a preallocated tensor and ``clone`` (the same plus a fresh allocation)."""
        with torch.no_grad():
            dst = torch.empty_like(self.sets[0][0])
            timed = self._measure({"copy": _rotating(lambda x: dst.copy_(x), [(x,) for x, _, _ in self.sets]),
                                   "clone": _rotating(torch.clone, [(x,) for x, _, _ in self.sets])})
        return {"buffers": len(self.sets), "copy": timed["copy"],
                "allocation_ms": max(timed["clone"]["median_ms"] - timed["copy"]["median_ms"], 0.0)}

    def case(self, fns: dict, device_time: bool, passes: tuple[str, ...] = PASSES) -> dict:
        """Pass -> implementation -> timing, for the implementations ``fns`` of one case and the
        ``passes`` asked for (with each call's device time on CUDA if ``device_time``)."""
        timed = {}
        if "forward" in passes:
            inputs = [(x, r) for x, r, _ in self.sets]
            with torch.no_grad():
                timed["forward"] = self._measure({name: _rotating(fn, inputs) for name, fn in fns.items()}, device_time)

        def backward_of(fn):
            graphs = [(fn(x, r), x, r, g) for x, r, g in self.sets]
            return _rotating(lambda out, x, r, g: torch.autograd.grad(out, (x, r), g, retain_graph=True), graphs)

        if "backward" in passes:
            timed["backward"] = self._measure(_replayable({name: backward_of(fn) for name, fn in fns.items()}),
                                              device_time)
        if "forward+backward" in passes:
            timed["forward+backward"] = self._measure({
                name: _rotating(lambda x, r, g, fn=fn: torch.autograd.grad(fn(x, r), (x, r), g), self.sets)
                for name, fn in fns.items()}, device_time)
        return timed


def rows_for(case: Case, timed: dict, copy: dict) -> list[dict]:
    """The result rows of one case: per pass and implementation, time, GB/s on the minimal bytes,
    percent of the copy bandwidth, and speed-ups against the baselines of the same pass."""
    copy_gbps = 2 * case.tensor_bytes / copy["median_ms"] / 1e6
    rows = []
    for pass_name in PASSES:
        by_name = timed.get(pass_name, {})
        bytes_moved = minimal_bytes(pass_name, case)
        for name, t in by_name.items():
            row = {**case.as_dict(), "pass": pass_name, "implementation": name, **t,
                   "gbps": bytes_moved / t["median_ms"] / 1e6}
            row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps
            if "device_ms" in t and "device_ms" in copy:
                row["device_pct_of_copy"] = 100 * bytes_moved / t["device_ms"] / (2 * case.tensor_bytes / copy["device_ms"])
            for key, baseline in BASELINES.items():
                if baseline in by_name:
                    row[f"speedup_vs_{key}"] = by_name[baseline]["median_ms"] / t["median_ms"]
            rows.append(row)
    return rows


def run(args) -> dict:
    device = torch.device(args.device)
    grid = cases.case_grid(device.type, batch=args.batch, quick=args.quick,
                           tensors=tuple(args.tensor) if args.tensor else None,
                           dtypes=tuple(args.dtype) if args.dtype else None,
                           probabilities=tuple(args.p) if args.p else None,
                           activations=tuple(args.activation) if args.activation else None,
                           tensor_dtypes=tuple(args.case) if args.case else None)
    samples = args.samples or (5 if args.quick else SAMPLES.get(device.type, 10))
    tensors, rows = [], []
    groups = itertools.groupby(grid, key=lambda case: (case.label, case.shape, case.dtype))
    with tqdm(total=len(grid), desc="op benchmark", unit="case", file=sys.stderr) as progress:
        for (label, shape, dtype), group in groups:
            bench = TensorBench(device, shape, dtype, samples)
            floor = bench.floor()
            example = Case(label, shape, dtype, 0.0, "none")
            tensors.append({"label": label, "shape": list(shape), "dtype": dtype,
                            "tensor_mib": example.tensor_bytes / 2**20, **floor,
                            "copy_gbps": 2 * example.tensor_bytes / floor["copy"]["median_ms"] / 1e6})
            for case in group:
                progress.set_postfix_str(f"{label} {dtype} p={case.p} {case.activation}")
                fns = implementations(device, case.p, case.activation, with_compile=not args.no_compile,
                                      backends=args.backend)
                # The profiler is slow to start: device times for the headline p only.
                timed = bench.case(fns, device_time=case.p == DEVICE_TIME_P, passes=tuple(args.passes or PASSES))
                rows += rows_for(case, timed, floor["copy"])
                progress.update()
            del bench
    return {"benchmark": "op", **environment(device, args.command), "samples": samples,
            "tensors": tensors, "rows": rows}


def main(argv=None, command: str = "python -m bench.op") -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = " ".join([command, *argv])
    result = run(args)
    stem = "op_thp" if result["thp_mem_alloc_enable"] == "1" else "op"
    write_op_results(result, args.output or RESULTS / device_folder(result) / f"{stem}.json", plots=not args.no_plots)


if __name__ == "__main__":
    main()
