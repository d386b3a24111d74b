"""What every GPU kernel backend (Triton, CUDA) must pass on a GPU (marker ``cuda``): opcheck of its
registered ops, a torch.compile(fullgraph=True) trace with a tensor p, a captured forward+backward
replayed with fresh masks, and int64 indexing."""
import pytest
import torch

from helpers import assert_matches, kept_rows, random_tensor, registered_ops
from stochdepth_kernels import available_backends, drop_path, fused_drop_path_add, relu_mask
from stochdepth_kernels.seeding import draw_seed

pytestmark = pytest.mark.cuda


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    if request.param not in available_backends("cuda"):
        pytest.skip(f"backend {request.param!r} is not available on CUDA here")
    return request.param


def test_opcheck_and_compile(backend):
    add, unary, relu_backward = registered_ops(backend)
    x = random_tensor((8, 16, 9, 9), torch.float32, "channels_last", device="cuda").requires_grad_()
    residual = random_tensor((8, 16, 9, 9), torch.bfloat16, device="cuda").requires_grad_()
    seed = torch.tensor([5], device="cuda")
    p = torch.tensor(0.3, dtype=torch.float64, device="cuda")
    torch.library.opcheck(add, (x, residual, seed, p, True, "row", True, True, True))
    torch.library.opcheck(unary, (x, seed, p, True, "batch", False, None))
    mask = relu_mask.pack(torch.relu(random_tensor((8, 16, 9, 9), device="cuda")))
    torch.library.opcheck(relu_backward, (random_tensor((8, 16, 9, 9), device="cuda"), mask, seed, p, True, "row",
                                          True, torch.float32, torch.float32))

    @torch.compile(fullgraph=True)
    def block(x, residual, p):
        return fused_drop_path_add(x, residual, p, activation="relu", seed=seed, backend=backend)

    compiled = block(x, residual, p)
    assert_matches(compiled, fused_drop_path_add(x, residual, p, activation="relu", seed=5, backend="reference"))
    compiled.float().sum().backward()
    assert x.grad is not None and residual.grad is not None
    block(x, residual, torch.tensor(0.7, dtype=torch.float64, device="cuda"))  # a new p: same graph


def test_cuda_graph_of_forward_and_backward_draws_a_fresh_mask_each_replay(backend):
    x, residual = (random_tensor((64, 8, 8), device="cuda").requires_grad_() for _ in range(2))

    def step():
        seed = draw_seed(x.device)
        out = fused_drop_path_add(x, residual, 0.5, activation="relu", seed=seed, backend=backend)
        return (seed, out, *torch.autograd.grad(out, (x, residual), torch.ones_like(out)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton's autotuning) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    masks = set()
    for _ in range(4):
        graph.replay()
        torch.cuda.synchronize()
        seed = captured[0].clone()
        inputs = (x.detach().requires_grad_(), residual.detach().requires_grad_())
        expected = fused_drop_path_add(*inputs, 0.5, activation="relu", seed=seed, backend="reference")
        expected = (expected, *torch.autograd.grad(expected, inputs, torch.ones_like(expected)))
        for name, got, want in zip(["out", "grad_x", "grad_residual"], captured[1:], expected):
            assert_matches(got, want, name)
        masks.add(tuple(kept_rows(drop_path(x.detach(), 0.5, seed=seed, backend="reference")).tolist()))
    assert len(masks) == 4, "a replay reused a mask"


def test_int64_indexing_past_2_31_elements(backend):
    row = 2**30 + 3  # two rows: offsets of the second pass 2**31
    x = torch.randn(2, row, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(2, row, device="cuda", dtype=torch.bfloat16)
    for seed in range(4):
        out = fused_drop_path_add(x, residual, 0.5, seed=seed, activation="relu", backend=backend)
        tail = slice(row - 4096, row)
        expected = fused_drop_path_add(x[:, tail], residual[:, tail], 0.5, seed=seed, activation="relu",
                                       backend="reference")
        assert_matches(out[:, tail], expected)
    del x, residual, out
    torch.cuda.empty_cache()
