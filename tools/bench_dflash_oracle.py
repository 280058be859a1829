"""DFlash on the mimo-v2-flash geometry with an ORACLE drafter: plain decoding vs draft + verify
rounds that commit a prescribed number of tokens a round, at the published acceptance lengths,
each step against its floor, and the full 48-layer model projected from per-layer times.

    python tools/bench_dflash_oracle.py --layers 6,12 --out $OUT/oracle.json --log $OUT/oracle_log.md

Oracle: the drafter runs for real (a drafter of MiMo's DFlash shape, model/dflash.py
`DFlashConfig.flash_for`, random weights: a draft step costs what a trained one's would), but
the acceptance is prescribed: round i commits c_i tokens (c_i - 1 drafts and the target's own
token), the c_i spread so that their running mean is the acceptance length (MiMo-V2.5-Pro's
published coding 6.30, math 5.56, agent 4.29).  Every round launches the draft step and the
B = 8 verify step and rolls the target back as tilert/speculative.py does; the committed tokens
are not text, the time is real.  Per depth (target layers), on the GPU megakernel:

- rounds: plain greedy decoding and oracle rounds after a short prompt, tokens/s of each (wall
  time through the runtime, host included);
- steps at --context (the caches filled with synthetic keys): the B = 1 step, the B = 8 verify
  step and the draft step, median of launches, each against its floor (the bytes it must move /
  the copy bandwidth of the same run, tools/bench_speculative.py `kernel_floor_bytes`).

With two depths the rest is a PROJECTION (labelled so): per-layer B = 1 and verify times from the
difference of the depths, extended to 48 layers; the draft step does not grow with the target's
depth; a round = draft + verify + the host time per round measured in the rounds above.
`--backend vm` runs the same loop on the CPU VM (mimo-tiny, for tests: no timing is meaningful).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PUBLISHED = {"coding": 6.30, "math": 5.56, "agent": 4.29}  # MiMo-V2.5-Pro, tokens committed a round
FULL_LAYERS = 48  # mimo-v2-flash


def oracle_commits(tau: float, block: int, rounds: int) -> list[int]:
    """Tokens committed by each of `rounds` rounds: c_i = floor((i + 1) tau) - floor(i tau), so
    every prefix's mean is within 1 / length of tau and each c_i is floor(tau) or ceil(tau)."""
    if not 1 <= tau <= block:
        raise ValueError(f"an acceptance length of {tau} is outside 1..{block} (the block size)")
    return [math.floor((i + 1) * tau + 1e-9) - math.floor(i * tau + 1e-9) for i in range(rounds)]


def oracle_accept(commits: list[int]):
    """An acceptance rule (tilert/speculative.py AcceptRule) that commits commits[r] tokens in
    round r: the first commits[r] - 1 drafts and the target's token after them."""
    it = iter(commits)

    def accept(drafts: list[int], verify) -> list[int]:
        n = min(next(it) - 1, len(drafts))
        return drafts[:n] + [verify.chosen[n]]

    return accept


def per_layer_projection(rows: list[dict], layers: int = FULL_LAYERS) -> dict:
    """From two depths' step times (rows with layers, plain_s, verify_s, draft_s, host_round_s,
    host_token_s): the per-layer B = 1 and verify times (their difference over the layers
    between) and the step, round and tokens/s of a `layers`-deep model."""
    lo, hi = sorted(rows, key=lambda r: r["layers"])[:: len(rows) - 1]
    span = hi["layers"] - lo["layers"]
    if span <= 0:
        raise ValueError("a projection needs two different depths")
    out = {"layers": layers, "from": [lo["layers"], hi["layers"]]}
    for key in ("plain_s", "verify_s"):
        slope = (hi[key] - lo[key]) / span
        out[f"{key[:-2]}_per_layer_s"] = slope
        out[key] = hi[key] + (layers - hi["layers"]) * slope
    out["draft_s"] = hi["draft_s"]
    out["plain_tok_s"] = 1.0 / (out["plain_s"] + hi["host_token_s"])
    out["round_s"] = out["draft_s"] + out["verify_s"] + hi["host_round_s"]
    out["oracle_tok_s"] = {name: tau / out["round_s"] for name, tau in PUBLISHED.items()}
    return out


# ---- building the pair ---------------------------------------------------------------------------

def build_backend(cfg, dcfg, backend: str, max_seq_len: int, seed: int = 0, profile_draft: bool = False,
                  draft_tiles: dict | None = None):
    """(SpeculativeBackend, {"target B=1" / "verify B=8" / "draft B=8": GeneratedKernel}, the same
    names -> Schedule) for the target `cfg` and drafter `dcfg`: the target's steps of 1 and B
    tokens (exposing the drafter's conditioning layers) and the draft step, compiled with the
    model's recipe (the VM and prebuild backends: None or no kernels).  `profile_draft`: prebuild
    the draft step's profiling build too.  `draft_tiles`: tile sizes over the recipe's for the
    draft step only (its `draft` entry, tilert.lower.recipe_for_draft)."""
    from tilert.compiler import compile_steps
    from tilert.draft import compile_draft_step
    from tilert.lower import load_recipe

    B = dcfg.block_size
    preset_name = "mimo-v2-flash" if cfg.model_type == "mimo_v2_flash" else "mimo-tiny"
    recipe = load_recipe(preset_name, "h100")
    if draft_tiles:
        recipe["draft"] = {**recipe.get("draft", {}), **draft_tiles}
    if backend == "vm":
        from tests.helpers import random_draft_weights
        from tilert.artifact import DRAFT_PREFIX
        from tilert.layout import runtime_weights
        from tilert.spec_backends import VMBackend
        from model.checkpoint import synthetic_tensor
        from model.weights import StoredTensor, expected_tensors

        weights = runtime_weights(cfg, {s.name: StoredTensor.from_float(synthetic_tensor(s, seed), s.fmt)
                                        for s in expected_tensors(cfg)})
        weights.update({DRAFT_PREFIX + k: v for k, v in random_draft_weights(dcfg, seed).items()})
    elif backend == "megakernel":
        from tilert.device_weights import device_draft_weights, device_weights

        weights = device_weights(cfg, seed=seed)
        weights.update(device_draft_weights(dcfg, seed=seed + 1))
    else:  # "prebuild": the kernels only, from the weights' formats (no GPU)
        from tilert.device_weights import draft_weight_specs, weight_specs

        weights = None
    formats = ({n: t.fmt for n, t in weights.items()} if weights is not None else
               {n: f for n, _, f in weight_specs(cfg) + draft_weight_specs(dcfg)})
    workers = None if backend == "vm" else _workers(recipe, backend)
    schedules = compile_steps(cfg, recipe, [1, B], max_seq_len=max_seq_len, capture_layers=dcfg.target_layers,
                              num_workers=workers)
    draft = compile_draft_step(dcfg, recipe, max_seq_len, context_rows=B, weight_formats=formats, num_workers=workers)
    named = {"target B=1": schedules[1], f"verify B={B}": schedules[B], f"draft B={B}": draft}
    if backend == "vm":
        return VMBackend(cfg, schedules, draft, dcfg, weights, max_seq_len), {}, named

    from tilert.artifact import DRAFT_PREFIX
    from tilert.build import build_cubin
    from tilert.codegen import check_weight_layouts, generate
    from tilert.draft_gpu import DraftMegakernel, generate_draft_kernel
    from tilert.gpu import MegakernelRuntime
    from tilert.spec_backends import MegakernelBackend

    build_dir = Path(os.environ.get("TILERT_BUILD", "build/cubins"))
    gens = {b: generate(s, cfg, formats) for b, s in schedules.items()}
    dgen = generate_draft_kernel(draft, dcfg, cfg, formats)
    check_weight_layouts({**{f"B={b}": g for b, g in gens.items()}, "draft": dgen})
    cubins = {b: build_cubin(g.source, build_dir)[0] for b, g in gens.items()}
    draft_cubin = build_cubin(dgen.source, build_dir)[0]
    if backend == "megakernel":
        check_draft_step(draft, dgen, draft_cubin, weights, max_seq_len)
    if backend == "prebuild":
        if profile_draft:
            build_cubin(dgen.source, build_dir, profile=True)
        return None, {}, named
    # The drawn weights are handed over (tiled ones dropped once uploaded): a 12-layer cut holds
    # ~37 GB of experts, twice that does not fit an H100.
    target_weights = {k: weights.pop(k) for k in [k for k in weights if not k.startswith(DRAFT_PREFIX)]}
    target = MegakernelRuntime(cubins, gens, target_weights, max_seq_len, consume_weights=True)
    drafter = DraftMegakernel(draft_cubin, dgen, {**target_weights, **weights}, max_seq_len, target=target)
    del target_weights, weights
    be = MegakernelBackend(target, drafter, B, max_seq_len)
    return be, {"target B=1": gens[1], f"verify B={B}": gens[B], f"draft B={B}": dgen}, named


def check_draft_step(schedule, gen, cubin, weights: dict, max_seq_len: int, blocks: int = 3) -> float:
    """The draft step's megakernel (its own upload of the weights it reads) against the DraftVM
    on the GPU, `blocks` draft steps after fresh random hidden states; prints and returns the
    worst relative error of the logits, raises on a non-finite logit or one above 1e-3."""
    from tilert.draft_gpu import DraftMegakernel
    from tilert.draft_vm import DraftVM

    own = {w.name: weights[w.name] for w in gen.weights}
    gpu = DraftMegakernel(cubin, gen, dict(own), max_seq_len)
    vm = DraftVM(schedule, own, max_seq_len, device="cuda")
    B, width = gpu.block_size, gen.buffers["ctx_hidden"].shape[1]
    seed = int(time.time())
    g = torch.Generator(device="cuda").manual_seed(seed)
    worst, same = 0.0, 0
    for i in range(blocks):
        hidden = torch.randn(B, width, device="cuda", generator=g)
        want, got = vm.draft(3 + i, hidden), gpu.draft(3 + i, hidden)
        a, b = gpu.last_logits.double(), vm.last_logits.to(gpu.last_logits.device).double()
        if not bool(torch.isfinite(a).all()):
            raise RuntimeError(f"draft megakernel: non-finite logits in block {i}")
        worst = max(worst, float((a - b).norm() / b.norm()))
        same += sum(x == y for x, y in zip(got, want))
    print(f"  draft megakernel vs DraftVM on the GPU: {blocks} blocks (hidden states of seed {seed}), worst logits "
          f"rel err {worst:.2e}, {same} of {blocks * (B - 1)} drafts equal", flush=True)
    if worst > 1e-3:
        raise RuntimeError(f"the draft megakernel differs from the DraftVM: logits rel err {worst:.2e}")
    del gpu, vm
    torch.cuda.empty_cache()
    return worst


def _workers(recipe, backend: str) -> int:
    if backend == "prebuild":  # the recipe's count: H100 and H200 both have 132 SMs
        return recipe["workers"]
    return min(recipe["workers"], torch.cuda.get_device_properties(0).multi_processor_count)


# ---- measuring -------------------------------------------------------------------------------------

def plain_decode(be, prompt: list[int], new_tokens: int) -> float:
    """Seconds of plain greedy decoding of new_tokens after prompt (prefill excluded)."""
    from tilert.speculative import _chunks

    be.reset()
    pos = 0
    for b in _chunks(len(prompt), be.step_sizes):
        out = be.step(prompt[pos:pos + b])
        pos += b
    tok = out.chosen[-1]
    _sync()
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = be.step([tok]).chosen[0]
    _sync()
    return time.perf_counter() - t0


def oracle_rounds(be, prompt: list[int], new_tokens: int, tau: float) -> tuple[float, object]:
    """(seconds, SpecResult) of speculative decoding with acceptance prescribed at tau (prefill
    included: it is one B-token chunk of a short prompt either way)."""
    from tilert.speculative import speculative_generate

    commits = oracle_commits(tau, be.block_size, new_tokens + 1)
    _sync()
    t0 = time.perf_counter()
    res = speculative_generate(be, prompt, new_tokens, accept=oracle_accept(commits))
    _sync()
    return time.perf_counter() - t0, res


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_times(be, gens: dict, context: int, reps: int, bw: float, top_k: int, schedules: dict | None = None) -> dict:
    """Median launch time of the B = 1 and verify steps at `context` cached positions, each
    against its floor and, given the steps' `schedules` (compiled for this context), the
    calibrated cost model's step; the draft step repeats the rounds' last one (its keys are
    bounded by its window, which those rounds had not filled: the floor counts the window's)."""
    from tilert.calibration import model_steps
    from tilert.timing import median_seconds
    from tools.bench_speculative import kernel_floor_bytes

    B = be.block_size
    be.reset()
    be.target.fill_cache(context, seed=1)
    out = {}
    model = model_steps(schedules) if schedules else {}
    for name, launch, tokens, lookups in (("target B=1", lambda: be.target.launch(1), 1, None),
                                          (f"verify B={B}", lambda: be.target.launch(B), B, None),
                                          (f"draft B={B}", lambda: be.drafter.rt.launch(B), B, 1)):
        if not name.startswith("draft"):
            # launch() repeats the kernel's last step: make that one a step at `context` (before
            # 2026-12-07 the target's were the rounds' last, a few hundred positions in).
            be.target.step([11] * tokens)
            be.target.truncate(context)
        t = median_seconds(launch, reps)
        floor = kernel_floor_bytes(gens[name], tokens, context, top_k, lookups) / bw
        out[name] = {"seconds": t, "floor_s": floor, "ratio": t / floor}
        vs_model = ""
        if name in model:
            out[name]["model_s"] = model[name]
            vs_model = f"; the cost model {model[name] * 1e6:.1f} us (measured / model {t / model[name]:.2f})"
        print(f"  {name}: {t * 1e6:.1f} us, floor {floor * 1e6:.1f} us ({t / floor:.2f}x){vs_model}", flush=True)
    return out


def profile_draft(be, schedule, gen) -> dict:
    """The draft step's per-op profile: its profiling build, sharing the drafter's uploaded
    weights, drafts 4 blocks after random hidden states; the last one's tasks by op kind
    (tilert/op_profile.py), printed as a table."""
    from tilert.build import build_cubin
    from tilert.draft_gpu import DraftMegakernel
    from tilert.op_profile import op_summary, op_table, step_span_ns

    B, rt = be.block_size, be.drafter.rt
    cubin = build_cubin(gen.source, Path(os.environ.get("TILERT_BUILD", "build/cubins")), profile=True)[0]
    prof = DraftMegakernel(cubin, gen, {}, be.drafter.max_seq_len, target=rt, profile=True)
    width = schedule.graph.buffers["ctx_hidden"].shape[1]
    g = torch.Generator(device=rt.device).manual_seed(3)
    for _ in range(4):
        prof.draft(5, torch.randn(B, width, device=rt.device, generator=g))
    rows = prof.rt.profile(B)
    step_ns = step_span_ns(rows)
    by_kind = op_summary(schedule, rows)
    print(f"  draft step profile (profiling build): {step_ns / 1e3:.1f} us over {len(rows)} tasks\n"
          + op_table(by_kind, step_ns, schedule.num_workers), flush=True)
    return {"step_ns": step_ns, "by_kind": by_kind}


def measure_depth(layers: int, args, bw: float) -> dict:
    from model.config import preset
    from model.dflash import DFlashConfig

    cfg = preset("mimo-tiny") if args.backend == "vm" else preset("mimo-v2-flash", layers, "mxfp4")
    dcfg = (dataclasses.replace(DFlashConfig.tiny_for(cfg), block_size=8).validate() if args.backend == "vm" else
            DFlashConfig.flash_for(cfg, num_heads=args.draft_heads, intermediate_size=args.draft_intermediate))
    max_seq = max(args.context, len(args.prompt_ids) + args.new_tokens) + 2 * dcfg.block_size
    be, gens, schedules = build_backend(cfg, dcfg, args.backend, max_seq, profile_draft=args.profile_draft,
                                        draft_tiles=args.draft_tiles)
    if args.backend == "prebuild":
        print(f"{cfg.num_hidden_layers} layers: the B = 1, verify and draft kernels built", flush=True)
        return {"layers": cfg.num_hidden_layers}
    prompt = args.prompt_ids
    plain_decode(be, prompt, min(args.new_tokens, 8))  # warm-up
    t_plain = plain_decode(be, prompt, args.new_tokens)
    row = {"layers": cfg.num_hidden_layers, "plain_tok_s": (args.new_tokens - 1) / t_plain, "oracle": {}}
    print(f"{cfg.num_hidden_layers} layers: plain {row['plain_tok_s']:.1f} tok/s", flush=True)
    for name, tau in PUBLISHED.items():
        t, res = oracle_rounds(be, prompt, args.new_tokens, tau)
        row["oracle"][name] = {"tau": tau, "acceptance_length": res.acceptance_length, "rounds": res.rounds,
                               "tok_s": args.new_tokens / t, "round_s": t / max(res.rounds, 1)}
        print(f"  oracle {name} (tau {tau}): {args.new_tokens / t:.1f} tok/s over {res.rounds} rounds, "
              f"acceptance {res.acceptance_length:.2f}", flush=True)
    if args.backend == "vm":
        return row
    steps = step_times(be, gens, args.context, args.reps, bw, cfg.num_experts_per_tok, schedules)
    row["steps"], row["context"] = steps, args.context
    # Host time a token (plain) and a round (oracle) beyond the kernels, at the rounds' context.
    short = step_times(be, gens, len(prompt) + args.new_tokens // 2, args.reps, bw, cfg.num_experts_per_tok)
    B = dcfg.block_size
    row["host_token_s"] = max(0.0, t_plain / (args.new_tokens - 1) - short["target B=1"]["seconds"])
    rounds = row["oracle"]["coding"]
    row["host_round_s"] = max(0.0, rounds["round_s"] - short[f"verify B={B}"]["seconds"]
                              - short[f"draft B={B}"]["seconds"])
    row.update(plain_s=steps["target B=1"]["seconds"], verify_s=steps[f"verify B={B}"]["seconds"],
               draft_s=steps[f"draft B={B}"]["seconds"])
    if args.profile_draft:
        row["draft_profile"] = profile_draft(be, schedules[f"draft B={B}"], gens[f"draft B={B}"])
    row["drafter"] = dataclasses.asdict(dcfg)
    return row


def table(result: dict) -> str:
    lines = [f"device {result['device']}, copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s; ORACLE drafter "
             f"(acceptance prescribed), drafter of MiMo's DFlash shape with {result['draft_heads']} query heads and an "
             f"MLP of {result['draft_intermediate']} (assumed), random weights",
             "", "rounds after a short prompt (wall time through the runtime):",
             "| layers | plain tok/s | " + " | ".join(f"oracle {n} {t} tok/s" for n, t in PUBLISHED.items())
             + " | " + " | ".join(f"{n} speedup" for n in PUBLISHED) + " |",
             "|---|---|" + "---|" * (2 * len(PUBLISHED))]
    for r in result["rows"]:
        o = r["oracle"]
        lines.append(f"| {r['layers']} | {r['plain_tok_s']:.0f} | " + " | ".join(f"{o[n]['tok_s']:.0f}" for n in PUBLISHED)
                     + " | " + " | ".join(f"{o[n]['tok_s'] / r['plain_tok_s']:.2f}" for n in PUBLISHED) + " |")
    rows = [r for r in result["rows"] if "steps" in r]
    if rows:
        lines += ["", f"steps at context {rows[0]['context']} (median of launches) vs floor (bytes / copy bandwidth):",
                  "| layers | step | us | floor us | step / floor |", "|---|---|---|---|---|"]
        for r in rows:
            for name, s in r["steps"].items():
                lines.append(f"| {r['layers']} | {name} | {s['seconds'] * 1e6:.1f} | {s['floor_s'] * 1e6:.1f} | "
                             f"{s['ratio']:.2f} |")
    p = result.get("projection")
    if p:
        lines += ["", f"PROJECTION (not a measurement) to {p['layers']} layers from the {p['from'][0]}- and "
                      f"{p['from'][1]}-layer steps: B = 1 {p['plain_per_layer_s'] * 1e6:.1f} us and verify "
                      f"{p['verify_per_layer_s'] * 1e6:.1f} us a layer; step {p['plain_s'] * 1e3:.2f} ms, verify "
                      f"{p['verify_s'] * 1e3:.2f} ms, draft {p['draft_s'] * 1e3:.2f} ms, round {p['round_s'] * 1e3:.2f} ms",
                  "| | plain | " + " | ".join(f"oracle {n} {t}" for n, t in PUBLISHED.items()) + " |",
                  "|---|---|" + "---|" * len(PUBLISHED),
                  f"| tok/s | {p['plain_tok_s']:.0f} | " + " | ".join(f"{p['oracle_tok_s'][n]:.0f}" for n in PUBLISHED)
                  + " |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="6,12", help="target depths (mimo-v2-flash cut), comma-separated")
    ap.add_argument("--context", type=int, default=8192, help="cached positions for the step times")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--draft-heads", type=int, default=32, help="the drafter's query heads (assumed)")
    ap.add_argument("--draft-intermediate", type=int, default=8192, help="the drafter's MLP width (assumed)")
    ap.add_argument("--backend", choices=("megakernel", "vm", "prebuild"), default="megakernel",
                    help="vm: the loop on the CPU VM (mimo-tiny; for tests); prebuild: only build the GPU kernels "
                         "into $TILERT_BUILD (default build/cubins) on a machine without a GPU")
    ap.add_argument("--profile-draft", action="store_true",
                    help="also profile the draft step (its profiling build) and print its ops' times")
    ap.add_argument("--draft-set", action="append", default=[], metavar="KEY=INT",
                    help="a tile size for the draft step only (the recipe's draft entry), e.g. qkv_rows=64 (repeatable)")
    ap.add_argument("--out", default="oracle.json")
    ap.add_argument("--log", help="append the tables, with date, device, command and commit, to this file")
    ap.add_argument("--commit", default=os.environ.get("TILERT_COMMIT", "unknown"))
    args = ap.parse_args(argv)
    args.prompt_ids = [1 + (7 * i) % 97 for i in range(args.prompt_tokens)]
    args.draft_tiles = {}
    for kv in args.draft_set:
        key, _, value = kv.partition("=")
        if not value.isdigit():
            raise SystemExit(f"--draft-set {kv}: expected KEY=INT")
        args.draft_tiles[key] = int(value)
    gpu = args.backend == "megakernel"
    if gpu:
        from tools.bench import copy_bandwidth

        bw, device = copy_bandwidth(), torch.cuda.get_device_properties(0).name
    else:
        bw, device = float("nan"), "cpu (VM)"
    depths = [int(x) for x in args.layers.split(",")] if args.backend != "vm" else [4]
    rows = []
    for L in depths:
        rows.append(measure_depth(L, args, bw))
        gc.collect()  # the depth's runtimes and weights, before the next depth draws its own
        if gpu:
            torch.cuda.empty_cache()
    if args.backend == "prebuild":
        return 0
    result = {"device": device, "copy_bandwidth": bw, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "draft_heads": args.draft_heads, "draft_intermediate": args.draft_intermediate, "argv": sys.argv}
    timed = [r for r in rows if "steps" in r]
    if len({r["layers"] for r in timed}) >= 2:
        result["projection"] = per_layer_projection(timed)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(table(result))
    if args.log:
        from tilert.timing import append_bench_log

        append_bench_log(args.log, f"{result['date']}: DFlash with an ORACLE drafter, mimo-v2-flash geometry", device,
                         args.commit, "tools/bench_dflash_oracle.py", table(result), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
