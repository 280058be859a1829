"""Fusions as IR rewrites on the task list (before dependencies are derived).

Two generic rewrites, each checked on regions, never on op names:

- *Recompute* (`rmsnorm_into_projection`): a cheap single-task op whose output is read only by
  tile tasks is removed; every reader recomputes it privately as a first stage.  The
  intermediate (the normed hidden state) never goes through global memory.
- *Epilogue* (`rope_kv_into_projection`): a task whose reads of activations all lie inside what
  one earlier task writes is appended to that task as a last stage (RoPE on the heads a
  projection tile produced, then the KV-cache write of those heads).  It moves up in program
  order, so nothing in between may touch its regions.

After both, an activation buffer that no task reads at top level any more is private to the
tasks that write it (`Task.local`) and disappears from global memory.
"""

from __future__ import annotations

import copy

from tilert.errors import UserError
import dataclasses

from tilert.ir import ACTIVATION, LOCAL, Op, Region, Task, TaskGraph

RULES = ("rmsnorm_into_projection", "rope_kv_into_projection")
# Task kinds that read the whole normed hidden state (or one token of it) and may recompute it.
_NORM_READERS = {"linear", "gate_up", "router", "lm_head", "expert_gate_up", "expert_gate_up_union"}
_EPILOGUE_KINDS = {"rope", "kv_write"}
_EPILOGUE_HOSTS = {"linear"}


def _stages(t: Task) -> list[Task]:
    return t.stages if t.stages else [t]


def _base_kinds(t: Task) -> list[str]:
    return [s.kind for s in _stages(t)]


def _conflict(a: Task, b: Task, buffers) -> bool:
    for w in a.writes:
        if any(w.overlaps(r) for r in b.reads + b.writes):
            return True
    for w in b.writes:
        if any(w.overlaps(r) for r in a.reads):
            return True
    return False


def _merge(stages: list[Task], tid: int, op: int) -> Task:
    """A fused task: reads what no earlier stage produced, writes what any stage writes."""
    reads: list[Region] = []
    writes: list[Region] = []
    nbytes = 0
    for s in stages:
        for r in s.reads:
            if any(w.contains(r) for w in writes):
                nbytes -= r.volume * 4  # read from the task's own registers / shared memory
            elif r not in reads:
                reads.append(r)
        for w in s.writes:
            if not any(o.contains(w) for o in writes):
                writes = [o for o in writes if not w.contains(o)] + [w]
        nbytes += s.bytes
    kinds: list[str] = []
    for s in stages:
        if not kinds or kinds[-1] != s.kind:
            kinds.append(s.kind)
    return Task(tid, op, "+".join(kinds), {}, reads, writes, max(0, nbytes),
                sum(s.flops for s in stages), [copy.copy(s) for s in stages], [])


def fuse_recompute(graph: TaskGraph) -> TaskGraph:
    tasks = list(graph.tasks)
    removed: set[int] = set()
    replaced: dict[int, Task] = {}
    for i, norm in enumerate(tasks):
        if norm.stages or norm.kind != "rmsnorm" or len(graph.ops[norm.op].tasks) != 1:
            continue
        (out,) = norm.writes
        readers = []
        for j in range(i + 1, len(tasks)):
            t = replaced.get(tasks[j].id, tasks[j])
            if any(r.overlaps(out) for r in t.reads):
                readers.append(j)
            if any(w.overlaps(out) for w in t.writes):
                break
        if not readers or any(_base_kinds(tasks[j])[0] not in _NORM_READERS for j in readers):
            continue
        # The recomputation reads the norm's inputs later than the norm did: nothing in
        # between may write them.
        last = readers[-1]
        if any(any(w.overlaps(r) for w in tasks[j].writes for r in norm.reads)
               for j in range(i + 1, last + 1)):
            continue
        for j in readers:
            t = replaced.get(tasks[j].id, tasks[j])
            replaced[tasks[j].id] = _merge([norm] + _stages(t), t.id, t.op)
        removed.add(norm.id)
    new = [replaced.get(t.id, t) for t in tasks if t.id not in removed]
    return _renumber(graph, new)


def fuse_epilogue(graph: TaskGraph) -> TaskGraph:
    tasks = list(graph.tasks)
    pos = 0
    while pos < len(tasks):
        c = tasks[pos]
        if c.stages or c.kind not in _EPILOGUE_KINDS:
            pos += 1
            continue
        acts = [r for r in c.reads if graph.buffers[r.buffer].kind == ACTIVATION]
        host = None
        for j in range(pos - 1, -1, -1):
            t = tasks[j]
            if any(w.overlaps(r) for w in t.writes for r in acts):
                host = j
                break
        ok = (
            host is not None
            and _base_kinds(tasks[host])[-1] in _EPILOGUE_HOSTS | _EPILOGUE_KINDS
            and "linear" in _base_kinds(tasks[host])
            and all(any(w.contains(r) for w in tasks[host].writes) for r in acts)
            and not any(_conflict(c, tasks[j], graph.buffers) for j in range(host + 1, pos))
        )
        if not ok:
            pos += 1
            continue
        t = tasks[host]
        tasks[host] = _merge(_stages(t) + [c], t.id, t.op)
        del tasks[pos]
    return _renumber(graph, tasks)


def privatise(graph: TaskGraph) -> TaskGraph:
    """Activation buffers no task reads at top level become task-local."""
    read = {r.buffer for t in graph.tasks for r in t.reads}
    dead = {name for name, b in graph.buffers.items() if b.kind == ACTIVATION and name not in read}
    for t in graph.tasks:
        local = sorted({w.buffer for w in t.writes if w.buffer in dead})
        if local:
            if not t.stages:
                raise UserError(f"task {t.id} ({graph.ops[t.op].name}) writes {local} that nothing reads")
            t.writes = [w for w in t.writes if w.buffer not in dead]
            t.local = local
    buffers = {n: (dataclasses.replace(b, kind=LOCAL) if n in dead else b) for n, b in graph.buffers.items()}
    return TaskGraph(graph.tokens, buffers, graph.ops, graph.tasks)


def _renumber(graph: TaskGraph, tasks: list[Task]) -> TaskGraph:
    ops = [Op(o.id, o.kind, o.name, o.layer) for o in graph.ops]
    for new_id, t in enumerate(tasks):
        t.id = new_id
        ops[t.op].tasks.append(new_id)
    # Ops whose every task was fused away disappear; renumber the rest.
    keep = [o for o in ops if o.tasks]
    remap = {o.id: i for i, o in enumerate(keep)}
    for i, o in enumerate(keep):
        o.id = i
    for t in tasks:
        t.op = remap[t.op]
    for o, base in zip(keep, (graph.ops[k] for k in sorted(remap))):
        kinds = {tasks[i].kind for i in o.tasks}
        o.kind = kinds.pop() if len(kinds) == 1 else base.kind
    return TaskGraph(graph.tokens, graph.buffers, keep, tasks)


def apply_fusions(graph: TaskGraph, rules) -> TaskGraph:
    for rule in rules:
        if rule not in RULES:
            raise UserError(f"unknown fusion rule {rule!r}; known: {', '.join(RULES)}")
    if "rmsnorm_into_projection" in rules:
        graph = fuse_recompute(graph)
    if "rope_kv_into_projection" in rules:
        graph = fuse_epilogue(graph)
    return privatise(graph)
