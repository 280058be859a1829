"""Model -> validated schedules: lower, fuse, derive dependencies, schedule, validate."""

from __future__ import annotations

from typing import Callable

from model.config import MimoConfig
from tilert.calibration import calibrated, calibration_path
from tilert.cost import GpuSpec
from tilert.deps import derive_dependencies
from tilert.errors import UserError
from tilert.fusion import apply_fusions
from tilert.ir import TaskGraph
from tilert.lower import lower_step
from tilert.schedule import Schedule
from tilert.scheduler import build_schedule, parse_tie_break
from tilert.validate import validate


def compile_step(cfg: MimoConfig, recipe: dict, tokens: int, max_seq_len: int, max_tokens: int,
                 num_workers: int | None = None, policy: str = "list", gpu: str = "h100",
                 on_phase: Callable[[str], None] | None = None, capture_layers: tuple[int, ...] = ()) -> Schedule:
    """One validated schedule for a step of `tokens` tokens.  `on_phase(name)` is called as
    each phase starts (progress reporting).  `capture_layers`: see lower_step."""
    phase = on_phase or (lambda name: None)
    graph = step_graph(cfg, recipe, tokens, max_seq_len, max_tokens, phase, capture_layers)
    return schedule_step(graph, recipe, max_seq_len, num_workers, policy, gpu, phase)


def step_graph(cfg: MimoConfig, recipe: dict, tokens: int, max_seq_len: int, max_tokens: int,
               phase: Callable[[str], None] = lambda name: None, capture_layers: tuple[int, ...] = ()) -> TaskGraph:
    """The task graph of a step, fused, with its dependencies: what every placement of it shares."""
    phase("lowering")
    graph = lower_step(cfg, recipe, tokens=tokens, max_seq_len=max_seq_len, max_tokens=max_tokens,
                       capture_layers=capture_layers)
    phase("fusing")
    graph = apply_fusions(graph, recipe.get("fuse", []))
    phase("dependencies")
    derive_dependencies(graph)
    return graph


def schedule_step(graph: TaskGraph, recipe: dict, max_seq_len: int, num_workers: int | None = None,
                  policy: str = "list", gpu: str = "h100",
                  phase: Callable[[str], None] = lambda name: None) -> Schedule:
    """The validated schedule of a step's graph (step_graph) under the recipe's placement keys;
    schedules of one graph share it (tools/autotune_schedule.py times several)."""
    phase("scheduling")
    schedule = build_schedule(graph, num_workers or recipe["workers"], policy=policy,
                              gpu=scheduling_gpu(gpu, recipe), tie_break=recipe_tie_break(recipe))
    schedule.meta.update({"tokens": graph.tokens, "max_seq_len": max_seq_len, "recipe": recipe.get("source"),
                          "gpu": gpu})
    phase("validating")
    validate(schedule)
    return schedule


def recipe_tie_break(recipe: dict) -> str:
    """The recipe's "tie_break", refused with the recipe's name when the scheduler knows no such."""
    tie_break = recipe.get("tie_break", "lowest")
    try:
        parse_tie_break(tie_break)
    except ValueError as e:
        raise UserError(f"recipe {recipe.get('source', '?')}: {e}") from None
    return tie_break


def scheduling_gpu(gpu: str, recipe: dict) -> GpuSpec | str:
    """The cost model the scheduler places tasks with: the GPU's own, or with its measured
    corrections (schedules/calibration.<gpu>.json) when the recipe says "calibrated": true."""
    if recipe.get("calibrated", False) not in (True, False):
        raise UserError(f"recipe {recipe.get('source', '?')}: \"calibrated\" must be true or false, "
                        f"not {recipe['calibrated']!r}")
    if not recipe.get("calibrated"):
        return gpu
    found = calibrated(gpu)
    if found is None:
        raise UserError(f"recipe {recipe.get('source', '?')} asks for the calibrated cost model, "
                        f"but there is no {calibration_path(gpu).name} for {gpu}")
    return found[0]


def compile_steps(cfg: MimoConfig, recipe: dict, token_counts: list[int], max_seq_len: int,
                  num_workers: int | None = None, policy: str = "list", gpu: str = "h100",
                  capture_layers: tuple[int, ...] = ()) -> dict[int, Schedule]:
    """Schedules for every step size in `token_counts` (1 = decode; larger = prefill chunks and
    speculative verification), sharing one KV-cache layout sized for the largest."""
    max_tokens = max(token_counts)
    return {b: compile_step(cfg, recipe, b, max_seq_len, max_tokens, num_workers, policy, gpu,
                            capture_layers=capture_layers)
            for b in sorted(set(token_counts))}
