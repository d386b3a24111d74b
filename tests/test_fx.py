"""torch.fx symbolic tracing, as detection and segmentation frameworks build backbones: every public
function, module and block rewritten by surgery traces (train and eval), the functions as one graph
node each, and the traced module gives the original's result for one seed."""
import pytest
import timm
import torch
import torch.fx
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from helpers import assert_matches, random_tensor
from stochdepth_kernels import DropPath, DropPathAdd, StochasticDepth, drop_path, fused_drop_path_add, stochastic_depth
from stochdepth_kernels.surgery import apply_drop_path


class Functions(torch.nn.Module):
    """Each public function once."""

    def forward(self, x):
        y = fused_drop_path_add(torch.tanh(x), x, 0.5, activation="relu") + drop_path(x, 0.25, mode="batch")
        return y + stochastic_depth(x, 0.5, "row", training=self.training)


MODULES = {
    "functions": Functions,
    "DropPath": lambda: DropPath(0.5),
    "DropPathAdd": lambda: DropPathAdd(0.5, activation="relu"),
    "StochasticDepth": lambda: StochasticDepth(torch.nn.Linear(8, 8), 0.5),
    "StochasticDepth-batch": lambda: StochasticDepth(torch.nn.Linear(8, 8), 0.5, mode="batch"),
}


def assert_traced_equals_original(traced, original, x, seeds=range(4)):
    inputs = (x, torch.flip(x, [0])) if isinstance(original, DropPathAdd) else (x,)
    for seed in seeds:
        torch.manual_seed(seed)
        got = traced(*inputs)
        torch.manual_seed(seed)
        assert_matches(got, original(*inputs), exact=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", MODULES)
def test_module_traces_and_runs_as_the_original(name, training):
    module = MODULES[name]().train(training)
    traced = torch.fx.symbolic_trace(module)
    assert_traced_equals_original(traced, module, random_tensor((64, 8)))


def test_functions_are_single_graph_nodes():
    graph = torch.fx.symbolic_trace(Functions()).graph
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    assert fused_drop_path_add in targets and drop_path in targets and stochastic_depth in targets


def test_traced_module_follows_a_changed_rate():
    """The rate is the module's buffer in the graph, not a constant frozen at trace time (batch mode:
    no coin tossed while tracing either)."""
    for module in (DropPathAdd(0.0), StochasticDepth(torch.nn.Linear(8, 8), 0.5, mode="batch")):
        traced = torch.fx.symbolic_trace(module)
        x = random_tensor((64, 8))
        for p in (0.0, 0.9, 1.0):
            module.drop_prob = p
            assert_traced_equals_original(traced, module, x, seeds=range(2))


@pytest.mark.parametrize("method", ["sample", "block"])
def test_torchvision_feature_extraction_of_a_resnet_after_surgery(method):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    apply_drop_path(model, 0.5, stochastic_method=method)
    train_names, eval_names = get_graph_node_names(model)
    assert any(name.startswith("layer2.") for name in train_names)
    assert any(name.startswith("layer2.") for name in eval_names)
    extractor = create_feature_extractor(model, ["layer2", "fc"])
    x = torch.randn(2, 3, 64, 64)
    for seed in range(3):
        torch.manual_seed(seed)
        features = extractor(x)
        torch.manual_seed(seed)
        # A kept batch of the block method: eager adds with torch.add(alpha=1/keep), the graph fuses.
        torch.testing.assert_close(features["fc"], model(x), rtol=1e-5, atol=1e-5)


def test_torchvision_feature_extraction_over_stochastic_depth():
    extractor = create_feature_extractor(Functions(), ["add_1"])
    x = random_tensor((64, 8))
    torch.manual_seed(1)
    got = extractor(x)["add_1"]
    torch.manual_seed(1)
    assert_matches(got, Functions()(x), exact=True)


def test_timm_feature_extraction_of_a_vit_after_surgery():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    apply_drop_path(vit, 0.5)
    extractor = timm.models.create_feature_extractor(vit, ["blocks.1"])
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    vit.blocks[1].register_forward_hook(lambda module, args, out: captured.update(out=out))
    for seed in range(3):
        torch.manual_seed(seed)
        got = extractor(x)["blocks.1"]
        torch.manual_seed(seed)
        vit(x)
        assert_matches(got, captured["out"])
