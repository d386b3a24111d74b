"""The Triton kernels against the reference: on CPU tensors under TRITON_INTERPRET=1 (small shapes)
and on CUDA (marker ``cuda``, large shapes)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DTYPES, LAYOUTS, PROBABILITIES, assert_matches, kept_rows, random_tensor
from stochdepth_kernels import available_backends, drop_path, fused_drop_path_add

triton_backend = pytest.importorskip("stochdepth_kernels.triton_backend")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if "triton" not in available_backends(request.param):
        pytest.skip(f"the Triton backend does not run on {request.param} here")
    return request.param


def shape_for(device):
    return (7, 3, 5, 6) if device == "cpu" else (37, 64, 28, 27)


def skip_slow_on_interpreter(device, layout):
    # In a batch-innermost layout every element is its own run and program: ~8 ms each under the
    # interpreter. That layout is tested on CPU by test_batch_innermost_layout on a tiny shape.
    if device == "cpu" and layout == "batch_inner":
        pytest.skip("batch_inner runs in test_batch_innermost_layout on CPU")


def run_both(fn, *tensors, **kwargs):
    """(triton, reference) outputs for the same seed."""
    return fn(*tensors, backend="triton", **kwargs), fn(*tensors, backend="reference", **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", PROBABILITIES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_matches_reference(device, dtype, layout, p, training, mode, activation):
    skip_slow_on_interpreter(device, layout)
    shape = shape_for(device)
    x, residual = (random_tensor(shape, dtype, layout, device=device) for _ in range(2))
    out, expected = run_both(fused_drop_path_add, x, residual, p, training=training, mode=mode,
                             activation=activation, seed=2**33 + 5)
    assert_matches(out, expected)
    assert out.stride() == expected.stride()


@pytest.mark.parametrize("x_layout, r_layout", [("contiguous", "channels_last"), ("channels_last", "strided"),
                                                ("batch_inner", "contiguous")])
@pytest.mark.parametrize("x_dtype, r_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                              (torch.float16, torch.bfloat16)])
def test_mixed_dtypes_and_layouts_match_reference(device, x_layout, r_layout, x_dtype, r_dtype):
    skip_slow_on_interpreter(device, r_layout)
    shape = shape_for(device)
    x = random_tensor(shape, x_dtype, x_layout, device=device)
    residual = random_tensor(shape, r_dtype, r_layout, device=device)
    out, expected = run_both(fused_drop_path_add, x, residual, 0.5, activation="relu", seed=11)
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_batch_innermost_layout(device, dtype, activation):
    x, residual = (random_tensor((3, 2, 2, 3), dtype, "batch_inner", device=device) for _ in range(2))
    out, expected = run_both(fused_drop_path_add, x, residual, 0.5, activation=activation, seed=9)
    assert_matches(out, expected)
    assert out.stride() == expected.stride()


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_masks_bit_identical_to_reference(device, mode):
    x = random_tensor((64 if device == "cpu" else 4096, 3), device=device)
    for seed in (0, 2**32 + 1, 2**62 + 12345):
        for p in (0.01, 0.5, 0.97):
            out, expected = run_both(drop_path, x, p, mode=mode, seed=seed)
            assert torch.equal(kept_rows(out), kept_rows(expected)), (seed, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, training", [(0.0, True), (0.3, True), (1.0, True), (0.3, False)])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_gradients_match_reference(device, dtype, p, training, activation, scale_by_keep):
    shape = shape_for(device)
    x0, r0, grad_out = (random_tensor(shape, dtype, device=device) for _ in range(3))
    grads = []
    for backend in ("triton", "reference"):
        x, residual = x0.detach().requires_grad_(), r0.detach().requires_grad_()
        out = fused_drop_path_add(x, residual, p, training=training, activation=activation,
                                  scale_by_keep=scale_by_keep, seed=77, backend=backend)
        out.backward(grad_out)
        grads.append((x.grad, residual.grad))
    (gx, gr), (ex, er) = grads
    assert_matches(gx, ex, "grad_x")
    assert_matches(gr, er, "grad_residual")


def test_unary_gradient_and_mixed_dtypes(device):
    x0 = random_tensor(shape_for(device), torch.bfloat16, "channels_last", device=device)
    grad_out = random_tensor(shape_for(device), torch.float32, device=device)
    grads = []
    for backend in ("triton", "reference"):
        x = x0.detach().requires_grad_()
        drop_path(x, 0.4, seed=8, backend=backend).float().backward(grad_out)
        grads.append(x.grad)
    assert_matches(*grads, "grad_x")


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
    x, residual = (random_tensor(shape_for(device), torch.float32, layout, device=device) for _ in range(2))
    with _RecordAtenOps() as recorded:
        triton_backend.triton_drop_path_add(x, residual, torch.tensor([3], device=device),
                                            torch.tensor(0.2, dtype=torch.float64, device=device),
                                            True, "row", True, True)
    assert not [name for name in recorded.names if "copy" in name or "clone" in name], recorded.names


@pytest.mark.cuda
def test_opcheck_and_compile_on_cuda():
    ops = (triton_backend.triton_drop_path_add, triton_backend.triton_drop_path,
           triton_backend.triton_drop_path_add_relu_backward)
    x = random_tensor((8, 16, 9, 9), torch.float32, "channels_last", device="cuda").requires_grad_()
    residual = random_tensor((8, 16, 9, 9), torch.bfloat16, device="cuda").requires_grad_()
    seed = torch.tensor([5], device="cuda")
    p = torch.tensor(0.3, dtype=torch.float64, device="cuda")
    torch.library.opcheck(ops[0], (x, residual, seed, p, True, "row", True, True))
    torch.library.opcheck(ops[1], (x, seed, p, True, "batch", False, None))
    out = torch.relu(random_tensor((8, 16, 9, 9), device="cuda"))
    torch.library.opcheck(ops[2], (random_tensor((8, 16, 9, 9), device="cuda"), out, seed, p, True, "row", True,
                                   torch.float32, torch.float32))

    @torch.compile(fullgraph=True)
    def block(x, residual, p):
        return fused_drop_path_add(x, residual, p, activation="relu", seed=seed, backend="triton")

    compiled = block(x, residual, p)
    assert_matches(compiled, fused_drop_path_add(x, residual, p, activation="relu", seed=5, backend="reference"))
    compiled.float().sum().backward()
    assert x.grad is not None and residual.grad is not None
    block(x, residual, torch.tensor(0.7, dtype=torch.float64, device="cuda"))  # a new p: same graph


@pytest.mark.cuda
def test_int64_indexing_past_2_31_elements():
    row = 2**30 + 3  # two rows: offsets of the second pass 2**31
    x = torch.randn(2, row, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(2, row, device="cuda", dtype=torch.bfloat16)
    for seed in range(4):
        out = fused_drop_path_add(x, residual, 0.5, seed=seed, activation="relu", backend="triton")
        tail = slice(row - 4096, row)
        expected = fused_drop_path_add(x[:, tail], residual[:, tail], 0.5, seed=seed, activation="relu",
                                       backend="reference")
        assert_matches(out[:, tail], expected)
    del x, residual, out
    torch.cuda.empty_cache()
