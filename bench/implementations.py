"""The implementations compared, each a callable ``(x, r) -> out`` for one ``p`` and activation:
this package's backends, eager timm-style ``act(drop_path(x) + r)``, torchvision's
``stochastic_depth(x, p, "row") + r``, and ``torch.compile`` of the eager timm expression.

``BASELINES`` name the rows speed-ups are taken against; ``AGAIN`` marks this package's first
backend timed a second time, which shows the run's noise."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from stochdepth_kernels import available_backends, fused_drop_path_add

EAGER, TORCHVISION, COMPILED = "eager timm", "torchvision", "torch.compile(eager timm)"
BASELINES = {"eager": EAGER, "compile": COMPILED}
OURS_PREFIX = "stochdepth "
AGAIN = " (again)"

Implementation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _activate(out: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.relu(out) if activation == "relu" else out


def eager_timm(x: torch.Tensor, r: torch.Tensor, p: float, activation: str) -> torch.Tensor:
    from timm.layers import drop_path

    return _activate(drop_path(x, p, True) + r, activation)


def torchvision_add(x: torch.Tensor, r: torch.Tensor, p: float, activation: str) -> torch.Tensor:
    from torchvision.ops import stochastic_depth

    return _activate(stochastic_depth(x, p, "row", training=True) + r, activation)


@functools.cache
def compiled_eager_timm() -> Callable:
    """One ``torch.compile`` of :func:`eager_timm` for the whole run, dynamic in shape, so that
    recompiles are per dtype, rank, activation and p (dynamo specialises a float that decides a
    branch)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(eager_timm, dynamic=True)


def implementations(device: torch.device, p: float, activation: str, *, with_compile: bool = True,
                    backends: list[str] | None = None) -> dict[str, Implementation]:
    """Name -> implementation for one ``p`` and activation on ``device``: every kernel backend of
    this package (``backends`` to choose; the reference is eager PyTorch and not a kernel), the first
    of them timed again, then the baselines."""
    names = backends or [name for name in available_backends(device) if name != "reference"]
    fused_activation = None if activation == "none" else activation
    ours = {f"{OURS_PREFIX}{name}": (lambda x, r, name=name: fused_drop_path_add(x, r, p, activation=fused_activation,
                                                                              backend=name))
            for name in names}
    first = next(iter(ours))
    chosen = {**ours, first + AGAIN: ours[first],
              EAGER: lambda x, r: eager_timm(x, r, p, activation),
              TORCHVISION: lambda x, r: torchvision_add(x, r, p, activation)}
    if with_compile:
        compiled = compiled_eager_timm()
        chosen[COMPILED] = lambda x, r: compiled(x, r, p, activation)
    return chosen


def is_ours(name: str) -> bool:
    return name.startswith(OURS_PREFIX) and not name.endswith(AGAIN)
