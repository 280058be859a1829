"""The reference decoder against transformers' MiMoV2FlashForCausalLM, and its cache semantics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import preset
from model.reference import ReferenceDecoder, generate
from tests.helpers import random_weights, small_configs, transformers_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None], use_cache=False).logits[0]


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("mimo-tiny")
    weights = random_weights(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    return cfg, weights, tokens


@pytest.fixture(scope="module")
def tiny_hf(tiny):
    cfg, weights, tokens = tiny
    return hf_logits(transformers_model(cfg, weights), tokens)


# ---- agreement with transformers ----------------------------------------------------------------

def test_prefill_matches_transformers(tiny, tiny_hf):
    cfg, weights, tokens = tiny
    assert len(tokens) > 4 * cfg.sliding_window  # the window slides several times
    ours = ReferenceDecoder(cfg, weights).forward(tokens)
    assert ours.shape == (len(tokens), cfg.vocab_size)
    assert rel_err(ours, tiny_hf) < 1e-4


def test_decode_matches_transformers(tiny, tiny_hf):
    cfg, weights, tokens = tiny
    dec = ReferenceDecoder(cfg, weights)
    dec.forward(tokens[:25])
    for pos in range(25, len(tokens)):
        row = dec.forward(tokens[pos:pos + 1])
        assert dec.seq_len == pos + 1
        assert rel_err(row[0], tiny_hf[pos]) < 1e-4, pos


def test_captured_hidden_states_match_transformers(tiny):
    cfg, weights, tokens = tiny
    model = transformers_model(cfg, weights)
    with torch.no_grad():
        hf = model(tokens[None], use_cache=False, output_hidden_states=True).hidden_states
    last = cfg.num_hidden_layers - 1
    _, captured = ReferenceDecoder(cfg, weights).forward(tokens, capture_layers=[0, 2, last])
    assert sorted(captured) == [0, 2, last]
    for layer in (0, 2):
        assert captured[layer].shape == (len(tokens), cfg.hidden_size)
        assert rel_err(captured[layer], hf[layer + 1][0]) < 1e-5  # hidden_states[0] is the embedding
    # transformers' last entry is taken after the final norm; ours is the raw residual stream.
    with torch.no_grad():
        assert rel_err(model.model.norm(captured[last]), hf[-1][0]) < 1e-5


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=small_configs(), seed=st.integers(0, 2**16))
def test_random_configs_match_transformers(cfg, seed):
    weights = random_weights(cfg, seed)
    tokens = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(seed))
    expected = hf_logits(transformers_model(cfg, weights), tokens)
    dec = ReferenceDecoder(cfg, weights, max_seq_len=32)
    prefill = dec.forward(tokens[:12])
    decode = torch.cat([dec.forward(tokens[i:i + 1]) for i in range(12, 20)])
    assert rel_err(torch.cat([prefill, decode]), expected) < 1e-4


# ---- cache semantics ----------------------------------------------------------------------------

def test_decode_equals_full_recompute(tiny):
    cfg, weights, tokens = tiny
    full = ReferenceDecoder(cfg, weights).forward(tokens)
    dec = ReferenceDecoder(cfg, weights)
    parts = [dec.forward(tokens[:17]), dec.forward(tokens[17:30])]
    parts += [dec.forward(tokens[i:i + 1]) for i in range(30, len(tokens))]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)


def test_truncate_then_reforward_is_identical(tiny):
    cfg, weights, tokens = tiny
    dec = ReferenceDecoder(cfg, weights)
    dec.forward(tokens[:30])
    first = dec.forward(tokens[30:35])
    dec.truncate(30)
    other = torch.randint(0, cfg.vocab_size, (7,), generator=torch.Generator().manual_seed(5))
    dec.forward(other)  # rejected speculation overwrites the cache past 30
    dec.truncate(30)
    assert dec.seq_len == 30
    assert torch.equal(dec.forward(tokens[30:35]), first)
    with pytest.raises(ValueError):
        dec.truncate(36)


def test_reset_and_capacity(tiny):
    cfg, weights, tokens = tiny
    dec = ReferenceDecoder(cfg, weights, max_seq_len=16)
    first = dec.forward(tokens[:10])
    dec.reset()
    assert torch.equal(dec.forward(tokens[:10]), first)
    with pytest.raises(ValueError):
        dec.forward(tokens[10:17])


def test_generate_greedy_is_deterministic_and_follows_argmax(tiny):
    cfg, weights, tokens = tiny
    dec = ReferenceDecoder(cfg, weights)
    prompt = tokens[:6].tolist()
    out = generate(dec, prompt, 8)
    assert out == generate(dec, prompt, 8)
    assert len(out) == 8 and dec.seq_len == len(prompt) + 7
    full = ReferenceDecoder(cfg, weights).forward(prompt + out)
    assert full[len(prompt) - 1:-1].argmax(-1).tolist() == out


def test_generate_sampling_depends_only_on_seed(tiny):
    cfg, weights, tokens = tiny
    dec = ReferenceDecoder(cfg, weights)
    prompt = tokens[:6].tolist()
    a = generate(dec, prompt, 8, temperature=1.0, seed=3)
    assert a == generate(dec, prompt, 8, temperature=1.0, seed=3)
    assert a != generate(dec, prompt, 8, temperature=1.0, seed=4)


def test_bf16_matches_transformers_bf16(tiny):
    # Same casts as transformers; what remains is kernel rounding (its grouped_mm experts).
    cfg, weights, tokens = tiny
    expected = hf_logits(transformers_model(cfg, weights, torch.bfloat16), tokens)
    ours = ReferenceDecoder(cfg, weights, dtype=torch.bfloat16).forward(tokens)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, expected) < 2e-2
