"""What every runner of the DFlash draft step does on the host, whatever executes the step
(the VM: tilert/draft_vm.py; the GPU megakernel: tilert/draft_gpu.py).

`draft(last_token, new_hidden)` is DFlashDrafter.draft: the new committed positions' hidden
states are appended to the drafter's context (over several steps when they outnumber the
step's context rows), then the block is drafted; the drafts are the argmax of its logits.
The runner keeps the context length and how far it may roll back (sliding-window rings,
tilert/draft.py `rollback_floor`); a subclass holds the context caches and runs one step.
"""

from __future__ import annotations

import torch

from tilert.draft import rollback_floor
from tilert.errors import UserError


class DraftRunner:
    """Host-side bookkeeping of the draft step; subclasses implement `_run` and `_clear`."""

    def __init__(self, block_size: int, context_rows: int, slots: int, max_seq_len: int):
        self.block_size, self.context_rows, self.slots = block_size, context_rows, slots
        self.max_seq_len = max_seq_len
        self.context_len = 0
        self.floor = 0  # truncate_context may not go below (sliding-window rings, tilert/draft.py)
        self.last_logits: torch.Tensor | None = None  # [B-1, vocab] of the last draft

    def _run(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Run one draft step on these input buffers; (logits [B, vocab], next_token [B])."""
        raise NotImplementedError

    def _clear(self) -> None:
        """Zero the context caches."""
        raise NotImplementedError

    def reset(self) -> None:
        self._clear()
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
        pieces = list(new_hidden.split(self.context_rows)) or [new_hidden[:0]]
        for piece in pieces:
            drafts = self._step(last_token, piece)
        return drafts

    def step_inputs(self, last_token: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The draft step's input buffers for appending `rows` and drafting after last_token."""
        B, C, n = self.block_size, self.context_rows, rows.shape[0]
        start = self.context_len + n
        if start + B > self.max_seq_len:
            raise UserError(f"a draft block at position {start} runs past the max sequence length {self.max_seq_len}")
        ctx = torch.zeros(C, rows.shape[1], dtype=torch.float32, device=rows.device)  # stays where it is
        ctx[:n] = rows.detach()
        return {"tokens": torch.tensor([int(last_token)], dtype=torch.int32),
                "positions": torch.arange(start, start + B, dtype=torch.int32),
                "sampling": torch.tensor([0.0, 0.0], dtype=torch.float64),  # the drafts are argmax
                "ctx_hidden": ctx,
                "ctx_positions": torch.tensor(list(range(self.context_len, start)) + [-1] * (C - n), dtype=torch.int32)}

    def _step(self, last_token: int, rows: torch.Tensor) -> list[int]:
        inputs = self.step_inputs(last_token, rows)
        start = int(inputs["positions"][0])
        logits, nxt = self._run(inputs)
        self.context_len = start
        self.floor = rollback_floor(self.slots, self.max_seq_len, self.block_size, start)
        self.last_logits = logits[1:].clone()
        return [int(t) for t in nxt[1:]]
