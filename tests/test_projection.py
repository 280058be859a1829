"""The multi-GPU projection: exact expert loads, bytes that reproduce the measured floors, and
the one-GPU case that reproduces the measured times it is built from."""

from __future__ import annotations

import itertools

import pytest

from tilert.projection import MEASURED, efficiencies, expected_max_load, project, projection_rows, table
from tools.project_multi_gpu import main


@pytest.mark.parametrize("experts, k, n", [(8, 3, 2), (8, 3, 4), (12, 4, 3), (6, 6, 2), (16, 2, 8)])
def test_expected_max_load_is_exact(experts, k, n):
    m = experts // n
    subsets = list(itertools.combinations(range(experts), k))
    brute = sum(max(sum(1 for e in s if e // m == r) for r in range(n)) for s in subsets) / len(subsets)
    assert expected_max_load(experts, k, n) == pytest.approx(brute, abs=1e-12)
    assert expected_max_load(experts, k, 1) == k


def test_bytes_reproduce_the_measured_floors():
    eff = efficiencies()
    for layers, nbytes in ((6, eff["bytes6"]), (12, eff["bytes12"])):
        assert nbytes / MEASURED["copy_bytes_per_s"] == pytest.approx(MEASURED["floor_s"][layers], rel=2e-3)


def test_one_gpu_reproduces_the_measurement_and_more_gpus_scale_down():
    one = project("mimo-v2-flash", 1, "h100")
    t6, t12 = MEASURED["step_s"][6], MEASURED["step_s"][12]
    assert one["compute_s"] == pytest.approx(t6 + 7 * (t12 - t6), rel=1e-9)  # 48 = 6 + 7 blocks of 6
    assert one["step_s"][3e-6] == one["compute_s"] and not one["fits"]
    eight = project("mimo-v2-flash", 8, "h100")
    assert eight["fits"] and 0 < eight["comm_s"][3e-6] < eight["comm_s"][10e-6]
    assert eight["floor_s"] < eight["compute_s"] < one["compute_s"] / 3
    assert eight["expert_load"] == pytest.approx(expected_max_load(256, 8, 8))
    h200 = project("mimo-v2-flash", 8, "h200")
    assert h200["step_s"] == eight["step_s"] and h200["floor_s"] < eight["floor_s"]


def test_tool_appends_a_labelled_projection(tmp_path, capsys):
    log = tmp_path / "BENCHMARKS.md"
    log.write_text("# Benchmark log\n")
    assert main(["--gpus", "1,8", "--append", str(log), "--commit", "abc1234", "--date", "2026-11-25"]) == 0
    text = log.read_text()
    assert text.startswith("# Benchmark log\n")
    assert "## 2026-11-25: PROJECTION (not a measurement)" in text and "commit abc1234" in text
    assert text.count("| MiMo-V2-Flash (48L) |") == 4 and text.count("| MiMo-V2.5-Pro (70L) |") == 4
    for line in table(projection_rows(counts=(8,))).splitlines():
        assert line in text
