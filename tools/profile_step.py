"""Where the time of one megakernel step goes, per op kind, from the profiling build.

Run on a GPU machine from the repository root:

    python tools/profile_step.py --layers 6 --context 8192 --out $OUT/profile.json

Builds the profiling variant of the kernel (per-task wait/start/end stamps from %globaltimer),
runs a few steps on synthetic weights drawn on the device, and prints per op kind: tasks, mean
task time, the bandwidth one SM achieved inside its tasks, the time spent waiting on counters,
and the cost model's estimate for the same tasks (to correct the model against).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from model.config import preset  # noqa: E402
from tilert.build import build_cubin  # noqa: E402
from tilert import codegen  # noqa: E402
from tilert.codegen import generate, parse_mma_formats  # noqa: E402
from tilert.compiler import compile_steps  # noqa: E402
from tilert.device_weights import device_weights  # noqa: E402
from tilert.diff import check_step_against_vm  # noqa: E402
from tilert.gpu import MegakernelRuntime  # noqa: E402
from tilert.lower import load_recipe, recipe_with  # noqa: E402
from tilert.op_profile import op_summary, op_table, step_span_ns  # noqa: E402
from tilert.timing import median_seconds  # noqa: E402


# Recipe keys a recipe may leave out (tilert/lower.py reads them with a default).
OPTIONAL_RECIPE_KEYS = ("expert_union",)


def parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    """The step and kernel options (tools/ab_plain.py reads its variants with the same ones)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--expert-format", default="mxfp4")
    ap.add_argument("--loader", type=int, default=1)
    ap.add_argument("--compute-warps", type=int, default=None, help="default: the codegen's")
    ap.add_argument("--mma", default=None,
                    help="weight formats whose GEMVs use the tensor cores, comma-separated, or 'none' "
                         "(default: the codegen's)")
    ap.add_argument("--ring-slots", type=int, default=None, help="default: the codegen's")
    ap.add_argument("--experts", type=int, default=None,
                    help="routed experts per MoE layer (default: the model's); fewer experts keep the "
                         "bytes a step reads but shrink the memory they are drawn from (a TLB/page test)")
    ap.add_argument("--diag-skip-mma", action="store_true",
                    help="diagnostics: tensor-core GEMVs stream their pieces but skip the arithmetic "
                         "(results are wrong; timing tells memory from compute)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key (schedules/README.md) at every step size (over its by_tokens entries "
                         "too), e.g. global_splits=64 (repeatable)")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                    help="a preprocessor switch of the device code for an experiment (repeatable), e.g. "
                         "TILERT_MMA_NOINLINE=1")
    ap.add_argument("--codegen", action="append", default=[], metavar="NAME=INT",
                    help="override an integer constant of tilert/codegen.py for an experiment (repeatable), "
                         "e.g. ATTN_STAGES=4 or XS_LIMIT_BYTES=70000")
    ap.add_argument("--locals-global", action="store_true",
                    help="task-local buffers in global scratch even where they fit in shared memory (bigger ring slots)")
    ap.add_argument("--cubin", default=None,
                    help="run this prebuilt profiling cubin (e.g. of an older commit, for an A/B) instead of "
                         "building the generated source; it must come from the same schedule and program")
    ap.add_argument("--plain-cubin", default=None, help="with --time-plain / --plain-steps: a prebuilt plain cubin")
    ap.add_argument("--time-plain", action="store_true",
                    help="also time the plain (non-profiling) kernel: median of 20 launches, device events")
    ap.add_argument("--plain-steps", type=int, default=0,
                    help="only run this many steps of the plain kernel and exit (for an external profiler: "
                         "ncu -k tilert_megakernel --launch-skip N-1 -c 1)")
    ap.add_argument("--build-dir", default="build/cubins",
                    help="nvcc's output and cache (cubins built on the development machine and carried are reused)")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per step (a speculative verify step: 8)")
    return ap


def step_config(args):
    """The mimo-v2-flash cut these options name, and its synthetic weights' storage format."""
    cfg = preset("mimo-v2-flash", layers=args.layers, expert_format=args.expert_format)
    return dataclasses.replace(cfg, n_routed_experts=args.experts) if args.experts else cfg


def variant_kernel(args, cfg, weights):
    """(schedule, GeneratedKernel, CUDA source) of the options' variant: recipe overrides
    (--set), codegen constants (--codegen, put back once generated), generate() options and
    device switches (--define) prepended to the source.  `weights` (name -> stored tensor) give
    the weights' formats; None: the formats the schedule declares."""
    recipe = load_recipe("mimo-v2-flash", "h100")
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key not in recipe and key not in OPTIONAL_RECIPE_KEYS or not value:
            raise SystemExit(f"--set {kv}: expected KEY=VALUE with KEY one of {', '.join(sorted(recipe))}")
        recipe = recipe_with(recipe, key, json.loads(value))
    saved = {}
    for kv in args.codegen:
        name, _, value = kv.partition("=")
        if not isinstance(getattr(codegen, name, None), int) or not re.fullmatch(r"-?\d+", value):
            raise SystemExit(f"--codegen {kv}: expected NAME=INT with NAME an integer constant of tilert/codegen.py")
        saved.setdefault(name, getattr(codegen, name))
        setattr(codegen, name, int(value))
    try:
        B = args.tokens
        schedule = compile_steps(cfg, recipe, [B], max_seq_len=args.context + 8)[B]
        formats = {n: t.fmt for n, t in weights.items()} if weights is not None else None
        gen = generate(schedule, cfg, weight_formats=formats, loader=bool(args.loader),
                       **({"compute_warps": args.compute_warps} if args.compute_warps else {}),
                       **({"mma_formats": parse_mma_formats(args.mma)} if args.mma else {}),
                       **({"ring_slots": args.ring_slots} if args.ring_slots else {}),
                       **({"locals_space": "global"} if args.locals_global else {}))
    finally:
        for name, value in saved.items():
            setattr(codegen, name, value)
    defines = list(args.define) + (["TILERT_DIAG_SKIP_MMA=1"] if args.diag_skip_mma else [])
    for d in defines:
        if not re.fullmatch(r"TILERT_[A-Z0-9_]+=-?\w+", d):
            raise SystemExit(f"--define {d}: expected TILERT_NAME=VALUE")
    return schedule, gen, "".join(f"#define {d.replace('=', ' ', 1)}\n" for d in defines) + gen.source


def plain_runtime(args, gen, source, weights, steps: int = 3, share_weights_with=None) -> MegakernelRuntime:
    """The variant's plain (non-profiling) kernel loaded (--plain-cubin, else built from `source`)
    with its cache filled to --context, after `steps` warm steps there (each undone)."""
    cubin = Path(args.plain_cubin) if args.plain_cubin else build_cubin(source, Path(args.build_dir))[0]
    rt = MegakernelRuntime(cubin, gen, weights, max_seq_len=args.context + 8, share_weights_with=share_weights_with)
    rt.fill_cache(args.context, seed=1)
    for _ in range(steps):
        rt.step([5] * args.tokens)
        rt.truncate(args.context)
    return rt


def check_plain(args, cfg, schedule, weights, rt, vm_device: str = "cuda"):
    """The plain kernel's next step (all --tokens of it) against the VM's (on `vm_device`); None
    with the arithmetic skipped (--diag-skip-mma gives wrong logits on purpose)."""
    if args.diag_skip_mma:
        return None
    B = args.tokens
    return check_step_against_vm(cfg, {B: schedule}, weights, rt, args.context, tokens=[11 + i for i in range(B)],
                                 vm_device=vm_device)


def main(argv=None) -> int:
    ap = parser()
    ap.add_argument("--out", default="profile.json")
    args = ap.parse_args(argv)
    cfg = step_config(args)
    weights = device_weights(cfg, seed=0, expert_format=args.expert_format)
    schedule, gen, source = variant_kernel(args, cfg, weights)
    B = args.tokens
    plain_s = None
    if args.time_plain or args.plain_steps:
        prt = plain_runtime(args, gen, source, weights, steps=max(args.plain_steps, 3))
        if args.plain_steps:
            return 0
        check = check_plain(args, cfg, schedule, weights, prt)
        if check is not None:
            print(f"plain kernel vs the VM on the GPU: {check}")
        plain_s = median_seconds(lambda: prt.launch(B))
        prt = None
    if args.cubin:
        cubin, report = Path(args.cubin), {"registers": "prebuilt"}
    else:
        cubin, report = build_cubin(source, Path(args.build_dir), profile=True)
    rt = MegakernelRuntime(cubin, gen, weights, max_seq_len=args.context + 8, profile=True)
    rt.fill_cache(args.context, seed=1)
    for _ in range(3):
        rt.step([5 + 3 * b for b in range(B)])
        rt.truncate(args.context)
    rows = rt.profile(B)
    step_ns = step_span_ns(rows)
    by_kind = op_summary(schedule, rows)
    print(f"{gen.describe()}\nptxas: {report.get('registers')} regs; step {step_ns / 1e3:.1f} us "
          f"over {len(rows)} tasks" + (f"; plain kernel {plain_s * 1e6:.1f} us per step" if plain_s else ""))
    print(op_table(by_kind, step_ns, schedule.num_workers))
    Path(args.out).write_text(json.dumps({"step_ns": step_ns, "plain_step_s": plain_s, "by_kind": by_kind,
                                          "tasks": rows}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
