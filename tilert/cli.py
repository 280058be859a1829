"""The `tilert` command line: synth, compile, inspect, run.

Every UserError (bad input the user can fix) prints `tilert: error: <message>` on stderr and
exits with status 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import tilert
from tilert.errors import UserError

PRESET_HELP = "mimo-tiny, mimo-v2-flash, mimo-v2.5-pro"
DEFAULT_STEPS = (1, 8)
DEFAULT_MAX_SEQ_LEN = 4096
# The embedded default's prompt (token ids: the synthetic model has no tokenizer).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "model" / "pretrained" / "mimo-tiny-py"
DEFAULT_PROMPT = "class Stack:\n    def __init__(self):\n"


def _progress() -> bool:
    """Progress bars on stderr when it is a terminal (never in logs or tests)."""
    return sys.stderr.isatty() and not os.environ.get("TILERT_NO_PROGRESS")


def _bar(**kw):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=not _progress(), leave=False, **kw)


# ---- helpers ------------------------------------------------------------------------------------

def _parse_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"{what} {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not vals:
        raise UserError(f"{what}: no values given")
    return vals


def _preset_names() -> list[str]:
    from model.config import PRESETS

    return list(PRESETS)


def _config_name(cfg) -> str | None:
    """The preset whose geometry `cfg` has (its layer count aside): picks the schedule recipe."""
    from model.config import PRESETS

    skip = {"layer_types", "mlp_layer_types", "max_position_embeddings", "bos_token_id", "eos_token_id"}
    mine = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    for name, make in PRESETS.items():
        other = {k: v for k, v in make().to_dict().items() if k not in skip}
        if mine == other:
            return name
    return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---- synth ---------------------------------------------------------------------------------------

def cmd_synth(args) -> int:
    from model.checkpoint import write_synthetic
    from model.config import preset

    cfg = preset(args.preset, args.layers)
    write_synthetic(cfg, args.out, args.seed)
    print(f"wrote a synthetic {args.preset} checkpoint ({cfg.num_hidden_layers} layers, seed {args.seed}) "
          f"to {args.out}", file=sys.stderr)
    return 0


# ---- compile -------------------------------------------------------------------------------------

def _load_draft(path: str, cfg):
    """(DFlashConfig, weights, config dict) of the drafter at `path`, checked against the target."""
    try:
        from model.dflash_checkpoint import drafter_config_to_dict, load_drafter
    except ImportError:
        raise UserError(f"--draft {path}: loading a DFlash drafter is not supported yet") from None
    if not Path(path).is_dir():
        raise UserError(f"--draft {path}: not a directory")
    try:
        dcfg, weights = load_drafter(path)
    except ValueError as e:  # an invalid DFlashConfig
        raise UserError(f"--draft {path}: {e}") from None
    problems = []
    if dcfg.hidden_size != cfg.hidden_size:
        problems.append(f"hidden size {dcfg.hidden_size} != the target's {cfg.hidden_size}")
    if dcfg.vocab_size != cfg.vocab_size:
        problems.append(f"vocabulary {dcfg.vocab_size} != the target's {cfg.vocab_size}")
    bad = [layer for layer in dcfg.target_layers if not 0 <= layer < cfg.num_hidden_layers]
    if bad:
        problems.append(f"target layers {bad} are not layers of the {cfg.num_hidden_layers}-layer target")
    if problems:
        raise UserError(f"--draft {path}: the drafter does not fit this model: " + "; ".join(problems))
    return dcfg, weights, drafter_config_to_dict(dcfg)


def compile_artifact(model: str, out: str | Path, gpu: str = "h100", max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                     steps=DEFAULT_STEPS, schedule_only: bool = False, quantize_experts: str | None = None,
                     layers: int | None = None, seed: int = 0, force: bool = False, draft: str | None = None,
                     log=None, kernel: bool = True, profile_kernel: bool = False, gpus: int = 1) -> Path:
    """`tilert compile`: a model directory or preset name -> an artifact directory.  With `kernel`
    (the default) the GPU megakernel of every step size is generated and built with nvcc into
    kernels/; without nvcc the artifact records `kernel: null` and why (one warning line).
    `gpus` > 1 splits the model over that many GPUs (tilert/cli_multi.py)."""
    from model.checkpoint import load_checkpoint, write_synthetic
    from model.config import PRESETS, load_config, preset
    from model.weights import expected_tensors, stored_nbytes
    from tilert.artifact import DRAFT_PREFIX, check_output_dir, gc_paused, write_artifact
    from tilert.compiler import compile_step
    from tilert.cost import GPUS
    from tilert.layout import runtime_weights
    from tilert.lower import load_recipe

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    check_output_dir(out, force)  # before any long work
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown GPU; known: {', '.join(GPUS)}")
    steps = sorted({int(s) for s in steps})
    if any(s < 1 for s in steps):
        raise UserError(f"--steps {steps}: step sizes must be positive")
    if 1 not in steps:
        raise UserError(f"--steps {','.join(map(str, steps))}: must include 1 (the decode step)")
    if max_seq_len < max(steps):
        raise UserError(f"--max-seq-len {max_seq_len}: must be at least the largest step size {max(steps)}")
    if gpus != 1:
        from tilert.cli_multi import check_gpus

        check_gpus(model, layers, gpus, gpu, draft, profile_kernel)

    tokenizer = None
    weights = None
    with tempfile.TemporaryDirectory(prefix="tilert-synth-") as tmp:
        model_dir = Path(model)
        if model_dir.is_dir():
            if schedule_only:
                cfg = load_config(model_dir)
                if layers:
                    cfg = cfg.with_layers(layers)
            else:
                cfg, weights = load_checkpoint(model_dir, layers)
            name = _config_name(cfg)
            source = str(model_dir.resolve())
            if (model_dir / "tokenizer.json").is_file():
                tokenizer = model_dir / "tokenizer.json"
        elif model in PRESETS:
            cfg = preset(model, layers)
            name = model
            source = f"preset:{model}"
            if not schedule_only:
                need = sum(stored_nbytes(s.fmt, s.shape) for s in expected_tensors(cfg))
                mem = _memory_bytes()
                if mem is not None and 2 * need > mem:
                    raise UserError(
                        f"--model {model}: synthetic weights would take {_fmt_bytes(need)}, more than this "
                        f"machine can hold; pass --schedule-only, or fewer --layers")
                synth_dir = Path(tmp) / model
                log(f"synthesizing {model} weights (seed {seed})")
                write_synthetic(cfg, synth_dir, seed)
                cfg, weights = load_checkpoint(synth_dir)
                source = f"preset:{model} (synthetic, seed {seed})"
        else:
            raise UserError(f"--model {model}: not a model directory nor a known preset "
                            f"({', '.join(PRESETS)})")
        if max_seq_len > cfg.max_position_embeddings:
            raise UserError(f"--max-seq-len {max_seq_len}: exceeds the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
        if quantize_experts:
            if quantize_experts not in ("mxfp4", "fp8"):
                raise UserError(f"--quantize-experts {quantize_experts}: supported formats are mxfp4 and fp8")
            cfg = dataclasses.replace(cfg, expert_format=quantize_experts)
        draft_info = None
        if draft:
            draft_info = _load_draft(draft, cfg)
            steps = sorted(set(steps) | {draft_info[0].block_size})  # the verification step
        if max_seq_len < max(steps):
            raise UserError(f"--max-seq-len {max_seq_len}: must be at least the largest step size {max(steps)}")

        recipe = load_recipe(name, gpu)
        if gpus != 1:
            from tilert.cli_multi import compile_multi

            meta = {"gpu": gpu, "max_seq_len": max_seq_len, "recipe": recipe, "source": source, "model_name": name,
                    "seed": seed if source.startswith("preset:") and weights is not None else None,
                    "quantize_experts": quantize_experts, "draft": None}
            return compile_multi(out, cfg, weights, recipe, gpus, steps, max_seq_len, gpu, meta, quantize_experts,
                                 tokenizer, force, log)
        schedules = {}
        # With a drafter, every target step also outputs the hidden states it is conditioned on.
        capture = draft_info[0].target_layers if draft_info else ()
        t0 = time.perf_counter()
        with _bar(total=len(steps), desc="compiling", unit="step") as bar, gc_paused():
            for b in steps:
                schedules[b] = compile_step(
                    cfg, recipe, tokens=b, max_seq_len=max_seq_len, max_tokens=max(steps), gpu=gpu,
                    on_phase=lambda phase, b=b: bar.set_postfix_str(f"{b}-token step: {phase}"),
                    capture_layers=capture)
                bar.update()
        log(f"compiled {cfg.num_hidden_layers}-layer {name or cfg.model_type} for {gpu}: steps "
            + ", ".join(f"{b} ({len(schedules[b].graph.tasks)} tasks)" for b in steps)
            + f" in {time.perf_counter() - t0:.1f} s")
        draft_schedule = None
        if draft_info is not None:
            from tilert.draft import compile_draft_step

            formats = {n: t.fmt for n, t in weights.items()} if weights is not None else None
            # A draft step appends up to B committed positions to the drafter's context (a verify
            # step commits at most B; a longer prompt chunk takes several draft steps): the GPU
            # kernel runs the context path over the block's B rows.
            with gc_paused():
                draft_schedule = compile_draft_step(draft_info[0], recipe, max_seq_len,
                                                    context_rows=draft_info[0].block_size,
                                                    gpu=gpu, weight_formats=formats)
            log(f"compiled the DFlash draft step (block {draft_info[0].block_size}, "
                f"{draft_info[0].num_layers} layers): {len(draft_schedule.graph.tasks)} tasks")

        rw = None
        if weights is not None:
            rw = runtime_weights(cfg, weights, quantize_experts, progress=_progress())
            del weights
            if draft_info is not None:
                rw.update({f"{DRAFT_PREFIX}{k}": v for k, v in draft_info[1].items()})

        kernel_files, kernel_meta, kernel_skipped = {}, None, "--no-kernel"
        if kernel and draft_info is not None:
            from tilert.build import nvcc_path
            from tilert.draft import kinds_without_gpu_kernel

            missing = kinds_without_gpu_kernel({**schedules, 0: draft_schedule}) if nvcc_path() else []
            if missing:
                kernel = False
                kernel_skipped = (f"the GPU megakernel has no kernel yet for task kind(s) {', '.join(missing)} "
                                  f"that a drafter's target steps use; compile without --draft for a megakernel")
                log(f"warning: no GPU megakernel in the artifact: {kernel_skipped}")
        if kernel:
            from tilert.megakernel import build_kernels

            # The kernel needs the weights' storage formats only (schedule-only: those the
            # schedule declares).
            formats = None if rw is None else {n: t.fmt for n, t in rw.items()}
            t0 = time.perf_counter()
            n_builds = len(steps) * (2 if profile_kernel else 1) + (draft_info is not None)
            with _bar(total=n_builds, desc="building kernel", unit="cubin") as bar:
                kernel_files, kernel_meta, kernel_skipped = build_kernels(
                    schedules, cfg, formats, gpu, profile=profile_kernel, tmp=Path(tmp) / "kernels",
                    on_step=lambda b, prof: bar.update(),
                    draft=(draft_schedule, draft_info[0]) if draft_info is not None else None)
            if kernel_meta is None:
                log(f"warning: no GPU megakernel in the artifact: {kernel_skipped}")
            else:
                log(f"built the megakernel for steps {', '.join(map(str, steps))}: " + "; ".join(
                    f"B={b} {e['ptxas']['registers']} registers, {e['ptxas']['spills']} B spills"
                    for b, e in kernel_meta["steps"].items()) + f" in {time.perf_counter() - t0:.1f} s")
                if kernel_meta.get("draft"):
                    e = kernel_meta["draft"]
                    log(f"built the draft step's megakernel: {e['ptxas']['registers']} registers, "
                        f"{e['ptxas']['spills']} B spills")
                elif kernel_meta.get("draft_skipped"):
                    log(f"warning: {kernel_meta['draft_skipped']} (speculative decoding on the GPU needs it)")
        meta = {
            "gpu": gpu,
            "max_seq_len": max_seq_len,
            "recipe": recipe,
            "source": source,
            "model_name": name,
            "seed": seed if source.startswith("preset:") and rw is not None else None,
            "quantize_experts": quantize_experts,
            "draft": {"path": str(Path(draft).resolve()), "config": draft_info[2],
                      "context_rows": draft_info[0].block_size} if draft_info else None,
            "kernel": kernel_meta,
            "kernel_skipped": kernel_skipped if kernel_meta is None else None,
        }
        path = write_artifact(out, cfg, schedules, rw, meta, tokenizer=tokenizer, force=force,
                              progress=_progress(), extra_files=kernel_files, draft_schedule=draft_schedule)
    log(f"wrote {path}" + (" (schedule only)" if rw is None else ""))
    return path


def cmd_compile(args) -> int:
    compile_artifact(args.model, args.out, gpu=args.gpu, max_seq_len=args.max_seq_len,
                     steps=_parse_ints(args.steps, "--steps"), schedule_only=args.schedule_only,
                     quantize_experts=args.quantize_experts, layers=args.layers, seed=args.seed,
                     force=args.force, draft=args.draft, kernel=not args.no_kernel,
                     profile_kernel=args.profile_kernel, gpus=args.gpus)
    return 0


# ---- inspect -------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from tilert import inspect as tinspect
    from tilert.artifact import read_artifact, read_metadata
    from tilert.artifact_multi import is_multi_artifact
    from tilert.cli_multi import refuse_rank_dir

    if is_multi_artifact(args.artifact):
        from tilert.inspect_multi import cmd_inspect_multi

        return cmd_inspect_multi(args)
    meta = read_metadata(args.artifact)
    refuse_rank_dir(Path(args.artifact), meta)
    compiled = sorted(int(b) for b in meta.get("steps") or [])
    if args.speculative:
        return _inspect_speculative(args, meta)
    step = args.step if args.step is not None else (compiled[0] if compiled else 1)
    if step not in compiled:
        raise UserError(f"--step {step}: the artifact has schedules for steps {compiled}")
    art = read_artifact(args.artifact, load_weights=False, steps=[step])
    gpu = args.gpu or art.gpu
    summary = tinspect.summarize(art, step, gpu)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(tinspect.format_report(summary, top_ops=args.top))
    if args.measured and not args.trace:
        raise UserError("--measured goes with --trace FILE (it adds the measured timeline to the trace)")
    if args.trace:
        tinspect.write_trace(art, step, gpu, args.trace, measured=args.measured)
        print(f"wrote trace {args.trace} (open it in https://ui.perfetto.dev or chrome://tracing)",
              file=sys.stderr)
    if args.plot:
        tinspect.plot_timeline(art, step, gpu, args.plot)
        print(f"wrote plot {args.plot}", file=sys.stderr)
    return 0


def _inspect_speculative(args, meta: dict) -> int:
    """`inspect --speculative`: the draft step's and the verify step's reports."""
    from tilert import inspect as tinspect
    from tilert.artifact import read_artifact

    if args.step is not None or args.trace or args.plot or args.measured:
        raise UserError("--speculative shows the draft and verify steps; it does not combine with --step, "
                        "--trace, --plot or --measured")
    draft = meta.get("draft")
    if not draft:
        raise UserError(f"{args.artifact}: compiled without a DFlash drafter; recompile with --draft DIR")
    try:
        B = int(draft["config"]["block_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{args.artifact}: corrupt artifact metadata ({type(e).__name__}: {e})") from None
    art = read_artifact(args.artifact, load_weights=False, steps=[B])
    if art.draft_schedule is None or B not in art.schedules:
        raise UserError(f"{args.artifact}: holds no draft schedule (compiled by an older tilert); recompile "
                        f"with --draft DIR")
    gpu = args.gpu or art.gpu
    summaries = {
        "draft": tinspect.summarize(art, B, gpu, schedule=art.draft_schedule,
                                    label=f"DFlash draft step (block of {B}: {B - 1} drafts)"),
        "verify": tinspect.summarize(art, B, gpu, label=f"verify step ({B} tokens: the last one and {B - 1} drafts)"),
    }
    if args.json:
        print(json.dumps(summaries, indent=1))
    else:
        print("\n\n".join(tinspect.format_report(sm, top_ops=args.top) for sm in summaries.values()))
    return 0


# ---- run -----------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    if os.environ.get("TILERT_CACHE"):
        return Path(os.environ["TILERT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tilert"


def default_artifact(log=None) -> Path:
    """The embedded default: the tiny MiMo pair the repository carries (a target trained on the
    Python standard library's source and its DFlash drafter, made by tools/train_tiny.py),
    compiled once and cached."""
    from tilert.artifact import read_artifact

    log = log or (lambda msg: print(msg, file=sys.stderr))
    # Keyed on the carried checkpoint's provenance too: a retrained pair gets a fresh artifact.
    stamp = hashlib.sha256((DEFAULT_MODEL / "provenance.json").read_bytes()).hexdigest()[:12]
    path = default_cache_dir() / f"{DEFAULT_MODEL.name}-{tilert.__version__}-{stamp}"
    if path.exists():
        try:
            art = read_artifact(path, load_weights=False)
            # (An artifact cached before the draft schedule existed is recompiled.)
            if art.meta.get("source") == str(DEFAULT_MODEL) and not art.schedule_only and art.draft_schedule:
                return path
        except UserError as e:
            log(f"cached default artifact is unusable ({e}); recompiling")
        shutil.rmtree(path, ignore_errors=True)
    log(f"compiling the embedded default ({DEFAULT_MODEL.name}) into {path}")
    compile_artifact(str(DEFAULT_MODEL), path, draft=str(DEFAULT_MODEL / "draft"), log=log)
    return path


def reference_weights(cfg, runtime: dict) -> dict:
    """The runtime layout back in canonical names: stacked experts split per expert."""
    from model.weights import StoredTensor
    from tilert.artifact import DRAFT_PREFIX
    from tilert.layout import EXPERT_PROJS
    from tilert.lower import stacked_expert_name

    stacked = {stacked_expert_name(i, p): (i, p) for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)
               for p in EXPERT_PROJS}
    out = {}
    for name, t in runtime.items():
        if name in stacked:
            layer, proj = stacked[name]
            for e in range(t.shape[0]):
                out[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = StoredTensor(
                    t.fmt, tuple(t.shape[1:]), t.data[e], None if t.scale is None else t.scale[e])
        elif not name.startswith(DRAFT_PREFIX):
            out[name] = t
    return out


def chunks(n: int, steps: list[int]) -> list[int]:
    """Step sizes covering n prompt tokens, largest first (e.g. 8, 8, 1, 1 for 18 with {1, 8})."""
    out = []
    for b in sorted(steps, reverse=True):
        while n >= b:
            out.append(b)
            n -= b
    if n:
        raise UserError(f"cannot split a prompt into the compiled step sizes {sorted(steps)}")
    return out


def prefill_and_decode(step, prompt: list[int], step_sizes: list[int], max_new_tokens: int, bar=None) -> list[int]:
    """The prompt in chunks of the step sizes, then max_new_tokens new tokens one step each (the
    last one chosen needs no step of its own).  step(tokens) runs one step and returns the
    tokens it chose; bar (optional) advances a token at a time."""
    pos, token = 0, None
    for b in chunks(len(prompt), step_sizes):
        token = step(prompt[pos:pos + b])[-1]
        pos += b
        if bar is not None:
            bar.update(b)
    out: list[int] = []
    while len(out) < max_new_tokens:
        out.append(token)
        if bar is not None:
            bar.update()
        if len(out) < max_new_tokens:
            token = step([token])[0]
    return out


def generate_vm(art, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                interleave: int | None = None, vm=None) -> list[int]:
    """Generate on the VM (`vm`: another VM with the same step interface, e.g. the multi-GPU one)."""
    from tilert.vm import VM

    vm = vm or VM(art.cfg, art.schedules, art.weights, art.max_seq_len)
    with _bar(total=len(prompt) + max_new_tokens, desc="generating", unit="tok") as bar:
        return prefill_and_decode(lambda tokens: vm.step(tokens, temperature, seed, interleave)[1], prompt,
                                  list(vm.schedules), max_new_tokens, bar)


def generate_reference(art, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                       seed: int = 0) -> list[int]:
    import torch

    from model.reference import ReferenceDecoder, generate

    weights = reference_weights(art.cfg, art.weights)
    dec = ReferenceDecoder(art.cfg, weights, torch.float32, max_seq_len=min(art.max_seq_len,
                                                                            len(prompt) + max_new_tokens))
    # A toy model's ops are tiny: intra-op threads only add synchronisation (much slower on a
    # busy machine).  Real sizes keep torch's threads.
    threads = torch.get_num_threads()
    if art.cfg.hidden_size < 1024:
        torch.set_num_threads(1)
    try:
        return generate(dec, prompt, max_new_tokens, temperature, seed)
    finally:
        torch.set_num_threads(threads)


def generate_speculative(art, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                         backend: str = "vm", interleave: int | None = None):
    """`run --speculative`: DFlash draft + verify rounds (tilert/speculative.py) on the VM or the
    reference; the same tokens as plain decoding.  Returns the SpecResult."""
    import torch

    from tilert.spec_backends import MegakernelBackend, ReferenceBackend, VMBackend
    from tilert.speculative import speculative_generate

    if backend == "vm":
        be = VMBackend.from_artifact(art, interleave)
    elif backend == "megakernel":
        from tilert.megakernel import check_device

        check_device(art)
        be = MegakernelBackend.from_artifact(art)
        art.weights = None  # the host copies are no longer needed
    else:
        # Caches sized for this run (as generate_reference), with room for the last verify block.
        B = int((art.draft_config or {}).get("block_size", 1))
        be = ReferenceBackend.from_artifact(art, min(art.max_seq_len, len(prompt) + max_new_tokens + B))
    threads = torch.get_num_threads()
    if art.cfg.hidden_size < 1024:  # as generate_reference: tiny ops run faster on one thread
        torch.set_num_threads(1)
    try:
        with _bar(total=max_new_tokens, desc="generating", unit="tok") as bar:
            return speculative_generate(be, prompt, max_new_tokens, temperature, seed,
                                        on_round=lambda n: bar.update(n))
    finally:
        torch.set_num_threads(threads)


def _tokenizer(path: Path):
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- the tokenizers library raises its own exception types
        raise UserError(f"{path}: not a readable tokenizer ({e})") from None


def cmd_run(args) -> int:
    from tilert.artifact import TOKENIZER_FILE, read_artifact, read_metadata
    from tilert.artifact_multi import is_multi_artifact, read_manifest, read_multi_artifact
    from tilert.cli_multi import refuse_megakernel, refuse_rank_dir

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be >= 0")
    if args.prompt is not None and args.prompt_ids is not None:
        raise UserError("give --prompt or --prompt-ids, not both")
    if args.interleave is not None and args.backend != "vm":
        raise UserError("--interleave only applies to --backend vm")
    if args.profile_out is not None and args.backend != "megakernel":
        raise UserError("--profile-out only applies to --backend megakernel")
    if args.backend == "ops" and (args.speculative or args.temperature != 0.0):
        raise UserError("--backend ops (the op-by-op TileLang baseline) decodes greedily without a drafter: "
                        "drop --speculative and --temperature")
    if args.ops_kernels is not None and args.backend != "ops":
        raise UserError("--ops-kernels only applies to --backend ops")
    if args.speculative and args.profile_out is not None:
        raise UserError("--profile-out profiles plain decode steps; it does not combine with --speculative")
    path = Path(args.artifact) if args.artifact else default_artifact()
    # Everything that can be refused from metadata.json alone is, before reading weights.
    multi = is_multi_artifact(path)  # split over GPUs: manifest.json stands for metadata.json
    meta = read_manifest(path) if multi else read_metadata(path)
    refuse_rank_dir(path, meta)
    if meta.get("schedule_only"):
        raise UserError(f"{path}: compiled with --schedule-only, it holds no weights to run; recompile "
                        f"without --schedule-only")
    if args.speculative and not meta.get("draft"):
        raise UserError(f"{path}: compiled without a DFlash drafter; --speculative needs one: recompile with "
                        f"--draft DIR")
    try:
        max_seq_len, vocab = int(meta["max_seq_len"]), int(meta["config"]["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: corrupt artifact metadata ({type(e).__name__}: {e})") from None
    tok = _tokenizer(path / TOKENIZER_FILE)
    if args.prompt_ids is not None:
        prompt = _parse_ints(args.prompt_ids, "--prompt-ids")
    elif args.prompt is not None:
        if tok is None:
            raise UserError(f"{path}: the artifact has no tokenizer.json to encode --prompt; "
                            f"pass token ids with --prompt-ids 1,2,3")
        prompt = tok.encode(args.prompt).ids
        if not prompt:
            raise UserError("--prompt encodes to no tokens")
    elif not args.artifact and tok is not None:
        prompt = tok.encode(DEFAULT_PROMPT).ids
    else:
        raise UserError("no prompt: pass --prompt TEXT or --prompt-ids 1,2,3")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    total = len(prompt) + args.max_new_tokens
    if total > max_seq_len:
        raise UserError(f"prompt ({len(prompt)} tokens) + --max-new-tokens {args.max_new_tokens} = {total} tokens "
                        f"exceeds the artifact's max sequence length {max_seq_len}; recompile with a larger "
                        f"--max-seq-len")
    if args.backend == "megakernel" and multi:
        refuse_megakernel(meta)
    if args.backend == "ops" and multi:
        raise UserError(f"{path}: split over {meta.get('gpus', '?')} GPUs; --backend ops runs one-GPU artifacts")
    if args.backend == "ops":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--backend ops runs on a CUDA GPU (H100 / H200); none is visible here")
    if args.backend == "megakernel" and args.speculative and not multi:
        from tilert.artifact import kernel_info

        info = kernel_info(meta) or {}
        if not info.get("draft"):
            why = info.get("draft_skipped") or meta.get("kernel_skipped") or "compiled without it"
            raise UserError(f"{path}: holds no GPU megakernel for the draft step ({why}); --speculative "
                            f"--backend megakernel needs one: recompile with --draft DIR on a machine with nvcc")
    if args.backend == "megakernel":
        from tilert.artifact import kernel_info
        from tilert.megakernel import check_device

        # Refused before reading weights or allocating anything on the GPU.
        check_device(read_artifact(path, load_weights=False, steps=[1]))
        if args.profile_out is not None and not (kernel_info(meta) or {}).get("profile"):
            raise UserError(f"{path}: holds no profiling kernel for --profile-out; recompile with --profile-kernel")
    art = read_multi_artifact(path) if multi else read_artifact(path, load_weights=True, progress=_progress())

    t0 = time.perf_counter()
    if args.speculative:
        spec = generate_speculative(art, prompt, args.max_new_tokens, args.temperature, args.seed, args.backend,
                                    args.interleave)
        new = spec.tokens
    elif args.backend == "megakernel":
        from tilert.megakernel import generate_megakernel

        with _bar(total=len(prompt) + args.max_new_tokens, desc="generating", unit="tok") as bar:
            new = generate_megakernel(art, prompt, args.max_new_tokens, args.temperature, args.seed,
                                      profile_out=args.profile_out, bar=bar)
        if args.profile_out:
            print(f"wrote the last step's profile to {args.profile_out}", file=sys.stderr)
    elif args.backend == "ops":
        from tilert.ops_backend import generate_ops

        with _bar(total=len(prompt) + args.max_new_tokens, desc="generating", unit="tok") as bar:
            new = generate_ops(art, prompt, args.max_new_tokens, args.ops_kernels, bar=bar)
    elif args.backend == "vm":
        new = generate_vm(art, prompt, args.max_new_tokens, args.temperature, args.seed, args.interleave,
                          vm=art.vm() if multi else None)
    else:
        new = generate_reference(art, prompt, args.max_new_tokens, args.temperature, args.seed)
    elapsed = time.perf_counter() - t0
    text = tok.decode(new) if tok is not None else " ".join(str(t) for t in new)
    rate = len(new) / elapsed if elapsed > 0 else 0.0
    if args.json:
        out = {"tokens": new, "text": text, "tokens_per_s": rate, "backend": args.backend,
               "prompt_tokens": len(prompt), "seconds": elapsed, "artifact": str(path)}
        if args.speculative:
            # accepted_per_round: tokens each round committed (accepted drafts + the target's own);
            # acceptance_length is their mean.
            out.update({"accepted_per_round": spec.commits, "acceptance_length": spec.acceptance_length,
                        "rounds": spec.rounds})
        print(json.dumps(out))
    else:
        print(text)
        if args.speculative:
            B = int(meta["draft"]["config"]["block_size"])
            print(f"[{args.backend}, speculative] accepted per round: {' '.join(map(str, spec.commits))}",
                  file=sys.stderr)
            print(f"[{args.backend}, speculative] acceptance length {spec.acceptance_length:.2f} tokens per round "
                  f"over {spec.rounds} rounds (block {B})", file=sys.stderr)
        print(f"[{args.backend}{', speculative' if args.speculative else ''}] {len(prompt)} prompt tokens, "
              f"{len(new)} new tokens in {elapsed:.2f} s ({rate:.1f} tokens/s)", file=sys.stderr)
    return 0


# ---- argument parsing ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tilert", description=tilert.__doc__)
    p.add_argument("--version", action="version", version=f"tilert {tilert.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write a synthetic (random) checkpoint of a preset")
    s.add_argument("--preset", required=True, help=PRESET_HELP)
    s.add_argument("--out", required=True, help="checkpoint directory to create")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layers", type=int, help="keep only the first N layers")
    s.set_defaults(func=cmd_synth)

    c = sub.add_parser("compile", help="compile a model into an artifact directory")
    c.add_argument("--model", required=True, help=f"checkpoint directory, or a preset ({PRESET_HELP})")
    c.add_argument("--out", required=True, help="artifact directory to create")
    c.add_argument("--gpu", default="h100", help="target GPU: h100 or h200 (default h100)")
    c.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help=f"longest sequence the KV cache holds (default {DEFAULT_MAX_SEQ_LEN})")
    c.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)),
                   help="tokens per step to compile, comma-separated (default 1,8; 1 is required)")
    c.add_argument("--draft", help="DFlash drafter checkpoint directory")
    c.add_argument("--schedule-only", action="store_true", help="schedules and metadata only, no weights")
    c.add_argument("--quantize-experts", choices=["mxfp4", "fp8"], help="re-store the routed experts in this format")
    c.add_argument("--layers", type=int, help="keep only the first N layers")
    c.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights of a preset (default 0)")
    c.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    c.add_argument("--no-kernel", action="store_true", help="skip generating and building the GPU megakernel")
    c.add_argument("--profile-kernel", action="store_true",
                   help="also build profiling cubins (kernels/B{n}.prof.cubin) for run --profile-out")
    c.add_argument("--gpus", type=int, default=1,
                   help="split the model over N GPUs: one artifact per rank under OUT/rank{r}/ (default 1)")
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", help="tables and estimates of a compiled artifact")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace of the simulated step")
    i.add_argument("--measured", metavar="PROFILE.json",
                   help="with --trace: add the measured timeline (tilert run --profile-out) beside the simulated one")
    i.add_argument("--plot", metavar="FILE.png", help="draw the per-worker timeline (needs matplotlib)")
    i.add_argument("--step", type=int, help="which step size to inspect (default: the smallest, decode)")
    i.add_argument("--gpu", help="estimate for this GPU instead of the artifact's target")
    i.add_argument("--top", type=int, default=30, help="ops listed in the table, costliest first (0: all)")
    i.add_argument("--speculative", action="store_true",
                   help="the DFlash draft step's and the verify step's reports (compile --draft)")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="generate tokens with a compiled artifact")
    r.add_argument("artifact", nargs="?", help="artifact directory (default: the embedded mimo-tiny model)")
    r.add_argument("--prompt", help="prompt text (needs the artifact's tokenizer.json)")
    r.add_argument("--prompt-ids", help="prompt as token ids, e.g. 1,2,3")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--backend", choices=["vm", "reference", "megakernel", "ops"], default="vm",
                   help="vm (CPU), reference (PyTorch decoder), megakernel (the artifact's cubins on an H100/H200), "
                        "ops (the op-by-op TileLang baseline on an H100/H200: one kernel per op, a CUDA graph; greedy)")
    r.add_argument("--ops-kernels", metavar="DIR",
                   help="ops only: the baseline's built kernels (tools/build_ops_kernels.py; default: built into "
                        "~/.cache/tilert/ops-kernels where TileLang is installed)")
    r.add_argument("--profile-out", metavar="FILE",
                   help="megakernel only: write the last step's per-task profile (needs compile --profile-kernel)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--seed", type=int, default=0, help="sampling seed")
    r.add_argument("--json", action="store_true", help="print {tokens, text, tokens_per_s, ...}")
    r.add_argument("--interleave", type=int, metavar="SEED",
                   help="VM only: run the workers in an adversarial order drawn from SEED")
    r.add_argument("--speculative", action="store_true",
                   help="DFlash speculative decoding (needs compile --draft): the same tokens, fewer target "
                        "steps; prints the tokens accepted per round and the acceptance length")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except UserError as e:
        print(f"tilert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tilert: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tilert inspect A | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
