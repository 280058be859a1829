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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.config import PRESETS, preset  # noqa: E402
from model.dflash import DFlashConfig  # noqa: E402
from tilert.calibration import (StepTime, calibrated, calibration_path, cap_errors, fit_sm_bw_cap,  # noqa: E402
                                root_mean_square)
from tilert.cost import GPUS, simulate  # noqa: E402
from tilert.compiler import compile_steps  # noqa: E402
from tilert.errors import UserError  # noqa: E402
from tilert.lower import TILE_KEYS, load_recipe, recipe_with  # noqa: E402


def _positive_us(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{where}: us must be a positive number of microseconds, not {v!r}")
    return float(v)


def _tiles(v, where: str) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"{where}: set must be an object of tile sizes, not {v!r}")
    bad = sorted(set(v) - set(TILE_KEYS))
    if bad:
        raise ValueError(f"{where}: set names {', '.join(bad)}, not tile sizes ({', '.join(TILE_KEYS)})")
    return v


def _tokens(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: tokens must be a positive integer, not {v!r}")
    return v


def read_sweep(path: Path) -> dict:
    """The sweep document, every field checked; a UserError naming the file and the field."""
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in ("gpu", "model", "layers", "context", "expert_format", "sets") if k not in doc]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if doc["gpu"] not in GPUS:
            raise ValueError(f"gpu {doc['gpu']!r}: expected one of {', '.join(sorted(GPUS))}")
        if doc["model"] not in PRESETS:
            raise ValueError(f"model {doc['model']!r}: expected one of {', '.join(sorted(PRESETS))}")
        for i, s in enumerate(doc["sets"]):
            _tokens(s.get("tokens"), f"sets[{i}]")
            if len(s.get("variants", [])) < 2:
                raise ValueError(f"sets[{i}]: a set needs two or more variants (only ratios are fitted)")
            for j, v in enumerate(s["variants"]):
                _positive_us(v.get("us"), f"sets[{i}].variants[{j}]")
                _tiles(v.get("set"), f"sets[{i}].variants[{j}]")
        for i, p in enumerate(doc.get("profiled", [])):
            _positive_us(p.get("us"), f"profiled[{i}]")
            _tiles(p.get("set"), f"profiled[{i}]")
            _tokens(p.get("tokens"), f"profiled[{i}]")
            if p.get("step") not in ("target", "draft"):
                raise ValueError(f"profiled[{i}]: step {p.get('step')!r}, expected target or draft")
        if not doc["sets"] and not doc.get("profiled"):
            raise ValueError("no set and no profiled step: nothing to fit")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable sweep ({type(e).__name__}: {e})") from None
    return doc


def build_steps(doc: dict) -> list[tuple[str, StepTime]]:
    """(label, StepTime) of every measured step of the sweep, schedules rebuilt from the recipe."""
    cfg = preset(doc["model"], layers=doc["layers"], expert_format=doc["expert_format"])
    gpu = doc["gpu"]
    base = load_recipe(doc["model"], gpu)
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
        B = s["tokens"]
        for v in s["variants"]:
            sched = compile_steps(cfg, recipe(v["set"]), [B], max_seq_len=max_seq, gpu=gpu)[B]
            out.append((f"set {i} B={B} {label(v['set'])}", StepTime(sched, float(v["us"]), group=f"set {i}")))
    for p in doc.get("profiled", []):
        B = p["tokens"]
        if p["step"] == "draft":
            from tilert.device_weights import draft_weight_specs, weight_specs
            from tilert.draft import compile_draft_step

            dcfg = DFlashConfig.flash_for(cfg)
            formats = {n: f for n, _, f in weight_specs(cfg) + draft_weight_specs(dcfg)}
            sched = compile_draft_step(dcfg, recipe(p["set"]), doc["context"] + 2 * dcfg.block_size, context_rows=B,
                                       gpu=gpu, weight_formats=formats)
        else:
            sched = compile_steps(cfg, recipe(p["set"]), [B], max_seq_len=max_seq, gpu=gpu)[B]
        out.append((f"profiled {p['step']} B={B} {label(p['set'])}", StepTime(sched, float(p["us"]))))
    return out


def _shown(path: Path) -> str:
    """The sweep's path as the calibration records it: relative to the repository when inside."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


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
    cap, table = fit_sm_bw_cap(steps, gpu)  # (read_sweep made sure there is something to fit)
    print(f"{'sm_bw_cap':>9s} {'rms %':>7s} {'ratios %':>9s} {'absolute %':>10s}")
    for r in table:
        mark = "  <- best" if r["sm_bw_cap"] == cap else ("  (now)" if r["sm_bw_cap"] == gpu.sm_bw_cap else "")
        print(f"{r['sm_bw_cap']:9.2f} {100 * r['rms']:7.2f} {100 * r['ratio_rms']:9.2f} {100 * r['absolute_rms']:10.2f}{mark}")
    by_cap = {r["sm_bw_cap"]: (r["ratios"], r["absolute"]) for r in table}
    for name, c in (("now", gpu.sm_bw_cap), ("fitted", cap)):
        # the fit's own errors; simulated again only for a cap off its grid
        ratios, absolute = by_cap.get(c) or cap_errors(steps, dataclasses.replace(gpu, sm_bw_cap=c))
        print(f"{name} (cap {c:g}): ratio errors "
              + " ".join(f"{100 * (math.exp(e) - 1):+.1f}%" for e in ratios)
              + " | absolute " + " ".join(f"{100 * (math.exp(e) - 1):+.1f}%" for e in absolute)
              + f" | rms over {len(ratios) + len(absolute)} terms {100 * root_mean_square(ratios + absolute):.2f}%")
    print("steps: " + "; ".join(name for name, _ in labelled))
    if not args.dry_run:
        best = next(r for r in table if r["sm_bw_cap"] == cap)
        out = {**cal, "sm_bw_cap": cap,
               "sm_bw_cap_fit": {"sweep": _shown(args.sweep), "steps": len(steps), "terms": best["terms"],
                                 "rms_log_error": round(best["rms"], 4),
                                 "ratio_rms_log_error": round(best["ratio_rms"], 4),
                                 "absolute_rms_log_error": round(best["absolute_rms"], 4)}}
        measured = dict(cal.get("measured") or {})
        if "calibrated_model_us" in measured:  # the profiled geometry's step under the new cap
            measured["calibrated_model_us"] = round(_profiled_model_us(measured, dataclasses.replace(gpu, sm_bw_cap=cap)), 1)
            out["measured"] = measured
        path = calibration_path(doc["gpu"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(path)  # all or nothing
        print(f"wrote {path}")
    return 0


def _profiled_model_us(measured: dict, gpu) -> float:
    """The calibrated model's step for the geometry the role factors were profiled on (as
    tools/calibrate_cost.py writes it: "<preset>, N layers, context C, <format> experts, batch 1")."""
    import re

    m = re.fullmatch(r"(\S+), (\d+) layers, context (\d+), (\S+) experts, batch 1", measured.get("geometry", ""))
    if m is None:
        raise SystemExit(f"calibration geometry {measured.get('geometry')!r}: not the form tools/calibrate_cost.py writes")
    cfg = preset(m[1], layers=int(m[2]), expert_format=m[4])
    recipe = load_recipe(m[1], gpu.name)
    return simulate(compile_steps(cfg, recipe, [1], max_seq_len=int(m[3]) + 8, gpu=gpu.name)[1], gpu).step_time * 1e6


if __name__ == "__main__":
    raise SystemExit(main())
