"""tools/autotune_schedule.py on the CPU: the variants it names, and that they share one kernel."""

from __future__ import annotations

import pytest

from model.config import preset
from tilert.codegen import generate
from tilert.compiler import compile_steps
from tilert.errors import UserError
from tilert.lower import load_recipe
from tools.autotune_schedule import label, parse_variants


def test_variant_lists_expand_seed_ranges_and_calibrations():
    assert parse_variants("lowest,random:2-4", "off") == [("lowest", False), ("random:2", False),
                                                           ("random:3", False), ("random:4", False)]
    assert parse_variants("longest_idle", "both") == [("longest_idle", False), ("longest_idle", True)]
    assert label(("random:7", True)) == "random:7 +cal"


@pytest.mark.parametrize("B", [1, 8])
def test_every_placement_is_the_same_kernel_source(B):
    # MegakernelRuntime.use_schedule swaps programs on one cubin: that holds only while the
    # source does not depend on which worker runs what.
    cfg = preset("mimo-tiny")
    sources, placements = set(), set()
    for tb, cal in parse_variants("lowest,longest_idle,random:1-3", "both"):
        recipe = dict(load_recipe("mimo-tiny", "h100"), tie_break=tb, calibrated=cal)
        s = compile_steps(cfg, recipe, [B], max_seq_len=64)[B]
        sources.add(generate(s, cfg).source)
        placements.add(tuple(s.worker_of))
    assert len(sources) == 1 and len(placements) > 3


@pytest.mark.parametrize("key, value, words", [("tie_break", "highest", "tie_break"),
                                               ("calibrated", "yes", "calibrated")])
def test_a_bad_placement_key_names_the_recipe(key, value, words):
    recipe = dict(load_recipe("mimo-tiny", "h100"), **{key: value})
    with pytest.raises(UserError, match=f"recipe {recipe['source']}.*{words}"):
        compile_steps(preset("mimo-tiny"), recipe, [1], max_seq_len=64)
