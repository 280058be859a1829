"""The tile-level IR: buffers, regions, tile tasks, ops, and the task graph of one decode step.

An *op* (one RMSNorm, one projection, one attention...) splits into *tasks*, the unit a
persistent worker (one per SM) executes.  Every task declares the regions of named buffers it
reads and writes.  Dependencies are never written by hand: they follow from overlapping
regions (read-after-write, write-after-read, write-after-write) in program order.  That is
what lets the validator check a schedule independently of how it was built.

Regions are boxes: one half-open [lo, hi) interval per buffer dimension.  Accesses whose
position is only known at run time (the KV slot of the current token, the expert the router
picked) are declared over the whole extent they may touch, so the static analysis is sound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Buffer kinds.
WEIGHT = "weight"  # read-only model parameters
INPUT = "input"  # written by the host before a step (token ids, positions)
ACTIVATION = "activation"  # scratch within a step
STATE = "state"  # persists across steps (KV caches)
OUTPUT = "output"  # read by the host after a step (logits, chosen tokens)
LOCAL = "local"  # private to the fused tasks that produce and consume it: never in global memory
PEER = "peer"  # multi-GPU: another rank's buffer, read by communication tasks over NVLink


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "f32", "i32", or the storage format of a weight ("bf16", "fp8", "mxfp4", ...)
    kind: str
    nbytes: int = 0  # bytes in device memory (weights: as stored, scales included)

    def full(self) -> "Region":
        return Region(self.name, tuple((0, n) for n in self.shape))


@dataclass(frozen=True)
class Region:
    buffer: str
    box: tuple[tuple[int, int], ...]

    def overlaps(self, other: "Region") -> bool:
        if self.buffer != other.buffer:
            return False
        return all(a_lo < b_hi and b_lo < a_hi for (a_lo, a_hi), (b_lo, b_hi) in zip(self.box, other.box))

    def contains(self, other: "Region") -> bool:
        return self.buffer == other.buffer and all(
            a_lo <= b_lo and b_hi <= a_hi for (a_lo, a_hi), (b_lo, b_hi) in zip(self.box, other.box)
        )

    @property
    def volume(self) -> int:
        v = 1
        for lo, hi in self.box:
            v *= hi - lo
        return v

    def to_json(self) -> list:
        return [self.buffer, [list(iv) for iv in self.box]]

    @staticmethod
    def from_json(j: list) -> "Region":
        return Region(j[0], tuple(tuple(iv) for iv in j[1]))


def region(buf: Buffer, *box: tuple[int, int] | int | None) -> Region:
    """A region of `buf`: per leading dim an (lo, hi) pair, an index, or None for the full
    extent; trailing dims not given are full."""
    ivs = []
    for d, n in enumerate(buf.shape):
        b = box[d] if d < len(box) else None
        if b is None:
            ivs.append((0, n))
        elif isinstance(b, int):
            ivs.append((b, b + 1))
        else:
            ivs.append((int(b[0]), int(b[1])))
    return Region(buf.name, tuple(ivs))


@dataclass
class Task:
    """One tile of one op.  `kind` names its semantics (see tilert/kernels.py); `params` holds
    everything that differs between tiles of an op (JSON-serialisable)."""

    id: int
    op: int
    kind: str
    params: dict[str, Any]
    reads: list[Region]
    writes: list[Region]
    bytes: int = 0  # bytes moved through device memory (weights as stored + activations)
    flops: int = 0
    # A fused task executes its stages in order; buffers in `local` live only inside the task.
    stages: list["Task"] = field(default_factory=list)
    local: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = {
            "id": self.id, "op": self.op, "kind": self.kind, "params": self.params,
            "reads": [r.to_json() for r in self.reads], "writes": [w.to_json() for w in self.writes],
            "bytes": self.bytes, "flops": self.flops,
        }
        if self.stages:
            d["stages"] = [s.to_json() for s in self.stages]
            d["local"] = self.local
        return d

    @staticmethod
    def from_json(d: dict) -> "Task":
        return Task(
            d["id"], d["op"], d["kind"], d["params"],
            [Region.from_json(r) for r in d["reads"]], [Region.from_json(w) for w in d["writes"]],
            d.get("bytes", 0), d.get("flops", 0),
            [Task.from_json(s) for s in d.get("stages", [])], d.get("local", []),
        )


@dataclass
class Op:
    """A graph node before tiling: a name for people (`layer3.q_proj`), a kind, its tasks."""

    id: int
    kind: str
    name: str
    layer: int | None
    tasks: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "name": self.name, "layer": self.layer, "tasks": self.tasks}

    @staticmethod
    def from_json(d: dict) -> "Op":
        return Op(d["id"], d["kind"], d["name"], d["layer"], list(d["tasks"]))


@dataclass
class TaskGraph:
    """All tasks of one decode step of `tokens` tokens, in a valid sequential (program) order,
    with dependencies derived from their regions."""

    tokens: int
    buffers: dict[str, Buffer]
    ops: list[Op]
    tasks: list[Task]
    deps: list[list[int]] = field(default_factory=list)  # deps[t]: tasks t must wait for

    def op_of(self, task: Task) -> Op:
        return self.ops[task.op]
