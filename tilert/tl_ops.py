"""Standalone TileLang kernels, one per IR op kind, for the op-by-op baseline (`--backend ops`).

Each builder returns a TLKernel (a TileLang prim_func and its launch shape) for one op of a
batch-1 decode step, every shape fixed at build time; tilert/ops_backend.py lowers them to CUDA, builds cubins and runs a step as a
CUDA graph of them.  They compute what tilert/kernels.py says (the VM's semantics), on the
weights as stored (bf16, FP8 with 128 x 128 block scales, MXFP4 with E8M0 scales per 32, fp32).

The GEMV-shaped kernels give each warp one weight row: lane l reads 16-byte chunks l, l + 32, ...
of the row (all the row's loads are issued before the first multiply, so each lane keeps
K / 512 B-chunks of bytes in flight), multiplies them with x (16-byte loads) in fp32 on the CUDA
cores and the warp sums its lanes: the plain, bandwidth-first decode GEMV.  Measured on an H100
(BENCHMARKS.md, stop 19) bf16 reaches 2.1-2.4 TB/s, but MXFP4 only 0.44-0.70: its decode costs
~5 instructions a weight, so those GEMVs are issue-bound; a tensor-core MXFP4 GEMV is what would
make this baseline a fair "best op-by-op" (the megakernel runs its MXFP4 on the tensor cores).
"""

# No `from __future__ import annotations`: TileLang evaluates the kernels' annotations (tensor shapes
# taken from the builder's locals) at definition time.

from dataclasses import dataclass
from typing import Any

import tilelang.language as T


@dataclass(frozen=True)
class TLKernel:
    """A TileLang kernel and the launch shape its T.Kernel declares (grid and block, x y z)."""
    func: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]

WARP = 32
ROWS_PER_CTA = 8  # warps of a GEMV CTA, one row each
CHUNK = 16  # bytes a lane loads at once
_VALUES = {"bf16": 8, "fp8": 16, "mxfp4": 32, "fp32": 4}  # values in one 16-byte chunk
# MXFP4 codes are read as 32-bit words of 8 codes (the bytes' memory is the same).
_STORAGE = {"bf16": "bfloat16", "fp8": "float8_e4m3", "mxfp4": "uint32", "fp32": "float32"}
_FP4_UNSCALE = 16384.0  # the E2M1 decode below yields value * 2^-14 (an fp16 subnormal shift)


def _fp4_pair(word, j: int):
    """Codes j and j + 4 of a 32-bit word of 8 E2M1 codes (code k in bits 4k..4k+3) as an fp16
    pair in one word (code j in the low half), each value * 2^-14: a code's sign goes to bit 15
    of its half, its exponent and mantissa to bits 11..9, so e = 0 lands on the fp16 subnormals
    (0, 0.5) and e > 0 on 2^(e - 1) (1 + m / 2).  Two shifts and two masks for two values."""
    def shifted(by):
        return T.shift_left(word, T.uint32(by)) if by >= 0 else T.shift_right(word, T.uint32(-by))
    return T.bitwise_or(T.bitwise_and(shifted(9 - 4 * j), T.uint32(0x0E000E00)),
                        T.bitwise_and(shifted(12 - 4 * j), T.uint32(0x80008000)))


def _f16_half(pair, hi: bool):
    """One fp16 half of a 32-bit word, as float32."""
    bits = T.shift_right(pair, T.uint32(16)) if hi else T.bitwise_and(pair, T.uint32(0xFFFF))
    return T.cast(T.reinterpret(T.cast(bits, "uint16"), "float16"), "float32")


def _e8m0(byte):
    """An E8M0 scale byte as 2^(e - 127) (e = 0 gives 0 here, 2^-127 in the VM; 255 gives inf, NaN there)."""
    return T.reinterpret(T.shift_left(T.cast(byte, "uint32"), T.uint32(23)), "float32")


def storage_shapes(fmt: str, rows: int, cols: int) -> dict[str, tuple[int, ...]]:
    """The arrays one stored [rows, cols] weight is, as the kernels read them (model/weights.py
    StoredTensor: data, scale; MXFP4 codes in 32-bit words)."""
    if fmt == "mxfp4":
        return {"data": (rows, cols // 8), "scale": (rows, cols // 32)}
    if fmt == "fp8":
        return {"data": (rows, cols), "scale": (-(-rows // 128), -(-cols // 128))}
    return {"data": (rows, cols)}


def _per_chunk(fmt: str) -> int:
    """Storage elements in one 16-byte chunk (MXFP4: words of eight codes)."""
    return 4 if fmt == "mxfp4" else _VALUES[fmt]


def _chunks(fmt: str, cols: int) -> int:
    """16-byte chunks a lane takes of a row (lanes past the row's end idle in the last round)."""
    if cols % _VALUES[fmt]:
        raise ValueError(f"a {fmt} row of {cols} columns is not a whole number of 16-byte chunks")
    return -(-cols // (_VALUES[fmt] * WARP))


def _chunk_dot(fmt: str, wl, u, xl, wh=None):
    """Sum over chunk u's values v of w[v] * xl[v] (xl: the chunk's x; unscaled: MXFP4 and FP8
    chunks take their block scale from the caller).  FP8: wh holds the chunk converted to fp16
    (a vectorized cast: one conversion instruction a pair)."""
    n = _VALUES[fmt]
    if fmt == "mxfp4":
        terms = []
        for q in range(4):
            for j in range(4):
                pair = _fp4_pair(wl[u, q], j)
                terms.append(_f16_half(pair, False) * xl[8 * q + j])
                terms.append(_f16_half(pair, True) * xl[8 * q + j + 4])
    elif fmt == "fp8":
        terms = [T.cast(wh[v], "float32") * xl[v] for v in range(n)]
    else:
        terms = [T.cast(wl[u, v], "float32") * xl[v] for v in range(n)]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _chunk_scale(fmt: str, scale, row, col0, expert=None):
    """The block scale of the chunk starting at column col0 of `row` (1 for unscaled formats)."""
    at = (lambda *i: scale[(expert,) + i]) if expert is not None else (lambda *i: scale[i])
    if fmt == "mxfp4":
        return _e8m0(at(row, col0 // 32)) * _FP4_UNSCALE
    if fmt == "fp8":
        return at(row // 128, col0 // 128)
    return T.float32(1.0)


def _layout(fmt: str, rows: int, cols: int, experts: int | None = None):
    """What a GEMV kernel over a [rows, cols] weight (or a stack of `experts` of them) needs:
    chunks a lane takes, values and storage elements a chunk, the data and scale shapes and the
    scale dtype."""
    one = storage_shapes(fmt, rows, cols)
    lead = (experts,) if experts is not None else ()
    scale = one.get("scale", (1, 1) if experts is not None else (1,))
    return (_chunks(fmt, cols), _VALUES[fmt], _per_chunk(fmt), lead + one["data"], lead + scale,
            "uint8" if fmt == "mxfp4" else "float32")


def gemv(fmt: str, rows: int, cols: int, out_width: int, out_col0: int, accumulate: bool, best: bool = False):
    """Y[0, out_col0 + r] (+)= W[r] . X[0] for r < rows: a linear op's segment, the router.
    `best` (the LM head): also each CTA's best (Y, row), ties to the lower row, in BestScore /
    BestRow (argmax finishes: greedy decoding, kernels.lm_head at temperature 0)."""
    U, n, per, dshape, sshape, sdtype = _layout(fmt, rows, cols)
    ctas = -(-rows // ROWS_PER_CTA)

    @T.prim_func
    def kernel(W: T.Tensor(dshape, _STORAGE[fmt]), WS: T.Tensor(sshape, sdtype),
               X: T.Tensor((1, cols), "float32"), Y: T.Tensor((1, out_width), "float32"),
               BestScore: T.Tensor((ctas,), "float32"), BestRow: T.Tensor((ctas,), "int32")):
        with T.Kernel(ctas, threads=(WARP, ROWS_PER_CTA)) as bx:
            lane = T.get_thread_binding(0)
            w = T.get_thread_binding(1)
            r = bx * ROWS_PER_CTA + w
            sc = T.alloc_shared((ROWS_PER_CTA,), "float32", scope="shared")
            wl = T.alloc_local((U, per), _STORAGE[fmt])
            acc = T.alloc_local((1,), "float32")
            xl = T.alloc_local((n,), "float32")
            wh = T.alloc_local((n,), "float16")
            red = T.alloc_local((1,), "float32")
            acc[0] = 0.0
            if r < rows:
                for u in T.unroll(U):
                    if (u * WARP + lane) * n < cols:
                        for v in T.vectorized(per):
                            wl[u, v] = W[r, (u * WARP + lane) * per + v]
                for u in T.unroll(U):
                    if (u * WARP + lane) * n < cols:
                        for v in T.vectorized(n):  # x in 16-byte loads, not one a value
                            xl[v] = X[0, (u * WARP + lane) * n + v]
                        if fmt == "fp8":
                            for v in T.vectorized(n):
                                wh[v] = T.cast(wl[u, v], "float16")
                        acc[0] += _chunk_dot(fmt, wl, u, xl, wh) * \
                            _chunk_scale(fmt, WS, r, (u * WARP + lane) * n)
            _warp_sum(acc, red, lane)
            if lane == 0 and r < rows:
                if accumulate:
                    Y[0, out_col0 + r] = Y[0, out_col0 + r] + red[0]
                else:
                    Y[0, out_col0 + r] = red[0]
            if best:
                if lane == 0:
                    sc[w] = T.if_then_else(r < rows, red[0], -T.infinity("float32"))
                T.sync_threads()
                if lane == 0 and w == 0:
                    top = T.alloc_local((1,), "float32")
                    at = T.alloc_local((1,), "int32")
                    top[0] = sc[0]
                    at[0] = 0
                    for i in T.serial(1, ROWS_PER_CTA):
                        if sc[i] > top[0]:
                            top[0] = sc[i]
                            at[0] = i
                    BestScore[bx] = top[0]
                    BestRow[bx] = bx * ROWS_PER_CTA + at[0]

    return TLKernel(kernel, (ctas, 1, 1), (WARP, ROWS_PER_CTA, 1))


def _warp_sum(acc, red, lane):
    """red[0] = the sum of acc[0] over the warp's lanes (a TileLang thread all-reduce)."""
    _reduce(acc[0], red, lane, lambda a, b: a + b, T.float32(0))


def _reduce(value, out, tid, combine, identity):
    """out[0] (a one-element local buffer) = combine of `value` over the threads along `tid` (a warp's lanes, or the whole CTA
    when the CTA is one-dimensional), in every one of them."""
    with T.attr(T.comm_reducer(combine, [identity]), "reduce_scope", T.reinterpret(T.uint64(0), dtype="handle")):
        T.evaluate(T.tvm_thread_allreduce(T.uint32(1), value, True, out[0], tid, dtype="handle"))


def embed(vocab: int, hidden: int):
    """X[0] = the bf16 embedding row of token T[0], in fp32 (kernels.embed)."""
    threads = 256

    @T.prim_func
    def kernel(E: T.Tensor((vocab, hidden), "bfloat16"), Tok: T.Tensor((1,), "int32"),
               X: T.Tensor((1, hidden), "float32")):
        with T.Kernel(1, threads=threads) as _:
            tid = T.get_thread_binding(0)
            for i in T.serial(T.ceildiv(hidden, threads)):
                if i * threads + tid < hidden:
                    X[0, i * threads + tid] = T.cast(E[Tok[0], i * threads + tid], "float32")

    return TLKernel(kernel, (1, 1, 1), (threads, 1, 1))


def rmsnorm(hidden: int, eps: float):
    """Out[0] = X[0] * rsqrt(mean(X[0]^2) + eps) * W (kernels.rmsnorm)."""
    threads = 256
    per = -(-hidden // threads)

    @T.prim_func
    def kernel(X: T.Tensor((1, hidden), "float32"), W: T.Tensor((hidden,), "bfloat16"),
               Out: T.Tensor((1, hidden), "float32")):
        with T.Kernel(1, threads=threads) as _:
            tid = T.get_thread_binding(0)
            acc = T.alloc_local((1,), "float32")
            red = T.alloc_local((1,), "float32")
            acc[0] = 0.0
            for i in T.serial(per):
                if i * threads + tid < hidden:
                    acc[0] += X[0, i * threads + tid] * X[0, i * threads + tid]
            _reduce(acc[0], red, tid, lambda a, b: a + b, T.float32(0))
            for i in T.serial(per):
                if i * threads + tid < hidden:
                    Out[0, i * threads + tid] = X[0, i * threads + tid] * T.rsqrt(red[0] / hidden + eps) * T.cast(
                        W[i * threads + tid], "float32")

    return TLKernel(kernel, (1, 1, 1), (threads, 1, 1))


def rope(width: int, heads: int, head_dim: int, rotary_dim: int):
    """Rotate the first rotary_dim columns of each of `heads` heads of Buf[0] by the position
    (kernels.rope; InvFreq: theta^(-2i / rotary_dim), computed on the host as the VM does)."""
    half = rotary_dim // 2

    @T.prim_func
    def kernel(Buf: T.Tensor((1, width), "float32"), Pos: T.Tensor((1,), "int32"),
               InvFreq: T.Tensor((half,), "float32")):
        with T.Kernel(heads, threads=half) as h:
            i = T.get_thread_binding(0)
            ang = T.alloc_local((1,), "float32")
            x1 = T.alloc_local((1,), "float32")
            x2 = T.alloc_local((1,), "float32")
            ang[0] = T.cast(Pos[0], "float32") * InvFreq[i]
            x1[0] = Buf[0, h * head_dim + i]
            x2[0] = Buf[0, h * head_dim + half + i]
            Buf[0, h * head_dim + i] = x1[0] * T.cos(ang[0]) - x2[0] * T.sin(ang[0])
            Buf[0, h * head_dim + half + i] = x2[0] * T.cos(ang[0]) + x1[0] * T.sin(ang[0])

    return TLKernel(kernel, (heads, 1, 1), (half, 1, 1))


def kv_write(kv_heads: int, head_dim: int, v_dim: int, slots: int, ring: bool, value_scale: float):
    """The step's key and value rows into cache slot pos (pos % slots for a ring; a negative
    position is padding, not written) (kernels.kv_write)."""
    threads = max(head_dim, v_dim)

    @T.prim_func
    def kernel(K: T.Tensor((1, kv_heads * head_dim), "float32"), V: T.Tensor((1, kv_heads * v_dim), "float32"),
               Pos: T.Tensor((1,), "int32"), KC: T.Tensor((slots, kv_heads, head_dim), "float32"),
               VC: T.Tensor((slots, kv_heads, v_dim), "float32")):
        with T.Kernel(kv_heads, threads=threads) as g:
            d = T.get_thread_binding(0)
            if Pos[0] >= 0:
                if d < head_dim:
                    KC[Pos[0] % slots if ring else Pos[0], g, d] = K[0, g * head_dim + d]
                if d < v_dim:
                    VC[Pos[0] % slots if ring else Pos[0], g, d] = V[0, g * v_dim + d] * value_scale

    return TLKernel(kernel, (kv_heads, 1, 1), (threads, 1, 1))


ATTN_THREADS = 256
ATTN_KEYS = 16  # keys staged in shared memory at a time


def attention(kv_heads: int, group: int, head_dim: int, v_dim: int, slots: int, splits: int, window: int,
              ring: bool, scale: float):
    """Split-KV decode attention of one query (kernels.attention): CTA (g, s) runs the `group`
    query heads of KV head g over split s of the visible keys with an online softmax, chunks of
    ATTN_KEYS keys and values staged in shared memory, and writes the split's running max, sum
    and weighted values (attn_combine merges the splits)."""
    heads = kv_heads * group
    pairs = group * v_dim  # (head, value column) accumulators, spread over the threads
    per_thread = -(-pairs // ATTN_THREADS)
    kpad = head_dim + 1  # padded key rows: lanes reading one column of 32 keys hit 32 banks
    score_pairs = group * ATTN_KEYS

    @T.prim_func
    def kernel(Q: T.Tensor((1, heads * head_dim), "float32"), Pos: T.Tensor((1,), "int32"),
               KC: T.Tensor((slots, kv_heads, head_dim), "float32"), VC: T.Tensor((slots, kv_heads, v_dim), "float32"),
               AMax: T.Tensor((1, heads, splits), "float32"), ASum: T.Tensor((1, heads, splits), "float32"),
               AAcc: T.Tensor((1, heads, splits, v_dim), "float32")):
        with T.Kernel(kv_heads, splits, threads=ATTN_THREADS) as (g, s):
            tid = T.get_thread_binding(0)
            qs = T.alloc_shared((group, head_dim), "float32", scope="shared")
            ks = T.alloc_shared((ATTN_KEYS, kpad), "float32", scope="shared")
            vs = T.alloc_shared((ATTN_KEYS, v_dim), "float32", scope="shared")
            ps = T.alloc_shared((group, ATTN_KEYS), "float32", scope="shared")
            run_max = T.alloc_shared((group,), "float32", scope="shared")
            run_sum = T.alloc_shared((group,), "float32", scope="shared")
            corr = T.alloc_shared((group,), "float32", scope="shared")
            acc = T.alloc_local((per_thread,), "float32")
            rng = T.alloc_local((4,), "int32")  # lo, hi of this split, chunk, visible lo
            mx = T.alloc_local((1,), "float32")
            tot = T.alloc_local((1,), "float32")
            dot = T.alloc_local((1,), "float32")
            # split_range over the step's visible keys (one query: position Pos[0]).
            rng[3] = T.max(Pos[0] - window + 1, 0) if window else 0
            rng[2] = T.ceildiv(Pos[0] + 1 - rng[3], splits)
            rng[0] = rng[3] + s * rng[2]
            rng[1] = T.min(Pos[0] + 1, rng[3] + (s + 1) * rng[2])
            for i in T.serial(-(-group * head_dim // ATTN_THREADS)):
                if i * ATTN_THREADS + tid < group * head_dim:
                    qs[(i * ATTN_THREADS + tid) // head_dim, (i * ATTN_THREADS + tid) % head_dim] = \
                        Q[0, g * group * head_dim + i * ATTN_THREADS + tid]
            for i in T.serial(per_thread):
                acc[i] = 0.0
            if tid < group:
                run_max[tid] = -T.infinity("float32")
                run_sum[tid] = 0.0
            T.sync_threads()
            for c in T.serial(T.ceildiv(T.max(rng[1] - rng[0], 0), ATTN_KEYS)):
                # Stage the chunk's keys and values (ring slots wrap).
                for i in T.serial(-(-ATTN_KEYS * head_dim // ATTN_THREADS)):
                    if i * ATTN_THREADS + tid < ATTN_KEYS * head_dim:
                        if rng[0] + c * ATTN_KEYS + (i * ATTN_THREADS + tid) // head_dim < rng[1]:
                            ks[(i * ATTN_THREADS + tid) // head_dim, (i * ATTN_THREADS + tid) % head_dim] = KC[
                                (rng[0] + c * ATTN_KEYS + (i * ATTN_THREADS + tid) // head_dim) % slots, g,
                                (i * ATTN_THREADS + tid) % head_dim]
                        else:  # past the split: zeros, never stale shared memory (0 x NaN is NaN)
                            ks[(i * ATTN_THREADS + tid) // head_dim, (i * ATTN_THREADS + tid) % head_dim] = 0.0
                for i in T.serial(-(-ATTN_KEYS * v_dim // ATTN_THREADS)):
                    if i * ATTN_THREADS + tid < ATTN_KEYS * v_dim:
                        if rng[0] + c * ATTN_KEYS + (i * ATTN_THREADS + tid) // v_dim < rng[1]:
                            vs[(i * ATTN_THREADS + tid) // v_dim, (i * ATTN_THREADS + tid) % v_dim] = VC[
                                (rng[0] + c * ATTN_KEYS + (i * ATTN_THREADS + tid) // v_dim) % slots, g,
                                (i * ATTN_THREADS + tid) % v_dim]
                        else:
                            vs[(i * ATTN_THREADS + tid) // v_dim, (i * ATTN_THREADS + tid) % v_dim] = 0.0
                T.sync_threads()
                # Scores of (head, key) pairs; keys past the split are -inf.
                for i in T.serial(-(-score_pairs // ATTN_THREADS)):
                    if i * ATTN_THREADS + tid < score_pairs:
                        dot[0] = 0.0
                        for d in T.serial(head_dim):
                            dot[0] += qs[(i * ATTN_THREADS + tid) // ATTN_KEYS, d] * ks[
                                (i * ATTN_THREADS + tid) % ATTN_KEYS, d]
                        if rng[0] + c * ATTN_KEYS + (i * ATTN_THREADS + tid) % ATTN_KEYS < rng[1]:
                            ps[(i * ATTN_THREADS + tid) // ATTN_KEYS, (i * ATTN_THREADS + tid) % ATTN_KEYS] = \
                                dot[0] * scale
                        else:
                            ps[(i * ATTN_THREADS + tid) // ATTN_KEYS, (i * ATTN_THREADS + tid) % ATTN_KEYS] = \
                                -T.infinity("float32")
                T.sync_threads()
                # Online softmax, one thread a head: new max, rescale factor, probabilities.
                if tid < group:
                    mx[0] = run_max[tid]
                    for j in T.serial(ATTN_KEYS):
                        mx[0] = T.max(mx[0], ps[tid, j])
                    corr[tid] = T.exp(run_max[tid] - mx[0])
                    tot[0] = 0.0
                    for j in T.serial(ATTN_KEYS):
                        ps[tid, j] = T.exp(ps[tid, j] - mx[0])
                        tot[0] += ps[tid, j]
                    run_sum[tid] = run_sum[tid] * corr[tid] + tot[0]
                    run_max[tid] = mx[0]
                T.sync_threads()
                for i in T.serial(per_thread):
                    if i * ATTN_THREADS + tid < pairs:
                        acc[i] = acc[i] * corr[(i * ATTN_THREADS + tid) // v_dim]
                        for j in T.serial(ATTN_KEYS):
                            acc[i] += ps[(i * ATTN_THREADS + tid) // v_dim, j] * vs[j, (i * ATTN_THREADS + tid) % v_dim]
                T.sync_threads()
            for i in T.serial(per_thread):
                if i * ATTN_THREADS + tid < pairs:
                    AAcc[0, g * group + (i * ATTN_THREADS + tid) // v_dim, s, (i * ATTN_THREADS + tid) % v_dim] = acc[i]
            if tid < group:
                AMax[0, g * group + tid, s] = run_max[tid]
                ASum[0, g * group + tid, s] = run_sum[tid]

    return TLKernel(kernel, (kv_heads, splits, 1), (ATTN_THREADS, 1, 1))


def attn_combine(heads: int, splits: int, v_dim: int, sink: bool):
    """Merge the splits of every head, with the attention sink's logit in the denominator when
    the layer has one (kernels.attn_combine)."""

    @T.prim_func
    def kernel(AMax: T.Tensor((1, heads, splits), "float32"), ASum: T.Tensor((1, heads, splits), "float32"),
               AAcc: T.Tensor((1, heads, splits, v_dim), "float32"), Sink: T.Tensor((heads,), "float32"),
               Out: T.Tensor((1, heads * v_dim), "float32")):
        with T.Kernel(heads, threads=v_dim) as h:
            d = T.get_thread_binding(0)
            top = T.alloc_local((1,), "float32")
            den = T.alloc_local((1,), "float32")
            num = T.alloc_local((1,), "float32")
            top[0] = -T.infinity("float32")
            for s in T.serial(splits):
                top[0] = T.max(top[0], AMax[0, h, s])
            if sink:
                top[0] = T.max(top[0], Sink[h])
            den[0] = 0.0
            num[0] = 0.0
            for s in T.serial(splits):
                den[0] += ASum[0, h, s] * T.exp(AMax[0, h, s] - top[0])
                num[0] += AAcc[0, h, s, d] * T.exp(AMax[0, h, s] - top[0])
            if sink:
                den[0] += T.exp(Sink[h] - top[0])
            Out[0, h * v_dim + d] = num[0] / den[0]

    return TLKernel(kernel, (heads, 1, 1), (v_dim, 1, 1))


def topk(experts: int, k: int, norm: bool, scale: float):
    """Sigmoid scores, the top k of score + bias (one thread an expert, k rounds of a CTA-wide
    max, ties to the lowest expert), weights normalised over the chosen (kernels.topk)."""

    @T.prim_func
    def kernel(Logits: T.Tensor((1, experts), "float32"), Bias: T.Tensor((experts,), "float32"),
               Idx: T.Tensor((1, k), "int32"), Wt: T.Tensor((1, k), "float32")):
        with T.Kernel(1, threads=experts) as _:
            e = T.get_thread_binding(0)
            sel_w = T.alloc_shared((k,), "float32", scope="shared")
            score = T.alloc_local((1,), "float32")
            choice = T.alloc_local((1,), "float32")
            best = T.alloc_local((1,), "float32")
            cand = T.alloc_local((1,), "int32")
            who = T.alloc_local((1,), "int32")
            tot = T.alloc_local((1,), "float32")
            score[0] = 1.0 / (1.0 + T.exp(-Logits[0, e]))
            choice[0] = score[0] + Bias[e]
            for j in T.serial(k):
                _reduce(choice[0], best, e, lambda a, b: T.max(a, b), -T.infinity("float32"))
                cand[0] = T.if_then_else(choice[0] == best[0], e, experts)
                _reduce(cand[0], who, e, lambda a, b: T.min(a, b), T.int32(experts))
                if e == who[0]:
                    Idx[0, j] = e
                    sel_w[j] = score[0]
                    choice[0] = -T.infinity("float32")
            T.sync_threads()
            if e == 0:
                tot[0] = 0.0
                for j in T.serial(k):
                    tot[0] += sel_w[j]
                for j in T.serial(k):
                    if norm:
                        Wt[0, j] = sel_w[j] / (tot[0] + 1e-20) * scale
                    else:
                        Wt[0, j] = sel_w[j] * scale

    return TLKernel(kernel, (1, 1, 1), (experts, 1, 1))


def expert_gate_up(fmt: str, experts: int, rows: int, cols: int, k: int):
    """Act[0, j, r] = silu(G_e[r] . X[0]) * (U_e[r] . X[0]) for the expert e = Idx[0, j] of each
    of the token's k choices: grid (k, row blocks) (kernels.expert_gate_up).  A dense FFN's
    gate/up (kernels.gate_up) is the case of one expert and one choice, Idx = [[0]]."""
    U, n, per, dshape, sshape, sdtype = _layout(fmt, rows, cols, experts)

    @T.prim_func
    def kernel(G: T.Tensor(dshape, _STORAGE[fmt]), GS: T.Tensor(sshape, sdtype),
               Up: T.Tensor(dshape, _STORAGE[fmt]), UpS: T.Tensor(sshape, sdtype),
               Idx: T.Tensor((1, k), "int32"), X: T.Tensor((1, cols), "float32"),
               Act: T.Tensor((1, k, rows), "float32")):
        with T.Kernel(k, T.ceildiv(rows, ROWS_PER_CTA), threads=(WARP, ROWS_PER_CTA)) as (j, bx):
            lane = T.get_thread_binding(0)
            r = bx * ROWS_PER_CTA + T.get_thread_binding(1)
            e = Idx[0, j]
            gl = T.alloc_local((U, per), _STORAGE[fmt])
            ul = T.alloc_local((U, per), _STORAGE[fmt])
            acc = T.alloc_local((1,), "float32")
            xl = T.alloc_local((n,), "float32")
            wh = T.alloc_local((n,), "float16")
            acc_up = T.alloc_local((1,), "float32")
            red = T.alloc_local((1,), "float32")
            red_up = T.alloc_local((1,), "float32")
            acc[0] = 0.0
            acc_up[0] = 0.0
            if r < rows:
                for u in T.unroll(U):
                    if (u * WARP + lane) * n < cols:
                        for v in T.vectorized(per):
                            gl[u, v] = G[e, r, (u * WARP + lane) * per + v]
                        for v in T.vectorized(per):
                            ul[u, v] = Up[e, r, (u * WARP + lane) * per + v]
                for u in T.unroll(U):
                    if (u * WARP + lane) * n < cols:
                        for v in T.vectorized(n):  # x in 16-byte loads, not one a value
                            xl[v] = X[0, (u * WARP + lane) * n + v]
                        if fmt == "fp8":
                            for v in T.vectorized(n):
                                wh[v] = T.cast(gl[u, v], "float16")
                        acc[0] += _chunk_dot(fmt, gl, u, xl, wh) * \
                            _chunk_scale(fmt, GS, r, (u * WARP + lane) * n, e)
                        if fmt == "fp8":
                            for v in T.vectorized(n):
                                wh[v] = T.cast(ul[u, v], "float16")
                        acc_up[0] += _chunk_dot(fmt, ul, u, xl, wh) * \
                            _chunk_scale(fmt, UpS, r, (u * WARP + lane) * n, e)
            _warp_sum(acc, red, lane)
            _warp_sum(acc_up, red_up, lane)
            if lane == 0 and r < rows:
                Act[0, j, r] = red[0] / (1.0 + T.exp(-red[0])) * red_up[0]

    return TLKernel(kernel, (k, -(-rows // ROWS_PER_CTA), 1), (WARP, ROWS_PER_CTA, 1))


def expert_down(fmt: str, experts: int, rows: int, cols: int, k: int):
    """X[0, r] += sum over the token's choices j, in order, of Wt[0, j] (D_e[r] . Act[0, j]) with
    e = Idx[0, j] (kernels.expert_down): each warp loads its row of all k experts before multiplying."""
    U, n, per, dshape, sshape, sdtype = _layout(fmt, rows, cols, experts)

    @T.prim_func
    def kernel(D: T.Tensor(dshape, _STORAGE[fmt]), DS: T.Tensor(sshape, sdtype), Idx: T.Tensor((1, k), "int32"),
               Wt: T.Tensor((1, k), "float32"), Act: T.Tensor((1, k, cols), "float32"),
               X: T.Tensor((1, rows), "float32")):
        with T.Kernel(T.ceildiv(rows, ROWS_PER_CTA), threads=(WARP, ROWS_PER_CTA)) as bx:
            lane = T.get_thread_binding(0)
            r = bx * ROWS_PER_CTA + T.get_thread_binding(1)
            wl = T.alloc_local((k * U, per), _STORAGE[fmt])
            part = T.alloc_local((1,), "float32")
            xl = T.alloc_local((n,), "float32")
            wh = T.alloc_local((n,), "float16")
            red = T.alloc_local((1,), "float32")
            tot = T.alloc_local((1,), "float32")
            tot[0] = 0.0
            if r < rows:
                for j in T.unroll(k):
                    for u in T.unroll(U):
                        if (u * WARP + lane) * n < cols:
                            for v in T.vectorized(per):
                                wl[j * U + u, v] = D[Idx[0, j], r, (u * WARP + lane) * per + v]
            for j in T.unroll(k):  # unrolled: wl is indexed by constants, so it stays in registers
                part[0] = 0.0
                if r < rows:
                    for u in T.unroll(U):
                        if (u * WARP + lane) * n < cols:
                            for v in T.vectorized(n):  # x in 16-byte loads, not one a value
                                xl[v] = Act[0, j, (u * WARP + lane) * n + v]
                            if fmt == "fp8":
                                for v in T.vectorized(n):
                                    wh[v] = T.cast(wl[j * U + u, v], "float16")
                            part[0] += _chunk_dot(fmt, wl, j * U + u, xl, wh) * \
                                _chunk_scale(fmt, DS, r, (u * WARP + lane) * n, Idx[0, j])
                _warp_sum(part, red, lane)
                tot[0] += Wt[0, j] * red[0]
            if lane == 0 and r < rows:
                X[0, r] = X[0, r] + tot[0]

    return TLKernel(kernel, (-(-rows // ROWS_PER_CTA), 1, 1), (WARP, ROWS_PER_CTA, 1))


LM_ROWS = ROWS_PER_CTA  # vocabulary rows an LM-head CTA takes (one best a CTA)


def argmax(parts: int):
    """Next[0] = the row of the highest of the LM head CTAs' bests, the lowest row among equals."""
    threads = 1024

    @T.prim_func
    def kernel(BestScore: T.Tensor((parts,), "float32"), BestRow: T.Tensor((parts,), "int32"),
               Next: T.Tensor((1,), "int32")):
        with T.Kernel(1, threads=threads) as _:
            tid = T.get_thread_binding(0)
            mine = T.alloc_local((1,), "float32")
            row = T.alloc_local((1,), "int32")
            best = T.alloc_local((1,), "float32")
            who = T.alloc_local((1,), "int32")
            mine[0] = -T.infinity("float32")
            row[0] = 2147483647
            for i in T.serial(T.ceildiv(parts, threads)):
                if i * threads + tid < parts:
                    if BestScore[i * threads + tid] > mine[0]:
                        mine[0] = BestScore[i * threads + tid]
                        row[0] = BestRow[i * threads + tid]
            _reduce(mine[0], best, tid, lambda a, b: T.max(a, b), -T.infinity("float32"))
            row[0] = T.if_then_else(mine[0] == best[0], row[0], 2147483647)
            _reduce(row[0], who, tid, lambda a, b: T.min(a, b), T.int32(2147483647))
            if tid == 0:
                Next[0] = who[0]

    return TLKernel(kernel, (1, 1, 1), (threads, 1, 1))
