"""The seed a compiled forward draws is the one its backward uses, whatever the partitioner
recomputes: torch.compile with an activation memory budget below 1, selective activation
checkpointing that saves or recomputes the op, and a checkpointed block inside a compiled model.
Each compiled run is checked against eager for one ``torch.manual_seed``: output and every gradient.
(The Triton backend's compiled path runs in the GPU suite: the interpreter cannot trace.)"""
import functools
import re
import subprocess
import sys

import pytest
import torch
import torch._functorch.config as functorch_config
import torch.utils.checkpoint as checkpointing

from helpers import kept_rows, random_tensor
from stochdepth_kernels import DropPath, DropPathAdd, StochasticDepth, available_backends, drop_path, fused_drop_path_add

BUDGETS = [1.0, 0.5, 0.05, 0.0]


class Block(torch.nn.Module):
    """A residual block whose branch (a linear layer and a tanh) is worth recomputing, with every way
    a seed is drawn: the functional op, DropPath, the fused-add module, a row-mode and a batch-mode
    ``StochasticDepth``."""

    def __init__(self, features: int = 16):
        super().__init__()
        self.linear = torch.nn.Linear(features, features)
        self.tail = DropPathAdd(0.5, activation="relu")
        self.drop = DropPath(0.2)
        self.rows = StochasticDepth(torch.nn.Linear(features, features), 0.5)
        self.batch = StochasticDepth(torch.nn.Linear(features, features), 0.5, mode="batch")

    def forward(self, h):
        h = self.tail(torch.tanh(self.linear(h)), h)
        h = fused_drop_path_add(torch.tanh(h), h, 0.3) + self.drop(h)
        return self.batch(self.rows(h))


def step(fn, inputs, parameters, seed):
    """(output, gradient of every input and parameter) of one forward and backward from ``seed``."""
    torch.manual_seed(seed)
    out = fn(*inputs)
    grad_out = torch.ones_like(out)
    return [out, *torch.autograd.grad(out, [*inputs, *parameters], grad_out)]


def assert_same_steps(compiled, eager, inputs, parameters, seeds=range(3)):
    """Same output and gradients for each seed, up to 1e-4: compiled code reorders the float32
    arithmetic around the op (the linear layers, attention, tanh; a timm ViT's gradients differed by
    1.6e-5 with timm 1.0.31); a row given another mask differs by O(1)."""
    for seed in seeds:
        for got, want in zip(step(compiled, inputs, parameters, seed), step(eager, inputs, parameters, seed)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


KERNELS = [pytest.param(("cpu", "cpu"), id="cpu"), pytest.param(("reference", "cpu"), id="reference"),
           pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
           pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("unary", [False, True], ids=["fused", "unary"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_with_a_memory_budget_gives_eager_masks_and_gradients(kernel, unary, budget):
    """Inductor, as training uses it: the partitioner may recompute the seed draw in the backward,
    and must then draw the forward's seed again."""
    backend, device = kernel
    if backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} here")
    torch._dynamo.reset()
    linear, h = torch.nn.Linear(16, 16, device=device), random_tensor((64, 16), device=device).requires_grad_()

    def f(h):
        if unary:
            return h + drop_path(torch.tanh(linear(h)), 0.5, backend=backend)
        return fused_drop_path_add(torch.tanh(linear(h)), h, 0.5, activation="relu", backend=backend)

    with functorch_config.patch(activation_memory_budget=budget):
        assert_same_steps(torch.compile(f, fullgraph=True), f, [h], list(linear.parameters()))


class Model(torch.nn.Module):
    """Two blocks, the second under activation checkpointing, as a model is compiled whole."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block()

    def forward(self, h):
        return checkpointing.checkpoint(self.second, self.first(h), use_reentrant=False)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("make", [Block, Model], ids=["block", "checkpointed block inside a model"])
def test_every_seed_of_a_block_survives_the_budget(make, budget):
    """Every drawing path, through the partitioner that inductor uses (no code generation, so fast)."""
    torch._dynamo.reset()
    module, h = make(), random_tensor((64, 16)).requires_grad_()
    with functorch_config.patch(activation_memory_budget=budget):
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager_decomp_partition")
        assert_same_steps(compiled, module, [h], list(module.parameters()), seeds=range(4))


@pytest.mark.parametrize("budget", [0.05, 0.0])
def test_rows_without_gradient_are_the_rows_the_forward_dropped(budget):
    torch._dynamo.reset()
    x, h = (random_tensor((256, 16)).requires_grad_() for _ in range(2))

    def f(x, h):
        return fused_drop_path_add(torch.tanh(x), h, 0.5)

    with functorch_config.patch(activation_memory_budget=budget):
        compiled = torch.compile(f, fullgraph=True)
        for seed in range(3):
            torch.manual_seed(seed)
            out = compiled(x, h)
            (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
            forward_kept = kept_rows(out - h.detach())  # a dropped row's output is exactly its residual
            assert 0 < int(forward_kept.sum()) < 256
            assert torch.equal(kept_rows(grad_x), forward_kept)


def _policy(saved_op_names, ctx, op, *args, **kwargs):
    if any(name in str(op) for name in saved_op_names):
        return checkpointing.CheckpointPolicy.MUST_SAVE
    return checkpointing.CheckpointPolicy.PREFER_RECOMPUTE


# Selective activation checkpointing that saves the fused op's output, or recomputes everything.
POLICIES = {"saves the op": ("stochdepth",), "recomputes the op": ()}


@pytest.mark.parametrize("policy", POLICIES, ids=list(POLICIES))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_selective_checkpointing_saving_or_recomputing_the_op(policy, compiled):
    torch._dynamo.reset()
    block, h = Block(), random_tensor((64, 16)).requires_grad_()
    context_fn = functools.partial(checkpointing.create_selective_checkpoint_contexts,
                                   functools.partial(_policy, POLICIES[policy]))

    def checkpointed(h):
        return checkpointing.checkpoint(block, h, use_reentrant=False, context_fn=context_fn)

    run = torch.compile(checkpointed, fullgraph=True, backend="aot_eager_decomp_partition") if compiled else checkpointed
    assert_same_steps(run, block, [h], list(block.parameters()), seeds=range(4))


@pytest.mark.parametrize("method", ["sample", "block"])
def test_a_model_after_surgery_compiled_with_no_memory_budget(method):
    import timm

    from stochdepth_kernels import apply_drop_path

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4)
    apply_drop_path(model, 0.5, stochastic_method=method, drop_distribution="uniform")
    x = torch.randn(8, 3, 32, 32, requires_grad=True)
    with functorch_config.patch(activation_memory_budget=0.0):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager_decomp_partition")
        assert_same_steps(compiled, model, [x], list(model.parameters()), seeds=range(3))


FIRST_CALL_COMPILED = """
import torch
from stochdepth_kernels import DropPathAdd
drops = [DropPathAdd(0.5, mode=mode) for mode in ("row", "batch", "subset")]
linear = torch.nn.Linear(8, 8)
def f(h):
    for drop in drops:
        h = drop.add_branch(linear, h, linear.parameters, (h,))
    return h
compiled = torch.compile(f, fullgraph=True, backend="eager")
h = torch.randn(8, 8)
compiled(h)
with torch._dynamo.config.patch(error_on_recompile=True):
    compiled(h)
"""


def test_a_first_call_under_compile_does_not_make_the_next_recompile():
    """In a fresh process whose first call of the ops is compiled: the backend lookup fills no cache at
    that call that the compiled code would guard on (it made the second call recompile)."""
    result = subprocess.run([sys.executable, "-c", FIRST_CALL_COMPILED], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


COMPILED_TRAINING_STEPS = """
import warnings
import torch, timm
from stochdepth_kernels import apply_drop_path
with warnings.catch_warnings():  # torch 2.11's inductor warns at its own import (torch/utils/mkldnn.py)
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._inductor.compile_fx
torch.manual_seed(0)
for method in ("sample", "block", "subset"):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4)
    apply_drop_path(model, 0.5, stochastic_method=method)
    compiled = torch.compile(model.train(), fullgraph=True)
    for _ in range(2):
        compiled(torch.randn(4, 3, 32, 32)).square().mean().backward()
"""
# torch's own log lines that concern the machine, not this package: inductor's C++ codegen looks for
# a CUDA runtime on a machine without a GPU.
MACHINE_WARNINGS = ("No CUDA runtime is found",)


@pytest.mark.slow
def test_compiled_training_after_surgery_warns_nothing():
    """A fresh process, Python warnings made errors, inductor: compiled training steps of a model after
    surgery (every method) log no warning (the seed draw's checkpoint once made torch log one about
    context_fn and in-place ops into every compile)."""
    result = subprocess.run([sys.executable, "-W", "error", "-c", COMPILED_TRAINING_STEPS], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [line for line in result.stderr.splitlines()
              if re.match(r"[WE]\d{4} ", line) and not any(known in line for known in MACHINE_WARNINGS)]
    assert not logged, "\n".join(logged)
