"""Block-wise stochastic depth (``mode="batch"``): one coin per batch decides whether a residual
block's branch runs at all.

The coin is the first Philox uniform of a seed drawn from the CPU generator, below
``keep = 1 - p`` in float32: the host decides without waiting for a device, and the CPU's
backends draw the same coin for the same seed. Eager, Python branches on it. Under torch.compile
the decision stays in the graph as a ``torch.cond`` (:func:`branch_or_skip_in_graph`), so a
compiled model skips a dropped branch's forward and backward too.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from stochdepth_kernels import validation
from stochdepth_kernels.reference import philox_uniform

__all__ = ["add_kept_branch", "arguments_with", "branch_draws_random", "branch_or_skip_in_graph", "graph_can_skip",
           "keeps_branch", "running_statistics"]


@torch.compiler.assume_constant_result  # run while Dynamo traces: it reads the tracer's state
def graph_can_skip() -> bool:
    """Whether the code Dynamo is tracing may hold a ``torch.cond``: not inside an activation
    checkpoint's region (``torch.utils.checkpoint`` under torch.compile), whose tracing rejects the
    condition on torch 2.11 (selective checkpointing) and 2.14 (every checkpoint). Where Dynamo's
    tracer cannot be read, no."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tracer = InstructionTranslator.current_tx().output.current_tracer
        while tracer is not None:
            if tracer.source_target is torch.ops.higher_order.tag_activation_checkpoint:
                return False
            tracer = tracer.parent
    except Exception:  # noqa: BLE001 - Dynamo's internals moved: keep the branch in the graph
        return False
    return True


def keeps_branch(seed: Tensor, keep: Tensor) -> Tensor:
    """Whether the batch keeps its branch, as a 0-d bool tensor: the first Philox uniform of the
    CPU ``seed`` below ``keep`` (a float32 0-d CPU tensor)."""
    return (philox_uniform(seed, torch.zeros(1, dtype=torch.int64)) < keep).reshape(())


def add_kept_branch(x: Tensor, residual: Tensor, scale, relu: bool) -> Tensor:
    """``act(residual + scale * x)`` for a kept branch's output ``x``, checked as the fused op checks
    (no broadcasting). ``scale`` a float (eager), or a 0-d tensor in a graph: the sum then has the
    residual's dtype and exactly the strides of a clone of it, the skipped side's (``torch.cond``
    compares the two sides' strides, size-1 dimensions included)."""
    validation.check_pair(x, residual)
    out = residual.clone().add_(x * scale) if isinstance(scale, Tensor) else torch.add(residual, x, alpha=scale)
    return out.relu_() if relu else out


def _draws_random(module: nn.Module) -> bool:
    """Whether ``module`` draws random numbers when it runs: a training dropout (or DropBlock) with a
    positive rate."""
    if not module.training:
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    rate = getattr(module, "drop_prob", None)
    return type(module).__name__.startswith("DropBlock") and isinstance(rate, (int, float)) and rate > 0


def _owners(module, submodules: tuple[str, ...] | None) -> list[tuple[str, object]]:
    """``(name, value)`` of ``module``'s attributes ``submodules`` (None: ``("", module)``; ``module``
    None: none)."""
    if module is None:
        return []
    if submodules is None:
        return [("", module)]
    return [(owner, operator.attrgetter(owner)(module)) for owner in submodules]


def branch_draws_random(module, submodules: tuple[str, ...] | None) -> bool:
    """Whether the branch's layers (``module``'s attributes ``submodules``, None: all of it; a
    ``module`` that is a plain function holds none) hold a module that draws random numbers.
    ``torch.cond``'s backward reruns the kept branch's forward, which would draw them anew: the
    gradient would follow other dropout masks than the forward's. A branch that draws them outside
    such a module (``F.dropout`` in a forward) is not seen."""
    return any(_draws_random(layer) for _, owner in _owners(module, submodules) if isinstance(owner, nn.Module)
               for layer in owner.modules())


def _is_running_statistic(name: str) -> bool:
    """Whether the buffer named ``name`` is a statistic its module updates in place in training:
    BatchNorm's and InstanceNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked``, and
    any other ``running_*`` (timm's EvoNorm)."""
    leaf = name.rpartition(".")[2]
    return leaf.startswith("running_") or leaf == "num_batches_tracked"


def running_statistics(module: nn.Module | None, submodules: tuple[str, ...] | None) -> dict[str, Tensor]:
    """The running statistics, by name in ``module``, of its attributes named ``submodules`` (None:
    of ``module`` as a whole). Other buffers are constants of a branch: copying them back would bump
    their version under autograd, which may have saved them (a shortcut's BatchNorm, outside the
    branch, saves its statistics too)."""
    found = {}
    for owner, value in _owners(module, submodules):
        if isinstance(value, nn.Module):
            prefix = f"{owner}." if owner else ""
            found.update((prefix + name, buffer) for name, buffer in value.named_buffers()
                         if _is_running_statistic(name))
        elif isinstance(value, Tensor) and _is_running_statistic(owner):
            found[owner] = value
    return found


def arguments_with(inputs: tuple, indices, values) -> list:
    """``inputs`` as a list, with ``values`` in place of the inputs at ``indices``."""
    arguments = list(inputs)
    for index, value in zip(indices, values):
        arguments[index] = value
    return arguments


def _skipped(residual: Tensor, relu: bool) -> Tensor:
    """``act(residual)`` as a new tensor (never a view of the block's input, which FSDP2 refuses)."""
    return torch.relu(residual) if relu else residual.clone()


def branch_or_skip_in_graph(keeps: Tensor, branch: Callable[..., Tensor], inputs: tuple, residual: Tensor,
                            scale: Tensor, relu: bool, module: nn.Module | None,
                            statistics: dict[str, Tensor]) -> Tensor:
    """``act(residual + scale * branch(*inputs))`` where ``keeps``, else ``act(residual)``, as one
    ``torch.cond`` for torch.compile: the skipped side computes nothing of the branch, forward or
    backward (autograd gives the branch's weights zero gradients).

    ``torch.cond`` may not mutate its operands, and a branch's buffers are operands (BatchNorm
    updates its running statistics in place). So the buffers ``statistics`` (by name in ``module``,
    the module whose attributes the branch runs) go through the condition as copies: the kept side
    runs the branch with fresh copies in their place and returns them as they end up, the skipped
    side returns them unchanged, and they are copied back afterwards; a dropped batch leaves them
    untouched, as in eager. A branch that updates another buffer in place fails to compile (torch's
    "input mutation" error under ``torch.cond``). Integer buffers (``num_batches_tracked``) travel
    as float64, because ``torch.cond``'s autograd fails on integer outputs (exact below 2**53). The
    output has ``residual``'s dtype on both sides."""
    names, buffers = list(statistics), list(statistics.values())
    carried = tuple(b.detach().to(torch.float64) if not b.is_floating_point() else b.detach().clone()
                    for b in buffers)
    tensor_at = [i for i, value in enumerate(inputs) if isinstance(value, Tensor)]

    def kept(residual: Tensor, *operands: Tensor) -> tuple[Tensor, ...]:
        tensors, state = operands[:len(tensor_at)], operands[len(tensor_at):]
        fresh = {name: value.to(buffer.dtype, copy=True) for name, value, buffer in zip(names, state, buffers)}
        with _reparametrize_module(module, fresh) if fresh else contextlib.nullcontext():
            x = branch(*arguments_with(inputs, tensor_at, tensors))  # non-tensor inputs stay constants
        out = add_kept_branch(x, residual, scale, relu)
        return (out, *(value.to(carry.dtype) for value, carry in zip(fresh.values(), state)))

    def skipped(residual: Tensor, *operands: Tensor) -> tuple[Tensor, ...]:
        return (_skipped(residual, relu), *(value.clone() for value in operands[len(tensor_at):]))

    out, *updated = torch.cond(keeps, kept, skipped, (residual, *(inputs[i] for i in tensor_at), *carried))
    with torch.no_grad():
        for buffer, value in zip(buffers, updated):
            buffer.copy_(value)
    return out
