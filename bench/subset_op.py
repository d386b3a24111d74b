"""The subset op against the row-mode op it stands in for and against DINOv2's pure-PyTorch form,
side by side on each of this package's kernels: forward and forward+backward of a call that draws
its seed, selects the kept rows (``subset_rows``) and adds the branch's ``k`` rows into the ``B``
rows of the output (``subset_add``); of ``fused_drop_path_add`` in row mode at the same rate; and of
DINOv2's ``randperm`` + ``index_add(alpha=B/k)`` (+ ``relu``), on tensors of real models
(bench/cases.py), next to a ``copy_`` of the tensor measured in the same run.

GB/s is taken on each op's minimal bytes (``keep`` the kept share: ``1 - p`` in row mode, ``k / B``
for the subset): forward ``(keep + 2) |x|``, both ops; backward without activation, row mode
``(keep + 1) |x|`` (its x-gradient is written whole), the subset ``2 keep |x|`` (it reads and writes
the kept rows only); with ReLU both read ``g`` and the sign bits and write ``g_residual``, the subset
``keep |x|`` of ``g_y`` and row mode ``|x|``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import cases
from bench.cli import run_and_write
from bench.op import environment
from bench.timing import measure_side_by_side
from stochdepth_kernels import available_backends, fused_drop_path_add, subset_size
from stochdepth_kernels.backends import BACKENDS
from stochdepth_kernels.seeding import draw_seed

TENSORS = ("ResNet-50 stage 1", "ViT-B/16 tokens")
PROBABILITIES = (0.1, 0.4)
PASSES = ("forward", "forward+backward")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one tensor, fp32, p=0.1, small batch")
    parser.add_argument("--batch", type=int, help="batch of every tensor (default: per device, bench/cases.py)")
    parser.add_argument("--backend", nargs="+", help="this package's backends to run (default: every kernel)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def minimal_bytes(pass_name: str, size: int, element_bytes: int, keep: float, relu: bool, subset: bool) -> float:
    """The module docstring's byte counts for one call on a tensor of ``size`` bytes."""
    sign_bits = size / element_bytes / 8 if relu else 0.0
    forward = (keep + 2) * size
    if relu:
        backward = 2 * size + sign_bits + (keep if subset else 1.0) * size
    else:
        backward = 2 * keep * size if subset else (keep + 1) * size
    return forward if pass_name == "forward" else forward + sign_bits + backward


def _calls(backend: str, shape: tuple[int, ...], dtype: torch.dtype, p: float, relu: bool, device: torch.device):
    """(row-mode call, subset call, DINOv2-style call, k/B) on fresh inputs, each call returning its
    output and the inputs that take gradients."""
    batch = shape[0]
    kept = subset_size(batch, p)
    impl = BACKENDS[backend]
    x, residual = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
    y = torch.randn((kept, *shape[1:]), dtype=dtype, device=device, requires_grad=True)
    activation = "relu" if relu else None

    def row():
        return fused_drop_path_add(x, residual, p, activation=activation, backend=backend), (x, residual)

    def subset():
        rows = impl.subset_rows(draw_seed(device), batch, kept)
        return impl.subset_add(y, residual, rows, batch / kept, relu), (y, residual)

    def dinov2():
        rows = torch.randperm(batch, device=device)[:kept]
        out = torch.index_add(residual.flatten(1), 0, rows, y.flatten(1), alpha=batch / kept).view_as(residual)
        return (torch.relu(out) if relu else out), (y, residual)

    return row, subset, dinov2, kept / batch


def _timed(call, pass_name: str):
    if pass_name == "forward":
        def forward():
            with torch.no_grad():
                return call()[0]
        return forward
    grad = {}

    def forward_backward():
        out, inputs = call()
        if "g" not in grad:
            grad["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, grad["g"])

    return forward_backward


def run(args) -> dict:
    device = torch.device(args.device)
    batch = args.batch or (4 if args.quick else cases.BATCH[device.type])
    tensors = TENSORS[:1] if args.quick else TENSORS
    dtypes = ("float32",) if args.quick else cases.DTYPES[device.type][:2]
    probabilities = PROBABILITIES[:1] if args.quick else PROBABILITIES
    backends = args.backend or [name for name in available_backends(device) if name != "reference"]
    rows = []
    for label in tensors:
        shape = (batch, *cases.MODEL_TENSORS[label])
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            size = torch.Size(shape).numel() * cases.ELEMENT_BYTES[dtype_name]
            source = torch.randn(shape, dtype=dtype, device=device)
            target = torch.empty_like(source)
            copy = measure_side_by_side({"copy": lambda: target.copy_(source)}, device, samples=args.samples)["copy"]
            copy_gbps = 2 * size / copy.median_s / 1e9
            for backend in backends:
                for p in probabilities:
                    for relu in (False, True):
                        row_call, subset_call, dinov2_call, kept_share = _calls(backend, shape, dtype, p, relu,
                                                                                device)
                        for pass_name in PASSES:
                            timings = measure_side_by_side({"row": _timed(row_call, pass_name),
                                                            "subset": _timed(subset_call, pass_name),
                                                            "dinov2": _timed(dinov2_call, pass_name)},
                                                           device, samples=args.samples)
                            entry = {"tensor": label, "shape": list(shape), "dtype": dtype_name, "backend": backend,
                                     "p": p, "activation": "relu" if relu else "none", "pass": pass_name,
                                     "kept_share": kept_share, "copy_gbps": copy_gbps}
                            for name, keep, subset in (("row", 1 - p, False), ("subset", kept_share, True),
                                                       ("dinov2", kept_share, True)):
                                moved = minimal_bytes(pass_name, size, cases.ELEMENT_BYTES[dtype_name], keep,
                                                      relu, subset)
                                entry[f"{name}_ms"] = timings[name].median_s * 1e3
                                entry[f"{name}_gbps"] = moved / timings[name].median_s / 1e9
                            entry["subset_bandwidth_vs_row"] = entry["subset_gbps"] / entry["row_gbps"]
                            entry["speedup_vs_dinov2"] = entry["dinov2_ms"] / entry["subset_ms"]
                            rows.append(entry)
    return {"benchmark": "subset_op", **environment(device, args.command), "samples": args.samples, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Subset op against row-mode op: {result['device']}"
             + (f", {result['threads']} threads" if result["device_type"] == "cpu" else "")
             + f"; torch {result['torch']}; {result['date']}", f"`{result['command']}`; "
             f"median of {result['samples']} samples; GB/s on each op's minimal bytes (bench/subset_op.py)", "",
             "| tensor | dtype | backend | p | act | pass | k/B | row ms | row GB/s | subset ms | subset GB/s | "
             "subset / row bandwidth | DINOv2-style ms | subset speed-up vs DINOv2-style | copy GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['tensor']} {tuple(r['shape'])} | {r['dtype']} | {r['backend']} | {r['p']} | "
                     f"{r['activation']} | {r['pass']} | {r['kept_share']:.3f} | {r['row_ms']:.3f} | "
                     f"{r['row_gbps']:.1f} | {r['subset_ms']:.3f} | {r['subset_gbps']:.1f} | "
                     f"{r['subset_bandwidth_vs_row']:.2f} | {r['dinov2_ms']:.3f} | {r['speedup_vs_dinov2']:.2f}x | "
                     f"{r['copy_gbps']:.1f} |")
    return "\n".join(lines)


def main(argv=None, command: str = "python -m bench.subset_op") -> None:
    run_and_write(argv, command, parse_args, run, markdown, "subset_op.json")


if __name__ == "__main__":
    main()
