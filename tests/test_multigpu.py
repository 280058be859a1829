"""Multi-GPU: the ranks' schedules and their cross-GPU counters, the validator on the union of
the ranks (planted bugs), and the multi-rank VM against the reference decoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import preset
from model.reference import ReferenceDecoder, generate
from tests.helpers import random_weights
from tilert.collectives import COMM_KINDS, peer_name
from tilert.compiler import compile_steps
from tilert.errors import ScheduleError
from tilert.layout import runtime_weights
from tilert.lower import load_recipe
from tilert.multigpu import check, compile_rank_steps, join, split
from tilert.partition import plan_partition, shard_weights
from tilert.vm import VM
from tilert.vm_multi import MultiVM

RECIPE = load_recipe("mimo-tiny", "h100")
MAX_SEQ = 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def wide_config():
    """mimo-tiny widened so that 8 GPUs fit: 8 query heads (KV heads 2 global / 4 sliding, so
    both replicated and split KV heads occur), 16 experts top-4."""
    return dataclasses.replace(preset("mimo-tiny"), num_attention_heads=8, ga_num_kv_heads=2, swa_num_kv_heads=4,
                               n_routed_experts=16, num_experts_per_tok=4).validate()


# ---- schedules across GPUs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny2():
    cfg = preset("mimo-tiny")
    part = plan_partition(cfg, 2, RECIPE)
    return cfg, part, compile_rank_steps(part, RECIPE, [1, 8], max_seq_len=MAX_SEQ)


def _cross_rank_wait(u):
    """(task, wait index) of an all-reduce task on rank 1 waiting on a counter that rank 0 signals."""
    s, W = u.schedule, u.workers_per_rank
    for t, task in enumerate(s.graph.tasks):
        if task.kind == "allreduce" and s.worker_of[t] // W == 1:
            for i, (c, _) in enumerate(s.waits[t]):
                if any(s.worker_of[x] // W == 0 for x in s.counters[c].signalled_by):
                    return t, i
    raise AssertionError("no cross-rank wait")


def test_allreduce_waits_for_its_tile_on_every_rank_not_a_barrier(tiny2):
    _, part, schedules = tiny2
    u = join([s[1] for s in schedules])
    s, W = u.schedule, u.workers_per_rank
    ar = [t for t, task in enumerate(s.graph.tasks) if task.kind == "allreduce"]
    assert ar
    for t in ar:
        cols = s.graph.tasks[t].params["cols"]
        producers = {x for c, _ in s.waits[t] for x in s.counters[c].signalled_by}
        # Only the producers of this tile's partials, on both ranks (or work they depend on).
        ranks = {s.worker_of[x] // W for x in producers}
        assert ranks == {0, 1}
        for x in producers:
            for w in s.graph.tasks[x].writes:
                if w.buffer.startswith("partial"):
                    assert list(w.box[1]) == cols
    # Counters live where they are waited on; some are signalled from the other GPU.
    comm = [sch[1].meta["comm"] for sch in schedules]
    assert all(c["remote_signals"] for c in comm)


def test_split_and_join_are_inverse(tiny2):
    _, _, schedules = tiny2
    for b in (1, 8):
        u = join([s[b] for s in schedules])
        check(u)
        graphs = [s[b].graph for s in schedules]
        again = split(u, graphs, {})
        for a, s in zip(again, (sch[b] for sch in schedules)):
            assert a.streams == s.streams and a.waits == s.waits and a.signals == s.signals
            assert [(c.target, c.signalled_by) for c in a.counters] == [(c.target, c.signalled_by) for c in s.counters]
            assert a.meta["comm"] == s.meta["comm"]


def test_a_missing_cross_rank_dependency_is_caught(tiny2):
    _, _, schedules = tiny2
    u = join([s[1] for s in schedules])
    t, i = _cross_rank_wait(u)
    del u.schedule.waits[t][i]
    with pytest.raises(ScheduleError, match=r"race: .*rank 0 worker .*rank 1 worker|race: .*rank 1 worker .*rank 0 worker"):
        check(u)


def test_a_counter_waited_on_from_another_gpu_is_refused(tiny2):
    _, _, schedules = tiny2
    u = join([s[1] for s in schedules])
    t, i = _cross_rank_wait(u)
    c, _ = u.schedule.waits[t][i]
    u.home[c] = 0  # the counter would live on rank 0 while a rank-1 task spins on it
    with pytest.raises(ScheduleError, match=f"waits on counter {c}, which lives on rank 0"):
        check(u)


def test_only_communication_tasks_read_another_gpus_memory(tiny2):
    _, _, schedules = tiny2
    u = join([s[1] for s in schedules])
    g = u.schedule.graph
    victim = next(t for t, task in enumerate(g.tasks) if task.kind not in COMM_KINDS
                  and u.schedule.worker_of[t] // u.workers_per_rank == 1)
    g.tasks[victim].reads.append(g.buffers[peer_name("x", 0)].full())
    with pytest.raises(ScheduleError, match=r"another GPU's memory.*reads x@0, in rank 0's memory"):
        check(u)


def test_a_wait_cycle_across_gpus_is_a_deadlock(tiny2):
    _, _, schedules = tiny2
    u = join([s[1] for s in schedules])
    s, W = u.schedule, u.workers_per_rank
    # Rank 0's first task waits for rank 1's last, which (through the all-reduces) waits for rank 0.
    first0 = s.streams[0][0]
    last1 = max(t for t in range(len(s.graph.tasks)) if s.worker_of[t] // W == 1)
    c = len(s.counters)
    s.counters.append(type(s.counters[0])(c, 1, [last1]))
    s.signals[last1].append(c)
    s.waits[first0].append((c, 1))
    u.home.append(0)
    with pytest.raises(ScheduleError, match="deadlock"):
        check(u)


# ---- the multi-rank VM equals one GPU -----------------------------------------------------------


def multi_vm(cfg, weights, n, steps=(1, 8), recipe=RECIPE):
    part = plan_partition(cfg, n, recipe)
    schedules = compile_rank_steps(part, recipe, list(steps), max_seq_len=MAX_SEQ)
    rw = runtime_weights(cfg, weights)
    return MultiVM(part, schedules, [shard_weights(part, r, rw) for r in range(n)], MAX_SEQ)


def generate_with(vm, prompt, n, interleave=None, temperature=0.0, seed=0):
    vm.reset()
    _, chosen = vm.step(prompt[:8], temperature, seed, interleave)
    for t in prompt[8:]:
        _, chosen = vm.step([t], temperature, seed, interleave)
    out = []
    for _ in range(n):
        out.append(chosen[-1])
        _, chosen = vm.step([chosen[-1]], temperature, seed, interleave)
    return out


PROMPT = [1, 17, 300, 5, 42, 7, 99, 100, 101, 3]


@pytest.mark.parametrize("n", [2, 4])
def test_tiny_on_n_gpus_equals_reference_and_one_gpu(n):
    cfg = preset("mimo-tiny")
    weights = random_weights(cfg, seed=0)
    vm = multi_vm(cfg, weights, n)
    expected = generate(ReferenceDecoder(cfg, weights, max_seq_len=MAX_SEQ), PROMPT, 24)
    assert generate_with(vm, PROMPT, 24) == expected
    assert len(set(expected)) > 4
    single = VM(cfg, compile_steps(cfg, RECIPE, [1, 8], MAX_SEQ), runtime_weights(cfg, weights), MAX_SEQ)
    assert generate_with(single, PROMPT, 24) == expected
    # An adversarial interleaving of all GPUs' workers, and sampling, give the same tokens.
    assert generate_with(vm, PROMPT, 12, interleave=n) == expected[:12]
    sampled = generate(ReferenceDecoder(cfg, weights, max_seq_len=MAX_SEQ), PROMPT, 12, temperature=0.8, seed=3)
    assert generate_with(vm, PROMPT, 12, temperature=0.8, seed=3) == sampled


@pytest.mark.parametrize("n", [2, 4, 8])
def test_wide_model_logits_on_n_gpus_equal_reference(n):
    cfg = wide_config()
    weights = random_weights(cfg, seed=n)
    vm = multi_vm(cfg, weights, n)
    tokens = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(n)).tolist()
    got = [vm.step(tokens[:8], interleave=1)[0]] + [vm.step([t], interleave=2 + i)[0] for i, t in enumerate(tokens[8:])]
    got = torch.cat(got)
    want = ReferenceDecoder(cfg, weights, max_seq_len=MAX_SEQ).forward(torch.tensor(tokens))
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < 1e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_union_experts_on_gpus_read_only_their_own_experts():
    """With `expert_union` a rank reads each distinct selected expert it owns once, no other."""
    cfg = wide_config()
    weights = random_weights(cfg, seed=5)
    recipe = dict(RECIPE, expert_union=True)
    vm = multi_vm(cfg, weights, 4, steps=(1, 8), recipe=recipe)
    reads = [[] for _ in vm.vms]
    for r, rank_vm in enumerate(vm.vms):
        m = rank_vm._memory(8)
        original = m.expert_rows

        def counting(name, expert, r0, r1, original=original, r=r):
            reads[r].append((name, expert, r0, r1))
            return original(name, expert, r0, r1)

        m.expert_rows = counting
    tokens = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    got = [vm.step(tokens[:8], interleave=3)[0]] + [vm.step([t])[0] for t in tokens[8:]]
    want = ReferenceDecoder(cfg, weights, max_seq_len=MAX_SEQ).forward(torch.tensor(tokens))
    assert rel_err(torch.cat(got), want) < 1e-5
    per_rank = cfg.n_routed_experts // 4
    for r in range(4):
        assert reads[r] and len(reads[r]) == len(set(reads[r]))
        assert all(0 <= e < per_rank for _, e, _, _ in reads[r])  # local indices of owned experts


def test_allreduce_tiles_follow_the_step_sizes_out_rows():
    """A recipe's by_tokens out_rows for one step size tiles that step's all-reduce like its
    residual updates (each all-reduce task waits only for the partial sums of its own rows)."""
    cfg = preset("mimo-tiny")
    recipe = dict(RECIPE, by_tokens={"8": {"out_rows": 8}})
    part = plan_partition(cfg, 2, recipe)
    steps = compile_rank_steps(part, recipe, [1, 8], max_seq_len=MAX_SEQ)

    def widths(schedule):
        return {c1 - c0 for t in schedule.graph.tasks if t.kind == "allreduce" for c0, c1 in [t.params["cols"]]}

    assert widths(steps[0][8]) == {8}
    assert widths(steps[0][1]) == {RECIPE.get("allreduce_rows", RECIPE["out_rows"])} != {8}
