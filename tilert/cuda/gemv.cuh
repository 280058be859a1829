// Weight streaming and the GEMV core.
//
// A task reads its weights as *tiles*: rows [r0, r1) of one matrix (of one expert).  A tile is
// cut into *pieces* that fit one ring slot, each one contiguous range of global memory, so one
// 1-D bulk copy moves it.  Weights the tensor-core GEMV reads are stored *tiled*
// (tilert/tiling.py: 16-row blocks of 64-byte steps), where a piece is some whole row blocks, or
// a run of steps of one block; the others are row-major and a piece is some whole rows.  The
// loader warp and the compute warps enumerate the very same tiles (the per-kind `tiles_of`) and
// cut them with the very same `pieces_of`, so they agree on the piece sequence without talking:
// piece j lives in slot j % TILERT_SLOTS.  Without the loader (TILERT_LOADER 0) nothing is tiled
// and a piece is read straight from global memory with 16-byte loads; the arithmetic is the same.
#pragma once

#include "common.cuh"

namespace tilert {

// One weight tile; `idx` non-null means the expert is idx[idx_pos] (the router's choice,
// known only at run time).
struct Tile {
  int w;
  const int* idx;
  int idx_pos;
  int r0, r1;
};

TILERT_DEV int tile_expert(const Tile& t) { return t.idx ? t.idx[t.idx_pos] : 0; }

// With the loader, an MXFP4 piece carries its rows' E8M0 scales right after the codes (one bulk
// copy each), so the compute warps never wait on a global scale load inside the dot product.
// (Scale rows must keep 16-byte alignment for the bulk copy; otherwise they are read from global.)
TILERT_DEV bool scales_in_ring(const WeightDesc& w) {
  return TILERT_LOADER && w.fmt == FMT_MXFP4 && w.scale_ld % 16 == 0 && w.expert_scale_bytes % 16 == 0;
}

// Bytes one row occupies in a ring slot.
TILERT_DEV int piece_row_bytes(const WeightDesc& w) { return w.row_bytes + (scales_in_ring(w) ? w.scale_ld : 0); }

TILERT_DEV bool mma_ok(const WeightDesc& w);

// Rows of mma partials one reduction gathers (gemv_tile_mma): the compute warps meet at a
// barrier once per this many rows, not once per piece.  Mirrored by tilert/codegen.py.
constexpr int kRedRows = 128 / kB < 16 ? 16 : 128 / kB;
// The rows an NB-token GEMV gathers a reduction (gemv_tile_mma, gemv_slots_mma).  The partials
// area holds kRedRows x kB floats a warp and buffer (tilert/codegen.py sizes it), so a GEMV of
// fewer tokens than the step has (a verify step's union gate/up: ~1 routed token a selected
// expert) gathers proportionally more rows, and its warps meet at a barrier that much less often
// (16-row batches made them meet once a ring piece).
template <int NB>
TILERT_DEV constexpr int red_rows() {
  return kRedRows * kB / NB;
}

TILERT_DEV int mma_step_cols(int fmt) { return fmt == FMT_MXFP4 ? 128 : fmt == FMT_FP8 ? 64 : 32; }

// The tiled layout (tilert/tiling.py): a step block holds 64 bytes of each of 16 rows, row after
// row, then (MXFP4) their 4 E8M0 scale bytes each.
constexpr int kRowBlock = 16, kStepBytes = 64;
TILERT_DEV int step_block_bytes(const WeightDesc& w) { return 1024 + (w.fmt == FMT_MXFP4 ? 64 : 0); }
TILERT_DEV int row_steps(const WeightDesc& w) { return w.row_bytes / kStepBytes; }

// How a weight's tiles are cut into ring pieces.  Row-major: `rp` whole rows, as many as fit (at
// most one per compute thread).  Tiled: `rp` rows of whole row blocks when a block fits a slot
// (at most one block per compute warp and kRedRows rows), else one block in `nch` chunks of
// `ns` steps (the last may have fewer).
struct Pieces {
  int rp, nch, ns;
};

TILERT_OUTLINE Pieces pieces_of(const WeightDesc& w) {
  if (!w.tiled) return Pieces{min(kNCT, TILERT_SLOT_BYTES / piece_row_bytes(w)), 1, 0};
  const int nsteps = row_steps(w), fit = TILERT_SLOT_BYTES / step_block_bytes(w);
  if (fit >= nsteps) return Pieces{kRowBlock * min(min(fit / nsteps, kRedRows / kRowBlock), kNCW), 1, nsteps};
  const int nch = (nsteps + fit - 1) / fit;
  return Pieces{kRowBlock, nch, (nsteps + nch - 1) / nch};
}

// Where the piece of rows [ra, ra + nr) (whole blocks), chunk kq lies in a tiled weight: its
// first step, its steps and its bytes from the expert's start.
struct Span {
  int s_lo, ns;
  size_t offset;
  uint32_t bytes;
};

TILERT_DEV Span piece_span(const WeightDesc& w, const Pieces& pc, int ra, int nr, int kq) {
  const int nsteps = row_steps(w), sb = step_block_bytes(w);
  const int s_lo = kq * pc.ns, ns = min(pc.ns, nsteps - s_lo);
  const int blocks = pc.nch == 1 ? (nr + kRowBlock - 1) / kRowBlock : 1;
  return Span{s_lo, ns, ((size_t)(ra / kRowBlock) * nsteps + s_lo) * sb, (uint32_t)(blocks * ns * sb)};
}

// Threads that share one row of a piece: whole warps when there are fewer rows than warps
// (reduced across warps in smem), else a power of two <= 32 (reduced with shuffles).
TILERT_DEV int group_size(int nr) {
  if (nr <= kNCW) return 32 * (kNCW / nr);
  const int g = kNCT / nr;
  return 1 << (31 - __clz(g));
}

TILERT_DEV const uint8_t* tile_data(const WeightDesc& w, int expert) {
  return reinterpret_cast<const uint8_t*>(w.data) + (size_t)expert * (size_t)w.expert_bytes;
}

TILERT_DEV const uint8_t* tile_scale(const WeightDesc& w, int expert) {
  return reinterpret_cast<const uint8_t*>(w.scale) + (size_t)expert * (size_t)w.expert_scale_bytes;
}

// ---- the ring ---------------------------------------------------------------------------------

TILERT_DEV uint64_t* ring_full(uint8_t* smem, int slot) {
  return reinterpret_cast<uint64_t*>(smem + TILERT_SMEM_BARS) + slot;
}
TILERT_DEV uint64_t* ring_empty(uint8_t* smem, int slot) {
  return reinterpret_cast<uint64_t*>(smem + TILERT_SMEM_BARS) + TILERT_SLOTS + slot;
}
TILERT_DEV uint8_t* ring_slot(uint8_t* smem, int slot) { return smem + TILERT_SMEM_RING + slot * TILERT_SLOT_BYTES; }

// Compute side: wait until piece `j` has landed.  A stall here means loader and compute warps
// disagree on the piece sequence (a bug, never a schedule problem): record it and trap.
TILERT_DEV void ring_wait_full(Ctx& c, uint32_t j) {
  uint64_t* bar = ring_full(c.smem, j % TILERT_SLOTS);
  const uint32_t parity = (j / TILERT_SLOTS) & 1;
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = globaltimer();
  while (!mbar_try_wait(bar, parity)) {
    if (c.a->timeout_ns && globaltimer() - t0 > 4 * c.a->timeout_ns) {
      record_error(c, ERR_RING_STALL, -1, j, 0, 0);
      __trap();
    }
  }
}

// ---- GEMV over one tile ---------------------------------------------------------------------

// A row is walked in *units*: the bytes of weights that pair with 16 or 32 bytes of x (4 or 8
// elements).  Lane `lig` of a row group takes units lig, lig + G, ..., so the lanes of a group
// read consecutive weight bytes and consecutive x bytes (x reads of a warp: 16-byte stride,
// 32 for MXFP4, instead of one 16-byte chunk's E*4 bytes apart).
template <int FMT> struct Unit;
template <> struct Unit<FMT_FP32> { static constexpr int kBytes = 16, kElems = 4; };
template <> struct Unit<FMT_BF16> { static constexpr int kBytes = 8, kElems = 4; };
template <> struct Unit<FMT_FP8> { static constexpr int kBytes = 4, kElems = 4; };
template <> struct Unit<FMT_MXFP4> { static constexpr int kBytes = 4, kElems = 8; };

template <int UB>
TILERT_DEV uint4 ld_unit(const uint8_t* p) {
#if TILERT_LOADER
  const uint32_t a = smem_addr(p);
  uint4 v = make_uint4(0, 0, 0, 0);
  if constexpr (UB == 16) {
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  } else if constexpr (UB == 8) {
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(a));
  } else {
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v.x) : "r"(a));
  }
  return v;
#else
  if constexpr (UB == 16) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else if constexpr (UB == 8) {
    const uint2 t = __ldg(reinterpret_cast<const uint2*>(p));
    return make_uint4(t.x, t.y, 0, 0);
  } else {
    return make_uint4(__ldg(reinterpret_cast<const uint32_t*>(p)), 0, 0, 0);
  }
#endif
}

// Dequantized weights of one unit (fp32: code value * block scale, like the VM).  `fscale`: the
// FP8 block's scale_inv; `e8m0`: the MXFP4 block's scale byte.
template <int FMT>
TILERT_DEV void decode_unit(const uint4 raw, float fscale, uint32_t e8m0, float* wv) {
  if constexpr (FMT == FMT_FP32) {
    wv[0] = __uint_as_float(raw.x); wv[1] = __uint_as_float(raw.y);
    wv[2] = __uint_as_float(raw.z); wv[3] = __uint_as_float(raw.w);
  } else if constexpr (FMT == FMT_BF16) {
    wv[0] = __uint_as_float(raw.x << 16); wv[1] = __uint_as_float(raw.x & 0xffff0000u);
    wv[2] = __uint_as_float(raw.y << 16); wv[3] = __uint_as_float(raw.y & 0xffff0000u);
  } else if constexpr (FMT == FMT_FP8) {
    const float2 lo = fp8x2_to_f32((uint16_t)(raw.x & 0xffffu));
    const float2 hi = fp8x2_to_f32((uint16_t)(raw.x >> 16));
    wv[0] = lo.x * fscale; wv[1] = lo.y * fscale; wv[2] = hi.x * fscale; wv[3] = hi.y * fscale;
  } else {  // MXFP4: element 2k in the low nibble of byte k
    if (e8m0 <= 128u) {
      const float s = e8m0_to_f32_x2p126(e8m0);
      wv[0] = fp4_scaled<0>(raw.x, s); wv[1] = fp4_scaled<1>(raw.x, s);
      wv[2] = fp4_scaled<2>(raw.x, s); wv[3] = fp4_scaled<3>(raw.x, s);
      wv[4] = fp4_scaled<4>(raw.x, s); wv[5] = fp4_scaled<5>(raw.x, s);
      wv[6] = fp4_scaled<6>(raw.x, s); wv[7] = fp4_scaled<7>(raw.x, s);
    } else {  // scales above 2 (never in practice): the plain decode
      const float s = e8m0_to_f32(e8m0);
#pragma unroll
      for (int j = 0; j < 8; ++j) wv[j] = fp4_value((raw.x >> (4 * j)) & 15u) * s;
    }
  }
}

// acc[b] += the unit's weights . x_b at column `col` (XRow(b): token b's fp32 input row).
template <int FMT, int NB, class XRow>
TILERT_DEV void fma_unit(const float* wv, XRow xrow, int col, float* acc) {
  constexpr int UE = Unit<FMT>::kElems;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const float4* xp = reinterpret_cast<const float4*>(xrow(b) + col);
#pragma unroll
    for (int j = 0; j < UE / 4; ++j) {
      const float4 xv = xp[j];
      acc[b] += wv[4 * j] * xv.x;
      acc[b] += wv[4 * j + 1] * xv.y;
      acc[b] += wv[4 * j + 2] * xv.z;
      acc[b] += wv[4 * j + 3] * xv.w;
    }
  }
}

// The partial sums of a row group (G threads a row) gathered in the group's first thread:
// shuffles within a warp, else each warp's sum through smem (`red`).  All compute threads.
template <int NB>
TILERT_DEV void reduce_rows(float* acc, int G, int lig, bool has_row, float* red) {
  const int tid = threadIdx.x;
  if (G <= 32) {
    for (int o = G >> 1; o; o >>= 1) {
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[b] += __shfl_xor_sync(kFull, acc[b], o);
    }
    return;
  }
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = warp_sum(acc[b]);
  if ((tid & 31) == 0) {
#pragma unroll
    for (int b = 0; b < NB; ++b) red[(tid >> 5) * NB + b] = acc[b];
  }
  compute_sync();
  if (lig == 0 && has_row) {
    const int w0 = tid >> 5, nw = G >> 5;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float s = 0.f;
      for (int q = 0; q < nw; ++q) s += red[(w0 + q) * NB + b];
      acc[b] = s;
    }
  }
  compute_sync();
}

// out_i = W[r0 + i] . x_b for b < NB, delivered to epi(i, float v[NB]) by one thread per row, for
// a row-major weight.  XRow(b) gives the fp32 input row b (16-byte aligned).  Every compute
// thread must call this.
template <int FMT, int NB, class XRow, class Epi>
TILERT_DEV void gemv_tile_fmt(Ctx& c, const WeightDesc& w, const Tile& tile, XRow xrow, Epi epi) {
  constexpr int UB = Unit<FMT>::kBytes, UE = Unit<FMT>::kElems;
  const int tid = threadIdx.x;
  const int rb = w.row_bytes;
  const int nu = rb / UB;
  const int rpp = pieces_of(w).rp;
  const bool ring_scales = scales_in_ring(w);
  const int expert = tile_expert(tile);
  const uint8_t* gdata = tile_data(w, expert);
  const uint8_t* gscale = tile_scale(w, expert);
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);
  (void)gdata;

  for (int ra = tile.r0; ra < tile.r1; ra += rpp) {
    const int nr = min(rpp, tile.r1 - ra);
    const int G = group_size(nr);
    const int rl = tid / G, lig = tid % G;
#if TILERT_LOADER
    const int slot = c.piece % TILERT_SLOTS;
    ring_wait_full(c, c.piece);
    const uint8_t* src = ring_slot(c.smem, slot);
    const uint8_t* ssrc = ring_scales ? src + (size_t)nr * rb : gscale + (size_t)ra * w.scale_ld;
#else
    const uint8_t* src = gdata + (size_t)ra * rb;
    const uint8_t* ssrc = gscale + (size_t)ra * w.scale_ld;
    (void)ring_scales;
#endif
    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[b] = 0.f;
    if (rl < nr) {
      const uint8_t* row = src + (size_t)rl * rb;
      const uint8_t* srow = ssrc + (size_t)rl * w.scale_ld;
      const float* fs = reinterpret_cast<const float*>(gscale) + (size_t)((ra + rl) >> 7) * w.scale_ld;  // FP8
#pragma unroll 4
      for (int u = lig; u < nu; u += G) {
        float wv[UE];
        // FP8: one scale_inv per 128 x 128 block; MXFP4: one E8M0 byte per 32 columns
        decode_unit<FMT>(ld_unit<UB>(row + UB * u), FMT == FMT_FP8 ? __ldg(fs + (u * UE >> 7)) : 0.f,
                         FMT == FMT_MXFP4 ? (uint32_t)srow[u * UE >> 5] : 0u, wv);
        fma_unit<FMT, NB>(wv, xrow, u * UE, acc);
      }
    }
#if TILERT_LOADER
    // This warp is done with the slot: hand it back to the loader.
    __syncwarp();
    if ((tid & 31) == 0) mbar_arrive(ring_empty(c.smem, slot));
    ++c.piece;
#endif
    reduce_rows<NB>(acc, G, lig, rl < nr, red);
    if (lig == 0 && rl < nr) epi(ra + rl - tile.r0, acc);
  }
}

// MXFP4 tiled layout (tilert/tiling.py): a row's 64-byte step holds its 16 words transposed as
// 4 x 4, stored word 4j + t at 4t + j; this maps a word (or an 8-column group) either way.
TILERT_DEV int fp4_word_swap(int k) { return 4 * (k & 3) + (k >> 2); }

// A spread MXFP4 word (tilert/tiling.py `spread_codes`) -> the four fp16 pairs of its codes
// (3, 7), (2, 6), (1, 5), (0, 4) (low half, high half): sign to bit 15 / 31, the three magnitude
// bits to 9..11 / 25..27, where an fp16 reads the E2M1 value times 2^-14 exactly (e = 0 lands on
// the fp16 subnormals).  11 operations a word (16 for nibbles in place).
TILERT_DEV void fp4_word_to_f16x2(uint32_t w, uint32_t* h) {
  h[0] = w & 0x8E008E00u;
  h[1] = (w << 3) & 0x8E008E00u;
  h[2] = ((w << 6) & 0x0E000E00u) | ((w << 1) & 0x80008000u);
  h[3] = ((w << 9) & 0x0E000E00u) | ((w << 2) & 0x80008000u);
}

// The inverse of the spread (code n back to bits 4n .. 4n + 3), for the CUDA-core loop's decode.
TILERT_DEV uint32_t fp4_word_gather(uint32_t w) {
  constexpr int kMagAt[8] = {0, 3, 6, 9, 16, 19, 22, 25}, kSignAt[8] = {13, 14, 12, 15, 29, 30, 28, 31};
  uint32_t out = 0;
#pragma unroll
  for (int n = 0; n < 8; ++n) out |= ((w >> kMagAt[n]) & 7u) << (4 * n) | ((w >> kSignAt[n]) & 1u) << (4 * n + 3);
  return out;
}

// The same over a tiled weight (tilert/tiling.py) on the CUDA cores: the steps where the tensor
// cores cannot take it (more tokens than one mma holds, or their staged x would not fit).  A
// thread keeps one row of a piece; a row's 64-byte step slices lie one step block apart, and
// its partial sums carry over the chunks of its row block.
template <int FMT, int NB, class XRow, class Epi>
TILERT_DEV void gemv_tile_tiled(Ctx& c, const WeightDesc& w, const Tile& tile, XRow xrow, Epi epi) {
  constexpr int UB = Unit<FMT>::kBytes, UE = Unit<FMT>::kElems, kUps = kStepBytes / UB;  // units per row step
  const int tid = threadIdx.x;
  const Pieces pc = pieces_of(w);
  const int sb = step_block_bytes(w), step_cols = mma_step_cols(w.fmt);
  const uint8_t* gscale = tile_scale(w, tile_expert(tile));
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);
  for (int ra = tile.r0; ra < tile.r1; ra += pc.rp) {
    const int nr = min(pc.rp, tile.r1 - ra);
    const int G = group_size(nr);
    const int rl = tid / G, lig = tid % G;
    const float* fs = reinterpret_cast<const float*>(gscale) + (size_t)((ra + rl) >> 7) * w.scale_ld;  // FP8
    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[b] = 0.f;
    for (int kq = 0; kq < pc.nch; ++kq) {
      const Span sp = piece_span(w, pc, ra, nr, kq);
      const int slot = c.piece % TILERT_SLOTS;
      ring_wait_full(c, c.piece);
      if (rl < nr) {
        const uint8_t* row = ring_slot(c.smem, slot) + (size_t)(rl / kRowBlock) * sp.ns * sb + (rl % kRowBlock) * kStepBytes;
        const uint8_t* srow = row - (rl % kRowBlock) * kStepBytes + 1024 + 4 * (rl % kRowBlock);  // MXFP4 scales
#pragma unroll 4
        for (int u = lig; u < sp.ns * kUps; u += G) {
          const int st = u / kUps, k = u % kUps;  // (kUps is a power of two)
          const int ks = FMT == FMT_MXFP4 ? fp4_word_swap(k) : k;  // the stored word tiled word k holds
          const int col = (sp.s_lo + st) * step_cols + ks * UE;
          float wv[UE];
          uint4 raw = ld_unit<UB>(row + st * sb + k * UB);
          if constexpr (FMT == FMT_MXFP4) raw.x = fp4_word_gather(raw.x);  // tiled words are spread
          decode_unit<FMT>(raw, FMT == FMT_FP8 ? __ldg(fs + (col >> 7)) : 0.f,
                           FMT == FMT_MXFP4 ? (uint32_t)srow[st * sb + (ks * UE >> 5)] : 0u, wv);
          fma_unit<FMT, NB>(wv, xrow, col, acc);
        }
      }
      __syncwarp();
      if ((tid & 31) == 0) mbar_arrive(ring_empty(c.smem, slot));
      ++c.piece;
    }
    reduce_rows<NB>(acc, G, lig, rl < nr, red);
    if (lig == 0 && rl < nr) epi(ra + rl - tile.r0, acc);
  }
}

// ---- tensor-core GEMV (mma.sync m16n8k16) ---------------------------------------------------
//
// The CUDA-core loop above spends several instructions per weight (decode, scale, FMA, an x load
// per row) and re-reads x for every row; at batch 1 that, not HBM, bounds it.  Here a warp
// multiplies 16 rows by x on the tensor cores: the weights are the A operand (decoded to fp16,
// or bf16 as stored), x the B operand split into hi + lo halves (columns 2b and 2b + 1 for token
// b), so the fp32 accumulators see x to ~22 bits.
//
// Weights are tiled (tilert/tiling.py).  A warp *step* covers 16 rows x kStep columns, one step
// block: lane (g, t) reads 16 bytes of rows g and g + 8 (columns t * kStep / 4 ...), 512
// consecutive bytes a warp (no bank conflicts), and every register it loads feeds the mma slots
// of those same columns, so which column sits in which slot only fixes the order x is staged in.
// Experiment switch TILERT_DIAG_SKIP_MMA (tools/profile_step.py --diag-skip-mma): the pieces are
// streamed and reduced but the arithmetic skipped (wrong results; timing tells memory from compute).
//
// (MXFP4: lane t's 16 bytes are word t of each of the step's four 32-column blocks.)
//
// Scales: FP8 (one per 128 x 128 block) multiplies the step's fp32 partial.  MXFP4 has one per
// 32 columns; each pair of mmas of a step sums one block, so the block's scale multiplies the
// pair's fp32 result (mma_step_fp4).
#ifndef TILERT_MMA_FORMATS
#define TILERT_MMA_FORMATS 0
#endif
#ifndef TILERT_XS_BYTES
#define TILERT_XS_BYTES 0
#endif
#ifndef TILERT_DIAG_SKIP_MMA  // diagnostics only (tools/profile_step.py --diag-skip-mma): wrong results
#define TILERT_DIAG_SKIP_MMA 0
#endif
// Experiment switch (tools/ab_plain.py --define TILERT_MMA_STEP_UNROLL=N): how many steps of a
// warp's share of a piece mma_piece's loop unrolls.  1 (less code: Nsight Compute found the
// MXFP4 expert GEMV missing the instruction cache in 17 % of its samples) measured against 2
// (two steps' loads and mma chains overlapping) on an H100, 2026-12-07, interleaved rounds:
// 6-layer flash step -1.1 % at B = 1, -2.1 % at B = 8 (BENCHMARKS.md stop 21); 4: +0.4 %.
#ifndef TILERT_MMA_STEP_UNROLL
#define TILERT_MMA_STEP_UNROLL 1
#endif
constexpr int kMmaStepUnroll = TILERT_MMA_STEP_UNROLL;  // (#pragma unroll takes a constant, not a macro)
// Experiment switch (tools/profile_step.py --define TILERT_MMA_NOINLINE=1): gemv_tile_mma
// compiled as its own function (measured on an H200, 2026-12-04: 14% slower steps).
#ifndef TILERT_MMA_NOINLINE
#define TILERT_MMA_NOINLINE 0
#endif
#if TILERT_MMA_NOINLINE
#define TILERT_MMA_FN __device__ __noinline__
#else
#define TILERT_MMA_FN TILERT_DEV
#endif

template <int FMT> struct MmaFmt;
template <> struct MmaFmt<FMT_BF16> { static constexpr int kStep = 32, kMmas = 2; };
template <> struct MmaFmt<FMT_FP8> { static constexpr int kStep = 64, kMmas = 4; };
template <> struct MmaFmt<FMT_MXFP4> { static constexpr int kStep = 128, kMmas = 8; };

// Bytes of x one token stages for `cols` columns: hi and lo planes of 2 bytes a column, each
// plane padded by 64 bytes so the hi and lo lanes of a warp hit different banks.
TILERT_DEV int xs_bytes(int cols) { return 2 * (2 * cols + 64); }

TILERT_DEV bool mma_format(const WeightDesc& w) {
  return TILERT_LOADER && w.tiled && kB <= 8 && ((TILERT_MMA_FORMATS >> w.fmt) & 1);
}

// Whether weight `w`'s GEMVs run on the tensor cores with the step's whole x staged.
TILERT_DEV bool mma_ok(const WeightDesc& w) { return mma_format(w) && kB * xs_bytes(w.cols) <= TILERT_XS_BYTES; }

// Whether they run on the tensor cores a chunk of steps at a time instead (gemv_tile_mma_chunked):
// the whole x of the step's tokens does not fit the xs region (on the flash geometry o_proj's
// 8192 columns from 3 tokens on, the dense down projection's 16384 from 2; measured at B = 8
// only), but one piece's chunk of it does; a piece is one row
// block in chunks, and the tile's sums of every chunk fit the partials area.  The loader then
// issues such a tile's pieces chunk-major (load_tile).  Mirrored by tilert/codegen.py
// (`_chunked_mma`), which sets TILERT_MMA_CHUNKED only where some weight takes it (no code elsewhere).
#ifndef TILERT_MMA_CHUNKED
#define TILERT_MMA_CHUNKED 0
#endif
TILERT_DEV bool mma_chunked(const WeightDesc& w, int r0, int r1) {
  if (!TILERT_MMA_CHUNKED || !mma_format(w) || mma_ok(w) || r1 - r0 > 2 * kRedRows) return false;
  const Pieces pc = pieces_of(w);
  return pc.nch > 1 && kB * xs_bytes(pc.ns * mma_step_cols(w.fmt)) <= TILERT_XS_BYTES;
}

TILERT_DEV void mma_f16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

TILERT_DEV void mma_bf16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Order of each 8 columns in the staged x: the columns the A registers of a lane hold, two per
// register, in register order.  fp8 and bf16 registers hold consecutive columns; the E2M1 decode
// above yields the pairs (3,7) (2,6) (1,5) (0,4) of each 32-bit word.
template <int FMT>
TILERT_DEV int xs_column(int j) {
  if constexpr (FMT == FMT_MXFP4) {
    constexpr int kOrder[8] = {3, 7, 2, 6, 1, 5, 0, 4};
    return kOrder[j];
  } else {
    return j;
  }
}

// Where the 16 bytes of staged x of 8-column group j go (in 16-byte units): lane t of a step
// reads units 4t .. 4t + 3 and feeds unit 4t + q to the mmas of its A word q.  bf16 / fp8: word q
// of lane t holds group 4t + q (units in column order).  MXFP4 (tiled words transposed): word q
// of lane t holds group 4q + t of the step's 16, so that group goes to unit 4t + q.
template <int FMT>
TILERT_DEV int xs_unit(int j) {
  if constexpr (FMT == FMT_MXFP4) {
    return (j & ~15) + fp4_word_swap(j & 15);
  } else {
    return j;
  }
}

// Stage x (nb rows of `cols` fp32) into the xs region as hi/lo halves (fp16; bf16 for bf16
// weights), plane 2b + h for row b, each 8 columns in xs_column order at unit xs_unit(group).
// All compute threads.
template <int FMT, class XRow>
TILERT_DEV void stage_x_rows(Ctx& c, int cols, int nb, XRow xrow) {
  uint8_t* xs = c.smem + TILERT_SMEM_XS;
  const int plane = xs_bytes(cols) / 2;
  const int n8 = cols / 8;
  for (int i = (int)threadIdx.x; i < nb * n8; i += kNCT) {
    const int b = i / n8, j = i % n8;
    const float* x = xrow(b) + 8 * j;
    uint32_t hi[4], lo[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float x0 = x[xs_column<FMT>(2 * p)], x1 = x[xs_column<FMT>(2 * p + 1)];
      if constexpr (FMT == FMT_BF16) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
        const float2 hf = __bfloat1622float2(h);
        const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
        hi[p] = *reinterpret_cast<const uint32_t*>(&h);
        lo[p] = *reinterpret_cast<const uint32_t*>(&l);
      } else {
        const __half2 h = __floats2half2_rn(x0, x1);
        const float2 hf = __half22float2(h);
        const __half2 l = __floats2half2_rn(x0 - hf.x, x1 - hf.y);
        hi[p] = *reinterpret_cast<const uint32_t*>(&h);
        lo[p] = *reinterpret_cast<const uint32_t*>(&l);
      }
    }
    const int at = 16 * xs_unit<FMT>(j);
    *reinterpret_cast<uint4*>(xs + (2 * b) * plane + at) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    *reinterpret_cast<uint4*>(xs + (2 * b + 1) * plane + at) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  }
  compute_sync();
}

template <int FMT, int NB, class XRow>
TILERT_DEV void stage_x(Ctx& c, int cols, XRow xrow) { stage_x_rows<FMT>(c, cols, NB, xrow); }

TILERT_DEV uint32_t cvt_e4m3x2(uint32_t two) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffffu), __NV_E4M3);
  return *reinterpret_cast<uint32_t*>(&h);
}

// One step over NT n8 tiles of staged x (tile u: tokens 4u..4u+3, hi and lo): the lane's
// partials of rows g (d[u][0] + d[u][1]) and g + 8 (d[u][2] + d[u][3]) for token 4u + t,
// accumulated into d0[u] / d1[u] (two chains, so consecutive mmas do not wait on each other).
// qa / qb: the lane's 16 bytes of the two rows, decoded once for all tiles; bx[u]: its staged x
// of tile u (kMmas x 2 registers).
template <int FMT, int NT>
TILERT_DEV void mma_step(const uint4 qa, const uint4 qb, const uint32_t (*bx)[2 * MmaFmt<FMT>::kMmas],
                         float (*d0)[4], float (*d1)[4]) {
  const uint32_t A[4] = {qa.x, qa.y, qa.z, qa.w}, Bq[4] = {qb.x, qb.y, qb.z, qb.w};
  if constexpr (FMT == FMT_BF16) {
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      mma_bf16(d0[u], A[0], Bq[0], A[1], Bq[1], bx[u][0], bx[u][1]);
      mma_bf16(d1[u], A[2], Bq[2], A[3], Bq[3], bx[u][2], bx[u][3]);
    }
  } else {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const uint32_t a0 = cvt_e4m3x2(A[m]), a1 = cvt_e4m3x2(Bq[m]), a2 = cvt_e4m3x2(A[m] >> 16),
                     a3 = cvt_e4m3x2(Bq[m] >> 16);
#pragma unroll
      for (int u = 0; u < NT; ++u) mma_f16(m & 1 ? d1[u] : d0[u], a0, a1, a2, a3, bx[u][2 * m], bx[u][2 * m + 1]);
    }
  }
}

// MXFP4 step: wa / wb hold the four E8M0 scales of the step's blocks for rows g and g + 8
// (block j's is byte j).  The tiled layout gives lane t word t of every block (qa.x..w: blocks
// 0..3 of row g, qb of row g + 8; tilert/tiling.py), so mmas 2j and 2j + 1 sum block j's 32
// columns alone and its scale multiplies their fp32 result once: 8 scalings a step instead of
// 64 fp16 products of decoded weights, and four independent mma chains.  The decode's 2^-14
// (fp4_word_to_f16x2) is taken out of the row's sum once, by the caller (kFp4Unscale).
// Scale bytes 1..254 are exact; 0 gives 0 (2^-127 in the VM) and 255 infinity (NaN).
constexpr float kFp4Unscale = 16384.f;

TILERT_DEV float e8m0_byte_f32(uint32_t w, int j) {  // byte j of w as 2^(e - 127)
  return __uint_as_float(j < 3 ? (w << (23 - 8 * j)) & 0x7F800000u : (w >> 1) & 0x7F800000u);
}

template <int NT>
TILERT_DEV void mma_step_fp4(const uint4 qa, const uint4 qb, const uint32_t (*bx)[16], uint32_t wa, uint32_t wb,
                             float (*acc)[2]) {
  const uint32_t A[4] = {qa.x, qa.y, qa.z, qa.w}, Bq[4] = {qb.x, qb.y, qb.z, qb.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float e[NT][4];
#pragma unroll
    for (int u = 0; u < NT; ++u) e[u][0] = e[u][1] = e[u][2] = e[u][3] = 0.f;
    uint32_t ha[4], hb[4];
    fp4_word_to_f16x2(A[j], ha);
    fp4_word_to_f16x2(Bq[j], hb);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int u = 0; u < NT; ++u)
        mma_f16(e[u], ha[2 * h], hb[2 * h], ha[2 * h + 1], hb[2 * h + 1], bx[u][4 * j + 2 * h], bx[u][4 * j + 2 * h + 1]);
    }
    const float sa = e8m0_byte_f32(wa, j), sbv = e8m0_byte_f32(wb, j);
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      acc[u][0] = fmaf(e[u][0] + e[u][1], sa, acc[u][0]);
      acc[u][1] = fmaf(e[u][2] + e[u][3], sbv, acc[u][1]);
    }
  }
}

// The first of the compute warps that work on 16-row group gi of a piece of ng groups (warp w
// takes group w * ng / kNCW).
TILERT_DEV int group_first_warp(int gi, int ng) { return (gi * kNCW + ng - 1) / ng; }

// warp_share and row_warps (integer divisions a GEMV runs once per piece shape / output row)
// compiled once each as functions, not inlined at every GEMV call site, for the instruction
// cache: -0.5 % on the 6-layer flash step at B = 1 (H100, 2026-12-07, with unroll 1 above; B = 8
// -0.1 %).  `--define TILERT_OUTLINE_SHARES=0` inlines them again for an A/B.
#ifndef TILERT_OUTLINE_SHARES
#define TILERT_OUTLINE_SHARES 1
#endif
#if TILERT_OUTLINE_SHARES
#define TILERT_SHARE_FN TILERT_OUTLINE
#else
#define TILERT_SHARE_FN TILERT_DEV
#endif

// A warp's share of a piece of `ng` 16-row groups and `ns` steps: warps split the groups, then
// each group's steps (contiguous ranges).  Pieces of a tile share one shape but for the last
// ones, so it is computed per shape, not per piece (the divisions cost a piece's worth of
// issue slots otherwise).
struct WarpShare {
  int ng, ns, gi, s0, s1;
};

TILERT_SHARE_FN WarpShare warp_share(int ng, int ns) {
  const int wid = threadIdx.x >> 5;
  const int gi = wid * ng / kNCW;
  const int first = group_first_warp(gi, ng), nj = group_first_warp(gi + 1, ng) - first;
  const int j = wid - first;
  return WarpShare{ng, ns, gi, j * ns / nj, (j + 1) * ns / nj};
}

// One warp's sums over the pieces of a row block: rows 16 gi + g (acc[u][0]) and + 8 (acc[u][1])
// for token 4u + t.  bf16 runs two mma chains (d0, d1) that `rows` folds into acc at the end;
// fp8 and MXFP4 add their scaled step partials to acc directly.
template <int NT>
struct MmaAcc {
  float d0[NT][4], d1[NT][4], acc[NT][2];
  TILERT_DEV void zero() {
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      acc[u][0] = acc[u][1] = 0.f;
#pragma unroll
      for (int r = 0; r < 4; ++r) d0[u][r] = d1[u][r] = 0.f;
    }
  }
  template <int FMT>
  TILERT_DEV void fold() {
    if constexpr (FMT == FMT_BF16) {
#pragma unroll
      for (int u = 0; u < NT; ++u) {
        acc[u][0] = d0[u][0] + d0[u][1] + d1[u][0] + d1[u][1];
        acc[u][1] = d0[u][2] + d0[u][3] + d1[u][2] + d1[u][3];
      }
    }
  }
};

// This warp's share (sh) of one ring piece of a tiled weight (rows from ra, span sp): waits until
// the piece landed, adds its partials into `a`, hands the slot back to the loader.  `xlane`: the
// lane's staged x (plane g at its step-0 column), `gscale`: the expert's FP8 block scales.
template <int FMT, int NB>
TILERT_DEV void mma_piece(Ctx& c, const WeightDesc& w, const uint8_t* gscale, int ra, const Span& sp,
                          const WarpShare& sh, const uint8_t* xlane, int plane, MmaAcc<(NB + 3) / 4>& a) {
  constexpr int kStep = MmaFmt<FMT>::kStep, kRegs = 2 * MmaFmt<FMT>::kMmas, NT = (NB + 3) / 4;
  const int lane = threadIdx.x & 31, g = lane >> 2;
  const int scale_ld = w.scale_ld, sb = step_block_bytes(w);
  const int rA = 16 * sh.gi + g;  // and rB = rA + 8 (tiles are whole row blocks)
  const float* fsA = reinterpret_cast<const float*>(gscale) + (size_t)((ra + rA) >> 7) * scale_ld;  // FP8
  const float* fsB = reinterpret_cast<const float*>(gscale) + (size_t)((ra + rA + 8) >> 7) * scale_ld;
  const int slot = c.piece % TILERT_SLOTS;
  ring_wait_full(c, c.piece);
  // this warp's row block: a step block a step, lane 4g + t at byte 16 lane (rows g), rows
  // g + 8 512 bytes on, MXFP4 scales (4 bytes a row) after the 1024 code bytes
  const uint8_t* blk = ring_slot(c.smem, slot) + (size_t)sh.gi * sp.ns * sb + 16 * lane;
  const uint8_t* sblk = blk - 16 * lane + 1024 + 4 * g;
  // FP8: the next step's block scales are loaded a step ahead (global memory, L2 latency).
  float nsa = 0.f, nsb = 0.f;
  if (FMT == FMT_FP8 && sh.s0 < sh.s1) {
    nsa = __ldg(fsA + ((kStep * (sp.s_lo + sh.s0)) >> 7));
    nsb = __ldg(fsB + ((kStep * (sp.s_lo + sh.s0)) >> 7));
  }
#pragma unroll kMmaStepUnroll
  for (int st = sh.s0; st < (TILERT_DIAG_SKIP_MMA ? sh.s0 : sh.s1); ++st) {
    const uint4 qa = *reinterpret_cast<const uint4*>(blk + st * sb);
    const uint4 qb = *reinterpret_cast<const uint4*>(blk + st * sb + 512);
    uint32_t bx[NT][kRegs];
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      // Tile u reads plane 8u + g (token 4u + g / 2).  Lanes past the last token's planes read
      // that plane again instead of zeros: they only feed the D columns of tokens >= NB, which
      // nobody stores, and loading beats zeroing 4 registers a step (x is finite where it is used).
      const uint8_t* xu = xlane + (size_t)(min(8 * u + g, 2 * NB - 1) - g) * plane + 2 * kStep * sp.s_lo;
#pragma unroll
      for (int q = 0; q < kRegs / 4; ++q) {
        const uint4 v = *reinterpret_cast<const uint4*>(xu + 2 * kStep * st + 16 * q);
        bx[u][4 * q] = v.x; bx[u][4 * q + 1] = v.y; bx[u][4 * q + 2] = v.z; bx[u][4 * q + 3] = v.w;
      }
    }
    if constexpr (FMT == FMT_MXFP4) {
      const uint32_t* sc = reinterpret_cast<const uint32_t*>(sblk + st * sb);
      mma_step_fp4<NT>(qa, qb, bx, sc[0], sc[8], a.acc);
    } else if constexpr (FMT == FMT_FP8) {  // scale_inv of the 128 x 128 block
      const float sa = nsa, sb_ = nsb;
      if (st + 1 < sh.s1) {
        nsa = __ldg(fsA + ((kStep * (sp.s_lo + st + 1)) >> 7));
        nsb = __ldg(fsB + ((kStep * (sp.s_lo + st + 1)) >> 7));
      }
      float e0[NT][4], e1[NT][4];
#pragma unroll
      for (int u = 0; u < NT; ++u)
#pragma unroll
        for (int r = 0; r < 4; ++r) e0[u][r] = e1[u][r] = 0.f;
      mma_step<FMT, NT>(qa, qb, bx, e0, e1);
#pragma unroll
      for (int u = 0; u < NT; ++u) {
        a.acc[u][0] += (e0[u][0] + e0[u][1] + e1[u][0] + e1[u][1]) * sa;
        a.acc[u][1] += (e0[u][2] + e0[u][3] + e1[u][2] + e1[u][3]) * sb_;
      }
    } else {
      mma_step<FMT, NT>(qa, qb, bx, a.d0, a.d1);
    }
  }
  __syncwarp();
  if (lane == 0) mbar_arrive(ring_empty(c.smem, slot));
  ++c.piece;
}

// Write this warp's sums (`acc`, rows 16 gi .. 16 gi + 15 of a piece of nr rows) to `part`
// (row-major [row][NB]); lane t of tile u holds token 4u + t.  MXFP4 takes the decode's 2^-14 out.
template <int FMT, int NB>
TILERT_DEV void store_partials(float* part, const float (*acc)[2], int gi, int nr) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float un = FMT == FMT_MXFP4 ? kFp4Unscale : 1.f;  // the E2M1 decode's 2^-14
#pragma unroll
  for (int u = 0; u < (NB + 3) / 4; ++u) {
    const int b = 4 * u + t;
    if (b < NB && 16 * gi + g < nr) part[g * NB + b] = acc[u][0] * un;  // (rows past nr would spill
    if (b < NB && 16 * gi + g + 8 < nr) part[(g + 8) * NB + b] = acc[u][1] * un;  // into the next warp's)
  }
}

// The compute warps [f0, f1) that hold partials of row i of consecutive pieces of `rpp` rows
// (rows_left: the rows from i to the last piece's end): the warps of row i's 16-row group in its
// piece, as warp_share split them.
struct WarpRange {
  int f0, f1;
};
TILERT_SHARE_FN WarpRange row_warps(int i, int rpp, int rows_left) {
  const int li = i % rpp, nr = min(rpp, rows_left + li);  // row i's piece
  const int ng = (nr + 15) / 16, gr = li / 16;
  return WarpRange{group_first_warp(gr, ng), group_first_warp(gr + 1, ng)};
}

// Row i (< red_rows<NB>()) of the pieces of `rpp` rows that batch rows [0, bn) hold: the sum of its
// warps' partials in red[buf] (the warps of row i's 16-row group, gemv_tile_mma's split).
template <int NB>
TILERT_DEV void sum_partials(const float* red, int buf, int i, int rpp, int rows_left, float* v) {
  const WarpRange wr = row_warps(i, rpp, rows_left);
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float sum = 0.f;
    for (int q = wr.f0; q < wr.f1; ++q) sum += red[((buf * kNCW + q) * red_rows<NB>() + i) * NB + b];
    v[b] = sum;
  }
}

// out_i = W[r0 + i] . x_b for b < NB (NB <= 8: one n8 mma tile holds hi and lo of 4 tokens, a
// second one the next 4, both fed by one decode of the weight) on the tensor cores, for a tiled weight; same
// contract as gemv_tile_fmt: epi(i, v[NB]) once per row, by one thread, the same thread for row
// i of every tile of this shape and token count NB.  `x_staged`: this very x was staged already, for a weight of
// this format and width, `xs_off` bytes into the xs region (gate then up; the slots of an
// expert down projection, staged together by stage_x_slots), so it is not staged again.
template <int FMT, int NB, class XRow, class Epi>
TILERT_MMA_FN void gemv_tile_mma(Ctx& c, const WeightDesc& w, const Tile& tile, XRow xrow, Epi epi, bool x_staged,
                                 int xs_off) {
  static_assert(NB <= 8, "two n8 mma tiles hold hi/lo of 8 tokens");
  constexpr int kStep = MmaFmt<FMT>::kStep, NT = (NB + 3) / 4;
  if (!x_staged) stage_x<FMT, NB>(c, w.cols, xrow);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wid = threadIdx.x >> 5;
  const uint8_t* xs = c.smem + TILERT_SMEM_XS + (x_staged ? xs_off : 0);
  const int plane = xs_bytes(w.cols) / 2;
  const uint8_t* xlane = xs + g * plane + 2 * (kStep / 4) * t;  // plane g = 2b + h: token b's hi / lo
  const uint8_t* gscale = tile_scale(w, tile_expert(tile));
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);
  const Pieces pc = pieces_of(w);
  const int rpp = pc.rp;
  WarpShare sh{0, 0, 0, 0, 0};
  // Pieces are gathered in batches of up to red_rows<NB>() rows: each warp writes its partials
  // for the batch to red[buf][warp][row][token], and one barrier per batch lets the batch's rows
  // be summed (one thread a row) while the warps stream the next batch into the other buffer.
  constexpr int kBatchRows = red_rows<NB>();
  const int batch_rows = kBatchRows / rpp * rpp;
  int buf = 0;
  for (int ba = tile.r0; ba < tile.r1; ba += batch_rows) {
    const int bn = min(batch_rows, tile.r1 - ba);
    for (int ra = ba; ra < ba + bn; ra += rpp) {
      const int nr = min(rpp, tile.r1 - ra), ng = (nr + 15) / 16;
      MmaAcc<NT> a;
      a.zero();
      for (int kq = 0; kq < pc.nch; ++kq) {
        const Span sp = piece_span(w, pc, ra, nr, kq);
        if (sh.ng != ng || sh.ns != sp.ns) sh = warp_share(ng, sp.ns);
        mma_piece<FMT, NB>(c, w, gscale, ra, sp, sh, xlane, plane, a);
      }
      a.template fold<FMT>();
      store_partials<FMT, NB>(red + ((buf * kNCW + wid) * kBatchRows + (ra - ba) + 16 * sh.gi) * NB, a.acc, sh.gi, nr);
    }
    compute_sync();
    for (int i = (int)threadIdx.x; i < bn; i += kNCT) {
      float v[NB];
      sum_partials<NB>(red, buf, i, rpp, tile.r1 - ba - i, v);
      epi(ba + i - tile.r0, v);
    }
    buf ^= 1;  // the next batch writes the other half while stragglers still read this one
  }
  compute_sync();  // every reader of red and xs is done before the next GEMV
}

// gemv_tile_mma for a weight whose x of NB tokens does not fit the xs region (mma_chunked): the
// tile's pieces come chunk-major (chunk kq of every row block, then chunk kq + 1), and each
// chunk's columns of x are staged once for all the tile's row blocks.  Each warp adds its sums
// of every piece to its own rows of red ([warp][row][token]); one reduction at the end.  Same
// contract as gemv_tile_mma.
template <int FMT, int NB, class XRow, class Epi>
TILERT_MMA_FN void gemv_tile_mma_chunked(Ctx& c, const WeightDesc& w, const Tile& tile, XRow xrow, Epi epi) {
  static_assert(NB <= 8, "two n8 mma tiles hold hi/lo of 8 tokens");
  constexpr int kStep = MmaFmt<FMT>::kStep, NT = (NB + 3) / 4;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wid = threadIdx.x >> 5;
  const uint8_t* gscale = tile_scale(w, tile_expert(tile));
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);
  const Pieces pc = pieces_of(w);  // one row block a piece: every warp holds partials of all 16 rows
  const int nr = tile.r1 - tile.r0, nsteps = row_steps(w);
  const float un = FMT == FMT_MXFP4 ? kFp4Unscale : 1.f;  // the E2M1 decode's 2^-14
  // (every GEMV ends at a barrier, so nobody still reads red; the staging's barrier publishes the zeros)
  for (int i = (int)threadIdx.x; i < kNCW * nr * NB; i += kNCT) red[i] = 0.f;
  WarpShare sh{0, 0, 0, 0, 0};
  for (int kq = 0; kq < pc.nch; ++kq) {
    const int s_lo = kq * pc.ns, cols = min(pc.ns, nsteps - s_lo) * kStep;
    if (kq) compute_sync();  // every warp is done with the previous chunk's x
    stage_x_rows<FMT>(c, cols, NB, [&](int b) { return xrow(b) + kStep * s_lo; });
    const int plane = xs_bytes(cols) / 2;
    // mma_piece reads step s at 2 kStep s bytes into the plane: the chunk's first step is s_lo
    // (the pointer sits before the region; it is only ever read at the chunk's steps)
    const uint8_t* xlane = c.smem + TILERT_SMEM_XS + g * plane + 2 * (kStep / 4) * t - 2 * kStep * s_lo;
    for (int ra = tile.r0; ra < tile.r1; ra += kRowBlock) {
      const int rn = min(kRowBlock, tile.r1 - ra);
      const Span sp = piece_span(w, pc, ra, rn, kq);
      if (sh.ng != 1 || sh.ns != sp.ns) sh = warp_share(1, sp.ns);
      MmaAcc<NT> a;
      a.zero();
      mma_piece<FMT, NB>(c, w, gscale, ra, sp, sh, xlane, plane, a);
      a.template fold<FMT>();
#pragma unroll
      for (int u = 0; u < NT; ++u) {
        const int b = 4 * u + t;
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (b < NB && g + 8 * h < rn) red[((size_t)wid * nr + (ra - tile.r0) + g + 8 * h) * NB + b] += a.acc[u][h] * un;
      }
    }
  }
  compute_sync();
  for (int i = (int)threadIdx.x; i < nr; i += kNCT) {
    float v[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float sum = 0.f;
      for (int q = 0; q < kNCW; ++q) sum += red[((size_t)q * nr + i) * NB + b];
      v[b] = sum;
    }
    epi(i, v);
  }
  compute_sync();  // every reader of red and xs is done before the next GEMV
}

// out_r = sum_i coef(i) * (W_i[r0 + r] . x_i) over n single-token GEMVs of the same rows of n
// matrices of one weight (the slots of an expert down projection: tile_of(i) the tiles, in the
// loader's order; x i staged by stage_x_slots as its x number x0 + i) on the tensor cores.
// Each warp sums its partials of every slot in registers, so the compute warps meet once for all
// n slots, not twice a slot.  Rows [r0, r1) must be one ring piece wide (slots_in_one_piece).
// epi(r, v) once per row, by one thread.
template <int FMT, class TileOf, class Coef, class Epi>
TILERT_MMA_FN void gemv_slots_mma(Ctx& c, const WeightDesc& w, int n, int x0, int r0, int r1, TileOf tile_of,
                                  Coef coef, Epi epi) {
  constexpr int kStep = MmaFmt<FMT>::kStep;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wid = threadIdx.x >> 5;
  const int plane = xs_bytes(w.cols) / 2;
  const uint8_t* xlane = c.smem + TILERT_SMEM_XS + g * plane + 2 * (kStep / 4) * t;
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);
  const Pieces pc = pieces_of(w);
  const int nr = r1 - r0, ng = (nr + 15) / 16;
  WarpShare sh = warp_share(ng, piece_span(w, pc, r0, nr, 0).ns);
  float tot[1][2] = {{0.f, 0.f}};
  for (int i = 0; i < n; ++i) {
    const Tile tile = tile_of(i);
    MmaAcc<1> a;
    a.zero();
    for (int kq = 0; kq < pc.nch; ++kq) {
      const Span sp = piece_span(w, pc, r0, nr, kq);
      if (sh.ng != ng || sh.ns != sp.ns) sh = warp_share(ng, sp.ns);
      mma_piece<FMT, 1>(c, w, tile_scale(w, tile_expert(tile)), r0, sp, sh, xlane + (size_t)(x0 + i) * xs_bytes(w.cols),
                        plane, a);
    }
    a.template fold<FMT>();
    const float k = coef(i);
    tot[0][0] = fmaf(k, a.acc[0][0], tot[0][0]);
    tot[0][1] = fmaf(k, a.acc[0][1], tot[0][1]);
  }
  store_partials<FMT, 1>(red + (wid * red_rows<1>() + 16 * sh.gi), tot, sh.gi, nr);
  compute_sync();
  for (int i = (int)threadIdx.x; i < nr; i += kNCT) {
    float v[1];
    sum_partials<1>(red, 0, i, pc.rp, nr - i, v);
    epi(i, v);
  }
  compute_sync();  // every reader of red and xs is done before the next GEMV
}

// The GEMV paths one call site is compiled for (`GEMV` bits: 1 << f = the CUDA-core loop over a
// row-major weight of format f, 16 << f = the tensor cores, 256 << f = the CUDA-core loop over a
// tiled weight, 4096 << f = the tensor cores with x staged a chunk at a time).  The generated prelude gives every weight-streaming kind the mask of exactly
// the paths its weights take (TILERT_GEMV_<KIND>, tilert/codegen.py `_gemv_masks`), so no kind
// carries GEMV code it never runs (one copy per format and call site made the kernel's text over
// a megabyte).  A weight whose path was not compiled in is reported, not skipped.
enum GemvPath { kRowsPath = 0, kMmaPath = 4, kTiledPath = 8, kChunkedPath = 12 };
template <int GEMV> __host__ __device__ constexpr bool has_path(int fmt, GemvPath path) { return (GEMV >> (fmt + path)) & 1; }

template <int NB, int GEMV, class XRow, class Epi>
TILERT_DEV void gemv_tile(Ctx& c, const Tile& tile, XRow xrow, Epi epi, bool x_staged = false, int xs_off = 0) {
  const WeightDesc& w = weight(c, tile.w);
  if (mma_ok(w)) {
    if constexpr (NB <= 8) {
      if constexpr (has_path<GEMV>(FMT_BF16, kMmaPath)) if (w.fmt == FMT_BF16) return gemv_tile_mma<FMT_BF16, NB>(c, w, tile, xrow, epi, x_staged, xs_off);
      if constexpr (has_path<GEMV>(FMT_FP8, kMmaPath)) if (w.fmt == FMT_FP8) return gemv_tile_mma<FMT_FP8, NB>(c, w, tile, xrow, epi, x_staged, xs_off);
      if constexpr (has_path<GEMV>(FMT_MXFP4, kMmaPath)) if (w.fmt == FMT_MXFP4) return gemv_tile_mma<FMT_MXFP4, NB>(c, w, tile, xrow, epi, x_staged, xs_off);
    }
  } else if (mma_chunked(w, tile.r0, tile.r1)) {
    if constexpr (NB <= 8) {
      if constexpr (has_path<GEMV>(FMT_BF16, kChunkedPath)) if (w.fmt == FMT_BF16) return gemv_tile_mma_chunked<FMT_BF16, NB>(c, w, tile, xrow, epi);
      if constexpr (has_path<GEMV>(FMT_FP8, kChunkedPath)) if (w.fmt == FMT_FP8) return gemv_tile_mma_chunked<FMT_FP8, NB>(c, w, tile, xrow, epi);
      if constexpr (has_path<GEMV>(FMT_MXFP4, kChunkedPath)) if (w.fmt == FMT_MXFP4) return gemv_tile_mma_chunked<FMT_MXFP4, NB>(c, w, tile, xrow, epi);
    }
  } else if (w.tiled) {
    if constexpr (has_path<GEMV>(FMT_BF16, kTiledPath)) if (w.fmt == FMT_BF16) return gemv_tile_tiled<FMT_BF16, NB>(c, w, tile, xrow, epi);
    if constexpr (has_path<GEMV>(FMT_FP8, kTiledPath)) if (w.fmt == FMT_FP8) return gemv_tile_tiled<FMT_FP8, NB>(c, w, tile, xrow, epi);
    if constexpr (has_path<GEMV>(FMT_MXFP4, kTiledPath)) if (w.fmt == FMT_MXFP4) return gemv_tile_tiled<FMT_MXFP4, NB>(c, w, tile, xrow, epi);
  } else {
    if constexpr (has_path<GEMV>(FMT_FP32, kRowsPath)) if (w.fmt == FMT_FP32) return gemv_tile_fmt<FMT_FP32, NB>(c, w, tile, xrow, epi);
    if constexpr (has_path<GEMV>(FMT_BF16, kRowsPath)) if (w.fmt == FMT_BF16) return gemv_tile_fmt<FMT_BF16, NB>(c, w, tile, xrow, epi);
    if constexpr (has_path<GEMV>(FMT_FP8, kRowsPath)) if (w.fmt == FMT_FP8) return gemv_tile_fmt<FMT_FP8, NB>(c, w, tile, xrow, epi);
    if constexpr (has_path<GEMV>(FMT_MXFP4, kRowsPath)) if (w.fmt == FMT_MXFP4) return gemv_tile_fmt<FMT_MXFP4, NB>(c, w, tile, xrow, epi);
  }
  if (threadIdx.x == 0) record_error(c, ERR_GEMV_PATH, tile.w, (uint32_t)w.fmt, (uint32_t)GEMV, mma_ok(w) ? 1 : w.tiled ? 2 : 0);
}

// Stage the x of all `n` single-token GEMVs over weight `w` a task will run (the slots of an
// expert down projection) at once, x i at byte i * xs_bytes(w.cols) of the xs region: one
// staging pass and barrier a task instead of one per slot.  False (nothing staged) when they
// do not run on the tensor cores or do not fit; the GEMVs then stage their own x.
template <int GEMV, class XRow>
TILERT_DEV bool stage_x_slots(Ctx& c, const WeightDesc& w, int n, XRow xrow) {
  if (!mma_ok(w) || n * xs_bytes(w.cols) > TILERT_XS_BYTES) return false;
  if constexpr (has_path<GEMV>(FMT_BF16, kMmaPath)) if (w.fmt == FMT_BF16) { stage_x_rows<FMT_BF16>(c, w.cols, n, xrow); return true; }
  if constexpr (has_path<GEMV>(FMT_FP8, kMmaPath)) if (w.fmt == FMT_FP8) { stage_x_rows<FMT_FP8>(c, w.cols, n, xrow); return true; }
  if constexpr (has_path<GEMV>(FMT_MXFP4, kMmaPath)) if (w.fmt == FMT_MXFP4) { stage_x_rows<FMT_MXFP4>(c, w.cols, n, xrow); return true; }
  return false;
}

// Experiment switch (tools/profile_step.py --define TILERT_SLOTS_GEMV=0): expert down projections
// run one GEMV and reduction per slot, as before gemv_slots.
#ifndef TILERT_SLOTS_GEMV
#define TILERT_SLOTS_GEMV 1
#endif

// Whether gemv_slots can take rows [r0, r1) of weight w: on the tensor cores, one ring piece wide,
// x staged by stage_x_slots (`staged`).
TILERT_DEV bool slots_in_one_piece(const WeightDesc& w, int r0, int r1, bool staged) {
  return TILERT_SLOTS_GEMV && staged && mma_ok(w) && r1 - r0 <= pieces_of(w).rp;
}

// gemv_slots_mma for the weight's format (the caller checked slots_in_one_piece).
template <int GEMV, class TileOf, class Coef, class Epi>
TILERT_DEV void gemv_slots(Ctx& c, const WeightDesc& w, int n, int x0, int r0, int r1, TileOf tile_of, Coef coef,
                           Epi epi) {
  if constexpr (has_path<GEMV>(FMT_BF16, kMmaPath)) if (w.fmt == FMT_BF16) return gemv_slots_mma<FMT_BF16>(c, w, n, x0, r0, r1, tile_of, coef, epi);
  if constexpr (has_path<GEMV>(FMT_FP8, kMmaPath)) if (w.fmt == FMT_FP8) return gemv_slots_mma<FMT_FP8>(c, w, n, x0, r0, r1, tile_of, coef, epi);
  if constexpr (has_path<GEMV>(FMT_MXFP4, kMmaPath)) if (w.fmt == FMT_MXFP4) return gemv_slots_mma<FMT_MXFP4>(c, w, n, x0, r0, r1, tile_of, coef, epi);
  if (threadIdx.x == 0) record_error(c, ERR_GEMV_PATH, -1, (uint32_t)w.fmt, (uint32_t)GEMV, 1);
}

// The t-th set bit of mask (t < popc(mask)).
TILERT_DEV int nth_set_bit(uint32_t mask, int t) {
  for (; t > 0; --t) mask &= mask - 1;
  return __ffs(mask) - 1;
}

// out[b][r] = sum over the union's slots u of coef(u, b) * (W_u[r0 + r] . x_{u,b}) for the tokens b
// routed to each slot (bit b of mask_of(u); W_u the expert of tile_of(u), skipped when empty), on
// the tensor cores, for a multi-token step's down projection (NB: the most routed tokens of a slot
// it takes, 4 or 8: one n8 mma tile holds hi and lo of 4).  The routed tokens' x rows of as many
// slots as the xs region holds are staged together (one barrier a batch, not one a slot); each
// lane adds its rows' results of every slot to its warp's per-token sums in smem (its token of
// a slot: the (4u + t)-th routed one of mma tile u, t = lane & 3), summed across warps once at
// the end.  Needs at most 2 ring pieces and 2 kRedRows rows a tile (union_fits).
// `rows`: smem scratch of 2 x 64 ints (which slot and token each staged x row holds).
// epi(r, b, v) once per (row, token), by one thread.
template <int FMT, int NB, class TileOf, class MaskOf, class XRow, class Coef, class Epi>
TILERT_MMA_FN void gemv_union_mma(Ctx& c, const WeightDesc& w, int slots, int r0, int r1, int* rows, TileOf tile_of,
                                  MaskOf mask_of, XRow xrow, Coef coef, Epi epi) {
  constexpr int kStep = MmaFmt<FMT>::kStep, NT = NB / 4;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wid = threadIdx.x >> 5;
  const int xsb = xs_bytes(w.cols), plane = xsb / 2;
  const int cap = min(64, TILERT_XS_BYTES / xsb);  // staged x rows a batch
  const uint8_t* xlane = c.smem + TILERT_SMEM_XS + g * plane + 2 * (kStep / 4) * t;
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);
  const Pieces pc = pieces_of(w);
  const int nr = r1 - r0, npc = (nr + pc.rp - 1) / pc.rp;  // row pieces of a tile (<= 2)
  WarpShare sh{0, 0, 0, 0, 0};
  // red[warp][row][token]: each warp's sums of its rows, one token a lane of a row group per slot
  // (the slot's t-th routed token), so lanes and slots never write the same word at once.
  for (int i = (int)threadIdx.x; i < kNCW * nr * kB; i += kNCT) red[i] = 0.f;
  const float un = FMT == FMT_MXFP4 ? kFp4Unscale : 1.f;  // the E2M1 decode's 2^-14
  for (int u = 0; u < slots;) {
    // The batch: slots [u, ub), their routed tokens' x rows staged in order (every thread walks
    // the same smem masks, so all agree).  A slot's lanes read 4 rows from its first: keep them
    // inside the region.
    int n = 0, ub = u;
    for (; ub < slots; ++ub) {
      const uint32_t m = tile_expert(tile_of(ub)) < 0 ? 0u : mask_of(ub);
      if (n + NB > cap && m) break;
      n += __popc(m);
    }
    if (threadIdx.x == 0) {
      int k = 0;
      for (int v = u; v < ub; ++v) {
        const uint32_t m = tile_expert(tile_of(v)) < 0 ? 0u : mask_of(v);
        for (int j = 0; j < __popc(m); ++j, ++k) { rows[k] = v; rows[64 + k] = nth_set_bit(m, j); }
      }
    }
    compute_sync();  // the row table, and every reader of the previous batch's x is done
    stage_x_rows<FMT>(c, w.cols, n, [&](int i) { return xrow(rows[i], rows[64 + i]); });
    int row0 = 0;
    for (int v = u; v < ub; ++v) {
      const Tile tile = tile_of(v);
      if (tile_expert(tile) < 0) continue;  // empty slot: the loader skipped it too
      const uint32_t m = mask_of(v);
      const int nt = __popc(m);
      int tok[NT];
      float k[NT];
#pragma unroll
      for (int q = 0; q < NT; ++q) {
        tok[q] = 4 * q + t < nt ? nth_set_bit(m, 4 * q + t) : -1;
        k[q] = tok[q] >= 0 ? coef(v, tok[q]) : 0.f;
      }
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        if (p >= npc) break;
        const int ra = r0 + p * pc.rp, rn = min(pc.rp, r1 - ra);
        MmaAcc<NT> a;
        a.zero();
        for (int kq = 0; kq < pc.nch; ++kq) {
          const Span sp = piece_span(w, pc, ra, rn, kq);
          if (sh.ng != (rn + 15) / 16 || sh.ns != sp.ns) sh = warp_share((rn + 15) / 16, sp.ns);
          mma_piece<FMT, NB>(c, w, tile_scale(w, tile_expert(tile)), ra, sp, sh, xlane + (size_t)row0 * xsb, plane, a);
        }
        a.template fold<FMT>();
        const int gi = wid * ((rn + 15) / 16) / kNCW;  // warp_share's group
#pragma unroll
        for (int q = 0; q < NT; ++q) {
          if (tok[q] < 0) continue;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = 16 * gi + g + 8 * h;
            if (r < rn) red[((size_t)wid * nr + p * pc.rp + r) * kB + tok[q]] += k[q] * a.acc[q][h] * un;
          }
        }
      }
      row0 += nt;
    }
    u = ub;
  }
  compute_sync();
  for (int i = (int)threadIdx.x; i < nr * kB; i += kNCT) {
    const int r = i / kB, b = i % kB;
    const WarpRange wr = row_warps(r, pc.rp, nr - r);  // the warps of row r's 16-row group in its piece
    float sum = 0.f;
    for (int q = wr.f0; q < wr.f1; ++q) sum += red[((size_t)q * nr + r) * kB + b];
    epi(r, b, sum);
  }
  compute_sync();  // every reader of red and xs is done before the next GEMV
}

// Whether gemv_union can take a union down tile of rows [r0, r1) of w.
TILERT_DEV bool union_fits(const WeightDesc& w, int r0, int r1) {
  return TILERT_SLOTS_GEMV && kB > 1 && mma_ok(w) && r1 - r0 <= 2 * pieces_of(w).rp && r1 - r0 <= 2 * kRedRows &&
         (kB <= 4 ? 4 : 8) * xs_bytes(w.cols) <= TILERT_XS_BYTES;  // a batch holds one slot's widest x
}

// gemv_union_mma for the weight's format, one mma tile of tokens when no slot has more than 4
// (most_tokens: the most any slot has), else two (up to 8).
template <int GEMV, class... Fns>
TILERT_DEV void gemv_union(Ctx& c, const WeightDesc& w, int slots, int r0, int r1, int* rows, int most_tokens,
                           Fns... fns) {
  const bool one = most_tokens <= 4 || kB <= 4;
  constexpr int kWide = kB <= 4 ? 4 : 8;
  if constexpr (has_path<GEMV>(FMT_BF16, kMmaPath)) if (w.fmt == FMT_BF16) return one ? gemv_union_mma<FMT_BF16, 4>(c, w, slots, r0, r1, rows, fns...) : gemv_union_mma<FMT_BF16, kWide>(c, w, slots, r0, r1, rows, fns...);
  if constexpr (has_path<GEMV>(FMT_FP8, kMmaPath)) if (w.fmt == FMT_FP8) return one ? gemv_union_mma<FMT_FP8, 4>(c, w, slots, r0, r1, rows, fns...) : gemv_union_mma<FMT_FP8, kWide>(c, w, slots, r0, r1, rows, fns...);
  if constexpr (has_path<GEMV>(FMT_MXFP4, kMmaPath)) if (w.fmt == FMT_MXFP4) return one ? gemv_union_mma<FMT_MXFP4, 4>(c, w, slots, r0, r1, rows, fns...) : gemv_union_mma<FMT_MXFP4, kWide>(c, w, slots, r0, r1, rows, fns...);
  if (threadIdx.x == 0) record_error(c, ERR_GEMV_PATH, -1, (uint32_t)w.fmt, (uint32_t)GEMV, 1);
}

// ---- loader side --------------------------------------------------------------------------------

#if TILERT_LOADER
// Wait (loader lane) until ring slot `issued % SLOTS` is free again.
TILERT_DEV bool ring_wait_empty(uint8_t* smem, uint32_t issued, const volatile int* abort) {
  if (issued < TILERT_SLOTS) return true;
  const uint32_t parity = ((issued / TILERT_SLOTS) - 1) & 1;
  uint32_t spins = 0;
  while (!mbar_try_wait(ring_empty(smem, issued % TILERT_SLOTS), parity)) {
    if ((++spins & 255) == 0 && *abort) return false;
  }
  return true;
}

// Pieces issued so far, and whether the CTA aborted while the loader waited for a free slot.
struct Issued {
  uint32_t pieces;
  bool aborted;
};

// Issue the pieces of rows [r0, r1) of `expert` of `w` into the ring (loader lane only), in the
// compute warps' order (row blocks, then chunks; chunk-major for a tile the compute warps stage
// x for a chunk at a time, mma_chunked): one bulk copy a piece (a second one for the
// E8M0 scales of a row-major MXFP4 piece).  `issued` counts pieces (after an abort too: the
// CTA lets every issued piece land before it exits).  Outlined (one copy for every kind's
// tiles), its arguments plain values.
TILERT_OUTLINE Issued load_tile(uint8_t* smem, const WeightDesc& w, int expert, int r0, int r1, uint32_t issued,
                                const volatile int* abort) {
  const Pieces pc = pieces_of(w);
  const uint8_t* gdata = tile_data(w, expert);
  const uint8_t* gscale = tile_scale(w, expert);
  const int rb = w.row_bytes;
  const bool ring_scales = scales_in_ring(w);
  const uint64_t policy = stream_policy();
  bool aborted = false;
  const auto issue = [&](int ra, int kq) {
    const int nr = min(pc.rp, r1 - ra);
    if (!ring_wait_empty(smem, issued, abort)) {
      aborted = true;
      return;
    }
    uint8_t* dst = ring_slot(smem, issued % TILERT_SLOTS);
    uint64_t* full = ring_full(smem, issued % TILERT_SLOTS);
    if (w.tiled) {
      const Span sp = piece_span(w, pc, ra, nr, kq);
      mbar_arrive_expect_tx(full, sp.bytes);
      bulk_copy_g2s(dst, gdata + sp.offset, sp.bytes, full, policy);
    } else {
      const uint32_t sbytes = ring_scales ? (uint32_t)(nr * w.scale_ld) : 0u;
      mbar_arrive_expect_tx(full, (uint32_t)(nr * rb) + sbytes);
      bulk_copy_g2s(dst, gdata + (size_t)ra * rb, (uint32_t)(nr * rb), full, policy);
      if (sbytes) bulk_copy_g2s(dst + nr * rb, gscale + (size_t)ra * w.scale_ld, sbytes, full, policy);
    }
    ++issued;
  };
  if (mma_chunked(w, r0, r1)) {  // chunk-major: the compute warps stage x a chunk at a time
    for (int kq = 0; kq < pc.nch && !aborted; ++kq)
      for (int ra = r0; ra < r1 && !aborted; ra += pc.rp) issue(ra, kq);
  } else {  // row blocks, then chunks (the compute warps' order everywhere else)
    for (int ra = r0; ra < r1 && !aborted; ra += pc.rp)
      for (int kq = 0; kq < pc.nch && !aborted; ++kq) issue(ra, kq);
  }
  return Issued{issued, aborted};
}
#endif

}  // namespace tilert
