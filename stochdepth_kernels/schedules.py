"""Drop rates per block, and a warm-up of them over training.

Conventions: timm's ``torch.linspace(0, rate, depth)`` (first block 0, last ``rate``, the float32
values timm computes) and the paper's / Composer's ``(l + 1) / L * rate`` (first ``rate / L``, last
``rate``); ``"uniform"`` gives every block ``rate``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from stochdepth_kernels import validation
from stochdepth_kernels.modules import _HasDropProbability

__all__ = ["DropRateWarmup", "drop_path_rates"]

DISTRIBUTIONS = ("linear", "uniform")
CONVENTIONS = ("timm", "paper")


def drop_path_rates(depth: int | Sequence[int], drop_rate: float, distribution: str = "linear",
                    convention: str = "timm") -> list[float] | list[list[float]]:
    """The drop probability of each of ``depth`` blocks; with a list of stage depths, one list per
    stage, the schedule running over all blocks in order (as timm's staged models split it)."""
    validation.check_choice(distribution, "distribution", DISTRIBUTIONS)
    validation.check_choice(convention, "convention", CONVENTIONS)
    validation.check_probability(drop_rate, "drop_rate")
    stages = [depth] if isinstance(depth, int) else list(depth) if isinstance(depth, Sequence) else None
    if stages is None or any(isinstance(d, bool) or not isinstance(d, int) for d in stages):
        raise TypeError(f"depth must be a non-negative int or a list of them, got {depth!r}")
    if any(d < 0 for d in stages):
        raise ValueError(f"depth must be a non-negative int or a list of them, got {depth!r}")
    total = sum(stages)
    if distribution == "uniform":
        flat = [float(drop_rate)] * total
    elif convention == "timm":
        flat = torch.linspace(0, drop_rate, total).tolist()
    else:
        flat = [(block + 1) / total * drop_rate for block in range(total)]
    if isinstance(depth, int):
        return flat
    starts = [sum(stages[:i]) for i in range(len(stages))]
    return [flat[start:start + size] for start, size in zip(starts, stages)]


class DropRateWarmup:
    """Scales the ``drop_prob`` of the given stochastic-depth modules (or of every one inside a
    model) linearly from 0 to its value at construction over the first ``warmup_steps`` calls of
    :meth:`step`, one per training step; then leaves them at their targets. Setting the rate
    writes each module's ``p`` buffer in place, so a compiled model does not recompile."""

    def __init__(self, modules: nn.Module | Iterable[nn.Module], warmup_steps: int):
        validation.check_count(warmup_steps, "warmup_steps")
        if not isinstance(modules, (nn.Module, Iterable)) or isinstance(modules, str):
            raise TypeError(f"modules must be a torch.nn.Module or an iterable of them, got {type(modules).__name__}")
        found = modules.modules() if isinstance(modules, nn.Module) else modules
        self.modules = [m for m in found if isinstance(m, _HasDropProbability)]
        if not self.modules:
            raise ValueError("no stochastic-depth module (DropPath, DropPathAdd, StochasticDepth) found")
        self.targets = [m.drop_prob for m in self.modules]
        self.warmup_steps = warmup_steps
        self.steps = 0
        self._apply()

    @classmethod
    def from_fraction(cls, modules, total_steps: int, drop_warmup: float) -> DropRateWarmup:
        """Composer's ``drop_warmup``: the warm-up lasts that fraction of ``total_steps``."""
        validation.check_count(total_steps, "total_steps")
        validation.check_probability(drop_warmup, "drop_warmup")
        return cls(modules, round(drop_warmup * total_steps))

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def factor(self) -> float:
        return 1.0 if self.steps >= self.warmup_steps else self.steps / self.warmup_steps

    def _apply(self) -> None:
        factor = self.factor()
        for module, target in zip(self.modules, self.targets):
            module.drop_prob = target * factor

    def state_dict(self) -> dict:
        return {"steps": self.steps, "warmup_steps": self.warmup_steps, "targets": list(self.targets)}

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` saved, for the same modules."""
        keys = sorted(self.state_dict())
        if not isinstance(state, dict) or sorted(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a DropRateWarmup.state_dict() with the keys {keys}, got {got}")
        if len(state["targets"]) != len(self.modules):
            raise ValueError(f"state has targets for {len(state['targets'])} modules, this warm-up drives "
                             f"{len(self.modules)}")
        self.steps, self.warmup_steps, self.targets = state["steps"], state["warmup_steps"], list(state["targets"])
        self._apply()
