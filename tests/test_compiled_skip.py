"""Block-wise stochastic depth under torch.compile: a dropped batch skips its branch inside the graph
(a ``torch.cond``) for ``StochasticDepth(mode="batch")``, ``DropPathAdd.add_branch`` and the blocks
surgery rewrites. For each seed the compiled step has eager's coin, output, gradients, BatchNorm
statistics and generator state; a skipped branch's weights get zero gradients; nothing recompiles
from step to step or when the rate changes."""
import copy

import pytest
import torch
import torch._functorch.config as functorch_config
from torch import nn

from helpers import DTYPES, GraphRecorder, random_tensor, small_resnet, tolerance
from stochdepth_kernels import DropPathAdd, StochasticDepth

SEEDS = range(6)  # both coins at rate 0.5 (checked)


def conv_branch() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())


class AddBranch(nn.Module):
    """``DropPathAdd.add_branch`` called directly, with a linear branch that has no buffer."""

    def __init__(self, dtype):
        super().__init__()
        self.linear, self.drop = nn.Linear(16, 16, dtype=dtype), DropPathAdd(0.5, mode="batch", activation="relu")

    def forward(self, h):
        return self.drop.add_branch(self.linear, h, self.linear.parameters, (h,))


def _state(module: nn.Module) -> dict:
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


def _step(model: nn.Module, run, x: torch.Tensor, seed: int) -> dict:
    """One training step's output, input and parameter gradients, buffers and the generator state after."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = run(x)
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), [x, *parameters])
    return {"out": out, "grads": grads, "buffers": _state(model), "rng": torch.get_rng_state()}


def assert_compiled_steps_match_eager(model: nn.Module, x: torch.Tensor, branch_weight: nn.Parameter,
                                      seeds=SEEDS) -> GraphRecorder:
    """Compiles a copy of ``model`` (fullgraph) and runs both from each seed: the same outputs and
    gradients (up to float rounding), buffers and generator state; zero gradients to
    ``branch_weight`` exactly where the eager step skipped its branch; both coins seen; no recompile."""
    compiled_model = copy.deepcopy(model)
    recorder = GraphRecorder()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recorder)
    trained = [p for p in model.parameters() if p.requires_grad]
    weight_index = 1 + next(i for i, p in enumerate(trained) if p is branch_weight)
    skipped = set()
    tol = tolerance(x.dtype) if x.dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-4}
    for seed in seeds:
        with torch._dynamo.config.patch(error_on_recompile=seed != seeds[0]):
            got = _step(compiled_model, compiled, x, seed)
        want = _step(model, model, x, seed)
        torch.testing.assert_close(got["out"], want["out"], **tol)
        for index, (g, w) in enumerate(zip(got["grads"], want["grads"])):
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"seed {seed}, gradient {index}: {m}")
        assert got["buffers"].keys() == want["buffers"].keys()
        for name, value in want["buffers"].items():
            torch.testing.assert_close(got["buffers"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"seed {seed}, buffer {name}: {m}")
        assert torch.equal(got["rng"], want["rng"]), f"seed {seed}: the compiled step drew other numbers"
        if not want["grads"][weight_index].any():
            skipped.add(seed)
            assert not got["grads"][weight_index].any()
    assert skipped and skipped != set(seeds), f"one coin only: skipped at seeds {sorted(skipped)}"
    assert recorder.conds() > 0
    return recorder


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stochastic_depth_with_batch_norm_skips_in_the_graph(layout):
    torch.manual_seed(0)
    model = StochasticDepth(conv_branch(), 0.5, mode="batch", activation="relu").train()
    x = random_tensor((4, 8, 6, 6), layout=layout)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    assert_compiled_steps_match_eager(model, x, model.branch[0].weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_add_branch_skips_in_the_graph(dtype):
    torch.manual_seed(0)
    model = AddBranch(dtype)
    assert_compiled_steps_match_eager(model, random_tensor((8, 16), dtype=dtype), model.linear.weight)


@pytest.mark.parametrize("budget", [1.0, 0.0])
def test_resnet_blocks_after_surgery_skip_in_the_graph(budget):
    """torchvision's ResNet-18 after surgery's block method (every block's BatchNorms in its branch),
    whole model compiled; at budget 0 the partitioner recomputes all it can, coins included."""
    model = small_resnet("block")
    last_block = model.layer4[1]  # rate 0.5 (the paper's linear decay)
    with functorch_config.patch(activation_memory_budget=budget):
        recorder = assert_compiled_steps_match_eager(model, random_tensor((4, 3, 64, 64)), last_block.conv1.weight,
                                                     seeds=range(4))
    assert recorder.conds() == 8  # one per block


def test_changing_the_rate_does_not_recompile_and_rate_one_always_skips():
    torch.manual_seed(0)
    model = StochasticDepth(conv_branch(), 0.0, mode="batch")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = random_tensor((4, 8, 6, 6))
    compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model.drop_prob = 1.0
        for _ in range(3):
            before = _state(model)
            torch.testing.assert_close(compiled(x), x, rtol=0, atol=0)
            for name, value in _state(model).items():
                assert torch.equal(value, before[name]), name
        model.drop_prob = 0.0
        compiled(x)
        assert model.branch[1].num_batches_tracked.item() == 2


def _inductor_steps_match_eager(model: nn.Module, x: torch.Tensor, seeds=range(3)) -> None:
    """Inductor (code generation) against eager for each seed: output and input gradient up to float
    rounding, every parameter's gradient zero in one exactly where it is zero in the other."""
    compiled_model = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    for seed in seeds:
        with torch._dynamo.config.patch(error_on_recompile=seed != seeds[0]):
            got = _step(compiled_model, compiled, x, seed)
        want = _step(model, model, x, seed)
        torch.testing.assert_close(got["out"], want["out"], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got["grads"][0], want["grads"][0], rtol=1e-3, atol=1e-3)
        for g, w in zip(got["grads"][1:], want["grads"][1:]):
            assert bool(g.any()) == bool(w.any())


def test_inductor_resnet_with_layout_optimization_off():
    """A convolutional model under inductor, as docs/training.md says to compile it."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(layout_optimization=False):
        _inductor_steps_match_eager(small_resnet("block"), random_tensor((4, 3, 64, 64)))


def test_inductor_vit_with_the_default_configuration():
    import timm

    from stochdepth_kernels import apply_drop_path

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4)
    apply_drop_path(model, 0.5, stochastic_method="block", drop_distribution="uniform")
    _inductor_steps_match_eager(model.train(), random_tensor((4, 3, 32, 32)))


@pytest.mark.parametrize("dropout", [0.5, 0.0])
def test_a_branch_with_dropout_runs_compiled_so_its_gradient_follows_the_forward_mask(dropout):
    """``torch.cond``'s backward reruns a kept branch's forward, which would draw another dropout
    mask: a branch with a training dropout is not put in a condition. With ``W2 = 2 I`` and no bias
    the branch's output is twice the dropout's, from which the gradient of ``W2`` follows."""
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(16, 16), nn.Dropout(dropout), nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        branch[2].weight.copy_(2 * torch.eye(16))
    model = StochasticDepth(branch, 0.0, mode="batch").train()
    recorder = GraphRecorder()
    torch._dynamo.reset()
    x = random_tensor((8, 16)).requires_grad_()
    out = torch.compile(model, fullgraph=True, backend=recorder)(x)
    out.sum().backward()
    dropped_out = (out - x).detach() / 2
    torch.testing.assert_close(branch[2].weight.grad, dropped_out.sum(0).expand(16, 16))
    assert (recorder.conds() > 0) == (dropout == 0.0)
