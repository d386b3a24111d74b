"""How ``backend="auto"`` picks a backend (backends.py states the measured rule). No GPU is needed:
the CUDA and Triton backends are listed wherever they are built, and choosing runs nothing."""
import pytest
import torch

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
