"""A readable PyTorch reference decoder for MiMo-V2, built from a MimoConfig and stored weights.

This is the ground truth the tile schedules are checked against, so it favours plain code over
speed: every weight is dequantized once, each layer keeps the full history of its (rotated) keys
and (scaled) values, and masks are built explicitly.  The arithmetic mirrors transformers'
`MiMoV2FlashForCausalLM` (eager attention), including where it casts:
- RMSNorm runs in fp32 and casts back before the weight multiply;
- RoPE cos/sin are computed in fp32 from fp32 positions, then cast to the model dtype;
- the router (weight, logits, sigmoid, correction bias, top-k weights) stays in fp32, and the
  expert outputs are weighted and summed in fp32, rounded once (transformers' default
  `grouped_mm` experts path; its eager loop would round after every expert instead);
- attention sinks are cast to the model dtype and softmax runs in the model dtype.
In fp32 the result matches transformers to rounding.

The attention primitives below are shared with the DFlash drafter (`model.dflash`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import MimoConfig
from model.weights import StoredTensor, layer_prefix
from tilert.sampling import choose

# ---- primitives -------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, cast back to the input dtype before the weight multiply (as transformers)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style cos/sin [T, rotary_dim] for integer positions; fp32 maths, then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [heads, T, d] (rotate_half); the rest pass through."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, x_pass], dim=-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-query attention with an optional per-head sink logit.

    q [nq, Tq, d], k [nkv, Tk, d], v [nkv, Tk, dv], visible bool [Tq, Tk] -> [Tq, nq * dv].
    The sink joins the softmax denominator only (it has no value) and is not scaled.
    """
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink is not None:
        sink_col = sink.to(scores.dtype).view(-1, 1, 1).expand(-1, scores.shape[1], 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    probs = F.softmax(scores, dim=-1)
    if sink is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs, v)  # [nq, Tq, dv]
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[T, heads * head_dim] -> [heads, T, head_dim]."""
    return x.view(x.shape[0], -1, head_dim).transpose(0, 1)


# ---- the model ----------------------------------------------------------------------------------


@dataclass
class _Moe:
    router: torch.Tensor  # [E, H] fp32
    bias: torch.Tensor  # [E] fp32 e_score_correction_bias
    gate: torch.Tensor  # [E, I, H]
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    sink: torch.Tensor | None
    dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (gate, up, down)
    moe: _Moe | None
    k_cache: torch.Tensor  # [nkv, max_seq_len, head_dim], rotated keys
    v_cache: torch.Tensor  # [nkv, max_seq_len, v_head_dim], values times attention_value_scale


class ReferenceDecoder:
    """MiMo-V2 decoder with a per-layer KV cache: forward() feeds new tokens after the cached ones."""

    def __init__(
        self,
        cfg: MimoConfig,
        weights: dict[str, StoredTensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_seq_len: int = 4096,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_seq_len = max_seq_len
        self.seq_len = 0

        def w(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            return weights[name].dequantize(as_dtype).to(self.device)

        self.embed = w("model.embed_tokens.weight")
        self.final_norm = w("model.norm.weight")
        self.lm_head = w("lm_head.weight")
        self.layers = [self._load_layer(i, w) for i in range(cfg.num_hidden_layers)]

    def _load_layer(self, i: int, w) -> _Layer:
        cfg, p = self.cfg, layer_prefix(i)
        dense = moe = None
        if cfg.is_moe(i):
            experts = range(cfg.n_routed_experts)
            stack = lambda proj: torch.stack([w(f"{p}.mlp.experts.{e}.{proj}.weight") for e in experts])
            moe = _Moe(
                # transformers keeps the router in fp32 whatever the model dtype.
                router=w(f"{p}.mlp.gate.weight", torch.float32),
                bias=w(f"{p}.mlp.gate.e_score_correction_bias", torch.float32),
                gate=stack("gate_proj"),
                up=stack("up_proj"),
                down=stack("down_proj"),
            )
        else:
            dense = tuple(w(f"{p}.mlp.{proj}.weight") for proj in ("gate_proj", "up_proj", "down_proj"))
        kv = cfg.num_kv_heads(i)
        return _Layer(
            input_norm=w(f"{p}.input_layernorm.weight"),
            post_norm=w(f"{p}.post_attention_layernorm.weight"),
            wq=w(f"{p}.self_attn.q_proj.weight"),
            wk=w(f"{p}.self_attn.k_proj.weight"),
            wv=w(f"{p}.self_attn.v_proj.weight"),
            wo=w(f"{p}.self_attn.o_proj.weight"),
            sink=w(f"{p}.self_attn.attention_sink_bias") if cfg.has_sink(i) else None,
            dense=dense,
            moe=moe,
            k_cache=torch.zeros(kv, self.max_seq_len, cfg.head_dim, dtype=self.dtype, device=self.device),
            v_cache=torch.zeros(kv, self.max_seq_len, cfg.v_head_dim, dtype=self.dtype, device=self.device),
        )

    # ---- cache control ----
    def reset(self) -> None:
        self.seq_len = 0

    def truncate(self, seq_len: int) -> None:
        """Forget every position >= seq_len (rejected speculative tokens); stale entries get overwritten."""
        if not 0 <= seq_len <= self.seq_len:
            raise ValueError(f"truncate({seq_len}): cache holds {self.seq_len} positions")
        self.seq_len = seq_len

    # ---- forward ----
    @torch.no_grad()
    def forward(self, tokens, capture_layers: list[int] | None = None):
        """Logits [T, vocab] for T new tokens at positions seq_len..seq_len+T-1.

        With capture_layers, also returns {layer: hidden state after that layer [T, H]}.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1)
        start, T = self.seq_len, tokens.shape[0]
        if T == 0:
            raise ValueError("forward() needs at least one token")
        if start + T > self.max_seq_len:
            raise ValueError(f"{start + T} positions exceed max_seq_len {self.max_seq_len}")
        positions = torch.arange(start, start + T, device=self.device)
        wanted = set(capture_layers or ())
        captured = {}

        x = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, rms_norm(x, layer.input_norm, self.cfg.rms_norm_eps), positions)
            h = rms_norm(x, layer.post_norm, self.cfg.rms_norm_eps)
            x = x + (self._moe(layer.moe, h) if layer.moe is not None else swiglu(h, *layer.dense))
            if i in wanted:
                captured[i] = x.clone()
        self.seq_len = start + T

        logits = F.linear(rms_norm(x, self.final_norm, self.cfg.rms_norm_eps), self.lm_head)
        return (logits, captured) if capture_layers is not None else logits

    __call__ = forward

    def _attention(self, i: int, layer: _Layer, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        q = split_heads(F.linear(h, layer.wq), cfg.head_dim)
        k = split_heads(F.linear(h, layer.wk), cfg.head_dim)
        v = split_heads(F.linear(h, layer.wv), cfg.v_head_dim) * cfg.attention_value_scale
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta(i), self.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start, end = int(positions[0]), int(positions[-1]) + 1
        layer.k_cache[:, start:end] = k
        layer.v_cache[:, start:end] = v

        key_pos = torch.arange(end, device=self.device)
        visible = key_pos[None, :] <= positions[:, None]
        if cfg.is_swa(i):
            # The window counts the query: sliding_window=129 sees 128 previous tokens and itself.
            visible &= key_pos[None, :] > positions[:, None] - cfg.sliding_window
        o = attention(q, layer.k_cache[:, :end], layer.v_cache[:, :end], visible, cfg.softmax_scale, layer.sink)
        return F.linear(o, layer.wo)

    def _moe(self, moe: _Moe, h: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        scores = F.linear(h.to(torch.float32), moe.router).sigmoid()
        # The correction bias only steers which experts are picked, not their weights.
        idx = torch.topk(scores + moe.bias, cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor

        # The weighted sum over a token's experts accumulates in fp32 and is rounded once
        # (as transformers' default grouped_mm experts path does).
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for e in idx.unique().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            y = swiglu(h[tok], moe.gate[e], moe.up[e], moe.down[e])
            out.index_add_(0, tok, y.to(torch.float32) * weights[tok, slot, None])
        return out.to(h.dtype)


def generate(
    decoder: ReferenceDecoder,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[int]:
    """Reset the decoder, prefill the prompt, then feed back one chosen token at a time.

    Each token is drawn by tilert.sampling.choose with the position of the token whose logits
    are used (the last one fed), so every backend draws the same sequence.
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("generate() needs a non-empty prompt")
    decoder.reset()
    logits = decoder.forward(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = choose(logits[-1], temperature, seed, decoder.seq_len - 1)
        out.append(token)
        if len(out) < max_new_tokens:
            logits = decoder.forward([token])
    return out
