"""FP8 E4M3 weights with one fp32 scale per 128x128 block (hub `weight_scale_inv`).

`w[r, c] ~= q[r, c] * scale_inv[r // 128, c // 128]`.  Matrices whose sides are not multiples of
128 end in partial blocks: the scale grid is `ceil(out/128) x ceil(in/128)`.
"""

from __future__ import annotations

import torch

BLOCK = 128
FP8_MAX = 448.0  # largest finite E4M3 value (0x7E)
DTYPE = torch.float8_e4m3fn


def scale_shape(out: int, inp: int) -> tuple[int, int]:
    return (-(-out // BLOCK), -(-inp // BLOCK))


def _round_up_21_bits(s: torch.Tensor) -> torch.Tensor:
    # Keep 21 significant bits so that 448 * s is exact in fp32: re-quantizing a dequantized
    # matrix then finds the very same scale, which makes quantize(dequantize(.)) a fixed point.
    # Rounding up (by at most 2^-20 relative) keeps |w| / s <= 448.
    bits = s.contiguous().view(torch.int32)
    return ((bits + 7) & ~7).view(torch.float32)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] -> (q float8_e4m3fn [out, in], scale_inv fp32 [ceil(out/128), ceil(in/128)])."""
    if w.dim() != 2:
        raise ValueError(f"fp8.quantize expects a 2-D matrix, got shape {tuple(w.shape)}")
    out, inp = w.shape
    rb, cb = scale_shape(out, inp)
    w = w.to(torch.float32)
    # Zero padding to whole blocks does not change any block's amax.
    padded = torch.nn.functional.pad(w, (0, cb * BLOCK - inp, 0, rb * BLOCK - out))
    blocks = padded.view(rb, BLOCK, cb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError(f"fp8.quantize: matrix of shape {tuple(w.shape)} holds inf or NaN")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scale = _round_up_21_bits(scale)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(rb * BLOCK, cb * BLOCK)[:out, :inp].to(DTYPE).contiguous()
    return q, scale


def _expand(scale: torch.Tensor, rows: int, cols: int, row_offset: int = 0) -> torch.Tensor:
    s = scale.to(torch.float32).repeat_interleave(BLOCK, dim=0)[row_offset: row_offset + rows]
    return s.repeat_interleave(BLOCK, dim=1)[:, :cols]


def _check(q: torch.Tensor, scale: torch.Tensor, rows_needed: int) -> None:
    if q.dim() != 2 or scale.dim() != 2:
        raise ValueError(f"fp8: expected 2-D q and scale, got {tuple(q.shape)} and {tuple(scale.shape)}")
    if scale.shape[0] * BLOCK < rows_needed or scale.shape[1] != -(-q.shape[1] // BLOCK):
        raise ValueError(
            f"fp8: scale grid {tuple(scale.shape)} does not cover a {tuple(q.shape)} matrix "
            f"in {BLOCK}x{BLOCK} blocks"
        )


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [out, in], scale_inv [ceil(out/128), ceil(in/128)]) -> float [out, in]."""
    _check(q, scale_inv, q.shape[0])
    if scale_inv.shape[0] != -(-q.shape[0] // BLOCK):
        raise ValueError(f"fp8: scale grid {tuple(scale_inv.shape)} does not match matrix {tuple(q.shape)}")
    return (q.to(torch.float32) * _expand(scale_inv, *q.shape)).to(dtype)


def dequantize_rows(
    q_rows: torch.Tensor, scale_rows: torch.Tensor, row_offset: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize rows r0:r1 of a matrix.

    `q_rows` = q[r0:r1], `scale_rows` = scale_inv[r0 // 128 : ceil(r1 / 128)], `row_offset` = r0 % 128
    (where row r0 sits inside its first block).
    """
    if not 0 <= row_offset < BLOCK:
        raise ValueError(f"fp8: row_offset {row_offset} must be in [0, {BLOCK})")
    _check(q_rows, scale_rows, row_offset + q_rows.shape[0])
    s = _expand(scale_rows, q_rows.shape[0], q_rows.shape[1], row_offset)
    return (q_rows.to(torch.float32) * s).to(dtype)
