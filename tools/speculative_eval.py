"""Greedy speculative decoding with a DFlash drafter, on the reference decoder: tokens and acceptance.

One round, with `last` the newest committed token at position `start` (the target has not
processed it yet, so the drafter's context holds the target's hidden states of 0..start-1):
1. the drafter appends the context it has not seen yet and drafts B-1 tokens d1..d_{B-1} from
   the block [last, masks] at positions start..start+B-1;
2. the target verifies with one causal forward over [last, d1..d_{B-1}]: its argmax at block
   position i is the greedy token after position start+i;
3. accept d_i while d_i equals the target's argmax at i-1; commit the n accepted drafts plus the
   target's own token after them (the bonus), n + 1 tokens in all;
4. roll back: the target cache keeps start..start+n (last and the accepted drafts), the rejected
   positions are forgotten; the drafter's context only ever receives hidden states of committed
   positions (the block's own K/V are never kept), so it already ends at what was committed.
The acceptance length is the mean number of tokens committed per round (target forward),
between 1 and the block size.  The committed tokens are exactly plain greedy decoding's.

CLI: `python tools/speculative_eval.py model/pretrained/mimo-tiny-py --prompt "def "` prints the
speculative and the plain greedy continuation and the acceptance length.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.dflash import DFlashDrafter
from model.reference import ReferenceDecoder, generate


@dataclass
class SpecResult:
    tokens: list[int]  # the committed new tokens (max_new_tokens of them)
    commits: list[int] = field(default_factory=list)  # tokens committed by each round (1..B)

    @property
    def rounds(self) -> int:
        return len(self.commits)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens committed per verify round (accepted drafts + the bonus token)."""
        return sum(self.commits) / len(self.commits) if self.commits else float("nan")


def _argmax(logits: torch.Tensor) -> list[int]:
    return logits.argmax(dim=-1).tolist()


@torch.no_grad()
def speculative_generate(
    target: ReferenceDecoder, drafter: DFlashDrafter, prompt_ids, max_new_tokens: int
) -> SpecResult:
    """Greedy speculative decoding: the same tokens as `generate(target, prompt, n)` at temperature 0."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("speculative_generate() needs a non-empty prompt")
    B = drafter.cfg.block_size
    need = len(prompt) + max_new_tokens + B
    if need > target.max_seq_len or need > drafter.max_context:
        raise ValueError(f"prompt + {max_new_tokens} new tokens + a block need {need} positions; "
                         f"target holds {target.max_seq_len}, drafter {drafter.max_context}")
    layers = list(drafter.cfg.target_layers)
    target.reset()
    drafter.reset()
    result = SpecResult(tokens=[])
    if max_new_tokens <= 0:
        return result

    logits, hidden = target.forward(prompt, capture_layers=layers)
    result.tokens.append(_argmax(logits[-1]))  # the prefill's own token
    new_hidden = hidden  # hidden states of committed positions the drafter has not seen yet
    while len(result.tokens) < max_new_tokens:
        last, start = result.tokens[-1], target.seq_len
        drafts = drafter.draft(last, new_hidden, start)
        logits, hidden = target.forward([last] + drafts, capture_layers=layers)
        greedy = _argmax(logits)  # greedy[i]: the target's token after block position i
        n = 0
        while n < len(drafts) and drafts[n] == greedy[n]:
            n += 1
        result.tokens += drafts[:n] + [greedy[n]]
        result.commits.append(n + 1)
        target.truncate(start + n + 1)  # keep last + the accepted drafts
        new_hidden = {layer: h[: n + 1] for layer, h in hidden.items()}
    del result.tokens[max_new_tokens:]
    return result


def plain_greedy(target: ReferenceDecoder, prompt_ids, max_new_tokens: int) -> list[int]:
    return generate(target, prompt_ids, max_new_tokens, temperature=0.0)


def load_pair(model_dir: str | Path, max_seq_len: int = 1024, dtype: torch.dtype = torch.float32):
    """(target ReferenceDecoder, DFlashDrafter, tokenizer or None) from a checkpoint dir with draft/."""
    from model.checkpoint import load_checkpoint
    from model.dflash_checkpoint import load_drafter

    model_dir = Path(model_dir)
    cfg, weights = load_checkpoint(model_dir)
    dcfg, dweights = load_drafter(model_dir / "draft")
    target = ReferenceDecoder(cfg, weights, dtype, max_seq_len=max_seq_len)
    drafter = DFlashDrafter(dcfg, dweights, weights["model.embed_tokens.weight"], weights["lm_head.weight"],
                            dtype, max_context=max_seq_len)
    tok = None
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return target, drafter, tok


@dataclass
class EvalReport:
    acceptance_length: float  # tokens per round over all prompts (pooled)
    rounds: int
    tokens: int
    mismatches: int  # prompts whose speculative tokens differ from plain greedy (should be 0)
    per_prompt: list[float]
    spec_seconds: float
    plain_seconds: float


def evaluate(target: ReferenceDecoder, drafter: DFlashDrafter, prompts: list[list[int]], max_new_tokens: int,
             check_plain: bool = True) -> EvalReport:
    """Speculative decoding over several prompts; pooled acceptance length and greedy equality."""
    commits: list[int] = []
    per_prompt, mismatches, t_spec, t_plain = [], 0, 0.0, 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        res = speculative_generate(target, drafter, prompt, max_new_tokens)
        t_spec += time.perf_counter() - t0
        commits += res.commits
        per_prompt.append(res.acceptance_length)
        if check_plain:
            t0 = time.perf_counter()
            plain = plain_greedy(target, prompt, max_new_tokens)
            t_plain += time.perf_counter() - t0
            mismatches += plain != res.tokens
    return EvalReport(sum(commits) / max(len(commits), 1), len(commits), sum(commits), mismatches, per_prompt,
                      t_spec, t_plain)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", help="checkpoint directory holding draft/ (e.g. model/pretrained/mimo-tiny-py)")
    ap.add_argument("--prompt", default="def ", help="prompt text")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, drafter, tok = load_pair(args.model_dir, max_seq_len=4096)
    if tok is None:
        raise SystemExit(f"{args.model_dir}: no tokenizer.json")
    prompt = tok.encode(args.prompt).ids
    res = speculative_generate(target, drafter, prompt, args.max_new_tokens)
    plain = plain_greedy(target, prompt, args.max_new_tokens)
    print(args.prompt + tok.decode(res.tokens))
    print(f"--- {len(res.tokens)} tokens in {res.rounds} rounds: acceptance length {res.acceptance_length:.2f} "
          f"(block {drafter.cfg.block_size}); same as plain greedy: {plain == res.tokens}", file=sys.stderr)
    return 0 if plain == res.tokens else 1


if __name__ == "__main__":
    raise SystemExit(main())
