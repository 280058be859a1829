"""A PyTorch reference for the DFlash block drafter that proposes tokens for a MiMo-V2 target.

The drafter has its own transformer blocks but no embedding or head: it borrows the target's
`embed_tokens` and `lm_head`.  It is conditioned on hidden states of a few target layers:
concatenated, projected by `fc` and RMS-normed into one context feature per committed position.
Every draft layer projects those features into its own context K/V, which persist across
steps (rolled back with `truncate_context` when the target rejects tokens).

One draft step feeds the block [last committed token, B-1 mask embeddings] at positions
start..start+B-1 through all layers at once: Q from the block, K/V from [context ; block],
bidirectional inside the block.  The argmax at block positions 1..B-1 is the draft; the
block's own K/V are dropped.

Attention details follow the target (partial NeoX RoPE, value scale, sink logit in the softmax
denominator).  The sliding window, when set, counts the query like MimoConfig.sliding_window:
a block query at position p sees context positions > p - sliding_window, and always the whole
block (the block must fit in the window).

The conditioning hidden states are the raw outputs of the chosen target layers (what
`ReferenceDecoder.forward(..., capture_layers=...)` returns).  Note that transformers'
`output_hidden_states`, which DFlash's own training code reads, gives the *final-normed* state
for the last layer; a drafter trained that way on the last target layer needs
`norm(h_last)` passed in for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import MimoConfig
from model.reference import apply_rope, attention, rms_norm, rope_cos_sin, split_heads, swiglu
from model.weights import BF16, FP32, StoredTensor, TensorSpec


@dataclass(frozen=True)
class DFlashConfig:
    num_layers: int
    hidden_size: int  # = the target's hidden size
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k
    v_head_dim: int
    intermediate_size: int
    target_layers: tuple[int, ...]  # target layers whose outputs condition the drafter
    vocab_size: int  # the target's (embedding and lm_head are borrowed)
    block_size: int = 8
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10_000.0
    sliding_window: int | None = None  # context keys a query sees, the query included
    sink: bool = True
    value_scale: float = 1.0
    rms_norm_eps: float = 1e-5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    def validate(self) -> "DFlashConfig":
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append("num_heads must be a multiple of num_kv_heads")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            problems.append(f"rotary dim {self.rotary_dim} must be even and <= head_dim")
        if self.block_size < 2:
            problems.append("block_size must be at least 2 (the last token plus one draft)")
        if self.sliding_window is not None and self.sliding_window < self.block_size:
            problems.append("sliding_window must cover the whole block")
        if not self.target_layers:
            problems.append("target_layers is empty")
        if problems:
            raise ValueError("invalid DFlash config: " + "; ".join(problems))
        return self

    @staticmethod
    def spread_layers(num_target_layers: int, n: int) -> tuple[int, ...]:
        """n target layers evenly spread from the first to the last (48, 5 -> 0, 11, 23, 35, 47)."""
        if n == 1:
            return (num_target_layers - 1,)
        return tuple(i * (num_target_layers - 1) // (n - 1) for i in range(n))

    @classmethod
    def for_target(cls, target: MimoConfig, conditioning: int, **shape) -> "DFlashConfig":
        """A drafter for `target`: what it takes from the target (hidden size, vocabulary, value
        scale, norm epsilon; `conditioning` target layers spread first to last) plus `shape`."""
        return cls(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                   target_layers=cls.spread_layers(target.num_hidden_layers,
                                                   min(conditioning, target.num_hidden_layers)),
                   value_scale=target.attention_value_scale, rms_norm_eps=target.rms_norm_eps,
                   **shape).validate()

    @classmethod
    def flash_for(cls, target: MimoConfig, num_heads: int = 32, intermediate_size: int = 8192,
                  num_conditioning: int = 5) -> "DFlashConfig":
        """A drafter of MiMo's DFlash shape for a flash-size target (shared/notes: 5 blocks, the
        target's hidden size, 8 KV heads of 128, partial rotary 0.5, theta 1e4, a 1024-key window
        with a sink, the target's value scale, conditioned on 5 target layers spread first to
        last, block 8).  The notes do not give the query heads or the MLP width: `num_heads` and
        `intermediate_size` are assumptions a benchmark must state."""
        return cls.for_target(target, num_conditioning, num_layers=5, num_heads=num_heads, num_kv_heads=8,
                              head_dim=128, v_head_dim=128, intermediate_size=intermediate_size, block_size=8,
                              sliding_window=1024, sink=True)

    @classmethod
    def tiny_for(cls, target: MimoConfig) -> "DFlashConfig":
        """A toy drafter for a toy target: every feature on (window shorter than the context, sink)."""
        return cls.for_target(target, 3, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16,
                              intermediate_size=2 * target.hidden_size, block_size=4, sliding_window=12, sink=True)


def expected_draft_tensors(dcfg: DFlashConfig) -> list[TensorSpec]:
    """Every tensor a DFlash drafter checkpoint holds (no embedding or head: the target's are used)."""
    H, nq, nkv = dcfg.hidden_size, dcfg.num_heads, dcfg.num_kv_heads
    hd, vd, F_ = dcfg.head_dim, dcfg.v_head_dim, dcfg.intermediate_size
    specs = [
        TensorSpec("fc.weight", (H, len(dcfg.target_layers) * H), BF16, "linear"),
        TensorSpec("hidden_norm.weight", (H,), BF16, "vector"),
        TensorSpec("mask_embedding", (H,), BF16, "vector"),
        TensorSpec("norm.weight", (H,), BF16, "vector"),
    ]
    for i in range(dcfg.num_layers):
        p = f"layers.{i}"
        specs += [
            TensorSpec(f"{p}.input_layernorm.weight", (H,), BF16, "vector"),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (nq * hd, H), BF16, "linear"),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (nkv * hd, H), BF16, "linear"),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (nkv * vd, H), BF16, "linear"),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (H, nq * vd), BF16, "linear"),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), BF16, "vector"),
            TensorSpec(f"{p}.mlp.gate_proj.weight", (F_, H), BF16, "linear"),
            TensorSpec(f"{p}.mlp.up_proj.weight", (F_, H), BF16, "linear"),
            TensorSpec(f"{p}.mlp.down_proj.weight", (H, F_), BF16, "linear"),
        ]
        if dcfg.sink:
            specs.append(TensorSpec(f"{p}.self_attn.attention_sink_bias", (nq,), FP32, "vector"))
    return specs


@dataclass
class _DraftLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    sink: torch.Tensor | None
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (gate, up, down)
    k_ctx: torch.Tensor  # [nkv, max_context, head_dim], rotated context keys
    v_ctx: torch.Tensor  # [nkv, max_context, v_head_dim], scaled context values


def _dense(t: torch.Tensor | StoredTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = t.dequantize(dtype) if isinstance(t, StoredTensor) else t.to(dtype)
    return t.to(device)


class DFlashDrafter:
    """Drafts block_size-1 tokens per step from the target's hidden states and its last token."""

    def __init__(
        self,
        dcfg: DFlashConfig,
        draft_weights: dict[str, StoredTensor],
        target_embed: torch.Tensor | StoredTensor,
        target_lm_head: torch.Tensor | StoredTensor,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_context: int = 4096,
    ):
        self.cfg = dcfg.validate()
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_context = max_context
        self.context_len = 0

        w = lambda name: _dense(draft_weights[name], dtype, self.device)
        self.embed = _dense(target_embed, dtype, self.device)
        self.lm_head = _dense(target_lm_head, dtype, self.device)
        self.fc = w("fc.weight")
        self.hidden_norm = w("hidden_norm.weight")
        self.mask_embedding = w("mask_embedding")
        self.final_norm = w("norm.weight")
        self.layers = []
        for i in range(dcfg.num_layers):
            p = f"layers.{i}"
            self.layers.append(_DraftLayer(
                input_norm=w(f"{p}.input_layernorm.weight"),
                post_norm=w(f"{p}.post_attention_layernorm.weight"),
                wq=w(f"{p}.self_attn.q_proj.weight"),
                wk=w(f"{p}.self_attn.k_proj.weight"),
                wv=w(f"{p}.self_attn.v_proj.weight"),
                wo=w(f"{p}.self_attn.o_proj.weight"),
                sink=w(f"{p}.self_attn.attention_sink_bias") if dcfg.sink else None,
                mlp=tuple(w(f"{p}.mlp.{m}.weight") for m in ("gate_proj", "up_proj", "down_proj")),
                k_ctx=torch.zeros(dcfg.num_kv_heads, max_context, dcfg.head_dim, dtype=dtype, device=self.device),
                v_ctx=torch.zeros(dcfg.num_kv_heads, max_context, dcfg.v_head_dim, dtype=dtype, device=self.device),
            ))

    # ---- context cache ----
    def reset(self) -> None:
        self.context_len = 0

    def truncate_context(self, n: int) -> None:
        """Forget context positions >= n (tokens the target rejected)."""
        if not 0 <= n <= self.context_len:
            raise ValueError(f"truncate_context({n}): context holds {self.context_len} positions")
        self.context_len = n

    @torch.no_grad()
    def append_context(self, target_hidden: dict[int, torch.Tensor]) -> None:
        """Add the next T committed positions, given the target's hidden states [T, H] per target layer."""
        cfg = self.cfg
        missing = [l for l in cfg.target_layers if l not in target_hidden]
        if missing:
            raise ValueError(f"target_hidden lacks target layers {missing}")
        feats = torch.cat([target_hidden[l].to(self.device, self.dtype) for l in cfg.target_layers], dim=-1)
        T = feats.shape[0]
        if T == 0:
            return
        start = self.context_len
        if start + T > self.max_context:
            raise ValueError(f"{start + T} context positions exceed max_context {self.max_context}")
        ctx = rms_norm(F.linear(feats, self.fc), self.hidden_norm, cfg.rms_norm_eps)
        cos, sin = rope_cos_sin(torch.arange(start, start + T, device=self.device), cfg.rotary_dim,
                                cfg.rope_theta, self.dtype)
        for layer in self.layers:
            # The context feature is already normed: no input_layernorm on the K/V path.
            layer.k_ctx[:, start:start + T] = apply_rope(split_heads(F.linear(ctx, layer.wk), cfg.head_dim), cos, sin)
            layer.v_ctx[:, start:start + T] = split_heads(F.linear(ctx, layer.wv), cfg.v_head_dim) * cfg.value_scale
        self.context_len = start + T

    # ---- one draft step ----
    @torch.no_grad()
    def block_logits(self, block: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits [B, vocab] of a block of input embeddings [B, H] at positions start_pos.. over the context.

        Reads the context cache, never writes it.
        """
        cfg = self.cfg
        B = block.shape[0]
        positions = torch.arange(start_pos, start_pos + B, device=self.device)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, self.dtype)
        n = self.context_len
        ctx_pos = torch.arange(n, device=self.device)
        ctx_visible = torch.ones(B, n, dtype=torch.bool, device=self.device)
        if cfg.sliding_window is not None:
            ctx_visible = ctx_pos[None, :] > positions[:, None] - cfg.sliding_window
        # Non-causal inside the block: every block query sees every block key.
        visible = torch.cat([ctx_visible, torch.ones(B, B, dtype=torch.bool, device=self.device)], dim=1)

        x = block.to(self.dtype)
        for layer in self.layers:
            h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            q = apply_rope(split_heads(F.linear(h, layer.wq), cfg.head_dim), cos, sin)
            k = apply_rope(split_heads(F.linear(h, layer.wk), cfg.head_dim), cos, sin)
            v = split_heads(F.linear(h, layer.wv), cfg.v_head_dim) * cfg.value_scale
            keys = torch.cat([layer.k_ctx[:, :n], k], dim=1)
            values = torch.cat([layer.v_ctx[:, :n], v], dim=1)
            o = attention(q, keys, values, visible, cfg.softmax_scale, layer.sink)
            x = x + F.linear(o, layer.wo)
            x = x + swiglu(rms_norm(x, layer.post_norm, cfg.rms_norm_eps), *layer.mlp)
        return F.linear(rms_norm(x, self.final_norm, cfg.rms_norm_eps), self.lm_head)

    def draft_logits(self, last_token: int, target_hidden: dict[int, torch.Tensor], start_pos: int) -> torch.Tensor:
        """Append the new context, then the logits [B-1, vocab] of the block's mask positions."""
        self.append_context(target_hidden)
        if start_pos != self.context_len:
            # The last token sits right after the committed context whose hidden states we hold.
            raise ValueError(f"start_pos {start_pos} != context length {self.context_len}")
        B = self.cfg.block_size
        block = torch.cat([
            self.embed[int(last_token)][None, :],
            self.mask_embedding[None, :].expand(B - 1, -1),
        ])
        return self.block_logits(block, start_pos)[1:]

    def draft(self, last_token: int, target_hidden: dict[int, torch.Tensor], start_pos: int) -> list[int]:
        """The B-1 draft tokens following last_token (at start_pos)."""
        return self.draft_logits(last_token, target_hidden, start_pos).argmax(dim=-1).tolist()
