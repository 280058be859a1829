"""The DFlash draft step in the IR (tilert/draft.py) on the VM equals DFlashDrafter, and the
target steps' `hidden` output (capture tasks) equals the reference's captured states without
changing the logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import preset
from model.dflash import DFlashConfig, DFlashDrafter
from model.reference import ReferenceDecoder
from tests.helpers import random_draft_weights, random_weights
from tilert.compiler import compile_steps
from tilert.draft import compile_draft_step, draft_ring_slots, kinds_without_gpu_kernel, lower_draft_step
from tilert.errors import UserError
from tilert.layout import runtime_weights
from tilert.lower import load_recipe
from tilert.draft_vm import DraftVM
from tilert.vm import VM

MAX_SEQ = 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def all_weights(cfg, tw, dw) -> dict:
    """The artifact's weights: the target's runtime layout plus the drafter's under draft."""
    out = runtime_weights(cfg, tw)
    out.update({f"draft.{k}": v for k, v in dw.items()})
    return out


@pytest.fixture(scope="module")
def pair():
    cfg = preset("mimo-tiny")
    dcfg = DFlashConfig.tiny_for(cfg)  # block 4, window 12, sink, 2 layers
    tw, dw = random_weights(cfg, seed=0), random_draft_weights(dcfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(2))
    _, hidden = ReferenceDecoder(cfg, tw, max_seq_len=MAX_SEQ).forward(tokens, capture_layers=list(dcfg.target_layers))
    flat = torch.cat([hidden[layer] for layer in dcfg.target_layers], dim=-1)  # what a target step outputs
    return cfg, dcfg, tw, dw, tokens.tolist(), flat


def reference_drafter(dcfg, tw, dw) -> DFlashDrafter:
    return DFlashDrafter(dcfg, dw, tw["model.embed_tokens.weight"], tw["lm_head.weight"], max_context=MAX_SEQ)


def as_layers(dcfg, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    H = dcfg.hidden_size
    return {layer: rows[:, j * H:(j + 1) * H] for j, layer in enumerate(dcfg.target_layers)}


def draft_vm(cfg, dcfg, tw, dw, recipe=None, context_rows=4, interleave=None) -> DraftVM:
    recipe = recipe or load_recipe(None, "h100")
    s = compile_draft_step(dcfg, recipe, MAX_SEQ, context_rows)
    return DraftVM(s, all_weights(cfg, tw, dw), MAX_SEQ, interleave=interleave)


def run_rounds(vm: DraftVM, ref: DFlashDrafter, tokens, flat, appends: list[int], truncate_to=None):
    """Append `appends[i]` committed rows, then draft after the next token, on both; compare.
    With truncate_to, halfway the context rolls back to truncate_to(n) positions, and the rows
    appended from then on differ from the ones rolled back."""
    n = 0
    for i, k in enumerate(appends):
        if truncate_to is not None and i == len(appends) // 2:
            n = truncate_to(n)
            vm.truncate_context(n)
            ref.truncate_context(n)
            flat = flat.roll(3, dims=0) + 0.5
        rows = flat[n:n + k]
        got = vm.draft(tokens[n + k], rows)
        want_logits = ref.draft_logits(tokens[n + k], as_layers(ref.cfg, rows), n + k)
        n += k
        assert vm.context_len == ref.context_len == n
        assert not torch.isnan(vm.last_logits).any()
        assert rel_err(vm.last_logits, want_logits) < 1e-5, (i, k)
        assert got == want_logits.argmax(-1).tolist(), (i, k)


def test_draft_step_equals_dflash_drafter_across_ring_wraps(pair):
    cfg, dcfg, tw, dw, tokens, flat = pair
    vm, ref = draft_vm(cfg, dcfg, tw, dw), reference_drafter(dcfg, tw, dw)
    # A prompt longer than the step's 4 context rows (appended over several steps), then rounds
    # committing 1..B positions: 44 positions through a ring of window + B - 1 = 15 slots.
    appends = [11, 1, 4, 2, 3, 1, 4, 4, 2, 1, 3, 4, 4]
    assert sum(appends) + dcfg.block_size <= len(tokens)
    assert sum(appends) > 2 * draft_ring_slots(dcfg, MAX_SEQ)
    run_rounds(vm, ref, tokens, flat, appends)


@pytest.mark.parametrize("interleave", [3, 4])
def test_draft_step_any_interleaving(pair, interleave):
    cfg, dcfg, tw, dw, tokens, flat = pair
    vm = draft_vm(cfg, dcfg, tw, dw, interleave=interleave)
    run_rounds(vm, reference_drafter(dcfg, tw, dw), tokens, flat, [7, 3, 4, 1])


def test_draft_context_rolls_back(pair):
    cfg, dcfg, tw, dw, tokens, flat = pair
    vm, ref = draft_vm(cfg, dcfg, tw, dw), reference_drafter(dcfg, tw, dw)
    # Halfway, forget the last B - 1 = 3 context positions, then append other rows over them.
    run_rounds(vm, ref, tokens, flat, [9, 4, 4, 2, 3, 4], truncate_to=lambda n: n - 3)
    with pytest.raises(ValueError):
        vm.truncate_context(vm.context_len + 1)
    # The ring keeps what a rollback of B - 1 positions needs, no more: deeper is refused.
    with pytest.raises(ValueError, match="roll back to"):
        vm.truncate_context(vm.context_len - dcfg.block_size)


def test_the_block_never_leaks_into_the_context(pair):
    """Drafting twice from the same context (no new rows) gives the same drafts: the first
    block's K/V, written beyond the context, are invisible to the second."""
    cfg, dcfg, tw, dw, tokens, flat = pair
    vm = draft_vm(cfg, dcfg, tw, dw)
    a = vm.draft(tokens[10], flat[:10])
    logits = vm.last_logits.clone()
    assert vm.draft(tokens[10], flat[10:10]) == a
    assert torch.equal(vm.last_logits, logits)
    vm.draft(tokens[11], flat[10:10])  # another last token: another block, written over the first
    assert not torch.equal(vm.last_logits, logits)
    assert vm.draft(tokens[10], flat[10:10]) == a
    assert torch.equal(vm.last_logits, logits)


def test_draft_graph_uses_the_target_kinds_plus_draft_embed(pair):
    _, dcfg, *_ = pair
    g = lower_draft_step(dcfg, load_recipe(None, "h100"), MAX_SEQ, context_rows=4)
    kinds = {t.kind for t in g.tasks}
    assert kinds == {"linear", "rmsnorm", "rope", "kv_write", "draft_embed", "attention", "attn_combine",
                     "gate_up", "lm_head", "argmax"}
    assert all(t.params["causal"] is False for t in g.tasks if t.kind == "attention")
    s = compile_draft_step(dcfg, load_recipe(None, "h100"), MAX_SEQ, context_rows=4)
    assert s.meta["draft"] and s.meta["block_size"] == dcfg.block_size and s.meta["context_rows"] == 4
    assert g.buffers["draft.layer0.k_cache"].shape[0] == dcfg.sliding_window + 2 * (dcfg.block_size - 1)


def test_capture_exposes_hidden_states_without_changing_logits(pair):
    cfg, dcfg, tw, _, tokens, flat = pair
    recipe = load_recipe("mimo-tiny", "h100")
    plain = compile_steps(cfg, recipe, [1, 4], MAX_SEQ)
    captured = compile_steps(cfg, recipe, [1, 4], MAX_SEQ, capture_layers=dcfg.target_layers)
    assert "capture" in {t.kind for t in captured[1].graph.tasks}
    assert "hidden" not in plain[1].graph.buffers
    rw = runtime_weights(cfg, tw)
    a, b = VM(cfg, plain, rw, MAX_SEQ), VM(cfg, captured, rw, MAX_SEQ)
    rows = []
    for chunk in (tokens[:4], tokens[4:5], tokens[5:9], tokens[9:10]):
        la, ca = a.step(chunk, interleave=1)
        lb, cb = b.step(chunk, interleave=2)
        assert torch.equal(la, lb) and ca == cb  # the capture only reads the residual stream
        rows.append(b.read("hidden", len(chunk)))
    got = torch.cat(rows)
    assert not torch.isnan(got).any()
    assert rel_err(got, flat[:10]) < 1e-5
    with pytest.raises(UserError):
        a.read("hidden", 1)


def test_speculative_kinds_are_reported_for_the_gpu_build(pair):
    pytest.importorskip("tilert.codegen")
    cfg, dcfg, *_ = pair
    recipe = load_recipe("mimo-tiny", "h100")
    assert kinds_without_gpu_kernel(compile_steps(cfg, recipe, [1], MAX_SEQ)) == []
    missing = kinds_without_gpu_kernel(compile_steps(cfg, recipe, [1], MAX_SEQ, capture_layers=(0,)))
    assert set(missing) <= {"capture"}


@st.composite
def drafter_configs(draw):
    cfg = preset("mimo-tiny")
    kv = draw(st.sampled_from([1, 2]))
    head_dim, factor = draw(st.sampled_from([(8, 0.5), (16, 0.25), (16, 1.0), (12, 0.334)]))
    block = draw(st.integers(2, 5))
    window = draw(st.one_of(st.none(), st.integers(block, 10)))
    n_layers = draw(st.integers(1, cfg.num_hidden_layers))
    return DFlashConfig(
        num_layers=draw(st.integers(1, 2)), hidden_size=cfg.hidden_size, num_heads=kv * draw(st.sampled_from([1, 2])),
        num_kv_heads=kv, head_dim=head_dim, v_head_dim=draw(st.sampled_from([8, 16])), intermediate_size=48,
        target_layers=tuple(draw(st.permutations(range(cfg.num_hidden_layers)))[:n_layers]),
        vocab_size=cfg.vocab_size, block_size=block, partial_rotary_factor=factor,
        sliding_window=window, sink=draw(st.booleans()), value_scale=draw(st.sampled_from([1.0, 0.707])),
    ).validate()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dcfg=drafter_configs(), seed=st.integers(0, 2**16), workers=st.integers(1, 5),
       tiles=st.sampled_from([3, 8, 64]), splits=st.integers(1, 3), fuse=st.booleans(),
       context_rows=st.integers(1, 6), interleave=st.integers(0, 2**16),
       appends=st.lists(st.integers(0, 5), min_size=1, max_size=6), rollback=st.integers(0, 4))
def test_random_drafters_and_schedules_equal_dflash_drafter(dcfg, seed, workers, tiles, splits, fuse, context_rows,
                                                            interleave, appends, rollback):
    """Random geometries, tilings, worker orders, context appends and a rollback of up to B - 1
    context positions halfway."""
    cfg = preset("mimo-tiny")
    base = load_recipe(None, "h100")
    recipe = dict(base, workers=workers, out_rows=tiles, ffn_rows=tiles, vocab_rows=4 * tiles, embed_cols=tiles,
                  q_heads_per_task=1 + tiles % 2, global_splits=splits, swa_splits=splits,
                  qkv_rows=tiles if tiles < 8 else None, fuse=base["fuse"] if fuse else [])
    tw, dw = random_weights(cfg, seed), random_draft_weights(dcfg, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (sum(appends) + 1,), generator=gen).tolist()
    flat = torch.randn(sum(appends), len(dcfg.target_layers) * cfg.hidden_size, generator=gen)
    vm = DraftVM(compile_draft_step(dcfg, recipe, MAX_SEQ, context_rows), all_weights(cfg, tw, dw), MAX_SEQ,
                 interleave=interleave)
    depth = min(rollback, dcfg.block_size - 1)
    run_rounds(vm, reference_drafter(dcfg, tw, dw), tokens, flat, appends, truncate_to=lambda n: max(0, n - depth))


def test_the_recipe_draft_entry_tiles_the_draft_step_only(pair):
    """A recipe's `draft` entry sets the draft step's tile sizes (q / k / v projections in row
    tiles here) without touching the target's steps, and the drafts stay the reference
    drafter's; only tile sizes may appear there, and `recipe_with` sets a key there too."""
    from tilert.lower import recipe_for_draft, recipe_with

    cfg, dcfg, tw, dw, tokens, flat = pair
    recipe = dict(load_recipe(None, "h100"), draft={"qkv_rows": 8})

    def q_rows(graph):
        return {sg["rows"][1] - sg["rows"][0] for t in graph.tasks for st in (t.stages or [t])
                if st.kind == "linear" and graph.ops[t.op].name.endswith("q_proj") for sg in st.params["segments"]}

    s = compile_draft_step(dcfg, recipe, MAX_SEQ, 4)
    assert q_rows(s.graph) == {8}
    assert q_rows(compile_steps(cfg, recipe, [1], MAX_SEQ)[1].graph) == {recipe["q_heads_per_task"] * cfg.head_dim}
    vm = DraftVM(s, all_weights(cfg, tw, dw), MAX_SEQ)
    run_rounds(vm, reference_drafter(dcfg, tw, dw), tokens, flat, [7, 3, 4, 1])
    assert recipe_for_draft(recipe_with(recipe, "qkv_rows", 16))["qkv_rows"] == 16
    with pytest.raises(UserError, match="workers"):
        compile_draft_step(dcfg, dict(recipe, draft={"workers": 3}), MAX_SEQ, 4)


def test_a_draft_block_past_max_seq_len_is_refused(pair):
    cfg, dcfg, tw, dw, tokens, flat = pair
    vm = draft_vm(cfg, dcfg, tw, dw)
    vm.max_seq_len = 12  # a block at 10..13
    with pytest.raises(UserError, match="max sequence length"):
        vm.draft(tokens[10], flat[:10])
