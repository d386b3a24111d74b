"""Every kernel backend against the reference, over dtypes, layouts, p, training/eval, row/batch mode
and activation: outputs, masks and gradients. A new kernel joins by adding a line to KERNELS."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import simulated_cuda
from helpers import (DTYPES, LAYOUTS, PROBABILITIES, assert_matches, kept_rows, random_tensor, registered_ops,
                     with_reference)
from stochdepth_kernels import available_backends, drop_path, fused_drop_path_add, reference, relu_mask
from stochdepth_kernels.backends import BACKENDS

KERNELS = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter"),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.cuda),
    pytest.param((simulated_cuda.NAME, "cpu"), id="cuda-kernel-on-cpu"),
]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    backend, device = request.param
    if backend == simulated_cuda.NAME:
        monkeypatch.setitem(BACKENDS, backend, simulated_cuda.backend())
    elif backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} here")
    return backend, device


def shape_for(kernel):
    # Odd sizes: no row is a multiple of a vector width or block. Larger on a GPU; for the CUDA
    # kernel on the CPU, rows long enough for its chunked path (element by element only when
    # batch-innermost).
    if kernel[1] == "cuda":
        return (37, 64, 28, 27)
    return (5, 3, 31, 41) if kernel[0] == simulated_cuda.NAME else (7, 3, 5, 6)


def skip_slow_on_interpreter(kernel, *layouts):
    # In a batch-innermost layout each element is its own run, one Triton program each: ~8 ms apiece
    # under the interpreter. test_triton.py covers that layout there on a tiny shape.
    if kernel == ("triton", "cpu") and "batch_inner" in layouts:
        pytest.skip("batch_inner under the Triton interpreter runs in test_triton.py")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", PROBABILITIES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_matches_reference(kernel, dtype, layout, p, training, mode, activation):
    skip_slow_on_interpreter(kernel, layout)
    x, residual = (random_tensor(shape_for(kernel), dtype, layout, device=kernel[1]) for _ in range(2))
    out, expected = with_reference(kernel[0], fused_drop_path_add, x, residual, p, training=training, mode=mode,
                                   activation=activation, seed=2**33 + 5)
    assert_matches(out, expected)
    assert out.stride() == expected.stride()


@pytest.mark.parametrize("x_layout, r_layout", [("contiguous", "channels_last"), ("channels_last", "strided"),
                                                ("batch_inner", "contiguous"), ("strided", "batch_inner")])
@pytest.mark.parametrize("x_dtype, r_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                              (torch.float16, torch.bfloat16), (torch.float64, torch.float32),
                                              (torch.bfloat16, torch.float64), (torch.float64, torch.float16)])
def test_mixed_dtypes_and_layouts_match_reference(kernel, x_layout, r_layout, x_dtype, r_dtype):
    """Output and gradients; a float64 side makes the arithmetic float64 and the other side's
    gradient a narrowing store."""
    skip_slow_on_interpreter(kernel, r_layout)
    x = random_tensor(shape_for(kernel), x_dtype, x_layout, device=kernel[1]).requires_grad_()
    residual = random_tensor(shape_for(kernel), r_dtype, r_layout, device=kernel[1]).requires_grad_()
    out, expected = with_reference(kernel[0], fused_drop_path_add, x, residual, 0.5, activation="relu", seed=11)
    assert_matches(out, expected)
    assert out.stride() == expected.stride()
    grad = random_tensor(shape_for(kernel), out.dtype, device=kernel[1])
    got, want = (torch.autograd.grad(result, (x, residual), grad) for result in (out, expected))
    for name, g, w in zip(("grad_x", "grad_residual"), got, want):
        assert_matches(g, w, name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_valid_inputs_match_reference(kernel, data):
    """Hypothesis draws everything a call can vary (shape, both dtypes and layouts, p, flags, seed):
    output and both gradients equal the reference's."""
    draw = data.draw
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4), label="shape"))
    layouts = ["contiguous", "strided"] + (["channels_last"] if len(shape) == 4 else [])
    if kernel != ("triton", "cpu"):  # see skip_slow_on_interpreter
        layouts.append("batch_inner")
    x, residual = (random_tensor(shape, draw(st.sampled_from(DTYPES)), draw(st.sampled_from(layouts)),
                                 device=kernel[1]).detach().requires_grad_() for _ in range(2))
    kwargs = dict(p=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0), label="p"),
                  training=draw(st.booleans(), label="training"), mode=draw(st.sampled_from(["row", "batch"])),
                  scale_by_keep=draw(st.booleans(), label="scale_by_keep"),
                  activation=draw(st.sampled_from([None, "relu"])), seed=draw(st.integers(0, 2**63 - 1), label="seed"))
    out, expected = with_reference(kernel[0], fused_drop_path_add, x, residual, **kwargs)
    assert_matches(out, expected)
    grad = random_tensor(shape, out.dtype, device=kernel[1])
    got, want = (torch.autograd.grad(result, (x, residual), grad) for result in (out, expected))
    for name, g, w in zip(("grad_x", "grad_residual"), got, want):
        assert_matches(g, w, name)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_masks_bit_identical_to_reference(kernel, mode):
    x = random_tensor((64 if kernel == ("triton", "cpu") else 1000, 3), device=kernel[1])
    for seed in [0, 1, 2**31, 2**32 + 1, 2**62 + 12345]:
        for p in [0.01, 0.3, 0.5, 0.97]:
            out, expected = with_reference(kernel[0], drop_path, x, p, mode=mode, seed=seed)
            assert torch.equal(kept_rows(out), kept_rows(expected)), (seed, p)
            assert_matches(out, expected, exact=True)  # one multiply: no FMA to differ by


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("p, training", [(0.0, True), (0.3, True), (1.0, True), (0.3, False)])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_gradients_match_reference(kernel, dtype, layout, p, training, activation, scale_by_keep):
    x0, r0 = (random_tensor(shape_for(kernel), dtype, layout, device=kernel[1]) for _ in range(2))
    grad_out = random_tensor(shape_for(kernel), dtype, device=kernel[1])
    grads = []
    for backend in (kernel[0], "reference"):
        x, residual = x0.detach().requires_grad_(), r0.detach().requires_grad_()
        out = fused_drop_path_add(x, residual, p, training=training, activation=activation,
                                  scale_by_keep=scale_by_keep, seed=77, backend=backend)
        out.backward(grad_out)
        grads.append((x.grad, residual.grad))
    (gx, gr), (ex, er) = grads
    assert_matches(gx, ex, "grad_x")
    assert_matches(gr, er, "grad_residual")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_relu_mask_is_the_outputs_and_its_backward_matches_reference(kernel, dtype, layout, training):
    """The ReLU sign mask a forward saves is its own output's (relu_mask.pack: NaN passes, zeros do
    not), bit for bit, and the backward from it equals the reference's from the same mask."""
    skip_slow_on_interpreter(kernel, layout)
    add, _, relu_backward = registered_ops(kernel[0])
    x, residual = (random_tensor(shape_for(kernel), dtype, layout, device=kernel[1]) for _ in range(2))
    residual.masked_fill_(torch.arange(residual.numel(), device=kernel[1]).reshape(residual.shape) % 7 == 0, float("nan"))
    seed = torch.tensor([12], device=kernel[1])
    p = torch.tensor(0.5, dtype=torch.float64, device=kernel[1])
    out, mask = add(x, residual, seed, p, training, "row", True, True, True)
    assert_matches(out, reference.drop_path_add(x, residual, seed, p, training, "row", True, True))
    assert torch.equal(mask, relu_mask.pack(out))
    grad = torch.empty_like(out).copy_(random_tensor(out.shape, out.dtype, device=kernel[1]))
    for name, got, want in zip(("grad_x", "grad_residual"), relu_backward(grad, mask, seed, p, training, "row", True,
                                                                          dtype, dtype),
                               reference.drop_path_add_relu_backward(grad, mask, seed, p, training, "row", True,
                                                                     dtype, dtype)):
        assert_matches(got, want, name)
        assert got.stride() == out.stride()


def test_unary_gradient_matches_reference(kernel):
    x0 = random_tensor(shape_for(kernel), torch.bfloat16, "channels_last", device=kernel[1])
    grad_out = random_tensor(shape_for(kernel), torch.float32, device=kernel[1])
    grads = []
    for backend in (kernel[0], "reference"):
        x = x0.detach().requires_grad_()
        drop_path(x, 0.4, seed=8, backend=backend).float().backward(grad_out)
        grads.append(x.grad)
    assert_matches(*grads, "grad_x")


@pytest.mark.parametrize("relu", [False, True])
def test_registered_ops_match_the_eager_path(kernel, relu):
    """The public functions call the backend's eager autograd.Functions; torch.compile and direct
    callers get the registered ops. Same kernels, same rules: bit-identical outputs and gradients,
    double backward of the unary op included."""
    backend = BACKENDS[kernel[0]]
    x0, r0 = (random_tensor(shape_for(kernel), torch.float64, device=kernel[1]) for _ in range(2))
    seed = torch.tensor([6], device=kernel[1])
    p = torch.tensor(0.5, dtype=torch.float64, device=kernel[1])
    results = []
    for add, unary in (backend.eager, backend.traced):
        x, residual = x0.detach().requires_grad_(), r0.detach().requires_grad_()
        out = add(x, residual, seed, p, True, "row", True, relu)
        grads = torch.autograd.grad(out, (x, residual), torch.ones_like(out))
        dropped = unary(x, seed, p, True, "batch", False, None)
        grad_out = r0.detach().requires_grad_()
        (grad_x,) = torch.autograd.grad(dropped, x, grad_out, create_graph=True)
        (grad_grad_out,) = torch.autograd.grad(grad_x, grad_out, x0)  # backward of the backward
        results.append((out, *grads, dropped, grad_x, grad_grad_out))
    for name, eager, traced in zip(["out", "grad_x", "grad_residual", "dropped", "unary grad_x", "grad_grad_out"],
                                   *results):
        assert_matches(eager, traced, name, exact=True)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_double_backward_with_relu(kernel, mode):
    """A backward under create_graph=True (gradient penalties, Hessian-vector products) is itself
    differentiable with ReLU too: the eager path and the registered ops pass gradgradcheck, and a
    dropped row's second derivative is zero."""
    backend = BACKENDS[kernel[0]]
    shape = (4, 3) if kernel == ("triton", "cpu") else (5, 2, 3)
    x, residual = (random_tensor(shape, torch.float64, device=kernel[1]).requires_grad_() for _ in range(2))
    seed = torch.tensor([6], device=kernel[1])
    p = torch.tensor(0.5, dtype=torch.float64, device=kernel[1])
    for add, _ in (backend.eager, backend.traced):
        def fused(x, residual, add=add):
            return add(x * x, residual, seed, p, True, mode, True, True)

        assert torch.autograd.gradgradcheck(fused, (x, residual))
    out = fused_drop_path_add(x * x, residual, 0.5, mode=mode, activation="relu", seed=6, backend=kernel[0])
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
    (second,) = torch.autograd.grad(grad_x.sum(), x)
    dropped = kept_rows(drop_path(torch.ones_like(x), 0.5, mode=mode, seed=6, backend=kernel[0])).logical_not()
    assert torch.equal(second[dropped], torch.zeros_like(second[dropped]))


def test_dropped_rows_get_exactly_zero_gradient_from_a_nonfinite_upstream(kernel):
    x = random_tensor(shape_for(kernel), device=kernel[1]).requires_grad_()
    residual = random_tensor(shape_for(kernel), device=kernel[1]).requires_grad_()
    grad_out = torch.full(shape_for(kernel), float("inf"), device=kernel[1])
    out = fused_drop_path_add(x, residual, 1.0, activation="relu", seed=3, backend=kernel[0])
    grad_x, grad_residual = torch.autograd.grad(out, (x, residual), grad_out)
    assert torch.equal(grad_x, torch.zeros_like(x))
    assert torch.equal(grad_residual, torch.where(residual > 0, float("inf"), 0.0))
