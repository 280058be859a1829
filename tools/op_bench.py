"""Each decode op of the megakernel on its own, against the bandwidth floor (GPU machine).

    python tools/op_bench.py --models mimo-v2-flash,mimo-v2.5-pro --contexts 512,2048,8192,32768 \
        --out $OUT/op_bench.json --log $OUT/op_bench.md

An op runs *in isolation* inside a one-layer cut of the model: the step's ops are chained by
data, so an op's span (first task start to last task end, profiling build) is the op alone on
the whole GPU.  Two cuts per model:

- `dense`: layer 0 as the model has it (global attention, dense FFN) and the full vocabulary:
  the FP8 projections, the dense FFN, global attention at every --contexts, the LM head;
- `moe`: one sliding-window layer with routed experts (MXFP4): the router, top-k, the expert
  GEMVs (gate/up fused with SiLU; down fused with the weighted sum), sliding-window attention.

Per op it prints the bytes its tasks must move (the cost model's count: weights actually read,
only the selected experts, KV read), the span, the bandwidth that is, and the floor: bytes over
the device-to-device copy bandwidth measured in the same run.  Every run checks the plain
kernel's logits against the VM first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import SLIDING, SPARSE, MimoConfig, preset  # noqa: E402
from tilert.errors import UserError  # noqa: E402
from tilert.op_profile import op_summary  # noqa: E402

CUTS = ("dense", "moe")
# The ops each cut is there to measure (the others are reported too, as context).
MEASURED = {"dense": ("q_proj", "kv_proj", "o_proj", "attention", "ffn_gate_up", "ffn_down", "lm_head"),
            "moe": ("router", "topk", "expert_gate_up", "expert_down", "attention")}


def cut_config(model: str, cut: str, expert_format: str = "mxfp4") -> MimoConfig:
    """One layer of `model`: its layer 0 (`dense`), or a sliding-window layer with routed
    experts in `expert_format` (`moe`)."""
    cfg = preset(model)
    if cut == "dense":
        return cfg.with_layers(1)
    if cut == "moe":
        return dataclasses.replace(cfg, layer_types=(SLIDING,), mlp_layer_types=(SPARSE,),
                                   expert_format=expert_format).validate()
    raise UserError(f"unknown cut {cut!r}; known: {', '.join(CUTS)}")


def op_rows(summary: dict, cut: str, copy_bw: float) -> list[dict]:
    """The measured ops of one run: bytes, span, achieved bandwidth, floor and their ratio."""
    rows = []
    for op in MEASURED[cut]:
        k = summary.get(op)
        if k is None:
            continue
        nbytes = k["bytes"] / k["layers"]
        span_s = k["span_us"] * 1e-6
        floor_s = nbytes / copy_bw
        rows.append({"op": op, "bytes": nbytes, "span_us": k["span_us"], "tb_s": nbytes / span_s / 1e12,
                     "floor_us": floor_s * 1e6, "of_copy_bw": floor_s / span_s})
    return rows


def run_case(model: str, cfg: MimoConfig, context: int, workdir: Path) -> tuple[dict, dict]:
    """(per-op summary of one profiled step at `context` with `model`'s recipe, the plain
    kernel's check against the VM)."""
    from tilert.build import build_cubin
    from tilert.codegen import generate
    from tilert.compiler import compile_steps
    from tilert.device_weights import device_weights
    from tilert.diff import check_step_against_vm
    from tilert.gpu import MegakernelRuntime
    from tilert.lower import load_recipe

    weights = device_weights(cfg, seed=0, expert_format=cfg.expert_format)
    schedule = compile_steps(cfg, load_recipe(model, "h100"), [1], max_seq_len=context + 8)[1]
    gen = generate(schedule, cfg, weight_formats={n: t.fmt for n, t in weights.items()})
    plain = MegakernelRuntime(build_cubin(gen.source, workdir)[0], gen, weights, max_seq_len=context + 8)
    plain.fill_cache(context, seed=1)
    check = check_step_against_vm(cfg, {1: schedule}, weights, plain, context)
    plain = None
    rt = MegakernelRuntime(build_cubin(gen.source, workdir, profile=True)[0], gen, weights,
                           max_seq_len=context + 8, profile=True)
    rt.fill_cache(context, seed=1)
    for _ in range(3):  # warm: the profile is of the last step
        rt.step([5])
        rt.truncate(context)
    return op_summary(schedule, rt.profile(1)), check


def table(results: list[dict]) -> str:
    lines = ["| model | cut | context | op | MB | span us | TB/s | floor us | floor/span |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for o in r["ops"]:
            lines.append(f"| {r['model']} | {r['cut']} | {r['context']} | {o['op']} | {o['bytes'] / 1e6:.1f} | "
                         f"{o['span_us']:.1f} | {o['tb_s']:.2f} | {o['floor_us']:.1f} | {o['of_copy_bw']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mimo-v2-flash,mimo-v2.5-pro")
    ap.add_argument("--cuts", default="dense,moe")
    ap.add_argument("--contexts", default="512,8192",
                    help="contexts for the dense cut (global attention); the moe cut runs at the first")
    ap.add_argument("--expert-format", default="mxfp4", choices=["mxfp4", "fp8"])
    ap.add_argument("--workdir", default="build/cubins", help="nvcc's output and cache")
    ap.add_argument("--out", default="op_bench.json")
    ap.add_argument("--log", help="append the table, with date, device, command and commit, to this file")
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    cuts = args.cuts.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    for m in models:  # refuse bad names before any GPU work
        for c in cuts:
            cut_config(m, c, args.expert_format)

    import torch

    from tools.bench import copy_bandwidth

    results = []
    for model in models:
        for cut in cuts:
            cfg = cut_config(model, cut, args.expert_format)
            for context in contexts if cut == "dense" else contexts[:1]:
                copy_bw = copy_bandwidth()
                summary, check = run_case(model, cfg, context, Path(args.workdir))
                row = {"model": model, "cut": cut, "context": context, "copy_bw": copy_bw, "check": check,
                       "ops": op_rows(summary, cut, copy_bw), "summary": summary}
                print(f"{model} {cut} context {context}: check {check}, copy bandwidth {copy_bw / 1e12:.2f} TB/s",
                      flush=True)
                results.append(row)
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(0)
    Path(args.out).write_text(json.dumps({"device": device, "results": results}, default=float, indent=1))
    text = table(results)
    print(text)
    if args.log:
        from tilert.timing import append_bench_log

        append_bench_log(args.log, f"{time.strftime('%Y-%m-%d')}: ops in isolation, batch 1 ({args.expert_format} "
                         f"experts)", device, args.commit, "tools/op_bench.py", text, argv)
    bad = [r for r in results if not r["check"]["token_match"] or not r["check"]["rel_err"] < 1e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
