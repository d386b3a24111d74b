"""Surgery on one small model of every timm model module that builds drop-path slots (the list
computed from the installed timm), and on torchvision's families with stochastic depth: accepted at
least at the unary level, eval outputs bit-identical to the unmodified model, a training step with
finite gradients, and the subset and block methods training wherever a branch is cut out; one block
of each rewritten class compiled with ``fullgraph=True``, with no recompile from step to step. Prints
the table of levels (``pytest -s``); ``docs/modules.md``'s table is checked against it."""
import importlib
import inspect
import pkgutil
import re
import warnings
from pathlib import Path

import pytest
import timm
import timm.models
import torch
import torchvision
from torch.utils._pytree import tree_leaves

from stochdepth_kernels.surgery import apply_drop_path, apply_stochastic_depth

# module: (model, create_model kwargs, image size). Small members; depth and image size cut where the
# smallest member is large. A module missing here is still tested, with a member picked by name.
TIMM_ZOO = {
    "beit": ("beit_base_patch16_224", {"depth": 2, "img_size": 64}, 64),
    "byobnet": ("test_byobnet", {}, 64),
    "cait": ("cait_xxs24_224", {"depth": 2, "img_size": 64}, 64),
    "coat": ("coat_tiny", {}, 224),
    "convit": ("convit_tiny", {"depth": 2, "img_size": 64}, 64),
    "convnext": ("test_convnext", {}, 64),
    "cpubone": ("cpubone_nano", {}, 64),
    "crossvit": ("crossvit_tiny_240", {}, 240),
    "csatv2": ("csatv2", {}, 64),
    "cspnet": ("darknet17", {}, 64),
    "cspnext": ("cspnext_tiny", {}, 64),
    "davit": ("davit_tiny", {}, 64),
    "deepseek_vit": ("deepseek_vit_412m", {"depth": 2, "img_size": 56}, 56),
    "edgenext": ("edgenext_small", {}, 64),
    "efficientformer": ("efficientformer_l1", {}, 224),
    "efficientformer_v2": ("efficientformerv2_s0", {}, 224),
    "efficientnet": ("efficientnet_b0", {}, 64),
    "efficientvim": ("efficientvim_m1", {}, 64),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 56}, 56),
    "fasternet": ("fasternet_t0", {}, 64),
    "fastvit": ("fastvit_s12", {}, 64),
    "focalnet": ("focalnet_tiny_lrf", {}, 64),
    "gcvit": ("gcvit_tiny", {"img_size": 64}, 64),
    "gemma4_vit": ("gemma4_vit_167m", {"depth": 2, "img_size": 64}, 64),
    "hgnet": ("hgnet_tiny", {}, 64),
    "hiera": ("hiera_tiny_224", {}, 224),
    "hieradet_sam2": ("sam2_hiera_tiny", {}, 128),
    "iformer": ("iformer_s", {}, 64),
    "inception_next": ("inception_next_atto", {}, 64),
    "levit": ("levit_128s", {}, 224),
    "lowformer": ("lowformer_b0", {}, 64),
    "mambaout": ("test_mambaout", {}, 64),
    "maxxvit": ("test_maxvit", {}, 160),
    "metaformer": ("caformer_s18", {}, 64),
    "mlp_mixer": ("gmlp_s16_224", {"img_size": 64}, 64),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 64),
    "mobilenetv5": ("mobilenetv5_base", {}, 64),
    "mobilevit": ("mobilevit_xxs", {}, 64),
    "mvitv2": ("mvitv2_tiny", {}, 224),
    "naflexvit": ("naflexvit_base_patch16_siglip", {"depth": 2, "img_size": 64}, 64),
    "nest": ("nest_tiny", {}, 224),
    "nextvit": ("nextvit_small", {}, 64),
    "nfnet": ("test_nfnet", {}, 64),
    "pit": ("pit_xs_224", {}, 224),
    "pvt_v2": ("pvt_v2_b0", {}, 64),
    "qwen3_vit": ("qwen3_vit_416m", {"depth": 2, "img_size": 64}, 64),
    "rdnet": ("rdnet_tiny", {}, 64),
    "regnet": ("regnety_002", {"drop_path_rate": 0.0}, 64),
    "resnet": ("test_resnet", {}, 64),
    "resnetv2": ("resnetv2_18", {}, 64),
    "rexnet": ("rexnet_100", {}, 64),
    "sequencer": ("sequencer2d_s", {}, 64),
    "starnet": ("starnet_s050", {}, 64),
    "swiftformer": ("swiftformer_xs", {}, 64),
    "swin_transformer": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", {"img_size": 64, "window_size": 2}, 64),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", {"img_size": 64, "window_size": 2}, 64),
    "tiny_vit": ("tiny_vit_5m_224", {}, 224),
    "tnt": ("tnt_s_patch16_224", {"depth": 2}, 224),
    "tresnet": ("tresnet_m", {}, 64),
    "twins": ("twins_svt_small", {}, 64),
    "visformer": ("visformer_tiny", {}, 224),
    "vision_transformer": ("test_vit", {}, 64),
    "vision_transformer_relpos": ("test_vit_relpos", {}, 160),
    "vision_transformer_sam": ("samvit_base_patch16", {"depth": 2, "img_size": 64}, 64),
    "vitamin": ("vitamin_small_224", {"img_size": 64}, 64),
    "volo": ("volo_d1_224", {"img_size": 64}, 64),
    "vovnet": ("ese_vovnet19b_dw", {}, 64),
    "xception_aligned": ("xception41", {}, 64),
    "xcit": ("xcit_nano_12_p8_224", {"depth": 2, "img_size": 64}, 64),
}
_SIZE_WORDS = ["test", "atto", "femto", "pico", "nano", "xxs", "tiny", "xs", "mini", "small", "base"]


def drop_path_modules() -> list[str]:
    """The timm model modules whose models build drop-path slots: their source builds ``DropPath`` or
    takes ``drop_path_rate``, and they register models."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecated alias modules warn on import
        for info in pkgutil.iter_modules(timm.models.__path__):
            if info.name.startswith("_"):
                continue
            source = inspect.getsource(importlib.import_module(f"timm.models.{info.name}"))
            if (re.search(r"\bDropPath\(", source) or "drop_path_rate" in source) and timm.list_models(module=info.name):
                found.append(info.name)
    return found


def zoo_member(module: str) -> tuple[str, dict, int]:
    if module in TIMM_ZOO:
        return TIMM_ZOO[module]
    rank = lambda name: next((i for i, w in enumerate(_SIZE_WORDS) if w in name), len(_SIZE_WORDS))  # noqa: E731
    return min(timm.list_models(module=module), key=lambda name: (rank(name), len(name))), {}, 224


TORCHVISION_ZOO = {
    "resnet18": (torchvision.models.resnet18, 64),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, 64),
    "efficientnet_v2_s": (torchvision.models.efficientnet_v2_s, 64),
    "convnext_tiny": (torchvision.models.convnext_tiny, 64),
    "swin_t": (torchvision.models.swin_t, 64),
    "swin_v2_t": (torchvision.models.swin_v2_t, 64),
    "maxvit_t": (torchvision.models.maxvit_t, 224),
}
LEVELS: dict[str, tuple[int, int, int, int]] = {}  # model: (blocks, level 1, level 2, level 3 residuals)
DOCS_MODULES = Path(__file__).resolve().parent.parent / "docs" / "modules.md"
DOCS_TABLE_ROW = re.compile(r"^\| (timm|torchvision) \| (\w+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", re.MULTILINE)


def build(family: str, name: str):
    torch.manual_seed(0)
    if family == "timm":
        model_name, kwargs, size = zoo_member(name)
        model = timm.create_model(model_name, **kwargs)
    else:
        constructor, size = TORCHVISION_ZOO[name]
        model = constructor()
    return model.eval(), torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


def train_step(model, x) -> list[str]:
    """One forward and backward in training; the parameters whose gradient is not finite."""
    model.train()
    out = model(x)
    (out[0] if isinstance(out, (tuple, list)) else out).float().square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    model.zero_grad(set_to_none=True)
    model.eval()
    return bad


CASES = [("timm", name) for name in drop_path_modules()] + [("torchvision", name) for name in TORCHVISION_ZOO]


@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_surgery_on_the_zoo(family, name):
    model, x = build(family, name)
    with torch.no_grad():
        expected = model(x)
    report = apply_drop_path(model, 0.2)
    levels = [level for *_, level in report.levels]
    LEVELS[f"{family} {name}"] = (len(report.changed), levels.count(1), levels.count(2), levels.count(3))
    assert report.changed, str(report)
    with torch.no_grad():
        assert torch.equal(model(x), expected), "eval output changed by surgery"
    assert not train_step(model, x)
    if 1 in levels:
        for method in ("subset", "block"):
            again = apply_drop_path(model, 0.5, stochastic_method=method)
            assert any("skip the branch" in how or "skips the branch" in how for *_, how in again.changed)
            assert not train_step(model, x), method
    if family == "timm":
        kinds = {kind for _, kind, _, _ in report.changed}
        assert apply_stochastic_depth(model, target_layer_name=sorted(kinds)[0]).changed  # Composer's class names


def test_zoo_targets_and_level_table():
    """Run after the zoo: every timm module accepted, at least 85 % of them fused (a level-1 or 2
    residual); the table printed."""
    timm_rows = {name: row for name, row in LEVELS.items() if name.startswith("timm")}
    if len(timm_rows) < len(drop_path_modules()):
        pytest.skip("the zoo test did not run in this session")
    fused = [name for name, (_, one, two, _) in timm_rows.items() if one + two > 0]
    print(f"\n{'model':40s} blocks  L1  L2  L3")
    for name, (blocks, one, two, three) in sorted(LEVELS.items()):
        print(f"{name:40s} {blocks:6d} {one:3d} {two:3d} {three:3d}")
    print(f"timm: {len(timm_rows)} modules accepted, {len(fused)} fused ({len(fused) / len(timm_rows):.0%})")
    assert len(fused) >= 0.85 * len(timm_rows)
    documented = {f"{library} {name}": tuple(int(n) for n in counts)
                  for library, name, *counts in DOCS_TABLE_ROW.findall(DOCS_MODULES.read_text())}
    assert documented == LEVELS, "docs/modules.md's coverage table differs from this run: rewrite it from the table above"


def first_block_of_each_class(model, x) -> dict[type, tuple]:
    """One rewritten block of each class in ``model``: (block, its positional and keyword inputs in
    the model's forward on ``x``)."""
    blocks = {}
    for module in model.modules():
        if "_stochdepth_slots" in vars(module):
            blocks.setdefault(type(module), module)
    inputs = {}
    hooks = [block.register_forward_pre_hook(
        lambda block, args, kwargs: inputs.setdefault(block, (args, kwargs)) and None, with_kwargs=True)
        for block in blocks.values()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return {cls: (block, *inputs[block]) for cls, block in blocks.items() if block in inputs}


def float_sum(output) -> torch.Tensor:
    return sum(t.float().sum() for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point())


# Blocks whose own forward Dynamo cannot hold in one graph, whatever the surgery: Sequencer's LSTM.
COMPILE_UNSUPPORTED = {"timm sequencer": "Dynamo does not trace nn.LSTM (graph break gb0014)"}


@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_rewritten_blocks_compile_in_one_graph(family, name):
    """Each rewritten block class, in training with the method its levels allow (subset where a
    branch is cut out), under ``torch.compile(fullgraph=True)``: no graph break, no recompile in
    three steps of fresh coins, and eager's output for each seed. Dynamo only (the ``eager``
    backend): the ops' AOT-autograd and inductor paths are tested once in test_compile_recompute."""
    if f"{family} {name}" in COMPILE_UNSUPPORTED:
        pytest.skip(COMPILE_UNSUPPORTED[f"{family} {name}"])
    model, x = build(family, name)
    report = apply_drop_path(model, 0.2)
    method = "subset" if any(level == 1 for *_, level in report.levels) else "sample"
    apply_drop_path(model, 0.2, stochastic_method=method)
    for cls, (block, args, kwargs) in first_block_of_each_class(model, x).items():
        torch._dynamo.reset()
        block.train()
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        for seed in range(3):
            torch.manual_seed(seed)
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                out = compiled(*args, **kwargs)
            float_sum(out).backward()
            torch.manual_seed(seed)
            for got, want in zip(tree_leaves(out), tree_leaves(block(*args, **kwargs))):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{cls.__name__}: {m}")
