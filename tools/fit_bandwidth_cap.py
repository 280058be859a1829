"""Fit the cost model's per-SM bandwidth cap to measured step times of recipe variants.

    python tools/fit_bandwidth_cap.py schedules/sweeps.h100.json [--dry-run]

The sweep file (schedules/sweeps.<gpu>.json) lists steps measured on a GPU: sets of recipe
variants timed side by side (their ratios are fitted) and profiled steps (their times are).
This rebuilds each variant's schedule from today's recipe with the variant's tile sizes
(tilert.lower.recipe_with), simulates it under every cap of tilert.calibration.CAP_GRID with the
carried per-role corrections, prints the errors per cap, and writes the best cap into
schedules/calibration.<gpu>.json beside those corrections (--dry-run: print only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import preset  # noqa: E402
from model.dflash import DFlashConfig  # noqa: E402
from tilert.calibration import StepTime, calibrated, calibration_path, cap_errors, fit_sm_bw_cap, rms  # noqa: E402
from tilert.compiler import compile_steps  # noqa: E402
from tilert.errors import UserError  # noqa: E402
from tilert.lower import load_recipe, recipe_with  # noqa: E402


def read_sweep(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        for s in doc["sets"]:
            if len(s["variants"]) < 2:
                raise ValueError("a set needs two or more variants")
            for v in s["variants"]:
                float(v["us"]), dict(v["set"])
        for p in doc.get("profiled", []):
            float(p["us"]), dict(p["set"])
            if p["step"] not in ("target", "draft"):
                raise ValueError(f"step {p['step']!r}: expected target or draft")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable sweep ({type(e).__name__}: {e})") from None
    return doc


def build_steps(doc: dict) -> list[tuple[str, StepTime]]:
    """(label, StepTime) of every measured step of the sweep, schedules rebuilt from the recipe."""
    cfg = preset(doc["model"], layers=doc["layers"], expert_format=doc["expert_format"])
    base = load_recipe(doc["model"], doc["gpu"])
    max_seq = doc["context"] + 8

    def recipe(tiles: dict) -> dict:
        r = base
        for k, v in tiles.items():
            r = recipe_with(r, k, v)
        return r

    def label(tiles: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in tiles.items()) or "recipe"

    out = []
    for i, s in enumerate(doc["sets"]):
        B = int(s["tokens"])
        for v in s["variants"]:
            sched = compile_steps(cfg, recipe(v["set"]), [B], max_seq_len=max_seq)[B]
            out.append((f"set {i} B={B} {label(v['set'])}", StepTime(sched, float(v["us"]), group=f"set {i}")))
    for p in doc.get("profiled", []):
        B = int(p["tokens"])
        if p["step"] == "draft":
            from tilert.device_weights import draft_weight_specs, weight_specs
            from tilert.draft import compile_draft_step

            dcfg = DFlashConfig.flash_for(cfg)
            formats = {n: f for n, _, f in weight_specs(cfg) + draft_weight_specs(dcfg)}
            sched = compile_draft_step(dcfg, recipe(p["set"]), doc["context"] + 2 * dcfg.block_size, context_rows=B,
                                       weight_formats=formats)
        else:
            sched = compile_steps(cfg, recipe(p["set"]), [B], max_seq_len=max_seq)[B]
        out.append((f"profiled {p['step']} B={B} {label(p['set'])}", StepTime(sched, float(p["us"]))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    try:
        doc = read_sweep(args.sweep)
        found = calibrated(doc["gpu"])
        if found is None:
            raise UserError(f"{calibration_path(doc['gpu'])}: no calibration to add the cap to "
                            f"(tools/calibrate_cost.py writes one)")
        gpu, cal = found
        labelled = build_steps(doc)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = [s for _, s in labelled]
    cap, table = fit_sm_bw_cap(steps, gpu)
    print(f"{'sm_bw_cap':>9s} {'rms %':>7s} {'ratios %':>9s} {'absolute %':>10s}")
    for r in table:
        mark = "  <- best" if r["sm_bw_cap"] == cap else ("  (was)" if r["sm_bw_cap"] == gpu.sm_bw_cap else "")
        print(f"{r['sm_bw_cap']:9.2f} {100 * r['rms']:7.2f} {100 * r['ratio_rms']:9.2f} {100 * r['absolute_rms']:10.2f}{mark}")
    for name, c in (("before", gpu.sm_bw_cap), ("fitted", cap)):
        ratios, absolute = cap_errors(steps, dataclasses.replace(gpu, sm_bw_cap=c))
        print(f"{name} (cap {c:g}): ratio errors "
              + " ".join(f"{100 * (math.exp(e) - 1):+.1f}%" for e in ratios)
              + " | absolute " + " ".join(f"{100 * (math.exp(e) - 1):+.1f}%" for e in absolute)
              + f" | rms {100 * rms(ratios + absolute):.2f}%")
    print("steps: " + "; ".join(name for name, _ in labelled))
    if not args.dry_run:
        best = next(r for r in table if r["sm_bw_cap"] == cap)
        out = {**cal, "sm_bw_cap": cap,
               "sm_bw_cap_fit": {"sweep": str(args.sweep), "steps": len(steps),
                                 "rms_log_error": round(best["rms"], 4),
                                 "ratio_rms_log_error": round(best["ratio_rms"], 4),
                                 "absolute_rms_log_error": round(best["absolute_rms"], 4)}}
        path = calibration_path(doc["gpu"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(path)  # all or nothing
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
