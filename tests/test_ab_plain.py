"""tools/ab_plain.py: variants read with tools/profile_step.py's options, each compiled as asked,
and only ones that share the step itself (the GPU timing runs on a GPU machine)."""

from __future__ import annotations

import pytest

from tests.helpers import random_weights
from tilert import codegen
from tilert.layout import runtime_weights
from tilert.vm import VM
from tilert.calibration import model_steps
from tools.ab_plain import parse_variants, table
from tools.profile_step import check_plain, step_config, variant_kernel

COMMON = "--layers 2 --context 56"


def test_variants_read_profile_steps_options():
    (base, a), (slots, b) = parse_variants(COMMON, ["base=", "slots3=--ring-slots 3 --define TILERT_X=1"])
    assert (base, slots) == ("base", "slots3")
    assert a.layers == b.layers == 2 and a.ring_slots is None and b.ring_slots == 3 and b.define == ["TILERT_X=1"]


@pytest.mark.parametrize("specs,words", [(["a=", "b=--layers 3"], "--layers"), (["a=", "b=--tokens 8"], "--tokens"),
                                         (["a=", "a=--ring-slots 2"], "named twice"), (["a"], "NAME=ARGS")])
def test_variants_that_change_the_step_are_refused(specs, words, capsys):
    with pytest.raises(SystemExit) as e:
        parse_variants(COMMON, specs)
    assert words in str(e.value)


def test_each_variant_compiles_as_asked_and_puts_codegen_back():
    variants = parse_variants(COMMON, ["base=", "big=--codegen MIN_SLOT_ROW_BYTES=5120 --ring-slots 3 "
                                                "--define TILERT_FP4_TEST=1 --set expert_rows=64"])
    before = codegen.MIN_SLOT_ROW_BYTES
    cfg = step_config(variants[0][1])
    (sched0, gen0, src0), (sched1, gen1, src1) = (variant_kernel(opts, cfg, None) for _, opts in variants)
    assert codegen.MIN_SLOT_ROW_BYTES == before  # the override lasted one generate()
    assert gen0.slots == 4 and (gen1.slots, gen1.slot_bytes) == (3, 50944)  # what the 3 slots leave, aligned
    assert src1.startswith("#define TILERT_FP4_TEST 1\n") and not src0.startswith("#define")
    def gate_up_tasks(schedule):  # 8 experts' 2048 rows in tiles of expert_rows (the recipe's: 128)
        return sum(t.kind.endswith("expert_gate_up") for t in schedule.graph.tasks)

    assert (gate_up_tasks(sched0), gate_up_tasks(sched1)) == (8 * 2048 // 128, 8 * 2048 // 64)
    with pytest.raises(SystemExit, match="--codegen NOPE=1"):
        variant_kernel(parse_variants(COMMON, ["x=--codegen NOPE=1"])[0][1], cfg, None)


def test_table_gives_each_variant_against_the_first_and_the_floor():
    out = table({"base": [2e-3, 2.1e-3, 1.9e-3], "new": [1.8e-3, 1.9e-3, 1.7e-3]}, 1e-3,
                {"base": {"rel_err": 1e-6, "token_match": True}})
    lines = out.splitlines()
    assert lines[2].startswith("| base | 2000.0 | 1900.0 - 2100.0 | 1.000 | - | 0.500 |")
    assert lines[3].startswith("| new | 1800.0 | 1700.0 - 1900.0 | 0.900 | - | 0.556 | - |")
    with_model = table({"base": [2e-3], "new": [1.8e-3]}, 1e-3, {}, {"base": 1.5e-3, "new": 1.65e-3})
    assert with_model.splitlines()[3].startswith("| new | 1800.0 | 1800.0 - 1800.0 | 0.900 | 1.100 | 0.556 |")


def test_the_model_column_sees_tile_sizes_and_not_device_switches():
    variants = parse_variants(COMMON, ["base=", "def=--define TILERT_FP4_TEST=1", "tiles=--set expert_rows=64"])
    cfg = step_config(variants[0][1])
    model = model_steps({name: variant_kernel(opts, cfg, None)[0] for name, opts in variants})
    assert model["def"] == model["base"]  # same schedule: the model cannot see a #define
    assert model["tiles"] != model["base"] and all(v > 0 for v in model.values())


class _VMAsRuntime(VM):
    """A VM standing in for the plain kernel (the buffer accessor the GPU runtime has)."""

    def buffer(self, name: str):
        return self.state[name]


@pytest.mark.parametrize("tokens", [1, 4])
def test_the_plain_check_runs_a_step_of_all_the_variants_tokens(tokens):
    """check_plain compares one step of --tokens tokens (verify steps too, not only B = 1)."""
    opts = parse_variants("--layers 1 --context 8 --experts 8", [f"v=--tokens {tokens}"])[0][1]
    cfg = step_config(opts)
    schedule, _, _ = variant_kernel(opts, cfg, None)
    weights = runtime_weights(cfg, random_weights(cfg, 0))
    rt = _VMAsRuntime(cfg, {tokens: schedule}, weights, max_seq_len=opts.context + 8)
    for t0 in range(0, opts.context, tokens):  # a filled cache the check starts from
        rt.step(list(range(t0 + 1, t0 + tokens + 1)))
    check = check_plain(opts, cfg, schedule, weights, rt, vm_device="cpu")
    assert check == {"rel_err": 0.0, "token_match": True} and rt.seq_len == opts.context
