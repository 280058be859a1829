"""The speculative-decoding interface (tilert.speculative.SpeculativeBackend) on two backends.

- `VMBackend`: the artifact's target schedules on the VM (their `hidden` output feeds the
  drafter) and its draft schedule on a `DraftVM`: the compiled runtime, task by task.
- `ReferenceBackend`: the PyTorch reference decoder and `DFlashDrafter` on the same weights.
- `MegakernelBackend`: the artifact's cubins on the GPU: a megakernel per target step (their
  `hidden` output stays on the device) and the draft step's megakernel (tilert/draft_gpu.py).

Both choose the target's tokens as plain decoding does (tilert.sampling: argmax, or the
Gumbel-max sample keyed by seed and position), so speculative output equals plain output.
"""

from __future__ import annotations

import torch

from model.dflash import DFlashConfig, DFlashDrafter
from model.weights import StoredTensor
from tilert import sampling
from tilert.draft_vm import DraftVM
from tilert.errors import UserError
from tilert.schedule import Schedule
from tilert.speculative import StepOutput
from tilert.vm import VM


def drafter_config(art) -> DFlashConfig:
    """The artifact's DFlash config, or one clear error when it was compiled without a drafter."""
    from model.dflash_checkpoint import drafter_config_from_dict

    if art.draft_config is None:
        raise UserError(f"{art.path}: compiled without a drafter; speculative decoding needs one: recompile "
                        f"with --draft DIR (a DFlash drafter checkpoint)")
    return drafter_config_from_dict(art.draft_config, f"{art.path} metadata.json draft.config")


class _TargetAndDrafter:
    """What both backends do alike: a `target` decoder and a `drafter`, reset and rolled back
    separately (the loop truncates the target to the committed length, the drafter's context
    to its own)."""

    @property
    def seq_len(self) -> int:
        return self.target.seq_len

    @property
    def context_len(self) -> int:
        return self.drafter.context_len

    def reset(self) -> None:
        self.target.reset()
        self.drafter.reset()

    def truncate(self, seq_len: int) -> None:
        self.target.truncate(seq_len)

    def truncate_context(self, n: int) -> None:
        self.drafter.truncate_context(n)


class VMBackend(_TargetAndDrafter):
    """A target's schedules (with the `hidden` output) and a draft schedule on the VM."""

    def __init__(self, cfg, schedules: dict[int, Schedule], draft_schedule: Schedule, dcfg: DFlashConfig,
                 weights: dict[str, StoredTensor], max_seq_len: int, interleave: int | None = None):
        B = dcfg.block_size
        if B not in schedules or any("hidden" not in s.graph.buffers for s in schedules.values()):
            raise UserError(f"speculative decoding needs target steps of 1 and {B} tokens that expose the "
                            f"drafter's hidden states (compile with --draft DIR)")
        self.target = VM(cfg, schedules, weights, max_seq_len)
        self.drafter = DraftVM(draft_schedule, weights, max_seq_len, interleave=interleave)
        self.interleave = interleave
        self.block_size = B
        self.max_seq_len = max_seq_len
        self.step_sizes = sorted(schedules)

    @classmethod
    def from_artifact(cls, art, interleave: int | None = None) -> "VMBackend":
        dcfg = drafter_config(art)
        if art.draft_schedule is None:
            raise UserError(f"{art.path}: holds the drafter's weights but no draft schedule (compiled by an older "
                            f"tilert); recompile it with --draft DIR")
        return cls(art.cfg, art.schedules, art.draft_schedule, dcfg, art.weights, art.max_seq_len, interleave)

    def step(self, tokens: list[int], temperature: float = 0.0, seed: int = 0) -> StepOutput:
        logits, chosen = self.target.step(tokens, temperature, seed, self.interleave)
        return StepOutput(logits, chosen, self.target.read("hidden", len(tokens)))

    def draft(self, last_token: int, new_hidden: torch.Tensor) -> list[int]:
        return self.drafter.draft(last_token, new_hidden)


class ReferenceBackend(_TargetAndDrafter):
    """The PyTorch reference decoder and DFlashDrafter (fp32) on the same weights."""

    def __init__(self, cfg, weights: dict[str, StoredTensor], dcfg: DFlashConfig,
                 draft_weights: dict[str, StoredTensor], max_seq_len: int):
        """`weights` in canonical (checkpoint) names; `draft_weights` without the draft. prefix."""
        from model.reference import ReferenceDecoder

        self.max_seq_len = max_seq_len
        self.target = ReferenceDecoder(cfg, weights, torch.float32, max_seq_len=max_seq_len)
        self.drafter = DFlashDrafter(dcfg, draft_weights, weights["model.embed_tokens.weight"],
                                     weights["lm_head.weight"], torch.float32, max_context=max_seq_len)
        self.layers = list(dcfg.target_layers)
        self.block_size = dcfg.block_size
        self.step_sizes = None  # the reference takes any number of tokens

    @classmethod
    def from_artifact(cls, art, max_seq_len: int | None = None) -> "ReferenceBackend":
        from tilert.cli import reference_weights

        return cls(art.cfg, reference_weights(art.cfg, art.weights), drafter_config(art), art.draft_weights,
                   max_seq_len or art.max_seq_len)

    def step(self, tokens: list[int], temperature: float = 0.0, seed: int = 0) -> StepOutput:
        start = self.target.seq_len
        logits, captured = self.target.forward(tokens, capture_layers=self.layers)
        chosen = [sampling.choose(logits[i], temperature, seed, start + i) for i in range(len(tokens))]
        return StepOutput(logits, chosen, torch.cat([captured[layer] for layer in self.layers], dim=-1))

    def draft(self, last_token: int, new_hidden: torch.Tensor) -> list[int]:
        H = self.drafter.cfg.hidden_size
        hidden = {layer: new_hidden[:, j * H:(j + 1) * H] for j, layer in enumerate(self.layers)}
        return self.drafter.draft(last_token, hidden, self.drafter.context_len + new_hidden.shape[0])



class MegakernelBackend(_TargetAndDrafter):
    """The target's step megakernels and the draft step's megakernel on one GPU; the drafter
    reads the target's uploaded embedding and LM head, and the hidden states never leave the GPU."""

    def __init__(self, target, drafter, block_size: int, max_seq_len: int):
        self.target, self.drafter = target, drafter
        self.block_size, self.max_seq_len = block_size, max_seq_len
        self.step_sizes = sorted(target.kernels)
        if block_size not in target.kernels or any("hidden" not in k.gen.buffers for k in target.kernels.values()):
            raise UserError(f"speculative decoding needs target kernels of 1 and {block_size} tokens that expose the "
                            f"drafter's hidden states (compile with --draft DIR)")

    @classmethod
    def from_artifact(cls, art) -> "MegakernelBackend":
        from tilert.artifact import DRAFT_PREFIX, load_draft_kernel, load_kernels
        from tilert.draft_gpu import DraftMegakernel
        from tilert.gpu import MegakernelRuntime

        dcfg = drafter_config(art)
        kernels = load_kernels(art)
        draft_cubin, draft_gen = load_draft_kernel(art)
        target = MegakernelRuntime({b: p for b, (p, _) in kernels.items()}, {b: g for b, (_, g) in kernels.items()},
                                   {k: v for k, v in art.weights.items() if not k.startswith(DRAFT_PREFIX)},
                                   art.max_seq_len)
        drafter = DraftMegakernel(draft_cubin, draft_gen, art.weights, art.max_seq_len, target=target)
        return cls(target, drafter, dcfg.block_size, art.max_seq_len)

    def step(self, tokens: list[int], temperature: float = 0.0, seed: int = 0) -> StepOutput:
        logits, chosen = self.target.step(tokens, temperature, seed)
        return StepOutput(logits, chosen, self.target.buffer("hidden", len(tokens)).clone())

    def draft(self, last_token: int, new_hidden: torch.Tensor) -> list[int]:
        return self.drafter.draft(last_token, new_hidden)
