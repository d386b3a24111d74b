"""What every GPU kernel backend (Triton, CUDA) must pass on a GPU (marker ``cuda``): opcheck of its
registered ops, a torch.compile(fullgraph=True) trace with a tensor p, a captured forward+backward
replayed with fresh masks, int64 indexing, and compute-sanitizer's memcheck and racecheck."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from helpers import assert_matches, kept_rows, random_tensor, registered_ops, registered_subset_ops
from stochdepth_kernels import (StochasticDepth, available_backends, drop_path, drop_path_add_subset,
                                fused_drop_path_add, reference, relu_mask)
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


def captured_graph(step):
    """``(graph, outputs)`` of ``step`` captured in a CUDA graph, after a warm-up (and Triton's
    autotuning) on a side stream outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


def test_cuda_graph_of_forward_and_backward_draws_a_fresh_mask_each_replay(backend):
    x, residual = (random_tensor((64, 8, 8), device="cuda").requires_grad_() for _ in range(2))

    def step():
        seed = draw_seed(x.device)
        out = fused_drop_path_add(x, residual, 0.5, activation="relu", seed=seed, backend=backend)
        return (seed, out, *torch.autograd.grad(out, (x, residual), torch.ones_like(out)))

    graph, captured = captured_graph(step)
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


def test_subset_ops_opcheck_compile_and_cuda_graph(backend, monkeypatch):
    """The subset method's ops (opcheck), a compiled subset block (fullgraph: eager's rows for one
    seed, no recompile on a second step), and a captured forward+backward whose replays draw new rows."""
    rows_op, add, gather, relu_backward, scatter = registered_subset_ops(backend)
    seed = torch.tensor([5], device="cuda")
    assert torch.equal(rows_op(seed, 300, 211).cpu(), reference.subset_rows(seed.cpu(), 300, 211))
    rows = rows_op(seed, 8, 6)
    y = random_tensor((6, 16, 9, 9), torch.bfloat16, "channels_last", device="cuda").requires_grad_()
    residual = random_tensor((8, 16, 9, 9), torch.float32, "channels_last", device="cuda").requires_grad_()
    torch.library.opcheck(rows_op, (seed, 8, 6))
    torch.library.opcheck(add, (y, residual, rows, 8 / 6, True, True))
    torch.library.opcheck(gather, (random_tensor((8, 16, 9, 9), device="cuda").requires_grad_(), rows, 8 / 6,
                                   torch.bfloat16))
    torch.library.opcheck(scatter, (random_tensor((6, 16, 9, 9), device="cuda"), rows, 8, 8 / 6, torch.float32))
    mask = relu_mask.pack(torch.relu(random_tensor((8, 16, 9, 9), device="cuda")))
    torch.library.opcheck(relu_backward, (random_tensor((8, 16, 9, 9), device="cuda"), mask, rows, 8 / 6,
                                          torch.bfloat16, torch.float32))

    monkeypatch.setenv("STOCHDEPTH_BACKEND", backend)
    torch.manual_seed(0)
    block = StochasticDepth(torch.nn.Linear(16, 16), p=0.25, mode="subset", activation="relu").cuda()
    compiled = torch.compile(block, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(2):
            x = torch.randn(8, 5, 16, device="cuda", requires_grad=True)
            torch.manual_seed(step)
            got = compiled(x)
            torch.manual_seed(step)
            assert_matches(got, block(x))

    x, residual = (random_tensor((64, 8, 8), device="cuda").requires_grad_() for _ in range(2))
    weight = torch.randn(8, device="cuda", requires_grad=True)

    def step():
        seed = draw_seed(x.device)
        out = drop_path_add_subset(lambda t: t * weight, x, residual, 0.5, activation="relu", seed=seed,
                                   backend=backend)
        return (seed, out, *torch.autograd.grad(out, (x, residual, weight), torch.ones_like(out)))

    graph, captured = captured_graph(step)
    seeds = set()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seed = captured[0].clone()
        inputs = tuple(t.detach().requires_grad_() for t in (x, residual, weight))
        expected = drop_path_add_subset(lambda t: t * inputs[2], inputs[0], inputs[1], 0.5, activation="relu",
                                        seed=seed, backend="reference")
        expected = (expected, *torch.autograd.grad(expected, inputs, torch.ones_like(expected)))
        for name, got, want in zip(["out", "grad_x", "grad_residual", "grad_weight"], captured[1:], expected):
            torch.testing.assert_close(got, want, msg=name)
        seeds.add(int(seed))
    assert len(seeds) == 3, "a replay reused the seed"


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


# Every pack path of the CUDA kernel (chunked, 16-byte, unaligned, element by element) and, with ReLU
# and requires_grad, the sign-mask write and the backward that reads it; a view for the unary op.
SANITIZED_CALLS = """
import sys, torch
from stochdepth_kernels import drop_path, fused_drop_path_add
backend = sys.argv[1]
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for shape in ((9, 1031), (5, 4096), (37, 3, 5, 7)):
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        r = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        for activation in (None, "relu"):
            fused_drop_path_add(x, r, 0.5, activation=activation, backend=backend).sum().backward()
        drop_path(x[:, 1:], 0.5, backend=backend).sum().backward()
torch.cuda.synchronize()
"""


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_is_clean(backend, tool):
    sanitizer = shutil.which("compute-sanitizer") or str(Path(cpp_extension.CUDA_HOME or "/nonexistent")
                                                           / "bin" / "compute-sanitizer")
    if not Path(sanitizer).exists():
        pytest.skip("compute-sanitizer is not installed")
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # each tensor its own allocation
    result = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", SANITIZED_CALLS,
                             backend], capture_output=True, text=True, timeout=900, env=env)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-8000:]
    # memcheck: "ERROR SUMMARY: 0 errors"; racecheck: "RACECHECK SUMMARY: 0 hazards displayed (0 errors, ...".
    assert re.search(r"ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards displayed \(0 errors", report), report
