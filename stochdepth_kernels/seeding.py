"""The 64-bit seed of one training call (docs/design.md, "One random stream for every backend"): drawn
from a generator, made per-rank under torch.distributed, and replayed by the seed tape that gives
an activation-checkpoint recomputation the forward's masks."""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from stochdepth_kernels import _C
from stochdepth_kernels.validation import MAX_SEED, check_choice, check_generator, check_seed

SEED_SCOPES = ("rank", "global")
_seed_scope = "rank"
_RANK_MIX = 0x9E3779B97F4A7C15  # an odd 64-bit constant: distinct ranks get distinct offsets


def set_seed_scope(scope: str) -> None:
    """Under torch.distributed, ``"rank"`` (the default) gives every rank its own masks, even when
    all ranks seed their generators alike; ``"global"`` gives every rank the masks its generator
    draws (identical ranks for identically seeded generators)."""
    global _seed_scope
    check_choice(scope, "seed_scope", SEED_SCOPES)
    _seed_scope = scope


def rank_offset(scope: str | None = None) -> int:
    """What a drawn seed is XORed with on this rank: 0 outside torch.distributed, on rank 0, or with
    the "global" scope (``scope``, else :func:`set_seed_scope`'s); below 2**62, so the seed stays in
    [0, 2**63)."""
    if (scope or _seed_scope) != "rank" or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0
    return (torch.distributed.get_rank() * _RANK_MIX) % 2**64 >> 2


class _SeedTape:
    """The seeds drawn while recording, handed out again in the same order while replaying."""

    def __init__(self):
        self.seeds: list[Tensor] = []
        self.replayed = 0

    def next_seed(self, draw) -> Tensor:
        if _active.mode == "record":
            self.seeds.append(draw())
            return self.seeds[-1]
        if self.replayed == len(self.seeds):
            raise RuntimeError(f"the recomputation drew more seeds than the forward it repeats ({len(self.seeds)}): "
                               "it must run the same stochastic-depth calls in the same order")
        self.replayed += 1
        return self.seeds[self.replayed - 1]

    @contextlib.contextmanager
    def use(self, mode: str):
        previous = (getattr(_active, "tape", None), getattr(_active, "mode", None))
        _active.tape, _active.mode = self, mode
        self.replayed = 0
        try:
            yield
        finally:
            _active.tape, _active.mode = previous


_active = threading.local()


def tape_active() -> bool:
    """Whether a seed tape records or replays this thread's draws."""
    return getattr(_active, "tape", None) is not None


def same_masks_on_recompute():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the
    recomputation reuses the seeds the checkpointed forward drew, in order, so it draws the same
    masks even with ``preserve_rng_state=False`` (which otherwise gives the backward different masks
    from the forward's)."""
    tape = _SeedTape()
    return tape.use("record"), tape.use("replay")


def record_then_replay_masks(fn: Callable) -> Callable:
    """``fn`` for ``torch.utils.checkpoint.checkpoint(..., preserve_rng_state=False)`` in either
    ``use_reentrant`` mode (the reentrant one has no ``context_fn``): the first call (the forward)
    records the seeds ``fn`` draws, the second (the recomputation) replays them, so the backward
    sees the forward's masks. Wrap ``fn`` anew for every forward; a third call raises rather than
    hand a new forward the last one's masks."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    tape = _SeedTape()
    calls = 0

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal calls
        if calls == 2:
            raise RuntimeError("record_then_replay_masks(fn) was called a third time: it serves one forward and its "
                               "recomputation; wrap fn anew for every forward")
        calls += 1
        with tape.use("record" if calls == 1 else "replay"):
            return fn(*args, **kwargs)

    return run


def _drawn_once_per_forward(draw: Callable[[], Tensor]) -> Tensor:
    """``draw()`` as torch.compile must run it: inside an activation-checkpoint region, whose nodes
    Dynamo tags for recomputation. That is what makes AOTAutograd's partitioner save the generator's
    state with the forward and replay it wherever the backward recomputes the draw (its
    functionalize_rng_ops), so the backward's seed is the forward's at every
    ``activation_memory_budget``. An unmarked draw is recomputed from the generator's *current* state
    once the budget is below 1, and the backward then uses other masks than the forward (silently
    wrong gradients; pytorch#190758). A plain checkpoint, not a selective one: under torch.compile
    both tag every node "prefer recompute" (torch 2.11 to 2.14), but a ``context_fn`` makes torch log
    a warning about in-place ops into every compile of a model using this package."""
    return checkpoint(draw, use_reentrant=False)


def draw_seed(device: torch.device, generator: torch.Generator | None = None, *, for_backward: bool = False,
              scope: str | None = None) -> Tensor:
    """A 1-element int64 seed in [0, 2**63 - 1), drawn on ``device`` from ``generator`` (else the
    device's default generator) and made this rank's (``scope``, else :func:`set_seed_scope`'s), or
    replayed from the active seed tape (:func:`same_masks_on_recompute`). ``for_backward``: autograd
    records the call, so a compiled backward must see this very seed
    (:func:`_drawn_once_per_forward`; a graph without a backward refuses that marking).
    Drawing on the device keeps it inside CUDA graphs and visible to torch.compile;
    ``torch.manual_seed`` reproduces it, compiled or not."""
    check_generator(generator, device)
    if torch.compiler.is_compiling():
        def traced_draw() -> Tensor:
            # generator= even when None: it traces as aten.randint.low_generator, which inductor leaves
            # to ATen (its own RNG replaces aten.randint.low), so compiled code draws eager's seeds.
            seed = torch.randint(0, MAX_SEED - 1, (1,), dtype=torch.int64, device=device, generator=generator)
            return _this_ranks(seed, scope)

        return _drawn_once_per_forward(traced_draw) if for_backward else traced_draw()

    def draw() -> Tensor:  # the same ATen randint, called from C++ (no Python argument parsing)
        return _this_ranks(_C.draw_seed(device, generator), scope)

    return _active.tape.next_seed(draw) if tape_active() else draw()


def _this_ranks(seed: Tensor, scope: str | None) -> Tensor:
    """A drawn ``seed`` made this rank's (:func:`rank_offset`), in place."""
    offset = rank_offset(scope)
    return seed.bitwise_xor_(offset) if offset else seed


def seed_tensor(seed: int | Tensor, device: torch.device) -> Tensor:
    """A user-given seed as the 1-element int64 tensor on ``device`` the ops take."""
    check_seed(seed, device)
    if isinstance(seed, Tensor):
        return seed.reshape(1).to(device)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def call_seed(training: bool, p_is_zero: bool, seed, generator, device: torch.device,
              for_backward: bool) -> Tensor | None:
    """The seed of one call: None when no coin is drawn (eval, or p known to be 0), which leaves the
    generator untouched; the given ``seed`` if any; else a fresh draw (``for_backward``: autograd
    records the call)."""
    if not training or p_is_zero:
        check_generator(generator, device)
        if seed is not None:
            check_seed(seed, device)
        return None
    if seed is not None:
        check_generator(generator, device)
        return seed_tensor(seed, device)
    return draw_seed(device, generator, for_backward=for_backward)
