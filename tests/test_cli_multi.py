"""`tilert compile --gpus N`, `inspect` and `run` of a multi-GPU artifact, and its bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_cli import PROMPT, assert_nothing_written, assert_user_error, cli, run_json
from tilert.artifact import read_artifact

IDS = ",".join(map(str, PROMPT))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_multi")


@pytest.fixture(scope="module")
def art2(work) -> Path:
    out = work / "art2"
    assert cli("compile", "--model", "mimo-tiny", "--out", out, "--gpus", 2, "--max-seq-len", 256) == 0
    return out


def test_layout_one_artifact_per_rank_under_a_manifest(art2):
    manifest = json.loads((art2 / "manifest.json").read_text())
    assert manifest["gpus"] == 2 and manifest["kind"] == "multi-gpu" and manifest["steps"] == [1, 8]
    assert manifest["kernel"] is None and "communication tasks" in manifest["kernel_skipped"]
    assert sorted(p.name for p in art2.iterdir()) == ["manifest.json", "rank0", "rank1"]
    for r in (0, 1):
        rank = read_artifact(art2 / f"rank{r}")  # an ordinary artifact: hashes and all
        assert rank.meta["rank"]["rank"] == r and rank.cfg.num_attention_heads == 2  # 4 heads over 2 GPUs
        assert rank.schedules[1].meta["comm"]["remote_signals"]  # it signals the other GPU
        assert rank.weights["lm_head.weight"].shape == (256, 64)  # half the vocabulary


def test_vm_on_2_and_4_gpus_equals_reference_and_one_gpu(art2, work, capsys):
    args = ["--prompt-ids", IDS, "--max-new-tokens", 16]
    one = work / "one"
    assert cli("compile", "--model", "mimo-tiny", "--out", one, "--max-seq-len", 256, "--no-kernel") == 0
    expected = run_json(capsys, one, *args)["tokens"]
    assert run_json(capsys, art2, *args)["tokens"] == expected
    assert run_json(capsys, art2, *args, "--backend", "reference")["tokens"] == expected
    art4 = work / "art4"
    assert cli("compile", "--model", "mimo-tiny", "--out", art4, "--gpus", 4, "--max-seq-len", 256) == 0
    assert run_json(capsys, art4, *args, "--interleave", 5)["tokens"] == expected
    sampled = ["--temperature", 0.9, "--seed", 2]
    assert run_json(capsys, art4, *args, *sampled)["tokens"] == run_json(capsys, one, *args, *sampled)["tokens"]


def test_inspect_shows_every_rank_and_the_communication(art2, work, capsys):
    capsys.readouterr()
    assert cli("inspect", art2) == 0
    text = capsys.readouterr().out
    for needle in ("2 GPUs x 8 workers", "== partition ==", "== ranks ==", "== communication", "allreduce",
                   "allgather", "rank 0 tasks", "rank 1 tasks", "valid: no deadlock", "NVLink"):
        assert needle in text, needle
    assert cli("inspect", art2, "--json", "--step", 8, "--trace", work / "t.json") == 0
    sm = json.loads(capsys.readouterr().out)
    assert sm["gpus"] == 2 and sm["step"] == 8 and len(sm["ranks"]) == 2
    comm = [o for o in sm["ops"] if o["kind"] in ("allreduce", "allgather")]
    assert len(comm) == 2 * 4 + 1 and all(o["cross_gpu_waits"] > 0 for o in comm)
    assert all(r["link_bytes"] > 0 and r["cross_gpu_counters"] > 0 for r in sm["ranks"])
    trace = json.loads((work / "t.json").read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert "rank 1 worker 7" in names
    assert_user_error(capsys, ["inspect", art2, "--plot", work / "p.png"], "--plot", "multi-GPU")


def test_flash_geometry_on_8_gpus_schedule_only(work, capsys):
    out = work / "flash8"
    assert cli("compile", "--model", "mimo-v2-flash", "--schedule-only", "--layers", 1, "--steps", 1,
               "--gpus", 8, "--out", out) == 0
    capsys.readouterr()
    assert cli("inspect", out, "--json") == 0
    sm = json.loads(capsys.readouterr().out)
    # 4 global-attention KV heads on 8 GPUs: each held by two ranks; 8 query heads per rank.
    assert [r["slice"]["ga_kv_heads"] for r in sm["ranks"]] == [[g // 2, g // 2 + 1] for g in range(8)]
    assert all(r["slice"]["q_heads"][1] - r["slice"]["q_heads"][0] == 8 for r in sm["ranks"])
    assert_user_error(capsys, ["run", out, "--prompt-ids", "1"], "schedule-only")


def test_bad_gpu_counts_and_options(work, capsys):
    out = work / "bad"
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--gpus", 8],
                      "--gpus 8", "4 query heads")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--gpus", 3],
                      "--gpus 3", "query heads", "KV heads", "experts")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--gpus", 0], "--gpus 0")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--gpus", 2, "--profile-kernel"],
                      "--profile-kernel")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--gpus", 2, "--draft", work],
                      "--draft", "not partitioned")
    assert_nothing_written(out)


def test_run_refusals(art2, work, capsys):
    assert_user_error(capsys, ["run", art2, "--prompt-ids", IDS, "--backend", "megakernel"],
                      "split over 2 GPUs", "--backend vm")
    assert_user_error(capsys, ["run", art2 / "rank1", "--prompt-ids", IDS], "rank 1 of a 2-GPU artifact",
                      str(art2))
    assert_user_error(capsys, ["inspect", art2 / "rank0"], "rank 0 of a 2-GPU artifact")
    assert_user_error(capsys, ["run", art2, "--prompt-ids", IDS, "--max-new-tokens", 300], "max sequence length")


def test_tampered_rank_and_force(art2, work, capsys):
    bad = work / "tampered"
    shutil.copytree(art2, bad)
    sched = bad / "rank1" / "schedule.json"
    sched.write_text(sched.read_text().replace('"remote_signals":[[', '"remote_signals":[[0,0,0],[', 1))
    assert_user_error(capsys, ["run", bad, "--prompt-ids", IDS], "schedule.json", "sha256")
    (bad / "rank0" / "metadata.json").write_text("{}")
    assert_user_error(capsys, ["inspect", bad], "rank0/metadata.json", "sha256")
    # --force replaces a multi-GPU artifact (with a single-GPU one here), only once complete.
    assert cli("compile", "--model", "mimo-tiny", "--schedule-only", "--out", bad, "--force", "--no-kernel") == 0
    assert (bad / "metadata.json").is_file() and not (bad / "manifest.json").exists()
