"""The VM for the DFlash draft step: runs the draft schedule (tilert/draft.py) task by task and
keeps the drafter's context caches between steps (the host side: tilert/draft_context.py)."""

from __future__ import annotations

import math

import torch

from model.weights import StoredTensor
from tilert.draft_context import DraftRunner
from tilert.errors import UserError
from tilert.ir import ACTIVATION, INPUT, OUTPUT, STATE, WEIGHT
from tilert.kernels import Memory
from tilert.schedule import Schedule
from tilert.vm import _TORCH, execute


class DraftVM(DraftRunner):
    """Runs the draft schedule (tilert/draft.py) on the VM; holds the drafter's context caches."""

    def __init__(self, schedule: Schedule, weights: dict[str, StoredTensor], max_seq_len: int,
                 device: str = "cpu", interleave: int | None = None):
        g = schedule.graph
        self.schedule = schedule
        self.interleave = interleave
        self.device = torch.device(device)
        bufs = {}
        for name, buf in g.buffers.items():
            if buf.kind == WEIGHT and name not in weights:
                raise UserError(f"artifact weights lack tensor {name!r} that the draft schedule reads")
            if buf.kind in (STATE, INPUT, ACTIVATION, OUTPUT):
                bufs[name] = torch.zeros(buf.shape, dtype=_TORCH[buf.dtype], device=self.device)
        self.state = {n: t for n, t in bufs.items() if g.buffers[n].kind == STATE}
        self.memory = Memory(bufs, weights, self.device)
        super().__init__(g.buffers["positions"].shape[0], g.buffers["ctx_hidden"].shape[0],
                         min(t.shape[0] for t in self.state.values()), max_seq_len)

    def _clear(self) -> None:
        for t in self.state.values():
            t.zero_()

    def _run(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        m, g = self.memory, self.schedule.graph
        for name, buf in g.buffers.items():
            if buf.kind in (ACTIVATION, OUTPUT):  # poisoned: what no task writes shows
                m.buffers[name].fill_(math.nan if m.buffers[name].is_floating_point() else -1)
        for name, value in inputs.items():
            m.buffers[name].copy_(value.to(m.buffers[name].dtype))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensor ops: intra-op threads only add synchronisation
        try:
            execute(self.schedule, m, self.interleave)
        finally:
            torch.set_num_threads(threads)
        return m.buffers["logits"], m.buffers["next_token"].tolist()
