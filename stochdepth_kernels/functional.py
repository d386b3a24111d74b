"""The public functions: validate, draw the call's seed, hand over to a backend.

An eager call first tries the C++ fast path (``_C.try_drop_path_add``, csrc/python_module.cpp),
which does all of that for a plain call on the native kernels and returns None for anything else
(bench/fixed_cost.py measures what it saves). The Python below serves the rest and raises every
argument error."""
from __future__ import annotations

import torch
from torch import Tensor

from stochdepth_kernels import _C, validation
from stochdepth_kernels.backends import available_backends, resolve_backend
from stochdepth_kernels.ops import records_graph
from stochdepth_kernels.seeding import call_seed, rank_offset, tape_active
from stochdepth_kernels.tracing import fx_leaf

__all__ = ["available_backends", "drop_path", "fused_drop_path_add"]


def _fast_path_open(backend) -> bool:
    """Whether the C++ fast path may serve the call: backend "auto" in eager mode, no seed tape."""
    return backend == "auto" and not torch.compiler.is_compiling() and not tape_active()


def _prepare_call(x: Tensor, p, training, mode, scale_by_keep, generator, seed, backend, size_bytes: int,
                  differentiable: bool):
    """What both public functions check and draw after their tensors: p as the ops' tensor, the
    backend for ``size_bytes`` on x's device, and the call's seed (None when no coin is drawn;
    ``differentiable``: autograd records the call)."""
    p_tensor = validation.probability_tensor(p, x.device)
    validation.check_choice(mode, "mode", validation.MODES)
    validation.check_bool(training, "training")
    validation.check_bool(scale_by_keep, "scale_by_keep")
    impl = resolve_backend(backend, x.device, size_bytes, elementwise=True)
    return p_tensor, impl, call_seed(training, validation.is_zero(p), seed, generator, x.device, differentiable)


@fx_leaf
def fused_drop_path_add(x: Tensor, residual: Tensor, p, *, training: bool = True, mode: str = "row",
                        scale_by_keep: bool = True, activation: str | None = None, generator=None,
                        seed=None, backend: str = "auto") -> Tensor:
    """``act(residual + mask_b * s * x)`` with one Bernoulli(1 - p) coin per sample (``mode="row"``)
    or per batch (``mode="batch"``), ``s = 1/(1 - p)`` if ``scale_by_keep`` else 1.

    Eval (``training=False``) or ``p == 0``: ``act(residual + c * x)``, ``c = 1`` if ``scale_by_keep``
    else ``1 - p``. A dropped row never reads ``x``. ``p`` is a float or a 0-d tensor; ``seed`` (an
    int in [0, 2**63) or a 1-element int64 tensor) replaces the seed drawn from ``generator`` (else
    the default generator of x's device). Output dtype ``torch.result_type(x, residual)``, memory
    format of ``residual``. ``activation``: None or ``"relu"``. ``backend``: ``"auto"`` (the fastest
    kernel for the device and size, stochdepth_kernels/backends.py), ``"cpu"``, ``"cuda"``,
    ``"triton"`` or ``"reference"``.
    """
    if _fast_path_open(backend):
        out = _C.try_drop_path_add(x, residual, p, training, mode, scale_by_keep, activation, generator, seed,
                                   rank_offset())
        if out is not None:
            return out
    validation.check_pair(x, residual)
    validation.check_choice(activation, "activation", validation.ACTIVATIONS)
    p_tensor, impl, seed_t = _prepare_call(x, p, training, mode, scale_by_keep, generator, seed, backend,
                                           residual.numel() * residual.element_size(), records_graph(x, residual))
    return impl.drop_path_add(x, residual, seed_t, p_tensor, training, mode, scale_by_keep, activation == "relu")


@fx_leaf
def drop_path(x: Tensor, p, *, training: bool = True, mode: str = "row", scale_by_keep: bool = True,
              generator=None, seed=None, backend: str = "auto") -> Tensor:
    """``mask_b * s * x``, the unary form for models that compute ``x + drop_path(f(x))``; the
    semantics of :func:`fused_drop_path_add` without the residual. A dropped row is 0 without
    reading ``x``. Like timm's ``drop_path``, it returns ``x`` itself when no coin is drawn and the
    factor is 1 (eval or ``p == 0`` with ``scale_by_keep``)."""
    if _fast_path_open(backend):
        out = _C.try_drop_path(x, p, training, mode, scale_by_keep, generator, seed, rank_offset())
        if out is not None:
            return out
    validation.check_input(x, "x")
    p_tensor, impl, seed_t = _prepare_call(x, p, training, mode, scale_by_keep, generator, seed, backend,
                                           x.numel() * x.element_size(), records_graph(x))
    if seed_t is None and scale_by_keep:
        return x
    return impl.drop_path(x, seed_t, p_tensor, training, mode, scale_by_keep, None)
