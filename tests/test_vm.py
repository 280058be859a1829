"""The VM executes validated schedules and reproduces the reference decoder, in any interleaving."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import preset
from model.reference import ReferenceDecoder, generate
from tests.helpers import random_weights, small_configs
from tilert.compiler import compile_steps
from tilert.errors import HangError, UserError
from tilert.layout import runtime_weights
from tilert.lower import load_recipe
from tilert.vm import VM, execute


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def vm_generate(vm: VM, prompt: list[int], n: int, interleave=None, temperature=0.0, seed=0) -> list[int]:
    """Prefill in chunks of the compiled step sizes (largest first), then decode one by one."""
    vm.reset()
    sizes = sorted(vm.schedules, reverse=True)
    i, nxt = 0, None
    while i < len(prompt):
        b = next(s for s in sizes if s <= len(prompt) - i)
        _, chosen = vm.step(prompt[i:i + b], temperature, seed, interleave)
        nxt, i = chosen[-1], i + b
    out = []
    for _ in range(n):
        out.append(nxt)
        _, chosen = vm.step([nxt], temperature, seed, interleave)
        nxt = chosen[0]
    return out


@pytest.fixture(scope="module")
def tiny_vm():
    cfg = preset("mimo-tiny")
    weights = random_weights(cfg, seed=0)
    schedules = compile_steps(cfg, load_recipe("mimo-tiny", "h100"), [1, 8], max_seq_len=128)
    return cfg, weights, VM(cfg, schedules, runtime_weights(cfg, weights), max_seq_len=128)


def test_greedy_64_tokens_equal_reference_across_ring_wraps(tiny_vm):
    cfg, weights, vm = tiny_vm
    prompt = [1, 17, 300, 5, 42, 7, 99, 100, 101, 3, 4]
    expected = generate(ReferenceDecoder(cfg, weights, max_seq_len=128), prompt, 64)
    # 75 positions through a ring of sliding_window + 7 slots: the ring wraps several times.
    assert (len(prompt) + 64) > 4 * (cfg.sliding_window + 7)
    assert vm_generate(vm, prompt, 64) == expected
    assert len(set(expected)) > 8  # not a degenerate repetition


@pytest.mark.parametrize("interleave", [1, 2, 3])
def test_any_interleaving_gives_the_same_tokens(tiny_vm, interleave):
    cfg, weights, vm = tiny_vm
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert vm_generate(vm, prompt, 24, interleave=interleave) == vm_generate(vm, prompt, 24)


def test_sampling_equals_reference_sampling(tiny_vm):
    cfg, weights, vm = tiny_vm
    prompt = [1, 2, 3]
    expected = generate(ReferenceDecoder(cfg, weights, max_seq_len=128), prompt, 20, temperature=0.9, seed=7)
    assert vm_generate(vm, prompt, 20, temperature=0.9, seed=7) == expected
    assert vm_generate(vm, prompt, 20, temperature=0.9, seed=8) != expected


def test_logits_match_reference_step_by_step(tiny_vm):
    cfg, weights, vm = tiny_vm
    ref = ReferenceDecoder(cfg, weights, max_seq_len=128)
    vm.reset()
    tokens = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    got = [vm.step(tokens[:8])[0], vm.step(tokens[8:16])[0]] + [vm.step([t])[0] for t in tokens[16:]]
    want = ref.forward(torch.tensor(tokens))
    got = torch.cat(got)
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < 1e-5


def test_prompt_longer_than_max_seq_len_is_refused(tiny_vm):
    _, _, vm = tiny_vm
    vm.reset()
    with pytest.raises(UserError, match="max sequence length"):
        for _ in range(17):
            vm.step([1] * 8)


def test_planted_hang_names_worker_task_and_counter(tiny_vm):
    cfg, weights, vm = tiny_vm
    s = vm.schedules[1]
    # Plant a wait that can never be satisfied (the validator would refuse this schedule).
    victim = next(t for t, w in enumerate(s.waits) if w)
    counter, value = s.waits[victim][0]
    planted = dataclasses.replace(s, waits=[list(w) for w in s.waits])
    planted.waits[victim][0] = (counter, s.counters[counter].target + 1)
    m = vm._memory(1)
    with pytest.raises(HangError) as e:
        execute(planted, m)
    msg = str(e.value)
    assert f"worker {s.worker_of[victim]}: task {victim}" in msg
    assert f"counter {counter}" in msg


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=small_configs(), seed=st.integers(0, 2**16), workers=st.integers(1, 6),
       tiles=st.sampled_from([1, 3, 8]), splits=st.integers(1, 4), interleave=st.integers(0, 2**16),
       fuse=st.booleans(), qkv_rows=st.sampled_from([0, 4, 8]))
def test_random_models_and_schedules_equal_reference(cfg, seed, workers, tiles, splits, interleave, fuse, qkv_rows):
    # qkv_rows: q / k / v projections in row tiles, where RoPE fuses into the tile holding a
    # head's rotary dims (or stays a task of its own when they straddle two tiles)
    recipe = dict(load_recipe(None, "h100"), workers=workers, out_rows=tiles, ffn_rows=tiles,
                  expert_rows=tiles, router_rows=tiles, vocab_rows=4 * tiles, embed_cols=2 * tiles,
                  global_splits=splits, swa_splits=max(1, splits - 1),
                  fuse=load_recipe(None, "h100")["fuse"] if fuse else [], **({"qkv_rows": qkv_rows} if qkv_rows else {}))
    weights = random_weights(cfg, seed)
    schedules = compile_steps(cfg, recipe, [1, 4], max_seq_len=24)
    vm = VM(cfg, schedules, runtime_weights(cfg, weights), max_seq_len=24)
    tokens = torch.randint(0, cfg.vocab_size, (14,), generator=torch.Generator().manual_seed(seed)).tolist()
    got = [vm.step(tokens[:4], interleave=interleave)[0], vm.step(tokens[4:8], interleave=interleave)[0]]
    got += [vm.step([t], interleave=interleave)[0] for t in tokens[8:]]
    want = ReferenceDecoder(cfg, weights, max_seq_len=24).forward(torch.tensor(tokens))
    got = torch.cat(got)
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("tokens", [2, 8])
def test_union_experts_read_each_distinct_expert_once(tokens):
    """A multi-token step with `expert_union` computes the same logits, and its expert tasks
    read each distinct expert's tiles once, however many tokens chose it."""
    cfg = preset("mimo-tiny")
    weights = random_weights(cfg, seed=2)
    recipe = dict(load_recipe(None, "h100"), expert_union=True)
    schedules = compile_steps(cfg, recipe, [1, tokens], max_seq_len=64)
    kinds = {t.kind for t in schedules[tokens].graph.tasks}
    assert {"expert_union", "rmsnorm+expert_gate_up_union", "expert_down_union"} <= kinds
    vm = VM(cfg, schedules, runtime_weights(cfg, weights), max_seq_len=64)
    reads = []
    original = vm._memory(tokens).expert_rows

    def counting(name, expert, r0, r1):
        reads.append((name, expert, r0, r1))
        return original(name, expert, r0, r1)

    vm._memory(tokens).expert_rows = counting
    ids = torch.randint(0, cfg.vocab_size, (tokens + 5,), generator=torch.Generator().manual_seed(9)).tolist()
    got = [vm.step(ids[:tokens], interleave=5)[0]] + [vm.step([t])[0] for t in ids[tokens:]]
    want = ReferenceDecoder(cfg, weights, max_seq_len=64).forward(torch.tensor(ids))
    assert rel_err(torch.cat(got), want) < 1e-5
    assert reads and len(reads) == len(set(reads))  # no expert tile read twice in the step


def test_rope_fuses_into_the_projection_row_tiles_of_the_flash_recipe():
    """The H100 flash recipe tiles q / k in 128-row tiles: a head's rotary dims (its first 64 of
    192) always lie in one tile, so no RoPE task is left on its own and each rotation is the last
    stage of the projection task that wrote its rows."""
    cfg = preset("mimo-v2-flash", layers=2, expert_format="mxfp4")
    g = compile_steps(cfg, load_recipe("mimo-v2-flash", "h100"), [1], max_seq_len=64)[1].graph
    assert not [t for t in g.tasks if t.kind == "rope"]
    hosts = [t for t in g.tasks if t.stages and t.stages[-1].kind == "rope"]
    q_heads = cfg.num_attention_heads
    kv_heads = sum(cfg.num_kv_heads(i) for i in range(cfg.num_hidden_layers))
    assert sum(s.kind == "rope" for t in hosts for s in t.stages) == cfg.num_hidden_layers * q_heads + kv_heads
    for t in hosts:
        linear = [s for s in t.stages if s.kind == "linear"]
        for s in (s for s in t.stages if s.kind == "rope"):
            (rot,) = [r for r in s.reads if r.buffer in ("q", "k")]
            assert any(w.contains(rot) for ls in linear for w in ls.writes)


def test_recipe_tile_sizes_may_differ_by_step_size():
    """A recipe's `by_tokens` entry sets tile sizes for one step size (the H100 flash recipe: 256
    expert rows in the 8-token verify step, 128 at B = 1); the steps still share one KV layout
    and give the reference's logits.  Only tile sizes may differ; `recipe_with` sets a key at
    every step size."""
    from tilert.lower import recipe_for_step, recipe_with

    flash = preset("mimo-v2-flash", layers=2, expert_format="mxfp4")
    s = compile_steps(flash, load_recipe("mimo-v2-flash", "h100"), [1, 8], max_seq_len=64)

    def expert_rows(graph, kind):
        return {st.params["rows"][1] - st.params["rows"][0] for t in graph.tasks
                for st in (t.stages or [t]) if st.kind == kind}

    assert expert_rows(s[1].graph, "expert_gate_up") == {128}
    assert expert_rows(s[8].graph, "expert_gate_up_union") == {256}
    recipe = load_recipe("mimo-v2-flash", "h100")
    assert recipe_for_step(recipe_with(recipe, "expert_rows", 64), 8)["expert_rows"] == 64
    assert recipe_for_step(recipe, 8)["expert_rows"] == 256 and recipe_for_step(recipe, 4)["expert_rows"] == 128
    with pytest.raises(UserError, match="tie_break"):
        recipe_for_step(dict(recipe, by_tokens={"8": {"tie_break": "lowest"}}), 8)
    with pytest.raises(UserError, match="step sizes"):
        recipe_for_step(dict(recipe, by_tokens={"eight": {"expert_rows": 64}}), 8)

    cfg = preset("mimo-tiny")
    weights = random_weights(cfg, seed=5)
    tiny = dict(load_recipe(None, "h100"), expert_union=True, by_tokens={"4": {"expert_rows": 3, "out_rows": 5}})
    schedules = compile_steps(cfg, tiny, [1, 4], max_seq_len=32)
    assert max(expert_rows(schedules[4].graph, "expert_gate_up_union")) == 3
    assert min(expert_rows(schedules[1].graph, "expert_gate_up")) > 3
    vm = VM(cfg, schedules, runtime_weights(cfg, weights), max_seq_len=32)
    ids = torch.randint(0, cfg.vocab_size, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    got = [vm.step(ids[:4])[0], vm.step(ids[4:8])[0]] + [vm.step([t])[0] for t in ids[8:]]
    want = ReferenceDecoder(cfg, weights, max_seq_len=32).forward(torch.tensor(ids))
    assert rel_err(torch.cat(got), want) < 1e-5
