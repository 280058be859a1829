"""`tilert compile --draft`, `run --speculative`, `inspect --speculative` through the command line:
acceptance length of the carried trained pair, the same tokens as plain decoding, and clear
refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import tilert
from tests.test_cli import assert_user_error, cli, run_json
from tests.test_pretrained import HELDOUT_PROMPTS
from tilert.artifact import read_artifact

PRETRAINED = Path(__file__).resolve().parents[1] / "model" / "pretrained" / "mimo-tiny-py"


@pytest.fixture(scope="module")
def spec_art(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_spec") / "trained"
    assert cli("compile", "--model", PRETRAINED, "--draft", PRETRAINED / "draft", "--out", out) == 0
    return out


def strip_draft_schedule(art: Path) -> None:
    """Make `art` look like an artifact compiled before draft schedules existed."""
    doc = json.loads((art / "schedule.json").read_text())
    del doc["draft"]
    data = json.dumps(doc, separators=(",", ":")).encode()
    (art / "schedule.json").write_bytes(data)
    md = json.loads((art / "metadata.json").read_text())
    md["hashes"]["schedule.json"] = hashlib.sha256(data).hexdigest()
    (art / "metadata.json").write_text(json.dumps(md))


def test_trained_pair_acceptance_length_on_a_held_out_prompt(spec_art, capsys):
    args = [spec_art, "--prompt", HELDOUT_PROMPTS[0], "--max-new-tokens", 64]
    spec = run_json(capsys, *args, "--speculative")
    plain = run_json(capsys, *args)
    assert spec["tokens"] == plain["tokens"] and len(spec["tokens"]) == 64
    per_round = spec["accepted_per_round"]
    assert spec["rounds"] == len(per_round) and all(1 <= n <= 8 for n in per_round)
    assert spec["acceptance_length"] == pytest.approx(sum(per_round) / len(per_round))
    assert 63 <= sum(per_round) < 63 + 8  # the prefill gives the first token; the last round may overshoot
    assert spec["acceptance_length"] > 2
    assert spec["tokens_per_s"] > 0 and spec["backend"] == "vm"
    # The reference backend drafts and verifies the same way; sampling too gives plain's tokens.
    ref = run_json(capsys, *args, "--speculative", "--backend", "reference")
    assert ref["tokens"] == spec["tokens"] and ref["accepted_per_round"] == per_round
    sampled = [*args[:3], "--max-new-tokens", 24, "--temperature", 0.8, "--seed", 3]
    assert run_json(capsys, *sampled, "--speculative")["tokens"] == run_json(capsys, *sampled)["tokens"]


def test_speculative_text_output_reports_rounds(spec_art, capsys):
    capsys.readouterr()
    assert cli("run", spec_art, "--prompt", "import os\n", "--max-new-tokens", 12, "--speculative",
               "--interleave", 4) == 0
    err = capsys.readouterr().err
    assert "accepted per round:" in err and "acceptance length" in err and "tokens/s" in err


def test_inspect_shows_the_draft_and_verify_steps(spec_art, capsys):
    capsys.readouterr()
    assert cli("inspect", spec_art) == 0
    assert "drafter   DFlash, 2 layers, block 8" in capsys.readouterr().out
    assert cli("inspect", spec_art, "--speculative", "--top", 0) == 0
    text = capsys.readouterr().out
    for needle in ("DFlash draft step (block of 8", "verify step (8 tokens", "draft.layer1.attention",
                   "draft.lm_head", "layer3.capture", "estimated step time", "tasks per worker"):
        assert needle in text, needle
    assert cli("inspect", spec_art, "--speculative", "--json") == 0
    sm = json.loads(capsys.readouterr().out)
    a = read_artifact(spec_art, load_weights=False)
    assert sm["draft"]["schedule"]["tasks"] == len(a.draft_schedule.graph.tasks)
    assert sm["verify"]["schedule"]["tasks"] == len(a.schedules[8].graph.tasks)
    assert sm["draft"]["drafter"]["block_size"] == 8
    assert_user_error(capsys, ["inspect", spec_art, "--speculative", "--step", 1], "--speculative")


def test_the_artifact_carries_the_draft_schedule(spec_art):
    a = read_artifact(spec_art, load_weights=False)
    assert a.steps == [1, 8] and a.draft_schedule is not None
    assert a.draft_schedule.meta["draft"] and a.draft_schedule.meta["context_rows"] == 8
    assert all("hidden" in s.graph.buffers for s in a.schedules.values())
    md = json.loads((spec_art / "metadata.json").read_text())
    assert md["draft"]["context_rows"] == 8
    from tilert.build import nvcc_path
    if nvcc_path():  # the target steps' capture tasks have a GPU kernel, and so has the draft step
        assert md["kernel"] is not None and sorted(md["kernel"]["steps"]) == ["1", "8"]
        assert md["kernel"]["draft"]["cubin"] == "kernels/draft.cubin" and md["kernel"]["draft_skipped"] is None
        assert (spec_art / "kernels" / "draft.cubin").is_file()
        assert md["kernel"]["footprint"]["draft_bytes"] > 0
    else:
        assert md["kernel"] is None and "nvcc" in md["kernel_skipped"]


def test_speculative_refusals(spec_art, tmp_path, capsys):
    plain = tmp_path / "plain"
    assert cli("compile", "--model", "mimo-tiny", "--layers", 2, "--out", plain, "--no-kernel") == 0
    assert_user_error(capsys, ["run", plain, "--prompt-ids", "1,2", "--speculative"], "--draft")
    assert_user_error(capsys, ["inspect", plain, "--speculative"], "--draft")
    no_kernel = tmp_path / "no_kernel"
    assert cli("compile", "--model", PRETRAINED, "--draft", PRETRAINED / "draft", "--out", no_kernel,
               "--no-kernel") == 0
    assert_user_error(capsys, ["run", no_kernel, "--prompt-ids", "1,2", "--speculative", "--backend", "megakernel"],
                      "draft step", "--no-kernel")
    import torch

    if not torch.cuda.is_available():
        assert_user_error(capsys, ["run", spec_art, "--prompt-ids", "1,2", "--speculative", "--backend",
                                   "megakernel"], "CUDA GPU")
    # An artifact compiled before draft schedules existed: refused with the fix, plain runs still work.
    import shutil

    old = tmp_path / "old"
    shutil.copytree(spec_art, old)
    strip_draft_schedule(old)
    assert_user_error(capsys, ["run", old, "--prompt-ids", "1,2", "--speculative"], "draft schedule", "recompile")
    assert_user_error(capsys, ["inspect", old, "--speculative"], "draft schedule", "recompile")
    assert len(run_json(capsys, old, "--prompt-ids", "1,2", "--max-new-tokens", 3)["tokens"]) == 3


def test_embedded_default_runs_speculatively_and_recompiles_a_stale_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TILERT_CACHE", str(tmp_path / "cache"))
    out = run_json(capsys, "--max-new-tokens", 16, "--speculative")
    assert out["acceptance_length"] >= 1 and len(out["tokens"]) == 16
    (cached,) = (tmp_path / "cache").glob(f"mimo-tiny-py-{tilert.__version__}-*")
    strip_draft_schedule(cached)  # as cached by a tilert without draft schedules
    capsys.readouterr()
    assert cli("run", "--max-new-tokens", 16, "--speculative", "--json") == 0
    again = capsys.readouterr()
    assert "compiling the embedded default" in again.err
    assert json.loads(again.out)["tokens"] == out["tokens"]
