"""The subset method: a training call runs the residual branch only on ``k`` kept samples of the
batch (DINOv2's ``drop_add_residual_stochastic_depth``), so a dropped sample saves the branch's
compute, and adds it back in one fused pass:

    u_b  = philox_uniform(seed, b)                  # the one random stream of the row mode
    rows = the k rows with the smallest u_b, ties by index, ascending
    out  = act(residual + scatter(rows, s * branch(inputs[rows])))     # other rows: act(residual)

``k = subset_size(B, p)`` is fixed by ``B`` and ``p`` (a static shape under torch.compile) and
``s = B / k`` (``scale_by_keep``) makes the output unbiased: each row is kept with probability
``k / B``, so ``E[out_b] = residual_b + branch(inputs)_b`` without activation.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from stochdepth_kernels import validation
from stochdepth_kernels.backends import resolve_backend
from stochdepth_kernels.ops import records_graph
from stochdepth_kernels.seeding import call_seed
from stochdepth_kernels.tracing import capturing, fx_leaf

__all__ = ["drop_path_add_subset", "effective_drop_rate", "subset_size"]


def subset_size(batch: int, p: float) -> int:
    """``k``, the samples a training call keeps of a batch of ``batch`` at drop rate ``p``: ``B (1 - p)``
    rounded to the nearest integer (halves up), then kept within ``[1, B - 1]`` when ``0 < p < 1``
    and ``B >= 2``, so that a schedule's small early rates still drop a sample and a rate below 1
    never drops the whole batch. ``B`` at ``p = 0``, 0 at ``p = 1``; a batch of 1 keeps its sample
    for every ``p < 1``."""
    validation.check_count(batch, "batch")
    p = validation.check_probability(p, "p")
    if p == 0.0:
        return batch
    if p == 1.0:
        return 0
    nearest = math.floor(batch * (1.0 - p) + 0.5)
    return min(max(nearest, 1), max(batch - 1, 1)) if batch > 0 else 0


def effective_drop_rate(batch: int, p: float) -> float:
    """The fraction of a batch of ``batch`` that a training call at rate ``p`` drops: ``1 - k / B``
    (``p`` itself for an empty batch)."""
    kept = subset_size(batch, p)
    return 1.0 - kept / batch if batch > 0 else float(p)


def _per_sample_inputs(inputs, batch: int, device: torch.device) -> tuple[Tensor, ...]:
    inputs = (inputs,) if isinstance(inputs, Tensor) else inputs
    if not isinstance(inputs, (tuple, list)) or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError(f"inputs must be a tensor or a tuple of tensors, got {inputs!r}")
    for index, t in enumerate(inputs):
        if t.dim() == 0 or t.shape[0] != batch or t.device != device:
            raise ValueError(f"inputs[{index}] must have residual's batch of {batch} on {device}, got shape "
                             f"{tuple(t.shape)} on {t.device}")
    return tuple(inputs)


def _kept_rows(impl, t: Tensor, rows: Tensor) -> Tensor:
    """The kept rows of a branch input: the backend's gather (its gradient one scatter pass, where
    index_select's zero-fills and then adds) for a dense floating tensor, else ``index_select``."""
    if t.is_floating_point() and t.layout == torch.strided and not t.is_nested:
        return impl.gather_rows(t, rows)
    return t.index_select(0, rows)


def backward_may_follow(residual: Tensor, inputs: tuple[Tensor, ...], parameters) -> bool:
    """Whether a backward may follow the call: autograd records its tensors or the branch's weights."""
    if records_graph(residual, *inputs):
        return True
    return torch.is_grad_enabled() and any(p.requires_grad for p in parameters)


@fx_leaf
def drop_path_add_subset(branch: Callable[..., Tensor], inputs, residual: Tensor, p: float, *, training: bool = True,
                         scale_by_keep: bool = True, activation: str | None = None, generator=None, seed=None,
                         backend: str = "auto") -> Tensor:
    """``act(residual + drop(branch(*inputs)))`` by the subset method: in training ``branch`` runs on
    the ``k = subset_size(B, p)`` kept rows of each of ``inputs`` (a tensor or a tuple of tensors
    with the batch dimension first, e.g. a block's input and a per-sample attention mask) and must
    return their ``k`` rows of ``residual``'s shape; kept rows get ``act(residual + s * y)``,
    ``s = B / k`` if ``scale_by_keep`` else 1, the others ``act(residual)``. ``k = 0`` (``p = 1``)
    skips the branch (its weights get no gradient; the modules give them zeros). Eval (``training=False``) or ``p == 0``: ``act(residual + c * branch(*inputs))``,
    ``c = 1`` if ``scale_by_keep`` else ``1 - p``. ``p`` is a Python float (``k`` is a shape);
    ``seed``, ``generator``, ``activation`` and ``backend`` as for :func:`fused_drop_path_add`.
    The output has ``residual``'s memory format where its batch dimension is outermost (contiguous,
    channels_last, ViT tokens, NHWC), else the contiguous one."""
    if not callable(branch):
        raise TypeError(f"branch must be callable, got {type(branch).__name__}")
    validation.check_input(residual, "residual")
    validation.check_choice(activation, "activation", validation.ACTIVATIONS)
    validation.check_bool(training, "training")
    validation.check_bool(scale_by_keep, "scale_by_keep")
    if isinstance(p, Tensor):
        raise TypeError("p must be a float with the subset method (the number of kept samples is a shape), "
                        "got a tensor")
    p = validation.check_probability(p, "p")
    batch, device = residual.shape[0], residual.device
    inputs = _per_sample_inputs(inputs, batch, device)
    impl = resolve_backend(backend, device, residual.numel() * residual.element_size())
    relu = activation == "relu"
    parameters = list(branch.parameters()) if isinstance(branch, torch.nn.Module) else []
    seed_t = call_seed(training, p == 0.0, seed, generator, device, backward_may_follow(residual, inputs, parameters))
    if seed_t is None:  # eval or p == 0: every row runs, factor 1 (or 1 - p)
        y = branch(*inputs)
        validation.check_pair(y, residual)
        return impl.drop_path_add(y, residual, None, validation.probability_tensor(p, device), training, "row",
                                  scale_by_keep, relu)
    kept = subset_size(batch, p)
    if batch == 1 and p < 1.0 and not capturing():
        warnings.warn(f"the subset method cannot drop from a batch of 1: the branch runs (effective drop rate 0, "
                      f"not p={p})", stacklevel=2)
    if kept == 0:
        return torch.relu(residual) if relu else residual.clone()
    return run_on_kept_rows(impl, branch, inputs, residual, seed_t, kept, batch / kept if scale_by_keep else 1.0,
                            relu)


def run_on_kept_rows(impl, branch: Callable[..., Tensor], inputs: tuple[Tensor, ...], residual: Tensor, seed: Tensor,
                     kept: int, scale: float, relu: bool) -> Tensor:
    """The method's mechanics once ``k = kept`` (at least 1) is known: the kept rows for ``seed``, the
    branch on their gathered inputs, the fused add of its ``s * y`` (``s = scale``) into ``residual``,
    on the backend ``impl``."""
    rows = impl.subset_rows(seed, residual.shape[0], kept)
    y = branch(*(_kept_rows(impl, t, rows) for t in inputs))
    if not isinstance(y, Tensor) or y.shape != (kept, *residual.shape[1:]):
        raise ValueError(f"branch must return the {kept} kept rows of residual's shape {tuple(residual.shape)}, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    validation.check_input(y, "branch output")
    return impl.subset_add(y, residual, rows, scale, relu)
