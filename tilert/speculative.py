"""Speculative decoding with a DFlash drafter: the loop, independent of where the models run.

A backend (tilert/spec_backends.py: the VM, the reference decoder; later the GPU runtime)
offers the small interface `SpeculativeBackend`: run the target over some tokens and return
its logits, its chosen tokens and the drafter's conditioning hidden states (`step`), forget
target positions (`truncate`), append committed context to the drafter and draft a block
(`draft`), forget drafter context (`truncate_context`).

One round, with `last` the newest committed token at position `start` (not yet processed by
the target; the drafter holds the hidden states of every position before the ones pending):
1. draft: the drafter appends the pending hidden states (positions context_len..start-1) and
   drafts d1..d_{B-1} from the block [last, masks] at positions start..start+B-1;
2. verify: one target step over [last, d1..d_{B-1}] (causal); row i yields the target's own
   token after position start+i (`chosen`, see below);
3. accept: the longest prefix of drafts that agree with the target's tokens, plus the target's
   token after it (the bonus, or the correction at the first mismatch): n + 1 tokens;
4. roll back what the rejected drafts touched: the target keeps positions < start + n + 1 (KV
   slots and sliding-window ring entries beyond are overwritten by later steps before any query
   can see them, see lower.ring_slots); the drafter's context only ever receives hidden states
   of committed positions, and its block K/V sit beyond its context (tilert/draft.py), so it has
   nothing to roll back; the hidden states of the n + 1 committed positions become pending.

Why accepting "draft == the target's chosen token" is lossless.  The target chooses the token
after position p as tilert.sampling does for plain decoding: the argmax at temperature 0, else
the Gumbel-max sample argmax(logits / T + g(seed, p)), an exact sample of p = softmax(logits / T).
- Greedy: accept while d_i equals the argmax: the committed tokens are plain greedy decoding's.
- Sampling: with deterministic (argmax) drafts, rejection sampling accepts d with probability
  p(d), and on rejection draws from p with d removed and renormalised; all accepted, the bonus
  token is drawn from p.  The Gumbel-max sample g does exactly that with one coin: it equals d
  with probability p(d), and given that it is not d it is distributed as p without d,
  renormalised.  So the committed tokens are, token for token, those plain sampling with the
  same seed draws (the same position-keyed noise), on every backend.
The acceptance length is the mean number of tokens committed per round (1..B).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from tilert.errors import UserError


class StepOutput(NamedTuple):
    logits: torch.Tensor  # [T, vocab]
    chosen: list[int]  # the target's token after each row (argmax, or the sample of (seed, position))
    hidden: torch.Tensor  # [T, len(target_layers) * hidden]: what the drafter is conditioned on


class SpeculativeBackend(Protocol):
    block_size: int  # B: the last token plus B-1 drafts; the verify step has B tokens
    max_seq_len: int
    step_sizes: list[int] | None  # token counts `step` accepts (None: any); prompts go in these chunks
    seq_len: int  # target positions processed
    context_len: int  # drafter context positions held

    def reset(self) -> None: ...

    def step(self, tokens: list[int], temperature: float, seed: int) -> StepOutput:
        """The target over `tokens` at positions seq_len.. (then seq_len += len(tokens))."""

    def truncate(self, seq_len: int) -> None:
        """Forget target positions >= seq_len."""

    def draft(self, last_token: int, new_hidden: torch.Tensor) -> list[int]:
        """Append new_hidden [T, ...] as context positions context_len..context_len+T-1, then the
        B-1 drafts after `last_token`, which sits at position context_len (after the append)."""

    def truncate_context(self, n: int) -> None:
        """Forget drafter context positions >= n."""


# An acceptance rule: (drafts, the verify step's output) -> the committed tokens (the accepted
# drafts, then one token of the target's).  Tests swap in deliberately biased rules.
AcceptRule = Callable[[list[int], StepOutput], list[int]]


def accept_matching(drafts: list[int], verify: StepOutput) -> list[int]:
    """Chain verification: accept drafts while each equals the target's chosen token at its
    position, then commit the target's token after the last accepted one (lossless for greedy
    and sampled decoding alike; see the module docstring)."""
    n = 0
    while n < len(drafts) and drafts[n] == verify.chosen[n]:
        n += 1
    return drafts[:n] + [verify.chosen[n]]


@dataclass
class SpecResult:
    tokens: list[int]  # the new tokens (max_new_tokens of them)
    commits: list[int] = field(default_factory=list)  # tokens committed by each round (1..B)
    drafted_rounds: int = 0  # rounds that drafted (the others ran plain decode steps near max_seq_len)

    @property
    def rounds(self) -> int:
        return len(self.commits)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens committed per round (accepted drafts + the target's own token)."""
        return sum(self.commits) / len(self.commits) if self.commits else 0.0


def _chunks(n: int, sizes: list[int] | None) -> list[int]:
    if not sizes:
        return [n]
    from tilert.cli import chunks

    return chunks(n, sizes)


@torch.no_grad()
def speculative_generate(backend: SpeculativeBackend, prompt: list[int], max_new_tokens: int,
                         temperature: float = 0.0, seed: int = 0, accept: AcceptRule = accept_matching,
                         on_round: Callable[[int], None] | None = None) -> SpecResult:
    """Generate max_new_tokens after `prompt`: the same tokens as plain decoding with the same
    temperature and seed.  `on_round(committed)` is called after every round."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise UserError("speculative decoding needs a non-empty prompt")
    if len(prompt) + max_new_tokens > backend.max_seq_len:
        raise UserError(f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceed the max sequence "
                        f"length {backend.max_seq_len}")
    B = backend.block_size
    backend.reset()
    result = SpecResult(tokens=[])
    if max_new_tokens <= 0:
        return result

    pending: list[torch.Tensor] = []  # hidden states of committed positions the drafter has not seen
    pos = 0
    for b in _chunks(len(prompt), backend.step_sizes):
        out = backend.step(prompt[pos:pos + b], temperature, seed)
        pending.append(out.hidden)
        pos += b
    result.tokens.append(out.chosen[-1])  # the prefill's own token

    while len(result.tokens) < max_new_tokens:
        last, start = result.tokens[-1], backend.seq_len
        if start + B > backend.max_seq_len:
            # No room for a verify block before max_seq_len: finish with plain decode steps.
            out = backend.step([last], temperature, seed)
            committed = [out.chosen[0]]
            pending.append(out.hidden)
        else:
            drafts = backend.draft(last, torch.cat(pending))
            if backend.context_len != start:
                raise RuntimeError(f"drafter context ends at {backend.context_len}, the block starts at {start}")
            out = backend.step([last] + drafts, temperature, seed)
            committed = accept(drafts, out)
            n = len(committed) - 1  # accepted drafts
            backend.truncate(start + n + 1)  # keep last and the accepted drafts
            pending = [out.hidden[:n + 1]]
            result.drafted_rounds += 1
        result.tokens += committed
        result.commits.append(len(committed))
        if on_round is not None:
            on_round(len(committed))
    del result.tokens[max_new_tokens:]
    return result
