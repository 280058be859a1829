"""Weights in the runtime's layout: one buffer per IR weight buffer.

Non-expert tensors keep their checkpoint name.  The experts of a layer are stacked into one
[E, rows, cols] tensor per projection (codes and scales alike), because a task picks the expert
at run time from the router's output.  Formats are never changed here, except by the explicit
`quantize_experts` the user asks for (`tilert compile --quantize-experts mxfp4`).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from model.config import MimoConfig
from model.weights import FP8, MXFP4, StoredTensor, Weights
from tilert.errors import UserError
from tilert.lower import stacked_expert_name

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def _stack(parts: list[StoredTensor]) -> StoredTensor:
    fmts = {p.fmt for p in parts}
    if len(fmts) != 1:
        raise UserError(f"experts of one projection mix storage formats {sorted(fmts)}")
    first = parts[0]
    scale = None if first.scale is None else torch.stack([p.scale for p in parts])
    return StoredTensor(first.fmt, (len(parts), *first.shape), torch.stack([p.data for p in parts]), scale)


def runtime_weights(cfg: MimoConfig, weights: Weights, quantize_experts: str | None = None,
                    progress: bool = False) -> dict[str, StoredTensor]:
    if quantize_experts not in (None, MXFP4, FP8):
        raise UserError(f"--quantize-experts {quantize_experts}: supported formats are mxfp4 and fp8")
    out = {name: t for name, t in weights.items() if ".mlp.experts." not in name}
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    for layer in tqdm(moe_layers, desc="experts", disable=not progress, leave=False):
        for proj in EXPERT_PROJS:
            parts = []
            for e in range(cfg.n_routed_experts):
                t = weights[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"]
                if quantize_experts and t.fmt != quantize_experts:
                    t = StoredTensor.from_float(t.dequantize(torch.float32), quantize_experts)
                parts.append(t)
            out[stacked_expert_name(layer, proj)] = _stack(parts)
    return out
