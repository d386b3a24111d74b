"""DistributedDataParallel with stochastic depth, two processes on the gloo backend (CPU): a small
ResNet rewritten by surgery trains in both methods under the default DDP settings
(find_unused_parameters=False) and with static_graph=True, without a hang or an error, with
parameters identical on every rank after every step; masks differ between ranks with the "rank"
seed scope and agree with the "global" one; Composer's use_same_gpu_seed drops the same blocks on
every rank (True) or not (False)."""
import copy
import datetime
import faulthandler
import functools
import itertools
import os
import socket
import sys
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from helpers import GraphRecorder, flat_parameters, small_resnet
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
            for method in ("sample", "block", "subset"):
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
        _leave_process_group()


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


# Each rank's process groups, referenced until the rank leaves (see _leave_process_group).
_GROUPS_UNTIL_EXIT = []


def _leave_process_group() -> None:
    """``destroy_process_group``, the group object kept referenced until the rank's ``os._exit``.

    On torch 2.11 freeing the last reference to a ``ProcessGroupGloo`` (DDP's reducer holds one past
    ``destroy_process_group``, and dies with the worker's locals) joins the group's worker threads
    while holding the GIL, and a worker still releasing a finished collective's tensors waits for the
    GIL: a deadlock, seen in runs of the full suite on torch 2.11 here (never in this file alone,
    never on torch 2.14)."""
    _GROUPS_UNTIL_EXIT.append(dist.group.WORLD)
    dist.destroy_process_group()


def _rank(rank, worker, port):
    """Runs ``worker`` on one rank; a rank still running shortly before the deadline prints every
    thread's stack (in the failure's captured output), so a hang says where it waits. A rank that
    succeeded leaves at once (``os._exit(0)``), before Python frees its process groups."""
    faulthandler.dump_traceback_later(TIMEOUT_S - 20, file=sys.stderr)
    worker(rank, port)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_on_two_ranks(worker, what: str) -> None:
    context = mp.start_processes(_rank, args=(worker, _free_port()), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # raises the worker's exception, with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish in {TIMEOUT_S} s (a hang)")


@pytest.mark.slow
def test_ddp_trains_every_method_with_identical_parameters_on_every_rank():
    _run_on_two_ranks(_train, "DDP training")


LOCAL_BATCH = 2


def _small_model(name: str, method: str) -> torch.nn.Module:
    """A small ResNet or ViT (random weights, the same on every rank) after timm-style surgery."""
    import timm
    import torchvision

    from stochdepth_kernels import apply_drop_path

    torch.manual_seed(0)
    if name == "resnet":
        model = torchvision.models.resnet18(num_classes=4)
    else:
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4)
    apply_drop_path(model, 0.5, stochastic_method=method, drop_distribution="uniform")
    return model


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("WithStochasticDepth")]


def _step_reference(model, optimizer, batch, seed: int) -> None:
    """What two ranks do together, in one process: each half of ``batch`` through ``model`` with the
    generator where that rank had it and that rank's seed mixing, the mean of the two losses."""
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for rank in range(WORLD):
        torch.manual_seed(seed)
        torch.randn(batch.shape)  # the rank drew the global batch first
        with mock.patch.object(dist, "get_rank", return_value=rank):
            loss = loss + model(batch[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]).square().mean() / WORLD
    loss.backward()
    optimizer.step()


def _fsdp(rank, port, compiled=False):
    """Eager: every method. ``compiled``: the block method, each block's forward compiled (fullgraph;
    FSDP2's hooks run around it), so that a dropped block skips its branch inside the graph."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (WORLD,))
    recorder = GraphRecorder()
    try:
        for name, method, scope in itertools.product(("resnet", "vit"),
                                                     ("block",) if compiled else ("sample", "block", "subset"),
                                                     ("rank", "global")):
            if (name, method) == ("resnet", "subset"):
                continue  # 1 of 2 samples kept: BatchNorm would see one value per channel at 1x1 (layer4)
            set_seed_scope(scope)
            model = _small_model(name, method)
            reference = copy.deepcopy(model)
            for block in _blocks(model):
                fully_shard(block, mesh=mesh)
                if compiled:
                    block.forward = torch.compile(block.forward, fullgraph=True, backend=recorder)
            fully_shard(model, mesh=mesh)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
            for step in range(STEPS):
                torch.manual_seed(100 + step)  # every rank alike: the global batch, then the masks' seeds
                batch = torch.randn(WORLD * LOCAL_BATCH, 3, 32, 32)
                optimizer.zero_grad(set_to_none=True)
                model(batch[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]).square().mean().backward()
                optimizer.step()
                _step_reference(reference, reference_optimizer, batch, 100 + step)
                for (key, sharded), expected in zip(model.named_parameters(), reference.parameters()):
                    torch.testing.assert_close(sharded.full_tensor(), expected, rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{name} {method} {scope} step {step} {key}: {m}")
        assert recorder.conds() > 0 or not compiled, "no compiled block held a torch.cond"
    finally:
        set_seed_scope("rank")
        _leave_process_group()


@pytest.mark.slow
def test_fsdp2_trains_like_one_process_with_the_same_batch_and_masks():
    """fully_shard on every block and the root, two ranks: a small ResNet and a small ViT, every
    method (the subset method on the ViT), both seed scopes (per-rank masks: ranks drop different blocks); after every step the
    parameters equal one process running both ranks' halves with their masks."""
    _run_on_two_ranks(_fsdp, "FSDP2 training")


@pytest.mark.slow
def test_fsdp2_trains_compiled_blocks_like_one_eager_process():
    """The block method with each block compiled: a dropped block's ``torch.cond`` skips its branch
    on one rank and not on the other (per-rank masks), and the parameters still equal one eager
    process's after every step."""
    _run_on_two_ranks(functools.partial(_fsdp, compiled=True), "FSDP2 training, compiled blocks")

