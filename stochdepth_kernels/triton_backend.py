"""Triton kernels of the stochdepth ops, forward and backward, registered with ``triton_op`` so
``torch.compile(fullgraph=True)`` traces into them.

    forward           out  = act(residual + f_b * x)        (residual absent: out = f_b * x)
    relu backward     g_r  = g * (out > 0),  g_x = f_b * g_r    ((out > 0) from the ReLU sign mask)
    subset            the same kernels, x's row of batch row b being index[b] (SUBSET)

``f_b`` is the factor of batch row ``b`` (docs/design.md): in training ``tl.rand(seed, b) < float32(1 - p)``
decides the coin (``b = 0`` in batch mode) and a kept row gets ``1/(1-p)`` (or 1); in eval every row
gets 1 (or ``1 - p``). The seed and ``p`` are device tensors loaded in the kernel, never host values:
one compiled kernel serves every ``p``, and nothing synchronises with the host (CUDA-graph capture
itself is tested with the production-use issue, not yet here).

Tensors are walked in memory order as "runs" of ``run_length`` elements that share a batch row
(one whole sample when the batch dimension is outermost); a program handles ``BLOCK`` elements of
one run, so the row factor is one scalar per program and a dropped row's ``x`` load is predicated
off entirely. Offsets are int64: tensors past 2**31 elements are fine.

ReLU backward needs ``act'(out)``: the forward writes the bit-packed sign mask when a backward will
follow (byte counts and layout: stochdepth_kernels/relu_mask.py). A program's block starts on a
multiple of BLOCK in its run, so it owns whole mask bytes: 8 elements' bits are packed by a
reshape to (BLOCK / 8, 8) and a sum, and unpacked the same way.
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

from stochdepth_kernels.layouts import (batch_outermost_empty, empty_rows_like, in_batch_outermost,
                                        in_rows_layout_of, is_batch_outermost)
from stochdepth_kernels.ops import (eager_autograd, eager_rows_autograd, eager_subset_autograd, in_layout,
                                    register_drop_path_autograd, register_rows_autograd, register_subset_autograd)
from stochdepth_kernels.relu_mask import check_relu_mask, relu_mask_bytes, run_length as run_length_of

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE_ENV = "STOCHDEPTH_TRITON_AUTOTUNE"
# Autotuned per row length (the key): short rows want small blocks, long rows large ones.
TUNED_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps)
                 for block, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))]


def autotuning(environ=os.environ) -> bool:
    """Whether the kernels tune over every config (``$STOCHDEPTH_TRITON_AUTOTUNE``, "1" by default) or
    run the first. The tests set "0": each kernel variant then compiles once, not once per config
    (most of the GPU suite's time on an H100). The interpreter never tunes: it would only time numpy."""
    value = environ.get(AUTOTUNE_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be '0' or '1', got {value!r}")
    return value == "1" and environ.get("TRITON_INTERPRET") != "1"


BLOCK_CONFIGS = TUNED_CONFIGS if autotuning() else TUNED_CONFIGS[:1]


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
def _row_plan(seed_ptr, p_ptr, index_ptr, run, batch, run_length, SUBSET: tl.constexpr, SAMPLE: tl.constexpr,
              BATCH_MODE: tl.constexpr, SCALE_BY_KEEP: tl.constexpr, ACC: tl.constexpr):
    """(factor on x of the run's row, offset of x's run). Row and batch mode: x's run is the walked
    tensor's. SUBSET (the batch outermost, so a run is a row): x's row is ``index[run]``, -1 where the
    row is dropped (factor 0), and ``p_ptr`` holds the kept rows' scale."""
    if SUBSET:
        x_row = tl.load(index_ptr + run)
        factor = tl.where(x_row >= 0, tl.load(p_ptr), 0.0).to(ACC)
        return factor, x_row * run_length
    else:
        return _row_factor(seed_ptr, p_ptr, run % batch, SAMPLE, BATCH_MODE, SCALE_BY_KEEP, ACC), run * run_length


@triton.jit
def _uniforms_kernel(seed_ptr, uniforms_ptr, batch, BLOCK: tl.constexpr):
    """``tl.rand(seed, b)`` of every row ``b``: the coins the subset method ranks."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(uniforms_ptr + rows, tl.rand(tl.load(seed_ptr), rows), mask=rows < batch)


@triton.jit
def _stored_as(value, ptr):
    """``value`` in ``ptr``'s element type. A 16-bit float goes through float32, as the CUDA and CPU
    kernels round (the interpreter's direct float64 -> bfloat16 cast gives garbage)."""
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        return value.to(tl.float32).to(ptr.dtype.element_ty)
    return value.to(ptr.dtype.element_ty)


@triton.jit
def _run_block(run_length, BLOCK: tl.constexpr):
    """(run index, first element of the block in its run, int64 offsets of its elements in the run,
    in-range mask) of this program's block."""
    blocks_per_run = tl.cdiv(run_length, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    run = pid // blocks_per_run
    start = (pid - run * blocks_per_run) * BLOCK
    in_run = start + tl.arange(0, BLOCK)
    return run, start, in_run, in_run < run_length


@triton.jit
def _mask_bytes(mask_ptr, run, start, run_length, BLOCK: tl.constexpr):
    """Pointers to the block's BLOCK / 8 bytes of the ReLU sign mask and which of them exist."""
    bytes_per_run = tl.cdiv(run_length, 8)
    index = start // 8 + tl.arange(0, BLOCK // 8)
    return mask_ptr + run * bytes_per_run + index, index < bytes_per_run


@triton.autotune(configs=BLOCK_CONFIGS, key=["run_length"])
@triton.jit
def _drop_path_add_forward_kernel(
    x_ptr, residual_ptr, out_ptr,      # dense tensors in one layout; residual_ptr unused without HAS_RESIDUAL
    mask_ptr,                          # uint8 ReLU sign mask, written if SAVE_MASK
    seed_ptr, p_ptr,                   # int64[1] seed (unused unless SAMPLE), 0-d float p (or scale), on the device
    index_ptr,                         # SUBSET: int64 x row of each walked row (_row_plan)
    batch, run_length,                 # rows; elements per run of one row in memory order
    SUBSET: tl.constexpr, SAMPLE: tl.constexpr, BATCH_MODE: tl.constexpr, SCALE_BY_KEEP: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, SAVE_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    run, start, in_run, in_range = _run_block(run_length, BLOCK)
    offsets = run * run_length + in_run
    factor, x_run = _row_plan(seed_ptr, p_ptr, index_ptr, run, batch, run_length, SUBSET, SAMPLE, BATCH_MODE,
                              SCALE_BY_KEEP, ACC)
    # The scalar is broadcast before the `&` (the interpreter rejects block & scalar bool).
    read_x = in_range & ((tl.zeros([BLOCK], ACC) + factor) != 0.0)
    x = tl.load(x_ptr + x_run + in_run, mask=read_x, other=0.0).to(ACC)
    value = tl.where(read_x, factor * x, 0.0)
    if HAS_RESIDUAL:
        value += tl.load(residual_ptr + offsets, mask=in_range, other=0.0).to(ACC)
    if RELU:
        value = tl.where(value < 0.0, 0.0, value)  # keeps NaN and -0.0, as torch.relu
    stored = _stored_as(value, out_ptr)
    tl.store(out_ptr + offsets, stored, mask=in_range)
    if SAVE_MASK:
        # Bits of the stored values, as eager's relu backward reads its output; out of range: 0.
        passes = tl.where(stored.to(ACC) <= 0.0, 0, 1)
        bits = tl.reshape(passes, [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
        pointers, exists = _mask_bytes(mask_ptr, run, start, run_length, BLOCK)
        tl.store(pointers, tl.sum(bits, axis=1).to(tl.uint8), mask=exists)


@triton.autotune(configs=BLOCK_CONFIGS, key=["run_length"])
@triton.jit
def _relu_backward_kernel(
    grad_ptr, mask_ptr,                # dense grad in the forward output's layout; its ReLU sign mask
    grad_x_ptr, grad_residual_ptr,     # dense, same layout, x's and residual's dtypes (SUBSET: x's k rows)
    seed_ptr, p_ptr, index_ptr, batch, run_length,
    SUBSET: tl.constexpr, SAMPLE: tl.constexpr, BATCH_MODE: tl.constexpr, SCALE_BY_KEEP: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    run, start, in_run, in_range = _run_block(run_length, BLOCK)
    offsets = run * run_length + in_run
    factor, x_run = _row_plan(seed_ptr, p_ptr, index_ptr, run, batch, run_length, SUBSET, SAMPLE, BATCH_MODE,
                              SCALE_BY_KEEP, ACC)
    grad = tl.load(grad_ptr + offsets, mask=in_range, other=0.0).to(ACC)
    pointers, exists = _mask_bytes(mask_ptr, run, start, run_length, BLOCK)
    mask_bytes = tl.load(pointers, mask=exists, other=0).to(tl.int32)
    passes = tl.reshape((mask_bytes[:, None] >> tl.arange(0, 8)[None, :]) & 1, [BLOCK])
    grad_residual = tl.where(passes != 0, grad, 0.0)
    grad_x = tl.where(factor != 0.0, factor * grad_residual, 0.0)
    tl.store(grad_residual_ptr + offsets, _stored_as(grad_residual, grad_residual_ptr), mask=in_range)
    # A subset's dropped row has no row of grad_x.
    write_x = in_range & ((tl.zeros([BLOCK], ACC) + factor) != 0.0) if SUBSET else in_range
    tl.store(grad_x_ptr + x_run + in_run, _stored_as(grad_x, grad_x_ptr), mask=write_x)


def _launch_config(out: Tensor, compute_dtype: torch.dtype, seed: Optional[Tensor], p: Tensor, training: bool,
                   mode: str, scale_by_keep: bool) -> tuple[tuple, dict]:
    """The arguments every kernel shares: (seed, p, batch, run_length) and the constexpr flags; ``out``
    gives the layout, ``compute_dtype`` the arithmetic (float64 for float64, else float32)."""
    if mode not in ("row", "batch"):
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
    p_device = p.to(device=out.device, dtype=torch.float64, non_blocking=True)  # the kernel loads element 0
    sample = training and seed is not None
    acc = tl.float64 if compute_dtype == torch.float64 else tl.float32
    flags = dict(SUBSET=False, SAMPLE=sample, BATCH_MODE=mode == "batch", SCALE_BY_KEEP=scale_by_keep, ACC=acc)
    return (seed if sample else p_device, p_device, p_device, out.shape[0], run_length_of(out)), flags


def _subset_launch_config(layout: Tensor, compute_dtype: torch.dtype, index: Tensor,
                          scale: float) -> tuple[tuple, dict]:
    """:func:`_launch_config` of a subset kernel walking ``layout`` (batch outermost): x's row of each
    walked row in ``index``, the kept rows' factor ``scale``."""
    if not 0.0 < scale < float("inf"):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    scale_device = torch.full((), scale, dtype=torch.float64, device=layout.device)
    acc = tl.float64 if compute_dtype == torch.float64 else tl.float32
    flags = dict(SUBSET=True, SAMPLE=False, BATCH_MODE=False, SCALE_BY_KEEP=True, ACC=acc)
    return (index, scale_device, index, layout.shape[0], run_length_of(layout)), flags


def _grid(numel: int, run_length: int):
    runs = numel // run_length
    return lambda meta: (runs * triton.cdiv(run_length, meta["BLOCK"]),)


def _drop_path_add(x: Tensor, residual: Tensor, seed: Optional[Tensor], p: Tensor, training: bool,
                   mode: str, scale_by_keep: bool, relu: bool, save_relu_mask: bool = False) -> tuple[Tensor, Tensor]:
    if save_relu_mask and not relu:
        raise ValueError("save_relu_mask=True needs relu=True, got relu=False")
    out = torch.empty_like(residual, dtype=torch.result_type(x, residual))
    relu_mask = out.new_empty((relu_mask_bytes(out) if save_relu_mask else 0,), dtype=torch.uint8)
    if out.numel() == 0:
        return out, relu_mask
    shared, flags = _launch_config(out, out.dtype, seed, p, training, mode, scale_by_keep)
    wrap_triton(_drop_path_add_forward_kernel)[_grid(out.numel(), shared[-1])](
        in_layout(x, out.stride()), in_layout(residual, out.stride()), out, relu_mask if save_relu_mask else out,
        *shared, HAS_RESIDUAL=True, RELU=relu, SAVE_MASK=save_relu_mask, **flags)
    return out, relu_mask


def _drop_path(x: Tensor, seed: Optional[Tensor], p: Tensor, training: bool, mode: str,
               scale_by_keep: bool, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    if out.numel() == 0:
        return out
    shared, flags = _launch_config(out, torch.promote_types(x.dtype, out.dtype), seed, p, training, mode,
                                   scale_by_keep)
    x_dense = in_layout(x, out.stride())
    wrap_triton(_drop_path_add_forward_kernel)[_grid(out.numel(), shared[-1])](
        x_dense, x_dense, out, out, *shared, HAS_RESIDUAL=False, RELU=False, SAVE_MASK=False, **flags)
    return out


def _drop_path_add_relu_backward(grad: Tensor, relu_mask: Tensor, seed: Optional[Tensor], p: Tensor,
                                  training: bool, mode: str, scale_by_keep: bool,
                                  x_dtype: torch.dtype, residual_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    check_relu_mask(relu_mask, grad)
    grad_x = torch.empty_like(grad, dtype=x_dtype)
    grad_residual = torch.empty_like(grad, dtype=residual_dtype)
    if grad.numel() == 0:
        return grad_x, grad_residual
    compute_dtype = torch.promote_types(x_dtype, residual_dtype)
    shared, flags = _launch_config(grad_x, compute_dtype, seed, p, training, mode, scale_by_keep)
    wrap_triton(_relu_backward_kernel)[_grid(grad.numel(), shared[-1])](
        grad.to(compute_dtype), relu_mask, grad_x, grad_residual, *shared, **flags)
    return grad_x, grad_residual


def _subset_rows(seed: Tensor, batch: int, kept: int) -> Tensor:
    if not 0 <= kept <= batch:
        raise ValueError(f"kept must be in [0, batch], got kept={kept} and batch={batch}")
    uniforms = torch.empty(batch, dtype=torch.float32, device=seed.device)
    if batch > 0:
        # Not autotuned, so under TRITON_INTERPRET=1 an InterpretedFunction, which torch 2.11's wrap_triton
        # refuses even with wrapping off (2.14 passes it through); the interpreter cannot be traced anyway.
        launch = _uniforms_kernel if INTERPRETING else wrap_triton(_uniforms_kernel)
        launch[(triton.cdiv(batch, 1024),)](seed, uniforms, batch, BLOCK=1024)
    return torch.sort(uniforms, stable=True).indices[:kept].sort().values


def _check_subset(y: Tensor, residual: Tensor, rows: Tensor) -> None:
    if residual.dim() == 0 or y.shape[1:] != residual.shape[1:] or y.shape[0] != rows.numel():
        raise ValueError(f"y must hold the {rows.numel()} kept rows of residual's shape {list(residual.shape)}, "
                         f"got shape {list(y.shape)}")
    if rows.dtype != torch.int64 or rows.dim() != 1 or rows.device != residual.device:
        raise ValueError(f"rows must be a 1-D int64 tensor on {residual.device}, got {rows.dtype} tensor of shape "
                         f"{list(rows.shape)} on {rows.device}")


def _slot_of_rows(rows: Tensor, batch: int) -> Tensor:
    """Each of ``batch`` rows' position in ``rows``, -1 where it is not kept."""
    slot = torch.full((batch,), -1, dtype=torch.int64, device=rows.device)
    return slot.index_copy_(0, rows, torch.arange(rows.numel(), dtype=torch.int64, device=rows.device))


def _subset_add(y: Tensor, residual: Tensor, rows: Tensor, scale: float, relu: bool,
                save_relu_mask: bool = False) -> tuple[Tensor, Tensor]:
    _check_subset(y, residual, rows)
    if save_relu_mask and not relu:
        raise ValueError("save_relu_mask=True needs relu=True, got relu=False")
    out = batch_outermost_empty(residual, torch.result_type(y, residual))
    relu_mask = out.new_empty((relu_mask_bytes(out) if save_relu_mask else 0,), dtype=torch.uint8)
    if out.numel() == 0:
        return out, relu_mask
    shared, flags = _subset_launch_config(out, out.dtype, _slot_of_rows(rows, out.shape[0]), scale)
    y_dense = in_rows_layout_of(y, out) if y.shape[0] > 0 else out  # no row of y is read
    wrap_triton(_drop_path_add_forward_kernel)[_grid(out.numel(), shared[-1])](
        y_dense, in_layout(residual, out.stride()), out, relu_mask if save_relu_mask else out,
        *shared, HAS_RESIDUAL=True, RELU=relu, SAVE_MASK=save_relu_mask, **flags)
    return out, relu_mask


def _subset_gather(grad: Tensor, rows: Tensor, scale: float, out_dtype: torch.dtype) -> Tensor:
    grad = in_batch_outermost(grad)
    out = empty_rows_like(grad, rows.numel(), out_dtype)
    if out.numel() == 0:
        return out
    shared, flags = _subset_launch_config(out, torch.promote_types(grad.dtype, out_dtype), rows, scale)
    wrap_triton(_drop_path_add_forward_kernel)[_grid(out.numel(), shared[-1])](
        grad, grad, out, out, *shared, HAS_RESIDUAL=False, RELU=False, SAVE_MASK=False, **flags)
    return out


def _subset_scatter(y: Tensor, rows: Tensor, batch: int, scale: float, out_dtype: torch.dtype) -> Tensor:
    if y.dim() == 0 or rows.numel() != y.shape[0] or batch < y.shape[0]:
        raise ValueError(f"y must hold the {rows.numel()} kept rows of a batch of {batch}, got shape {list(y.shape)}")
    y = in_batch_outermost(y)
    out = empty_rows_like(y, batch, out_dtype)
    if out.numel() == 0:
        return out
    shared, flags = _subset_launch_config(out, torch.promote_types(y.dtype, out_dtype), _slot_of_rows(rows, batch),
                                          scale)
    y_dense = y if y.shape[0] > 0 else out  # no row of y is read
    wrap_triton(_drop_path_add_forward_kernel)[_grid(out.numel(), shared[-1])](
        y_dense, y_dense, out, out, *shared, HAS_RESIDUAL=False, RELU=False, SAVE_MASK=False, **flags)
    return out


def _subset_add_relu_backward(grad: Tensor, relu_mask: Tensor, rows: Tensor, scale: float, y_dtype: torch.dtype,
                              residual_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    check_relu_mask(relu_mask, grad)
    if not is_batch_outermost(grad):
        raise ValueError(f"grad must be in the subset forward's layout (batch outermost), got strides {list(grad.stride())}")
    grad_y = empty_rows_like(grad, rows.numel(), y_dtype)
    grad_residual = torch.empty_like(grad, dtype=residual_dtype)
    if grad.numel() == 0:
        return grad_y, grad_residual
    compute_dtype = torch.promote_types(y_dtype, residual_dtype)
    shared, flags = _subset_launch_config(grad, compute_dtype, _slot_of_rows(rows, grad.shape[0]), scale)
    wrap_triton(_relu_backward_kernel)[_grid(grad.numel(), shared[-1])](
        grad.to(compute_dtype), relu_mask, grad_y if grad_y.numel() > 0 else grad_residual, grad_residual,
        *shared, **flags)
    return grad_y, grad_residual


triton_drop_path_add = triton_op("stochdepth::triton_drop_path_add", mutates_args=())(_drop_path_add)
triton_drop_path = triton_op("stochdepth::triton_drop_path", mutates_args=())(_drop_path)
triton_drop_path_add_relu_backward = triton_op("stochdepth::triton_drop_path_add_relu_backward",
                                               mutates_args=())(_drop_path_add_relu_backward)
TRACED = register_drop_path_autograd(triton_drop_path_add, triton_drop_path, triton_drop_path_add_relu_backward)
triton_subset_rows = triton_op("stochdepth::triton_subset_rows", mutates_args=())(_subset_rows)
triton_subset_add = triton_op("stochdepth::triton_subset_add", mutates_args=())(_subset_add)
triton_subset_gather = triton_op("stochdepth::triton_subset_gather", mutates_args=())(_subset_gather)
triton_subset_scatter = triton_op("stochdepth::triton_subset_scatter", mutates_args=())(_subset_scatter)
triton_subset_add_relu_backward = triton_op("stochdepth::triton_subset_add_relu_backward",
                                            mutates_args=())(_subset_add_relu_backward)
SUBSET_TRACED = (triton_subset_rows, register_subset_autograd(triton_subset_add, triton_subset_gather,
                                                              triton_subset_add_relu_backward),
                 register_rows_autograd(triton_subset_gather, triton_subset_scatter))


def _launching_directly(fn):
    """``fn`` with its ``wrap_triton`` launches going straight to the kernel, as triton_op's own
    eager path does: wrap_triton's higher-order-op dispatch is for tracing, and slow in eager."""

    @functools.wraps(fn)
    def run(*args):
        with set_wrap_triton_enabled(False):
            return fn(*args)

    return run


EAGER = eager_autograd(*map(_launching_directly, (_drop_path_add, _drop_path, _drop_path_add_relu_backward)))
SUBSET_EAGER = (_launching_directly(_subset_rows), eager_subset_autograd(
    *map(_launching_directly, (_subset_add, _subset_gather, _subset_add_relu_backward))),
    eager_rows_autograd(*map(_launching_directly, (_subset_gather, _subset_scatter))))
