"""The op microbenchmarks through pytest-benchmark, for tracking regressions with it:

    pytest bench/ --benchmark-only [--benchmark-autosave | --benchmark-compare]

One benchmark per tensor, dtype, pass and implementation at p=0.1 with ReLU, grouped by tensor,
dtype and pass; and a call's fixed cost on small tensors (bench/fixed_cost.py). Not part of `make test` (which runs tests/); `make bench` is the full report."""
import pytest
import torch

from bench import cases, fixed_cost
from bench.implementations import AGAIN, COMPILED, implementations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TENSORS = ("ResNet-50 stage 2", "ViT-B/16 tokens", "Swin-T stage 1")
NAMES = [name for name in implementations(DEVICE, 0.1, "relu", with_compile=False) if not name.endswith(AGAIN)]


def _synchronised(fn):
    if DEVICE.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(DEVICE))


@pytest.mark.parametrize("pass_name", cases.PASSES)
@pytest.mark.parametrize("name", NAMES + [COMPILED])
@pytest.mark.parametrize("dtype", cases.DTYPES[DEVICE.type])
@pytest.mark.parametrize("label", TENSORS)
def test_fused_drop_path_add(benchmark, label, dtype, name, pass_name):
    if name == COMPILED and pass_name == "backward":
        pytest.skip("torch.compile's backward runs once per forward (its saved buffers are donated)")
    case = cases.Case(label, (cases.BATCH[DEVICE.type], *cases.MODEL_TENSORS[label]), dtype, 0.1, "relu")
    benchmark.group = f"{label} {case.shape} {dtype} {pass_name}"
    benchmark.extra_info["minimal_bytes"] = cases.minimal_bytes(pass_name, case)
    fn = implementations(DEVICE, case.p, case.activation)[name]
    x, r, g = (torch.randn(case.shape, dtype=getattr(torch, dtype), device=DEVICE) for _ in range(3))
    x.requires_grad_()
    r.requires_grad_()
    if pass_name == "forward":
        def call():
            with torch.no_grad():
                return fn(x, r)
    elif pass_name == "backward":
        out = fn(x, r)
        call = lambda: torch.autograd.grad(out, (x, r), g, retain_graph=True)  # noqa: E731
    else:
        call = lambda: torch.autograd.grad(fn(x, r), (x, r), g)  # noqa: E731
    benchmark.pedantic(_synchronised(call), warmup_rounds=3, rounds=20)


@pytest.mark.parametrize("pass_name", fixed_cost.PASSES)
@pytest.mark.parametrize("name", list(fixed_cost.implementations()))
@pytest.mark.parametrize("label", list(fixed_cost.SHAPES[DEVICE.type]))
def test_fixed_cost(benchmark, label, name, pass_name):
    """A call's fixed cost (bench/fixed_cost.py): small tensors, p = 0.1, no activation."""
    shape = fixed_cost.SHAPES[DEVICE.type][label]
    benchmark.group = f"fixed cost {label} {pass_name}"
    x, r, g = fixed_cost._leaves(shape, getattr(torch, fixed_cost.DTYPES[DEVICE.type]), DEVICE)
    call = fixed_cost.passes(fixed_cost.implementations()[name], x, r, g)[pass_name]
    benchmark.pedantic(_synchronised(call), warmup_rounds=10, rounds=200)
