"""Multi-GPU partition: which rank (GPU) owns which heads, rows, experts and vocabulary rows,
and each rank's share of the weights.

For N ranks (tensor parallel for attention and the dense FFN, expert parallel for the MoE):

- Attention by heads.  Rank r owns Q heads [r*nq/N, (r+1)*nq/N) and the KV heads they use:
  q_proj rows, the sink logits and o_proj columns follow the Q heads; k_proj / v_proj rows and
  the KV cache follow the KV heads, so each rank's cache holds only its heads.  When a layer
  has fewer KV heads than ranks (MiMo-V2-Flash's global layers: 4 KV heads on 8 GPUs), each KV
  head is replicated on the N/kv ranks whose Q heads use it (its K/V projection computed and its
  cache held on each of them), as vLLM does.  So N must divide nq, and per layer type either N
  divides kv or kv divides N.
- Dense FFN (layer 0): gate/up rows and down columns [r*F/N, (r+1)*F/N).
- Routed experts in contiguous blocks: rank r owns experts [r*E/N, (r+1)*E/N).  A rank's expert
  stacks are then one slice of the global stacks, and the expert the router picks maps to its
  local index by one subtraction (round-robin ownership would need a gather instead).  The
  router is replicated: every rank picks the same experts from the same hidden state.
- LM head by vocabulary rows, in whole tiles.  The tiles are N times narrower than the recipe's
  `vocab_rows` (so each rank keeps the single-GPU tile count: one wave of its SMs), and each
  rank gets a contiguous block of them.  The token is chosen by a distributed argmax.
- Replicated: the embedding table (a decode step reads one row of it), the norms, the router
  and its correction bias.

o_proj, the dense down projection and the experts then leave *partial sums* of the hidden
state on every rank; tilert/multigpu.py inserts the all-reduce that adds them up.

A rank is lowered as a smaller model of the same shape: `local_config` has the rank's head
counts and FFN width, while the expert count and the vocabulary stay global (the router and the
sampler see all of them).  `shard_weights` cuts each rank's tensors out of the runtime weights
under their usual names.  A slice that cuts through FP8's 128x128 scale blocks is dequantized
(exactly, to fp32) rather than re-quantized, as model/checkpoint.py does for fused QKV rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from model.config import MimoConfig
from model.formats import fp8
from model.weights import BF16, FP8, FP32, MXFP4, StoredTensor
from tilert.errors import UserError
from tilert.lower import stacked_expert_name, weight_buffer_name

Range = tuple[int, int]  # [lo, hi)


@dataclass(frozen=True)
class RankSlice:
    """What one rank owns, in global indices; every range is [lo, hi)."""

    rank: int
    q_heads: Range
    ga_kv_heads: Range  # KV heads of global-attention layers
    swa_kv_heads: Range  # KV heads of sliding-window layers
    ffn_rows: Range  # dense FFN intermediate rows
    experts: Range
    vocab_tiles: Range  # LM-head tiles
    vocab_rows: Range  # the rows of those tiles

    def kv_heads(self, cfg: MimoConfig, layer: int) -> Range:
        return self.swa_kv_heads if cfg.is_swa(layer) else self.ga_kv_heads

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @staticmethod
    def from_json(d: dict) -> "RankSlice":
        return RankSlice(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Partition:
    cfg: MimoConfig  # the whole model
    ranks: tuple[RankSlice, ...]
    vocab_tile_rows: int  # rows per LM-head tile (the recipe's vocab_rows / N, rounded up)

    @property
    def n(self) -> int:
        return len(self.ranks)

    def local_config(self, rank: int) -> MimoConfig:
        """The model rank `rank` computes: its heads and FFN width; experts and vocabulary global."""
        s, cfg = self.ranks[rank], self.cfg
        return dataclasses.replace(
            cfg,
            num_attention_heads=_size(s.q_heads),
            ga_num_kv_heads=_size(s.ga_kv_heads),
            swa_num_kv_heads=_size(s.swa_kv_heads),
            intermediate_size=_size(s.ffn_rows),
        ).validate()

    def to_json(self) -> dict:
        return {"ranks": [s.to_json() for s in self.ranks], "vocab_tile_rows": self.vocab_tile_rows}

    @staticmethod
    def from_json(cfg: MimoConfig, d: dict) -> "Partition":
        return Partition(cfg, tuple(RankSlice.from_json(s) for s in d["ranks"]), int(d["vocab_tile_rows"]))


def _size(r: Range) -> int:
    return r[1] - r[0]


def _block(n: int, parts: int, i: int) -> Range:
    """The i-th of `parts` contiguous blocks of range(n), sizes differing by at most one."""
    return (i * n // parts, (i + 1) * n // parts)


def _kv_range(q: Range, heads: int, kv: int) -> Range:
    """The KV heads that Q heads q use (GQA: Q head h uses KV head h // (heads / kv))."""
    group = heads // kv
    return (q[0] // group, (q[1] - 1) // group + 1)


def plan_partition(cfg: MimoConfig, n: int, recipe: dict) -> Partition:
    """Split `cfg` over `n` ranks (see the module doc).  Raises one UserError naming every
    reason `n` does not fit the model."""
    if n < 1:
        raise UserError(f"--gpus {n}: must be at least 1")
    nq = cfg.num_attention_heads
    problems = []
    if nq % n:
        problems.append(f"the {nq} query heads do not split evenly over {n} GPUs")
    for what, kv in (("global-attention", cfg.ga_num_kv_heads), ("sliding-window", cfg.swa_num_kv_heads)):
        if kv % n and n % kv:
            problems.append(f"{what} layers have {kv} KV heads: {n} GPUs must divide them or be a multiple "
                            f"of them (replicated KV heads)")
    if any(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)) and cfg.n_routed_experts % n:
        problems.append(f"the {cfg.n_routed_experts} routed experts do not split evenly over {n} GPUs")
    if any(not cfg.is_moe(i) for i in range(cfg.num_hidden_layers)) and cfg.intermediate_size % n:
        problems.append(f"the dense FFN width {cfg.intermediate_size} does not split evenly over {n} GPUs")
    # N times narrower LM-head tiles than one GPU's, and at least one per rank.
    tile_rows = max(1, min(math.ceil(recipe["vocab_rows"] / n), cfg.vocab_size // n))
    tiles = math.ceil(cfg.vocab_size / tile_rows)
    if cfg.vocab_size < n:
        problems.append(f"the vocabulary of {cfg.vocab_size} has fewer rows than {n} GPUs")
    if problems:
        raise UserError(f"--gpus {n} does not fit this model: " + "; ".join(problems))

    ranks = []
    for r in range(n):
        q = _block(nq, n, r)
        vt = _block(tiles, n, r)
        ranks.append(RankSlice(
            rank=r, q_heads=q,
            ga_kv_heads=_kv_range(q, nq, cfg.ga_num_kv_heads),
            swa_kv_heads=_kv_range(q, nq, cfg.swa_num_kv_heads),
            ffn_rows=_block(cfg.intermediate_size, n, r),
            experts=_block(cfg.n_routed_experts, n, r),
            vocab_tiles=vt,
            vocab_rows=(vt[0] * tile_rows, min(cfg.vocab_size, vt[1] * tile_rows)),
        ))
    return Partition(cfg, tuple(ranks), tile_rows)


# ---- weights ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Which part of a runtime tensor a rank holds; None = the whole extent of that dimension."""

    rows: Range | None = None  # first dimension of a matrix or vector
    cols: Range | None = None  # second dimension of a matrix
    experts: Range | None = None  # first dimension of a stacked expert tensor [E, rows, cols]

    @property
    def replicated(self) -> bool:
        return self.rows is None and self.cols is None and self.experts is None


def tensor_cuts(part: Partition, rank: int) -> dict[str, Cut]:
    """Rank `rank`'s cut of every runtime weight (tilert/layout.py names).  Tensors absent
    from the dict do not exist in this model; replicated ones map to Cut()."""
    cfg, s = part.cfg, part.ranks[rank]
    hd, vd = cfg.head_dim, cfg.v_head_dim
    q0, q1 = s.q_heads
    cuts = {
        "model.embed_tokens.weight": Cut(),
        "model.norm.weight": Cut(),
        "lm_head.weight": Cut(rows=s.vocab_rows),
    }
    for i in range(cfg.num_hidden_layers):
        P = lambda what: weight_buffer_name(i, what)  # noqa: E731
        g0, g1 = s.kv_heads(cfg, i)
        cuts.update({
            P("input_layernorm.weight"): Cut(),
            P("post_attention_layernorm.weight"): Cut(),
            P("self_attn.q_proj.weight"): Cut(rows=(q0 * hd, q1 * hd)),
            P("self_attn.k_proj.weight"): Cut(rows=(g0 * hd, g1 * hd)),
            P("self_attn.v_proj.weight"): Cut(rows=(g0 * vd, g1 * vd)),
            P("self_attn.o_proj.weight"): Cut(cols=(q0 * vd, q1 * vd)),
        })
        if cfg.has_sink(i):
            cuts[P("self_attn.attention_sink_bias")] = Cut(rows=s.q_heads)
        if cfg.is_moe(i):
            cuts[P("mlp.gate.weight")] = Cut()
            cuts[P("mlp.gate.e_score_correction_bias")] = Cut()
            for proj in ("gate_proj", "up_proj", "down_proj"):
                cuts[stacked_expert_name(i, proj)] = Cut(experts=s.experts)
        else:
            cuts[P("mlp.gate_proj.weight")] = Cut(rows=s.ffn_rows)
            cuts[P("mlp.up_proj.weight")] = Cut(rows=s.ffn_rows)
            cuts[P("mlp.down_proj.weight")] = Cut(cols=s.ffn_rows)
    return cuts


def _aligned(lo: int, hi: int, n: int, block: int) -> bool:
    """[lo, hi) of an extent n falls on whole blocks (the last block may be partial)."""
    return lo % block == 0 and (hi % block == 0 or hi == n)


def _extents(shape: tuple[int, ...], cut: Cut) -> tuple[Range, Range | None]:
    """The rows and (for a matrix) columns a non-expert cut keeps."""
    rows = cut.rows or (0, shape[0])
    cols = cut.cols or ((0, shape[1]) if len(shape) == 2 else None)
    return rows, cols


def cut_storage(fmt: str, shape: tuple[int, ...], cut: Cut) -> tuple[str, tuple[int, ...]]:
    """Storage format and logical shape of `cut` of a tensor stored as `fmt`: its own format when
    the cut falls on whole quantization blocks, else fp32 (see cut_tensor)."""
    if cut.replicated:
        return fmt, tuple(shape)
    if cut.experts is not None:  # whole experts: every format slices along E exactly
        return fmt, (_size(cut.experts), *shape[1:])
    rows, cols = _extents(shape, cut)
    out = (_size(rows),) if cols is None else (_size(rows), _size(cols))
    keeps = (
        fmt in (BF16, FP32)
        or (fmt == FP8 and cols is not None and _aligned(*rows, shape[0], fp8.BLOCK)
            and _aligned(*cols, shape[1], fp8.BLOCK))
        or (fmt == MXFP4 and cols is not None and cols[0] % 32 == 0 and cols[1] % 32 == 0)
    )
    return (fmt if keeps else FP32), out


def cut_tensor(t: StoredTensor, cut: Cut) -> StoredTensor:
    """The part `cut` of `t`, in t's storage format when the cut falls on whole quantization
    blocks, else dequantized exactly to fp32 (never re-quantized)."""
    fmt, shape = cut_storage(t.fmt, t.shape, cut)
    if cut.replicated:
        return t
    if cut.experts is not None:
        e0, e1 = cut.experts
        return StoredTensor(t.fmt, shape, t.data[e0:e1].contiguous(),
                            None if t.scale is None else t.scale[e0:e1].contiguous())
    (r0, r1), cols = _extents(t.shape, cut)
    if fmt == FP32 and t.fmt != FP32:  # cuts through blocks: dequantize the rows, then cut
        w = t.rows(r0, r1, torch.float32)
        return StoredTensor(FP32, shape, (w if cols is None else w[:, cols[0]:cols[1]]).contiguous())
    if cols is None:
        return StoredTensor(fmt, shape, t.data[r0:r1].contiguous())
    c0, c1 = cols
    if fmt in (BF16, FP32):
        return StoredTensor(fmt, shape, t.data[r0:r1, c0:c1].contiguous())
    if fmt == FP8:
        b = fp8.BLOCK
        scale = t.scale[r0 // b:-(-r1 // b), c0 // b:-(-c1 // b)]
        return StoredTensor(FP8, shape, t.data[r0:r1, c0:c1].contiguous(), scale.contiguous())
    data = t.data[r0:r1, c0 // 2:c1 // 2]  # MXFP4: two codes a byte, one scale per 32
    return StoredTensor(MXFP4, shape, data.contiguous(), t.scale[r0:r1, c0 // 32:c1 // 32].contiguous())


def shard_weights(part: Partition, rank: int, weights: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Rank `rank`'s tensors, under their runtime names (weights not in the model are dropped,
    e.g. a drafter's)."""
    return {name: cut_tensor(weights[name], cut) for name, cut in tensor_cuts(part, rank).items()}


def unshard_weights(part: Partition, shards: list[dict[str, StoredTensor]]) -> dict[str, StoredTensor]:
    """The whole model's runtime weights (fp32) put back together from every rank's shard: the
    reference backend's input, and the check that the cuts cover every weight."""
    out = {}
    cuts = [tensor_cuts(part, r) for r in range(part.n)]
    for name, cut0 in cuts[0].items():
        if cut0.replicated:
            out[name] = StoredTensor(FP32, shards[0][name].shape, shards[0][name].dequantize(torch.float32))
            continue
        full = None
        for r in range(part.n):
            piece, cut = shards[r][name].dequantize(torch.float32), cuts[r][name]
            if full is None:
                shape = list(piece.shape)
                if cut.experts is not None:
                    shape[0] = part.cfg.n_routed_experts
                elif cut.rows is not None:
                    shape[0] = max(c[name].rows[1] for c in cuts)
                if cut.cols is not None:
                    shape[1] = max(c[name].cols[1] for c in cuts)
                full = torch.full(shape, math.nan)
            if cut.experts is not None:
                full[cut.experts[0]:cut.experts[1]] = piece
            elif cut.rows is not None:
                full[cut.rows[0]:cut.rows[1]] = piece
            else:
                full[:, cut.cols[0]:cut.cols[1]] = piece
        out[name] = StoredTensor(FP32, tuple(full.shape), full)
    return out


def ownership(part: Partition) -> dict[str, list[list[int]]]:
    """For every partitioned dimension, which ranks hold each index: {"q_heads": [[ranks of
    head 0], ...], ...}.  What the property tests and `tilert inspect` check and show."""
    cfg = part.cfg
    dims = {
        "q_heads": (cfg.num_attention_heads, lambda s: s.q_heads),
        "ga_kv_heads": (cfg.ga_num_kv_heads, lambda s: s.ga_kv_heads),
        "swa_kv_heads": (cfg.swa_num_kv_heads, lambda s: s.swa_kv_heads),
        "ffn_rows": (cfg.intermediate_size, lambda s: s.ffn_rows),
        "experts": (cfg.n_routed_experts, lambda s: s.experts),
        "vocab_rows": (cfg.vocab_size, lambda s: s.vocab_rows),
    }
    out = {}
    for name, (n, of) in dims.items():
        holders: list[list[int]] = [[] for _ in range(n)]
        for s in part.ranks:
            lo, hi = of(s)
            for i in range(lo, hi):
                holders[i].append(s.rank)
        out[name] = holders
    return out

