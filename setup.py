"""Builds stochdepth_kernels._C from the sources listed in csrc/sources.txt.

The CPU kernels always build. The CUDA kernels build whenever nvcc (CUDA_HOME) and a CUDA build of
torch are present, for the architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0": torch's own
default list has eleven, each one more compile). Without nvcc the result is a CPU-only install.
"""
import os
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def read_sources():
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build_cuda(sources):
    wanted = os.environ.get("STOCHDEPTH_BUILD_CUDA", "auto")
    if wanted == "0":
        return False
    available = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if wanted == "1" and not available:
        raise RuntimeError("STOCHDEPTH_BUILD_CUDA=1 but nvcc (CUDA_HOME) or a CUDA build of torch is missing")
    return available and any(s.endswith(".cu") for s in sources)


def make_extension():
    sources = read_sources()
    # at::parallel_for is OpenMP code inlined from ATen's headers: without -fopenmp it compiles to
    # a serial loop (measured: half the forward throughput on 2 cores).
    cxx_flags = ["-O3", "-fopenmp", "-DSTOCHDEPTH_PYTHON_MODULE", "-Wall", "-Werror=return-type"]
    link_flags = ["-fopenmp"]
    if not build_cuda(sources):
        cpu_sources = [s for s in sources if not s.endswith(".cu")]
        return cpp_extension.CppExtension(
            "stochdepth_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc_flags = ["-O3", "--Werror", "all-warnings", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "stochdepth_kernels._C",
        sources,
        extra_compile_args={"cxx": cxx_flags + ["-DSTOCHDEPTH_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    name="stochdepth_kernels",
    version="0.1.0",
    description="Fused stochastic depth (drop path) + residual add kernels for PyTorch",
    packages=find_packages(include=["stochdepth_kernels", "stochdepth_kernels.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    install_requires=["torch>=2.11"],
    python_requires=">=3.10",
)
