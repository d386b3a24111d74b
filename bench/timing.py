"""Timing done one way everywhere: warm-up, the median of many samples, and the candidates of one
comparison run round-robin so that drift of a shared machine hits all alike. On CUDA a sample is
CUDA events around ``calls_per_sample`` back-to-back calls (launch overhead amortised, no host
synchronisation inside); on the CPU it is wall time around one call.

On CUDA the device time of a call (its kernels alone, from the profiler) is measured too: end to
end is what a training step sees, device time is what the kernels achieve; the gap is host time the
GPU waited for."""
from __future__ import annotations

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


def measure_side_by_side(candidates: dict[str, Callable[[], object]], device: torch.device, *,
                         warmup: int = 3, samples: int = 25) -> dict[str, Timing]:
    """Median time of one call of each candidate over ``samples`` samples taken round-robin."""
    sample, calls = (_sample_cuda, 10) if device.type == "cuda" else (_sample_cpu, 1)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = {name: [] for name in candidates}
    for _ in range(samples):
        for name, fn in candidates.items():
            times[name].append(sample(fn, calls))
    return {name: Timing(statistics.median(t), min(t), statistics.fmean(t), samples) for name, t in times.items()}


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
