"""Speculative decoding (tilert/speculative.py) on the VM and reference backends: token-for-token
equal to plain decoding, rollback to the state of a fresh run, and a sampling distribution
equal to plain sampling's (chi-square tests that also catch a biased acceptance rule)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import preset
from model.dflash import DFlashConfig
from model.reference import ReferenceDecoder, generate
from tests.helpers import random_draft_weights, random_weights
from tilert import sampling
from tilert.cli import compile_artifact, generate_vm
from tilert.compiler import compile_steps
from tilert.draft import compile_draft_step
from tilert.draft_vm import DraftVM
from tilert.errors import UserError
from tilert.layout import runtime_weights
from tilert.lower import load_recipe, ring_slots
from tilert.spec_backends import ReferenceBackend, VMBackend
from tilert.speculative import StepOutput, accept_matching, speculative_generate
from tilert.vm import VM

PRETRAINED = Path(__file__).resolve().parents[1] / "model" / "pretrained" / "mimo-tiny-py"
PROMPT = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- fixtures: the carried trained pair and a random synthetic pair, compiled -----------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The carried tiny trained pair compiled with its drafter (no megakernel), and its tokenizer."""
    from tokenizers import Tokenizer

    out = tmp_path_factory.mktemp("spec") / "trained"
    compile_artifact(str(PRETRAINED), out, draft=str(PRETRAINED / "draft"), kernel=False, max_seq_len=512,
                     log=lambda msg: None)
    from tilert.artifact import read_artifact

    return read_artifact(out), Tokenizer.from_file(str(PRETRAINED / "tokenizer.json"))


class SyntheticPair:
    """A random mimo-tiny target (sliding window 9) and a random drafter (block 4, window 12),
    compiled for a short max_seq_len: every ring wraps within a few dozen tokens."""

    def __init__(self, seed: int, max_seq_len: int = 96):
        self.cfg = preset("mimo-tiny")
        self.dcfg = DFlashConfig.tiny_for(self.cfg)
        self.max_seq_len = max_seq_len
        self.tw, self.dw = random_weights(self.cfg, seed), random_draft_weights(self.dcfg, seed + 1)
        recipe = load_recipe("mimo-tiny", "h100")
        steps = [1, self.dcfg.block_size]
        self.schedules = compile_steps(self.cfg, recipe, steps, max_seq_len, capture_layers=self.dcfg.target_layers)
        self.draft = compile_draft_step(self.dcfg, recipe, max_seq_len, context_rows=max(steps))
        self.weights = runtime_weights(self.cfg, self.tw)
        self.weights.update({f"draft.{k}": v for k, v in self.dw.items()})

    def vm(self, interleave=None) -> VMBackend:
        return VMBackend(self.cfg, self.schedules, self.draft, self.dcfg, self.weights, self.max_seq_len, interleave)

    def reference(self) -> ReferenceBackend:
        return ReferenceBackend(self.cfg, self.tw, self.dcfg, self.dw, self.max_seq_len)

    def plain_vm(self, prompt, n, temperature=0.0, seed=0) -> list[int]:
        vm = VM(self.cfg, self.schedules, self.weights, self.max_seq_len)
        return _plain(vm, prompt, n, temperature, seed)


def _plain(vm: VM, prompt, n, temperature=0.0, seed=0) -> list[int]:
    """Plain decoding on a VM: the prompt one token at a time, then one token per step."""
    for t in prompt:
        _, chosen = vm.step([t], temperature, seed)
    out = [chosen[-1]]
    while len(out) < n:
        out.append(vm.step([out[-1]], temperature, seed)[1][0])
    return out


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticPair(seed=5)


# ---- greedy: token for token ----------------------------------------------------------------------

def test_trained_pair_greedy_equals_plain_greedy_past_both_rings(trained):
    art, tok = trained
    prompt = tok.encode(PROMPT).ids
    n = 128
    be = VMBackend.from_artifact(art)
    # Positions past the target's ring (window 65 + 7) and the drafter's (window 128 + 14).
    assert len(prompt) + n > be.drafter.slots > ring_slots(art.cfg, 1, art.max_seq_len, be.block_size)
    spec = speculative_generate(be, prompt, n)
    assert spec.tokens == generate_vm(art, prompt, n)
    assert spec.acceptance_length > 2  # the trained drafter is useful
    assert sum(spec.commits) >= n - 1 and all(1 <= c <= be.block_size for c in spec.commits)
    # The reference backend drafts and verifies the same way.
    ref = speculative_generate(ReferenceBackend.from_artifact(art, max_seq_len=256), prompt, n)
    assert ref.tokens == spec.tokens and ref.commits == spec.commits


@pytest.mark.parametrize("seed", [5, 6])
def test_synthetic_pairs_greedy_equals_plain_greedy(seed):
    pair = SyntheticPair(seed)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    n = 60  # 69 positions: rings of 9 + 3 (target) and 12 + 6 (drafter) slots wrap
    plain = pair.plain_vm(prompt, n)
    assert len(set(plain)) > 5
    spec = speculative_generate(pair.vm(interleave=seed), prompt, n)
    assert spec.tokens == plain
    assert speculative_generate(pair.reference(), prompt, n).tokens == plain


class OracleDrafts:
    """A backend whose drafts are the true continuation, wrong from a chosen index on: every
    acceptance length, and so every rollback depth, happens.  The real drafter still runs (its
    state stays what the loop made it)."""

    def __init__(self, backend, truth: list[int], accepts: list[int], vocab: int):
        self.backend, self.truth, self.accepts, self.vocab = backend, truth, list(accepts), vocab

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def draft(self, last_token, new_hidden):
        real = self.backend.draft(last_token, new_hidden)
        start = self.backend.context_len  # the position of last_token
        want = self.truth[start + 1:start + len(real) + 1]
        k = self.accepts.pop(0) if self.accepts else 0
        return want[:k] + [(t + 1) % self.vocab for t in want[k:]]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(accepts=st.lists(st.integers(0, 3), min_size=4, max_size=30), interleave=st.integers(0, 2**16))
def test_any_acceptance_pattern_rolls_back_correctly(synthetic, accepts, interleave):
    """With drafts accepted exactly `accepts[i]` times in round i, the tokens are still plain
    greedy's, and every round commits accepts[i] + 1 tokens."""
    pair = synthetic
    prompt = [7, 7, 8, 1, 2]
    n = 50
    truth = prompt + pair.plain_vm(prompt, n + pair.dcfg.block_size)
    be = OracleDrafts(pair.vm(interleave), truth, accepts, pair.cfg.vocab_size)
    spec = speculative_generate(be, prompt, n)
    assert spec.tokens == truth[len(prompt):len(prompt) + n]
    expected = [a + 1 for a in accepts] + [1] * spec.rounds
    assert spec.commits == expected[:spec.rounds]


def test_state_after_rejections_equals_a_fresh_run_on_the_committed_prefix(synthetic):
    pair = synthetic
    prompt = [2, 7, 1, 8, 2, 8]
    be = pair.vm()
    spec = speculative_generate(be, prompt, 41)
    assert any(c < pair.dcfg.block_size for c in spec.commits)  # some drafts were rejected
    # The target processed the committed tokens but the newest (greedy: plain decoding's).
    sequence = prompt + pair.plain_vm(prompt, 41 + pair.dcfg.block_size)
    committed, pending = sequence[:be.seq_len], sequence[be.seq_len]
    fresh = VM(pair.cfg, pair.schedules, pair.weights, pair.max_seq_len)
    hidden = []
    for t in committed:
        fresh.step([t])
        hidden.append(fresh.read("hidden", 1))
    # The target continues like a fresh VM that ran the committed prefix.
    for t in [pending, 5, 6, 7, 8, 9, 10, 11, 12, 13]:
        got, want = be.step([t]), fresh.step([t])
        assert rel_err(got.logits, want[0]) < 1e-5 and got.chosen == want[1]
    # The drafter holds the context of committed positions only; rolled back by two positions,
    # it drafts like a fresh one fed the same committed hidden states.
    assert be.context_len <= len(committed)
    n = be.context_len - 2
    be.truncate_context(n)
    new_drafter = DraftVM(pair.draft, pair.weights, pair.max_seq_len)
    extra = torch.randn(3, hidden[0].shape[1], generator=torch.Generator().manual_seed(1))
    a = be.draft(4, extra)
    b = new_drafter.draft(4, torch.cat(hidden[:n] + [extra]))
    assert a == b and rel_err(be.drafter.last_logits, new_drafter.last_logits) < 1e-5


def test_verify_near_max_seq_len_falls_back_to_plain_steps():
    pair = SyntheticPair(seed=5, max_seq_len=24)
    prompt = [1, 2, 3, 4]
    spec = speculative_generate(pair.vm(), prompt, 20)  # fills max_seq_len exactly
    assert spec.tokens == pair.plain_vm(prompt, 20)
    assert spec.drafted_rounds < spec.rounds  # the last rounds had no room for a block
    with pytest.raises(UserError, match="max sequence length"):
        speculative_generate(pair.vm(), prompt, 21)


# ---- rings: the rollback invariant, on a model of the slots ------------------------------------------

def _ring_serves(slots: int, window: int, B: int, accepted: list[int]) -> bool:
    """Replay verify rounds on a ring of `slots`: round i writes B positions from `start`, every
    query reads its window, then the sequence is truncated to start + accepted[i] + 1.  True
    when every key read is the one written for that position."""
    ring: dict[int, int] = {}
    start = 0
    for a in accepted:
        for p in range(start, start + B):
            ring[p % slots] = p
        for p in range(start, start + B):
            if any(ring.get(r % slots) != r for r in range(max(0, p - window + 1), p + 1)):
                return False
        start += a + 1
    return True


@given(window=st.integers(1, 20), B=st.integers(1, 8), accepted=st.lists(st.integers(0, 7), max_size=40))
def test_ring_of_window_plus_block_survives_any_rollback(window, B, accepted):
    accepted = [min(a, B - 1) for a in accepted]
    assert _ring_serves(window + B - 1, window, B, accepted)  # lower.ring_slots with max_tokens = B


def test_a_smaller_ring_would_not():
    assert not _ring_serves(9 + 4 - 2, 9, 4, [0] * 12)


# ---- sampling -----------------------------------------------------------------------------------------

def test_sampled_speculative_equals_plain_sampling_token_for_token(synthetic, trained):
    prompt = [3, 1, 4, 1, 5]
    for seed in (0, 1):
        assert speculative_generate(synthetic.vm(), prompt, 24, 1.0, seed).tokens == \
            synthetic.plain_vm(prompt, 24, 1.0, seed)
    art, tok = trained
    ids = tok.encode(PROMPT).ids
    spec = speculative_generate(VMBackend.from_artifact(art), ids, 32, 0.8, 11)
    assert spec.tokens == generate_vm(art, ids, 32, 0.8, 11)
    assert spec.tokens != generate_vm(art, ids, 32, 0.8, 12)


def chi_square_p(counts: list[int], probs: list[float], min_expected: float = 5.0) -> float:
    """p-value of Pearson's goodness-of-fit test of `counts` against exact `probs` (cells whose
    expected count is below min_expected are pooled into one)."""
    n = sum(counts)
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for c, p in zip(counts, probs):
        if n * p < min_expected:
            pool_o, pool_e = pool_o + c, pool_e + n * p
        else:
            obs.append(c)
            exp.append(n * p)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def biased_accept(rng: random.Random):
    """A broken rule: on a mismatch it still accepts the draft with probability p(d) (as if the
    resample from p forgot to remove d), so drafts come out too often."""

    def accept(drafts: list[int], verify: StepOutput) -> list[int]:
        for i, d in enumerate(drafts):
            p = torch.softmax(verify.logits[i].double(), -1)[d]
            if not (d == verify.chosen[i] or rng.random() < p):
                return drafts[:i] + [verify.chosen[i]]
        return drafts + [verify.chosen[len(drafts)]]

    return accept


class MarkovBackend:
    """A tiny exact 'model' for the loop: the next token's logits depend on the last token only
    (a fixed table); the drafter proposes a fixed chain (its table's argmax).  Its distribution
    over continuations is known exactly, and a run costs microseconds."""

    block_size, max_seq_len, step_sizes = 4, 64, None

    def __init__(self, vocab: int = 5, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.table = 1.5 * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64)
        self.next_draft = self.table.argmax(-1).tolist()  # drafts the target's mode: p(d) is moderate
        self.next_draft[0] = 1 + int(self.table[0, 1:].argmin())  # and sometimes a poor one
        self.seq_len = self.context_len = 0

    def reset(self):
        self.seq_len = self.context_len = 0

    def step(self, tokens, temperature, seed):
        logits = self.table[torch.tensor(tokens)]
        chosen = [sampling.choose(logits[i], temperature, seed, self.seq_len + i) for i in range(len(tokens))]
        self.seq_len += len(tokens)
        return StepOutput(logits, chosen, torch.zeros(len(tokens), 1))

    def truncate(self, n):
        assert self.seq_len - self.block_size < n <= self.seq_len
        self.seq_len = n

    def draft(self, last_token, new_hidden):
        self.context_len += new_hidden.shape[0]
        out = [self.next_draft[last_token]]
        while len(out) < self.block_size - 1:
            out.append(self.next_draft[out[-1]])
        return out

    def truncate_context(self, n):
        self.context_len = n

    def sequence_probs(self, last: int, n: int) -> dict[tuple[int, ...], float]:
        p = torch.softmax(self.table, -1).tolist()
        seqs = {(): 1.0}
        for _ in range(n):
            seqs = {s + (t,): q * p[s[-1] if s else last][t] for s, q in seqs.items() for t in range(len(p))}
        return seqs


def test_markov_chain_speculative_sampling_has_the_exact_distribution():
    """5000 seeded runs of 4 tokens (first round: 1-4 tokens accepted) against the exact joint
    distribution of the 625 continuations; a biased acceptance rule fails the same test."""
    be = MarkovBackend()
    exact = be.sequence_probs(last=2, n=4)
    cells = sorted(exact)
    N = 5000

    def counts(accept):
        c = dict.fromkeys(cells, 0)
        for seed in range(N):
            c[tuple(speculative_generate(be, [2], 4, 1.0, seed, accept=accept).tokens)] += 1
        return [c[s] for s in cells]

    probs = [exact[s] for s in cells]
    assert chi_square_p(counts(accept_matching), probs) > 1e-4
    assert chi_square_p(counts(biased_accept(random.Random(0))), probs) < 1e-4


def test_trained_pair_speculative_sampling_matches_plain_sampling(trained):
    """The first two tokens after a prompt at temperature 1: 400 seeded speculative runs on the
    reference backend (the second token comes out of a draft-and-verify round) against the exact
    joint distribution plain sampling draws from; a biased acceptance rule fails the test."""
    art, tok = trained
    prompt = tok.encode("if __name__ == '__main").ids
    be = ReferenceBackend.from_artifact(art, max_seq_len=64)
    # Exact p(t1) p(t2 | t1) for every t1 of non-negligible probability (the rest is pooled).
    dec = be.target
    dec.reset()
    p1 = torch.softmax(dec.forward(prompt)[-1].double(), -1)
    joint: dict[tuple[int, int], float] = {}
    for t1 in (p1 > 1e-3).nonzero().flatten().tolist():
        dec.truncate(len(prompt))
        p2 = torch.softmax(dec.forward([t1])[-1].double(), -1)
        joint.update({(t1, t2): float(p1[t1] * q) for t2, q in enumerate(p2.tolist())})
    cells = sorted(joint, key=joint.get, reverse=True)
    probs = [joint[c] for c in cells] + [1.0 - sum(joint.values())]  # the last cell: everything else
    N = 400

    def counts(accept):
        c = dict.fromkeys(cells, 0)
        rest = 0
        for seed in range(N):
            key = tuple(speculative_generate(be, prompt, 2, 1.0, seed, accept=accept).tokens)
            if key in c:
                c[key] += 1
            else:
                rest += 1
        return [c[k] for k in cells] + [rest]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a toy model: one thread is faster
    try:
        assert chi_square_p(counts(accept_matching), probs) > 1e-4
        assert chi_square_p(counts(biased_accept(random.Random(0))), probs) < 1e-4
    finally:
        torch.set_num_threads(threads)
