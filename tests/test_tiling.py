"""The tiled weight layout (tilert/tiling.py) the megakernel streams: a permutation of the stored
bytes (scales included) that the device's indexing (block, step, row, byte) inverts, and the
lane view of a step block the tensor-core GEMV reads (gemv.cuh, gemv_tile_mma)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tilert.tiling import (MAG_AT, SIGN_AT, STEP_BYTES, STEP_COLS, fp16_pairs, gather_codes, offset_of, spread_codes,
                           step_block_bytes, tile, tileable, untile)

ROW_BYTES = {"bf16": lambda c: 2 * c, "fp8": lambda c: c, "mxfp4": lambda c: c // 2}


def stored(fmt: str, lead: tuple, rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (*lead, rows, ROW_BYTES[fmt](cols)), generator=g, dtype=torch.uint8)
    scale = torch.randint(0, 256, (*lead, rows, cols // 32), generator=g, dtype=torch.uint8) if fmt == "mxfp4" else None
    return data, scale


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(sorted(STEP_COLS)), blocks=st.integers(1, 4), steps=st.integers(1, 5),
       experts=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_tiling_is_a_permutation_that_the_device_indexing_inverts(fmt, blocks, steps, experts, seed):
    rows, cols = 16 * blocks, STEP_COLS[fmt] * steps
    lead = (experts,) if experts else ()
    data, scale = stored(fmt, lead, rows, cols, seed)
    t = tile(data, fmt, scale)
    per_expert = blocks * steps * step_block_bytes(fmt)
    assert t.numel() == max(experts, 1) * per_expert
    back, back_scale = untile(t, fmt, (*lead, rows, cols))
    assert torch.equal(back, data)
    if fmt == "mxfp4":
        assert torch.equal(back_scale, scale)
    # every byte sits where the device looks for it
    rng = np.random.default_rng(seed)
    flat = data.reshape(-1, rows, data.shape[-1])
    for _ in range(20):
        e, r, b = rng.integers(flat.shape[0]), rng.integers(rows), rng.integers(data.shape[-1])
        at = e * per_expert + offset_of(fmt, data.shape[-1], int(r), int(b))
        if fmt == "mxfp4":  # the byte's word, spread
            assert int(gather_codes(t[at & ~3:(at & ~3) + 4])[at & 3]) == int(flat[e, r, b])
        else:
            assert int(t[at]) == int(flat[e, r, b])
    if fmt == "mxfp4":  # a row's 4 scale bytes of step s follow the step block's 1024 code bytes
        sc = scale.reshape(-1, rows, cols // 32)
        e, r, s = rng.integers(sc.shape[0]), rng.integers(rows), rng.integers(steps)
        at = e * per_expert + ((r // 16) * steps + s) * step_block_bytes(fmt) + 1024 + 4 * (r % 16)
        assert t[at:at + 4].tolist() == sc[e, r, 4 * s:4 * s + 4].tolist()


@pytest.mark.parametrize("fmt", sorted(STEP_COLS))
def test_a_step_block_is_the_lanes_16_byte_reads(fmt):
    """gemv_tile_mma: lane 4g + t of a warp reads bytes 16t.. of row g's step at 16 * lane, and of
    row g + 8 at 512 + 16 * lane (512 consecutive bytes a warp: no bank conflicts); MXFP4 rows'
    scale words at 1024 + 4g and 1024 + 32 + 4g.  For MXFP4 word j of lane t's 16 bytes is word t
    of the row's 32-column block j (codes 32j + 8t .. 32j + 8t + 7 of the step), so each mma of
    the step sums one block."""
    rows, cols = 32, STEP_COLS[fmt] * 3
    data, scale = stored(fmt, (), rows, cols, 3)
    t = tile(data, fmt, scale).numpy()
    sb = step_block_bytes(fmt)
    for block in range(2):
        for s in range(3):
            base = (block * 3 + s) * sb
            for lane in range(32):
                g, tt = lane >> 2, lane & 3
                for half in (0, 1):
                    row = 16 * block + g + 8 * half
                    got = t[base + 512 * half + 16 * lane: base + 512 * half + 16 * lane + 16]
                    step = data[row, STEP_BYTES * s: STEP_BYTES * (s + 1)].numpy()
                    if fmt == "mxfp4":
                        want = np.concatenate([step[16 * j + 4 * tt: 16 * j + 4 * tt + 4] for j in range(4)])
                        want = spread_codes(torch.from_numpy(want)).numpy()
                    else:
                        want = step[16 * tt: 16 * tt + 16]
                    assert (got == want).all(), (block, s, lane, half)
                    if fmt == "mxfp4":
                        at = base + 1024 + 32 * half + 4 * g
                        assert t[at:at + 4].tolist() == scale[row, 4 * s:4 * s + 4].tolist()


def half_value(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # model/formats/mxfp4.py decode_table, magnitudes


@settings(max_examples=200, deadline=None)
@given(codes=st.lists(st.integers(0, 15), min_size=8, max_size=8))
def test_a_spread_word_decodes_to_its_codes_times_2_to_the_minus_14(codes):
    """The four fp16 pairs of a spread word hold codes (3, 7), (2, 6), (1, 5), (0, 4) (low half,
    high half), each exactly its E2M1 value times 2^-14 (code 0 and 8: +-0, subnormals exact)."""
    word = sum(c << (4 * n) for n, c in enumerate(codes))
    spread = int(spread_codes(torch.tensor(list(word.to_bytes(4, "little")), dtype=torch.uint8)).view(torch.int32)[0])
    spread &= 0xFFFFFFFF
    assert int(gather_codes(torch.tensor(list(spread.to_bytes(4, "little")), dtype=torch.uint8))
               .view(torch.int32)[0]) & 0xFFFFFFFF == word
    for pair, (lo, hi) in zip(fp16_pairs(spread), [(3, 7), (2, 6), (1, 5), (0, 4)]):
        for bits, code in ((pair & 0xFFFF, codes[lo]), (pair >> 16, codes[hi])):
            want = (-1.0 if code & 8 else 1.0) * E2M1[code & 7] * 2.0**-14
            assert half_value(bits) == want and np.signbit(half_value(bits)) == bool(code & 8)


def test_spread_positions_cover_the_word_once():
    taken = [b for n in range(8) for b in (MAG_AT[n], MAG_AT[n] + 1, MAG_AT[n] + 2, SIGN_AT[n])]
    assert sorted(taken) == list(range(32))


def test_untileable_shapes_are_refused():
    assert not tileable("fp32", 16, 64) and not tileable("fp8", 24, 64) and not tileable("bf16", 16, 48)
    assert tileable("mxfp4", 32, 256)
    with pytest.raises(ValueError, match="no tiled layout"):
        tile(torch.zeros(16, 48, dtype=torch.uint8), "fp8")
