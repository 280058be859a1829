"""The multi-GPU partition: every head, row, expert and vocabulary row owned once (KV heads
replicated exactly where there are fewer than GPUs), shard shapes, and the weights put back
together."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import DENSE, FULL, SLIDING, SPARSE, preset
from model.weights import BF16, FP8, FP32, MXFP4, StoredTensor, expected_tensors
from tests.helpers import random_weights
from tilert.errors import UserError
from tilert.layout import runtime_weights
from tilert.lower import load_recipe, stacked_expert_name
from tilert.partition import Cut, cut_tensor, ownership, plan_partition, shard_weights, tensor_cuts, unshard_weights

RECIPE = load_recipe("mimo-tiny", "h100")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def partitioned_configs(draw):
    """A small config and a GPU count that fits it."""
    n = draw(st.sampled_from([1, 2, 3, 4, 8]))
    nq = n * draw(st.sampled_from([1, 2, 3]))
    fits = [d for d in _divisors(nq) if d % n == 0 or n % d == 0]
    layers = draw(st.integers(1, 3))
    head_dim, factor = draw(st.sampled_from([(8, 0.25), (16, 0.5), (24, 0.334)]))
    experts = n * draw(st.integers(1, 3))
    cfg = dataclasses.replace(
        preset("mimo-tiny"),
        vocab_size=draw(st.integers(n, 200)), hidden_size=32, intermediate_size=n * draw(st.sampled_from([4, 8])),
        num_attention_heads=nq, ga_num_kv_heads=draw(st.sampled_from(fits)), swa_num_kv_heads=draw(st.sampled_from(fits)),
        head_dim=head_dim, v_head_dim=draw(st.sampled_from([8, 16])), partial_rotary_factor=factor,
        layer_types=tuple(draw(st.lists(st.sampled_from([FULL, SLIDING]), min_size=layers, max_size=layers))),
        mlp_layer_types=tuple(draw(st.lists(st.sampled_from([DENSE, SPARSE]), min_size=layers, max_size=layers))),
        n_routed_experts=experts, num_experts_per_tok=draw(st.integers(1, min(3, experts))), moe_intermediate_size=8,
    ).validate()
    recipe = dict(RECIPE, vocab_rows=draw(st.integers(1, 64)))
    return cfg, n, recipe


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(partitioned_configs())
def test_every_head_row_expert_and_vocab_row_is_owned_once(case):
    cfg, n, recipe = case
    part = plan_partition(cfg, n, recipe)
    own = ownership(part)
    for dim in ("q_heads", "ffn_rows", "experts", "vocab_rows"):
        assert all(len(holders) == 1 for holders in own[dim]), dim
    for dim, kv in (("ga_kv_heads", cfg.ga_num_kv_heads), ("swa_kv_heads", cfg.swa_num_kv_heads)):
        # Split KV heads are owned once; with fewer KV heads than GPUs each is replicated on
        # exactly the ranks whose query heads use it.
        assert all(len(holders) == max(1, n // kv) for holders in own[dim]), dim
        group = cfg.num_attention_heads // kv
        for s in part.ranks:
            used = {h // group for h in range(*s.q_heads)}
            held = set(range(*(s.ga_kv_heads if dim == "ga_kv_heads" else s.swa_kv_heads)))
            assert used == held
    # Every rank gets a contiguous block of whole LM-head tiles.
    tiles = [s.vocab_tiles for s in part.ranks]
    assert tiles[0][0] == 0 and all(a[1] == b[0] and a[0] < a[1] for a, b in zip(tiles, tiles[1:]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(partitioned_configs(), st.integers(0, 2**16))
def test_shards_have_the_local_shapes_and_put_back_together(case, seed):
    cfg, n, recipe = case
    part = plan_partition(cfg, n, recipe)
    weights = random_weights(cfg, seed)
    # Store the projections as the hub does (FP8 in 128x128 blocks, o_proj in bf16): most cuts
    # of such small matrices fall inside a block.
    for name, t in list(weights.items()):
        if len(t.shape) == 2 and name.endswith("_proj.weight"):
            weights[name] = StoredTensor.from_float(t.data, BF16 if "o_proj" in name else FP8)
    rw = runtime_weights(cfg, weights)
    shards = [shard_weights(part, r, rw) for r in range(n)]
    for r, shard in enumerate(shards):
        local = part.local_config(r)
        s = part.ranks[r]
        want = {spec.name: spec.shape for spec in expected_tensors(local) if ".mlp.experts." not in spec.name}
        want["lm_head.weight"] = (s.vocab_rows[1] - s.vocab_rows[0], cfg.hidden_size)
        for i in range(cfg.num_hidden_layers):
            if cfg.is_moe(i):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    full = rw[stacked_expert_name(i, proj)].shape
                    want[stacked_expert_name(i, proj)] = (s.experts[1] - s.experts[0], *full[1:])
        assert {k: tuple(v.shape) for k, v in shard.items()} == want
    back = unshard_weights(part, shards)
    assert set(back) == set(rw)
    for name, t in rw.items():
        assert torch.equal(back[name].data, t.dequantize(torch.float32)), name


def test_cuts_on_whole_fp8_blocks_stay_fp8_others_are_dequantized_exactly():
    w = torch.randn(256, 256)
    t = StoredTensor.from_float(w, FP8)
    aligned = cut_tensor(t, Cut(rows=(128, 256)))
    assert aligned.fmt == FP8 and torch.equal(aligned.dequantize(), t.dequantize()[128:])
    inside = cut_tensor(t, Cut(cols=(64, 192)))
    assert inside.fmt == FP32 and torch.equal(inside.data, t.dequantize()[:, 64:192])
    assert cut_tensor(t, Cut()) is t
    m = StoredTensor.from_float(torch.randn(8, 64), MXFP4)  # one E8M0 scale per 32 columns
    kept = cut_tensor(m, Cut(rows=(2, 5), cols=(32, 64)))
    assert kept.fmt == MXFP4 and torch.equal(kept.dequantize(), m.dequantize()[2:5, 32:64])
    split = cut_tensor(m, Cut(cols=(16, 48)))
    assert split.fmt == FP32 and torch.equal(split.data, m.dequantize()[:, 16:48])


@pytest.mark.parametrize("n, needles", [
    (8, ["4 query heads"]),
    (3, ["4 query heads", "2 KV heads", "8 routed experts"]),
])
def test_gpu_counts_that_do_not_fit_name_every_reason(n, needles):
    with pytest.raises(UserError) as e:
        plan_partition(preset("mimo-tiny"), n, RECIPE)
    assert f"--gpus {n}" in str(e.value)
    for needle in needles:
        assert needle in str(e.value)


def test_flash_on_8_gpus_replicates_the_global_kv_heads():
    cfg = preset("mimo-v2-flash")
    part = plan_partition(cfg, 8, load_recipe("mimo-v2-flash", "h100"))
    local = part.local_config(5)
    assert (local.num_attention_heads, local.ga_num_kv_heads, local.swa_num_kv_heads) == (8, 1, 1)
    assert part.ranks[5].ga_kv_heads == (2, 3) and part.ranks[5].swa_kv_heads == (5, 6)
    assert part.ranks[5].experts == (160, 192)
    cuts = tensor_cuts(part, 5)
    assert cuts["model.layers.0.self_attn.k_proj.weight"].rows == (2 * 192, 3 * 192)
    assert cuts["model.layers.3.self_attn.o_proj.weight"].cols == (40 * 128, 48 * 128)
    # The LM head keeps one GPU's tile count per rank (its tiles are 8x narrower).
    one_gpu = math.ceil(cfg.vocab_size / load_recipe("mimo-v2-flash", "h100")["vocab_rows"])
    assert all(one_gpu - 1 <= s.vocab_tiles[1] - s.vocab_tiles[0] <= one_gpu for s in part.ranks)
