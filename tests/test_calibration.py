"""Measured corrections of the cost model (tilert/calibration.py): fitting them to a profile,
applying them in the simulator, and reading them back."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import preset
from tilert import calibration
from tilert.compiler import compile_steps
from tilert.cost import GPUS, estimate, op_role, task_time, task_times
from tilert.errors import UserError
from tilert.lower import load_recipe


@pytest.fixture(scope="module")
def tiny_schedule():
    cfg = preset("mimo-tiny")
    return compile_steps(cfg, load_recipe("mimo-tiny", "h100"), [1], max_seq_len=64)[1]


def fake_profile(schedule, factors: dict[str, float]) -> list[dict]:
    """Profile rows (integer ns, as the GPU's timer gives) whose task times are the model's
    times the role's factor."""
    g, gpu, rows, t0 = schedule.graph, GPUS["h100"], [], 0
    for i, t in enumerate(g.tasks):
        d = int(round(task_time(t, gpu) * factors.get(op_role(g, t), 1.0) * 1e9))
        rows.append({"task": i, "worker": 0, "wait": t0, "start": t0, "end": t0 + d})
        t0 += d
    return rows


@settings(max_examples=20, deadline=None)
@given(st.dictionaries(st.sampled_from(["q_proj", "attention", "lm_head", "expert_down", "topk", "rope"]),
                       st.floats(0.5, 20.0), min_size=1))
def test_fit_recovers_the_factors_of_a_profile(tiny_schedule, factors):
    fitted = calibration.fit(tiny_schedule, fake_profile(tiny_schedule, factors), GPUS["h100"])
    roles = {op_role(tiny_schedule.graph, t) for t in tiny_schedule.graph.tasks}
    assert set(fitted) == roles
    for role, f in fitted.items():
        assert f == pytest.approx(factors.get(role, 1.0), rel=1e-3)  # 1 ns of tasks >= 0.75 us


def test_factors_scale_the_tasks_and_the_simulated_step(tiny_schedule):
    g, gpu = tiny_schedule.graph, GPUS["h100"]
    slow = dataclasses.replace(gpu, calibration=(("attention", 4.0),))
    plain, scaled = task_times(g, gpu), task_times(g, slow)
    for i, t in enumerate(g.tasks):
        assert scaled[i] == pytest.approx(plain[i] * (4.0 if op_role(g, t) == "attention" else 1.0))
    everything = dataclasses.replace(gpu, calibration=tuple((r, 3.0) for r in {op_role(g, t) for t in g.tasks}))
    assert estimate(tiny_schedule, everything)["step_time_s"] > 2 * estimate(tiny_schedule, gpu)["step_time_s"]
    assert estimate(tiny_schedule, slow)["step_time_s"] > estimate(tiny_schedule, gpu)["step_time_s"]


def test_the_carried_calibrations_load_and_bad_files_are_refused(tmp_path, monkeypatch):
    for gpu in ("h100", "h200"):  # both measured (schedules/calibration.<gpu>.json)
        spec, doc = calibration.calibrated(gpu)
        assert spec.name == gpu and dict(spec.calibration) == doc["roles"] and doc["measured"]["commit"]
    monkeypatch.setattr(calibration, "SCHEDULES_DIR", tmp_path)
    assert calibration.calibrated("h200") is None  # nothing measured there
    (tmp_path / "calibration.h100.json").write_text("{not json")
    with pytest.raises(UserError, match="calibration.h100.json"):
        calibration.load("h100")
    (tmp_path / "calibration.h100.json").write_text(json.dumps({"roles": {"q_proj": -1}}))
    with pytest.raises(UserError, match="positive"):
        calibration.load("h100")


def test_inspect_shows_the_corrected_estimate_beside_the_plain_one(tmp_path, capsys):
    from tilert.cli import main

    out = tmp_path / "art"
    assert main(["compile", "--model", "mimo-tiny", "--layers", "2", "--schedule-only", "--no-kernel",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    doc = calibration.load("h100")
    assert "estimated step time" in text and "with measured per-op corrections" in text
    assert doc["measured"]["commit"] in text and doc["measured"]["device"] in text
    assert main(["inspect", str(out), "--json"]) == 0
    sm = json.loads(capsys.readouterr().out)
    assert sm["calibrated"]["step_time_s"] > sm["estimate"]["step_time_s"] > 0
