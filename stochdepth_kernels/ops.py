"""Fake (meta) and autograd registrations of the ``stochdepth::`` ops whose schemas and device
kernels live in csrc/. Importing this module loads the native library."""
from __future__ import annotations

import torch

try:
    from stochdepth_kernels import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as error:  # pragma: no cover - a broken install, not a code path
    raise ImportError(
        "stochdepth_kernels._C is missing: build the extension with "
        "`pip install --no-build-isolation -e .` (or `make test`)"
    ) from error

ops = torch.ops.stochdepth


@torch.library.register_fake("stochdepth::drop_path_add")
def _drop_path_add_fake(x, residual, seed, p, training, mode, scale_by_keep, relu):
    torch._check(x.shape == residual.shape, lambda: "x and residual must have the same shape")
    return torch.empty_like(residual, dtype=torch.result_type(x, residual))


@torch.library.register_fake("stochdepth::drop_path")
def _drop_path_fake(x, seed, p, training, mode, scale_by_keep, out_dtype=None):
    return torch.empty_like(x, dtype=out_dtype or x.dtype)


@torch.library.register_fake("stochdepth::drop_path_add_relu_backward")
def _relu_backward_fake(grad, out, seed, p, training, mode, scale_by_keep, x_dtype, residual_dtype):
    torch._check(grad.shape == out.shape, lambda: "grad and out must have the same shape")
    return torch.empty_like(out, dtype=x_dtype), torch.empty_like(out, dtype=residual_dtype)


def _save_coin(ctx, seed, p, training, mode, scale_by_keep, extra=None):
    """Backward regenerates the mask from the seed: nothing of size numel is saved but ``extra``."""
    ctx.save_for_backward(seed, p, extra)
    ctx.coin_args = (training, mode, scale_by_keep)


def register_drop_path_autograd(add_op, unary_op, relu_backward_op) -> None:
    """Autograd for one backend's (drop_path_add, drop_path, drop_path_add_relu_backward) ops, which
    take the native ops' arguments. The backward of both forward ops runs the backend's own ops."""

    def setup_add(ctx, inputs, output):
        x, residual, seed, p, training, mode, scale_by_keep, relu = inputs
        _save_coin(ctx, seed, p, training, mode, scale_by_keep, output if relu else None)
        ctx.relu = relu
        ctx.dtypes = (x.dtype, residual.dtype)

    def backward_add(ctx, grad):
        seed, p, out = ctx.saved_tensors
        x_dtype, residual_dtype = ctx.dtypes
        if ctx.relu:
            grad_x, grad_residual = relu_backward_op(grad, out, seed, p, *ctx.coin_args, x_dtype, residual_dtype)
        else:
            grad_residual = grad  # d out / d residual is the identity: no copy
            grad_x = unary_op(grad, seed, p, *ctx.coin_args, x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_residual, None, None, None, None, None, None

    def setup_unary(ctx, inputs, output):
        x, seed, p, training, mode, scale_by_keep, out_dtype = inputs
        _save_coin(ctx, seed, p, training, mode, scale_by_keep)
        ctx.x_dtype = x.dtype

    def backward_unary(ctx, grad):
        seed, p, _ = ctx.saved_tensors
        return unary_op(grad, seed, p, *ctx.coin_args, ctx.x_dtype), None, None, None, None, None, None

    torch.library.register_autograd(add_op, backward_add, setup_context=setup_add)
    torch.library.register_autograd(unary_op, backward_unary, setup_context=setup_unary)


register_drop_path_autograd(ops.drop_path_add.default, ops.drop_path.default,
                            ops.drop_path_add_relu_backward.default)
