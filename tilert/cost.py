"""A cost model of tile tasks on a GPU, and a simulator of schedules under it.

A decode step is bound by memory bandwidth.  A task costs a fixed overhead (fetching it,
checking its waits), then streams its bytes; it cannot finish before its flops at one SM's share
of the tensor cores.  The k tasks streaming at a moment share the chip's bandwidth equally, but
one SM pulls at most `sm_bw_cap` times its fair share (hbm / num_sms): so each gets
min(hbm / k, cap).  A lone task (a norm, a router) is therefore fast but not free, and the
bandwidth in use never exceeds the chip's, so a simulated step is never below the floor.

The scheduler needs a duration before it knows what runs concurrently: `task_time` gives the
static estimate with `workers` tasks streaming (default every SM).  `critical_path` weights tasks
by their time at the cap, so it, like `floor`, is a lower bound on any simulated step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from tilert.deps import derive_dependencies
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
    # One SM streams at most this many times hbm / num_sms.  3 is a guess; a calibration
    # (tilert/calibration.py) carries the measured value (the H100's: 1.0, fitted to measured sweeps).
    sm_bw_cap: float = 3.0
    signal_latency_s: float = 0.5e-6  # a counter increment becoming visible to a waiting SM
    # Measured corrections (tilert/calibration.py): (op role, measured / modelled task time).
    # A task of a listed role costs that many times the model: its bytes, flops and overhead.
    calibration: tuple[tuple[str, float], ...] = ()

    @property
    def sm_bw_max(self) -> float:
        return self.sm_bw_cap * self.hbm_bytes_per_s / self.num_sms

    def task_factors(self, graph: TaskGraph) -> np.ndarray:
        """Per task, the calibration factor of its op's role (1 where none is measured)."""
        by_role = dict(self.calibration)
        if not by_role:
            return np.ones(len(graph.tasks))
        return np.array([by_role.get(op_role(graph, t), 1.0) for t in graph.tasks], dtype=np.float64)

    def sm_bandwidth(self, streaming: int | None = None) -> float:
        """Bytes/s one SM gets while `streaming` SMs stream at once (default: all of them)."""
        return min(self.hbm_bytes_per_s / (streaming or self.num_sms), self.sm_bw_max)


GPUS = {
    # 3.0e12 B/s: copy bandwidth measured on this workplace's H100 (read + write counted).
    "h100": GpuSpec("h100", 132, 3.0e12, 700e12, 1.5e-6),
    "h200": GpuSpec("h200", 132, 4.3e12, 700e12, 1.5e-6),
}


def op_kind(name: str) -> str:
    """An op's name without its layer: "layer3.q_proj" -> "q_proj", a draft step's
    "draft.layer3.q_proj" -> "draft.q_proj" (the drafter's ops are measured apart)."""
    prefix = "draft." if name.startswith("draft.") else ""
    rest = name[len(prefix):]
    return prefix + (rest.split(".", 1)[1] if rest.startswith("layer") else rest)


def op_role(graph: TaskGraph, task: Task) -> str:
    """What a task's op does, the same in every layer: "q_proj", "attention", "lm_head",
    "draft.q_proj", ... (its op's op_kind)."""
    return op_kind(graph.ops[task.op].name)


def task_time(task: Task, gpu: GpuSpec, streaming: int | None = None) -> float:
    """Seconds one worker takes for `task` while `streaming` workers stream (default: all SMs),
    uncalibrated (task_times applies a GpuSpec's calibration)."""
    memory = task.bytes / gpu.sm_bandwidth(streaming)
    compute = task.flops / (gpu.flops_per_s / gpu.num_sms)
    return max(memory, compute) + gpu.task_overhead_s


def task_times(graph: TaskGraph, gpu: GpuSpec, streaming: int | None = None) -> np.ndarray:
    """task_time of every task, vectorised."""
    nbytes = np.array([t.bytes for t in graph.tasks], dtype=np.float64)
    flops = np.array([t.flops for t in graph.tasks], dtype=np.float64)
    compute = flops / (gpu.flops_per_s / gpu.num_sms)
    return (np.maximum(nbytes / gpu.sm_bandwidth(streaming), compute) + gpu.task_overhead_s) * gpu.task_factors(graph)


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
    """Run the schedule under the cost model.  A worker starts its next task once the previous
    one ended and every wait (counter, value) is reached; a task that had to wait pays the
    signal latency on top of its overhead.  Streaming tasks share bandwidth as described in the
    module doc; since they all get the same rate, progress is tracked in *virtual bytes* (bytes
    each streaming task has moved since the start), so every event costs O(log n).
    Raises HangError when the schedule cannot finish."""
    _, stuck = execution_order(schedule)
    if stuck is not None:
        raise HangError(f"schedule cannot finish: {stuck.describe(schedule)}")
    g = schedule.graph
    n = len(g.tasks)
    factor = gpu.task_factors(g)
    nbytes = (np.array([t.bytes for t in g.tasks], dtype=np.float64) * factor).tolist()
    compute = (np.array([t.flops for t in g.tasks], dtype=np.float64) * factor / (gpu.flops_per_s / gpu.num_sms)).tolist()
    overhead = (gpu.task_overhead_s * factor).tolist()
    start, end, began = [0.0] * n, [0.0] * n, [0.0] * n
    value = [0] * len(schedule.counters)
    blocked: dict[int, list[tuple[int, int]]] = {}  # counter -> (value needed, worker)
    nxt = [0] * schedule.num_workers
    timed: list[tuple[float, int, int]] = []  # (time, kind, task); kind 0: begin streaming, 1: done
    streams: list[tuple[float, int]] = []  # (virtual bytes at which it finishes, task)
    now = virtual = 0.0
    k = 0  # tasks streaming now

    def rate() -> float:
        return min(gpu.hbm_bytes_per_s / k, gpu.sm_bw_max)

    def try_start(w: int, waited: bool) -> None:
        stream = schedule.streams[w]
        if nxt[w] == len(stream):
            return
        t = stream[nxt[w]]
        for c, v in schedule.waits[t]:
            if value[c] < v:
                blocked.setdefault(c, []).append((v, w))
                return
        start[t] = now
        delay = overhead[t] + (gpu.signal_latency_s if waited else 0.0)
        heapq.heappush(timed, (now + delay, 0, t))

    def finish(t: int) -> None:
        end[t] = now
        w = schedule.worker_of[t]
        nxt[w] += 1
        for c in schedule.signals[t]:
            value[c] += 1
            waiting = blocked.pop(c, [])
            for v, w2 in waiting:
                if value[c] >= v:
                    try_start(w2, True)
                else:
                    blocked.setdefault(c, []).append((v, w2))
        try_start(w, False)

    for w in range(schedule.num_workers):
        try_start(w, False)
    while timed or streams:
        t_stream = now + (streams[0][0] - virtual) / rate() if streams else float("inf")
        if timed and timed[0][0] < t_stream:
            at, kind, t = heapq.heappop(timed)
            if k:
                virtual += rate() * (at - now)
            now = at
            if kind == 1:
                finish(t)
            elif nbytes[t] > 0:
                began[t] = now
                k += 1
                heapq.heappush(streams, (virtual + nbytes[t], t))
            else:
                heapq.heappush(timed, (now + compute[t], 1, t))
        else:
            virtual, t = heapq.heappop(streams)
            now = t_stream
            k -= 1
            done = max(now, began[t] + compute[t])  # a compute-bound tail streams nothing
            if done > now:
                heapq.heappush(timed, (done, 1, t))
            else:
                finish(t)
    if any(nxt[w] < len(schedule.streams[w]) for w in range(schedule.num_workers)):
        raise HangError("schedule cannot finish: some wait never reaches its value")
    return Timeline(np.array(schedule.worker_of, dtype=np.int64), np.array(start), np.array(end), gpu.name)


def critical_path(graph: TaskGraph, gpu: GpuSpec) -> tuple[float, list[int]]:
    """The longest chain through graph.deps, each task streaming alone (at the per-SM cap):
    a lower bound on the step time.  Returns (seconds, task ids along the chain)."""
    n = len(graph.tasks)
    if n == 0:
        return 0.0, []
    if len(graph.deps) != n:
        derive_dependencies(graph)  # e.g. a graph read back from a schedule file
    dur = task_times(graph, gpu, streaming=1)
    finish = np.zeros(n)
    via = np.full(n, -1, np.int64)
    for t, deps in enumerate(graph.deps):
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
    busy = np.bincount(tl.worker, weights=tl.end - tl.start, minlength=schedule.num_workers)
    busy = busy / step if step > 0 else busy
    return {
        "gpu": gpu.name,
        "num_tasks": len(g.tasks),
        "num_workers": schedule.num_workers,
        "step_time_s": step,
        "floor_s": fl,
        "ratio": step / fl if fl > 0 else float("inf"),  # step time over the floor; 1.0 is ideal
        "floor_fraction": fl / step if step > 0 else 0.0,  # share of peak bandwidth achieved
        "critical_path_s": critical_path(g, gpu)[0],
        "bytes": int(sum(t.bytes for t in g.tasks)),
        "flops": int(sum(t.flops for t in g.tasks)),
        "busy": busy.tolist(),  # per worker, fraction of the step spent in tasks (waits excluded)
        "mean_busy": float(busy.mean()) if len(busy) else 0.0,
    }
