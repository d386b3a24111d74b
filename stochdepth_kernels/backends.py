"""The backends of the op and how ``backend="auto"`` picks one.

Each backend is the same two callables with the ops' arguments: the native ``stochdepth::`` ops
(dispatched on the tensors' device) or the pure-PyTorch reference (any device, autograd by PyTorch).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Callable

import torch

from stochdepth_kernels import _C, reference
from stochdepth_kernels.ops import (NATIVE_EAGER, NATIVE_GATHER_ROWS, NATIVE_SUBSET_TRACED, NATIVE_TRACED, WITH_CUDA,
                                    native_row_factors, ops)

BACKEND_ENV = "STOCHDEPTH_BACKEND"


@dataclasses.dataclass(frozen=True)
class Backend:
    """``drop_path_add`` and ``drop_path`` with the ops' arguments (``drop_path_add`` returns the output
    alone), in two forms: ``traced``, what torch.compile sees (the registered ``torch.library`` ops),
    and ``eager``, the same kernels and autograd rules without torch.library's Python layers
    (the native ops' C++ autograd, csrc/eager_autograd.h; :func:`~stochdepth_kernels.ops.eager_autograd`
    for the others). ``subset_traced`` and ``subset_eager``: the
    subset method's ``(subset_rows, subset_add, gather_rows)`` (``subset_add(y, residual, rows, scale,
    relu)`` returns the output alone; ``gather_rows(t, rows)``: the kept rows of a branch input, whose
    gradient is one scatter pass) in the same two forms."""

    name: str
    device_types: tuple[str, ...] | None  # None: every device
    traced: tuple[Callable, Callable]
    eager: tuple[Callable, Callable]
    subset_traced: tuple[Callable, Callable, Callable]
    subset_eager: tuple[Callable, Callable, Callable]

    def runs_on(self, device: torch.device) -> bool:
        return self.device_types is None or device.type in self.device_types

    def _pair(self) -> tuple[Callable, Callable]:
        return self.traced if torch.compiler.is_compiling() else self.eager

    def drop_path_add(self, *args) -> torch.Tensor:
        return self._pair()[0](*args)

    def drop_path(self, *args) -> torch.Tensor:
        return self._pair()[1](*args)

    def _subset_pair(self) -> tuple[Callable, Callable, Callable]:
        return self.subset_traced if torch.compiler.is_compiling() else self.subset_eager

    def subset_rows(self, *args) -> torch.Tensor:
        return self._subset_pair()[0](*args)

    def subset_add(self, *args) -> torch.Tensor:
        return self._subset_pair()[1](*args)

    def gather_rows(self, *args) -> torch.Tensor:
        return self._subset_pair()[2](*args)


# The native ops dispatch on the tensors' device: "cpu" and "cuda" are the same ops, two kernels.
_NATIVE_EAGER = NATIVE_EAGER[:2]
_NATIVE_SUBSET_EAGER = (ops.subset_rows.default, *NATIVE_EAGER[2:])
_NATIVE_SUBSET_TRACED = (ops.subset_rows.default, NATIVE_SUBSET_TRACED, NATIVE_GATHER_ROWS)
_REFERENCE = (reference.drop_path_add, reference.drop_path)
_REFERENCE_SUBSET = (reference.subset_rows, reference.subset_add, reference.gather_rows)
BACKENDS = {
    "cpu": Backend("cpu", ("cpu",), NATIVE_TRACED, _NATIVE_EAGER, _NATIVE_SUBSET_TRACED, _NATIVE_SUBSET_EAGER),
    "reference": Backend("reference", None, _REFERENCE, _REFERENCE, _REFERENCE_SUBSET, _REFERENCE_SUBSET),
}
if WITH_CUDA:
    BACKENDS["cuda"] = Backend("cuda", ("cuda",), NATIVE_TRACED, _NATIVE_EAGER, _NATIVE_SUBSET_TRACED,
                               _NATIVE_SUBSET_EAGER)
if importlib.util.find_spec("triton") is not None:
    from stochdepth_kernels import triton_backend

    # CUDA tensors; CPU tensors too under TRITON_INTERPRET=1 (the tests' interpreter).
    BACKENDS["triton"] = Backend("triton", ("cuda", "cpu") if triton_backend.INTERPRETING else ("cuda",),
                                 triton_backend.TRACED, triton_backend.EAGER, triton_backend.SUBSET_TRACED,
                                 triton_backend.SUBSET_EAGER)
# Preference order: "auto" takes the first that runs on the device, except on CUDA for large tensors.
# Measured on an H100 (bench/results/nvidia-h100-80gb-hbm3/op.md, 2026-11-22): both kernels beat
# eager PyTorch in device time everywhere; end to end the CUDA kernel wins below ~256 MiB (less host
# time per call: ViT-B/16 fp32 forward+backward 0.46 ms against Triton's 0.74), Triton above it (its
# kernels run at 97-101 % of the copy rate, the CUDA kernel's at 92-93 % in fp32 and ~80 % in bf16:
# ResNet-50 stage 1 at batch 256, bf16, 1.01 ms against 1.24).
# Under torch.compile on the CPU, "auto" takes CPU_FUSED_BY_INDUCTOR for drop_path_add and drop_path: the
# CPU kernel draws the row factors (one opaque op on the batch's values) and the rest is the reference's
# arithmetic, which inductor fuses into the kernel of the branch's last layer; the fused CPU kernel,
# opaque, cannot join it. Compiled ResNet-50 training step, sample-wise 0.1 against timm's DropPath
# (bench/results/amd-epyc-2threads/models_compiled.md, docs/backends.md): the fused CPU kernel
# +3.5 % ± 1.6, this +0.5 % ± 1.3. The whole reference fused as well but compiled in 96 s against this
# one's 33 s (inductor inlines its Philox rounds into every loop that reads the factors). Not for the
# subset method, whose gather and scatter the reference does in more passes: with it, compiled
# ResNet-50 subset 0.4 went from 7 % faster than none to 34 % slower. On CUDA the kernels stay until
# the GPU check measures the same comparison.
CPU_FUSED_BY_INDUCTOR = dataclasses.replace(
    BACKENDS["cpu"], traced=(functools.partial(reference.drop_path_add, factors_of=native_row_factors),
                             functools.partial(reference.drop_path, factors_of=native_row_factors)))
AUTO_ORDER = tuple(name for name in ("cpu", "cuda", "triton", "reference") if name in BACKENDS)
TRITON_FROM_BYTES = 256 * 2**20
if {"cuda", "triton"} <= set(BACKENDS):
    _C.set_triton_from_bytes(TRITON_FROM_BYTES)  # the C++ fast path leaves those tensors to this module


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that run on ``device``, fastest first."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from None
    return list(_backends_on(device.type))


def _names_on(device_type: str) -> tuple[str, ...]:
    return tuple(name for name in AUTO_ORDER if BACKENDS[name].runs_on(torch.device(device_type)))


# device type -> available_backends. Filled at import, not at the first call: torch.compile guards on
# this dict, and a first call that filled it would make the next call recompile.
_NAMES_ON = {device_type: _names_on(device_type) for device_type in ("cpu", "cuda")}


def _backends_on(device_type: str) -> tuple[str, ...]:
    names = _NAMES_ON.get(device_type)
    return _names_on(device_type) if names is None else names


def auto_backend(device: torch.device, size_bytes: int = 0) -> str:
    """The backend ``"auto"`` picks for a tensor of ``size_bytes`` on ``device`` (rules above)."""
    names = _backends_on(device.type)
    if device.type == "cuda" and size_bytes >= TRITON_FROM_BYTES and {"cuda", "triton"} <= set(names):
        return "triton"
    return names[0]


def resolve_backend(name: str, device: torch.device, size_bytes: int = 0, elementwise: bool = False) -> Backend:
    """The backend called ``name`` (``"auto"``: ``$STOCHDEPTH_BACKEND`` if set, else
    :func:`auto_backend` for a tensor of ``size_bytes``), checked to run on ``device``;
    ``elementwise``: for ``drop_path_add`` / ``drop_path`` (under torch.compile, "auto" on the CPU
    is then CPU_FUSED_BY_INDUCTOR), not the subset method."""
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "auto")
        source = f"{BACKEND_ENV}={name!r}"
        if name == "auto":
            name = auto_backend(device, size_bytes)
            if elementwise and name == "cpu" and torch.compiler.is_compiling():
                return CPU_FUSED_BY_INDUCTOR
            return BACKENDS[name]
    else:
        source = f"backend={name!r}"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {source}")
    backend = BACKENDS[name]
    if not backend.runs_on(device):
        raise ValueError(f"{source} cannot run tensors on {device}; available there: {available_backends(device)}")
    return backend
