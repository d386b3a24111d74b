"""The CUDA kernels run on the CPU (tests/cuda_kernel_on_cpu.cpp builds them with a sequential
launcher) as a backend the tests can select, so CI checks the kernels' indexing without a GPU."""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

from stochdepth_kernels import reference
from stochdepth_kernels.backends import Backend
from stochdepth_kernels.ops import (eager_autograd, eager_rows_autograd, eager_subset_autograd,
                                    register_drop_path_autograd, register_rows_autograd, register_subset_autograd)

NAME = "cuda-kernel-on-cpu"
ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def backend() -> Backend:
    """Builds the simulator (~10 s; a fresh directory, so an edited header is never a stale build; removed
    when the process ends)."""
    directory = tempfile.mkdtemp(prefix="cuda_kernel_on_cpu_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    cpp_extension.load(name="stochdepth_cuda_kernel_on_cpu", sources=[str(ROOT / "tests" / "cuda_kernel_on_cpu.cpp")],
                       extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O1"], is_python_module=False,
                       build_directory=directory)
    ops = torch.ops.stochdepth_cuda_on_cpu
    registered = (ops.drop_path_add.default, ops.drop_path.default, ops.drop_path_add_relu_backward.default)
    subset = (ops.subset_add.default, ops.subset_gather.default, ops.subset_add_relu_backward.default)
    rows = (ops.subset_gather.default, ops.subset_scatter.default)
    # The CUDA selection (a uniforms kernel, then ATen's sort) runs on a GPU only: the rows come from
    # the reference here, the kernels' indexing is what this backend checks.
    return Backend(NAME, ("cpu",), register_drop_path_autograd(*registered), eager_autograd(*registered),
                   (reference.subset_rows, register_subset_autograd(*subset), register_rows_autograd(*rows)),
                   (reference.subset_rows, eager_subset_autograd(*subset), eager_rows_autograd(*rows)))
