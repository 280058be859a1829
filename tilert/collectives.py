"""Communication tasks of a multi-GPU step: how a rank's task graph gets them, and what they
compute (their VM semantics; the other kinds are in tilert/kernels.py).

A rank's graph is its local model (tilert/partition.py: its heads and FFN width) lowered as
usual by tilert/lower.py, then rewritten here:

- Residual updates become partial sums plus an all-reduce.  A task that reads and writes the
  same region of the residual `x` (o_proj, the dense down projection, the experts' down
  projection) writes its rank's partial sum into `partial{k % 2}` instead, and right after its
  op an `allreduce` op adds every rank's partial into x, tile by tile (the recipe's
  `allreduce_rows`, default `out_rows`: the producer's tiles, so each all-reduce tile waits only
  for the partials of its own rows, never for a whole-rank barrier).  Consecutive updates
  alternate between two partial buffers, so a fast rank can write update k+1 while slower ranks
  still read update k.
- Experts: the stacks hold the rank's block of experts; every expert task carries `experts`
  (that block) and skips the (token, slot)s routed elsewhere.  Their bytes are the expected
  share under uniform routing, E_local / E of the single-GPU bytes.
- LM head: only the rank's vocabulary tiles (reading its slice of the weight, `weight_row0`);
  an `allgather` op then copies every other rank's per-tile (max, argmax) before the argmax,
  which so picks the same token on every rank.  Logits stay where they were computed: the host
  reads each rank's columns.

Remote memory.  A communication task reads other ranks' buffers through regions on *peer
buffers*: `partial0@3` is rank 3's `partial0` (kind PEER).  Ranks only ever read remote memory
(a pull design).  The all-reduce is one-shot: each rank sums all N partials itself, in rank
order, so every rank computes bit-identical x with one exchange; for decode-sized messages
(B x H x 4 bytes: 16 KB per token for MiMo-V2-Flash) one round beats a ring's 2(N-1) steps.
"""

from __future__ import annotations

import dataclasses

from tilert.ir import ACTIVATION, PEER, WEIGHT, Buffer, Op, Region, Task, TaskGraph, region
from tilert.kernels import Memory
from tilert.lower import _tiles, lower_step, recipe_for_step, recipe_with
from tilert.partition import Partition

COMM_KINDS = ("allreduce", "allgather")
EXPERT_KINDS = ("expert_gate_up", "expert_down", "expert_gate_up_union", "expert_down_union")
RESIDUAL = "x"
F32 = 4


def peer_name(name: str, rank: int) -> str:
    """Rank `rank`'s buffer `name` as another rank names it (and as the union graph names every
    buffer: tilert/multigpu.py)."""
    return f"{name}@{rank}"


def buffer_rank(name: str) -> int:
    """The rank a union-graph buffer lives on."""
    return int(name.rsplit("@", 1)[1])


class _Emitter:
    """A task graph built op by op, ids assigned in emission order."""

    def __init__(self, buffers: dict[str, Buffer], tokens: int):
        self.buffers = dict(buffers)
        self.tokens = tokens
        self.ops: list[Op] = []
        self.tasks: list[Task] = []

    def op(self, kind: str, name: str, layer: int | None, tasks: list[Task]) -> None:
        o = Op(len(self.ops), kind, name, layer)
        for t in tasks:
            t = dataclasses.replace(t, id=len(self.tasks), op=o.id)
            o.tasks.append(t.id)
            self.tasks.append(t)
        self.ops.append(o)

    def peer(self, name: str, rank: int) -> Buffer:
        """Declare rank `rank`'s copy of local buffer `name` (same shape on every rank)."""
        b = self.buffers[name]
        p = self.buffers.setdefault(peer_name(name, rank), dataclasses.replace(b, name=peer_name(name, rank), kind=PEER))
        return p

    def resize_weight(self, name: str, shape: tuple[int, ...]) -> None:
        """A weight this rank holds only part of: its buffer and every region on it (weights are
        always read whole) take the rank's shape."""
        old = self.buffers[name]  # cut along its first dimension (vocabulary rows, or experts)
        self.buffers[name] = dataclasses.replace(old, shape=shape, nbytes=old.nbytes * shape[0] // old.shape[0])

    def graph(self) -> TaskGraph:
        full = {n: b.full() for n, b in self.buffers.items()}
        for t in self.tasks:  # regions on resized weights follow their buffer
            t.reads = [full[r.buffer] if self.buffers[r.buffer].kind == WEIGHT else r for r in t.reads]
        return TaskGraph(self.tokens, self.buffers, self.ops, self.tasks)


def _updates_residual(t: Task) -> bool:
    return any(w.buffer == RESIDUAL and w in t.reads for w in t.writes)


def _to_partial(t: Task, buf: str) -> Task:
    """A residual update rewritten to write this rank's partial sum into `buf`."""
    if t.kind == "linear":
        if any(s["out"] != RESIDUAL for s in t.params["segments"]):
            raise ValueError(f"task {t.id}: a residual update that also writes other buffers")
        params = dict(t.params, accumulate=False, segments=[dict(s, out=buf) for s in t.params["segments"]])
    elif t.kind in ("expert_down", "expert_down_union"):
        params = dict(t.params, out=buf, accumulate=False)
    else:
        raise ValueError(f"task {t.id}: no partial-sum form for residual updates of kind {t.kind!r}")
    swap = lambda r: Region(buf, r.box) if r.buffer == RESIDUAL else r  # noqa: E731
    reads = [r for r in t.reads if r.buffer != RESIDUAL]
    return dataclasses.replace(t, params=params, reads=reads, writes=[swap(w) for w in t.writes])


def lower_rank(part: Partition, rank: int, recipe: dict, tokens: int, max_seq_len: int,
               max_tokens: int | None = None) -> TaskGraph:
    """The unfused task graph of rank `rank`'s share of one step (see the module doc)."""
    s, n = part.ranks[rank], part.n
    recipe = recipe_for_step(recipe, tokens)  # this step size's tiles, for the all-reduce's rows too
    graph = lower_step(part.local_config(rank), recipe_with(recipe, "vocab_rows", part.vocab_tile_rows),
                       tokens=tokens, max_seq_len=max_seq_len, max_tokens=max_tokens)
    out = _Emitter(graph.buffers, tokens)
    E, E_local = part.cfg.n_routed_experts, s.experts[1] - s.experts[0]
    for name, b in graph.buffers.items():
        if b.kind == WEIGHT and len(b.shape) == 3:  # a stack of experts
            out.resize_weight(name, (E_local, *b.shape[1:]))
    out.resize_weight("lm_head.weight", (s.vocab_rows[1] - s.vocab_rows[0], part.cfg.hidden_size))
    H, B = part.cfg.hidden_size, tokens
    for k in (0, 1):
        out.buffers[f"partial{k}"] = Buffer(f"partial{k}", (B, H), "f32", ACTIVATION, B * H * F32)
    updates = 0
    peers = [p for p in range(n) if p != rank]

    for op in graph.ops:
        tasks = [graph.tasks[i] for i in op.tasks]
        if op.kind == "lm_head":
            t0, t1 = s.vocab_tiles
            tasks = [dataclasses.replace(t, params=dict(t.params, weight_row0=s.vocab_rows[0]))
                     for t in tasks if t0 <= t.params["tile"] < t1]
        if op.kind == "argmax":
            _emit_allgather(out, part, rank, peers)
        tasks = [dataclasses.replace(t, params=dict(t.params, experts=list(s.experts)),
                                     bytes=t.bytes * E_local // E) if t.kind in EXPERT_KINDS else t
                 for t in tasks]
        residual = [_updates_residual(t) for t in tasks]
        if any(residual) and not all(residual):
            raise ValueError(f"op {op.name}: only some of its tasks update the residual")
        if any(residual):
            buf = f"partial{updates % 2}"
            updates += 1
            out.op(op.kind, op.name, op.layer, [_to_partial(t, buf) for t in tasks])
            _emit_allreduce(out, recipe, op, buf, rank, n)
        else:
            out.op(op.kind, op.name, op.layer, tasks)
    return out.graph()


def _emit_allreduce(out: _Emitter, recipe: dict, after: Op, buf: str, rank: int, n: int) -> None:
    """x[:, tile] += sum over ranks of partial[:, tile], one task per tile of rows."""
    x, part_buf = out.buffers[RESIDUAL], out.buffers[buf]
    tasks = []
    for c0, c1 in _tiles(x.shape[1], recipe.get("allreduce_rows", recipe["out_rows"])):
        own = region(part_buf, None, (c0, c1))
        remote = [Region(out.peer(buf, p).name, own.box) for p in range(n) if p != rank]
        xr = region(x, None, (c0, c1))
        tasks.append(Task(0, 0, "allreduce", {"src": buf, "dst": RESIDUAL, "cols": [c0, c1]},
                          [own, *remote, xr], [xr], 3 * own.volume * F32, own.volume * n))
    out.op("allreduce", f"{after.name}.allreduce", after.layer, tasks)


def _emit_allgather(out: _Emitter, part: Partition, rank: int, peers: list[int]) -> None:
    """Copy each other rank's per-tile (max, argmax) of the LM head into this rank's table."""
    best = out.buffers["best_partial"]
    tasks = []
    for p in peers:
        t0, t1 = part.ranks[p].vocab_tiles
        mine = region(best, None, (t0, t1))
        tasks.append(Task(0, 0, "allgather", {"src": "best_partial", "dst": "best_partial", "rank": p,
                                              "tiles": [t0, t1]},
                          [Region(out.peer("best_partial", p).name, mine.box)], [mine], mine.volume * 8, 0))
    out.op("allgather", "lm_head.allgather", None, tasks)


# ---- VM semantics -------------------------------------------------------------------------------


def allreduce(p, m: Memory, ranks: list[Memory]) -> None:
    """x[:, cols] += partial_0 + partial_1 + ... in rank order: the same sum, bit for bit, on
    every rank."""
    c0, c1 = p["cols"]
    total = ranks[0][p["src"]][:, c0:c1].clone()
    for other in ranks[1:]:
        total += other[p["src"]][:, c0:c1]
    m[p["dst"]][:, c0:c1] += total


def allgather(p, m: Memory, ranks: list[Memory]) -> None:
    t0, t1 = p["tiles"]
    m[p["dst"]][:, t0:t1] = ranks[p["rank"]][p["src"]][:, t0:t1]


COMM_KERNELS = {"allreduce": allreduce, "allgather": allgather}
