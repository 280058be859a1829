"""End to end through the `tilert` command line: synth -> compile -> inspect -> run, the
artifact format, and every kind of bad input (exit 2, one clear message, nothing half-written).

Most commands run in-process through tilert.cli.main (fast); a few go through a real
`python -m tilert` subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tilert
from model.checkpoint import load_checkpoint
from model.config import preset
from model.reference import ReferenceDecoder, generate
from model.weights import BF16, FP8, FP32, MXFP4, StoredTensor
from tilert import artifact as art_mod
from tilert.artifact import read_artifact, write_artifact
from tilert.cli import chunks, main, reference_weights
from tilert.errors import UserError
from tilert.layout import runtime_weights

REPO = Path(__file__).resolve().parent.parent
PROMPT = [1, 5, 9, 33, 101, 7, 250, 3, 77, 12, 400]  # 11 tokens: one 8-token chunk, then 1s
N_NEW = 64


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def run_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert cli("run", *args, "--json") == 0
    return json.loads(capsys.readouterr().out)


def assert_user_error(capsys, args, *needles: str) -> str:
    """Exit 2, one `tilert: error: ...` line (the last on stderr; progress notes may precede
    it), no traceback.  Returns that line."""
    capsys.readouterr()
    assert cli(*args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("tilert: error: "), err
    assert sum(line.startswith("tilert: error") for line in lines) == 1, err
    assert "Traceback" not in err
    err = lines[-1]
    for n in needles:
        assert n.lower() in err.lower(), (n, err)
    return err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, leftovers


def make_tokenizer(path: Path) -> None:
    """A small byte-level BPE (vocabulary < mimo-tiny's 512) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<unk>", "<s>"])
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello tilert",
            "a tile is a task a worker runs"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    """`tilert synth` of mimo-tiny, plus a tokenizer.json."""
    out = work / "ckpt"
    assert cli("synth", "--preset", "mimo-tiny", "--out", out, "--seed", 3) == 0
    assert (out / "config.json").is_file()
    make_tokenizer(out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def art(work, ckpt) -> Path:
    """The synthesized checkpoint (with its tokenizer) compiled from its directory."""
    out = work / "art"
    assert cli("compile", "--model", ckpt, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def preset_art(work) -> Path:
    """`tilert compile --model mimo-tiny`: a preset, synthesized with seed 0."""
    out = work / "preset_art"
    assert cli("compile", "--model", "mimo-tiny", "--out", out) == 0
    return out


# ---- the main job -------------------------------------------------------------------------------

def test_vm_reproduces_reference_greedy_64_tokens(preset_art, capsys):
    """The acceptance test: the compiled schedule on the VM gives the reference decoder's greedy
    tokens exactly, for 64 new tokens on mimo-tiny."""
    ids = ",".join(map(str, PROMPT))
    vm = run_json(capsys, preset_art, "--prompt-ids", ids, "--max-new-tokens", N_NEW, "--backend", "vm")
    ref = run_json(capsys, preset_art, "--prompt-ids", ids, "--max-new-tokens", N_NEW, "--backend", "reference")
    assert len(vm["tokens"]) == N_NEW
    assert vm["tokens"] == ref["tokens"]
    assert vm["backend"] == "vm" and ref["backend"] == "reference"
    assert vm["prompt_tokens"] == len(PROMPT)
    assert vm["tokens_per_s"] > 0
    assert vm["text"] == " ".join(map(str, vm["tokens"]))  # no tokenizer: the ids

    # And the reference decoder on the checkpoint as loaded (not through the artifact's layout).
    from model.checkpoint import write_synthetic

    tmp = preset_art.parent / "tiny_seed0"
    write_synthetic(preset("mimo-tiny"), tmp, 0)
    cfg, weights = load_checkpoint(tmp)
    dec = ReferenceDecoder(cfg, weights, torch.float32, max_seq_len=len(PROMPT) + N_NEW)
    assert generate(dec, PROMPT, N_NEW) == vm["tokens"]


def test_sampling_agrees_across_backends(art, capsys):
    args = [art, "--prompt-ids", "4,8,15,16,23,42", "--max-new-tokens", 12, "--temperature", 0.9, "--seed", 7]
    vm = run_json(capsys, *args)
    ref = run_json(capsys, *args, "--backend", "reference")
    assert vm["tokens"] == ref["tokens"]
    greedy = run_json(capsys, *args[:5])
    assert greedy["tokens"] != vm["tokens"]  # the temperature did something


def test_adversarial_interleaving_gives_the_same_tokens(art, capsys):
    args = [art, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 4]
    assert run_json(capsys, *args, "--interleave", 11)["tokens"] == run_json(capsys, *args)["tokens"]


def test_quantized_experts_run_on_both_backends(work, capsys):
    out = work / "art_mxfp4"
    assert cli("compile", "--model", "mimo-tiny", "--layers", 2, "--quantize-experts", "mxfp4", "--out", out) == 0
    md = json.loads((out / "metadata.json").read_text())
    assert md["weights"]["model.layers.1.mlp.experts.down_proj"]["fmt"] == "mxfp4"
    assert md["config"]["expert_format"] == "mxfp4" and md["quantize_experts"] == "mxfp4"
    args = [out, "--prompt-ids", "3,1,4,1,5,9,2,6,5", "--max-new-tokens", 8]
    assert run_json(capsys, *args)["tokens"] == run_json(capsys, *args, "--backend", "reference")["tokens"]


def test_text_prompt_through_the_checkpoint_tokenizer(art, ckpt, capsys):
    from tokenizers import Tokenizer

    assert (art / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    out = run_json(capsys, art, "--prompt", "hello world, the quick fox", "--max-new-tokens", 5)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert out["prompt_tokens"] == len(tok.encode("hello world, the quick fox").ids)
    assert len(out["tokens"]) == 5
    assert out["text"] == tok.decode(out["tokens"])
    assert set(out) >= {"tokens", "text", "tokens_per_s", "backend", "prompt_tokens"}

    capsys.readouterr()
    assert cli("run", art, "--prompt", "hello", "--max-new-tokens", 2) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err


def test_artifact_layout_and_metadata(art):
    md = json.loads((art / "metadata.json").read_text())
    assert md["format_version"] == tilert.SCHEDULE_FORMAT_VERSION
    assert md["tool_version"] == tilert.__version__
    assert md["gpu"] == "h100" and md["max_seq_len"] == 4096 and md["steps"] == [1, 8]
    assert md["schedule_only"] is False
    assert md["config"] == preset("mimo-tiny").to_dict()
    assert md["recipe"]["workers"] >= 1
    assert md["created"] and md["source"]
    doc = json.loads((art / "schedule.json").read_text())
    assert doc["format_version"] == tilert.SCHEDULE_FORMAT_VERSION and set(doc["schedules"]) == {"1", "8"}
    files = sorted(p.relative_to(art).as_posix() for p in (art / "weights").iterdir())
    assert files and all(f in md["hashes"] for f in files)
    assert {"schedule.json", "tokenizer.json"} <= set(md["hashes"])
    # Stacked experts in the runtime layout, FP8 scales beside their data.
    name = "model.layers.1.mlp.experts.gate_proj"
    cfg = preset("mimo-tiny")
    assert md["weights"][name]["shape"] == [cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size]
    stored = load_file(str(art / md["weights"][name]["file"]))
    assert name in stored and name + ".scale" in stored
    assert not [p for p in art.parent.iterdir() if p.name.startswith(".art.")]


def test_inspect_tables_json_trace_plot(art, work, capsys):
    capsys.readouterr()
    assert cli("inspect", art) == 0
    text = capsys.readouterr().out
    for needle in ("estimated step time", "bandwidth floor", "critical path", "tasks per worker",
                   "bytes per op kind", "memory footprint", "KV cache", "layer0.q_proj"):
        assert needle in text, needle

    assert cli("inspect", art, "--json", "--step", 8) == 0
    sm = json.loads(capsys.readouterr().out)
    assert sm["step"] == 8 and sm["gpu"] == "h100"
    assert set(sm) >= {"model", "ops", "workers", "op_kinds", "estimate", "memory", "schedule"}
    e = sm["estimate"]
    assert e["step_time_s"] >= e["floor_s"] > 0 and e["ratio"] >= 1
    assert e["critical_path_s"] > 0 and e["critical_path_ops"][0] == "embed"
    assert sum(o["tasks"] for o in sm["ops"]) == sm["schedule"]["tasks"]
    assert sm["memory"]["kv_cache_bytes"] > 0 and sm["memory"]["weights_bytes"] > 0

    trace = work / "trace.json"
    assert cli("inspect", art, "--trace", trace, "--gpu", "h200") == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(ev["ph"] == "X" for ev in events) == json.loads(
        (art / "schedule.json").read_text())["schedules"]["1"]["graph"]["tasks"].__len__()

    pytest.importorskip("matplotlib")
    png = work / "timeline.png"
    assert cli("inspect", art, "--plot", png) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_subprocess(art):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "tilert", "run", str(art), "--prompt-ids", "1,2,3",
                        "--max-new-tokens", "3", "--json"], capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["tokens"]) == 3
    r = subprocess.run([sys.executable, "-m", "tilert", "run", str(art), "--prompt-ids", "1,2,3",
                        "--max-new-tokens", "5000"], capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("tilert: error: ") and "Traceback" not in r.stderr
    assert "max sequence length 4096" in r.stderr


def test_embedded_default_is_compiled_once_and_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TILERT_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert cli("run", "--max-new-tokens", 3, "--json") == 0
    first = capsys.readouterr()
    assert "compiling the embedded default" in first.err
    (cached,) = (tmp_path / "cache").glob(f"mimo-tiny-py-{tilert.__version__}-*")
    assert (cached / "metadata.json").is_file()
    assert json.loads(first.out)["text"]  # the carried trained model has a tokenizer: real text
    assert cli("run", "--max-new-tokens", 3, "--json") == 0
    second = capsys.readouterr()
    assert "compiling" not in second.err
    assert json.loads(second.out)["tokens"] == json.loads(first.out)["tokens"]


# ---- mimo-v2-flash geometry ---------------------------------------------------------------------

def test_flash_schedule_only_compiles_and_inspects(work, capsys):
    """All 48 layers of MiMo-V2-Flash at the default step sizes (1 and 8), geometry only.
    (About 40 s on a 2-core machine: it stays in the default run.)"""
    out = work / "flash"
    t0 = time.perf_counter()
    assert cli("compile", "--model", "mimo-v2-flash", "--schedule-only", "--out", out) == 0
    with capsys.disabled():
        print(f"\ntilert compile --model mimo-v2-flash --schedule-only: {time.perf_counter() - t0:.1f} s")
    assert not (out / "weights").exists()
    md = json.loads((out / "metadata.json").read_text())
    assert md["steps"] == [1, 8] and md["schedule_only"] and md["recipe"]["source"] == "mimo-v2-flash.h100.json"
    capsys.readouterr()
    assert cli("inspect", out) == 0
    text = capsys.readouterr().out
    assert "step of 1 token(s)" in text and "132 workers" in text
    assert "estimated step time" in text and "bandwidth floor" in text and "critical path" in text
    assert "does not fit on one card" in text  # 300+ GB of weights
    assert_user_error(capsys, ["run", out, "--prompt-ids", "1"], "schedule-only")


# ---- bad input ----------------------------------------------------------------------------------

def test_unknown_preset_or_model_path(work, capsys):
    out = work / "bad_preset"
    assert_user_error(capsys, ["compile", "--model", "mimo-v9-huge", "--out", out], "mimo-v9-huge", "mimo-tiny")
    assert_nothing_written(out)
    assert_user_error(capsys, ["synth", "--preset", "mimo-v9-huge", "--out", work / "bad_synth"], "unknown preset")
    assert_nothing_written(work / "bad_synth")


def _copy_ckpt(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def test_unknown_model_type(ckpt, work, capsys):
    bad = _copy_ckpt(ckpt, work / "ckpt_llama")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    out = work / "art_llama"
    assert_user_error(capsys, ["compile", "--model", bad, "--out", out], "model_type", "llama")
    assert_nothing_written(out)


def _shard(ckpt: Path) -> Path:
    files = sorted(ckpt.glob("*.safetensors"))
    assert len(files) == 1
    return files[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "missing_tensor", "extra_tensor",
                                    "misshaped_tensor"])
def test_broken_checkpoint(ckpt, work, capsys, damage):
    bad = _copy_ckpt(ckpt, work / f"ckpt_{damage}")
    shard = _shard(bad)
    if damage == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        needles = [shard.name]
    elif damage == "garbage_header":
        data = bytearray(shard.read_bytes())
        data[8:40] = b"\xff" * 32
        shard.write_bytes(bytes(data))
        needles = [shard.name]
    else:
        tensors = load_file(str(shard))
        name = "model.layers.0.self_attn.o_proj.weight"
        if damage == "missing_tensor":
            del tensors[name]
            needles = [name, "missing"]
        elif damage == "extra_tensor":
            tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(3, 3)
            needles = ["model.layers.0.mlp.surprise.weight", "unexpected"]
        else:
            tensors[name] = tensors[name][:, :-1].contiguous()
            needles = [name, "shape"]
        save_file(tensors, str(shard))
    out = work / f"art_{damage}"
    assert_user_error(capsys, ["compile", "--model", bad, "--out", out], *needles)
    assert_nothing_written(out)


def test_prompt_longer_than_max_seq_len(art, capsys):
    ids = ",".join(["5"] * 4090)
    assert_user_error(capsys, ["run", art, "--prompt-ids", ids, "--max-new-tokens", 10],
                      "4100 tokens", "max sequence length 4096")
    assert_user_error(capsys, ["run", art, "--prompt-ids", "1,2,9999"], "vocabulary")
    assert_user_error(capsys, ["run", art, "--prompt-ids", "1,x"], "--prompt-ids")


def test_prompt_text_without_tokenizer(preset_art, capsys):
    assert_user_error(capsys, ["run", preset_art, "--prompt", "hello"], "--prompt-ids")


def _copy_art(art: Path, dst: Path) -> Path:
    shutil.copytree(art, dst)
    return dst


@pytest.mark.parametrize("where", ["metadata.json", "schedule.json"])
def test_incompatible_format_version(art, work, capsys, where):
    bad = _copy_art(art, work / f"art_v99_{where}")
    d = json.loads((bad / where).read_text())
    d["format_version"] = tilert.SCHEDULE_FORMAT_VERSION + 98
    d["tool_version"] = "9.9.9"
    (bad / where).write_text(json.dumps(d))
    err = assert_user_error(capsys, ["run", bad, "--prompt-ids", "1,2"], "9.9.9", "recompile",
                            f"schedule format {tilert.SCHEDULE_FORMAT_VERSION + 98}",
                            f"reads format {tilert.SCHEDULE_FORMAT_VERSION}")
    assert where in err
    assert_user_error(capsys, ["inspect", bad], "recompile")


def test_tampered_files_fail_their_hash(art, work, capsys):
    bad = _copy_art(art, work / "art_tampered")
    sched = bad / "schedule.json"
    sched.write_text(sched.read_text().replace('"num_workers":8', '"num_workers":7', 1))
    assert_user_error(capsys, ["run", bad, "--prompt-ids", "1,2"], "schedule.json", "sha256")
    assert_user_error(capsys, ["inspect", bad], "sha256")

    bad = _copy_art(art, work / "art_tampered_weights")
    (shard,) = (bad / "weights").iterdir()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert_user_error(capsys, ["run", bad, "--prompt-ids", "1,2"], shard.name, "sha256")

    bad = _copy_art(art, work / "art_no_metadata")
    (bad / "metadata.json").unlink()
    assert_user_error(capsys, ["inspect", bad], "metadata.json", "missing")
    (bad / "metadata.json").write_text("{not json")
    assert_user_error(capsys, ["inspect", bad], "metadata.json", "corrupt")
    assert_user_error(capsys, ["inspect", work / "no_such_artifact"], "not an artifact directory")


def test_existing_output_dir(art, work, capsys):
    before = sorted(p.name for p in art.iterdir())
    stamp = (art / "metadata.json").read_text()
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", art], "already exists", "--force")
    assert sorted(p.name for p in art.iterdir()) == before
    assert (art / "metadata.json").read_text() == stamp

    other = work / "not_an_artifact"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--schedule-only", "--out", other, "--force"],
                      "not a tilert artifact")
    assert (other / "precious.txt").read_text() == "keep me"

    # --force replaces an artifact, only once the new one is complete.
    target = _copy_art(art, work / "art_force")
    assert cli("compile", "--model", "mimo-tiny", "--schedule-only", "--out", target, "--force") == 0
    assert json.loads((target / "metadata.json").read_text())["schedule_only"] is True
    assert not (target / "weights").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".art_force.")]


def test_other_bad_options(ckpt, work, capsys):
    out = work / "art_opts"
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--steps", "8"], "include 1")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--steps", "1,a"], "--steps")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--gpu", "a100"], "a100")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--max-seq-len", "4"], "--max-seq-len")
    assert_user_error(capsys, ["compile", "--model", ckpt, "--out", out, "--draft", ckpt], "dflash_config.json")
    assert_user_error(capsys, ["compile", "--model", "mimo-tiny", "--out", out, "--layers", "99"], "--layers")
    assert_nothing_written(out)
    capsys.readouterr()
    assert cli("compile", "--bogus") == 2  # argparse usage error
    assert "usage" in capsys.readouterr().err


def test_draft_is_carried_into_the_artifact(ckpt, work, capsys):
    import dataclasses

    from model.dflash import DFlashConfig
    from model.dflash_checkpoint import save_drafter
    from tests.helpers import random_draft_weights

    cfg = preset("mimo-tiny")
    dcfg = DFlashConfig.tiny_for(cfg)
    save_drafter(dcfg, random_draft_weights(dcfg, seed=1), work / "draft")
    out = work / "art_draft"
    assert cli("compile", "--model", ckpt, "--out", out, "--draft", work / "draft", "--steps", 1) == 0
    a = read_artifact(out)
    assert a.steps == sorted({1, dcfg.block_size})  # the verification step is compiled too
    assert a.draft_config["block_size"] == dcfg.block_size
    assert sorted(a.draft_weights) == sorted(random_draft_weights(dcfg, seed=1))
    assert not any(k.startswith("draft.") for k in reference_weights(a.cfg, a.weights))

    wide = dataclasses.replace(dcfg, hidden_size=2 * cfg.hidden_size)
    save_drafter(wide, random_draft_weights(wide, seed=1), work / "draft_wide")
    bad = work / "art_draft_wide"
    assert_user_error(capsys, ["compile", "--model", ckpt, "--out", bad, "--draft", work / "draft_wide"],
                      "does not fit", "hidden size")
    assert_nothing_written(bad)


def test_schedule_only_artifact_refuses_to_run(work, capsys):
    out = work / "tiny_sched_only"
    assert cli("compile", "--model", "mimo-tiny", "--schedule-only", "--out", out, "--layers", 2) == 0
    assert_user_error(capsys, ["run", out, "--prompt-ids", "1"], "schedule-only")
    with pytest.raises(UserError, match="schedule-only"):
        read_artifact(out)
    a = read_artifact(out, load_weights=False)
    assert a.weights is None and a.schedule_only and a.cfg.num_hidden_layers == 2


# ---- the artifact module ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_compiled():
    from tilert.compiler import compile_steps
    from tilert.lower import load_recipe

    cfg = preset("mimo-tiny", layers=2)
    return cfg, compile_steps(cfg, load_recipe("mimo-tiny", "h100"), [1], 64)


def test_failed_write_leaves_nothing(tiny_compiled, tmp_path, monkeypatch):
    cfg, schedules = tiny_compiled
    weights = {"w": StoredTensor(FP32, (2, 2), torch.ones(2, 2))}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(art_mod, "save_file", boom)
    out = tmp_path / "a"
    with pytest.raises(OSError, match="disk full"):
        write_artifact(out, cfg, schedules, weights, {"max_seq_len": 64})
    assert_nothing_written(out)

    # With force, a failed rewrite keeps the previous artifact intact.
    monkeypatch.undo()
    write_artifact(out, cfg, schedules, None, {"max_seq_len": 64, "gpu": "h100"})
    monkeypatch.setattr(art_mod, "save_file", boom)
    with pytest.raises(OSError):
        write_artifact(out, cfg, schedules, weights, {"max_seq_len": 64}, force=True)
    assert read_artifact(out, load_weights=False).schedule_only
    assert not [p for p in tmp_path.iterdir() if p.name != "a"]


def _stored(fmt: str, shape: tuple[int, ...], seed: int) -> StoredTensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return StoredTensor.from_float(w, fmt)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(st.sampled_from([FP32, BF16, FP8, MXFP4]), st.integers(1, 3), st.integers(1, 3)),
                      min_size=1, max_size=6),
       shard_bytes=st.integers(64, 4096))
def test_weights_round_trip_through_shards(tiny_compiled, tmp_path_factory, specs, shard_bytes):
    cfg, schedules = tiny_compiled
    weights = {f"t{i}.weight": _stored(fmt, (r * 8, c * 32), i) for i, (fmt, r, c) in enumerate(specs)}
    out = tmp_path_factory.mktemp("rt") / "a"
    write_artifact(out, cfg, schedules, weights, {"max_seq_len": 64, "gpu": "h100"}, shard_bytes=shard_bytes)
    index = json.loads((out / "metadata.json").read_text())["weights"]
    per_file: dict[str, list[str]] = {}
    for name, e in index.items():
        per_file.setdefault(e["file"], []).append(name)
    assert sorted(per_file) == sorted(f"weights/{p.name}" for p in (out / "weights").iterdir())
    for names in per_file.values():  # ~shard_bytes per file; a bigger tensor goes alone
        assert len(names) == 1 or sum(weights[n].nbytes for n in names) <= shard_bytes
    back = read_artifact(out).weights
    assert list(back) == list(weights)
    for name, t in weights.items():
        b = back[name]
        assert (b.fmt, b.shape) == (t.fmt, t.shape)
        assert torch.equal(b.data.view(torch.uint8) if b.data.dtype == torch.float8_e4m3fn else b.data,
                           t.data.view(torch.uint8) if t.data.dtype == torch.float8_e4m3fn else t.data)
        assert (b.scale is None) == (t.scale is None)
        if t.scale is not None:
            assert torch.equal(b.scale, t.scale)
        assert torch.equal(b.dequantize(), t.dequantize())


def test_reference_weights_invert_the_runtime_layout(ckpt):
    cfg, weights = load_checkpoint(ckpt)
    back = reference_weights(cfg, runtime_weights(cfg, weights))
    assert sorted(back) == sorted(weights)
    for name, t in weights.items():
        assert back[name].fmt == t.fmt and back[name].shape == t.shape
        assert torch.equal(back[name].dequantize(), t.dequantize()), name


@given(n=st.integers(0, 200), extra=st.lists(st.integers(2, 16), max_size=3))
def test_prefill_chunks_cover_the_prompt_largest_first(n, extra):
    steps = sorted({1, *extra})
    c = chunks(n, steps)
    assert sum(c) == n
    assert c == sorted(c, reverse=True)
    assert all(b in steps for b in c)
    # Greedy: never a run of small steps that one larger step could replace.
    for b in steps:
        smaller = sum(x for x in c if x < b)
        assert smaller < b


# ---- the GPU megakernel in the artifact ----------------------------------------------------------

def _has_nvcc() -> bool:
    from tilert.build import nvcc_path

    return nvcc_path() is not None


@pytest.fixture(scope="module")
def kernel_art(work) -> Path:
    """mimo-tiny compiled with its megakernels (and profiling cubins); requires nvcc when present."""
    out = work / "kernel_art"
    assert cli("compile", "--model", "mimo-tiny", "--out", out, "--profile-kernel") == 0
    return out


def test_compile_builds_the_megakernel_into_the_artifact(kernel_art):
    md = json.loads((kernel_art / "metadata.json").read_text())
    if not _has_nvcc():
        assert md["kernel"] is None and "nvcc" in md["kernel_skipped"]
        pytest.skip("nvcc not on PATH: the artifact records kernel: null")
    k = md["kernel"]
    assert k["arch"] == "sm_90a" and k["profile"] is True and set(k["steps"]) == {"1", "8"}
    for b, e in k["steps"].items():
        for rel in (e["cubin"], e["prof_cubin"], e["ptxas_log"]):
            assert (kernel_art / rel).is_file() and rel in md["hashes"], rel
        assert (kernel_art / e["cubin"]).read_bytes()[:4] == b"\x7fELF"
        assert (kernel_art / e["generated"] / "kernel.json").is_file()
        assert f"{e['generated']}/kernel.json" in md["hashes"]
        p = e["ptxas"]
        assert p["registers"] and p["registers"] <= 255 and p["spills"] <= 1024 and p["stack"] >= 0
        assert e["summary"].startswith(f"B={b} ")
    fp = k["footprint"]
    assert fp["weights_bytes"] > 0 and fp["kv_cache_bytes"] > 0 and fp["smem_per_cta"] > 0
    assert fp["gpu_memory_bytes"] == 80e9 and fp["fits"]
    # Hashes verified on read: a modified cubin is refused.
    a = read_artifact(kernel_art, load_weights=False)
    assert set(art_mod.load_kernels(a)) == {1, 8} and set(art_mod.load_kernels(a, profile=True)) == {1, 8}


def test_tampered_cubin_fails_its_hash(kernel_art, work, capsys):
    if not _has_nvcc():
        pytest.skip("needs nvcc")
    bad = _copy_art(kernel_art, work / "kernel_tampered")
    cubin = bad / "kernels" / "B1.cubin"
    data = bytearray(cubin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cubin.write_bytes(bytes(data))
    assert_user_error(capsys, ["inspect", bad], "B1.cubin", "sha256")


def test_inspect_shows_registers_and_gpu_footprint(kernel_art, capsys):
    if not _has_nvcc():
        pytest.skip("needs nvcc")
    capsys.readouterr()
    assert cli("inspect", kernel_art) == 0
    text = capsys.readouterr().out
    for needle in ("GPU megakernel", "registers", "spills", "smem/CTA", "KV cache state arena",
                   "weights (as stored on the GPU)", "shared memory per CTA", "one h100", "B=1 workers="):
        assert needle in text, needle
    assert cli("inspect", kernel_art, "--json") == 0
    k = json.loads(capsys.readouterr().out)["kernel"]
    assert k["built"] and k["steps"]["8"]["ptxas"]["registers"] > 0 and k["footprint"]["total_bytes"] > 0


def test_no_kernel_flag_and_missing_nvcc(work, capsys, monkeypatch):
    out = work / "no_kernel"
    assert cli("compile", "--model", "mimo-tiny", "--schedule-only", "--layers", 1, "--out", out, "--no-kernel") == 0
    md = json.loads((out / "metadata.json").read_text())
    assert md["kernel"] is None and md["kernel_skipped"] == "--no-kernel"
    assert not (out / "kernels").exists()
    import tilert.build

    monkeypatch.setattr(tilert.build, "nvcc_path", lambda: None)
    out2 = work / "no_nvcc"
    capsys.readouterr()
    assert cli("compile", "--model", "mimo-tiny", "--schedule-only", "--layers", 1, "--out", out2) == 0
    err = capsys.readouterr().err
    assert sum("warning" in line for line in err.splitlines()) == 1 and "nvcc" in err
    md = json.loads((out2 / "metadata.json").read_text())
    assert md["kernel"] is None and "nvcc" in md["kernel_skipped"]
    assert cli("inspect", out2) == 0
    assert "GPU megakernel" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_megakernel_backend_refuses_without_a_gpu(kernel_art, capsys):
    assert_user_error(capsys, ["run", kernel_art, "--prompt-ids", "1,2", "--backend", "megakernel"],
                      "CUDA GPU")
    assert_user_error(capsys, ["run", kernel_art, "--prompt-ids", "1", "--profile-out", "p.json"], "megakernel")


def test_trace_with_a_measured_profile_has_both_timelines(kernel_art, work, capsys):
    rows = [{"task": 0, "name": "embed", "worker": 0, "wait": 0, "start": 120, "end": 900},
            {"task": 1, "worker": 1, "wait": 50, "start": 400, "end": 1500},
            {"task": 2, "worker": 1, "wait": 1500, "start": 1500, "end": 2100}]
    prof = work / "profile.json"
    prof.write_text(json.dumps({"step": 1, "unit": "ns", "rows": rows}))
    trace = work / "measured_trace.json"
    assert cli("inspect", kernel_art, "--trace", trace, "--measured", prof) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(procs.values()) == ["measured", "simulated"]
    measured = [e for e in events if e["ph"] == "X" and procs[e["pid"]] == "measured" and e["cat"] != "wait"]
    assert len(measured) == 3 and measured[0]["ts"] == pytest.approx(0.12) and measured[0]["dur"] == pytest.approx(0.78)
    assert sum(e["ph"] == "X" and e["cat"] == "wait" for e in events) == 2  # tasks 0 and 1 waited
    simulated = [e for e in events if e["ph"] == "X" and procs[e["pid"]] == "simulated"]
    assert len(simulated) == len(read_artifact(kernel_art, load_weights=False).schedules[1].graph.tasks)
    # The measured profile is checked: a list of rows works too; wrong task ids and step sizes are refused.
    prof.write_text(json.dumps(rows))
    assert cli("inspect", kernel_art, "--trace", trace, "--measured", prof) == 0
    prof.write_text(json.dumps([{"task": 10**6, "worker": 0, "start": 0, "end": 1}]))
    assert_user_error(capsys, ["inspect", kernel_art, "--trace", trace, "--measured", prof], "task ids")
    prof.write_text(json.dumps({"step": 8, "rows": rows}))
    assert_user_error(capsys, ["inspect", kernel_art, "--trace", trace, "--measured", prof], "--step 8")
    assert_user_error(capsys, ["inspect", kernel_art, "--measured", prof], "--trace")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (H100 / H200, sm_90a)")
def test_megakernel_backend_matches_the_vm_greedy_64_tokens(kernel_art, work, capsys):
    vm = run_json(capsys, kernel_art, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW)
    mk = run_json(capsys, kernel_art, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW,
                  "--backend", "megakernel", "--profile-out", work / "mk_profile.json")
    assert mk["backend"] == "megakernel" and mk["tokens"] == vm["tokens"] and len(mk["tokens"]) == N_NEW
    rows = json.loads((work / "mk_profile.json").read_text())["rows"]
    assert rows and all(r["end"] >= r["start"] >= r["wait"] >= 0 for r in rows)
    trace = work / "mk_trace.json"
    assert cli("inspect", kernel_art, "--trace", trace, "--measured", work / "mk_profile.json") == 0
