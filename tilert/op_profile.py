"""Per-op summary of a profiled megakernel step (the profiling build's per-task stamps, read by
`MegakernelRuntime.profile`): what tools/profile_step.py prints and tools/op_bench.py checks
against the bandwidth floor.

An op's *kind* is its name without the layer prefix ("q_proj" for "layer3.q_proj",
"draft.q_proj" for "draft.layer3.q_proj"), so the layers of one kind are summed; its *span* is
the time from the op's first task start to its last task end, averaged over the layers that
have it (the op's wall time in the step)."""

from __future__ import annotations

import collections

from tilert.cost import GPUS, op_kind, task_time
from tilert.schedule import Schedule


def step_span_ns(rows: list[dict]) -> int:
    """The profiled step's wall time: its first task start to its last task end (ns)."""
    return max(r["end"] for r in rows) - min(r["start"] for r in rows)


def op_summary(schedule: Schedule, rows: list[dict], gpu: str = "h100") -> dict[str, dict]:
    """kind -> tasks, busy_ns (sum of task times), wait_ns (sum of waits on counters), bytes and
    model_ns (the cost model's estimate) of its tasks, first_start / last_end (ns), layers (how
    many ops of the kind), mean_us (mean task time) and span_us (see the module doc)."""
    tasks, ops = schedule.graph.tasks, schedule.graph.ops
    model = GPUS[gpu]
    out = collections.defaultdict(lambda: {"tasks": 0, "busy_ns": 0, "wait_ns": 0, "bytes": 0, "model_ns": 0.0,
                                           "first_start": float("inf"), "last_end": 0})
    op_lo, op_hi, ops_of = {}, {}, collections.defaultdict(set)
    for r in rows:
        t = tasks[r["task"]]
        kind = op_kind(ops[t.op].name)
        k = out[kind]
        k["tasks"] += 1
        k["busy_ns"] += r["end"] - r["start"]
        k["wait_ns"] += r["start"] - r["wait"]
        k["bytes"] += t.bytes
        k["model_ns"] += task_time(t, model) * 1e9
        k["first_start"] = min(k["first_start"], r["start"])
        k["last_end"] = max(k["last_end"], r["end"])
        op_lo[t.op] = min(op_lo.get(t.op, float("inf")), r["start"])
        op_hi[t.op] = max(op_hi.get(t.op, 0), r["end"])
        ops_of[kind].add(t.op)
    for kind, k in out.items():
        k["layers"] = len(ops_of[kind])
        k["mean_us"] = k["busy_ns"] / k["tasks"] / 1e3
        k["span_us"] = sum(op_hi[o] - op_lo[o] for o in ops_of[kind]) / len(ops_of[kind]) / 1e3
    return dict(out)


def op_table(by_kind: dict[str, dict], step_ns: float, workers: int) -> str:
    """`op_summary`'s kinds as a text table, busiest first: tasks, mean task time, GB/s per SM
    while busy, mean wait on counters, the cost model's task time, share of the step's
    worker-time, span per layer."""
    lines = [f"{'op':24s} {'tasks':>5s} {'mean us':>8s} {'GB/s/SM':>8s} {'wait us':>8s} {'model us':>8s} "
             f"{'busy %':>6s} {'span us':>8s}"]
    for kind, k in sorted(by_kind.items(), key=lambda kv: -kv[1]["busy_ns"]):
        lines.append(f"{kind:24s} {k['tasks']:5d} {k['mean_us']:8.2f} {k['bytes'] / max(k['busy_ns'], 1):8.2f} "
                     f"{k['wait_ns'] / k['tasks'] / 1e3:8.2f} {k['model_ns'] / k['tasks'] / 1e3:8.2f} "
                     f"{100 * k['busy_ns'] / (step_ns * workers):6.1f} {k['span_us']:8.1f}")
    return "\n".join(lines)
