"""Builds the extension modules from the sources listed in csrc/sources.txt: stochdepth_kernels._C
(the op schemas, and the CUDA kernels) and the CPU kernels (csrc/cpu/) twice, as _cpu_default for
baseline x86-64 and, on x86-64, _cpu_avx2 for AVX2 + F16C; stochdepth_kernels/ops.py imports
the one the machine runs.

The CUDA kernels build whenever nvcc (CUDA_HOME) and a CUDA build of torch are present, for the
architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0": torch's own default list has eleven, each
one more compile). Without nvcc the result is a CPU-only install.
"""
import os
import platform
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


# at::parallel_for is OpenMP code inlined from ATen's headers: without -fopenmp it compiles to a
# serial loop (measured: half the forward throughput on 2 cores).
CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Werror=return-type"]
LINK_FLAGS = ["-fopenmp"]
CPU_ISA_FLAGS = {"default": []}
if platform.machine() in ("x86_64", "AMD64"):
    CPU_ISA_FLAGS["avx2"] = ["-mavx2", "-mf16c"]  # no -mfma: results stay bit-identical to the reference


def cpu_kernel_extensions(sources):
    cpu_sources = [s for s in sources if s.startswith("csrc/cpu/")]
    return [cpp_extension.CppExtension(f"stochdepth_kernels._cpu_{isa}", cpu_sources,
                                       extra_compile_args={"cxx": CXX_FLAGS + flags + ["-DSTOCHDEPTH_CPU_MODULE"]},
                                       extra_link_args=LINK_FLAGS)
            for isa, flags in CPU_ISA_FLAGS.items()]


def core_extension(sources):
    sources = [s for s in sources if not s.startswith("csrc/cpu/")]
    cxx_flags = CXX_FLAGS + ["-DSTOCHDEPTH_PYTHON_MODULE"]
    if not build_cuda(sources):
        return cpp_extension.CppExtension("stochdepth_kernels._C", [s for s in sources if not s.endswith(".cu")],
                                          extra_compile_args={"cxx": cxx_flags}, extra_link_args=LINK_FLAGS)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc_flags = ["-O3", "--Werror", "all-warnings", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "stochdepth_kernels._C",
        sources,
        extra_compile_args={"cxx": cxx_flags + ["-DSTOCHDEPTH_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=LINK_FLAGS,
    )


SOURCES = read_sources()

setup(
    name="stochdepth_kernels",
    version="0.1.0",
    description="Fused stochastic depth (drop path) + residual add kernels for PyTorch",
    packages=find_packages(include=["stochdepth_kernels", "stochdepth_kernels.*"]),
    ext_modules=[core_extension(SOURCES), *cpu_kernel_extensions(SOURCES)],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    install_requires=["torch>=2.11"],
    python_requires=">=3.10",
)
