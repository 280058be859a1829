"""MXFP4 weights (OCP Microscaling v1.0): FP4 E2M1 elements, one E8M0 scale per 32 along K.

- An element is a 4-bit code: bits 0..2 index |value| in (0, 0.5, 1, 1.5, 2, 3, 4, 6), bit 3 is
  the sign.  Two codes share a byte; element 2i sits in the LOW nibble, element 2i+1 in the high.
- A scale is a byte e meaning 2^(e - 127); 0xFF is NaN.  It covers 32 consecutive elements of the
  last (K) dimension: `w[..., k] ~= value(code[..., k]) * 2^(scale[..., k // 32] - 127)`.
"""

from __future__ import annotations

import torch

GROUP = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF
MAX = 6.0
_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes: where rounding switches to the next code.
_MIDPOINTS = torch.tensor([(a + b) / 2 for a, b in zip(_MAGNITUDES, _MAGNITUDES[1:])])


def decode_table() -> torch.Tensor:
    """The 16 code values as float32: codes 0..7 positive, 8..15 their negatives (8 is -0.0)."""
    mags = torch.tensor(_MAGNITUDES, dtype=torch.float32)
    return torch.cat([mags, -mags])


def scale_table() -> torch.Tensor:
    """The 256 E8M0 scale values as float32 (2^-127 is an fp32 subnormal; 0xFF is NaN)."""
    values = [2.0 ** (e - E8M0_BIAS) for e in range(255)] + [float("nan")]
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


_DECODE = decode_table()
_SCALES = scale_table()
_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """A lookup table on `device`, copied once (so that CUDA-graph capture never copies)."""
    key = (name, device)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = {"decode": _DECODE, "scales": _SCALES, "midpoints": _MIDPOINTS}[name].to(device)
    return _ON_DEVICE[key]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [..., K] -> (codes uint8 [..., K/2], scales uint8 [..., K/32]); K must be a multiple of 32."""
    if w.dim() < 1 or w.shape[-1] % GROUP:
        raise ValueError(
            f"mxfp4.quantize: shape {tuple(w.shape)}: the last dimension must be a multiple of {GROUP}"
        )
    lead, k = w.shape[:-1], w.shape[-1]
    groups = w.to(torch.float32).reshape(*lead, k // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1)
    if not torch.isfinite(amax).all():
        raise ValueError(f"mxfp4.quantize: tensor of shape {tuple(w.shape)} holds inf or NaN")
    # floor(log2(amax)) exactly: frexp gives amax = m * 2^e with m in [0.5, 1).
    _, exp = torch.frexp(amax)
    shared = torch.where(amax > 0, exp - 1 - 2, torch.zeros_like(exp))  # the OCP "- emax" step
    biased = (shared + E8M0_BIAS).clamp(0, 254)
    # Dividing by a power of two is exact (barring underflow), so rounding sees the true ratio.
    y = groups.abs() / _table("scales", w.device)[biased.long()].unsqueeze(-1)
    # Round to the nearest magnitude; on an exact midpoint take the even code (down/up differ there).
    mid = _table("midpoints", w.device)
    down = torch.bucketize(y, mid, right=False)
    up = torch.bucketize(y, mid, right=True)
    code = torch.where(down % 2 == 0, down, up)  # beyond the last midpoint (5) is code 7: saturates at 6
    code = torch.where((groups < 0) & (code > 0), code + 8, code).to(torch.uint8)
    code = code.reshape(*lead, k)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.contiguous(), biased.to(torch.uint8).contiguous()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes uint8 [..., K/2], scales uint8 [..., K/32]) -> float [..., K]."""
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"mxfp4.dequantize: codes and scales must be uint8, got {codes.dtype} and {scales.dtype}")
    k = codes.shape[-1] * 2
    if codes.shape[:-1] != scales.shape[:-1] or scales.shape[-1] * GROUP != k:
        raise ValueError(
            f"mxfp4.dequantize: scales {tuple(scales.shape)} do not match codes {tuple(codes.shape)} "
            f"(one scale per {GROUP} elements, two elements per byte)"
        )
    table = _table("decode", codes.device)
    lo = table[(codes & 0x0F).long()]
    hi = table[(codes >> 4).long()]
    values = torch.stack([lo, hi], dim=-1).reshape(*codes.shape[:-1], k // GROUP, GROUP)
    out = values * _table("scales", codes.device)[scales.long()].unsqueeze(-1)
    return out.reshape(*codes.shape[:-1], k).to(dtype)
