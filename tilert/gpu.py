"""The thin GPU runtime: load generated megakernels, hold their memory, run decode steps.

One `MegakernelRuntime` owns, for each compiled step size B, a loaded cubin and its memory
(activation arena, counters, program, weight table, error buffer), plus what all sizes share:
the weights (uploaded once, at their stored size: fp8 stays one byte, mxfp4 codes stay packed)
and the persistent KV-cache arena.

A step writes the token ids, positions and sampling parameters with asynchronous copies,
launches one kernel on torch's current stream and synchronises once, to read the chosen
tokens and the error buffer.  Counters are never reset between steps: the kernel is told
the step index and waits for step * target + value (see tilert/cuda/megakernel.cuh).  After a
hang or a partial run (`stop_after`) the counters are zeroed and the step index restarts.

cuda-bindings is imported lazily, so this module imports on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.weights import StoredTensor
from tilert.codegen import (
    ERROR_WORDS,
    ERRORS,
    FORMATS,
    KERNEL_ARGS,
    WEIGHT_DESC,
    GeneratedKernel,
    _row_bytes,
    numpy_dtype,
)
from tilert.errors import HangError, UserError
from tilert.tiling import ROW_BLOCK, STEP_BYTES, step_block_bytes, tile

_TORCH = {"f32": torch.float32, "i32": torch.int32, "f64": torch.float64}
# gemv.cuh gemv_tile's record_error: the path the weight needed (2: tiled, whole x not staged;
# the kernel does not spend code on telling the two apart).
_GEMV_PATH_NAMES = {0: "row-major CUDA-core", 1: "tensor-core", 2: "tiled CUDA-core or chunk-staged tensor-core"}
_ERROR_NAMES = {v: k for k, v in ERRORS.items()}


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise UserError("the GPU runtime needs cuda-bindings (`from cuda.bindings import driver`)") from e
    return driver


def _check(result):
    """cuda-bindings calls return (CUresult, values...): raise on error, return the values."""
    driver = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        raise RuntimeError(f"CUDA driver error {err}: {msg.decode() if msg else ''}")
    return rest[0] if len(rest) == 1 else rest


def load_function(cubin: Path, name: str, dynamic_smem: int) -> tuple[Any, Any]:
    """(module, function) of kernel `name` in a cubin, allowed `dynamic_smem` bytes of dynamic
    shared memory.  The module must stay referenced while the function is used."""
    driver = _driver()
    image = np.frombuffer(Path(cubin).read_bytes(), dtype=np.uint8).copy()
    module = _check(driver.cuModuleLoadData(image.ctypes.data))
    function = _check(driver.cuModuleGetFunction(module, name.encode()))
    _check(driver.cuFuncSetAttribute(
        function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic_smem))
    return module, function


def fill_caches(views, length: int, seed: int, device) -> None:
    """Random keys and values in the first `length` rows of each cache view (benchmarks at a
    given context without a prefill; rings hold at most their slots)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for view in views:
        view[:min(length, view.shape[0])].normal_(generator=gen)


@dataclass
class _Kernel:
    """One loaded megakernel (one step size) and its private memory."""
    gen: GeneratedKernel
    module: Any
    function: Any
    act: torch.Tensor
    counters: torch.Tensor
    program: torch.Tensor
    consts: torch.Tensor
    scratch: torch.Tensor
    weight_table: torch.Tensor
    errors: torch.Tensor
    profile: torch.Tensor
    args: np.ndarray  # the KernelArgs image, patched per launch
    arg_ptrs: np.ndarray  # void*[1] -> args
    staging: dict[str, torch.Tensor]  # pinned host copies of the inputs
    next_host: torch.Tensor
    errors_host: torch.Tensor
    epoch: int = 0  # complete steps since the counters were last zeroed


WEIGHT_PAD = 16  # bytes after every weight buffer (the kernel reads 16-byte chunks)


def zeroed_buffers(gen: GeneratedKernel) -> dict[str, tuple[int, torch.dtype]]:
    """(elements, dtype) of the zero-filled device buffers one step size's kernel gets; the
    compile-time footprint (tilert.megakernel.footprint) sizes GPU memory from this same table."""
    return {"act": (max(gen.act_bytes, 16), torch.uint8),
            "counters": (max(gen.num_counters, 1), torch.int32),
            "scratch": (max(gen.scratch_stride * gen.num_workers, 16), torch.uint8),
            "errors": (ERROR_WORDS, torch.int32),
            # Always sized for a profiling build: a cubin built with profile=True writes it.
            "profile": (max(4 * gen.num_tasks, 1), torch.int64)}


def _view_like(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`raw` (uint8, at least as many bytes) seen with the dtype and shape of `like`."""
    n = like.numel() * like.element_size()
    return raw[:n].view(like.dtype).view(like.shape)


class MegakernelRuntime:
    def __init__(self, cubin_path, generated, runtime_weights: dict[str, StoredTensor], max_seq_len: int,
                 device: str = "cuda", timeout_s: float = 2.0, profile: bool = False,
                 share_weights_with: "MegakernelRuntime | None" = None, consume_weights: bool = False):
        """`cubin_path` and `generated` are one cubin and its GeneratedKernel, or dicts of them
        keyed by step size.  `profile`: the cubins were built with profile=True.
        `share_weights_with`: another runtime on this GPU whose uploaded weights this one reads
        where both need the same tensor in the same layout (a drafter borrows the target's
        embedding and LM head).  `consume_weights`: drop each weight re-laid out for the GPU
        (tiled) from `runtime_weights` once uploaded, so the card never holds both copies of
        every weight (a 12-layer mimo-v2-flash cut drawn on an 80 GB card)."""
        if not isinstance(generated, dict):
            generated, cubin_path = {generated.tokens: generated}, {generated.tokens: cubin_path}
        if set(generated) != set(cubin_path):
            raise UserError("cubin paths and generated kernels name different step sizes")
        driver = _driver()
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        torch.empty(1, device=self.device)  # make torch's primary context current on this thread
        _check(driver.cuInit(0))
        self.max_seq_len = max_seq_len
        self.timeout_ns = int(timeout_s * 1e9)
        self.profile_enabled = profile
        self.seq_len = 0
        self._check_device(generated.values())
        self._weights = self._upload_weights(generated.values(), runtime_weights,
                                             share_weights_with._weights if share_weights_with else {},
                                             consume_weights)
        self.state = self._state_arena(generated.values())
        self.kernels: dict[int, _Kernel] = {
            B: self._load(Path(cubin_path[B]), gen, driver) for B, gen in sorted(generated.items())}

    # ---- setup ------------------------------------------------------------------------------------

    def _check_device(self, gens) -> None:
        driver = _driver()
        props = torch.cuda.get_device_properties(self.device)
        if (props.major, props.minor) != (9, 0):
            raise UserError(f"the megakernel is built for sm_90a (H100/H200); this GPU is {props.name} "
                            f"(compute capability {props.major}.{props.minor})")
        dev = _check(driver.cuDeviceGet(self.device.index))
        optin = _check(driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev))
        for g in gens:
            if g.num_workers > props.multi_processor_count:
                raise UserError(f"the B={g.tokens} schedule has {g.num_workers} workers but {props.name} has "
                                f"{props.multi_processor_count} SMs: every worker needs its own SM")
            if g.smem_bytes > optin:
                raise UserError(f"the B={g.tokens} kernel needs {g.smem_bytes} B of shared memory; the GPU allows {optin}")

    def _upload_weights(self, gens, weights: dict[str, StoredTensor], shared: dict[str, dict],
                        consume: bool = False) -> dict[str, dict]:
        """Each weight once, as stored, in 16-byte padded buffers (the kernel reads 16-byte chunks);
        those in `shared` (uploaded by another runtime) in the layout wanted are not copied again."""
        out: dict[str, dict] = {}
        for g in gens:
            for slot in g.weights:
                if slot.name not in out and slot.name in shared and bool(shared[slot.name]["desc"]["tiled"]) == slot.tiled:
                    out[slot.name] = shared[slot.name]
                if slot.name in out:
                    if bool(out[slot.name]["desc"]["tiled"]) != slot.tiled:
                        raise UserError(f"weight {slot.name}: the kernels of different step sizes want it in "
                                        f"different layouts (tiled and row-major); regenerate them together")
                    continue
                t = weights.get(slot.name)
                if t is None:
                    raise UserError(f"runtime weights lack tensor {slot.name!r} that the kernel reads")
                fmt = {"f32": "fp32"}.get(t.fmt, t.fmt)
                if fmt != slot.fmt:
                    raise UserError(f"weight {slot.name} is stored as {t.fmt} but the kernel was generated for "
                                    f"{slot.fmt}: regenerate with weight_formats from these weights")
                if tuple(t.shape) != tuple(slot.shape):
                    raise UserError(f"weight {slot.name} has shape {tuple(t.shape)}, the kernel expects {slot.shape}")
                out[slot.name] = up = self._upload_one(t, fmt, slot.tiled)
                if consume and slot.tiled:
                    del weights[slot.name], t
                elif t.data.device == self.device and not slot.tiled:
                    # Already on this GPU: let the caller's tensor share the padded copy, so
                    # that the weights are held once (large models fill the card).
                    t.data = _view_like(up["data"], t.data)
                    if t.scale is not None:
                        t.scale = _view_like(up["scale"], t.scale)
        return out

    def _device_bytes(self, x: torch.Tensor) -> torch.Tensor:
        raw = x.detach().contiguous().view(torch.uint8).reshape(-1)
        buf = torch.zeros(raw.numel() + WEIGHT_PAD, dtype=torch.uint8, device=self.device)
        buf[:raw.numel()].copy_(raw)
        return buf

    def _upload_one(self, t: StoredTensor, fmt: str, tiled: bool) -> dict:
        """One weight on the device, row-major as stored or in the tiled layout (tilert/tiling.py:
        MXFP4 scales then travel inside the data, FP8 block scales stay a table)."""
        shape = tuple(t.shape)
        experts = shape[0] if len(shape) == 3 else 1
        rows, cols = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[0])
        row_bytes = _row_bytes(fmt, cols)
        if tiled:
            data = self._device_bytes(tile(t.data.to(self.device), fmt,
                                           t.scale.to(self.device) if fmt == "mxfp4" else None))
            expert_bytes = rows // ROW_BLOCK * (row_bytes // STEP_BYTES) * step_block_bytes(fmt)
        else:
            data = self._device_bytes(t.data)
            expert_bytes = rows * row_bytes
        keep_scale = t.scale is not None and not (tiled and fmt == "mxfp4")
        scale = self._device_bytes(t.scale) if keep_scale else None
        scale_bytes = t.scale.numel() * t.scale.element_size() if keep_scale else 0
        desc = {"data": data.data_ptr(), "scale": scale.data_ptr() if scale is not None else 0,
                "expert_bytes": expert_bytes, "expert_scale_bytes": scale_bytes // experts,
                "fmt": FORMATS[fmt], "rows": rows, "cols": cols, "experts": experts, "row_bytes": row_bytes,
                "scale_ld": int(t.scale.shape[-1]) if t.scale is not None else 0, "tiled": int(tiled), "pad1": 0}
        return {"data": data, "scale": scale, "desc": desc}

    def _state_arena(self, gens) -> torch.Tensor:
        gens = list(gens)
        layouts = [{n: (s.offset, s.shape) for n, s in g.buffers.items() if s.space == "state"} for g in gens]
        if any(lay != layouts[0] for lay in layouts[1:]):
            raise UserError("the kernels of different step sizes lay out the KV caches differently")
        return torch.zeros(max(g.state_bytes for g in gens) or 16, dtype=torch.uint8, device=self.device)

    def _load(self, cubin: Path, gen: GeneratedKernel, driver) -> _Kernel:
        module, function = load_function(cubin, gen.kernel_name, gen.smem_bytes)
        blocks = _check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(function, gen.threads, gen.smem_bytes))
        if blocks < 1:
            raise UserError(f"the B={gen.tokens} megakernel cannot be resident ({gen.threads} threads, "
                            f"{gen.smem_bytes} B shared memory)")
        return self._instance(gen, module, function)

    def use_schedule(self, gen: GeneratedKernel) -> None:
        """Run the steps of gen.tokens tokens with `gen`'s program from now on: another schedule
        of the same kernel (same source, same buffers; the program is data, so no new cubin).
        tools/autotune_schedule.py times the schedules a recipe could choose this way."""
        old = self._kernel(gen.tokens)
        if gen.source != old.gen.source:
            raise UserError(f"use_schedule: this B={gen.tokens} schedule needs another kernel source "
                            f"(different kinds or sizes); build its cubin instead")
        layout = lambda g: {n: (s.space, s.offset, tuple(s.shape)) for n, s in g.buffers.items()}  # noqa: E731
        if layout(gen) != layout(old.gen):
            raise UserError(f"use_schedule: this B={gen.tokens} schedule lays out the buffers differently")
        self.kernels[gen.tokens] = self._instance(gen, old.module, old.function)

    def _instance(self, gen: GeneratedKernel, module, function) -> _Kernel:
        """The device memory of one schedule of a loaded kernel: program, constants, weight table,
        activation arena, counters and the other zeroed buffers, and its launch arguments."""
        dev = self.device
        table = np.zeros(max(len(gen.weights), 1), dtype=numpy_dtype(WEIGHT_DESC))
        for slot in gen.weights:
            for k, v in self._weights[slot.name]["desc"].items():
                table[slot.index][k] = v
        k = _Kernel(
            gen=gen, module=module, function=function,
            program=torch.from_numpy(gen.program.copy()).to(dev),
            consts=torch.from_numpy(gen.consts.copy()).to(dev),
            weight_table=torch.from_numpy(table.view(np.uint8).copy()).to(dev),
            **{name: torch.zeros(n, dtype=dtype, device=dev) for name, (n, dtype) in zeroed_buffers(gen).items()},
            args=np.zeros(1, dtype=numpy_dtype(KERNEL_ARGS)), arg_ptrs=np.zeros(1, dtype=np.uint64),
            staging={"tokens": torch.zeros(gen.tokens, dtype=torch.int32).pin_memory(),
                     "positions": torch.zeros(gen.tokens, dtype=torch.int32).pin_memory(),
                     "sampling": torch.zeros(2, dtype=torch.float64).pin_memory()},
            next_host=torch.zeros(gen.tokens, dtype=torch.int32).pin_memory(),
            errors_host=torch.zeros(ERROR_WORDS, dtype=torch.int32).pin_memory(),
        )
        a = k.args[0]
        for name, t in (("program", k.program), ("counters", k.counters), ("act", k.act), ("state", self.state),
                        ("consts", k.consts), ("scratch", k.scratch), ("weights", k.weight_table),
                        ("errors", k.errors), ("profile", k.profile)):
            a[name] = t.data_ptr()
        a["timeout_ns"], a["stop_after"] = self.timeout_ns, -1
        k.arg_ptrs[0] = k.args.ctypes.data
        return k

    # ---- buffers ------------------------------------------------------------------------------------

    def buffer(self, name: str, tokens: int | None = None) -> torch.Tensor:
        """A live view of a global buffer (activation, input, output or KV cache) by name."""
        k = self._kernel(tokens)
        slot = k.gen.buffers.get(name)
        if slot is None:
            raise UserError(f"{name!r} is not a global buffer of the B={k.gen.tokens} kernel "
                            f"(task-local buffers live in shared memory only)")
        arena = self.state if slot.space == "state" else k.act
        raw = arena[slot.offset: slot.offset + slot.nbytes]
        return raw.view(_TORCH[slot.dtype]).view(slot.shape)

    def read(self, name: str, tokens: int | None = None) -> torch.Tensor:
        """A host copy of a buffer (after the work queued so far)."""
        return self.buffer(name, tokens).cpu()

    def read_all(self, tokens: int | None = None) -> dict[str, torch.Tensor]:
        return {n: self.read(n, tokens) for n in self._kernel(tokens).gen.buffers}

    def write(self, name: str, value: torch.Tensor, tokens: int | None = None) -> None:
        view = self.buffer(name, tokens)
        view.copy_(value.to(view.dtype).reshape(view.shape))

    def _kernel(self, tokens: int | None) -> _Kernel:
        if tokens is None:
            tokens = min(self.kernels)
        if tokens not in self.kernels:
            raise UserError(f"no kernel for a step of {tokens} tokens (compiled: {sorted(self.kernels)})")
        return self.kernels[tokens]

    # ---- steps -----------------------------------------------------------------------------------------

    def reset(self) -> None:
        self.state.zero_()
        self.seq_len = 0

    def truncate(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def step(self, tokens: list[int], temperature: float = 0.0, seed: int = 0, stop_after: int | None = None,
             poison: bool = False) -> tuple[torch.Tensor, list[int]]:
        """Run one step over `tokens` at positions seq_len.. ; returns (logits [B, V] on the device,
        chosen tokens).  `stop_after=N` runs only the tasks with id <= N (a diff prefix): the
        step then does not advance the sequence.  `poison` fills the activations with NaN (-1
        for integers) first, so that anything the kernel fails to write shows."""
        B = len(tokens)
        k = self._kernel(B)
        vocab = k.gen.buffers["logits"].shape[1]
        if any(not 0 <= t < vocab for t in tokens):
            raise UserError(f"token ids must lie in [0, {vocab})")
        if self.seq_len + B > self.max_seq_len:
            raise UserError(f"sequence of {self.seq_len + B} tokens exceeds the max sequence length {self.max_seq_len}")
        k.staging["tokens"].copy_(torch.tensor(tokens, dtype=torch.int32))
        k.staging["positions"].copy_(torch.arange(self.seq_len, self.seq_len + B, dtype=torch.int32))
        k.staging["sampling"].copy_(torch.tensor([float(temperature), float(seed)], dtype=torch.float64))
        if poison:
            k.act.fill_(0xFF)
        for name, host in k.staging.items():
            self.buffer(name, B).copy_(host, non_blocking=True)
        partial = stop_after is not None
        a = k.args[0]
        a["step"] = k.epoch
        a["stop_after"] = -1 if stop_after is None else int(stop_after)
        self._launch(k)
        k.next_host.copy_(self.buffer("next_token", B), non_blocking=True)
        k.errors_host.copy_(k.errors, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        if int(k.errors_host[0]):
            self._reset_counters(k)
            raise self._error(k)
        if partial:
            self._reset_counters(k)
        else:
            k.epoch += 1
            self.seq_len += B
        return self.buffer("logits", B).clone(), [int(t) for t in k.next_host.tolist()]

    def run_inputs(self, inputs: dict[str, torch.Tensor], tokens: int) -> None:
        """Write these input buffers and run one step of the B=`tokens` kernel (a kernel whose
        inputs are not a decode step's, like the DFlash draft step); the caller reads the outputs."""
        k = self._kernel(tokens)
        for name, value in inputs.items():
            self.write(name, value, tokens)
        a = k.args[0]
        a["step"], a["stop_after"] = k.epoch, -1
        self._launch(k)
        k.errors_host.copy_(k.errors, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        if int(k.errors_host[0]):
            self._reset_counters(k)
            raise self._error(k)
        k.epoch += 1

    def fill_cache(self, length: int, seed: int = 0) -> None:
        """Pretend `length` tokens were decoded already: random keys and values in every KV
        cache (benchmarks at a given context without a prefill)."""
        if length > self.max_seq_len:
            raise UserError(f"context {length} exceeds the max sequence length {self.max_seq_len}")
        k = self._kernel(None)
        fill_caches([self.buffer(name) for name, slot in k.gen.buffers.items() if slot.space == "state"], length,
                    seed, self.device)
        self.seq_len = length

    def launch(self, tokens: int = 1) -> None:
        """Queue one more step on the inputs of the last step, without waiting or reading results
        (timing): the same positions are decoded again, so the sequence does not advance."""
        k = self._kernel(tokens)
        a = k.args[0]
        a["step"], a["stop_after"] = k.epoch, -1
        self._launch(k)  # the driver copies the arguments at launch: `a` may change afterwards
        k.epoch += 1

    def _launch(self, k: _Kernel) -> None:
        driver = _driver()
        stream = driver.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        g = k.gen
        _check(driver.cuLaunchKernel(k.function, g.num_workers, 1, 1, g.threads, 1, 1, g.smem_bytes, stream,
                                     k.arg_ptrs.ctypes.data, 0))

    def _reset_counters(self, k: _Kernel) -> None:
        k.counters.zero_()
        k.errors.zero_()
        k.epoch = 0

    def _error(self, k: _Kernel) -> Exception:
        e = k.errors_host.tolist()
        count = e[0]
        g = k.gen
        lines, hang = [], True
        for i in range(min(count, (len(e) - 8) // 8)):
            code, worker, task, counter, seen, needed, step, _extra = e[8 + 8 * i: 16 + 8 * i]
            name = g.task_names[task] if 0 <= task < g.num_tasks else "?"
            if _ERROR_NAMES.get(code) == "hang":
                base = (step & 0xFFFFFFFF) * g.counter_targets[counter] if 0 <= counter < g.num_counters else 0
                seen_rel = ((seen & 0xFFFFFFFF) - base) & 0xFFFFFFFF
                need_rel = ((needed & 0xFFFFFFFF) - base) & 0xFFFFFFFF
                target = g.counter_targets[counter] if 0 <= counter < g.num_counters else "?"
                lines.append(f"  worker {worker}: task {task} {name} waits on counter {counter} "
                             f"(at {seen_rel}, needs {need_rel} of target {target} in step {step})")
            elif _ERROR_NAMES.get(code) == "gemv_path":
                hang = False
                fmt = {v: k for k, v in FORMATS.items()}.get(seen, seen)
                wname = g.weights[counter].name if 0 <= counter < len(g.weights) else counter
                lines.append(f"  worker {worker}: task {task} {name}: weight {wname} ({fmt}, "
                             f"{_GEMV_PATH_NAMES.get(_extra, _extra)} GEMV) has no compiled GEMV path "
                             f"(kind mask {needed:#x}): kernel and weights disagree")
            else:
                hang = False
                lines.append(f"  worker {worker}: task {task} {name}: internal error {_ERROR_NAMES.get(code, code)} "
                             f"(piece {seen})")
        more = f"\n  ... and {count - len(lines)} more" if count > len(lines) else ""
        head = (f"megakernel (B={g.tokens}) hung: the watchdog ({self.timeout_ns / 1e9:g} s) stopped "
                f"{count} wait(s)")
        msg = head + "\n" + "\n".join(lines) + more
        return HangError(msg) if hang else RuntimeError(msg)

    # ---- profiling ----------------------------------------------------------------------------------------

    def profile(self, tokens: int | None = None) -> list[dict]:
        """Per task of the last step (profile builds): worker, wait start, start, end (ns, from the
        step's first wait)."""
        k = self._kernel(tokens)
        if not self.profile_enabled:
            raise UserError("build the cubins with profile=True and pass profile=True to the runtime")
        p = k.profile.view(-1, 4).cpu().tolist()
        t0 = min((r[0] for r in p if r[0]), default=0)
        return [{"task": t, "name": k.gen.task_names[t], "worker": r[3], "wait": r[0] - t0, "start": r[1] - t0,
                 "end": r[2] - t0} for t, r in enumerate(p) if r[2]]
