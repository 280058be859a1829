"""Train a tiny MiMo-V2 target and its DFlash drafter on the Python standard library, on a CPU, in minutes.

    python tools/train_tiny.py --out model/pretrained/mimo-tiny-py --force

Steps (deterministic for a given --seed, machine and Python installation):
1. corpus: the `.py` files of this Python's standard library (`sysconfig.get_paths()["stdlib"]`,
   without site-packages, test suites, idlelib, turtledemo and the codec tables), a fixed sorted
   list; files whose crc32(relative path) % HOLDOUT == 0 are held out for evaluation.
2. tokenizer: a byte-level BPE (`tokenizers`) trained on the training files; `<|endoftext|>` (id 0)
   separates files and is the eos token.
3. target: a MiMo-V2-Flash-architecture model (every structural feature: GA + SWA layers with SWA
   KV heads = 2 x GA KV heads, q/k head dim != v head dim, partial NeoX RoPE with per-type theta,
   sinks on SWA layers, value scale, a dense first layer then MoE layers with a sigmoid router,
   an aux-loss-free correction bias and normalised top-k), trained with AdamW by this file's own
   batched forward, which reproduces `model.reference.ReferenceDecoder` exactly (same primitives).
   It is written in the hub layout (`config.json` from `MimoConfig.to_hub_config()`, one
   `model.safetensors`, `tokenizer.json`) with the hub's storage formats (FP8 E4M3 128x128-block
   weights for q/k/v, dense FFN and experts; bf16 embed/lm_head/o_proj/norms; fp32 router, bias,
   sinks), then reloaded through `model.checkpoint.load_checkpoint` and checked against the
   training forward.
4. drafter: a DFlash drafter (`model.dflash`) trained by distillation: the (quantized, shipped)
   target generates greedy continuations of training-file prompts; the drafter learns, from the
   target's layer outputs over the committed context and the block [last token, masks], to
   predict the target's greedy tokens at block positions 1..B-1.  Its batched training forward
   is checked against `DFlashDrafter` (the inference class) on the shipped weights.  Written to
   `<out>/draft/` by `model.dflash_checkpoint.save_drafter`.
5. evaluation: held-out perplexity of the target (fp32 and as stored) and the acceptance length
   of greedy speculative decoding (`tools/speculative_eval.py`) from held-out prompts, checking
   that it commits exactly the plain greedy tokens.

Needs only torch and tokenizers (transformers is not used).  Keep `torch.set_num_threads` small
on shared machines (--threads; under heavy contention --threads 1 is often faster).
`--target-from DIR` reuses a trained target and trains only the drafter (the same drafter a full
run with the same drafter arguments would train).

The carried `model/pretrained/mimo-tiny-py` (3.3 MB; `provenance.json` records how it was made):
target 4 layers x hidden 128 (~1.7M parameters), 2000 AdamW steps of 8 x 256 tokens in ~7.5 min
on 2 idle cores, held-out loss 2.53 nats/token (ppl 12.6; FP8 storage costs 0.003 nats); drafter
2 layers, block 8, 4096 distillation sequences, 2000 steps (~13 min on 2 idle cores), greedy
speculative decoding from 24 held-out prompts x 128 tokens: acceptance length 3.2 (3.0 over 48).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint, write_checkpoint
from model.config import DENSE, FULL, SLIDING, SPARSE, MimoConfig
from model.dflash import DFlashConfig, DFlashDrafter
from model.dflash_checkpoint import load_drafter, save_drafter
from model.reference import (
    ReferenceDecoder,
    apply_rope,
    generate,
    rms_norm,
    rope_cos_sin,
    swiglu,
)
from model.weights import BF16, FP8, StoredTensor, expected_tensors, layer_prefix
from tools.speculative_eval import evaluate, speculative_generate

EOT = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__", "encodings"}
HOLDOUT = 20
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "model" / "pretrained" / "mimo-tiny-py"


def log(msg: str) -> None:
    print(msg, flush=True)


# ==== corpus and tokenizer =====================================================================

def corpus_files(root: Path) -> list[str]:
    """Sorted relative paths (posix) of the stdlib's .py files, minus tests and non-code tables."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                out.append((rel_dir / f).as_posix())
    return sorted(out)


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HOLDOUT == 0


def read_corpus(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train, held = [], []
    for rel in corpus_files(root):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if is_heldout(rel) else train).append((rel, text))
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """All files' ids, each preceded by <|endoftext|>, as one long tensor."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


# ==== the target: config and a batched training forward ======================================

def target_config(vocab_size: int, eot: int) -> MimoConfig:
    n = 4
    return MimoConfig(
        model_type="mimo_v2_flash",
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        ga_num_kv_heads=1,
        swa_num_kv_heads=2,
        head_dim=32,
        v_head_dim=16,
        sliding_window=65,  # 64 previous tokens + the query (hub sliding_window_size 64)
        layer_types=(FULL, SLIDING, SLIDING, FULL),
        mlp_layer_types=(DENSE,) + (SPARSE,) * (n - 1),
        ga_rope_theta=5_000_000.0,
        swa_rope_theta=10_000.0,
        partial_rotary_factor=0.5,
        attention_value_scale=0.707,
        rms_norm_eps=1e-5,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        max_position_embeddings=4096,
        bos_token_id=eot,
        eos_token_id=eot,
        expert_format="fp8",
    ).validate()


def batched_attention(q, k, v, visible, scale, sink):
    """q [b, nq, Tq, d], k [b, nkv, Tk, d], v [b, nkv, Tk, dv], visible bool broadcastable to
    [b, nq, Tq, Tk] -> [b, Tq, nq * dv]; the sink logit joins the softmax denominator only
    (model.reference.attention, batched)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink is not None:
        sink_col = sink.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    probs = F.softmax(scores, dim=-1)
    if sink is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs, v)  # [b, nq, Tq, dv]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _split(x: torch.Tensor, d: int) -> torch.Tensor:
    """[b, T, heads * d] -> [b, heads, T, d]."""
    return x.view(x.shape[0], x.shape[1], -1, d).transpose(1, 2)


class TargetLayer(nn.Module):
    def __init__(self, cfg: MimoConfig, i: int, init):
        super().__init__()
        H, nq, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads(i)
        out_std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
        self.input_norm = nn.Parameter(torch.ones(H))
        self.post_norm = nn.Parameter(torch.ones(H))
        self.wq = init((nq * cfg.head_dim, H))
        self.wk = init((kv * cfg.head_dim, H))
        self.wv = init((kv * cfg.v_head_dim, H))
        self.wo = init((H, nq * cfg.v_head_dim), out_std)
        self.sink = nn.Parameter(torch.zeros(nq)) if cfg.has_sink(i) else None
        if cfg.is_moe(i):
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            self.router = init((E, H))
            self.register_buffer("bias", torch.zeros(E))  # e_score_correction_bias (aux-free update)
            self.gate = init((E, I, H))
            self.up = init((E, I, H))
            self.down = init((E, H, I), out_std)
        else:
            Fd = cfg.intermediate_size
            self.gate, self.up, self.down = init((Fd, H)), init((Fd, H)), init((H, Fd), out_std)


class Target(nn.Module):
    """MiMo-V2 with parameters in fp32, a batched forward and an optional batched KV cache."""

    def __init__(self, cfg: MimoConfig, seed: int):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)

        def init(shape, std=0.02):
            return nn.Parameter(torch.randn(shape, generator=g) * std)

        self.embed = init((cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(TargetLayer(cfg, i, init) for i in range(cfg.num_hidden_layers))
        self.final_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = init((cfg.vocab_size, cfg.hidden_size))
        self.expert_load: list[torch.Tensor] = []

    # ---- forward ----
    def forward(self, tokens: torch.Tensor, start: int = 0, cache: list | None = None,
                capture: bool = False):
        """Logits [b, T, V] for tokens [b, T] at positions start..; with capture also the hidden state
        after every layer (before the final norm), as ReferenceDecoder.forward(capture_layers=...)."""
        cfg = self.cfg
        b, T = tokens.shape
        pos = torch.arange(start, start + T)
        x = self.embed[tokens]
        hidden = []
        self.expert_load = []
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L.input_norm, cfg.rms_norm_eps)
            x = x + self._attention(i, L, h, pos, cache)
            h = rms_norm(x, L.post_norm, cfg.rms_norm_eps)
            if cfg.is_moe(i):
                x = x + self._moe(L, h.reshape(b * T, -1)).view(b, T, -1)
            else:
                x = x + swiglu(h, L.gate, L.up, L.down)
            if capture:
                hidden.append(x)
        logits = F.linear(rms_norm(x, self.final_norm, cfg.rms_norm_eps), self.lm_head)
        return (logits, hidden) if capture else logits

    def _attention(self, i, L, h, pos, cache):
        cfg = self.cfg
        q = _split(F.linear(h, L.wq), cfg.head_dim)
        k = _split(F.linear(h, L.wk), cfg.head_dim)
        v = _split(F.linear(h, L.wv), cfg.v_head_dim) * cfg.attention_value_scale
        cos, sin = rope_cos_sin(pos, cfg.rotary_dim, cfg.rope_theta(i), h.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start, end = int(pos[0]), int(pos[-1]) + 1
        if cache is not None:
            kc, vc = cache[i]
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            k, v = kc[:, :, :end], vc[:, :, :end]
            key_pos = torch.arange(end)
        else:
            key_pos = pos
        visible = key_pos[None, :] <= pos[:, None]
        if cfg.is_swa(i):
            visible &= key_pos[None, :] > pos[:, None] - cfg.sliding_window
        o = batched_attention(q, k, v, visible, cfg.softmax_scale, L.sink)
        return F.linear(o, L.wo)

    def _moe(self, L, h):
        cfg = self.cfg
        scores = F.linear(h.to(torch.float32), L.router).sigmoid()
        idx = torch.topk(scores + L.bias, cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        w = w * cfg.routed_scaling_factor
        out = torch.zeros(h.shape, dtype=torch.float32)
        for e in range(cfg.n_routed_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                y = swiglu(h[tok], L.gate[e], L.up[e], L.down[e])
                out = out.index_add(0, tok, y.to(torch.float32) * w[tok, slot, None])
        self.expert_load.append(torch.bincount(idx.reshape(-1), minlength=cfg.n_routed_experts))
        return out.to(h.dtype)

    def new_cache(self, b: int, max_len: int) -> list:
        cfg = self.cfg
        return [(torch.zeros(b, cfg.num_kv_heads(i), max_len, cfg.head_dim),
                 torch.zeros(b, cfg.num_kv_heads(i), max_len, cfg.v_head_dim))
                for i in range(cfg.num_hidden_layers)]

    # ---- hub names ----
    def hub_state(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        s = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.final_norm,
             "lm_head.weight": self.lm_head}
        for i, L in enumerate(self.layers):
            p = layer_prefix(i)
            s.update({f"{p}.input_layernorm.weight": L.input_norm, f"{p}.post_attention_layernorm.weight": L.post_norm,
                      f"{p}.self_attn.q_proj.weight": L.wq, f"{p}.self_attn.k_proj.weight": L.wk,
                      f"{p}.self_attn.v_proj.weight": L.wv, f"{p}.self_attn.o_proj.weight": L.wo})
            if L.sink is not None:
                s[f"{p}.self_attn.attention_sink_bias"] = L.sink
            if cfg.is_moe(i):
                s[f"{p}.mlp.gate.weight"] = L.router
                s[f"{p}.mlp.gate.e_score_correction_bias"] = L.bias
                for e in range(cfg.n_routed_experts):
                    q = f"{p}.mlp.experts.{e}"
                    s.update({f"{q}.gate_proj.weight": L.gate[e], f"{q}.up_proj.weight": L.up[e],
                              f"{q}.down_proj.weight": L.down[e]})
            else:
                s.update({f"{p}.mlp.gate_proj.weight": L.gate, f"{p}.mlp.up_proj.weight": L.up,
                          f"{p}.mlp.down_proj.weight": L.down})
        return {n: t.detach().clone().to(torch.float32) for n, t in s.items()}

    @torch.no_grad()
    def load_hub_state(self, w: dict[str, torch.Tensor]) -> None:
        """Set every parameter from canonical-name fp32 tensors (e.g. the dequantized checkpoint)."""
        cfg = self.cfg
        self.embed.copy_(w["model.embed_tokens.weight"])
        self.final_norm.copy_(w["model.norm.weight"])
        self.lm_head.copy_(w["lm_head.weight"])
        for i, L in enumerate(self.layers):
            p = layer_prefix(i)
            L.input_norm.copy_(w[f"{p}.input_layernorm.weight"])
            L.post_norm.copy_(w[f"{p}.post_attention_layernorm.weight"])
            for attr, m in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
                getattr(L, attr).copy_(w[f"{p}.self_attn.{m}_proj.weight"])
            if L.sink is not None:
                L.sink.copy_(w[f"{p}.self_attn.attention_sink_bias"])
            if cfg.is_moe(i):
                L.router.copy_(w[f"{p}.mlp.gate.weight"])
                L.bias.copy_(w[f"{p}.mlp.gate.e_score_correction_bias"])
                for proj, attr in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                    getattr(L, attr).copy_(torch.stack([w[f"{p}.mlp.experts.{e}.{proj}.weight"]
                                                        for e in range(cfg.n_routed_experts)]))
            else:
                for proj, attr in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                    getattr(L, attr).copy_(w[f"{p}.mlp.{proj}.weight"])


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(params: list[tuple[str, nn.Parameter]], lr: float, wd: float):
    decay = [p for n, p in params if p.dim() >= 2 and "embed" not in n and "mask_embedding" not in n]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and "embed" not in n and "mask_embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def eval_loss(model: Target, stream: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """Mean next-token cross-entropy (nats) over consecutive held-out windows."""
    n = min(max_windows, (len(stream) - 1) // seq_len)
    total, count = 0.0, 0
    for k in range(0, n, 8):
        starts = torch.arange(k, min(n, k + 8)) * seq_len
        idx = starts[:, None] + torch.arange(seq_len + 1)
        x = stream[idx]
        logits = model(x[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


def train_target(cfg: MimoConfig, stream: torch.Tensor, held: torch.Tensor, args) -> Target:
    model = Target(cfg, args.seed)
    opt = make_optimizer(list(model.named_parameters()), args.lr, args.weight_decay)
    g = torch.Generator().manual_seed(args.seed + 1)
    T, b = args.seq_len, args.batch
    moe_layers = [L for i, L in enumerate(model.layers) if cfg.is_moe(i)]
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, len(stream) - T - 1, (b,), generator=g)
        x = stream[starts[:, None] + torch.arange(T + 1)]
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing: nudge the selection bias toward even load
            for L, load in zip(moe_layers, model.expert_load):
                L.bias += args.bias_rate * torch.sign(load.float().mean() - load.float())
        if step % args.log_every == 0 or step == args.steps - 1:
            log(f"  target step {step:5d}/{args.steps}  loss {loss.item():.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.perf_counter() - t0:6.0f}s")
    log(f"target trained in {time.perf_counter() - t0:.0f}s")
    return model


# ==== the drafter: a batched training forward ==================================================

def drafter_config(target: MimoConfig, args) -> DFlashConfig:
    return DFlashConfig(
        num_layers=args.draft_layers,
        hidden_size=target.hidden_size,
        num_heads=args.draft_heads,
        num_kv_heads=args.draft_kv_heads,
        head_dim=args.draft_head_dim,
        v_head_dim=args.draft_head_dim,
        intermediate_size=args.draft_intermediate,
        target_layers=DFlashConfig.spread_layers(target.num_hidden_layers, args.draft_target_layers),
        vocab_size=target.vocab_size,
        block_size=args.block_size,
        partial_rotary_factor=0.5,
        rope_theta=10_000.0,
        sliding_window=args.draft_window,
        sink=True,
        value_scale=target.attention_value_scale,
        rms_norm_eps=target.rms_norm_eps,
    ).validate()


class DraftLayer(nn.Module):
    def __init__(self, d: DFlashConfig, init, out_std):
        super().__init__()
        H = d.hidden_size
        self.input_norm = nn.Parameter(torch.ones(H))
        self.post_norm = nn.Parameter(torch.ones(H))
        self.wq = init((d.num_heads * d.head_dim, H))
        self.wk = init((d.num_kv_heads * d.head_dim, H))
        self.wv = init((d.num_kv_heads * d.v_head_dim, H))
        self.wo = init((H, d.num_heads * d.v_head_dim), out_std)
        self.sink = nn.Parameter(torch.zeros(d.num_heads)) if d.sink else None
        self.gate = init((d.intermediate_size, H))
        self.up = init((d.intermediate_size, H))
        self.down = init((H, d.intermediate_size), out_std)


class Drafter(nn.Module):
    """DFlash drafter for training: many blocks of many sequences in one forward.

    Same arithmetic as model.dflash.DFlashDrafter: context feature = hidden_norm(fc(cat target
    layers)); per layer context K/V from that feature (no input norm), block Q/K/V from the
    normed block; a block query at position p sees context positions < the block start (and
    > p - sliding_window) and every position of its own block, no other block.
    """

    def __init__(self, d: DFlashConfig, embed: torch.Tensor, lm_head: torch.Tensor, seed: int):
        super().__init__()
        self.d = d
        g = torch.Generator().manual_seed(seed)

        def init(shape, std=0.02):
            return nn.Parameter(torch.randn(shape, generator=g) * std)

        H = d.hidden_size
        self.register_buffer("embed", embed.detach().clone())
        self.register_buffer("lm_head", lm_head.detach().clone())
        self.fc = init((H, len(d.target_layers) * H))
        self.hidden_norm = nn.Parameter(torch.ones(H))
        self.mask_embedding = nn.Parameter(torch.randn(H, generator=g) * embed.std().item())
        self.final_norm = nn.Parameter(torch.ones(H))
        self.layers = nn.ModuleList(DraftLayer(d, init, 0.02 / math.sqrt(2 * d.num_layers))
                                    for _ in range(d.num_layers))

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """feats [b, L, n_target_layers * H] (target layer outputs, concatenated in target_layers order),
        tokens [b, L], starts [b, N] block starts (the last committed token's position) -> logits
        [b, N, B-1, V] of block positions 1..B-1 (the drafts)."""
        d = self.d
        b, L = tokens.shape
        N, B = starts.shape[1], d.block_size
        ctx = rms_norm(F.linear(feats, self.fc), self.hidden_norm, d.rms_norm_eps)  # [b, L, H]
        ctx_pos = torch.arange(L)
        cos_c, sin_c = rope_cos_sin(ctx_pos, d.rotary_dim, d.rope_theta, ctx.dtype)
        qpos = (starts[..., None] + torch.arange(B)).reshape(b, N * B)
        cos_b, sin_b = rope_cos_sin(qpos.reshape(-1), d.rotary_dim, d.rope_theta, ctx.dtype)
        cos_b, sin_b = cos_b.view(b, 1, N * B, -1), sin_b.view(b, 1, N * B, -1)

        qstart = starts.repeat_interleave(B, dim=1)  # [b, N*B]
        ctx_vis = ctx_pos[None, None, :] < qstart[..., None]
        if d.sliding_window is not None:
            ctx_vis &= ctx_pos[None, None, :] > qpos[..., None] - d.sliding_window
        blk = torch.arange(N).repeat_interleave(B)
        blk_vis = (blk[:, None] == blk[None, :]).expand(b, -1, -1)
        visible = torch.cat([ctx_vis, blk_vis], dim=-1)[:, None]  # [b, 1, N*B, L + N*B]

        last = self.embed[tokens.gather(1, starts)]  # [b, N, H]
        x = torch.cat([last[:, :, None], self.mask_embedding.expand(b, N, B - 1, -1)], dim=2).reshape(b, N * B, -1)
        for layer in self.layers:
            kc = apply_rope(_split(F.linear(ctx, layer.wk), d.head_dim), cos_c, sin_c)
            vc = _split(F.linear(ctx, layer.wv), d.v_head_dim) * d.value_scale
            h = rms_norm(x, layer.input_norm, d.rms_norm_eps)
            q = apply_rope(_split(F.linear(h, layer.wq), d.head_dim), cos_b, sin_b)
            k = apply_rope(_split(F.linear(h, layer.wk), d.head_dim), cos_b, sin_b)
            v = _split(F.linear(h, layer.wv), d.v_head_dim) * d.value_scale
            o = batched_attention(q, torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2), visible,
                                  d.softmax_scale, layer.sink)
            x = x + F.linear(o, layer.wo)
            x = x + swiglu(rms_norm(x, layer.post_norm, d.rms_norm_eps), layer.gate, layer.up, layer.down)
        x = x.view(b, N, B, -1)[:, :, 1:]  # the draft positions (position 0 holds the last token)
        return F.linear(rms_norm(x, self.final_norm, d.rms_norm_eps), self.lm_head)

    def canonical_state(self) -> dict[str, torch.Tensor]:
        s = {"fc.weight": self.fc, "hidden_norm.weight": self.hidden_norm, "mask_embedding": self.mask_embedding,
             "norm.weight": self.final_norm}
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}"
            s.update({f"{p}.input_layernorm.weight": layer.input_norm,
                      f"{p}.post_attention_layernorm.weight": layer.post_norm,
                      f"{p}.self_attn.q_proj.weight": layer.wq, f"{p}.self_attn.k_proj.weight": layer.wk,
                      f"{p}.self_attn.v_proj.weight": layer.wv, f"{p}.self_attn.o_proj.weight": layer.wo,
                      f"{p}.mlp.gate_proj.weight": layer.gate, f"{p}.mlp.up_proj.weight": layer.up,
                      f"{p}.mlp.down_proj.weight": layer.down})
            if layer.sink is not None:
                s[f"{p}.self_attn.attention_sink_bias"] = layer.sink
        return s

    @torch.no_grad()
    def load_canonical(self, w: dict[str, torch.Tensor]) -> None:
        for name, p in self.canonical_state().items():
            p.copy_(w[name])


@torch.no_grad()
def generate_continuations(model: Target, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuations of a batch of prompts [b, P] with a KV cache -> tokens [b, P + new_tokens]."""
    b, P = prompts.shape
    cache = model.new_cache(b, P + new_tokens)
    logits = model(prompts, 0, cache)
    out = [prompts]
    tok = logits[:, -1].argmax(-1)
    for k in range(new_tokens):
        out.append(tok[:, None])
        if k + 1 < new_tokens:
            tok = model(tok[:, None], P + k, cache)[:, -1].argmax(-1)
    return torch.cat(out, dim=1)


@torch.no_grad()
def distillation_data(model: Target, stream: torch.Tensor, d: DFlashConfig, args, seed: int):
    """Target-generated sequences: tokens [M, L], features [M, L, n*H] (fp16), the target's last-layer
    output [M, L, H] (fp16, for its next-token distributions) and the first block start of each row."""
    g = torch.Generator().manual_seed(seed)
    L, per = args.draft_seq_len, args.gen_batch
    prompt_lens = [int(p) for p in args.prompt_lens.split(",")]
    toks, feats, lasts, firsts = [], [], [], []
    t0 = time.perf_counter()
    for k in range(args.gen_batches):
        P = prompt_lens[k % len(prompt_lens)]
        starts = torch.randint(0, len(stream) - P, (per,), generator=g)
        seq = generate_continuations(model, stream[starts[:, None] + torch.arange(P)], L - P)
        _, hidden = model(seq, capture=True)
        toks.append(seq)
        feats.append(torch.cat([hidden[l] for l in d.target_layers], dim=-1).to(torch.float16))
        lasts.append(hidden[-1].to(torch.float16))
        firsts.append(torch.full((per,), P))
        if k % 4 == 0:
            log(f"  generated {(k + 1) * per} sequences ({time.perf_counter() - t0:.0f}s)")
    log(f"distillation data: {args.gen_batches * per} sequences of {L} tokens in {time.perf_counter() - t0:.0f}s")
    return torch.cat(toks), torch.cat(feats), torch.cat(lasts), torch.cat(firsts)


def sample_starts(first: torch.Tensor, L: int, B: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n block starts per row in [first, L - B], without replacement."""
    rows = []
    for f in first.tolist():
        span = L - B - f + 1
        rows.append(f + torch.randperm(span, generator=g)[:n])
    return torch.stack(rows)


def teacher_logits(target: Target, last: torch.Tensor, starts: torch.Tensor, B: int) -> torch.Tensor:
    """The target's logits predicting block positions 1..B-1: at positions start..start+B-2 [b, N, B-1, V]."""
    pos = starts[..., None] + torch.arange(B - 1)
    h = last.gather(1, pos.reshape(last.shape[0], -1, 1).expand(-1, -1, last.shape[-1])).float()
    logits = F.linear(rms_norm(h, target.final_norm.detach(), target.cfg.rms_norm_eps), target.lm_head.detach())
    return logits.view(*pos.shape, -1)


def draft_loss(logits: torch.Tensor, tokens: torch.Tensor, starts: torch.Tensor, decay: float,
               teacher: torch.Tensor | None = None, soft: float = 0.0):
    """Position-weighted loss of the draft logits [b, N, B-1, V] (block positions 1..B-1): (1 - soft) x CE against the sequence's next
    tokens (the target's greedy chain) + soft x KL(target || drafter); also the per-position
    accuracy [B-1] and the prefix-correctness matrix [n_blocks, B-1]."""
    B = logits.shape[2] + 1
    pos = starts[..., None] + torch.arange(1, B)  # [b, N, B-1]
    labels = tokens.gather(1, pos.reshape(tokens.shape[0], -1)).view_as(pos)
    lg = logits
    per = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1), reduction="none").view_as(labels)
    if teacher is not None and soft > 0:
        logq = F.log_softmax(lg, dim=-1)
        logp = F.log_softmax(teacher, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        per = (1 - soft) * per + soft * kl
    w = torch.exp(-torch.arange(B - 1, dtype=torch.float32) / decay)
    loss = (per * w).mean(dim=(0, 1)).sum() / w.sum()
    right = lg.argmax(-1) == labels
    return loss, right.float().mean(dim=(0, 1)), right.reshape(-1, B - 1)


def expected_acceptance(acc_chain: torch.Tensor) -> float:
    """1 + sum_k P(first k drafts all right), from per-block prefix correctness [n, B-1] (bool)."""
    return 1.0 + acc_chain.float().cumprod(dim=1).mean(dim=0).sum().item()


def train_drafter(d: DFlashConfig, target: Target, data, held_data, args) -> Drafter:
    toks, feats, lasts, firsts = data
    M, L = toks.shape
    drafter = Drafter(d, target.embed, target.lm_head, args.seed + 2)
    if args.fc_init == "last" and target.cfg.num_hidden_layers - 1 in d.target_layers:
        # Start with the context feature = the target's normed last-layer output (its prediction).
        with torch.no_grad():
            H, k = d.hidden_size, d.target_layers.index(target.cfg.num_hidden_layers - 1)
            drafter.fc[:, k * H:(k + 1) * H] += torch.eye(H) * args.fc_init_scale
            drafter.hidden_norm.copy_(target.final_norm)
    opt = make_optimizer(list(drafter.named_parameters()), args.draft_lr, args.weight_decay)
    g = torch.Generator().manual_seed(args.seed + 3)
    t0 = time.perf_counter()
    for step in range(args.draft_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.draft_steps, args.draft_lr, args.warmup)
        rows = torch.randint(0, M, (args.draft_batch,), generator=g)
        starts = sample_starts(firsts[rows], L, d.block_size, args.blocks_per_seq, g)
        logits = drafter(feats[rows].float(), toks[rows], starts)
        teacher = teacher_logits(target, lasts[rows], starts, d.block_size) if args.soft > 0 else None
        loss, acc, _ = draft_loss(logits, toks[rows], starts, args.loss_decay, teacher, args.soft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.draft_steps - 1:
            log(f"  drafter step {step:5d}/{args.draft_steps}  loss {loss.item():.3f}  "
                f"acc@1 {acc[0]:.2f} acc@{d.block_size - 1} {acc[-1]:.2f}  {time.perf_counter() - t0:6.0f}s")
    log(f"drafter trained in {time.perf_counter() - t0:.0f}s")
    with torch.no_grad():
        htoks, hfeats, _, hfirsts = held_data
        gh = torch.Generator().manual_seed(args.seed + 4)
        starts = sample_starts(hfirsts, L, d.block_size, args.blocks_per_seq, gh)
        logits = drafter(hfeats.float(), htoks, starts)
        loss, acc, right = draft_loss(logits, htoks, starts, args.loss_decay)
        log(f"drafter on held-out-prompt continuations: CE {loss.item():.3f}, per-position accuracy "
            f"{[round(a, 2) for a in acc.tolist()]}, position-averaged acceptance {expected_acceptance(right):.2f}")
    return drafter


# ==== export, reload and checks =================================================================

def stored_target(cfg: MimoConfig, state: dict[str, torch.Tensor], fp8: bool) -> dict[str, StoredTensor]:
    out = {}
    for spec in expected_tensors(cfg):
        fmt = spec.fmt if fp8 or spec.fmt != FP8 else BF16
        out[spec.name] = StoredTensor.from_float(state[spec.name], fmt)
    return out


def write_target(cfg: MimoConfig, stored: dict[str, StoredTensor], tok, out: Path) -> None:
    write_checkpoint(cfg, stored, out, shard_bytes=2**40, single_file=True,
                     extra=lambda tmp: tok.save(str(tmp / "tokenizer.json")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--target-from", type=Path, help="reuse the target (and tokenizer) of this checkpoint "
                    "directory: train only the drafter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--vocab", type=int, default=1024)
    # target
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="aux-loss-free correction-bias step")
    ap.add_argument("--target-only", action="store_true", help="stop after writing the target")
    ap.add_argument("--bf16-linears", action="store_true",
                    help="store q/k/v, dense FFN and experts in bf16 instead of the hub's FP8")
    # drafter
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--draft-intermediate", type=int, default=384)
    ap.add_argument("--draft-heads", type=int, default=8)
    ap.add_argument("--draft-kv-heads", type=int, default=8)
    ap.add_argument("--draft-head-dim", type=int, default=32)
    ap.add_argument("--draft-target-layers", type=int, default=4, help="how many target layers (spread) condition it")
    ap.add_argument("--draft-window", type=int, default=128)
    ap.add_argument("--draft-seq-len", type=int, default=224)
    ap.add_argument("--prompt-lens", default="16,32,64,96")
    ap.add_argument("--gen-batches", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--draft-steps", type=int, default=2000)
    ap.add_argument("--draft-batch", type=int, default=16)
    ap.add_argument("--blocks-per-seq", type=int, default=24)
    ap.add_argument("--draft-lr", type=float, default=3e-3)
    ap.add_argument("--loss-decay", type=float, default=4.0)
    ap.add_argument("--fc-init", choices=["random", "last"], default="random")
    ap.add_argument("--fc-init-scale", type=float, default=1.0)
    ap.add_argument("--soft", type=float, default=0.8, help="weight of KL(target || drafter) against hard CE")
    # evaluation
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--eval-prompt-len", type=int, default=48)
    ap.add_argument("--eval-new-tokens", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.out.exists():
        if not args.force:
            raise SystemExit(f"{args.out} exists; pass --force to replace it")
        shutil.rmtree(args.out)
    t_all = time.perf_counter()
    phase: dict[str, float] = {}

    # 1-2. corpus and tokenizer
    train_files, held_files = read_corpus(args.stdlib)
    log(f"corpus: {args.stdlib}: {len(train_files)} training files "
        f"({sum(len(t) for _, t in train_files) / 1e6:.1f} MB), {len(held_files)} held out "
        f"({sum(len(t) for _, t in held_files) / 1e6:.1f} MB)")
    t0 = time.perf_counter()
    if args.target_from:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.target_from / "tokenizer.json"))
    else:
        tok = train_tokenizer([t for _, t in train_files], args.vocab)
    stream = token_stream(tok, [t for _, t in train_files])
    held = token_stream(tok, [t for _, t in held_files])
    eot = tok.token_to_id(EOT)
    log(f"tokenizer: vocab {tok.get_vocab_size()}, {len(stream) / 1e6:.2f}M training tokens "
        f"({sum(len(t.encode()) for _, t in train_files) / len(stream):.2f} bytes/token), "
        f"{len(held) / 1e6:.2f}M held-out tokens ({time.perf_counter() - t0:.0f}s)")

    # 3. target
    if args.target_from:  # reuse a trained target, train only the drafter
        cfg = load_checkpoint(args.target_from)[0]
        model = Target(cfg, args.seed)
        shutil.copytree(args.target_from, args.out, ignore=shutil.ignore_patterns("draft"))
        loss_fp32 = float("nan")
    else:
        cfg = target_config(tok.get_vocab_size(), eot)
        t0 = time.perf_counter()
        model = train_target(cfg, stream, held, args)
        phase["target_training"] = time.perf_counter() - t0
        model.eval()
        stored = stored_target(cfg, model.hub_state(), fp8=not args.bf16_linears)
        write_target(cfg, stored, tok, args.out)
        loss_fp32 = eval_loss(model, held, args.seq_len, 64)
    x = held[1000:1000 + 200]
    with torch.no_grad():
        logits_fp32 = model(x[None])[0]  # the trained weights before storage (or the reused target's)

    cfg2, weights = load_checkpoint(args.out)
    assert cfg2 == cfg, (cfg2, cfg)
    model.load_hub_state({n: t.dequantize(torch.float32) for n, t in weights.items()})
    model.eval()
    loss_stored = eval_loss(model, held, args.seq_len, 64)
    fmts = sorted({t.fmt for t in weights.values()})
    log(f"held-out loss: fp32 weights {loss_fp32:.3f} nats/token (ppl {math.exp(loss_fp32):.2f}); "
        f"as stored ({'/'.join(fmts)}) {loss_stored:.3f} (ppl {math.exp(loss_stored):.2f})")

    ref = ReferenceDecoder(cfg2, weights, torch.float32, max_seq_len=4096)
    with torch.no_grad():
        ref_logits, ref_hidden = ref.forward(x, capture_layers=list(range(cfg.num_hidden_layers)))
        ours, hidden = model(x[None], capture=True)
    err = rel_err(ours[0], ref_logits)
    herr = max(rel_err(hidden[l][0], ref_hidden[l]) for l in range(cfg.num_hidden_layers))
    log(f"reload check: ReferenceDecoder(load_checkpoint) vs training forward on the stored weights: logits rel "
        f"err {err:.2e}, hidden rel err {herr:.2e}; vs the fp32 trained weights (storage rounding): logits rel err "
        f"{rel_err(ref_logits, logits_fp32):.2e}, same argmax {(ref_logits.argmax(-1) == logits_fp32.argmax(-1)).float().mean():.3f}")
    assert err < 1e-4 and herr < 1e-4, "the training forward does not match the reference decoder"
    for prompt in ("def ", "import os\n", "class "):
        ids = tok.encode(prompt).ids
        log(f"sample greedy {prompt!r}: {prompt + tok.decode(generate(ref, ids, 48))!r}")

    if args.target_only:
        log(f"target written to {args.out} ({time.perf_counter() - t_all:.0f}s); --target-only: no drafter")
        return 0

    # 4. drafter
    d = drafter_config(cfg, args)
    t0 = time.perf_counter()
    data = distillation_data(model, stream, d, args, args.seed + 10)
    held_args = argparse.Namespace(**{**vars(args), "gen_batches": len(args.prompt_lens.split(","))})
    held_data = distillation_data(model, held, d, held_args, args.seed + 11)
    phase["distillation_data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    drafter = train_drafter(d, model, data, held_data, args)
    phase["drafter_training"] = time.perf_counter() - t0
    save_drafter(d, {n: p.detach() for n, p in drafter.canonical_state().items()}, args.out / "draft")
    dcfg, dweights = load_drafter(args.out / "draft")
    assert dcfg == d
    drafter.load_canonical({n: t.dequantize(torch.float32) for n, t in dweights.items()})
    inference = DFlashDrafter(dcfg, dweights, weights["model.embed_tokens.weight"], weights["lm_head.weight"])
    htoks, _, _, hfirsts = held_data
    worst = 0.0
    with torch.no_grad():
        for row in range(4):
            s = int(hfirsts[row]) + 7 * row
            _, hid = model(htoks[row:row + 1], capture=True)  # fp32 features (the stored ones are fp16)
            feats = torch.cat([hid[l] for l in dcfg.target_layers], dim=-1)
            ours = drafter(feats, htoks[row:row + 1], torch.tensor([[s]]))[0, 0]
            inference.reset()
            theirs = inference.draft_logits(int(htoks[row, s]), {l: hid[l][0, :s] for l in dcfg.target_layers}, s)
            worst = max(worst, rel_err(ours, theirs))
    log(f"drafter check: DFlashDrafter (loaded) vs training forward: draft logits rel err {worst:.2e}")
    assert worst < 1e-4, "the drafter's training forward does not match DFlashDrafter"

    # 5. speculative decoding from held-out prompts
    gp = torch.Generator().manual_seed(args.seed + 20)
    P = args.eval_prompt_len
    starts = torch.randint(0, len(held) - P, (args.eval_prompts,), generator=gp)
    prompts = [held[s:s + P].tolist() for s in starts.tolist()]
    max_len = P + max(args.eval_new_tokens, 64) + 2 * d.block_size
    target = ReferenceDecoder(cfg2, weights, torch.float32, max_seq_len=max_len)
    inference = DFlashDrafter(dcfg, dweights, weights["model.embed_tokens.weight"], weights["lm_head.weight"],
                              max_context=max_len)
    rep = evaluate(target, inference, prompts, args.eval_new_tokens)
    log(f"speculative decoding, {len(prompts)} held-out prompts x {args.eval_new_tokens} new tokens: "
        f"acceptance length {rep.acceptance_length:.2f} (block {d.block_size}; per prompt min "
        f"{min(rep.per_prompt):.2f} max {max(rep.per_prompt):.2f}), {rep.rounds} rounds, "
        f"mismatches vs plain greedy: {rep.mismatches}; time spec {rep.spec_seconds:.1f}s plain {rep.plain_seconds:.1f}s")
    for prompt in ("def ", "import os\n"):
        res = speculative_generate(target, inference, tok.encode(prompt).ids, 64)
        log(f"speculative {prompt!r} (acceptance {res.acceptance_length:.2f}): {prompt + tok.decode(res.tokens)!r}")

    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    sizes = ", ".join(f"{p.relative_to(args.out)} {p.stat().st_size / 1e6:.2f} MB" for p in files)
    log(f"wrote {args.out}: {sizes}; total {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")
    summary = {"heldout_loss_fp32": loss_fp32, "heldout_loss_stored": loss_stored,
               "acceptance_length": rep.acceptance_length, "acceptance_rounds": rep.rounds,
               "eval_prompts": len(prompts), "eval_new_tokens": args.eval_new_tokens, "mismatches": rep.mismatches,
               "seconds": {**phase, "total": time.perf_counter() - t_all}}
    provenance = {"made_by": "tools/train_tiny.py", "args": {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()},
                  "python": sys.version.split()[0], "torch": torch.__version__, "metrics": summary}
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log("summary " + json.dumps(summary))
    return 0 if rep.mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
