"""From a task graph to a schedule: assign tasks to workers, then synchronise them with counters.

Each stream keeps program order, which is a topological order of the dependencies, and every
wait names only earlier tasks, so every edge of the combined graph goes from a lower task id to
a higher one: the schedule cannot deadlock.

Counters.  A consumer's producers are grouped by producer op; each group becomes one counter
(shared by every consumer that waits for the same set of tasks) with target = its size.  A
group needs no wait when every task in it already happens before the consumer: earlier on the
consumer's own worker, or known through waits already placed.  That is tracked with vector
clocks (per task, the stream positions on each worker known to have finished), and groups are
visited latest-op first, because waiting for a late op usually covers the earlier ones.
"""

from __future__ import annotations

import numpy as np

from tilert.cost import GPUS, GpuSpec, task_times
from tilert.deps import derive_dependencies
from tilert.ir import TaskGraph
from tilert.schedule import Counter, Schedule

POLICIES = ("list", "round_robin")
TIE_BREAKS = ("lowest", "longest_idle", "random:<seed>")


def build_schedule(graph: TaskGraph, num_workers: int, policy: str = "list", gpu: GpuSpec | str = "h100",
                   worker_of: list[int] | None = None, tie_break: str = "lowest") -> Schedule:
    """Schedule `graph` on `num_workers` persistent workers, assigned by `assign_workers`, or
    as `worker_of` says when given (multi-GPU: each rank's tasks on that rank's workers)."""
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    if len(graph.deps) != len(graph.tasks):
        derive_dependencies(graph)
    if worker_of is None:
        worker_of = assign_workers(graph, num_workers, policy, gpu, tie_break)
    streams: list[list[int]] = [[] for _ in range(num_workers)]
    for t, w in enumerate(worker_of):
        streams[w].append(t)
    waits, signals, counters = _synchronise(graph, worker_of, streams, num_workers)
    meta = {"policy": policy, "gpu": gpu.name, "tie_break": tie_break, "calibrated": bool(gpu.calibration)}
    return Schedule(graph, num_workers, streams, waits, signals, counters, worker_of, meta)


def assign_workers(graph: TaskGraph, num_workers: int, policy: str = "list", gpu: GpuSpec | str = "h100",
                   tie_break: str = "lowest") -> list[int]:
    """The worker of every task.  policy "list": each task, in program order, goes to the worker
    on which it can start earliest under the cost model of `gpu`; among the workers that tie
    (often most of the machine: all idle ones wait for the same producer), `tie_break` picks:
    "lowest" worker id, the "longest_idle" one, or "random:<seed>" (one of them at random).
    The model cannot tell ties apart; tools/autotune_schedule.py measures the choices on the
    GPU (an H100, 2026-12-07: tie-breaks alone within 1 % noise, the calibrated model 0.9 % faster).
    "round_robin": task t goes to worker t % num_workers."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    if len(graph.deps) != len(graph.tasks):
        derive_dependencies(graph)
    if policy == "list":
        return _list_assign(graph, num_workers, gpu, parse_tie_break(tie_break))
    if policy == "round_robin":
        return [t % num_workers for t in range(len(graph.tasks))]
    raise ValueError(f"unknown scheduling policy {policy!r}; choose one of {POLICIES}")


def parse_tie_break(tie_break: str) -> tuple[str, int]:
    """("lowest" | "longest_idle" | "random", seed) from a recipe's "tie_break" string."""
    kind, _, seed = str(tie_break).partition(":")
    if kind in ("lowest", "longest_idle") and not seed:
        return kind, 0
    if kind == "random" and seed.isdigit():
        return kind, int(seed)
    raise ValueError(f"unknown tie_break {tie_break!r}; choose one of {TIE_BREAKS}")


def _list_assign(graph: TaskGraph, num_workers: int, gpu: GpuSpec, tie_break: tuple[str, int] = ("lowest", 0)) -> list[int]:
    kind, seed = tie_break
    rng = np.random.default_rng(seed)
    dur = task_times(graph, gpu, num_workers)
    finish = np.zeros(len(graph.tasks))
    free = np.zeros(num_workers)
    worker_of = []
    for t, deps in enumerate(graph.deps):
        ready = finish[deps].max() if deps else 0.0
        start = np.maximum(free, ready)
        w = int(np.argmin(start))  # the first minimum: lowest worker id among ties
        if kind != "lowest" and free[w] < ready:  # several workers may be idle at `ready`
            tied = np.flatnonzero(free <= ready)
            w = int(tied[np.argmin(free[tied])] if kind == "longest_idle" else rng.choice(tied))
        finish[t] = free[w] = start[w] + dur[t]
        worker_of.append(w)
    return worker_of


def _synchronise(graph: TaskGraph, worker_of: list[int], streams: list[list[int]], num_workers: int):
    n = len(graph.tasks)
    worker = np.array(worker_of, dtype=np.int64)
    pos = np.zeros(n, dtype=np.int64)
    for stream in streams:
        pos[stream] = np.arange(len(stream))
    op_of = np.array([t.op for t in graph.tasks], dtype=np.int64)

    # clocks[t][w] = number of tasks of worker w's stream that finish before t ends (t included).
    clocks = np.zeros((n, num_workers), dtype=np.int32)
    last = [-1] * num_workers
    waits: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    signals: list[list[int]] = [[] for _ in range(n)]
    counters: list[Counter] = []
    counter_clock: list[np.ndarray] = []
    by_set: dict[tuple[int, ...], int] = {}

    for t in range(n):
        w = worker_of[t]
        clock = clocks[last[w]].copy() if last[w] >= 0 else np.zeros(num_workers, np.int32)
        deps = np.asarray(graph.deps[t], dtype=np.int64)
        if len(deps) and (pos[deps] >= clock[worker[deps]]).any():
            for group in _groups_latest_first(deps, op_of[deps]):
                if (pos[group] < clock[worker[group]]).all():
                    continue  # already happens before t
                key = tuple(group.tolist())
                cid = by_set.get(key)
                if cid is None:
                    cid = by_set[key] = len(counters)
                    counters.append(Counter(cid, len(key), list(key)))
                    counter_clock.append(clocks[group].max(axis=0))
                    for s in key:
                        signals[s].append(cid)
                waits[t].append((cid, len(key)))
                np.maximum(clock, counter_clock[cid], out=clock)
        clock[w] = pos[t] + 1
        clocks[t] = clock
        last[w] = t
    return waits, signals, counters


def _groups_latest_first(deps: np.ndarray, ops: np.ndarray) -> list[np.ndarray]:
    """Split sorted producer ids by op; groups ordered by their latest task, latest first."""
    perm = np.argsort(ops, kind="stable")
    cuts = np.flatnonzero(np.diff(ops[perm])) + 1
    groups = np.split(deps[perm], cuts)
    groups.sort(key=lambda g: -int(g[-1]))
    return groups
