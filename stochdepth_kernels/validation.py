"""Argument checks of the public functions: each error names the argument and the value it got."""
from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

MODES = ("row", "batch")
MODULE_MODES = (*MODES, "subset")  # the subset method needs the branch: modules and surgery only
ACTIVATIONS = (None, "relu")
MAX_SEED = 2**63


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_bool(value, name: str) -> None:
    """A Python bool (the ops' flags take nothing else; a truthy string would mean nothing)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_count(value, name: str) -> None:
    """A non-negative Python int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_module(value, name: str, optional: bool = False) -> None:
    if not (isinstance(value, torch.nn.Module) or (optional and value is None)):
        allowed = "a torch.nn.Module or None" if optional else "a torch.nn.Module"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}")


def check_input(t, name: str) -> None:
    """A dense (strided) floating-point tensor with a batch dimension."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got "
                        f"{'a nested tensor' if t.is_nested else f'layout {t.layout}'}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (dim >= 1), got a 0-d tensor")


def check_pair(x: Tensor, residual: Tensor) -> None:
    check_input(x, "x")
    check_input(residual, "residual")
    if x.shape != residual.shape:
        raise ValueError(f"x and residual must have the same shape, got {tuple(x.shape)} and {tuple(residual.shape)}")
    if x.device != residual.device:
        raise ValueError(f"x and residual must be on the same device, got {x.device} and {residual.device}")


def _check_probability_value(value: float, name: str = "p") -> None:
    if not 0.0 <= value <= 1.0:  # NaN too (math.isnan breaks a torch.compile graph on a dynamic float)
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def check_probability(value, name: str) -> float:
    """A probability given as a Python number, as a float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    _check_probability_value(float(value), name)
    return float(value)


def check_tensor_device(t: Tensor, name: str, device: torch.device) -> None:
    """A small argument tensor the ops read: on the CPU or on x's ``device``."""
    if t.device.type != "cpu" and t.device != device:
        raise ValueError(f"{name} must be on the CPU or on the device of x ({device}), got a tensor on {t.device}")


def probability_tensor(p, device: torch.device) -> Tensor:
    """``p`` as the 0-d tensor the ops take. A Python number becomes a float64 tensor on ``device``; a
    tensor may live on the CPU or on ``device`` and must not require grad (the mask has no gradient
    in ``p``). Tensor values on an accelerator are not checked (that would synchronise)."""
    if isinstance(p, Tensor):
        if p.numel() != 1 or not p.is_floating_point():
            raise TypeError(f"p must be a float or a 1-element floating-point tensor, got {p.dtype} tensor of shape {tuple(p.shape)}")
        check_tensor_device(p, "p", device)
        if p.requires_grad:
            raise ValueError("p must not require grad (stochastic depth has no gradient in p), got a tensor with "
                             "requires_grad=True")
        if p.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_probability_value(float(p))
        return p.reshape(())
    if isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(f"p must be a float or a 1-element floating-point tensor, got {type(p).__name__}")
    _check_probability_value(float(p))
    # A fill carries the value as an argument: on an accelerator a host-to-device copy from pageable
    # memory would synchronise the stream on every call (measured on an H100: the Triton
    # forward+backward took 0.99 ms instead of 0.62 ms); on the CPU it is 3x cheaper than torch.tensor.
    return torch.full((), float(p), dtype=torch.float64, device=device)


def is_zero(p) -> bool:
    """True when ``p`` is known on the host to be 0 (no coin needs drawing)."""
    return not isinstance(p, Tensor) and float(p) == 0.0


def check_seed(seed, device: torch.device) -> None:
    """An int in [0, 2**63), or a 1-element int64 tensor on the CPU or x's ``device`` (whose 64 bits
    are the seed as they are: any value is valid)."""
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise TypeError(f"seed must be an int or a 1-element int64 tensor, got {seed.dtype} tensor of shape {tuple(seed.shape)}")
        check_tensor_device(seed, "seed", device)
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a 1-element int64 tensor, got {type(seed).__name__}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on the device of x ({device.type}), got a generator on {generator.device}")
