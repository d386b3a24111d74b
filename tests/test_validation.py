"""Bad input to every public function and module, one table: each call raises the error that names
the argument and the value it got (the valid edge inputs and their documented results are in
test_semantics.py)."""
import re
import subprocess
import sys

import pytest
import torch
import torchvision

from helpers import random_tensor
from stochdepth_kernels import (DropPath, DropPathAdd, DropRateWarmup, StochasticDepth, available_backends, drop_path,
                                drop_path_rates, fused_drop_path_add, record_then_replay_masks, set_seed_scope,
                                stochastic_depth)
from stochdepth_kernels.backends import BACKENDS
from stochdepth_kernels.surgery import (apply_drop_path, apply_stochastic_depth, register_block, register_drop_function,
                                        register_drop_module)

X = random_tensor((4, 3))
R = random_tensor((4, 3))
PROBABILITY = "p must be a probability in [0, 1], got "
P_TYPE = "p must be a float or a 1-element floating-point tensor, got "
SEED_TYPE = "seed must be an int or a 1-element int64 tensor, got "

# Overrides of fused_drop_path_add(X, R, 0.2, backend=...)'s arguments.
FUSED_CASES = [
    ({"p": -0.1}, ValueError, PROBABILITY + "-0.1"),
    ({"p": 1.5}, ValueError, PROBABILITY + "1.5"),
    ({"p": float("nan")}, ValueError, PROBABILITY + "nan"),
    ({"p": torch.tensor(2.0)}, ValueError, PROBABILITY + "2.0"),
    ({"p": torch.tensor([0.1, 0.2])}, TypeError, P_TYPE + "torch.float32 tensor of shape (2,)"),
    ({"p": torch.tensor(1)}, TypeError, P_TYPE + "torch.int64"),
    ({"p": "0.1"}, TypeError, P_TYPE + "str"),
    ({"p": None}, TypeError, P_TYPE + "NoneType"),
    ({"p": True}, TypeError, P_TYPE + "bool"),
    ({"p": torch.tensor(0.1, requires_grad=True)}, ValueError,
     "p must not require grad (stochastic depth has no gradient in p), got a tensor with requires_grad=True"),
    ({"p": torch.tensor(0.1, device="meta")}, ValueError,
     "p must be on the CPU or on the device of x (cpu), got a tensor on meta"),
    ({"mode": "sample"}, ValueError, "mode must be one of ['row', 'batch'], got 'sample'"),
    ({"mode": None}, ValueError, "mode must be one of ['row', 'batch'], got None"),
    ({"activation": "gelu"}, ValueError, "activation must be one of [None, 'relu'], got 'gelu'"),
    ({"activation": torch.nn.ReLU()}, ValueError, "activation must be one of [None, 'relu'], got ReLU()"),
    ({"backend": "cuda-graphs"}, ValueError, f"backend must be one of {['auto', *BACKENDS]}, got backend='cuda-graphs'"),
    ({"residual": torch.randn(4, 2)}, ValueError, "x and residual must have the same shape, got (4, 3) and (4, 2)"),
    ({"residual": torch.randn(1, 3)}, ValueError, "x and residual must have the same shape, got (4, 3) and (1, 3)"),
    ({"residual": torch.randn(4, 3, device="meta")}, ValueError, "x and residual must be on the same device, got cpu and meta"),
    ({"x": torch.tensor(1.0), "residual": torch.tensor(1.0)}, ValueError, "x must have a batch dimension (dim >= 1), got a 0-d tensor"),
    ({"x": torch.ones(4, 3, dtype=torch.int64)}, TypeError, "x must be a floating-point tensor, got dtype torch.int64"),
    ({"x": X.to(torch.complex64)}, TypeError, "x must be a floating-point tensor, got dtype torch.complex64"),
    ({"residual": torch.ones(4, 3, dtype=torch.bool)}, TypeError, "residual must be a floating-point tensor, got dtype torch.bool"),
    ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor, got list"),
    ({"residual": 1.0}, TypeError, "residual must be a torch.Tensor, got float"),
    ({"x": X.to_sparse()}, TypeError, "x must be a dense (strided) tensor, got layout torch.sparse_coo"),
    ({"residual": torch.nested.nested_tensor([torch.randn(3)] * 4, layout=torch.jagged)}, TypeError,
     "residual must be a dense (strided) tensor, got a nested tensor"),
    ({"seed": -1}, ValueError, "seed must be in [0, 2**63), got -1"),
    ({"seed": 2**63}, ValueError, "seed must be in [0, 2**63), got 9223372036854775808"),
    ({"seed": 1.5}, TypeError, SEED_TYPE + "float"),
    ({"seed": True}, TypeError, SEED_TYPE + "bool"),
    ({"seed": torch.tensor([1, 2])}, TypeError, SEED_TYPE + "torch.int64 tensor of shape (2,)"),
    ({"seed": torch.tensor([1], dtype=torch.int32)}, TypeError, SEED_TYPE + "torch.int32 tensor of shape (1,)"),
    ({"seed": torch.tensor([1], device="meta")}, ValueError,
     "seed must be on the CPU or on the device of x (cpu), got a tensor on meta"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator, got int"),
    ({"training": "yes"}, TypeError, "training must be a bool, got str"),
    ({"training": None}, TypeError, "training must be a bool, got NoneType"),
    ({"scale_by_keep": None}, TypeError, "scale_by_keep must be a bool, got NoneType"),
    ({"scale_by_keep": torch.tensor(True)}, TypeError, "scale_by_keep must be a bool, got Tensor"),
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


def _set_drop_prob(module, value):
    module.drop_prob = value


def _warmup_restored_from(state):
    DropRateWarmup([DropPath(0.1), DropPath(0.2)], 3).load_state_dict(state)


def _call_thrice(run):
    run(X), run(X), run(X)


DROP_PROB = "drop_prob must be a probability in [0, 1], got "
SAME_SHAPE = "x and residual must have the same shape, got (4, 2) and (4, 3)"
# A rate this small keeps every batch (1 - 1e-9 rounds to 1.0 in float32): the branch runs.
ALWAYS_KEPT = 1e-9

# Every other public callable: (id, call, error, message).
CALL_CASES = [
    ("DropPath rate", lambda: DropPath(1.5), ValueError, DROP_PROB + "1.5"),
    ("DropPath NaN rate", lambda: DropPath(float("nan")), ValueError, DROP_PROB + "nan"),
    ("DropPath rate type", lambda: DropPath("0.1"), TypeError, "drop_prob must be a float, got str"),
    ("DropPath tensor rate", lambda: DropPath(torch.tensor(0.1)), TypeError, "drop_prob must be a float, got Tensor"),
    ("DropPath scale_by_keep", lambda: DropPath(0.1, scale_by_keep="yes"), TypeError, "scale_by_keep must be a bool, got str"),
    ("DropPath mode", lambda: DropPath(0.1, mode="sample"), ValueError, "mode must be one of ['row', 'batch'], got 'sample'"),
    ("DropPath setter", lambda: _set_drop_prob(DropPath(0.1), -0.5), ValueError, DROP_PROB + "-0.5"),
    ("DropPath input type", lambda: DropPath(0.1)([1.0]), TypeError, "x must be a torch.Tensor, got list"),
    ("DropPath input dtype", lambda: DropPath(0.1)(torch.ones(4, 3, dtype=torch.int64)), TypeError,
     "x must be a floating-point tensor, got dtype torch.int64"),
    ("DropPath 0-d input", lambda: DropPath(0.1)(torch.tensor(1.0)), ValueError,
     "x must have a batch dimension (dim >= 1), got a 0-d tensor"),
    ("DropPathAdd activation", lambda: DropPathAdd(0.1, activation="gelu"), ValueError,
     "activation must be one of [None, 'relu'], got 'gelu'"),
    ("DropPathAdd mode", lambda: DropPathAdd(0.1, mode="x"), ValueError,
     "mode must be one of ['row', 'batch', 'subset'], got 'x'"),
    ("DropPathAdd scale_by_keep", lambda: DropPathAdd(0.1, scale_by_keep=1), TypeError, "scale_by_keep must be a bool, got int"),
    ("DropPathAdd setter", lambda: _set_drop_prob(DropPathAdd(0.1), "a"), TypeError, "drop_prob must be a float, got str"),
    ("DropPathAdd shapes", lambda: DropPathAdd(0.1)(X[:, :2], R), ValueError, SAME_SHAPE),
    ("DropPathAdd devices", lambda: DropPathAdd(0.1)(X, R.to("meta")), ValueError,
     "x and residual must be on the same device, got cpu and meta"),
    ("DropPathAdd residual dtype", lambda: DropPathAdd(0.1)(X, R.int()), TypeError,
     "residual must be a floating-point tensor, got dtype torch.int32"),
    ("DropPathAdd batch branch shape", lambda: DropPathAdd(ALWAYS_KEPT, mode="batch").add_branch(
        lambda: X[:, :2], R, list), ValueError, SAME_SHAPE),
    ("StochasticDepth branch", lambda: StochasticDepth(None, 0.1), TypeError, "branch must be a torch.nn.Module, got NoneType"),
    ("StochasticDepth shortcut", lambda: StochasticDepth(torch.nn.Identity(), 0.1, shortcut="x"), TypeError,
     "shortcut must be a torch.nn.Module or None, got str"),
    ("StochasticDepth rate", lambda: StochasticDepth(torch.nn.Identity(), 2.0), ValueError, DROP_PROB + "2.0"),
    ("StochasticDepth setter", lambda: _set_drop_prob(StochasticDepth(torch.nn.Identity()), 2.0), ValueError,
     DROP_PROB + "2.0"),
    ("StochasticDepth mode", lambda: StochasticDepth(torch.nn.Identity(), 0.1, mode="x"), ValueError,
     "mode must be one of ['row', 'batch', 'subset'], got 'x'"),
    ("StochasticDepth activation", lambda: StochasticDepth(torch.nn.Identity(), 0.1, activation="tanh"), ValueError,
     "activation must be one of [None, 'relu'], got 'tanh'"),
    ("StochasticDepth input type", lambda: StochasticDepth(torch.nn.Identity(), 0.1)([1.0]), TypeError,
     "x must be a torch.Tensor, got list"),
    ("StochasticDepth row branch shape", lambda: StochasticDepth(torch.nn.Linear(3, 2), 0.1)(X), ValueError, SAME_SHAPE),
    ("StochasticDepth batch branch shape", lambda: StochasticDepth(torch.nn.Linear(3, 2), ALWAYS_KEPT, mode="batch")(X),
     ValueError, SAME_SHAPE),
    ("StochasticDepth branch output type", lambda: StochasticDepth(torch.nn.LSTM(3, 3), 0.1)(X), TypeError,
     "x must be a torch.Tensor, got tuple"),
    ("stochastic_depth input", lambda: stochastic_depth([1.0], 0.1, "row"), TypeError, "input must be a torch.Tensor, got list"),
    ("stochastic_depth training", lambda: stochastic_depth(X, 0.1, "row", training="yes"), TypeError,
     "training must be a bool, got str"),
    ("drop_path_rates rate", lambda: drop_path_rates(4, 1.2), ValueError, "drop_rate must be a probability in [0, 1], got 1.2"),
    ("drop_path_rates distribution", lambda: drop_path_rates(4, 0.1, "cosine"), ValueError,
     "distribution must be one of ['linear', 'uniform'], got 'cosine'"),
    ("drop_path_rates convention", lambda: drop_path_rates(4, 0.1, convention="keras"), ValueError,
     "convention must be one of ['timm', 'paper'], got 'keras'"),
    ("drop_path_rates negative depth", lambda: drop_path_rates(-1, 0.1), ValueError,
     "depth must be a non-negative int or a list of them, got -1"),
    ("drop_path_rates depth type", lambda: drop_path_rates(2.5, 0.1), TypeError,
     "depth must be a non-negative int or a list of them, got 2.5"),
    ("drop_path_rates stage type", lambda: drop_path_rates([2, 1.5], 0.1), TypeError,
     "depth must be a non-negative int or a list of them, got [2, 1.5]"),
    ("DropRateWarmup modules type", lambda: DropRateWarmup("model", 3), TypeError,
     "modules must be a torch.nn.Module or an iterable of them, got str"),
    ("DropRateWarmup no module", lambda: DropRateWarmup(torch.nn.Linear(2, 2), 3), ValueError,
     "no stochastic-depth module (DropPath, DropPathAdd, StochasticDepth) found"),
    ("DropRateWarmup steps type", lambda: DropRateWarmup([DropPath(0.3)], 2.5), ValueError,
     "warmup_steps must be a non-negative int, got 2.5"),
    ("DropRateWarmup negative steps", lambda: DropRateWarmup([DropPath(0.3)], -1), ValueError,
     "warmup_steps must be a non-negative int, got -1"),
    ("DropRateWarmup fraction", lambda: DropRateWarmup.from_fraction([DropPath(0.3)], 100, 2.0), ValueError,
     "drop_warmup must be a probability in [0, 1], got 2.0"),
    ("DropRateWarmup total steps", lambda: DropRateWarmup.from_fraction([DropPath(0.3)], -1, 0.1), ValueError,
     "total_steps must be a non-negative int, got -1"),
    ("DropRateWarmup state keys", lambda: _warmup_restored_from({"step": 1}), ValueError,
     "state must be a DropRateWarmup.state_dict() with the keys ['steps', 'targets', 'warmup_steps'], got ['step']"),
    ("DropRateWarmup state type", lambda: _warmup_restored_from([1]), ValueError,
     "state must be a DropRateWarmup.state_dict() with the keys ['steps', 'targets', 'warmup_steps'], got list"),
    ("DropRateWarmup state modules", lambda: _warmup_restored_from({"steps": 1, "warmup_steps": 3, "targets": [0.1]}),
     ValueError, "state has targets for 1 modules, this warm-up drives 2"),
    ("surgery model", lambda: apply_stochastic_depth("resnet50"), TypeError, "model must be a torch.nn.Module, got str"),
    ("surgery target type", lambda: apply_stochastic_depth(torchvision.models.resnet18(), 3), TypeError,
     "target_layer_name must be a str or None, got int"),
    ("surgery target absent", lambda: apply_stochastic_depth(torchvision.models.resnet18(), "Bottleneck"), ValueError,
     "no block of model ResNet matches target_layer_name='Bottleneck'; its blocks: ['BasicBlock']"),
    ("surgery no block", lambda: apply_stochastic_depth(torch.nn.Sequential(torch.nn.Linear(2, 2))), ValueError,
     "no block of model Sequential matches target_layer_name=None; its blocks: [] (a block holds a drop-path slot"),
    ("surgery method", lambda: apply_stochastic_depth(torch.nn.Sequential(), stochastic_method="layer"), ValueError,
     "stochastic_method must be one of ['sample', 'block', 'subset'], got 'layer'"),
    ("surgery rate", lambda: apply_stochastic_depth(torch.nn.Sequential(), drop_rate=2.0), ValueError,
     "drop_rate must be a probability in [0, 1], got 2.0"),
    ("surgery rate type", lambda: apply_stochastic_depth(torch.nn.Sequential(), drop_rate="a"), TypeError,
     "drop_rate must be a float, got str"),
    ("surgery distribution", lambda: apply_stochastic_depth(torch.nn.Sequential(), drop_distribution="x"), ValueError,
     "drop_distribution must be one of ['linear', 'uniform'], got 'x'"),
    ("surgery convention", lambda: apply_stochastic_depth(torch.nn.Sequential(), convention="keras"), ValueError,
     "convention must be one of ['timm', 'paper'], got 'keras'"),
    ("surgery scale_by_keep", lambda: apply_stochastic_depth(torch.nn.Sequential(), scale_by_keep="no"), TypeError,
     "scale_by_keep must be a bool, got str"),
    ("surgery use_same_gpu_seed", lambda: apply_stochastic_depth(torch.nn.Sequential(), use_same_gpu_seed="yes"),
     TypeError, "use_same_gpu_seed must be a bool, got str"),
    ("surgery optimizers", lambda: apply_stochastic_depth(torch.nn.Sequential(), optimizers="sgd"), TypeError,
     "optimizers must be a torch.optim.Optimizer, a sequence of them or None, got 'sgd'"),
    ("surgery optimizers items", lambda: apply_stochastic_depth(torch.nn.Sequential(), optimizers=[3]), TypeError,
     "optimizers must be a torch.optim.Optimizer, a sequence of them or None, got [3]"),
    ("apply_drop_path model", lambda: apply_drop_path("vit"), TypeError, "model must be a torch.nn.Module, got str"),
    ("apply_drop_path rate", lambda: apply_drop_path(torch.nn.Sequential(), 1.5), ValueError,
     "drop_path_rate must be a probability in [0, 1], got 1.5"),
    ("apply_drop_path method", lambda: apply_drop_path(torch.nn.Sequential(), stochastic_method="rows"), ValueError,
     "stochastic_method must be one of ['sample', 'block', 'subset'], got 'rows'"),
    ("apply_drop_path target", lambda: apply_drop_path(torch.nn.Sequential(), target_layer_name=1), TypeError,
     "target_layer_name must be a str or None, got int"),
    ("apply_drop_path scale_by_keep", lambda: apply_drop_path(torch.nn.Sequential(), scale_by_keep=1), TypeError,
     "scale_by_keep must be a bool, got int"),
    ("register_block class", lambda: register_block("Block", lambda block, settings: ""), TypeError,
     "cls must be a class, got str"),
    ("register_block adapter", lambda: register_block(torch.nn.Linear, 3), TypeError,
     "adapter must be callable or None, got int"),
    ("register_block skip rule without adapter", lambda: register_block(torch.nn.Linear, None, lambda block: None),
     ValueError, "skip_rule needs an adapter"),
    ("register_drop_module class", lambda: register_drop_module(torch.nn.functional.relu), TypeError,
     "cls must be a torch.nn.Module subclass, got <function relu"),
    ("register_drop_function module", lambda: register_drop_function(torch.nn.Identity), TypeError,
     "fn must be a function, got <class 'torch.nn.modules.linear.Identity'>"),
    ("register_block skip rule", lambda: register_block(torch.nn.Linear, lambda block, settings: "", 3), TypeError,
     "skip_rule must be callable or None, got int"),
    ("set_seed_scope", lambda: set_seed_scope("node"), ValueError, "seed_scope must be one of ['rank', 'global'], got 'node'"),
    ("record_then_replay_masks fn", lambda: record_then_replay_masks(3), TypeError, "fn must be callable, got int"),
    ("record_then_replay_masks reuse", lambda: _call_thrice(record_then_replay_masks(DropPath(0.5))), RuntimeError,
     "was called a third time: it serves one forward and its recomputation; wrap fn anew for every forward"),
    ("available_backends device", lambda: available_backends("gpu0"), ValueError,
     "device must be a torch.device or a device string, got 'gpu0'"),
]


@pytest.mark.parametrize("call, error, message", [pytest.param(*case[1:], id=case[0]) for case in CALL_CASES])
def test_public_callable_rejects_bad_argument(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_surgery_checks_everything_before_changing_a_block():
    model = torchvision.models.resnet18()
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="scale_by_keep must be a bool"):
        apply_stochastic_depth(model, scale_by_keep="no")
    assert [type(m) for m in model.modules()] == before


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


@pytest.mark.parametrize("environ, tunes", [({}, True), ({"STOCHDEPTH_TRITON_AUTOTUNE": "1"}, True),
                                             ({"STOCHDEPTH_TRITON_AUTOTUNE": "0"}, False),
                                             ({"TRITON_INTERPRET": "1"}, False)])
def test_triton_autotuning_follows_its_environment_variable(environ, tunes):
    triton_backend = pytest.importorskip("stochdepth_kernels.triton_backend")
    assert triton_backend.autotuning(environ) is tunes
    with pytest.raises(ValueError, match=re.escape("STOCHDEPTH_TRITON_AUTOTUNE must be '0' or '1', got 'yes'")):
        triton_backend.autotuning({"STOCHDEPTH_TRITON_AUTOTUNE": "yes"})


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


def test_import_below_the_oldest_torch_says_which_torch_it_found_and_needs():
    code = "import torch; torch.__version__ = '2.10.1+cu130'; import stochdepth_kernels"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert ("ImportError: stochdepth_kernels needs torch >= 2.11 (tested with 2.11 to 2.14.1), found torch "
            "2.10.1+cu130") in result.stderr
