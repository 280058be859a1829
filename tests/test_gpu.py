"""The megakernel on a real Hopper GPU against the VM (skipped without CUDA).

Order matters for whoever debugs on a short lease: the per-task prefix diff comes first and
names the first task whose output differs from the VM, then the long generation runs.
"""

from __future__ import annotations

import contextlib

import copy
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint, write_synthetic
from model.config import preset
from tilert import codegen
from tilert.codegen import generate
from tilert.compiler import compile_steps
from tilert.diff import compare, first_divergence, vm_prefix  # noqa: F401
from tilert.errors import HangError, UserError
from tilert.layout import runtime_weights
from tilert.lower import load_recipe
from tilert.vm import VM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (H100 / H200, sm_90a)")

BUILD_DIR = Path(__file__).resolve().parent.parent / "build" / "cubins"
MAX_SEQ = 320
STEPS = 256
# Kernel variants of mimo-tiny: the loader ring (tiled weights on the tensor cores); direct
# 16-byte loads (row-major, CUDA cores); a ring of 256-byte slots, too small for a step block, so
# every weight stays row-major and every tile is cut into many pieces (ring wrap-around, rows
# reduced across warps); 1 KiB slots, one step block each, so tiled rows of two or more steps are
# cut into chunks (partial sums carried over a row block's pieces); attention on the path the
# codegen does not take by default (tensor cores or CUDA cores).
VARIANTS = {"loader": {}, "direct": {"loader": False}, "small-slots": {"slot_bytes": 256},
            "step-chunks": {"slot_bytes": 1024}, "other-attention": {"attention_mma": not codegen.ATTENTION_MMA}}


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = preset("mimo-tiny")
    path = tmp_path_factory.mktemp("tiny-ckpt")
    write_synthetic(cfg, path, seed=5)  # hub formats: fp8 projections and experts, bf16, fp32 router
    cfg, weights = load_checkpoint(path)
    schedules = compile_steps(cfg, load_recipe("mimo-tiny", "h100"), [1, 8], max_seq_len=MAX_SEQ)
    return cfg, schedules, runtime_weights(cfg, weights)


def make_runtime(cfg, schedules, weights, timeout_s=2.0, max_seq=MAX_SEQ, **gen_kw):
    from tilert.build import build_cubin
    from tilert.gpu import MegakernelRuntime

    formats = {n: t.fmt for n, t in weights.items()}
    gens = {B: generate(s, cfg, formats, **gen_kw) for B, s in schedules.items()}
    with ThreadPoolExecutor(len(gens)) as ex:  # nvcc runs in parallel
        built = dict(zip(gens, ex.map(lambda g: build_cubin(g.source, BUILD_DIR), gens.values())))
    for B, (_, rep) in built.items():
        print(f"B={B} {gen_kw}: {rep['registers']} regs, {rep['spills']} B spills; {gens[B].describe()}")
    return MegakernelRuntime({B: p for B, (p, _) in built.items()}, gens, weights, max_seq, timeout_s=timeout_s)


@pytest.fixture(scope="module", params=list(VARIANTS))
def runtime(tiny, request):
    cfg, schedules, weights = tiny
    return make_runtime(cfg, schedules, weights, **VARIANTS[request.param])


# ---- diff: a prefix of tasks on both sides ----------------------------------------------------------

# vm_prefix, compare and first_divergence live in tilert/diff.py (shared with tools/diff_step.py).


def test_every_task_prefix_matches_the_vm(tiny, runtime):
    cfg, schedules, weights = tiny
    vm = VM(cfg, schedules, weights, MAX_SEQ)
    runtime.reset()
    for B, tokens in ((8, [1, 5, 9, 13, 17, 21, 25, 29]), (1, [7])):
        problem = first_divergence(runtime, vm, tokens)
        assert problem is None, f"B={B}: {problem}"
        vm.step(tokens)  # advance both sides identically
        runtime.seq_len = vm.seq_len


# ---- whole steps ------------------------------------------------------------------------------------

def test_greedy_generation_matches_the_vm(tiny, runtime):
    """A B=8 prefill step, then 256 greedy decode steps: the sliding-window ring wraps many
    times and the global layers see 264 positions."""
    cfg, schedules, weights = tiny
    vm = VM(cfg, schedules, weights, MAX_SEQ)
    runtime.reset()
    prompt = [1, 17, 300, 5, 42, 7, 99, 100]
    ref_logits, ref_next = vm.step(prompt)
    logits, nxt = runtime.step(prompt, poison=True)
    assert nxt == ref_next and rel_err(logits, ref_logits) < 1e-3
    tok, worst, t_gpu = nxt[-1], 0.0, 0.0
    for i in range(STEPS):
        ref_logits, ref_next = vm.step([tok])
        t0 = time.perf_counter()
        logits, nxt = runtime.step([tok])
        t_gpu += time.perf_counter() - t0
        err = rel_err(logits, ref_logits)
        worst = max(worst, err)
        assert nxt == ref_next, f"decode step {i}: GPU chose {nxt}, VM {ref_next} (logits rel err {err:.3g})"
        assert err < 1e-3, f"decode step {i}: logits rel err {err:.3g}"
        tok = nxt[0]
    print(f"256 greedy steps: worst logits rel err {worst:.3g}; {1e3 * t_gpu / STEPS:.3f} ms per step incl. sync")
    for name, t in vm.state.items():
        assert rel_err(runtime.read(name), t) < 1e-3, name


def test_sampling_matches_the_vm(tiny, runtime):
    cfg, schedules, weights = tiny
    vm = VM(cfg, schedules, weights, MAX_SEQ)
    runtime.reset()
    tok = 3
    for _ in range(24):
        ref_logits, ref_next = vm.step([tok], temperature=0.9, seed=1234)
        logits, nxt = runtime.step([tok], temperature=0.9, seed=1234)
        assert nxt == ref_next and rel_err(logits, ref_logits) < 1e-3
        tok = nxt[0]


@pytest.mark.parametrize("B", [2, 4])
def test_steps_of_2_and_4_tokens_match_the_vm(tiny, B):
    """Steps of 2..4 tokens take the tensor-core GEMV with one hi/lo column pair per token (steps
    of 1 and 8 cover one token and the CUDA-core loop): a prefill in B-token steps, then B-token
    steps of sampled tokens, each against the VM."""
    cfg, _, weights = tiny
    schedules = compile_steps(cfg, load_recipe("mimo-tiny", "h100"), [B], max_seq_len=MAX_SEQ)
    runtime = make_runtime(cfg, schedules, weights)
    assert runtime.kernels[B].gen.mma_formats, "the tiny model's fp8 / bf16 GEMVs should take the mma path"
    vm = VM(cfg, schedules, weights, MAX_SEQ)
    tokens = [1, 17, 300, 5][:B]
    for step in range(12):
        ref_logits, ref_next = vm.step(tokens, temperature=0.7, seed=9)
        logits, nxt = runtime.step(tokens, temperature=0.7, seed=9)
        assert nxt == ref_next and rel_err(logits, ref_logits) < 1e-3, f"step {step}: rel err {rel_err(logits, ref_logits):.3g}"
        tokens = [(t * 5 + i) % cfg.vocab_size for i, t in enumerate(nxt)]


def union_schedules(cfg, B: int):
    """mimo-tiny steps of B tokens with recipe key `expert_union` (each distinct expert read once)."""
    return compile_steps(cfg, dict(load_recipe("mimo-tiny", "h100"), expert_union=True), [B], max_seq_len=MAX_SEQ)


@pytest.mark.parametrize("B", [4, 8])
def test_union_of_experts_matches_the_vm(tiny, B):
    """Recipe key `expert_union` on the GPU: the distinct experts listed on the device, each
    read once for all its tokens (the mma path at B = 4, the CUDA-core loop at 8), empty union
    slots skipped by the loader and the compute warps alike; steps of sampled tokens against
    the VM (mimo-tiny: 8 experts, 2 a token, so tokens share experts)."""
    cfg, _, weights = tiny
    schedules = union_schedules(cfg, B)
    runtime = make_runtime(cfg, schedules, weights)
    vm = VM(cfg, schedules, weights, MAX_SEQ)
    tokens = [1, 17, 300, 5, 42, 7, 99, 100][:B]
    for step in range(8):
        ref_logits, ref_next = vm.step(tokens, temperature=0.7, seed=5)
        logits, nxt = runtime.step(tokens, temperature=0.7, seed=5)
        assert nxt == ref_next and rel_err(logits, ref_logits) < 1e-3, f"step {step}: rel err {rel_err(logits, ref_logits):.3g}"
        tokens = [(t * 5 + i) % cfg.vocab_size for i, t in enumerate(nxt)]


def test_other_placements_run_on_the_same_cubin(tiny):
    """MegakernelRuntime.use_schedule (tools/autotune_schedule.py): the B = 8 and B = 1 steps under
    other tie-breaks, on the cubin of the recipe's schedule, equal the VM; a program that needs
    another kernel source is refused."""
    cfg, schedules, weights = tiny
    rt = make_runtime(cfg, schedules, weights)
    formats = {n: t.fmt for n, t in weights.items()}
    for tie_break in ("longest_idle", "random:3"):
        recipe = dict(load_recipe("mimo-tiny", "h100"), tie_break=tie_break)
        other = compile_steps(cfg, recipe, [1, 8], max_seq_len=MAX_SEQ)
        assert any(other[B].worker_of != schedules[B].worker_of for B in other)
        for B in (1, 8):
            rt.use_schedule(generate(other[B], cfg, formats))
        rt.reset()
        vm = VM(cfg, schedules, weights, MAX_SEQ)
        for tokens in ([3, 1, 4, 1, 5, 9, 2, 6], [5], [3]):
            got, got_tok = rt.step(tokens)
            want, want_tok = vm.step(tokens)
            assert rel_err(got, want) < 1e-4 and got_tok == want_tok
    with pytest.raises(UserError, match="another kernel source"):
        rt.use_schedule(generate(schedules[1], cfg, formats, loader=False))


def test_planted_hang_names_worker_and_counter(tiny):
    """A wait that can never be met (the validator is bypassed on purpose) trips the watchdog."""
    cfg, schedules, weights = tiny
    s = copy.deepcopy(schedules[1])
    victim = s.streams[2][1]
    c = s.waits[victim][0][0] if s.waits[victim] else 0
    s.waits[victim] = list(s.waits[victim]) + [(c, s.counters[c].target + 1)]
    rt = make_runtime(cfg, {1: s}, weights, timeout_s=0.5)
    t0 = time.time()
    with pytest.raises(HangError) as e:
        rt.step([1])
    assert time.time() - t0 < 5.0
    msg = str(e.value)
    print(msg)
    assert f"worker 2: task {victim}" in msg and f"counter {c}" in msg
    assert s.graph.ops[s.graph.tasks[victim].op].name in msg


# ---- the real geometry: mimo-v2-flash rows, 132 workers ------------------------------------------

# The experts as the V2-Flash hub stores them (fp8), and in MXFP4 (tiled, scales inside the step
# blocks): B = 1 takes the tensor cores, B = 8 the tiled CUDA-core loop.
FLASH2_EXPERTS = ("fp8", "mxfp4")


def flash2_config(expert_format: str = "fp8"):
    return dataclasses.replace(preset("mimo-v2-flash").with_layers(2), vocab_size=16384, n_routed_experts=32,
                               expert_format=expert_format)


def flash2_schedules(cfg, workers: int | None = None):
    """Steps of 1, 3 and 8 tokens: at 3 and 8 the x of o_proj (8192 columns) and of the dense
    down projection (16384) does not fit shared memory whole, so they stage it a chunk at a time
    (gemv.cuh gemv_tile_mma_chunked; 3 tokens: a step size that is no power of two)."""
    recipe = load_recipe("mimo-v2-flash", "h100")
    return compile_steps(cfg, recipe, [1, 3, 8], max_seq_len=64, num_workers=min(recipe["workers"], workers or 10**6))


# A cap on a multi-token step's staged x (tilert/codegen.py MULTI_XS_LIMIT_BYTES) below 8 tokens'
# x of 2048 columns (66 KB): the tiled GEMVs of a B = 8 step, the MXFP4 experts' among them, then
# run the tiled CUDA-core loop instead of the tensor cores.
SMALL_MULTI_XS = 32 * 1024


@contextlib.contextmanager
def multi_token_x_limit(limit: int):
    from tilert import codegen

    old, codegen.MULTI_XS_LIMIT_BYTES = codegen.MULTI_XS_LIMIT_BYTES, limit
    try:
        yield
    finally:
        codegen.MULTI_XS_LIMIT_BYTES = old


def kernel_sources() -> list[str]:
    """The source of every kernel these tests build, for tools/device_check.sh to compile in
    parallel beforehand (weights are synthesised in their hub formats, which the schedules'
    weight buffers declare, so the default formats give the same sources)."""
    cfg = preset("mimo-tiny")
    tiny = compile_steps(cfg, load_recipe("mimo-tiny", "h100"), [1, 8], max_seq_len=MAX_SEQ)
    out = [generate(s, cfg, **kw).source for kw in VARIANTS.values() for s in tiny.values()]
    out += [generate(s, cfg).source for B in (4, 8) for s in union_schedules(cfg, B).values()]
    flash = [flash2_config(f) for f in FLASH2_EXPERTS]
    out += [generate(s, f2, attention_mma=mma).source for f2 in flash for s in flash2_schedules(f2).values()
            for mma in (False, True)]
    with multi_token_x_limit(SMALL_MULTI_XS):
        f4 = flash2_config("mxfp4")
        out.append(generate(flash2_schedules(f4)[8], f4).source)
    return out


@pytest.fixture(scope="module", params=FLASH2_EXPERTS)
def flash2(request):
    """mimo-v2-flash cut to 2 layers (GA + dense FFN, SWA + MoE), with 32 experts and a 16k
    vocabulary so the weights (1.3 GB, hub formats) build in seconds; every row size, head count
    and tile of the real model is kept, on as many workers as the recipe (or the GPU) has.  The
    MXFP4 variant draws its weights on the GPU (quantizing them on the CPU would take a minute)."""
    from model.checkpoint import synthetic_tensor
    from model.weights import StoredTensor, expected_tensors
    from tilert.device_weights import device_weights

    cfg = flash2_config(request.param)
    schedules = flash2_schedules(cfg, torch.cuda.get_device_properties(0).multi_processor_count)
    if request.param == "mxfp4":
        return cfg, schedules, device_weights(cfg, seed=7)
    weights = {spec.name: StoredTensor.from_float(synthetic_tensor(spec, 7), spec.fmt)
               for spec in expected_tensors(cfg)}
    return cfg, schedules, runtime_weights(cfg, weights)


@pytest.mark.parametrize("attention_mma", [False, True])
def test_flash_geometry_matches_the_vm(flash2, attention_mma):
    cfg, schedules, weights = flash2
    vm = VM(cfg, schedules, weights, 64, device=next(iter(weights.values())).data.device.type)  # where they live
    rt = make_runtime(cfg, schedules, weights, max_seq=64, attention_mma=attention_mma)
    prompt = [1, 17, 300, 5, 42, 7, 99, 100]
    ref_logits, ref_next = vm.step(prompt)
    logits, nxt = rt.step(prompt, poison=True)
    if nxt != ref_next or rel_err(logits, ref_logits) > 1e-3:
        rt.reset()
        vm.reset()
        pytest.fail(f"B=8 step differs (logits rel err {rel_err(logits, ref_logits):.3g}); first divergence: "
                    f"{first_divergence(rt, vm, prompt)}")
    tok = nxt[-1]
    for i in range(4):
        ref_logits, ref_next = vm.step([tok])
        logits, nxt = rt.step([tok])
        assert nxt == ref_next and rel_err(logits, ref_logits) < 1e-3, f"decode step {i}"
        tok = nxt[0]
    three = [tok, 3, 1000]  # a step of 3 tokens (o_proj and the dense down on the chunk-staged path)
    ref_logits, ref_next = vm.step(three)
    logits, nxt = rt.step(three)
    assert torch.isfinite(logits).all()
    assert nxt == ref_next and rel_err(logits, ref_logits) < 1e-3, f"B=3 step: rel err {rel_err(logits, ref_logits):.3g}"
    tok = nxt[-1]
    # Timing: B=1 and B=8 steps, against the bytes the cost model counts.
    for B in (1, 8):
        s = schedules[B]
        nbytes = sum(t.bytes for t in s.graph.tasks)
        for _ in range(3):
            rt.truncate(0)
            rt.step([tok] * B)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 20
        for _ in range(n):
            rt.truncate(0)  # the same positions each time: timing only
            rt.step([tok] * B)
        dt = (time.perf_counter() - t0) / n
        print(f"flash-2-layer B={B}: {1e3 * dt:.3f} ms per step incl. host sync, {nbytes / 1e6:.0f} MB moved "
              f"(cost model) -> {nbytes / dt / 1e9:.0f} GB/s")


def test_tiled_mxfp4_on_the_cuda_cores_matches_the_vm(flash2):
    """Where a B = 8 step's x does not fit the tensor-core path, tiled weights take the tiled
    CUDA-core loop, which undoes the MXFP4 words' spread codes (gemv.cuh fp4_word_gather)."""
    cfg, schedules, weights = flash2
    if cfg.expert_format != "mxfp4":
        pytest.skip("the spread codes are MXFP4's")
    with multi_token_x_limit(SMALL_MULTI_XS):
        rt = make_runtime(cfg, {8: schedules[8]}, weights, max_seq=64)
    notes = rt.kernels[8].gen.notes
    assert any("experts.down_proj (mxfp4" in n and "CUDA-core GEMV" in n for n in notes), notes
    vm = VM(cfg, schedules, weights, 64, device=next(iter(weights.values())).data.device.type)
    prompt = [1, 17, 300, 5, 42, 7, 99, 100]
    ref_logits, ref_next = vm.step(prompt)
    logits, nxt = rt.step(prompt, poison=True)
    assert torch.isfinite(logits).all()
    assert nxt == ref_next and rel_err(logits, ref_logits) < 1e-3, f"rel err {rel_err(logits, ref_logits):.3g}"


def test_captured_hidden_states_match_the_vm(tiny):
    """Target steps of a --draft artifact also copy the drafter's conditioning layers' outputs
    into `hidden` (capture tasks): the megakernel's copy equals the VM's, and the logits stay
    as they were, for a B=8 prefill and decode steps."""
    cfg, _, weights = tiny
    layers = (0, cfg.num_hidden_layers - 1)
    schedules = compile_steps(cfg, load_recipe("mimo-tiny", "h100"), [1, 8], max_seq_len=MAX_SEQ,
                              capture_layers=layers)
    vm = VM(cfg, schedules, weights, MAX_SEQ)
    runtime = make_runtime(cfg, schedules, weights)
    tokens = [3, 14, 15, 92, 65, 35, 89, 79]
    for step in range(6):
        ref_logits, ref_next = vm.step(tokens)
        logits, nxt = runtime.step(tokens)
        assert nxt == ref_next and rel_err(logits, ref_logits) < 1e-3, f"step {step}"
        hidden = runtime.read("hidden", len(tokens))
        ref_hidden = vm.read("hidden", len(tokens))
        assert hidden.shape == ref_hidden.shape and torch.isfinite(hidden).all()
        assert rel_err(hidden, ref_hidden) < 1e-4, f"step {step}: hidden rel err {rel_err(hidden, ref_hidden):.3g}"
        tokens = nxt[-1:]
