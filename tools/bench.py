"""Decode-step latency at batch 1: megakernel vs PyTorch eager vs CUDA graph vs the bandwidth floor.

Run on a GPU machine from the repository root:

    python tools/bench.py --layers 6,12 --contexts 512,8192 --out $OUT/bench.json

For each (layers, context) of the mimo-v2-flash geometry with synthetic weights drawn on the
device (experts in MXFP4 by default, the deployment format), it measures in one process:
- copy: device-to-device copy bandwidth (bytes read + written), the ceiling for the floor;
- floor: bytes the step must move (every non-expert weight as stored, the selected experts only,
  the KV cache read and the new entries written) / copy bandwidth;
- eager / graph: tilert.baseline.StaticDecoder (bf16 non-expert weights, selected experts gathered
  and dequantized each step), eagerly and as a replayed CUDA graph;
- megakernel: one persistent-kernel launch per step (tilert.gpu.MegakernelRuntime);
- ops: the op-by-op TileLang baseline (tilert.ops_backend): one standalone TileLang kernel per IR
  op, the step replayed as a CUDA graph (kernels from --ops-kernels, built by
  tools/build_ops_kernels.py where TileLang is installed).
Correctness comes first: the megakernel's and the ops baseline's logits are compared with the
VM's on the same state before anything is timed.  Prints a table (times, ratios to the floor) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.config import preset  # noqa: E402
from model.weights import stored_nbytes  # noqa: E402
from tilert.baseline import StaticDecoder  # noqa: E402
from tilert.device_weights import device_weights  # noqa: E402
from tilert.timing import append_bench_log, median_seconds  # noqa: E402


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (bytes/s), median of reps."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    return 2 * nbytes / median_seconds(lambda: b.copy_(a), reps)  # (a and b are freed on return)


def floor_bytes(cfg, context: int, weights, kv_bytes_per_elem: int) -> dict:
    """Bytes one decode step at position `context` must move, by part."""
    parts = {"weights": 0, "experts": 0, "kv_read": 0, "kv_write": 0}
    for name, t in weights.items():
        if ".mlp.experts." in name:
            per_expert = stored_nbytes(t.fmt, t.shape[1:])
            parts["experts"] += cfg.num_experts_per_tok * per_expert
        elif name == "model.embed_tokens.weight":
            parts["weights"] += stored_nbytes(t.fmt, t.shape) // t.shape[0]  # one row
        else:
            parts["weights"] += stored_nbytes(t.fmt, t.shape)
    for i in range(cfg.num_hidden_layers):
        keys = min(context + 1, cfg.sliding_window) if cfg.is_swa(i) else context + 1
        per_key = cfg.num_kv_heads(i) * (cfg.head_dim + cfg.v_head_dim) * kv_bytes_per_elem
        parts["kv_read"] += keys * per_key
        parts["kv_write"] += per_key
    parts["total"] = sum(parts.values())
    return parts


def bench_baseline(cfg, weights, context: int, reps: int) -> dict:
    out = {}
    for experts in ("gather", "dense"):
        try:
            dec = StaticDecoder(cfg, weights, max_seq_len=context + 8, experts=experts)
        except torch.OutOfMemoryError:
            out[f"eager_{experts}"] = out[f"graph_{experts}"] = None
            torch.cuda.empty_cache()
            continue
        dec.fill_cache(context, torch.Generator(device="cuda").manual_seed(1))
        token = torch.tensor([7], device="cuda")
        pos = torch.tensor([context], device="cuda")
        logits = dec.step(token, pos)
        assert torch.isfinite(logits).all(), "baseline produced non-finite logits"
        out[f"eager_{experts}"] = median_seconds(lambda: dec.step(token, pos), reps)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                dec.step(token, pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dec.step(token, pos)
        out[f"graph_{experts}"] = median_seconds(graph.replay, reps)
        dec = graph = None  # free the weights before the next variant
        torch.cuda.empty_cache()
    return out


def bench_megakernel(cfg, weights, context: int, reps: int, workdir: Path, mma_formats=None) -> dict:
    """Compile, build, check against the VM on the GPU, then time one launch per step."""
    from tilert.build import build_cubin
    from tilert.codegen import generate
    from tilert.compiler import compile_steps
    from tilert.diff import check_step_against_vm
    from tilert.gpu import MegakernelRuntime
    from tilert.lower import load_recipe

    recipe = load_recipe("mimo-v2-flash", "h100")
    t0 = time.time()
    schedules = compile_steps(cfg, recipe, [1], max_seq_len=context + 8)
    formats = {n: t.fmt for n, t in weights.items()}
    gen = generate(schedules[1], cfg, weight_formats=formats,
                   **({"mma_formats": mma_formats} if mma_formats is not None else {}))
    cubin, report = build_cubin(gen.source, workdir / f"L{cfg.num_hidden_layers}_C{context}")
    compile_s = time.time() - t0
    # A cut whose drawn weights take most of the card (12 layers of mimo-v2-flash: ~41 GB of
    # MXFP4 experts on an 80 GB H100) cannot also hold them re-laid out for the GPU: the runtime
    # consumes the drawn copies, the VM check runs on the host from copies kept there, and the
    # drawn weights go back to the card afterwards for the other backends.
    on_host = sum(t.nbytes for t in weights.values()) > 0.4 * torch.cuda.get_device_properties(0).total_memory
    host = {n: t.to("cpu") for n, t in weights.items()} if on_host else None
    rt = MegakernelRuntime(cubin, gen, weights, max_seq_len=context + 8, consume_weights=on_host)
    rt.fill_cache(context, seed=1)
    check = check_step_against_vm(cfg, schedules, host or weights, rt, context, vm_device="cpu" if on_host else "cuda")
    step_s = median_seconds(lambda: rt.launch(1), reps)
    rt = None  # free the device memory before the baseline runs
    torch.cuda.empty_cache()
    if on_host:
        weights.update({n: t.to("cuda") for n, t in host.items() if n not in weights})
    return {"megakernel": step_s, "compile_s": compile_s, "ptxas": report, "check": check}


def bench_ops(cfg, weights, context: int, reps: int, kernels_dir: Path) -> dict:
    """The op-by-op TileLang baseline: checked against the VM, then one CUDA-graph replay per step."""
    from tilert.compiler import compile_steps
    from tilert.diff import check_step_against_vm
    from tilert.lower import load_recipe
    from tilert.ops_backend import OpsRuntime, kernels_for, ops_step_graph, plan_step

    recipe = load_recipe("mimo-v2-flash", "h100")
    graph = ops_step_graph(cfg, recipe, context + 8)
    plan = plan_step(graph, cfg)
    rt = OpsRuntime(cfg, graph, plan, kernels_for(plan, kernels_dir), weights, max_seq_len=context + 8)
    rt.fill_cache(context, seed=1)
    schedules = compile_steps(cfg, recipe, [1], max_seq_len=context + 8)
    check = check_step_against_vm(cfg, schedules, weights, rt, context)
    step_s = median_seconds(lambda: rt.launch(1), reps)
    rt = None
    torch.cuda.empty_cache()
    return {"ops": step_s, "ops_check": check, "ops_launches": len(plan.launches)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="6,12")
    ap.add_argument("--contexts", default="512,8192")
    ap.add_argument("--expert-format", default="mxfp4", choices=["mxfp4", "fp8"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--backends", default="megakernel,baseline")
    ap.add_argument("--mma", default=None,
                    help="weight formats whose GEMVs use the tensor cores, comma-separated, or 'none' "
                         "(default: the codegen's)")
    ap.add_argument("--ops-kernels", default="build/ops-cubins",
                    help="the ops baseline's built kernels (tools/build_ops_kernels.py)")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--workdir", default="/tmp/tilert-bench")
    ap.add_argument("--log", help="append the table, with date, device, command and commit, to this file")
    ap.add_argument("--commit", default=os.environ.get("TILERT_COMMIT", "unknown"),
                    help="the commit measured (the device machine has no git history)")
    args = ap.parse_args(argv)
    backends = set(args.backends.split(","))
    from tilert.codegen import parse_mma_formats

    mma_formats = parse_mma_formats(args.mma) if args.mma else None  # refused before any GPU work
    dev = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        cfg = preset("mimo-v2-flash", layers=layers, expert_format=args.expert_format)
        weights = device_weights(cfg, seed=0, expert_format=args.expert_format)
        for context in [int(x) for x in args.contexts.split(",")]:
            row = {"layers": layers, "context": context, "expert_format": args.expert_format}
            if "megakernel" in backends:
                row.update(bench_megakernel(cfg, weights, context, args.reps, Path(args.workdir), mma_formats))
                print(f"megakernel {layers} layers, context {context}: {row['megakernel'] * 1e3:.3f} ms, "
                      f"check {row['check']}", flush=True)
            kv_bytes = 4 if row.get("kv_dtype", "f32") == "f32" else 2
            row["floor_bytes"] = floor_bytes(cfg, context, weights, kv_bytes)
            row["floor"] = row["floor_bytes"]["total"] / bw
            if "ops" in backends:
                row.update(bench_ops(cfg, weights, context, args.reps, Path(args.ops_kernels)))
                print(f"ops {layers} layers, context {context}: {row['ops'] * 1e3:.3f} ms, check {row['ops_check']}",
                      flush=True)
            if "baseline" in backends:
                row.update(bench_baseline(cfg, weights, context, args.reps))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ptxas"}), flush=True)
        del weights
        torch.cuda.empty_cache()
    result = {"device": dev.name, "copy_bandwidth": bw, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "argv": sys.argv}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    if args.log:
        append_bench_log(args.log, f"{result['date']}: decode step, batch 1, mimo-v2-flash geometry "
                         f"({args.expert_format} experts)", dev.name, args.commit, "tools/bench.py", table(result))
    return 0


def table(result) -> str:
    ms = lambda s: "-" if s is None else f"{s * 1e3:7.3f}"  # noqa: E731
    lines = [f"device {result['device']}, copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s",
             "| layers | context | floor ms | megakernel ms | eager ms | graph ms | ops graph ms | mk/floor | floor/mk "
             "| graph/mk | ops/mk | floor/ops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        graphs = [r.get(k) for k in ("graph_gather", "graph_dense") if r.get(k)]
        eagers = [r.get(k) for k in ("eager_gather", "eager_dense") if r.get(k)]
        g = min(graphs) if graphs else None
        e = min(eagers) if eagers else None
        mk, ops = r.get("megakernel"), r.get("ops")
        lines.append(
            f"| {r['layers']} | {r['context']} | {ms(r['floor'])} | {ms(mk)} | {ms(e)} | {ms(g)} | {ms(ops)} | "
            f"{(mk / r['floor']) if mk else float('nan'):.2f} | {(r['floor'] / mk) if mk else float('nan'):.2f} | "
            f"{(g / mk) if (g and mk) else float('nan'):.2f} | {(ops / mk) if (ops and mk) else float('nan'):.2f} | "
            f"{(r['floor'] / ops) if ops else float('nan'):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
