"""Timing on the GPU: the median of repeated calls, each bracketed by device events, after a
warm-up (tools/bench.py and tools/profile_step.py), and variants timed in interleaved rounds
(tools/autotune_schedule.py, tools/ab_plain.py)."""

from __future__ import annotations

import random
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


def interleaved_rounds(steps: dict, rounds: int, launches: int, seed: int = 0) -> dict[str, list[float]]:
    """Per variant, seconds per step of each round: `steps[name]()` queues one step of that
    variant; a round runs every variant, in a shuffled order, one step to warm (after another
    variant's) then `launches` back to back between two events.  Drift on a shared machine hits
    all variants alike, which timing them one after another does not."""
    import torch

    out = {name: [] for name in steps}
    names = list(steps)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            step = steps[name]
            step()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(launches):
                step()
            e.record()
            e.synchronize()
            out[name].append(s.elapsed_time(e) / 1e3 / launches)
    return out


def append_bench_log(path: str, title: str, device: str, commit: str, tool: str, table: str,
                     argv: list[str] | None = None) -> None:
    """Append one benchmark table to a log, with what the benchmark log needs beside every
    number: the date (in the title), the device, the commit and the command."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    with open(path, "a") as f:
        f.write(f"\n## {title}\n\n- device: {device}; commit {commit}\n"
                f"- command: `python {tool} {' '.join(args)}`\n\n{table}\n")
