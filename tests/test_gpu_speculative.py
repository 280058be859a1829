"""DFlash speculative decoding on a real Hopper GPU (skipped without CUDA): the draft step's
megakernel against the DraftVM, and speculative decoding on the GPU against plain decoding,
greedy and sampled, for the carried trained pair and a random synthetic pair, through the
sliding-window rings of the target and the drafter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_cli import cli
from tests.test_pretrained import HELDOUT_PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (H100 / H200, sm_90a)")

PRETRAINED = Path(__file__).resolve().parents[1] / "model" / "pretrained" / "mimo-tiny-py"
NEW_TOKENS = 200  # past the target's ring (window 64) and the drafter's (128 + 14 slots)


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_spec") / "trained"
    assert cli("compile", "--model", PRETRAINED, "--draft", PRETRAINED / "draft", "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """mimo-tiny with random weights and a random drafter (block 4, window 12)."""
    from model.config import preset
    from model.dflash import DFlashConfig
    from model.dflash_checkpoint import save_drafter
    from tests.helpers import random_draft_weights

    root = tmp_path_factory.mktemp("gpu_spec_synth")
    cfg = preset("mimo-tiny")
    dcfg = DFlashConfig.tiny_for(cfg)
    save_drafter(dcfg, random_draft_weights(dcfg, seed=4), root / "draft")
    out = root / "art"
    assert cli("compile", "--model", "mimo-tiny", "--seed", 3, "--draft", root / "draft", "--out", out,
               "--steps", "1,4", "--max-seq-len", 512) == 0
    return out


def _prompt(art_path: Path) -> list[int]:
    from tilert.cli import _tokenizer

    tok = _tokenizer(Path(art_path) / "tokenizer.json")
    if tok is None:
        return [3, 1, 4, 1, 5, 9, 2, 6]
    return tok.encode(HELDOUT_PROMPTS[0]).ids[:40]


def _plain(art_path, prompt, temperature=0.0, seed=0):
    from tilert.artifact import read_artifact
    from tilert.megakernel import generate_megakernel

    return generate_megakernel(read_artifact(art_path), prompt, NEW_TOKENS, temperature, seed)


def _speculative(art_path, prompt, temperature=0.0, seed=0):
    from tilert.artifact import read_artifact
    from tilert.cli import generate_speculative

    return generate_speculative(read_artifact(art_path), prompt, NEW_TOKENS, temperature, seed, backend="megakernel")


def test_draft_megakernel_matches_the_draft_vm(trained):
    """Fresh random hidden states, appended round after round past the drafter's ring (and over
    a prompt longer than the block), with a rollback of B - 1 positions: the same drafts and
    logits as the DraftVM."""
    from tilert.artifact import load_draft_kernel, load_kernels, read_artifact
    from tilert.draft_gpu import DraftMegakernel
    from tilert.draft_vm import DraftVM
    from tilert.gpu import MegakernelRuntime

    art = read_artifact(trained)
    cubin, gen = load_draft_kernel(art)
    kernels = load_kernels(art)
    target = MegakernelRuntime({b: p for b, (p, _) in kernels.items()}, {b: g for b, (_, g) in kernels.items()},
                               {k: v for k, v in art.weights.items() if not k.startswith("draft.")}, art.max_seq_len)
    gpu = DraftMegakernel(cubin, gen, art.weights, art.max_seq_len, target=target)
    vm = DraftVM(art.draft_schedule, art.weights, art.max_seq_len)
    B = gpu.block_size
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    appends = [19] + [1 + i % B for i in range(40)]
    assert sum(appends) > gpu.slots
    hidden = torch.randn(sum(appends), gen.buffers["ctx_hidden"].shape[1], generator=g)
    tokens = torch.randint(0, gen.buffers["logits"].shape[1], (len(appends),), generator=g).tolist()
    at, worst = 0, 0.0
    for i, n in enumerate(appends):
        if i == 20:
            for r in (vm, gpu):
                r.truncate_context(r.context_len - (B - 1))
            at -= B - 1
            hidden = hidden.roll(3, dims=0) + 0.5
        want = vm.draft(tokens[i], hidden[at:at + n])
        got = gpu.draft(tokens[i], hidden[at:at + n].cuda())
        assert torch.isfinite(gpu.last_logits).all(), i
        worst = max(worst, rel_err(gpu.last_logits, vm.last_logits))
        assert got == want, (i, got, want)
        at += n
    print(f"draft megakernel vs DraftVM: {len(appends)} steps, worst logits rel err {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.parametrize("which", ["trained", "synthetic"])
def test_speculative_greedy_on_the_gpu_equals_plain_greedy(which, request):
    art = request.getfixturevalue(which)
    prompt = _prompt(art)
    plain = _plain(art, prompt)
    spec = _speculative(art, prompt)
    print(f"{which}: acceptance length {spec.acceptance_length:.2f} over {spec.rounds} rounds")
    assert spec.tokens == plain
    assert spec.drafted_rounds > 0
    if which == "trained":
        assert spec.acceptance_length > 2


def test_speculative_sampling_on_the_gpu_equals_plain_sampling(trained):
    prompt = _prompt(trained)
    for seed in (1, 2):
        plain = _plain(trained, prompt, temperature=0.8, seed=seed)
        spec = _speculative(trained, prompt, temperature=0.8, seed=seed)
        assert spec.tokens == plain, seed


def test_cli_runs_speculative_on_the_megakernel(trained, capsys):
    import json

    capsys.readouterr()
    assert cli("run", trained, "--prompt", "import os\n", "--max-new-tokens", 48, "--speculative",
               "--backend", "megakernel", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "megakernel" and len(out["tokens"]) == 48 and out["acceptance_length"] >= 1
