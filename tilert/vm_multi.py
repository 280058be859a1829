"""The multi-GPU VM: every rank's schedule executed in one process, as N GPUs would run them.

Each rank has its own VM (tilert/vm.py): its own memory (inputs, activations, its share of the
KV cache) and weights.  A step runs the union of the ranks' schedules (tilert/multigpu.py) with
vm.execute: a worker of any rank goes next whenever the counters allow, in order or
adversarially from a seed, and cross-GPU counters are bumped by their remote signallers exactly
like local ones.  Ordinary tasks run on their rank's memory; communication tasks also read the
other ranks' (tilert/collectives.py).  Every rank must choose the same token; the logits are
each rank's vocabulary columns put side by side.
"""

from __future__ import annotations

import torch

from model.weights import StoredTensor
from tilert.collectives import COMM_KERNELS
from tilert.errors import UserError
from tilert.ir import LOCAL
from tilert.kernels import run_task
from tilert.multigpu import Union, join
from tilert.partition import Partition
from tilert.schedule import Schedule
from tilert.vm import VM, check_step, execute


class MultiVM:
    def __init__(self, part: Partition, schedules: list[dict[int, Schedule]],
                 weights: list[dict[str, StoredTensor]], max_seq_len: int):
        if len(schedules) != part.n or len(weights) != part.n:
            raise UserError(f"{part.n} ranks but {len(schedules)} schedule sets and {len(weights)} weight sets")
        steps = sorted(schedules[0])
        if any(sorted(s) != steps for s in schedules):
            raise UserError("the ranks were compiled for different step sizes")
        self.part = part
        self.max_seq_len = max_seq_len
        self.vms = [VM(part.local_config(r), schedules[r], weights[r], max_seq_len) for r in range(part.n)]
        self.unions: dict[int, Union] = {b: join([s[b] for s in schedules]) for b in steps}

    @property
    def schedules(self) -> dict[int, Schedule]:
        """The union schedule of each step size (what `tilert run` needs: the step sizes)."""
        return {b: u.schedule for b, u in self.unions.items()}

    @property
    def seq_len(self) -> int:
        return self.vms[0].seq_len

    def reset(self) -> None:
        for vm in self.vms:
            vm.reset()

    def truncate(self, seq_len: int) -> None:
        for vm in self.vms:
            vm.truncate(seq_len)

    def step(self, tokens: list[int], temperature: float = 0.0, seed: int = 0,
             interleave: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """One step over `tokens` on every rank; returns (logits [B, V], chosen tokens)."""
        B = len(tokens)
        check_step(B, self.unions, self.seq_len, self.max_seq_len)
        u = self.unions[B]
        prepared = [vm.prepare(tokens, temperature, seed) for vm in self.vms]
        memories = [m for _, m in prepared]
        graphs = [s.graph for s, _ in prepared]
        local_shapes = [{n: b.shape for n, b in g.buffers.items() if b.kind == LOCAL} for g in graphs]

        def run(t: int) -> None:
            r, lt = u.where[t]
            task = graphs[r].tasks[lt]
            if task.kind in COMM_KERNELS:
                COMM_KERNELS[task.kind](task.params, memories[r], memories)
            else:
                run_task(task, memories[r], local_shapes[r])

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensor ops: intra-op threads only add synchronisation
        try:
            execute(u.schedule, None, interleave, run=run)
        finally:
            torch.set_num_threads(threads)
        for vm in self.vms:
            vm.seq_len += B
        chosen = [[int(t) for t in m.buffers["next_token"].tolist()] for m in memories]
        if any(c != chosen[0] for c in chosen):
            raise RuntimeError(f"ranks chose different tokens: {chosen}")
        logits = torch.cat([m.buffers["logits"][:, s.vocab_rows[0]:s.vocab_rows[1]]
                            for m, s in zip(memories, self.part.ranks)], dim=1)
        return logits.clone(), chosen[0]

