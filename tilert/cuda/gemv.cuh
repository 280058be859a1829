// Weight streaming and the GEMV core.
//
// A task reads its weights as *tiles*: rows [r0, r1) of one matrix (of one expert).  A tile is
// cut into *pieces* that fit one ring slot: whole rows, contiguous in global memory (row-major
// storage), so one 1-D bulk copy moves them; only the tensor-core GEMV cuts rows too long for
// that into column chunks (see `pieces_of`).  The loader warp and the compute warps enumerate
// the very same tiles (the per-kind `tiles_of`) and cut them with the very same `pieces_of`,
// so they agree on the piece sequence without talking: piece j lives in slot j % TILERT_SLOTS.
// Without the loader (TILERT_LOADER 0) a piece is read straight from global memory with 16-byte
// loads; the arithmetic is identical.
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

TILERT_DEV int fmt_bits(int fmt) { return fmt == FMT_MXFP4 ? 4 : fmt == FMT_FP8 ? 8 : fmt == FMT_BF16 ? 16 : 32; }
TILERT_DEV int mma_step_cols(int fmt) { return fmt == FMT_MXFP4 ? 128 : fmt == FMT_FP8 ? 64 : 32; }

// How a weight's tiles are cut into ring pieces: `rp` rows by `kc` columns, `nch` column chunks
// per row block, rows `cstride` bytes apart in the slot.  The CUDA-core loop takes whole rows,
// as many as fit (at most one per compute thread).  The tensor-core GEMV (gemv_tile_mma) takes
// whole 16-row groups when 16 rows fit (at most one group per compute warp and kRedRows rows);
// longer bf16 / fp8 rows (8-16 KiB) are cut into column chunks of 16 rows, one bulk copy per
// row, each row padded by 64 bytes so the rows a warp reads at once fall on different banks
// (whole rows conflict 2-way, which costs less than the ~100 ns of loader time a copy takes).
// MXFP4 rows stay whole (their scales ride along).
struct Pieces {
  int rp, nch, kc, cstride;
};

TILERT_OUTLINE Pieces pieces_of(const WeightDesc& w) {
  const int fit = TILERT_SLOT_BYTES / piece_row_bytes(w);
  if (!mma_ok(w)) return Pieces{min(kNCT, fit), 1, w.cols, w.row_bytes};
  if (fit < 16 && w.fmt != FMT_MXFP4) {
    const int bits = fmt_bits(w.fmt), step = mma_step_cols(w.fmt);
    for (int nch = 2; nch <= 64 && w.cols % nch == 0 && (w.cols / nch) % step == 0; nch *= 2) {
      const int kc = w.cols / nch, cstride = kc * bits / 8 + 64;
      if (TILERT_SLOT_BYTES / cstride >= 16) return Pieces{16, nch, kc, cstride};
    }
  }
  const int rp = fit < 16 ? fit : min(min(16 * kNCW, kRedRows), fit / 16 * 16);
  return Pieces{rp, 1, w.cols, w.row_bytes};
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

// Dequantized weights of unit `u` of row `row` (fp32: code value * block scale, like the VM).
// `srow`: the row's MXFP4 scales (in the ring slot or in global memory); FP8 reads `gscale`.
template <int FMT>
TILERT_DEV void decode_unit(const WeightDesc& w, const uint8_t* gscale, const uint8_t* srow, int row, int u,
                            const uint4 raw, float* wv) {
  if constexpr (FMT == FMT_FP32) {
    wv[0] = __uint_as_float(raw.x); wv[1] = __uint_as_float(raw.y);
    wv[2] = __uint_as_float(raw.z); wv[3] = __uint_as_float(raw.w);
  } else if constexpr (FMT == FMT_BF16) {
    wv[0] = __uint_as_float(raw.x << 16); wv[1] = __uint_as_float(raw.x & 0xffff0000u);
    wv[2] = __uint_as_float(raw.y << 16); wv[3] = __uint_as_float(raw.y & 0xffff0000u);
  } else if constexpr (FMT == FMT_FP8) {
    // one scale_inv per 128x128 block: unit u holds columns 4u .. 4u+3
    const float s = __ldg(reinterpret_cast<const float*>(gscale) + (size_t)(row >> 7) * w.scale_ld + (u >> 5));
    const float2 lo = fp8x2_to_f32((uint16_t)(raw.x & 0xffffu));
    const float2 hi = fp8x2_to_f32((uint16_t)(raw.x >> 16));
    wv[0] = lo.x * s; wv[1] = lo.y * s; wv[2] = hi.x * s; wv[3] = hi.y * s;
  } else {  // MXFP4: element 2k in the low nibble of byte k; one E8M0 scale per 32 = 4 units
    const uint32_t e = srow[u >> 2];
    if (e <= 128u) {
      const float s = e8m0_to_f32_x2p126(e);
      wv[0] = fp4_scaled<0>(raw.x, s); wv[1] = fp4_scaled<1>(raw.x, s);
      wv[2] = fp4_scaled<2>(raw.x, s); wv[3] = fp4_scaled<3>(raw.x, s);
      wv[4] = fp4_scaled<4>(raw.x, s); wv[5] = fp4_scaled<5>(raw.x, s);
      wv[6] = fp4_scaled<6>(raw.x, s); wv[7] = fp4_scaled<7>(raw.x, s);
    } else {  // scales above 2 (never in practice): the plain decode
      const float s = e8m0_to_f32(e);
#pragma unroll
      for (int j = 0; j < 8; ++j) wv[j] = fp4_value((raw.x >> (4 * j)) & 15u) * s;
    }
  }
}

// out_i = W[r0 + i] . x_b for b < NB, delivered to epi(i, float v[NB]) by one thread per row.
// XRow(b) gives the fp32 input row b (16-byte aligned).  Every compute thread must call this.
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
      const int r = ra + rl;
#pragma unroll 4
      for (int u = lig; u < nu; u += G) {
        float wv[UE];
        decode_unit<FMT>(w, gscale, srow, r, u, ld_unit<UB>(row + UB * u), wv);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const float4* xp = reinterpret_cast<const float4*>(xrow(b) + u * UE);
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
    }
#if TILERT_LOADER
    // This warp is done with the slot: hand it back to the loader.
    __syncwarp();
    if ((tid & 31) == 0) mbar_arrive(ring_empty(c.smem, slot));
    ++c.piece;
#endif
    if (G <= 32) {
      for (int o = G >> 1; o; o >>= 1) {
#pragma unroll
        for (int b = 0; b < NB; ++b) acc[b] += __shfl_xor_sync(kFull, acc[b], o);
      }
    } else {  // a row spans several warps: reduce each warp, then across warps in smem
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[b] = warp_sum(acc[b]);
      if ((tid & 31) == 0) {
#pragma unroll
        for (int b = 0; b < NB; ++b) red[(tid >> 5) * NB + b] = acc[b];
      }
      compute_sync();
      if (lig == 0 && rl < nr) {
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
// Pieces: see `pieces_of` (whole rows where 16 fit a slot, else 16-row column chunks).  A warp
// *step* covers 16 rows x kStep columns: lane (g, t) reads 16 bytes of rows g and g + 8 (columns
// t * kStep / 4 ...), and every register it loads feeds the mma slots of those same columns, so
// which column sits in which slot only fixes the order x is staged in.  Whole rows 2 KiB apart
// share banks, so a warp's 16-byte reads conflict 2-way: well inside the shared-memory budget.
//
// Scales: FP8 (one per 128 x 128 block) multiplies the step's fp32 partial.  MXFP4 has one per
// 32 columns, i.e. a different one per lane in a step, so it scales the decoded weights instead:
// by 2^(e_lane - e_max) in fp16 (exact; e_max is the largest of the row's four), and the partial
// by 2^(e_max - 127).
#ifndef TILERT_MMA_FORMATS
#define TILERT_MMA_FORMATS 0
#endif
#ifndef TILERT_XS_BYTES
#define TILERT_XS_BYTES 0
#endif
#ifndef TILERT_DIAG_SKIP_MMA  // diagnostics only (tools/profile_step.py --diag-skip-mma): wrong results
#define TILERT_DIAG_SKIP_MMA 0
#endif
// Experiment switch (tools/profile_step.py --define TILERT_MMA_NOINLINE=1): gemv_tile_mma
// compiled as its own function, where ptxas gives it all 128 registers (0 spills) instead of
// sharing them with the rest of the inlined kernel; unmeasured so far.
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

// Whether weight `w`'s GEMVs run on the tensor cores.
TILERT_DEV bool mma_ok(const WeightDesc& w) {
  if (!TILERT_LOADER || !((TILERT_MMA_FORMATS >> w.fmt) & 1) || kB > 4) return false;
  if (w.fmt != FMT_MXFP4 && w.fmt != FMT_FP8 && w.fmt != FMT_BF16) return false;
  if (w.cols % mma_step_cols(w.fmt) || kB * xs_bytes(w.cols) > TILERT_XS_BYTES) return false;
  return w.fmt != FMT_MXFP4 || scales_in_ring(w);
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

// Two E2M1 codes -> fp16x2: the codes in bits 12..15 and 28..31 of v.  Sign to bit 15/31, the
// three magnitude bits to 9..11 / 25..27: the fp16 read from those bits is the E2M1 value times
// 2^-14 exactly (e = 0 lands on the fp16 subnormals).
TILERT_DEV uint32_t fp4x2_to_f16x2_2m14(uint32_t v) { return (v & 0x80008000u) | ((v >> 3) & 0x0E000E00u); }

TILERT_DEV uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// The fp16x2 factor 2^(14 + diff), diff = e_lane - e_max <= 0.  The scaled weight is exact for
// diff >= -23; below that the fp16 product drops what lies under 2^-24 of the row's largest
// block scale (about fp32's rounding of the sum), and below -28 the factor itself is 0.
TILERT_DEV uint32_t fp4_block_factor(int diff) {
  const uint32_t h = diff < -28 ? 0u : (uint32_t)(29 + diff) << 10;
  return h | (h << 16);
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

// Stage x (NB rows of `cols` fp32) into the xs region as hi/lo halves (fp16; bf16 for bf16
// weights), plane 2b + h for token b, each 8 columns in xs_column order.  All compute threads.
template <int FMT, int NB, class XRow>
TILERT_DEV void stage_x(Ctx& c, int cols, XRow xrow) {
  uint8_t* xs = c.smem + TILERT_SMEM_XS;
  const int plane = xs_bytes(cols) / 2;
  const int n8 = cols / 8;
  for (int i = (int)threadIdx.x; i < NB * n8; i += kNCT) {
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
    *reinterpret_cast<uint4*>(xs + (2 * b) * plane + 16 * j) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    *reinterpret_cast<uint4*>(xs + (2 * b + 1) * plane + 16 * j) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  }
  compute_sync();
}

TILERT_DEV uint32_t cvt_e4m3x2(uint32_t two) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(two & 0xffffu), __NV_E4M3);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The largest of the four bytes of w.
TILERT_DEV uint32_t max_byte(uint32_t w) {
  return max(max(w & 255u, (w >> 8) & 255u), max((w >> 16) & 255u, w >> 24));
}

// One step: the lane's partials of rows g (d[0] + d[1]) and g + 8 (d[2] + d[3]) for token t,
// accumulated into d0 / d1 (two chains, so consecutive mmas do not wait on each other).
// qa / qb: the lane's 16 bytes of the two rows; bx: its staged x (kMmas x 2 registers).
template <int FMT>
TILERT_DEV void mma_step(const uint4 qa, const uint4 qb, const uint32_t* bx, float* d0, float* d1) {
  const uint32_t A[4] = {qa.x, qa.y, qa.z, qa.w}, Bq[4] = {qb.x, qb.y, qb.z, qb.w};
  if constexpr (FMT == FMT_BF16) {
    mma_bf16(d0, A[0], Bq[0], A[1], Bq[1], bx[0], bx[1]);
    mma_bf16(d1, A[2], Bq[2], A[3], Bq[3], bx[2], bx[3]);
  } else {
#pragma unroll
    for (int m = 0; m < 4; ++m)
      mma_f16(m & 1 ? d1 : d0, cvt_e4m3x2(A[m]), cvt_e4m3x2(Bq[m]), cvt_e4m3x2(A[m] >> 16), cvt_e4m3x2(Bq[m] >> 16),
              bx[2 * m], bx[2 * m + 1]);
  }
}

// MXFP4 step: wa / wb hold the four E8M0 scales of the step's blocks for rows g and g + 8
// (lane t's block is byte t).  Adds the scaled partials to acc[0] (row g) and acc[1] (row g + 8).
TILERT_DEV void mma_step_fp4(const uint4 qa, const uint4 qb, const uint32_t* bx, uint32_t wa, uint32_t wb, int t,
                             float* acc) {
  const uint32_t A[4] = {qa.x, qa.y, qa.z, qa.w}, Bq[4] = {qb.x, qb.y, qb.z, qb.w};
  const uint32_t ma = max_byte(wa), mb = max_byte(wb);
  const uint32_t fa = fp4_block_factor((int)((wa >> (8 * t)) & 255u) - (int)ma);
  const uint32_t fb = fp4_block_factor((int)((wb >> (8 * t)) & 255u) - (int)mb);
  float e0[4] = {0.f, 0.f, 0.f, 0.f}, e1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int sh = 8 * h;
      mma_f16(h ? e1 : e0, hmul2(fp4x2_to_f16x2_2m14(A[i] << sh), fa), hmul2(fp4x2_to_f16x2_2m14(Bq[i] << sh), fb),
              hmul2(fp4x2_to_f16x2_2m14(A[i] << (sh + 4)), fa), hmul2(fp4x2_to_f16x2_2m14(Bq[i] << (sh + 4)), fb),
              bx[4 * i + 2 * h], bx[4 * i + 2 * h + 1]);
    }
  }
  acc[0] += (e0[0] + e0[1] + e1[0] + e1[1]) * e8m0_to_f32(ma);
  acc[1] += (e0[2] + e0[3] + e1[2] + e1[3]) * e8m0_to_f32(mb);
}

// The first of the compute warps that work on 16-row group gi of a piece of ng groups (warp w
// takes group w * ng / kNCW).
TILERT_DEV int group_first_warp(int gi, int ng) { return (gi * kNCW + ng - 1) / ng; }

// out_i = W[r0 + i] . x_b for b < NB (NB <= 4) on the tensor cores; same contract as
// gemv_tile_fmt: epi(i, v[NB]) once per row, by one thread, the same thread for row i of every
// tile of this shape.
template <int FMT, int NB, class XRow, class Epi>
TILERT_MMA_FN void gemv_tile_mma(Ctx& c, const WeightDesc& w, const Tile& tile, XRow xrow, Epi epi) {
  static_assert(NB <= 4, "one n8 mma tile holds hi/lo of 4 tokens");
  constexpr int kStep = MmaFmt<FMT>::kStep, kRegs = 2 * MmaFmt<FMT>::kMmas;
  stage_x<FMT, NB>(c, w.cols, xrow);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, wid = threadIdx.x >> 5;
  const uint8_t* xs = c.smem + TILERT_SMEM_XS;
  const int plane = xs_bytes(w.cols) / 2;
  const uint8_t* xlane = xs + g * plane + 2 * (kStep / 4) * t;  // plane g = 2b + h: token b's hi / lo
  const uint8_t* gscale = tile_scale(w, tile_expert(tile));
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);
  const Pieces pc = pieces_of(w);
  const int rb = w.row_bytes, scale_ld = w.scale_ld, rpp = pc.rp, nsteps = pc.kc / kStep;
  // Pieces are gathered in batches of up to kRedRows rows: each warp writes its partials for
  // the batch to red[buf][warp][row][token], and one barrier per batch lets the batch's rows be
  // summed (one thread a row) while the warps stream the next batch into the other buffer.
  const int batch_rows = kRedRows / rpp * rpp;
  int buf = 0;
  for (int ba = tile.r0; ba < tile.r1; ba += batch_rows) {
    const int bn = min(batch_rows, tile.r1 - ba);
    for (int ra = ba; ra < ba + bn; ra += rpp) {
      const int nr = min(rpp, tile.r1 - ra);
      // Warps split the piece's 16-row groups, then each group's steps (contiguous ranges).
      const int ng = (nr + 15) / 16;
      const int gi = wid * ng / kNCW;
      const int first = group_first_warp(gi, ng), nj = group_first_warp(gi + 1, ng) - first;
      const int j = wid - first;
      const int s0 = j * nsteps / nj, s1 = (j + 1) * nsteps / nj;
      const int rA = min(16 * gi + g, nr - 1), rB = min(16 * gi + g + 8, nr - 1);  // rows past nr: ignored
      const float* fsA = reinterpret_cast<const float*>(gscale) + (size_t)((ra + rA) >> 7) * scale_ld;  // FP8 only
      const float* fsB = reinterpret_cast<const float*>(gscale) + (size_t)((ra + rB) >> 7) * scale_ld;
      float d0[4] = {0.f, 0.f, 0.f, 0.f}, d1[4] = {0.f, 0.f, 0.f, 0.f}, acc[2] = {0.f, 0.f};
      for (int kq = 0; kq < pc.nch; ++kq) {
        const int slot = c.piece % TILERT_SLOTS;
        ring_wait_full(c, c.piece);
        const uint8_t* src = ring_slot(c.smem, slot);
        const uint8_t* rowA = src + rA * pc.cstride + 16 * t;
        const uint8_t* rowB = src + rB * pc.cstride + 16 * t;
        const uint32_t* sA = reinterpret_cast<const uint32_t*>(src + nr * rb + rA * scale_ld);  // MXFP4 only (nch 1)
        const uint32_t* sB = reinterpret_cast<const uint32_t*>(src + nr * rb + rB * scale_ld);
        const int sq = kq * nsteps;  // the chunk's first step within the row
        // FP8: the next step's block scales are loaded a step ahead (global memory, L2 latency).
        float nsa = 0.f, nsb = 0.f;
        if (FMT == FMT_FP8 && s0 < s1) {
          nsa = __ldg(fsA + ((kStep * (sq + s0)) >> 7));
          nsb = __ldg(fsB + ((kStep * (sq + s0)) >> 7));
        }
#pragma unroll 2
        for (int st = s0; st < (TILERT_DIAG_SKIP_MMA ? s0 : s1); ++st) {
          const uint4 qa = *reinterpret_cast<const uint4*>(rowA + 64 * st);
          const uint4 qb = *reinterpret_cast<const uint4*>(rowB + 64 * st);
          uint32_t bx[kRegs];
#pragma unroll
          for (int q = 0; q < kRegs / 4; ++q) {
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (g < 2 * NB) v = *reinterpret_cast<const uint4*>(xlane + 2 * kStep * (sq + st) + 16 * q);
            bx[4 * q] = v.x; bx[4 * q + 1] = v.y; bx[4 * q + 2] = v.z; bx[4 * q + 3] = v.w;
          }
          if constexpr (FMT == FMT_MXFP4) {
            mma_step_fp4(qa, qb, bx, sA[st], sB[st], t, acc);
          } else if constexpr (FMT == FMT_FP8) {  // scale_inv of the 128 x 128 block
            const float sa = nsa, sb = nsb;
            if (st + 1 < s1) {
              nsa = __ldg(fsA + ((kStep * (sq + st + 1)) >> 7));
              nsb = __ldg(fsB + ((kStep * (sq + st + 1)) >> 7));
            }
            float e0[4] = {0.f, 0.f, 0.f, 0.f}, e1[4] = {0.f, 0.f, 0.f, 0.f};
            mma_step<FMT>(qa, qb, bx, e0, e1);
            acc[0] += (e0[0] + e0[1] + e1[0] + e1[1]) * sa;
            acc[1] += (e0[2] + e0[3] + e1[2] + e1[3]) * sb;
          } else {
            mma_step<FMT>(qa, qb, bx, d0, d1);
          }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(ring_empty(c.smem, slot));
        ++c.piece;
      }  // column chunks
      if constexpr (FMT == FMT_BF16) {
        acc[0] = d0[0] + d0[1] + d1[0] + d1[1];
        acc[1] = d0[2] + d0[3] + d1[2] + d1[3];
      }
      // Partials of this warp for rows 16 gi .. 16 gi + 15 of the piece; lanes t < NB hold token t.
      float* part = red + ((buf * kNCW + wid) * kRedRows + (ra - ba) + 16 * gi) * NB;
      if (t < NB && 16 * gi + g < nr) part[g * NB + t] = acc[0];  // (rows past nr would spill
      if (t < NB && 16 * gi + g + 8 < nr) part[(g + 8) * NB + t] = acc[1];  // into the next warp's)
    }
    compute_sync();
    for (int i = (int)threadIdx.x; i < bn; i += kNCT) {
      const int li = i % rpp, nr = min(rpp, tile.r1 - (ba + i - li));  // row i's piece
      const int ng = (nr + 15) / 16, gr = li / 16;
      const int f0 = group_first_warp(gr, ng), f1 = group_first_warp(gr + 1, ng);
      float v[NB];
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        float sum = 0.f;
        for (int q = f0; q < f1; ++q) sum += red[((buf * kNCW + q) * kRedRows + i) * NB + b];
        v[b] = sum;
      }
      epi(ba + i - tile.r0, v);
    }
    buf ^= 1;  // the next batch writes the other half while stragglers still read this one
  }
  compute_sync();  // every reader of red and xs is done before the next GEMV
}

// The GEMV paths one call site is compiled for (`GEMV` bits: 1 << f = the CUDA-core loop for format
// f, 16 << f = the tensor cores).  The generated prelude gives every weight-streaming kind the
// mask of exactly the paths its weights take (TILERT_GEMV_<KIND>, tilert/codegen.py
// `_gemv_masks`), so no kind carries GEMV code it never runs: a one-off task pays for every
// instruction-cache miss of its body, and one copy per format and call site made the kernel's
// text over a megabyte.  A weight whose path was not compiled in is reported, not skipped.
template <int GEMV> __host__ __device__ constexpr bool has_path(int fmt, bool mma) { return (GEMV >> (fmt + (mma ? 4 : 0))) & 1; }

template <int NB, int GEMV, class XRow, class Epi>
TILERT_DEV void gemv_tile(Ctx& c, const Tile& tile, XRow xrow, Epi epi) {
  const WeightDesc& w = weight(c, tile.w);
  if (mma_ok(w)) {
    if constexpr (NB <= 4) {
      if constexpr (has_path<GEMV>(FMT_BF16, true)) if (w.fmt == FMT_BF16) return gemv_tile_mma<FMT_BF16, NB>(c, w, tile, xrow, epi);
      if constexpr (has_path<GEMV>(FMT_FP8, true)) if (w.fmt == FMT_FP8) return gemv_tile_mma<FMT_FP8, NB>(c, w, tile, xrow, epi);
      if constexpr (has_path<GEMV>(FMT_MXFP4, true)) if (w.fmt == FMT_MXFP4) return gemv_tile_mma<FMT_MXFP4, NB>(c, w, tile, xrow, epi);
    }
  } else {
    if constexpr (has_path<GEMV>(FMT_FP32, false)) if (w.fmt == FMT_FP32) return gemv_tile_fmt<FMT_FP32, NB>(c, w, tile, xrow, epi);
    if constexpr (has_path<GEMV>(FMT_BF16, false)) if (w.fmt == FMT_BF16) return gemv_tile_fmt<FMT_BF16, NB>(c, w, tile, xrow, epi);
    if constexpr (has_path<GEMV>(FMT_FP8, false)) if (w.fmt == FMT_FP8) return gemv_tile_fmt<FMT_FP8, NB>(c, w, tile, xrow, epi);
    if constexpr (has_path<GEMV>(FMT_MXFP4, false)) if (w.fmt == FMT_MXFP4) return gemv_tile_fmt<FMT_MXFP4, NB>(c, w, tile, xrow, epi);
  }
  if (threadIdx.x == 0) record_error(c, ERR_GEMV_PATH, tile.w, (uint32_t)w.fmt, (uint32_t)GEMV, mma_ok(w));
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

constexpr uint32_t kLoaderAborted = 0xffffffffu;

// Issue the pieces of rows [r0, r1) of `expert` of `w` into the ring (loader lane only), in the
// compute warps' order (row blocks, then column chunks): whole-row pieces as one bulk copy (two
// with MXFP4 scales), column-chunked pieces one copy per row into padded slot rows.  `issued`
// counts pieces; returns the new count, or kLoaderAborted if the CTA aborted while waiting for
// a free slot.  Outlined (one copy for every kind's tiles), its arguments plain values.
TILERT_OUTLINE uint32_t load_tile(uint8_t* smem, const WeightDesc& w, int expert, int r0, int r1, uint32_t issued,
                                  const volatile int* abort) {
  const Pieces pc = pieces_of(w);
  const uint8_t* gdata = tile_data(w, expert);
  const uint8_t* gscale = tile_scale(w, expert);
  const int rb = w.row_bytes, cbytes = pc.kc * fmt_bits(w.fmt) / 8;
  const bool ring_scales = scales_in_ring(w);
  const uint64_t policy = stream_policy();
  for (int ra = r0; ra < r1; ra += pc.rp) {
    const int nr = min(pc.rp, r1 - ra);
    for (int kq = 0; kq < pc.nch; ++kq) {
      if (!ring_wait_empty(smem, issued, abort)) return kLoaderAborted;
      uint8_t* dst = ring_slot(smem, issued % TILERT_SLOTS);
      uint64_t* full = ring_full(smem, issued % TILERT_SLOTS);
      const uint32_t sbytes = ring_scales ? (uint32_t)(nr * w.scale_ld) : 0u;
      mbar_arrive_expect_tx(full, (uint32_t)(nr * cbytes) + sbytes);
      if (pc.nch == 1) {
        bulk_copy_g2s(dst, gdata + (size_t)ra * rb, (uint32_t)(nr * rb), full, policy);
        if (sbytes) bulk_copy_g2s(dst + nr * rb, gscale + (size_t)ra * w.scale_ld, sbytes, full, policy);
      } else {
        for (int r = 0; r < nr; ++r)
          bulk_copy_g2s(dst + r * pc.cstride, gdata + (size_t)(ra + r) * rb + (size_t)kq * cbytes, (uint32_t)cbytes,
                        full, policy);
      }
      ++issued;
    }
  }
  return issued;
}
#endif

}  // namespace tilert
