"""The static validator: a schedule passes only if it can neither hang nor race.

It trusts nothing the scheduler computed beyond the schedule itself: conflicts are recomputed
from the tasks' regions (never from graph.deps), and ordering is derived from the streams and
counters alone.  The region sweep is deps.conflict_pairs, run along the schedule's own execution
order rather than program order; its pairs suffice because happens-before is transitive.

Happens-before.  Within a stream, earlier tasks happen before later ones.  A wait on counter C
for value v makes the waiter happen after C's signallers only when v == target == the number of
signallers: a smaller value is reached by *some* v signallers, so it orders none in particular.
Vector clocks (per task, the count of each worker's stream known to have finished before the
task ends) are propagated along a topological order of streams + counters; task a happens before
b iff b's clock on a's worker passes a's stream position.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from tilert.deps import conflict_pairs
from tilert.errors import ScheduleError
from tilert.ir import WEIGHT
from tilert.schedule import Schedule, execution_order

_SHOW = 5  # offending items named in one message


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError naming the offending tasks if `schedule` is malformed, can deadlock,
    or lets two conflicting tasks run unordered."""
    _check_structure(schedule)
    order, stuck = execution_order(schedule)
    if stuck is not None:
        raise ScheduleError(f"deadlock: wait cycle across workers: {stuck.describe(schedule)}")
    clocks = happens_before_clocks(schedule, order)
    _check_races(schedule, order, clocks)


def check_static(schedule: Schedule) -> dict:
    """A summary of the schedule's synchronisation (it does not validate: call validate)."""
    s = schedule
    sizes = [len(st) for st in s.streams]
    waiters = np.bincount([c for w in s.waits for c, _ in w], minlength=len(s.counters))
    return {
        "num_tasks": len(s.graph.tasks),
        "num_workers": s.num_workers,
        "tasks_per_worker": [min(sizes), max(sizes)],
        "num_counters": len(s.counters),
        "num_waits": int(sum(len(w) for w in s.waits)),
        "num_signals": int(sum(len(x) for x in s.signals)),
        "tasks_without_waits": int(sum(1 for w in s.waits if not w)),
        "max_signallers": max((len(c.signalled_by) for c in s.counters), default=0),
        "mean_waiters_per_counter": float(waiters.mean()) if len(waiters) else 0.0,
    }


def describe_task(s: Schedule, t: int) -> str:
    task = s.graph.tasks[t]
    w = s.worker_of[t] if 0 <= t < len(s.worker_of) else "?"
    per_rank = s.meta.get("workers_per_rank")  # a multi-GPU union: name the GPU too
    where = f"rank {w // per_rank} worker {w % per_rank}" if per_rank and w != "?" else f"worker {w}"
    return f"task {t} ({s.graph.ops[task.op].name}, {task.kind}, {where})"


def _fail(what: str, items: list[str]) -> None:
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    raise ScheduleError(f"{what}: " + "; ".join(items[:_SHOW]) + more)


def _check_structure(s: Schedule) -> None:
    n = len(s.graph.tasks)
    if len(s.streams) != s.num_workers:
        raise ScheduleError(f"schedule has {len(s.streams)} streams for {s.num_workers} workers")
    for name, per_task in (("waits", s.waits), ("signals", s.signals), ("worker_of", s.worker_of)):
        if len(per_task) != n:
            raise ScheduleError(f"schedule.{name} has {len(per_task)} entries for {n} tasks")

    flat = [t for st in s.streams for t in st]
    bad = sorted({t for t in flat if not 0 <= t < n})
    if bad:
        _fail("streams name tasks that do not exist", [str(t) for t in bad])
    seen = np.bincount(np.array(flat, dtype=np.int64), minlength=n) if flat else np.zeros(n, np.int64)
    missing = np.flatnonzero(seen == 0).tolist()
    if missing:
        _fail("tasks missing from every stream", [describe_task(s, t) for t in missing])
    dup = np.flatnonzero(seen > 1).tolist()
    if dup:
        _fail("tasks scheduled more than once", [describe_task(s, t) for t in dup])
    wrong = [t for w, st in enumerate(s.streams) for t in st if s.worker_of[t] != w]
    if wrong:
        _fail("worker_of disagrees with the streams", [f"{describe_task(s, t)} is in another stream" for t in wrong])

    problems = []
    for i, c in enumerate(s.counters):
        if c.id != i:
            problems.append(f"counter at index {i} has id {c.id}")
        if any(not 0 <= t < n for t in c.signalled_by):
            problems.append(f"counter {i} is signalled by tasks that do not exist")
        elif len(set(c.signalled_by)) != len(c.signalled_by):
            problems.append(f"counter {i} lists a signaller twice")
        if c.target > len(c.signalled_by):
            who = ", ".join(describe_task(s, t) for t in c.signalled_by[:4] if 0 <= t < n)
            problems.append(
                f"unsatisfiable counter {i}: target {c.target} but only {len(c.signalled_by)} signallers ({who})"
            )
    if problems:
        _fail("bad counters", problems)

    declared = {(c.id, t) for c in s.counters for t in c.signalled_by}
    emitted = {(c, t) for t, cs in enumerate(s.signals) for c in cs}
    if declared != emitted:
        diff = sorted(declared ^ emitted)
        _fail("signals disagree with counters' signalled_by", [
            f"{describe_task(s, t)} {'signals' if (c, t) in emitted else 'does not signal'} counter {c}"
            for c, t in diff
        ])

    for t, ws in enumerate(s.waits):
        for c, v in ws:
            if not 0 <= c < len(s.counters):
                problems.append(f"{describe_task(s, t)} waits on counter {c}, which does not exist")
            elif v > s.counters[c].target:
                problems.append(
                    f"unsatisfiable wait: {describe_task(s, t)} waits for counter {c} to reach {v}, "
                    f"above its target {s.counters[c].target}"
                )
            elif v < 1:
                problems.append(f"{describe_task(s, t)} waits for counter {c} to reach {v}, which means nothing")
    if problems:
        _fail("bad waits", problems)


def happens_before_clocks(s: Schedule, order: list[int]) -> np.ndarray:
    """clocks[t][w]: how many tasks of worker w's stream happen before t finishes (t included).
    `order` must be a topological order of streams + counters (see execution_order)."""
    n = len(s.graph.tasks)
    W = s.num_workers
    pos = np.zeros(n, np.int64)
    prev = np.full(n, -1, np.int64)
    for stream in s.streams:
        pos[stream] = np.arange(len(stream))
        prev[stream[1:]] = stream[:-1]
    full = [c.target == len(c.signalled_by) for c in s.counters]
    clocks = np.zeros((n, W), np.int32)
    counter_clock = np.zeros((len(s.counters), W), np.int32)
    zero = np.zeros(W, np.int32)
    for t in order:
        p = prev[t]
        clock = clocks[p].copy() if p >= 0 else zero.copy()
        for c, v in s.waits[t]:
            if full[c] and v == s.counters[c].target:
                np.maximum(clock, counter_clock[c], out=clock)
        clock[s.worker_of[t]] = pos[t] + 1
        clocks[t] = clock
        for c in s.signals[t]:
            np.maximum(counter_clock[c], clock, out=counter_clock[c])
    return clocks


def _check_races(s: Schedule, order: list[int], clocks: np.ndarray) -> None:
    n = len(s.graph.tasks)
    src, dst = conflict_pairs(s.graph, order)  # src runs before dst in `order`
    if not len(src):
        return
    pos = np.zeros(n, np.int64)
    for stream in s.streams:
        pos[stream] = np.arange(len(stream))
    worker = np.array(s.worker_of, np.int64)
    unordered = np.flatnonzero(clocks[dst, worker[src]] <= pos[src])
    if len(unordered):
        pairs = sorted({(int(min(src[i], dst[i])), int(max(src[i], dst[i]))) for i in unordered})
        what = f"race: {len(pairs)} pair{'s' if len(pairs) > 1 else ''} of conflicting tasks unordered"
        _fail(what, [_conflict(s, a, b) for a, b in pairs[:_SHOW]])


def _conflict(s: Schedule, a: int, b: int) -> str:
    """Name two unordered tasks and the regions on which they conflict."""
    g = s.graph
    ta, tb = g.tasks[a], g.tasks[b]
    for ma, ra in [("writes", r) for r in ta.writes] + [("reads", r) for r in ta.reads]:
        for mb, rb in [("writes", r) for r in tb.writes] + [("reads", r) for r in tb.reads]:
            if "writes" in (ma, mb) and g.buffers[ra.buffer].kind != WEIGHT and ra.overlaps(rb):
                return (
                    f"{describe_task(s, a)} {ma} {ra.buffer}{list(ra.box)} and {describe_task(s, b)} "
                    f"{mb} {rb.buffer}{list(rb.box)} unordered"
                )
    return f"{describe_task(s, a)} and {describe_task(s, b)} unordered"


# ---- multi-GPU ---------------------------------------------------------------------------------


def validate_ranks(s: Schedule, workers_per_rank: int, counter_home: list[int],
                   buffer_rank: Callable[[str], int], comm_kinds: Collection[str]) -> None:
    """Validate a multi-GPU step: `s` is the union of every rank's schedule (tilert/multigpu.py),
    rank r running on workers r*workers_per_rank onwards, counter c living in the memory of
    rank counter_home[c], buffer b in the memory of rank buffer_rank(b).  It passes only if
    - every counter is waited on only by tasks of the rank it lives on (a GPU spins on its own
      memory; other GPUs may only signal it),
    - every task writes only its own rank's memory, and only communication tasks (`comm_kinds`)
      read another rank's,
    - and the union, cross-GPU counters included, can neither hang nor race (`validate`)."""
    _check_structure(s)
    W = workers_per_rank
    if len(counter_home) != len(s.counters) or s.num_workers % W:
        raise ScheduleError(f"multi-GPU schedule: {len(counter_home)} counter homes for {len(s.counters)} "
                            f"counters, {s.num_workers} workers in ranks of {W}")
    problems = []
    for t, ws in enumerate(s.waits):
        rank = s.worker_of[t] // W
        for c, _ in ws:
            if 0 <= c < len(counter_home) and counter_home[c] != rank:
                problems.append(f"{describe_task(s, t)} waits on counter {c}, which lives on rank {counter_home[c]}")
    if problems:
        _fail("counters waited on from another GPU", problems)
    for t, task in enumerate(s.graph.tasks):
        rank = s.worker_of[t] // W
        for mode, regions in (("writes", task.writes), ("reads", task.reads)):
            for r in regions:
                owner = buffer_rank(r.buffer)
                if owner != rank and (mode == "writes" or task.kind not in comm_kinds):
                    problems.append(f"{describe_task(s, t)} {mode} {r.buffer}, in rank {owner}'s memory")
    if problems:
        _fail("tasks touching another GPU's memory", problems)
    validate(s)
