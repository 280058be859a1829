"""Synthetic weights generated directly on the GPU, in the runtime layout and stored formats.

Full-geometry benchmarks need tens of GB of weights: writing and carrying a checkpoint is out of
the question, so they are drawn on the device.  Quantized tensors are drawn as codes (random
FP8 values, random MXFP4 nibbles) with scales chosen so that every linear map keeps unit-variance
activations, as `model.checkpoint.synthetic_tensor` does for the float values it quantizes.
"""

from __future__ import annotations

import math

import torch

from model.config import MimoConfig
from model.formats import fp8
from model.weights import BF16, FP8, FP32, MXFP4, StoredTensor, expected_tensors
from tilert.lower import stacked_expert_name

# Mean square of an E2M1 value when all 16 codes are equally likely.
_E2M1_MEAN_SQUARE = sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8


def _float_values(name: str, shape, gen, device) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if name.endswith("norm.weight"):  # every RMSNorm's weight (layers, final, drafter)
        return 1.0 + 0.1 * x
    if name.endswith("e_score_correction_bias"):
        return 0.01 * x
    if "embed_tokens" in name or name.endswith("attention_sink_bias"):
        return x
    return x * shape[-1] ** -0.5


def _stored(name: str, shape, fmt: str, gen, device) -> StoredTensor:
    if fmt in (BF16, FP32):
        dtype = torch.bfloat16 if fmt == BF16 else torch.float32
        return StoredTensor(fmt, tuple(shape), _float_values(name, shape, gen, device).to(dtype))
    rows, cols = shape[-2], shape[-1]
    lead = tuple(shape[:-2])
    if fmt == FP8:
        data = torch.randn(shape, generator=gen, device=device).to(torch.float8_e4m3fn)
        grid = (*lead, -(-rows // fp8.BLOCK), -(-cols // fp8.BLOCK))
        scale = torch.full(grid, cols ** -0.5, device=device, dtype=torch.float32)
        return StoredTensor(FP8, tuple(shape), data, scale)
    if fmt == MXFP4:
        codes = torch.randint(0, 256, (*lead, rows, cols // 2), generator=gen, device=device, dtype=torch.uint8)
        exponent = round(math.log2(1.0 / math.sqrt(_E2M1_MEAN_SQUARE * cols)))
        scales = torch.full((*lead, rows, cols // 32), 127 + exponent, device=device, dtype=torch.uint8)
        return StoredTensor(MXFP4, tuple(shape), codes, scales)
    raise ValueError(f"unknown storage format {fmt}")


def weight_specs(cfg: MimoConfig, expert_format: str | None = None) -> list[tuple[str, tuple, str]]:
    """(name, shape, storage format) of every runtime-layout weight of `cfg` (experts stacked per
    layer): what device_weights draws, known without drawing it (tools build kernels from it)."""
    out = [(s.name, tuple(s.shape), s.fmt) for s in expected_tensors(cfg) if ".mlp.experts." not in s.name]
    fmt = expert_format or cfg.expert_format
    E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe(i):
            for proj, shape in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I))):
                out.append((stacked_expert_name(i, proj), shape, fmt))
    return out


def draft_weight_specs(dcfg) -> list[tuple[str, tuple, str]]:
    """(name, shape, format) of every tensor of a DFlash drafter (model/dflash.py), named as in an
    artifact (`draft.` prefix)."""
    from model.dflash import expected_draft_tensors
    from tilert.artifact import DRAFT_PREFIX

    return [(DRAFT_PREFIX + s.name, tuple(s.shape), s.fmt) for s in expected_draft_tensors(dcfg)]


def device_weights(cfg: MimoConfig, seed: int = 0, device: str = "cuda",
                   expert_format: str | None = None) -> dict[str, StoredTensor]:
    """Every runtime-layout weight of `cfg` (experts stacked per layer) drawn on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {name: _stored(name, shape, fmt, gen, device) for name, shape, fmt in weight_specs(cfg, expert_format)}


def device_draft_weights(dcfg, seed: int = 0, device: str = "cuda") -> dict[str, StoredTensor]:
    """Every tensor of a DFlash drafter drawn on `device` in its checkpoint format."""
    from tilert.artifact import DRAFT_PREFIX

    gen = torch.Generator(device=device).manual_seed(seed)
    return {name: _stored(name[len(DRAFT_PREFIX):], shape, fmt, gen, device)
            for name, shape, fmt in draft_weight_specs(dcfg)}
