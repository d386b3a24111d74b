import os
import shutil
import zlib

# Triton kernels run on CPU tensors through the interpreter where there is no GPU; it must be set
# before triton is first imported. On a GPU each Triton kernel variant compiles one config instead
# of autotuning over four (stochdepth_kernels/triton_backend.py).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("STOCHDEPTH_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from pairwise import pairwise_items  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--pairwise", action="store_true",
                     help="run a pairwise cover of each parametrized grid instead of its full product "
                          "(the GPU check, bench/gpu_check.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (the GPU suite)")
    config.addinivalue_line("markers", "slow: builds or runs something large (tens of seconds)")


@pytest.hookimpl(trylast=True)  # after -m, -k and --deselect: the cover is of the tests selected
def pytest_collection_modifyitems(config, items):
    if config.getoption("pairwise"):
        kept = pairwise_items(items)
        kept_ids = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
        items[:] = kept
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded_generators(request):
    """Each test starts from a seed of its own (its node id's CRC-32): its random inputs differ from
    other tests' but are the same in every run, alone or in any order, so a failure reproduces."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
