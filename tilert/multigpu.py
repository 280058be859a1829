"""Multi-GPU schedules: one megakernel per GPU, synchronised within and across GPUs by counters.

The N ranks' task graphs (tilert/collectives.py) are scheduled and validated *together*, as one
union graph:

- Union graph.  Every buffer of rank r is named `name@r` (a peer buffer already is), so
  dependencies between ranks appear exactly where a communication task reads another rank's
  memory.  Program order is op-major, rank-minor: op k of rank 0, op k of rank 1, ..., then op
  k+1.  Every rank runs the same op sequence, so this is a valid sequential order of the whole
  step (an all-reduce comes after every rank's partials, the next write of a partial after every
  rank's read of it), and deps.derive_dependencies finds all cross-rank dependencies from the
  regions alone.  An op of the union is one op of the model on every rank.
- Schedule.  Rank r's tasks run on its own workers (union workers r*W .. r*W+W-1), assigned by
  the usual policy on the rank's own graph; the scheduler then places counters on the union.
  A counter lives in the memory of the GPU whose tasks wait on it (they spin on local memory);
  a signaller on another GPU increments it remotely over NVLink.  A counter waited on from
  several ranks is therefore split into one copy per rank (`home_counters`).
- Validation: validate.validate_ranks checks the placement (workers, counter homes, which
  memory each task may touch) and then the union for deadlock and races, across GPUs.
- Per-rank schedules (`split`): rank r's tasks, workers and the counters living on it, in local
  ids; a counter's `signalled_by` lists its local signallers, its target counts remote ones too;
  `meta["comm"]["remote_signals"]` lists [task, rank, counter] for every signal a task sends to
  another GPU.  A rank's schedule cannot run alone; `join` rebuilds the union from all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tilert.collectives import COMM_KINDS, buffer_rank, lower_rank, peer_name
from tilert.deps import derive_dependencies
from tilert.errors import UserError
from tilert.fusion import apply_fusions
from tilert.ir import PEER, Op, Region, Task, TaskGraph
from tilert.partition import Partition
from tilert.schedule import Counter, Schedule
from tilert.scheduler import assign_workers, build_schedule
from tilert.validate import validate_ranks


@dataclasses.dataclass
class Union:
    """All ranks' schedules of one step as one schedule, and where each task came from."""

    schedule: Schedule
    where: list[tuple[int, int]]  # union task id -> (rank, task id in the rank's graph)
    home: list[int]  # counter id -> the rank it lives on
    ranks: int
    workers_per_rank: int


def union_graph(graphs: list[TaskGraph]) -> tuple[TaskGraph, list[tuple[int, int]]]:
    """The ranks' graphs as one (see the module doc); returns it and union id -> (rank, local id)."""
    first = graphs[0]
    for r, g in enumerate(graphs[1:], 1):
        if [(o.kind, o.name) for o in g.ops] != [(o.kind, o.name) for o in first.ops]:
            raise UserError(f"rank {r}'s step has other ops than rank 0's: the ranks were not compiled together")
    buffers = {}
    for r, g in enumerate(graphs):
        for name, b in g.buffers.items():
            if b.kind != PEER:
                buffers[peer_name(name, r)] = dataclasses.replace(b, name=peer_name(name, r))
    for r, g in enumerate(graphs):
        for name, b in g.buffers.items():
            owner = buffers.get(name)
            if b.kind == PEER and (owner is None or owner.shape != b.shape):
                raise UserError(f"rank {r} reads {name}, which its owner does not have in that shape")

    def rename(r: int, regions: list[Region]) -> list[Region]:
        """Rank r's own buffers get their @r name; a peer buffer already names its owner."""
        return [reg if graphs[r].buffers[reg.buffer].kind == PEER else Region(peer_name(reg.buffer, r), reg.box)
                for reg in regions]

    ops, tasks, where = [], [], []
    for k, op in enumerate(first.ops):
        u = Op(k, op.kind, op.name, op.layer)
        for r, g in enumerate(graphs):
            for lt in g.ops[k].tasks:
                t = g.tasks[lt]
                # Stages stay in the rank graph: the union orders tasks, the ranks execute them.
                tasks.append(Task(len(tasks), k, t.kind, t.params, rename(r, t.reads), rename(r, t.writes),
                                  t.bytes, t.flops))
                u.tasks.append(len(tasks) - 1)
                where.append((r, lt))
        ops.append(u)
    return TaskGraph(first.tokens, buffers, ops, tasks), where


def home_counters(s: Schedule, rank_of_worker: Callable[[int], int]) -> list[int]:
    """Give every counter one home rank: the rank of its waiters.  A counter waited on from
    several ranks is split into one copy per rank (each signaller signals every copy).
    Rewrites s's counters, waits and signals in place; returns counter id -> home rank."""
    new_id: dict[tuple[int, int], int] = {}
    counters: list[Counter] = []
    home: list[int] = []
    waits = []
    for t, ws in enumerate(s.waits):
        r = rank_of_worker(s.worker_of[t])
        mine = []
        for c, v in ws:
            key = (c, r)
            if key not in new_id:
                new_id[key] = len(counters)
                old = s.counters[c]
                counters.append(Counter(len(counters), old.target, list(old.signalled_by)))
                home.append(r)
            mine.append((new_id[key], v))
        waits.append(mine)
    signals: list[list[int]] = [[] for _ in s.waits]
    for c in counters:
        for t in c.signalled_by:
            signals[t].append(c.id)
    s.counters, s.waits, s.signals = counters, waits, signals
    return home


def schedule_union(graphs: list[TaskGraph], workers: int, policy: str = "list", gpu: str = "h100") -> Union:
    """Schedule the ranks' (fused) graphs together and validate the result."""
    n = len(graphs)
    union, where = union_graph(graphs)
    derive_dependencies(union)
    local = [assign_workers(g, workers, policy, gpu) for g in graphs]
    worker_of = [r * workers + local[r][lt] for r, lt in where]
    s = build_schedule(union, n * workers, policy, gpu, worker_of=worker_of)
    home = home_counters(s, lambda w: w // workers)
    s.meta.update({"ranks": n, "workers_per_rank": workers})
    u = Union(s, where, home, n, workers)
    check(u)
    return u


def check(u: Union) -> None:
    """validate.validate_ranks on a union (placement, then deadlock and races across GPUs)."""
    validate_ranks(u.schedule, u.workers_per_rank, u.home, buffer_rank, COMM_KINDS)


def split(u: Union, graphs: list[TaskGraph], meta: dict | None = None) -> list[Schedule]:
    """Each rank's schedule, in its own task, worker and counter ids (see the module doc)."""
    s, W = u.schedule, u.workers_per_rank
    local_counter: dict[int, int] = {}
    per_rank = [0] * u.ranks
    for c, r in enumerate(u.home):
        local_counter[c] = per_rank[r]
        per_rank[r] += 1
    out = []
    for r, g in enumerate(graphs):
        n = len(g.tasks)
        waits: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        signals: list[list[int]] = [[] for _ in range(n)]
        worker_of = [0] * n
        remote = []
        counters = [Counter(i, 0, []) for i in range(per_rank[r])]
        for t, (tr, lt) in enumerate(u.where):
            if tr != r:
                continue
            worker_of[lt] = s.worker_of[t] - r * W
            waits[lt] = [(local_counter[c], v) for c, v in s.waits[t]]
            for c in s.signals[t]:
                if u.home[c] == r:
                    signals[lt].append(local_counter[c])
                else:
                    remote.append([lt, u.home[c], local_counter[c]])
        for c, counter in enumerate(s.counters):
            if u.home[c] == r:
                local = counters[local_counter[c]]
                local.target = counter.target
                local.signalled_by = [u.where[t][1] for t in counter.signalled_by if u.where[t][0] == r]
        streams = [[u.where[t][1] for t in s.streams[r * W + w]] for w in range(W)]
        comm = {"rank": r, "ranks": u.ranks, "remote_signals": remote}
        out.append(Schedule(g, W, streams, waits, signals, counters, worker_of,
                            {**s.meta, **(meta or {}), "comm": comm}))
    return out


def join(schedules: list[Schedule]) -> Union:
    """The union of every rank's schedule of one step (the inverse of `split`)."""
    n = len(schedules)
    for r, s in enumerate(schedules):
        comm = s.meta.get("comm") or {}
        if comm.get("rank") != r or comm.get("ranks") != n:
            raise UserError(f"schedule {r} of {n} is rank {comm.get('rank')} of {comm.get('ranks')}: "
                            f"not one of these ranks")
    W = schedules[0].num_workers
    if any(s.num_workers != W for s in schedules):
        raise UserError("ranks have different worker counts")
    graph, where = union_graph([s.graph for s in schedules])
    uid = {rl: t for t, rl in enumerate(where)}
    first_counter = [0]
    for s in schedules:
        first_counter.append(first_counter[-1] + len(s.counters))
    home = [r for r, s in enumerate(schedules) for _ in s.counters]
    signalled_by: list[list[int]] = [[] for _ in home]
    targets = [c.target for s in schedules for c in s.counters]
    total = len(where)
    waits: list[list[tuple[int, int]]] = [[] for _ in range(total)]
    worker_of = [0] * total
    streams = []
    for r, s in enumerate(schedules):
        off = first_counter[r]
        for lt in range(len(s.graph.tasks)):
            t = uid[(r, lt)]
            waits[t] = [(off + c, v) for c, v in s.waits[lt]]
            worker_of[t] = r * W + s.worker_of[lt]
        for c, counter in enumerate(s.counters):
            signalled_by[off + c] += [uid[(r, lt)] for lt in counter.signalled_by]
        for lt, to_rank, c in s.meta["comm"]["remote_signals"]:
            if (r, lt) not in uid or not 0 <= to_rank < n or not 0 <= c < len(schedules[to_rank].counters):
                raise UserError(f"rank {r}'s task {lt} signals counter {c} of rank {to_rank}, which does not exist")
            signalled_by[first_counter[to_rank] + c].append(uid[(r, lt)])
        streams += [[uid[(r, lt)] for lt in st] for st in s.streams]
    counters = [Counter(c, targets[c], sorted(by)) for c, by in enumerate(signalled_by)]
    signals: list[list[int]] = [[] for _ in range(total)]
    for c in counters:
        for t in c.signalled_by:
            signals[t].append(c.id)
    meta = {k: v for k, v in schedules[0].meta.items() if k != "comm"}
    meta.update({"ranks": n, "workers_per_rank": W})
    return Union(Schedule(graph, n * W, streams, waits, signals, counters, worker_of, meta), where, home, n, W)


# ---- compiling ----------------------------------------------------------------------------------


def compile_rank_step(part: Partition, recipe: dict, tokens: int, max_seq_len: int, max_tokens: int,
                      num_workers: int | None = None, policy: str = "list", gpu: str = "h100",
                      on_phase: Callable[[str], None] | None = None) -> list[Schedule]:
    """Every rank's validated schedule for a step of `tokens` tokens."""
    phase = on_phase or (lambda name: None)
    phase("lowering")
    graphs = [lower_rank(part, r, recipe, tokens, max_seq_len, max_tokens) for r in range(part.n)]
    phase("fusing")
    graphs = [apply_fusions(g, recipe.get("fuse", [])) for g in graphs]
    phase("scheduling")
    u = schedule_union(graphs, num_workers or recipe["workers"], policy, gpu)
    meta = {"tokens": tokens, "max_seq_len": max_seq_len, "recipe": recipe.get("source"), "gpu": gpu,
            "partition": part.to_json()}
    return split(u, graphs, meta)


def compile_rank_steps(part: Partition, recipe: dict, token_counts: list[int], max_seq_len: int,
                       num_workers: int | None = None, policy: str = "list",
                       gpu: str = "h100") -> list[dict[int, Schedule]]:
    """Per rank, its schedules for every step size (one KV-cache layout for all of them)."""
    max_tokens = max(token_counts)
    per_step = {b: compile_rank_step(part, recipe, b, max_seq_len, max_tokens, num_workers, policy, gpu)
                for b in sorted(set(token_counts))}
    return [{b: per_step[b][r] for b in per_step} for r in range(part.n)]
