"""DistributedDataParallel with stochastic depth, two processes on the gloo backend (CPU): a small
ResNet rewritten by surgery trains in both methods under the default DDP settings
(find_unused_parameters=False) and with static_graph=True, without a hang or an error, with
parameters identical on every rank after every step; masks differ between ranks with the "rank"
seed scope and agree with the "global" one; Composer's use_same_gpu_seed drops the same blocks on
every rank (True) or not (False)."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from helpers import flat_parameters, small_resnet
from stochdepth_kernels import drop_path, set_seed_scope

WORLD = 2
STEPS = 3
TIMEOUT_S = 240


def _gathered(tensor):
    parts = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(parts, tensor)
    return parts


def _train(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        for scope in ("rank", "global"):
            set_seed_scope(scope)
            torch.manual_seed(0)  # every rank seeded alike, as training scripts usually do
            masks = _gathered(drop_path(torch.ones(512, 1), 0.5))
            assert torch.equal(masks[0], masks[1]) == (scope == "global"), f"seed scope {scope!r}"
            for method in ("sample", "block"):
                for static_graph in (False, True):
                    model = small_resnet(method)
                    ddp = DistributedDataParallel(model, static_graph=static_graph)
                    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
                    data = torch.Generator().manual_seed(rank)  # each rank its own batch
                    for step in range(STEPS):
                        optimizer.zero_grad(set_to_none=True)
                        ddp(torch.randn(4, 3, 32, 32, generator=data)).square().mean().backward()
                        optimizer.step()
                        ranks = _gathered(flat_parameters(model))
                        assert torch.equal(ranks[0], ranks[1]), (
                            f"parameters differ across ranks after step {step} ({scope}, {method}, "
                            f"static_graph={static_graph})")
        set_seed_scope("rank")
        for use_same_gpu_seed in (True, False):
            dropped = _composer_block_drops(use_same_gpu_seed)
            ranks = _gathered(dropped)
            assert torch.equal(ranks[0], ranks[1]) == use_same_gpu_seed, f"use_same_gpu_seed={use_same_gpu_seed}"
    finally:
        set_seed_scope("rank")
        dist.destroy_process_group()


def _composer_block_drops(use_same_gpu_seed: bool) -> torch.Tensor:
    """Which blocks of a ResNet-18 under Composer's block method skip their branch in each of 8
    steps (every rank seeded alike, uniform rate 0.5)."""
    import torchvision

    from stochdepth_kernels import apply_stochastic_depth

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    apply_stochastic_depth(model, "BasicBlock", drop_rate=0.5, drop_distribution="uniform",
                           use_same_gpu_seed=use_same_gpu_seed)
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    ran = []
    for block in blocks:
        block.conv1.register_forward_hook(lambda module, args, out: ran.append(module))
    dropped = []
    for _ in range(8):
        ran.clear()
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        dropped.append([block.conv1 not in ran for block in blocks])
    return torch.tensor(dropped)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_trains_both_methods_with_identical_parameters_on_every_rank():
    context = mp.start_processes(_train, args=(_free_port(),), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # raises the worker's exception, with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP training did not finish in {TIMEOUT_S} s (a hang)")

