"""Timelines as Chrome / Perfetto traces (open in ui.perfetto.dev or chrome://tracing):
one track per worker, one slice per task named `op name:task kind`."""

from __future__ import annotations

import json

from tilert.cost import Timeline
from tilert.schedule import Schedule


def timeline_to_chrome_trace(timeline: Timeline, schedule: Schedule) -> dict:
    g = schedule.graph
    events: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": f"tilert step ({timeline.gpu or 'model'})"}}
    ]
    for w in range(schedule.num_workers):
        events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": w, "args": {"name": f"worker {w}"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": w, "args": {"sort_index": w}})
    for t, task in enumerate(g.tasks):
        op = g.ops[task.op]
        events.append({
            "ph": "X", "pid": 0, "tid": int(timeline.worker[t]),
            "name": f"{op.name}:{task.kind}", "cat": op.kind,
            "ts": float(timeline.start[t]) * 1e6, "dur": float(timeline.end[t] - timeline.start[t]) * 1e6,
            "args": {"task": t, "bytes": task.bytes, "flops": task.flops, "waits": [list(w) for w in schedule.waits[t]]},
        })
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": dict(timeline.meta)}


def write_chrome_trace(path: str, timeline: Timeline, schedule: Schedule) -> None:
    with open(path, "w") as f:
        json.dump(timeline_to_chrome_trace(timeline, schedule), f)
