"""Measured corrections of the cost model (tilert/cost.py), per op role and GPU.

The cost model prices a task by its bytes at the SM's share of HBM bandwidth (and its flops on
the tensor cores), plus a fixed overhead.  The megakernel's tasks run slower than that, by
amounts that differ per op (an MXFP4 expert GEMV, an attention split, a lone top-k).  A
calibration holds, per op role ("q_proj", "attention", "expert_down", ...), the ratio of the
measured task times (the profiling build, tools/profile_step.py) to the modelled ones, with where
and when they were measured.  `tilert inspect` shows the step time the calibrated model
simulates beside the plain estimate; the scheduler keeps the plain model.

File: schedules/calibration.<gpu>.json, written by tools/calibrate_cost.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

from tilert.cost import GPUS, GpuSpec, op_role, task_time
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
    return {**doc, "roles": roles}


def calibrated(gpu: str) -> tuple[GpuSpec, dict] | None:
    """(the GPU's cost model with its measured corrections, the calibration document) or None."""
    doc = load(gpu)
    if doc is None or gpu not in GPUS:
        return None
    return dataclasses.replace(GPUS[gpu], calibration=tuple(sorted(doc["roles"].items()))), doc
