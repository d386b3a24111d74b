"""Timing done one way everywhere: warm-up, the median of many samples, and the candidates of one
comparison run round-robin, each round starting one candidate later, so that drift of a shared
machine and the order hit all alike. A sample is ``calls`` back-to-back calls, enough to last
``SAMPLE_SECONDS`` by the warm-up's estimate (at least ``MIN_CALLS``), so that a call's share of one-off
costs (a sync, a cold first call) is amortised: CUDA events around them (no host synchronisation
inside), wall time on the CPU.

On CUDA the device time of a call (its kernels alone, from the profiler) is measured too: end to
end is what a training step sees, device time is what the kernels achieve; the gap is host time the
GPU waited for."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    mean_s: float
    samples: int
    calls_per_sample: int
    rounds_s: tuple[float, ...] = ()  # the samples in round order: sample i of every candidate is round i


def paired_change(candidate: Timing, base: Timing) -> tuple[float, float]:
    """``candidate``'s time relative to ``base``'s, paired by round (``candidate_i / base_i - 1`` for
    each round i: the drift of a shared machine over the run cancels within a round): the mean over
    rounds and the half-width of its 95 % confidence interval (normal approximation, 0 for fewer
    than 2 rounds)."""
    ratios = [c / b - 1 for c, b in zip(candidate.rounds_s, base.rounds_s, strict=True)]
    if len(ratios) < 2:
        return (ratios[0] if ratios else 0.0), 0.0
    return statistics.fmean(ratios), 1.96 * statistics.stdev(ratios) / math.sqrt(len(ratios))


def _sample_cpu(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _sample_cuda(fn: Callable[[], object], calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


SAMPLE_SECONDS = {"cpu": 0.02, "cuda": 0.002}
MIN_CALLS = {"cpu": 1, "cuda": 10}
MAX_CALLS = 1000


def _calls_per_sample(fn: Callable[[], object], device: torch.device, warmup: int, min_calls: int | None) -> int:
    sample = _sample_cuda if device.type == "cuda" else _sample_cpu
    seconds = min(sample(fn, 1) for _ in range(max(warmup, 1)))
    wanted = math.ceil(SAMPLE_SECONDS.get(device.type, 0.02) / max(seconds, 1e-9))
    return max(min_calls or MIN_CALLS.get(device.type, 1), min(MAX_CALLS, wanted))


def measure_side_by_side(candidates: dict[str, Callable[[], object]], device: torch.device, *,
                         warmup: int = 3, samples: int = 25, min_calls: int | None = None) -> dict[str, Timing]:
    """Time of one call of each candidate: median, min and mean over ``samples`` samples taken
    round-robin. ``min_calls`` overrides the device's least calls per sample (a training step lasts
    far longer than a sample needs: 1)."""
    sample = _sample_cuda if device.type == "cuda" else _sample_cpu
    calls = {name: _calls_per_sample(fn, device, warmup, min_calls) for name, fn in candidates.items()}
    names = list(candidates)
    times = {name: [] for name in names}
    for round_index in range(samples):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            times[name].append(sample(candidates[name], calls[name]))
    return {name: Timing(statistics.median(t), min(t), statistics.fmean(t), samples, calls[name], tuple(t))
            for name, t in times.items()}


def device_time_per_call(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float:
    """Seconds of GPU kernel time per call of ``fn`` (every kernel it launches, summed), from the
    profiler's CUDA activity records."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e6 / calls
