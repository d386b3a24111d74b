"""The contract of docs/design.md in pure PyTorch: the ground truth every kernel is checked against and the
fallback on devices without a native kernel.

The functions below take the arguments of the ``stochdepth::`` ops (``drop_path_add`` returns the
output alone; :func:`stochdepth_kernels.relu_mask.pack` gives its ReLU sign mask). Philox4x32-10
runs on int64 tensors holding uint32 words, on any device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from stochdepth_kernels.layouts import batch_outermost_empty, empty_rows_like, in_batch_outermost
from stochdepth_kernels.relu_mask import check_relu_mask, unpack

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
# Triton's uint_to_uniform_float scale for 32 bits: (2**23 - 1) / 2**23 * 2**-31, so the largest
# folded value maps below 1.0 in float32.
UNIFORM_SCALE = 4.6566127342e-10


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of the 64-bit product of the constant ``a`` and the words ``b``.

    int64 cannot hold a 64-bit product, so ``b`` is split into 16-bit halves (each partial product
    stays below 2**48).
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    high_part, low_part = a * b_hi, a * b_lo
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (((high_part & 0xFFFF) << 16) + low_part) & MASK32
    return hi, lo


def philox4x32_10(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]):
    """Ten Philox4x32 rounds; words are int64 tensors holding values in [0, 2**32)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform_float(bits: Tensor) -> Tensor:
    """Triton's uint32 -> float32 in [0, 1): fold the int32 reading onto [0, 2**31), then scale."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=bits.device)


def philox_uniform(seed: Tensor, counter: Tensor) -> Tensor:
    """``tl.rand(seed, counter)``: float32 uniforms for int64 ``counter`` under a 1-element int64 seed."""
    seed = seed.reshape(())
    key = (seed & MASK32, (seed >> 32) & MASK32)
    zero = torch.zeros_like(counter)
    words = philox4x32_10((counter & MASK32, (counter >> 32) & MASK32, zero, zero), key)
    return uint32_to_uniform_float(words[0])


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_factors(seed: Tensor | None, batch: int, p: Tensor, training: bool, mode: str,
                scale_by_keep: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The factor multiplying x in each of ``batch`` rows (0 for a dropped row), in ``dtype``. Tensor
    arithmetic throughout (no host value of ``p``), so that torch.compile traces it."""
    keep = 1.0 - p.to(device=device, dtype=torch.float64).reshape(())  # 1 - p in float64, as the contract says
    if not training or seed is None:
        if training and not torch.compiler.is_compiling() and float(p) > 0.0:
            raise ValueError("seed must be given when training with p > 0")
        return (torch.ones_like(keep) if scale_by_keep else keep).to(dtype).expand(batch).contiguous()
    counter = torch.arange(batch, dtype=torch.int64, device=device)
    if mode == "batch":
        counter = torch.zeros_like(counter)
    kept = philox_uniform(seed.to(device), counter) < keep.to(torch.float32)
    kept_factor = torch.where(keep > 0.0, 1.0 / keep, 1.0) if scale_by_keep else torch.ones_like(keep)
    return torch.where(kept, kept_factor, 0.0).to(dtype)


def _broadcast_rows(factors: Tensor, like: Tensor) -> Tensor:
    return factors.reshape((-1,) + (1,) * (like.dim() - 1))


def drop_path_add(x: Tensor, residual: Tensor, seed: Tensor | None, p: Tensor, training: bool,
                  mode: str, scale_by_keep: bool, relu: bool, factors_of=row_factors) -> Tensor:
    """``act(residual + factor_b * x)``; a dropped row is exactly ``act(residual)``. ``factors_of``:
    a function with :func:`row_factors`' arguments and values."""
    out_dtype = torch.promote_types(x.dtype, residual.dtype)  # result_type of two tensors of one shape, traceable
    acc = _accumulate_dtype(out_dtype)
    factors = factors_of(seed, x.shape[0], p, training, mode, scale_by_keep, acc, x.device)
    f = _broadcast_rows(factors, x)
    r = residual.to(acc)
    value = torch.where(f == 0, r, r + f * x.to(acc))
    if relu:
        value = torch.relu(value)
    return torch.empty_like(residual, dtype=out_dtype).copy_(value)


def drop_path(x: Tensor, seed: Tensor | None, p: Tensor, training: bool, mode: str,
              scale_by_keep: bool, out_dtype: torch.dtype | None = None, factors_of=row_factors) -> Tensor:
    """``factor_b * x``; a dropped row is exactly 0. ``factors_of``: as for :func:`drop_path_add`."""
    out_dtype = out_dtype or x.dtype
    acc = _accumulate_dtype(torch.promote_types(x.dtype, out_dtype))
    factors = factors_of(seed, x.shape[0], p, training, mode, scale_by_keep, acc, x.device)
    f = _broadcast_rows(factors, x)
    value = torch.where(f == 0, 0.0, f * x.to(acc))
    return torch.empty_like(x, dtype=out_dtype).copy_(value)


def drop_path_add_relu_backward(grad: Tensor, relu_mask: Tensor, seed: Tensor | None, p: Tensor,
                                training: bool, mode: str, scale_by_keep: bool,
                                x_dtype: torch.dtype, residual_dtype: torch.dtype):
    """``(grad_x, grad_residual)`` of ``relu(residual + factor_b * x)`` given the forward's ReLU
    sign mask (:mod:`stochdepth_kernels.relu_mask`); ``grad`` is dense in the output's layout."""
    check_relu_mask(relu_mask, grad)
    acc = _accumulate_dtype(torch.promote_types(x_dtype, residual_dtype))
    factors = row_factors(seed, grad.shape[0], p, training, mode, scale_by_keep, acc, grad.device)
    f = _broadcast_rows(factors, grad)
    grad_residual = torch.where(unpack(relu_mask, grad), grad.to(acc), 0.0)
    grad_x = torch.where(f == 0, 0.0, f * grad_residual)
    return (torch.empty_like(grad, dtype=x_dtype).copy_(grad_x),
            torch.empty_like(grad, dtype=residual_dtype).copy_(grad_residual))


def subset_rows(seed: Tensor, batch: int, kept: int) -> Tensor:
    """The ``kept`` rows of ``batch`` with the smallest ``philox_uniform(seed, b)``, ties by index, in
    ascending order."""
    if not 0 <= kept <= batch:
        raise ValueError(f"kept must be in [0, batch], got kept={kept} and batch={batch}")
    uniforms = philox_uniform(seed, torch.arange(batch, dtype=torch.int64, device=seed.device))
    return torch.sort(uniforms, stable=True).indices[:kept].sort().values


def _kept_rows(rows: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """(whether each of ``batch`` rows is kept, its position in ``rows``; 0 where not kept)."""
    kept = torch.zeros(batch, dtype=torch.bool, device=rows.device).index_fill_(0, rows, True)
    return kept, (torch.cumsum(kept, 0) - 1).clamp_(min=0)


def subset_add(y: Tensor, residual: Tensor, rows: Tensor, scale: float, relu: bool) -> Tensor:
    """``act(residual[b] + scale * y[j])`` where ``b = rows[j]``, ``act(residual[b])`` elsewhere."""
    out_dtype = torch.promote_types(y.dtype, residual.dtype)
    acc = _accumulate_dtype(out_dtype)
    kept, position = _kept_rows(rows, residual.shape[0])
    r = residual.to(acc)
    spread = y.to(acc).index_select(0, position) if y.shape[0] > 0 else torch.zeros_like(r)
    value = torch.where(_broadcast_rows(kept, r), r + torch.tensor(scale, dtype=acc, device=r.device) * spread, r)
    if relu:
        value = torch.relu(value)
    return batch_outermost_empty(residual, out_dtype).copy_(value)


def subset_gather(grad: Tensor, rows: Tensor, scale: float, out_dtype: torch.dtype) -> Tensor:
    """``scale * grad[rows[j]]`` for each kept row ``j``, in ``out_dtype``."""
    acc = _accumulate_dtype(torch.promote_types(grad.dtype, out_dtype))
    grad = in_batch_outermost(grad)
    value = torch.tensor(scale, dtype=acc, device=grad.device) * grad.to(acc).index_select(0, rows)
    return empty_rows_like(grad, rows.numel(), out_dtype).copy_(value)


def subset_scatter(y: Tensor, rows: Tensor, batch: int, scale: float, out_dtype: torch.dtype) -> Tensor:
    """``scale * y[j]`` in row ``rows[j]`` of ``batch`` rows, 0 in the others, in ``out_dtype``."""
    acc = _accumulate_dtype(torch.promote_types(y.dtype, out_dtype))
    y = in_batch_outermost(y)
    value = torch.zeros((batch, *y.shape[1:]), dtype=acc, device=y.device)
    value.index_copy_(0, rows, torch.tensor(scale, dtype=acc, device=y.device) * y.to(acc))
    return empty_rows_like(y, batch, out_dtype).copy_(value)


def gather_rows(t: Tensor, rows: Tensor) -> Tensor:
    """The kept rows of a branch input (autograd by PyTorch)."""
    return t.index_select(0, rows)


def subset_add_relu_backward(grad: Tensor, relu_mask: Tensor, rows: Tensor, scale: float, y_dtype: torch.dtype,
                             residual_dtype: torch.dtype):
    """``(grad_y, grad_residual)`` of ``relu(subset_add(...))`` given the forward's ReLU sign mask."""
    check_relu_mask(relu_mask, grad)
    acc = _accumulate_dtype(torch.promote_types(y_dtype, residual_dtype))
    grad_residual = torch.where(unpack(relu_mask, grad), grad.to(acc), 0.0)
    return (subset_gather(grad_residual, rows, scale, y_dtype),
            torch.empty_like(grad, dtype=residual_dtype).copy_(grad_residual))
