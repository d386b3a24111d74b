"""Fused stochastic depth (drop path) + residual add for PyTorch. See docs/design.md for the contract."""
import torch as _torch

# The oldest torch built and tested (make test-oldest). Older ones lack APIs the package calls, and
# its compiled library would fail to load with an undefined-symbol error that names neither.
OLDEST_TORCH = (2, 11)
if tuple(int(part) for part in _torch.__version__.split(".")[:2]) < OLDEST_TORCH:
    raise ImportError(f"stochdepth_kernels needs torch >= {'.'.join(map(str, OLDEST_TORCH))} (tested with 2.11 to "
                      f"2.14.1), found torch {_torch.__version__}")

from stochdepth_kernels import ops as _ops  # noqa: E402, F401  (loads the native library, registers ops)
from stochdepth_kernels.functional import available_backends, drop_path, fused_drop_path_add
from stochdepth_kernels.modules import DropPath, DropPathAdd, StochasticDepth, stochastic_depth
from stochdepth_kernels.schedules import DropRateWarmup, drop_path_rates
from stochdepth_kernels.seeding import record_then_replay_masks, same_masks_on_recompute, set_seed_scope
from stochdepth_kernels.subset import drop_path_add_subset, effective_drop_rate, subset_size

__all__ = ["DropPath", "DropPathAdd", "DropRateWarmup", "StochasticDepth", "apply_drop_path", "apply_stochastic_depth",
           "available_backends", "drop_path", "drop_path_add_subset", "drop_path_rates", "effective_drop_rate",
           "fused_drop_path_add", "record_then_replay_masks", "same_masks_on_recompute", "set_seed_scope",
           "stochastic_depth", "subset_size"]
__version__ = "0.1.0"
_SURGERY = ("apply_drop_path", "apply_stochastic_depth")


def __getattr__(name: str):
    """The surgery functions, imported on first use: their module imports timm and torchvision."""
    if name in _SURGERY:
        from stochdepth_kernels import surgery

        return getattr(surgery, name)
    raise AttributeError(f"module 'stochdepth_kernels' has no attribute {name!r}")
