"""The CMake build (for libtorch / C++ users) produces a library that torch.ops.load_library loads and
whose op equals the reference."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_matches, random_tensor
from stochdepth_kernels import reference, relu_mask

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the library registers the same stochdepth:: namespace that the
# already-imported package did, and a namespace can be defined once per process.
LOAD_AND_RUN = """
import sys, torch
library, inputs, output = sys.argv[1:]
torch.ops.load_library(library)
x, residual, seed, p = torch.load(inputs)
out, mask = torch.ops.stochdepth.drop_path_add(x, residual, seed, p, True, "row", True, True, True)
with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("stochdepth::drop_path_add", "CUDA")
torch.save((out, mask, with_cuda), output)
"""


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_cmake_library_loads_and_matches_reference(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run([cmake, "-S", str(ROOT), "-B", str(build), *generator, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"])
    run([cmake, "--build", str(build)])
    library = build / "libstochdepth_ops.so"
    assert library.exists()

    x, residual = random_tensor((9, 4, 5)), random_tensor((9, 4, 5), layout="strided")
    seed, p = torch.tensor([2**35 + 3]), torch.tensor(0.4, dtype=torch.float64)
    torch.save((x, residual, seed, p), tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": ""}
    run([sys.executable, "-c", LOAD_AND_RUN, str(library), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        env=env, cwd=tmp_path)
    out, mask, with_cuda = torch.load(tmp_path / "out.pt")
    assert_matches(out, reference.drop_path_add(x, residual, seed, p, True, "row", True, True))
    assert torch.equal(mask, relu_mask.pack(out))
    nvcc = Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "bin" / "nvcc"
    assert with_cuda == (nvcc.exists() and torch.version.cuda is not None), "CUDA kernels built iff nvcc was found"
