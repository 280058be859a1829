"""The op-by-op PyTorch decoder a user would otherwise run, in a form a CUDA graph can capture.

Same arithmetic as model/reference.py, but every shape is static and the position lives on the
device, so one decode step can be captured once and replayed (`torch.cuda.CUDAGraph`):
- global-attention layers keep a cache of `max_seq_len` slots and mask the future;
- sliding-window layers keep a ring of `sliding_window` slots and mask slots not yet written;
- non-expert weights are dequantized once to `dtype` (bf16 by default);
- experts either stay as stored and the selected ones are gathered and dequantized every step
  (`experts="gather"`: what fits for any model), or are dequantized once (`experts="dense"`:
  fewer bytes per step when the model fits in memory).  The benchmark takes the faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import MimoConfig
from model.reference import apply_rope, rms_norm
from model.weights import StoredTensor
from tilert.lower import stacked_expert_name


class StaticDecoder:
    def __init__(self, cfg: MimoConfig, weights: dict[str, StoredTensor], max_seq_len: int,
                 dtype: torch.dtype = torch.bfloat16, device: str = "cuda", experts: str = "gather"):
        self.cfg, self.dtype, self.device, self.experts = cfg, dtype, torch.device(device), experts
        self.max_seq_len = max_seq_len
        dev = self.device

        def w(name, as_dtype=dtype):
            return weights[name].dequantize(as_dtype).to(dev) if weights[name].data.device != dev \
                else weights[name].dequantize(as_dtype)

        self.embed = w("model.embed_tokens.weight")
        self.final_norm = w("model.norm.weight")
        self.lm_head = w("lm_head.weight")
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            kv = cfg.num_kv_heads(i)
            slots = cfg.sliding_window if cfg.is_swa(i) else max_seq_len
            L = {
                "in_norm": w(f"{p}.input_layernorm.weight"), "post_norm": w(f"{p}.post_attention_layernorm.weight"),
                "wqkv": torch.cat([w(f"{p}.self_attn.{m}_proj.weight") for m in "qkv"]),
                "wo": w(f"{p}.self_attn.o_proj.weight"),
                "sink": w(f"{p}.self_attn.attention_sink_bias") if cfg.has_sink(i) else None,
                "k": torch.zeros(kv, slots, cfg.head_dim, dtype=dtype, device=dev),
                "v": torch.zeros(kv, slots, cfg.v_head_dim, dtype=dtype, device=dev),
                # Position held by each slot; -1 = empty.  Masks come from it, on the device.
                "slot_pos": torch.full((slots,), -1, dtype=torch.long, device=dev),
                "kv": kv, "slots": slots,
            }
            if cfg.is_moe(i):
                L["router"] = w(f"{p}.mlp.gate.weight", torch.float32)
                L["bias"] = w(f"{p}.mlp.gate.e_score_correction_bias", torch.float32)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    st = weights[stacked_expert_name(i, proj)]
                    L[proj] = st.dequantize(dtype) if experts == "dense" else st
            else:
                L["w_gate_up"] = torch.cat([w(f"{p}.mlp.gate_proj.weight"), w(f"{p}.mlp.up_proj.weight")])
                L["w_down"] = w(f"{p}.mlp.down_proj.weight")
            self.layers.append(L)
        inv = {}
        for i in range(cfg.num_hidden_layers):
            theta = cfg.rope_theta(i)
            if theta not in inv:
                r = cfg.rotary_dim
                inv[theta] = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float32, device=dev) / r))
        self.inv_freq = inv

    def fill_cache(self, length: int, generator: torch.Generator | None = None) -> None:
        """Pretend `length` tokens were decoded already (random keys and values): for benchmarks."""
        for L in self.layers:
            n = min(length, L["slots"])
            L["k"][:, :n].normal_(generator=generator)
            L["v"][:, :n].normal_(generator=generator)
            first = length - n
            pos = torch.arange(first, length, device=self.device)
            L["slot_pos"][pos % L["slots"]] = pos

    def _gather_expert(self, st, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(st, torch.Tensor):
            return st[idx]
        one = StoredTensor(st.fmt, (idx.shape[0], *st.shape[1:]), st.data[idx],
                           None if st.scale is None else st.scale[idx])
        return one.dequantize(self.dtype)

    @torch.no_grad()
    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [1, V] for one token (device tensors of shape [1]); no host synchronisation."""
        cfg = self.cfg
        x = self.embed[token]  # [1, H]
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L["in_norm"], cfg.rms_norm_eps)
            qkv = F.linear(h, L["wqkv"])
            nq, kv, hd, vd = cfg.num_attention_heads, L["kv"], cfg.head_dim, cfg.v_head_dim
            q = qkv[:, :nq * hd].view(nq, 1, hd)
            k = qkv[:, nq * hd:(nq + kv) * hd].view(kv, 1, hd)
            v = qkv[:, (nq + kv) * hd:].view(kv, 1, vd) * cfg.attention_value_scale
            ang = pos.to(torch.float32)[:, None] * self.inv_freq[cfg.rope_theta(i)][None, :]
            emb = torch.cat([ang, ang], -1)
            cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            slot = pos % L["slots"]
            L["k"].index_copy_(1, slot, k)
            L["v"].index_copy_(1, slot, v)
            L["slot_pos"].index_copy_(0, slot, pos)
            visible = (L["slot_pos"] >= 0) & (L["slot_pos"] <= pos)
            if cfg.is_swa(i):
                visible &= L["slot_pos"] > pos - cfg.sliding_window
            group = nq // kv
            scores = torch.matmul(q.view(kv, group, hd), L["k"].transpose(1, 2)) * cfg.softmax_scale
            scores = scores.masked_fill(~visible, float("-inf")).view(nq, -1)
            if L["sink"] is not None:
                scores = torch.cat([scores, L["sink"].to(scores.dtype)[:, None]], -1)
            probs = torch.softmax(scores.float(), -1).to(self.dtype)
            if L["sink"] is not None:
                probs = probs[:, :-1]
            o = torch.matmul(probs.view(kv, group, -1), L["v"]).reshape(1, nq * vd)
            x = x + F.linear(o, L["wo"])
            h = rms_norm(x, L["post_norm"], cfg.rms_norm_eps)
            if "router" in L:
                scores = F.linear(h.float(), L["router"]).sigmoid()
                idx = torch.topk(scores + L["bias"], cfg.num_experts_per_tok, -1).indices[0]
                wts = scores[0, idx]
                if cfg.norm_topk_prob:
                    wts = wts / (wts.sum() + 1e-20)
                wts = wts * cfg.routed_scaling_factor
                g = torch.bmm(self._gather_expert(L["gate_proj"], idx), h[0].expand(len(idx), -1)[:, :, None])
                u = torch.bmm(self._gather_expert(L["up_proj"], idx), h[0].expand(len(idx), -1)[:, :, None])
                a = F.silu(g) * u  # [k, I, 1]
                y = torch.bmm(self._gather_expert(L["down_proj"], idx), a)[:, :, 0]  # [k, H]
                x = x + (y.float() * wts[:, None]).sum(0, keepdim=True).to(self.dtype)
            else:
                gu = F.linear(h, L["w_gate_up"])
                g, u = gu.chunk(2, -1)
                x = x + F.linear(F.silu(g) * u, L["w_down"])
        return F.linear(rms_norm(x, self.final_norm, cfg.rms_norm_eps), self.lm_head)
