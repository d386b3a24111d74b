"""Timing done one way everywhere: warm-up, synchronisation, the median of many runs, and the
candidates of one comparison run round-robin so that drift of a shared machine hits all alike."""
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
    runs: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_side_by_side(candidates: dict[str, Callable[[], object]], device: torch.device, *,
                         warmup: int = 3, runs: int = 25) -> dict[str, Timing]:
    """Median wall time of each candidate over ``runs`` calls after ``warmup`` calls; the calls
    alternate between candidates, and the device is synchronised around each one."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples = {name: [] for name in candidates}
    for _ in range(runs):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(s), min(s), runs) for name, s in samples.items()}
