"""Lower one decode step of a MiMo-V2 model to a tile task graph.

The step processes `tokens` tokens (1 for plain decode, up to the draft block for
verification) at the positions held in the `positions` input.  Each op is split into tile
tasks by the sizes of a schedule recipe (`schedules/*.json`); every task declares the
regions it reads and writes, and tilert/deps.py derives the dependencies from them.

The graph is emitted unfused (RMSNorm, projection, RoPE and KV-cache write are separate ops);
tilert/fusion.py rewrites it according to the recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from model.config import MimoConfig
from model.weights import expected_tensors, stored_nbytes
from tilert.errors import UserError
from tilert.ir import ACTIVATION, INPUT, OUTPUT, STATE, WEIGHT, Buffer, Op, Task, TaskGraph, region

SCHEDULES_DIR = Path(__file__).resolve().parent.parent / "schedules"
F32 = 4


def load_recipe(model_name: str | None, gpu: str) -> dict:
    """The recipe for `model_name` on `gpu`, else schedules/default.json."""
    candidates = []
    if model_name:
        candidates.append(SCHEDULES_DIR / f"{model_name}.{gpu}.json")
    candidates.append(SCHEDULES_DIR / "default.json")
    for path in candidates:
        if path.exists():
            recipe = json.loads(path.read_text())
            recipe["source"] = path.name
            return recipe
    raise UserError(f"no schedule recipe found in {SCHEDULES_DIR}")


# The recipe keys a `by_tokens` entry (one step size) or the `draft` entry may set: the tile sizes.
TILE_KEYS = ("embed_cols", "q_heads_per_task", "qkv_rows", "kv_heads_per_task", "out_rows", "ffn_rows",
             "expert_rows", "router_rows", "vocab_rows", "global_splits", "swa_splits", "combine_heads",
             "allreduce_rows")


def _tile_overrides(recipe: dict, over, what: str) -> dict:
    """`recipe` with the tile sizes `over` (a recipe's `by_tokens` or `draft` entry) over its
    top-level ones; a UserError names any other key."""
    where = f"recipe {recipe.get('source', '(in memory)')}: {what}"
    if not isinstance(over, dict):
        raise UserError(f"{where} must be an object of tile sizes, not {over!r}")
    bad = sorted(set(over) - set(TILE_KEYS))
    if bad:
        raise UserError(f"{where} sets {', '.join(bad)}; only tile sizes may differ there ({', '.join(TILE_KEYS)})")
    return {**recipe, **over}


def recipe_for_step(recipe: dict, tokens: int) -> dict:
    """The recipe a target step of `tokens` tokens is lowered with: the top-level tile sizes,
    with the recipe's `by_tokens` entry for that step size (string key: JSON objects) over
    them, where a size measured best at one step size differs from the others'
    (schedules/README.md)."""
    by = recipe.get("by_tokens", {})
    if not isinstance(by, dict) or not all(isinstance(k, str) and k.isdigit() for k in by):
        raise UserError(f"recipe {recipe.get('source', '(in memory)')}: by_tokens must map step sizes (\"8\") to "
                        f"objects of tile sizes, not {by!r}")
    return _tile_overrides(recipe, by.get(str(tokens), {}), f'by_tokens["{tokens}"]')


def recipe_for_draft(recipe: dict) -> dict:
    """The recipe a DFlash draft step is lowered with: the top-level tile sizes with the
    recipe's `draft` entry over them (the drafter's own shapes: tilert/draft.py)."""
    return _tile_overrides(recipe, recipe.get("draft", {}), "draft")


def recipe_with(recipe: dict, key: str, value) -> dict:
    """A copy of `recipe` with `key` = `value` at every step size and in the draft step (a tile
    size is dropped from the by_tokens and draft entries, which would otherwise win there)."""
    out = {**recipe, key: value}
    if key in ("by_tokens", "draft"):  # the entry itself, replaced whole
        return out
    by = recipe.get("by_tokens")
    if isinstance(by, dict):
        out["by_tokens"] = {t: {k: v for k, v in over.items() if k != key} if isinstance(over, dict) else over
                            for t, over in by.items()}
    if isinstance(recipe.get("draft"), dict):
        out["draft"] = {k: v for k, v in recipe["draft"].items() if k != key}
    return out


def ring_slots(cfg: MimoConfig, layer: int, max_seq_len: int, max_tokens: int) -> int:
    """KV-cache slots of a layer: global layers keep every position; sliding-window layers keep
    a ring of the window plus the extra tokens of a multi-token step, so that writing the
    step's last token never evicts a key its first token still needs.

    That is also enough to roll a speculative verify step back (tilert/speculative.py): the step
    at `start` evicts positions <= start - window only, and the sequence is then truncated to
    no less than start + 1, whose first query sees positions > start + 1 - window; the rejected
    positions' entries are overwritten before any later query can see them."""
    if cfg.is_swa(layer):
        return min(max_seq_len, cfg.sliding_window + max_tokens - 1)
    return max_seq_len


def weight_buffer_name(layer: int, what: str) -> str:
    return f"model.layers.{layer}.{what}"


def stacked_expert_name(layer: int, proj: str) -> str:
    """Experts of one layer are one buffer [E, rows, cols]: the router picks rows at run time."""
    return f"model.layers.{layer}.mlp.experts.{proj}"


def _tiles(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, size)
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


@dataclass
class _Builder:
    cfg: MimoConfig
    recipe: dict
    tokens: int
    max_seq_len: int

    def __post_init__(self):
        self.buffers: dict[str, Buffer] = {}
        self.ops: list[Op] = []
        self.tasks: list[Task] = []
        self._weight_bytes: dict[str, int] = {}

    # ---- buffers ---------------------------------------------------------------------------
    def buf(self, name: str, shape, dtype="f32", kind=ACTIVATION, nbytes=None) -> Buffer:
        if name not in self.buffers:
            shape = tuple(int(s) for s in shape)
            if nbytes is None:
                nbytes = math.prod(shape) * (8 if dtype in ("f64", "i64") else 4)
            self.buffers[name] = Buffer(name, shape, dtype, kind, nbytes)
        return self.buffers[name]

    def weight(self, name: str) -> Buffer:
        return self.buffers[name]

    def row_bytes(self, w: Buffer) -> float:
        """Bytes of one row of a weight as stored (scales included); experts: of one expert."""
        rows = w.shape[-2] if len(w.shape) >= 2 else 1
        experts = w.shape[0] if len(w.shape) == 3 else 1
        return w.nbytes / (rows * experts)

    # ---- ops and tasks ---------------------------------------------------------------------
    def op(self, kind: str, name: str, layer: int | None) -> Op:
        o = Op(len(self.ops), kind, name, layer)
        self.ops.append(o)
        return o

    def task(self, op: Op, kind: str, params: dict, reads, writes, nbytes: float, flops: float) -> Task:
        t = Task(len(self.tasks), op.id, kind, params, list(reads), list(writes), int(nbytes), int(flops))
        self.tasks.append(t)
        op.tasks.append(t.id)
        return t

    def act_bytes(self, regions) -> int:
        return sum(r.volume * F32 for r in regions)


def _declare_weights(b: _Builder) -> None:
    cfg = b.cfg
    for spec in expected_tensors(cfg):
        if ".mlp.experts." in spec.name:
            continue
        b.buf(spec.name, spec.shape, spec.fmt, WEIGHT, nbytes=stored_nbytes(spec.fmt, spec.shape))
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe(i):
            continue
        E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            per = stored_nbytes(cfg.expert_format, shape)
            b.buf(stacked_expert_name(i, proj), (E, *shape), cfg.expert_format, WEIGHT, nbytes=E * per)


def lower_step(cfg: MimoConfig, recipe: dict, tokens: int = 1, max_seq_len: int = 4096,
               max_tokens: int | None = None, capture_layers: tuple[int, ...] = ()) -> TaskGraph:
    """The unfused task graph of one step of `tokens` tokens.  `capture_layers` (a DFlash
    drafter's target_layers) adds the `hidden` output: every token's residual stream after each
    of those layers, concatenated in that order (read by the speculative runtime).  The tile
    sizes are the recipe's for this step size (`recipe_for_step`)."""
    recipe = recipe_for_step(recipe, tokens)
    b = _Builder(cfg, recipe, tokens, max_seq_len)
    max_tokens = max(tokens, max_tokens or tokens)
    B, H, V = tokens, cfg.hidden_size, cfg.vocab_size
    nq, hd, vd = cfg.num_attention_heads, cfg.head_dim, cfg.v_head_dim
    kv_max = max(cfg.ga_num_kv_heads, cfg.swa_num_kv_heads)
    _declare_weights(b)

    tok = b.buf("tokens", (B,), "i32", INPUT)
    pos = b.buf("positions", (B,), "i32", INPUT)
    samp = b.buf("sampling", (2,), "f64", INPUT)  # (temperature, seed)
    x = b.buf("x", (B, H))
    h = b.buf("h", (B, H))
    q = b.buf("q", (B, nq * hd))
    k = b.buf("k", (B, kv_max * hd))
    v = b.buf("v", (B, kv_max * vd))
    max_splits = max(recipe["global_splits"], recipe["swa_splits"])
    am = b.buf("attn_max", (B, nq, max_splits))
    asum = b.buf("attn_sum", (B, nq, max_splits))
    aacc = b.buf("attn_acc", (B, nq, max_splits, vd))
    ao = b.buf("attn_out", (B, nq * vd))
    logits = b.buf("logits", (B, V), kind=OUTPUT)
    vocab_tiles = _tiles(V, recipe["vocab_rows"])
    best = b.buf("best_partial", (B, len(vocab_tiles), 2), "f64")
    nxt = b.buf("next_token", (B,), "i32", OUTPUT)

    # Embedding: gather rows of embed_tokens by token id.
    emb = b.weight("model.embed_tokens.weight")
    op = b.op("embed", "embed", None)
    for c0, c1 in _tiles(H, recipe["embed_cols"]):
        w = [region(x, None, (c0, c1))]
        b.task(op, "embed", {"cols": [c0, c1]}, [region(tok), emb.full()], w,
               B * (c1 - c0) * 2 + b.act_bytes(w), 0)

    for layer in range(cfg.num_hidden_layers):
        _lower_attention(b, layer, x, h, q, k, v, pos, am, asum, aacc, ao, max_tokens)
        if cfg.is_moe(layer):
            _lower_moe(b, layer, x, h)
        else:
            _lower_dense_ffn(b, layer, x, h)
        if layer in capture_layers:
            _lower_capture(b, layer, x, capture_layers)

    _lower_rmsnorm(b, "final_norm", None, x, h, "model.norm.weight")
    _lower_lm_head(b, "", b.weight("lm_head.weight"), h, vocab_tiles, logits, best, nxt, pos, samp)
    return TaskGraph(tokens, b.buffers, b.ops, b.tasks)


def _lower_lm_head(b: _Builder, prefix: str, lm: Buffer, h: Buffer, vocab_tiles: list[tuple[int, int]],
                   logits: Buffer, best: Buffer, nxt: Buffer, pos: Buffer, samp: Buffer) -> None:
    """The LM head in vocabulary tiles, each keeping its best (score, index) under the step's
    sampling, then the argmax over tiles (op names `prefix`lm_head and `prefix`argmax)."""
    B, H = h.shape
    op = b.op("lm_head", f"{prefix}lm_head", None)
    for i, (r0, r1) in enumerate(vocab_tiles):
        w = [region(logits, None, (r0, r1)), region(best, None, i)]
        b.task(op, "lm_head", {"weight": lm.name, "rows": [r0, r1], "tile": i, "in": h.name},
               [region(h), lm.full(), region(pos), region(samp)], w,
               (r1 - r0) * b.row_bytes(lm) + b.act_bytes([region(h)] + w), 2 * B * H * (r1 - r0))
    op = b.op("argmax", f"{prefix}argmax", None)
    b.task(op, "argmax", {}, [region(best)], [region(nxt)], b.act_bytes([region(best), region(nxt)]), 0)


def _lower_capture(b: _Builder, layer: int, x: Buffer, capture_layers: tuple[int, ...]) -> None:
    """Copy the residual stream after `layer` into its slot(s) of the `hidden` output; it only
    reads x, so the logits are unchanged."""
    H = b.cfg.hidden_size
    hidden = b.buf("hidden", (b.tokens, len(capture_layers) * H), kind=OUTPUT)
    op = b.op("capture", f"layer{layer}.capture", layer)
    for slot in (j for j, l in enumerate(capture_layers) if l == layer):
        for c0, c1 in _tiles(H, b.recipe["embed_cols"]):
            r, w = region(x, None, (c0, c1)), region(hidden, None, (slot * H + c0, slot * H + c1))
            b.task(op, "capture", {"slot": slot, "cols": [c0, c1]}, [r], [w], b.act_bytes([r, w]), 0)


def _lower_rmsnorm(b: _Builder, name: str, layer, src: Buffer, dst: Buffer, weight: str,
                   eps: float | None = None) -> None:
    """RMSNorm of `src` into `dst` with `weight` (eps: the model's unless given)."""
    op = b.op("rmsnorm", name, layer)
    w = b.weight(weight)
    eps = b.cfg.rms_norm_eps if eps is None else eps
    b.task(op, "rmsnorm", {"in": src.name, "out": dst.name, "weight": weight, "eps": eps},
           [region(src), w.full()], [region(dst)],
           b.act_bytes([region(src), region(dst)]) + w.nbytes, 3 * src.shape[0] * src.shape[1])


def _linear(b: _Builder, op: Op, segments: list[dict], src: Buffer, accumulate: bool, extra_reads=()):
    """One GEMV tile: each segment maps rows [r0, r1) of a weight to columns [c0, c1) of an
    output buffer (out = W x, or out += W x when accumulating into the residual)."""
    reads, writes, nbytes, flops = [region(src), *extra_reads], [], 0.0, 0
    for s in segments:
        w = b.weight(s["weight"])
        reads.append(w.full())
        out = b.buffers[s["out"]]
        reg = region(out, None, (s["cols"][0], s["cols"][1]))
        writes.append(reg)
        if accumulate:
            reads.append(reg)
        rows = s["rows"][1] - s["rows"][0]
        nbytes += rows * b.row_bytes(w)
        flops += 2 * b.tokens * rows * w.shape[-1]
    nbytes += b.act_bytes(reads[:1] + writes)
    return b.task(op, "linear", {"segments": segments, "in": src.name, "accumulate": accumulate},
                  reads, writes, nbytes, flops)


def _lower_attention(b: _Builder, layer, x, h, q, k, v, pos, am, asum, aacc, ao, max_tokens):
    cfg, recipe, B = b.cfg, b.recipe, b.tokens
    nq, hd, vd, kvh = cfg.num_attention_heads, cfg.head_dim, cfg.v_head_dim, cfg.num_kv_heads(layer)
    group = nq // kvh
    P = lambda what: weight_buffer_name(layer, what)  # noqa: E731
    _lower_rmsnorm(b, f"layer{layer}.input_norm", layer, x, h, P("input_layernorm.weight"))

    _lower_projection(b, f"layer{layer}.q_proj", layer, h, recipe["q_heads_per_task"], nq,
                      [(P("self_attn.q_proj.weight"), q, hd)])
    # K and V of the same KV heads in one task (RoPE and the cache write fuse in)
    _lower_projection(b, f"layer{layer}.kv_proj", layer, h, recipe["kv_heads_per_task"], kvh,
                      [(P("self_attn.k_proj.weight"), k, hd), (P("self_attn.v_proj.weight"), v, vd)])

    _lower_rope(b, f"layer{layer}.rope", layer, [(q, nq), (k, kvh)], hd, cfg.rotary_dim, cfg.rope_theta(layer), pos)

    slots = ring_slots(cfg, layer, b.max_seq_len, max_tokens)
    kc = b.buf(f"layer{layer}.k_cache", (slots, kvh, hd), kind=STATE)
    vc = b.buf(f"layer{layer}.v_cache", (slots, kvh, vd), kind=STATE)
    window = cfg.sliding_window if cfg.is_swa(layer) else 0
    _lower_kv_write(b, f"layer{layer}.kv_write", layer, k, v, pos, kc, vc, slots, bool(window),
                    cfg.attention_value_scale)

    splits = recipe["swa_splits"] if window else recipe["global_splits"]
    op = b.op("attention", f"layer{layer}.attention", layer)
    for g in range(kvh):
        qr = region(q, None, (g * group * hd, (g + 1) * group * hd))
        for s in range(splits):
            writes = [region(t, None, (g * group, (g + 1) * group), s) for t in (am, asum, aacc)]
            # Bytes: this split's share of the keys a token sees (an estimate for the cost model).
            visible = window if window else b.max_seq_len // 2
            keys = math.ceil(visible / splits)
            b.task(op, "attention", {"layer": layer, "kv_head": g, "group": group, "split": s, "splits": splits,
                                     "window": window, "slots": slots, "scale": cfg.softmax_scale,
                                     "k_cache": kc.name, "v_cache": vc.name},
                   [qr, region(kc, None, g), region(vc, None, g), region(pos)], writes,
                   keys * (hd + vd) * F32 + b.act_bytes([qr] + writes), 2 * B * group * keys * (hd + vd))

    sink = P("self_attn.attention_sink_bias") if cfg.has_sink(layer) else None
    _lower_attn_output(b, f"layer{layer}", layer, kvh, group, splits, vd, sink, (am, asum, aacc), ao, x,
                       P("self_attn.o_proj.weight"))


def _lower_rope(b: _Builder, name: str, layer, bufs: list[tuple[Buffer, int]], head_dim: int, rotary_dim: int,
                theta: float, pos: Buffer, named_positions: bool = False) -> None:
    """RoPE on every head of each (buffer, heads), one task a head, at the positions in `pos`.
    `named_positions`: the tasks name `pos` (the draft step rotates rows at two sets of positions);
    otherwise they read the step's "positions"."""
    op = b.op("rope", name, layer)
    for buf, heads in bufs:
        for hh in range(heads):
            # Only the rotary dims: a row tile of the projection (qkv_rows) then holds all a task
            # touches, so the rope fuses into that tile as an epilogue instead of costing the
            # step a dependency hop of its own (whole heads of 192 dims straddle 128-row tiles).
            reg = region(buf, None, (hh * head_dim, hh * head_dim + rotary_dim))
            params = {"buf": buf.name, "head": hh, "head_dim": head_dim, "rotary_dim": rotary_dim, "theta": theta}
            if named_positions:
                params["positions"] = pos.name
            b.task(op, "rope", params, [reg, region(pos)], [reg], 2 * b.act_bytes([reg]), 6 * buf.shape[0] * rotary_dim)


def _lower_kv_write(b: _Builder, name: str, layer, k: Buffer, v: Buffer, pos: Buffer, kc: Buffer, vc: Buffer,
                    slots: int, ring: bool, value_scale: float, named_inputs: bool = False) -> None:
    """Write each KV head's rows of k and v into its cache slots (one task a head).
    `named_inputs`: the tasks name k, v and pos (the draft step's context path); otherwise they
    read the step's "k", "v" and "positions"."""
    op = b.op("kv_write", name, layer)
    hd, vd = kc.shape[-1], vc.shape[-1]
    for g in range(kc.shape[1]):
        kr, vr = region(k, None, (g * hd, (g + 1) * hd)), region(v, None, (g * vd, (g + 1) * vd))
        params = {"layer": layer, "head": g, "slots": slots, "ring": ring, "value_scale": value_scale,
                  "k_cache": kc.name, "v_cache": vc.name}
        if named_inputs:
            params.update(k=k.name, v=v.name, positions=pos.name)
        # The slot depends on the run-time position: declare the head's whole column of slots.
        b.task(op, "kv_write", params, [kr, vr, region(pos)], [region(kc, None, g), region(vc, None, g)],
               2 * b.act_bytes([kr, vr]), k.shape[0] * vd)


def _lower_projection(b: _Builder, name: str, layer, src: Buffer, heads_per_task: int, heads: int,
                      parts: list[tuple[str, Buffer, int]]) -> None:
    """One op projecting `src` into each (weight, out buffer, head dim) of `parts`: whole heads
    per task, the parts' same heads together (RoPE and the cache write then fuse in), or, when
    the recipe sets qkv_rows, row tiles of each part over every worker (whole-head tiles of a
    model with few KV heads leave most workers idle while a handful stream a head each; RoPE
    and the cache write become tasks of their own)."""
    op = b.op("linear", name, layer)
    rows = b.recipe.get("qkv_rows")
    if rows:
        for weight, out, d in parts:
            for r0, r1 in _tiles(heads * d, rows):
                _linear(b, op, [{"weight": weight, "rows": [r0, r1], "out": out.name, "cols": [r0, r1]}], src, False)
        return
    for h0, h1 in _tiles(heads, heads_per_task):
        _linear(b, op, [{"weight": weight, "rows": [h0 * d, h1 * d], "out": out.name, "cols": [h0 * d, h1 * d]}
                        for weight, out, d in parts], src, False)


def _lower_attn_output(b: _Builder, prefix: str, layer, kv_heads: int, group: int, splits: int, vd: int,
                       sink: str | None, partials: tuple[Buffer, Buffer, Buffer], ao: Buffer, x: Buffer,
                       o_weight: str) -> None:
    """Merge the attention splits (the sink joins the denominator) into `ao`, `combine_heads`
    query heads a task (default 8: a KV group of 16 heads in one task kept the merge of 32
    splits on one SM for ~12 us; measured on an H200, tasks of 4 heads took 9 us there but
    made the sliding-window layers' combine slower), then add the O-projection of `ao` into
    the residual `x`."""
    B = b.tokens
    per_task = b.recipe.get("combine_heads", 8)
    op = b.op("attn_combine", f"{prefix}.attn_combine", layer)
    for g in range(kv_heads):
        for h0, h1 in _tiles(group, per_task):
            heads = (g * group + h0, g * group + h1)
            reads = [region(t, None, heads, (0, splits)) for t in partials]
            if sink:
                reads.append(b.weight(sink).full())
            w = [region(ao, None, (heads[0] * vd, heads[1] * vd))]
            b.task(op, "attn_combine", {"heads": list(heads), "splits": splits, "sink": sink},
                   reads, w, b.act_bytes(reads[:3] + w), 4 * B * (h1 - h0) * splits * vd)

    op = b.op("linear", f"{prefix}.o_proj", layer)
    for r0, r1 in _tiles(x.shape[1], b.recipe["out_rows"]):
        _linear(b, op, [{"weight": o_weight, "rows": [r0, r1], "out": x.name, "cols": [r0, r1]}], ao, True)


def _lower_dense_ffn(b: _Builder, layer, x, h):
    cfg, recipe = b.cfg, b.recipe
    F = cfg.intermediate_size
    P = lambda what: weight_buffer_name(layer, what)  # noqa: E731
    act = b.buf("ffn_act", (b.tokens, F))
    _lower_rmsnorm(b, f"layer{layer}.post_attn_norm", layer, x, h, P("post_attention_layernorm.weight"))
    op = b.op("gate_up", f"layer{layer}.ffn_gate_up", layer)
    gw, uw = b.weight(P("mlp.gate_proj.weight")), b.weight(P("mlp.up_proj.weight"))
    for r0, r1 in _tiles(F, recipe["ffn_rows"]):
        w = [region(act, None, (r0, r1))]
        b.task(op, "gate_up", {"gate": gw.name, "up": uw.name, "rows": [r0, r1], "in": h.name, "out": act.name},
               [region(h), gw.full(), uw.full()], w,
               (r1 - r0) * (b.row_bytes(gw) + b.row_bytes(uw)) + b.act_bytes([region(h)] + w),
               4 * b.tokens * (r1 - r0) * cfg.hidden_size)
    op = b.op("linear", f"layer{layer}.ffn_down", layer)
    for r0, r1 in _tiles(cfg.hidden_size, recipe["out_rows"]):
        _linear(b, op, [{"weight": P("mlp.down_proj.weight"), "rows": [r0, r1], "out": x.name,
                         "cols": [r0, r1]}], act, True)


def _lower_moe(b: _Builder, layer, x, h):
    cfg, recipe, B = b.cfg, b.recipe, b.tokens
    E, K, I, H = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.hidden_size
    P = lambda what: weight_buffer_name(layer, what)  # noqa: E731
    logits = b.buf("router_logits", (B, E))
    idx = b.buf("topk_idx", (B, K), "i32")
    wts = b.buf("topk_weight", (B, K))
    act = b.buf("moe_act", (B, K, I))
    _lower_rmsnorm(b, f"layer{layer}.post_attn_norm", layer, x, h, P("post_attention_layernorm.weight"))

    rw = b.weight(P("mlp.gate.weight"))
    op = b.op("router", f"layer{layer}.router", layer)
    for e0, e1 in _tiles(E, recipe["router_rows"]):
        w = [region(logits, None, (e0, e1))]
        b.task(op, "router", {"weight": rw.name, "rows": [e0, e1], "in": h.name},
               [region(h), rw.full()], w, (e1 - e0) * b.row_bytes(rw) + b.act_bytes([region(h)] + w),
               2 * B * (e1 - e0) * H)
    bias = b.weight(P("mlp.gate.e_score_correction_bias"))
    op = b.op("topk", f"layer{layer}.topk", layer)
    b.task(op, "topk", {"k": K, "norm": cfg.norm_topk_prob, "scale": cfg.routed_scaling_factor, "bias": bias.name},
           [region(logits), bias.full()], [region(idx), region(wts)],
           b.act_bytes([region(logits), region(idx), region(wts)]) + bias.nbytes, 4 * B * E)

    gw, uw, dw = (b.weight(stacked_expert_name(layer, p)) for p in ("gate_proj", "up_proj", "down_proj"))
    if recipe.get("expert_union") and B > 1:  # one token's experts are distinct already
        _lower_experts_union(b, layer, x, h, idx, wts, gw, uw, dw)
        return
    op = b.op("expert_gate_up", f"layer{layer}.expert_gate_up", layer)
    for t in range(B):
        for slot in range(K):
            for r0, r1 in _tiles(I, recipe["expert_rows"]):
                w = [region(act, t, slot, (r0, r1))]
                reads = [region(idx, t, slot), region(h, t), gw.full(), uw.full()]
                b.task(op, "expert_gate_up", {"token": t, "slot": slot, "rows": [r0, r1], "gate": gw.name,
                                              "up": uw.name, "in": h.name},
                       reads, w, (r1 - r0) * (b.row_bytes(gw) + b.row_bytes(uw)) + b.act_bytes([region(h, t)] + w),
                       4 * (r1 - r0) * H)
    op = b.op("expert_down", f"layer{layer}.expert_down", layer)
    for r0, r1 in _tiles(H, recipe["out_rows"]):
        w = [region(x, None, (r0, r1))]
        reads = [region(act), region(idx), region(wts), dw.full(), *w]
        b.task(op, "expert_down", {"rows": [r0, r1], "down": dw.name, "k": K},
               reads, w, B * K * (r1 - r0) * b.row_bytes(dw) + b.act_bytes([region(act)] + w),
               2 * B * K * (r1 - r0) * I)


def _lower_experts_union(b: _Builder, layer, x, h, idx, wts, gw, uw, dw):
    """Experts of a multi-token step, each distinct selected expert read once for all the
    tokens routed to it.  Which experts are distinct is known only at run time, so the step
    has one slot per possible distinct expert (min(B*K, E)): an `expert_union` task lists the
    distinct experts and routes every (token, k) to its slot; the tasks of a slot left empty
    do nothing."""
    cfg, recipe, B = b.cfg, b.recipe, b.tokens
    E, K, I, H = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.hidden_size
    U = min(B * K, E)
    union = b.buf("moe_union", (U,), "i32")
    route = b.buf("moe_route", (B, K), "i32")
    act = b.buf("moe_act_union", (U, B, I))
    op = b.op("expert_union", f"layer{layer}.expert_union", layer)
    b.task(op, "expert_union", {"k": K}, [region(idx)], [region(union), region(route)],
           b.act_bytes([region(idx), region(union), region(route)]), B * K)

    op = b.op("expert_gate_up_union", f"layer{layer}.expert_gate_up", layer)
    for u in range(U):
        for r0, r1 in _tiles(I, recipe["expert_rows"]):
            w = [region(act, u, None, (r0, r1))]
            reads = [region(union, u), region(route), region(h), gw.full(), uw.full()]
            b.task(op, "expert_gate_up_union", {"slot": u, "rows": [r0, r1], "gate": gw.name, "up": uw.name,
                                                "in": h.name},
                   reads, w, (r1 - r0) * (b.row_bytes(gw) + b.row_bytes(uw)) + b.act_bytes([region(h)] + w),
                   4 * B * (r1 - r0) * H)
    op = b.op("expert_down_union", f"layer{layer}.expert_down", layer)
    for r0, r1 in _tiles(H, recipe["out_rows"]):
        w = [region(x, None, (r0, r1))]
        reads = [region(act), region(union), region(route), region(wts), dw.full(), *w]
        b.task(op, "expert_down_union", {"rows": [r0, r1], "down": dw.name, "k": K},
               reads, w, U * (r1 - r0) * b.row_bytes(dw) + b.act_bytes([region(act)] + w),
               2 * B * K * (r1 - r0) * I)
