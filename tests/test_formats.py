"""FP8 block-scaled and MXFP4 formats: hand-worked bytes, exhaustive decodes, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.formats import fp8, mxfp4
from model.weights import StoredTensor

U8 = torch.uint8


def _fp8_bytes(values: list[int]) -> torch.Tensor:
    return torch.tensor([values], dtype=U8).view(torch.float8_e4m3fn)


def _random(seed: int, shape: tuple[int, ...], magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * magnitude


# ==== FP8 E4M3, 128x128 block scales ========================================================

def _e4m3_reference(b: int) -> float:
    """E4M3 (fn variant) from its bits: bias 7, no infinities, S.1111.111 is NaN."""
    sign = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * (m / 8) * 2.0**-6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def test_fp8_hand_worked_bytes():
    q = _fp8_bytes([0x00, 0x38, 0x40, 0x3C, 0x7E, 0xFE, 0x01, 0x08, 0x07, 0xB8])
    expected = [0.0, 1.0, 2.0, 1.5, 448.0, -448.0, 2.0**-9, 2.0**-6, 7 * 2.0**-9, -1.0]
    out = fp8.dequantize(q, torch.ones(1, 1))
    assert out[0].tolist() == expected
    # The block scale multiplies: 448 * 0.5 = 224, 1.5 * 0.5 = 0.75.
    assert fp8.dequantize(q, torch.tensor([[0.5]]))[0, 3:5].tolist() == [0.75, 224.0]


def test_fp8_all_256_bytes_decode():
    q = _fp8_bytes(list(range(256)))
    out = fp8.dequantize(q, torch.ones(1, 2))[0]  # 256 columns: two column blocks
    for b in range(256):
        ref = _e4m3_reference(b)
        assert (math.isnan(ref) and math.isnan(out[b])) or out[b].item() == ref, hex(b)


def test_fp8_scale_grid_is_per_128x128_block():
    q = torch.ones(130, 257).to(torch.float8_e4m3fn)
    scale = torch.arange(1.0, 7.0).reshape(2, 3)
    out = fp8.dequantize(q, scale)
    assert out[0, 0] == 1 and out[127, 127] == 1 and out[0, 128] == 2 and out[0, 256] == 3
    assert out[128, 0] == 4 and out[129, 255] == 5 and out[129, 256] == 6


def test_fp8_quantize_hand_worked():
    w = torch.zeros(130, 130)
    w[0, 0], w[0, 1], w[5, 7] = 896.0, 1.0, -2.0  # block (0,0): amax 896 -> scale 2
    w[128, 129] = 7.0  # block (1,1): amax 7 -> scale 7/448 = 2^-6
    q, scale = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (130, 130)
    assert scale.dtype == torch.float32 and scale.shape == (2, 2)
    assert scale[0, 0] == 2.0
    assert scale[0, 1] == 1.0 and scale[1, 0] == 1.0  # all-zero blocks get a finite scale
    assert scale[1, 1] == 2.0**-6
    raw = q.view(U8)
    assert raw[0, 0] == 0x7E  # 896 / 2 = 448
    assert raw[0, 1] == 0x30  # 1 / 2 = 0.5 = 2^-1
    assert raw[5, 7] == 0xB8  # -2 / 2 = -1
    assert raw[128, 129] == 0x7E and raw[1, 1] == 0
    assert torch.equal(fp8.dequantize(q, scale), w)  # every value here is exact in E4M3


def test_fp8_rejects_non_finite_and_bad_grids():
    with pytest.raises(ValueError, match="inf or NaN"):
        fp8.quantize(torch.tensor([[1.0, math.inf]]))
    q, scale = fp8.quantize(torch.ones(200, 10))
    with pytest.raises(ValueError, match="scale grid"):
        fp8.dequantize(q, scale[:1])


def _fp8_error_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # 3 mantissa bits: round-to-nearest is within 2^-4 relative; below the smallest normal
    # (2^-6 in scaled units) the spacing is 2^-9, so half of it absolutely.
    s = fp8._expand(scale, *w.shape)
    return torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 300), cols=st.integers(1, 300),
    seed=st.integers(0, 2**31), log_mag=st.integers(-6, 6),
)
def test_fp8_round_trip_properties(rows, cols, seed, log_mag):
    w = _random(seed, (rows, cols), 10.0**log_mag)
    w[0, 0] = 0.0  # an exact zero stays zero
    q, scale = fp8.quantize(w)
    assert scale.shape == (math.ceil(rows / 128), math.ceil(cols / 128))
    x = fp8.dequantize(q, scale)
    assert x[0, 0] == 0
    assert ((x - w).abs() <= _fp8_error_bound(w, scale)).all()
    # Idempotence: re-quantizing dequantized weights reproduces them bit for bit.
    q2, scale2 = fp8.quantize(x)
    assert torch.equal(fp8.dequantize(q2, scale2), x)
    assert torch.equal(scale2, scale) and torch.equal(q2.view(U8), q.view(U8))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 400), data=st.data())
def test_fp8_dequantize_rows_matches_full(rows, data):
    w = _random(rows, (rows, 150), 1.0)
    q, scale = fp8.quantize(w)
    r0 = data.draw(st.integers(0, rows - 1))
    r1 = data.draw(st.integers(r0 + 1, rows))
    b = fp8.BLOCK
    part = fp8.dequantize_rows(q[r0:r1], scale[r0 // b: (r1 + b - 1) // b], row_offset=r0 % b)
    assert torch.equal(part, fp8.dequantize(q, scale)[r0:r1])


def test_fp8_output_dtype():
    q, scale = fp8.quantize(torch.ones(3, 3))
    assert fp8.dequantize(q, scale, torch.bfloat16).dtype == torch.bfloat16


# ==== MXFP4 ===================================================================================

def _mx(codes: list[int], scale: int) -> torch.Tensor:
    """Dequantize one 32-element group given as 16 code bytes."""
    padded = codes + [0] * (16 - len(codes))
    return mxfp4.dequantize(torch.tensor([padded], dtype=U8), torch.tensor([[scale]], dtype=U8))[0]


def test_mxfp4_hand_worked_bytes():
    assert _mx([0x21], 0x7F)[:2].tolist() == [0.5, 1.0]  # low nibble first; scale 2^0
    assert _mx([0x21], 0x80)[:2].tolist() == [1.0, 2.0]  # scale byte 0x80 = 2^1
    assert _mx([0x21], 0x7E)[:2].tolist() == [0.25, 0.5]  # 0x7E = 2^-1
    assert _mx([0xF7], 0x7F)[:2].tolist() == [6.0, -6.0]
    assert _mx([0x98, 0x5C], 0x7F)[:4].tolist() == [-0.0, -0.5, -2.0, 3.0]
    assert _mx([0x07], 0x00)[0].item() == 6.0 * 2.0**-127
    assert _mx([0x01], 0xFE)[0].item() == 0.5 * 2.0**127
    assert torch.isnan(_mx([0x00], 0xFF)).all()  # E8M0 0xFF is NaN


def _e2m1_reference(c: int) -> float:
    """E2M1 from its bits: 1 sign, 2 exponent (bias 1), 1 mantissa, subnormal at e=0."""
    sign = -1.0 if c & 0x8 else 1.0
    e, m = (c >> 1) & 0x3, c & 0x1
    return sign * (m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def test_mxfp4_decode_table():
    assert mxfp4.decode_table()[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert [mxfp4.decode_table()[c].item() for c in range(16)] == [_e2m1_reference(c) for c in range(16)]


def test_mxfp4_all_256_code_bytes_decode():
    codes = torch.arange(256, dtype=U8).reshape(16, 16)  # each row: 16 bytes = one 32-group
    out = mxfp4.dequantize(codes, torch.full((16, 1), 0x7F, dtype=U8)).reshape(256, 2)
    for b in range(256):
        assert out[b].tolist() == [_e2m1_reference(b & 0xF), _e2m1_reference(b >> 4)], hex(b)


def test_mxfp4_all_256_scale_bytes_decode():
    codes = torch.full((256, 16), 0x22, dtype=U8)  # every element 1.0
    out = mxfp4.dequantize(codes, torch.arange(256, dtype=U8).reshape(256, 1))
    for e in range(255):
        assert (out[e] == 2.0 ** (e - 127)).all(), e
    assert torch.isnan(out[255]).all()


def test_mxfp4_quantize_hand_worked():
    w = torch.zeros(3, 64)
    w[0, :2] = torch.tensor([6.0, 3.0])  # amax 6: floor(log2 6) - 2 = 0 -> scale byte 0x7F
    w[0, 32:34] = torch.tensor([12.0, -1.0])  # amax 12 -> exponent 1 (0x80): 6, -0.5
    # Ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; 7.9 -> 6.
    w[1, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9])
    codes, scales = mxfp4.quantize(w)
    assert codes.shape == (3, 32) and scales.shape == (3, 2)
    assert codes[0, 0] == 0x57 and codes[0, 16] == 0x97
    assert scales[0].tolist() == [0x7F, 0x80]
    assert codes[1, :4].tolist() == [0x20, 0x42, 0x64, 0x76] and scales[1, 0] == 0x7F
    # An all-zero group gets a valid (non-NaN) scale and zero codes.
    assert (codes[2] == 0).all() and (scales[2] != 0xFF).all()
    out = mxfp4.dequantize(codes, scales)
    assert out[0, :2].tolist() == [6.0, 3.0] and out[0, 32:34].tolist() == [12.0, -1.0]
    assert out[1, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    assert (out[2] == 0).all()


def test_mxfp4_negative_rounding_to_zero_is_plus_zero_code():
    codes, _ = mxfp4.quantize(torch.tensor([[-0.1] + [0.0] * 30 + [4.0]]))
    assert codes[0, 0] == 0x00


def test_mxfp4_shape_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"\(4, 48\)"):
        mxfp4.quantize(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=U8), torch.zeros(2, 2, dtype=U8))


def _mxfp4_error_bound(w: torch.Tensor) -> torch.Tensor:
    """Half the code spacing at each value (spacing 0.5 below 2, 1 below 4, 2 above), in units
    of the group scale 2^(floor(log2 amax) - 2); above 6 the error is the saturation y - 6."""
    g = w.reshape(*w.shape[:-1], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    unit = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax)) - 2), torch.ones_like(amax))
    y = g.abs() / unit
    half_step = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0))
    bound = torch.where(y <= 6, half_step, y - 6) * unit
    return bound.reshape(w.shape) * (1 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40), groups=st.integers(1, 8),
    seed=st.integers(0, 2**31), log_mag=st.integers(-6, 6),
)
def test_mxfp4_round_trip_properties(rows, groups, seed, log_mag):
    w = _random(seed, (rows, 32 * groups), 10.0**log_mag)
    codes, scales = mxfp4.quantize(w)
    assert codes.shape == (rows, 16 * groups) and scales.shape == (rows, groups)
    x = mxfp4.dequantize(codes, scales)
    assert ((x - w).abs() <= _mxfp4_error_bound(w)).all()
    # Idempotence: the dequantized values are representable, with the same scales.
    codes2, scales2 = mxfp4.quantize(x)
    assert torch.equal(mxfp4.dequantize(codes2, scales2), x)
    assert torch.equal(scales2, scales)


def test_mxfp4_leading_dims_and_dtype():
    w = _random(0, (2, 3, 64), 1.0)
    codes, scales = mxfp4.quantize(w)
    assert codes.shape == (2, 3, 32) and scales.shape == (2, 3, 2)
    flat = mxfp4.dequantize(codes.reshape(6, 32), scales.reshape(6, 2))
    assert torch.equal(mxfp4.dequantize(codes, scales).reshape(6, 64), flat)
    assert mxfp4.dequantize(codes, scales, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "mxfp4"])
def test_a_stored_tensor_moves_whole(fmt):
    """StoredTensor.to keeps the format, shape, codes and scales (None stays None)."""
    t = StoredTensor.from_float(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), fmt)
    m = t.to("meta")
    assert (m.fmt, m.shape, m.data.device.type, m.data.dtype) == (t.fmt, t.shape, "meta", t.data.dtype)
    assert (m.scale is None) == (t.scale is None) and (t.scale is None or m.scale.shape == t.scale.shape)
    back = t.to("cpu")
    assert torch.equal(back.data.view(torch.uint8), t.data.view(torch.uint8))  # (fp8 has no equal of its own)
    assert t.scale is None or torch.equal(back.scale, t.scale)
