"""The schedule: which worker runs which tasks in what order, and the counters that order tasks
across workers.  Also its JSON form and the order in which it can execute.

A worker runs its stream front to back.  Before starting a task it waits until each
(counter, value) in waits[task] is reached; when a task finishes it adds 1 to each counter in
signals[task].  Counters start at 0 every step.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tilert import SCHEDULE_FORMAT_VERSION
from tilert.errors import UserError
from tilert.ir import Buffer, Op, Task, TaskGraph


@dataclass
class Counter:
    id: int
    target: int
    signalled_by: list[int]  # tasks that each add 1 when they finish


@dataclass
class Schedule:
    graph: TaskGraph
    num_workers: int
    streams: list[list[int]]  # per worker, the task ids it runs, in order
    waits: list[list[tuple[int, int]]]  # per task, (counter id, value to reach) before it starts
    signals: list[list[int]]  # per task, counter ids it increments when done
    counters: list[Counter]
    worker_of: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


# --- JSON -------------------------------------------------------------------------------------
# A 50k-task schedule is a few million small lists and dicts; the cyclic garbage collector,
# triggered over and over while they are built, would take most of the time: it is paused.


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building or parsing millions of small acyclic
    objects (a 48-layer schedule): its repeated full passes would otherwise dominate."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def graph_to_json(g: TaskGraph, with_deps: bool = True) -> dict:
    with gc_paused():
        d = {
            "tokens": g.tokens,
            "buffers": [[b.name, list(b.shape), b.dtype, b.kind, b.nbytes] for b in g.buffers.values()],
            "ops": [op.to_json() for op in g.ops],
            "tasks": [t.to_json() for t in g.tasks],
        }
        if with_deps:
            d["deps"] = g.deps
        return d


def graph_from_json(d: dict) -> TaskGraph:
    """The graph; deps are empty unless they were stored (derive_dependencies refills them)."""
    with gc_paused():
        buffers = {}
        for name, shape, dtype, kind, nbytes in d["buffers"]:
            buffers[name] = Buffer(name, tuple(shape), dtype, kind, nbytes)
        return TaskGraph(
            d["tokens"], buffers, [Op.from_json(o) for o in d["ops"]],
            [Task.from_json(t) for t in d["tasks"]], [list(x) for x in d.get("deps", [])],
        )


def schedule_to_json(s: Schedule, with_deps: bool = False) -> dict:
    """A JSON-ready dict (lists and scalars only) holding the schedule and its graph.  The
    graph's deps are left out unless asked for: the counters carry the ordering the runtime
    needs, deps are derivable (derive_dependencies, about 2 s for 50k tasks), and on a MoE model
    they are most of the bytes (2.2M edges for 48k tasks: 30 MB of JSON instead of 13)."""
    with gc_paused():
        return {
            "format": SCHEDULE_FORMAT_VERSION,
            "num_workers": s.num_workers,
            "streams": s.streams,
            "waits": [[[c, v] for c, v in w] for w in s.waits],
            "signals": s.signals,
            "counters": [[c.target, c.signalled_by] for c in s.counters],
            "worker_of": s.worker_of,
            "meta": s.meta,
            "graph": graph_to_json(s.graph, with_deps=with_deps),
        }


def schedule_from_json(d: dict) -> Schedule:
    if d.get("format") != SCHEDULE_FORMAT_VERSION:
        raise UserError(
            f"schedule format {d.get('format')!r} is not supported (this tilert reads format "
            f"{SCHEDULE_FORMAT_VERSION}); recompile the model"
        )
    with gc_paused():
        return Schedule(
            graph=graph_from_json(d["graph"]),
            num_workers=d["num_workers"],
            streams=[list(s) for s in d["streams"]],
            waits=[[(c, v) for c, v in w] for w in d["waits"]],
            signals=[list(s) for s in d["signals"]],
            counters=[Counter(i, target, list(by)) for i, (target, by) in enumerate(d["counters"])],
            worker_of=list(d["worker_of"]),
            meta=dict(d.get("meta", {})),
        )


def write_schedule(path: str, s: Schedule) -> None:
    text = json.dumps(schedule_to_json(s), separators=(",", ":"))  # much faster than json.dump
    with open(path, "w") as f:
        f.write(text)


def read_schedule(path: str) -> Schedule:
    with open(path) as f, gc_paused():
        return schedule_from_json(json.load(f))


# --- execution order --------------------------------------------------------------------------


@dataclass
class Stuck:
    """Why a schedule cannot run to the end: the task at the head of each blocked worker, the
    counters each such task still waits for, and one wait cycle through them (task ids)."""

    heads: dict[int, int]  # worker -> its next task
    missing: dict[int, list[int]]  # head task -> counters it waits for that never complete
    finished: set[int]
    cycle: list[int]

    def describe(self, s: Schedule) -> str:
        g = s.graph
        lines = []
        for t in self.cycle or list(self.heads.values())[:4]:
            c = self.missing[t][0]
            pending = [x for x in s.counters[c].signalled_by if x not in self.finished]
            lines.append(
                f"task {t} ({g.ops[g.tasks[t].op].name}) on worker {s.worker_of[t]} waits on counter {c} "
                f"(target {s.counters[c].target}), missing signals from tasks {pending[:8]}{self._where(s, pending)}"
            )
        shown = len(self.cycle) or min(4, len(self.heads))
        if len(self.heads) > shown:
            lines.append(f"... and {len(self.heads) - shown} more blocked workers")
        return "; ".join(lines)


    def _where(self, s: Schedule, pending: list[int]) -> str:
        """Where the first missing signaller is stuck."""
        if not pending or not 0 <= pending[0] < len(s.worker_of):
            return ""
        x, w = pending[0], s.worker_of[pending[0]]
        head = self.heads.get(w)
        behind = f", behind task {head}" if head is not None and head != x else ""
        return f" (task {x} is on worker {w}{behind})"


def execution_order(s: Schedule) -> tuple[list[int], Stuck | None]:
    """Run the schedule symbolically: each worker advances while its next task's waits are met.
    A wait counts as met only once *every* signaller of its counter finished (conservative: a
    partial wait on a counter caught in a cycle is reported as stuck).  Returns the finishing
    order, a topological order of stream + counter edges, and, if some tasks never run, why."""
    remaining = [len(c.signalled_by) for c in s.counters]

    def unmet(t: int) -> list[int]:
        return [c for c, _ in s.waits[t] if 0 <= c < len(remaining) and remaining[c] > 0]

    blocked_on: dict[int, list[int]] = {}  # counter -> workers blocked on it
    pos = [0] * s.num_workers
    order: list[int] = []
    ready = list(range(s.num_workers))
    while ready:
        w = ready.pop()
        stream = s.streams[w]
        while pos[w] < len(stream):
            t = stream[pos[w]]
            waiting = unmet(t)
            if waiting:
                blocked_on.setdefault(waiting[0], []).append(w)
                break
            pos[w] += 1
            order.append(t)
            for c in s.signals[t]:
                if 0 <= c < len(remaining):
                    remaining[c] -= 1
                    if remaining[c] == 0:
                        ready.extend(blocked_on.pop(c, []))
    heads = {w: s.streams[w][pos[w]] for w in range(s.num_workers) if pos[w] < len(s.streams[w])}
    if not heads:
        return order, None
    missing = {t: unmet(t) for t in heads.values()}
    finished = set(order)
    return order, Stuck(heads, missing, finished, _wait_cycle(s, heads, missing, finished))


def _wait_cycle(s: Schedule, heads: dict[int, int], missing: dict[int, list[int]], finished: set[int]) -> list[int]:
    """Follow 'head task waits on a counter, whose unfinished signaller is on worker w, whose head
    waits on ...' until a worker repeats; returns the tasks of that cycle (or of the chain, when
    it ends at a signaller that no blocked worker holds)."""
    seen: dict[int, int] = {}
    path: list[int] = []
    w = min(heads)
    while w not in seen:
        seen[w] = len(path)
        t = heads[w]
        path.append(t)
        c = missing[t][0]
        signaller = next((x for x in s.counters[c].signalled_by if x not in finished), None)
        if signaller is None or not 0 <= signaller < len(s.worker_of) or s.worker_of[signaller] not in heads:
            return path
        w = s.worker_of[signaller]
    return path[seen[w]:]
