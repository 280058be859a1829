"""The tensors a MiMo-V2 model has, by canonical (hub-layout) name, and how each is stored.

Every weight stays in the precision its checkpoint stores (`StoredTensor`): FP8 E4M3 with
128x128 block scales, MXFP4 codes with E8M0 scales, bf16 or fp32.  Consumers dequantize the
rows they need (`StoredTensor.rows`); nothing is silently re-quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import MimoConfig
from model.formats import fp8, mxfp4

# Storage formats of one logical tensor.
BF16, FP32, FP8, MXFP4 = "bf16", "fp32", "fp8", "mxfp4"
_TORCH_DTYPE = {BF16: torch.bfloat16, FP32: torch.float32}


@dataclass
class StoredTensor:
    """One logical tensor as stored: `data` (+ `scale` for quantized formats)."""

    fmt: str
    shape: tuple[int, ...]  # logical shape
    data: torch.Tensor
    scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.fmt in (BF16, FP32):
            return self.data.to(dtype)
        if self.fmt == FP8:
            if self.data.dim() > 2:  # stacked experts [E, rows, cols]: one block grid per expert
                return torch.stack([fp8.dequantize(d, s, dtype) for d, s in zip(self.data, self.scale)])
            return fp8.dequantize(self.data, self.scale, dtype)
        if self.fmt == MXFP4:
            return mxfp4.dequantize(self.data, self.scale, dtype)
        raise ValueError(f"unknown storage format {self.fmt}")

    def rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize rows r0:r1 only (what one tile task reads)."""
        if self.fmt in (BF16, FP32):
            return self.data[r0:r1].to(dtype)
        if self.fmt == FP8:
            b = fp8.BLOCK
            s = self.scale[r0 // b: (r1 + b - 1) // b]
            w = fp8.dequantize_rows(self.data[r0:r1], s, row_offset=r0 % b, dtype=dtype)
            return w
        if self.fmt == MXFP4:
            return mxfp4.dequantize(self.data[r0:r1], self.scale[r0:r1], dtype)
        raise ValueError(f"unknown storage format {self.fmt}")

    def to(self, device) -> "StoredTensor":
        """The same tensor with its data (and scale) on `device`."""
        return StoredTensor(self.fmt, self.shape, self.data.to(device),
                            None if self.scale is None else self.scale.to(device))

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    @staticmethod
    def from_float(w: torch.Tensor, fmt: str) -> "StoredTensor":
        """Store a float tensor in `fmt` (used by synth and by explicit --quantize-experts)."""
        shape = tuple(w.shape)
        if fmt in _TORCH_DTYPE:
            return StoredTensor(fmt, shape, w.to(_TORCH_DTYPE[fmt]).contiguous())
        if fmt == FP8:
            q, s = fp8.quantize(w)
            return StoredTensor(FP8, shape, q, s)
        if fmt == MXFP4:
            q, s = mxfp4.quantize(w)
            return StoredTensor(MXFP4, shape, q, s)
        raise ValueError(f"unknown storage format {fmt}")


# ---- the canonical tensor list --------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    fmt: str  # format a hub checkpoint uses for it (synth writes this)
    role: str  # "linear" (matrix read by GEMV), "expert", "vector", "embedding"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expected_tensors(cfg: MimoConfig) -> list[TensorSpec]:
    """Every tensor a MiMo-V2 checkpoint of this config holds, in hub-layout names."""
    H, hd, vd, nq = cfg.hidden_size, cfg.head_dim, cfg.v_head_dim, cfg.num_attention_heads
    specs = [
        TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, H), BF16, "embedding"),
        TensorSpec("model.norm.weight", (H,), BF16, "vector"),
        TensorSpec("lm_head.weight", (cfg.vocab_size, H), BF16, "linear"),
    ]
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        kv = cfg.num_kv_heads(i)
        specs += [
            TensorSpec(f"{p}.input_layernorm.weight", (H,), BF16, "vector"),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), BF16, "vector"),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (nq * hd, H), FP8, "linear"),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (kv * hd, H), FP8, "linear"),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (kv * vd, H), FP8, "linear"),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (H, nq * vd), BF16, "linear"),
        ]
        if cfg.has_sink(i):
            specs.append(TensorSpec(f"{p}.self_attn.attention_sink_bias", (nq,), FP32, "vector"))
        if cfg.is_moe(i):
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            rfmt = BF16 if cfg.router_dtype == "bf16" else FP32
            specs += [
                TensorSpec(f"{p}.mlp.gate.weight", (E, H), rfmt, "linear"),
                TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", (E,), FP32, "vector"),
            ]
            for e in range(E):
                q = f"{p}.mlp.experts.{e}"
                specs += [
                    TensorSpec(f"{q}.gate_proj.weight", (I, H), cfg.expert_format, "expert"),
                    TensorSpec(f"{q}.up_proj.weight", (I, H), cfg.expert_format, "expert"),
                    TensorSpec(f"{q}.down_proj.weight", (H, I), cfg.expert_format, "expert"),
                ]
        else:
            F = cfg.intermediate_size
            specs += [
                TensorSpec(f"{p}.mlp.gate_proj.weight", (F, H), FP8, "linear"),
                TensorSpec(f"{p}.mlp.up_proj.weight", (F, H), FP8, "linear"),
                TensorSpec(f"{p}.mlp.down_proj.weight", (H, F), FP8, "linear"),
            ]
    return specs


Weights = dict[str, StoredTensor]


def stored_nbytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of logical `shape` takes in format `fmt`, scales included."""
    n = 1
    for d in shape:
        n *= d
    if fmt == BF16:
        return 2 * n
    if fmt == FP32:
        return 4 * n
    if fmt == FP8:
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        return n + 4 * (-(-rows // fp8.BLOCK)) * (-(-cols // fp8.BLOCK))
    if fmt == MXFP4:
        return n // 2 + n // 32  # 4.25 bits per weight
    raise ValueError(f"unknown storage format {fmt}")


def dense_weight(weights: Weights, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return weights[name].dequantize(dtype)
