"""What is particular to the fused CPU kernel: threads, gradcheck, opcheck of the native ops,
compile, the build per instruction set. The grid and the random inputs against the reference are
in test_kernels_match_reference.py."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_matches, random_tensor, with_reference
from stochdepth_kernels import drop_path, fused_drop_path_add, relu_mask
from stochdepth_kernels.ops import ops

SHAPE = (7, 3, 5, 6)  # odd sizes: no row is a multiple of a vector width


def test_many_rows_across_threads_match_reference():
    x, residual = random_tensor((3001, 40)), random_tensor((3001, 40))  # > one parallel grain
    out, expected = with_reference("cpu", fused_drop_path_add, x, residual, 0.2, seed=42, activation="relu")
    assert_matches(out, expected, exact=True)
    one_sample = random_tensor((1, 70001)), random_tensor((1, 70001))  # one row split across threads
    out, expected = with_reference("cpu", fused_drop_path_add, *one_sample, 0.5, seed=3)
    assert_matches(out, expected, exact=True)
    seed, p = torch.tensor([3]), torch.tensor(0.5, dtype=torch.float64)
    for pair in ((x, residual), one_sample):  # threads split runs at whole mask bytes
        out, mask = ops.drop_path_add(*pair, seed, p, True, "row", True, True, True)
        assert torch.equal(mask, relu_mask.pack(out))


def test_mixed_dtype_gradients_have_input_dtypes():
    x = random_tensor(SHAPE, torch.bfloat16).requires_grad_()
    residual = random_tensor(SHAPE, torch.float32).requires_grad_()
    fused_drop_path_add(x, residual, 0.5, seed=3, activation="relu", backend="cpu").sum().backward()
    assert x.grad.dtype == torch.bfloat16 and residual.grad.dtype == torch.float32


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("p, training", [(0.5, True), (0.5, False)])
def test_gradcheck_fp64(activation, mode, p, training):
    x = random_tensor((6, 3, 4), torch.float64).requires_grad_()
    residual = random_tensor((6, 3, 4), torch.float64).requires_grad_()

    def fused(x, residual):
        return fused_drop_path_add(x, residual, p, training=training, mode=mode, activation=activation,
                                   seed=21, backend="cpu")

    assert torch.autograd.gradcheck(fused, (x, residual))
    assert torch.autograd.gradcheck(lambda x: drop_path(x, p, training=training, mode=mode, seed=21,
                                                        scale_by_keep=False, backend="cpu"), (x,))
    assert torch.autograd.gradgradcheck(lambda x: drop_path(x, p, mode=mode, seed=21, backend="cpu"), (x,))


def _coin(training=True, p=0.5):
    return torch.tensor([123456789], dtype=torch.int64) if training else None, torch.tensor(p, dtype=torch.float64)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float64)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu, save_relu_mask", [(False, False), (True, True)])
def test_opcheck_drop_path_add(dtypes, layout, training, relu, save_relu_mask):
    x = random_tensor(SHAPE, dtypes[0], layout).requires_grad_()
    residual = random_tensor(SHAPE, dtypes[1], layout).requires_grad_()
    seed, p = _coin(training)
    torch.library.opcheck(ops.drop_path_add.default, (x, residual, seed, p, training, "row", True, relu, save_relu_mask))


def test_opcheck_drop_path_add_relu_in_eval_without_mask():
    """Where every factor is 1 the ReLU backward needs no mask: one threshold pass over the output."""
    x, residual = random_tensor(SHAPE).requires_grad_(), random_tensor(SHAPE).requires_grad_()
    torch.library.opcheck(ops.drop_path_add.default, (x, residual, None, *_coin(False)[1:], False, "row", True, True))


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_opcheck_drop_path(out_dtype, mode):
    x = random_tensor(SHAPE, torch.float32, "channels_last").requires_grad_()
    seed, p = _coin()
    torch.library.opcheck(ops.drop_path.default, (x, seed, p, True, mode, True, out_dtype))


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_opcheck_relu_backward(dtypes):
    mask = relu_mask.pack(random_tensor(SHAPE, layout="channels_last"))
    grad = random_tensor(SHAPE, torch.promote_types(*dtypes), "channels_last")
    seed, p = _coin()
    torch.library.opcheck(ops.drop_path_add_relu_backward.default,
                          (grad, mask, seed, p, True, "row", True, dtypes[0], dtypes[1]))


def test_compiles_without_graph_break():
    x, residual = random_tensor(SHAPE), random_tensor(SHAPE)
    seed = torch.tensor([5], dtype=torch.int64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, residual):
        return fused_drop_path_add(x, residual, 0.3, activation="relu", seed=seed, backend="cpu")

    assert_matches(step(x, residual), fused_drop_path_add(x, residual, 0.3, activation="relu", seed=5,
                                                          backend="reference"), exact=True)


def test_cpu_kernels_are_the_build_for_this_machine():
    from stochdepth_kernels.ops import CPU_KERNEL_ISA

    x86 = platform.machine() in ("x86_64", "AMD64")
    assert CPU_KERNEL_ISA == ("avx2" if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                              else "default")


BASELINE_BUILD_CHECK = """
import torch, sys
sys.path.insert(0, "tests")
from helpers import DTYPES, LAYOUTS, assert_matches, random_tensor, with_reference
from stochdepth_kernels import drop_path, fused_drop_path_add
from stochdepth_kernels.ops import CPU_KERNEL_ISA
assert CPU_KERNEL_ISA == "default", CPU_KERNEL_ISA
for dtype in DTYPES:
    for layout in LAYOUTS:
        x, r = random_tensor((7, 3, 5, 6), dtype, layout), random_tensor((7, 3, 5, 6), dtype, layout)
        for activation in (None, "relu"):
            assert_matches(*with_reference("cpu", fused_drop_path_add, x, r, 0.5, seed=9, activation=activation))
        assert_matches(*with_reference("cpu", drop_path, x, 0.5, seed=9), exact=True)
        seed, p = torch.tensor([9]), torch.tensor(0.5, dtype=torch.float64)
        from stochdepth_kernels import reference, relu_mask
        out, mask = torch.ops.stochdepth.drop_path_add(x, r, seed, p, True, "row", True, True, True)
        assert torch.equal(mask, relu_mask.pack(out))
        grad = torch.empty_like(out).copy_(random_tensor(x.shape, dtype))
        for got, want in zip(torch.ops.stochdepth.drop_path_add_relu_backward(grad, mask, seed, p, True, "row", True, dtype, dtype),
                             reference.drop_path_add_relu_backward(grad, mask, seed, p, True, "row", True, dtype, dtype)):
            assert_matches(got, want)
"""


def test_baseline_build_matches_reference():
    """The x86-64 baseline build, which this machine's tests otherwise skip when it runs AVX2: every
    dtype and layout against the reference, in a process where ATen reports no vector extension."""
    result = subprocess.run([sys.executable, "-c", BASELINE_BUILD_CHECK], capture_output=True, text=True,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-4000:]
