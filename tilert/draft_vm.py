"""The VM for the DFlash draft step: runs the draft schedule (tilert/draft.py) task by task and
keeps the drafter's context caches between steps.

`draft(last_token, new_hidden)` is DFlashDrafter.draft: the new committed positions' hidden
states are appended to the context (over several steps when they outnumber the step's context
rows), then the block is drafted.  The drafts are the argmax of the drafter's logits.
"""

from __future__ import annotations

import math

import torch

from model.weights import StoredTensor
from tilert.draft import rollback_floor
from tilert.errors import UserError
from tilert.ir import ACTIVATION, INPUT, OUTPUT, STATE, WEIGHT
from tilert.kernels import Memory
from tilert.schedule import Schedule
from tilert.vm import _TORCH, execute


class DraftVM:
    """Runs the draft schedule (tilert/draft.py) on the VM; holds the drafter's context caches."""

    def __init__(self, schedule: Schedule, weights: dict[str, StoredTensor], max_seq_len: int,
                 device: str = "cpu", interleave: int | None = None):
        g = schedule.graph
        self.schedule = schedule
        self.max_seq_len = max_seq_len
        self.interleave = interleave
        self.device = torch.device(device)
        self.block_size = g.buffers["positions"].shape[0]
        self.context_rows = g.buffers["ctx_hidden"].shape[0]
        bufs = {}
        for name, buf in g.buffers.items():
            if buf.kind == WEIGHT and name not in weights:
                raise UserError(f"artifact weights lack tensor {name!r} that the draft schedule reads")
            if buf.kind in (STATE, INPUT, ACTIVATION, OUTPUT):
                bufs[name] = torch.zeros(buf.shape, dtype=_TORCH[buf.dtype], device=self.device)
        self.state = {n: t for n, t in bufs.items() if g.buffers[n].kind == STATE}
        self.slots = min(t.shape[0] for t in self.state.values())
        self.memory = Memory(bufs, weights, self.device)
        self.context_len = 0
        self.floor = 0  # truncate_context may not go below (sliding-window rings, tilert/draft.py)
        self.last_logits: torch.Tensor | None = None  # [B-1, vocab] of the last draft

    def reset(self) -> None:
        for t in self.state.values():
            t.zero_()
        self.context_len = self.floor = 0

    def truncate_context(self, n: int) -> None:
        if not 0 <= n <= self.context_len:
            raise ValueError(f"truncate_context({n}): the drafter's context holds {self.context_len} positions")
        if n < self.floor:
            raise ValueError(f"truncate_context({n}): the drafter's ring of {self.slots} slots no longer holds the "
                             f"positions a block after {n} would need (it can roll back to {self.floor})")
        self.context_len = n

    def draft(self, last_token: int, new_hidden: torch.Tensor) -> list[int]:
        """Append new_hidden [T, N*H] to the context, then draft after last_token.  More than
        context_rows new rows are appended over several steps; only the last step's block counts
        (an earlier block's K/V lie beyond the context and are overwritten, tilert/draft.py)."""
        C = self.context_rows
        pieces = list(new_hidden.split(C)) or [new_hidden[:0]]
        for piece in pieces:
            drafts = self._step(last_token, piece)
        return drafts

    def _step(self, last_token: int, rows: torch.Tensor) -> list[int]:
        B, C, n = self.block_size, self.context_rows, rows.shape[0]
        start = self.context_len + n
        if start + B > self.max_seq_len:
            raise UserError(f"a draft block at position {start} runs past the max sequence length {self.max_seq_len}")
        m, g = self.memory, self.schedule.graph
        for name, buf in g.buffers.items():
            if buf.kind in (ACTIVATION, OUTPUT):  # poisoned: what no task writes shows
                m.buffers[name].fill_(math.nan if m.buffers[name].is_floating_point() else -1)
        m.buffers["tokens"].fill_(int(last_token))
        m.buffers["positions"].copy_(torch.arange(start, start + B))
        m.buffers["sampling"].copy_(torch.tensor([0.0, 0.0], dtype=torch.float64))  # drafts are argmax
        m.buffers["ctx_hidden"].zero_()
        m.buffers["ctx_hidden"][:n] = rows.to(m.buffers["ctx_hidden"].dtype)
        m.buffers["ctx_positions"].copy_(torch.tensor(list(range(self.context_len, start)) + [-1] * (C - n)))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensor ops: intra-op threads only add synchronisation
        try:
            execute(self.schedule, m, self.interleave)
        finally:
            torch.set_num_threads(threads)
        self.context_len = start
        self.floor = rollback_floor(self.slots, self.max_seq_len, B, start)
        self.last_logits = m.buffers["logits"][1:].clone()
        return [int(t) for t in m.buffers["next_token"][1:].tolist()]
