"""What every test compares with: random inputs in every layout, one comparison that explains its
failures, and the small model the training tests train."""
from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LAYOUTS = ("contiguous", "strided", "channels_last", "batch_inner")
# A drop probability of each kind: none, small, half, all.
PROBABILITIES = (0.0, 0.1, 0.5, 1.0)


def random_tensor(shape, dtype=torch.float32, layout="contiguous", device="cpu", generator=None) -> Tensor:
    """Standard-normal values (never zeros) in ``layout``:
    contiguous; strided (every other column of a wider tensor, not dense); channels_last (4-d);
    batch_inner (dense, but the batch dimension has the smallest stride)."""
    shape = tuple(shape)
    if layout == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, device=device).to(dtype)
        return wide[..., ::2]
    values = torch.randn(shape, generator=generator, device=device).to(dtype)
    if layout == "contiguous":
        return values
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "batch_inner":
        return values.movedim(0, -1).contiguous().movedim(-1, 0)
    raise ValueError(f"unknown layout {layout!r}")


def tolerance(dtype: torch.dtype, roundings: int = 1) -> dict:
    """``roundings`` roundings of the output dtype (one by default: a fused multiply-add may round
    once where the reference rounds twice, which can move the result across one rounding boundary of
    ``dtype``)."""
    eps = torch.finfo(dtype).eps
    return {"rtol": roundings * eps, "atol": 4 * roundings * eps}


def assert_matches(actual: Tensor, expected: Tensor, name: str = "output", *, exact: bool = False,
                   roundings: int = 1) -> None:
    """``actual`` equals ``expected`` (bit for bit if ``exact``, else within :func:`tolerance`), with
    the same shape, dtype and NaN/Inf positions. A failure reports how many elements differ, the
    first indices and values, and where NaN/Inf appear on one side only."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    problems = []
    for label, test in (("NaN", torch.isnan), ("Inf", torch.isinf)):
        only_actual, only_expected = test(a) & ~test(e), test(e) & ~test(a)
        if only_actual.any() or only_expected.any():
            problems.append(f"{label} only in actual at {only_actual.nonzero()[:5].tolist()}, "
                            f"only in expected at {only_expected.nonzero()[:5].tolist()}")
    finite = torch.isfinite(a) & torch.isfinite(e)
    if exact:
        close = a == e
    else:
        tol = tolerance(actual.dtype, roundings)
        close = (a - e).abs() <= tol["atol"] + tol["rtol"] * e.abs()
    bad = finite & ~close
    if bad.any():
        where = bad.nonzero()[:5]
        pairs = [(tuple(i.tolist()), a[tuple(i)].item(), e[tuple(i)].item()) for i in where]
        problems.append(f"{int(bad.sum())}/{a.numel()} elements differ "
                        f"({'exactly' if exact else tolerance(actual.dtype, roundings)}); first (index, actual, expected): {pairs}")
    assert not problems, f"{name}: " + "; ".join(problems)


def kept_rows(dropped_output: Tensor) -> Tensor:
    """The keep mask read off ``drop_path`` of a tensor with no zeros: a row is kept iff it is nonzero."""
    return (dropped_output.flatten(1) != 0).any(dim=1)


def with_reference(backend: str, fn, *args, **kwargs):
    """``(fn(..., backend=backend), fn(..., backend="reference"))``: one call on each, same arguments
    (pass ``seed=`` so both draw the same mask)."""
    return fn(*args, backend=backend, **kwargs), fn(*args, backend="reference", **kwargs)


def registered_ops(backend: str) -> tuple:
    """``(drop_path_add, drop_path, drop_path_add_relu_backward)`` of ``backend`` as registered
    torch.library ops (``drop_path_add`` returns ``(out, relu_mask)``)."""
    if backend == "triton":
        from stochdepth_kernels import triton_backend as t

        return t.triton_drop_path_add, t.triton_drop_path, t.triton_drop_path_add_relu_backward
    if backend in ("cpu", "cuda"):
        namespace = torch.ops.stochdepth
    else:
        import simulated_cuda

        assert backend == simulated_cuda.NAME, backend
        simulated_cuda.backend()  # builds and registers the simulated ops
        namespace = torch.ops.stochdepth_cuda_on_cpu
    return namespace.drop_path_add.default, namespace.drop_path.default, namespace.drop_path_add_relu_backward.default


def registered_subset_ops(backend: str) -> tuple:
    """``(subset_rows, subset_add, subset_gather, subset_add_relu_backward, subset_scatter)`` of
    ``backend`` as registered torch.library ops (the simulated CUDA kernels have no subset_rows: None)."""
    if backend == "triton":
        from stochdepth_kernels import triton_backend as t

        return (t.triton_subset_rows, t.triton_subset_add, t.triton_subset_gather, t.triton_subset_add_relu_backward,
                t.triton_subset_scatter)
    if backend in ("cpu", "cuda"):
        namespace = torch.ops.stochdepth
        rows = namespace.subset_rows.default
    else:
        import simulated_cuda

        assert backend == simulated_cuda.NAME, backend
        simulated_cuda.backend()
        namespace, rows = torch.ops.stochdepth_cuda_on_cpu, None
    return (rows, namespace.subset_add.default, namespace.subset_gather.default,
            namespace.subset_add_relu_backward.default, namespace.subset_scatter.default)


def small_resnet(method: str = "sample") -> torch.nn.Module:
    """torchvision's ResNet-18 (4 classes), the same weights on every call (``torch.manual_seed(0)``),
    given stochastic depth at rate 0.5 by surgery with ``method``."""
    import torchvision

    from stochdepth_kernels.surgery import apply_drop_path

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    apply_drop_path(model, 0.5, stochastic_method=method, convention="paper")
    return model


def flat_parameters(model: torch.nn.Module) -> Tensor:
    """Every parameter of ``model``, detached, in one 1-d tensor."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def spy_on_drop_calls(monkeypatch) -> list[str]:
    """The names of ``DropPathAdd.unary`` and ``DropPathAdd.add_branch`` calls, in order, from now on
    (which path a rewritten block took: its fused tails, or its class's own forward with unary drops)."""
    from stochdepth_kernels import DropPathAdd

    calls = []
    for name in ("unary", "add_branch"):
        monkeypatch.setattr(DropPathAdd, name, lambda self, *args, _method=getattr(DropPathAdd, name), _name=name,
                            **kwargs: calls.append(_name) or _method(self, *args, **kwargs))
    return calls


class GraphRecorder:
    """A torch.compile backend (AOT autograd, no code generation) that keeps the graphs it gets."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs.append(graph)
        return aot_eager(graph, example_inputs)

    def conds(self) -> int:
        """How many ``torch.cond`` the graphs hold."""
        return sum(node.target is torch.ops.higher_order.cond for graph in self.graphs for node in graph.graph.nodes)
