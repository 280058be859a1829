"""`tilert inspect` of a multi-GPU artifact: the partition, every rank's schedule, the
communication tasks and the counters that cross GPUs.

The ranks are joined into their union (tilert/multigpu.py) and validated again.  The simulated
step runs the union under the cost model of an N-GPU node taken as N times one GPU's SMs and
bandwidth; NVLink transfers are not in that simulation (each task's bytes are its own GPU's
memory traffic): tools/project_multi_gpu.py adds them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import defaultdict
from typing import Any

import numpy as np

from tilert.collectives import COMM_KINDS
from tilert.cost import simulate
from tilert.errors import UserError
from tilert.inspect import _gpu, fmt_bytes, fmt_time, table
from tilert.ir import PEER, STATE, WEIGHT
from tilert.multigpu import Union, check, join


def _link_bytes(graph, task) -> int:
    """Bytes a task reads from other GPUs (its regions on peer buffers)."""
    total = 0
    for r in task.reads:
        b = graph.buffers[r.buffer]
        if b.kind == PEER:
            total += r.volume * b.nbytes // max(1, math.prod(b.shape))
    return total


def node_spec(gpu, n: int):
    """N GPUs as one simulated chip: N times the SMs and the bandwidth (the per-SM share is one GPU's)."""
    return dataclasses.replace(gpu, name=f"{n}x{gpu.name}", num_sms=n * gpu.num_sms,
                               hbm_bytes_per_s=n * gpu.hbm_bytes_per_s, flops_per_s=n * gpu.flops_per_s)


def summarize_multi(art, step: int, gpu_name: str | None = None) -> dict[str, Any]:
    gpu = _gpu(gpu_name or art.gpu)
    rank_scheds = [a.schedules[step] for a in art.ranks]
    u: Union = join(rank_scheds)
    check(u)  # raises ScheduleError (exit 2) if the ranks do not form a valid step
    s, W, n = u.schedule, u.workers_per_rank, u.ranks
    cfg = art.cfg

    ranks = []
    for r, rs in enumerate(rank_scheds):
        g = rs.graph
        cross = sum(1 for c in s.counters if u.home[c.id] == r
                    and any(s.worker_of[t] // W != r for t in c.signalled_by))
        ranks.append({
            "rank": r, "tasks": len(g.tasks), "workers": rs.num_workers, "counters": len(rs.counters),
            "waits": int(sum(len(w) for w in rs.waits)), "cross_gpu_counters": cross,
            "remote_signals": len(rs.meta["comm"]["remote_signals"]),
            "link_bytes": int(sum(_link_bytes(g, t) for t in g.tasks)),
            "bytes": int(sum(t.bytes for t in g.tasks)),
            "weights_bytes": int(sum(b.nbytes for b in g.buffers.values() if b.kind == WEIGHT)),
            "kv_cache_bytes": int(sum(b.nbytes for b in g.buffers.values() if b.kind == STATE)),
            "slice": art.part.ranks[r].to_json(),
        })

    tl = simulate(s, node_spec(gpu, n))
    ops = []
    for op in s.graph.ops:
        per_rank: dict[int, list[int]] = defaultdict(list)
        for t in op.tasks:
            per_rank[u.where[t][0]].append(t)
        ids = np.asarray(op.tasks, dtype=np.int64)
        entry = {
            "name": op.name, "kind": op.kind, "layer": op.layer,
            "tasks": [len(per_rank[r]) for r in range(n)],
            "bytes": [int(sum(s.graph.tasks[t].bytes for t in per_rank[r])) for r in range(n)],
            "start_s": float(tl.start[ids].min()) if len(ids) else 0.0,
            "end_s": float(tl.end[ids].max()) if len(ids) else 0.0,
            "est_time_s": float((tl.end[ids] - tl.start[ids]).sum()) / s.num_workers if len(ids) else 0.0,
        }
        if op.kind in COMM_KINDS:
            cross_waits = 0
            for t in op.tasks:
                for c, _ in s.waits[t]:
                    if any(s.worker_of[x] // W != s.worker_of[t] // W for x in s.counters[c].signalled_by):
                        cross_waits += 1
            entry["link_bytes"] = [int(sum(_link_bytes(rank_scheds[r].graph, rank_scheds[r].graph.tasks[u.where[t][1]])
                                           for t in per_rank[r])) for r in range(n)]
            entry["cross_gpu_waits"] = cross_waits
        ops.append(entry)

    step_time = tl.step_time
    floor = max(rk["bytes"] for rk in ranks) / gpu.hbm_bytes_per_s
    return {
        "artifact": str(art.path),
        "model": {"name": art.meta.get("model_name"), "model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
                  "hidden_size": cfg.hidden_size, "attention_heads": cfg.num_attention_heads,
                  "kv_heads": [cfg.ga_num_kv_heads, cfg.swa_num_kv_heads],
                  "experts": [cfg.n_routed_experts, cfg.num_experts_per_tok], "vocab_size": cfg.vocab_size},
        "gpus": n, "gpu": gpu.name, "step": step, "steps": art.steps, "max_seq_len": art.max_seq_len,
        "tool_version": art.meta.get("tool_version"), "schedule_only": art.schedule_only,
        "valid": True,
        "union": {"tasks": len(s.graph.tasks), "workers": s.num_workers, "counters": len(s.counters),
                  "cross_gpu_counters": sum(rk["cross_gpu_counters"] for rk in ranks)},
        "ranks": ranks,
        "ops": ops,
        "estimate": {"step_time_s": step_time, "floor_s": floor,
                     "tokens_per_s": step / step_time if step_time > 0 else 0.0,
                     "note": f"the union simulated as one chip of {n} x {gpu.name} (SMs and bandwidth); "
                             f"NVLink transfers are not costed here: see tools/project_multi_gpu.py"},
        "kernel": {"built": False, "reason": art.meta.get("kernel_skipped")},
    }


def format_multi_report(sm: dict[str, Any], top_ops: int = 30) -> str:
    m, n, e = sm["model"], sm["gpus"], sm["estimate"]
    out = [
        f"artifact  {sm['artifact']}",
        f"model     {m['name'] or m['model_type']}: {m['layers']} layers, hidden {m['hidden_size']}, "
        f"{m['attention_heads']} heads, KV heads {m['kv_heads'][0]} global / {m['kv_heads'][1]} SWA, "
        f"{m['experts'][0]} experts top-{m['experts'][1]}, vocab {m['vocab_size']}",
        f"compiled  for {n} x {sm['gpu']}, max_seq_len {sm['max_seq_len']}, steps {sm['steps']}, tilert "
        f"{sm['tool_version']}" + (", schedule only (no weights)" if sm["schedule_only"] else ""),
        f"schedule  step of {sm['step']} token(s): {sm['union']['tasks']} tasks on {n} GPUs x "
        f"{sm['ranks'][0]['workers']} workers, {sm['union']['counters']} counters "
        f"({sm['union']['cross_gpu_counters']} signalled across GPUs); valid: no deadlock, no race across GPUs",
        "",
        "== partition ==",
        table(["rank", "Q heads", "KV heads GA", "KV heads SWA", "FFN rows", "experts", "vocab rows"], [
            [r["rank"]] + [f"{a}-{b - 1}" for a, b in (r["slice"][k] for k in
                           ("q_heads", "ga_kv_heads", "swa_kv_heads", "ffn_rows", "experts", "vocab_rows"))]
            for r in sm["ranks"]]),
        "",
        "== ranks ==",
        table(["rank", "tasks", "counters", "waits", "cross-GPU counters", "remote signals", "NVLink read", "bytes",
               "weights", "KV cache"], [
            [r["rank"], r["tasks"], r["counters"], r["waits"], r["cross_gpu_counters"], r["remote_signals"],
             fmt_bytes(r["link_bytes"]), fmt_bytes(r["bytes"]), fmt_bytes(r["weights_bytes"]),
             fmt_bytes(r["kv_cache_bytes"])] for r in sm["ranks"]]),
        "",
    ]
    comm = [o for o in sm["ops"] if o["kind"] in COMM_KINDS]
    out.append(f"== communication ({len(comm)} ops) ==")
    out.append(table(["op", "kind", "tasks per rank", "NVLink read per rank", "cross-GPU waits", "runs at"], [
        [o["name"], o["kind"], _per_rank(o["tasks"]), _per_rank(o["link_bytes"], fmt_bytes),
         o["cross_gpu_waits"], f"{fmt_time(o['start_s'])} - {fmt_time(o['end_s'])}"] for o in comm], "llrrrr"))
    out.append("")
    ops = sm["ops"]
    rows = sorted(ops, key=lambda o: -o["est_time_s"])[:top_ops] if top_ops and len(ops) > top_ops else ops
    title = (f"== every rank's ops: the {top_ops} costliest of {len(ops)} (--top 0 lists all, in program order) =="
             if rows is not ops else f"== every rank's ops ({len(ops)}) ==")
    out.append(title)
    out.append(table(["op", "kind"] + [f"rank {r} tasks" for r in range(n)] + ["bytes per rank", "runs at"], [
        [o["name"], o["kind"], *o["tasks"], _per_rank(o["bytes"], fmt_bytes),
         f"{fmt_time(o['start_s'])} - {fmt_time(o['end_s'])}"] for o in rows], "ll" + "r" * (n + 2)))
    out.append("")
    out.append(f"== estimated step time on {n} x {sm['gpu']} ==")
    out.append(table(["", "value"], [
        ["estimated step time", fmt_time(e["step_time_s"])],
        ["bandwidth floor (busiest rank)", fmt_time(e["floor_s"])],
        ["tokens/s (this step size)", f"{e['tokens_per_s']:.1f}"],
    ], "lr"))
    out.append(f"({e['note']})")
    out.append("")
    out.append("== GPU megakernel ==")
    out.append(f"none: {sm['kernel']['reason']}")
    return "\n".join(out)


def _per_rank(values: list, fmt=str) -> str:
    """One value when every rank has it, else the range over ranks."""
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)} .. {fmt(hi)}"


def write_trace_multi(art, step: int, gpu_name: str | None, path: str) -> None:
    """The simulated union as a Perfetto trace, one track per GPU worker ("rank r worker w")."""
    from tilert.trace import timeline_to_chrome_trace

    u = join([a.schedules[step] for a in art.ranks])
    tl = simulate(u.schedule, node_spec(_gpu(gpu_name or art.gpu), u.ranks))
    doc = timeline_to_chrome_trace(tl, u.schedule)
    for ev in doc["traceEvents"]:
        if ev.get("ph") == "M" and ev.get("name") == "thread_name":
            w = ev["tid"]
            ev["args"] = {"name": f"rank {w // u.workers_per_rank} worker {w % u.workers_per_rank}"}
    with open(path, "w") as f:
        json.dump(doc, f)


def cmd_inspect_multi(args) -> int:
    from tilert.artifact_multi import read_manifest, read_multi_artifact

    if args.plot or args.measured:
        raise UserError(f"{'--plot' if args.plot else '--measured'}: not available for a multi-GPU artifact "
                        f"(--json and --trace are)")
    compiled = sorted(int(b) for b in read_manifest(args.artifact).get("steps") or [])
    step = args.step if args.step is not None else (compiled[0] if compiled else 1)
    if step not in compiled:
        raise UserError(f"--step {step}: the artifact has schedules for steps {compiled}")
    art = read_multi_artifact(args.artifact, load_weights=False, steps=[step])
    summary = summarize_multi(art, step, args.gpu)
    print(json.dumps(summary, indent=1) if args.json else format_multi_report(summary, top_ops=args.top))
    if args.trace:
        write_trace_multi(art, step, args.gpu, args.trace)
        print(f"wrote trace {args.trace} (open it in https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
    return 0
