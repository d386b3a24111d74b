"""apply_stochastic_depth on real torchvision and timm models (random weights, no downloads): the
report, eval outputs identical to the unmodified model, a training step with finite gradients
everywhere, the rate schedule, state_dict, deepcopy, pickle, and torch.compile of a block."""
import copy
import pickle

import pytest
import timm
import torch
import torchvision

from stochdepth_kernels import DropPath, DropPathAdd, drop_path_rates
from stochdepth_kernels.surgery import apply_stochastic_depth, register_block

# name: (constructor, input shape, block type, blocks changed, blocks skipped)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 64, 64), "BasicBlock", 8, 0),
    "resnet50": (lambda: torchvision.models.resnet50(), (2, 3, 64, 64), "Bottleneck", 16, 0),
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64), (2, 3, 64, 64), "Block",
                             12, 0),
    "swin_tiny_patch4_window7_224": (lambda: timm.create_model("swin_tiny_patch4_window7_224"), (1, 3, 224, 224),
                                     "SwinTransformerBlock", 12, 0),
    "convnext_atto": (lambda: timm.create_model("convnext_atto"), (2, 3, 64, 64), "ConvNeXtBlock", 12, 0),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), (2, 3, 64, 64), None, 9, 7),
    "timm_resnet26": (lambda: timm.create_model("resnet26"), (2, 3, 64, 64), "Bottleneck", 8, 0),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


@pytest.fixture(params=list(MODELS))
def model_case(request):
    name = request.param
    model = build(name)
    x = torch.randn(MODELS[name][1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference_output = model(x)
    report = apply_stochastic_depth(model, drop_rate=0.3)
    return name, model, x, reference_output, report


def test_report_rates_and_eval_identity(model_case):
    name, model, x, reference_output, report = model_case
    _, _, block_type, changed, skipped = MODELS[name]
    assert len(report.changed) == changed and len(report.skipped) == skipped, str(report)
    if block_type:
        assert {kind for _, kind, _, _ in report.changed} == {block_type}
    assert report.rates() == pytest.approx(drop_path_rates(changed, 0.3, convention="paper"))
    modules = dict(model.named_modules())
    for block_name, _, rate, _ in report.changed:
        probabilities = {m.drop_prob for m in modules[block_name].modules() if isinstance(m, (DropPath, DropPathAdd))}
        assert probabilities == {rate}
    assert all(why == "no residual connection (stride or channel change)" for _, _, why in report.skipped)
    with torch.no_grad():
        assert torch.equal(model(x), reference_output)


def test_training_step_gives_every_parameter_a_finite_gradient(model_case):
    _, model, x, _, _ = model_case
    model.train()
    model(x).float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def test_state_dict_deepcopy_and_pickle(model_case):
    name, model, x, reference_output, _ = model_case
    unmodified = build(name, seed=1)
    assert model.state_dict().keys() == unmodified.state_dict().keys()
    unmodified.load_state_dict(model.state_dict())  # weights move either way: same keys and shapes
    with torch.no_grad():
        assert torch.equal(unmodified(x), reference_output)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone(x), reference_output)


def assert_compiled_last_block_matches_eager(model, x, report, seeds):
    """``torch.compile(fullgraph=True)`` of the last block changed gives eager's output for each of
    ``seeds``, on the input the block sees inside ``model``."""
    block = dict(model.named_modules())[report.changed[-1][0]]
    inputs = {}
    block.register_forward_pre_hook(lambda module, args: inputs.setdefault("args", args))
    model.eval()
    with torch.no_grad():
        model(x)
    block.train()
    compiled = torch.compile(block, fullgraph=True)
    for seed in seeds:
        torch.manual_seed(seed)
        out = compiled(*inputs["args"])
        torch.manual_seed(seed)
        # Inductor reorders the convolutions' and norms' arithmetic: equal up to float32 rounding.
        assert torch.allclose(out, block(*inputs["args"]), atol=1e-3, rtol=1e-3)


def test_compiled_block_matches_eager(model_case):
    _, model, x, _, report = model_case
    assert_compiled_last_block_matches_eager(model, x, report, seeds=[2])


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_compiled_block_method_matches_eager(name):
    """Compiled, a block-wise block runs its branch and the fused op drops it (no graph break); on
    the CPU with eager's coin, so seeds 0-3 give both a dropped and a kept batch."""
    model = build(name)
    report = apply_stochastic_depth(model, stochastic_method="block", drop_rate=0.5, convention="timm",
                                    drop_distribution="uniform")
    assert_compiled_last_block_matches_eager(model, torch.randn(MODELS[name][1]), report, seeds=range(4))


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_block_method_skips_branches_and_keeps_eval(name):
    model = build(name)
    x = torch.randn(MODELS[name][1])
    with torch.no_grad():
        expected = model(x)
    report = apply_stochastic_depth(model, stochastic_method="block", drop_rate=0.5)
    assert all("mode='batch'" in how and "skips the branch" in how for *_, how in report.changed)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    model.train()
    for _ in range(3):
        model(x).float().square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad(set_to_none=True)


def test_composer_target_layer_name_and_timm_convention():
    model = build("resnet50")
    report = apply_stochastic_depth(model, target_layer_name="ResNetBottleneck", drop_rate=0.2,
                                    drop_distribution="linear", convention="timm")
    assert report.rates() == drop_path_rates(16, 0.2)
    assert report.rates()[0] == 0.0  # timm's first block: rate 0, still rewritten


class _MyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.drop = torch.nn.Identity()

    def forward(self, x):
        return x + self.drop(self.linear(x))


def test_registered_block_types_join():
    def adapter(block, settings):
        block.drop = DropPath(settings.rate, mode=settings.mode)
        return "DropPath on drop"

    register_block(_MyBlock, adapter)
    model = torch.nn.Sequential(_MyBlock(), _MyBlock())
    report = apply_stochastic_depth(model, "_MyBlock", drop_rate=0.4)
    assert report.changed == [("0", "_MyBlock", 0.2, "DropPath on drop"), ("1", "_MyBlock", 0.4, "DropPath on drop")]
    assert "_MyBlock" in str(report)
