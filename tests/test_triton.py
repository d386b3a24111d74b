"""What is particular to the Triton kernels, on CPU tensors under TRITON_INTERPRET=1 and on CUDA
(marker ``cuda``): the batch-innermost layout, gradcheck, no hidden copies, every autotuning config
(the tests run one: STOCHDEPTH_TRITON_AUTOTUNE=0, set in conftest.py). The grid against the
reference is in test_kernels_match_reference.py, opcheck, compile and int64 indexing on a GPU in
test_gpu_kernels.py."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_matches, random_tensor, with_reference
from stochdepth_kernels import available_backends, fused_drop_path_add

triton_backend = pytest.importorskip("stochdepth_kernels.triton_backend")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if "triton" not in available_backends(request.param):
        pytest.skip(f"the Triton backend does not run on {request.param} here")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_batch_innermost_layout(device, dtype, activation):
    x, residual = (random_tensor((3, 2, 2, 3), dtype, "batch_inner", device=device) for _ in range(2))
    out, expected = with_reference("triton", fused_drop_path_add, x, residual, 0.5, activation=activation, seed=9)
    assert_matches(out, expected)
    assert out.stride() == expected.stride()


def test_gradcheck_fp64(device):
    x = random_tensor((4, 2, 2), torch.float64, device=device).requires_grad_()
    residual = random_tensor((4, 2, 2), torch.float64, device=device).requires_grad_()
    for activation in (None, "relu"):
        assert torch.autograd.gradcheck(
            lambda x, r: fused_drop_path_add(x, r, 0.5, activation=activation, seed=21, backend="triton"),
            (x, residual))


class _RecordAtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dense_batch_outermost_inputs_are_not_copied(device, layout):
    x, residual = (random_tensor((7, 3, 5, 6), torch.float32, layout, device=device) for _ in range(2))
    with _RecordAtenOps() as recorded:
        triton_backend.triton_drop_path_add(x, residual, torch.tensor([3], device=device),
                                            torch.tensor(0.2, dtype=torch.float64, device=device),
                                            True, "row", True, True)
    assert not [name for name in recorded.names if "copy" in name or "clone" in name], recorded.names


@pytest.mark.parametrize("config", range(len(triton_backend.TUNED_CONFIGS)))
def test_every_autotune_config_matches_reference(device, config, monkeypatch):
    """Each block size the autotuner may pick, forced: rows of two blocks and a partial one, a partial
    last byte of the ReLU sign mask, forward and backward."""
    chosen = [triton_backend.TUNED_CONFIGS[config]]
    for kernel in (triton_backend._drop_path_add_forward_kernel, triton_backend._relu_backward_kernel):
        monkeypatch.setattr(kernel, "configs", chosen)  # one config: the autotuner runs it without timing
    x, residual = (random_tensor((3, 2 * 8192 + 13), device=device).requires_grad_() for _ in range(2))
    out, expected = with_reference("triton", fused_drop_path_add, x, residual, 0.5, activation="relu", seed=5)
    assert_matches(out, expected)
    grad = random_tensor(out.shape, device=device)
    for name, got, want in zip(("grad_x", "grad_residual"), torch.autograd.grad(out, (x, residual), grad),
                               torch.autograd.grad(expected, (x, residual), grad)):
        assert_matches(got, want, name)
