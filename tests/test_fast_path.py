"""The C++ fast path of the public functions (csrc/python_module.cpp): it serves plain eager calls
with what the Python path gives (outputs, gradients, masks, the generator's draws), and hands every
other call back to Python (None), which serves it or raises the error test_validation.py checks."""
import pytest
import torch

from stochdepth_kernels import _C, drop_path, fused_drop_path_add, functional
from stochdepth_kernels.seeding import record_then_replay_masks
from test_gpu_kernels import captured_graph
from helpers import DTYPES, LAYOUTS, assert_matches, random_tensor

SHAPE = (6, 3, 4, 5)


def _leaves(dtype=torch.float32, layout="contiguous"):
    x, r = (random_tensor(SHAPE, dtype, layout).requires_grad_() for _ in range(2))
    return x, r


def _output_and_grads(call, x, r, g):
    torch.manual_seed(11)
    out = call(x, r)
    return (out, *torch.autograd.grad(out, (x, r), g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p, training, mode, activation", [(0.0, True, "row", None), (0.3, True, "row", "relu"),
                                                         (0.5, True, "batch", None), (1.0, True, "row", "relu"),
                                                         (0.3, False, "row", "relu")])
def test_fast_path_equals_the_python_path(dtype, layout, p, training, mode, activation):
    x, r = _leaves(dtype, layout)
    g = torch.randn(SHAPE, dtype=dtype)
    kwargs = dict(training=training, mode=mode, activation=activation)
    fast = _output_and_grads(lambda x, r: fused_drop_path_add(x, r, p, **kwargs), x, r, g)
    python = _output_and_grads(lambda x, r: fused_drop_path_add(x, r, p, backend="cpu", **kwargs), x, r, g)
    for name, a, b in zip(("out", "grad_x", "grad_residual"), fast, python):
        assert_matches(a, b, name, exact=True)
    assert fast[0].stride() == python[0].stride()


def test_plain_calls_never_reach_the_python_path(monkeypatch):
    def python_path(*args, **kwargs):
        raise AssertionError("the Python path ran")

    monkeypatch.setattr(functional, "_prepare_call", python_path)
    x, r = _leaves()
    generator = torch.Generator().manual_seed(3)
    fused_drop_path_add(x, r, 0.2, activation="relu", generator=generator).sum().backward()
    fused_drop_path_add(x, r, torch.tensor(0.2, dtype=torch.float64), seed=torch.tensor([5]))
    fused_drop_path_add(x, r, 0.2, seed=7, training=False, scale_by_keep=False)
    drop_path(x, 0.2, mode="batch", seed=9)
    assert drop_path(x, 0.2, training=False) is x  # as timm: x itself when the factor is 1


def test_the_generator_and_the_rank_offset_give_the_python_paths_seed():
    x, r = (t.detach() for t in _leaves())
    fast = _C.try_drop_path_add(x, r, 0.5, True, "row", True, None, torch.Generator().manual_seed(4), None, 12345)
    drawn = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(4))
    python = fused_drop_path_add(x, r, 0.5, seed=drawn ^ 12345, backend="cpu")
    assert_matches(fast, python, exact=True)


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("change", ["subclass", "int p", "p requires grad", "p out of range", "int training",
                                    "mode", "activation", "cuda generator", "bool seed", "seed too large",
                                    "int32 seed", "int tensor", "shapes", "0-d"])
def test_other_calls_are_handed_back_to_python(change):
    x, r = (t.detach() for t in _leaves())
    args = dict(x=x, residual=r, p=0.1, training=True, mode="row", scale_by_keep=True, activation=None,
                generator=None, seed=None)
    args.update({
        "subclass": dict(x=x.as_subclass(_Subclass)), "int p": dict(p=0),
        "p requires grad": dict(p=torch.tensor(0.1, requires_grad=True)), "p out of range": dict(p=1.5),
        "int training": dict(training=1), "mode": dict(mode="rows"), "activation": dict(activation="gelu"),
        "cuda generator": dict(generator=object()), "bool seed": dict(seed=True), "seed too large": dict(seed=2**63),
        "int32 seed": dict(seed=torch.tensor([1], dtype=torch.int32)), "int tensor": dict(x=x.long()),
        "shapes": dict(residual=r[:1]), "0-d": dict(x=x[0, 0, 0, 0], residual=r[0, 0, 0, 0]),
    }[change])
    assert _C.try_drop_path_add(*args.values(), 0) is None


def test_a_backend_override_or_a_seed_tape_takes_the_python_path(monkeypatch):
    x, r = (t.detach() for t in _leaves())
    monkeypatch.setenv("STOCHDEPTH_BACKEND", "reference")
    assert _C.try_drop_path_add(x, r, 0.1, True, "row", True, None, None, None, 0) is None
    monkeypatch.setenv("STOCHDEPTH_BACKEND", "auto")
    assert _C.try_drop_path_add(x, r, 0.1, True, "row", True, None, None, None, 0) is not None
    calls = []
    run = record_then_replay_masks(lambda: calls.append(functional._fast_path_open("auto")))
    run()
    assert calls == [False]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_fast_path_on_cuda_equals_the_python_path_and_replays_in_a_cuda_graph(dtype, layout):
    x, r = (random_tensor(SHAPE, dtype, layout, device="cuda").requires_grad_() for _ in range(2))
    g = torch.randn(SHAPE, dtype=dtype, device="cuda")
    for p, activation in ((0.3, "relu"), (0.3, None), (0.0, "relu")):
        torch.cuda.manual_seed(11)
        fast = fused_drop_path_add(x, r, p, activation=activation)
        torch.cuda.manual_seed(11)
        python = fused_drop_path_add(x, r, p, activation=activation, backend="cuda")
        for name, a, b in zip(("out", "grad_x", "grad_residual"), (fast, *torch.autograd.grad(fast, (x, r), g)),
                              (python, *torch.autograd.grad(python, (x, r), g))):
            assert_matches(a, b, name, exact=True)
    graph_out = torch.empty(SHAPE, dtype=dtype, device="cuda")

    def step():
        graph_out.copy_(fused_drop_path_add(x.detach(), r.detach(), 0.5))

    graph, _ = captured_graph(step)
    kept = set()
    for _ in range(4):
        graph.replay()
        kept.add(tuple((graph_out != r.detach()).flatten(1).any(1).tolist()))
    assert len(kept) > 1, "every replay kept the same rows: the seed was frozen into the graph"
