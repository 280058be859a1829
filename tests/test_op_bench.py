"""tools/op_bench.py and tilert/op_profile.py on the CPU: the one-layer cuts, the per-op summary of
a profile and the floor arithmetic (the GPU run itself is tools/op_bench.py on a device)."""

from __future__ import annotations

import pytest

from model.config import DENSE, FULL, SLIDING, SPARSE, preset
from tilert.compiler import compile_steps
from tilert.errors import UserError
from tilert.lower import load_recipe
from tilert.op_profile import op_kind, op_summary
from tools.op_bench import MEASURED, cut_config, op_rows, table


@pytest.mark.parametrize("model", ["mimo-v2-flash", "mimo-v2.5-pro"])
def test_cuts_are_one_layer_of_the_model(model):
    full = preset(model)
    dense, moe = cut_config(model, "dense"), cut_config(model, "moe", "mxfp4")
    assert (dense.layer_types, dense.mlp_layer_types) == ((FULL,), (DENSE,))
    assert (moe.layer_types, moe.mlp_layer_types, moe.expert_format) == ((SLIDING,), (SPARSE,), "mxfp4")
    for cut in (dense, moe):  # every shape of the real model kept
        assert (cut.hidden_size, cut.vocab_size, cut.n_routed_experts, cut.moe_intermediate_size) == \
            (full.hidden_size, full.vocab_size, full.n_routed_experts, full.moe_intermediate_size)
    with pytest.raises(UserError, match="unknown cut"):
        cut_config(model, "attention")


def test_op_summary_spans_and_floor_ratio():
    """Synthetic stamps on the moe cut's schedule: an op's span is its first start to its last
    end, its bytes the cost model's; the floor ratio is bytes / copy bandwidth / span."""
    cfg = cut_config("mimo-v2-flash", "moe")
    s = compile_steps(cfg, load_recipe("mimo-v2-flash", "h100"), [1], max_seq_len=136)[1]
    tasks = s.graph.tasks
    rows, at = [], 0
    for t in range(len(tasks)):  # every task 1 us after the previous one starts, 2 us long
        rows.append({"task": t, "wait": at, "start": at + 100, "end": at + 2100})
        at += 1000
    summary = op_summary(s, rows)
    kinds = {op_kind(s.graph.ops[t.op].name) for t in tasks}
    assert set(summary) == kinds and set(MEASURED["moe"]) <= kinds
    for kind, k in summary.items():
        mine = [r for r in rows if op_kind(s.graph.ops[tasks[r["task"]].op].name) == kind]
        assert k["tasks"] == len(mine) and k["layers"] == 1
        assert k["span_us"] == pytest.approx((max(r["end"] for r in mine) - min(r["start"] for r in mine)) / 1e3)
        assert k["wait_ns"] == 100 * len(mine) and k["mean_us"] == pytest.approx(2.0)
        assert k["bytes"] == sum(tasks[r["task"]].bytes for r in mine)
    ops = op_rows(summary, "moe", copy_bw=4e12)
    assert [o["op"] for o in ops] == list(MEASURED["moe"])
    for o in ops:
        k = summary[o["op"]]
        assert o["floor_us"] == pytest.approx(k["bytes"] / 4e12 * 1e6)
        assert o["of_copy_bw"] == pytest.approx(o["floor_us"] / k["span_us"])
    text = table([{"model": "mimo-v2-flash", "cut": "moe", "context": 128, "ops": ops}])
    assert text.count("\n") == len(ops) + 1 and "expert_gate_up" in text


def test_prebuild_covers_every_tool_of_a_device_round():
    """tools/prebuild_cubins.py: one job per distinct (source, build), the bench's per-depth
    caches named as tools/bench.py names them, plain and profiling builds of the op_bench cuts."""
    from tools.prebuild_cubins import jobs

    todo = jobs()
    assert len({(src, prof) for _, src, prof, _ in todo}) == len(todo)
    labels = {label for label, *_ in todo}
    for model in ("mimo-v2-flash", "mimo-v2.5-pro"):
        for cut in ("dense", "moe"):
            assert {f"{model} {cut}", f"{model} {cut} profiling"} <= labels
    subdirs = {d for *_, dirs in todo for d in dirs}
    assert subdirs == {f"L{layers}_C{ctx}" for layers in (6, 12) for ctx in (8192, 512)}
    assert "test 0 profiling" in labels and "flash 6L profiling" in labels


def test_op_kind_drops_the_layer_of_target_and_draft_ops():
    assert op_kind("layer3.q_proj") == "q_proj" and op_kind("lm_head") == "lm_head"
    assert op_kind("draft.layer3.q_proj") == "draft.q_proj" and op_kind("draft.fc") == "draft.fc"
