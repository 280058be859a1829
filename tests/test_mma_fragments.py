"""The lane data layout of the tensor-core GEMV (tilert/cuda/gemv.cuh, gemv_tile_mma), replayed in
numpy: which bytes each lane loads, how it decodes them into mma.sync m16n8k16 A registers, the
order x is staged in (xs_column) and the MXFP4 scale split.  An mma is modelled by its
documented fragment layout (PTX ISA, m16n8k16 .f16/.bf16): lane (g, t) holds A rows g and g + 8 at
columns 2t, 2t + 1 (registers a0, a1) and 2t + 8, 2t + 9 (a2, a3), B rows 2t, 2t + 1 and 2t + 8,
2t + 9 of column g, and D rows g, g + 8 at columns 2t, 2t + 1.  A lane's registers must feed the
mma slots of the very columns the staged x puts there, for every format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilert.tiling import fp16_pairs, spread_codes

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
XS_ORDER = {"mxfp4": [3, 7, 2, 6, 1, 5, 0, 4], "fp8": list(range(8)), "bf16": list(range(8))}
STEP = {"mxfp4": 128, "fp8": 64, "bf16": 32}  # MmaFmt<>::kStep


def f16(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def spread_word(codes) -> int:
    """The 8 codes of one word (code n in bits 4n..) spread as tilert/tiling.py stores them."""
    word = sum(int(c) << (4 * n) for n, c in enumerate(codes))
    raw = torch.tensor(list(word.to_bytes(4, "little")), dtype=torch.uint8)
    return int(spread_codes(raw).view(torch.int32)[0]) & 0xFFFFFFFF


def mma(a_regs, b_regs) -> list[tuple[float, ...]]:
    """D = A @ B over one m16n8k16 from per-lane register contents (pairs of values)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        (A[g, 2 * t], A[g, 2 * t + 1]), (A[g + 8, 2 * t], A[g + 8, 2 * t + 1]) = a_regs[lane][0], a_regs[lane][1]
        (A[g, 2 * t + 8], A[g, 2 * t + 9]), (A[g + 8, 2 * t + 8], A[g + 8, 2 * t + 9]) = a_regs[lane][2], a_regs[lane][3]
        (B[2 * t, g], B[2 * t + 1, g]), (B[2 * t + 8, g], B[2 * t + 9, g]) = b_regs[lane]
    D = A @ B
    return [(D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1])
            for g, t in ((lane >> 2, lane & 3) for lane in range(32))]


def lane_groups(fmt: str, t: int) -> list[int]:
    """The 8-column groups lane t's 16 bytes of a step hold, in register order: consecutive for
    bf16 / fp8; MXFP4 (tiled words transposed) word j = word t of 32-column block j."""
    if fmt == "mxfp4":
        return [4 * j + t for j in range(4)]
    per = STEP[fmt] // 4 // 8
    return [per * t + q for q in range(per)]


def staged(x: np.ndarray, fmt: str, groups: list[int]) -> list[float]:
    """The halves a lane reads from the staged x for its column groups (each 8 in xs_column order)."""
    return [x[8 * q + XS_ORDER[fmt][j]] for q in groups for j in range(8)]


@pytest.mark.parametrize("tokens", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["mxfp4", "fp8", "bf16"])
def test_one_step_of_each_format_is_the_dot_product(fmt, tokens):
    """Tokens b < 4 share the mma: lanes g = 2b and 2b + 1 stage its hi and lo halves (B
    columns 2b, 2b + 1), and lane t of each row group reads D columns 2t, 2t + 1: token t."""
    rng = np.random.default_rng(1)
    K = STEP[fmt]
    x = rng.standard_normal((tokens, K))
    hi = x.astype(np.float16).astype(np.float64)
    planes = [p for b in range(tokens) for p in (hi[b], x[b] - hi[b])]  # plane 2b + h
    if fmt == "mxfp4":
        codes = rng.integers(0, 16, (16, K))
        scales = rng.integers(120, 134, (16, K // 32))  # E8M0 bytes, one per 32 columns
        W = E2M1[codes] * 2.0 ** (scales.repeat(32, axis=1) - 127)
    else:
        W = rng.standard_normal((16, K))
    acc = np.zeros((32, 2))
    d = [np.zeros(4) for _ in range(32)]
    per_lane = K // 4  # columns a lane holds in a step: t * per_lane .. (t + 1) * per_lane - 1
    n_mmas = K // 16
    a_all, b_all = [[None] * 32 for _ in range(n_mmas)], [[None] * 32 for _ in range(n_mmas)]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        groups = lane_groups(fmt, t)
        xs = staged(planes[g], fmt, groups) if g < 2 * tokens else [0.0] * per_lane
        for m in range(n_mmas):
            b_all[m][lane] = ((xs[4 * m], xs[4 * m + 1]), (xs[4 * m + 2], xs[4 * m + 3]))
        rows = []
        for r in (g, g + 8):
            if fmt == "mxfp4":  # 16 bytes = 4 spread words of 8 codes, each decoded in 4 pairs
                words = [spread_word(codes[r, 8 * q: 8 * q + 8]) for q in groups]
                pairs = [(f16(p), f16(p >> 16)) for w in words for p in fp16_pairs(w)]
            else:  # consecutive columns, two per register
                pairs = [(W[r, t * per_lane + 2 * i], W[r, t * per_lane + 2 * i + 1]) for i in range(per_lane // 2)]
            rows.append(pairs)
        for m in range(n_mmas):  # mma m: a0, a2 from row g's pairs 2m, 2m + 1; a1, a3 from row g + 8's
            a_all[m][lane] = (rows[0][2 * m], rows[1][2 * m], rows[0][2 * m + 1], rows[1][2 * m + 1])
    dpair = [[np.zeros(4) for _ in range(32)] for _ in range(n_mmas // 2)]  # MXFP4: per block
    for m in range(n_mmas):
        for lane, out in enumerate(mma(a_all[m], b_all[m])):
            d[lane] += out
            dpair[m // 2][lane] += out
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        if fmt == "mxfp4":  # mmas 2j, 2j + 1 sum block j alone: its scale, and the decode's 2^14
            acc[lane] = [sum((dj[lane][0] + dj[lane][1]) * 2.0 ** (scales[g, j] - 127 + 14) for j, dj in enumerate(dpair)),
                         sum((dj[lane][2] + dj[lane][3]) * 2.0 ** (scales[g + 8, j] - 127 + 14) for j, dj in enumerate(dpair))]
        else:
            acc[lane] = d[lane][0] + d[lane][1], d[lane][2] + d[lane][3]
    want = W @ x.T  # [16 rows, tokens]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        if t < tokens:
            np.testing.assert_allclose(acc[lane], [want[g, t], want[g + 8, t]], rtol=1e-12, atol=1e-12)
