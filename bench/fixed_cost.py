"""A call's fixed cost: ``fused_drop_path_add`` at p = 0.1 on tensors small enough that the time of a
call is its fixed cost rather than its bytes, beside timm's chain ``residual + drop_path(x)``,
torchvision's ``stochastic_depth(x) + residual`` and ATen's ``torch.add(x, residual)``, side by side
in one run (round-robin medians, bench/timing.py), then where the time of the package's call goes.

Passes: forward without autograd; forward+backward through ``torch.autograd.grad`` (what a user
times); and forward+backward through the autograd engine directly (the C++ call that
``torch.autograd.grad`` makes after its Python argument handling, which a training step pays once
per step and not once per op, so this pass is the per-op cost a step sees).

The breakdown times the steps of the eager call one at a time (bench/fixed_cost.py, ``STEPS``):
each row is a measured call, and the derived rows (``=``) are differences of measured ones.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.cli import run_and_write
from bench.implementations import eager_timm, torchvision_add
from bench.op import environment
from bench.timing import measure_side_by_side
from stochdepth_kernels import _C, fused_drop_path_add, validation
from stochdepth_kernels.functional import _fast_path_open
from stochdepth_kernels.seeding import draw_seed, rank_offset

SHAPES = {"cpu": {"(2, 16)": (2, 16), "ViT-S/16 tokens, batch 8": (8, 65, 384)},
          "cuda": {"ViT-B/16 tokens, batch 32": (32, 197, 768), "ViT-B/16 tokens, batch 256": (256, 197, 768)}}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
P = 0.1
# Warm-up calls per candidate: the first calls after a shape first appears (fresh pages, allocator
# caches) cost several times a later one, and the fastest warm-up call sets the calls per sample.
WARMUP = 20
OURS, TIMM, TORCHVISION, ATEN = "stochdepth", "timm chain", "torchvision", "ATen add"
PASSES = ("forward", "forward+backward", "forward+backward (engine)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="the first shape, few samples")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def implementations() -> dict:
    """Name -> ``(x, r) -> out`` at p = 0.1, no activation."""
    return {OURS: lambda x, r: fused_drop_path_add(x, r, P), TIMM: lambda x, r: eager_timm(x, r, P, "none"),
            TORCHVISION: lambda x, r: torchvision_add(x, r, P, "none"), ATEN: torch.add}


def engine_grad(out: torch.Tensor, inputs: tuple, grad: torch.Tensor):
    """The gradients of ``inputs`` by the autograd engine's own entry point, as torch.autograd.grad
    runs it (no graph kept, no higher order)."""
    return torch.autograd.Variable._execution_engine.run_backward((out,), (grad,), False, False, inputs, False)


def passes(fn, x, r, g) -> dict:
    """Pass -> a call of ``fn`` on leaves ``x``, ``r`` (forward without autograd) and ``g``."""
    x_plain, r_plain = x.detach(), r.detach()
    return {"forward": lambda: fn(x_plain, r_plain),
            "forward+backward": lambda: torch.autograd.grad(fn(x, r), (x, r), g),
            "forward+backward (engine)": lambda: engine_grad(fn(x, r), (x, r), g)}


def steps(x, r, g) -> dict:
    """The eager call's steps, each alone (a fresh seed, p and output each time, as in a call)."""
    device = x.device
    x_plain, r_plain = x.detach(), r.detach()
    seed, p = draw_seed(device), validation.probability_tensor(P, device)

    def kernel_with_node():
        return _C.drop_path_add(x, r, seed, p, True, "row", True, False)

    return {
        "public call, no autograd": lambda: fused_drop_path_add(x_plain, r_plain, P),
        "C++ fast path (try_drop_path_add), no autograd":
            lambda: _C.try_drop_path_add(x_plain, r_plain, P, True, "row", True, None, None, None, 0),
        "Python gate (compile, seed tape, rank offset)": lambda: _fast_path_open("auto") and rank_offset(),
        "seed draw (C++ randint)": lambda: _C.draw_seed(device, None),
        "kernel entry (pybind, output, kernel), no autograd":
            lambda: _C.drop_path_add(x_plain, r_plain, seed, p, True, "row", True, False),
        "kernel entry with its autograd node": kernel_with_node,
        "kernel entry + backward (engine)": lambda: engine_grad(kernel_with_node(), (x, r), g),
        "ATen add, no autograd": lambda: torch.add(x_plain, r_plain),
        "ATen add + backward (engine)": lambda: engine_grad(torch.add(x, r), (x, r), g),
    }


def derived(us: dict) -> dict:
    """The breakdown rows that are differences of measured steps."""
    return {
        "= Python wrapper (public - fast path)":
            us["public call, no autograd"] - us["C++ fast path (try_drop_path_add), no autograd"],
        "= argument checks and p in C++ (fast path - seed - kernel entry)":
            us["C++ fast path (try_drop_path_add), no autograd"] - us["seed draw (C++ randint)"]
            - us["kernel entry (pybind, output, kernel), no autograd"],
        "= the autograd node (with - without)":
            us["kernel entry with its autograd node"] - us["kernel entry (pybind, output, kernel), no autograd"],
        "= backward: node + engine (entry + backward - entry with node)":
            us["kernel entry + backward (engine)"] - us["kernel entry with its autograd node"],
        "= ATen add's backward: node + engine": us["ATen add + backward (engine)"] - us["ATen add, no autograd"],
    }


def _leaves(shape, dtype, device):
    x, r, g = (torch.randn(shape, dtype=dtype, device=device) for _ in range(3))
    return x.requires_grad_(), r.requires_grad_(), g


def _us(timings: dict) -> dict:
    return {name: t.median_s * 1e6 for name, t in timings.items()}


def run(args) -> dict:
    device = torch.device(args.device)
    dtype_name = DTYPES[device.type]
    shapes = dict(list(SHAPES[device.type].items())[:1]) if args.quick else SHAPES[device.type]
    samples = 7 if args.quick else args.samples
    rows, breakdown = [], []
    for label, shape in shapes.items():
        x, r, g = _leaves(shape, getattr(torch, dtype_name), device)
        for pass_name in PASSES:
            fns = {name: passes(fn, x, r, g)[pass_name] for name, fn in implementations().items()}
            us = _us(measure_side_by_side(fns, device, warmup=WARMUP, samples=samples))
            rows += [{"shape_label": label, "shape": list(shape), "dtype": dtype_name, "pass": pass_name,
                      "implementation": name, "median_us": value, "vs_timm": value / us[TIMM]}
                     for name, value in us.items()]
        us = _us(measure_side_by_side(steps(x, r, g), device, warmup=WARMUP, samples=samples))
        breakdown += [{"shape_label": label, "shape": list(shape), "dtype": dtype_name, "step": name, "median_us": value}
                      for name, value in {**us, **derived(us)}.items()]
    return {"benchmark": "fixed_cost", **environment(device, args.command), "samples": samples, "p": P,
            "rows": rows, "breakdown": breakdown}


def markdown(result: dict) -> str:
    threads = f", {result['threads']} threads" if result["device_type"] == "cpu" else ""
    lines = [f"Fixed cost of a call: {result['device']}{threads}; torch {result['torch']}; {result['date']}",
             f"`{result['command']}`; p = {result['p']}, no activation; median of {result['samples']} round-robin "
             "samples (bench/fixed_cost.py)", "",
             "| tensor | dtype | pass | implementation | µs | / timm chain |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['shape_label']} {tuple(row['shape'])} | {row['dtype']} | {row['pass']} | {row['implementation']} "
              f"| {row['median_us']:.1f} | {row['vs_timm']:.2f}x |" for row in result["rows"]]
    lines += ["", "Where the call's time goes (each step measured alone; `=` rows are differences):", "",
              "| tensor | step | µs |", "|---|---|---|"]
    lines += [f"| {row['shape_label']} | {row['step']} | {row['median_us']:.1f} |" for row in result["breakdown"]]
    return "\n".join(lines)


def main(argv=None, command: str = "python -m bench.fixed_cost") -> None:
    run_and_write(argv, command, parse_args, run, markdown, "fixed_cost.json")


if __name__ == "__main__":
    main()
