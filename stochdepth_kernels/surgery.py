"""Model surgery: stochastic depth on the residual blocks of any model that has drop-path slots.

``apply_stochastic_depth`` is Composer's function (its keywords, defaults and semantics: block-wise,
no training-time scaling, eval x (1 - p)); ``apply_drop_path`` gives timm's ``drop_path_rate``
(sample-wise, kept samples x 1/(1 - p), eval bit-identical to the unmodified model).

A block is a module that holds a drop slot: a timm ``DropPath``, a torchvision ``StochasticDepth``,
this package's ``DropPath``, a module type of :func:`register_drop_module`, a module of the drop-path
kind by name (a class ``...DropPath`` with a ``drop_prob``: Hugging Face's), an ``nn.Identity`` or
``None`` held under a drop-path name (timm's rate-0 slots), or a call of a function of
:func:`register_drop_function`; torchvision's ResNet blocks (no slot) join through
:func:`register_block`. One generic rewrite serves them all (``block_graph``): the block's own
forward, traced, each ``residual + drop(branch)`` made the fused op at the best level it allows,
named per residual in the report (1: fused, the branch cut out so that dropped samples skip it;
2: fused; 3: this package's unary drop in the slot). The block's class becomes a subclass running the
regenerated forward; its weights, parameter objects, names and state-dict keys stay as they were.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from stochdepth_kernels import validation
from stochdepth_kernels.block_graph import (DROP_SLOT_NAME, Tail, Untraceable, drop_functions, is_drop_module,
                                            register_drop_function, register_drop_module, rewritten_code,
                                            slot_attribute, trace_tails)
from stochdepth_kernels.modules import DropPath, DropPathAdd
from stochdepth_kernels.schedules import CONVENTIONS, DISTRIBUTIONS, drop_path_rates
from stochdepth_kernels.subset import effective_drop_rate

__all__ = ["SurgeryReport", "apply_drop_path", "apply_stochastic_depth", "register_block", "register_drop_function",
           "register_drop_module"]

STOCHASTIC_METHODS = {"sample": "row", "block": "batch", "subset": "subset"}
# Composer's target_layer_name for torchvision's Bottleneck.
ALIASES = {"ResNetBottleneck": "Bottleneck"}
# The slot surgery adds to a registered block that has none (torchvision's ResNet blocks).
ADDED_SLOT = "stochastic_depth"
LEVELS = {1: "fused, the branch cut out", 2: "fused", 3: "unary drop"}


@dataclass
class Settings:
    """What an adapter applies to one block (``seed_scope``: its modules', None for the global one)."""
    rate: float
    mode: str
    scale_by_keep: bool
    seed_scope: str | None = None


# An adapter changes a block in place and returns how ("fused add", ...); a skip rule returns why a
# block of its type cannot get stochastic depth, or None.
Adapter = Callable[[nn.Module, Settings], str]
SkipRule = Callable[[nn.Module], "str | None"]
_ADAPTERS: dict[type, tuple[Adapter, SkipRule]] = {}
_WITHOUT_SLOT: list[type] = []


@dataclass
class SurgeryReport:
    """Which modules changed (name, block type, drop rate, how) and which matched but were skipped;
    ``levels``: (block, slot, level) of each residual of the changed blocks (1 fused with the branch
    cut out, 2 fused, 3 unary drop; 0 for a block changed by a registered adapter); ``mode``: the
    modules' (``"row"``, ``"batch"`` or ``"subset"``)."""
    changed: list[tuple[str, str, float, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    levels: list[tuple[str, str, int]] = field(default_factory=list)
    mode: str = "row"

    def rates(self) -> list[float]:
        return [rate for _, _, rate, _ in self.changed]

    def effective_rates(self, batch: int) -> list[float]:
        """The fraction of a training batch of ``batch`` samples each changed block drops: its rate,
        or with the subset method ``1 - subset_size(batch, rate) / batch`` (a fixed number of
        samples, so a rate below ``1 / batch`` still drops one)."""
        if self.mode != "subset":
            return self.rates()
        return [effective_drop_rate(batch, rate) for rate in self.rates()]

    def __str__(self) -> str:
        lines = [f"stochastic depth on {len(self.changed)} blocks, {len(self.skipped)} skipped"]
        lines += [f"  {name} ({kind}): p={rate:.4f}, {how}" for name, kind, rate, how in self.changed]
        lines += [f"  skipped {name} ({kind}): {why}" for name, kind, why in self.skipped]
        return "\n".join(lines)


def register_block(cls: type, adapter: Adapter | None = None, skip_rule: SkipRule | None = None) -> None:
    """Makes surgery handle blocks of type ``cls``: with ``adapter(block, settings)`` (which changes
    the block and returns how; ``skip_rule(block)``, if given, names why a block must be left alone),
    or without one as a residual block that has no drop slot: the generic rewrite puts one on the
    last add of the block's input (or of its downsample) to its branch."""
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {type(cls).__name__}")
    if not (adapter is None or callable(adapter)):
        raise TypeError(f"adapter must be callable or None, got {type(adapter).__name__}")
    if not (skip_rule is None or callable(skip_rule)):
        raise TypeError(f"skip_rule must be callable or None, got {type(skip_rule).__name__}")
    if adapter is None:
        if skip_rule is not None:
            raise ValueError("skip_rule needs an adapter: the generic rewrite finds the blocks to skip itself")
        _WITHOUT_SLOT.append(cls)
    else:
        _ADAPTERS[cls] = (adapter, skip_rule or (lambda block: None))


def apply_stochastic_depth(model: nn.Module, target_layer_name: str | None = None, stochastic_method: str = "block",
                           drop_rate: float = 0.2, drop_distribution: str = "linear", use_same_gpu_seed: bool = True,
                           optimizers=None, *, convention: str = "paper", scale_by_keep: bool = False) -> SurgeryReport:
    """Composer's ``apply_stochastic_depth``: its keywords, defaults and semantics. Every block of
    ``model`` of type ``target_layer_name`` (a class name, or Composer's ``"ResNetBottleneck"``;
    None: every block) gets stochastic depth: ``"block"`` drops whole blocks for the batch (a
    dropped block skips its branch's compute), ``"sample"`` drops samples, ``"subset"`` runs each
    branch on a fixed number of kept samples only (not in Composer); no training-time scaling, eval
    outputs ``shortcut + (1 - p) * branch`` (``scale_by_keep=False``); rates ``(l + 1) / L *
    drop_rate`` (``drop_distribution="linear"``; ``convention="timm"``: linspace from 0), one per
    block, shared by its drop slots. ``use_same_gpu_seed`` (block method): True drops the same blocks
    on every rank whose generator is seeded alike, False lets ranks differ; no effect with
    ``"sample"``, as in Composer. ``optimizers`` (one or a sequence): surgery keeps every
    ``Parameter`` object, so an optimizer built before it trains the changed model; checked. For
    timm's defaults see :func:`apply_drop_path`."""
    validation.check_bool(use_same_gpu_seed, "use_same_gpu_seed")
    _check_optimizers(optimizers)
    validation.check_module(model, "model")
    before = {id(parameter) for parameter in model.parameters()}
    scope = ("global" if use_same_gpu_seed else "rank") if stochastic_method == "block" else None
    report = _apply(model, target_layer_name, stochastic_method, drop_rate, drop_distribution, convention,
                    scale_by_keep, scope)
    if optimizers is not None and {id(parameter) for parameter in model.parameters()} != before:
        raise RuntimeError("surgery replaced parameters of the model: the optimizers no longer train it")
    return report


def apply_drop_path(model: nn.Module, drop_path_rate: float = 0.1, *, target_layer_name: str | None = None,
                    stochastic_method: str = "sample", drop_distribution: str = "linear", convention: str = "timm",
                    scale_by_keep: bool = True) -> SurgeryReport:
    """timm's ``drop_path_rate`` given to a built model: one coin per sample (``"block"``: per batch,
    skipping dropped branches; ``"subset"``: the branch on the kept samples only), kept samples
    scaled by ``1/(1 - p)`` (``scale_by_keep``) so eval outputs are bit-identical to the model before
    surgery, rates linspace(0, drop_path_rate) over the changed blocks, every drop slot of a block at
    its block's rate (``convention="paper"``: ``(l + 1) / L * rate``). Blocks as in
    :func:`apply_stochastic_depth`."""
    return _apply(model, target_layer_name, stochastic_method, drop_path_rate, drop_distribution, convention,
                  scale_by_keep, None, rate_name="drop_path_rate")


def _check_optimizers(optimizers) -> None:
    """None, an optimizer, or a list or tuple of them."""
    group = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers
    if group is not None and not (isinstance(group, (list, tuple))
                                  and all(isinstance(o, torch.optim.Optimizer) for o in group)):
        raise TypeError(f"optimizers must be a torch.optim.Optimizer, a sequence of them or None, got {optimizers!r}")


@dataclass
class _Block:
    """A block surgery found: its slots' attributes, the slot it adds (blocks without one), and what
    the trace found (its tails, or why it could not be traced)."""
    name: str
    module: nn.Module
    original: type
    slots: set[str]
    added: str | None = None
    tails: list[Tail] = field(default_factory=list)
    untraceable: str = ""


def _apply(model: nn.Module, target_layer_name: str | None, stochastic_method: str, drop_rate: float,
           drop_distribution: str, convention: str, scale_by_keep: bool, seed_scope: str | None,
           rate_name: str = "drop_rate") -> SurgeryReport:
    """Checks every argument (the rate's called ``rate_name``), then changes each matching block
    (numbered in ``model.named_modules()`` order, rates from :func:`drop_path_rates` over the blocks
    that change) and reports it."""
    validation.check_module(model, "model")
    if target_layer_name is not None and not isinstance(target_layer_name, str):
        raise TypeError(f"target_layer_name must be a str or None, got {type(target_layer_name).__name__}")
    validation.check_choice(stochastic_method, "stochastic_method", list(STOCHASTIC_METHODS))
    validation.check_choice(drop_distribution, "drop_distribution", DISTRIBUTIONS)
    validation.check_choice(convention, "convention", CONVENTIONS)
    validation.check_probability(drop_rate, rate_name)
    validation.check_bool(scale_by_keep, "scale_by_keep")  # before any block changes
    wanted = ALIASES.get(target_layer_name, target_layer_name)
    found = [(name, module) for name, module in model.named_modules() if _is_block(module)]
    blocks = [(name, module) for name, module in found if wanted is None or _block_name(module) == wanted]
    if not blocks:
        kinds = sorted({_block_name(module) for _, module in found})
        raise ValueError(f"no block of model {type(model).__name__} matches target_layer_name={target_layer_name!r}; "
                         f"its blocks: {kinds} (a block holds a drop-path slot: timm DropPath, torchvision "
                         f"StochasticDepth, an nn.Identity named drop_path...; or is registered: "
                         f"{supported_block_names()})")
    report = SurgeryReport(mode=STOCHASTIC_METHODS[stochastic_method])
    kept = []
    for name, module in blocks:
        found = _examine(name, module)
        reason = _adapter_for(module)[1](module) if found is None else _skip_reason(found)
        if reason is None:
            kept.append((found, name, module))
        else:
            report.skipped.append((name, _block_name(module), reason))
    # The schedule runs over the blocks that get stochastic depth, in order.
    for (found, name, module), rate in zip(kept, drop_path_rates(len(kept), drop_rate, drop_distribution, convention)):
        settings = Settings(rate, STOCHASTIC_METHODS[stochastic_method], scale_by_keep, seed_scope)
        if found is None:
            how = _adapter_for(module)[0](module, settings)
            report.levels.append((name, "", 0))
        else:
            how = _install(found, settings)
            report.levels += [(name, tail.slot, tail.level) for tail in found.tails] or \
                [(name, slot, 3) for slot in sorted(found.slots)]
        report.changed.append((name, _block_name(module), rate, how))
    return report


def _is_block(module: nn.Module) -> bool:
    return _adapter_for(module) is not None or _without_slot(module) or bool(_slots(module)) \
        or _is_rewritten(module) or _calls_drop_function(module)


def _calls_drop_function(module: nn.Module) -> bool:
    """Whether the forward of ``module`` names a registered drop function (the trace tells if it calls it)."""
    names = getattr(getattr(type(module).forward, "__code__", None), "co_names", ())
    return any(getattr(fn, "__name__", None) in names for fn in drop_functions())


def _is_rewritten(module: nn.Module) -> bool:
    return "_stochdepth_slots" in vars(module)


def _slots(module: nn.Module) -> set[str]:
    """The attributes of ``module`` that hold a drop slot (see the module's docstring)."""
    modules = {name for name, child in module.named_children()
               if is_drop_module(child) or (type(child) is nn.Identity and DROP_SLOT_NAME.search(name))}
    empty = {name for name, value in vars(module).items() if value is None and DROP_SLOT_NAME.search(name)}
    return modules | empty


def _without_slot(module: nn.Module) -> bool:
    return isinstance(module, tuple(_WITHOUT_SLOT)) and not _slots(module)


def _examine(name: str, module: nn.Module) -> _Block | None:
    """The block as the generic rewrite sees it (None for a block of a registered adapter): its
    slots, and its tails traced with an ``nn.Identity`` in each empty slot."""
    if _adapter_for(module) is not None:
        return None
    if _is_rewritten(module):  # an earlier surgery's: rewritten again from its own class
        slots, added = module._stochdepth_slots
        block = _Block(name, module, module._stochdepth_original, set(slots), added)
    else:
        added = ADDED_SLOT if _without_slot(module) else None
        block = _Block(name, module, type(module), _slots(module) | ({added} if added else set()), added)
    empty = {slot for slot in block.slots if getattr(module, slot, None) is None}
    for slot in empty:
        setattr(module, slot, nn.Identity())
    try:
        block.tails = trace_tails(module, block.original, block.slots, block.added)
    except Untraceable as error:
        block.untraceable = str(error)
    finally:
        for slot in empty:
            delattr(module, slot)
            if slot != block.added:
                object.__setattr__(module, slot, None)
    return block


def _skip_reason(block: _Block) -> str | None:
    """Why the block gets no stochastic depth, or None."""
    if block.untraceable:
        unfilled = block.added is not None
        return f"{block.untraceable}; no slot to put the unary drop in" if unfilled else None
    if not block.tails:
        return "no residual connection: its forward calls none of its drop slots"
    return None


def _install(block: _Block, settings: Settings) -> str:
    """Puts the drop modules in the block's slots and, where a tail is fused, gives it the rewritten
    forward; returns how, residual by residual."""
    module = block.module
    by_slot: dict[str, list[Tail]] = {}
    for tail in block.tails:
        by_slot.setdefault(tail.slot, []).append(tail)
    for slot in block.slots if block.untraceable else ():
        by_slot[slot] = [Tail(slot, 3, reason=block.untraceable)]
    for slot, tails in by_slot.items():
        fused = any(tail.level < 3 for tail in tails)
        relu = fused and all(tail.relu for tail in tails if tail.level < 3)
        drop = _drop_module(settings, fused or slot.startswith("fn:"), relu)
        setattr(module, slot_attribute(slot), drop.train(module.training))
    if any(tail.level < 3 or tail.slot.startswith("fn:") for tail in block.tails):
        _rewrite_class(module, block.original, block.slots, block.added)
    return "; ".join(_describe(tail, module, settings) for tails in by_slot.values() for tail in tails)


def _drop_module(settings: Settings, rewritten: bool, relu: bool) -> nn.Module:
    """A slot's module: :class:`DropPathAdd` where the rewritten forward calls it (also for the unary
    form of Composer's eval scaling), else timm's drop-in :class:`DropPath`."""
    if rewritten or not settings.scale_by_keep:
        drop = DropPathAdd(settings.rate, activation="relu" if relu else None, mode=settings.mode,
                           scale_by_keep=settings.scale_by_keep)
    else:
        drop = DropPath(settings.rate, mode="batch" if settings.mode == "batch" else "row")
    drop.seed_scope = settings.seed_scope
    return drop


def _describe(tail: Tail, module: nn.Module, settings: Settings) -> str:
    drop = getattr(module, slot_attribute(tail.slot))
    if tail.level == 3:
        mode = "'batch'" if settings.mode == "batch" else "'row'"
        return f"{tail.slot}: level 3, unary drop(branch), mode={mode} ({tail.reason})"
    act = "relu(" if getattr(drop, "activation", None) == "relu" else "("
    text = f"{tail.slot}: level {tail.level}, fused {act}shortcut + drop(branch)), mode={settings.mode!r}"
    if tail.level == 2:
        return f"{text}, the branch always runs ({tail.reason})"
    return text + {"batch": " (a dropped batch skips the branch)",
                   "subset": " (dropped samples skip the branch)"}.get(settings.mode, "")


def supported_block_names() -> list[str]:
    return sorted({cls.__name__ for cls in (*_ADAPTERS, *_WITHOUT_SLOT)} | set(ALIASES))


def _block_name(module: nn.Module) -> str:
    return getattr(module, "_stochdepth_block_name", type(module).__name__)


def _adapter_for(module: nn.Module) -> tuple[Adapter, SkipRule] | None:
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


# A rewritten block's class: a subclass of its own whose methods are the regenerated forward and the
# cut-out branches. One class per distinct code; pickling and deepcopy rebuild it from the block's
# original class (the generated code has no importable name).
_REWRITTEN: dict[tuple[type, str], type] = {}
_RESTORING: dict[type, type] = {}


def _rewrite_class(module: nn.Module, original: type, slots: set[str], added: str | None) -> None:
    key, methods, _ = rewritten_code(module, original, slots, added)
    if (original, key) not in _REWRITTEN:
        name = f"{original.__name__}WithStochasticDepth"
        _REWRITTEN[original, key] = type(name, (original,), {
            **methods, "__module__": __name__, "__qualname__": name, "__reduce_ex__": _reduce_rewritten,
            "_stochdepth_block_name": original.__name__, "_stochdepth_original": original})
    module._stochdepth_slots = (tuple(sorted(slots)), added)
    module.__class__ = _REWRITTEN[original, key]


def _reduce_rewritten(self, protocol):
    return _restoring, (self._stochdepth_original,), dict(vars(self))


def _restoring(original: type) -> nn.Module:
    """A blank block that becomes the rewritten ``original`` when its state is set (pickle, deepcopy)."""
    if original not in _RESTORING:
        def __setstate__(self, state):
            original.__setstate__(self, state)
            slots, added = self._stochdepth_slots
            _rewrite_class(self, original, set(slots), added)

        _RESTORING[original] = type(f"{original.__name__}Restoring", (original,), {"__setstate__": __setstate__})
    blank = _RESTORING[original]
    return blank.__new__(blank)


def _register_known_types() -> None:
    """The drop modules of torchvision, timm and this package; torchvision's ResNet blocks (no slot)."""
    register_drop_module(DropPath)
    try:
        import torchvision
    except ImportError:  # pragma: no cover - torchvision is optional
        pass
    else:
        register_drop_module(torchvision.ops.StochasticDepth)
        for block_class in (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck):
            register_block(block_class)
    try:
        from timm.layers import DropPath as TimmDropPath
    except ImportError:  # pragma: no cover - timm is optional
        return
    register_drop_module(TimmDropPath)


_register_known_types()
