// One device function per base task kind of tilert/kernels.py (the spec), plus, for the kinds
// that stream weight matrices, `tiles_of`: the tiles they read, in the order they read them.
// Every function is executed by all compute threads (threadIdx.x < kNCT) together.
#pragma once

#include "gemv.cuh"

namespace tilert {

TILERT_DEV int ctid() { return threadIdx.x; }
TILERT_DEV int cwarp() { return threadIdx.x >> 5; }
TILERT_DEV int lane() { return threadIdx.x & 31; }

TILERT_DEV float silu(float g) { return g / (1.0f + expf(-g)); }

// ---- embed: x[b, c0:c1] = table[token_b, c0:c1] ------------------------------------------------
TILERT_DEV void k_embed(Ctx& c, const EmbedParams& p) {
  const int* tok = ref_ptr<int>(c, p.tokens);
  float* out = ref_ptr<float>(c, p.out);
  const WeightDesc w = weight(c, p.table);
  const int n = p.c1 - p.c0;
  for (int i = ctid(); i < kB * n; i += kNCT) {
    const int b = i / n, col = p.c0 + i % n;
    out[b * p.out.ld + col] = weight_elem(w, tok[b], col);
  }
}

// ---- rmsnorm: out = x * rsqrt(mean(x^2) + eps) * w, rows [r0, r1), written cols [c0, c1) ----------
// The whole CTA works on every row (a decode step has 1..8 rows): independent loads spread over
// all compute threads, then one cross-warp sum, instead of one warp walking a 4096-wide row.
// Every projection task recomputes its norm, so the common case (16-byte aligned rows, an fp32
// or bf16 weight) loads x and the weight as vectors, all of a thread's loads of a row in flight
// at once: one memory round trip per pass instead of one per few elements.
constexpr int kNormVecs = (TILERT_H_MAX / 4 + kNCT - 1) / kNCT;  // float4s of a row per thread

TILERT_DEV float4 norm_weight4(const WeightDesc& w, int col) {
  if (w.fmt == FMT_FP32) return __ldg(reinterpret_cast<const float4*>(w.data) + col / 4);
  const uint2 b = __ldg(reinterpret_cast<const uint2*>(w.data) + col / 4);  // 4 bf16
  return make_float4(__uint_as_float(b.x << 16), __uint_as_float(b.x & 0xffff0000u), __uint_as_float(b.y << 16),
                     __uint_as_float(b.y & 0xffff0000u));
}

TILERT_DEV void k_rmsnorm(Ctx& c, const RmsnormParams& p) {
  const float* in = ref_ptr<float>(c, p.in);
  float* out = ref_ptr<float>(c, p.out);
  const WeightDesc& w = weight(c, p.weight);
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);  // [NCW][rows]
  const int rows = p.r1 - p.r0;
  const bool vec = ((p.in.offset | p.in.ld | p.out.offset | p.out.ld | p.cols | p.c0 | p.c1) & 3) == 0 &&
                   p.cols <= TILERT_H_MAX && (w.fmt == FMT_FP32 || w.fmt == FMT_BF16);
  for (int r = 0; r < rows; ++r) {
    const float* x = in + (p.r0 + r) * p.in.ld;
    float ss = 0.f;
    if (vec) {
      float4 v[kNormVecs];
#pragma unroll
      for (int k = 0; k < kNormVecs; ++k) {
        const int q = ctid() + k * kNCT;
        v[k] = 4 * q < p.cols ? *reinterpret_cast<const float4*>(x + 4 * q) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int k = 0; k < kNormVecs; ++k) ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
    } else {
#pragma unroll 4
      for (int col = ctid(); col < p.cols; col += kNCT) ss += x[col] * x[col];
    }
    ss = warp_sum(ss);
    if (lane() == 0) red[cwarp() * kB + r] = ss;
  }
  compute_sync();
  for (int r = 0; r < rows; ++r) {
    const int row = p.r0 + r;
    const float* x = in + row * p.in.ld;
    float ss = 0.f;
    for (int q = 0; q < kNCW; ++q) ss += red[q * kB + r];
    const float rs = 1.0f / sqrtf(ss / (float)p.cols + p.eps);  // torch.rsqrt rounds like 1/sqrt
    if (vec) {
#pragma unroll
      for (int k = 0; k < kNormVecs; ++k) {
        const int col = p.c0 + 4 * (ctid() + k * kNCT);
        if (col < p.c1) {
          const float4 xv = *reinterpret_cast<const float4*>(x + col), wv = norm_weight4(w, col);
          *reinterpret_cast<float4*>(out + row * p.out.ld + col) =
              make_float4(__fmul_rn(xv.x * rs, wv.x), __fmul_rn(xv.y * rs, wv.y), __fmul_rn(xv.z * rs, wv.z),
                          __fmul_rn(xv.w * rs, wv.w));
        }
      }
    } else {
#pragma unroll 4
      for (int col = p.c0 + ctid(); col < p.c1; col += kNCT)
        out[row * p.out.ld + col] = __fmul_rn(x[col] * rs, weight_elem(w, 0, col));
    }
  }
}

// ---- linear / router: out[:, c0 + i] (+)= W[r0 + i] . x ---------------------------------------------
// (The router kind shares LinearParams: it is a linear tile that writes router_logits.)
template <class V>
TILERT_DEV void tiles_of(const Ctx&, const LinearParams& p, V&& v) {
  v(Tile{p.weight, nullptr, 0, p.r0, p.r1}, 0);
}

template <int GEMV>
TILERT_DEV void k_linear(Ctx& c, const LinearParams& p) {
  const float* x = ref_ptr<float>(c, p.in);
  float* out = ref_ptr<float>(c, p.out);
  tiles_of(c, p, [&](const Tile& t, int) {
    gemv_tile<kB, GEMV>(c, t, [&](int b) { return x + b * p.in.ld; }, [&](int i, const float* v) {
#pragma unroll
      for (int b = 0; b < kB; ++b) {
        float* o = out + b * p.out.ld + p.c0 + i;
        *o = p.acc ? *o + v[b] : v[b];
      }
    });
  });
}

// ---- rope (NeoX, the first rdim dims of one head) ----------------------------------------------------
TILERT_DEV void k_rope(Ctx& c, const RopeParams& p) {
  float* buf = ref_ptr<float>(c, p.buf);
  const int* pos = ref_ptr<int>(c, p.positions);
  const float* inv = ref_ptr<float>(c, p.inv_freq);  // host-computed exactly as the VM does
  const int half = p.rdim / 2;
  for (int i = ctid(); i < kB * half; i += kNCT) {
    const int b = i / half, j = i % half;
    const float ang = __fmul_rn((float)pos[b], inv[j]);
    const float cs = cosf(ang), sn = sinf(ang);
    float* x = buf + b * p.buf.ld + p.col0;
    const float x1 = x[j], x2 = x[j + half];
    // x * cos + rotate_half(x) * sin, rounded like the VM (no fused multiply-add).
    x[j] = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(-x2, sn));
    x[j + half] = __fadd_rn(__fmul_rn(x2, cs), __fmul_rn(x1, sn));
  }
}

// ---- kv_write: cache[slot(position)] = k, v * value_scale ------------------------------------------------
TILERT_DEV int cache_slot(int position, int ring, int slots) { return ring ? position % slots : position; }

TILERT_DEV void k_kv_write(Ctx& c, const KvWriteParams& p) {
  const float* k = ref_ptr<float>(c, p.k);
  const float* v = ref_ptr<float>(c, p.v);
  float* kc = ref_ptr<float>(c, p.k_cache);
  float* vc = ref_ptr<float>(c, p.v_cache);
  const int* pos = ref_ptr<int>(c, p.positions);
  const int n = p.hd + p.vd;
  for (int i = ctid(); i < kB * n; i += kNCT) {
    const int b = i / n, d = i % n;
    const int s = cache_slot(pos[b], p.ring, p.slots);
    if (d < p.hd) {
      kc[s * p.k_cache.ld + d] = k[b * p.k.ld + p.kcol0 + d];
    } else {
      const int e = d - p.hd;
      vc[s * p.v_cache.ld + e] = __fmul_rn(v[b * p.v.ld + p.vcol0 + e], p.value_scale);
    }
  }
}

// ---- attention: split-KV partials (max, sum, acc) per query head of one KV head's group ------------------
TILERT_DEV int visible_lo(int position, int window) { return window ? max(0, position - window + 1) : 0; }

// A task owns one KV head's split of the keys for the query heads of its group.  The keys come
// in chunks of kAttnChunk: the whole CTA copies a chunk's key and value rows into shared memory
// with coalesced 16-byte loads (the next chunk's loads are in flight while this one is
// computed), then (1) a thread per (head, key) takes the score from shared memory, (2) a warp per
// head turns its chunk of scores into softmax weights against the running maximum, (3) every
// thread owns 4 value dims of one head and adds the chunk's weighted values into registers
// (rescaled when the maximum moves).  No thread waits on a dependent global load inside a
// chunk, the value sums use every warp, and the heads' partials never meet across warps: their owners
// write them out at the end.  The shared-memory area (TILERT_SMEM_XS onwards, the GEMVs' x
// staging and scratch, which attention does not use) is sized by tilert/codegen.py
// (`_attention_smem_bytes`).
#ifndef TILERT_ATTN_PREFETCH
#define TILERT_ATTN_PREFETCH 1
#endif
constexpr int kAttnChunk = TILERT_ATTN_CHUNK;
constexpr int kAttnOwn = (TILERT_ATTN_GROUP_MAX * TILERT_VD_MAX / 4 + kNCT - 1) / kNCT;  // float4 outputs a thread
constexpr int kAttnLoads = (kAttnChunk * (TILERT_HD_MAX + TILERT_VD_MAX) / 4 + kNCT - 1) / kNCT;

struct AttnChunk {
  float4 v[kAttnLoads];
};

// This thread's share of the key and value rows of keys [j0, j0 + n) (float4 item i: key row
// items first, then value row items).
TILERT_DEV AttnChunk attn_load(const AttentionParams& p, const float* kc, const float* vc, int j0, int n) {
  AttnChunk r;
  const int k4 = p.hd / 4, v4 = p.vd / 4, nk = kAttnChunk * k4;
#pragma unroll
  for (int q = 0; q < kAttnLoads; ++q) {
    const int i = ctid() + q * kNCT;
    r.v[q] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < nk) {
      const int j = i / k4, f = i % k4;
      if (j < n) r.v[q] = *reinterpret_cast<const float4*>(kc + cache_slot(j0 + j, p.window, p.slots) * p.k_cache.ld + 4 * f);
    } else if (i < nk + kAttnChunk * v4) {
      const int j = (i - nk) / v4, f = (i - nk) % v4;
      if (j < n) r.v[q] = *reinterpret_cast<const float4*>(vc + cache_slot(j0 + j, p.window, p.slots) * p.v_cache.ld + 4 * f);
    }
  }
  return r;
}

// ... stored into a chunk buffer: key rows padded to hd + 4 floats (rows 4 banks apart), then
// the value rows.
TILERT_DEV void attn_store(const AttentionParams& p, float* kbuf, float* vbuf, const AttnChunk& r) {
  const int k4 = p.hd / 4, v4 = p.vd / 4, nk = kAttnChunk * k4;
#pragma unroll
  for (int q = 0; q < kAttnLoads; ++q) {
    const int i = ctid() + q * kNCT;
    if (i < nk) {
      *reinterpret_cast<float4*>(kbuf + (i / k4) * (p.hd + 4) + 4 * (i % k4)) = r.v[q];
    } else if (i < nk + kAttnChunk * v4) {
      *reinterpret_cast<float4*>(vbuf + (i - nk) * 4) = r.v[q];
    }
  }
}

TILERT_DEV void k_attention(Ctx& c, const AttentionParams& p) {
  constexpr int CH = kAttnChunk;
  const float* q = ref_ptr<float>(c, p.q);
  const float* kc = ref_ptr<float>(c, p.k_cache);
  const float* vc = ref_ptr<float>(c, p.v_cache);
  const int* pos = ref_ptr<int>(c, p.positions);
  float* mx = ref_ptr<float>(c, p.mx);
  float* sm = ref_ptr<float>(c, p.sm);
  float* acc = ref_ptr<float>(c, p.acc);
  const int G = p.group, hd = p.hd, v4 = p.vd / 4;
  float* qs = reinterpret_cast<float*>(c.smem + TILERT_SMEM_XS);  // [G][hd] this token's queries
  float* kbuf = qs + TILERT_ATTN_GROUP_MAX * TILERT_HD_MAX;        // [2][CH][hd + 4]
  float* vbuf = kbuf + 2 * CH * (TILERT_HD_MAX + 4);               // [2][CH][vd]
  float* ps = vbuf + 2 * CH * TILERT_VD_MAX;                       // [G][CH] scores, then weights
  float* run_m = ps + TILERT_ATTN_GROUP_MAX * CH;                  // [G] running maximum
  float* run_l = run_m + TILERT_ATTN_GROUP_MAX;                    // [G] running sum
  float* corr = run_l + TILERT_ATTN_GROUP_MAX;                     // [G] this chunk's rescale
  // This split's share of the step's whole visible key range (tilert.kernels.split_range).
  const int all_lo = visible_lo(pos[0], p.window), all_hi = pos[kB - 1] + 1;
  const int span = (all_hi - all_lo + p.splits - 1) / p.splits;
  const int s_lo = all_lo + p.split * span, s_hi = min(all_hi, all_lo + (p.split + 1) * span);
  // Pull this split's keys and values into L2 at once: the chunk copies below then wait on L2.
  // (TILERT_ATTN_PREFETCH=0 leaves it out: an A/B switch for tools/profile_step.py --define.)
  if (TILERT_ATTN_PREFETCH) {
    const int klines = (p.hd * 4 + 127) / 128, vlines = (p.vd * 4 + 127) / 128, per = klines + vlines;
    for (int i = ctid(); i < (s_hi - s_lo) * per; i += kNCT) {
      const int j = s_lo + i / per, l = i % per;
      const int slot = cache_slot(j, p.window, p.slots);
      const float* a = l < klines ? kc + slot * p.k_cache.ld + 32 * l : vc + slot * p.v_cache.ld + 32 * (l - klines);
      asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
    }
  }
  for (int b = 0; b < kB; ++b) {
    const int lo = max(visible_lo(pos[b], p.window), s_lo), hi = min(pos[b] + 1, s_hi);
    if (hi <= lo) {  // empty split: every head of the group gets the neutral partial
      for (int i = ctid(); i < G * p.vd; i += kNCT) {
        const int h = p.h0 + i / p.vd, d = i % p.vd;
        acc[b * p.acc.ld + (h * p.ms + p.split) * p.vd + d] = 0.f;
        if (d == 0) { mx[b * p.mx.ld + h * p.ms + p.split] = -INFINITY; sm[b * p.sm.ld + h * p.ms + p.split] = 0.f; }
      }
      continue;
    }
    const int chunks = (hi - lo + CH - 1) / CH;
    AttnChunk next = attn_load(p, kc, vc, lo, min(CH, hi - lo));
    for (int i = ctid(); i < G * hd / 4; i += kNCT)
      reinterpret_cast<float4*>(qs)[i] = *reinterpret_cast<const float4*>(q + b * p.q.ld + p.h0 * hd + 4 * i);
    for (int h = ctid(); h < G; h += kNCT) { run_m[h] = -INFINITY; run_l[h] = 0.f; }
    float4 o[kAttnOwn];
#pragma unroll
    for (int k = 0; k < kAttnOwn; ++k) o[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    attn_store(p, kbuf, vbuf, next);
    for (int ch = 0; ch < chunks; ++ch) {
      const int j0 = lo + ch * CH, n = min(CH, hi - j0);
      float* kb = kbuf + (ch & 1) * CH * (TILERT_HD_MAX + 4);
      float* vb = vbuf + (ch & 1) * CH * TILERT_VD_MAX;
      compute_sync();  // chunk ch (and the queries, the running state) in shared memory
      if (ch + 1 < chunks) next = attn_load(p, kc, vc, j0 + CH, min(CH, hi - j0 - CH));
      // (1) scores of (head, key) pairs
      for (int pr = ctid(); pr < G * CH; pr += kNCT) {
        const int h = pr / CH, j = pr % CH;
        float s = -INFINITY;
        if (j < n) {
          const float4* qa = reinterpret_cast<const float4*>(qs + h * hd);
          const float4* ka = reinterpret_cast<const float4*>(kb + j * (hd + 4));
          float4 d = make_float4(0.f, 0.f, 0.f, 0.f);  // four chains, not one 192-long one
#pragma unroll 8
          for (int k = 0; k < hd / 4; ++k) {
            const float4 x = qa[k], y = ka[k];
            d.x += x.x * y.x; d.y += x.y * y.y; d.z += x.z * y.z; d.w += x.w * y.w;
          }
          s = __fmul_rn((d.x + d.y) + (d.z + d.w), p.scale);
        }
        ps[pr] = s;
      }
      compute_sync();
      // (2) softmax weights against the running maximum, a warp a head, a lane a key
      for (int h = cwarp(); h < G; h += kNCW) {
        const float s = lane() < CH ? ps[h * CH + lane()] : -INFINITY;
        const float m_old = run_m[h], m_new = fmaxf(m_old, warp_max(s));  // finite: n >= 1
        const float e = lane() < CH ? expf(s - m_new) : 0.f;  // exp(-inf) = 0 past n
        const float total = warp_sum(e);
        if (lane() < CH) ps[h * CH + lane()] = e;
        if (lane() == 0) {
          const float f = expf(m_old - m_new);  // 0 on the first chunk (m_old = -inf)
          corr[h] = f;
          run_l[h] = run_l[h] * f + total;
          run_m[h] = m_new;
        }
      }
      compute_sync();
      // (3) the weighted values, a float4 of one head's value dims a thread
#pragma unroll
      for (int k = 0; k < kAttnOwn; ++k) {
        const int own = ctid() + k * kNCT, h = own / v4, d4 = own % v4;
        if (h < G) {
          const float f = corr[h];
          float4 a = o[k];
          a.x *= f; a.y *= f; a.z *= f; a.w *= f;
          const float* e = ps + h * CH;
          const float4* v = reinterpret_cast<const float4*>(vb) + d4;
          if (n == CH) {  // a whole chunk: every load of the loop in flight at once
#pragma unroll
            for (int j = 0; j < CH; ++j) {
              const float4 vj = v[j * v4];
              a.x += e[j] * vj.x; a.y += e[j] * vj.y; a.z += e[j] * vj.z; a.w += e[j] * vj.w;
            }
          } else {
            for (int j = 0; j < n; ++j) {
              const float4 vj = v[j * v4];
              a.x += e[j] * vj.x; a.y += e[j] * vj.y; a.z += e[j] * vj.z; a.w += e[j] * vj.w;
            }
          }
          o[k] = a;
        }
      }
      // The next chunk goes to the other buffer: its last readers (chunk ch - 1) are past the
      // barriers above.
      if (ch + 1 < chunks) attn_store(p, kbuf + ((ch + 1) & 1) * CH * (TILERT_HD_MAX + 4),
                                      vbuf + ((ch + 1) & 1) * CH * TILERT_VD_MAX, next);
    }
#pragma unroll
    for (int k = 0; k < kAttnOwn; ++k) {
      const int own = ctid() + k * kNCT, h = own / v4, d4 = own % v4;
      if (h < G) {
        *reinterpret_cast<float4*>(acc + b * p.acc.ld + ((p.h0 + h) * p.ms + p.split) * p.vd + 4 * d4) = o[k];
        if (d4 == 0) {
          mx[b * p.mx.ld + (p.h0 + h) * p.ms + p.split] = run_m[h];
          sm[b * p.sm.ld + (p.h0 + h) * p.ms + p.split] = run_l[h];
        }
      }
    }
    compute_sync();  // the next token overwrites the queries, buffers and running state
  }
}

// ---- attn_combine: merge the splits; the sink joins the denominator only -----------------------------
TILERT_DEV void k_attn_combine(Ctx& c, const AttnCombineParams& p) {
  constexpr int VF4 = (TILERT_VD_MAX + 127) / 128;
  const float* mx = ref_ptr<float>(c, p.mx);
  const float* sm = ref_ptr<float>(c, p.sm);
  const float* acc = ref_ptr<float>(c, p.acc);
  float* out = ref_ptr<float>(c, p.out);
  const int heads = p.h1 - p.h0;
  for (int item = cwarp(); item < kB * heads; item += kNCW) {
    const int b = item / heads, h = p.h0 + item % heads;
    const float* m = mx + b * p.mx.ld + h * p.ms;
    const float* s = sm + b * p.sm.ld + h * p.ms;
    const float* a = acc + b * p.acc.ld + h * p.ms * p.vd;
    // One split per lane for the weights exp(m_k - top); lanes over value dims for the sum.
    float top = -INFINITY;
    for (int k = lane(); k < p.splits; k += 32) top = fmaxf(top, m[k]);
    top = warp_max(top);
    float sink = 0.f;
    if (p.sink >= 0) {
      sink = weight_elem(weight(c, p.sink), 0, h);
      top = fmaxf(top, sink);
    }
    float denom = 0.f;
    float4 o[VF4];
#pragma unroll
    for (int i = 0; i < VF4; ++i) o[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k0 = 0; k0 < p.splits; k0 += 32) {
      const int k = k0 + lane();
      const float wk = k < p.splits ? expf(m[k] - top) : 0.f;  // exp(-inf) = 0: empty splits
      denom += k < p.splits ? s[k] * wk : 0.f;
      const int n = min(32, p.splits - k0);
#pragma unroll 8
      for (int kk = 0; kk < n; ++kk) {
        const float w = __shfl_sync(kFull, wk, kk);
#pragma unroll
        for (int i = 0; i < VF4; ++i) {
          const int d = 4 * lane() + 128 * i;
          if (d < p.vd) {
            const float4 v = *reinterpret_cast<const float4*>(a + (k0 + kk) * p.vd + d);
            o[i].x += v.x * w; o[i].y += v.y * w; o[i].z += v.z * w; o[i].w += v.w * w;
          }
        }
      }
    }
    denom = warp_sum(denom);
    if (p.sink >= 0) denom += expf(sink - top);
#pragma unroll
    for (int i = 0; i < VF4; ++i) {
      const int d = 4 * lane() + 128 * i;
      if (d < p.vd) {
        float* dst = out + b * p.out.ld + h * p.vd + d;
        dst[0] = o[i].x / denom; dst[1] = o[i].y / denom; dst[2] = o[i].z / denom; dst[3] = o[i].w / denom;
      }
    }
  }
}

// ---- gate_up: out[:, r] = silu(W_gate[r] . x) * (W_up[r] . x) ---------------------------------------
template <class V>
TILERT_DEV void tiles_of(const Ctx&, const GateUpParams& p, V&& v) {
  v(Tile{p.gate, nullptr, 0, p.r0, p.r1}, 0);
  v(Tile{p.up, nullptr, 0, p.r0, p.r1}, 1);
}

template <int GEMV>
TILERT_DEV void k_gate_up(Ctx& c, const GateUpParams& p) {
  const float* x = ref_ptr<float>(c, p.in);
  float* out = ref_ptr<float>(c, p.out);
  float* g = reinterpret_cast<float*>(c.smem + TILERT_SMEM_SCRATCH);  // [B][rows] gate results
  const int n = p.r1 - p.r0;
  tiles_of(c, p, [&](const Tile& t, int which) {
    gemv_tile<kB, GEMV>(c, t, [&](int b) { return x + b * p.in.ld; }, [&](int i, const float* v) {
#pragma unroll
      for (int b = 0; b < kB; ++b) {
        if (which == 0) g[b * n + i] = v[b];
        else out[b * p.out.ld + p.r0 + i] = silu(g[b * n + i]) * v[b];
      }
    }, which == 1);  // up reads the x gate staged (codegen checks they match in format and width)
    compute_sync();  // gate and up rows may land on different threads
  });
}

// ---- topk: sigmoid scores, biased choice, top-k (ties: lowest expert first), normalise, scale ---------
TILERT_DEV void k_topk(Ctx& c, const TopkParams& p) {
  constexpr int EPL = (TILERT_E_MAX + 31) / 32;
  const float* logits = ref_ptr<float>(c, p.logits);
  int* idx = ref_ptr<int>(c, p.idx);
  float* wts = ref_ptr<float>(c, p.weights);
  const WeightDesc& bias = weight(c, p.bias);
  const bool bias32 = bias.fmt == FMT_FP32;
  for (int b = cwarp(); b < kB; b += kNCW) {
    // Every load first (logits from L2, the bias from wherever it is), then the arithmetic.
    float lg[EPL], bv[EPL];
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      const int e = lane() + 32 * j;
      lg[j] = e < p.experts ? logits[b * p.logits.ld + e] : 0.f;
      bv[j] = e < p.experts && bias32 ? __ldg(reinterpret_cast<const float*>(bias.data) + e) : 0.f;
    }
    float score[EPL], choice[EPL];
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      const int e = lane() + 32 * j;
      score[j] = 0.f;
      choice[j] = -INFINITY;
      if (e < p.experts) {
        score[j] = 1.0f / (1.0f + expf(-lg[j]));
        choice[j] = score[j] + (bias32 ? bv[j] : weight_elem(bias, 0, e));
      }
    }
    // Lane k keeps the k-th choice; the selection loop stays rolled (small code: a one-off task
    // pays for every instruction-cache miss of its body).
    float mine_s = 0.f;
    int mine_i = 0;
    float total = 0.f;
#pragma unroll 1
    for (int k = 0; k < p.k; ++k) {
      float best = -INFINITY, bs = 0.f;
      int bi = 0x7fffffff;
#pragma unroll
      for (int j = 0; j < EPL; ++j) {
        const int e = lane() + 32 * j;
        const bool open = e < p.experts && choice[j] != -INFINITY;  // not taken yet
        if (open && (choice[j] > best || (choice[j] == best && e < bi))) { best = choice[j]; bi = e; bs = score[j]; }
      }
#pragma unroll 1
      for (int o = 16; o; o >>= 1) {
        const float ob = __shfl_xor_sync(kFull, best, o), os = __shfl_xor_sync(kFull, bs, o);
        const int oi = __shfl_xor_sync(kFull, bi, o);
        if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; bs = os; }
      }
#pragma unroll
      for (int j = 0; j < EPL; ++j)
        if (lane() + 32 * j == bi) choice[j] = -INFINITY;  // taken
      if (lane() == k) { mine_s = bs; mine_i = bi; }
      total += bs;  // the same on every lane, in selection order
    }
    if (lane() < p.k) {
      const float denom = total + 1e-20f;
      idx[b * p.idx.ld + lane()] = mine_i;
      wts[b * p.weights.ld + lane()] = (p.norm ? mine_s / denom : mine_s) * p.scale;
    }
  }
}

// ---- expert_gate_up: moe_act[t, slot, r] for the expert the router chose ----------------------------
template <class V>
TILERT_DEV void tiles_of(const Ctx& c, const ExpertGateUpParams& p, V&& v) {
  const int* idx = ref_ptr<int>(c, p.idx);
  const int pos = p.token * p.idx.ld + p.slot;
  v(Tile{p.gate, idx, pos, p.r0, p.r1}, 0);
  v(Tile{p.up, idx, pos, p.r0, p.r1}, 1);
}

template <int GEMV>
TILERT_DEV void k_expert_gate_up(Ctx& c, const ExpertGateUpParams& p) {
  const float* x = ref_ptr<float>(c, p.in) + p.token * p.in.ld;
  float* out = ref_ptr<float>(c, p.out) + p.token * p.out.ld + p.slot * p.inter;
  float* g = reinterpret_cast<float*>(c.smem + TILERT_SMEM_SCRATCH);
  tiles_of(c, p, [&](const Tile& t, int which) {
    gemv_tile<1, GEMV>(c, t, [&](int) { return x; }, [&](int i, const float* v) {
      if (which == 0) g[i] = v[0];
      else out[p.r0 + i] = silu(g[i]) * v[0];
    }, which == 1);  // up reads the x gate staged
    compute_sync();
  });
}

// ---- expert_down: x[t, r] += sum_slot weight[t, slot] * (W_down[expert] r . act[t, slot]) ----------
template <class V>
TILERT_DEV void tiles_of(const Ctx& c, const ExpertDownParams& p, V&& v) {
  const int* idx = ref_ptr<int>(c, p.idx);
  for (int t = 0; t < kB; ++t)
    for (int k = 0; k < p.k; ++k) v(Tile{p.down, idx, t * p.idx.ld + k, p.r0, p.r1}, t * p.k + k);
}

template <int GEMV>
TILERT_DEV void k_expert_down(Ctx& c, const ExpertDownParams& p) {
  const float* act = ref_ptr<float>(c, p.act);
  const float* wts = ref_ptr<float>(c, p.weights);
  float* x = ref_ptr<float>(c, p.out);
  float* total = reinterpret_cast<float*>(c.smem + TILERT_SMEM_SCRATCH);  // [rows] of one token
  const int n = p.r1 - p.r0;
  tiles_of(c, p, [&](const Tile& tile, int i) {
    const int t = i / p.k, k = i % p.k;
    const float wk = wts[t * p.weights.ld + k];
    gemv_tile<1, GEMV>(c, tile, [&](int) { return act + t * p.act.ld + k * p.inter; }, [&](int r, const float* v) {
      const float y = wk * v[0];
      total[r] = k == 0 ? y : total[r] + y;  // the same thread owns row r in every slot's tile
    });
    if (k == p.k - 1) {  // token t done: add its total into the residual
      compute_sync();
      for (int r = ctid(); r < n; r += kNCT) x[t * p.out.ld + p.r0 + r] += total[r];
      compute_sync();
    }
  });
}

// ---- lm_head: logits tile and the tile's best (score, index) under Gumbel-max sampling ---------------
TILERT_DEV uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// tilert.sampling.gumbel for one vocabulary index, in double like the VM.
TILERT_DEV double gumbel(uint64_t key, uint64_t index) {
  const uint64_t bits = splitmix64(key ^ (index * 0x9E3779B97F4A7C15ull));
  const double u = ((double)(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  return -log(-log(u));
}

template <class V>
TILERT_DEV void tiles_of(const Ctx&, const LmHeadParams& p, V&& v) {
  v(Tile{p.weight, nullptr, 0, p.r0, p.r1}, 0);
}

template <int GEMV>
TILERT_DEV void k_lm_head(Ctx& c, const LmHeadParams& p) {
  const float* x = ref_ptr<float>(c, p.in);
  float* logits = ref_ptr<float>(c, p.logits);
  double* best = ref_ptr<double>(c, p.best);
  const int* pos = ref_ptr<int>(c, p.positions);
  const double* samp = ref_ptr<double>(c, p.sampling);
  const double temperature = samp[0];
  const uint64_t seed = (uint64_t)(long long)samp[1];
  double bs[kB];
  int bi[kB];
#pragma unroll
  for (int b = 0; b < kB; ++b) {
    bs[b] = -INFINITY;
    bi[b] = 0x7fffffff;
  }
  tiles_of(c, p, [&](const Tile& t, int) {
    gemv_tile<kB, GEMV>(c, t, [&](int b) { return x + b * p.in.ld; }, [&](int i, const float* v) {
      const int r = p.r0 + i;
#pragma unroll
      for (int b = 0; b < kB; ++b) {
        logits[b * p.logits.ld + r] = v[b];
        double s = (double)v[b];
        if (temperature > 0.0) {  // the key is recomputed per row: cheaper than holding kB of them
          const uint64_t key = splitmix64(seed ^ ((uint64_t)pos[b] * 0x94D049BB133111EBull));
          s = s / temperature + gumbel(key, (uint64_t)r);
        }
        if (better(s, r, bs[b], bi[b])) { bs[b] = s; bi[b] = r; }
      }
    });
  });
  // Reduce (score, index) over the compute threads: warps, then across warps in smem.
  double* rs = reinterpret_cast<double*>(c.smem + TILERT_SMEM_RED);
  int* ri = reinterpret_cast<int*>(rs + kNCW * kB);
#pragma unroll
  for (int b = 0; b < kB; ++b) {
    warp_argmax(bs[b], bi[b]);
    if (lane() == 0) { rs[cwarp() * kB + b] = bs[b]; ri[cwarp() * kB + b] = bi[b]; }
  }
  compute_sync();
  if (ctid() < kB) {
    const int b = ctid();
    double s = rs[b];
    int i = ri[b];
    for (int w = 1; w < kNCW; ++w)
      if (better(rs[w * kB + b], ri[w * kB + b], s, i)) { s = rs[w * kB + b]; i = ri[w * kB + b]; }
    best[b * p.best.ld + 2 * p.tile] = s;
    best[b * p.best.ld + 2 * p.tile + 1] = (double)i;
  }
}

// ---- argmax over the tiles' bests (the lowest index among equal scores) --------------------------------
TILERT_DEV void k_argmax(Ctx& c, const ArgmaxParams& p) {
  const double* best = ref_ptr<double>(c, p.best);
  int* out = ref_ptr<int>(c, p.out);
  // One warp per token, lanes over the tiles: the loads go out together, not one by one.
  for (int b = cwarp(); b < kB; b += kNCW) {
    const double* row = best + b * p.best.ld;
    double s = -INFINITY;
    int k = 0x7fffffff;
    for (int t = lane(); t < p.ntiles; t += 32)
      if (row[2 * t] > s) { s = row[2 * t]; k = t; }  // lowest tile among equal scores
    warp_argmax(s, k);
    if (lane() == 0) out[b] = (int)row[2 * (k == 0x7fffffff ? 0 : k) + 1];  // (all -inf: tile 0)
  }
}

// ---- capture: hidden[:, slot * H + c0 : slot * H + c1] = x[:, c0:c1] (a DFlash drafter's conditioning) ----
TILERT_DEV void k_capture(Ctx& c, const CaptureParams& p) {
  const float* in = ref_ptr<float>(c, p.in);
  float* out = ref_ptr<float>(c, p.out);
  const int n = p.c1 - p.c0;
  for (int i = ctid(); i < kB * n; i += kNCT) {
    const int b = i / n, col = p.c0 + i % n;
    out[b * p.out.ld + col] = in[b * p.in.ld + col];
  }
}

}  // namespace tilert
