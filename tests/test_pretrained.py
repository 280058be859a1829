"""The carried tiny pretrained pair (model/pretrained/mimo-tiny-py, made by tools/train_tiny.py).

It loads through the same checkpoint path as any model, has a tokenizer, writes Python-like text
greedily, and its DFlash drafter loads and speeds greedy decoding up without changing a token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import load_checkpoint
from model.config import FULL, SLIDING
from model.dflash import DFlashDrafter
from model.dflash_checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_drafter
from model.reference import ReferenceDecoder, generate
from model.weights import BF16, FP8, FP32
from tilert.errors import UserError
from tools.speculative_eval import speculative_generate

PRETRAINED = Path(__file__).resolve().parents[1] / "model" / "pretrained" / "mimo-tiny-py"
# Python the tokenizer and target were not trained on (the stdlib's held-out files are not
# carried; this is new text in the same style).
HELDOUT_PROMPTS = [
    "def read_config(path):\n    with open(path) as f:\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n    if len(argv) < 2:\n",
]


@pytest.fixture(scope="module")
def pair():
    from tokenizers import Tokenizer

    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg, weights = load_checkpoint(PRETRAINED)
    tok = Tokenizer.from_file(str(PRETRAINED / "tokenizer.json"))
    dcfg, dweights = load_drafter(PRETRAINED / "draft")
    target = ReferenceDecoder(cfg, weights, torch.float32, max_seq_len=512)
    drafter = DFlashDrafter(dcfg, dweights, weights["model.embed_tokens.weight"], weights["lm_head.weight"],
                            max_context=512)
    return cfg, weights, tok, dcfg, target, drafter


def test_small_files():
    files = [p for p in PRETRAINED.rglob("*") if p.is_file()]
    assert {p.relative_to(PRETRAINED).as_posix() for p in files} >= {
        "config.json", "model.safetensors", "tokenizer.json", "draft/dflash_config.json", "draft/model.safetensors"}
    assert sum(p.stat().st_size for p in files) < 6_000_000


def test_target_is_a_hub_checkpoint_with_every_feature(pair):
    cfg, weights, tok, *_ = pair
    hub = json.loads((PRETRAINED / "config.json").read_text())
    assert hub["model_type"] == "mimo_v2_flash" and "hybrid_layer_pattern" in hub  # the hub flavour
    assert cfg.vocab_size == tok.get_vocab_size()
    assert {FULL, SLIDING} <= set(cfg.layer_types)
    assert cfg.swa_num_kv_heads == 2 * cfg.ga_num_kv_heads
    assert cfg.head_dim != cfg.v_head_dim and 0 < cfg.rotary_dim < cfg.head_dim
    assert cfg.swa_sinks and not cfg.ga_sinks and cfg.attention_value_scale != 1.0
    assert not cfg.is_moe(0) and all(cfg.is_moe(i) for i in range(1, cfg.num_hidden_layers))
    assert cfg.sliding_window < 256  # generation runs past the window
    # Stored like the hub: FP8 block-scaled projections and experts, bf16 embeddings, fp32 router.
    assert weights["model.layers.1.self_attn.q_proj.weight"].fmt == FP8
    assert weights["model.layers.1.mlp.experts.0.gate_proj.weight"].fmt == FP8
    assert weights["model.layers.0.mlp.down_proj.weight"].fmt == FP8
    assert weights["model.embed_tokens.weight"].fmt == BF16
    assert weights["model.layers.1.self_attn.o_proj.weight"].fmt == BF16
    assert weights["model.layers.1.mlp.gate.weight"].fmt == FP32
    bias = weights["model.layers.1.mlp.gate.e_score_correction_bias"].dequantize()
    assert bias.abs().max() > 0  # trained with the aux-loss-free balancing update


def test_greedy_generation_is_python_like(pair):
    _, _, tok, _, target, _ = pair
    # (A prompt ending in a space, like "def ", starts with a token BPE rarely produced in training.)
    for prompt in ("def __init__(self", "import os\n"):
        new = generate(target, tok.encode(prompt).ids, 48)
        text = tok.decode(new)
        assert len(set(new)) >= 6, text  # not one token repeated
        assert any(word in text for word in ("self", "return", "import", "(", "=")), text


def test_drafter_fits_the_target(pair):
    cfg, _, _, dcfg, *_ = pair
    assert dcfg.hidden_size == cfg.hidden_size and dcfg.vocab_size == cfg.vocab_size
    assert all(0 <= layer < cfg.num_hidden_layers for layer in dcfg.target_layers)
    assert dcfg.block_size >= 4


def test_speculative_greedy_equals_plain_greedy(pair):
    _, _, tok, dcfg, target, drafter = pair
    commits = []
    for prompt in ["def __init__(self"] + HELDOUT_PROMPTS:
        ids = tok.encode(prompt).ids
        plain = generate(target, ids, 32)
        spec = speculative_generate(target, drafter, ids, 32)
        assert spec.tokens == plain, prompt
        assert all(1 <= c <= dcfg.block_size for c in spec.commits)
        commits += spec.commits
    # The drafter is useful: well over one token per target forward.
    assert sum(commits) / len(commits) > 1.5


def test_load_drafter_rejects_bad_files(tmp_path):
    bad = tmp_path / "draft"
    shutil.copytree(PRETRAINED / "draft", bad)
    tensors = load_file(str(bad / WEIGHTS_FILE))
    tensors.pop("mask_embedding")
    save_file(tensors, str(bad / WEIGHTS_FILE))
    with pytest.raises(UserError, match="mask_embedding"):
        load_drafter(bad)
    tensors["mask_embedding"] = torch.zeros(3)
    save_file(tensors, str(bad / WEIGHTS_FILE))
    with pytest.raises(UserError, match="expected shape"):
        load_drafter(bad)
    (bad / CONFIG_FILE).write_text("{}")
    with pytest.raises(UserError, match="missing required"):
        load_drafter(bad)
    with pytest.raises(UserError, match="no dflash_config.json"):
        load_drafter(tmp_path)
