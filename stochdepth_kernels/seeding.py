"""The 64-bit seed of one training call (DESIGN.md, "One random stream for every backend")."""
from __future__ import annotations

import torch
from torch import Tensor

from stochdepth_kernels.validation import MAX_SEED, check_generator, check_seed


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """A 1-element int64 seed in [0, 2**63 - 1), drawn on ``device`` from ``generator`` (else the
    device's default generator). Drawing on the device keeps it inside CUDA graphs and visible to
    torch.compile; ``torch.manual_seed`` reproduces it."""
    check_generator(generator, device)
    return torch.randint(0, MAX_SEED - 1, (1,), dtype=torch.int64, device=device, generator=generator)


def seed_tensor(seed: int | Tensor, device: torch.device) -> Tensor:
    """A user-given seed as the 1-element int64 tensor on ``device`` the ops take."""
    check_seed(seed)
    if isinstance(seed, Tensor):
        return seed.reshape(1).to(device)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def call_seed(training: bool, p_is_zero: bool, seed, generator, device: torch.device) -> Tensor | None:
    """The seed of one call: None when no coin is drawn (eval, or p known to be 0), which leaves the
    generator untouched; the given ``seed`` if any; else a fresh draw."""
    if not training or p_is_zero:
        check_generator(generator, device)
        if seed is not None:
            check_seed(seed)
        return None
    if seed is not None:
        check_generator(generator, device)
        return seed_tensor(seed, device)
    return draw_seed(device, generator)
