"""A cost model of tile tasks on a GPU, and a simulator of schedules under it.

A decode step is bound by memory bandwidth, so a task's time is mostly its bytes over the
bandwidth its SM gets.  When all W workers stream at once each gets hbm / W, but one SM cannot
pull more than `sm_bw_cap` times its fair share of the whole chip (hbm / num_sms), so running on
fewer workers does not make each one arbitrarily fast.  Durations are static (they do not depend
on how many tasks happen to run at the same moment): a phase in which only a few tasks run is
therefore estimated pessimistically, never optimistically, and the simulated step time is never
below the bandwidth floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tilert.errors import HangError
from tilert.ir import Task, TaskGraph
from tilert.schedule import Schedule, execution_order


@dataclass(frozen=True)
class GpuSpec:
    name: str
    num_sms: int
    hbm_bytes_per_s: float  # achievable, counting reads + writes
    flops_per_s: float  # dense bf16 tensor-core rate of the whole chip
    task_overhead_s: float  # fetching a task, its waits and signals, pipeline fill
    sm_bw_cap: float = 3.0  # one SM streams at most this many times hbm / num_sms
    signal_latency_s: float = 0.5e-6  # a counter increment becoming visible to a waiting SM

    def sm_bandwidth(self, workers: int | None = None) -> float:
        share = self.hbm_bytes_per_s / (workers or self.num_sms)
        return min(share, self.sm_bw_cap * self.hbm_bytes_per_s / self.num_sms)


GPUS = {
    # 3.0e12 B/s: copy bandwidth measured on this workplace's H100 (read + write counted).
    "h100": GpuSpec("h100", 132, 3.0e12, 700e12, 1.5e-6),
    "h200": GpuSpec("h200", 132, 4.3e12, 700e12, 1.5e-6),
}


def task_time(task: Task, gpu: GpuSpec, workers: int | None = None) -> float:
    """Seconds one worker takes for `task` while `workers` workers stream concurrently
    (default: every SM)."""
    memory = task.bytes / gpu.sm_bandwidth(workers)
    compute = task.flops / (gpu.flops_per_s / gpu.num_sms)
    return max(memory, compute) + gpu.task_overhead_s


def task_times(graph: TaskGraph, gpu: GpuSpec, workers: int | None = None) -> np.ndarray:
    nbytes = np.array([t.bytes for t in graph.tasks], dtype=np.float64)
    flops = np.array([t.flops for t in graph.tasks], dtype=np.float64)
    return np.maximum(nbytes / gpu.sm_bandwidth(workers), flops / (gpu.flops_per_s / gpu.num_sms)) + gpu.task_overhead_s


@dataclass
class Timeline:
    """When each task ran (seconds from the step's start) and on which worker."""

    worker: np.ndarray
    start: np.ndarray
    end: np.ndarray
    gpu: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def step_time(self) -> float:
        return float(self.end.max()) if len(self.end) else 0.0


def simulate(schedule: Schedule, gpu: GpuSpec) -> Timeline:
    """Start and end of every task: a task starts when its worker finished the previous task of
    its stream and each wait (counter c, value v) is reached, i.e. the v-th signaller of c
    finished, plus the signal latency.  Raises HangError if the schedule cannot finish."""
    g = schedule.graph
    n = len(g.tasks)
    dur = task_times(g, gpu, schedule.num_workers)
    order, stuck = execution_order(schedule)
    if stuck is not None:
        raise HangError(f"schedule cannot finish: {stuck.describe(schedule)}")
    start = np.zeros(n)
    end = np.zeros(n)
    free = np.zeros(schedule.num_workers)
    reached: dict[tuple[int, int], float] = {}  # (counter, value) -> time it is reached
    for t in order:  # every signaller of a waited counter comes earlier in this order
        ready = free[schedule.worker_of[t]]
        for c, v in schedule.waits[t]:
            at = reached.get((c, v))
            if at is None:
                ends = end[schedule.counters[c].signalled_by]
                if v > len(ends):
                    raise HangError(f"task {t} ({g.ops[g.tasks[t].op].name}) waits for counter {c} to reach {v}, "
                                    f"but only {len(ends)} tasks signal it")
                at = float(np.partition(ends, v - 1)[v - 1]) + gpu.signal_latency_s if v > 0 else 0.0
                reached[(c, v)] = at
            ready = max(ready, at)
        start[t] = ready
        end[t] = ready + dur[t]
        free[schedule.worker_of[t]] = end[t]
    return Timeline(np.array(schedule.worker_of), start, end, gpu.name)


def critical_path(graph: TaskGraph, gpu: GpuSpec, workers: int | None = None) -> tuple[float, list[int]]:
    """The longest chain through graph.deps, weighting each task by task_time; (seconds, ids)."""
    n = len(graph.tasks)
    if n == 0:
        return 0.0, []
    dur = task_times(graph, gpu, workers)
    finish = np.zeros(n)
    via = np.full(n, -1, np.int64)
    for t in range(n):
        deps = graph.deps[t] if t < len(graph.deps) else []
        if deps:
            k = int(np.argmax(finish[deps]))
            via[t] = deps[k]
            finish[t] = finish[deps[k]] + dur[t]
        else:
            finish[t] = dur[t]
    t = int(np.argmax(finish))
    total = float(finish[t])
    path = []
    while t >= 0:
        path.append(t)
        t = int(via[t])
    return total, path[::-1]


def floor(graph: TaskGraph, gpu: GpuSpec) -> float:
    """The bandwidth floor: all bytes the tasks move, at the chip's full bandwidth."""
    return sum(t.bytes for t in graph.tasks) / gpu.hbm_bytes_per_s


def estimate(schedule: Schedule, gpu: GpuSpec) -> dict:
    """Simulated step time against the bandwidth floor and the critical path."""
    g = schedule.graph
    tl = simulate(schedule, gpu)
    step = tl.step_time
    fl = floor(g, gpu)
    busy = np.bincount(tl.worker, weights=tl.end - tl.start, minlength=schedule.num_workers) if len(tl.end) else np.zeros(schedule.num_workers)
    return {
        "gpu": gpu.name,
        "num_tasks": len(g.tasks),
        "num_workers": schedule.num_workers,
        "step_time_s": step,
        "floor_s": fl,
        "ratio": step / fl if fl > 0 else float("inf"),  # step time over floor; 1.0 is ideal
        "floor_fraction": fl / step if step > 0 else 0.0,  # share of peak bandwidth achieved
        "critical_path_s": critical_path(g, gpu, schedule.num_workers)[0],
        "bytes": int(sum(t.bytes for t in g.tasks)),
        "flops": int(sum(t.flops for t in g.tasks)),
        "busy": (busy / step).tolist() if step > 0 else busy.tolist(),
        "mean_busy": float(busy.mean() / step) if step > 0 else 0.0,
    }
