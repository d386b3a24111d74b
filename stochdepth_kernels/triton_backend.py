"""Triton kernels of the stochdepth ops, forward and backward, registered with ``triton_op`` so
``torch.compile(fullgraph=True)`` traces into them.

    forward           out  = act(residual + f_b * x)        (residual absent: out = f_b * x)
    relu backward     g_r  = g * (out > 0),  g_x = f_b * g_r

``f_b`` is the factor of batch row ``b`` (DESIGN.md): in training ``tl.rand(seed, b) < float32(1 - p)``
decides the coin (``b = 0`` in batch mode) and a kept row gets ``1/(1-p)`` (or 1); in eval every row
gets 1 (or ``1 - p``). The seed and ``p`` are device tensors loaded in the kernel, never host values:
one compiled kernel serves every ``p``, and nothing synchronises with the host (CUDA-graph capture
itself is tested with the production-use issue, not yet here).

Tensors are walked in memory order as "runs" of ``run_length`` elements that share a batch row
(one whole sample when the batch dimension is outermost); a program handles ``BLOCK`` elements of
one run, so the row factor is one scalar per program and a dropped row's ``x`` load is predicated
off entirely. Offsets are int64: tensors past 2**31 elements are fine.

ReLU backward needs ``act'(out)``. It reads the saved output (fp32: 4 B/element of the 16 B/element
backward) rather than a bit-packed sign mask, which would cut the backward to 12.25 B/element but
add a numel/8-byte write and allocation to every forward, whether or not a backward follows; in a
residual network ``out`` stays alive anyway as the next block's saved input.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._library.triton import set_wrap_triton_enabled  # what triton_op's eager path uses
from torch.library import triton_op, wrap_triton

from stochdepth_kernels.ops import eager_autograd, register_drop_path_autograd

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Autotuned per row length (the key): short rows want small blocks, long rows large ones. The
# interpreter (CPU tests) runs one config: tuning there would only time numpy.
BLOCK_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)] if INTERPRETING else [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))
]


@triton.jit
def _row_factor(seed_ptr, p_ptr, row, SAMPLE: tl.constexpr, BATCH_MODE: tl.constexpr,
                SCALE_BY_KEEP: tl.constexpr, ACC: tl.constexpr):
    """The factor on x of batch row ``row``: 0 for a dropped row."""
    keep = 1.0 - tl.load(p_ptr).to(tl.float64)  # 1 - p in float64, as the contract says
    if SAMPLE:
        counter = row * 0 if BATCH_MODE else row
        kept = tl.rand(tl.load(seed_ptr), counter) < keep.to(tl.float32)
        if SCALE_BY_KEEP:
            kept_factor = tl.where(keep > 0.0, 1.0 / keep, 1.0)
        else:
            kept_factor = keep * 0.0 + 1.0  # a float64 scalar 1: both branches need one type
        factor = tl.where(kept, kept_factor, 0.0)
    elif SCALE_BY_KEEP:
        factor = keep * 0.0 + 1.0
    else:
        factor = keep
    return factor.to(ACC)


@triton.jit
def _run_block(run_length, BLOCK: tl.constexpr):
    """(run index, int64 element offsets, in-range mask) of this program's block."""
    blocks_per_run = tl.cdiv(run_length, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    run = pid // blocks_per_run
    in_run = (pid - run * blocks_per_run) * BLOCK + tl.arange(0, BLOCK)
    return run, run * run_length + in_run, in_run < run_length


@triton.autotune(configs=BLOCK_CONFIGS, key=["run_length"])
@triton.jit
def _drop_path_add_forward_kernel(
    x_ptr, residual_ptr, out_ptr,      # dense tensors in one layout; residual_ptr unused without HAS_RESIDUAL
    seed_ptr, p_ptr,                   # int64[1] seed (unused unless SAMPLE), 0-d float p, on the device
    batch, run_length,                 # rows; elements per run of one row in memory order
    SAMPLE: tl.constexpr, BATCH_MODE: tl.constexpr, SCALE_BY_KEEP: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    run, offsets, in_range = _run_block(run_length, BLOCK)
    factor = _row_factor(seed_ptr, p_ptr, run % batch, SAMPLE, BATCH_MODE, SCALE_BY_KEEP, ACC)
    # The scalar is broadcast before the `&` (the interpreter rejects block & scalar bool).
    read_x = in_range & ((tl.zeros([BLOCK], ACC) + factor) != 0.0)
    x = tl.load(x_ptr + offsets, mask=read_x, other=0.0).to(ACC)
    value = tl.where(read_x, factor * x, 0.0)
    if HAS_RESIDUAL:
        value += tl.load(residual_ptr + offsets, mask=in_range, other=0.0).to(ACC)
    if RELU:
        value = tl.where(value < 0.0, 0.0, value)  # keeps NaN and -0.0, as torch.relu
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=in_range)


@triton.autotune(configs=BLOCK_CONFIGS, key=["run_length"])
@triton.jit
def _relu_backward_kernel(
    grad_ptr, out_ptr,                 # dense, out's layout and dtype
    grad_x_ptr, grad_residual_ptr,     # dense, same layout, x's and residual's dtypes
    seed_ptr, p_ptr, batch, run_length,
    SAMPLE: tl.constexpr, BATCH_MODE: tl.constexpr, SCALE_BY_KEEP: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    run, offsets, in_range = _run_block(run_length, BLOCK)
    factor = _row_factor(seed_ptr, p_ptr, run % batch, SAMPLE, BATCH_MODE, SCALE_BY_KEEP, ACC)
    grad = tl.load(grad_ptr + offsets, mask=in_range, other=0.0).to(ACC)
    out = tl.load(out_ptr + offsets, mask=in_range, other=0.0).to(ACC)
    grad_residual = tl.where(out <= 0.0, 0.0, grad)  # threshold_backward: NaN out passes grad
    grad_x = tl.where(factor != 0.0, factor * grad_residual, 0.0)
    tl.store(grad_residual_ptr + offsets, grad_residual.to(grad_residual_ptr.dtype.element_ty), mask=in_range)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=in_range)


def _in_layout_of(t: Tensor, layout: Tensor) -> Tensor:
    """``t`` itself when it already has ``layout``'s strides, else a copy of it in that layout."""
    return t if t.stride() == layout.stride() else torch.empty_like(layout, dtype=t.dtype).copy_(t)


def _launch_config(out: Tensor, compute_dtype: torch.dtype, seed: Optional[Tensor], p: Tensor, training: bool,
                   mode: str, scale_by_keep: bool) -> tuple[tuple, dict]:
    """The arguments every kernel shares: (seed, p, batch, run_length) and the constexpr flags; ``out``
    gives the layout, ``compute_dtype`` the arithmetic (float64 for float64, else float32)."""
    if mode not in ("row", "batch"):
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
    batch = out.shape[0]
    run_length = out.stride(0) if batch > 1 else out.numel()
    p_device = p.to(device=out.device, dtype=torch.float64, non_blocking=True)  # the kernel loads element 0
    sample = training and seed is not None
    acc = tl.float64 if compute_dtype == torch.float64 else tl.float32
    flags = dict(SAMPLE=sample, BATCH_MODE=mode == "batch", SCALE_BY_KEEP=scale_by_keep, ACC=acc)
    return (seed if sample else p_device, p_device, batch, run_length), flags


def _grid(numel: int, run_length: int):
    runs = numel // run_length
    return lambda meta: (runs * triton.cdiv(run_length, meta["BLOCK"]),)


def _drop_path_add(x: Tensor, residual: Tensor, seed: Optional[Tensor], p: Tensor, training: bool,
                   mode: str, scale_by_keep: bool, relu: bool) -> Tensor:
    out = torch.empty_like(residual, dtype=torch.result_type(x, residual))
    if out.numel() == 0:
        return out
    shared, flags = _launch_config(out, out.dtype, seed, p, training, mode, scale_by_keep)
    wrap_triton(_drop_path_add_forward_kernel)[_grid(out.numel(), shared[-1])](
        _in_layout_of(x, out), _in_layout_of(residual, out), out, *shared,
        HAS_RESIDUAL=True, RELU=relu, **flags)
    return out


def _drop_path(x: Tensor, seed: Optional[Tensor], p: Tensor, training: bool, mode: str,
               scale_by_keep: bool, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    if out.numel() == 0:
        return out
    shared, flags = _launch_config(out, torch.promote_types(x.dtype, out.dtype), seed, p, training, mode,
                                   scale_by_keep)
    x_dense = _in_layout_of(x, out)
    wrap_triton(_drop_path_add_forward_kernel)[_grid(out.numel(), shared[-1])](
        x_dense, x_dense, out, *shared, HAS_RESIDUAL=False, RELU=False, **flags)
    return out


def _drop_path_add_relu_backward(grad: Tensor, out: Tensor, seed: Optional[Tensor], p: Tensor,
                                  training: bool, mode: str, scale_by_keep: bool,
                                  x_dtype: torch.dtype, residual_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    grad_x = torch.empty_like(out, dtype=x_dtype)
    grad_residual = torch.empty_like(out, dtype=residual_dtype)
    if out.numel() == 0:
        return grad_x, grad_residual
    shared, flags = _launch_config(grad_x, out.dtype, seed, p, training, mode, scale_by_keep)
    wrap_triton(_relu_backward_kernel)[_grid(out.numel(), shared[-1])](
        _in_layout_of(grad.to(out.dtype), grad_x), _in_layout_of(out, grad_x), grad_x, grad_residual,
        *shared, **flags)
    return grad_x, grad_residual


triton_drop_path_add = triton_op("stochdepth::triton_drop_path_add", mutates_args=())(_drop_path_add)
triton_drop_path = triton_op("stochdepth::triton_drop_path", mutates_args=())(_drop_path)
triton_drop_path_add_relu_backward = triton_op("stochdepth::triton_drop_path_add_relu_backward",
                                               mutates_args=())(_drop_path_add_relu_backward)
register_drop_path_autograd(triton_drop_path_add, triton_drop_path, triton_drop_path_add_relu_backward)


def _launching_directly(fn):
    """``fn`` with its ``wrap_triton`` launches going straight to the kernel, as triton_op's own
    eager path does: wrap_triton's higher-order-op dispatch is for tracing, and slow in eager."""

    @functools.wraps(fn)
    def run(*args):
        with set_wrap_triton_enabled(False):
            return fn(*args)

    return run


TRACED = (triton_drop_path_add, triton_drop_path)
EAGER = eager_autograd(*map(_launching_directly, (_drop_path_add, _drop_path, _drop_path_add_relu_backward)))
