"""The ReLU sign mask that the ReLU forward saves for its backward (layout: csrc/op_common.h), in
Python: its size, the check of the backward's arguments, and packing and unpacking in pure PyTorch
(the reference's).

A dense tensor's memory splits into runs of ``run_length`` elements that share a batch row (one
whole sample when the batch dimension is outermost). Each run takes ``ceil(run_length / 8)`` bytes;
bit ``k`` of a run's byte ``j`` is set where element ``8j + k`` of the run, in memory order, is
positive or NaN: where relu passes its gradient (``threshold_backward``).

Why a mask and not the output: the ReLU backward needs only that bit per element. Saving ``out``
makes the backward read it whole (fp32: 4 bytes per element, bf16: 2); the mask costs the forward a
write of 1/8 byte per element and the backward a read of as much. Forward + backward, in bytes per
element at p = 0.1: fp32 27.6 with ``out`` against 23.85 with the mask (torch.compile's fused
graph, which saves a 1-byte bool, moves 25.6); bf16 13.8 against 12.05. Only calls whose backward
will run write it (autograd records them); inference pays nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor

GROUP = 8  # elements per mask byte


def run_length(dense: Tensor) -> int:
    """Elements per run of one batch row in ``dense``'s memory order."""
    return dense.stride(0) if dense.shape[0] > 1 else dense.numel()


def _bytes_per_run(length: int) -> int:
    return -(-length // GROUP)


def relu_mask_bytes(dense: Tensor) -> int:
    """Size of the mask of the dense tensor ``dense``."""
    if dense.numel() == 0:
        return 0
    length = run_length(dense)
    return dense.numel() // length * _bytes_per_run(length)


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its memory span exactly once (any order of dimensions)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_relu_mask(relu_mask: Tensor, grad: Tensor) -> None:
    """The backward's ``grad`` is dense in the forward output's layout, which gives the mask's."""
    if grad.dim() == 0:
        raise ValueError("grad must have a batch dimension, got a 0-d tensor")
    if not is_dense(grad):
        raise ValueError(f"grad must be dense, in the forward output's layout, got strides {list(grad.stride())}")
    size = relu_mask_bytes(grad)
    if relu_mask.dtype != torch.uint8 or relu_mask.dim() != 1 or relu_mask.numel() != size:
        raise ValueError(f"relu_mask must be the forward's uint8 mask of {size} bytes for grad of shape "
                         f"{list(grad.shape)}, got {relu_mask.dtype} tensor of shape {list(relu_mask.shape)}")


def _memory_order(dense: Tensor) -> Tensor:
    """A flat view of the dense tensor ``dense`` in memory order."""
    return dense.as_strided((dense.numel(),), (1,), dense.storage_offset())


def pack(out: Tensor) -> Tensor:
    """The mask of the dense tensor ``out``."""
    if out.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=out.device)
    length = run_length(out)
    groups = _bytes_per_run(length)
    passes = torch.zeros(out.numel() // length, groups * GROUP, dtype=torch.int32, device=out.device)
    passes[:, :length] = (~(_memory_order(out) <= 0)).reshape(-1, length)
    shifts = torch.arange(GROUP, dtype=torch.int32, device=out.device)
    return (passes.reshape(-1, groups, GROUP) << shifts).sum(-1).to(torch.uint8).reshape(-1)


def unpack(relu_mask: Tensor, like: Tensor) -> Tensor:
    """Where relu passed, as a bool tensor shaped and laid out like the dense tensor ``like``."""
    passes = torch.empty_like(like, dtype=torch.bool)
    if like.numel() == 0:
        return passes
    length = run_length(like)
    shifts = torch.arange(GROUP, dtype=torch.int32, device=like.device)
    bits = (relu_mask.to(torch.int32).reshape(-1, 1) >> shifts) & 1
    _memory_order(passes).copy_(bits.reshape(like.numel() // length, -1)[:, :length].reshape(-1) != 0)
    return passes


def masked_gradient(grad: Tensor, relu_mask: Tensor) -> Tensor:
    """``grad`` where relu passed (``relu_mask`` of ``grad``'s dense layout), 0 elsewhere: the ReLU's
    backward in ops that autograd records, for a double backward."""
    return grad.masked_fill(~unpack(relu_mask, grad), 0)
