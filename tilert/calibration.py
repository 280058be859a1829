"""Measured corrections of the cost model (tilert/cost.py), per op role and GPU.

The cost model prices a task by its bytes at the SM's share of HBM bandwidth (and its flops on
the tensor cores), plus a fixed overhead.  The megakernel's tasks run slower than that, by
amounts that differ per op (an MXFP4 expert GEMV, an attention split, a lone top-k).  A
calibration holds, per op role ("q_proj", "attention", "expert_down", ...), the ratio of the
measured task times (the profiling build, tools/profile_step.py) to the modelled ones, with where
and when they were measured.  `tilert inspect` shows the step time the calibrated model
simulates beside the plain estimate; the scheduler keeps the plain model.

A calibration may also hold the per-SM bandwidth cap (`sm_bw_cap`: one SM streams at most that
many times its fair share, hbm / SMs), fitted to measured step times of recipe variants
(`fit_sm_bw_cap`, tools/fit_bandwidth_cap.py): it decides what the simulator predicts when
fewer tasks than SMs stream (coarser or finer tiles, a draft step's 64 whole-head tasks).  Kept
at or above 1: the scheduler's estimate (every worker streaming) then stays the same where there
is a worker per SM; with fewer workers the cap limits what it expects of each too.

File: schedules/calibration.<gpu>.json, written by tools/calibrate_cost.py (roles) and
tools/fit_bandwidth_cap.py (sm_bw_cap).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tilert.cost import GPUS, GpuSpec, op_role, simulate, task_time
from tilert.errors import UserError
from tilert.lower import SCHEDULES_DIR
from tilert.schedule import Schedule


def calibration_path(gpu: str) -> Path:
    return SCHEDULES_DIR / f"calibration.{gpu}.json"


def fit(schedule: Schedule, rows: list[dict], gpu: GpuSpec) -> dict[str, float]:
    """Per op role: measured task time / modelled task time, summed over the role's tasks.
    `rows`: profile rows (task id, start, end in ns) of one step of `schedule`."""
    g = schedule.graph
    measured, model = defaultdict(float), defaultdict(float)
    for r in rows:
        t = g.tasks[int(r["task"])]
        role = op_role(g, t)
        measured[role] += (int(r["end"]) - int(r["start"])) * 1e-9
        model[role] += task_time(t, gpu)
    return {role: measured[role] / model[role] for role in sorted(measured) if model[role] > 0}


def load(gpu: str) -> dict | None:
    """The calibration document for `gpu`, or None when none was measured."""
    path = calibration_path(gpu)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        roles = {str(k): float(v) for k, v in doc["roles"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable calibration ({type(e).__name__}: {e})") from None
    if any(not v > 0 for v in roles.values()):
        raise UserError(f"{path}: calibration factors must be positive")
    cap = doc.get("sm_bw_cap")
    if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool)
                                and math.isfinite(cap) and cap >= 1.0):
        raise UserError(f"{path}: sm_bw_cap must be a number >= 1 (one SM's most bandwidth over its fair "
                        f"share), not {cap!r}")
    fit_doc = doc.get("sm_bw_cap_fit")
    if fit_doc is not None and not (isinstance(fit_doc, dict) and isinstance(fit_doc.get("sweep"), str)
                                    and isinstance(fit_doc.get("steps"), int)):
        raise UserError(f"{path}: sm_bw_cap_fit must name its sweep and count its steps, not {fit_doc!r}")
    return {**doc, "roles": roles}


def calibrated(gpu: str) -> tuple[GpuSpec, dict] | None:
    """(the GPU's cost model with its measured corrections, the calibration document) or None."""
    doc = load(gpu)
    if doc is None or gpu not in GPUS:
        return None
    spec = dataclasses.replace(GPUS[gpu], calibration=tuple(sorted(doc["roles"].items())))
    if doc.get("sm_bw_cap") is not None:
        spec = dataclasses.replace(spec, sm_bw_cap=float(doc["sm_bw_cap"]))
    return spec, doc


# The caps fit_sm_bw_cap tries: from the fair share (1) to three times it, in 0.05 steps.
CAP_GRID = tuple(round(1.0 + 0.05 * i, 2) for i in range(41))


@dataclass(frozen=True)
class StepTime:
    """A measured step time of `schedule`.  `group`: steps measured side by side (one machine,
    one run), compared by their ratios to the group's first step only; None: compared as is."""

    schedule: Schedule
    us: float
    group: str | None = None


def cap_errors(steps: list[StepTime], gpu: GpuSpec) -> tuple[list[float], list[float]]:
    """log(simulated / measured) under `gpu`: of each grouped step's ratio to its group's first
    step (the first itself left out), and of each ungrouped step's time."""
    sim = [simulate(s.schedule, gpu).step_time * 1e6 for s in steps]
    first: dict[str, int] = {}
    ratios, absolute = [], []
    for i, s in enumerate(steps):
        if s.group is None:
            absolute.append(math.log(sim[i] / s.us))
        elif s.group not in first:
            first[s.group] = i
        else:
            b = first[s.group]
            ratios.append(math.log(sim[i] / sim[b]) - math.log(s.us / steps[b].us))
    return ratios, absolute


def root_mean_square(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else 0.0


def fit_sm_bw_cap(steps: list[StepTime], gpu: GpuSpec, caps=CAP_GRID) -> tuple[float, list[dict]]:
    """The cap in `caps` whose simulated steps match `steps` best (least root-mean-square log
    error over every ratio and absolute time), and per cap its errors."""
    if not any(s.group is None for s in steps) and len({s.group for s in steps}) == len(steps):
        raise ValueError("no step to fit: give an ungrouped step or a group of two or more")
    table = []
    for cap in caps:
        ratios, absolute = cap_errors(steps, dataclasses.replace(gpu, sm_bw_cap=cap))
        table.append({"sm_bw_cap": cap, "rms": root_mean_square(ratios + absolute),
                      "ratio_rms": root_mean_square(ratios), "absolute_rms": root_mean_square(absolute),
                      "terms": len(ratios) + len(absolute), "ratios": ratios, "absolute": absolute})
    best = min(table, key=lambda r: r["rms"])
    return best["sm_bw_cap"], table


def model_steps(schedules: dict[str, Schedule], gpu: str = "h100") -> dict[str, float]:
    """Each named schedule's step simulated by the cost model with its measured corrections (the
    plain model where none are carried for `gpu`), in seconds: what a device run prints beside
    its measurements, so that every run also checks the model."""
    found = calibrated(gpu)
    spec = found[0] if found else GPUS[gpu]
    return {name: simulate(s, spec).step_time for name, s in schedules.items()}
