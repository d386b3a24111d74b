"""The GPU suite (marker ``cuda``): on CUDA tensors ``backend="auto"`` must draw its seed on the
device and give the masks and gradients the CPU kernel gives for the same seed."""
import pytest
import torch

from helpers import DTYPES, LAYOUTS, assert_matches, kept_rows, random_tensor
from stochdepth_kernels import drop_path, fused_drop_path_add

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_cuda_output_equals_cpu_kernel(dtype, layout, mode):
    x, residual = random_tensor((33, 3, 5, 4), dtype, layout), random_tensor((33, 3, 5, 4), dtype, layout)
    on_cpu = fused_drop_path_add(x, residual, 0.5, mode=mode, activation="relu", seed=2**40 + 9, backend="cpu")
    on_gpu = fused_drop_path_add(x.cuda(), residual.cuda(), 0.5, mode=mode, activation="relu", seed=2**40 + 9)
    assert_matches(on_gpu.cpu(), on_cpu)


def test_cuda_masks_bit_identical_to_cpu():
    x = random_tensor((4096, 2))
    for seed in (0, 7, 2**33 + 1, 2**62):
        assert torch.equal(kept_rows(drop_path(x.cuda(), 0.3, seed=seed).cpu()),
                           kept_rows(drop_path(x, 0.3, seed=seed, backend="cpu")))


def test_cuda_seed_is_drawn_on_device_and_reproducible():
    x = random_tensor((512, 3), device="cuda")
    torch.manual_seed(4)
    first = kept_rows(drop_path(x, 0.5))
    torch.manual_seed(4)
    assert torch.equal(first, kept_rows(drop_path(x, 0.5)))
    generator = torch.Generator(device="cuda").manual_seed(1)
    assert kept_rows(drop_path(x, 0.5, generator=generator)).shape == (512,)


def test_cuda_gradients_equal_cpu_kernel():
    grads = []
    x0, r0 = random_tensor((16, 3, 4)), random_tensor((16, 3, 4))
    for device, backend in (("cpu", "cpu"), ("cuda", "auto")):
        x = x0.to(device).detach().requires_grad_()  # x0.to("cpu") is x0 itself: detach gives a new leaf
        residual = r0.to(device).detach().requires_grad_()
        fused_drop_path_add(x, residual, 0.3, activation="relu", seed=12, backend=backend).sum().backward()
        grads.append((x.grad.cpu(), residual.grad.cpu()))
    assert_matches(grads[1][0], grads[0][0], "grad_x")
    assert_matches(grads[1][1], grads[0][1], "grad_residual")


def test_bench_device_time_counts_the_kernels_of_a_call():
    from bench.timing import device_time_per_call

    x = torch.randn(64, 2**20, device="cuda")  # 256 MiB: a copy of it is ~0.1-0.2 ms of kernel
    one = device_time_per_call(lambda: x.clone(), torch.device("cuda"))
    two = device_time_per_call(lambda: (x.clone(), x.clone()), torch.device("cuda"))
    assert 20e-6 < one < 5e-3
    assert two == pytest.approx(2 * one, rel=0.2)


def test_compiled_block_wise_skip_keeps_one_graph_on_cuda():
    """Compiled, ``StochasticDepth(mode="batch")`` is one graph whose coin comes from the CUDA
    generator: each call keeps or drops the whole batch, and both happen."""
    from stochdepth_kernels import StochasticDepth

    module = StochasticDepth(torch.nn.Linear(8, 8), 0.5, mode="batch").cuda()
    compiled = torch.compile(module, fullgraph=True)
    x = random_tensor((16, 8), device="cuda")
    torch.manual_seed(0)
    outcomes = set()
    for _ in range(16):
        out = compiled(x)
        if torch.equal(out, x):
            outcomes.add("dropped")
        else:
            torch.testing.assert_close(out, x + 2 * module.branch(x))
            outcomes.add("kept")
    assert outcomes == {"dropped", "kept"}
