"""What is particular to the CUDA kernels: that they are built wherever nvcc is (CI, no GPU); their
pack paths, on the GPU and run thread by thread on the CPU (simulated_cuda.py); and on a GPU (marker
``cuda``) gradcheck, CUDA-graph replays and errors.
The grid against the reference is in test_kernels_match_reference.py, opcheck, compile, int64
indexing and compute-sanitizer in test_gpu_kernels.py."""
import os

import pytest
import torch
from torch.utils import cpp_extension

import simulated_cuda
from helpers import assert_matches, kept_rows, random_tensor, registered_ops, with_reference
from stochdepth_kernels import available_backends, drop_path, fused_drop_path_add, ops, reference, relu_mask
from stochdepth_kernels.backends import BACKENDS
from stochdepth_kernels.seeding import draw_seed

native = torch.ops.stochdepth
gpu = pytest.mark.cuda


def test_cuda_kernels_are_built_wherever_nvcc_is():
    nvcc_found = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if os.environ.get("STOCHDEPTH_BUILD_CUDA") == "0" or not nvcc_found:
        pytest.skip("no nvcc or no CUDA build of torch: a CPU-only install")
    assert ops.WITH_CUDA, "nvcc is here but the extension was built without its CUDA kernels"
    assert "cuda" in available_backends("cuda")


@pytest.fixture
def cuda_backend():
    if "cuda" not in available_backends("cuda"):
        pytest.skip("the CUDA kernels are not built")


@pytest.fixture(params=[pytest.param((simulated_cuda.NAME, "cpu"), id="on-cpu"),
                        pytest.param(("cuda", "cuda"), id="cuda", marks=gpu)])
def cuda_kernel(request, monkeypatch):
    """The CUDA kernel's backend and device: on the GPU, and run thread by thread on the CPU."""
    backend, device = request.param
    if backend == simulated_cuda.NAME:
        monkeypatch.setitem(BACKENDS, backend, simulated_cuda.backend())
    elif backend not in available_backends(device):
        pytest.skip("the CUDA kernels are not built")
    return backend, device


def offset_view(shape, dtype, offset, device):
    """Standard-normal values at ``offset`` elements into their storage: a pointer that is not
    16-byte aligned when ``offset`` is odd."""
    numel = torch.Size(shape).numel()
    return torch.randn(numel + offset, device=device).to(dtype)[offset:].view(shape)


@pytest.mark.parametrize("shape, offset", [
    ((9, 1031), 0),        # chunked runs that are not whole packs: element by element
    ((1, 4099), 0),        # one run ending in a partial pack
    ((5, 4096), 1),        # whole packs, unaligned pointer
    ((5, 4096), 0),        # whole packs, 16-byte accesses
    ((3, 2, 9000), 0),     # runs of several chunks, a block's range crossing runs
    ((37, 3, 5, 7), 0),    # runs shorter than a block's packs: element mode
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_pack_path_matches_reference(cuda_kernel, shape, offset, dtype):
    backend, device = cuda_kernel
    x, residual = offset_view(shape, dtype, offset, device), offset_view(shape, dtype, 0, device)
    for activation in (None, "relu"):
        out, expected = with_reference(backend, fused_drop_path_add, x, residual, 0.5, activation=activation, seed=4)
        assert_matches(out, expected)
    out, expected = with_reference(backend, drop_path, x, 0.5, seed=4)
    assert_matches(out, expected, exact=True)
    add, _, relu_backward = registered_ops(backend)
    seed, p = torch.tensor([4], device=device), torch.tensor(0.5, dtype=torch.float64, device=device)
    out, mask = add(x, residual, seed, p, True, "row", True, True, True)
    assert torch.equal(mask, relu_mask.pack(out))
    grad = offset_view(shape, dtype, offset, device)
    for got, want in zip(relu_backward(grad, mask, seed, p, True, "row", True, dtype, dtype),
                         reference.drop_path_add_relu_backward(grad, mask, seed, p, True, "row", True, dtype, dtype)):
        assert_matches(got, want)


@gpu
def test_gradcheck_fp64(cuda_backend):
    x = random_tensor((6, 3, 4), torch.float64, device="cuda").requires_grad_()
    residual = random_tensor((6, 3, 4), torch.float64, device="cuda").requires_grad_()
    for activation in (None, "relu"):
        assert torch.autograd.gradcheck(
            lambda x, r: fused_drop_path_add(x, r, 0.5, activation=activation, seed=21, backend="cuda"),
            (x, residual))
    assert torch.autograd.gradgradcheck(lambda x: drop_path(x, 0.5, seed=21, backend="cuda"), (x,))


@gpu
def test_cuda_graph_replays_draw_a_fresh_mask_each_equal_to_the_reference(cuda_backend):
    x, residual = random_tensor((64, 8, 8), device="cuda"), random_tensor((64, 8, 8), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        fused_drop_path_add(x, residual, 0.5, activation="relu", backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seed = draw_seed(x.device)
        out = fused_drop_path_add(x, residual, 0.5, activation="relu", seed=seed, backend="cuda")
    masks = []
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        expected = fused_drop_path_add(x, residual, 0.5, activation="relu", seed=seed.clone(), backend="reference")
        assert_matches(out, expected)
        masks.append(kept_rows(drop_path(x, 0.5, seed=seed.clone(), backend="reference")))
    assert len({tuple(mask.tolist()) for mask in masks}) == len(masks), "a replay reused a mask"


@gpu
def test_native_op_rejects_inputs_on_two_devices(cuda_backend):
    x, seed, p = torch.randn(4, 3, device="cuda"), torch.tensor([1]), torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="x and residual must be on the same device, got cuda:0 and cpu"):
        native.drop_path_add(x, torch.randn(4, 3), seed, p, True, "row", True, False)
    with pytest.raises(ValueError, match="relu_mask and grad must be on the same device, got cpu and cuda:0"):
        native.drop_path_add_relu_backward(x, torch.zeros(4, dtype=torch.uint8), seed, p, True, "row", True,
                                           torch.float32, torch.float32)
    with pytest.raises(ValueError, match="p must be in \\[0, 1\\], got 1.500000"):
        native.drop_path(x, seed, torch.tensor(1.5), True, "row", True)
    with pytest.raises(ValueError, match="seed must be a 1-element int64 tensor, got Int tensor of shape \\[1\\]"):
        native.drop_path(x, torch.tensor([1], dtype=torch.int32), p, True, "row", True)
