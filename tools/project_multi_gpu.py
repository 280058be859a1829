"""PROJECTED per-token decode time of MiMo-V2-Flash and MiMo-V2.5-Pro on 1..8 H100 / H200 GPUs.

A projection, not a measurement: single-GPU megakernel times measured on an H100 (BENCHMARKS.md)
scaled by the bytes each rank moves under tilert's partition, plus NVLink all-reduces with
stated bandwidth and latency assumptions (the model is tilert/projection.py).  Prints a markdown
table and the assumptions; `--append BENCHMARKS.md` adds them there as a section headed
PROJECTION.

    python tools/project_multi_gpu.py
    python tools/project_multi_gpu.py --gpus 1,2,4,8 --append BENCHMARKS.md --commit abc1234 --date 2026-11-25
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tilert.projection import MODELS, assumptions, efficiencies, projection_rows, table  # noqa: E402


def section(rows: list[dict], date: str, commit: str, argv: list[str]) -> str:
    lines = [
        f"## {date}: PROJECTION (not a measurement): multi-GPU decode, one megakernel per GPU",
        "",
        f"- commit {commit}; command: `python tools/project_multi_gpu.py {' '.join(argv)}`",
        "- nothing below ran on more than one GPU: per-token times are single-GPU measurements scaled by "
        "the bytes per rank, plus modelled NVLink collectives (tilert/projection.py). Assumptions:",
    ]
    lines += [f"  - {a}" for a in assumptions(efficiencies())]
    lines += ["", table(rows), ""]
    lines += reading(rows)
    return "\n".join(lines)


def reading(rows: list[dict]) -> list[str]:
    """What the table says, computed from it: the share of communication and the distance to
    the floor on the most GPUs projected, per model and GPU kind."""
    a = min(rows[0]["step_s"])
    out = ["- 1-GPU rows extrapolate the measured kernel to every layer, for comparison only: those models do "
           "not fit one card."]
    for r in rows:
        if r["gpus"] == max(x["gpus"] for x in rows) and r["gpus"] > 1:
            step = r["step_s"][a]
            out.append(f"- {r['model']} on {r['gpus']} {r['gpu'].upper()}: communication is "
                       f"{100 * r['comm_s'][a] / step:.0f}% of the projected token (alpha {a * 1e6:.0f} us); the "
                       f"token is {step / r['floor_s']:.1f}x its floor: the kernel's time per byte on each GPU and the "
                       f"busiest GPU's {r['expert_load']:.2f} experts per layer (vs a mean of "
                       f"{r['mean_load']:.2f}), not NVLink, dominate.")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated presets (default {','.join(MODELS)})")
    ap.add_argument("--gpus", default="1,4,8", help="GPU counts (default 1,4,8; 1 = the single-GPU extrapolation)")
    ap.add_argument("--gpu-kinds", default="h100,h200")
    ap.add_argument("--append", metavar="FILE", help="append the table and assumptions to FILE (BENCHMARKS.md)")
    ap.add_argument("--commit", default="unknown", help="the commit the projection was made at")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        counts = tuple(int(x) for x in args.gpus.split(","))
    except ValueError:
        ap.error(f"--gpus {args.gpus!r}: expected comma-separated integers")
    rows = projection_rows(tuple(args.models.split(",")), tuple(args.gpu_kinds.split(",")), counts)
    text = section(rows, args.date, args.commit, argv)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
        print(f"appended to {args.append}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
