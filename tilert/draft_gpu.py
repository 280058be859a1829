"""The DFlash draft step as a GPU megakernel: generated from the draft schedule (tilert/draft.py)
like a target step, run by a MegakernelRuntime of its own that keeps the drafter's context
caches and reads the target's uploaded embedding and LM head (the host side of a draft step:
tilert/draft_context.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model.dflash import DFlashConfig
from model.weights import StoredTensor
from tilert.draft_context import DraftRunner
from tilert.errors import UserError
from tilert.schedule import Schedule


def draft_kernel_config(dcfg: DFlashConfig, cfg):
    """The target's MimoConfig with the drafter's attention and residual sizes: what codegen
    sizes shared memory and its per-kernel limits from (the drafter has no experts)."""
    return dataclasses.replace(cfg, hidden_size=dcfg.hidden_size, head_dim=dcfg.head_dim,
                               v_head_dim=dcfg.v_head_dim)


def generate_draft_kernel(schedule: Schedule, dcfg: DFlashConfig, cfg, weight_formats: dict[str, str] | None = None,
                          **kw):
    """The GeneratedKernel of a draft step.  Its tasks run over B = block size rows, the context
    path's rows too: the draft schedule must hold exactly B context rows."""
    from tilert.codegen import generate

    C = schedule.graph.buffers["ctx_hidden"].shape[0]
    if C != dcfg.block_size:
        raise UserError(f"the draft megakernel runs the context path over the block's {dcfg.block_size} rows; this "
                        f"draft schedule has {C} context rows (compile_draft_step(context_rows={dcfg.block_size}))")
    # tile_wide: the draft kernel alone reads the drafter's weights, at one step size, so its fc
    # (a one-token x of 5 x 4096 columns) may take the tiled layout its chunk-staged GEMV reads.
    return generate(schedule, draft_kernel_config(dcfg, cfg), weight_formats, **{"tile_wide": True, **kw})


class DraftMegakernel(DraftRunner):
    """Runs the draft step's cubin; `target` (a MegakernelRuntime on the same GPU) lends its
    uploaded weights.  `profile`: the cubin is a profiling build (`self.rt.profile`)."""

    def __init__(self, cubin_path: str | Path, generated, weights: dict[str, StoredTensor], max_seq_len: int,
                 target=None, timeout_s: float = 2.0, profile: bool = False):
        from tilert.gpu import MegakernelRuntime

        self.rt = MegakernelRuntime(cubin_path, generated, weights, max_seq_len, timeout_s=timeout_s,
                                    share_weights_with=target, profile=profile)
        bufs = generated.buffers
        slots = min(s.shape[0] for s in bufs.values() if s.space == "state")
        super().__init__(bufs["positions"].shape[0], bufs["ctx_hidden"].shape[0], slots, max_seq_len)

    def _clear(self) -> None:
        self.rt.reset()

    def _run(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        B = self.block_size
        self.rt.run_inputs(inputs, B)
        return self.rt.buffer("logits", B).clone(), self.rt.read("next_token", B).tolist()
