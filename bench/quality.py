"""Does the subset method train as well as sample-wise stochastic depth? A short training of a small
residual network on a real data set that a package ships (scikit-learn's handwritten digits: 1797
8x8 images, 10 classes; 1297 to train, 500 held out), three ways, a few seeds each:

- none: no stochastic depth;
- sample-wise: ``StochasticDepth(mode="row")``, timm's ``DropPath`` semantics;
- subset: ``StochasticDepth(mode="subset")``, the branch run on the kept samples only.

Rates follow timm's linear schedule up to ``--rate`` over the blocks. Reported per variant: the final
held-out accuracy and loss of each seed, their mean and spread; the question is whether subset's mean
lies within the seeds' spread of sample-wise.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

from bench.cli import run_and_write
from bench.op import environment
from stochdepth_kernels import StochasticDepth, drop_path_rates

VARIANTS = {"none": None, "sample-wise": "row", "subset": "subset"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rate", type=float, default=0.4, help="drop rate of the last block (timm's linspace)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3 epochs")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args(argv)


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, held-out images, held-out labels), pixels scaled to [0, 1], one
    fixed shuffle."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, held_out = order[:1297], order[1297:]
    return images[train], labels[train], images[held_out], labels[held_out]


def residual_mlp(mode: str | None, rate: float, width: int = 128, depth: int = 8) -> nn.Module:
    """``depth`` pre-norm residual blocks (LayerNorm, Linear, GELU, Linear) between a stem and a head,
    each a :class:`StochasticDepth` with timm's linear rates (``mode`` None: rate 0)."""
    rates = drop_path_rates(depth, rate if mode else 0.0)
    blocks = [StochasticDepth(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                            nn.Linear(2 * width, width)), p=p, mode=mode or "row")
              for p in rates]
    return nn.Sequential(nn.Linear(64, width), *blocks, nn.LayerNorm(width), nn.Linear(width, 10))


def train(mode: str | None, rate: float, seed: int, epochs: int, data) -> dict:
    """AdamW, batch 64, cosine learning rate; the held-out accuracy and loss after the last epoch."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = residual_mlp(mode, rate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = -(-len(y_train) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train)).split(64):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
    return {"seed": seed, "accuracy": (logits.argmax(1) == y_test).float().mean().item(),
            "loss": loss_fn(logits, y_test).item()}


def summary(runs: list[dict]) -> dict:
    accuracy = [run["accuracy"] for run in runs]
    loss = [run["loss"] for run in runs]
    spread = statistics.stdev if len(runs) > 1 else (lambda values: 0.0)
    return {"accuracy_mean": statistics.fmean(accuracy), "accuracy_std": spread(accuracy),
            "accuracy_min": min(accuracy), "accuracy_max": max(accuracy),
            "loss_mean": statistics.fmean(loss), "loss_std": spread(loss)}


def run(args) -> dict:
    seeds, epochs = (2, 3) if args.quick else (args.seeds, args.epochs)
    data = digits()
    variants = {}
    for name, mode in VARIANTS.items():
        runs = [train(mode, args.rate, seed, epochs, data) for seed in range(seeds)]
        variants[name] = {"runs": runs, **summary(runs)}
    sample, subset = variants["sample-wise"], variants["subset"]
    within = sample["accuracy_min"] <= subset["accuracy_mean"] <= sample["accuracy_max"] or \
        abs(subset["accuracy_mean"] - sample["accuracy_mean"]) <= sample["accuracy_std"]
    return {"benchmark": "quality", **environment(torch.device("cpu"), args.command), "data": "scikit-learn digits",
            "seeds": seeds, "epochs": epochs, "rate": args.rate, "variants": variants,
            "subset_within_sample_spread": within}


def markdown(result: dict) -> str:
    lines = [f"Training quality: {result['data']} (1297 train, 500 held out), residual MLP of 8 blocks, "
             f"timm's linear rates up to {result['rate']}, {result['epochs']} epochs, {result['seeds']} seeds; "
             f"{result['device']}; torch {result['torch']}; {result['date']}", f"`{result['command']}`", "",
             "| stochastic depth | held-out accuracy (mean ± std) | min | max | held-out loss (mean ± std) |",
             "|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {100 * v['accuracy_mean']:.2f}% ± {100 * v['accuracy_std']:.2f} | "
                     f"{100 * v['accuracy_min']:.2f}% | {100 * v['accuracy_max']:.2f}% | "
                     f"{v['loss_mean']:.4f} ± {v['loss_std']:.4f} |")
    verdict = "within" if result["subset_within_sample_spread"] else "outside"
    lines += ["", f"Subset's mean accuracy is {verdict} the seeds' spread of sample-wise."]
    return "\n".join(lines)


def main(argv=None, command: str = "python -m bench.quality") -> None:
    run_and_write(argv, command, parse_args, run, markdown, "quality.json")


if __name__ == "__main__":
    main()
