"""Fake (meta) and autograd registrations of the ``stochdepth::`` ops whose schemas and device
kernels live in csrc/. Importing this module loads the native library: the schemas and CUDA kernels
(``_C``) and the CPU kernels built for this machine's instruction set (``_cpu_avx2`` or
``_cpu_default``)."""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch
from torch import Tensor

from stochdepth_kernels.layouts import batch_outermost_empty, empty_rows_like, is_batch_outermost
from stochdepth_kernels.relu_mask import masked_gradient, relu_mask_bytes

try:
    from stochdepth_kernels import _C  # runs the TORCH_LIBRARY registrations
except ImportError as error:  # pragma: no cover - a broken install, not a code path
    raise ImportError(
        "stochdepth_kernels._C is missing: build the extension with "
        "`pip install --no-build-isolation -e .` (or `make test`)"
    ) from error

ops = torch.ops.stochdepth
# Whether this build compiled the CUDA kernels (nvcc and a CUDA torch were present at install).
WITH_CUDA = bool(_C.WITH_CUDA)


def _cpu_kernel_isa() -> str:
    """"avx2" where the CPU (as ATen sees it; ATEN_CPU_CAPABILITY=default overrides) runs AVX2 and
    that build exists, else "default"."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        if importlib.util.find_spec("stochdepth_kernels._cpu_avx2") is not None:
            return "avx2"
    return "default"


# The CPU kernels' instruction set; importing the module registers them.
CPU_KERNEL_ISA = _cpu_kernel_isa()
importlib.import_module(f"stochdepth_kernels._cpu_{CPU_KERNEL_ISA}")


@torch.library.register_fake("stochdepth::drop_path_add")
def _drop_path_add_fake(x, residual, seed, p, training, mode, scale_by_keep, relu, save_relu_mask=False):
    torch._check(x.shape == residual.shape, lambda: "x and residual must have the same shape")
    out = torch.empty_like(residual, dtype=torch.result_type(x, residual))
    return out, out.new_empty((relu_mask_bytes(out) if save_relu_mask else 0,), dtype=torch.uint8)


@torch.library.register_fake("stochdepth::drop_path")
def _drop_path_fake(x, seed, p, training, mode, scale_by_keep, out_dtype=None):
    return torch.empty_like(x, dtype=out_dtype or x.dtype)


@torch.library.register_fake("stochdepth::drop_path_add_relu_backward")
def _relu_backward_fake(grad, relu_mask, seed, p, training, mode, scale_by_keep, x_dtype, residual_dtype):
    return torch.empty_like(grad, dtype=x_dtype), torch.empty_like(grad, dtype=residual_dtype)


@torch.library.register_fake("stochdepth::subset_rows")
def _subset_rows_fake(seed, batch, kept):
    return seed.new_empty((kept,), dtype=torch.int64)


@torch.library.register_fake("stochdepth::subset_add")
def _subset_add_fake(y, residual, rows, scale, relu, save_relu_mask=False):
    torch._check(y.shape[1:] == residual.shape[1:], lambda: "y must hold rows of residual's shape")
    out = batch_outermost_empty(residual, torch.promote_types(y.dtype, residual.dtype))
    return out, out.new_empty((relu_mask_bytes(out) if save_relu_mask else 0,), dtype=torch.uint8)


@torch.library.register_fake("stochdepth::subset_gather")
def _subset_gather_fake(grad, rows, scale, out_dtype):
    layout = grad if is_batch_outermost(grad) else batch_outermost_empty(grad, out_dtype)
    return empty_rows_like(layout, rows.shape[0], out_dtype)


@torch.library.register_fake("stochdepth::subset_scatter")
def _subset_scatter_fake(y, rows, batch, scale, out_dtype):
    layout = y if is_batch_outermost(y) else batch_outermost_empty(y, out_dtype)
    return empty_rows_like(layout, batch, out_dtype)


@torch.library.register_fake("stochdepth::subset_add_relu_backward")
def _subset_relu_backward_fake(grad, relu_mask, rows, scale, y_dtype, residual_dtype):
    return empty_rows_like(grad, rows.shape[0], y_dtype), torch.empty_like(grad, dtype=residual_dtype)


def _factor_is_one(seed, training: bool, scale_by_keep: bool) -> bool:
    """Every row's factor is 1, so x's gradient needs no kernel: no coin was drawn and either p is
    known to be 0 (training) or kept rows are not rescaled in eval (``scale_by_keep``)."""
    return seed is None and (training or scale_by_keep)


def _save_coin(ctx, seed, p, training, mode, scale_by_keep, extra=None):
    """Backward regenerates the mask from the seed: nothing of size numel is saved but ``extra``."""
    ctx.save_for_backward(seed, p, extra)
    ctx.coin_args = (training, mode, scale_by_keep)
    ctx.factor_is_one = _factor_is_one(seed, training, scale_by_keep)


def in_layout(t: Tensor, stride: tuple) -> Tensor:
    """``t`` itself if it has ``stride`` (a dense layout of its shape), else a copy of it with those
    strides."""
    if t.stride() == stride:
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _autograd_rules(unary, relu_backward):
    """``(setup_add, backward_add, setup_unary, backward_unary)`` of the (drop_path_add, drop_path)
    pair; their backward runs ``unary`` (which must itself be differentiable, for double backward)
    and ``relu_backward``, both with the ops' signatures."""

    def setup_add(ctx, inputs, output):
        x, residual, seed, p, training, mode, scale_by_keep, relu, *save = inputs
        out, relu_mask = output
        ctx.mark_non_differentiable(relu_mask)
        ctx.saved_mask = relu and bool(save and save[0])
        # With ReLU: the sign mask, or where every factor is 1 the output itself (one threshold pass).
        extra = (relu_mask if ctx.saved_mask else out) if relu else None
        _save_coin(ctx, seed, p, training, mode, scale_by_keep, extra)
        ctx.relu = relu
        ctx.dtypes = (x.dtype, residual.dtype)
        ctx.out_stride = out.stride()

    def backward_add(ctx, grad, _relu_mask_grad=None):
        seed, p, saved = ctx.saved_tensors
        x_dtype, residual_dtype = ctx.dtypes
        if ctx.relu and ctx.saved_mask and records_graph(grad):  # double backward: ops autograd records
            grad_residual = masked_gradient(in_layout(grad, ctx.out_stride), saved)
            grad_x = unary_backward(grad_residual, seed, p, ctx, x_dtype) if ctx.needs_input_grad[0] else None
        elif ctx.relu and ctx.saved_mask:
            grad_x, grad_residual = relu_backward(in_layout(grad, ctx.out_stride), saved, seed, p, *ctx.coin_args,
                                                  x_dtype, residual_dtype)
        elif ctx.relu:
            if not ctx.factor_is_one:
                raise RuntimeError("the ReLU backward of stochdepth drop_path_add needs the forward's sign mask: "
                                   "call it with save_relu_mask=True when a backward will follow")
            # x's gradient is the residual's: one threshold pass (as eager's relu backward), no kernel.
            grad_residual = torch.ops.aten.threshold_backward(grad, saved, 0)
            grad_x = grad_residual
        else:
            grad_residual = grad  # d out / d residual is the identity: no copy
            grad_x = unary_backward(grad, seed, p, ctx, x_dtype) if ctx.needs_input_grad[0] else None
        grad_x = None if grad_x is None else grad_x.to(x_dtype)
        return grad_x, grad_residual.to(residual_dtype), None, None, None, None, None, None, None

    def setup_unary(ctx, inputs, output):
        x, seed, p, training, mode, scale_by_keep, out_dtype = inputs
        _save_coin(ctx, seed, p, training, mode, scale_by_keep)
        ctx.x_dtype = x.dtype

    def backward_unary(ctx, grad):
        seed, p, _ = ctx.saved_tensors
        return unary_backward(grad, seed, p, ctx, ctx.x_dtype), None, None, None, None, None, None

    def unary_backward(grad, seed, p, ctx, x_dtype):
        """``factor_b * grad`` in x's dtype: ``grad`` itself where every factor is 1."""
        if ctx.factor_is_one:
            return grad.to(x_dtype)
        return unary(grad, seed, p, *ctx.coin_args, x_dtype)

    return setup_add, backward_add, setup_unary, backward_unary


def _asking_for_relu_mask(add) -> Callable:
    """The backends' ``drop_path_add`` (the ops' arguments, returns the output) over ``add``, an
    op-signature function returning ``(out, relu_mask)``: it asks for the ReLU sign mask only when
    autograd records the call and the backward needs the mask (some factor is not 1)."""

    def drop_path_add(x, residual, seed, p, training, mode, scale_by_keep, relu):
        save = relu and records_graph(x, residual) and not _factor_is_one(seed, training, scale_by_keep)
        return add(x, residual, seed, p, training, mode, scale_by_keep, relu, save)[0]

    return drop_path_add


def register_drop_path_autograd(add_op, unary_op, relu_backward_op) -> tuple[Callable, Callable]:
    """Autograd for one backend's (drop_path_add, drop_path, drop_path_add_relu_backward) ops, which
    take the native ops' arguments. The backward of both forward ops runs the backend's own ops.
    Returns ``(drop_path_add, drop_path)`` over the registered ops, as torch.compile traces them."""
    setup_add, backward_add, setup_unary, backward_unary = _autograd_rules(unary_op, relu_backward_op)
    torch.library.register_autograd(add_op, backward_add, setup_context=setup_add)
    torch.library.register_autograd(unary_op, backward_unary, setup_context=setup_unary)
    return _asking_for_relu_mask(add_op), unary_op


def _function(name: str, impl: Callable, setup_context: Callable, backward: Callable) -> type:
    """A ``torch.autograd.Function`` running ``impl`` with torch.library's ``setup_context`` and
    ``backward`` rules. forward(ctx, ...) rather than a setup_context staticmethod: with the latter,
    every apply binds its arguments through inspect.signature (~70 us here)."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def eager_autograd(add_impl, unary_impl, relu_backward_impl) -> tuple[Callable, Callable]:
    """``(drop_path_add, drop_path)`` differentiable through ``torch.autograd.Function``s over one
    backend's implementations, with the registered ops' rules: the eager calls of the Triton kernels
    (the native ones have C++ autograd, ``NATIVE_EAGER``). It skips the dispatcher round trip and
    torch.library's Python autograd wrapper, which cost ~35 us per call here (2-thread EPYC; a 98 MiB
    fp32 forward is ~0.1 ms of H100 time). torch.compile traces the registered ops instead."""

    def unary(x, *args):  # backward runs it too: a double backward goes through unary_function
        return unary_function.apply(x, *args) if records_graph(x) else unary_impl(x, *args)

    setup_add, backward_add, setup_unary, backward_unary = _autograd_rules(unary, relu_backward_impl)

    add_function = _function("DropPathAddFunction", add_impl, setup_add, backward_add)
    unary_function = _function("DropPathFunction", unary_impl, setup_unary, backward_unary)

    def add(x, residual, *args):
        return add_function.apply(x, residual, *args) if records_graph(x, residual) else add_impl(x, residual, *args)

    return _asking_for_relu_mask(add), unary


def gathered_rows(grad: Tensor, rows: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``s * grad[rows]`` in ``dtype`` by ops that autograd records (a double backward), computed in
    the wider dtype and rounded once, as the gather kernels."""
    return (grad.index_select(0, rows).to(torch.promote_types(grad.dtype, dtype)) * scale).to(dtype)


def scattered_rows(grad: Tensor, rows: Tensor, batch: int, scale: float, dtype: torch.dtype) -> Tensor:
    """The ``batch`` rows whose ``rows`` are ``s * grad`` and the others 0, in ``dtype``, by ops that
    autograd records (the scatter kernels' values)."""
    scaled = (grad.to(torch.promote_types(grad.dtype, dtype)) * scale).to(dtype)
    return grad.new_zeros((batch, *grad.shape[1:]), dtype=dtype).index_copy(0, rows, scaled)


def _subset_rules(gather, relu_backward):
    """``(setup, backward)`` of ``subset_add``, whose backward runs ``gather`` and ``relu_backward``
    (the ops' signatures). Saved: the k kept rows and, with ReLU, the sign mask."""

    def setup(ctx, inputs, output):
        y, residual, rows, scale, relu, *save = inputs
        out, relu_mask = output
        ctx.mark_non_differentiable(relu_mask)
        ctx.relu, ctx.saved_mask = relu, relu and bool(save and save[0])
        ctx.save_for_backward(rows, relu_mask if ctx.saved_mask else None)
        ctx.scale, ctx.dtypes, ctx.out_stride = scale, (y.dtype, residual.dtype), out.stride()

    def backward(ctx, grad, _relu_mask_grad=None):
        rows, relu_mask = ctx.saved_tensors
        y_dtype, residual_dtype = ctx.dtypes
        if ctx.relu and not ctx.saved_mask:
            raise RuntimeError("the ReLU backward of stochdepth subset_add needs the forward's sign mask: "
                               "call it with save_relu_mask=True when a backward will follow")
        if records_graph(grad):  # double backward: ops autograd records
            grad_residual = masked_gradient(in_layout(grad, ctx.out_stride), relu_mask) if ctx.relu else grad
            grad_y = gathered_rows(grad_residual, rows, ctx.scale, y_dtype) if ctx.needs_input_grad[0] else None
        elif ctx.relu:
            grad_y, grad_residual = relu_backward(in_layout(grad, ctx.out_stride), relu_mask, rows, ctx.scale,
                                                  y_dtype, residual_dtype)
        else:
            grad_residual = grad  # the identity: no copy
            grad_y = gather(grad, rows, ctx.scale, y_dtype) if ctx.needs_input_grad[0] else None
        return grad_y, grad_residual.to(residual_dtype), None, None, None, None

    return setup, backward


def _subset_asking_for_relu_mask(add) -> Callable:
    """``(y, residual, rows, scale, relu) -> out`` over ``add`` (the op's signature), asking for the
    ReLU sign mask only when autograd records the call."""

    def subset_add(y, residual, rows, scale, relu):
        return add(y, residual, rows, scale, relu, relu and records_graph(y, residual))[0]

    return subset_add


def register_subset_autograd(add_op, gather_op, relu_backward_op) -> Callable:
    """Autograd for one backend's (subset_add, subset_gather, subset_add_relu_backward) ops; returns
    the add over the registered op, as torch.compile traces it."""
    setup, backward = _subset_rules(gather_op, relu_backward_op)
    torch.library.register_autograd(add_op, backward, setup_context=setup)
    return _subset_asking_for_relu_mask(add_op)


def eager_subset_autograd(add_impl, gather_impl, relu_backward_impl) -> Callable:
    """The subset add differentiable through a ``torch.autograd.Function`` over one backend's
    implementations, with the registered op's rules (as :func:`eager_autograd`)."""
    add_function = _function("SubsetAddFunction", add_impl, *_subset_rules(gather_impl, relu_backward_impl))

    def add(y, residual, *args):
        return add_function.apply(y, residual, *args) if records_graph(y, residual) else add_impl(y, residual, *args)

    return _subset_asking_for_relu_mask(add)


def _rows_rules(scatter):
    """``(setup, backward)`` of ``subset_gather`` (the kept rows of a branch input, or of a
    gradient): its gradient is one ``scatter`` pass, the rows' gradients and zeros in the others."""

    def setup(ctx, inputs, output):
        t, rows, scale, _ = inputs
        ctx.save_for_backward(rows)
        ctx.batch, ctx.scale, ctx.dtype = t.shape[0], scale, t.dtype

    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        rows_of = scattered_rows if records_graph(grad) else scatter  # double backward: ops autograd records
        return rows_of(grad, rows, ctx.batch, ctx.scale, ctx.dtype), None, None, None

    return setup, backward


def register_rows_autograd(gather_op, scatter_op) -> Callable:
    """Autograd for one backend's registered ``subset_gather`` (backward: ``subset_scatter``); returns
    ``gather_rows(t, rows)``, the kept rows of ``t`` as torch.compile traces it."""
    setup, backward = _rows_rules(scatter_op)
    torch.library.register_autograd(gather_op, backward, setup_context=setup)
    return lambda t, rows: gather_op(t, rows, 1.0, t.dtype)


def eager_rows_autograd(gather_impl, scatter_impl) -> Callable:
    """``gather_rows(t, rows)`` over one backend's implementations, differentiable through a
    ``torch.autograd.Function`` with the registered op's rules."""
    function = _function("GatherRowsFunction", gather_impl, *_rows_rules(scatter_impl))

    def gather_rows(t, rows):
        args = (t, rows, 1.0, t.dtype)
        return function.apply(*args) if records_graph(t) else gather_impl(*args)

    return gather_rows


def records_graph(*inputs) -> bool:
    """Whether autograd records a call on ``inputs``: a backward may follow."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def native_row_factors(seed: Tensor | None, batch: int, p: Tensor, training: bool, mode: str,
                       scale_by_keep: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`stochdepth_kernels.reference.row_factors`' values (fp32 or fp64) from the native
    ``drop_path`` kernel on a row of ones: to inductor one opaque op on ``batch`` values, computed
    once, where the reference's Philox rounds are inlined into every loop that reads the factors
    (a compiled ResNet-50's first step: 96 s against 33 s, CPU, 2026-12-06)."""
    return ops.drop_path.default(torch.ones(batch, dtype=dtype, device=device), seed, p, training, mode,
                                 scale_by_keep, dtype)


# The native ops' eager entry points (C++ autograd, csrc/eager_autograd.h): drop_path_add, drop_path,
# subset_add and gather_rows with the arguments of their Backend slots.
NATIVE_EAGER = (_C.drop_path_add, _C.drop_path, _C.subset_add, _C.gather_rows)
# (drop_path_add, drop_path) of the native backends as torch.compile traces them, and their subset add.
NATIVE_TRACED = register_drop_path_autograd(ops.drop_path_add.default, ops.drop_path.default,
                                            ops.drop_path_add_relu_backward.default)
NATIVE_SUBSET_TRACED = register_subset_autograd(ops.subset_add.default, ops.subset_gather.default,
                                                ops.subset_add_relu_backward.default)
NATIVE_GATHER_ROWS = register_rows_autograd(ops.subset_gather.default, ops.subset_scatter.default)
