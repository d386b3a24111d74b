"""Controls for the subset method's training-step benchmark, and the module swap they and the DINOv2
anchor use.

``AllRowsKeptSubsetAdd`` runs the method's mechanics (the kept rows from the seed, the gathers of the
branch's inputs, the fused add, and in backward the gather of the output's gradient and the scatter
of the inputs') with every row kept and the scale 1: the branch does exactly the work of the model
without stochastic depth, so its step time against that model is the method's own cost, which a
subset call pays before it saves anything.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from stochdepth_kernels import DropPathAdd
from stochdepth_kernels.backends import resolve_backend
from stochdepth_kernels.seeding import draw_seed
from stochdepth_kernels.subset import run_on_kept_rows


def replace_drop_modules(model: nn.Module, make: Callable[[DropPathAdd], nn.Module]) -> int:
    """Replaces every :class:`DropPathAdd` ``d`` of ``model`` with ``make(d)``; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DropPathAdd):
                setattr(module, name, make(child))
                replaced += 1
    return replaced


class AllRowsKeptSubsetAdd(nn.Module):
    """``act(residual + branch(*inputs))`` through the subset method's kernels with ``k = B`` kept rows
    in training (eval: the plain add); the ``add_branch`` interface of the :class:`DropPathAdd` it
    replaces."""

    def __init__(self, drop: DropPathAdd):
        super().__init__()
        self.activation, self.mode, self.scale_by_keep = drop.activation, "subset", drop.scale_by_keep
        self.train(drop.training)

    def add_branch(self, branch: Callable[..., Tensor], residual: Tensor, parameters, inputs=()) -> Tensor:
        relu = self.activation == "relu"
        if not self.training:
            out = residual + branch(*inputs)
            return torch.relu(out) if relu else out
        impl = resolve_backend("auto", residual.device, residual.numel() * residual.element_size())
        seed = draw_seed(residual.device, for_backward=True)
        return run_on_kept_rows(impl, branch, tuple(inputs), residual, seed, residual.shape[0], 1.0, relu)


def use_all_rows_kept(model: nn.Module) -> int:
    """Replaces every :class:`DropPathAdd` of ``model`` with the all-rows-kept control; returns how many."""
    return replace_drop_modules(model, AllRowsKeptSubsetAdd)
