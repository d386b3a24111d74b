"""The nn.Module forms: timm's DropPath drop-in, DropPathAdd, StochasticDepth (compute skipping and
zero gradients in batch mode), torchvision's stochastic_depth, p as a buffer."""
import copy
import pickle
import re

import pytest
import torch
from timm.layers import DropPath as TimmDropPath
from torchvision.ops import stochastic_depth as torchvision_stochastic_depth

from helpers import assert_matches, kept_rows, random_tensor
from stochdepth_kernels import DropPath, DropPathAdd, StochasticDepth, drop_path, fused_drop_path_add, stochastic_depth


def test_drop_path_is_a_drop_in_for_timm():
    ours, theirs = DropPath(0.25, scale_by_keep=False), TimmDropPath(0.25, scale_by_keep=False)
    assert (ours.drop_prob, ours.scale_by_keep) == (theirs.drop_prob, theirs.scale_by_keep)
    assert repr(ours) == repr(theirs) == "DropPath(drop_prob=0.250)"
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = random_tensor((64, 3, 4))
    torch.manual_seed(0)
    out = ours(x)
    torch.manual_seed(0)
    assert_matches(out, drop_path(x, 0.25, scale_by_keep=False, backend="reference"), exact=True)
    assert ours.eval()(x) is x and theirs.eval()(x) is x
    assert DropPath(0.0)(x) is x  # timm returns x itself too


def test_drop_prob_lives_in_a_buffer_that_follows_the_module():
    module = DropPath(0.1)
    assert module.p.dtype == torch.float64 and float(module.p) == pytest.approx(0.1)
    module.drop_prob = 0.6
    assert float(module.p) == pytest.approx(0.6) and module.drop_prob == 0.6
    assert "p" in dict(module.named_buffers()) and "p" not in module.state_dict()


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_drop_path_add_equals_the_functional_op(mode):
    module = DropPathAdd(0.4, activation="relu", mode=mode)
    assert repr(module) == f"DropPathAdd(p=0.400, activation='relu', mode='{mode}', scale_by_keep=True)"
    x, residual = random_tensor((16, 5)), random_tensor((16, 5))
    torch.manual_seed(3)
    out = module(x, residual)
    torch.manual_seed(3)
    assert_matches(out, fused_drop_path_add(x, residual, 0.4, activation="relu", mode=mode))
    assert_matches(module.eval()(x, residual), torch.relu(x + residual))


def test_stochastic_depth_row_mode_is_the_fused_block():
    branch = torch.nn.Linear(6, 6)
    block = StochasticDepth(branch, 0.3, activation="relu")
    assert "StochasticDepth(\n  p=0.300, mode='row'" in repr(block)
    x = random_tensor((32, 6))
    torch.manual_seed(5)
    out = block(x)
    torch.manual_seed(5)
    assert_matches(out, fused_drop_path_add(branch(x), x, 0.3, activation="relu"))


class _CountingBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


def test_batch_mode_skips_a_dropped_branch_and_zeroes_its_gradients():
    branch = _CountingBranch()
    shortcut = torch.nn.Linear(4, 4)
    block = StochasticDepth(branch, 0.5, mode="batch", shortcut=shortcut, activation="relu")
    outcomes = set()
    for step in range(40):
        x = random_tensor((8, 4)).requires_grad_()
        calls = branch.calls
        out = block(x)
        out.sum().backward()
        ran = branch.calls > calls
        outcomes.add(ran)
        expected = torch.relu(shortcut(x) + (branch.linear(x) / 0.5 if ran else 0))
        assert_matches(out, expected)
        for p in branch.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
            if not ran:
                assert torch.equal(p.grad, torch.zeros_like(p))
        assert all(p.grad is not None for p in shortcut.parameters())  # the shortcut always runs
        block.zero_grad(set_to_none=True)
    assert outcomes == {True, False}
    block.eval()
    assert_matches(block(x), torch.relu(shortcut(x) + branch.linear(x)))


def test_batch_mode_coin_is_reproducible_from_the_cpu_generator():
    block = StochasticDepth(_CountingBranch(), 0.5, mode="batch")
    x = random_tensor((2, 4))
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        before = block.branch.calls
        [block(x) for _ in range(10)]
        runs.append(block.branch.calls - before)
    assert runs[0] == runs[1]


def test_torchvision_stochastic_depth_compatible():
    x = random_tensor((4000, 3))
    for mode in ("row", "batch"):
        assert stochastic_depth(x, 0.3, mode, training=False) is x
        assert stochastic_depth(x, 0.0, mode) is x
    rows = kept_rows(stochastic_depth(x, 0.3, "row")).float().mean()
    assert 0.65 < rows < 0.75  # 4000 coins: a 7-sigma band around 0.7
    for bad, message in [((x, 1.5, "row"), "drop probability has to be between 0 and 1, but got 1.5"),
                         ((x, 0.1, "rows"), "mode has to be either 'batch' or 'row', but got rows")]:
        for function in (stochastic_depth, torchvision_stochastic_depth):
            with pytest.raises(ValueError, match=re.escape(message)):
                function(*bad)


def test_modules_survive_deepcopy_and_pickle():
    for module in (DropPath(0.2), DropPathAdd(0.3, "relu"), StochasticDepth(torch.nn.Linear(3, 3), 0.1)):
        for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert repr(clone) == repr(module)
            assert float(clone.p if hasattr(clone, "p") else clone.drop.p) == pytest.approx(module.drop_prob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_changing_p_does_not_recompile(dtype):
    """Also for a module cast to the input's dtype (its rate buffer stays float64)."""
    module = DropPathAdd(0.2, activation="relu").to(dtype)
    compiled = torch.compile(module, fullgraph=True)
    x, residual = random_tensor((8, 3), dtype), random_tensor((8, 3), dtype)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p in (0.2, 0.5, 0.9):
            module.drop_prob = p
            torch.manual_seed(1)
            out = compiled(x, residual)
            torch.manual_seed(1)
            assert_matches(out, fused_drop_path_add(x, residual, p, activation="relu"))


def test_compiled_function_takes_a_new_p_and_rejects_a_bad_one():
    """A tensor p changes without recompiling; a float p is a constant of the graph (a new value
    recompiles, and works); a bad p raises the validation message inside a full graph too."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, r, p: fused_drop_path_add(x, r, p, activation="relu", seed=3), backend=counter,
                             fullgraph=True)
    x, residual = random_tensor((16, 4)), random_tensor((16, 4))
    frames = []
    for p in (0.2, 0.6, 0.9):
        out = compiled(x, residual, torch.tensor(p, dtype=torch.float64))
        assert_matches(out, fused_drop_path_add(x, residual, p, activation="relu", seed=3))
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1]
    for p in (0.1, 0.3, 0.7):
        assert_matches(compiled(x, residual, p), fused_drop_path_add(x, residual, p, activation="relu", seed=3))
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported),
                       match=re.escape("p must be a probability in [0, 1], got 1.5")):
        compiled(x, residual, 1.5)


@pytest.mark.parametrize("make", [lambda: DropPath(0.5), lambda: DropPathAdd(0.5, activation="relu"),
                                  lambda: StochasticDepth(torch.nn.Linear(8, 8), 0.5),
                                  lambda: StochasticDepth(torch.nn.Linear(8, 8), 0.5, mode="batch")],
                         ids=["DropPath", "DropPathAdd", "StochasticDepth", "StochasticDepth-batch"])
def test_compiled_module_draws_a_fresh_mask_per_call_and_matches_eager(make):
    """Compiled, every module draws eager's masks (batch mode: eager's coin, the dropped branch
    skipped inside the graph; tests/test_compiled_skip.py checks that skip)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    module = make()
    inputs = [random_tensor((64, 8)).requires_grad_() for _ in range(2 if isinstance(module, DropPathAdd) else 1)]
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    for seed in range(4):  # batch mode: both coins among these seeds
        results = []
        for run in (compiled, module):
            torch.manual_seed(seed)
            out = run(*inputs)
            results.append([out, *torch.autograd.grad(out.sum(), inputs)])
        for got, want in zip(*results):  # same seed: same mask, output and gradients as eager
            assert_matches(got, want)
    outputs = [compiled(*inputs) for _ in range(8)]
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])  # fresh masks, not frozen at trace time
    compiled_frames = counter.frame_count
    module.drop_prob = 0.25
    compiled(*inputs)
    assert counter.frame_count == compiled_frames  # p is a buffer: no recompile
    module.eval()
    compiled(*inputs)
    # Eval compiles its own graph (Dynamo may trace a frame twice, when it first turns a 0-d tensor's
    # value into a symbolic float: each try counts here).
    evaluated_frames = counter.frame_count
    assert evaluated_frames > compiled_frames
    module.train()
    compiled(*inputs)
    assert counter.frame_count == evaluated_frames  # and training is still cached


CASTS = {"to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16), "half()": (lambda m: m.half(), torch.float16),
         "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16), "double()": (lambda m: m.double(), torch.float64),
         "type(float16)": (lambda m: m.type(torch.float16), torch.float16),
         "to(float64, cpu)": (lambda m: m.to(torch.device("cpu"), torch.float64), torch.float64)}
MODULES = {"DropPath": lambda: DropPath(0.9), "DropPathAdd": lambda: DropPathAdd(0.9, activation="relu"),
           "StochasticDepth": lambda: StochasticDepth(torch.nn.Linear(4, 4), 0.9)}


def _unfused(module, x, p):
    """What ``module`` computes at rate ``p`` (a Python float), from the functional op."""
    if isinstance(module, DropPath):
        return drop_path(x, p)
    if isinstance(module, DropPathAdd):
        return fused_drop_path_add(x, x, p, activation="relu")
    return fused_drop_path_add(module.branch(x), x, p)


def _call(module, x):
    return module(x, x) if isinstance(module, DropPathAdd) else module(x)


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("name", MODULES)
def test_casting_a_module_keeps_its_rate_and_scale_exact(name, cast):
    """Module.to(dtype) and friends cast floating buffers; the rate buffer stays float64 and exact,
    so kept rows are scaled by 1/(1 - 0.9) = 10 (not 9.875 as a bfloat16 0.9 gave)."""
    apply_cast, dtype = CASTS[cast]
    module = apply_cast(MODULES[name]())
    rates = [buffer for name, buffer in module.named_buffers() if name.split(".")[-1] == "p"]
    assert rates and all(rate.dtype == torch.float64 and float(rate) == 0.9 for rate in rates)
    assert module.drop_prob == 0.9
    x = random_tensor((256, 4), dtype)
    torch.manual_seed(3)
    out = _call(module, x)
    torch.manual_seed(3)
    assert_matches(out, _unfused(module, x, 0.9))
    module.drop_prob = 0.5  # the setter fills the float64 buffer
    assert all(float(rate) == 0.5 and rate.dtype == torch.float64 for rate in rates)
