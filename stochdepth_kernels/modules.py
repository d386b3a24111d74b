"""``nn.Module`` forms of the op, and torchvision's ``stochastic_depth`` function.

Every module holds its drop probability as a non-persistent float64 buffer ``p``: it moves with
the module (casts of the module leave it float64: a cast would change the rate), a compiled model
reads it as a tensor (changing it never recompiles), and state dicts stay those of timm /
torchvision. Set it through ``drop_prob`` (which also keeps the host's copy of
the value that lets an eager call with ``p == 0`` skip the kernel).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from stochdepth_kernels import validation
from stochdepth_kernels.functional import drop_path, fused_drop_path_add
from stochdepth_kernels.ops import records_graph
from stochdepth_kernels.branch_skip import (add_kept_branch, branch_draws_random, branch_or_skip_in_graph,
                                           graph_can_skip, keeps_branch, running_statistics)
from stochdepth_kernels.seeding import draw_seed
from stochdepth_kernels.subset import backward_may_follow, drop_path_add_subset, effective_drop_rate, subset_size
from stochdepth_kernels.tracing import capturing, fx_leaf

__all__ = ["DropPath", "DropPathAdd", "StochasticDepth", "stochastic_depth"]


class _HasDropProbability(nn.Module):
    seed_scope: str | None = None  # the seed scope of this module's draws; None: set_seed_scope's

    def __init__(self, p: float):
        super().__init__()
        self.register_buffer("p", torch.zeros((), dtype=torch.float64), persistent=False)
        # The rate on the host whatever the module's device, for a compiled batch coin (a CPU draw):
        # a plain attribute, so that moving the module leaves it on the CPU.
        self.p_on_host = torch.zeros((), dtype=torch.float64)
        self.drop_prob = p

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self._drop_prob = validation.check_probability(value, "drop_prob")
        with torch.no_grad():
            self.p.fill_(self._drop_prob)
            self.p_on_host.fill_(self._drop_prob)

    def _rate_and_seed(self, x: Tensor, *inputs: Tensor) -> tuple:
        """``(p, seed)`` for the op on ``x`` (``inputs``: the op's tensors). ``p`` is the buffer,
        always in a captured graph (torch.compile, torch.fx), which must follow the rate; in eager
        mode the host value while it is 0, so that no kernel runs where the factor is 1. ``seed`` is
        None (the op draws it) unless the module has its own ``seed_scope`` (surgery's
        ``use_same_gpu_seed``). A captured graph draws a seed at rate 0 too, so an eager call in
        training draws (and drops) one as well: eager, compiled and traced models then take the same
        seeds from the generator, and give the same masks."""
        drawing = self.training and isinstance(x, Tensor)
        if capturing() or self._drop_prob != 0.0:
            if drawing and self.seed_scope is not None:
                return self.p, draw_seed(x.device, scope=self.seed_scope, for_backward=records_graph(*inputs))
            return self.p, None
        if drawing:
            draw_seed(x.device)
        return 0.0, None

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply`` (``to``, ``half``, ``bfloat16``, ``type``, ``cuda`` ...), but the
        buffer ``p`` stays float64 and exact: a cast would change the rate (0.9 in bfloat16 is 0.8984,
        which scales kept rows by 9.85 instead of 10)."""
        super()._apply(fn, recurse)
        if self.p.dtype != torch.float64:
            self.p = torch.full((), self._drop_prob, dtype=torch.float64, device=self.p.device)
        return self


class DropPath(_HasDropProbability):
    """Drop-in for ``timm.layers.DropPath``: ``drop_path(x)`` with one coin per sample, kept samples
    scaled by ``1/(1 - drop_prob)`` if ``scale_by_keep``; the same constructor, attributes,
    ``extra_repr`` and (empty) state dict. As timm's, it returns ``x`` itself in eval whatever
    ``scale_by_keep`` (the functional ``drop_path`` with ``scale_by_keep=False`` scales eval by
    ``1 - p``, the paper's rule). ``mode="batch"`` (not in timm): one coin per batch."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True, mode: str = "row"):
        super().__init__(drop_prob)
        validation.check_choice(mode, "mode", validation.MODES)
        validation.check_bool(scale_by_keep, "scale_by_keep")
        self.scale_by_keep, self.mode = scale_by_keep, mode

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        p, seed = self._rate_and_seed(x, x)
        return drop_path(x, p, mode=self.mode, scale_by_keep=self.scale_by_keep, seed=seed)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class _SkippedBranch(torch.autograd.Function):
    """``act(residual)``, a new tensor (never a view of the block's input, which FSDP2 refuses), for a
    block whose branch did not run; gives each of ``params`` a zero gradient, so that the skipped
    branch's parameters take part in backward (DistributedDataParallel needs no
    ``find_unused_parameters``)."""

    @staticmethod
    def forward(ctx, residual, relu, *params):
        out = torch.relu(residual) if relu else residual.clone()
        ctx.relu = relu
        ctx.save_for_backward(out if relu else None)
        ctx.params = [(p.shape, p.dtype, p.device) for p in params]
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        grad_residual = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
        return (grad_residual, None,
                *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.params))


class DropPathAdd(_HasDropProbability):
    """``forward(x, residual) = act(residual + drop_path(x))`` in one kernel (:func:`fused_drop_path_add`);
    ``forward(x)`` is :meth:`unary`.

    :meth:`add_branch` takes the branch as a function instead, so that a dropped sample can skip its
    compute: with ``mode="batch"`` the batch's coin is tossed on the host (the CPU generator, the
    same Philox function) before the branch runs, and a dropped batch skips its forward and backward
    entirely; with ``mode="subset"`` the branch runs on the kept samples only
    (:func:`~stochdepth_kernels.subset.drop_path_add_subset`). A skipped branch's parameters get
    zero gradients. ``forward`` with ``mode="subset"`` keeps the same rows of a branch already
    computed on the whole batch.
    """

    def __init__(self, p: float = 0.0, activation: str | None = None, mode: str = "row", scale_by_keep: bool = True):
        super().__init__(p)
        validation.check_choice(activation, "activation", validation.ACTIVATIONS)
        validation.check_choice(mode, "mode", validation.MODULE_MODES)
        validation.check_bool(scale_by_keep, "scale_by_keep")
        self.activation, self.mode, self.scale_by_keep = activation, mode, scale_by_keep

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None:
            return self.unary(x)
        if self.mode == "subset":
            return self._subset(_identity, (x,), residual, lambda: ())
        p, seed = self._rate_and_seed(x, x, residual)
        return fused_drop_path_add(x, residual, p, training=self.training, mode=self.mode,
                                   scale_by_keep=self.scale_by_keep, activation=self.activation, seed=seed)

    def unary(self, x: Tensor) -> Tensor:
        """:func:`drop_path` of ``x`` with this module's rate, seeds and scaling (eval: ``x``, or
        ``(1 - p) x`` without ``scale_by_keep``; the subset method's rows need the add: row mode), for
        a block that calls its drop slot without a residual too."""
        p, seed = self._rate_and_seed(x, x)
        return drop_path(x, p, training=self.training, mode="batch" if self.mode == "batch" else "row",
                         scale_by_keep=self.scale_by_keep, seed=seed)

    def effective_drop_rate(self, batch: int) -> float:
        """The fraction of a training batch of ``batch`` samples that is dropped: ``drop_prob``, or
        with ``mode="subset"`` ``1 - subset_size(batch, drop_prob) / batch``."""
        return effective_drop_rate(batch, self.drop_prob) if self.mode == "subset" else self.drop_prob

    def add_branch(self, branch: Callable[..., Tensor], residual: Tensor,
                   parameters: Callable[[], Iterable[nn.Parameter]], inputs: tuple[Tensor, ...] = (),
                   module: nn.Module | None = None, submodules: tuple[str, ...] | None = None) -> Tensor:
        """``forward(branch(*inputs), residual)``, skipping ``branch``'s compute (its weights are
        ``parameters()``) for dropped samples. ``inputs``: the branch's per-sample tensors (batch
        dimension first), which ``mode="subset"`` needs: the branch then gets their kept rows.
        ``module``: the module whose layers the branch runs, and ``submodules`` the names of those
        layers in it (None: all of ``module``): a compiled batch-mode skip hands their running
        statistics (BatchNorm's, updated in place) through its condition (``module`` None: none).
        In batch mode the coin comes from the CPU generator, eager and under torch.compile (where
        the skip is a ``torch.cond`` in the graph: :mod:`~stochdepth_kernels.branch_skip`); under
        torch.fx the branch always runs and the fused op drops it by a coin from the device's
        generator (the same masks on the CPU), and so it does compiled where the branch's layers
        hold a dropout (the condition's backward would redraw its mask). The subset method keeps its
        fixed shapes under both."""
        if self.mode == "subset":
            if not inputs:
                raise ValueError("mode='subset' runs the branch on the kept samples: add_branch needs the branch's "
                                 "per-sample inputs (inputs=(x,)) and a branch that takes them")
            return self._subset(branch, inputs, residual, parameters)
        if self.mode != "batch" or not self.training:
            return self(branch(*inputs), residual)
        compiled_skip = torch.compiler.is_compiling() and graph_can_skip() and not branch_draws_random(
            module if module is not None else branch, submodules)
        if capturing() and not compiled_skip:
            return self(branch(*inputs), residual)
        relu = self.activation == "relu"
        seed = draw_seed(torch.device("cpu"), scope=self.seed_scope,
                         for_backward=compiled_skip and backward_may_follow(
                             residual, tuple(t for t in inputs if isinstance(t, Tensor)), parameters()))
        if compiled_skip:
            keep = 1.0 - self.p_on_host
            scale = 1.0 / keep if self.scale_by_keep else torch.ones_like(keep)
            return branch_or_skip_in_graph(keeps_branch(seed, keep.float()), branch, tuple(inputs), residual, scale,
                                           relu, module, running_statistics(module, submodules))
        keep = 1.0 - self._drop_prob
        if self._drop_prob == 0.0 or bool(keeps_branch(seed, torch.tensor(keep, dtype=torch.float32))):
            # The factor is known on the host: no seed goes to the device.
            return add_kept_branch(branch(*inputs), residual, 1.0 / keep if self.scale_by_keep else 1.0, relu)
        return self._skipped(residual, parameters)

    def _skipped(self, residual: Tensor, parameters: Callable[[], Iterable[nn.Parameter]]) -> Tensor:
        """``act(residual)`` for a branch that does not run, zero gradients to its parameters."""
        validation.check_input(residual, "residual")
        relu = self.activation == "relu"
        trained = [p for p in parameters() if p.requires_grad]
        if trained and torch.is_grad_enabled():
            return _SkippedBranch.apply(residual, relu, *trained)
        return torch.relu(residual) if relu else residual.clone()

    def _subset(self, branch: Callable[..., Tensor], inputs: tuple[Tensor, ...], residual: Tensor,
                parameters: Callable[[], Iterable[nn.Parameter]]) -> Tensor:
        """The subset method's call; a branch that keeps no sample (``p = 1``) is skipped as in batch
        mode. The seed is drawn here, in the module's seed scope, marked for a backward when the
        branch's weights will get gradients (which the op cannot see before the branch runs).
        Under torch.fx (``residual`` a Proxy) the op records itself and draws when the graph runs."""
        seed = None
        if self.training and isinstance(residual, Tensor) and self.drop_prob > 0.0:
            if subset_size(residual.shape[0], self.drop_prob) == 0:
                return self._skipped(residual, parameters)
            seed = draw_seed(residual.device, scope=self.seed_scope,
                             for_backward=backward_may_follow(residual, tuple(inputs), parameters()))
        return drop_path_add_subset(branch, tuple(inputs), residual, self.drop_prob, training=self.training,
                                    scale_by_keep=self.scale_by_keep, activation=self.activation, seed=seed)

    def extra_repr(self) -> str:
        return (f"p={round(self.drop_prob, 3):0.3f}, activation={self.activation!r}, mode={self.mode!r}, "
                f"scale_by_keep={self.scale_by_keep}")


class StochasticDepth(nn.Module):
    """A residual block ``act(shortcut(x) + drop(branch(x)))`` around ``branch``: one coin per sample
    (``mode="row"``), per batch (``mode="batch"``, where a dropped batch skips ``branch``'s
    forward and backward; its parameters get zero gradients) or the subset method (``mode="subset"``:
    ``branch`` runs on the kept samples only). ``shortcut`` (default identity) runs whatever the
    coin: the paper drops only the branch."""

    def __init__(self, branch: nn.Module, p: float = 0.0, mode: str = "row", shortcut: nn.Module | None = None,
                 activation: str | None = None, scale_by_keep: bool = True):
        super().__init__()
        validation.check_module(branch, "branch")
        validation.check_module(shortcut, "shortcut", optional=True)
        self.branch, self.shortcut = branch, shortcut
        self.drop = DropPathAdd(p, activation=activation, mode=mode, scale_by_keep=scale_by_keep)

    @property
    def drop_prob(self) -> float:
        return self.drop.drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self.drop.drop_prob = value

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.drop.add_branch(self.branch, identity, self.branch.parameters, (x,), self.branch)

    def extra_repr(self) -> str:
        return f"p={round(self.drop_prob, 3):0.3f}, mode={self.drop.mode!r}"


def _identity(x: Tensor) -> Tensor:
    return x


@fx_leaf
def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """torchvision's ``torchvision.ops.stochastic_depth``: the same arguments, results in
    distribution and validation messages; the mask from this package's stream (:func:`drop_path`).
    Unlike torchvision's, it also rejects a non-tensor ``input`` and a non-bool ``training``."""
    validation.check_input(input, "input")
    validation.check_bool(training, "training")
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    return drop_path(input, p, training=True, mode=mode)
