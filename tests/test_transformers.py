"""Surgery on Hugging Face transformers vision models that take ``drop_path_rate`` (DINOv2, ConvNeXt,
Swin, BEiT; small random configurations): built with rate 0 (``nn.Identity`` slots) and above 0
(each model's own ``...DropPath``), eval outputs bit-identical to the unmodified model, a finite
training step, the subset method where the branches are cut out, and Hugging Face's gradient
checkpointing drawing the same coins in its recompute."""
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # A test dependency (requirements-dev.txt); the GPU machine has no registry to install it from,
    # and a failed import would stop the GPU check's collection of the whole suite.
    transformers = pytest.importorskip("transformers")

from helpers import spy_on_drop_calls
from stochdepth_kernels.surgery import apply_drop_path

VIT_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
HIERARCHICAL = {"depths": [1, 1, 2, 1]}
# family: (config class, its arguments, model class, image size, level of every residual)
FAMILIES = {
    "dinov2": (transformers.Dinov2Config, {**VIT_SIZES, "image_size": 56, "patch_size": 14}, transformers.Dinov2Model,
               56, 1),
    "convnext": (transformers.ConvNextConfig, {**HIERARCHICAL, "hidden_sizes": [8, 16, 32, 64]},
                 transformers.ConvNextModel, 64, 1),
    "beit": (transformers.BeitConfig, {**VIT_SIZES, "image_size": 32, "patch_size": 8}, transformers.BeitModel, 32, 1),
    # SwinLayer pads and shifts windows under Python conditions on its input's size: torch.fx cannot
    # trace them, so its slots get the unary drop.
    "swin": (transformers.SwinConfig, {**HIERARCHICAL, "image_size": 64, "embed_dim": 8, "num_heads": [1, 1, 2, 2],
                                       "window_size": 2}, transformers.SwinModel, 64, 3),
}


def build(family: str, drop_path_rate: float):
    config_class, arguments, model_class, size, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**arguments, drop_path_rate=drop_path_rate)).eval()
    return model, torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))


def hidden_states(model, x) -> torch.Tensor:
    return model(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.1])
@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_keeps_eval_and_trains(family, drop_path_rate):
    model, x = build(family, drop_path_rate)
    with torch.no_grad():
        expected = hidden_states(model, x)
    report = apply_drop_path(model, 0.2)
    levels = {level for *_, level in report.levels}
    assert levels == {FAMILIES[family][-1]}, str(report)
    layers = sum(FAMILIES[family][1].get("depths", [FAMILIES[family][1].get("num_hidden_layers")]))
    assert len(report.changed) == layers and not report.skipped
    with torch.no_grad():
        assert torch.equal(hidden_states(model, x), expected)
    methods = ["sample", "subset", "block"] if levels == {1} else ["sample"]
    for method in methods:
        apply_drop_path(model, 0.5, stochastic_method=method)
        model.train()
        hidden_states(model, x).square().mean().backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()), method
        model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_recomputes_the_same_coins():
    """Hugging Face's checkpointing wraps the rewritten layer's forward too: its recompute draws the
    coins of the first run, so the gradients equal those of the same seed without checkpointing."""
    model, x = build("dinov2", 0.0)
    apply_drop_path(model, 0.5)
    model.train()
    attention_runs = []
    model.encoder.layer[0].attention.register_forward_hook(lambda *_: attention_runs.append(1))
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(3)
        hidden_states(model, x).square().mean().backward()
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
    assert len(attention_runs) == 3, "the checkpointed step runs the layer twice (forward, recompute)"
    assert len(gradients[0]) == len(gradients[1]) > 0
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain)


def test_layers_run_the_fused_tails(monkeypatch):
    """The model's own call of a layer (``layer(hidden_states, attention_mask, **kwargs)``) reaches the
    rewritten forward's fused tails, not the class's forward with unary drops."""
    model, x = build("dinov2", 0.1)
    apply_drop_path(model, 0.2)
    calls = spy_on_drop_calls(monkeypatch)
    model.train()
    hidden_states(model, x)
    assert calls == ["add_branch"] * 4
