"""The command line's multi-GPU parts (`--gpus N`): kept here so that tilert/cli.py only
dispatches to them.

- compile --gpus N: the model split over N ranks (tilert/partition.py), every step size
  compiled for all ranks together (tilert/multigpu.py), written as one artifact per rank under a
  manifest (tilert/artifact_multi.py).  No GPU megakernel: the CUDA code generator does not emit
  communication tasks yet.
- inspect: every rank's schedule and the communication tasks (tilert/inspect_multi.py).
- run: the multi-rank VM on the CPU, or the reference decoder on the weights put back
  together; the megakernel backend refuses (it would need N GPUs and a multi-GPU codegen).
"""

from __future__ import annotations

import time
from pathlib import Path

from tilert.errors import UserError

NO_KERNEL = "multi-GPU artifact: the megakernel code generator does not emit communication tasks yet"


def check_gpus(model: str, layers: int | None, gpus: int, gpu: str, draft: str | None,
               profile_kernel: bool) -> None:
    """Refuse a GPU count that does not fit the model, before any long work."""
    from model.config import PRESETS, load_config, preset
    from tilert.cli import _config_name
    from tilert.lower import load_recipe
    from tilert.partition import plan_partition

    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    if gpus == 1:
        return
    if draft:
        raise UserError(f"--draft with --gpus {gpus}: the DFlash drafter is not partitioned over GPUs yet; "
                        f"compile without --draft")
    if profile_kernel:
        raise UserError(f"--profile-kernel with --gpus {gpus}: {NO_KERNEL}")
    if Path(model).is_dir():
        cfg = load_config(model)
        cfg = cfg.with_layers(layers) if layers else cfg
    elif model in PRESETS:
        cfg = preset(model, layers)
    else:
        return  # compile_artifact names the problem
    plan_partition(cfg, gpus, load_recipe(_config_name(cfg), gpu))


def compile_multi(out: Path, cfg, weights, recipe: dict, gpus: int, steps: list[int], max_seq_len: int,
                  gpu: str, meta: dict, quantize_experts: str | None, tokenizer, force: bool, log) -> Path:
    """compile_artifact's multi-GPU tail: cfg and weights (None: schedule only) already loaded."""
    from tilert.artifact import gc_paused
    from tilert.artifact_multi import write_multi_artifact
    from tilert.cli import _bar, _progress
    from tilert.layout import runtime_weights
    from tilert.multigpu import compile_rank_step
    from tilert.partition import plan_partition, shard_weights

    part = plan_partition(cfg, gpus, recipe)
    t0 = time.perf_counter()
    per_step = {}
    with _bar(total=len(steps), desc="compiling", unit="step") as bar, gc_paused():
        for b in steps:
            per_step[b] = compile_rank_step(
                part, recipe, b, max_seq_len, max(steps), gpu=gpu,
                on_phase=lambda phase, b=b: bar.set_postfix_str(f"{b}-token step: {phase}"))
            bar.update()
    schedules = [{b: per_step[b][r] for b in steps} for r in range(gpus)]
    log(f"compiled {cfg.num_hidden_layers}-layer {meta.get('model_name') or cfg.model_type} for {gpus} x {gpu}: "
        f"steps " + ", ".join(f"{b} ({len(per_step[b][0].graph.tasks)} tasks per rank)" for b in steps)
        + f" in {time.perf_counter() - t0:.1f} s")
    shards = None
    if weights is not None:
        rw = runtime_weights(cfg, weights, quantize_experts, progress=_progress())
        shards = [shard_weights(part, r, rw) for r in range(gpus)]
    meta = {**meta, "kernel": None, "kernel_skipped": NO_KERNEL}
    path = write_multi_artifact(out, cfg, part, schedules, shards, meta, tokenizer=tokenizer, force=force)
    log(f"wrote {path} ({gpus} ranks" + (", schedule only)" if shards is None else ")"))
    return path


def refuse_megakernel(manifest: dict) -> None:
    """`run --backend megakernel` on a multi-GPU artifact: refused, naming what is missing."""
    n = int(manifest.get("gpus", 0))
    try:
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 -- a broken CUDA install counts as no GPU
        found = 0
    if found < n:
        raise UserError(f"--backend megakernel: this artifact is split over {n} GPUs and this machine has "
                        f"{found}; run it with --backend vm (the CPU multi-rank VM)")
    raise UserError(f"--backend megakernel: {NO_KERNEL}; run it with --backend vm")


def refuse_rank_dir(path: Path, meta: dict) -> None:
    """A rank directory cannot run or be inspected alone: its counters wait on other GPUs."""
    rank = meta.get("rank")
    if isinstance(rank, dict):
        raise UserError(f"{path}: rank {rank.get('rank')} of a {rank.get('ranks')}-GPU artifact; its schedule waits "
                        f"on the other GPUs: pass the artifact's top directory {path.parent}")
