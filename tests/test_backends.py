"""How ``backend="auto"`` picks a backend (backends.py states the measured rule). No GPU is needed:
the CUDA and Triton backends are listed wherever they are built, and choosing runs nothing."""
import pytest
import torch
from helpers import GraphRecorder, random_tensor

from stochdepth_kernels import drop_path_add_subset, fused_drop_path_add
from stochdepth_kernels.backends import BACKENDS, TRITON_FROM_BYTES, auto_backend, resolve_backend

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


def test_auto_under_torch_compile_on_the_cpu_is_the_reference_inductor_can_fuse():
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
    targets = _targets(recorder)
    assert targets and not any("stochdepth" in target for target in targets)


def test_auto_under_torch_compile_keeps_the_subset_kernels():
    linear = torch.nn.Linear(4, 4)
    h = random_tensor((8, 4))
    recorder = GraphRecorder()
    torch._dynamo.reset()
    torch.compile(lambda h: drop_path_add_subset(linear, (h,), h, 0.5), backend=recorder, fullgraph=True)(h)
    assert any("stochdepth" in target for target in _targets(recorder))
