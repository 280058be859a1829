"""Fit the cost model's per-op corrections to a measured profile (tilert/calibration.py).

    python tools/calibrate_cost.py PROFILE.json --layers 6 --context 8192 \
        --device "NVIDIA H100 80GB HBM3" --commit 44d4fc0 --date 2026-11-25

PROFILE.json is what `tools/profile_step.py --out` wrote on the GPU for the same geometry (this
rebuilds that schedule: mimo-v2-flash cut to --layers, one token, context + 8 positions).  Prints
measured vs modelled time per op role and the simulated step time with and without the
correction, and writes schedules/calibration.<gpu>.json (--dry-run: print only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import preset  # noqa: E402
from tilert.calibration import calibration_path, fit, load  # noqa: E402
from tilert.compiler import compile_steps  # noqa: E402
from tilert.cost import GPUS, estimate  # noqa: E402
from tilert.op_profile import step_span_ns  # noqa: E402
from tilert.lower import load_recipe  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--expert-format", default="mxfp4")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    ap.add_argument("--device", required=True, help="the GPU the profile ran on, as it names itself")
    ap.add_argument("--commit", required=True, help="the commit profiled")
    ap.add_argument("--date", required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.profile).read_text())
    rows = doc["tasks"] if isinstance(doc, dict) and "tasks" in doc else doc["rows"]
    cfg = preset("mimo-v2-flash", layers=args.layers, expert_format=args.expert_format)
    schedule = compile_steps(cfg, load_recipe("mimo-v2-flash", args.gpu), [1], max_seq_len=args.context + 8)[1]
    if len(rows) != len(schedule.graph.tasks):
        raise SystemExit(f"{args.profile}: {len(rows)} profiled tasks, the schedule has {len(schedule.graph.tasks)}: "
                         f"not the same geometry")
    gpu = GPUS[args.gpu]
    roles = fit(schedule, rows, gpu)
    before = load(args.gpu) or {}  # a fitted per-SM cap is kept (and simulated with)
    capped = dataclasses.replace(gpu, sm_bw_cap=float(before["sm_bw_cap"])) if "sm_bw_cap" in before else gpu
    measured_ns = step_span_ns(rows)
    plain = estimate(schedule, gpu)["step_time_s"]
    calibrated = estimate(schedule, dataclasses.replace(capped, calibration=tuple(sorted(roles.items()))))["step_time_s"]
    for role, f in sorted(roles.items(), key=lambda kv: -kv[1]):
        print(f"{role:20s} measured / model {f:6.2f}")
    print(f"step: measured {measured_ns / 1e3:.1f} us, model {plain * 1e6:.1f} us, "
          f"calibrated model {calibrated * 1e6:.1f} us")
    out = {"gpu": args.gpu, "roles": {k: round(v, 4) for k, v in roles.items()},
           "measured": {"device": args.device, "commit": args.commit, "date": args.date,
                        "geometry": f"mimo-v2-flash, {args.layers} layers, context {args.context}, "
                                    f"{args.expert_format} experts, batch 1",
                        "command": f"python tools/profile_step.py --layers {args.layers} --context {args.context} "
                                   f"--expert-format {args.expert_format}",
                        "step_us": round(measured_ns / 1e3, 1),
                        "calibrated_model_us": round(calibrated * 1e6, 1)}}
    if not args.dry_run:
        path = calibration_path(args.gpu)
        if "sm_bw_cap" in before:  # fitted with the old factors: kept, to be refitted
            out.update({k: before[k] for k in ("sm_bw_cap", "sm_bw_cap_fit") if k in before})
            print(f"kept sm_bw_cap {before['sm_bw_cap']}: refit it to the new factors with "
                  f"tools/fit_bandwidth_cap.py schedules/sweeps.{args.gpu}.json")
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
