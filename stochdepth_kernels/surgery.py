"""Model surgery: stochastic depth on the residual blocks of torchvision and timm models.

``apply_stochastic_depth`` takes Composer's keywords. Each matching block is changed in place: its
weights, parameter names and state-dict keys stay as they were, and eval outputs are bit-identical
to the unmodified model (with ``scale_by_keep=True``, the default: eval adds the branch unscaled).

- torchvision ResNet ``BasicBlock`` / ``Bottleneck``: the block becomes a subclass whose forward ends
  in the fused ``relu(identity + drop(branch))`` (:class:`DropPathAdd`); with
  ``stochastic_method="block"`` a dropped batch skips the branch's compute. The downsample
  shortcut always runs (the paper drops only the branch).
- timm blocks (ViT ``Block``, Swin, ConvNeXt, ResNet, EfficientNet/MobileNet inverted residuals):
  their ``DropPath`` or ``nn.Identity`` on the residual (also where timm built the block with rate
  0) becomes this package's :class:`DropPath`; the add stays in timm's forward.

Other block types join through :func:`register_block`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from stochdepth_kernels import validation
from stochdepth_kernels.modules import DropPath, DropPathAdd
from stochdepth_kernels.schedules import CONVENTIONS, DISTRIBUTIONS, drop_path_rates

__all__ = ["SurgeryReport", "apply_stochastic_depth", "register_block"]

STOCHASTIC_METHODS = {"sample": "row", "block": "batch"}
# Composer's target_layer_name for torchvision's Bottleneck.
ALIASES = {"ResNetBottleneck": "Bottleneck"}


@dataclass
class Settings:
    """What an adapter applies to one block."""
    rate: float
    mode: str
    scale_by_keep: bool


# An adapter changes a block in place and returns how ("fused add", ...); a skip rule returns why a
# block of its type cannot get stochastic depth, or None.
Adapter = Callable[[nn.Module, Settings], str]
SkipRule = Callable[[nn.Module], "str | None"]
_ADAPTERS: dict[type, tuple[Adapter, SkipRule]] = {}


@dataclass
class SurgeryReport:
    """Which modules changed (name, block type, drop rate, how) and which matched but were skipped."""
    changed: list[tuple[str, str, float, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [rate for _, _, rate, _ in self.changed]

    def __str__(self) -> str:
        lines = [f"stochastic depth on {len(self.changed)} blocks, {len(self.skipped)} skipped"]
        lines += [f"  {name} ({kind}): p={rate:.4f}, {how}" for name, kind, rate, how in self.changed]
        lines += [f"  skipped {name} ({kind}): {why}" for name, kind, why in self.skipped]
        return "\n".join(lines)


def register_block(cls: type, adapter: Adapter, skip_rule: SkipRule | None = None) -> None:
    """Makes ``apply_stochastic_depth`` handle blocks of type ``cls`` with ``adapter(block, settings)``;
    ``skip_rule(block)``, if given, names why a block must be left alone (None: adapt it)."""
    _ADAPTERS[cls] = (adapter, skip_rule or (lambda block: None))


def supported_block_names() -> list[str]:
    return sorted({cls.__name__ for cls in _ADAPTERS} | set(ALIASES))


def apply_stochastic_depth(model: nn.Module, target_layer_name: str | None = None, stochastic_method: str = "sample",
                           drop_rate: float = 0.2, drop_distribution: str = "linear", *,
                           convention: str = "paper", scale_by_keep: bool = True) -> SurgeryReport:
    """Gives every block of ``model`` of type ``target_layer_name`` (a class name, or Composer's
    ``"ResNetBottleneck"``; None: every supported block type) stochastic depth. Blocks are numbered
    in ``model.named_modules()`` order and get rates from :func:`drop_path_rates`
    (``drop_distribution``, ``convention``: Composer's and the paper's ``(l + 1) / L * rate`` by
    default, ``"timm"`` for linspace from 0). ``stochastic_method="sample"``: one coin per sample;
    ``"block"``: one per batch, skipping the branch's compute where the block supports it."""
    validation.check_choice(stochastic_method, "stochastic_method", list(STOCHASTIC_METHODS))
    validation.check_choice(drop_distribution, "drop_distribution", DISTRIBUTIONS)
    validation.check_choice(convention, "convention", CONVENTIONS)
    validation.check_probability(drop_rate, "drop_rate")
    wanted = ALIASES.get(target_layer_name, target_layer_name)
    blocks = [(name, module) for name, module in model.named_modules()
              if _adapter_for(module) is not None and (wanted is None or _block_name(module) == wanted)]
    if not blocks:
        raise ValueError(f"no block of model {type(model).__name__} matches target_layer_name={target_layer_name!r}; "
                         f"supported: {supported_block_names()}")
    report = SurgeryReport()
    for name, block in blocks:
        reason = _adapter_for(block)[1](block)
        if reason is not None:
            report.skipped.append((name, _block_name(block), reason))
    skipped = {name for name, _, _ in report.skipped}
    kept = [(name, block) for name, block in blocks if name not in skipped]
    # The schedule runs over the blocks that get stochastic depth, in order.
    for (name, block), rate in zip(kept, drop_path_rates(len(kept), drop_rate, drop_distribution, convention)):
        how = _adapter_for(block)[0](block, Settings(rate, STOCHASTIC_METHODS[stochastic_method], scale_by_keep))
        report.changed.append((name, _block_name(block), rate, how))
    return report


def _block_name(module: nn.Module) -> str:
    return getattr(module, "_stochdepth_block_name", type(module).__name__)


def _adapter_for(module: nn.Module) -> tuple[Adapter, SkipRule] | None:
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


# torchvision ResNet: the block's class becomes a subclass whose forward fuses the tail.

def _torchvision_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(block.relu(out)))
    return out


class _FusedTail:
    """Forward of a torchvision ResNet block ending in ``stochastic_depth(branch, identity)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.stochastic_depth.add_branch(lambda: _torchvision_branch(self, x), identity,
                                                lambda: _branch_parameters(self))


def _branch_parameters(block: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in block.named_parameters() if not name.startswith("downsample.")]


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """``cls`` with the fused tail, one class per block class (importable by name: pickling works)."""
    if cls not in _FUSED_CLASSES:
        fused = type(f"{cls.__name__}WithStochasticDepth", (_FusedTail, cls), {"_stochdepth_block_name": cls.__name__,
                                                                                 "__module__": __name__})
        globals()[fused.__name__] = fused
        _FUSED_CLASSES[cls] = fused
    return _FUSED_CLASSES[cls]


def _adapt_torchvision_resnet_block(block: nn.Module, settings: Settings) -> str:
    block.stochastic_depth = DropPathAdd(settings.rate, activation="relu", mode=settings.mode,
                                         scale_by_keep=settings.scale_by_keep).train(block.training)
    if not isinstance(block, _FusedTail):
        block.__class__ = _fused_class(type(block))
    skipping = " (a dropped batch skips the branch)" if settings.mode == "batch" else ""
    return f"fused relu(identity + drop(branch)), mode={settings.mode!r}{skipping}"


# timm: the block's drop-path modules become this package's DropPath.

def _timm_adapter(*attributes: str) -> Adapter:
    def adapt(block: nn.Module, settings: Settings) -> str:
        for attribute in attributes:
            drop = DropPath(settings.rate, scale_by_keep=settings.scale_by_keep, mode=settings.mode)
            setattr(block, attribute, drop.train(block.training))
        return f"DropPath on {', '.join(attributes)} (unary kernel; timm's forward adds), mode={settings.mode!r}"

    return adapt


def _register_known_blocks() -> None:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is optional
        pass
    else:
        for block_class in (BasicBlock, Bottleneck):
            register_block(block_class, _adapt_torchvision_resnet_block)
            _fused_class(block_class)  # defined at import, so that unpickling finds it
    try:
        from timm.models import _efficientnet_blocks, convnext, resnet, swin_transformer, vision_transformer
    except ImportError:  # pragma: no cover - timm is optional
        return
    register_block(vision_transformer.Block, _timm_adapter("drop_path1", "drop_path2"))
    register_block(swin_transformer.SwinTransformerBlock, _timm_adapter("drop_path1", "drop_path2"))
    register_block(convnext.ConvNeXtBlock, _timm_adapter("drop_path"))
    register_block(resnet.BasicBlock, _timm_adapter("drop_path"))
    register_block(resnet.Bottleneck, _timm_adapter("drop_path"))
    for block_class in (_efficientnet_blocks.InvertedResidual, _efficientnet_blocks.DepthwiseSeparableConv):
        register_block(block_class, _timm_adapter("drop_path"), _without_skip)


def _without_skip(block: nn.Module) -> str | None:
    """timm's inverted residuals add the input only when stride and channels allow (``has_skip``)."""
    return None if block.has_skip else "no residual connection (stride or channel change)"


_register_known_blocks()
