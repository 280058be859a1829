"""The op-by-op baseline (`--backend ops`): every IR op of a step as a standalone TileLang kernel,
the step replayed as one CUDA graph of them.

An honest competitor to the megakernel and a fallback: the same step graph (tilert/lower.py,
before fusion), the same weights as stored, the same buffers and semantics as the VM
(tilert/kernels.py), but one kernel launch per op and a trip through global memory between ops.

- `plan_step(graph, cfg)`: each op -> the TileLang kernel(s) that compute it (tilert/tl_ops.py)
  and the buffers bound to their parameters (a linear op with several weights gets one launch a
  weight);
- `build_kernels(plan, out_dir)`: TileLang lowers each distinct kernel to CUDA on this machine (no
  GPU needed) and nvcc builds its cubin (cached by source), so the GPU machine needs no TileLang;
- `OpsRuntime`: loads the cubins with the CUDA driver, holds the buffers, captures the step's
  launches into a CUDA graph once and replays it.  Batch-1 greedy decode only (the issue's
  baseline); other steps are refused with one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import MimoConfig
from model.weights import StoredTensor
from tilert.build import nvcc_path
from tilert.errors import UserError
from tilert.ir import ACTIVATION, INPUT, OUTPUT, STATE, WEIGHT, TaskGraph

TARGET = {"kind": "cuda", "arch": "sm_90a"}
LM_ROWS = 8  # vocabulary rows an LM-head CTA takes (tl_ops.LM_ROWS; checked when building)
_TORCH = {"f32": torch.float32, "i32": torch.int32, "f64": torch.float64}


@dataclass
class Launch:
    """One kernel launch of the step: which kernel (a key into the plan's kernels) and, for
    each kernel parameter, the buffer bound to it (`weight:NAME:data|scale`, `extra:NAME`, or
    a graph buffer's name)."""
    op: str
    kernel: str
    args: dict[str, str]


@dataclass
class StepPlan:
    kernels: dict[str, tuple[str, tuple]]  # key -> (tl_ops builder, its arguments): built by build_kernels
    launches: list[Launch]
    extras: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, dtype)
    inv_freq: dict[str, tuple[float, int]] = field(default_factory=dict)  # extra name -> (theta, rotary dim)


FILL_CTAS = 264  # attention CTAs wanted in flight: two per SM of an H100 (132 SMs)
MIN_SPLIT_KEYS = 64  # ... but no split shorter than this many cache slots


def attention_splits(graph_splits: int, kv_heads: int, slots: int) -> int:
    """Splits of the keys the baseline's attention uses: the graph's, or more where that fills the
    machine (a standalone kernel sizes its split-KV for the whole GPU; the megakernel's splits
    share the SMs with other ops' tasks).  The split partials live in the baseline's own buffers."""
    return max(graph_splits, min(-(-FILL_CTAS // kv_heads), slots // MIN_SPLIT_KEYS))


def _tasks_of(graph: TaskGraph, op) -> list:
    return [graph.tasks[t] for t in op.tasks]


def plan_step(graph: TaskGraph, cfg: MimoConfig) -> StepPlan:
    """The launches of one unfused batch-1 step graph, in program order (needs no TileLang: the
    kernels are named by builder and arguments, and instantiated by build_kernels)."""
    if graph.tokens != 1:
        raise UserError(f"the ops baseline runs batch-1 decode steps, not steps of {graph.tokens} tokens")
    bufs = graph.buffers
    plan = StepPlan({}, [])

    def kernel(builder: str, *args) -> str:
        key = builder + ":" + ":".join(map(str, args))
        plan.kernels.setdefault(key, (builder, args))
        return key

    def weight_fmt(name: str) -> str:
        return bufs[name].dtype

    def wargs(prefix: str, name: str) -> dict[str, str]:
        fmt = weight_fmt(name)
        return {prefix: f"weight:{name}:data",
                prefix + "S": f"weight:{name}:scale" if fmt in ("fp8", "mxfp4") else "extra:one"}

    plan.extras["one"] = ((1,), "f32")  # the scale parameter of an unscaled weight (never read)
    for op in graph.ops:
        tasks = _tasks_of(graph, op)
        p = tasks[0].params
        if any(t.stages for t in tasks):
            raise UserError(f"op {op.name}: the ops baseline plans unfused graphs (lower_step), not fused tasks")
        kind = op.kind
        if kind == "embed":
            shape = bufs["model.embed_tokens.weight"].shape
            key = kernel("embed", *shape)
            plan.launches.append(Launch(op.name, key, {"E": "weight:model.embed_tokens.weight:data", "Tok": "tokens",
                                                       "X": "x"}))
        elif kind == "rmsnorm":
            H = bufs[p["in"]].shape[1]
            key = kernel("rmsnorm", H, p.get("eps", 1e-5))
            plan.launches.append(Launch(op.name, key, {"X": p["in"], "W": f"weight:{p['weight']}:data", "Out": p["out"]}))
        elif kind in ("linear", "router"):
            segs = p["segments"] if kind == "linear" else [{"weight": p["weight"], "out": "router_logits", "rows": [0, 0],
                                                            "cols": [0, 0]}]
            acc = bool(p.get("accumulate", False))
            src = p["in"]
            done = set()
            for t in tasks:
                for s in (t.params["segments"] if kind == "linear" else segs):
                    if s["weight"] in done:
                        continue
                    done.add(s["weight"])
                    w = bufs[s["weight"]]
                    rows, cols = w.shape
                    out_w = bufs[s["out"]].shape[1]
                    col0 = s["cols"][0] - s["rows"][0]
                    fmt = w.dtype
                    key = kernel("gemv", fmt, rows, cols, out_w, col0, acc)
                    plan.launches.append(Launch(op.name, key, {**wargs("W", s["weight"]), "X": src, "Y": s["out"]}))
        elif kind == "gate_up":
            rows, cols = bufs[p["gate"]].shape
            fmt = weight_fmt(p["gate"])
            # One expert chosen once: the expert kernel reads the [rows, cols] weights as [1, rows, cols].
            key = kernel("expert_gate_up", fmt, 1, rows, cols, 1)
            plan.extras["zero_idx"] = ((1, 1), "i32")
            plan.launches.append(Launch(op.name, key, {**wargs("G", p["gate"]), **wargs("Up", p["up"]),
                                                       "Idx": "extra:zero_idx", "X": p["in"], "Act": p["out"]}))
        elif kind == "rope":
            by_buf: dict[str, list[int]] = {}
            for t in tasks:
                by_buf.setdefault(t.params["buf"], []).append(t.params["head"])
            for name, heads in by_buf.items():
                if sorted(heads) != list(range(len(heads))):
                    raise UserError(f"op {op.name}: rope over heads {sorted(heads)} of {name}: the ops baseline "
                                    f"rotates heads 0..n-1")
                width = bufs[name].shape[1]
                hd, rd, theta = p["head_dim"], p["rotary_dim"], p["theta"]
                freq = f"inv_freq:{theta}:{rd}"
                plan.extras[freq] = ((rd // 2,), "f32")
                plan.inv_freq[freq] = (theta, rd)
                key = kernel("rope", width, len(heads), hd, rd)
                plan.launches.append(Launch(op.name, key, {"Buf": name, "Pos": p.get("positions", "positions"),
                                                           "InvFreq": f"extra:{freq}"}))
        elif kind == "kv_write":
            kc, vc = bufs[p["k_cache"]], bufs[p["v_cache"]]
            slots, kvh, hd = kc.shape
            vd = vc.shape[2]
            ring = bool(p.get("ring") or p.get("window"))
            key = kernel("kv_write", kvh, hd, vd, slots, ring, p["value_scale"])
            plan.launches.append(Launch(op.name, key, {"K": p.get("k", "k"), "V": p.get("v", "v"),
                                                       "Pos": p.get("positions", "positions"),
                                                       "KC": p["k_cache"], "VC": p["v_cache"]}))
        elif kind == "attention":
            if not p.get("causal", True):
                raise UserError(f"op {op.name}: the ops baseline runs causal attention only")
            kc, vc = bufs[p["k_cache"]], bufs[p["v_cache"]]
            slots, kvh, hd = kc.shape
            vd = vc.shape[2]
            ring = bool(p.get("ring") or p.get("window"))
            splits = attention_splits(p["splits"], kvh, slots)
            heads = kvh * p["group"]
            parts = {name: f"{name}@{splits}" for name in ("attn_max", "attn_sum", "attn_acc")}
            plan.extras[parts["attn_max"]] = plan.extras[parts["attn_sum"]] = ((1, heads, splits), "f32")
            plan.extras[parts["attn_acc"]] = ((1, heads, splits, vd), "f32")
            args = (kvh, p["group"], hd, vd, slots, splits, p["window"], ring, p["scale"])
            key = kernel("attention", *args)
            plan.launches.append(Launch(op.name, key, {"Q": "q", "Pos": "positions", "KC": p["k_cache"],
                                                       "VC": p["v_cache"], "AMax": "extra:" + parts["attn_max"],
                                                       "ASum": "extra:" + parts["attn_sum"],
                                                       "AAcc": "extra:" + parts["attn_acc"]}))
        elif kind == "attn_combine":
            heads = max(t.params["heads"][1] for t in tasks)
            vd = bufs["attn_acc"].shape[3]
            sink = p["sink"]
            key = kernel("attn_combine", heads, splits, vd, bool(sink))  # the layer's attention's splits
            if not sink:
                plan.extras["zeros_heads"] = ((heads,), "f32")
            plan.launches.append(Launch(op.name, key, {"AMax": "extra:" + parts["attn_max"],
                                                       "ASum": "extra:" + parts["attn_sum"],
                                                       "AAcc": "extra:" + parts["attn_acc"],
                                                       "Sink": f"weight:{sink}:data" if sink else "extra:zeros_heads",
                                                       "Out": "attn_out"}))
        elif kind == "topk":
            experts = bufs["router_logits"].shape[1]
            if experts > 1024:
                raise UserError(f"op {op.name}: the ops baseline's top-k takes at most 1024 experts, not {experts}")
            key = kernel("topk", experts, p["k"], bool(p["norm"]), float(p["scale"]))
            plan.launches.append(Launch(op.name, key, {"Logits": "router_logits", "Bias": f"weight:{p['bias']}:data",
                                                       "Idx": "topk_idx", "Wt": "topk_weight"}))
        elif kind == "expert_gate_up":
            if "experts" in p:
                raise UserError(f"op {op.name}: the ops baseline runs on one GPU (no expert partition)")
            E, rows, cols = bufs[p["gate"]].shape
            k = bufs["topk_idx"].shape[1]
            fmt = weight_fmt(p["gate"])
            key = kernel("expert_gate_up", fmt, E, rows, cols, k)
            plan.launches.append(Launch(op.name, key, {**wargs("G", p["gate"]), **wargs("Up", p["up"]),
                                                       "Idx": "topk_idx", "X": p["in"], "Act": "moe_act"}))
        elif kind == "expert_down":
            E, rows, cols = bufs[p["down"]].shape
            k = p["k"]
            fmt = weight_fmt(p["down"])
            key = kernel("expert_down", fmt, E, rows, cols, k)
            plan.launches.append(Launch(op.name, key, {**wargs("D", p["down"]), "Idx": "topk_idx",
                                                       "Wt": "topk_weight", "Act": "moe_act", "X": p.get("out", "x")}))
        elif kind == "lm_head":
            V, H = bufs[p["weight"]].shape
            if any(t.params.get("weight_row0", 0) for t in tasks):
                raise UserError(f"op {op.name}: the ops baseline runs on one GPU (no vocabulary split)")
            key = kernel("gemv", "bf16", V, H, V, 0, False, True)  # with the CTAs' bests for argmax
            parts = -(-V // LM_ROWS)
            plan.extras["best_score"] = ((parts,), "f32")
            plan.extras["best_row"] = ((parts,), "i32")
            plan.launches.append(Launch(op.name, key, {"W": f"weight:{p['weight']}:data", "WS": "extra:one",
                                                       "X": p["in"], "Y": "logits", "BestScore": "extra:best_score",
                                                       "BestRow": "extra:best_row"}))
        elif kind == "argmax":
            parts = plan.extras["best_score"][0][0]
            key = kernel("argmax", parts)
            plan.launches.append(Launch(op.name, key, {"BestScore": "extra:best_score", "BestRow": "extra:best_row",
                                                       "Next": "next_token"}))
        else:
            raise UserError(f"op {op.name}: the ops baseline has no TileLang kernel for op kind {kind!r}")
    return plan


# ---- build: TileLang -> CUDA source -> cubin (on the development machine) ------------------------

_SIGNATURE = re.compile(r'extern "C" __global__ void __launch_bounds__\([^)]*\) (\w+)\(([^)]*)\)')


@dataclass(frozen=True)
class BuiltKernel:
    cubin: Path
    name: str  # the __global__ function
    params: tuple[str, ...]  # parameter names in the function's order
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int = 0  # dynamic shared memory bytes


def kernel_source(builder: str, args: tuple) -> tuple[str, dict]:
    """CUDA source of one TileLang kernel (lowering needs no GPU) and its launch as the lowered
    module records it (grid, block, dynamic shared memory), checked against what the builder
    declared."""
    import tilelang
    from tvm.target import Target

    from tilert import tl_ops

    tlk = getattr(tl_ops, builder)(*args)
    with Target(TARGET):
        art = tilelang.lower(tlk.func, target=TARGET)
    (attrs,) = [fn.attrs for fn in art.device_mod.functions.values()]
    ext = {str(k): int(v) for k, v in attrs["thread_extent"].items()}
    grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(ext.get(f"threadIdx.{a}", 1) for a in "xyz")
    if grid != tuple(tlk.grid) or block != tuple(tlk.block):
        raise AssertionError(f"{builder}{args}: lowered launch {grid} x {block}, declared {tlk.grid} x {tlk.block}")
    smem = int(attrs["dyn_shared_memory_buf"]) if "dyn_shared_memory_buf" in attrs else 0
    return art.kernel_source, {"grid": list(grid), "block": list(block), "smem": smem}


def _signature(source: str) -> tuple[str, tuple[str, ...]]:
    m = _SIGNATURE.search(source)
    if not m:
        raise UserError("a TileLang kernel's source has no __global__ definition the ops baseline can read")
    params = tuple(p.strip().split()[-1] for p in m.group(2).split(","))
    return m.group(1), params


def _nvcc_flags() -> list[str]:
    from tilelang import env

    return ["-std=c++20", "-O3", "-w", "--cubin", "-gencode", "arch=compute_90a,code=sm_90a",
            f"-I{env.TILELANG_TEMPLATE_PATH}", f"-I{env.CUTLASS_INCLUDE_DIR}", "-DENABLE_BF16", "-Xptxas", "-v"]


MANIFEST = "manifest.json"


def build_kernels(plan: StepPlan, out_dir: str | Path, log=print) -> dict[str, BuiltKernel]:
    """Lower and build every kernel of the plan into out_dir (cubins cached by source hash), and
    record them in out_dir/manifest.json, which load_kernels reads on a machine without TileLang."""
    from tilert import tl_ops

    if tl_ops.LM_ROWS != LM_ROWS:
        raise AssertionError(f"tl_ops.LM_ROWS {tl_ops.LM_ROWS} != ops_backend.LM_ROWS {LM_ROWS}")
    nvcc = nvcc_path()
    if nvcc is None:
        raise UserError("nvcc not found on PATH: install the CUDA toolkit (13.0) to build the ops baseline")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    built = {}
    for key, (builder, args) in plan.kernels.items():
        src, launch = kernel_source(builder, args)
        name, params = _signature(src)
        digest = hashlib.sha256((src + " ".join(_nvcc_flags())).encode()).hexdigest()[:16]
        cubin = out / f"{digest}.cubin"
        if not cubin.exists():
            cu = out / f"{digest}.cu"
            cu.write_text(src)
            t0 = time.time()
            fd, tmp = tempfile.mkstemp(suffix=".cubin", dir=out)
            os.close(fd)
            proc = subprocess.run([nvcc, *_nvcc_flags(), "-o", tmp, str(cu)], capture_output=True, text=True)
            if proc.returncode != 0:
                os.unlink(tmp)
                errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln][:10]
                raise UserError(f"nvcc failed on the ops baseline's kernel {key} ({cu}):\n" + "\n".join(errors))
            (out / f"{digest}.ptxas.txt").write_text(proc.stdout + proc.stderr)
            os.replace(tmp, cubin)
            log(f"built {key} in {time.time() - t0:.1f} s")
        built[key] = BuiltKernel(cubin, name, params, tuple(launch["grid"]), tuple(launch["block"]), launch["smem"])
        manifest[key] = {"cubin": cubin.name, "name": name, "params": list(params), **launch}
    tmp = manifest_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, manifest_path)
    return built


def load_kernels(plan: StepPlan, out_dir: str | Path) -> dict[str, BuiltKernel]:
    """The built kernels of the plan, from out_dir/manifest.json (build_kernels wrote it)."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{path}: no ops-baseline kernels built here (tools/build_ops_kernels.py builds them; "
                        f"--artifact ART for an artifact's)")
    manifest = json.loads(path.read_text())
    missing = [k for k in plan.kernels if k not in manifest]
    if missing:
        raise UserError(f"{path} lacks {len(missing)} kernels of this step, e.g. {missing[0]} "
                        f"(build them with tools/build_ops_kernels.py for the same model, layers and context)")
    return {k: BuiltKernel(Path(out_dir) / m["cubin"], m["name"], tuple(m["params"]), tuple(m["grid"]),
                           tuple(m["block"]), m.get("smem", 0)) for k in plan.kernels for m in [manifest[k]]}


def kernels_for(plan: StepPlan, kernels_dir: str | Path) -> dict[str, BuiltKernel]:
    """The plan's kernels from kernels_dir, built there first where TileLang is installed (else
    load_kernels' error, which says how to build them)."""
    try:
        return load_kernels(plan, kernels_dir)
    except UserError:
        import importlib.util

        if importlib.util.find_spec("tilelang") is None:
            raise
        return build_kernels(plan, kernels_dir, log=lambda *_: None)


# ---- run: load the cubins, hold the buffers, replay the step as a CUDA graph ---------------------

class OpsRuntime:
    """Batch-1 decode with the ops baseline on the GPU; the same buffers, by name, as the VM.
    `weights`: the runtime-layout StoredTensors (experts stacked per layer), on the GPU or not."""

    def __init__(self, cfg: MimoConfig, graph: TaskGraph, plan: StepPlan, built: dict[str, BuiltKernel],
                 weights: dict[str, StoredTensor], max_seq_len: int, device: str = "cuda"):
        from tilert.gpu import _check, _driver, load_function

        self.cfg, self.graph, self.plan, self.max_seq_len = cfg, graph, plan, max_seq_len
        self.device = torch.device(device)
        self.seq_len = 0
        dev = self.device
        self.buffers: dict[str, torch.Tensor] = {}
        for name, b in graph.buffers.items():
            if b.kind in (INPUT, ACTIVATION, OUTPUT, STATE):
                self.buffers[name] = torch.zeros(b.shape, dtype=_TORCH[b.dtype], device=dev)
            elif b.kind == WEIGHT and name not in weights:
                raise UserError(f"weights lack tensor {name!r} that the step reads")
        self.weights = {name: t.to(dev) for name, t in weights.items() if name in graph.buffers}
        self.extras: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in plan.extras.items():
            self.extras[name] = torch.zeros(shape, dtype=_TORCH[dtype], device=dev)
        for name, (theta, rd) in plan.inv_freq.items():  # as kernels.rope computes it
            self.extras[name].copy_(1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)))
        driver = _driver()
        self._driver, self._checkfn = driver, _check
        functions = {key: load_function(bk.cubin, bk.name, bk.smem) for key, bk in built.items()}
        self._launches = []
        for launch in plan.launches:
            bk = built[launch.kernel]
            missing = set(bk.params) - set(launch.args)
            if missing:
                raise UserError(f"op {launch.op}: kernel {launch.kernel} has parameters {sorted(missing)} nothing binds")
            values = np.array([self._tensor(launch.args[p]).data_ptr() for p in bk.params], dtype=np.uint64)
            ptrs = np.array([values.ctypes.data + 8 * i for i in range(len(values))], dtype=np.uint64)
            self._launches.append((functions[launch.kernel][1], bk, values, ptrs))
        self._modules = functions  # keep the modules loaded
        self._graph: torch.cuda.CUDAGraph | None = None

    def _tensor(self, ref: str) -> torch.Tensor:
        if ref.startswith("weight:"):
            _, name, part = ref.split(":")
            t = self.weights[name]
            return t.data if part == "data" else t.scale
        if ref.startswith("extra:"):
            return self.extras[ref[len("extra:"):]]
        return self.buffers[ref]

    def _run_launches(self) -> None:
        stream = self._driver.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        for function, bk, _, ptrs in self._launches:
            self._checkfn(self._driver.cuLaunchKernel(function, *bk.grid, *bk.block, bk.smem, stream,
                                                      ptrs.ctypes.data, 0))

    def _replay(self) -> None:
        if self._graph is None:
            self._run_launches()  # once eagerly: module loading and first-touch before capture
            torch.cuda.synchronize(self.device)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._run_launches()
        self._graph.replay()

    # The runtime interface tilert.diff.check_step_against_vm and the benchmarks use.
    def buffer(self, name: str) -> torch.Tensor:
        return self.buffers[name]

    def step(self, tokens: list[int], temperature: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
        if len(tokens) != 1:
            raise UserError(f"the ops baseline decodes one token a step, not {len(tokens)}")
        if temperature != 0.0:
            raise UserError("the ops baseline decodes greedily (temperature 0)")
        if self.seq_len >= self.max_seq_len:
            raise UserError(f"position {self.seq_len} is past the max sequence length {self.max_seq_len}")
        self.buffers["tokens"].fill_(int(tokens[0]))
        self.buffers["positions"].fill_(self.seq_len)
        self._replay()
        self.seq_len += 1
        return self.buffers["logits"].clone(), [int(self.buffers["next_token"][0])]

    def launch(self, tokens: int = 1) -> None:
        """Replay the step on its last inputs (timing: the position does not advance)."""
        self._replay()

    def fill_cache(self, length: int, seed: int = 0) -> None:
        """Random keys and values in every KV cache, as if `length` tokens were decoded."""
        if length > self.max_seq_len:
            raise UserError(f"context {length} exceeds the max sequence length {self.max_seq_len}")
        from tilert.gpu import fill_caches

        fill_caches([self.buffers[name] for name, b in self.graph.buffers.items() if b.kind == STATE], length, seed,
                    self.device)
        self.seq_len = length

    def truncate(self, seq_len: int) -> None:
        if not 0 <= seq_len <= self.seq_len:
            raise ValueError(f"truncate({seq_len}): the cache holds {self.seq_len} positions")
        self.seq_len = seq_len


def ops_step_graph(cfg: MimoConfig, recipe: dict, max_seq_len: int) -> TaskGraph:
    """The unfused batch-1 step graph the ops baseline runs (its op split: the recipe's)."""
    from tilert.lower import lower_step

    return lower_step(cfg, recipe, tokens=1, max_seq_len=max_seq_len, max_tokens=1)


def default_kernels_dir() -> Path:
    return Path(os.environ.get("TILERT_CACHE", Path.home() / ".cache" / "tilert")) / "ops-kernels"


def artifact_plan(art) -> tuple[TaskGraph, StepPlan]:
    """The ops baseline's step graph and launches for a compiled artifact (its config, recipe and
    max sequence length)."""
    recipe = art.meta.get("recipe")
    if not isinstance(recipe, dict):
        raise UserError(f"{art.path}: the artifact's metadata holds no recipe to plan the ops baseline with")
    graph = ops_step_graph(art.cfg, recipe, art.max_seq_len)
    return graph, plan_step(graph, art.cfg)


def generate_ops(art, prompt: list[int], max_new_tokens: int, kernels_dir: str | Path | None = None,
                 bar=None) -> list[int]:
    """Greedy decoding of an artifact with the ops baseline (`tilert run --backend ops`): the
    prompt one token a step, then the new tokens.  Kernels come from kernels_dir (built there
    first where TileLang is installed)."""
    from tilert.cli import prefill_and_decode

    if not torch.cuda.is_available():
        raise UserError("--backend ops runs on a CUDA GPU (H100 / H200); none is visible here")
    kernels_dir = Path(kernels_dir) if kernels_dir else default_kernels_dir()
    graph, plan = artifact_plan(art)
    rt = OpsRuntime(art.cfg, graph, plan, kernels_for(plan, kernels_dir), {k: v for k, v in art.weights.items() if not k.startswith("draft.")},
                    art.max_seq_len)
    art.weights = None  # the host copies are no longer needed
    return prefill_and_decode(lambda tokens: rt.step(tokens)[1], prompt, [1], max_new_tokens, bar)
