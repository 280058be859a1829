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

TILERT_DEV int rows_per_piece(int row_bytes) { return min(kNCT, TILERT_SLOT_BYTES / row_bytes); }

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

template <int FMT>
TILERT_DEV float chunk_scale(const WeightDesc& w, const uint8_t* scale, int row, int chunk) {
  if constexpr (FMT == FMT_FP8) {
    return __ldg(reinterpret_cast<const float*>(scale) + (size_t)(row >> 7) * w.scale_ld + ((chunk * 16) >> 7));
  } else if constexpr (FMT == FMT_MXFP4) {
    return e8m0_to_f32(__ldg(scale + (size_t)row * w.scale_ld + chunk));  // one scale per 32 = one chunk
  } else {
    return 1.0f;
  }
}

// out_i = W[r0 + i] . x_b for b < NB, delivered to epi(i, float v[NB]) by one thread per row.
// XRow(b) gives the fp32 input row b (16-byte aligned).  Every compute thread must call this.
template <int FMT, int NB, class XRow, class Epi>
TILERT_DEV void gemv_tile_fmt(Ctx& c, const WeightDesc& w, const Tile& tile, XRow xrow, Epi epi) {
  constexpr int E = Fmt<FMT>::kElems;
  const int tid = threadIdx.x;
  const int rb = w.row_bytes;
  const int nch = rb >> 4;
  const int rpp = rows_per_piece(rb);
  const int expert = tile_expert(tile);
  const uint8_t* gdata = tile_data(w, expert);
  const uint8_t* gscale = tile_scale(w, expert);
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);

  for (int ra = tile.r0; ra < tile.r1; ra += rpp) {
    const int nr = min(rpp, tile.r1 - ra);
    const int G = group_size(nr);
    const int rl = tid / G, lig = tid % G;
#if TILERT_LOADER
    const int slot = c.piece % TILERT_SLOTS;
    ring_wait_full(c, c.piece);
    const uint8_t* src = ring_slot(c.smem, slot);
#else
    const uint8_t* src = gdata + (size_t)ra * rb;
#endif
    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[b] = 0.f;
    if (rl < nr) {
      const uint8_t* row = src + (size_t)rl * rb;
      const int r = ra + rl;
#pragma unroll 2
      for (int k = lig; k < nch; k += G) {
#if TILERT_LOADER
        const uint4 raw = ld_shared_v4(row + 16 * k);
#else
        const uint4 raw = ld_global_nc_v4(row + 16 * k);
#endif
        float wv[E];
        decode_chunk<FMT>(raw, chunk_scale<FMT>(w, gscale, r, k), wv);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const float4* xp = reinterpret_cast<const float4*>(xrow(b) + k * E);
#pragma unroll
          for (int j = 0; j < E / 4; ++j) {
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
  const int rpp = rows_per_piece(rb);
  const uint8_t* gdata = tile_data(w, tile_expert(tile));
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
    mbar_arrive_expect_tx(ring_full(c.smem, slot), bytes);
    bulk_copy_g2s(ring_slot(c.smem, slot), gdata + (size_t)ra * rb, bytes, ring_full(c.smem, slot));
    ++issued;
  }
  return true;
}
#endif

}  // namespace tilert
