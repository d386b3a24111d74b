"""apply_stochastic_depth on real torchvision and timm models (random weights, no downloads): the
report, eval outputs identical to the unmodified model, a training step with finite gradients
everywhere, the rate schedule, state_dict, deepcopy, pickle, and torch.compile of a block."""
import copy
import pickle

import pytest
import timm
import torch
import torchvision

from helpers import spy_on_drop_calls
import stochdepth_kernels
from stochdepth_kernels import DropPath, DropPathAdd, DropRateWarmup, drop_path_rates
from stochdepth_kernels.surgery import apply_drop_path, apply_stochastic_depth, register_block

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
    report = apply_drop_path(model, 0.3, convention="paper")
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
    assert all(why == "no residual connection: its forward calls none of its drop slots" for _, _, why in report.skipped)
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
    report = apply_drop_path(model, 0.5, stochastic_method="block", convention="timm",
                                    drop_distribution="uniform")
    assert_compiled_last_block_matches_eager(model, torch.randn(MODELS[name][1]), report, seeds=range(4))


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_block_method_skips_branches_and_keeps_eval(name):
    model = build(name)
    x = torch.randn(MODELS[name][1])
    with torch.no_grad():
        expected = model(x)
    report = apply_drop_path(model, 0.5, stochastic_method="block", convention="paper")
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
    report = apply_drop_path(model, 0.2, target_layer_name="ResNetBottleneck", drop_distribution="linear")
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
    report = apply_drop_path(model, 0.4, target_layer_name="_MyBlock", convention="paper")
    assert report.changed == [("0", "_MyBlock", 0.2, "DropPath on drop"), ("1", "_MyBlock", 0.4, "DropPath on drop")]
    assert "_MyBlock" in str(report)


def _bottleneck_branch(block, x):
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out))


def _identity(block, x):
    return x if block.downsample is None else block.downsample(x)


@pytest.mark.parametrize("method", ["block", "sample"])
def test_composer_documented_call_behaves_as_composer(method):
    """Composer's call on ResNet-50: 16 Bottlenecks at (l + 1) / 16 * 0.2, no training-time scaling,
    eval relu(identity + (1 - p) * branch); block-wise: a dropped block is relu(identity) for the
    whole batch, a kept one relu(identity + branch)."""
    model = build("resnet50")
    arguments = {} if method == "block" else {"stochastic_method": "sample"}
    report = stochdepth_kernels.apply_stochastic_depth(model, target_layer_name="ResNetBottleneck", **arguments)
    assert len(report.changed) == 16 and report.rates() == pytest.approx([(l + 1) / 16 * 0.2 for l in range(16)])
    block, rate = model.layer4[2], report.rates()[-1]
    x = torch.randn(8, 2048, 2, 2).relu()
    with torch.no_grad():
        branch, identity = _bottleneck_branch(block, x), _identity(block, x)
        assert_close_to(block(x), torch.relu(identity + (1 - rate) * branch))  # eval: x (1 - p)
        block.train()
        block.bn1.eval(), block.bn2.eval(), block.bn3.eval()  # the branch as in eval: comparable
        outcomes = set()
        for seed in range(40):
            torch.manual_seed(seed)
            out = block(x)
            kept = (out != torch.relu(identity)).flatten(1).any(1)
            assert_close_to(out[kept], torch.relu(identity + branch)[kept])  # no 1/(1-p)
            assert torch.equal(out[~kept], torch.relu(identity)[~kept])
            outcomes.add((bool(kept.all()), bool((~kept).all())))
    expected = {(True, False), (False, True)} if method == "block" else None
    if expected:
        assert outcomes == expected  # the whole batch kept or dropped, both seen
    else:
        assert (False, False) in outcomes  # some samples kept, others dropped


def assert_close_to(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_composer_drop_warmup_ramps_every_rate():
    model = build("resnet50")
    report = apply_stochastic_depth(model, "ResNetBottleneck")
    warmup = DropRateWarmup.from_fraction(model, total_steps=100, drop_warmup=0.1)
    rates = lambda: [m.drop_prob for m in model.modules() if isinstance(m, DropPathAdd)]  # noqa: E731
    assert rates() == [0.0] * 16
    for _ in range(5):
        warmup.step()
    assert rates() == pytest.approx([0.5 * rate for rate in report.rates()])
    for _ in range(5):
        warmup.step()
    assert rates() == pytest.approx(report.rates())


def test_an_optimizer_built_before_surgery_trains_the_changed_model():
    model = build("resnet18").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parameters = list(model.parameters())
    apply_stochastic_depth(model, "BasicBlock", optimizers=optimizer)
    apply_stochastic_depth(build("resnet18"), "BasicBlock", optimizers=[optimizer])  # a sequence too
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    before = [p.detach().clone() for p in parameters]
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before) if p.grad is not None)
    assert sum(p.grad is not None for p in model.parameters()) > 0


def test_both_surgery_functions_are_exported_at_the_top_level():
    assert stochdepth_kernels.apply_stochastic_depth is apply_stochastic_depth
    assert stochdepth_kernels.apply_drop_path is apply_drop_path
    with pytest.raises(AttributeError, match="has no attribute 'apply_dropout'"):
        stochdepth_kernels.apply_dropout  # noqa: B018


@pytest.mark.parametrize("name", list(MODELS))
def test_subset_method_trains_every_model_and_keeps_eval(name):
    """``stochastic_method="subset"``: eval outputs as before surgery (timm's scaling), a training step
    in which every parameter gets a finite gradient (BatchNorm in a branch sees the kept samples), and
    the report gives each block's effective rate at the batch size."""
    model = build(name)
    shape = (2, *MODELS[name][1][1:]) if MODELS[name][1][0] == 1 else (4, *MODELS[name][1][1:])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference_output = model(x)
    report = apply_drop_path(model, 0.3, stochastic_method="subset")
    assert report.mode == "subset" and all("dropped samples skip the branch" in how for *_, how in report.changed)
    batch = shape[0]
    assert report.effective_rates(batch) == [1 - stochdepth_kernels.subset_size(batch, r) / batch for r in report.rates()]
    with torch.no_grad():
        assert torch.equal(model(x), reference_output)
    model.train()
    model(x).float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def test_composer_subset_method_has_composer_scaling():
    model = build("resnet18")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    report = apply_stochastic_depth(model, stochastic_method="subset", drop_rate=0.5)
    assert report.mode == "subset"
    drops = [m for m in model.modules() if isinstance(m, DropPathAdd)]
    assert {d.mode for d in drops} == {"subset"} and not any(d.scale_by_keep for d in drops)
    with torch.no_grad():
        assert not torch.equal(model(x), before)  # eval: shortcut + (1 - p) * branch, as Composer's


def test_vit_per_sample_attention_mask_is_indexed_with_the_kept_rows():
    torch.manual_seed(0)
    block = timm.models.vision_transformer.Block(dim=16, num_heads=2)
    apply_drop_path(block, 0.5, stochastic_method="subset", drop_distribution="uniform")
    block.train()
    x = torch.randn(6, 5, 16)
    mask = torch.randn(6, 1, 5, 5)
    calls = []
    attention = block.attn.forward

    def recording(h, attn_mask=None, **kwargs):
        calls.append((h.detach(), attn_mask))
        return attention(h, attn_mask=attn_mask, **kwargs)

    block.attn.forward = recording
    block(x, attn_mask=mask)
    h, got_mask = calls[0]
    normed = block.norm1(x).detach()
    rows = [next(b for b in range(6) if torch.equal(normed[b], row)) for row in h]
    assert len(rows) == stochdepth_kernels.subset_size(6, 0.5) == 3
    assert torch.equal(got_mask, mask[rows])
    calls.clear()
    block(x, attn_mask=torch.zeros(5, 5))  # a mask shared by every sample is passed as it is
    assert calls[0][1].shape == (5, 5)


class KeywordBlock(torch.nn.Module):
    """A block whose forward takes ``**kwargs`` (as Hugging Face's layers do): fx cannot trace it as
    written; surgery traces it with its named arguments only."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 6)
        self.drop_path = timm.layers.DropPath(0.1)

    def forward(self, x, scale=1.0, **kwargs):
        return x + self.drop_path(self.linear(x) * scale * kwargs.get("gain", 1.0))


def test_a_forward_with_kwargs_is_fused_and_runs_its_own_code_for_extra_arguments(monkeypatch):
    block = KeywordBlock().eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = [block(x), block(x, 0.5), block(x, gain=2.0)]
    report = apply_drop_path(block, 0.5, convention="paper")  # one block: rate 0.5
    assert report.levels == [("", "drop_path", 1)], str(report)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip([block(x), block(x, 0.5), block(x, gain=2.0)], expected))
    calls = spy_on_drop_calls(monkeypatch)
    block.train()
    block(x, scale=0.5)
    assert calls == ["add_branch"]
    # gain was not seen by the trace: the class's own forward runs, its slot dropping unary
    torch.manual_seed(0)
    out = block(torch.randn(64, 6), gain=2.0)
    assert calls == ["add_branch", "unary"]
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    kept = (out - x).abs().sum(dim=1) > 0
    assert 0 < int(kept.sum()) < 64
    torch.testing.assert_close(out[kept], x[kept] + 2 * block.linear(x[kept]) / 0.5)
