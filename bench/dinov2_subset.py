"""The anchor the subset method must beat: DINOv2's way of running a residual branch on a subset of
the batch (``drop_add_residual_stochastic_depth`` in facebookresearch/dinov2, ``layers/block.py``),
in plain PyTorch: ``randperm`` picks the kept samples, ``index_select`` gathers them, the branch runs
on them, and ``index_add(..., alpha=B / k)`` adds its output back into a copy of the residual.

It replaces each :class:`DropPathAdd` of a model after ``apply_drop_path(...,
stochastic_method="subset")``, so the blocks, their tails and the number of kept samples ``k`` are
this package's; only the subset mechanics differ (DINOv2 itself takes ``k = max(int(B (1 - p)), 1)``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench.subset_controls import replace_drop_modules
from stochdepth_kernels import DropPathAdd, subset_size


class Dinov2StyleSubsetAdd(nn.Module):
    """``act(residual + drop(branch(*inputs)))`` by randperm, index_select and index_add; the same
    ``add_branch`` interface and attributes as the :class:`DropPathAdd` it replaces."""

    def __init__(self, drop: DropPathAdd):
        super().__init__()
        self.drop_prob, self.activation, self.mode = drop.drop_prob, drop.activation, "subset"
        self.scale_by_keep = drop.scale_by_keep
        self.train(drop.training)

    def add_branch(self, branch: Callable[..., Tensor], residual: Tensor, parameters, inputs=()) -> Tensor:
        batch = residual.shape[0]
        kept = subset_size(batch, self.drop_prob) if self.training else batch
        if kept == batch:
            out = residual + branch(*inputs)
        elif kept == 0:
            out = residual.clone()
        else:
            rows = torch.randperm(batch, device=residual.device)[:kept]
            y = branch(*(t.index_select(0, rows) for t in inputs))
            out = torch.index_add(residual.flatten(1), 0, rows, y.flatten(1).to(residual.dtype),
                                  alpha=batch / kept).view_as(residual)
        return torch.relu(out) if self.activation == "relu" else out


def use_dinov2_subset(model: nn.Module) -> int:
    """Replaces every :class:`DropPathAdd` of ``model`` with the anchor; returns how many."""
    return replace_drop_modules(model, Dinov2StyleSubsetAdd)
