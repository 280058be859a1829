"""A PROJECTION of per-token decode time on N GPUs, from single-GPU measurements.

Nothing here is measured on more than one GPU (no such machine was available).  The model:

1. Bytes.  What one decode step (batch 1, context C) must move on each rank, with the same
   definition as the floor of tools/bench.py: every weight the rank holds as stored (the
   partition of tilert/partition.py: FP8 cuts inside a scale block count as fp32), one
   embedding row, the rank's KV heads' cache read (fp32) and the new entry written, and the
   routed experts the rank computes.  With uniform random routing the K experts of a token fall
   on the ranks like K draws without replacement from N blocks of E/N; each MoE layer ends in an
   all-reduce, so the layer waits for the rank with the most: `expected_max_load`, computed
   exactly.  (Its mean K/N is the balanced case.)
2. Time per byte, measured.  `MEASURED` holds the single-GPU megakernel times of BENCHMARKS.md
   (H100, MiMo-V2-Flash geometry, 6 and 12 layers, context 8192).  Two efficiencies follow:
   e_prefix = t(6 layers) / bytes(6 layers: embedding, dense layer 0, five MoE layers, LM head)
   and e_layer = (t(12) - t(6)) / (bytes(12) - bytes(6)), the cost of a byte in a 6-layer hybrid
   block (five sliding-window MoE layers and one global one).  A rank's compute time is
   e_prefix x its bytes of the first 6 layers and head + e_layer x its bytes of the other
   layers: each rank keeps the single-GPU kernel's measured efficiency (3.0-3.6x the bandwidth
   floor at 0f32d0f), it neither gets better nor worse when its share shrinks.
3. Communication.  Per layer two all-reduces of the hidden state (after o_proj and after the
   MoE / FFN), and one all-gather of the LM head's per-tile maxima.  One-shot pull (as
   tilert/collectives.py lowers it): each rank reads the N-1 other partials, (N-1) x B x H x 4
   bytes over NVLink at `NVLINK_BYTES_PER_S`, plus a latency `alpha` per collective (signal
   the remote counters, wait, load).  Assumed not overlapped with compute: the next layer's
   norm needs the whole reduced x.
4. H200: the measured kernel's MXFP4 GEMV is bound by instructions per weight, not by bandwidth
   (BENCHMARKS.md profile), and H200 has H100's SMs and clocks, so H200 rows keep the H100
   per-byte times; only the floor uses H200's bandwidth (the cost model's 4.3 TB/s, tilert/cost.py).

The floor is the bandwidth floor: the busiest rank's bytes at the mean expert load over one
GPU's bandwidth (= the aggregate bytes over N x bandwidth when balanced), plus the transfers at
NVLink bandwidth, without latency.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

from model.config import MimoConfig, preset
from model.weights import expected_tensors, stored_nbytes
from tilert.cost import GPUS
from tilert.lower import load_recipe
from tilert.partition import Cut, cut_storage, plan_partition, tensor_cuts

# BENCHMARKS.md, "2026-11-25 (later): decode step after the latency fixes", commit 0f32d0f,
# NVIDIA H100 80GB HBM3, `python tools/bench.py --layers 6,12 --contexts 8192,512 --reps 20`,
# MXFP4 experts, batch 1: rows "6 | 8192" and "12 | 8192" (the newest logged measurement).
MEASURED = {
    "source": "BENCHMARKS.md 2026-11-25 (later) 'decode step after the latency fixes' (commit 0f32d0f, H100), "
              "rows layers 6 and 12 at context 8192",
    "gpu": "h100",
    "context": 8192,
    "copy_bytes_per_s": 3.03e12,
    "step_s": {6: 2.826e-3, 12: 5.186e-3},
    "floor_s": {6: 0.943e-3, 12: 1.431e-3},
}
# NVLink 4 (H100 / H200 SXM): 18 links x 25 GB/s per direction = 450 GB/s per GPU and direction
# (NVIDIA quotes 900 GB/s bidirectional per GPU; every GPU reaches every other through NVSwitch).
NVLINK_BYTES_PER_S = 450e9
# Latency of one small collective: ASSUMPTIONS, not measurements.  3 us: the in-kernel one-shot
# all-reduce (a remote counter signal, ~1 us to become visible through NVSwitch, then one round
# of remote loads); 10 us: a separate small-message collective of the NCCL kind.
ALPHAS_S = (3e-6, 10e-6)
GPU_MEMORY = {"h100": 80e9, "h200": 141e9}
MODELS = {"mimo-v2-flash": "MiMo-V2-Flash", "mimo-v2.5-pro": "MiMo-V2.5-Pro"}


def model_config(name: str) -> MimoConfig:
    """The preset with experts in MXFP4, the deployment format the measurement used."""
    return dataclasses.replace(preset(name), expert_format="mxfp4")


@lru_cache(maxsize=None)
def expected_max_load(experts: int, k: int, n: int) -> float:
    """E[max over ranks of the routed experts a rank computes], for k distinct experts drawn
    uniformly from `experts` split in n equal blocks (multivariate hypergeometric, exact)."""
    if n == 1:
        return float(k)
    m = experts // n
    total = math.comb(experts, k)
    mean_max = 0.0
    for c in range(k):  # E[max] = sum over c >= 0 of P(max > c)
        # Ways to pick k experts with at most c in every block: the x^k coefficient of
        # (sum_{j<=c} C(m, j) x^j)^n.
        poly = [1]
        block = [math.comb(m, j) for j in range(min(c, m) + 1)]
        for _ in range(n):
            nxt = [0] * min(k + 1, len(poly) + len(block) - 1)
            for i, a in enumerate(poly):
                for j, b in enumerate(block):
                    if i + j <= k:
                        nxt[i + j] += a * b
            poly = nxt
        at_most = poly[k] if k < len(poly) else 0
        mean_max += 1 - at_most / total
    return mean_max


@lru_cache(maxsize=None)
def _tensor_bytes(cfg: MimoConfig, n: int, recipe: str | None) -> list[dict[int | None, tuple[int, int]]]:
    """Per rank, per layer (None: embedding, final norm, LM head), the (bytes a decode step reads,
    bytes held) of its non-expert weights: every weight it holds as stored, but of the embedding
    one row per step.  `recipe`: the schedule recipe's model name (it sets the LM-head tiles)."""
    part = plan_partition(cfg, n, load_recipe(recipe, "h100")) if n > 1 else None
    specs = [s for s in expected_tensors(cfg) if ".mlp.experts." not in s.name]
    out = []
    for r in range(n):
        cuts = tensor_cuts(part, r) if part else None
        per: dict[int | None, tuple[int, int]] = {}
        for spec in specs:
            layer = int(spec.name.split(".")[2]) if spec.name.startswith("model.layers.") else None
            fmt, shape = cut_storage(spec.fmt, spec.shape, cuts[spec.name] if cuts else Cut())
            held = stored_nbytes(fmt, shape)
            read = held // shape[0] if spec.name == "model.embed_tokens.weight" else held
            a, b = per.get(layer, (0, 0))
            per[layer] = (a + read, b + held)
        out.append(per)
    return out


def _kv_bytes(cfg: MimoConfig, n: int, layer: int, keys: int) -> int:
    """fp32 K and V of `keys` positions of the KV heads one rank holds in `layer`."""
    kv_local = max(1, cfg.num_kv_heads(layer) // n)  # split, or one replicated head per rank
    return keys * kv_local * (cfg.head_dim + cfg.v_head_dim) * 4


def rank_bytes(cfg: MimoConfig, n: int, context: int, layers: range, head: bool, load: float,
               recipe: str | None = None) -> float:
    """Bytes the busiest rank moves for `layers` (and the embedding row, final norm and LM head
    when `head`) in one decode step at position `context`, computing `load` routed experts per
    MoE layer: its weights as stored, the experts, its KV heads' cache read and the new entry."""
    expert = 3 * stored_nbytes(cfg.expert_format, (cfg.moe_intermediate_size, cfg.hidden_size))
    best = 0.0
    for per in _tensor_bytes(cfg, n, recipe):
        total = float(per[None][0]) if head else 0.0
        for i in layers:
            keys = min(context + 1, cfg.sliding_window) if cfg.is_swa(i) else context + 1
            total += per[i][0] + _kv_bytes(cfg, n, i, keys + 1) + (load * expert if cfg.is_moe(i) else 0)
        best = max(best, total)
    return best


def _split(cfg: MimoConfig, n: int, context: int, load: float, recipe: str | None) -> tuple[float, float]:
    """(bytes of the first 6 layers + head, bytes of the other layers) on the busiest rank."""
    first = min(6, cfg.num_hidden_layers)
    return (rank_bytes(cfg, n, context, range(first), True, load, recipe),
            rank_bytes(cfg, n, context, range(first, cfg.num_hidden_layers), False, load, recipe))


def efficiencies() -> dict:
    """Seconds per byte of the measured kernel: the 6-layer prefix + head, and a 6-layer block."""
    cfg = model_config("mimo-v2-flash")
    c, k = MEASURED["context"], cfg.num_experts_per_tok
    b6 = rank_bytes(cfg.with_layers(6), 1, c, range(6), True, k)
    b12 = rank_bytes(cfg.with_layers(12), 1, c, range(12), True, k)
    t6, t12 = MEASURED["step_s"][6], MEASURED["step_s"][12]
    return {"prefix": t6 / b6, "layer": (t12 - t6) / (b12 - b6), "bytes6": b6, "bytes12": b12}


def memory_per_rank(cfg: MimoConfig, n: int, context: int, recipe: str | None = None) -> float:
    """Device memory of the busiest rank: every weight it holds plus its KV cache for `context`."""
    moe = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    experts = moe * cfg.n_routed_experts // n * 3 * stored_nbytes(
        cfg.expert_format, (cfg.moe_intermediate_size, cfg.hidden_size))
    kv = sum(_kv_bytes(cfg, n, i, min(context, cfg.sliding_window) if cfg.is_swa(i) else context)
             for i in range(cfg.num_hidden_layers))
    return max(sum(held for _, held in per.values()) for per in _tensor_bytes(cfg, n, recipe)) + experts + kv


def project(model: str, n: int, gpu: str, eff: dict | None = None) -> dict:
    """One row of the projection: `model` (a preset name) on n GPUs of kind `gpu`."""
    eff = eff or efficiencies()
    cfg = model_config(model)
    c, k = MEASURED["context"], cfg.num_experts_per_tok
    load = expected_max_load(cfg.n_routed_experts, k, n)
    prefix, rest = _split(cfg, n, c, load, model)
    compute = eff["prefix"] * prefix + eff["layer"] * rest
    collectives = 2 * cfg.num_hidden_layers + (1 if n > 1 else 0)
    link = 0.0 if n == 1 else 2 * cfg.num_hidden_layers * (n - 1) * cfg.hidden_size * 4 / NVLINK_BYTES_PER_S
    comm = {a: (0.0 if n == 1 else collectives * a + link) for a in ALPHAS_S}
    floor_prefix, floor_rest = _split(cfg, n, c, k / n, model)
    floor = (floor_prefix + floor_rest) / GPUS[gpu].hbm_bytes_per_s + link
    mem = memory_per_rank(cfg, n, c, model)
    return {
        "model": MODELS.get(model, model), "layers": cfg.num_hidden_layers, "gpus": n, "gpu": gpu,
        "context": c, "expert_load": load, "mean_load": k / n, "bytes_per_rank": prefix + rest, "compute_s": compute,
        "collectives": collectives, "link_s": link, "comm_s": comm,
        "step_s": {a: compute + comm[a] for a in ALPHAS_S}, "floor_s": floor,
        "memory_per_rank": mem, "fits": mem <= GPU_MEMORY[gpu],
    }


def assumptions(eff: dict) -> list[str]:
    m = MEASURED
    return [
        f"measured input: {m['source']}: {m['step_s'][6] * 1e3:.3f} ms (6 layers), {m['step_s'][12] * 1e3:.3f} ms "
        f"(12 layers); per-layer time of a hybrid block = ({m['step_s'][12] * 1e3:.3f} - "
        f"{m['step_s'][6] * 1e3:.3f}) / 6 = {(m['step_s'][12] - m['step_s'][6]) / 6 * 1e3:.3f} ms",
        f"bytes as tools/bench.py counts them; check: the 6- and 12-layer steps move {eff['bytes6'] / 1e9:.3f} and "
        f"{eff['bytes12'] / 1e9:.3f} GB, i.e. floors of {eff['bytes6'] / m['copy_bytes_per_s'] * 1e3:.3f} and "
        f"{eff['bytes12'] / m['copy_bytes_per_s'] * 1e3:.3f} ms at the measured {m['copy_bytes_per_s'] / 1e12:.2f} TB/s "
        f"(BENCHMARKS.md: {m['floor_s'][6] * 1e3:.3f} and {m['floor_s'][12] * 1e3:.3f})",
        f"each rank keeps the measured kernel's time per byte: {eff['prefix'] * 1e12:.2f} ps/B for the first 6 "
        f"layers + LM head, {eff['layer'] * 1e12:.2f} ps/B for later layers (that kernel runs at "
        f"{m['step_s'][6] / m['floor_s'][6]:.1f}-{m['step_s'][12] / m['floor_s'][12]:.1f}x its floor)",
        "MiMo-V2.5-Pro was never measured: its bytes are costed at MiMo-V2-Flash's measured per-byte times",
        "partition of tilert/partition.py: attention by heads (KV heads replicated when fewer than GPUs), dense FFN "
        "by rows, experts in contiguous blocks, LM head by vocabulary; embedding, norms and router replicated",
        "routing uniform and independent: per MoE layer the busiest rank computes E[max load] experts (exact); "
        "the floor uses the mean load K/N",
        f"per token 2 all-reduces per layer + 1 all-gather, one-shot pull of (N-1) x hidden x 4 B at "
        f"{NVLINK_BYTES_PER_S / 1e9:.0f} GB/s (NVLink 4: 18 links x 25 GB/s per direction), not overlapped with "
        f"compute; latency per collective ASSUMED {ALPHAS_S[0] * 1e6:.0f} us (in-kernel signal + pull) or "
        f"{ALPHAS_S[1] * 1e6:.0f} us (NCCL-class small all-reduce)",
        "H200: same per-byte times as H100 (the measured profile shows the MXFP4 GEMV bound by instructions per "
        "weight, not bandwidth; H200 has H100's SMs and clocks); its floor uses "
        f"{GPUS['h200'].hbm_bytes_per_s / 1e12:.1f} TB/s (tilert/cost.py), H100's {GPUS['h100'].hbm_bytes_per_s / 1e12:.1f} TB/s",
        "batch 1, context 8192 (the measured rows), MXFP4 experts, fp32 KV cache and activations; memory per rank "
        "= its weights + KV cache for 8192 positions",
    ]


def table(rows: list[dict]) -> str:
    a0, a1 = ALPHAS_S
    us = lambda s: f"{s * 1e6:.0f}"  # noqa: E731
    lines = [
        f"| model | GPUs | GPU | expert load | GB per rank per token | compute ms | comm ms (alpha {us(a0)} us) | "
        f"per-token ms | tokens/s | per-token ms (alpha {us(a1)} us) | tokens/s | floor ms | floor tokens/s | "
        f"memory per rank | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s0, s1 = r["step_s"][a0], r["step_s"][a1]
        lines.append(
            f"| {r['model']} ({r['layers']}L) | {r['gpus']} | {r['gpu'].upper()} | {r['expert_load']:.2f} | "
            f"{r['bytes_per_rank'] / 1e9:.3f} | {r['compute_s'] * 1e3:.2f} | {r['comm_s'][a0] * 1e3:.2f} | "
            f"{s0 * 1e3:.2f} | {1 / s0:.0f} | {s1 * 1e3:.2f} | {1 / s1:.0f} | {r['floor_s'] * 1e3:.2f} | "
            f"{1 / r['floor_s']:.0f} | {r['memory_per_rank'] / 1e9:.0f} GB | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


def projection_rows(models=tuple(MODELS), gpus=("h100", "h200"), counts=(1, 8)) -> list[dict]:
    eff = efficiencies()
    return [project(m, n, g, eff) for m in models for g in gpus for n in counts]
