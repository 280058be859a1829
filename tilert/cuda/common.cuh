// Primitives shared by every part of the megakernel: views of buffers, weight decoding,
// warp reductions, counters (acquire / release), mbarriers and 1-D bulk copies.
//
// The generated source defines, before including this file: TILERT_B (tokens per step),
// TILERT_NCW (compute warps), TILERT_LOADER (0/1), the smem layout constants, the parameter
// structs (Ref, WeightDesc, KernelArgs, <Kind>Params) and the kind / format / space ids.
#pragma once

#include <cstdint>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define TILERT_DEV __device__ __forceinline__
// For helpers called once per tile from many call sites (piece geometry, the loader's copies):
// one copy of their code instead of one per site.
#define TILERT_OUTLINE __device__ __noinline__

namespace tilert {

constexpr int kB = TILERT_B;
constexpr int kNCW = TILERT_NCW;           // compute warps
constexpr int kNCT = TILERT_NCW * 32;      // compute threads
constexpr unsigned kFull = 0xffffffffu;

// ---- per-CTA context -------------------------------------------------------------------

struct Ctx {
  const KernelArgs* a;
  uint8_t* smem;
  int worker;
  int task;
  uint32_t piece;  // next ring piece this thread consumes (every compute thread counts alike)
};

// A buffer view: element (row, col) of a 2-D view lives at base(space) + offset + row * ld + col.
// The bases are a table in shared memory (set_space_bases, at kernel start): a lookup, not a
// switch, so a view costs no branch on the loaded space id.
TILERT_DEV uint8_t** space_bases(const Ctx& c) { return reinterpret_cast<uint8_t**>(c.smem + TILERT_SMEM_BASES); }

TILERT_DEV void set_space_bases(const Ctx& c) {
  uint8_t** b = space_bases(c);
  b[SPACE_ACT] = reinterpret_cast<uint8_t*>(c.a->act);
  b[SPACE_STATE] = reinterpret_cast<uint8_t*>(c.a->state);
  b[SPACE_CONST] = reinterpret_cast<uint8_t*>(c.a->consts);
  b[SPACE_SMEM] = c.smem + TILERT_SMEM_LOCALS;
  b[SPACE_SCRATCH] = reinterpret_cast<uint8_t*>(c.a->scratch) + (size_t)c.worker * TILERT_SCRATCH_STRIDE;
}

template <class T>
TILERT_DEV T* ref_ptr(const Ctx& c, const Ref& r) {
  return reinterpret_cast<T*>(space_bases(c)[r.space]) + r.offset;
}

TILERT_DEV const WeightDesc& weight(const Ctx& c, int id) {
  return reinterpret_cast<const WeightDesc*>(c.a->weights)[id];
}

// ---- weight decoding ---------------------------------------------------------------------

// Elements in one 16-byte chunk of a stored row.
template <int FMT> struct Fmt;
template <> struct Fmt<FMT_FP32> { static constexpr int kElems = 4; };
template <> struct Fmt<FMT_BF16> { static constexpr int kElems = 8; };
template <> struct Fmt<FMT_FP8> { static constexpr int kElems = 16; };
template <> struct Fmt<FMT_MXFP4> { static constexpr int kElems = 32; };

TILERT_DEV float bf16_to_f32(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// E8M0 scale byte -> 2^(e - 127); 0 is the subnormal 2^-127, 255 is NaN.
TILERT_DEV float e8m0_to_f32(uint32_t e) {
  if (e == 0) return __uint_as_float(0x00400000u);
  if (e == 255) return __uint_as_float(0x7fc00000u);
  return __uint_as_float(e << 23);
}

TILERT_DEV float fp4_value(uint32_t code) {
  // E2M1 magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6); bit 3 is the sign.
  const uint32_t m = code & 7u;
  float v = m < 4 ? 0.5f * (float)m : (float)(m == 4 ? 2 : m == 5 ? 3 : m == 6 ? 4 : 6);
  return (code & 8u) ? -v : v;
}

// Branch-free E2M1 decode of nibble j (0..7) of `u`, with the E8M0 scale already folded.
// The nibble's 3 magnitude bits become fp32 exponent bits 23-24 and mantissa bit 22, so the
// float read from those bits is exactly (E2M1 value) * 2^-126 (e = 0 gives the subnormal
// m * 2^-127 = m * 0.5 * 2^-126); `scale126` = scale * 2^126 undoes that.  Both products are
// exact, so the result equals fp4_value(code) * scale bit for bit (no -ftz: the subnormal
// matters).  Valid for scale bytes e <= 128 (scale126 finite); callers take fp4_value otherwise.
template <int J>
TILERT_DEV float fp4_scaled(uint32_t u, float scale126) {
  constexpr int sh = 4 * J;
  const uint32_t mag = (sh <= 22 ? (u << (22 - sh)) : (u >> (sh - 22))) & 0x01c00000u;
  const uint32_t sgn = (sh <= 28 ? (u << (28 - sh)) : (u >> (sh - 28))) & 0x80000000u;
  return __uint_as_float(mag | sgn) * scale126;
}

// scale * 2^126 for an E8M0 byte e <= 128 (2^(e - 1); e = 0 gives 0.5 = 2^-127 * 2^126).
TILERT_DEV float e8m0_to_f32_x2p126(uint32_t e) { return __uint_as_float((e + 126u) << 23); }

TILERT_DEV float2 fp8x2_to_f32(uint16_t two) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)two, __NV_E4M3);
  return __half22float2(*reinterpret_cast<__half2*>(&h));
}

// Decode one 16-byte chunk into floats.  `scale` is the chunk's block scale (fp8: scale_inv of
// its 128x128 block; mxfp4: the E8M0 scale of its 32 elements, already as a float).
template <int FMT>
TILERT_DEV void decode_chunk(const uint4 raw, float scale, float* w) {
  const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (FMT == FMT_FP32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __uint_as_float(u[i]);
  } else if constexpr (FMT == FMT_BF16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = __uint_as_float(u[i] << 16);
      w[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  } else if constexpr (FMT == FMT_FP8) {
    // Dequantize exactly as the VM does (q * scale in fp32) before the dot product.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 lo = fp8x2_to_f32((uint16_t)(u[i] & 0xffffu));
      float2 hi = fp8x2_to_f32((uint16_t)(u[i] >> 16));
      w[4 * i] = lo.x * scale;
      w[4 * i + 1] = lo.y * scale;
      w[4 * i + 2] = hi.x * scale;
      w[4 * i + 3] = hi.y * scale;
    }
  } else {  // MXFP4: element 2k in the low nibble of byte k
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) w[8 * i + j] = fp4_value((u[i] >> (4 * j)) & 15u) * scale;
    }
  }
}

// One element of a weight (vectors, embedding rows): slow path, any format.
TILERT_DEV float weight_elem(const WeightDesc& w, int row, int col) {
  const uint8_t* d = reinterpret_cast<const uint8_t*>(w.data);
  switch (w.fmt) {
    case FMT_FP32: return __ldg(reinterpret_cast<const float*>(d) + (size_t)row * w.cols + col);
    case FMT_BF16: return bf16_to_f32(__ldg(reinterpret_cast<const uint16_t*>(d) + (size_t)row * w.cols + col));
    case FMT_FP8: {
      uint8_t q = __ldg(d + (size_t)row * w.cols + col);
      float s = __ldg(reinterpret_cast<const float*>(w.scale) + (size_t)(row / 128) * w.scale_ld + col / 128);
      return fp8x2_to_f32(q).x * s;
    }
    default: {
      uint8_t byte = __ldg(d + (size_t)row * (w.cols / 2) + col / 2);
      uint8_t e = __ldg(reinterpret_cast<const uint8_t*>(w.scale) + (size_t)row * w.scale_ld + col / 32);
      return fp4_value((col & 1) ? byte >> 4 : byte & 15) * e8m0_to_f32(e);
    }
  }
}

// ---- reductions ----------------------------------------------------------------------------

TILERT_DEV float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

TILERT_DEV float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// (score, index) pairs: the higher score wins; among equal scores the lower index.
TILERT_DEV bool better(double s, int i, double bs, int bi) { return s > bs || (s == bs && i < bi); }

TILERT_DEV void warp_argmax(double& s, int& i) {
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    double os = __shfl_xor_sync(kFull, s, o);
    int oi = __shfl_xor_sync(kFull, i, o);
    if (better(os, oi, s, i)) { s = os; i = oi; }
  }
}

// ---- synchronisation -------------------------------------------------------------------------

// Barrier among the compute warps only (the loader warp never joins it).
TILERT_DEV void compute_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kNCT) : "memory"); }

TILERT_DEV uint32_t ld_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

TILERT_DEV uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

TILERT_DEV uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

TILERT_DEV void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

TILERT_DEV void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

TILERT_DEV void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

TILERT_DEV bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// The L2 policy of the weight streams: weights are read once per step and a step reads far more
// than L2 holds, so they are marked evict-first, leaving L2 to what is reused within a step (the
// kernel's code, activations, KV cache, scales).  TILERT_STREAM_EVICT_FIRST=0 gives them the
// normal policy (an A/B switch for tools/profile_step.py --define).
#ifndef TILERT_STREAM_EVICT_FIRST
#define TILERT_STREAM_EVICT_FIRST 1
#endif
TILERT_DEV uint64_t stream_policy() {
  uint64_t p;
#if TILERT_STREAM_EVICT_FIRST
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
#else
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
#endif
  return p;
}

// 1-D bulk copy global -> shared, completing on `bar` (16-byte aligned, size a multiple of 16),
// with L2 cache policy `policy` (stream_policy).
TILERT_DEV void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}

// 16-byte copy global -> shared through L2 only (Ampere-style cp.async: no register on the
// way, completes per thread with cp_async_wait); `bytes` 0 fills the 16 bytes with zeros.
TILERT_DEV void cp_async16(void* dst, const void* src, uint32_t bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
}
TILERT_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
TILERT_DEV void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

TILERT_DEV uint4 ld_global_nc_v4(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

TILERT_DEV uint4 ld_shared_v4(const void* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_addr(p)));
  return v;
}

// ---- errors ---------------------------------------------------------------------------------

// Record one error entry {code, worker, task, counter, seen, needed, step, extra}.
TILERT_DEV void record_error(const Ctx& c, int code, int counter, uint32_t seen, uint32_t needed, int extra) {
  int* e = reinterpret_cast<int*>(c.a->errors);
  int slot = atomicAdd(e, 1);
  if (slot < TILERT_MAX_ERRORS) {
    int* r = e + 8 + 8 * slot;
    r[0] = code; r[1] = c.worker; r[2] = c.task; r[3] = counter;
    r[4] = (int)seen; r[5] = (int)needed; r[6] = (int)c.a->step; r[7] = extra;
  }
  __threadfence_system();
}

}  // namespace tilert
