"""Choose a recipe's task placement by measurement: time the same megakernel under schedules
that differ only in how the list scheduler breaks ties (and which cost model it uses).

Run on a GPU machine from the repository root:

    python tools/autotune_schedule.py --layers 6 --context 8192 --tokens 1 --out $OUT/tune.json

Why: the list scheduler puts each task on the worker where the cost model says it starts
earliest, and when a producer finishes most of the machine is idle, so most tasks tie.  The
model cannot tell those choices apart; the GPU can (the same kernel under two placements ran
1376 and 1256 us on an H100, BENCHMARKS.md stop 17).  The program is data, so every variant
runs on one cubin (MegakernelRuntime.use_schedule): the tool compiles each variant's schedule,
checks its logits against the recipe's own schedule (itself checked against the VM where the
drawn weights fit beside the kernel's copy), then times all of them in interleaved rounds
(drift on a shared machine hits every variant alike), re-times the best few against the
recipe's in a final round, and prints each against the floor of the same run (bytes the step
must move / copy bandwidth).  Put the winner in the recipe as "tie_break" / "calibrated".

`--prebuild` (no GPU): build the kernel's cubin into TILERT_BUILD (default build/cubins) to carry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_variants(tie_breaks: str, calibrated: str) -> list[tuple[str, bool]]:
    """("random:1-3", "both") -> [("random:1", False), ..., ("random:3", True)]."""
    names = []
    for item in tie_breaks.split(","):
        kind, _, seeds = item.partition(":")
        if kind == "random" and "-" in seeds:
            lo, hi = (int(x) for x in seeds.split("-"))
            names += [f"random:{s}" for s in range(lo, hi + 1)]
        else:
            names.append(item)
    cals = {"off": [False], "on": [True], "both": [False, True]}[calibrated]
    return [(n, c) for n in names for c in cals]


def label(variant: tuple[str, bool]) -> str:
    return variant[0] + (" +cal" if variant[1] else "")


def compile_variant(cfg, graph, recipe: dict, variant, max_seq_len: int, formats, gpu: str):
    """(schedule, GeneratedKernel) of the step's graph (tilert.compiler.step_graph, lowered once
    for every variant) placed as `variant` says."""
    from tilert.codegen import generate
    from tilert.compiler import schedule_step

    schedule = schedule_step(graph, dict(recipe, tie_break=variant[0], calibrated=variant[1]), max_seq_len, gpu=gpu)
    return schedule, generate(schedule, cfg, formats)


def time_rounds(rt, kernels: dict, tokens: int, rounds: int, launches: int) -> dict[str, list[float]]:
    """Per placement, seconds per step of each round (tilert.timing.interleaved_rounds), each on
    the one runtime with its program swapped in."""
    from tilert.timing import interleaved_rounds

    def step_of(kernel):
        def step():
            rt.kernels[tokens] = kernel
            rt.launch(tokens)
        return step

    return interleaved_rounds({name: step_of(k) for name, k in kernels.items()}, rounds, launches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=1, help="step size (8: a speculative verify step)")
    ap.add_argument("--tie-breaks", default="lowest,longest_idle,random:1-12")
    ap.add_argument("--calibrated", default="both", choices=["off", "on", "both"])
    ap.add_argument("--capture", action="store_true",
                    help="schedule the target of the DFlash pair (exposes the drafter's conditioning layers)")
    ap.add_argument("--consume", action="store_true",
                    help="drop the drawn weights once uploaded (as 12+ layers must), skipping the VM check")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--launches", type=int, default=20)
    ap.add_argument("--finalists", type=int, default=3)
    ap.add_argument("--gpu", default=None, choices=["h100", "h200"],
                    help="whose recipe and cost model (default: the device's; h100 with --prebuild)")
    ap.add_argument("--prebuild", action="store_true", help="only build the cubin (no GPU)")
    ap.add_argument("--out", default="tune.json")
    ap.add_argument("--log", help="append the table, with date, device, command and commit, to this file")
    ap.add_argument("--commit", default=os.environ.get("TILERT_COMMIT", "unknown"))
    args = ap.parse_args(argv)

    from tilert.build import build_cubin
    from tilert.compiler import step_graph
    from tilert.lower import load_recipe

    if args.gpu is None and not args.prebuild:
        import torch

        args.gpu = "h200" if "H200" in torch.cuda.get_device_properties(0).name else "h100"
    gpu = args.gpu or "h100"
    from model.config import preset

    cfg = preset("mimo-v2-flash", layers=args.layers, expert_format="mxfp4")
    recipe = load_recipe("mimo-v2-flash", gpu)
    own = (recipe.get("tie_break", "lowest"), bool(recipe.get("calibrated", False)))
    variants = [own] + [v for v in parse_variants(args.tie_breaks, args.calibrated) if v != own]
    max_seq_len = args.context + 8
    capture = ()
    if args.capture:
        from model.dflash import DFlashConfig

        capture = DFlashConfig.flash_for(cfg).target_layers
    build_dir = Path(os.environ.get("TILERT_BUILD", "build/cubins"))
    graph = step_graph(cfg, recipe, args.tokens, max_seq_len, args.tokens, capture_layers=capture)
    if args.prebuild:
        from tilert.device_weights import weight_specs

        formats = {n: f for n, _, f in weight_specs(cfg)}
        _, gen = compile_variant(cfg, graph, recipe, own, max_seq_len, formats, gpu)
        print(build_cubin(gen.source, build_dir)[0])
        return 0

    import torch

    from tilert.device_weights import device_weights
    from tilert.diff import check_step_against_vm
    from tilert.gpu import MegakernelRuntime
    from tilert.timing import append_bench_log
    from tools.bench import copy_bandwidth
    from tools.bench_speculative import kernel_floor_bytes

    dev = torch.cuda.get_device_properties(0).name
    bw = copy_bandwidth()
    weights = device_weights(cfg, seed=0)
    formats = {n: t.fmt for n, t in weights.items()}
    schedule, gen = compile_variant(cfg, graph, recipe, own, max_seq_len, formats, gpu)
    cubin = build_cubin(gen.source, build_dir)[0]
    check_vm = args.layers <= 6 and not args.consume  # deeper cuts: the drawn weights go once uploaded (80 GB)
    rt = MegakernelRuntime(cubin, gen, weights, max_seq_len, consume_weights=not check_vm)
    rt.fill_cache(args.context, seed=1)
    step_tokens = [11 + 97 * i for i in range(args.tokens)]
    check = (check_step_against_vm(cfg, {args.tokens: schedule}, weights, rt, args.context, tokens=step_tokens)
             if check_vm else {"vm": "skipped: weights consumed"})
    del weights
    base_logits, _ = rt.step(step_tokens)
    rt.truncate(args.context)
    if not torch.isfinite(base_logits).all():
        raise RuntimeError("the recipe's schedule gave non-finite logits")
    print(f"{dev}: copy {bw / 1e12:.2f} TB/s; recipe schedule {label(own)} vs VM: {check}", flush=True)

    kernels, errors, compile_s = {label(own): rt.kernels[args.tokens]}, {label(own): 0.0}, {}
    for v in variants[1:]:
        t0 = time.time()
        _, g = compile_variant(cfg, graph, recipe, v, max_seq_len, formats, gpu)
        compile_s[label(v)] = time.time() - t0
        rt.use_schedule(g)
        logits, _ = rt.step(step_tokens)
        rt.truncate(args.context)
        err = float((logits.float() - base_logits.float()).norm() / base_logits.float().norm())
        if not (torch.isfinite(logits).all() and err < 1e-3):
            raise RuntimeError(f"schedule {label(v)} differs from the recipe's: rel err {err:.3e}")
        kernels[label(v)], errors[label(v)] = rt.kernels[args.tokens], err
    print(f"{len(kernels)} schedules agree (max rel err {max(errors.values()):.1e}); "
          f"compile {statistics.mean(compile_s.values() or [0]):.1f} s each", flush=True)

    floor_s = kernel_floor_bytes(gen, args.tokens, args.context, cfg.num_experts_per_tok) / bw
    sweep = time_rounds(rt, kernels, args.tokens, args.rounds, args.launches)
    med = {n: statistics.median(ts) for n, ts in sweep.items()}
    best = sorted(med, key=med.get)[:args.finalists]
    final_names = [label(own)] + [n for n in best if n != label(own)]
    final = time_rounds(rt, {n: kernels[n] for n in final_names}, args.tokens, 3 * args.rounds, args.launches)
    fmed = {n: statistics.median(ts) for n, ts in final.items()}
    base = fmed[label(own)]

    rows = [{"variant": n, "sweep_us": med[n] * 1e6, "final_us": fmed.get(n, float("nan")) * 1e6,
             "vs_recipe": fmed[n] / base if n in fmed else med[n] / med[label(own)],
             "vs_floor": (fmed.get(n) or med[n]) / floor_s, "rel_err": errors[n]} for n in sorted(med, key=med.get)]
    lines = [f"{dev}, copy {bw / 1e12:.2f} TB/s; recipe {recipe['source']}; mimo-v2-flash {args.layers} layers, context {args.context}, "
             f"B = {args.tokens}{' (DFlash target: capture layers)' if capture else ''}; floor {floor_s * 1e6:.1f} us; "
             f"sweep: median of {args.rounds} rounds x {args.launches} launches; final: {3 * args.rounds} rounds",
             "", "| schedule | sweep us | final us | / recipe's | / floor |", "|---|---|---|---|---|"]
    for r in rows:
        final_us = "-" if r["final_us"] != r["final_us"] else f"{r['final_us']:.1f}"
        lines.append(f"| {r['variant']} | {r['sweep_us']:.1f} | {final_us} | {r['vs_recipe']:.3f} | {r['vs_floor']:.2f} |")
    table = "\n".join(lines)
    print(table)
    result = {"device": dev, "copy_bandwidth": bw, "floor_s": floor_s, "check": check, "rows": rows,
              "date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "sweep": sweep, "final": final}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    if args.log:
        append_bench_log(args.log, f"{result['date']}: schedule autotune (tie-breaks)", dev, args.commit,
                         "tools/autotune_schedule.py", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
