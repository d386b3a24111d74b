"""End to end: a torchvision ResNet-50 training step (forward, backward, SGD step) without stochastic
depth, with sample-wise stochastic depth applied by ``apply_stochastic_depth``, and with block-wise
stochastic depth (drop_rate 0.5, linear), whose dropped blocks skip their branch's compute.

The block-wise saving is compared with what it can be: the expected fraction of the model's FLOPs
that skipping removes, sum over blocks of ``p_l * branch FLOPs_l / model FLOPs`` (counted by
``torch.utils.flop_counter`` on one forward; backward scales alike). Block-wise step times vary
with the coins, so that comparison uses mean step times; the table shows medians too.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from bench.op import RESULTS, device_folder, device_name, write_results
from bench.timing import measure_side_by_side
from stochdepth_kernels.surgery import apply_stochastic_depth, resnet_branch

DEFAULT_BATCH = {"cpu": (8, 128), "cuda": (64, 224)}  # (batch, image size)
SAMPLE_RATE, BLOCK_RATE = 0.2, 0.5
NONE, SAMPLE, BLOCK = "no stochastic depth", f"sample-wise, drop_rate {SAMPLE_RATE}", f"block-wise, drop_rate {BLOCK_RATE}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def resnet50(device, method=None, drop_rate=0.0):
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device).train()
    report = apply_stochastic_depth(model, stochastic_method=method, drop_rate=drop_rate) if method else None
    return model, report


def expected_skipped_fraction(model, report, x) -> float:
    """Expected share of the forward FLOPs that block-wise dropping skips."""
    modules = dict(model.named_modules())
    branch_inputs = {}
    hooks = [modules[name].register_forward_pre_hook(lambda m, args, name=name: branch_inputs.setdefault(name, args[0]))
             for name, *_ in report.changed]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    total = counter.get_total_flops()
    for hook in hooks:
        hook.remove()
    skipped = 0.0
    for name, _, rate, _ in report.changed:
        with torch.no_grad(), FlopCounterMode(display=False) as branch_counter:
            resnet_branch(modules[name], branch_inputs[name])
        skipped += rate * branch_counter.get_total_flops()
    model.train()
    return skipped / total


def run(args) -> dict:
    device = torch.device(args.device)
    batch, size = DEFAULT_BATCH[device.type]
    batch, size = args.batch or batch, args.image_size or size
    x = torch.randn(batch, 3, size, size, device=device)
    steps = {}
    models = {NONE: resnet50(device), SAMPLE: resnet50(device, "sample", SAMPLE_RATE),
              BLOCK: resnet50(device, "block", BLOCK_RATE)}
    for name, (model, _) in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()

        steps[name] = step
    timings = measure_side_by_side(steps, device, warmup=2, samples=args.samples)
    fraction = expected_skipped_fraction(*models[BLOCK], x)
    base = timings[NONE].median_s
    rows = [{"name": name, "median_ms": t.median_s * 1e3, "mean_ms": t.mean_s * 1e3, "min_ms": t.min_s * 1e3,
             "change_vs_none": t.median_s / base - 1, "mean_change_vs_none": t.mean_s / timings[NONE].mean_s - 1}
            for name, t in timings.items()]
    return {
        "benchmark": "models",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "command": args.command,
        "model": "torchvision resnet50", "batch": batch, "image_size": size, "samples": args.samples,
        "expected_skipped_flops_fraction": fraction,
        "block_saving_vs_expected": (1 - timings[BLOCK].mean_s / timings[NONE].mean_s) / fraction,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [f"Training step benchmark: {result['device']}"
             + (f", {result['threads']} threads" if result["device_type"] == "cpu" else "")
             + f"; torch {result['torch']}; {result['date']}",
             f"`{result['command']}`; {result['model']}, batch {result['batch']}, {result['image_size']}px, "
             f"SGD; median of {result['samples']} steps", "",
             "| stochastic depth | median ms | vs none | mean ms | vs none | min ms |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | {row['median_ms']:.1f} | {100 * row['change_vs_none']:+.1f}% | "
                     f"{row['mean_ms']:.1f} | {100 * row['mean_change_vs_none']:+.1f}% | {row['min_ms']:.1f} |")
    lines += ["", f"Block-wise: expected share of FLOPs skipped {100 * result['expected_skipped_flops_fraction']:.1f}%; "
                  f"the mean step time saved is {100 * result['block_saving_vs_expected']:.0f}% of that."]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = " ".join(["python", "-m", "bench.models", *argv])
    result = run(args)
    write_results(result, markdown(result), args.output or RESULTS / device_folder(result) / "models.json")


if __name__ == "__main__":
    main()
