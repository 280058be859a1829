"""Dependencies from regions: which earlier task must finish before a task may run.

Two accesses *conflict* when they touch overlapping regions of one buffer, come from different
tasks, and at least one of them writes (read-after-write, write-after-write, write-after-read).
Weights are never written, so their regions are skipped.

`conflict_pairs` sweeps the accesses of each buffer in a given linear order of the tasks and
reports (earlier, later) task pairs.  It does not report every conflicting pair but a
*sufficient* set: every conflicting pair is linked by a chain of reported pairs going forward in
the order.  Any transitive ordering that contains the reported pairs (the dependency graph, a
schedule's happens-before) therefore orders every conflict.  Two users rely on this:
`derive_dependencies` (order = program order; the pairs become graph.deps) and the validator
(order = the schedule's execution order; each pair must be happens-before ordered), which so
recomputes everything from the regions and never reads graph.deps.

Pruning.  Each buffer keeps a history of live accesses; a new access is paired with the live
ones it conflicts with.  An access E leaves the history when one of these holds:
  * covered: the union of writes by tasks later than E's task covers E's region.  Any later X
    conflicting with E at a point p conflicts with a write W covering p, and W conflicts with E;
    by induction on the distance in the order (E, W) and (W, X) are chained, so (E, X) is.
    A single containing write is the common case and is applied exactly inside a chunk; the
    union is checked after each chunk on a coordinate-compressed grid.
  * a read inside a write of its own task: whatever conflicts with the read conflicts with the
    write.
  * superseded: E is a read, and a later live read R contains E's region with a live write W
    overlapping E between them.  Both were live throughout, so (E, W) and (W, R) were reported;
    any later write conflicting with E conflicts with R.  This retires readers of a region that
    later writes never cover entirely, one generation after another.
Every rule justifies dropping E by accesses later than E, so the induction stays well founded,
and judging on a subset of the history only ever prunes less, which is safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tilert.ir import WEIGHT, TaskGraph

# Accesses compared against the history at once: pairs inside a chunk come from one
# chunk x (history + chunk) matrix instead of one numpy call per access.
_CHUNK = 256
# Largest coordinate-compressed grid the coverage check builds; above it only single-write
# containment prunes (still correct, just a larger history).
_GRID_LIMIT = 1 << 20
_NEVER = np.iinfo(np.int64).max


def derive_dependencies(graph: TaskGraph) -> None:
    """Fill graph.deps[t] with the sorted ids (< t) of the tasks t must wait for.  Every listed
    task truly conflicts with t; a conflict may be left out when a chain of listed dependencies
    already orders it."""
    n = len(graph.tasks)
    for i, task in enumerate(graph.tasks):
        if task.id != i:
            raise ValueError(f"task at position {i} has id {task.id}; ids must equal positions")
    src, dst = conflict_pairs(graph, np.arange(n), chunk_by_op=True)
    graph.deps = _group_by_consumer(src, dst, n)


def conflict_pairs(
    graph: TaskGraph, order: Sequence[int] | np.ndarray, chunk_by_op: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A sufficient set of conflicting task pairs (see module doc) for the linear order `order`
    (a permutation of task ids): int64 arrays (src, dst), src earlier in the order, no duplicates,
    sorted by the position of dst in the order, then of src.
    `chunk_by_op` also ends a chunk wherever the op changes, so that an op's tiles, written
    together, prune the history before the next op reads (tighter pairs when ops are contiguous,
    as in program order)."""
    order = np.asarray(order, dtype=np.int64)
    n = len(graph.tasks)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    table = _access_table(graph, rank)
    srcs: list[np.ndarray] = []
    dsts: list[np.ndarray] = []
    for op, rk, wr, lo, hi in table:
        if not wr.any():
            continue  # only read in this step (an input): nothing conflicts
        cuts = np.flatnonzero(np.diff(op)) + 1 if chunk_by_op else np.zeros(0, np.int64)
        _sweep_buffer(rk, wr, lo, hi, _chunk_ends(cuts, len(rk)), srcs, dsts)
    if not srcs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    key = np.sort(np.concatenate(dsts) * n + np.concatenate(srcs))  # by later, then earlier
    key = key[np.r_[True, key[1:] != key[:-1]]]
    return order[key % n], order[key // n]


def _access_table(graph: TaskGraph, rank: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Per buffer touched, its non-empty accesses sorted by rank as arrays (op, rank, is_write,
    lo, hi).  Dimensions in which every access spans the same interval are dropped: they never
    separate two boxes."""
    rows: dict[str, list] = {}
    for task in graph.tasks:
        for is_write, regions in ((False, task.reads), (True, task.writes)):
            for r in regions:
                buf = graph.buffers.get(r.buffer)
                if buf is None:
                    raise ValueError(f"task {task.id} ({graph.ops[task.op].name}) touches unknown buffer {r.buffer!r}")
                if buf.kind == WEIGHT:
                    if is_write:
                        raise ValueError(f"task {task.id} ({graph.ops[task.op].name}) writes weight {r.buffer!r}")
                    continue
                if any(lo >= hi for lo, hi in r.box):
                    continue  # an empty region conflicts with nothing
                rows.setdefault(r.buffer, []).append((task.op, rank[task.id], is_write, r.box))
    table = []
    for acc in rows.values():
        ndim = max(1, max(len(a[3]) for a in acc))  # a scalar is a box [0, 1)
        box = np.array([a[3] + ((0, 1),) * (ndim - len(a[3])) for a in acc], dtype=np.int64).reshape(len(acc), ndim, 2)
        varying = [d for d in range(ndim) if np.ptp(box[:, d, 0]) or np.ptp(box[:, d, 1])]
        box = box[:, varying or [0], :]
        op = np.array([a[0] for a in acc], dtype=np.int64)
        rk = np.array([a[1] for a in acc], dtype=np.int64)
        wr = np.array([a[2] for a in acc], dtype=bool)
        perm = np.argsort(rk, kind="stable")
        table.append((op[perm], rk[perm], wr[perm], box[perm, :, 0].copy(), box[perm, :, 1].copy()))
    return table


def _chunk_ends(cuts: np.ndarray, length: int) -> list[int]:
    """Where chunks end: at each cut and at the end, with long pieces split."""
    ends, start = [], 0
    for cut in cuts.tolist() + [length]:
        ends.extend(range(start + _CHUNK, cut, _CHUNK))
        ends.append(cut)
        start = cut
    return ends


def _overlap(a_lo, a_hi, b_lo, b_hi) -> np.ndarray:
    """[i, j]: box a_i overlaps box b_j.  (One 2-D comparison per dimension: much faster than a
    reduction over a short last axis.)"""
    m = (a_lo[:, 0, None] < b_hi[None, :, 0]) & (b_lo[None, :, 0] < a_hi[:, 0, None])
    for d in range(1, a_lo.shape[1]):
        m &= (a_lo[:, d, None] < b_hi[None, :, d]) & (b_lo[None, :, d] < a_hi[:, d, None])
    return m


def _contains(a_lo, a_hi, b_lo, b_hi) -> np.ndarray:
    """[i, j]: box a_i contains box b_j."""
    m = (a_lo[:, 0, None] <= b_lo[None, :, 0]) & (b_hi[None, :, 0] <= a_hi[:, 0, None])
    for d in range(1, a_lo.shape[1]):
        m &= (a_lo[:, d, None] <= b_lo[None, :, d]) & (b_hi[None, :, d] <= a_hi[:, d, None])
    return m


def _sweep_buffer(rk, wr, lo, hi, ends: list[int], srcs: list, dsts: list) -> None:
    """Append the pairs (earlier rank, later rank) of one buffer's accesses (sorted by rank)."""
    h = np.zeros(0, np.int64)  # indices of the live history
    for s, e in zip([0] + ends[:-1], ends):
        a = np.concatenate([h, np.arange(s, e)])  # history, then this chunk
        a_rk, a_wr, a_lo, a_hi = rk[a], wr[a], lo[a], hi[a]
        c_rk, c_wr, c_lo, c_hi = rk[s:e], wr[s:e], lo[s:e], hi[s:e]

        # kill[j]: rank of the first write of this chunk containing access j, from a later task
        # (or from j's own task when j is a read): j pairs with nothing after that rank.
        kill = np.full(len(a), _NEVER, np.int64)
        wi = np.flatnonzero(c_wr)
        if len(wi):
            w_rk = c_rk[wi]
            later = (w_rk[:, None] > a_rk[None]) | ((w_rk[:, None] == a_rk[None]) & ~a_wr[None])
            inside = _contains(c_lo[wi], c_hi[wi], a_lo, a_hi) & later
            kill = np.where(inside, w_rk[:, None], _NEVER).min(axis=0)

        overlap = _overlap(c_lo, c_hi, a_lo, a_hi)
        conflict = overlap & (c_wr[:, None] | a_wr[None]) & (a_rk[None] < c_rk[:, None]) & (c_rk[:, None] <= kill[None])
        i, j = np.nonzero(conflict)
        if len(i):
            srcs.append(a_rk[j])
            dsts.append(c_rk[i])

        live = kill == _NEVER
        h = a[live]
        # Only accesses overlapping this chunk can have become prunable.  Judge them among
        # themselves: the writes and reads the rules need usually overlap the chunk too, and a
        # rule judged on a subset of the history only prunes less.
        near = h[overlap.any(axis=0)[live]]
        if len(near) > 1:
            drop = _covered_by_later_writes(rk[near], wr[near], lo[near], hi[near])
            drop |= _superseded_reads(rk[near], wr[near], lo[near], hi[near])
            if drop.any():
                h = np.setdiff1d(h, near[drop], assume_unique=True)


def _covered_by_later_writes(rk, wr, lo, hi) -> np.ndarray:
    """Mask of accesses whose region lies in the union of writes of strictly later ranks.
    Paints, on the grid of all box coordinates, the latest write rank covering each cell, then
    takes the minimum over each distinct box."""
    out = np.zeros(len(rk), bool)
    writes = np.flatnonzero(wr)
    if not len(writes) or rk[writes].max() <= rk.min():
        return out
    width = lo.shape[1]
    coords = [np.unique(np.concatenate([lo[:, d], hi[:, d]])) for d in range(width)]
    if np.prod([len(c) - 1 for c in coords], dtype=np.float64) > _GRID_LIMIT:
        return out
    ilo = np.stack([np.searchsorted(coords[d], lo[:, d]) for d in range(width)], axis=1)
    ihi = np.stack([np.searchsorted(coords[d], hi[:, d]) for d in range(width)], axis=1)
    grid = np.full([len(c) - 1 for c in coords], -1, np.int64)
    for k in writes[np.argsort(rk[writes], kind="stable")]:
        grid[tuple(map(slice, ilo[k], ihi[k]))] = rk[k]
    # Many accesses share a box (all the readers of one buffer): take each box's minimum once.
    edges = np.concatenate([ilo, ihi], axis=1)
    perm = np.lexsort(edges.T[::-1])
    first = np.r_[True, np.any(np.diff(edges[perm], axis=0) != 0, axis=1)]
    box_of = np.empty(len(rk), np.int64)
    box_of[perm] = np.cumsum(first) - 1
    reps = perm[first]
    latest = np.array([grid[tuple(map(slice, ilo[k], ihi[k]))].min() for k in reps])
    return latest[box_of] > rk


def _superseded_reads(rk, wr, lo, hi) -> np.ndarray:
    """Mask of reads R followed by a write W overlapping R and then a read containing R."""
    out = np.zeros(len(rk), bool)
    r, w = np.flatnonzero(~wr), np.flatnonzero(wr)
    if len(r) < 2 or not len(w):
        return out
    r_rk, r_lo, r_hi = rk[r], lo[r], hi[r]
    hits = _overlap(lo[w], hi[w], r_lo, r_hi) & (rk[w][:, None] > r_rk[None])
    first_write = np.where(hits, rk[w][:, None], _NEVER).min(axis=0)
    cand = np.flatnonzero(first_write < r_rk.max())
    if not len(cand):
        return out
    superseded = np.zeros(len(cand), bool)
    for s in range(0, len(r), 512):  # blocks of containing reads bound the matrix size
        contains = _contains(r_lo[s:s + 512], r_hi[s:s + 512], r_lo[cand], r_hi[cand])
        superseded |= (contains & (r_rk[s:s + 512, None] > first_write[cand][None])).any(axis=0)
    out[r[cand[superseded]]] = True
    return out


def _group_by_consumer(src: np.ndarray, dst: np.ndarray, n: int) -> list[list[int]]:
    """deps lists from pairs sorted by (dst, src)."""
    cuts = np.searchsorted(dst, np.arange(n + 1)).tolist()
    flat = src.tolist()
    return [flat[cuts[t]:cuts[t + 1]] for t in range(n)]
