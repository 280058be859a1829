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
from tilert.cost import GPUS, estimate, op_role, simulate, task_time, task_times
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


# ---- the per-SM bandwidth cap (calibration.fit_sm_bw_cap, tools/fit_bandwidth_cap.py) ----

@pytest.fixture(scope="module")
def tiny_variants():
    """mimo-tiny steps of 1 and 2 tokens under three tile sizes: few tasks against 132 SMs, so
    how fast one SM may stream decides their simulated times."""
    from tilert.lower import recipe_with

    cfg, base = preset("mimo-tiny"), load_recipe("mimo-tiny", "h100")
    out = []
    for B in (1, 2):
        for rows in (16, 32, 64):
            recipe = recipe_with(recipe_with(base, "out_rows", rows), "workers", 132)
            out.append((B, compile_steps(cfg, recipe, [B], max_seq_len=64)[B]))
    return out


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(calibration.CAP_GRID), st.booleans())
def test_the_cap_fit_recovers_a_planted_cap(tiny_variants, planted, grouped):
    gpu = GPUS["h100"]
    truth = dataclasses.replace(gpu, sm_bw_cap=planted)
    steps = [calibration.StepTime(s, simulate(s, truth).step_time * 1e6, group=f"B{B}" if grouped else None)
             for B, s in tiny_variants]
    cap, table = calibration.fit_sm_bw_cap(steps, gpu)
    best = next(r for r in table if r["sm_bw_cap"] == cap)
    assert cap == planted and best["rms"] < 1e-9  # (on mimo-tiny every cap of the grid streams apart)
    assert best["terms"] == (len(steps) - 2 if grouped else len(steps))
    assert len(table) == len(calibration.CAP_GRID) and min(r["rms"] for r in table) == best["rms"]


def test_the_cap_fit_needs_something_to_fit(tiny_variants):
    lone = [calibration.StepTime(s, 10.0, group=f"g{i}") for i, (_, s) in enumerate(tiny_variants)]
    with pytest.raises(ValueError, match="no step to fit"):
        calibration.fit_sm_bw_cap(lone, GPUS["h100"])


def test_a_cap_at_or_above_one_leaves_the_schedulers_placement(tiny_variants):
    # The scheduler prices tasks with every worker streaming; with a worker on every SM a cap >= 1
    # never binds there.
    from tilert.scheduler import assign_workers

    g = tiny_variants[0][1].graph
    placements = {cap: assign_workers(g, 132, "list", dataclasses.replace(GPUS["h100"], sm_bw_cap=cap))
                  for cap in (1.0, 1.4, 3.0)}
    assert placements[1.0] == placements[1.4] == placements[3.0]


def test_with_fewer_workers_than_sms_the_cap_limits_each_workers_share():
    # 66 workers of 132 SMs: each would get hbm / 66 but streams at most cap x hbm / 132.
    g = dataclasses.replace(GPUS["h100"], sm_bw_cap=1.0)
    fair = g.hbm_bytes_per_s / g.num_sms
    assert g.sm_bandwidth(66) == pytest.approx(fair)
    assert dataclasses.replace(g, sm_bw_cap=3.0).sm_bandwidth(66) == pytest.approx(2 * fair)
    assert g.sm_bandwidth(132) == dataclasses.replace(g, sm_bw_cap=3.0).sm_bandwidth(132) == pytest.approx(fair)


def test_the_carried_h100_cap_is_applied_and_bad_caps_are_refused(tmp_path, monkeypatch):
    spec, doc = calibration.calibrated("h100")
    assert spec.sm_bw_cap == doc["sm_bw_cap"] >= 1.0 and doc["sm_bw_cap_fit"]["steps"] > 0
    monkeypatch.setattr(calibration, "SCHEDULES_DIR", tmp_path)
    for bad in (0.5, "fast", float("nan"), float("inf"), True):
        (tmp_path / "calibration.h100.json").write_text(json.dumps({"roles": {"q_proj": 1.0}, "sm_bw_cap": bad}))
        with pytest.raises(UserError, match=r"calibration.h100.json: sm_bw_cap must be a number >= 1"):
            calibration.load("h100")
    (tmp_path / "calibration.h100.json").write_text(json.dumps({"roles": {}, "sm_bw_cap": 1.2, "sm_bw_cap_fit": {}}))
    with pytest.raises(UserError, match=r"calibration.h100.json: sm_bw_cap_fit must name its sweep"):
        calibration.load("h100")


def test_fit_bandwidth_cap_tool_writes_the_cap_beside_the_factors(tmp_path, monkeypatch, capsys):
    from tools import fit_bandwidth_cap

    monkeypatch.setattr(calibration, "SCHEDULES_DIR", tmp_path)
    cal = {"gpu": "h100", "roles": {"attention": 2.0}, "measured": {"commit": "abc"}}
    (tmp_path / "calibration.h100.json").write_text(json.dumps(cal))
    sweep = {"gpu": "h100", "model": "mimo-tiny", "layers": 2, "context": 48, "expert_format": "bf16",
             "sets": [{"source": "test", "tokens": 1, "variants": [{"set": {}, "us": 40.0},
                                                                    {"set": {"out_rows": 64}, "us": 44.0}]}],
             "profiled": [{"source": "test", "step": "target", "tokens": 1, "set": {}, "us": 40.0}]}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    assert fit_bandwidth_cap.main([str(path), "--dry-run"]) == 0
    assert "sm_bw_cap" not in json.loads((tmp_path / "calibration.h100.json").read_text())
    assert fit_bandwidth_cap.main([str(path)]) == 0
    doc = json.loads((tmp_path / "calibration.h100.json").read_text())
    assert doc["roles"] == cal["roles"] and doc["measured"] == cal["measured"]  # the factors stay
    assert doc["sm_bw_cap"] in calibration.CAP_GRID and doc["sm_bw_cap_fit"]["steps"] == 3
    assert doc["sm_bw_cap_fit"]["sweep"] == str(path)  # outside the repository: as given
    # sweeps it cannot read: one clear error naming the file and the field, the calibration untouched
    before = (tmp_path / "calibration.h100.json").read_text()
    one = [{"set": {}, "us": 1.0}]
    for bad, words in [({**sweep, "sets": [{"tokens": 1, "variants": one}]}, "two or more variants"),
                       ({k: v for k, v in sweep.items() if k != "gpu"}, "missing gpu"),
                       ({**sweep, "gpu": "a100"}, "gpu 'a100'"),
                       ({**sweep, "model": "nope"}, "model 'nope'"),
                       ({**sweep, "profiled": [{**sweep["profiled"][0], "us": 0}]}, "profiled[0]: us must be a positive"),
                       ({**sweep, "profiled": [{**sweep["profiled"][0], "us": float("nan")}]}, "us must be a positive"),
                       ({**sweep, "profiled": [{**sweep["profiled"][0], "set": {"out_row": 64}}]}, "set names out_row"),
                       ({**sweep, "sets": [{"tokens": "x", "variants": one * 2}]}, "sets[0]: tokens must be"),
                       ({**sweep, "sets": [], "profiled": []}, "nothing to fit")]:
        path.write_text(json.dumps(bad))
        assert fit_bandwidth_cap.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert "sweep.json: not a readable sweep" in err and words in err, (words, err)
        assert (tmp_path / "calibration.h100.json").read_text() == before
    (tmp_path / "calibration.h100.json").unlink()
    path.write_text(json.dumps(sweep))
    assert fit_bandwidth_cap.main([str(path)]) == 2
    assert "calibration.h100.json: no calibration to add the cap to" in capsys.readouterr().err


def test_calibrate_cost_keeps_a_fitted_cap(tmp_path, monkeypatch, tiny_schedule):
    from tools import calibrate_cost

    monkeypatch.setattr(calibration, "SCHEDULES_DIR", tmp_path)
    fit_doc = {"sweep": "schedules/sweeps.h100.json", "steps": 3}
    (tmp_path / "calibration.h100.json").write_text(json.dumps({"roles": {"q_proj": 2.0}, "sm_bw_cap": 1.25,
                                                                "sm_bw_cap_fit": fit_doc}))
    cfg = preset("mimo-v2-flash", layers=1, expert_format="mxfp4")
    schedule = compile_steps(cfg, load_recipe("mimo-v2-flash", "h100"), [1], max_seq_len=64 + 8)[1]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"tasks": fake_profile(schedule, {"attention": 3.0})}))
    assert calibrate_cost.main([str(profile), "--layers", "1", "--context", "64", "--device", "x", "--commit", "c",
                                "--date", "d"]) == 0
    doc = json.loads((tmp_path / "calibration.h100.json").read_text())
    assert doc["sm_bw_cap"] == 1.25 and doc["sm_bw_cap_fit"] == fit_doc
    assert doc["roles"]["attention"] == pytest.approx(3.0, rel=1e-3) and "q_proj" in doc["roles"]
