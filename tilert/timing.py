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


def append_bench_log(path: str, title: str, device: str, commit: str, tool: str, table: str,
                     argv: list[str] | None = None) -> None:
    """Append one benchmark table to a log, with what the benchmark log needs beside every
    number: the date (in the title), the device, the commit and the command."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    with open(path, "a") as f:
        f.write(f"\n## {title}\n\n- device: {device}; commit {commit}\n"
                f"- command: `python {tool} {' '.join(args)}`\n\n{table}\n")
