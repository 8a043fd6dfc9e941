"""CUDA-event timing for kernel benchmarks: warm up, then the median of enough repeats to fill a time budget."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], budget_ms: float = 300.0, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median milliseconds of fn() on the current CUDA device (compilation and autotuning stay in the warm-up)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max_reps, max(min_reps, math.ceil(budget_ms / est))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)

