"""The subset method (stochdepth_kernels/subset.py): the rule for k, the kept rows of every backend
against the reference's, the fused subset add and its gradients against the reference over dtypes,
layouts, p, training/eval and ReLU, gradcheck and opcheck, the kept fraction and unbiasedness,
the modules, recompute and torch.compile, and the errors."""
import math
import warnings

import pytest
import torch

import simulated_cuda
from helpers import DTYPES, LAYOUTS, assert_matches, random_tensor, registered_subset_ops
from stochdepth_kernels import (DropPath, DropPathAdd, StochasticDepth, drop_path_add_subset, effective_drop_rate,
                                fused_drop_path_add, reference, relu_mask, same_masks_on_recompute, subset_size)
from stochdepth_kernels.backends import BACKENDS
from test_kernels_match_reference import kernel  # noqa: F401  (the backend fixture: every kernel)

native = torch.ops.stochdepth
# (p, training): none, small, half, all in training; eval.
RATES = [(0.0, True), (0.1, True), (0.5, True), (1.0, True), (0.5, False)]


def shape_for(kernel):
    if kernel[1] == "cuda":
        return (37, 64, 28, 27)
    return (5, 3, 31, 41) if kernel[0] == simulated_cuda.NAME else (7, 3, 5, 6)


def interpreter_truncates(kernel, *dtypes) -> bool:
    """The Triton interpreter truncates float32 -> 16-bit stores (its own conversion, the GPU's rounds
    to nearest): each result may be 1 ulp off the reference, within the tolerance of assert_matches,
    but a branch's backward sums such gradients over rows, so the weights' gradient is not compared."""
    return kernel == ("triton", "cpu") and any(d in (torch.float16, torch.bfloat16) for d in dtypes)


def subset_call(backend, h0, r0, w0, p, grad, **kwargs):
    """``drop_path_add_subset`` of the branch ``h * w`` on fresh leaves (input ``h``, residual ``r``,
    weight ``w``); returns the output and the gradients of h, r and w."""
    h, r, w = (t.detach().requires_grad_() for t in (h0, r0, w0))
    out = drop_path_add_subset(lambda t: t * w, h, r, p, backend=backend, **kwargs)
    out.backward(grad)
    return out, h.grad, r.grad, w.grad


def test_subset_size_rule():
    assert [subset_size(16, p) for p in (0.0, 0.001, 0.03, 0.1, 0.2, 0.5, 0.97, 0.999, 1.0)] == \
        [16, 15, 15, 14, 13, 8, 1, 1, 0]
    assert [subset_size(1, p) for p in (0.0, 0.5, 0.99, 1.0)] == [1, 1, 1, 0]
    assert subset_size(0, 0.5) == 0 and subset_size(10, 0.25) == 8  # 7.5 rounds half up
    for batch in range(2, 40):
        for p in torch.linspace(0.001, 0.999, 57).tolist():
            k = subset_size(batch, p)
            assert 1 <= k <= batch - 1
            assert abs(k - batch * (1 - p)) <= 0.5 or k in (1, batch - 1)
    assert effective_drop_rate(16, 0.1) == 1 - 14 / 16 and effective_drop_rate(0, 0.3) == 0.3


@pytest.mark.parametrize("args, error, match", [
    ((16, 1.5), ValueError, r"p must be a probability in \[0, 1\], got 1.5"),
    ((16, float("nan")), ValueError, "p must be a probability"),
    ((-1, 0.5), ValueError, "batch must be a non-negative int, got -1"),
    ((16.0, 0.5), ValueError, "batch must be a non-negative int, got 16.0"),
    ((16, "0.5"), TypeError, "p must be a float, got str"),
])
def test_subset_size_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        subset_size(*args)


def test_rows_match_reference(kernel):
    backend, device = kernel
    for seed in (0, 1, 2**31 + 7, 2**62 + 12345):
        seed_t = torch.tensor([seed], device=device)
        for batch in (1, 2, 7, 64, 1000):
            for kept in sorted({0, 1, batch // 2, batch - 1, batch}):
                rows = BACKENDS[backend].subset_rows(seed_t, batch, kept)
                expected = reference.subset_rows(seed_t.cpu(), batch, kept)
                assert rows.dtype == torch.int64 and rows.device.type == device
                assert torch.equal(rows.cpu(), expected), (seed, batch, kept)


def test_reference_rows_are_the_smallest_uniforms_ties_by_index():
    seed = torch.tensor([99])
    uniforms = reference.philox_uniform(seed, torch.arange(50))
    rows = reference.subset_rows(seed, 50, 20)
    assert torch.equal(rows, torch.sort(rows).values) and rows.unique().numel() == 20
    assert uniforms[rows].max() < uniforms[[b for b in range(50) if b not in rows.tolist()]].min()
    # A prefix of a larger draw: the rows kept at k are kept at every larger k.
    assert set(rows.tolist()) <= set(reference.subset_rows(seed, 50, 30).tolist())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p, training", RATES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_subset_add_and_gradients_match_reference(kernel, dtype, layout, p, training, activation):
    if kernel == ("triton", "cpu") and layout == "batch_inner":
        pytest.skip("batch_inner under the Triton interpreter: the kernels see a contiguous copy, as in strided")
    backend, device = kernel
    shape = shape_for(kernel)
    h0, r0 = (random_tensor(shape, dtype, layout, device=device) for _ in range(2))
    w0 = random_tensor(shape[1:], dtype, device=device)
    grad = random_tensor(shape, dtype, device=device)
    kwargs = dict(training=training, activation=activation, seed=2**33 + 5)
    out, gh, gr, gw = subset_call(backend, h0, r0, w0, p, grad, **kwargs)
    expected, eh, er, ew = subset_call("reference", h0, r0, w0, p, grad, **kwargs)
    assert_matches(out, expected)
    assert out.stride() == expected.stride()
    assert_matches(gr, er, "grad_residual")
    if p == 1.0 and training:  # the branch did not run
        assert gh is None and eh is None and gw is None and ew is None
        return
    # Truncated, the gradient reaching the branch may be 1 ulp off; times w, then rounded: 2 ulp.
    assert_matches(gh, eh, "grad_h", roundings=2 if interpreter_truncates(kernel, dtype) else 1)
    if not interpreter_truncates(kernel, dtype):
        assert_matches(gw, ew, "grad_w")


@pytest.mark.parametrize("y_dtype, r_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                              (torch.float64, torch.float32), (torch.bfloat16, torch.float64)])
@pytest.mark.parametrize("shape", [(6, 17, 24), (4, 7, 7, 16)], ids=["vit-tokens", "swin-nhwc"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_mixed_dtypes_tokens_and_nhwc_match_reference(kernel, y_dtype, r_dtype, shape, activation):
    backend, device = kernel
    h0, r0 = (random_tensor(shape, r_dtype, device=device) for _ in range(2))
    w0 = random_tensor(shape[1:], y_dtype, device=device)
    grad = random_tensor(shape, torch.promote_types(y_dtype, r_dtype), device=device)
    results = []
    for name in (backend, "reference"):
        h, r, w = (t.detach().requires_grad_() for t in (h0, r0, w0))
        out = drop_path_add_subset(lambda t: t.to(y_dtype) * w, h, r, 0.4, activation=activation, seed=123,
                                   backend=name)
        out.backward(grad)
        results.append((out, h.grad, r.grad, w.grad))
    for label, got, want in zip(("output", "grad_h", "grad_residual", "grad_w"), *results):
        # grad_h holds y's 16-bit gradient in r's dtype: the interpreter's truncation exceeds r's tolerance.
        if label in ("output", "grad_residual") or not interpreter_truncates(kernel, y_dtype, r_dtype):
            assert_matches(got, want, label)


@pytest.mark.parametrize("kept", [0, 1, 4, 7])
def test_registered_ops_match_reference(kernel, kept):
    """The three ops called directly, the ReLU mask too, and the gather bit for bit (one multiply)."""
    backend, device = kernel
    _, add, gather, relu_backward, _ = registered_subset_ops(backend)
    residual = random_tensor((7, 3, 5, 6), device=device)
    y = random_tensor((kept, 3, 5, 6), torch.bfloat16, "channels_last", device=device)
    rows = reference.subset_rows(torch.tensor([kept + 1]), 7, kept).to(device)
    scale = 7 / kept if kept else 1.0
    out, mask = add(y, residual, rows, scale, True, True)
    assert_matches(out, reference.subset_add(y, residual, rows, scale, True))
    assert torch.equal(mask, relu_mask.pack(out))
    grad = random_tensor((7, 3, 5, 6), device=device)
    exact = not interpreter_truncates(kernel, torch.bfloat16)
    assert_matches(gather(grad, rows, scale, torch.bfloat16), reference.subset_gather(grad, rows, scale, torch.bfloat16),
                   exact=exact)
    for got, want in zip(relu_backward(grad, mask, rows, scale, torch.bfloat16, torch.float32),
                         reference.subset_add_relu_backward(grad, mask, rows, scale, torch.bfloat16, torch.float32)):
        assert_matches(got, want, exact=exact)


@pytest.mark.parametrize("kept", [0, 1, 4, 7])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "batch_inner"])
def test_gather_rows_and_its_one_pass_scatter_match_reference(kernel, kept, layout):
    """The kept rows of a branch input (the backend's gather) and their gradient (one scatter pass:
    the rows' gradients, exact zeros elsewhere) against index_select's."""
    if kernel == ("triton", "cpu") and layout == "batch_inner":
        pytest.skip("batch_inner under the Triton interpreter: slow, and a contiguous copy as in channels_last")
    backend, device = kernel
    rows = reference.subset_rows(torch.tensor([kept + 3]), 7, kept).to(device)
    t0 = random_tensor((7, 3, 5, 6), torch.float32, layout, device=device)
    grad = random_tensor((kept, 3, 5, 6), device=device)
    results = []
    for name in (backend, "reference"):
        t = t0.detach().requires_grad_()
        kept_rows = BACKENDS[name].gather_rows(t, rows)
        kept_rows.backward(grad)
        results.append((kept_rows, t.grad))
    (got, got_grad), (want, want_grad) = results
    assert_matches(got, want, "rows", exact=True)
    assert_matches(got_grad, want_grad, "grad", exact=True)
    scatter = registered_subset_ops(backend)[4]
    y = random_tensor((kept, 3, 5, 6), torch.bfloat16, device=device)
    assert_matches(scatter(y, rows, 7, 1.5, torch.float32), reference.subset_scatter(y, rows, 7, 1.5, torch.float32),
                   exact=True)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("p, training", [(0.0, True), (0.4, True), (1.0, True), (0.4, False)])
def test_gradcheck_fp64(kernel, activation, p, training):
    backend, device = kernel
    if kernel == ("triton", "cpu") and p == 0.4 and training:
        shape = (4, 3)  # the interpreter: small
    else:
        shape = (5, 2, 3)
    h = random_tensor(shape, torch.float64, device=device).requires_grad_()
    w = random_tensor(shape[1:], torch.float64, device=device).requires_grad_()

    def block(h, w):
        return drop_path_add_subset(lambda t: torch.tanh(t * w), h, h, p, training=training, activation=activation,
                                    seed=3, backend=backend)

    assert torch.autograd.gradcheck(block, (h, w))
    assert torch.autograd.gradgradcheck(block, (h, w))  # the branch's input gather and the add alike


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "batch_inner"])
@pytest.mark.parametrize("relu, save", [(False, False), (True, False), (True, True)])
def test_opcheck_cpu_ops(layout, relu, save):
    differentiable = save or not relu  # a ReLU backward needs the mask: no gradient without it
    residual = random_tensor((6, 4, 3, 5), torch.float32, layout).requires_grad_(differentiable)
    y = random_tensor((4, 4, 3, 5), torch.bfloat16, layout).requires_grad_(differentiable)
    seed = torch.tensor([17])
    rows = native.subset_rows(seed, 6, 4)
    torch.library.opcheck(native.subset_rows.default, (seed, 6, 4))
    torch.library.opcheck(native.subset_add.default, (y, residual, rows, 1.5, relu, save))
    torch.library.opcheck(native.subset_gather.default, (random_tensor((6, 4, 3, 5), layout=layout).requires_grad_(),
                                                         rows, 1.5, torch.bfloat16))
    torch.library.opcheck(native.subset_scatter.default, (random_tensor((4, 4, 3, 5), layout=layout), rows, 6, 1.5,
                                                          torch.float32))
    grad = random_tensor((6, 4, 3, 5))
    mask = relu_mask.pack(torch.relu(random_tensor((6, 4, 3, 5))))
    torch.library.opcheck(native.subset_add_relu_backward.default, (grad, mask, rows, 1.5, torch.bfloat16,
                                                                    torch.float32))


def test_kept_fraction_and_unbiasedness():
    """Over 4000 seeds each row is kept k / B of the time, every call keeps exactly k rows, and the
    mean output is the unfused ``residual + branch`` (no activation)."""
    batch, p, calls = 10, 0.3, 4000
    kept = subset_size(batch, p)
    y_full = torch.randn(batch, 3, dtype=torch.float64)
    residual = torch.randn(batch, 3, dtype=torch.float64)
    counts = torch.zeros(batch)
    total = torch.zeros(batch, 3, dtype=torch.float64)
    for seed in range(calls):
        out = drop_path_add_subset(lambda t: t, y_full, residual, p, seed=seed, backend="cpu")
        changed = (out != residual).any(dim=1)
        assert int(changed.sum()) == kept
        counts += changed
        total += out
    share = kept / batch
    sigma = math.sqrt(share * (1 - share) / calls)
    assert ((counts / calls - share).abs() < 5 * sigma).all(), counts / calls
    mean_error = (total / calls - (residual + y_full)).abs()
    assert (mean_error < 5 * sigma / share * y_full.abs()).all()


def test_stochastic_depth_module_matches_the_functional_and_skips_at_rate_one():
    branch = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    block = StochasticDepth(branch, p=0.4, mode="subset", activation="relu")
    x = torch.randn(10, 8)
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)
    assert torch.equal(out, drop_path_add_subset(branch, x, x, 0.4, activation="relu"))
    block.drop_prob = 1.0
    x.requires_grad_()
    out = block(x)
    assert torch.equal(out, torch.relu(x))
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in branch.parameters())
    block.eval()
    block.drop_prob = 0.4
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x + branch(x)))


def test_drop_path_add_forward_in_subset_mode_keeps_the_same_rows():
    module = DropPathAdd(0.5, mode="subset")
    x, residual = torch.randn(8, 5), torch.randn(8, 5)
    torch.manual_seed(1)
    out = module(x, residual)
    torch.manual_seed(1)
    assert torch.equal(out, drop_path_add_subset(lambda t: t, x, residual, 0.5))
    assert module.effective_drop_rate(8) == 0.5 and DropPathAdd(0.3).effective_drop_rate(8) == 0.3


def test_a_batch_of_one_warns_that_nothing_is_dropped():
    x = torch.randn(1, 4)
    with pytest.warns(UserWarning, match="cannot drop from a batch of 1"):
        out = drop_path_add_subset(lambda t: 2 * t, x, x, 0.3, seed=1)
    assert torch.equal(out, x + 2 * x)


def test_checkpoint_recompute_sees_the_forwards_rows():
    torch.manual_seed(0)
    block = StochasticDepth(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()), p=0.5, mode="subset")
    x0 = torch.randn(12, 6)
    grads = []
    for how in ("plain", "checkpoint", "checkpoint-tape"):
        x = x0.clone().requires_grad_()
        torch.manual_seed(5)
        if how == "plain":
            out = block(x)
        elif how == "checkpoint":
            out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, preserve_rng_state=False,
                                                    context_fn=same_masks_on_recompute)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad, *(p.grad.clone() for p in block.parameters())))
        block.zero_grad(set_to_none=True)
    for other in grads[1:]:
        for got, want in zip(other, grads[0]):
            assert torch.equal(got, want)


def test_compiled_module_has_static_shapes_and_eager_rows():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = StochasticDepth(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()), p=0.3, mode="subset")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            x = torch.randn(9, 6, requires_grad=True)
            torch.manual_seed(step)
            out = compiled(x)
            out.sum().backward()
            torch.manual_seed(step)
            assert torch.equal(out, block(x)), step


def test_compiled_with_zero_memory_budget_backward_uses_the_forwards_rows():
    """Inductor with ``activation_memory_budget=0`` recomputes the forward in the backward: the
    gradients equal eager's for the same seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = StochasticDepth(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()), p=0.5, mode="subset")
    x0 = torch.randn(10, 6)
    results = []
    with torch._functorch.config.patch(activation_memory_budget=0.0):
        for run in (torch.compile(block, fullgraph=True), block):
            x = x0.clone().requires_grad_()
            torch.manual_seed(11)
            out = run(x)
            out.square().sum().backward()
            results.append((out.detach(), x.grad, *(p.grad.clone() for p in block.parameters())))
            block.zero_grad(set_to_none=True)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_errors_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="p must be a float with the subset method"):
        drop_path_add_subset(lambda t: t, x, x, torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 2.0"):
        drop_path_add_subset(lambda t: t, x, x, 2.0)
    with pytest.raises(TypeError, match="branch must be callable, got int"):
        drop_path_add_subset(3, x, x, 0.5)
    with pytest.raises(ValueError, match=r"inputs\[1\] must have residual's batch of 4"):
        drop_path_add_subset(lambda a, b: a, (x, torch.randn(5, 3)), x, 0.5)
    with pytest.raises(TypeError, match="inputs must be a tensor or a tuple of tensors"):
        drop_path_add_subset(lambda t: t, [x, 1], x, 0.5)
    with pytest.raises(ValueError, match=r"branch must return the 2 kept rows of residual's shape \(4, 3\), got \(4, 3\)"):
        drop_path_add_subset(lambda t: x, x, x, 0.5, seed=1)
    with pytest.raises(ValueError, match="activation must be one of"):
        drop_path_add_subset(lambda t: t, x, x, 0.5, activation="gelu")
    with pytest.raises(ValueError, match="add_branch needs the branch's per-sample inputs"):
        DropPathAdd(0.5, mode="subset").add_branch(lambda: x, x, lambda: [])
    with pytest.raises(ValueError, match="mode must be one of \\['row', 'batch'\\], got 'subset'"):
        DropPath(0.5, mode="subset")
    with pytest.raises(ValueError, match="mode must be one of \\['row', 'batch'\\], got 'subset'"):
        fused_drop_path_add(x, x, 0.5, mode="subset")
    rows = torch.tensor([2, 1])
    with pytest.raises(ValueError, match="rows must be strictly increasing row indices in \\[0, 4\\), got 1 at position 1"):
        native.subset_add(torch.randn(2, 3), x, rows, 2.0, False)
    with pytest.raises(ValueError, match="y must hold the 2 kept rows of residual's shape \\[4, 3\\], got shape \\[3, 3\\]"):
        native.subset_add(torch.randn(3, 3), x, torch.tensor([0, 1]), 2.0, False)
    with pytest.raises(ValueError, match="scale must be positive and finite, got 0.0"):
        native.subset_gather(x, torch.tensor([0, 1]), 0.0, torch.float32)
    with pytest.raises(ValueError, match="kept must be in \\[0, batch\\], got kept=5 and batch=4"):
        native.subset_rows(torch.tensor([1]), 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_path_add_subset(lambda t: t, x, x, 0.5, seed=1)  # no warning for a batch above 1
