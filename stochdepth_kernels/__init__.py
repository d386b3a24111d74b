"""Fused stochastic depth (drop path) + residual add for PyTorch. See DESIGN.md for the contract."""
from stochdepth_kernels import ops as _ops  # noqa: F401  (loads the native library, registers ops)
from stochdepth_kernels.functional import available_backends, drop_path, fused_drop_path_add

__all__ = ["available_backends", "drop_path", "fused_drop_path_add"]
__version__ = "0.1.0"
