"""Schedule -> one persistent CUDA kernel for Hopper (sm_90a), plus the data it runs on.

`generate(schedule, cfg)` returns a `GeneratedKernel`:

- `source`: a small generated prelude (sizes, ids, parameter structs, the stage dispatch) that
  includes the static device code in tilert/cuda/*.cuh;
- `program`: the encoded instruction streams (int32), one per worker (= CTA = SM);
- the memory plan: where every non-weight buffer lives (one activation arena, one persistent
  state arena for the KV caches, constant tables), which slot of the weight table each weight
  takes, and where task-local buffers sit in shared memory.

Program layout (int32 words)::

    header   [MAGIC, VERSION, num_workers, num_tasks, num_counters, targets_at, streams_at, param_words]
    targets  [num_counters]           per-step target of each counter
    streams  [num_workers]            word index of each worker's stream
    stream   [n_tasks, task...]
    task     [task_id, n_waits, n_signals, n_stages | IDS_KNOWN (flag), (counter, value) * n_waits,
              counter * n_signals, (kind, param word * PARAM_WORDS) * n_stages]

IDS_KNOWN marks a task whose tiles name routed experts (ROUTED_KINDS) when an earlier task of
the same worker's stream read the same layer's expert ids: the loader waited for those ids then,
and they stay put until this task is done (the next layer's top-k depends on it), so it streams
this task's experts at once instead of waiting for the task's inputs (`routed_ids_known`).

A stage's parameter words are one of the structs in STRUCTS, zero-padded to PARAM_WORDS.  The
C++ structs are generated from the same tables that pack them here, so they cannot disagree.
A linear stage with several segments becomes one encoded stage per segment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import MimoConfig
from tilert.errors import UserError
from tilert.ir import (
    ACTIVATION,
    INPUT,
    OUTPUT,
    STATE,
    WEIGHT,
    Region,
    Task,
)
from tilert.schedule import Schedule
from tilert.tiling import ROW_BLOCK, STEP_BYTES, STEP_COLS, step_block_bytes, tileable

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
KERNEL_NAME = "tilert_megakernel"
MAGIC = 0x544C5254  # "TLRT"
VERSION = 1
# Header bit of a task's stage count: the loader may stream its routed experts at once (module doc).
IDS_KNOWN = 1 << 16
# Kinds whose weight tiles name an expert chosen by the router this step (the loader reads the id).
ROUTED_KINDS = frozenset({"expert_gate_up", "expert_down", "expert_gate_up_union", "expert_down_union"})

# ---- ids shared with the device code ----------------------------------------------------------

FORMATS = {"fp32": 0, "bf16": 1, "fp8": 2, "mxfp4": 3}
FORMAT_ALIASES = {"f32": "fp32"}
SPACES = {"act": 0, "state": 1, "const": 2, "smem": 3, "scratch": 4}
ERRORS = {"hang": 1, "ring_stall": 2, "gemv_path": 3}
CTRL = {"abort": 0, "issued": 1, "done": 2}  # smem control words (see megakernel.cuh)
PROG = {"magic": 0, "version": 1, "workers": 2, "tasks": 3, "counters": 4, "targets": 5, "streams": 6,
        "param_words": 7}
HEADER_WORDS = 8
MAX_ERRORS = 64
ERROR_WORDS = 8 + 8 * MAX_ERRORS

SMEM_LIMIT = 232448  # H100 / H200: 227 KB of dynamic shared memory per block
# 7 compute warps + 1 loader warp = 256 threads: ptxas allots registers per 4 warps, so a 9th
# warp would cut the budget from 255 to 168 registers a thread.
COMPUTE_WARPS = 11  # + 1 loader warp: 384 threads, up to 168 registers (H200, 2026-12-04, 6-layer flash
# step: 11 warps 1244 us, 15 1270, 13 1335, 9 1278, 7 1390; B = 8: 11 5410 us, 15 5719)
MIN_SLOT_ROW_BYTES = 4096  # a ring slot holds one 4 KiB row (an fp8 row of 4096) per compute warp
RING_SLOTS = 4
# Steps of 8 tokens (a DFlash block): their x staging leaves ~84 KB for the ring, and 4 slots of
# 21 KB cut every MXFP4 expert row block (34 KB) in two pieces; 2 slots hold a whole one.  H100,
# 2026-12-07, 6-layer flash verify step (tools/ab_plain.py --tokens 8): 2 slots -3.1 % against 4
# (5025.0 -> 4869.8 us; BENCHMARKS.md stop 22 call 1).  Steps of 5..7 tokens, with more room
# (a third slot of 44 KB fits at 5), keep RING_SLOTS until measured.
MULTI_RING_SLOTS = 2
# GEMVs on the tensor cores (gemv.cuh, gemv_tile_mma) for these storage formats, at steps of up
# to 8 tokens; x is staged in shared memory (hi/lo halves), so rows longer than xs_limit(B)
# per step stay on the CUDA-core loop.  The limit admits one token's x of 16384 columns (the
# dense FFN's down projection: 23 instead of 81 us a layer on the tensor cores, measured on an
# H200, 2026-12-04) and the 8 slots' x of an expert down projection of 2048 columns, staged
# together; attention reuses that area for its chunk buffers.
MMA_FORMATS = ("mxfp4", "fp8", "bf16")
MMA_MAX_TOKENS = 8  # two n8 mma tiles of 4 tokens' hi/lo each, fed by one decode of the weight
XS_LIMIT_BYTES = 65 * 1024
# Steps of 5..8 tokens (speculative verification) stage up to this much x: 8 tokens of a 4096-wide
# row (129 KiB) fit beside a ring of 2 slots that hold a whole MXFP4 row block each.
MULTI_XS_LIMIT_BYTES = 130 * 1024


def xs_limit(tokens: int) -> int:
    """The most shared memory the staged x of one tensor-core GEMV may take at this step size."""
    return XS_LIMIT_BYTES if tokens <= 4 else MULTI_XS_LIMIT_BYTES


def parse_mma_formats(arg: str) -> tuple[str, ...]:
    """A tool's --mma value: comma-separated formats out of MMA_FORMATS, or "none"."""
    if arg == "none":
        return ()
    formats = tuple(arg.split(","))
    unknown = [f for f in formats if f not in MMA_FORMATS]
    if unknown:
        raise UserError(f"--mma {arg}: {', '.join(unknown)} not among {', '.join(MMA_FORMATS)} (or 'none')")
    return formats

# ---- struct tables (one source of truth for C++ and for packing) --------------------------------

# Field types: "ref" (Ref: 3 x int32), "i32", "f32"; host structs also "u32", "u64", "ptr".
_CTYPE = {"i32": "int32_t", "u32": "uint32_t", "f32": "float", "u64": "uint64_t", "i64": "int64_t",
          "ptr": "void*", "ref": "Ref"}
_NPTYPE = {"i32": "<i4", "u32": "<u4", "f32": "<f4", "u64": "<u8", "i64": "<i8", "ptr": "<u8"}
_SIZE = {"i32": 4, "u32": 4, "f32": 4, "u64": 8, "i64": 8, "ptr": 8, "ref": 12}

REF = (("space", "i32"), ("offset", "i32"), ("ld", "i32"))

STRUCTS: dict[str, tuple[tuple[str, str], ...]] = {
    "EmbedParams": (("tokens", "ref"), ("out", "ref"), ("table", "i32"), ("c0", "i32"), ("c1", "i32")),
    "RmsnormParams": (("in", "ref"), ("out", "ref"), ("weight", "i32"), ("eps", "f32"), ("cols", "i32"),
                      ("r0", "i32"), ("r1", "i32"), ("c0", "i32"), ("c1", "i32")),
    "LinearParams": (("in", "ref"), ("out", "ref"), ("weight", "i32"), ("r0", "i32"), ("r1", "i32"),
                     ("c0", "i32"), ("acc", "i32")),
    "RopeParams": (("buf", "ref"), ("positions", "ref"), ("inv_freq", "ref"), ("col0", "i32"), ("rdim", "i32")),
    "KvWriteParams": (("k", "ref"), ("v", "ref"), ("k_cache", "ref"), ("v_cache", "ref"), ("positions", "ref"),
                      ("kcol0", "i32"), ("vcol0", "i32"), ("hd", "i32"), ("vd", "i32"), ("slots", "i32"),
                      ("ring", "i32"), ("value_scale", "f32")),
    "AttentionParams": (("q", "ref"), ("k_cache", "ref"), ("v_cache", "ref"), ("positions", "ref"), ("mx", "ref"),
                        ("sm", "ref"), ("acc", "ref"), ("h0", "i32"), ("group", "i32"), ("hd", "i32"),
                        ("vd", "i32"), ("split", "i32"), ("splits", "i32"), ("window", "i32"), ("slots", "i32"),
                        ("scale", "f32"), ("ms", "i32"), ("causal", "i32")),
    "CaptureParams": (("in", "ref"), ("out", "ref"), ("c0", "i32"), ("c1", "i32")),
    "DraftEmbedParams": (("tokens", "ref"), ("out", "ref"), ("table", "i32"), ("mask", "i32"), ("c0", "i32"),
                         ("c1", "i32")),
    "AttnCombineParams": (("mx", "ref"), ("sm", "ref"), ("acc", "ref"), ("out", "ref"), ("sink", "i32"),
                          ("h0", "i32"), ("h1", "i32"), ("splits", "i32"), ("ms", "i32"), ("vd", "i32")),
    "GateUpParams": (("in", "ref"), ("out", "ref"), ("gate", "i32"), ("up", "i32"), ("r0", "i32"), ("r1", "i32")),
    "TopkParams": (("logits", "ref"), ("idx", "ref"), ("weights", "ref"), ("bias", "i32"), ("experts", "i32"),
                   ("k", "i32"), ("norm", "i32"), ("scale", "f32")),
    "ExpertGateUpParams": (("in", "ref"), ("idx", "ref"), ("out", "ref"), ("gate", "i32"), ("up", "i32"),
                           ("token", "i32"), ("slot", "i32"), ("r0", "i32"), ("r1", "i32"), ("inter", "i32")),
    "ExpertDownParams": (("act", "ref"), ("idx", "ref"), ("weights", "ref"), ("out", "ref"), ("down", "i32"),
                         ("r0", "i32"), ("r1", "i32"), ("k", "i32"), ("inter", "i32")),
    "ExpertUnionParams": (("idx", "ref"), ("distinct", "ref"), ("route", "ref"), ("k", "i32"), ("slots", "i32")),
    "ExpertGateUpUnionParams": (("in", "ref"), ("distinct", "ref"), ("route", "ref"), ("out", "ref"), ("gate", "i32"),
                                ("up", "i32"), ("slot", "i32"), ("r0", "i32"), ("r1", "i32"), ("k", "i32"),
                                ("inter", "i32")),
    "ExpertDownUnionParams": (("act", "ref"), ("distinct", "ref"), ("route", "ref"), ("weights", "ref"), ("out", "ref"),
                              ("down", "i32"), ("r0", "i32"), ("r1", "i32"), ("k", "i32"), ("inter", "i32"),
                              ("slots", "i32")),
    "LmHeadParams": (("in", "ref"), ("logits", "ref"), ("best", "ref"), ("positions", "ref"), ("sampling", "ref"),
                     ("weight", "i32"), ("r0", "i32"), ("r1", "i32"), ("tile", "i32")),
    "ArgmaxParams": (("best", "ref"), ("out", "ref"), ("ntiles", "i32")),
}

# Host-filled structs (natural C alignment; numpy's aligned dtype matches it).
WEIGHT_DESC = (("data", "ptr"), ("scale", "ptr"), ("expert_bytes", "i64"), ("expert_scale_bytes", "i64"),
               ("fmt", "i32"), ("rows", "i32"), ("cols", "i32"), ("experts", "i32"), ("row_bytes", "i32"),
               ("scale_ld", "i32"), ("tiled", "i32"), ("pad1", "i32"))
KERNEL_ARGS = (("program", "ptr"), ("counters", "ptr"), ("act", "ptr"), ("state", "ptr"), ("consts", "ptr"),
               ("scratch", "ptr"), ("weights", "ptr"), ("errors", "ptr"), ("profile", "ptr"),
               ("timeout_ns", "u64"), ("step", "u32"), ("stop_after", "i32"))


@dataclass(frozen=True)
class Kind:
    name: str  # base kind of tilert/kernels.py
    struct: str
    function: str  # device function in tilert/cuda/kinds.cuh
    streams_weights: bool  # reads weight tiles through the ring (has a `tiles_of`)


KINDS = [
    Kind("embed", "EmbedParams", "k_embed", False),
    Kind("rmsnorm", "RmsnormParams", "k_rmsnorm", False),
    Kind("linear", "LinearParams", "k_linear", True),
    Kind("rope", "RopeParams", "k_rope", False),
    Kind("kv_write", "KvWriteParams", "k_kv_write", False),
    Kind("attention", "AttentionParams", "k_attention", False),
    Kind("attn_combine", "AttnCombineParams", "k_attn_combine", False),
    Kind("gate_up", "GateUpParams", "k_gate_up", True),
    Kind("router", "LinearParams", "k_linear", True),
    Kind("topk", "TopkParams", "k_topk", False),
    Kind("expert_gate_up", "ExpertGateUpParams", "k_expert_gate_up", True),
    Kind("expert_down", "ExpertDownParams", "k_expert_down", True),
    Kind("lm_head", "LmHeadParams", "k_lm_head", True),
    Kind("argmax", "ArgmaxParams", "k_argmax", False),
    Kind("capture", "CaptureParams", "k_capture", False),
    Kind("draft_embed", "DraftEmbedParams", "k_draft_embed", False),  # the DFlash draft step (tilert/draft.py)
    # multi-token steps with recipe key `expert_union`: each distinct selected expert read once
    Kind("expert_union", "ExpertUnionParams", "k_expert_union", False),
    Kind("expert_gate_up_union", "ExpertGateUpUnionParams", "k_expert_gate_up_union", True),
    Kind("expert_down_union", "ExpertDownUnionParams", "k_expert_down_union", True),
]
KIND_ID = {k.name: i + 1 for i, k in enumerate(KINDS)}  # 0 is never a valid kind
KIND_BY_ID = {i + 1: k for i, k in enumerate(KINDS)}


def struct_words(name: str) -> int:
    return sum(_SIZE[t] for _, t in STRUCTS[name]) // 4


PARAM_WORDS = max(struct_words(s) for s in STRUCTS)
STAGE_WORDS = 1 + PARAM_WORDS


def numpy_dtype(fields) -> np.dtype:
    """The host-side image of a struct table (same order, C alignment)."""
    return np.dtype([(n, _NPTYPE[t]) for n, t in fields], align=True)


def _c_struct(name: str, fields) -> str:
    body = "".join(f"  {_CTYPE[t]} {n};\n" for n, t in fields)
    return f"struct {name} {{\n{body}}};\n"


# ---- the memory plan ---------------------------------------------------------------------------

_ELEM = {"f32": 4, "i32": 4, "f64": 8}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class BufferSlot:
    """Where a global (non-weight, non-local) buffer lives."""
    name: str
    space: str  # "act" or "state"
    offset: int  # bytes from the arena's start
    shape: tuple[int, ...]
    dtype: str
    kind: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ELEM[self.dtype]


@dataclass
class WeightSlot:
    index: int
    name: str
    fmt: str  # storage format the kernel was generated for
    shape: tuple[int, ...]
    row_bytes: int
    tiled: bool = False  # uploaded in the tiled layout (tilert/tiling.py) rather than row-major


@dataclass
class GeneratedKernel:
    source: str
    program: np.ndarray
    tokens: int
    num_workers: int
    threads: int
    smem_bytes: int
    loader: bool
    slots: int
    slot_bytes: int
    act_bytes: int
    state_bytes: int
    scratch_stride: int  # bytes of global scratch per worker (locals that do not fit smem)
    consts: np.ndarray  # float32 constant tables (RoPE inverse frequencies)
    buffers: dict[str, BufferSlot]
    weights: list[WeightSlot]
    counter_targets: list[int]
    task_names: list[str]  # per task id: "op name (kind)"
    worker_of: list[int]
    locals_in_smem: bool
    kernel_name: str = KERNEL_NAME
    notes: list[str] = field(default_factory=list)
    mma_formats: list[str] = field(default_factory=list)  # weight formats whose GEMVs use the tensor cores

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_counters(self) -> int:
        return len(self.counter_targets)

    def save(self, out_dir: str | Path) -> None:
        """kernel.json (everything but the arrays), program.npy, consts.npy and kernel.cu."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("source", "program", "consts")}
        (out / "kernel.json").write_text(json.dumps(meta))
        np.save(out / "program.npy", self.program)
        np.save(out / "consts.npy", self.consts)
        (out / "kernel.cu").write_text(self.source)

    @staticmethod
    def load(path: str | Path) -> GeneratedKernel:
        root = Path(path)
        meta = json.loads((root / "kernel.json").read_text())
        meta["buffers"] = {n: BufferSlot(**{**b, "shape": tuple(b["shape"])}) for n, b in meta["buffers"].items()}
        meta["weights"] = [WeightSlot(**{**w, "shape": tuple(w["shape"])}) for w in meta["weights"]]
        return GeneratedKernel(source=(root / "kernel.cu").read_text(), program=np.load(root / "program.npy"),
                               consts=np.load(root / "consts.npy"), **meta)

    def describe(self) -> str:
        return (f"B={self.tokens} workers={self.num_workers} threads={self.threads} tasks={self.num_tasks} "
                f"program={self.program.size * 4 / 1024:.0f} KiB smem={self.smem_bytes} "
                f"ring={self.slots}x{self.slot_bytes} act={self.act_bytes} "
                f"state={self.state_bytes} locals={'smem' if self.locals_in_smem else 'global'} "
                f"mma={','.join(self.mma_formats) or 'none'} tiled={sum(w.tiled for w in self.weights)}/"
                f"{len(self.weights)}")


def _row_bytes(fmt: str, cols: int) -> int:
    return {"fp32": 4 * cols, "bf16": 2 * cols, "fp8": cols, "mxfp4": cols // 2}[fmt]


class _Plan:
    """Arena offsets, weight slots and constant tables for one schedule."""

    def __init__(self, schedule: Schedule, weight_formats: dict[str, str]):
        g = schedule.graph
        self.graph = g
        self.buffers: dict[str, BufferSlot] = {}
        act = 0
        for name, b in g.buffers.items():
            if b.kind in (INPUT, ACTIVATION, OUTPUT):
                act = _align(act, 256)
                self.buffers[name] = BufferSlot(name, "act", act, tuple(b.shape), b.dtype, b.kind)
                act += self.buffers[name].nbytes
        state = 0
        for name in sorted(n for n, b in g.buffers.items() if b.kind == STATE):  # same layout for every B
            b = g.buffers[name]
            state = _align(state, 256)
            self.buffers[name] = BufferSlot(name, "state", state, tuple(b.shape), b.dtype, b.kind)
            state += self.buffers[name].nbytes
        self.act_bytes, self.state_bytes = _align(act, 256), _align(state, 256)
        self.weights: dict[str, WeightSlot] = {}
        for name, b in g.buffers.items():
            if b.kind == WEIGHT:
                fmt = weight_formats.get(name, b.dtype)
                fmt = FORMAT_ALIASES.get(fmt, fmt)
                if fmt not in FORMATS:
                    raise UserError(f"weight {name}: storage format {fmt!r} has no GPU kernel "
                                    f"(supported: {', '.join(FORMATS)})")
                cols = b.shape[-1]
                self.weights[name] = WeightSlot(len(self.weights), name, fmt, tuple(b.shape), _row_bytes(fmt, cols))
        self.consts: list[float] = []
        self._const_at: dict[tuple, int] = {}

    def rope_table(self, theta: float, rdim: int) -> int:
        """Element offset of the RoPE inverse frequencies, computed exactly as tilert.kernels.rope."""
        key = (float(theta), int(rdim))
        if key not in self._const_at:
            inv = 1.0 / (theta ** (torch.arange(0, rdim, 2, dtype=torch.float32) / rdim))
            self._const_at[key] = _align(len(self.consts), 4)
            self.consts += [0.0] * (self._const_at[key] - len(self.consts)) + inv.tolist()
        return self._const_at[key]


@dataclass
class _LocalView:
    space: str
    base: int  # element offset of the box's first element in its space
    r_lo: int
    c_lo: int
    ld: int


def _local_boxes(task: Task, local: list[str]) -> dict[str, tuple[int, int, int, int]]:
    """Per local buffer, the (r_lo, r_hi, c_lo, c_hi) box the task's stages really touch: every
    stage read and write except the whole-buffer write a recomputed RMSNorm declares (the norm
    is then computed only for these rows and stored only for these columns)."""
    boxes = {}
    for name in local:
        regs: list[Region] = []
        for s in task.stages:
            regs += [r for r in s.reads if r.buffer == name]
            if s.kind != "rmsnorm":
                regs += [w for w in s.writes if w.buffer == name]
        if not regs:
            raise UserError(f"task {task.id}: local buffer {name} is written but never read")
        if any(len(r.box) != 2 for r in regs):
            raise UserError(f"task {task.id}: local buffer {name} is not 2-D; the GPU kernel keeps 2-D locals only")
        boxes[name] = (min(r.box[0][0] for r in regs), max(r.box[0][1] for r in regs),
                       min(r.box[1][0] for r in regs), max(r.box[1][1] for r in regs))
    return boxes


class _Encoder:
    """Turns each stage of a task into parameter dicts, resolving buffer names to views."""

    def __init__(self, plan: _Plan, schedule: Schedule, cfg: MimoConfig):
        self.plan, self.s, self.cfg = plan, schedule, cfg
        self.g = schedule.graph
        self.B = self.g.tokens
        self.views: dict[str, _LocalView] = {}
        self.boxes: dict[str, tuple[int, int, int, int]] = {}
        self.vector_views: list[dict] = []  # views read with float4 loads (16-byte alignment checks)

    # -- refs --
    def ref(self, name: str, elem: int = 0, ld: int | None = None) -> dict:
        if name in self.views:
            v = self.views[name]
            return {"space": SPACES[v.space], "offset": v.base - v.r_lo * v.ld - v.c_lo + elem, "ld": v.ld}
        slot = self.plan.buffers.get(name)
        if slot is None:
            raise UserError(f"buffer {name!r} is neither global nor local to the task")
        esize = _ELEM[slot.dtype]
        row = math.prod(slot.shape[1:]) if len(slot.shape) > 1 else 0
        return {"space": SPACES[slot.space], "offset": slot.offset // esize + elem, "ld": row if ld is None else ld}

    def w(self, name: str | None) -> int:
        return -1 if name is None else self.plan.weights[name].index

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.g.buffers[name].shape)

    # -- per kind --
    def stage(self, st: Task) -> list[tuple[str, dict]]:
        return getattr(self, "_" + st.kind)(st.params)

    def _embed(self, p):
        return [("embed", {"tokens": self.ref("tokens"), "out": self.ref("x"),
                           "table": self.w("model.embed_tokens.weight"), "c0": p["cols"][0], "c1": p["cols"][1]})]

    def _capture(self, p):
        # the hidden output holds one residual-width slot per captured layer
        width = self.shape("x")[1]
        return [("capture", {"in": self.ref("x"), "out": self.ref("hidden", elem=p["slot"] * width),
                             "c0": p["cols"][0], "c1": p["cols"][1]})]

    def _rmsnorm(self, p):
        rows, cols = self.shape(p["in"])
        r0, r1, c0, c1 = self.boxes.get(p["out"], (0, rows, 0, cols))
        return [("rmsnorm", {"in": self.ref(p["in"]), "out": self.ref(p["out"]), "weight": self.w(p["weight"]),
                             "eps": p.get("eps", 1e-5), "cols": cols, "r0": r0, "r1": r1, "c0": c0, "c1": c1})]

    def _linear(self, p):
        out = []
        for seg in p["segments"]:
            (r0, r1), (c0, c1) = seg["rows"], seg["cols"]
            if r1 - r0 != c1 - c0:
                raise UserError(f"linear segment {seg}: rows and output columns differ in count")
            x = self.ref(p["in"])
            self.vector_views.append(x)
            out.append(("linear", {"in": x, "out": self.ref(seg["out"]), "weight": self.w(seg["weight"]),
                                   "r0": r0, "r1": r1, "c0": c0, "acc": int(bool(p["accumulate"]))}))
        return out

    def _draft_embed(self, p):
        return [("draft_embed", {"tokens": self.ref("tokens"), "out": self.ref("x"), "table": self.w(p["embed"]),
                                 "mask": self.w(p["mask"]), "c0": p["cols"][0], "c1": p["cols"][1]})]

    def _rope(self, p):
        # "positions" may name another position buffer (the draft step's context rows)
        return [("rope", {"buf": self.ref(p["buf"]), "positions": self.ref(p.get("positions", "positions")),
                          "inv_freq": {"space": SPACES["const"], "offset": self.plan.rope_table(p["theta"], p["rotary_dim"]),
                                       "ld": 0},
                          "col0": p["head"] * p["head_dim"], "rdim": p["rotary_dim"]})]

    def _cache_ref(self, name: str, head: int) -> dict:
        _, kvh, d = self.shape(name)
        return self.ref(name, elem=head * d, ld=kvh * d)

    def _kv_write(self, p):
        g = p["head"]
        hd, vd = self.shape(p["k_cache"])[2], self.shape(p["v_cache"])[2]
        # k, v and positions may name other buffers (the draft step's context path)
        return [("kv_write", {"k": self.ref(p.get("k", "k")), "v": self.ref(p.get("v", "v")),
                              "k_cache": self._cache_ref(p["k_cache"], g), "v_cache": self._cache_ref(p["v_cache"], g),
                              "positions": self.ref(p.get("positions", "positions")),
                              "kcol0": g * hd, "vcol0": g * vd, "hd": hd, "vd": vd, "slots": p["slots"],
                              "ring": int(bool(p.get("ring") or p.get("window"))), "value_scale": p["value_scale"]})]

    def _attention(self, p):
        g, group = p["kv_head"], p["group"]
        hd, vd = self.shape(p["k_cache"])[2], self.shape(p["v_cache"])[2]
        _, _, ms = self.shape("attn_max")
        q, kc = self.ref("q"), self._cache_ref(p["k_cache"], g)
        # q heads and cached keys are read as float4: the head starts must be 16-byte aligned too.
        vcr = self._cache_ref(p["v_cache"], g)
        self.vector_views += [{**q, "offset": q["offset"] + g * group * hd}, kc, {**q, "ld": hd}, vcr]
        return [("attention", {"q": q, "k_cache": kc,
                               "v_cache": self._cache_ref(p["v_cache"], g), "positions": self.ref("positions"),
                               "mx": self.ref("attn_max"), "sm": self.ref("attn_sum"), "acc": self.ref("attn_acc"),
                               "h0": g * group, "group": group, "hd": hd, "vd": vd, "split": p["split"],
                               "splits": p["splits"], "window": p["window"], "slots": p["slots"], "scale": p["scale"],
                               "ms": ms, "causal": int(bool(p.get("causal", True)))})]

    def _attn_combine(self, p):
        _, _, ms, vd = self.shape("attn_acc")
        self.vector_views.append(self.ref("attn_acc"))  # read as float4
        return [("attn_combine", {"mx": self.ref("attn_max"), "sm": self.ref("attn_sum"), "acc": self.ref("attn_acc"),
                                  "out": self.ref("attn_out"), "sink": self.w(p["sink"]), "h0": p["heads"][0],
                                  "h1": p["heads"][1], "splits": p["splits"], "ms": ms, "vd": vd})]

    def _gate_up(self, p):
        x = self.ref(p["in"])
        self.vector_views.append(x)
        return [("gate_up", {"in": x, "out": self.ref(p["out"]), "gate": self.w(p["gate"]), "up": self.w(p["up"]),
                             "r0": p["rows"][0], "r1": p["rows"][1]})]

    def _router(self, p):
        (e0, e1), x = p["rows"], self.ref(p["in"])
        self.vector_views.append(x)
        return [("router", {"in": x, "out": self.ref("router_logits"), "weight": self.w(p["weight"]),
                            "r0": e0, "r1": e1, "c0": e0, "acc": 0})]

    def _topk(self, p):
        return [("topk", {"logits": self.ref("router_logits"), "idx": self.ref("topk_idx"),
                          "weights": self.ref("topk_weight"), "bias": self.w(p["bias"]),
                          "experts": self.shape("router_logits")[1], "k": p["k"], "norm": int(bool(p["norm"])),
                          "scale": p["scale"]})]

    def _moe_act_ref(self) -> dict:
        _, K, inter = self.shape("moe_act")
        return self.ref("moe_act", ld=K * inter)

    def _expert_gate_up(self, p):
        x = self.ref(p["in"])
        self.vector_views.append({**x, "offset": x["offset"] + p["token"] * x["ld"]})
        return [("expert_gate_up", {"in": x, "idx": self.ref("topk_idx"), "out": self._moe_act_ref(),
                                    "gate": self.w(p["gate"]), "up": self.w(p["up"]), "token": p["token"],
                                    "slot": p["slot"], "r0": p["rows"][0], "r1": p["rows"][1],
                                    "inter": self.shape("moe_act")[2]})]

    def _expert_down(self, p):
        act = self._moe_act_ref()
        inter = self.shape("moe_act")[2]
        self.vector_views.append({**act, "ld": inter})
        return [("expert_down", {"act": act, "idx": self.ref("topk_idx"), "weights": self.ref("topk_weight"),
                                 "out": self.ref("x"), "down": self.w(p["down"]), "r0": p["rows"][0],
                                 "r1": p["rows"][1], "k": p["k"], "inter": inter})]

    def _expert_union(self, p):
        return [("expert_union", {"idx": self.ref("topk_idx"), "distinct": self.ref("moe_union"),
                                  "route": self.ref("moe_route"), "k": p["k"], "slots": self.shape("moe_union")[0]})]

    def _union_act_ref(self) -> dict:
        """moe_act_union [slots, tokens, inter] as rows slot * tokens + token."""
        return self.ref("moe_act_union", ld=self.shape("moe_act_union")[2])

    def _expert_gate_up_union(self, p):
        x = self.ref(p["in"])
        self.vector_views.append(x)
        return [("expert_gate_up_union", {"in": x, "distinct": self.ref("moe_union"), "route": self.ref("moe_route"),
                                          "out": self._union_act_ref(), "gate": self.w(p["gate"]),
                                          "up": self.w(p["up"]), "slot": p["slot"], "r0": p["rows"][0],
                                          "r1": p["rows"][1], "k": self.shape("moe_route")[1],
                                          "inter": self.shape("moe_act_union")[2]})]

    def _expert_down_union(self, p):
        act = self._union_act_ref()
        self.vector_views.append(act)
        return [("expert_down_union", {"act": act, "distinct": self.ref("moe_union"), "route": self.ref("moe_route"),
                                       "weights": self.ref("topk_weight"), "out": self.ref("x"),
                                       "down": self.w(p["down"]), "r0": p["rows"][0], "r1": p["rows"][1],
                                       "k": p["k"], "inter": self.shape("moe_act_union")[2],
                                       "slots": self.shape("moe_union")[0]})]

    def _lm_head(self, p):
        x = self.ref(p["in"])
        self.vector_views.append(x)
        ntiles = self.shape("best_partial")[1]
        return [("lm_head", {"in": x, "logits": self.ref("logits"), "best": self.ref("best_partial", ld=2 * ntiles),
                             "positions": self.ref("positions"), "sampling": self.ref("sampling"),
                             "weight": self.w(p["weight"]), "r0": p["rows"][0], "r1": p["rows"][1],
                             "tile": p["tile"]})]

    def _argmax(self, p):
        ntiles = self.shape("best_partial")[1]
        return [("argmax", {"best": self.ref("best_partial", ld=2 * ntiles), "out": self.ref("next_token"),
                            "ntiles": ntiles})]


# ---- packing -------------------------------------------------------------------------------------

def pack_params(struct_name: str, values: dict) -> list[int]:
    words: list[int] = []
    for name, t in STRUCTS[struct_name]:
        v = values[name]
        if t == "ref":
            words += [int(v["space"]), int(v["offset"]), int(v["ld"])]
        elif t == "f32":
            words.append(struct.unpack("<i", struct.pack("<f", float(v)))[0])
        else:
            words.append(int(v))
    for w in words:
        if not -2**31 <= w < 2**31:
            raise UserError(f"{struct_name}: parameter word {w} does not fit int32")
    return words + [0] * (PARAM_WORDS - len(words))


def unpack_params(struct_name: str, words) -> dict:
    out, i = {}, 0
    for name, t in STRUCTS[struct_name]:
        if t == "ref":
            out[name] = {"space": int(words[i]), "offset": int(words[i + 1]), "ld": int(words[i + 2])}
            i += 3
        elif t == "f32":
            out[name] = struct.unpack("<f", struct.pack("<i", int(words[i])))[0]
            i += 1
        else:
            out[name] = int(words[i])
            i += 1
    return out


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


@dataclass
class DecodedTask:
    id: int
    waits: list[tuple[int, int]]
    signals: list[int]
    stages: list[tuple[str, dict]]  # (base kind, parameter dict)
    ids_known: bool = False  # the IDS_KNOWN flag (module doc)


def decode_program(program: np.ndarray) -> tuple[list[int], list[list[DecodedTask]]]:
    """(counter targets, per worker its decoded tasks): the inverse of the encoding."""
    P = [int(x) for x in program]
    if P[PROG["magic"]] != MAGIC or P[PROG["version"]] != VERSION:
        raise UserError("not a tilert program (bad magic or version)")
    if P[PROG["param_words"]] != PARAM_WORDS:
        raise UserError(f"program has {P[PROG['param_words']]} parameter words per stage, this tilert {PARAM_WORDS}")
    nw, nc = P[PROG["workers"]], P[PROG["counters"]]
    targets = P[P[PROG["targets"]]:P[PROG["targets"]] + nc]
    streams = []
    for w in range(nw):
        at = P[P[PROG["streams"]] + w]
        n, at = P[at], at + 1
        tasks = []
        for _ in range(n):
            tid, n_w, n_s, n_st = P[at:at + 4]
            known, n_st = bool(n_st & IDS_KNOWN), n_st & (IDS_KNOWN - 1)
            at += 4
            waits = [(P[at + 2 * i], P[at + 2 * i + 1]) for i in range(n_w)]
            at += 2 * n_w
            signals = P[at:at + n_s]
            at += n_s
            stages = []
            for _ in range(n_st):
                kind = KIND_BY_ID[P[at]]
                stages.append((kind.name, unpack_params(kind.struct, P[at + 1:at + STAGE_WORDS])))
                at += STAGE_WORDS
            tasks.append(DecodedTask(tid, waits, signals, stages, known))
        streams.append(tasks)
    return targets, streams


# ---- generation ------------------------------------------------------------------------------------

def _stages(task: Task) -> list[Task]:
    return task.stages if task.stages else [task]


def _scratch_floats(kind: str, values: dict, B: int) -> int:
    """Shared memory a GEMV stage keeps beside its inputs (gate results, expert totals)."""
    if kind == "gate_up":
        return B * (values["r1"] - values["r0"])
    if kind in ("expert_gate_up", "expert_down"):
        return values["r1"] - values["r0"]
    if kind == "expert_gate_up_union":  # every token's gate results
        return B * (values["r1"] - values["r0"])
    if kind == "expert_down_union":  # every token's totals, each slot's weight per token and routed
        # tokens, gemv_union's row table (2 x 64) and one count
        return B * (values["r1"] - values["r0"]) + values["slots"] * B + values["slots"] + 129
    return 0


ATTN_CHUNK = 16  # keys per chunk of k_attention (TILERT_ATTN_CHUNK; a lane a key in its softmax step)
# chunk buffers in k_attention's cp.async ring (TILERT_ATTN_STAGES): chunk ch + 1's copies in
# flight while ch is computed (3 measured no faster, and their shared memory shrinks the ring)
ATTN_STAGES = 2
# k_attention on the tensor cores (kinds.cuh attn_token_mma: tf32 mmas, three products a term)
# instead of the CUDA-core loop; generate(attention_mma=) overrides it.
ATTENTION_MMA = False


def _attention_group_max(stages_of) -> int:
    """The most query heads one attention task serves (its KV head's group)."""
    return max([0] + [v["group"] for stages in stages_of.values() for k, v in stages if k == "attention"])


def _attention_smem_bytes(group: int, rows: int, head_dim: int, v_head_dim: int) -> int:
    """k_attention's shared memory, from TILERT_SMEM_XS on (the GEMVs' x staging and scratch),
    the larger of its two paths' (so that either fits the one layout; A/B runs switch with
    `--define TILERT_ATTN_MMA=1`).  CUDA cores, a pass of `rows` (token, head) rows: their
    queries [rows][hd], ATTN_STAGES chunk buffers of keys [chunk][hd + 4] and values [chunk][vd],
    the chunk's scores [rows][chunk], the running max, sum and rescale per row, each token's
    visible key range (16 ints).  Tensor cores, a token at a time: queries [group][hd + 4], chunk
    buffers of keys [chunk][hd + 4] and values [chunk][vd + 8], partial scores [8 warps][16-row
    tiles][chunk + 4], weights [group][chunk + 4], the running state."""
    ch = ATTN_CHUNK
    simt = rows * head_dim + ATTN_STAGES * ch * (head_dim + 4 + v_head_dim) + rows * ch + 3 * rows + 16
    tiles = -(-group // 16)
    mma = (group * (head_dim + 4) + ATTN_STAGES * ch * (head_dim + 4 + v_head_dim + 8)
           + 8 * 16 * tiles * (ch + 4) + group * (ch + 4) + 3 * group)
    return 4 * max(simt, mma)


def _attention_rows(group: int, tokens: int, head_dim: int, v_head_dim: int, room: int) -> int:
    """Rows of k_attention's CUDA-core pass (TILERT_ATTN_ROWS_MAX): the most whole tokens' worth
    of the largest group whose pass fits `room` (the x staging and scratch the GEMVs already
    take), one token's at least, then evened out over the passes that takes (every row costs
    each thread registers for its share of the value sums).  More tokens a pass read each chunk
    of keys fewer times in a multi-token step; the pass never grows shared memory past what one
    token needs or the GEMVs take, so the weight ring keeps its slots."""
    room = max(room, _attention_smem_bytes(group, group, head_dim, v_head_dim))
    most = max(t for t in range(1, tokens + 1) if _attention_smem_bytes(group, t * group, head_dim, v_head_dim) <= room)
    passes = -(-tokens // most)
    return group * -(-tokens // passes)


def _slot_row_bytes(w: WeightSlot) -> int:
    """Bytes of one weight row in a ring slot: MXFP4 rows bring their E8M0 scales along
    (gemv.cuh, `piece_row_bytes`)."""
    return w.row_bytes + (w.shape[-1] // 32 if w.fmt == "mxfp4" else 0)


def _gemv_weights(kind: str, values: dict) -> list[int]:
    if kind in ("linear", "router", "lm_head"):
        return [values["weight"]]
    if kind in ("gate_up", "expert_gate_up", "expert_gate_up_union"):
        return [values["gate"], values["up"]]
    if kind in ("expert_down", "expert_down_union"):
        return [values["down"]]
    return []


@dataclass
class _Encoded:
    """Every task's encoded stages for one placement of the task-local buffers."""
    stages: dict[int, list[tuple[str, dict]]]
    scratch_bytes: int  # smem beside the GEMV inputs (gate results, expert totals), max over tasks
    vector_views: list[dict]


def _encode_tasks(schedule: Schedule, plan: _Plan, cfg: MimoConfig, boxes_of: dict[int, dict],
                  space: str) -> _Encoded:
    """Encode every task with its local buffers laid out one after another in `space`."""
    enc = _Encoder(plan, schedule, cfg)
    B = schedule.graph.tokens
    stages_of, scratch = {}, 0
    for t in schedule.graph.tasks:
        enc.views, enc.boxes, at = {}, boxes_of[t.id], 0
        for name, (r0, r1, c0, c1) in enc.boxes.items():
            enc.views[name] = _LocalView(space, at // 4, r0, c0, c1 - c0)
            at += _align((r1 - r0) * (c1 - c0) * 4, 16)
        stages = []
        for st in _stages(t):
            for kind, values in enc.stage(st):
                stages.append((kind, values))
                scratch = max(scratch, 4 * _scratch_floats(kind, values, B))
        stages_of[t.id] = stages
    return _Encoded(stages_of, scratch, enc.vector_views)


def _gemv_tiles(stages_of: dict[int, list[tuple[str, dict]]]):
    """(kind, weight index, first row, end row) of every GEMV tile of the encoded stages."""
    for stages in stages_of.values():
        for kind, values in stages:
            for i in _gemv_weights(kind, values):
                yield kind, i, values["r0"], values["r1"]


def _x_bytes(cols: int, tokens: int) -> int:
    """Shared memory the staged x of one mma GEMV over `cols` columns takes (gemv.cuh, `xs_bytes`)."""
    return tokens * 2 * (2 * cols + 64)


def _too_wide(w: WeightSlot) -> bool:
    """Whether even one token's staged x of `w` exceeds XS_LIMIT_BYTES (a drafter's fc)."""
    return _x_bytes(w.shape[-1], 1) > XS_LIMIT_BYTES


def _tiled_weights(stages_of, weights: list[WeightSlot], loader: bool, mma_formats, slot_bytes: int | None,
                   tile_wide: bool = False, row_major: frozenset[str] = frozenset()) -> tuple[set[int], list[str]]:
    """The weights uploaded tiled (tilert/tiling.py), which the tensor-core GEMV reads wherever
    the step's staged x fits (elsewhere the tiled CUDA-core loop or, x staged a chunk at a time,
    the tensor cores again): a format the tensor cores handle, whole row blocks and steps, a step
    block that fits a ring slot, and every tile over the weight starting and ending on a row
    block.  Also notes on the weights left row-major.  Decided per weight, so every step size's
    kernel sees one layout.  A weight whose one token's x exceeds XS_LIMIT_BYTES stays row-major
    (the tiled CUDA-core loop is slower than the row-major one over such long rows) unless
    `tile_wide` (a kernel that alone reads its weights, at one step size: the drafter's fc) and
    not named in `row_major`, which generate() fills with those whose tiles this kernel would
    not stage a chunk at a time."""
    if not loader:
        return set(), []
    streamed = {i for _, i, _, _ in _gemv_tiles(stages_of)}
    tiled, notes = set(), []
    for w in weights:
        if not (w.index in streamed and w.fmt in mma_formats and tileable(w.fmt, w.shape[-2], w.shape[-1])):
            continue
        if _too_wide(w) and (not tile_wide or w.name in row_major):
            # Its whole x never fits: the row-major CUDA-core loop (measured on an H200,
            # 2026-12-04, the dense FFN's 16384-column down projection: 78 us a layer row-major,
            # 120 us tiled).
            why = " and its tiles cannot stage it a chunk at a time" if w.name in row_major else ""
            notes.append(f"weight {w.name} ({w.fmt}, {w.shape[-1]} columns): CUDA-core GEMV, its staged x "
                         f"({_x_bytes(w.shape[-1], 1)} B) exceeds the {XS_LIMIT_BYTES} B limit{why}")
        elif slot_bytes is None or step_block_bytes(w.fmt) <= slot_bytes:
            tiled.add(w.index)
    unaligned = {i for _, i, r0, r1 in _gemv_tiles(stages_of) if i in tiled and (r0 % ROW_BLOCK or r1 % ROW_BLOCK)}
    notes += [f"weight {weights[i].name} stays row-major (CUDA-core GEMV): its tiles do not start and end on "
              f"{ROW_BLOCK}-row blocks" for i in sorted(unaligned)]
    return tiled - unaligned, notes


def _check_gate_up_pairs(stages_of, weights: list[WeightSlot]) -> None:
    """The up projection of a gate/up task reuses the x its gate staged (kinds.cuh): both must
    share format, width and layout."""
    for stages in stages_of.values():
        for kind, values in stages:
            if kind in ("gate_up", "expert_gate_up", "expert_gate_up_union"):
                gw, uw = weights[values["gate"]], weights[values["up"]]
                if (gw.fmt, gw.shape[-1], gw.tiled) != (uw.fmt, uw.shape[-1], uw.tiled):
                    raise UserError(f"{gw.name} and {uw.name} differ in format, width or layout "
                                    f"({gw.fmt} {gw.shape} vs {uw.fmt} {uw.shape}): the GPU kernel needs them alike")


def _xs_bytes(w: WeightSlot, tokens: int) -> int:
    """Shared memory the staged x of one mma GEMV over `w` needs, 0 when `w` stays on the
    CUDA-core loop at this step size (row-major, or more tokens than the mma tiles hold), before
    the xs_limit cap."""
    return _x_bytes(w.shape[-1], tokens) if w.tiled and tokens <= MMA_MAX_TOKENS else 0


def _slot_staging_bytes(stages_of, weights: list[WeightSlot], tokens: int) -> list[int]:
    """xs bytes of an expert down projection's x for all its (token, slot) GEMVs staged at once
    (gemv.cuh, `stage_x_slots`), for each that fits xs_limit (B = 1 on the flash geometry: 8
    slots x 2048 columns)."""
    out = []
    for stages in stages_of.values():
        for kind, v in stages:
            if kind == "expert_down" and (one := _xs_bytes(weights[v["down"]], 1)):
                if 0 < (x := tokens * v["k"] * one) <= xs_limit(tokens):
                    out.append(x)
    return out


def _on_mma(w: WeightSlot, tokens: int) -> bool:
    return 0 < _xs_bytes(w, tokens) <= xs_limit(tokens)


def _red_rows(tokens: int) -> int:
    """Rows of mma partials one reduction gathers (gemv.cuh, kRedRows)."""
    return max(16, 128 // tokens)


def _chunked_mma(w: WeightSlot, tokens: int, rows: int, slot_bytes: int, xs_bytes: int) -> bool:
    """Whether a tile of `rows` rows of tiled weight `w` runs on the tensor cores with x staged
    a chunk of steps at a time (gemv.cuh, `mma_chunked`): the step's whole x does not fit the xs
    region, a piece is one row block in chunks whose x does, and the tile's partials fit."""
    if not (w.tiled and tokens <= MMA_MAX_TOKENS and xs_bytes) or _on_mma(w, tokens):
        return False
    nsteps, fit = w.row_bytes // STEP_BYTES, slot_bytes // step_block_bytes(w.fmt)
    if fit >= nsteps or rows > 2 * _red_rows(tokens):
        return False
    nch = -(-nsteps // fit)
    return _x_bytes(-(-nsteps // nch) * STEP_COLS[w.fmt], tokens) <= xs_bytes


def _slot_need(stages_of, weights: list[WeightSlot]) -> int:
    """The largest unit a ring slot must hold: a step block of a tiled weight, a row (with its
    MXFP4 scales) of a row-major one."""
    return max([0] + [step_block_bytes(weights[i].fmt) if weights[i].tiled else _slot_row_bytes(weights[i])
                      for _, i, _, _ in _gemv_tiles(stages_of)])


def _tile_paths(stages_of: dict[int, list[tuple[str, dict]]], weights: list[WeightSlot], tokens: int,
                slot_bytes: int, xs_bytes: int) -> list[tuple[str, int, int]]:
    """(kind, weight index, GEMV path) of every GEMV tile (gemv.cuh, `gemv_tile`; GemvPath): 4 the
    tensor cores with the whole x staged, 12 the tensor cores with x staged a chunk at a time
    (`_chunked_mma`), 8 the CUDA-core loop over a tiled weight, 0 over a row-major one."""
    out = []
    for kind, i, r0, r1 in _gemv_tiles(stages_of):
        w = weights[i]
        path = (4 if _on_mma(w, tokens) else 12 if _chunked_mma(w, tokens, r1 - r0, slot_bytes, xs_bytes)
                else 8 if w.tiled else 0)
        out.append((kind, i, path))
    return out


def _gemv_masks(tile_paths: list[tuple[str, int, int]], weights: list[WeightSlot]) -> dict[str, int]:
    """Per weight-streaming kind, the GEMV paths its weights take (`_tile_paths`): bit 1 << (path + f)
    for format f (1 << f the CUDA-core loop over row-major format f, 16 << f the tensor cores,
    256 << f the CUDA-core loop over tiled format f, 4096 << f the tensor cores with x staged a
    chunk at a time).  The kernel compiles each kind's GEMV for exactly these paths
    (TILERT_GEMV_<KIND>)."""
    masks: dict[str, int] = {}
    for kind, i, path in tile_paths:
        masks[kind] = masks.get(kind, 0) | 1 << (FORMATS[weights[i].fmt] + path)
    return masks


def _record_words(schedule: Schedule, stages_of: dict[int, list[tuple[str, dict]]]) -> int:
    """Words of the longest encoded task record (header, waits, signals, stages): the size of
    the compute warps' shared-memory copy of a record (megakernel.cuh, TILERT_TASK_WORDS)."""
    return max([4] + [4 + 2 * len(schedule.waits[t]) + len(schedule.signals[t]) + STAGE_WORDS * len(stages_of[t])
                      for t in range(len(schedule.graph.tasks))])


def _smem_layout(ring_slots: int, slot_bytes: int, red_bytes: int, scratch_bytes: int,
                 locals_bytes: int, xs_bytes: int = 0, task_words: int = 0) -> dict[str, int]:
    """Byte offsets of the shared-memory regions, after 16 bytes of control words."""
    regions = (("bases", 8 * len(SPACES), 16),  # the base pointer of every space (common.cuh, ref_ptr)
               ("tasks", 2 * task_words * 4, 16),  # two task records (the current one, the next)
               ("bars", 2 * ring_slots * 8, 8),  # ring mbarriers: full[slots], empty[slots]
               ("red", red_bytes, 16),  # cross-warp reductions
               ("xs", xs_bytes, 16),  # x staged for the tensor-core GEMV
               ("scratch", scratch_bytes, 16),  # GEMV results kept for an epilogue
               ("locals", locals_bytes, 16),  # task-local buffers
               ("ring", ring_slots * slot_bytes, 128))  # weight pieces (bulk-copy destinations)
    lay, at = {"ctrl": 0}, 16
    for name, size, align in regions:
        at = _align(at, align)
        lay[name] = at
        at += size
    lay["total"] = at
    return lay


def generate(schedule: Schedule, cfg: MimoConfig, weight_formats: dict[str, str] | None = None,
             loader: bool = True, compute_warps: int = COMPUTE_WARPS, ring_slots: int | None = None,
             smem_limit: int = SMEM_LIMIT, locals_space: str = "auto",
             slot_bytes: int | None = None, mma_formats=MMA_FORMATS, attention_mma: bool | None = None,
             tile_wide: bool = False, _row_major: frozenset[str] = frozenset()) -> GeneratedKernel:
    """The megakernel of one schedule.  `weight_formats` (name -> storage format) says how the
    weights the kernel will run with are stored (default: the formats the schedule declares);
    the runtime refuses weights in other formats.  `loader=False` gives the simpler kernel
    whose compute warps read weights straight from global memory.  Task-local buffers go to
    shared memory when they fit beside a ring of at least 2 slots and global scratch would not
    give the ring larger slots (`locals_space` "auto"), else to a per-worker global scratch area
    ("global" forces that).  `ring_slots`: the most ring slots (default RING_SLOTS, MULTI_RING_SLOTS
    for steps of 8 tokens).  `slot_bytes` overrides the ring
    slot size (tests use small slots to cut tiles into many pieces).  `mma_formats`: the weight
    formats whose GEMVs run on the tensor cores (the rest on the CUDA-core loop).  `attention_mma`:
    attention on the tensor cores (default ATTENTION_MMA).  `tile_wide`: also tile the weights
    too wide for one token's staged x where this kernel stages them a chunk at a time (only for
    a kernel that alone reads its weights, at one step size: their layout then depends on it);
    a second pass keeps those it would not chunk row-major (`_row_major`, `_tiled_weights`)."""
    g = schedule.graph
    B = g.tokens
    if not 1 <= B <= 8:
        raise UserError(f"the GPU kernel handles steps of 1..8 tokens, not {B}")
    if ring_slots is None:
        ring_slots = MULTI_RING_SLOTS if B == MMA_MAX_TOKENS else RING_SLOTS
    if cfg.num_experts_per_tok > 32:
        raise UserError(f"the GPU kernel's top-k keeps one choice per lane: at most 32 experts per token, "
                        f"not {cfg.num_experts_per_tok}")
    plan = _Plan(schedule, weight_formats or {})
    boxes_of = {t.id: _local_boxes(t, t.local) if t.local else {} for t in g.tasks}
    locals_bytes = max(sum(_align((r1 - r0) * (c1 - c0) * 4, 16) for r0, r1, c0, c1 in boxes.values())
                       for boxes in boxes_of.values())
    red_bytes = compute_warps * B * 16  # per warp and token: a (double score, int index) pair at most
    mma_formats = tuple(mma_formats) if loader else ()
    weights = list(plan.weights.values())

    chosen, tiled_notes = None, None
    for space in (["smem"] if locals_space == "auto" else []) + ["scratch"]:
        enc = _encode_tasks(schedule, plan, cfg, boxes_of, space)
        if tiled_notes is None:  # tiles do not depend on where locals live: decide once
            tiled, tiled_notes = _tiled_weights(enc.stages, weights, loader, mma_formats, slot_bytes, tile_wide,
                                                _row_major)
            for w in weights:
                w.tiled = w.index in tiled
            xs_bytes = max([0] + [x for w in weights if 0 < (x := _xs_bytes(w, B)) <= xs_limit(B)]
                           + _slot_staging_bytes(enc.stages, weights, B))
            if xs_bytes:  # mma partials: two batches x warps x kRedRows (gemv.cuh) x tokens
                red_bytes = max(red_bytes, 2 * compute_warps * _red_rows(B) * B * 4)
            need = _slot_need(enc.stages, weights)
            _check_gate_up_pairs(enc.stages, weights)
            task_words = _align(_record_words(schedule, enc.stages), 4)
        slot = slot_bytes or _align(max(compute_warps * MIN_SLOT_ROW_BYTES, need), 128)
        if slot < need or slot % 128:
            raise UserError(f"slot_bytes {slot} must be a multiple of 128 and hold the largest weight row "
                            f"({need} B)")
        in_smem = locals_bytes if space == "smem" else 0
        group_max, attn_rows = _attention_group_max(enc.stages), 0
        if group_max:  # attention's area spans x staging + scratch
            hd, vd = max(cfg.head_dim, 4), max(cfg.v_head_dim, 1)
            attn_rows = _attention_rows(group_max, B, hd, vd, xs_bytes + enc.scratch_bytes)
            need_attn = _attention_smem_bytes(group_max, attn_rows, hd, vd)
            enc.scratch_bytes = max(enc.scratch_bytes, _align(need_attn - xs_bytes, 16))
        for slots in (range(ring_slots, 1, -1) if loader else [0]):
            slot_here = slot
            if xs_bytes and not slot_bytes and slots:
                # mma pieces are cut to the slot, so more, smaller slots keep more bytes in
                # flight than fewer large ones: fill what the other regions leave.
                room = smem_limit - _smem_layout(slots, 0, red_bytes, enc.scratch_bytes, in_smem, xs_bytes,
                                                 task_words)["total"]
                slot_here = min(slot, room // slots // 128 * 128)
                if slot_here < need:
                    continue
            lay = _smem_layout(slots, slot_here, red_bytes, enc.scratch_bytes, in_smem, xs_bytes, task_words)
            if lay["total"] <= smem_limit:
                # Locals in shared memory unless global scratch leaves the ring larger slots: a
                # piece cut smaller costs the GEMVs more than the locals' trips to L2 (measured on
                # an H200, 2026-12-04: 33 KB slots cut MXFP4 row blocks (34 KB) in two, 1395 vs
                # 1374 us per 6-layer step with 37 KB slots).
                if chosen is None or slot_here > chosen[2]:
                    chosen = (space, enc, slot_here, slots, lay)
                break
        if chosen and (chosen[2] == slot or not locals_bytes):
            break  # global scratch could not give larger slots: skip encoding the step again
    if chosen is None:
        raise UserError(f"the megakernel does not fit {smem_limit} B of shared memory even with task-local "
                        f"buffers in global memory (largest weight row {need} B)")
    space, enc, slot, slots, lay = chosen
    _check_alignment(plan, enc.vector_views)
    scratch_stride = 0 if space == "smem" else _align(locals_bytes, 256)
    notes = [] if space == "smem" else [f"task-local buffers ({locals_bytes} B) live in global scratch"]
    notes += tiled_notes
    formats = {w.fmt for w in weights}
    tile_paths = _tile_paths(enc.stages, weights, B, slot, xs_bytes)
    chunked = {i for _, i, path in tile_paths if path == 12}
    partly = chunked & {i for _, i, path in tile_paths if path != 12}  # tiles too tall for the partials area
    too_wide = {weights[i].name for _, i, path in tile_paths
                if path != 12 and weights[i].tiled and _too_wide(weights[i])}
    if too_wide:  # again with those row-major (`_tiled_weights`)
        return generate(schedule, cfg, weight_formats, loader, compute_warps, ring_slots, smem_limit, locals_space,
                        slot_bytes, mma_formats, attention_mma, tile_wide, _row_major | too_wide)
    mma_used = sorted({w.fmt for w in weights if _on_mma(w, B) or w.index in chunked}, key=FORMATS.get)
    for w in weights:
        x = _xs_bytes(w, B)
        if x > xs_limit(B):
            how = ("CUDA-core GEMV" if w.index not in chunked else
                   "tensor cores, x staged a chunk at a time" + (" (its taller tiles: tiled CUDA-core GEMV)"
                                                                  if w.index in partly else ""))
            notes.append(f"weight {w.name} ({w.fmt}, {w.shape[-1]} columns): {how}, its whole staged x "
                         f"({x} B) exceeds the {xs_limit(B)} B limit")
    return GeneratedKernel(
        source=_source(schedule, cfg, B, compute_warps, loader, slots, slot, lay, formats, scratch_stride,
                       set(mma_used), xs_bytes, _gemv_masks(tile_paths, weights), task_words,
                       group_max, attn_rows, ATTENTION_MMA if attention_mma is None else attention_mma,
                       bool(chunked)),
        program=_encode_program(schedule, enc.stages, task_words), tokens=B, num_workers=schedule.num_workers,
        threads=32 * compute_warps + (32 if loader else 0), smem_bytes=lay["total"], loader=loader,
        slots=slots, slot_bytes=slot, act_bytes=plan.act_bytes, state_bytes=plan.state_bytes,
        scratch_stride=scratch_stride, consts=np.asarray(plan.consts or [0.0], dtype=np.float32),
        buffers=plan.buffers, weights=weights,
        counter_targets=[c.target for c in schedule.counters],
        task_names=[f"{g.ops[t.op].name} ({t.kind})" for t in g.tasks], worker_of=list(schedule.worker_of),
        locals_in_smem=space == "smem", notes=notes, mma_formats=mma_used)


def check_weight_layouts(gens: dict) -> None:
    """Kernels run together (the step sizes of one target, and the draft step, which borrows the
    target's embedding and LM head) must want every weight they share in one layout (tiled or
    row-major): the runtime uploads it once.  Raises a UserError naming the weight and the
    kernels that differ (a recipe's by_tokens or draft tile sizes off the 16-row blocks in one
    of them, schedules/README.md)."""
    seen: dict[str, tuple[str, bool]] = {}
    for name, gen in gens.items():
        for w in gen.weights:
            first = seen.setdefault(w.name, (name, w.tiled))
            if first[1] != w.tiled:
                tiled, plain = (first[0], name) if first[1] else (name, first[0])
                raise UserError(f"weight {w.name} is tiled in the {tiled} kernel but row-major in the {plain} kernel: "
                                f"kernels run together must share its layout (its row tiles start and end on "
                                f"{ROW_BLOCK}-row blocks in every one, or in none; check the recipe's by_tokens / "
                                f"draft tile sizes)")


def _check_alignment(plan: _Plan, vector_views: list[dict]) -> None:
    """16-byte vector loads: weight rows and GEMV input rows must be 16-byte aligned."""
    for w in plan.weights.values():
        if w.row_bytes % 16:
            raise UserError(f"weight {w.name}: rows of {w.row_bytes} B are not a multiple of 16 B "
                            f"(the GPU kernel reads 16-byte chunks)")
    for x in vector_views:
        if x["offset"] % 4 or x["ld"] % 4:
            raise UserError(f"a view read with 16-byte loads (offset {x['offset']}, row stride {x['ld']}) "
                            f"is not 16-byte aligned")


def routes_experts(task: Task) -> bool:
    """Whether a stage of `task` streams experts the router chose this step (ROUTED_KINDS)."""
    return any(s.kind in ROUTED_KINDS for s in _stages(task))


def routed_ids_known(schedule: Schedule) -> set[int]:
    """The tasks that get the IDS_KNOWN flag (module doc): a task with a stage of ROUTED_KINDS
    after another such task of the same layer in its worker's stream.  The expert-id buffers are
    shared by all layers, so a task of the next layer is never marked: its ids come from a top-k
    that may not have run yet."""
    graph, known = schedule.graph, set()
    for stream in schedule.streams:
        last_layer = None
        for t in stream:
            task = graph.tasks[t]
            if not routes_experts(task):
                continue
            layer = graph.ops[task.op].layer
            if layer is not None and layer == last_layer:
                known.add(t)
            last_layer = layer
    return known


def _encode_program(schedule: Schedule, encoded: dict[int, list[tuple[str, dict]]], pad_words: int = 0,
                    ) -> np.ndarray:
    """The program (layout in the module doc), followed by `pad_words` zeros: the compute warps
    read a fixed TILERT_TASK_WORDS from a record's start, the last record's too."""
    words: list[int] = [0] * HEADER_WORDS
    words[PROG["magic"]], words[PROG["version"]] = MAGIC, VERSION
    words[PROG["workers"]], words[PROG["tasks"]] = schedule.num_workers, len(schedule.graph.tasks)
    words[PROG["counters"]], words[PROG["param_words"]] = len(schedule.counters), PARAM_WORDS
    words[PROG["targets"]] = len(words)
    words += [c.target for c in schedule.counters]
    words[PROG["streams"]] = len(words)
    table = len(words)
    words += [0] * schedule.num_workers
    known = routed_ids_known(schedule)
    for w, stream in enumerate(schedule.streams):
        words[table + w] = len(words)
        words.append(len(stream))
        for t in stream:
            stages = encoded[t]
            if len(stages) >= IDS_KNOWN:
                raise UserError(f"task {t} has {len(stages)} stages (the encoding allows {IDS_KNOWN - 1})")
            words += [t, len(schedule.waits[t]), len(schedule.signals[t]),
                      len(stages) | (IDS_KNOWN if t in known else 0)]
            for c, v in schedule.waits[t]:
                words += [c, v]
            words += list(schedule.signals[t])
            for kind, values in stages:
                words.append(KIND_ID[kind])
                words += pack_params(KINDS[KIND_ID[kind] - 1].struct, values)
    words += [0] * pad_words
    if len(words) >= 2**31:
        raise UserError("the encoded program exceeds 2^31 words")
    return np.asarray(words, dtype=np.int64).astype(np.int32)


def _source(schedule: Schedule, cfg: MimoConfig, B: int, ncw: int, loader: bool, slots: int, slot_bytes: int,
            lay: dict, formats: set[str], scratch_stride: int, mma_formats: set[str], xs_bytes: int,
            gemv_masks: dict[str, int], task_words: int, attn_group_max: int, attn_rows: int,
            attention_mma: bool, mma_chunked: bool = False) -> str:
    kinds_used = sorted({k for t in schedule.graph.tasks for k in (s.kind for s in _stages(t))},
                        key=lambda k: KIND_ID[k])
    defines = {
        "TILERT_B": B, "TILERT_NCW": ncw, "TILERT_THREADS": 32 * ncw + (32 if loader else 0),
        "TILERT_LOADER": int(loader), "TILERT_SLOTS": max(slots, 1), "TILERT_SLOT_BYTES": slot_bytes,
        "TILERT_PARAM_WORDS": PARAM_WORDS, "TILERT_MAX_ERRORS": MAX_ERRORS,
        "TILERT_SMEM_CTRL": lay["ctrl"], "TILERT_SMEM_BARS": lay["bars"], "TILERT_SMEM_RED": lay["red"],
        "TILERT_SMEM_SCRATCH": lay["scratch"], "TILERT_SMEM_LOCALS": lay["locals"], "TILERT_SMEM_RING": lay["ring"],
        "TILERT_SMEM_BYTES": lay["total"], "TILERT_SCRATCH_STRIDE": f"{scratch_stride}ull",
        "TILERT_VD_MAX": max(cfg.v_head_dim, 1), "TILERT_HD_MAX": max(cfg.head_dim, 4), "TILERT_E_MAX": max(cfg.n_routed_experts, 1),
        "TILERT_H_MAX": max(cfg.hidden_size, 4),
        "TILERT_K_MAX": max(cfg.num_experts_per_tok, 1),
        "TILERT_ATTN_CHUNK": ATTN_CHUNK, "TILERT_ATTN_STAGES": ATTN_STAGES,
        "TILERT_ATTN_GROUP_MAX": max(attn_group_max, 1), "TILERT_ATTN_ROWS_MAX": max(attn_rows, 1),
        "TILERT_MMA_FORMATS": sum(1 << FORMATS[f] for f in mma_formats & formats),
        "TILERT_SMEM_XS": lay["xs"], "TILERT_XS_BYTES": xs_bytes, "TILERT_MMA_CHUNKED": int(mma_chunked),
        "TILERT_SMEM_TASKS": lay["tasks"], "TILERT_TASK_WORDS": task_words, "TILERT_SMEM_BASES": lay["bases"],
    }
    defines.update({f"TILERT_GEMV_{k.upper()}": gemv_masks.get(k, 0) for k in kinds_used
                    if KINDS[KIND_ID[k] - 1].streams_weights})
    # Nothing schedule-specific beyond these sizes goes into the source (the program is data),
    # so schedules of one shape share a cached cubin.
    lines = ["// Generated by tilert/codegen.py: do not edit.  The static device code is tilert/cuda/*.cuh."]
    lines += [f"#define {k} {v}" for k, v in defines.items()]
    if attention_mma:  # kinds.cuh defaults it to 0, so an A/B run can also prepend it to a source
        lines.append("#define TILERT_ATTN_MMA 1")
    lines += ["#ifndef TILERT_PROFILE", "#define TILERT_PROFILE 0", "#endif", "", "#include <cstdint>", "",
              "namespace tilert {", ""]
    lines += [f"#define FMT_{n.upper()} {i}" for n, i in FORMATS.items()]
    ids = [("SPACE", SPACES), ("ERR", ERRORS), ("CTRL", CTRL), ("PROG", PROG)]
    for prefix, table in ids:
        lines += [f"constexpr int {prefix}_{n.upper()} = {i};" for n, i in table.items()]
    lines += [f"constexpr int KIND_{k.name.upper()} = {KIND_ID[k.name]};" for k in KINDS]
    lines.append("")
    lines.append(_c_struct("Ref", REF))
    lines.append(_c_struct("WeightDesc", WEIGHT_DESC))
    lines.append(_c_struct("KernelArgs", KERNEL_ARGS))
    for name, fields in STRUCTS.items():
        lines.append(_c_struct(name, fields))
        lines.append(f'static_assert(sizeof({name}) == {4 * struct_words(name)}, "{name} layout");')
    lines.append(f'static_assert(sizeof(WeightDesc) == {numpy_dtype(WEIGHT_DESC).itemsize}, "WeightDesc layout");')
    lines.append(f'static_assert(sizeof(KernelArgs) == {numpy_dtype(KERNEL_ARGS).itemsize}, "KernelArgs layout");')
    lines += ["", "}  // namespace tilert", "", '#include "kinds.cuh"', "", "namespace tilert {", ""]
    # The stage dispatch: only the kinds this schedule uses.
    lines.append("TILERT_DEV void run_stage(Ctx& c, int kind, const int32_t* w) {")
    lines.append("  switch (kind) {")
    for k in kinds_used:
        kd = KINDS[KIND_ID[k] - 1]
        fn = f"{kd.function}<TILERT_GEMV_{k.upper()}>" if kd.streams_weights else kd.function
        lines.append(f"    case KIND_{k.upper()}: {fn}(c, *reinterpret_cast<const {kd.struct}*>(w)); break;")
    lines += ["    default: break;", "  }", "}", ""]
    lines.append("template <class V>")
    lines.append("TILERT_DEV void stage_tiles(const Ctx& c, int kind, const int32_t* w, V&& v) {")
    lines.append("  switch (kind) {")
    for k in kinds_used:
        kd = KINDS[KIND_ID[k] - 1]
        if kd.streams_weights:
            lines.append(f"    case KIND_{k.upper()}: tiles_of(c, *reinterpret_cast<const {kd.struct}*>(w), v); break;")
    lines += ["    default: break;", "  }", "}", "", "}  // namespace tilert", "", '#include "megakernel.cuh"', ""]
    return "\n".join(lines)
