"""Lower one DFlash draft step (model/dflash.py) to a tile task graph, and compile it.

One draft step does what `DFlashDrafter.draft(last_token, new_hidden, start)` does:

1. context path: up to `context_rows` newly committed positions arrive as the `ctx_hidden`
   input (each row the target's hidden states of DFlashConfig.target_layers, concatenated: the
   target step's `hidden` output), at the positions in `ctx_positions` (-1: an unused row).
   fc, then hidden_norm, give one context feature per row; every draft layer projects it to K
   and V (no input norm: the feature is already normed), rotates K at the row's position and
   writes both into that layer's persistent context cache (`draft.layer{i}.k_cache`/`v_cache`);
2. block path: the block [last committed token, B-1 mask embeddings] at `positions`
   start..start+B-1 goes through every draft layer.  Its K/V are written into the same caches at
   the block's positions, and attention is non-causal: a block query at position p sees the keys
   in [p - window + 1, start + B - 1], i.e. the visible context and the whole block;
3. final norm, the target's lm_head and argmax: `next_token[1:]` are the B-1 drafts.

Why the block's K/V may go into the persistent cache: they sit at positions >= the context
length, which the drafter never reads as context.  The next draft step first appends context at
exactly those positions and then writes its own block after it, so every stale block entry is
overwritten before a later query can see it.  Sliding-window layers keep a ring of
window + 2(B - 1) slots (draft_ring_slots): the positions one block needs, [start - window + 1,
start + B - 1], never share a slot, and the context can still roll back by B - 1 positions.

The graph reuses the target's kinds (linear, rmsnorm, rope, kv_write, attention, attn_combine,
gate_up, lm_head, argmax; the context path names its own position and K/V buffers through
params) and adds one: `draft_embed` (tilert/kernels.py).  It is fused, scheduled and validated
like a target step.  The target steps of an artifact with a drafter gain `capture` tasks that
fill their `hidden` output (lower_step(capture_layers=...)).
"""

from __future__ import annotations

from typing import Callable

from model.dflash import DFlashConfig, expected_draft_tensors
from model.weights import stored_nbytes
from tilert.artifact import DRAFT_PREFIX
from tilert.deps import derive_dependencies
from tilert.fusion import apply_fusions
from tilert.ir import INPUT, OUTPUT, STATE, WEIGHT, TaskGraph, region
from tilert.lower import (F32, _Builder, _linear, _lower_attn_output, _lower_kv_write, _lower_lm_head,
                          _lower_projection, _lower_rmsnorm, _lower_rope, _tiles, recipe_for_draft)
from tilert.schedule import Schedule
from tilert.scheduler import build_schedule
from tilert.validate import validate

# Task kinds only speculative decoding uses; the GPU megakernel must know them before it can run
# a drafter's artifact (see kinds_without_gpu_kernel).
SPECULATIVE_KINDS = ("capture", "draft_embed")


def draft_weight(name: str) -> str:
    return DRAFT_PREFIX + name


def draft_ring_slots(dcfg: DFlashConfig, max_seq_len: int) -> int:
    """Context-cache slots of a draft layer: every position, or a ring of window + 2(B - 1).

    One block's queries see the keys [start - window + 1, start + B - 1] together: window + B - 1
    slots (lower.ring_slots with a step of B tokens).  B - 1 more let the context roll back by up
    to B - 1 positions below where the last block started (truncate_context): writing that block
    evicted only positions older than any later block can see."""
    if dcfg.sliding_window:
        return min(max_seq_len, dcfg.sliding_window + 2 * (dcfg.block_size - 1))
    return max_seq_len


def rollback_floor(slots: int, max_seq_len: int, block_size: int, block_start: int) -> int:
    """The lowest context length the drafter may roll back to after a block at block_start."""
    if slots >= max_seq_len:
        return 0  # every position has its own slot
    return max(0, block_start - (block_size - 1))


def lower_draft_step(dcfg: DFlashConfig, recipe: dict, max_seq_len: int, context_rows: int,
                     embed_fmt: str = "bf16", lm_head_fmt: str = "bf16") -> TaskGraph:
    """The unfused task graph of one draft step (see the module docstring).  The target's
    embedding and lm_head are borrowed under their own names."""
    B, H, V = dcfg.block_size, dcfg.hidden_size, dcfg.vocab_size
    nq, nkv, hd, vd = dcfg.num_heads, dcfg.num_kv_heads, dcfg.head_dim, dcfg.v_head_dim
    C, N = context_rows, len(dcfg.target_layers)
    # _Builder reads cfg for nothing this module calls (eps comes from dcfg); tokens sizes flops.
    b = _Builder(cfg=None, recipe=recipe, tokens=B, max_seq_len=max_seq_len)
    for spec in expected_draft_tensors(dcfg):
        b.buf(draft_weight(spec.name), spec.shape, spec.fmt, WEIGHT, nbytes=stored_nbytes(spec.fmt, spec.shape))
    embed = b.buf("model.embed_tokens.weight", (V, H), embed_fmt, WEIGHT, nbytes=stored_nbytes(embed_fmt, (V, H)))
    lm = b.buf("lm_head.weight", (V, H), lm_head_fmt, WEIGHT, nbytes=stored_nbytes(lm_head_fmt, (V, H)))
    W = lambda name: b.weight(draft_weight(name))  # noqa: E731

    # Inputs the host writes before the step.
    tok = b.buf("tokens", (1,), "i32", INPUT)  # the last committed token
    pos = b.buf("positions", (B,), "i32", INPUT)  # the block's positions
    samp = b.buf("sampling", (2,), "f64", INPUT)  # (0, seed): the drafts are argmax
    ctx_in = b.buf("ctx_hidden", (C, N * H), kind=INPUT)
    ctx_pos = b.buf("ctx_positions", (C,), "i32", INPUT)
    # Activations.
    ctx_feat = b.buf("ctx_feat", (C, H))
    ctx_h = b.buf("ctx_h", (C, H))
    ctx_k = b.buf("ctx_k", (C, nkv * hd))
    ctx_v = b.buf("ctx_v", (C, nkv * vd))
    x, h = b.buf("x", (B, H)), b.buf("h", (B, H))
    q, k, v = b.buf("q", (B, nq * hd)), b.buf("k", (B, nkv * hd)), b.buf("v", (B, nkv * vd))
    splits = recipe["swa_splits"] if dcfg.sliding_window else recipe["global_splits"]
    am, asum = b.buf("attn_max", (B, nq, splits)), b.buf("attn_sum", (B, nq, splits))
    aacc, ao = b.buf("attn_acc", (B, nq, splits, vd)), b.buf("attn_out", (B, nq * vd))
    act = b.buf("ffn_act", (B, dcfg.intermediate_size))
    logits = b.buf("logits", (B, V), kind=OUTPUT)
    vocab_tiles = _tiles(V, recipe["vocab_rows"])
    best = b.buf("best_partial", (B, len(vocab_tiles), 2), "f64")
    nxt = b.buf("next_token", (B,), "i32", OUTPUT)
    slots = draft_ring_slots(dcfg, max_seq_len)
    caches = [(b.buf(f"draft.layer{i}.k_cache", (slots, nkv, hd), kind=STATE),
               b.buf(f"draft.layer{i}.v_cache", (slots, nkv, vd), kind=STATE)) for i in range(dcfg.num_layers)]

    # ---- context path: new committed positions -> context K/V of every layer ----
    op = b.op("linear", "draft.fc", None)
    for r0, r1 in _tiles(H, recipe["out_rows"]):
        _linear(b, op, [{"weight": W("fc.weight").name, "rows": [r0, r1], "out": ctx_feat.name, "cols": [r0, r1]}],
                ctx_in, False)
    _lower_rmsnorm(b, "draft.hidden_norm", None, ctx_feat, ctx_h, W("hidden_norm.weight").name, dcfg.rms_norm_eps)
    for i, (kc, vc) in enumerate(caches):
        P = lambda what, i=i: W(f"layers.{i}.{what}").name  # noqa: E731
        _lower_projection(b, f"draft.layer{i}.ctx_kv_proj", i, ctx_h, recipe["kv_heads_per_task"], nkv,
                    [(P("self_attn.k_proj.weight"), ctx_k, hd), (P("self_attn.v_proj.weight"), ctx_v, vd)])
        _lower_rope(b, f"draft.layer{i}.ctx_rope", i, [(ctx_k, nkv)], dcfg.head_dim, dcfg.rotary_dim, dcfg.rope_theta,
                    ctx_pos, named_positions=True)
        _lower_kv_write(b, f"draft.layer{i}.ctx_kv_write", i, ctx_k, ctx_v, ctx_pos, kc, vc, slots,
                        bool(dcfg.sliding_window), dcfg.value_scale, named_inputs=True)

    # ---- block path ----
    op = b.op("draft_embed", "draft.embed", None)
    for c0, c1 in _tiles(H, recipe["embed_cols"]):
        w = [region(x, None, (c0, c1))]
        b.task(op, "draft_embed", {"cols": [c0, c1], "embed": embed.name, "mask": W("mask_embedding").name},
               [region(tok), embed.full(), W("mask_embedding").full()], w,
               (c1 - c0) * 2 * B + b.act_bytes(w), 0)
    group = nq // nkv
    window = dcfg.sliding_window or 0
    for i, (kc, vc) in enumerate(caches):
        P = lambda what, i=i: W(f"layers.{i}.{what}").name  # noqa: E731
        _lower_rmsnorm(b, f"draft.layer{i}.input_norm", i, x, h, P("input_layernorm.weight"), dcfg.rms_norm_eps)
        _lower_projection(b, f"draft.layer{i}.q_proj", i, h, recipe["q_heads_per_task"], nq,
                    [(P("self_attn.q_proj.weight"), q, hd)])
        _lower_projection(b, f"draft.layer{i}.kv_proj", i, h, recipe["kv_heads_per_task"], nkv,
                    [(P("self_attn.k_proj.weight"), k, hd), (P("self_attn.v_proj.weight"), v, vd)])
        _lower_rope(b, f"draft.layer{i}.rope", i, [(q, nq), (k, nkv)], dcfg.head_dim, dcfg.rotary_dim, dcfg.rope_theta,
                    pos, named_positions=True)
        _lower_kv_write(b, f"draft.layer{i}.kv_write", i, k, v, pos, kc, vc, slots, bool(dcfg.sliding_window),
                        dcfg.value_scale, named_inputs=True)

        op = b.op("attention", f"draft.layer{i}.attention", i)
        for g in range(nkv):
            qr = region(q, None, (g * group * hd, (g + 1) * group * hd))
            for s in range(splits):
                writes = [region(t, None, (g * group, (g + 1) * group), s) for t in (am, asum, aacc)]
                keys = -(-((window or max_seq_len // 2) + B) // splits)  # an estimate for the cost model
                b.task(op, "attention", {"layer": i, "kv_head": g, "group": group, "split": s, "splits": splits,
                                         "window": window, "slots": slots, "scale": dcfg.softmax_scale,
                                         "k_cache": kc.name, "v_cache": vc.name, "causal": False},
                       [qr, region(kc, None, g), region(vc, None, g), region(pos)], writes,
                       keys * (hd + vd) * F32 + b.act_bytes([qr] + writes), 2 * B * group * keys * (hd + vd))
        sink = P("self_attn.attention_sink_bias") if dcfg.sink else None
        _lower_attn_output(b, f"draft.layer{i}", i, nkv, group, splits, vd, sink, (am, asum, aacc), ao, x,
                           P("self_attn.o_proj.weight"))

        _lower_rmsnorm(b, f"draft.layer{i}.post_attn_norm", i, x, h, P("post_attention_layernorm.weight"),
                       dcfg.rms_norm_eps)
        op = b.op("gate_up", f"draft.layer{i}.ffn_gate_up", i)
        gw, uw = b.weight(P("mlp.gate_proj.weight")), b.weight(P("mlp.up_proj.weight"))
        for r0, r1 in _tiles(dcfg.intermediate_size, recipe["ffn_rows"]):
            w = [region(act, None, (r0, r1))]
            b.task(op, "gate_up", {"gate": gw.name, "up": uw.name, "rows": [r0, r1], "in": h.name, "out": act.name},
                   [region(h), gw.full(), uw.full()], w,
                   (r1 - r0) * (b.row_bytes(gw) + b.row_bytes(uw)) + b.act_bytes([region(h)] + w), 4 * B * (r1 - r0) * H)
        op = b.op("linear", f"draft.layer{i}.ffn_down", i)
        for r0, r1 in _tiles(H, recipe["out_rows"]):
            _linear(b, op, [{"weight": P("mlp.down_proj.weight"), "rows": [r0, r1], "out": x.name,
                             "cols": [r0, r1]}], act, True)

    _lower_rmsnorm(b, "draft.final_norm", None, x, h, W("norm.weight").name, dcfg.rms_norm_eps)
    _lower_lm_head(b, "draft.", lm, h, vocab_tiles, logits, best, nxt, pos, samp)
    return TaskGraph(B, b.buffers, b.ops, b.tasks)


def compile_draft_step(dcfg: DFlashConfig, recipe: dict, max_seq_len: int, context_rows: int,
                       num_workers: int | None = None, gpu: str = "h100", weight_formats: dict[str, str] | None = None,
                       on_phase: Callable[[str], None] | None = None) -> Schedule:
    """The validated schedule of one draft step: lowered, fused, scheduled and validated exactly
    like a target step (tilert.compiler.compile_step), with the recipe's `draft` tile sizes
    (tilert.lower.recipe_for_draft).  `weight_formats` (artifact name ->
    storage format) sizes the borrowed embedding and lm_head for the cost model."""
    phase = on_phase or (lambda name: None)
    formats = weight_formats or {}
    recipe = recipe_for_draft(recipe)
    phase("lowering")
    graph = lower_draft_step(dcfg, recipe, max_seq_len, context_rows,
                             embed_fmt=formats.get("model.embed_tokens.weight", "bf16"),
                             lm_head_fmt=formats.get("lm_head.weight", "bf16"))
    phase("fusing")
    graph = apply_fusions(graph, recipe.get("fuse", []))
    phase("dependencies")
    derive_dependencies(graph)
    phase("scheduling")
    schedule = build_schedule(graph, num_workers or recipe["workers"], gpu=gpu)
    schedule.meta.update({"draft": True, "block_size": dcfg.block_size, "context_rows": context_rows,
                          "max_seq_len": max_seq_len, "recipe": recipe.get("source"), "gpu": gpu})
    phase("validating")
    validate(schedule)
    return schedule


def kinds_without_gpu_kernel(schedules: dict[int, Schedule]) -> list[str]:
    """Base task kinds of these schedules that tilert.codegen cannot encode yet (it dispatches
    a stage of kind K to _Encoder._K).  compile skips the megakernel, with this reason, rather
    than fail inside codegen."""
    from tilert.codegen import _Encoder

    kinds = {st.kind for s in schedules.values() for t in s.graph.tasks for st in (t.stages or [t])}
    return sorted(k for k in kinds if not hasattr(_Encoder, "_" + k))
