// Weight streaming and the GEMV core.
//
// A task reads its weights as *tiles*: rows [r0, r1) of one matrix (of one expert).  A tile is
// cut into *pieces* of whole rows that fit one ring slot; a piece is contiguous in global
// memory (row-major storage), so one 1-D bulk copy moves it.  The loader warp and the compute
// warps enumerate the very same tiles (the per-kind `tiles_of`) and cut them with the very
// same `rows_per_piece`, so they agree on the piece sequence without talking: piece j lives
// in slot j % TILERT_SLOTS.  Without the loader (TILERT_LOADER 0) a piece is read straight
// from global memory with 16-byte loads; the arithmetic is identical.
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

TILERT_DEV int rows_per_piece(const WeightDesc& w) { return min(kNCT, TILERT_SLOT_BYTES / piece_row_bytes(w)); }

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
  const int rpp = rows_per_piece(w);
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

template <int NB, class XRow, class Epi>
TILERT_DEV void gemv_tile(Ctx& c, const Tile& tile, XRow xrow, Epi epi) {
  const WeightDesc& w = weight(c, tile.w);
  switch (w.fmt) {
#if TILERT_FORMATS & (1 << FMT_FP32)
    case FMT_FP32: gemv_tile_fmt<FMT_FP32, NB>(c, w, tile, xrow, epi); break;
#endif
#if TILERT_FORMATS & (1 << FMT_BF16)
    case FMT_BF16: gemv_tile_fmt<FMT_BF16, NB>(c, w, tile, xrow, epi); break;
#endif
#if TILERT_FORMATS & (1 << FMT_FP8)
    case FMT_FP8: gemv_tile_fmt<FMT_FP8, NB>(c, w, tile, xrow, epi); break;
#endif
#if TILERT_FORMATS & (1 << FMT_MXFP4)
    case FMT_MXFP4: gemv_tile_fmt<FMT_MXFP4, NB>(c, w, tile, xrow, epi); break;
#endif
    default: break;  // the host refuses weights in formats the kernel was not built for
  }
}

// ---- loader side --------------------------------------------------------------------------------

#if TILERT_LOADER
// Issue the pieces of one tile into the ring (loader lane only).  `issued` counts pieces.
// Returns false if the CTA aborted while waiting for a free slot.
TILERT_DEV bool load_tile(Ctx& c, const Tile& tile, uint32_t& issued, const volatile int* abort) {
  const WeightDesc& w = weight(c, tile.w);
  const int rb = w.row_bytes;
  const int rpp = rows_per_piece(w);
  const bool ring_scales = scales_in_ring(w);
  const uint8_t* gdata = tile_data(w, tile_expert(tile));
  const uint8_t* gscale = tile_scale(w, tile_expert(tile));
  for (int ra = tile.r0; ra < tile.r1; ra += rpp) {
    const int nr = min(rpp, tile.r1 - ra);
    const int slot = issued % TILERT_SLOTS;
    if (issued >= TILERT_SLOTS) {
      const uint32_t parity = ((issued / TILERT_SLOTS) - 1) & 1;
      uint32_t spins = 0;
      while (!mbar_try_wait(ring_empty(c.smem, slot), parity)) {
        if ((++spins & 255) == 0 && *abort) return false;
      }
    }
    const uint32_t bytes = (uint32_t)(nr * rb);
    const uint32_t sbytes = ring_scales ? (uint32_t)(nr * w.scale_ld) : 0u;
    mbar_arrive_expect_tx(ring_full(c.smem, slot), bytes + sbytes);
    bulk_copy_g2s(ring_slot(c.smem, slot), gdata + (size_t)ra * rb, bytes, ring_full(c.smem, slot));
    if (sbytes)
      bulk_copy_g2s(ring_slot(c.smem, slot) + bytes, gscale + (size_t)ra * w.scale_ld, sbytes, ring_full(c.smem, slot));
    ++issued;
  }
  return true;
}
#endif

}  // namespace tilert
