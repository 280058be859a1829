"""Dependencies from regions: which earlier task must finish before a task may run.

Two accesses *conflict* when they touch overlapping regions of one buffer, come from different
tasks, and at least one of them writes (read-after-write, write-after-write, write-after-read).
Weights are never written, so their regions are skipped.

`conflict_pairs` sweeps the accesses of each buffer in a given linear order of the tasks and
reports (earlier, later) task pairs.  It does not report every conflicting pair; it reports a
*sufficient* set: every conflicting pair is connected by a chain of reported pairs going forward
in the order.  So any transitive ordering that contains the reported pairs (the dependency graph,
or a schedule's happens-before) orders every conflict.  Two users rely on this:
`derive_dependencies` (order = program order; the pairs become graph.deps) and the validator
(order = the schedule's execution order; each pair must be happens-before ordered), which
recomputes everything from the regions and never reads graph.deps.

Pruning.  An access E may be forgotten once the union of write regions of strictly later tasks
(later than E's task) covers E's region.  Proof, for any later access X conflicting with E at a
point p: p lies in some later write W; W conflicts with E (it writes p), and X conflicts with W
(it touches p, W writes it).  By induction on the distance in the order, both (E, W) and (W, X)
are chained by reported pairs, hence so is (E, X).  A task's read that lies inside its own write
is forgotten at once: anything conflicting with the read conflicts with the write.
Two mechanisms apply the rule: a single later write containing an access kills it (exact,
vectorised, applied within a chunk too), and after a chunk containing writes the history is
compacted against the union of its writes on a coordinate-compressed grid.  The pruning keeps the
history of each buffer to the regions that are live, so a 50k-task graph sweeps in about a second.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tilert.ir import WEIGHT, TaskGraph

# Accesses compared against the history at once; pairs inside a chunk are found by one
# chunk x (history + chunk) matrix instead of one numpy call per access.
_CHUNK = 256
# Largest coordinate-compressed grid the union-coverage compaction builds; above it the
# history is only pruned by single-write containment (still correct, just larger).
_GRID_LIMIT = 1 << 20
_NEVER = np.iinfo(np.int64).max


def derive_dependencies(graph: TaskGraph) -> None:
    """Fill graph.deps[t] with the sorted ids (< t) of the tasks t must wait for."""
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
    (a permutation of task ids).  Returns (src, dst) int64 arrays, src earlier in the order than
    dst, without duplicates.  `chunk_by_op` ends a chunk wherever the op changes, so that the
    union of an op's tile writes prunes the history before the next op (fewer, tighter pairs;
    worth it when ops are contiguous, as in program order)."""
    order = np.asarray(order, dtype=np.int64)
    n = len(graph.tasks)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    table = _access_table(graph, rank)
    if table is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    buf, op, rk, wr, lo, hi = table
    srcs, dsts = [], []
    cuts = np.flatnonzero(np.diff(buf)) + 1
    for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(buf)]):
        ops = np.flatnonzero(np.diff(op[s:e])) + 1 if chunk_by_op else []
        ends = _chunk_ends(np.r_[ops, e - s].astype(np.int64))
        _sweep_buffer(rk[s:e], wr[s:e], lo[s:e], hi[s:e], ends, srcs, dsts)
    if not srcs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    key = np.unique(np.concatenate(srcs) * n + np.concatenate(dsts))
    return order[key // n], order[key % n]


def _access_table(graph: TaskGraph, rank: np.ndarray):
    """Every non-weight, non-empty access as rows (buffer index, op, rank, is_write, lo[D], hi[D]),
    sorted by buffer then rank.  Boxes are padded to the widest buffer with [0, 1)."""
    index = {name: i for i, name in enumerate(graph.buffers)}
    skip = {i for name, i in index.items() if graph.buffers[name].kind == WEIGHT}
    width = max([len(b.shape) for b in graph.buffers.values()] + [1])
    rows_b, rows_t, rows_w, boxes = [], [], [], []
    op_of = np.array([t.op for t in graph.tasks] + [0], dtype=np.int64)
    pad = ((0, 1),) * width
    for task in graph.tasks:
        for is_write, regions in ((False, task.reads), (True, task.writes)):
            for r in regions:
                b = index.get(r.buffer)
                if b is None:
                    raise ValueError(f"task {task.id} ({graph.ops[task.op].name}) touches unknown buffer {r.buffer!r}")
                if b in skip:
                    if is_write:
                        raise ValueError(f"task {task.id} ({graph.ops[task.op].name}) writes weight {r.buffer!r}")
                    continue
                if any(l >= h for l, h in r.box):
                    continue  # an empty region conflicts with nothing
                rows_b.append(b)
                rows_t.append(task.id)
                rows_w.append(is_write)
                boxes.append(r.box + pad[len(r.box):])
    if not rows_b:
        return None
    b = np.array(rows_b, dtype=np.int64)
    ids = np.array(rows_t, dtype=np.int64)
    t = rank[ids]
    w = np.array(rows_w, dtype=bool)
    box = np.array(boxes, dtype=np.int64).reshape(len(boxes), width, 2)
    perm = np.lexsort((t, b))
    return b[perm], op_of[ids][perm], t[perm], w[perm], box[perm, :, 0], box[perm, :, 1]


def _chunk_ends(cuts: np.ndarray) -> list[int]:
    """Chunk ends: the given cuts (the last is the length), with long pieces split."""
    ends, start = [], 0
    for cut in cuts.tolist():
        ends.extend(range(start + _CHUNK, cut, _CHUNK))
        ends.append(cut)
        start = cut
    return ends


def _sweep_buffer(rk, wr, lo, hi, ends, srcs: list, dsts: list) -> None:
    """Report conflicting (earlier rank, later rank) pairs of one buffer's accesses (sorted by
    rank), keeping a pruned history of live accesses.  `ends`: where chunks end."""
    width = lo.shape[1]
    h_rk = np.zeros(0, np.int64)
    h_wr = np.zeros(0, bool)
    h_lo = np.zeros((0, width), np.int64)
    h_hi = np.zeros((0, width), np.int64)
    for s, end in zip([0] + ends[:-1], ends):
        c_rk, c_wr, c_lo, c_hi = rk[s:end], wr[s:end], lo[s:end], hi[s:end]
        a_rk = np.concatenate([h_rk, c_rk])
        a_wr = np.concatenate([h_wr, c_wr])
        a_lo = np.concatenate([h_lo, c_lo])
        a_hi = np.concatenate([h_hi, c_hi])

        # kill[j]: rank of the first write of this chunk that contains access j (and comes from
        # a later task, or from j's own task when j is a read); j is dead for anything after it.
        kill = np.full(len(a_rk), _NEVER, np.int64)
        wi = np.flatnonzero(c_wr)
        if len(wi):
            w_rk, w_lo, w_hi = c_rk[wi], c_lo[wi], c_hi[wi]
            inside = np.all((w_lo[:, None] <= a_lo[None]) & (a_hi[None] <= w_hi[:, None]), axis=2)
            later = (w_rk[:, None] > a_rk[None]) | ((w_rk[:, None] == a_rk[None]) & ~a_wr[None])
            kill = np.where(inside & later, w_rk[:, None], _NEVER).min(axis=0)

        overlap = np.all((c_lo[:, None] < a_hi[None]) & (a_lo[None] < c_hi[:, None]), axis=2)
        conflict = (
            overlap
            & (c_wr[:, None] | a_wr[None])
            & (a_rk[None] < c_rk[:, None])
            & (c_rk[:, None] <= kill[None])
        )
        i, j = np.nonzero(conflict)
        if len(i):
            srcs.append(a_rk[j])
            dsts.append(c_rk[i])

        live = kill == _NEVER
        h_rk, h_wr, h_lo, h_hi = a_rk[live], a_wr[live], a_lo[live], a_hi[live]
        if len(h_rk) > 1:
            # Both rules judge the same live history; each pruned access is justified by later
            # accesses only, so the induction on the order in the module doc still holds.
            drop = _covered_by_later_writes(h_rk, h_wr, h_lo, h_hi) | _superseded_reads(h_rk, h_wr, h_lo, h_hi)
            keep = ~drop
            h_rk, h_wr, h_lo, h_hi = h_rk[keep], h_wr[keep], h_lo[keep], h_hi[keep]


def _covered_by_later_writes(rk, wr, lo, hi) -> np.ndarray:
    """Mask of accesses whose region lies in the union of writes of strictly later ranks.
    Paints, on the grid of all box coordinates, the latest write rank covering each cell, then
    takes the minimum over each distinct box."""
    width = lo.shape[1]
    coords = [np.unique(np.concatenate([lo[:, d], hi[:, d]])) for d in range(width)]
    cells = 1
    for c in coords:
        cells *= len(c) - 1
    if cells > _GRID_LIMIT:
        return np.zeros(len(rk), bool)
    ilo = np.stack([np.searchsorted(coords[d], lo[:, d]) for d in range(width)], axis=1)
    ihi = np.stack([np.searchsorted(coords[d], hi[:, d]) for d in range(width)], axis=1)
    grid = np.full([len(c) - 1 for c in coords], -1, np.int64)
    writes = np.flatnonzero(wr)
    for k in writes[np.argsort(rk[writes], kind="stable")]:
        grid[tuple(slice(a, b) for a, b in zip(ilo[k], ihi[k]))] = rk[k]
    boxes, inverse = np.unique(np.concatenate([ilo, ihi], axis=1), axis=0, return_inverse=True)
    latest_min = np.array([grid[tuple(slice(a, b) for a, b in zip(bx[:width], bx[width:]))].min() for bx in boxes])
    return latest_min[inverse.reshape(-1)] > rk


def _superseded_reads(rk, wr, lo, hi) -> np.ndarray:
    """Mask of live reads R (task r) for which a later live read R2 (task r2) contains R's region
    and a live write W overlapping R lies between them.  Both live, W was reported after r (it
    writes what r read) and r2 after W (it reads what W wrote), so r -> W -> r2 is a chain, and
    whatever later conflicts with R (a write inside R) conflicts with R2.  This retires readers
    of a region that later writes never cover entirely, generation by generation."""
    out = np.zeros(len(rk), bool)
    r, w = np.flatnonzero(~wr), np.flatnonzero(wr)
    if len(r) < 2 or not len(w):
        return out
    r_rk, r_lo, r_hi = rk[r], lo[r], hi[r]
    w_rk, w_lo, w_hi = rk[w], lo[w], hi[w]
    hits = np.all((w_lo[:, None] < r_hi[None]) & (r_lo[None] < w_hi[:, None]), axis=2) & (w_rk[:, None] > r_rk[None])
    first_write = np.where(hits, w_rk[:, None], _NEVER).min(axis=0)
    candidates = np.flatnonzero(first_write < _NEVER)
    if not len(candidates):
        return out
    c_rk, c_lo, c_hi = first_write[candidates], r_lo[candidates], r_hi[candidates]
    sup = np.zeros(len(candidates), bool)
    for s in range(0, len(r), 512):  # blocks of containing reads bound the matrix size
        b_rk, b_lo, b_hi = r_rk[s:s + 512], r_lo[s:s + 512], r_hi[s:s + 512]
        contains = np.all((b_lo[:, None] <= c_lo[None]) & (c_hi[None] <= b_hi[:, None]), axis=2)
        sup |= (contains & (b_rk[:, None] > c_rk[None])).any(axis=0)
    out[r[candidates[sup]]] = True
    return out


def _group_by_consumer(src: np.ndarray, dst: np.ndarray, n: int) -> list[list[int]]:
    perm = np.lexsort((src, dst))
    src, dst = src[perm], dst[perm]
    cuts = np.searchsorted(dst, np.arange(n + 1))
    flat = src.tolist()
    return [flat[cuts[t]:cuts[t + 1]] for t in range(n)]
