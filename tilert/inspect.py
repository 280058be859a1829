"""`tilert inspect`: what a compiled artifact holds and what the cost model expects of it.

`summarize` gathers everything as a JSON-ready dict (the `--json` output); `format_report`
renders it as tables.  `write_trace` and `plot_timeline` draw the simulated timeline of one step.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np

from tilert.cost import GPUS, GpuSpec, critical_path, estimate, simulate
from tilert.errors import UserError
from tilert.ir import ACTIVATION, INPUT, OUTPUT, STATE, WEIGHT
from tilert.schedule import Schedule

# Device memory of one card (bytes), to say whether the artifact fits.
GPU_MEMORY = {"h100": 80e9, "h200": 141e9}


def _gpu(name: str) -> GpuSpec:
    if name not in GPUS:
        raise UserError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


def _stats(values) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        return {"min": 0.0, "mean": 0.0, "max": 0.0}
    return {"min": float(a.min()), "mean": float(a.mean()), "max": float(a.max())}


def memory_footprint(art) -> dict[str, Any]:
    """Device memory: weights as stored, KV cache (state), and the largest step's activations
    (the DFlash draft step's weights and context caches included)."""
    weights: dict[str, int] = {}
    state: dict[str, int] = {}
    act = 0
    draft = [art.draft_schedule] if getattr(art, "draft_schedule", None) is not None else []
    for s in list(art.schedules.values()) + draft:
        step_act = 0
        for name, b in s.graph.buffers.items():
            if b.kind == WEIGHT:
                weights[name] = b.nbytes
            elif b.kind == STATE:
                state[name] = b.nbytes
            elif b.kind in (ACTIVATION, INPUT, OUTPUT):
                step_act += b.nbytes
        act = max(act, step_act)
    out = {
        "weights_bytes": sum(weights.values()),
        "kv_cache_bytes": sum(state.values()),
        "activation_bytes": act,
        "max_seq_len": art.max_seq_len,
    }
    out["total_bytes"] = out["weights_bytes"] + out["kv_cache_bytes"] + out["activation_bytes"]
    cap = GPU_MEMORY.get(art.gpu)
    if cap:
        out["gpu_memory_bytes"] = int(cap)
        out["fits"] = out["total_bytes"] <= cap
    return out


def summarize(art, step: int, gpu_name: str | None = None, schedule: Schedule | None = None,
              label: str | None = None) -> dict[str, Any]:
    """Everything `tilert inspect` shows, for the schedule of `step` tokens (or `schedule`, e.g.
    the DFlash draft step, named `label` in the report)."""
    gpu = _gpu(gpu_name or art.gpu)
    s: Schedule = schedule or art.schedules[step]
    g = s.graph
    cfg = art.cfg
    tl = simulate(s, gpu)
    dur = tl.end - tl.start
    est = estimate(s, gpu)
    cp_s, cp_tasks = critical_path(g, gpu)

    ops = []
    for op in g.ops:
        ids = np.asarray(op.tasks, dtype=np.int64)
        nbytes = int(sum(g.tasks[t].bytes for t in op.tasks))
        flops = int(sum(g.tasks[t].flops for t in op.tasks))
        ops.append({
            "name": op.name, "kind": op.kind, "layer": op.layer, "tasks": len(op.tasks),
            "bytes": nbytes, "flops": flops,
            # Its share of a perfectly balanced step: simulated worker-seconds over workers.
            "est_time_s": float(dur[ids].sum()) / s.num_workers if len(ids) else 0.0,
            # When it actually runs in the simulated step.
            "start_s": float(tl.start[ids].min()) if len(ids) else 0.0,
            "end_s": float(tl.end[ids].max()) if len(ids) else 0.0,
        })

    kinds: dict[str, dict[str, Any]] = defaultdict(lambda: {"ops": 0, "tasks": 0, "bytes": 0, "flops": 0,
                                                            "est_time_s": 0.0})
    for o in ops:
        k = kinds[o["kind"]]
        k["ops"] += 1
        k["tasks"] += o["tasks"]
        k["bytes"] += o["bytes"]
        k["flops"] += o["flops"]
        k["est_time_s"] += o["est_time_s"]
    total_bytes = max(1, sum(o["bytes"] for o in ops))
    op_kinds = sorted(({"kind": k, **v, "bytes_share": v["bytes"] / total_bytes} for k, v in kinds.items()),
                      key=lambda r: -r["bytes"])

    counts = np.bincount(tl.worker, minlength=s.num_workers) if len(g.tasks) else np.zeros(s.num_workers)
    wbytes = np.bincount(tl.worker, weights=[t.bytes for t in g.tasks], minlength=s.num_workers) \
        if len(g.tasks) else np.zeros(s.num_workers)
    busy = np.bincount(tl.worker, weights=tl.end - tl.start, minlength=s.num_workers) \
        if len(g.tasks) else np.zeros(s.num_workers)
    busiest = [{"worker": int(w), "tasks": int(counts[w]), "bytes": int(wbytes[w]), "busy_s": float(busy[w])}
               for w in np.argsort(-busy, kind="stable")[:5]]

    path_ops: list[str] = []
    for t in cp_tasks:
        name = g.ops[g.tasks[t].op].name
        if not path_ops or path_ops[-1] != name:
            path_ops.append(name)

    step_time = est["step_time_s"]
    return {
        "artifact": str(art.path),
        "model": {
            "model_type": cfg.model_type,
            "name": art.meta.get("model_name"),
            "source": art.meta.get("source"),
            "layers": cfg.num_hidden_layers,
            "moe_layers": sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)),
            "swa_layers": sum(cfg.is_swa(i) for i in range(cfg.num_hidden_layers)),
            "hidden_size": cfg.hidden_size,
            "attention_heads": cfg.num_attention_heads,
            "kv_heads": [cfg.ga_num_kv_heads, cfg.swa_num_kv_heads],
            "experts": [cfg.n_routed_experts, cfg.num_experts_per_tok],
            "expert_format": cfg.expert_format,
            "vocab_size": cfg.vocab_size,
        },
        "artifact_info": {
            "gpu": art.gpu,
            "max_seq_len": art.max_seq_len,
            "steps": art.steps,
            "schedule_only": art.schedule_only,
            "tool_version": art.meta.get("tool_version"),
            "format_version": art.meta.get("format_version"),
            "created": art.meta.get("created"),
            "recipe": (art.meta.get("recipe") or {}).get("source"),
        },
        "step": step,
        "label": label or f"step of {step} token(s)",
        "drafter": drafter_summary(art),
        "gpu": gpu.name,
        "schedule": {
            "ops": len(g.ops), "tasks": len(g.tasks), "workers": s.num_workers,
            "counters": len(s.counters), "waits": int(sum(len(w) for w in s.waits)),
        },
        "ops": ops,
        "workers": {
            "tasks": _stats(counts), "bytes": _stats(wbytes), "busy_s": _stats(busy),
            "busiest": busiest,
        },
        "op_kinds": op_kinds,
        "estimate": {
            "step_time_s": step_time,
            "floor_s": est["floor_s"],
            "ratio": est["ratio"],
            "floor_fraction": est["floor_fraction"],
            "mean_busy": est["mean_busy"],
            "bytes": est["bytes"],
            "flops": est["flops"],
            "tokens_per_s": step / step_time if step_time > 0 else 0.0,
            "critical_path_s": cp_s,
            "critical_path_tasks": len(cp_tasks),
            "critical_path_ops": path_ops,
        },
        "calibrated": calibrated_estimate(s, gpu.name, step),
        "memory": memory_footprint(art),
        "kernel": kernel_summary(art),
    }


def calibrated_estimate(s: Schedule, gpu_name: str, step: int) -> dict[str, Any] | None:
    """The step time the cost model simulates with its measured per-op corrections
    (tilert/calibration.py), and where they were measured; None when none exist for the GPU."""
    from tilert.calibration import calibrated

    found = calibrated(gpu_name)
    if found is None:
        return None
    gpu, doc = found
    est = estimate(s, gpu)
    return {"step_time_s": est["step_time_s"], "ratio": est["ratio"],
            "tokens_per_s": step / est["step_time_s"] if est["step_time_s"] > 0 else 0.0,
            "measured": doc.get("measured") or {}, "sm_bw_cap": gpu.sm_bw_cap,
            "sm_bw_cap_fit": doc.get("sm_bw_cap_fit")}


def drafter_summary(art) -> dict[str, Any] | None:
    """The DFlash drafter compiled into the artifact (--draft), or None."""
    cfg = art.draft_config
    if cfg is None:
        return None
    d = art.draft_schedule
    return {"layers": cfg["num_layers"], "block_size": cfg["block_size"], "target_layers": cfg["target_layers"],
            "draft_step_tasks": len(d.graph.tasks) if d is not None else None,
            "context_rows": (art.meta.get("draft") or {}).get("context_rows")}


def kernel_summary(art) -> dict[str, Any]:
    """The GPU megakernel of each step size (compile --gpu): generated-kernel summary, ptxas report
    (registers, spills, shared memory, stack) and the GPU memory footprint of running them."""
    k = art.meta.get("kernel")
    if not isinstance(k, dict) or not k.get("steps"):
        return {"built": False, "reason": art.meta.get("kernel_skipped") or "compiled without a kernel"}
    steps = {}
    for b, e in sorted(k["steps"].items(), key=lambda kv: int(kv[0])):
        steps[str(b)] = {"summary": e.get("summary"), "ptxas": e.get("ptxas"), "notes": e.get("notes") or [],
                         "profile_cubin": "prof_cubin" in e, "footprint": (k.get("footprint") or {}).get("steps", {}).get(str(b))}
    return {"built": True, "arch": k.get("arch"), "nvcc": k.get("nvcc"), "profile": bool(k.get("profile")),
            "steps": steps, "footprint": k.get("footprint")}


# ---- text rendering --------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.2f} us"


def fmt_count(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}T"


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A plain text table; `align` is one char per column, 'l' or 'r' (default: first left)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(vals):
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(vals, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def format_report(sm: dict[str, Any], top_ops: int = 30) -> str:
    m, a, e, mem, sc = sm["model"], sm["artifact_info"], sm["estimate"], sm["memory"], sm["schedule"]
    out = []
    out.append(f"artifact  {sm['artifact']}")
    out.append(f"model     {m['name'] or m['model_type']} ({m['source']}): {m['layers']} layers "
               f"({m['swa_layers']} sliding-window, {m['moe_layers']} MoE), hidden {m['hidden_size']}, "
               f"{m['attention_heads']} heads, KV heads {m['kv_heads'][0]} global / {m['kv_heads'][1]} SWA, "
               f"{m['experts'][0]} experts top-{m['experts'][1]} ({m['expert_format']}), vocab {m['vocab_size']}")
    out.append(f"compiled  for {a['gpu']}, max_seq_len {a['max_seq_len']}, steps {a['steps']}, recipe {a['recipe']}, "
               f"tilert {a['tool_version']} (format {a['format_version']})"
               + (", schedule only (no weights)" if a["schedule_only"] else ""))
    dr = sm.get("drafter")
    if dr:
        tasks = (f"draft step {dr['draft_step_tasks']} tasks" if dr["draft_step_tasks"] is not None
                 else "no draft schedule (compiled by an older tilert)")
        out.append(f"drafter   DFlash, {dr['layers']} layers, block {dr['block_size']}, conditioned on target layers "
                   f"{dr['target_layers']}: {tasks}; inspect --speculative shows the draft and verify steps")
    out.append(f"schedule  {sm.get('label') or 'step of %d token(s)' % sm['step']}: {sc['ops']} ops, {sc['tasks']} "
               f"tasks on {sc['workers']} workers, {sc['counters']} counters, {sc['waits']} waits")
    out.append("")

    out.append(f"== estimated step time on {sm['gpu']} ==")
    out.append(table(["", "value"], [
        ["estimated step time", fmt_time(e["step_time_s"])],
        ["bandwidth floor", fmt_time(e["floor_s"])],
        ["ratio (step / floor)", f"{e['ratio']:.2f}x"],
        ["share of peak bandwidth", f"{100 * e['floor_fraction']:.1f}%"],
        ["mean worker busy", f"{100 * e['mean_busy']:.1f}%"],
        ["bytes moved", fmt_bytes(e["bytes"])],
        ["flops", fmt_count(e["flops"])],
        ["tokens/s (this step size)", f"{e['tokens_per_s']:.1f}"],
        ["critical path", (f"{fmt_time(e['critical_path_s'])} over {e['critical_path_tasks']} tasks, "
                           f"{len(e['critical_path_ops'])} ops")],
    ], "lr"))
    path = e["critical_path_ops"]
    shown = path if len(path) <= 12 else path[:6] + [f"... {len(path) - 12} more ..."] + path[-6:]
    out.append("critical path ops: " + " -> ".join(shown))
    c = sm.get("calibrated")
    if c:
        m = c["measured"]
        out.append(f"with measured per-op corrections: {fmt_time(c['step_time_s'])} ({c['ratio']:.2f}x the floor, "
                   f"{c['tokens_per_s']:.1f} tokens/s); the megakernel's tasks as profiled on {m.get('device')}, "
                   f"{m.get('date')}, commit {m.get('commit')} ({m.get('geometry')})"
                   + (f"; one SM streams at most {c['sm_bw_cap']:g}x its share of the bandwidth (fitted to "
                      f"{c['sm_bw_cap_fit']['steps']} measured steps, {c['sm_bw_cap_fit']['sweep']})"
                      if c.get("sm_bw_cap_fit") else "")
                   + "; the plain estimate above is what the scheduler balances")
    out.append("")

    ops = sm["ops"]
    rows = sorted(ops, key=lambda o: -o["est_time_s"]) if top_ops else ops
    if top_ops and len(ops) > top_ops:
        title = f"== ops: the {top_ops} costliest of {len(ops)} (--top 0 lists all, in program order) =="
        rows = rows[:top_ops]
    else:
        title = f"== ops ({len(ops)}) =="
        rows = ops
    out.append(title)
    out.append(table(["op", "kind", "tasks", "bytes", "flops", "est time", "runs at"], [
        [o["name"], o["kind"], o["tasks"], fmt_bytes(o["bytes"]), fmt_count(o["flops"]), fmt_time(o["est_time_s"]),
         f"{fmt_time(o['start_s'])} - {fmt_time(o['end_s'])}"] for o in rows
    ], "llrrrrr"))
    out.append("")

    out.append("== bytes per op kind ==")
    out.append(table(["kind", "ops", "tasks", "bytes", "share", "flops", "est time"], [
        [k["kind"], k["ops"], k["tasks"], fmt_bytes(k["bytes"]), f"{100 * k['bytes_share']:.1f}%",
         fmt_count(k["flops"]), fmt_time(k["est_time_s"])] for k in sm["op_kinds"]
    ]))
    out.append("")

    w = sm["workers"]
    out.append(f"== tasks per worker ({sc['workers']} workers) ==")
    out.append(table(["", "min", "mean", "max"], [
        ["tasks", f"{w['tasks']['min']:.0f}", f"{w['tasks']['mean']:.1f}", f"{w['tasks']['max']:.0f}"],
        ["bytes", fmt_bytes(w["bytes"]["min"]), fmt_bytes(w["bytes"]["mean"]), fmt_bytes(w["bytes"]["max"])],
        ["busy time", fmt_time(w["busy_s"]["min"]), fmt_time(w["busy_s"]["mean"]), fmt_time(w["busy_s"]["max"])],
    ]))
    out.append("busiest: " + ", ".join(f"worker {b['worker']} ({b['tasks']} tasks, {fmt_bytes(b['bytes'])}, "
                                       f"{fmt_time(b['busy_s'])})" for b in w["busiest"]))
    out.append("")

    out.append("== memory footprint ==")
    rows = [["weights (as stored)", fmt_bytes(mem["weights_bytes"])],
            [f"KV cache ({mem['max_seq_len']} positions)", fmt_bytes(mem["kv_cache_bytes"])],
            ["activations (largest step)", fmt_bytes(mem["activation_bytes"])],
            ["total", fmt_bytes(mem["total_bytes"])]]
    if "gpu_memory_bytes" in mem:
        rows.append([f"one {a['gpu']}", fmt_bytes(mem["gpu_memory_bytes"])
                     + ("" if mem["fits"] else "  (does not fit on one card)")])
    out.append(table(["", "bytes"], rows, "lr"))
    out.append("")
    out.extend(format_kernel(sm.get("kernel") or {}, a["gpu"]))
    return "\n".join(out)


def format_kernel(k: dict[str, Any], gpu: str) -> list[str]:
    if not k.get("built"):
        return ["== GPU megakernel ==", f"none: {k.get('reason', 'not built')}"]
    out = [f"== GPU megakernel ({k.get('arch')}, {k.get('nvcc')}{', profiling cubins too' if k.get('profile') else ''}) =="]
    rows = []
    for b, e in k["steps"].items():
        p = e.get("ptxas") or {}
        f = e.get("footprint") or {}
        rows.append([f"B={b}", p.get("registers"), f"{p.get('spills', 0)} B", f"{p.get('stack', 0)} B",
                     fmt_bytes(f.get("smem_per_cta", 0)), f.get("ctas", ""), fmt_bytes(f.get("activation_bytes", 0)),
                     fmt_bytes(f.get("program_bytes", 0))])
    out.append(table(["step", "registers", "spills", "stack", "smem/CTA", "CTAs", "act arena", "program"], rows))
    for b, e in k["steps"].items():
        out.append(f"B={b}: {e.get('summary')}" + "".join(f"; {n}" for n in e.get("notes") or []))
    fp = k.get("footprint") or {}
    if fp:
        out.append("")
        out.append("== GPU memory footprint (megakernel runtime) ==")
        rows = [["weights (as stored on the GPU)", fmt_bytes(fp["weights_bytes"])],
                ["KV cache state arena", fmt_bytes(fp["kv_cache_bytes"])],
                ["activation arenas (all steps)", fmt_bytes(fp["activation_bytes"])],
                ["programs", fmt_bytes(fp["program_bytes"])],
                ["counters, tables, scratch, errors", fmt_bytes(fp["other_bytes"])],
                ["total", fmt_bytes(fp["total_bytes"])],
                ["shared memory per CTA", fmt_bytes(fp["smem_per_cta"])]]
        if "gpu_memory_bytes" in fp:
            rows.append([f"one {fp.get('gpu', gpu)}", fmt_bytes(fp["gpu_memory_bytes"])
                         + (f"  ({100 * fp['total_bytes'] / fp['gpu_memory_bytes']:.1f}% used)" if fp["fits"]
                            else "  (does not fit on one card)")])
        out.append(table(["", "bytes"], rows, "lr"))
    return out


# ---- timelines -------------------------------------------------------------------------------

def write_trace(art, step: int, gpu_name: str | None, path: str, measured: str | None = None) -> None:
    """The simulated step as a Chrome/Perfetto trace; with `measured` (a profile JSON from
    `tilert run --backend megakernel --profile-out`, or MegakernelRuntime.profile() rows: task,
    worker, wait, start, end in ns) a second process "measured" beside "simulated"."""
    from tilert.trace import timeline_to_chrome_trace

    s = art.schedules[step]
    tl = simulate(s, _gpu(gpu_name or art.gpu))
    doc = timeline_to_chrome_trace(tl, s)
    if measured is not None:
        doc["traceEvents"] = _measured_events(art, step, s, measured, doc["traceEvents"])
    with open(path, "w") as f:
        json.dump(doc, f)


def _measured_events(art, step: int, s: Schedule, path: str, simulated: list[dict]) -> list[dict]:
    from tilert.megakernel import read_profile

    rows, prof_step = read_profile(path)
    if prof_step is not None and prof_step != step:
        raise UserError(f"--measured {path}: profiles a {prof_step}-token step; pass --step {prof_step}")
    g = s.graph
    bad = [r["task"] for r in rows if not 0 <= r["task"] < len(g.tasks)]
    if bad:
        raise UserError(f"--measured {path}: task ids {bad[:5]} are not tasks of the {step}-token step "
                        f"({len(g.tasks)} tasks)")
    events = []
    for ev in simulated:
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            ev = {**ev, "args": {"name": "simulated"}}
        events.append(ev)
    pid = 1
    events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                   "args": {"name": "measured"}})
    events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": 1}})
    for w in sorted({r["worker"] for r in rows}):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": w, "args": {"name": f"worker {w}"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": w, "args": {"sort_index": w}})
    for r in rows:
        task = g.tasks[r["task"]]
        op = g.ops[task.op]
        if r["start"] > r["wait"]:
            events.append({"ph": "X", "pid": pid, "tid": r["worker"], "name": "wait", "cat": "wait",
                           "ts": r["wait"] / 1e3, "dur": (r["start"] - r["wait"]) / 1e3, "args": {"task": r["task"]}})
        events.append({"ph": "X", "pid": pid, "tid": r["worker"], "name": f"{op.name}:{task.kind}", "cat": op.kind,
                       "ts": r["start"] / 1e3, "dur": (r["end"] - r["start"]) / 1e3,
                       "args": {"task": r["task"], "bytes": task.bytes, "planned_worker": int(s.worker_of[r["task"]])}})
    return events


def plot_timeline(art, step: int, gpu_name: str | None, path: str) -> None:
    """One row per worker, one bar per task, coloured by op kind."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'tilert[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = art.schedules[step]
    gpu = _gpu(gpu_name or art.gpu)
    tl = simulate(s, gpu)
    g = s.graph
    kinds = sorted({g.ops[t.op].kind for t in g.tasks})
    cmap = plt.get_cmap("tab20")
    colour = {k: cmap(i % 20) for i, k in enumerate(kinds)}
    height = max(3.0, min(40.0, 0.12 * s.num_workers + 1.5))
    fig, ax = plt.subplots(figsize=(14, height))
    scale = 1e6  # microseconds
    for k in kinds:
        ids = np.array([t.id for t in g.tasks if g.ops[t.op].kind == k], dtype=np.int64)
        for w in np.unique(tl.worker[ids]):
            sel = ids[tl.worker[ids] == w]
            bars = list(zip(tl.start[sel] * scale, (tl.end[sel] - tl.start[sel]) * scale))
            ax.broken_barh(bars, (w - 0.4, 0.8), facecolors=colour[k], linewidth=0)
    ax.set_xlabel("time (us)")
    ax.set_ylabel("worker")
    ax.set_ylim(-1, s.num_workers)
    ax.invert_yaxis()
    ax.set_title(f"{art.meta.get('model_name') or art.cfg.model_type}: simulated step of {step} token(s) on "
                 f"{gpu.name}, {fmt_time(tl.step_time)}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[k]) for k in kinds]
    ax.legend(handles, kinds, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
