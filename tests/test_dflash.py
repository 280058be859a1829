"""The DFlash drafter reference: shapes, determinism, non-causal block, window, context rollback."""

from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.dflash import DFlashConfig, DFlashDrafter, expected_draft_tensors
from model.reference import ReferenceDecoder
from tests.helpers import random_draft_weights, random_weights


@pytest.fixture(scope="module")
def setup():
    target = preset("mimo-tiny")
    dcfg = DFlashConfig.tiny_for(target)
    tw = random_weights(target, seed=0)
    dw = random_draft_weights(dcfg, seed=1)
    tokens = torch.randint(0, target.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    _, hidden = ReferenceDecoder(target, tw).forward(tokens, capture_layers=list(dcfg.target_layers))
    return target, dcfg, tw, dw, tokens, hidden


def drafter(setup) -> DFlashDrafter:
    _, dcfg, tw, dw, _, _ = setup
    return DFlashDrafter(dcfg, dw, tw["model.embed_tokens.weight"], tw["lm_head.weight"])


def rows(hidden: dict[int, torch.Tensor], a: int, b: int) -> dict[int, torch.Tensor]:
    return {layer: h[a:b] for layer, h in hidden.items()}


def test_config_and_tensor_list():
    assert DFlashConfig.spread_layers(48, 5) == (0, 11, 23, 35, 47)
    dcfg = DFlashConfig.tiny_for(preset("mimo-tiny"))
    H = dcfg.hidden_size
    specs = {s.name: s.shape for s in expected_draft_tensors(dcfg)}
    assert specs["fc.weight"] == (H, len(dcfg.target_layers) * H)
    assert specs["mask_embedding"] == (H,)
    assert specs["layers.0.self_attn.q_proj.weight"] == (dcfg.num_heads * dcfg.head_dim, H)
    assert specs["layers.1.self_attn.attention_sink_bias"] == (dcfg.num_heads,)
    assert {n: w.shape for n, w in random_draft_weights(dcfg).items()} == specs
    with pytest.raises(ValueError):
        DFlashConfig(**{**dcfg.__dict__, "num_kv_heads": 3}).validate()


def test_draft_shape_and_determinism(setup):
    target, dcfg, *_, tokens, hidden = setup
    a = drafter(setup).draft(int(tokens[20]), rows(hidden, 0, 20), 20)
    b = drafter(setup).draft(int(tokens[20]), rows(hidden, 0, 20), 20)
    assert a == b
    assert len(a) == dcfg.block_size - 1
    assert all(0 <= t < target.vocab_size for t in a)


def test_start_pos_must_follow_context(setup):
    *_, tokens, hidden = setup
    with pytest.raises(ValueError):
        drafter(setup).draft(int(tokens[10]), rows(hidden, 0, 10), 11)


def test_block_kv_is_not_kept(setup):
    *_, tokens, hidden = setup
    d = drafter(setup)
    first = d.draft_logits(int(tokens[20]), rows(hidden, 0, 20), 20)
    assert d.context_len == 20
    again = d.draft_logits(int(tokens[20]), rows(hidden, 20, 20), 20)  # no new context
    assert torch.equal(first, again)


def test_block_is_bidirectional(setup):
    _, dcfg, *_, hidden = setup
    d = drafter(setup)
    d.append_context(rows(hidden, 0, 20))
    B = dcfg.block_size
    block = torch.randn(B, dcfg.hidden_size, generator=torch.Generator().manual_seed(3))
    base = d.block_logits(block, 20)
    changed = block.clone()
    changed[B - 1] += 1.0
    moved = d.block_logits(changed, 20)
    # A later block position changes every earlier position's output: no causal mask.
    for i in range(B - 1):
        assert not torch.allclose(base[i], moved[i])
    # Reading the block never writes the context.
    assert d.context_len == 20 and torch.equal(d.block_logits(block, 20), base)


def test_sliding_window_hides_old_context(setup):
    _, dcfg, *_, tokens, hidden = setup
    start = 25
    oldest_visible = start - dcfg.sliding_window + 1  # the first block query's window
    noisy = {l: h.clone() for l, h in hidden.items()}
    for h in noisy.values():
        h[:oldest_visible] += torch.randn_like(h[:oldest_visible])
    a = drafter(setup).draft_logits(int(tokens[start]), rows(hidden, 0, start), start)
    b = drafter(setup).draft_logits(int(tokens[start]), rows(noisy, 0, start), start)
    assert torch.equal(a, b)
    for h in noisy.values():
        h[oldest_visible] += 1.0
    c = drafter(setup).draft_logits(int(tokens[start]), rows(noisy, 0, start), start)
    assert not torch.allclose(a, c)


def test_incremental_context_equals_one_shot(setup):
    *_, tokens, hidden = setup
    d = drafter(setup)
    d.draft(int(tokens[8]), rows(hidden, 0, 8), 8)
    d.draft(int(tokens[13]), rows(hidden, 8, 13), 13)
    stepped = d.draft_logits(int(tokens[21]), rows(hidden, 13, 21), 21)
    fresh = drafter(setup).draft_logits(int(tokens[21]), rows(hidden, 0, 21), 21)
    torch.testing.assert_close(stepped, fresh, rtol=1e-5, atol=1e-5)


def test_truncate_context_rolls_back(setup):
    target, *_, tokens, hidden = setup
    d = drafter(setup)
    d.draft(int(tokens[12]), rows(hidden, 0, 12), 12)
    d.draft(int(tokens[18]), rows(hidden, 12, 18), 18)  # later rejected in part
    d.truncate_context(15)
    other = {l: torch.randn(3, target.hidden_size, generator=torch.Generator().manual_seed(4))
             for l in hidden}
    rolled = d.draft_logits(7, other, 18)
    reference = {l: torch.cat([hidden[l][:15], other[l]]) for l in hidden}
    fresh = drafter(setup).draft_logits(7, reference, 18)
    torch.testing.assert_close(rolled, fresh, rtol=1e-5, atol=1e-5)
    assert rolled.argmax(-1).tolist() == fresh.argmax(-1).tolist()
    with pytest.raises(ValueError):
        d.truncate_context(19)
