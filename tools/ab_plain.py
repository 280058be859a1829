"""Megakernel variants timed against each other in one process, in interleaved rounds.

Run on a GPU machine from the repository root:

    python tools/ab_plain.py --common "--layers 6 --context 8192" \\
        --variant "base=" --variant "slots3=--ring-slots 3 --codegen MIN_SLOT_ROW_BYTES=5120"

Why: tools/ab_profile.py runs each variant in its own process, one after the other, and times
its plain kernel there (median of 20 launches); on a shared machine two runs of one kernel that
way differed by 2-3 % (BENCHMARKS.md, stop 20), more than most changes worth testing.  Here every
variant (tools/profile_step.py's options: --set, --codegen, --define, --ring-slots, --cubin ...;
the same cut of mimo-v2-flash for all) is built and loaded side by side, on one upload of the
weights, each checked against the VM (one step of all its tokens), and then `--rounds` times, in
a shuffled order, each runs `--launches` steps back to back between two events: drift hits every
variant alike.
Prints per variant the median step and its ratio to the first variant's, with the spread of the
rounds, the floor of the same run (bytes the step must move / copy bandwidth), and the ratio the
calibrated cost model predicts for its schedule (tilert/calibration.py; 1.000 for a change the
model cannot see, such as --define or --codegen): every sweep also checks the model, and a
measured sweep belongs in schedules/sweeps.<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tilert.calibration import model_steps  # noqa: E402
from tools.profile_step import parser as step_parser  # noqa: E402
from tools.profile_step import check_plain, plain_runtime, step_config, variant_kernel  # noqa: E402

# Options that fix the step itself: every variant must share them (one upload of the weights, one floor).
STEP_OPTIONS = ("layers", "context", "expert_format", "experts", "tokens")


def parse_variants(common: str, specs: list[str]) -> list[tuple[str, argparse.Namespace]]:
    """(name, tools/profile_step.py options) of each `NAME=ARGS` variant, after `common`."""
    out = []
    for spec in specs:
        name, sep, extra = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variant {spec!r}: expected NAME=ARGS")
        if any(name == n for n, _ in out):
            raise SystemExit(f"--variant {name}: named twice")
        out.append((name, step_parser().parse_args(shlex.split(common) + shlex.split(extra))))
    first = out[0][1]
    for name, args in out[1:]:
        differ = [o for o in STEP_OPTIONS if getattr(args, o) != getattr(first, o)]
        if differ:
            raise SystemExit(f"variant {name} changes the step itself ({', '.join('--' + o.replace('_', '-') for o in differ)}): "
                             f"variants share the step and differ in how it is compiled")
    return out


def table(times: dict[str, list[float]], floor_s: float, checks: dict, model: dict[str, float] | None = None) -> str:
    base = statistics.median(next(iter(times.values())))
    model_base = next(iter(model.values())) if model else None
    lines = ["| variant | step us (median) | rounds min - max | / first | model / first | floor / step | vs the VM |",
             "|---|---|---|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        predicted = f"{model[name] / model_base:.3f}" if model else "-"
        lines.append(f"| {name} | {med * 1e6:.1f} | {min(ts) * 1e6:.1f} - {max(ts) * 1e6:.1f} | {med / base:.3f} | "
                     f"{predicted} | {floor_s / med:.3f} | {checks.get(name, '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS",
                    help="a variant: its name and its tools/profile_step.py options (repeatable)")
    ap.add_argument("--common", default="--layers 6 --context 8192", help="options every variant gets")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--launches", type=int, default=10)
    ap.add_argument("--out", default="ab_plain.json")
    args = ap.parse_args(argv)
    variants = parse_variants(args.common, args.variant)

    from tilert.device_weights import device_weights
    from tilert.timing import interleaved_rounds
    from tools.bench import copy_bandwidth
    from tools.bench_speculative import kernel_floor_bytes

    first = variants[0][1]
    cfg, B, context = step_config(first), first.tokens, first.context
    weights = device_weights(cfg, seed=0, expert_format=first.expert_format)
    runtimes, checks, schedules, shared, first_gen = {}, {}, {}, None, None
    for name, opts in variants:
        schedule, gen, source = variant_kernel(opts, cfg, weights)
        schedules[name] = schedule
        rt = plain_runtime(opts, gen, source, weights, share_weights_with=shared)
        shared = shared or rt
        check = check_plain(opts, cfg, schedule, weights, rt)
        if check is not None:
            checks[name] = check
        runtimes[name] = rt
        first_gen = first_gen or gen
        print(f"{name}: {gen.describe()}; vs the VM {checks.get(name, '-')}", flush=True)
    bw = copy_bandwidth()
    floor_s = kernel_floor_bytes(first_gen, B, context, cfg.num_experts_per_tok) / bw
    times = interleaved_rounds({name: (lambda rt=rt: rt.launch(B)) for name, rt in runtimes.items()},
                               args.rounds, args.launches)
    model = model_steps(schedules)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; floor {floor_s * 1e6:.1f} us; {args.rounds} rounds of "
          f"{args.launches} launches\n" + table(times, floor_s, checks, model))
    Path(args.out).write_text(json.dumps({"floor_s": floor_s, "copy_bandwidth": bw, "times": times, "model_s": model,
                                          "checks": checks, "variants": args.variant, "common": args.common},
                                         default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
