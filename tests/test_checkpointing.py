"""Activation checkpointing: the recomputation must draw the forward's masks, or the backward
differentiates a different function from the one the forward computed."""
import pytest
import torch
import torch.utils.checkpoint as checkpointing

from helpers import assert_matches, random_tensor
from stochdepth_kernels import (DropPathAdd, StochasticDepth, fused_drop_path_add, record_then_replay_masks,
                                same_masks_on_recompute)
from stochdepth_kernels.seeding import draw_seed


class Block(torch.nn.Module):
    """Every way a seed gets drawn: a row-mode module, a batch-mode branch skip (seed on the CPU),
    and the functional op."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.tail = DropPathAdd(0.5, activation="relu")
        self.skip = StochasticDepth(torch.nn.Linear(16, 16), 0.5, mode="batch")

    def forward(self, h):
        return self.skip(self.tail(self.linear(h), h)) + fused_drop_path_add(h, h, 0.3)


def gradients(block, x, run):
    """(output, gradient of x and of every parameter) of ``run(block, x)`` after ``.backward()`` (the
    reentrant checkpoint supports no ``torch.autograd.grad``)."""
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    out = run(block, x)
    out.backward(torch.ones_like(out))
    return [out, x.grad, *(p.grad for p in block.parameters())]


def assert_same_training_step(checkpointed, seed):
    block, x = Block(), random_tensor((64, 16))
    torch.manual_seed(seed)
    expected = gradients(block, x, lambda b, h: b(h))
    torch.manual_seed(seed)
    for got, want in zip(gradients(block, x, checkpointed), expected):
        assert_matches(got, want)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_checkpoint_preserving_rng_state_recomputes_the_same_masks(use_reentrant, seed):
    assert_same_training_step(lambda b, h: checkpointing.checkpoint(b, h, use_reentrant=use_reentrant), seed)


@pytest.mark.parametrize("seed", range(3))
def test_seed_tape_gives_the_same_masks_without_preserving_rng_state(seed):
    assert_same_training_step(lambda b, h: checkpointing.checkpoint(
        b, h, use_reentrant=False, preserve_rng_state=False, context_fn=same_masks_on_recompute), seed)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_recorded_function_gives_the_same_masks_without_preserving_rng_state(use_reentrant, seed):
    assert_same_training_step(lambda b, h: checkpointing.checkpoint(
        record_then_replay_masks(b), h, use_reentrant=use_reentrant, preserve_rng_state=False), seed)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_without_the_tape_or_rng_state_the_recomputation_draws_other_masks(use_reentrant):
    """Why the tape exists: recomputing with a moved generator gives the backward new masks (a
    wrong gradient), or a different graph (PyTorch's CheckpointError)."""
    block, x = Block(), random_tensor((64, 16))
    torch.manual_seed(0)
    expected = gradients(block, x, lambda b, h: b(h))
    torch.manual_seed(0)
    try:
        got = gradients(block, x, lambda b, h: checkpointing.checkpoint(b, h, use_reentrant=use_reentrant,
                                                                          preserve_rng_state=False))
    except checkpointing.CheckpointError:
        return
    assert not all(torch.equal(g, w) for g, w in zip(got[1:], expected[1:]))


def test_recorded_function_serves_one_forward():
    """Kept across steps, the wrapper would hand the next forward the last one's masks: it refuses."""
    run = record_then_replay_masks(lambda h: fused_drop_path_add(h, h, 0.5))
    x = random_tensor((64, 4))
    assert torch.equal(run(x), run(x))
    with pytest.raises(RuntimeError, match="called a third time: it serves one forward and its recomputation"):
        run(x)


def test_tape_refuses_a_recomputation_that_draws_more_seeds():
    record, replay = same_masks_on_recompute()
    with record:
        first = draw_seed(torch.device("cpu"))
    with replay:
        assert torch.equal(draw_seed(torch.device("cpu")), first)
        with pytest.raises(RuntimeError, match=r"drew more seeds than the forward it repeats \(1\)"):
            draw_seed(torch.device("cpu"))
    torch.manual_seed(5)
    outside = draw_seed(torch.device("cpu"))  # no tape active: a fresh draw
    torch.manual_seed(5)
    assert torch.equal(outside, torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
