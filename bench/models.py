"""End to end: a training step (forward, backward, SGD step) of timm's ResNet-50 and a ViT (ViT-S/16 on
a CPU, ViT-B/16 on a GPU; Swin-T, EVA-02-Ti and CaiT-XXS24 with ``--model``) with stochastic depth in every variant below, the
candidates of one model timed round-robin:

- none: the model built with ``drop_path_rate=0``;
- timm DropPath: built with ``drop_path_rate`` 0.1 and 0.4 (timm's linear schedule);
- stochdepth sample-wise: the rate-0 model given the same per-block rates by ``apply_drop_path``
  (timm's convention; the fused add), at 0.1;
- stochdepth block-wise: the same with rate 0.5 and ``stochastic_method="block"``, whose dropped
  blocks skip their branch's compute;
- stochdepth subset: ``stochastic_method="subset"`` at 0.1 and 0.4, whose branches run on the kept
  samples only;
- DINOv2-style subset: the anchor to beat, the same blocks and the same number of kept samples in
  pure PyTorch as DINOv2 writes it (``randperm``, ``index_select``, ``index_add(alpha=B/k)``;
  bench/dinov2_subset.py).

Two controls, run only when named (``--variant all-kept one-less``), tell where a subset saving goes:
``all-kept`` is the subset model with every row kept (the method's mechanics at no skipped work: its
own cost; bench/subset_controls.py), ``one-less`` the model without stochastic depth on one sample
fewer (what dropping a sample in every block could save at most). Two more split a block-wise
saving in its parts: ``block-kept`` is the block-wise model with every block at rate 0 (what the
skip costs where it runs the branch; compiled, a kept block inside its ``torch.cond``) and
``block-dropped`` the same at rate 1 (what skipping every branch saves).

A skipping variant's saving is compared with what it can be: the expected share of the model's
FLOPs that skipping removes, the sum over stochastic-depth modules of ``rate * (FLOPs with the
module's branch run - FLOPs with it skipped) / FLOPs`` (``torch.utils.flop_counter``, one forward per
module; backward scales alike), the rate being the module's effective one at the batch size (for the
subset method ``1 - k/B``). That comparison uses the mean over rounds of each round's step time
against none's in the same round (bench/timing.py ``paired_change``, with its 95 % interval: a shared
machine drifts by more than the savings measured; block-wise step times vary with the coins too);
the table shows medians, means and minimums too.

``--compile``: every model compiled with ``torch.compile`` (inductor; the optimizer step stays eager),
timed the same way against compiled none, with inductor's layout optimization off for every variant
(it breaks the ``torch.cond`` that the block-wise skip compiles to in convolutional models:
docs/training.md). Each candidate's first step, compilation included, is
timed apart before the rounds and reported as its compile time (the first step less the median
step), from an empty inductor cache (a temporary directory, unless ``TORCHINDUCTOR_CACHE_DIR`` names
another than inductor's default): a warm one from an earlier run would report cache hits, not compiles.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch._inductor.config
from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir, temporary_cache_dir
from torch.utils.flop_counter import FlopCounterMode

from bench.cli import run_and_write
from bench.dinov2_subset import use_dinov2_subset
from bench.op import environment
from bench.subset_controls import use_all_rows_kept
from bench.timing import measure_side_by_side, paired_change
from stochdepth_kernels import DropPathAdd
from stochdepth_kernels.surgery import apply_drop_path

MODELS = {"ResNet-50": "resnet50", "ViT-S/16": "vit_small_patch16_224", "ViT-B/16": "vit_base_patch16_224",
          "Swin-T": "swin_tiny_patch4_window7_224", "EVA-02-Ti": "eva02_tiny_patch14_224",
          "CaiT-XXS24": "cait_xxs24_224"}
# The models whose timm constructor takes img_size (it adapts patch grids, position embeddings and windows).
SIZED_PREFIXES = ("vit", "swin", "eva", "cait")
DEFAULT_MODELS = {"cpu": ("ResNet-50", "ViT-S/16"), "cuda": ("ResNet-50", "ViT-B/16")}
# (batch, image size). On the CPU batch 16: at 8 a branch run on 7 samples costs nearly what it costs on 8,
# so the subset method saved a smaller part of its expected FLOP share there.
DEFAULT_BATCH = {"cpu": (16, 128), "cuda": (128, 224)}
QUICK_BATCH = (2, 64)
SAMPLE_RATE, BLOCK_RATE, HIGH_RATE = 0.1, 0.5, 0.4
NONE, TIMM = "no stochastic depth", f"timm DropPath, drop_path_rate {SAMPLE_RATE}"
TIMM_HIGH = f"timm DropPath, drop_path_rate {HIGH_RATE}"
SAMPLE, BLOCK = f"stochdepth sample-wise, {SAMPLE_RATE}", f"stochdepth block-wise, {BLOCK_RATE}"
SUBSET, SUBSET_HIGH = f"stochdepth subset, {SAMPLE_RATE}", f"stochdepth subset, {HIGH_RATE}"
DINOV2, DINOV2_HIGH = f"DINOv2-style subset, {SAMPLE_RATE}", f"DINOv2-style subset, {HIGH_RATE}"
ALL_KEPT, ONE_LESS = "control: subset, every row kept", "control: none, one sample fewer"
BLOCK_KEPT, BLOCK_DROPPED = "control: block-wise, every block kept", "control: block-wise, every block dropped"


class Variant(NamedTuple):
    """A variant's command-line id, timm's ``drop_path_rate`` at build, surgery's ``stochastic_method``
    (None: no surgery), its rate and ``drop_distribution``, and what then replaces the surgery's
    modules (None, ``use_dinov2_subset`` or ``use_all_rows_kept``)."""
    identifier: str
    timm_rate: float
    method: str | None = None
    rate: float = 0.0
    replace: Callable[[nn.Module], int] | None = None
    distribution: str = "linear"


VARIANTS = {
    NONE: Variant("none", 0.0),
    TIMM: Variant("timm", SAMPLE_RATE),
    TIMM_HIGH: Variant("timm-0.4", HIGH_RATE),
    SAMPLE: Variant("sample", 0.0, "sample", SAMPLE_RATE),
    BLOCK: Variant("block", 0.0, "block", BLOCK_RATE),
    SUBSET: Variant("subset", 0.0, "subset", SAMPLE_RATE),
    SUBSET_HIGH: Variant("subset-0.4", 0.0, "subset", HIGH_RATE),
    DINOV2: Variant("dinov2", 0.0, "subset", SAMPLE_RATE, use_dinov2_subset),
    DINOV2_HIGH: Variant("dinov2-0.4", 0.0, "subset", HIGH_RATE, use_dinov2_subset),
    ALL_KEPT: Variant("all-kept", 0.0, "subset", SAMPLE_RATE, use_all_rows_kept),
    ONE_LESS: Variant("one-less", 0.0),
    BLOCK_KEPT: Variant("block-kept", 0.0, "block", 0.0, distribution="uniform"),
    BLOCK_DROPPED: Variant("block-dropped", 0.0, "block", 1.0, distribution="uniform"),
}
BY_ID = {variant.identifier: name for name, variant in VARIANTS.items()}
CONTROLS = (ALL_KEPT, ONE_LESS, BLOCK_KEPT, BLOCK_DROPPED)
DEFAULT_VARIANTS = tuple(name for name in VARIANTS if name not in CONTROLS)
# The variants whose dropped work is skipped, and the variant whose modules give its expected share.
SKIPPING = {BLOCK: BLOCK, SUBSET: SUBSET, SUBSET_HIGH: SUBSET_HIGH, DINOV2: SUBSET, DINOV2_HIGH: SUBSET_HIGH,
            BLOCK_DROPPED: BLOCK_DROPPED}

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=f"batch and image size {QUICK_BATCH}, 3 samples")
    parser.add_argument("--model", nargs="+", choices=list(MODELS),
                        help="models to run (default: ResNet-50 and ViT-S/16 on a CPU, ResNet-50 and ViT-B/16 on a GPU; "
                             "also Swin-T, EVA-02-Ti and CaiT-XXS24)")
    parser.add_argument("--variant", nargs="+", choices=list(BY_ID),
                        help="variants to run (default: all but the controls all-kept, one-less, block-kept and "
                             "block-dropped; 'none' always runs, the others compare with it)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--samples", type=int, default=None, help="steps timed per candidate (default 15)")
    parser.add_argument("--compile", action="store_true",
                        help="compile every model (torch.compile, inductor, layout optimization off); compile times "
                             "reported apart")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def build(model_name: str, image_size: int, device, stochastic: str = NONE):
    """The model (same weights for every variant) with stochastic depth ``stochastic`` (a VARIANTS name)."""
    variant = VARIANTS[stochastic]
    torch.manual_seed(0)
    options = {"img_size": image_size} if model_name.startswith(SIZED_PREFIXES) else {}
    model = timm.create_model(model_name, drop_path_rate=variant.timm_rate, **options).to(device).train()
    if variant.method is not None:
        apply_drop_path(model, variant.rate, stochastic_method=variant.method, drop_distribution=variant.distribution)
    if variant.replace is not None:
        variant.replace(model)
    return model


def _forward_flops(model, x) -> int:
    # With gradients on: under no_grad, FlopCounterMode's module tracker fails on CaiT's class-attention
    # blocks (torch 2.14.1, "Expected gradient function to be set").
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def expected_skipped_fraction(model, x, batch: int) -> float:
    """Expected share of the forward FLOPs that skipping dropped work saves at batch ``batch``: each
    stochastic-depth module's branch FLOPs (found by forcing it to drop, on ``x``) times its
    effective drop rate at that batch."""
    rates = {m: m.drop_prob for m in model.modules() if isinstance(m, DropPathAdd)}
    for module in rates:
        module.drop_prob = 0.0
    total, skipped = _forward_flops(model, x), 0.0
    for module, rate in rates.items():
        module.drop_prob = 1.0
        dropped_flops = total - _forward_flops(model, x)
        module.drop_prob = rate
        skipped += module.effective_drop_rate(batch) * dropped_flops
        module.drop_prob = 0.0
    for module, rate in rates.items():
        module.drop_prob = rate
    return skipped / total


def _first_step_seconds(step, device: torch.device) -> float:
    """Wall time of ``step``'s first call (a compiled model compiles in it), the device synchronised."""
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_model(model_name: str, x: torch.Tensor, samples: int, variants=DEFAULT_VARIANTS,
                compiled: bool = False) -> dict:
    """The variants' training steps side by side on the batch ``x`` (ONE_LESS on all of it but its first
    sample; ``variants``: names; NONE is added if missing); ``compiled``: each model under torch.compile."""
    chosen = [NONE, *(name for name in variants if name != NONE)]
    models = {name: build(model_name, x.shape[-1], x.device, name) for name in chosen}
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        forward = torch.compile(model) if compiled else model

        def step(forward=forward, optimizer=optimizer, batch=x[1:] if name == ONE_LESS else x):
            optimizer.zero_grad(set_to_none=True)
            forward(batch).square().mean().backward()
            optimizer.step()

        steps[name] = step
    with torch._inductor.config.patch(layout_optimization=False) if compiled else contextlib.nullcontext():
        first_step_s = {name: _first_step_seconds(step, x.device) for name, step in steps.items()} if compiled else {}
        timings = measure_side_by_side(steps, x.device, warmup=2, samples=samples, min_calls=1)
    # FLOPs counted on 2 samples (BatchNorm trains on 2 or more; FLOPs scale with the batch).
    skipping = {name: SKIPPING[name] for name in chosen if name in SKIPPING}
    fractions = {source: expected_skipped_fraction(build(model_name, x.shape[-1], x.device, source), x[:2],
                                                   x.shape[0])
                 for source in set(skipping.values())}
    none = timings[NONE]
    rows = []
    for name, t in timings.items():
        paired, paired_ci = paired_change(t, none)
        row = {"name": name, "median_ms": t.median_s * 1e3, "mean_ms": t.mean_s * 1e3, "min_ms": t.min_s * 1e3,
               "change_vs_none": t.median_s / none.median_s - 1, "mean_change_vs_none": t.mean_s / none.mean_s - 1,
               "paired_change_vs_none": paired, "paired_change_ci95": paired_ci,
               "rounds_ms": [sample * 1e3 for sample in t.rounds_s]}
        if name in first_step_s:
            row["first_step_s"] = first_step_s[name]
            row["compile_s"] = first_step_s[name] - t.median_s
        if name in skipping:
            fraction = fractions[skipping[name]]
            row["expected_skipped_flops_fraction"] = fraction
            row["saving_vs_expected"], row["saving_vs_expected_ci95"] = -paired / fraction, paired_ci / fraction
        rows.append(row)
    result = {"rows": rows}
    if TIMM in timings and SAMPLE in timings:  # the fused op against the unfused chain it replaces
        result["sample_vs_timm"] = paired_change(timings[SAMPLE], timings[TIMM])
    if {BLOCK, BLOCK_KEPT, BLOCK_DROPPED} <= timings.keys():
        by_name = {row["name"]: row for row in rows}
        result["block_saving_from_controls"] = block_saving_from_controls(
            by_name[BLOCK_KEPT]["paired_change_vs_none"], by_name[BLOCK_DROPPED]["paired_change_vs_none"],
            fractions[BLOCK_DROPPED], fractions[BLOCK])
    return result


def block_saving_from_controls(kept_change: float, dropped_change: float, branch_share: float,
                               skipped_share: float) -> float:
    """The share of ``skipped_share`` (the FLOPs the block-wise rates skip on average) that the block-wise
    variant saves, as the two controls predict it: every block kept changes the step by ``kept_change``,
    every block dropped (``branch_share`` of the FLOPs skipped) by ``dropped_change``, each taken
    proportional to the branches' FLOPs: the skipped share saves its part of the dropped saving, the
    kept share (``branch_share - skipped_share``) costs its part of the kept cost."""
    saved = -dropped_change * skipped_share / branch_share
    cost = kept_change * (branch_share - skipped_share) / branch_share
    return (saved - cost) / skipped_share


@contextlib.contextmanager
def cold_inductor_cache():
    """A fresh, empty inductor cache directory for the block, so that compile times are a first
    compile's, not a cache hit of an earlier run's; a ``TORCHINDUCTOR_CACHE_DIR`` the user chose is
    kept. Inductor writes its default directory into that variable when it first looks (importing
    this package does), so only a directory other than the default counts as chosen."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as directory, temporary_cache_dir(directory):
        yield


def run(args) -> dict:
    device = torch.device(args.device)
    batch, size = QUICK_BATCH if args.quick else DEFAULT_BATCH[device.type]
    batch, size = args.batch or batch, args.image_size or size
    samples = args.samples or (3 if args.quick else 15)
    x = torch.randn(batch, 3, size, size, device=device)
    labels = args.model or DEFAULT_MODELS[device.type]
    variants = [BY_ID[identifier] for identifier in args.variant] if args.variant else DEFAULT_VARIANTS
    with cold_inductor_cache() if args.compile else contextlib.nullcontext():
        results = {label: bench_model(MODELS[label], x, samples, variants, args.compile) for label in labels}
    return {"benchmark": "models", **environment(device, args.command), "batch": batch, "image_size": size,
            "samples": samples, "compiled": args.compile, "models": results}


def markdown(result: dict) -> str:
    lines = [f"Training step benchmark: {result['device']}"
             + (f", {result['threads']} threads" if result["device_type"] == "cpu" else "")
             + f"; torch {result['torch']}; {result['date']}",
             f"`{result['command']}`; timm models, batch {result['batch']}, {result['image_size']}px, SGD; "
             f"{result['samples']} steps per candidate"
             + ("; every model compiled (torch.compile, inductor, layout optimization off); compile time = "
                "first step - median step"
                if result.get("compiled") else "")]
    compile_column = result.get("compiled", False)
    for label, model in result["models"].items():
        lines += ["", f"{label}:", "", "| stochastic depth | median ms | vs none | mean ms | vs none | min ms | "
                  "paired vs none (95 % CI) | expected FLOPs skipped | saving / expected (95 % CI) |"
                  + (" compile s |" if compile_column else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if compile_column else "")]
        for row in model["rows"]:
            skipped = (f"{100 * row['expected_skipped_flops_fraction']:.1f}% | {100 * row['saving_vs_expected']:.0f}% "
                       f"± {100 * row['saving_vs_expected_ci95']:.0f}" if "saving_vs_expected" in row else " | ")
            lines.append(f"| {row['name']} | {row['median_ms']:.1f} | {100 * row['change_vs_none']:+.1f}% | "
                         f"{row['mean_ms']:.1f} | {100 * row['mean_change_vs_none']:+.1f}% | {row['min_ms']:.1f} | "
                         f"{100 * row['paired_change_vs_none']:+.1f}% ± {100 * row['paired_change_ci95']:.1f} | "
                         f"{skipped} |" + (f" {row['compile_s']:.1f} |" if compile_column else ""))
        if "sample_vs_timm" in model:
            change, interval = model["sample_vs_timm"]
            lines += ["", f"{SAMPLE} against {TIMM}, paired by round: {100 * change:+.1f}% ± {100 * interval:.1f}"]
        if "block_saving_from_controls" in model:
            lines += ["", f"{BLOCK}, its saving / expected as the two block controls predict it (kept cost and dropped "
                          f"saving proportional to the branches' FLOPs): {100 * model['block_saving_from_controls']:.0f}%"]
    return "\n".join(lines)


def main(argv=None, command: str = "python -m bench.models") -> None:
    run_and_write(argv, command, parse_args, run, markdown, "models.json")


if __name__ == "__main__":
    main()
