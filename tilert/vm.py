"""The VM: executes a schedule task by task, exactly as the persistent kernel would.

Each worker walks its own stream; a task starts only when every counter it waits on has
reached its value, and bumps its counters when done.  Which ready worker goes next is chosen
by an interleaving policy: in order, or adversarially from a seed.  Any interleaving the
counters allow must give the same result; a schedule that stops making progress raises
HangError naming every stuck worker, its task and the counter it waits on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from model.config import MimoConfig
from model.weights import StoredTensor
from tilert.errors import HangError, UserError
from tilert.ir import ACTIVATION, INPUT, LOCAL, OUTPUT, STATE, WEIGHT
from tilert.kernels import Memory, run_task
from tilert.schedule import Schedule

_TORCH = {"f32": torch.float32, "f64": torch.float64, "i32": torch.int64}


class VM:
    def __init__(self, cfg: MimoConfig, schedules: dict[int, Schedule], weights: dict[str, StoredTensor],
                 max_seq_len: int, device: str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.schedules = dict(sorted(schedules.items()))
        self.max_seq_len = max_seq_len
        self.weights = weights
        self.state: dict[str, torch.Tensor] = {}
        for s in self.schedules.values():
            for name, buf in s.graph.buffers.items():
                if buf.kind == WEIGHT and name not in weights:
                    raise UserError(f"artifact weights lack tensor {name!r} that the schedule reads")
                if buf.kind == STATE and name not in self.state:
                    self.state[name] = torch.zeros(buf.shape, dtype=_TORCH[buf.dtype], device=self.device)
        self._memories: dict[int, Memory] = {}
        self.seq_len = 0

    def reset(self) -> None:
        for t in self.state.values():
            t.zero_()
        self.seq_len = 0

    def truncate(self, seq_len: int) -> None:
        """Forget positions >= seq_len (their cache slots are simply overwritten later)."""
        if not 0 <= seq_len <= self.seq_len:
            raise ValueError(f"truncate({seq_len}): the cache holds {self.seq_len} positions")
        self.seq_len = seq_len

    def read(self, name: str, tokens: int) -> torch.Tensor:
        """A copy of a buffer as the last step of `tokens` tokens left it (e.g. the `hidden`
        output of an artifact compiled with a drafter)."""
        buf = self.schedules[tokens].graph.buffers.get(name) if tokens in self.schedules else None
        if buf is None or buf.kind in (WEIGHT, LOCAL):
            raise UserError(f"no global buffer {name!r} in the {tokens}-token step")
        return self._memory(tokens)[name].clone()

    def _memory(self, tokens: int) -> Memory:
        if tokens not in self._memories:
            s = self.schedules[tokens]
            bufs = dict(self.state)
            for name, buf in s.graph.buffers.items():
                if buf.kind in (INPUT, ACTIVATION, OUTPUT):
                    bufs[name] = torch.empty(buf.shape, dtype=_TORCH[buf.dtype], device=self.device)
            self._memories[tokens] = Memory(bufs, self.weights, self.device)
        return self._memories[tokens]

    def prepare(self, tokens: list[int], temperature: float = 0.0, seed: int = 0) -> tuple[Schedule, Memory]:
        """The schedule and memory of a step over `tokens` at positions seq_len.., its inputs
        written and its activations poisoned (NaN, -1): what no task writes shows."""
        B = len(tokens)
        s = self.schedules[B]
        m = self._memory(B)
        for name, buf in s.graph.buffers.items():
            if buf.kind in (ACTIVATION, OUTPUT):
                m.buffers[name].fill_(math.nan if m.buffers[name].is_floating_point() else -1)
        m.buffers["tokens"].copy_(torch.tensor(tokens))
        m.buffers["positions"].copy_(torch.arange(self.seq_len, self.seq_len + B))
        m.buffers["sampling"].copy_(torch.tensor([float(temperature), float(seed)], dtype=torch.float64))
        return s, m

    def step(self, tokens: list[int], temperature: float = 0.0, seed: int = 0,
             interleave: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Run one step over `tokens` at positions seq_len.. ; returns (logits [B, V], chosen tokens)."""
        B = len(tokens)
        check_step(B, self.schedules, self.seq_len, self.max_seq_len)
        s, m = self.prepare(tokens, temperature, seed)
        # Tasks are tiny tensor ops: intra-op threads only add synchronisation (40x slower).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            execute(s, m, interleave)
        finally:
            torch.set_num_threads(threads)
        self.seq_len += B
        return m.buffers["logits"].clone(), [int(t) for t in m.buffers["next_token"].tolist()]


def check_step(tokens: int, compiled, seq_len: int, max_seq_len: int) -> None:
    """Refuse a step of `tokens` tokens that no schedule in `compiled` covers, or that would run
    past the artifact's max sequence length."""
    if tokens not in compiled:
        raise UserError(f"no schedule for a step of {tokens} tokens (compiled: {sorted(compiled)})")
    if seq_len + tokens > max_seq_len:
        raise UserError(f"sequence of {seq_len + tokens} tokens exceeds the artifact's max sequence "
                        f"length {max_seq_len}")


def execute(s: Schedule, m: Memory | None, interleave: int | None = None,
            run: Callable[[int], None] | None = None) -> list[int]:
    """Run every task of `s` in an order the counters allow; returns the order used.  `run(t)`,
    when given, executes task t instead of running it on `m` (the multi-GPU VM runs each rank's
    tasks on that rank's memory, tilert/vm_multi.py)."""
    if run is None:
        local_shapes = {n: b.shape for n, b in s.graph.buffers.items() if b.kind == LOCAL}

        def run(t: int) -> None:
            run_task(s.graph.tasks[t], m, local_shapes)
    counters = [0] * len(s.counters)
    heads = [0] * s.num_workers
    rng = random.Random(interleave) if interleave is not None else None
    order: list[int] = []
    remaining = sum(len(st) for st in s.streams)

    def ready(w: int) -> bool:
        st = s.streams[w]
        if heads[w] >= len(st):
            return False
        return all(counters[c] >= v for c, v in s.waits[st[heads[w]]])

    while remaining:
        runnable = [w for w in range(s.num_workers) if ready(w)]
        if not runnable:
            raise HangError(_hang_report(s, heads, counters))
        if rng is None:
            batch = runnable  # in order: every ready worker advances one task per round
        else:
            batch = [rng.choice(runnable)]
        for w in batch:
            t = s.streams[w][heads[w]]
            run(t)
            for c in s.signals[t]:
                counters[c] += 1
            heads[w] += 1
            remaining -= 1
            order.append(t)
    return order


def _hang_report(s: Schedule, heads: list[int], counters: list[int]) -> str:
    lines = ["schedule hung: no worker can proceed"]
    for w, st in enumerate(s.streams):
        if heads[w] >= len(st):
            continue
        t = st[heads[w]]
        task = s.graph.tasks[t]
        name = s.graph.ops[task.op].name
        for c, v in s.waits[t]:
            if counters[c] < v:
                lines.append(f"  worker {w}: task {t} ({name}, {task.kind}) waits on counter {c} "
                             f"(at {counters[c]}, needs {v}; signalled by tasks {s.counters[c].signalled_by[:8]})")
    return "\n".join(lines)
