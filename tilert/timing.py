"""Timing on the GPU: the median of repeated calls, each bracketed by device events, after a
warm-up (tools/bench.py and tools/profile_step.py)."""

from __future__ import annotations

import statistics


def median_seconds(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of `fn` (work queued on torch's current stream)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)
