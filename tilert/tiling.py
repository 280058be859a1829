"""The tiled weight layout the GPU megakernel streams (tilert/cuda/gemv.cuh).

A row-major weight makes a ring piece of 16 rows x a column chunk 16 separate memory ranges,
one bulk copy each, and the loader warp spends ~80 ns issuing each: the LM head and the long
bf16 / fp8 projections were bound by that, not by HBM.  So weights the tensor-core GEMV reads
are uploaded *tiled*: rows in blocks of 16, each block cut into *steps* of 64 bytes of every
row (32 bf16, 64 fp8 or 128 MXFP4 columns: one mma step), and the 16 rows' 64 bytes of a step
stored together, row after row (1 KiB).  MXFP4 appends the step's E8M0 scales, 4 bytes a row,
to its step block (1088 B).  Then

- any run of consecutive steps of one row block, or of whole row blocks, is contiguous: one
  bulk copy fills a ring slot whatever the row length;
- in shared memory a warp's 16-byte loads of one step (lane 4g + t: row g, bytes 16t..16t+15;
  rows g + 8 512 bytes on) are 512 consecutive bytes: no bank conflicts.

Element order inside a row's 64 bytes is the stored order for bf16 and fp8.  MXFP4 transposes
the row's 64 bytes as a 4 x 4 array of 4-byte words (stored word 4j + t goes to 4t + j): the 16
bytes lane t loads then hold 8 codes of each of the step's four 32-column blocks, so every mma of
the step (k = 16) sums the codes of ONE block and its E8M0 scale multiplies the mma's fp32 result
once, instead of every decoded weight (gemv.cuh `mma_step_fp4`).  MXFP4 words are also
*spread*: the 8 codes of a word keep their word but not their nibbles (`spread_codes`), placed so
that the device turns a word into the four fp16 pairs an mma takes in 11 bit operations instead of
16 (gemv.cuh `fp4_word_to_f16x2`).  FP8 block scales (one per 128 x 128) stay a separate row-major
table.
"""

from __future__ import annotations

import torch

ROW_BLOCK = 16  # rows per block (one m16 mma tile)
STEP_BYTES = 64  # bytes of one row in a step
STEP_COLS = {"bf16": 32, "fp8": 64, "mxfp4": 128}  # columns of one step (gemv.cuh, MmaFmt<>::kStep)
TILED_FORMATS = tuple(STEP_COLS)


def step_block_bytes(fmt: str) -> int:
    """Bytes of one step block: 16 rows x 64 bytes, plus 16 x 4 E8M0 scale bytes for MXFP4."""
    return ROW_BLOCK * STEP_BYTES + (ROW_BLOCK * STEP_COLS[fmt] // 32 if fmt == "mxfp4" else 0)


def tileable(fmt: str, rows: int, cols: int) -> bool:
    """Whether a [rows, cols] weight in `fmt` has a tiled layout (whole row blocks and steps)."""
    return fmt in STEP_COLS and rows % ROW_BLOCK == 0 and cols % STEP_COLS[fmt] == 0


def tile(data: torch.Tensor, fmt: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The tiled bytes (uint8, flat) of `data` ([..., rows, row bytes] as stored: bf16, fp8 or
    packed MXFP4 codes; leading dims = experts, tiled one after another); MXFP4 `scale`
    ([..., rows, cols / 32] E8M0 bytes) goes into the step blocks."""
    raw = data.contiguous().view(torch.uint8)
    lead, rows, row_bytes = raw.shape[:-2], raw.shape[-2], raw.shape[-1]
    cols = row_bytes * {"bf16": 1 / 2, "fp8": 1, "mxfp4": 2}[fmt]
    if not tileable(fmt, rows, int(cols)):
        raise ValueError(f"a {fmt} weight of {rows} x {int(cols)} has no tiled layout")
    nb, ns = rows // ROW_BLOCK, row_bytes // STEP_BYTES
    if fmt == "mxfp4":
        raw = spread_codes(_transpose_words(raw.reshape(*lead, rows, ns, STEP_BYTES)))
    blocks = raw.reshape(*lead, nb, ROW_BLOCK, ns, STEP_BYTES).transpose(-3, -2)  # [..., nb, ns, 16, 64]
    blocks = blocks.reshape(*lead, nb, ns, ROW_BLOCK * STEP_BYTES)
    if fmt == "mxfp4":
        if scale is None:
            raise ValueError("MXFP4 weights need their scales to be tiled")
        per = STEP_COLS[fmt] // 32  # scale bytes of one row in a step
        s = scale.contiguous().view(torch.uint8).reshape(*lead, nb, ROW_BLOCK, ns, per).transpose(-3, -2)
        blocks = torch.cat([blocks, s.reshape(*lead, nb, ns, ROW_BLOCK * per)], dim=-1)
    return blocks.reshape(-1)


def untile(tiled: torch.Tensor, fmt: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inverse of `tile`: (data bytes [..., rows, row bytes], MXFP4 scale bytes or None)."""
    *lead, rows, cols = shape
    row_bytes = {"bf16": cols * 2, "fp8": cols, "mxfp4": cols // 2}[fmt]
    nb, ns = rows // ROW_BLOCK, row_bytes // STEP_BYTES
    blocks = tiled.reshape(*lead, nb, ns, step_block_bytes(fmt))
    codes = blocks[..., :ROW_BLOCK * STEP_BYTES].reshape(*lead, nb, ns, ROW_BLOCK, STEP_BYTES).transpose(-3, -2)
    data = codes.reshape(*lead, rows, row_bytes)
    if fmt != "mxfp4":
        return data, None
    data = _transpose_words(gather_codes(data.reshape(*lead, rows, ns, STEP_BYTES))).reshape(*lead, rows, row_bytes)
    per = STEP_COLS[fmt] // 32
    s = blocks[..., ROW_BLOCK * STEP_BYTES:].reshape(*lead, nb, ns, ROW_BLOCK, per).transpose(-3, -2)
    return data, s.reshape(*lead, rows, ns * per)


def _transpose_words(steps: torch.Tensor) -> torch.Tensor:
    """[..., 64] bytes of a row's steps -> the same with the 4 x 4 words transposed (its own inverse)."""
    lead = steps.shape[:-1]
    return steps.reshape(*lead, 4, 4, 4).transpose(-3, -2).reshape(*lead, STEP_BYTES)


# Where code n of a 32-bit word (stored in bits 4n .. 4n + 3: magnitude e1 e0 m, then the sign)
# goes in its spread word: magnitude bits to MAG_AT[n] .., the sign to SIGN_AT[n].  Codes 3 / 7 then
# sit where an fp16 pair reads an E2M1 value times 2^-14 (magnitude at 9..11, sign at 15; +16 for
# the high half), codes 2 / 6 three bits below that, codes 1 / 5 (0 / 4) with their magnitudes 6
# (9) and their signs 1 (2) bits below: each pair one shift and a mask from the fp16 bits, or two
# shifts, two masks and an or (the fewest operations a word for any placement: a search over
# all of them).
MAG_AT = (0, 3, 6, 9, 16, 19, 22, 25)
SIGN_AT = (13, 14, 12, 15, 29, 30, 28, 31)


def spread_codes(raw: torch.Tensor) -> torch.Tensor:
    """uint8 bytes (last dim a multiple of 4, little-endian 32-bit words) with every word's codes
    spread (MAG_AT / SIGN_AT)."""
    w = raw.contiguous().view(torch.int32)
    out = torch.zeros_like(w)
    for n in range(8):
        out |= ((w >> (4 * n)) & 7) << MAG_AT[n]
        out |= ((w >> (4 * n + 3)) & 1) << SIGN_AT[n]
    return out.view(torch.uint8)


def fp16_pairs(spread: int) -> list[int]:
    """What the device makes of one spread word (gemv.cuh `fp4_word_to_f16x2`, bit for bit): four
    fp16 pairs (low half, high half) of codes (3, 7), (2, 6), (1, 5), (0, 4), each E2M1 value
    times 2^-14."""
    return [spread & 0x8E008E00, (spread << 3) & 0x8E008E00 & 0xFFFFFFFF,
            ((spread << 6) & 0x0E000E00) | ((spread << 1) & 0x80008000),
            ((spread << 9) & 0x0E000E00) | ((spread << 2) & 0x80008000)]


def gather_codes(raw: torch.Tensor) -> torch.Tensor:
    """The inverse of `spread_codes`."""
    w = raw.contiguous().view(torch.int32)
    out = torch.zeros_like(w)
    for n in range(8):
        out |= ((w >> MAG_AT[n]) & 7) << (4 * n)
        out |= ((w >> SIGN_AT[n]) & 1) << (4 * n + 3)
    return out.view(torch.uint8)


def offset_of(fmt: str, row_bytes: int, row: int, byte: int) -> int:
    """Where byte `byte` of row `row` (of one expert) lands in the tiled layout (the device's
    indexing: block, step, row in block, byte in step).  MXFP4: the byte's codes are in the word
    at that offset & ~3, spread (`gather_codes` gives the byte back)."""
    ns = row_bytes // STEP_BYTES
    block, r = divmod(row, ROW_BLOCK)
    step, b = divmod(byte, STEP_BYTES)
    if fmt == "mxfp4":  # stored word 4j + t sits at 4t + j
        j, t, within = b // 16, (b // 4) % 4, b % 4
        b = 16 * t + 4 * j + within
    return (block * ns + step) * step_block_bytes(fmt) + r * STEP_BYTES + b
