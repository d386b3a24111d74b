"""docs/design.md's edge cases, for every backend that runs on the CPU."""
import numpy as np
import pytest
import torch
from torch import Tensor

from helpers import assert_matches, kept_rows, random_tensor
from stochdepth_kernels import available_backends, drop_path, fused_drop_path_add

BACKENDS = available_backends("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("scale_by_keep, factor", [(True, 1.0), (False, 0.7)])
def test_eval_scales_branch_by_constant(backend, scale_by_keep, factor):
    x, residual = random_tensor((6, 4)), random_tensor((6, 4))
    out = fused_drop_path_add(x, residual, 0.3, training=False, scale_by_keep=scale_by_keep, backend=backend)
    assert_matches(out, residual + torch.tensor(factor) * x)


def test_p_zero_in_training_equals_plain_add(backend):
    x, residual = random_tensor((6, 4)), random_tensor((6, 4))
    assert_matches(fused_drop_path_add(x, residual, 0.0, backend=backend, activation="relu"),
                   torch.relu(residual + x))


def test_p_one_drops_every_row_without_nan_and_gives_zero_gradient(backend):
    x = random_tensor((6, 4)).requires_grad_()
    residual = random_tensor((6, 4)).requires_grad_()
    out = fused_drop_path_add(x, residual, 1.0, backend=backend, activation="relu")
    assert_matches(out, torch.relu(residual), exact=True)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert_matches(residual.grad, (residual > 0).float(), exact=True)
    assert_matches(drop_path(x, 1.0, backend=backend), torch.zeros_like(x), exact=True)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_dropped_rows_never_read_x(backend, poison):
    x, residual = random_tensor((64, 5)), random_tensor((64, 5))
    reference_out = drop_path(x, 0.5, seed=7, backend=backend)
    dropped = ~kept_rows(reference_out)
    assert dropped.any() and not dropped.all()
    x[dropped] = poison
    out = fused_drop_path_add(x, residual, 0.5, seed=7, backend=backend, activation="relu")
    assert_matches(out[dropped], torch.relu(residual[dropped]), exact=True)
    assert torch.isfinite(drop_path(x, 0.5, seed=7, backend=backend)[dropped]).all()


def test_empty_batch(backend):
    x, residual = torch.randn(0, 3, 4), torch.randn(0, 3, 4)
    out = fused_drop_path_add(x, residual, 0.2, backend=backend)
    assert out.shape == (0, 3, 4)


def _kept(rows: int, seed: int) -> Tensor:
    """The keep mask of ``rows`` samples at p = 0.5 for ``seed``, as a column."""
    return kept_rows(drop_path(random_tensor((rows, 1)), 0.5, seed=seed, backend="reference"))[:, None]


def _nonfinite_x(backend):
    x, residual = random_tensor((64, 5)), random_tensor((64, 5))
    x[:, 0], x[:, 1] = float("nan"), float("inf")
    return (fused_drop_path_add(x, residual, 0.5, seed=7, backend=backend),
            torch.where(_kept(64, 7), residual + 2 * x, residual))


def _nan_residual_through_relu(backend):
    x, residual = random_tensor((64, 5)), random_tensor((64, 5))
    residual[:, 2] = float("nan")
    return (fused_drop_path_add(x, residual, 0.5, seed=7, activation="relu", backend=backend),
            torch.relu(torch.where(_kept(64, 7), residual + 2 * x, residual)))


def _one_dimensional(backend):
    x, residual = random_tensor((64,)), random_tensor((64,))
    return (fused_drop_path_add(x, residual, 0.5, seed=3, backend=backend),
            torch.where(_kept(64, 3)[:, 0], residual + 2 * x, residual))


def _zero_features(backend):
    return fused_drop_path_add(torch.randn(4, 0), torch.randn(4, 0), 0.5, backend=backend), torch.empty(4, 0)


def _expanded(backend):
    x, residual = random_tensor((3,)).expand(16, 3), random_tensor((16, 1)).expand(16, 3)
    return (fused_drop_path_add(x, residual, 0.5, seed=2, backend=backend),
            fused_drop_path_add(x.contiguous(), residual.contiguous(), 0.5, seed=2, backend=backend))


def _python_number_p(backend):
    x, residual = random_tensor((32, 3)), random_tensor((32, 3))
    got = [fused_drop_path_add(x, residual, p, seed=4, backend=backend) for p in (1, 0, np.float64(0.3))]
    return torch.stack(got), torch.stack([residual, residual + x, fused_drop_path_add(x, residual, 0.3, seed=4,
                                                                                      backend=backend)])


# Valid inputs at the edge, with the result docs/design.md's guarantees give them: NaN/Inf in a kept row or
# in the residual propagate (ReLU keeps NaN); any 1-d or zero-size shape; stride-0 views; int and
# NumPy p.
EDGE_CASES = [_nonfinite_x, _nan_residual_through_relu, _one_dimensional, _zero_features, _expanded, _python_number_p]


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda case: case.__name__.strip("_"))
def test_valid_edge_input_gives_its_documented_result(backend, case):
    got, expected = case(backend)
    assert_matches(got, expected)


@pytest.mark.parametrize("x_dtype, r_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                              (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_output_dtype_is_result_type(backend, x_dtype, r_dtype):
    x, residual = random_tensor((4, 3), x_dtype), random_tensor((4, 3), r_dtype)
    out = fused_drop_path_add(x, residual, 0.5, seed=1, backend=backend)
    assert out.dtype == torch.result_type(x, residual)


def test_output_keeps_residual_memory_format(backend):
    x = random_tensor((4, 3, 5, 6))
    residual = random_tensor((4, 3, 5, 6), layout="channels_last")
    out = fused_drop_path_add(x, residual, 0.5, seed=1, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.stride() == residual.stride()


def test_unary_drop_path_returns_input_when_nothing_is_drawn(backend):
    x = random_tensor((4, 3))
    assert drop_path(x, 0.5, training=False, backend=backend) is x
    assert drop_path(x, 0.0, backend=backend) is x
    assert_matches(drop_path(x, 0.5, training=False, scale_by_keep=False, backend=backend), 0.5 * x)


def test_probability_as_tensor_equals_float(backend):
    x, residual = random_tensor((32, 3)), random_tensor((32, 3))
    a = fused_drop_path_add(x, residual, 0.25, seed=5, backend=backend)
    b = fused_drop_path_add(x, residual, torch.tensor(0.25), seed=5, backend=backend)
    assert_matches(a, b, exact=True)


@pytest.mark.parametrize("x_grad, r_grad", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradients_only_where_asked(backend, x_grad, r_grad, activation):
    x0, r0 = random_tensor((16, 5)), random_tensor((16, 5))
    x, residual = x0.clone().requires_grad_(x_grad), r0.clone().requires_grad_(r_grad)
    out = fused_drop_path_add(x, residual, 0.5, seed=3, activation=activation, backend=backend)
    assert out.requires_grad == (x_grad or r_grad)
    if not out.requires_grad:
        return
    both = (x0.requires_grad_(), r0.requires_grad_())
    expected = torch.autograd.grad(fused_drop_path_add(*both, 0.5, seed=3, activation=activation,
                                                       backend="reference").sum(), both)
    asked = [i for i, wanted in enumerate((x_grad, r_grad)) if wanted]
    got = torch.autograd.grad(out.sum(), [(x, residual)[i] for i in asked])
    for i, grad in zip(asked, got):
        assert_matches(grad, expected[i])


@pytest.mark.parametrize("training, p", [(True, 0.0), (False, 0.3)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_unit_factor_backward_launches_no_kernel(backend, training, p, activation):
    """Where every factor is 1 (p = 0, or eval with scale_by_keep), x's gradient is the residual's:
    without activation the upstream gradient itself, with ReLU one threshold pass shared by both."""
    if backend == "reference":
        pytest.skip("the reference's backward is PyTorch's own")
    x, residual = (random_tensor((16, 5)).requires_grad_() for _ in range(2))
    grad = random_tensor((16, 5))
    out = fused_drop_path_add(x, residual, p, training=training, activation=activation, backend=backend)
    grad_x, grad_residual = torch.autograd.grad(out, (x, residual), grad)
    assert grad_x.data_ptr() == grad_residual.data_ptr()
    if activation is None:
        assert grad_x.data_ptr() == grad.data_ptr()
    expected = torch.where(out > 0, grad, 0.0) if activation else grad
    assert_matches(grad_x, expected, exact=True)
