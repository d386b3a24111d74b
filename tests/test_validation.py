"""Every bad argument gets a clear error naming the argument and the value."""
import re

import pytest
import torch

from stochdepth_kernels import DropPath, DropPathAdd, StochasticDepth, drop_path, fused_drop_path_add
from stochdepth_kernels.backends import BACKENDS
from stochdepth_kernels.surgery import apply_stochastic_depth

X = torch.randn(4, 3)
R = torch.randn(4, 3)

FUSED_CASES = [
    ({"p": -0.1}, ValueError, "p must be a probability in [0, 1], got -0.1"),
    ({"p": 1.5}, ValueError, "p must be a probability in [0, 1], got 1.5"),
    ({"p": float("nan")}, ValueError, "p must be a probability in [0, 1], got nan"),
    ({"p": torch.tensor(2.0)}, ValueError, "p must be a probability in [0, 1], got 2.0"),
    ({"p": torch.tensor([0.1, 0.2])}, TypeError, "p must be a float or a 1-element floating-point tensor"),
    ({"p": torch.tensor(1)}, TypeError, "p must be a float or a 1-element floating-point tensor, got torch.int64"),
    ({"p": "0.1"}, TypeError, "p must be a float or a 1-element floating-point tensor, got str"),
    ({"p": True}, TypeError, "got bool"),
    ({"mode": "sample"}, ValueError, "mode must be one of ['row', 'batch'], got 'sample'"),
    ({"activation": "gelu"}, ValueError, "activation must be one of [None, 'relu'], got 'gelu'"),
    ({"backend": "cuda-graphs"}, ValueError, f"backend must be one of {['auto', *BACKENDS]}, got backend='cuda-graphs'"),
    ({"residual": torch.randn(4, 2)}, ValueError, "x and residual must have the same shape, got (4, 3) and (4, 2)"),
    ({"residual": torch.randn(4, 3, device="meta")}, ValueError, "x and residual must be on the same device, got cpu and meta"),
    ({"x": torch.tensor(1.0), "residual": torch.tensor(1.0)}, ValueError, "x must have a batch dimension (dim >= 1), got a 0-d tensor"),
    ({"x": torch.ones(4, 3, dtype=torch.int64)}, TypeError, "x must be a floating-point tensor, got dtype torch.int64"),
    ({"residual": torch.ones(4, 3, dtype=torch.bool)}, TypeError, "residual must be a floating-point tensor, got dtype torch.bool"),
    ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor, got list"),
    ({"seed": -1}, ValueError, "seed must be in [0, 2**63), got -1"),
    ({"seed": 2**63}, ValueError, "seed must be in [0, 2**63), got 9223372036854775808"),
    ({"seed": 1.5}, TypeError, "seed must be an int or a 1-element int64 tensor, got float"),
    ({"seed": torch.tensor([1, 2])}, TypeError, "seed must be an int or a 1-element int64 tensor, got torch.int64 tensor of shape (2,)"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator, got int"),
    ({"training": "yes"}, TypeError, "training must be a bool, got str"),
    ({"scale_by_keep": None}, TypeError, "scale_by_keep must be a bool, got NoneType"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("override, error, message", FUSED_CASES)
def test_fused_rejects_bad_argument(backend, override, error, message):
    kwargs = {"x": X, "residual": R, "p": 0.2, "backend": backend, **override}
    with pytest.raises(error, match=re.escape(message)):
        fused_drop_path_add(kwargs.pop("x"), kwargs.pop("residual"), kwargs.pop("p"), **kwargs)


UNARY_CASES = [case for case in FUSED_CASES if not {"residual", "activation"} & set(case[0])]


@pytest.mark.parametrize("override, error, message", UNARY_CASES)
def test_unary_rejects_bad_argument(override, error, message):
    kwargs = {"x": X, "p": 0.2, **override}
    with pytest.raises(error, match=re.escape(message)):
        drop_path(kwargs.pop("x"), kwargs.pop("p"), **kwargs)


CONSTRUCTOR_CASES = [
    (lambda: DropPath(0.1, scale_by_keep="yes"), "scale_by_keep must be a bool, got str"),
    (lambda: DropPathAdd(0.1, scale_by_keep=1), "scale_by_keep must be a bool, got int"),
    (lambda: StochasticDepth(None, 0.1), "branch must be a torch.nn.Module, got NoneType"),
    (lambda: StochasticDepth(torch.nn.Identity(), 0.1, shortcut="x"),
     "shortcut must be a torch.nn.Module or None, got str"),
    (lambda: apply_stochastic_depth("resnet50"), "model must be a torch.nn.Module, got str"),
]


@pytest.mark.parametrize("make, message", CONSTRUCTOR_CASES)
def test_modules_and_surgery_reject_bad_types(make, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        make()


def test_errors_are_raised_in_eval_too():
    with pytest.raises(ValueError, match="p must be a probability"):
        fused_drop_path_add(X, R, 3.0, training=False)
    with pytest.raises(ValueError, match="seed must be in"):
        drop_path(X, 0.1, training=False, seed=-5)


def test_generator_on_another_device():
    x = torch.randn(2, 2, device="meta")
    with pytest.raises(ValueError, match=re.escape("generator must be on the device of x (meta), got a generator on cpu")):
        drop_path(x, 0.1, generator=torch.Generator(), backend="reference")


def test_backend_that_cannot_run_on_the_device():
    with pytest.raises(ValueError, match=re.escape("backend='cpu' cannot run tensors on meta")):
        fused_drop_path_add(torch.randn(2, 2, device="meta"), torch.randn(2, 2, device="meta"), 0.1, backend="cpu")


def test_environment_override_is_validated(monkeypatch):
    monkeypatch.setenv("STOCHDEPTH_BACKEND", "nope")
    with pytest.raises(ValueError, match=re.escape("got STOCHDEPTH_BACKEND='nope'")):
        fused_drop_path_add(X, R, 0.1)


def test_native_op_rejects_bad_arguments_directly():
    ops = torch.ops.stochdepth
    p = torch.tensor(0.5, dtype=torch.float64)
    seed = torch.tensor([1])
    with pytest.raises(ValueError, match="mode must be 'row' or 'batch', got 'rows'"):
        ops.drop_path_add(X, R, seed, p, True, "rows", True, False)
    with pytest.raises(ValueError, match=re.escape("p must be in [0, 1], got 1.500000")):
        ops.drop_path(X, seed, torch.tensor(1.5), True, "row", True)
    with pytest.raises(ValueError, match="seed must be a 1-element int64 tensor"):
        ops.drop_path(X, None, p, True, "row", True)
    with pytest.raises(ValueError, match=re.escape("x and residual must have the same shape, got [4, 3] and [3, 4]")):
        ops.drop_path_add(X, torch.randn(3, 4), seed, p, True, "row", True, False)
    with pytest.raises(ValueError, match="x must have a batch dimension, got a 0-d tensor"):
        ops.drop_path(torch.tensor(1.0), seed, p, True, "row", True)
    with pytest.raises(ValueError, match="save_relu_mask=True needs relu=True, got relu=False"):
        ops.drop_path_add(X, R, seed, p, True, "row", True, False, True)
    with pytest.raises(ValueError, match=re.escape("relu_mask must be the forward's uint8 mask of 4 bytes for grad of "
                                                   "shape [4, 3], got Float tensor of shape [4]")):
        ops.drop_path_add_relu_backward(X, torch.randn(4), seed, p, True, "row", True, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=re.escape("relu_mask must be the forward's uint8 mask of 4 bytes for grad of "
                                                   "shape [4, 3], got Byte tensor of shape [3]")):
        ops.drop_path_add_relu_backward(X, torch.zeros(3, dtype=torch.uint8), seed, p, True, "row", True,
                                        torch.float32, torch.float32)
    with pytest.raises(ValueError, match=re.escape("grad must be dense, in the forward output's layout, got strides "
                                                   "[6, 2]")):
        ops.drop_path_add_relu_backward(torch.randn(4, 6)[:, ::2], torch.zeros(4, dtype=torch.uint8), seed, p, True,
                                        "row", True, torch.float32, torch.float32)
