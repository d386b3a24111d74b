"""Memory layouts of the subset ops' tensors (the rules of csrc/op_common.h, in Python): the batch
dimension outermost, so that a row of the branch's ``k`` rows and a row of the block's ``B`` rows
have one layout and row ``r`` starts at ``r * row_numel``."""
from __future__ import annotations

import torch
from torch import Tensor

from stochdepth_kernels.relu_mask import is_dense


def is_batch_outermost(t: Tensor) -> bool:
    return t.dim() > 0 and is_dense(t) and (t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel())


def batch_outermost_empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    """An output like ``like`` in ``dtype``: like's layout where the batch dimension is outermost, else
    the contiguous one."""
    out = torch.empty_like(like, dtype=dtype)
    return out if is_batch_outermost(out) else torch.empty(like.shape, dtype=dtype, device=like.device)


def empty_rows_like(layout: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """``rows`` rows of ``layout``'s row shape, each in layout's row layout (batch outermost;
    contiguous when layout has no row)."""
    if layout.shape[0] == 0:
        return torch.empty((rows, *layout.shape[1:]), dtype=dtype, device=layout.device)
    row_numel = layout.numel() // layout.shape[0]
    return torch.empty_strided((rows, *layout.shape[1:]), (row_numel, *layout.stride()[1:]), dtype=dtype,
                               device=layout.device)


def in_batch_outermost(t: Tensor) -> Tensor:
    return t if is_batch_outermost(t) else batch_outermost_empty(t, t.dtype).copy_(t)


def in_rows_layout_of(t: Tensor, layout: Tensor) -> Tensor:
    """``t`` (rows of layout's row shape) in the row layout of ``layout``: itself when it has it."""
    like = empty_rows_like(layout, t.shape[0], t.dtype)
    return t if t.stride() == like.stride() else like.copy_(t)
