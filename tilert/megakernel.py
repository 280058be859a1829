"""The GPU megakernel inside an artifact: built at compile time, footprint, run through the runtime.

`build_kernels` generates the megakernel of every compiled step size (tilert.codegen), builds
its cubin with nvcc (tilert.build; cached by content under the tilert cache directory) and
returns the files to put under kernels/ plus metadata.json's `kernel` entry: per step size the
ptxas report (registers, spills, shared memory, stack) and the kernel summary, and the GPU
memory footprint of running them all.  `generate_megakernel` is `tilert run --backend
megakernel`: it checks the device and the free memory before allocating anything, loads the
cubins (no compiler at run time) and decodes like the VM backend.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tilert.errors import UserError

# Device memory of one card (bytes): the footprint is shown against it.
GPU_MEMORY = {"h100": 80e9, "h200": 141e9}


def cubin_cache_dir() -> Path:
    if os.environ.get("TILERT_CACHE"):
        base = Path(os.environ["TILERT_CACHE"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")) / "tilert"
    return base / "cubins"


def _weight_bytes(fmt: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(data, scale) bytes of a weight as the runtime holds it (stored format, no dequantization)."""
    from model.formats import fp8
    from tilert.codegen import _row_bytes

    experts = shape[0] if len(shape) == 3 else 1
    rows, cols = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[0])
    data = experts * rows * _row_bytes(fmt, cols)
    if fmt == "fp8":
        scale = experts * 4 * (-(-rows // fp8.BLOCK)) * (-(-cols // fp8.BLOCK))
    elif fmt == "mxfp4":
        scale = experts * rows * (cols // 32)
    else:
        scale = 0
    return data, scale


def footprint_weights(slots) -> int:
    """Device bytes of these weight slots as MegakernelRuntime uploads them (16-byte padded)."""
    from tilert.gpu import WEIGHT_PAD

    total = 0
    for w in slots:
        data, scale = _weight_bytes(w.fmt, tuple(w.shape))
        if w.tiled and w.fmt == "mxfp4":  # the scales travel inside the tiled data
            data, scale = data + scale, 0
        total += data + WEIGHT_PAD + (scale + WEIGHT_PAD if scale else 0)
    return total


def footprint(gens: dict[int, Any], gpu: str | None = None) -> dict[str, Any]:
    """GPU memory MegakernelRuntime allocates for these kernels (tilert/gpu.py, mirrored here):
    the weights once as stored (16-byte padded), one KV-cache state arena shared by all step sizes,
    and per step size its activation arena, program, constants, scratch, counters, weight table,
    error and profile buffers.  Plus the shared memory each CTA needs."""
    from tilert.codegen import WEIGHT_DESC, numpy_dtype
    from tilert.gpu import zeroed_buffers

    unique = {w.name: w for g in gens.values() for w in g.weights}
    desc = numpy_dtype(WEIGHT_DESC).itemsize
    per_step = {}
    for b, g in sorted(gens.items()):
        zeroed = {name: n * dtype.itemsize for name, (n, dtype) in zeroed_buffers(g).items()}
        act = zeroed.pop("act")
        program = int(g.program.nbytes)
        other = int(g.consts.nbytes) + desc * max(len(g.weights), 1) + sum(zeroed.values())
        per_step[str(b)] = {"activation_bytes": act, "program_bytes": program, "other_bytes": other,
                            "smem_per_cta": g.smem_bytes, "ctas": g.num_workers, "threads": g.threads}
    out = {
        "weights_bytes": footprint_weights(list(unique.values())),
        "kv_cache_bytes": max((g.state_bytes for g in gens.values()), default=0) or 16,
        "activation_bytes": sum(p["activation_bytes"] for p in per_step.values()),
        "program_bytes": sum(p["program_bytes"] for p in per_step.values()),
        "other_bytes": sum(p["other_bytes"] for p in per_step.values()),
        "smem_per_cta": max((p["smem_per_cta"] for p in per_step.values()), default=0),
        "steps": per_step,
    }
    out["total_bytes"] = (out["weights_bytes"] + out["kv_cache_bytes"] + out["activation_bytes"]
                          + out["program_bytes"] + out["other_bytes"])
    if gpu in GPU_MEMORY:
        out["gpu"] = gpu
        out["gpu_memory_bytes"] = int(GPU_MEMORY[gpu])
        out["fits"] = out["total_bytes"] <= GPU_MEMORY[gpu]
    return out


def _ptxas_summary(report: dict) -> dict:
    return {k: report.get(k) for k in ("registers", "spills", "spill_stores", "spill_loads", "smem", "stack",
                                        "cmem")}


def build_kernels(schedules: dict, cfg, weight_formats: dict[str, str] | None, gpu: str, profile: bool = False,
                  tmp: Path | None = None, on_step=None, draft=None) -> tuple[dict[str, Path], dict[str, Any] | None, str | None]:
    """Generate and build the megakernel of every step size.  Returns (files for
    write_artifact(extra_files=), metadata `kernel` entry, None) or ({}, None, reason) when no
    kernel can be built here (nvcc missing, a step size the kernel does not handle).  A failing
    nvcc raises UserError (that is a bug to report, not a missing tool).  `draft`: (draft
    schedule, DFlashConfig) also builds the draft step's kernel (kernels/draft*; the entry's
    `draft`, or `draft_skipped` with the reason it could not be generated)."""
    from tilert.build import build_cubin, nvcc_path
    from tilert.codegen import check_weight_layouts, generate

    if nvcc_path() is None:
        return {}, None, "nvcc not found on PATH (install the CUDA toolkit to build the GPU megakernel)"
    gens = {}
    try:
        for b, s in sorted(schedules.items()):
            gens[f"B{b}"] = generate(s, cfg, weight_formats)
    except UserError as e:
        return {}, None, f"no megakernel for the {b}-token step: {e}"
    draft_skipped = None
    if draft is not None:
        from tilert.draft_gpu import generate_draft_kernel

        try:
            gens["draft"] = generate_draft_kernel(draft[0], draft[1], cfg, weight_formats)
        except UserError as e:
            draft_skipped = f"no megakernel for the draft step: {e}"
    check_weight_layouts(gens)
    cache = cubin_cache_dir()
    jobs = [(n, False) for n in gens] + ([(n, True) for n in gens if n != "draft"] if profile else [])

    def build(job):
        n, prof = job
        r = build_cubin(gens[n].source, cache, profile=prof)
        if on_step:
            on_step(n, prof)
        return r

    with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
        built = dict(zip(jobs, ex.map(build, jobs)))
    tmp = Path(tmp or tempfile.mkdtemp(prefix="tilert-kernels-"))
    tmp.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    entries: dict[str, Any] = {}
    for n, g in gens.items():
        cubin, report = built[(n, False)]
        gdir = tmp / n
        if gdir.exists():
            shutil.rmtree(gdir)
        g.save(gdir)
        ptxas = tmp / f"{n}.ptxas.txt"
        ptxas.write_text(report.get("raw") or "")
        entry = {"cubin": f"kernels/{n}.cubin", "generated": f"kernels/{n}", "ptxas_log": f"kernels/{n}.ptxas.txt",
                 "ptxas": _ptxas_summary(report), "summary": g.describe(), "notes": list(g.notes),
                 "workers": g.num_workers, "threads": g.threads, "tasks": g.num_tasks, "smem_bytes": g.smem_bytes}
        files[entry["cubin"]] = cubin
        files[entry["generated"]] = gdir
        files[entry["ptxas_log"]] = ptxas
        if (n, True) in built:
            pcubin, preport = built[(n, True)]
            entry["prof_cubin"] = f"kernels/{n}.prof.cubin"
            entry["prof_ptxas"] = _ptxas_summary(preport)
            files[entry["prof_cubin"]] = pcubin
        entries[n] = entry
    from tilert.build import _nvcc_version

    steps = {str(b): entries[f"B{b}"] for b in sorted(schedules)}
    meta = {"arch": "sm_90a", "nvcc": _nvcc_version(nvcc_path()), "profile": profile, "steps": steps,
            "footprint": footprint({b: gens[f"B{b}"] for b in sorted(schedules)}, gpu)}
    if draft is not None:
        meta["draft"] = entries.get("draft")
        meta["draft_skipped"] = draft_skipped
        if "draft" in gens:  # its own KV-cache arena and buffers; the weights it shares are counted once
            own = footprint({"draft": gens["draft"]})
            shared = {w.name for g in gens.values() if g is not gens["draft"] for w in g.weights}
            extra = own["total_bytes"] - own["weights_bytes"] + footprint_weights(
                [w for w in gens["draft"].weights if w.name not in shared])
            meta["footprint"]["draft_bytes"] = extra
            meta["footprint"]["total_bytes"] += extra
            if "fits" in meta["footprint"]:
                meta["footprint"]["fits"] = meta["footprint"]["total_bytes"] <= GPU_MEMORY[gpu]
    return files, meta, None


# ---- running -----------------------------------------------------------------------------------

def check_device(art, need_bytes: int | None = None) -> None:
    """Refuse (UserError) before allocating: no CUDA device, not sm_90, no kernel, too little memory."""
    import torch

    from tilert.artifact import kernel_info

    if not torch.cuda.is_available():
        raise UserError("--backend megakernel needs a CUDA GPU (H100 or H200, sm_90a); torch sees none here "
                        "(use --backend vm)")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if (props.major, props.minor) != (9, 0):
        raise UserError(f"--backend megakernel runs on sm_90 (H100/H200); this GPU is {props.name} "
                        f"(compute capability {props.major}.{props.minor})")
    info = kernel_info(art.meta)
    if info is None:
        why = art.meta.get("kernel_skipped") or "compiled without a kernel"
        raise UserError(f"{art.path}: holds no GPU megakernel ({why}); recompile with nvcc on PATH and "
                        f"without --no-kernel")
    need = need_bytes if need_bytes is not None else int(info["footprint"]["total_bytes"])
    free, _total = torch.cuda.mem_get_info()
    if need > free:
        raise UserError(f"the megakernel needs {need / 1e9:.2f} GB of GPU memory (weights, KV cache, arenas); "
                        f"only {free / 1e9:.2f} GB are free on {props.name}")


def generate_megakernel(art, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                        profile_out: str | None = None, bar=None) -> list[int]:
    """Prefill in chunks of the compiled step sizes, then decode, one megakernel launch a step."""
    from tilert.artifact import load_kernels
    from tilert.cli import prefill_and_decode
    from tilert.gpu import MegakernelRuntime

    kernels = load_kernels(art, profile=profile_out is not None)
    rt = MegakernelRuntime({b: p for b, (p, _) in kernels.items()}, {b: g for b, (_, g) in kernels.items()},
                           {k: v for k, v in art.weights.items() if not k.startswith("draft.")}, art.max_seq_len,
                           profile=profile_out is not None)
    art.weights = None  # the host copies are no longer needed
    last_b = None  # the size of the last step run: the one whose profile is written

    def step(tokens: list[int]) -> list[int]:
        nonlocal last_b
        last_b = len(tokens)
        return rt.step(tokens, temperature, seed)[1]

    out = prefill_and_decode(step, prompt, list(kernels), max_new_tokens, bar)
    if profile_out is not None and last_b is not None:
        write_profile(profile_out, rt.profile(last_b), last_b)
    return out


def write_profile(path: str, rows: list[dict], step: int) -> None:
    import json

    with open(path, "w") as f:
        json.dump({"step": step, "unit": "ns", "rows": rows}, f)


def read_profile(path: str) -> tuple[list[dict], int | None]:
    """Profile rows (task, worker, wait, start, end in ns) from a JSON list or {"rows": [...]}."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--measured {path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--measured {path}: not a readable JSON profile ({e})") from None
    step = doc.get("step") if isinstance(doc, dict) else None
    rows = doc.get("rows") if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not rows:
        raise UserError(f"--measured {path}: expected a list of profile rows (task, worker, wait, start, end)")
    out = []
    for i, r in enumerate(rows):
        try:
            row = {k: int(r[k]) for k in ("task", "worker", "start", "end")}
            row["wait"] = int(r.get("wait", r["start"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"--measured {path}: row {i} lacks an integer task, worker, start or end") from None
        if row["end"] < row["start"] or not math.isfinite(row["end"]):
            raise UserError(f"--measured {path}: row {i} ends before it starts")
        row["name"] = r.get("name") if isinstance(r, dict) else None
        out.append(row)
    return out, (int(step) if isinstance(step, int) else None)

