"""Several megakernel variants profiled side by side in one GPU call, one table at the end.

Run on a GPU machine from the repository root:

    python tools/ab_profile.py --out $OUT/ab \\
        --variant "main=--cubin build/ab/main-prof.cubin --plain-cubin build/ab/main.cubin" \\
        --variant "new=" --variant "splits64=--set global_splits=64"

Each variant is one run of tools/profile_step.py (6 layers, context 8192 unless --common says
otherwise) with the variant's extra arguments, in its own process (so each gets the whole
GPU), always with --time-plain.  The table gives, per variant, the plain kernel's step time
(device events, median of 20), the profiling build's step time, and per op kind the span per
layer (first start to last end); the variants' full outputs and profiles land in --out.
The plain step times of variants run one after another drift by 2-3 % on a shared machine: to
tell variants apart by less, time them with tools/ab_plain.py (interleaved rounds, one process).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS",
                    help="a variant: its name and its extra tools/profile_step.py arguments (repeatable)")
    ap.add_argument("--common", default="--layers 6 --context 8192", help="arguments every variant gets")
    ap.add_argument("--out", default="build/ab")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        cmd = [sys.executable, str(ROOT / "tools" / "profile_step.py"), *shlex.split(args.common), *shlex.split(extra),
               "--time-plain", "--out", str(out / f"{name}.json")]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        (out / f"{name}.txt").write_text(run.stdout + run.stderr)
        print(run.stdout[-3000:] + run.stderr[-2000:], flush=True)
        if run.returncode == 0:
            results[name] = json.loads((out / f"{name}.json").read_text())
    print(table(results))
    return 0 if len(results) == len(args.variant) else 1


def table(results: dict) -> str:
    """Plain and profiled step time per variant, then each op kind's span per layer (us)."""
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append("| plain step us | " + " | ".join(f"{(r['plain_step_s'] or 0) * 1e6:.0f}" for r in results.values())
                 + " |")
    lines.append("| profiled step us | " + " | ".join(f"{r['step_ns'] / 1e3:.0f}" for r in results.values()) + " |")
    kinds = sorted({k for r in results.values() for k in r["by_kind"]},
                   key=lambda k: -max(r["by_kind"].get(k, {}).get("span_us", 0) for r in results.values()))
    for k in kinds:
        cells = []
        for r in results.values():
            v = r["by_kind"].get(k)
            cells.append("-" if v is None else f"{v['span_us']:.1f} / {v['mean_us']:.1f}")
        lines.append(f"| {k} (span / task us) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
