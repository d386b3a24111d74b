"""Model surgery: stochastic depth on the residual blocks of torchvision and timm models.

``apply_stochastic_depth`` is Composer's function (its keywords, defaults and semantics: block-wise,
no training-time scaling, eval x (1 - p)); ``apply_drop_path`` gives timm's ``drop_path_rate``
(sample-wise, kept samples x 1/(1 - p), eval bit-identical to the unmodified model). Each matching
block is changed in place: its class becomes a subclass whose forward ends in the fused
``act(shortcut + drop(branch))`` (:class:`DropPathAdd`), its weights, parameter objects, names and
state-dict keys stay as they were.
With ``stochastic_method="block"`` a dropped batch skips the branch's compute, with ``"subset"``
(DINOv2's method) the branch runs on the kept samples only; shortcuts always run (the paper drops
only the branch).

Supported: torchvision ResNet ``BasicBlock`` / ``Bottleneck`` (ReLU fused); timm ViT ``Block`` and
``SwinTransformerBlock`` (both residuals, one coin each), ``ConvNeXtBlock``, ResNet ``BasicBlock`` /
``Bottleneck`` (ReLU fused where the block's last activation is one), EfficientNet / MobileNet
``InvertedResidual`` and ``DepthwiseSeparableConv`` (those without a skip connection are reported as
skipped). timm's ``DropPath`` or ``nn.Identity`` on the residual (also where timm built the block
with rate 0) becomes the fused add. Other block types join through :func:`register_block`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from stochdepth_kernels import validation
from stochdepth_kernels.modules import DropPathAdd
from stochdepth_kernels.schedules import CONVENTIONS, DISTRIBUTIONS, drop_path_rates
from stochdepth_kernels.subset import effective_drop_rate

__all__ = ["SurgeryReport", "apply_drop_path", "apply_stochastic_depth", "register_block"]

STOCHASTIC_METHODS = {"sample": "row", "block": "batch", "subset": "subset"}
# Composer's target_layer_name for torchvision's Bottleneck.
ALIASES = {"ResNetBottleneck": "Bottleneck"}


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


@dataclass
class SurgeryReport:
    """Which modules changed (name, block type, drop rate, how) and which matched but were skipped;
    ``mode``: the modules' (``"row"``, ``"batch"`` or ``"subset"``)."""
    changed: list[tuple[str, str, float, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
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


def register_block(cls: type, adapter: Adapter, skip_rule: SkipRule | None = None) -> None:
    """Makes ``apply_stochastic_depth`` handle blocks of type ``cls`` with ``adapter(block, settings)``;
    ``skip_rule(block)``, if given, names why a block must be left alone (None: adapt it)."""
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {type(cls).__name__}")
    if not callable(adapter):
        raise TypeError(f"adapter must be callable, got {type(adapter).__name__}")
    if not (skip_rule is None or callable(skip_rule)):
        raise TypeError(f"skip_rule must be callable or None, got {type(skip_rule).__name__}")
    _ADAPTERS[cls] = (adapter, skip_rule or (lambda block: None))


def supported_block_names() -> list[str]:
    return sorted({cls.__name__ for cls in _ADAPTERS} | set(ALIASES))


def apply_stochastic_depth(model: nn.Module, target_layer_name: str | None = None, stochastic_method: str = "block",
                           drop_rate: float = 0.2, drop_distribution: str = "linear", use_same_gpu_seed: bool = True,
                           optimizers=None, *, convention: str = "paper", scale_by_keep: bool = False) -> SurgeryReport:
    """Composer's ``apply_stochastic_depth``: its keywords, defaults and semantics. Every block of
    ``model`` of type ``target_layer_name`` (a class name, or Composer's ``"ResNetBottleneck"``;
    None: every supported block type) gets stochastic depth: ``"block"`` drops whole blocks for the
    batch (a dropped block skips its branch's compute), ``"sample"`` drops samples, ``"subset"``
    runs each branch on a fixed number of kept samples only (not in Composer); no training-time
    scaling, eval outputs ``shortcut + (1 - p) * branch`` (``scale_by_keep=False``); rates
    ``(l + 1) / L * drop_rate`` (``drop_distribution="linear"``; ``convention="timm"``: linspace
    from 0). ``use_same_gpu_seed`` (block method): True drops the same blocks on every rank whose
    generator is seeded alike, False lets ranks differ; no effect with ``"sample"``, as in Composer.
    ``optimizers`` (one or a sequence): surgery keeps every ``Parameter`` object, so an optimizer
    built before it trains the changed model; checked. For timm's defaults see
    :func:`apply_drop_path`."""
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
    skipping dropped branches), kept samples scaled by ``1/(1 - p)`` (``scale_by_keep``) so eval
    outputs are bit-identical to the model before surgery, rates linspace(0, drop_path_rate) over the
    changed blocks (``convention="paper"``: ``(l + 1) / L * rate``). Blocks as in
    :func:`apply_stochastic_depth`."""
    return _apply(model, target_layer_name, stochastic_method, drop_path_rate, drop_distribution, convention,
                  scale_by_keep, None, rate_name="drop_path_rate")


def _check_optimizers(optimizers) -> None:
    """None, an optimizer, or a list or tuple of them."""
    group = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers
    if group is not None and not (isinstance(group, (list, tuple))
                                  and all(isinstance(o, torch.optim.Optimizer) for o in group)):
        raise TypeError(f"optimizers must be a torch.optim.Optimizer, a sequence of them or None, got {optimizers!r}")


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
    blocks = [(name, module) for name, module in model.named_modules()
              if _adapter_for(module) is not None and (wanted is None or _block_name(module) == wanted)]
    if not blocks:
        raise ValueError(f"no block of model {type(model).__name__} matches target_layer_name={target_layer_name!r}; "
                         f"supported: {supported_block_names()}")
    report = SurgeryReport(mode=STOCHASTIC_METHODS[stochastic_method])
    for name, block in blocks:
        reason = _adapter_for(block)[1](block)
        if reason is not None:
            report.skipped.append((name, _block_name(block), reason))
    skipped = {name for name, _, _ in report.skipped}
    kept = [(name, block) for name, block in blocks if name not in skipped]
    # The schedule runs over the blocks that get stochastic depth, in order.
    for (name, block), rate in zip(kept, drop_path_rates(len(kept), drop_rate, drop_distribution, convention)):
        settings = Settings(rate, STOCHASTIC_METHODS[stochastic_method], scale_by_keep, seed_scope)
        report.changed.append((name, _block_name(block), rate, _adapter_for(block)[0](block, settings)))
    return report


def _block_name(module: nn.Module) -> str:
    return getattr(module, "_stochdepth_block_name", type(module).__name__)


def _adapter_for(module: nn.Module) -> tuple[Adapter, SkipRule] | None:
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


# Each supported block's class becomes a subclass whose forward ends in the fused add: the block's
# own code up to the add (a mirror of torchvision's / timm's forward), then
# drop.add_branch(branch, shortcut, branch parameters). The subclasses are made at import, one per
# block class, so that pickles find them by name.

def _parameters(block: nn.Module, *names: str, excluding: str | None = None) -> Callable[[], list[nn.Parameter]]:
    """The parameters of ``block``'s submodules ``names`` (all but ``excluding`` when none are given)."""
    if names:
        return lambda: [p for name in names if getattr(block, name, None) is not None
                        for p in getattr(block, name).parameters()]
    return lambda: [p for name, p in block.named_parameters() if excluding is None or not name.startswith(excluding)]


def resnet_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of a torchvision ``BasicBlock`` or ``Bottleneck``: its forward up to the add."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(block.relu(out)))
    return out


class _TorchvisionResNetTail:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.stochastic_depth.add_branch(lambda x: resnet_branch(self, x), identity,
                                                _parameters(self, excluding="downsample."), (x,))


class _TimmResNetTail:
    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv3"):  # Bottleneck
            x = self.act1(self.bn1(self.conv1(x)))
            x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
            x = self.bn3(self.conv3(x))
        else:  # BasicBlock
            x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
            x = self.bn2(self.conv2(x))
        return x if self.se is None else self.se(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.drop_path.add_branch(self._branch, shortcut, _parameters(self, excluding="downsample."), (x,))
        last_act = self.act3 if hasattr(self, "conv3") else self.act2
        return out if self.drop_path.activation == "relu" else last_act(out)


def _per_sample(batch: int, kwargs: dict) -> tuple[dict, dict]:
    """``kwargs`` split into the per-sample tensors (a 4-d attention mask of one mask per sample,
    ``(B, heads or 1, N, N)``, which the subset method indexes with the kept rows) and the rest."""
    per_sample = {name: value for name, value in kwargs.items()
                  if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] == batch and batch > 1}
    return per_sample, {name: value for name, value in kwargs.items() if name not in per_sample}


class _VitBlockTail:
    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        per_sample, shared = _per_sample(x.shape[0], attn_kwargs)
        names = tuple(per_sample)

        def attention(x: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
            return self.ls1(self.attn(self.norm1(x), **shared, **dict(zip(names, masks))))

        x = self.drop_path1.add_branch(attention, x, _parameters(self, "norm1", "attn", "ls1"),
                                       (x, *per_sample.values()))
        return self.drop_path2.add_branch(lambda x: self.ls2(self.mlp(self.norm2(x))), x,
                                          _parameters(self, "norm2", "mlp", "ls2"), (x,))


class _SwinBlockTail:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        x = self.drop_path1.add_branch(lambda x: self._attn(self.norm1(x)), x, _parameters(self, "norm1", "attn"), (x,))
        x = x.reshape(batch, -1, channels)
        x = self.drop_path2.add_branch(lambda x: self.mlp(self.norm2(x)), x, _parameters(self, "norm2", "mlp"), (x,))
        return x.reshape(batch, height, width, channels)


class _ConvNeXtBlockTail:
    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x if self.gamma is None else x.mul(self.gamma.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path.add_branch(self._branch, self.shortcut(x), _parameters(self, excluding="shortcut."), (x,))


class _InvertedResidualTail:
    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_s2d is not None:
            x = self.bn_s2d(self.conv_s2d(x))
        if hasattr(self, "conv_pwl"):  # InvertedResidual
            x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
            return self.bn3(self.conv_pwl(self.se(self.aa(x))))
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))  # DepthwiseSeparableConv
        return self.bn2(self.conv_pw(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path.add_branch(self._branch, x, _parameters(self), (x,))


_FUSED_CLASSES: dict[type, type] = {}


def _fuse(cls: type, tail: type, prefix: str) -> None:
    """Makes ``{prefix}{cls.__name__}WithStochasticDepth``, ``cls`` with ``tail``'s forward."""
    name = f"{prefix}{cls.__name__}WithStochasticDepth"
    fused = type(name, (tail, cls), {"_stochdepth_block_name": cls.__name__, "__module__": __name__,
                                     "__qualname__": name})
    globals()[name] = fused
    _FUSED_CLASSES[cls] = fused


def _fusing_adapter(*attributes: str, relu: Callable[[nn.Module], bool] = lambda block: False) -> Adapter:
    """Sets each of ``attributes`` to a :class:`DropPathAdd` (ReLU fused where ``relu(block)``) and
    gives the block its fused class."""

    def adapt(block: nn.Module, settings: Settings) -> str:
        activation = "relu" if relu(block) else None
        for attribute in attributes:
            drop = DropPathAdd(settings.rate, activation=activation, mode=settings.mode,
                               scale_by_keep=settings.scale_by_keep)
            drop.seed_scope = settings.seed_scope
            setattr(block, attribute, drop.train(block.training))
        block.__class__ = _FUSED_CLASSES[next(c for c in type(block).__mro__ if c in _FUSED_CLASSES)]
        act = "relu(" if activation else "("
        skipping = {"batch": " (a dropped batch skips the branch)",
                    "subset": " (dropped samples skip the branch)"}.get(settings.mode, "")
        return f"fused {act}shortcut + drop(branch)) on {', '.join(attributes)}, mode={settings.mode!r}{skipping}"

    return adapt


def _without_skip(block: nn.Module) -> str | None:
    """timm's inverted residuals add the input only when stride and channels allow (``has_skip``)."""
    return None if block.has_skip else "no residual connection (stride or channel change)"


def _register_known_blocks() -> None:
    try:
        from torchvision.models import resnet as torchvision_resnet
    except ImportError:  # pragma: no cover - torchvision is optional
        pass
    else:
        for block_class in (torchvision_resnet.BasicBlock, torchvision_resnet.Bottleneck):
            _fuse(block_class, _TorchvisionResNetTail, "Torchvision")
            register_block(block_class, _fusing_adapter("stochastic_depth", relu=lambda block: True))
    try:
        from timm.models import _efficientnet_blocks, convnext, resnet, swin_transformer, vision_transformer
    except ImportError:  # pragma: no cover - timm is optional
        return
    timm_blocks = [
        (vision_transformer.Block, _VitBlockTail, ("drop_path1", "drop_path2"), None),
        (swin_transformer.SwinTransformerBlock, _SwinBlockTail, ("drop_path1", "drop_path2"), None),
        (convnext.ConvNeXtBlock, _ConvNeXtBlockTail, ("drop_path",), None),
        (_efficientnet_blocks.InvertedResidual, _InvertedResidualTail, ("drop_path",), _without_skip),
        (_efficientnet_blocks.DepthwiseSeparableConv, _InvertedResidualTail, ("drop_path",), _without_skip),
    ]
    for block_class, tail, attributes, skip_rule in timm_blocks:
        _fuse(block_class, tail, "Timm")
        register_block(block_class, _fusing_adapter(*attributes), skip_rule)
    for block_class, last_act in ((resnet.BasicBlock, "act2"), (resnet.Bottleneck, "act3")):
        _fuse(block_class, _TimmResNetTail, "Timm")
        register_block(block_class, _fusing_adapter(
            "drop_path", relu=lambda block, last_act=last_act: isinstance(getattr(block, last_act), nn.ReLU)), None)


_register_known_blocks()
