"""How ``backend="auto"`` picks a backend (backends.py states the measured rule). No GPU is needed:
the CUDA and Triton backends are listed wherever they are built, and choosing runs nothing."""
import pytest
import torch
from helpers import GraphRecorder, random_tensor

from stochdepth_kernels import drop_path_add_subset, fused_drop_path_add, reference
from stochdepth_kernels.backends import BACKENDS, TRITON_FROM_BYTES, auto_backend, resolve_backend
from stochdepth_kernels.ops import native_row_factors

CUDA = torch.device("cuda")


def test_auto_on_the_cpu_is_the_fused_cpu_kernel_at_every_size():
    assert auto_backend(torch.device("cpu"), 0) == "cpu"
    assert auto_backend(torch.device("cpu"), 2**40) == "cpu"


@pytest.mark.skipif(not {"cuda", "triton"} <= set(BACKENDS), reason="needs both GPU kernels built")
def test_auto_on_cuda_is_the_cuda_kernel_below_the_size_where_triton_wins():
    assert auto_backend(CUDA, TRITON_FROM_BYTES - 1) == "cuda"
    assert auto_backend(CUDA, TRITON_FROM_BYTES) == "triton"
    assert resolve_backend("auto", CUDA, 2**30) is BACKENDS["triton"]


def test_auto_falls_back_to_the_reference_where_no_kernel_runs():
    assert auto_backend(torch.device("meta"), 2**30) == "reference"


def test_environment_override_beats_the_size_rule(monkeypatch):
    monkeypatch.setenv("STOCHDEPTH_BACKEND", "reference")
    assert resolve_backend("auto", CUDA, 2**30) is BACKENDS["reference"]


def _targets(recorder: GraphRecorder) -> list[str]:
    return [str(node.target) for graph in recorder.graphs for node in graph.graph.nodes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_the_cpu_kernel_draws_the_reference_row_factors(dtype, mode, p, training, scale_by_keep):
    seed = torch.randint(0, 2**62, (1,)) if training else None
    args = (seed, 37, torch.tensor(p, dtype=torch.float64), training, mode, scale_by_keep, dtype, torch.device("cpu"))
    assert torch.equal(native_row_factors(*args), reference.row_factors(*args))


def test_auto_under_torch_compile_on_the_cpu_leaves_the_arithmetic_to_inductor():
    x, residual = random_tensor((8, 4, 3, 3)), random_tensor((8, 4, 3, 3))

    def add(x, residual, backend="auto"):
        return fused_drop_path_add(x, residual, 0.5, activation="relu", backend=backend)

    recorder = GraphRecorder()
    torch._dynamo.reset()
    compiled = torch.compile(add, backend=recorder, fullgraph=True)
    for seed in range(3):
        torch.manual_seed(seed)
        got = compiled(x, residual)
        torch.manual_seed(seed)
        assert torch.equal(got, add(x, residual, backend="reference"))
    # The CPU kernel draws the factors; the mask, scale, add and ReLU are plain ops inductor can fuse.
    stochdepth_ops = [target for target in _targets(recorder) if "stochdepth" in target]
    assert stochdepth_ops == ["stochdepth.drop_path.default"] * len(recorder.graphs)


def test_auto_under_torch_compile_keeps_the_subset_kernels():
    linear = torch.nn.Linear(4, 4)
    h = random_tensor((8, 4))
    recorder = GraphRecorder()
    torch._dynamo.reset()
    torch.compile(lambda h: drop_path_add_subset(linear, (h,), h, 0.5), backend=recorder, fullgraph=True)(h)
    assert any("stochdepth" in target for target in _targets(recorder))
