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
    if (pos[b] < 0) continue;  // padding (a draft step's unused context rows)
    const int s = cache_slot(pos[b], p.ring, p.slots);
    if (d < p.hd) {
      kc[s * p.k_cache.ld + d] = k[b * p.k.ld + p.kcol0 + d];
    } else {
      const int e = d - p.hd;
      vc[s * p.v_cache.ld + e] = __fmul_rn(v[b * p.v.ld + p.vcol0 + e], p.value_scale);
    }
  }
}

// Diagnostic switch (tools/profile_step.py --define TILERT_DIAG_REPEAT=2): run the body of a
// one-off kind (top-k, attention combine) this many times in one task; the passes after the
// first find its code and data cached, so the task time shows what the first pays for being cold.
#ifndef TILERT_DIAG_REPEAT
#define TILERT_DIAG_REPEAT 1
#endif

// ---- attention: split-KV partials (max, sum, acc) per query head of one KV head's group ------------------
TILERT_DEV int visible_lo(int position, int window) { return window ? max(0, position - window + 1) : 0; }

// A task owns one KV head's split of the keys for the query heads of its group, for every token
// of the step.  On the CUDA cores the tokens share the keys: a pass takes the (token, head) rows
// of up to TILERT_ATTN_ROWS_MAX / group tokens at once (a verify step's 8 tokens read each chunk
// once or twice, not 8 times), each row masked to its own token's visible keys.  The keys come
// in chunks of kAttnChunk = 16 through a ring of kAttnStages chunk buffers in shared memory:
// every thread copies its 16-byte pieces of a chunk's key and value rows with cp.async
// (straight to shared memory, no register on the way) while the chunk before is computed.
// Shared-memory bandwidth, not arithmetic, bounds the chunk (measured on an H200: the query and
// key reads of the score step took most of it), so every operand read from shared memory is
// used twice: per chunk (1) a warp per pair of heads takes the scores, each lane two heads x two
// keys over a quarter of the head dims (lanes 8 apart share the keys, so 8 lanes of one
// quarter-warp read 8 different key rows 4 banks apart and one query: no bank conflict), summed
// across the quarters with shuffles; (2) half a warp per head turns the chunk's scores into
// softmax weights against the running maximum; (3) a thread per pair of heads and 4 value dims
// adds the chunk's weighted values into registers (rescaled when the maximum moves).  The
// heads' partials never meet across warps: their owners write them out at the end.  The
// shared-memory area (TILERT_SMEM_XS onwards, the GEMVs' x staging and scratch, which attention
// does not use) is sized by tilert/codegen.py (`_attention_smem_bytes`).
//
// With TILERT_ATTN_MMA the chunk runs on the tensor cores instead (attn_token_mma below): the
// same cp.async ring and online softmax, but the scores and the weighted values are tf32 mmas
// (three products a term, so fp32 accuracy), every shared-memory operand read once a chunk.
#ifndef TILERT_ATTN_MMA
#define TILERT_ATTN_MMA 0
#endif
constexpr int kAttnChunk = TILERT_ATTN_CHUNK;
static_assert(kAttnChunk == 16, "the score step pairs keys j and j + 8; the softmax takes a key a lane of a half-warp");
constexpr int kAttnStages = TILERT_ATTN_STAGES;
constexpr int kAttnRows = TILERT_ATTN_ROWS_MAX;  // (token, head) rows one CUDA-core pass holds (>= a group)
constexpr int kAttnPairs = (kAttnRows + 1) / 2;                                 // pairs of rows
constexpr int kAttnOwn = (kAttnPairs * (TILERT_VD_MAX / 4) + kNCT - 1) / kNCT;  // (row pair, 4 value dims) a thread
constexpr int kAttnKRow = TILERT_HD_MAX + 4;  // floats a key row takes in a chunk buffer (rows 4 banks apart)
// floats a value row takes in a chunk buffer: packed for the CUDA-core loop (its float4 walk),
// 8 banks apart for the mma's B fragments (lanes t = 0..3 read rows t: banks 8 t + g)
constexpr int kAttnVRow = TILERT_ATTN_MMA ? TILERT_VD_MAX + 8 : TILERT_VD_MAX;
constexpr int kAttnStage = kAttnChunk * (kAttnKRow + kAttnVRow);  // floats of one chunk buffer

// Start this thread's copies of the key and value rows of keys [j0, j0 + n) into chunk buffer
// `buf` (key rows first, then value rows `vrow` floats apart; the value rows of a short chunk filled up with zeros,
// which the value step multiplies by its zero weights) and commit them as one group.  Every
// thread commits a group per call, copies or not, so cp_async_wait counts chunks alike everywhere.
TILERT_DEV void attn_issue(const AttentionParams& p, const float* kc, const float* vc, float* buf, int j0, int n,
                           int vrow) {
  const int k4 = p.hd / 4, v4 = p.vd / 4, nk = n * k4;
  float* vb = buf + kAttnChunk * kAttnKRow;
  for (int i = ctid(); i < (n ? nk + kAttnChunk * v4 : 0); i += kNCT) {
    if (i < nk) {
      const int j = i / k4, f = i - j * k4;
      cp_async16(buf + j * kAttnKRow + 4 * f, kc + cache_slot(j0 + j, p.window, p.slots) * p.k_cache.ld + 4 * f);
    } else {
      const int j = (i - nk) / v4, f = (i - nk) - j * v4;
      const float* src = j < n ? vc + cache_slot(j0 + j, p.window, p.slots) * p.v_cache.ld + 4 * f : vc;
      cp_async16(vb + j * vrow + 4 * f, src, j < n ? 16u : 0u);
    }
  }
  cp_async_commit();
}

// The chunks of keys [lo, hi) on their way through the S chunk buffers at `ring` (value rows
// `vrow` floats apart), S - 1 chunks ahead of the one computed.  Both attention paths walk it:
// start() before the loop, then per chunk next(ch): its buffer, once every thread's copies
// landed (a barrier, which also means chunk ch - 1 is done), with chunk ch + S - 1 issued into
// the buffer ch - 1 left.
struct AttnChunks {
  const AttentionParams& p;
  const float* kc;
  const float* vc;
  float* ring;
  int lo, hi, chunks, vrow;
  TILERT_DEV AttnChunks(const AttentionParams& p_, const float* kc_, const float* vc_, float* ring_, int lo_, int hi_,
                        int vrow_)
      : p(p_), kc(kc_), vc(vc_), ring(ring_), lo(lo_), hi(hi_),
        chunks(hi_ > lo_ ? (hi_ - lo_ + kAttnChunk - 1) / kAttnChunk : 0), vrow(vrow_) {}
  TILERT_DEV void issue(int ch) const {  // empty groups past the last chunk
    const int j0 = lo + ch * kAttnChunk;
    attn_issue(p, kc, vc, ring + (ch % kAttnStages) * kAttnStage, j0, ch < chunks ? min(kAttnChunk, hi - j0) : 0, vrow);
  }
  TILERT_DEV void start() const {
#pragma unroll
    for (int st = 0; st < kAttnStages - 1; ++st) issue(st);
  }
  TILERT_DEV const float* next(int ch) const {
    cp_async_wait<kAttnStages - 2>();  // this thread's copies of chunk ch have landed
    compute_sync();                    // everyone's; chunk ch - 1 is done with its buffer
    issue(ch + kAttnStages - 1);
    return ring + (ch % kAttnStages) * kAttnStage;
  }
};

TILERT_DEV float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, fmaf(a.x, b.x, acc))));
}

// (1) The chunk's scores into ps[R][16] (-inf for keys outside the row's token's [tlo, thi),
// which covers the chunk's end): warp w takes rows 2w and 2w + 1 (then 2w + 2 kNCW, ...); lane =
// 8 * quarter + kp takes keys kp and kp + 8 over head-dim float4s quarter + 4i.  Row r is head
// r % G of the pass's token r / G.
TILERT_DEV void attn_scores(const AttentionParams& p, int R, const float* qs, const float* kb, float* ps, int j0,
                            const int* tlo, const int* thi) {
  const int kp = lane() & 7, qt = lane() >> 3, k4 = p.hd / 4;
  for (int w = cwarp(); 2 * w < R; w += kNCW) {
    const int h0 = 2 * w, h1 = min(2 * w + 1, R - 1);
    const float4* q0 = reinterpret_cast<const float4*>(qs + h0 * p.hd);
    const float4* q1 = reinterpret_cast<const float4*>(qs + h1 * p.hd);
    const float4* ka = reinterpret_cast<const float4*>(kb + kp * kAttnKRow);
    const float4* kz = reinterpret_cast<const float4*>(kb + (kp + 8) * kAttnKRow);
    float s00 = 0.f, s01 = 0.f, s10 = 0.f, s11 = 0.f;  // (row, key)
#pragma unroll 2
    for (int f = qt; f < k4; f += 4) {
      const float4 a = q0[f], b = q1[f], x = ka[f], y = kz[f];
      s00 = dot4(a, x, s00); s01 = dot4(a, y, s01); s10 = dot4(b, x, s10); s11 = dot4(b, y, s11);
    }
#pragma unroll
    for (int o = 8; o < 32; o <<= 1) {
      s00 += __shfl_xor_sync(kFull, s00, o); s01 += __shfl_xor_sync(kFull, s01, o);
      s10 += __shfl_xor_sync(kFull, s10, o); s11 += __shfl_xor_sync(kFull, s11, o);
    }
    // Quarter qt writes one of the four (row, key) scores.
    const int h = qt < 2 ? h0 : h1, j = kp + 8 * (qt & 1), tb = h / p.group, key = j0 + j;
    const float v = qt == 0 ? s00 : qt == 1 ? s01 : qt == 2 ? s10 : s11;
    if (qt < 2 || 2 * w + 1 < R)
      ps[h * kAttnChunk + j] = key >= tlo[tb] && key < thi[tb] ? __fmul_rn(v, p.scale) : -INFINITY;
  }
}

TILERT_DEV float half_warp_max(float v) {
#pragma unroll
  for (int o = 8; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
TILERT_DEV float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// One chunk's softmax step, half a warp a head (whole warps: the shuffles), a lane a key:
// score(h, j) is key j's scaled score for head h (-inf past the chunk's keys); writes the
// weights exp(s - m) into w[h * ld + j] and, per head, the rescale of the earlier sums
// (corr), the new running sum and maximum.  A row none of whose keys so far was visible (its
// token's range starts later, or is empty) keeps maximum -inf, sum 0 and weights 0.
template <class Score>
TILERT_DEV void attn_softmax(int G, float* w, int ld, float* run_m, float* run_l, float* corr, Score&& score) {
  for (int h2 = cwarp(); 2 * h2 < G; h2 += kNCW) {  // a head past G idle
    const int h = 2 * h2 + (lane() >> 4), j = lane() & 15;
    const bool real = h < G;
    const float s = real ? score(h, j) : 0.f;
    const float m_old = real ? run_m[h] : 0.f, m_new = fmaxf(m_old, half_warp_max(s));
    const bool none = m_new == -INFINITY;     // (exp(-inf - -inf) would be NaN)
    const float e = none ? 0.f : expf(s - m_new);  // exp(-inf) = 0 for keys the row does not see
    const float total = half_warp_sum(e);
    if (real) w[h * ld + j] = e;
    if (real && j == 0) {
      const float f = none ? 1.f : expf(m_old - m_new);  // 0 on the row's first visible chunk
      corr[h] = f;
      run_l[h] = run_l[h] * f + total;
      run_m[h] = m_new;
    }
  }
}

// Where a token's partials go: (query head h of the group, value dim d) of this split.
struct AttnOut {
  float* acc;
  float* mx;
  float* sm;
  TILERT_DEV void write(const AttentionParams& p, int h, int d, float v) const {
    acc[((p.h0 + h) * p.ms + p.split) * p.vd + d] = v;
  }
  TILERT_DEV void stats(const AttentionParams& p, int h, float m, float l) const {
    mx[(p.h0 + h) * p.ms + p.split] = m;
    sm[(p.h0 + h) * p.ms + p.split] = l;
  }
};

TILERT_DEV void attn_pass_simt(Ctx& c, const AttentionParams& p, int b0, int nt, int s_lo, int s_hi, float* smem);
TILERT_DEV void attn_token_mma(const AttentionParams& p, const float* q, const float* kc, const float* vc,
                               float* smem, int lo, int hi, const AttnOut& out);

// Token b's visible keys within the split [s_lo, s_hi): from its window's start (causal: up to
// its own position; a DFlash draft block, causal = 0, sees the whole block).
struct KeyRange {
  int lo, hi;
};
TILERT_DEV KeyRange token_keys(const AttentionParams& p, const int* pos, int b, int s_lo, int s_hi) {
  const int last = p.causal ? pos[b] : pos[kB - 1];
  return KeyRange{max(visible_lo(pos[b], p.window), s_lo), min(last + 1, s_hi)};
}

TILERT_DEV void k_attention(Ctx& c, const AttentionParams& p) {
  const int* pos = ref_ptr<int>(c, p.positions);
  float* smem = reinterpret_cast<float*>(c.smem + TILERT_SMEM_XS);
  // This split's share of the step's whole visible key range (tilert.kernels.split_range).
  const int all_lo = visible_lo(pos[0], p.window), all_hi = pos[kB - 1] + 1;
  const int span = (all_hi - all_lo + p.splits - 1) / p.splits;
  const int s_lo = all_lo + p.split * span, s_hi = min(all_hi, all_lo + (p.split + 1) * span);
  if (!TILERT_ATTN_MMA || p.hd % 8 || p.vd % 8) {
    // CUDA cores: the tokens in as few passes as the rows allow, evened out (8 tokens of 16
    // heads in 64 rows: two passes of 4)
    const int most = max(1, kAttnRows / p.group);  // tokens one pass holds
    const int passes = (kB + most - 1) / most, per = (kB + passes - 1) / passes;
    for (int b0 = 0; b0 < kB; b0 += per) {
      attn_pass_simt(c, p, b0, min(per, kB - b0), s_lo, s_hi, smem);
      compute_sync();  // the next pass overwrites the queries, buffers and running state
    }
    return;
  }
  const float* q = ref_ptr<float>(c, p.q);
  for (int b = 0; b < kB; ++b) {
    const AttnOut out{ref_ptr<float>(c, p.acc) + b * p.acc.ld, ref_ptr<float>(c, p.mx) + b * p.mx.ld,
                      ref_ptr<float>(c, p.sm) + b * p.sm.ld};
    const KeyRange r = token_keys(p, pos, b, s_lo, s_hi);
    if (r.hi <= r.lo) {  // empty split: every head of the group gets the neutral partial
      for (int i = ctid(); i < p.group * p.vd; i += kNCT) {
        const int h = i / p.vd, d = i % p.vd;
        out.write(p, h, d, 0.f);
        if (d == 0) out.stats(p, h, -INFINITY, 0.f);
      }
      continue;
    }
    attn_token_mma(p, q + b * p.q.ld, ref_ptr<float>(c, p.k_cache), ref_ptr<float>(c, p.v_cache), smem, r.lo, r.hi,
                   out);
    compute_sync();  // the next token overwrites the queries, buffers and running state
  }
}

// Tokens [b0, b0 + nt) on the CUDA cores: rows r = (token b0 + r / G, head r % G), every chunk of
// the keys any of them sees read once for all of them.  A row none of whose keys is in the split
// ends with the neutral partial (sum 0, maximum -inf).
TILERT_DEV void attn_pass_simt(Ctx& c, const AttentionParams& p, int b0, int nt, int s_lo, int s_hi, float* smem) {
  constexpr int CH = kAttnChunk, S = kAttnStages;
  const float* q = ref_ptr<float>(c, p.q);
  const float* kc = ref_ptr<float>(c, p.k_cache);
  const float* vc = ref_ptr<float>(c, p.v_cache);
  const int* pos = ref_ptr<int>(c, p.positions);
  const int G = p.group, R = nt * G, hd = p.hd, v4 = p.vd / 4;
  float* qs = smem;                                                // [R][hd] the rows' queries
  float* ring = qs + kAttnRows * TILERT_HD_MAX;                    // [S] chunk buffers
  float* ps = ring + S * kAttnStage;                               // [R][CH] scores, then weights
  float* run_m = ps + kAttnRows * CH;                              // [R] running maximum
  float* run_l = run_m + kAttnRows;                                // [R] running sum
  float* corr = run_l + kAttnRows;                                 // [R] this chunk's rescale
  int* tlo = reinterpret_cast<int*>(corr + kAttnRows);             // [kB] each token's visible keys
  int* thi = tlo + kB;                                             // (codegen sets 16 ints aside: kB <= 8)
  // The keys any token of the pass sees (every thread works them out: no barrier before the copies).
  int lo = s_hi, hi = s_lo;
  for (int t = 0; t < nt; ++t) {
    const KeyRange r = token_keys(p, pos, b0 + t, s_lo, s_hi);
    if (r.lo < r.hi) { lo = min(lo, r.lo); hi = max(hi, r.hi); }
    if (ctid() == t) { tlo[t] = r.lo; thi[t] = r.hi; }
  }
  const AttnChunks keys(p, kc, vc, ring, lo, hi, p.vd);
  keys.start();
  for (int i = ctid(); i < R * hd / 4; i += kNCT) {
    const int r = i / (hd / 4), f = i % (hd / 4);
    reinterpret_cast<float4*>(qs)[i] =
        *reinterpret_cast<const float4*>(q + (b0 + r / G) * p.q.ld + (p.h0 + r % G) * hd + 4 * f);
  }
  for (int h = ctid(); h < R; h += kNCT) { run_m[h] = -INFINITY; run_l[h] = 0.f; }
  float4 o[kAttnOwn][2];  // (row pair, value float4) items of this thread: rows 2 hp and 2 hp + 1
#pragma unroll
  for (int k = 0; k < kAttnOwn; ++k) o[k][0] = o[k][1] = make_float4(0.f, 0.f, 0.f, 0.f);
  // With 128 value dims (v4 = 32) the value step's thread ctid + k kNCT holds row pair
  // cwarp() + k kNCW, the very pair this warp scores and softmaxes: a row pair's three steps stay
  // in one warp, which then only meets itself between them (the chunk ring's barrier remains).
  const bool warp_local = v4 == 32;
  const auto step_sync = [&] {
    if (warp_local) __syncwarp();
    else compute_sync();
  };
  for (int ch = 0; ch < keys.chunks; ++ch) {
    const int j0 = lo + ch * CH;
    const float* kb = keys.next(ch);  // (its barrier also publishes the queries and the running state)
    const float* vb = kb + CH * kAttnKRow;
    attn_scores(p, R, qs, kb, ps, j0, tlo, thi);
    step_sync();
    // (2) softmax weights against the running maximum
    attn_softmax(R, ps, CH, run_m, run_l, corr, [&](int h, int j) { return ps[h * CH + j]; });
    step_sync();
    // (3) the weighted values: a float4 of value dims of two rows a thread
#pragma unroll
    for (int k = 0; k < kAttnOwn; ++k) {
      const int own = ctid() + k * kNCT, hp = own / v4, d4 = own % v4;
      if (2 * hp < R) {
        const int h0 = 2 * hp, h1 = min(2 * hp + 1, R - 1);
        float4 a = o[k][0], z = o[k][1];
        const float f0 = corr[h0], f1 = corr[h1];
        a.x *= f0; a.y *= f0; a.z *= f0; a.w *= f0;
        z.x *= f1; z.y *= f1; z.z *= f1; z.w *= f1;
        const float4* e0 = reinterpret_cast<const float4*>(ps + h0 * CH);
        const float4* e1 = reinterpret_cast<const float4*>(ps + h1 * CH);
        const float4* v = reinterpret_cast<const float4*>(vb) + d4;
#pragma unroll
        for (int j4 = 0; j4 < CH / 4; ++j4) {  // keys a row does not see: weight 0; rows past the chunk zero-filled
          const float4 w0 = e0[j4], w1 = e1[j4];
          const float ew0[4] = {w0.x, w0.y, w0.z, w0.w}, ew1[4] = {w1.x, w1.y, w1.z, w1.w};
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const float4 vj = v[(4 * j4 + jj) * v4];
            a.x = fmaf(ew0[jj], vj.x, a.x); a.y = fmaf(ew0[jj], vj.y, a.y);
            a.z = fmaf(ew0[jj], vj.z, a.z); a.w = fmaf(ew0[jj], vj.w, a.w);
            z.x = fmaf(ew1[jj], vj.x, z.x); z.y = fmaf(ew1[jj], vj.y, z.y);
            z.z = fmaf(ew1[jj], vj.z, z.z); z.w = fmaf(ew1[jj], vj.w, z.w);
          }
        }
        o[k][0] = a;
        o[k][1] = z;
      }
    }
  }
  cp_async_wait<0>();  // nothing of this pass's copies left in flight (the groups past the last chunk are empty)
  compute_sync();      // the running state of the last chunk (or, with no chunk, its initial values)
#pragma unroll
  for (int k = 0; k < kAttnOwn; ++k) {
    const int own = ctid() + k * kNCT, hp = own / v4, d4 = own % v4;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int h = 2 * hp + u;
      if (h < R) {
        const int b = b0 + h / G, hh = h % G;
        const AttnOut out{ref_ptr<float>(c, p.acc) + b * p.acc.ld, ref_ptr<float>(c, p.mx) + b * p.mx.ld,
                          ref_ptr<float>(c, p.sm) + b * p.sm.ld};
        *reinterpret_cast<float4*>(out.acc + ((p.h0 + hh) * p.ms + p.split) * p.vd + 4 * d4) = o[k][u];
        if (d4 == 0) out.stats(p, hh, run_m[h], run_l[h]);
      }
    }
  }
}

#if TILERT_ATTN_MMA
constexpr int kAttnQRow = TILERT_HD_MAX + 4;                  // query row stride (A fragments: banks 4 g + t)
constexpr int kAttnMT = (TILERT_ATTN_GROUP_MAX + 15) / 16;      // 16-row m-tiles of the group's heads
constexpr int kAttnSW = kNCW < 8 ? kNCW : 8;                    // warps that split a score's head dims
constexpr int kAttnPLd = kAttnChunk + 4;                        // partial-score / weight row stride (banks 20 g + t)
constexpr int kAttnPVT = (TILERT_VD_MAX / 8 + kNCW - 1) / kNCW; // value n-tiles (8 dims) a warp owns

TILERT_DEV uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
TILERT_DEV void mma_tf32(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// d += a b (m16n8k8 fragments of fp32 values) at about fp32 accuracy: each operand split into a
// tf32 head and a tf32 tail, three products (the tails' product is below fp32's rounding), small first.
TILERT_DEV void mma_3xtf32(float* d, const float* a, const float* b) {
  uint32_t ah[4], al[4], bh[2], bl[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) { ah[i] = to_tf32(a[i]); al[i] = to_tf32(a[i] - __uint_as_float(ah[i])); }
#pragma unroll
  for (int i = 0; i < 2; ++i) { bh[i] = to_tf32(b[i]); bl[i] = to_tf32(b[i] - __uint_as_float(bh[i])); }
  mma_tf32(d, al, bh);
  mma_tf32(d, ah, bl);
  mma_tf32(d, ah, bh);
}

// One token's keys [lo, hi) on the tensor cores.  Rows are the group's query heads (16 an
// m-tile), a chunk's 16 keys two n-tiles.  Per chunk: (1) warps w < kAttnSW each take every
// kAttnSW-th 8-dim k-step of the scores into their own partial [rows][16]; (2) half a warp a
// head sums the partials and takes the softmax weights against the running maximum (as the
// CUDA-core path); (3) warp w owns value n-tiles w, w + kNCW, ..: rescales its accumulators and
// adds weights x values (k = the chunk's keys).  Fragment names: g = lane / 4, t = lane % 4.
TILERT_DEV void attn_token_mma(const AttentionParams& p, const float* q, const float* kc, const float* vc,
                               float* smem, int lo, int hi, const AttnOut& out) {
  constexpr int CH = kAttnChunk, S = kAttnStages;
  const int G = p.group, hd = p.hd, w = cwarp(), g = lane() >> 2, t = lane() & 3;
  const int ksteps = hd / 8, nsw = min(kAttnSW, ksteps), vtiles = p.vd / 8;
  float* qs = smem;                                                  // [G][kAttnQRow] this token's queries
  float* ring = qs + TILERT_ATTN_GROUP_MAX * kAttnQRow;              // [S] chunk buffers
  float* part = ring + S * kAttnStage;                               // [kAttnSW][16 kAttnMT][kAttnPLd] partial scores
  float* ps = part + kAttnSW * 16 * kAttnMT * kAttnPLd;              // [G][kAttnPLd] weights
  float* run_m = ps + TILERT_ATTN_GROUP_MAX * kAttnPLd;              // [G] running maximum
  float* run_l = run_m + TILERT_ATTN_GROUP_MAX;                      // [G] running sum
  float* corr = run_l + TILERT_ATTN_GROUP_MAX;                       // [G] this chunk's rescale
  const AttnChunks keys(p, kc, vc, ring, lo, hi, kAttnVRow);
  keys.start();
  for (int i = ctid(); i < G * hd / 4; i += kNCT) {
    const int h = i / (hd / 4), f = i % (hd / 4);
    reinterpret_cast<float4*>(qs + h * kAttnQRow)[f] = *reinterpret_cast<const float4*>(q + (p.h0 + h) * hd + 4 * f);
  }
  for (int h = ctid(); h < G; h += kNCT) { run_m[h] = -INFINITY; run_l[h] = 0.f; }
  float o[kAttnMT][kAttnPVT][4];
#pragma unroll
  for (int m = 0; m < kAttnMT; ++m)
#pragma unroll
    for (int i = 0; i < kAttnPVT; ++i) o[m][i][0] = o[m][i][1] = o[m][i][2] = o[m][i][3] = 0.f;
  for (int ch = 0; ch < keys.chunks; ++ch) {
    const int j0 = lo + ch * CH, n = min(CH, hi - j0);
    const float* kb = keys.next(ch);
    const float* vb = kb + CH * kAttnKRow;
    // (1) partial scores: rows past G read as zero (their scores are never used)
    if (w < nsw) {
#pragma unroll
      for (int m = 0; m < kAttnMT; ++m) {
        const int r0 = 16 * m + g, r1 = r0 + 8;
        if (16 * m < G) {
          float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
          for (int ks = w; ks < ksteps; ks += nsw) {
            const int d = 8 * ks + t;
            const float a[4] = {r0 < G ? qs[r0 * kAttnQRow + d] : 0.f, r1 < G ? qs[r1 * kAttnQRow + d] : 0.f,
                                r0 < G ? qs[r0 * kAttnQRow + d + 4] : 0.f, r1 < G ? qs[r1 * kAttnQRow + d + 4] : 0.f};
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
              const float bk[2] = {kb[(8 * nt + g) * kAttnKRow + d], kb[(8 * nt + g) * kAttnKRow + d + 4]};
              mma_3xtf32(sc[nt], a, bk);
            }
          }
          float* pw = part + (w * 16 * kAttnMT + 16 * m) * kAttnPLd;
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            *reinterpret_cast<float2*>(pw + g * kAttnPLd + 8 * nt + 2 * t) = make_float2(sc[nt][0], sc[nt][1]);
            *reinterpret_cast<float2*>(pw + (g + 8) * kAttnPLd + 8 * nt + 2 * t) = make_float2(sc[nt][2], sc[nt][3]);
          }
        }
      }
    }
    compute_sync();
    // (2) softmax weights against the running maximum, from the summed partial scores
    attn_softmax(G, ps, kAttnPLd, run_m, run_l, corr, [&](int h, int j) {
      float v = 0.f;
      for (int k = 0; k < nsw; ++k) v += part[(k * 16 * kAttnMT + h) * kAttnPLd + j];
      return j < n ? __fmul_rn(v, p.scale) : -INFINITY;
    });
    compute_sync();
    // (3) weights x values into this warp's value n-tiles
#pragma unroll
    for (int i = 0; i < kAttnPVT; ++i) {
      const int nt = w + i * kNCW;
      if (nt < vtiles) {
#pragma unroll
        for (int m = 0; m < kAttnMT; ++m) {
          const int r0 = 16 * m + g, r1 = r0 + 8;
          if (16 * m < G) {
            const float f0 = r0 < G ? corr[r0] : 0.f, f1 = r1 < G ? corr[r1] : 0.f;
            o[m][i][0] *= f0; o[m][i][1] *= f0; o[m][i][2] *= f1; o[m][i][3] *= f1;
#pragma unroll
            for (int ks = 0; ks < CH / 8; ++ks) {
              const int j = 8 * ks + t;
              const float a[4] = {r0 < G ? ps[r0 * kAttnPLd + j] : 0.f, r1 < G ? ps[r1 * kAttnPLd + j] : 0.f,
                                  r0 < G ? ps[r0 * kAttnPLd + j + 4] : 0.f, r1 < G ? ps[r1 * kAttnPLd + j + 4] : 0.f};
              const float bv[2] = {vb[j * kAttnVRow + 8 * nt + g], vb[(j + 4) * kAttnVRow + 8 * nt + g]};
              mma_3xtf32(o[m][i], a, bv);
            }
          }
        }
      }
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int i = 0; i < kAttnPVT; ++i) {
    const int nt = w + i * kNCW;
    if (nt < vtiles) {
#pragma unroll
      for (int m = 0; m < kAttnMT; ++m) {
        const int r0 = 16 * m + g, r1 = r0 + 8, d = 8 * nt + 2 * t;
        if (r0 < G) {
          out.write(p, r0, d, o[m][i][0]);
          out.write(p, r0, d + 1, o[m][i][1]);
        }
        if (r1 < G) {
          out.write(p, r1, d, o[m][i][2]);
          out.write(p, r1, d + 1, o[m][i][3]);
        }
      }
    }
  }
  for (int h = ctid(); h < G; h += kNCT) out.stats(p, h, run_m[h], run_l[h]);
}
#else
TILERT_DEV void attn_token_mma(const AttentionParams&, const float*, const float*, const float*, float*, int, int,
                               const AttnOut&) {}
#endif

// ---- attn_combine: merge the splits; the sink joins the denominator only -----------------------------
TILERT_DEV void k_attn_combine(Ctx& c, const AttnCombineParams& p) {
  constexpr int VF4 = (TILERT_VD_MAX + 127) / 128;
  const float* mx = ref_ptr<float>(c, p.mx);
  const float* sm = ref_ptr<float>(c, p.sm);
  const float* acc = ref_ptr<float>(c, p.acc);
  float* out = ref_ptr<float>(c, p.out);
  const int heads = p.h1 - p.h0;
  for (int rep = 0; rep < TILERT_DIAG_REPEAT; ++rep)
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
  for (int rep = 0; rep < TILERT_DIAG_REPEAT; ++rep)
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
      // Across the warp in two redux instructions (not five rounds of three shuffles): the
      // largest choice as an order-preserving key, then the lowest expert holding it.
      const unsigned bits = __float_as_uint(best), key = bits >> 31 ? ~bits : bits | 0x80000000u;
      const unsigned top = __reduce_max_sync(kFull, key);
      bi = (int)__reduce_min_sync(kFull, key == top ? (unsigned)bi : 0x7fffffffu);
      bs = __shfl_sync(kFull, bs, bi & 31);  // that expert's lane holds it as its own best
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
TILERT_DEV const int* idx_of(const Ctx& c, const ExpertDownParams& p) { return ref_ptr<int>(c, p.idx); }

template <class V>
TILERT_DEV void tiles_of(const Ctx& c, const ExpertDownParams& p, V&& v) {
  for (int t = 0; t < kB; ++t)
    for (int k = 0; k < p.k; ++k) v(Tile{p.down, idx_of(c, p), t * p.idx.ld + k, p.r0, p.r1}, t * p.k + k);
}

template <int GEMV>
TILERT_DEV void k_expert_down(Ctx& c, const ExpertDownParams& p) {
  const float* act = ref_ptr<float>(c, p.act);
  const float* wts = ref_ptr<float>(c, p.weights);
  float* x = ref_ptr<float>(c, p.out);
  float* total = reinterpret_cast<float*>(c.smem + TILERT_SMEM_SCRATCH);  // [rows] of one token
  const int n = p.r1 - p.r0;
  const auto slot_x = [&](int i) { return act + (i / p.k) * p.act.ld + (i % p.k) * p.inter; };  // i = t k + slot
  const WeightDesc& w = weight(c, p.down);
  const bool staged = stage_x_slots<GEMV>(c, w, kB * p.k, slot_x);
  if (slots_in_one_piece(w, p.r0, p.r1, staged)) {  // a token's k slots summed in registers, one reduction
    for (int t = 0; t < kB; ++t) {
      gemv_slots<GEMV>(c, w, p.k, t * p.k, p.r0, p.r1,
                       [&](int k) { return Tile{p.down, idx_of(c, p), t * p.idx.ld + k, p.r0, p.r1}; },
                       [&](int k) { return wts[t * p.weights.ld + k]; },
                       [&](int r, const float* v) { x[t * p.out.ld + p.r0 + r] += v[0]; });
    }
    return;
  }
  tiles_of(c, p, [&](const Tile& tile, int i) {
    const int t = i / p.k, k = i % p.k;
    const float wk = wts[t * p.weights.ld + k];
    gemv_tile<1, GEMV>(c, tile, [&](int) { return slot_x(i); }, [&](int r, const float* v) {
      const float y = wk * v[0];
      total[r] = k == 0 ? y : total[r] + y;  // the same thread owns row r in every slot's tile
    }, staged, i * xs_bytes(p.inter));
    if (k == p.k - 1) {  // token t done: add its total into the residual
      compute_sync();
      for (int r = ctid(); r < n; r += kNCT) x[t * p.out.ld + p.r0 + r] += total[r];
      compute_sync();
    }
  });
}

// ---- experts of a multi-token step, each distinct selected expert read once (recipe `expert_union`) ----
// expert_union: distinct[u] = the step's distinct experts in first-seen order (token-major), -1
// past the last; route[t, k] = the slot u of token t's k-th expert.  A thread an entry (B K <=
// 64), over a shared-memory copy of the choices: one thread walking them through global memory
// took 94 us a MoE layer on the flash geometry (H200), each load waiting on the one before.
TILERT_DEV void k_expert_union(Ctx& c, const ExpertUnionParams& p) {
  const int* idx = ref_ptr<int>(c, p.idx);
  int* distinct = ref_ptr<int>(c, p.distinct);
  int* route = ref_ptr<int>(c, p.route);
  int* chosen = reinterpret_cast<int*>(c.smem + TILERT_SMEM_RED);  // [B K] experts, then [B K] first flags
  int* first = chosen + kB * TILERT_K_MAX;
  const int n = kB * p.k, i = ctid();
  const int e = i < n ? idx[(i / p.k) * p.idx.ld + i % p.k] : -1;
  if (i < n) chosen[i] = e;
  compute_sync();
  int f = i;  // the entry where this expert first appears
  if (i < n) {
    for (int j = 0; j < i; ++j)
      if (chosen[j] == e) { f = j; break; }
    first[i] = f == i;
  }
  compute_sync();
  if (i < n) {
    int u = 0;
    for (int j = 0; j < f; ++j) u += first[j];
    route[(i / p.k) * p.route.ld + i % p.k] = u;
    if (f == i) distinct[u] = e;
  }
  int count = 0;
  for (int j = 0; j < n; ++j) count += first[j];
  for (int u = count + i; u < p.slots; u += kNCT) distinct[u] = -1;
  compute_sync();  // the red area is free again
}

// The routed tokens of a mask, in order, into list[]; their count.
TILERT_DEV int routed_list(uint32_t mask, int* list) {
  int n = 0;
  for (int t = 0; t < kB; ++t)
    if ((mask >> t) & 1) list[n++] = t;
  return n;
}

// A GEMV over the `nr` tokens of list[] only (list[j] for j < nr; rows past nr repeat the last
// routed token and are not used): instantiated for 1, 2 and kB tokens, as few as hold them.  A
// selected expert of a verify step serves ~1 of its 8 tokens on the flash geometry (64
// choices over ~60 distinct experts), so staging and multiplying all 8 wasted most of the work.
template <int GEMV, class XRow, class Epi>
TILERT_DEV void gemv_routed(Ctx& c, const Tile& tile, int nr, XRow xrow, Epi epi, bool x_staged = false) {
  if constexpr (kB > 1) if (nr <= 1) return gemv_tile<1, GEMV>(c, tile, xrow, epi, x_staged);
  if constexpr (kB > 2) if (nr <= 2) return gemv_tile<2, GEMV>(c, tile, xrow, epi, x_staged);
  gemv_tile<kB, GEMV>(c, tile, xrow, epi, x_staged);
}

// Bit t set: token t chose the expert of union slot u.
TILERT_DEV uint32_t tokens_routed_to(const int* route, int ld, int k, int u) {
  uint32_t mask = 0;
  for (int t = 0; t < kB; ++t)
    for (int j = 0; j < k; ++j)
      if (route[t * ld + j] == u) mask |= 1u << t;
  return mask;
}

// The tiles of an empty slot (expert -1) are skipped by the loader and the compute warps alike.
template <class V>
TILERT_DEV void tiles_of(const Ctx& c, const ExpertGateUpUnionParams& p, V&& v) {
  const int* distinct = ref_ptr<int>(c, p.distinct);
  v(Tile{p.gate, distinct, p.slot, p.r0, p.r1}, 0);
  v(Tile{p.up, distinct, p.slot, p.r0, p.r1}, 1);
}

// act[slot, t, r] = silu(gate . h_t) * (up . h_t) for the tokens routed to the slot's expert,
// 0 for the others: one read of the expert's rows for every token of the step.
template <int GEMV>
TILERT_DEV void k_expert_gate_up_union(Ctx& c, const ExpertGateUpUnionParams& p) {
  const float* x = ref_ptr<float>(c, p.in);
  const int* route = ref_ptr<int>(c, p.route);
  float* out = ref_ptr<float>(c, p.out) + (size_t)p.slot * kB * p.out.ld;  // rows slot * B + t
  float* g = reinterpret_cast<float*>(c.smem + TILERT_SMEM_SCRATCH);      // [B][rows] gate results
  const int n = p.r1 - p.r0;
  const bool empty = ref_ptr<int>(c, p.distinct)[p.slot] < 0;  // the loader skips its tiles too
  const uint32_t routed = empty ? 0u : tokens_routed_to(route, p.route.ld, p.k, p.slot);
  for (int i = ctid(); i < kB * n; i += kNCT)  // rows of the tokens not routed here: defined zeros
    if (!((routed >> (i / n)) & 1)) out[(i / n) * p.out.ld + p.r0 + i % n] = 0.f;
  if (empty) return;
  int list[kB];
  const int nr = routed_list(routed, list);
  const auto xrow = [&](int j) { return x + list[min(j, nr - 1)] * p.in.ld; };
  tiles_of(c, p, [&](const Tile& t, int which) {
    gemv_routed<GEMV>(c, t, nr, xrow, [&](int i, const float* v) {
      for (int j = 0; j < nr; ++j) {
        if (which == 0) g[j * n + i] = v[j];
        else out[list[j] * p.out.ld + p.r0 + i] = silu(g[j * n + i]) * v[j];
      }
    }, which == 1);  // up reads the x gate staged
    compute_sync();
  });
}

template <class V>
TILERT_DEV void tiles_of(const Ctx& c, const ExpertDownUnionParams& p, V&& v) {
  const int* distinct = ref_ptr<int>(c, p.distinct);
  for (int u = 0; u < p.slots; ++u) v(Tile{p.down, distinct, u, p.r0, p.r1}, u);
}

// x[t, r] += sum over the union's slots u, in order, of weight[t, k(u)] (W_down[distinct[u]] r .
// act[u, t]); a slot token t did not choose adds 0 (its act row is 0 and so is its weight).
template <int GEMV>
TILERT_DEV void k_expert_down_union(Ctx& c, const ExpertDownUnionParams& p) {
  const float* act = ref_ptr<float>(c, p.act);
  const int* route = ref_ptr<int>(c, p.route);
  const float* wts = ref_ptr<float>(c, p.weights);
  float* x = ref_ptr<float>(c, p.out);
  const int n = p.r1 - p.r0;
  float* total = reinterpret_cast<float*>(c.smem + TILERT_SMEM_SCRATCH);  // [B][rows]
  float* slot_w = total + kB * n;                                          // [slots][B] weights, 0 unchosen
  uint32_t* slot_mask = reinterpret_cast<uint32_t*>(slot_w + p.slots * kB);  // [slots] routed tokens
  int* rows = reinterpret_cast<int*>(slot_mask + p.slots);                   // [2][64] gemv_union's table
  int* most = rows + 128;                                                    // routed tokens of the fullest slot
  if (ctid() == 0) *most = 0;
  for (int i = ctid(); i < kB * n; i += kNCT) total[i] = 0.f;
  for (int i = ctid(); i < p.slots; i += kNCT) slot_mask[i] = 0u;
  compute_sync();
  for (int i = ctid(); i < p.slots * kB; i += kNCT) {
    const int u = i / kB, t = i % kB;
    float w = 0.f;
    bool chosen = false;
    for (int k = 0; k < p.k; ++k)
      if (route[t * p.route.ld + k] == u) { w = wts[t * p.weights.ld + k]; chosen = true; }
    slot_w[i] = w;
    if (chosen) atomicOr(slot_mask + u, 1u << t);
  }
  compute_sync();
  for (int u = ctid(); u < p.slots; u += kNCT) atomicMax(most, __popc(slot_mask[u]));
  compute_sync();
  const WeightDesc& dw = weight(c, p.down);
  if (union_fits(dw, p.r0, p.r1)) {  // every slot in one pass, one reduction (gemv.cuh)
    gemv_union<GEMV>(c, dw, p.slots, p.r0, p.r1, rows, *most,
                     [&](int u) { return Tile{p.down, ref_ptr<int>(c, p.distinct), u, p.r0, p.r1}; },
                     [&](int u) { return slot_mask[u]; },
                     [&](int u, int t) { return act + (size_t)(u * kB + t) * p.act.ld; },
                     [&](int u, int t) { return slot_w[u * kB + t]; },
                     [&](int r, int t, float v) { x[t * p.out.ld + p.r0 + r] += v; });
    return;
  }
  tiles_of(c, p, [&](const Tile& tile, int u) {
    if (tile_expert(tile) < 0) return;  // empty slot: the loader skipped it too
    int list[kB];
    const int nr = routed_list(tokens_routed_to(route, p.route.ld, p.k, u), list);
    // Which thread owns row r depends on the GEMV's token count (gemv_tile_mma's batches of
    // red_rows<NB>() rows), but every GEMV ends at a barrier, so total's updates of one slot
    // are done before the next slot's begin.
    gemv_routed<GEMV>(c, tile, nr, [&](int j) { return act + (size_t)(u * kB + list[min(j, nr - 1)]) * p.act.ld; },
                      [&](int r, const float* v) {
      for (int j = 0; j < nr; ++j) total[list[j] * n + r] += slot_w[u * kB + list[j]] * v[j];
    });
  });
  compute_sync();
  for (int i = ctid(); i < kB * n; i += kNCT) x[(i / n) * p.out.ld + p.r0 + i % n] += total[i];
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

// ---- draft_embed: a DFlash draft block's input, columns [c0, c1) ----------------------------------------
// Row 0 the last committed token's embedding (the target's table), rows 1..B-1 the mask embedding.
TILERT_DEV void k_draft_embed(Ctx& c, const DraftEmbedParams& p) {
  const int tok = *ref_ptr<int>(c, p.tokens);
  float* out = ref_ptr<float>(c, p.out);
  const WeightDesc w = weight(c, p.table), mask = weight(c, p.mask);
  const int n = p.c1 - p.c0;
  for (int i = ctid(); i < kB * n; i += kNCT) {
    const int b = i / n, col = p.c0 + i % n;
    out[b * p.out.ld + col] = b == 0 ? weight_elem(w, tok, col) : weight_elem(mask, 0, col);
  }
}

}  // namespace tilert
