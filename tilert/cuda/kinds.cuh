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
TILERT_DEV void k_rmsnorm(Ctx& c, const RmsnormParams& p) {
  const float* in = ref_ptr<float>(c, p.in);
  float* out = ref_ptr<float>(c, p.out);
  const WeightDesc w = weight(c, p.weight);
  float* red = reinterpret_cast<float*>(c.smem + TILERT_SMEM_RED);  // [NCW][rows]
  const int rows = p.r1 - p.r0;
  for (int r = 0; r < rows; ++r) {
    const float* x = in + (p.r0 + r) * p.in.ld;
    float ss = 0.f;
#pragma unroll 4
    for (int col = ctid(); col < p.cols; col += kNCT) ss += x[col] * x[col];
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
#pragma unroll 4
    for (int col = p.c0 + ctid(); col < p.c1; col += kNCT)
      out[row * p.out.ld + col] = __fmul_rn(x[col] * rs, weight_elem(w, 0, col));
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

// A task owns one KV head's split of the keys for the query heads of its group.  The keys are
// read once per pass of kAttnHeads query heads (not once per head): warp w takes the chunks of
// 32 keys lo + 32 w, lo + 32 (w + NCW), ... with one key per lane for the scores and one value
// row per step for the weighted sum (lanes over value dims), keeping an online softmax per head.
// Then the warps' (max, sum, values) merge through shared memory in warp order (deterministic).
// The pass width comes from tilert/codegen.py (ATTN_HEADS_PER_PASS), which sizes the scratch.
constexpr int kAttnHeads = TILERT_ATTN_HEADS;
static_assert(kAttnHeads == 8, "the softmax weights are read as two float4 per key");

TILERT_DEV void k_attention(Ctx& c, const AttentionParams& p) {
  constexpr int HP = kAttnHeads;
  constexpr int VF4 = (TILERT_VD_MAX + 127) / 128;  // float4s of a value row per lane
  const float* q = ref_ptr<float>(c, p.q);
  const float* kc = ref_ptr<float>(c, p.k_cache);
  const float* vc = ref_ptr<float>(c, p.v_cache);
  const int* pos = ref_ptr<int>(c, p.positions);
  float* mx = ref_ptr<float>(c, p.mx);
  float* sm = ref_ptr<float>(c, p.sm);
  float* acc = ref_ptr<float>(c, p.acc);
  float* qs = reinterpret_cast<float*>(c.smem + TILERT_SMEM_SCRATCH);  // [HP][hd]: the pass's queries
  float* scratch = qs + HP * TILERT_HD_MAX;
  float* ebuf = scratch + cwarp() * 32 * HP;  // [32 keys][HP]: this warp's softmax weights
  // This split's share of the step's whole visible key range (tilert.kernels.split_range).
  const int all_lo = visible_lo(pos[0], p.window), all_hi = pos[kB - 1] + 1;
  const int chunk = (all_hi - all_lo + p.splits - 1) / p.splits;
  const int s_lo = all_lo + p.split * chunk, s_hi = min(all_hi, all_lo + (p.split + 1) * chunk);
  const int hd4 = p.hd / 4;
  // Pull this split's keys and values into L2 at once: the warps' loops below then wait on L2,
  // not on HBM, for each of their dependent loads.
  {
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
      for (int i = ctid(); i < p.group * p.vd; i += kNCT) {
        const int h = p.h0 + i / p.vd, d = i % p.vd;
        acc[b * p.acc.ld + (h * p.ms + p.split) * p.vd + d] = 0.f;
        if (d == 0) { mx[b * p.mx.ld + h * p.ms + p.split] = -INFINITY; sm[b * p.sm.ld + h * p.ms + p.split] = 0.f; }
      }
      continue;
    }
    const int active = min(kNCW, (hi - lo + 31) / 32);  // warps that get keys
    for (int hp = 0; hp < p.group; hp += HP) {
      const int nh = min(HP, p.group - hp), hb = p.h0 + hp;
      for (int i = ctid(); i < nh * p.hd; i += kNCT) qs[i] = q[b * p.q.ld + hb * p.hd + i];
      compute_sync();
      const float4* qb = reinterpret_cast<const float4*>(qs);
      float m[HP], l[HP];
      float4 av[HP][VF4];
#pragma unroll
      for (int h = 0; h < HP; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < VF4; ++i) av[h][i] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
      for (int j0 = lo + 32 * cwarp(); j0 < hi; j0 += 32 * kNCW) {
        const int j = j0 + lane();
        float s[HP];
#pragma unroll
        for (int h = 0; h < HP; ++h) s[h] = 0.f;
        if (j < hi) {
          const float4* kr = reinterpret_cast<const float4*>(kc + cache_slot(j, p.window, p.slots) * p.k_cache.ld);
#pragma unroll 8
          for (int d = 0; d < hd4; ++d) {
            const float4 k4 = kr[d];
#pragma unroll
            for (int h = 0; h < HP; ++h) {
              if (h < nh) {
                const float4 a = qb[h * hd4 + d];
                s[h] += a.x * k4.x; s[h] += a.y * k4.y; s[h] += a.z * k4.z; s[h] += a.w * k4.w;
              }
            }
          }
        }
#pragma unroll
        for (int h = 0; h < HP; ++h) {
          if (h >= nh) continue;
          const float sv = j < hi ? __fmul_rn(s[h], p.scale) : -INFINITY;
          const float nm = fmaxf(m[h], warp_max(sv));  // finite: the chunk has a visible key
          const float corr = expf(m[h] - nm);  // 0 on this warp's first chunk (m = -inf)
          const float e = j < hi ? expf(sv - nm) : 0.f;
          l[h] = l[h] * corr + warp_sum(e);
#pragma unroll
          for (int i = 0; i < VF4; ++i) {
            av[h][i].x *= corr; av[h][i].y *= corr; av[h][i].z *= corr; av[h][i].w *= corr;
          }
          m[h] = nm;
          ebuf[lane() * HP + h] = e;
        }
        __syncwarp();
        const int n = min(32, hi - j0);
#pragma unroll 8
        for (int jj = 0; jj < n; ++jj) {
          const float* vr = vc + cache_slot(j0 + jj, p.window, p.slots) * p.v_cache.ld;
          float4 v4[VF4];
#pragma unroll
          for (int i = 0; i < VF4; ++i) {
            const int d = 4 * lane() + 128 * i;
            v4[i] = d < p.vd ? *reinterpret_cast<const float4*>(vr + d) : make_float4(0.f, 0.f, 0.f, 0.f);
          }
          const float4 e0 = *reinterpret_cast<const float4*>(ebuf + jj * HP);
          const float4 e1 = *reinterpret_cast<const float4*>(ebuf + jj * HP + 4);
          const float ev[HP] = {e0.x, e0.y, e0.z, e0.w, e1.x, e1.y, e1.z, e1.w};
#pragma unroll
          for (int h = 0; h < HP; ++h) {
#pragma unroll
            for (int i = 0; i < VF4; ++i) {
              av[h][i].x += ev[h] * v4[i].x; av[h][i].y += ev[h] * v4[i].y;
              av[h][i].z += ev[h] * v4[i].z; av[h][i].w += ev[h] * v4[i].w;
            }
          }
        }
        __syncwarp();  // before the next chunk overwrites ebuf
      }
      // Merge the warps (the merge area aliases the ebufs: wait until every warp is done).
      float* mw = scratch;                 // [NCW][HP] each warp's maxima
      float* lsum = scratch + kNCW * HP;   // [HP]
      float* asum = lsum + HP;             // [HP][VD_MAX]
      compute_sync();
      if (lane() == 0) {
#pragma unroll
        for (int h = 0; h < HP; ++h) mw[cwarp() * HP + h] = m[h];
      }
      compute_sync();
      float top[HP];
#pragma unroll
      for (int h = 0; h < HP; ++h) {
        top[h] = -INFINITY;
        for (int w = 0; w < active; ++w) top[h] = fmaxf(top[h], mw[w * HP + h]);
      }
      for (int w = 0; w < active; ++w) {
        if (cwarp() == w) {
#pragma unroll
          for (int h = 0; h < HP; ++h) {
            if (h >= nh) continue;
            const float sc = expf(m[h] - top[h]);  // this warp has keys: m[h] is finite
            if (lane() == 0) lsum[h] = w == 0 ? l[h] * sc : lsum[h] + l[h] * sc;
#pragma unroll
            for (int i = 0; i < VF4; ++i) {
              const int d = 4 * lane() + 128 * i;
              if (d >= p.vd) continue;
              float4* o = reinterpret_cast<float4*>(asum + h * TILERT_VD_MAX + d);
              const float4 a = av[h][i];
              if (w == 0) {
                *o = make_float4(a.x * sc, a.y * sc, a.z * sc, a.w * sc);
              } else {
                float4 t = *o;
                t.x += a.x * sc; t.y += a.y * sc; t.z += a.z * sc; t.w += a.w * sc;
                *o = t;
              }
            }
          }
        }
        compute_sync();
      }
      for (int i = ctid(); i < nh * p.vd; i += kNCT) {
        const int h = i / p.vd, d = i % p.vd;
        acc[b * p.acc.ld + ((hb + h) * p.ms + p.split) * p.vd + d] = asum[h * TILERT_VD_MAX + d];
        if (d == 0) {
          float t = -INFINITY;  // (recomputed: indexing top[] with h would put it in local memory)
          for (int w = 0; w < active; ++w) t = fmaxf(t, mw[w * HP + h]);
          mx[b * p.mx.ld + (hb + h) * p.ms + p.split] = t;
          sm[b * p.sm.ld + (hb + h) * p.ms + p.split] = lsum[h];
        }
      }
      compute_sync();  // the next pass writes the ebufs again
    }
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
    });
    compute_sync();  // gate and up rows may land on different threads
  });
}

// ---- topk: sigmoid scores, biased choice, top-k (ties: lowest expert first), normalise, scale ---------
TILERT_DEV void k_topk(Ctx& c, const TopkParams& p) {
  constexpr int EPL = (TILERT_E_MAX + 31) / 32;
  const float* logits = ref_ptr<float>(c, p.logits);
  int* idx = ref_ptr<int>(c, p.idx);
  float* wts = ref_ptr<float>(c, p.weights);
  const WeightDesc bias = weight(c, p.bias);
  for (int b = cwarp(); b < kB; b += kNCW) {
    float score[EPL], choice[EPL];
#pragma unroll
    for (int j = 0; j < EPL; ++j) {
      const int e = lane() + 32 * j;
      score[j] = 0.f;
      choice[j] = -INFINITY;
      if (e < p.experts) {
        score[j] = 1.0f / (1.0f + expf(-logits[b * p.logits.ld + e]));
        choice[j] = score[j] + weight_elem(bias, 0, e);
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
    });
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
