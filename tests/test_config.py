"""config.json of either flavour (hub, transformers) reads into the same MimoConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.config import FULL, SLIDING, config_from_hf, preset
from tilert.errors import UserError

DATA = Path(__file__).parent / "data"
# Fields a config.json does not carry (storage formats tilert synthesizes with, the context limit).
NOT_IN_CONFIG = ("expert_format", "router_dtype", "max_position_embeddings", "bos_token_id", "eos_token_id")


def same_geometry(a, b) -> bool:
    da, db = a.to_dict(), b.to_dict()
    for k in NOT_IN_CONFIG:
        da.pop(k), db.pop(k)
    return da == db


@pytest.mark.parametrize("name", ["mimo-v2-flash", "mimo-v2.5-pro"])
def test_hub_config_reads_as_the_preset(name):
    # mimo-v2.5-pro: the hub's config.json as dumped from the repository (values verbatim);
    # mimo-v2-flash: reconstructed from loaders that read it (vLLM, sglang, Megatron-Bridge).
    cfg = config_from_hf(json.loads((DATA / f"{name}.hub-config.json").read_text()))
    assert same_geometry(cfg, preset(name))
    # The hub's sliding_window_size counts previous tokens only; ours counts the query too.
    assert cfg.sliding_window == 129


def test_transformers_config_reads_as_the_hub_one():
    cfg = preset("mimo-tiny")
    again = config_from_hf(cfg.to_transformers_config())
    assert same_geometry(again, cfg)
    assert same_geometry(config_from_hf(cfg.to_hub_config()), cfg)


def test_layer_types_follow_the_hub_pattern():
    cfg = preset("mimo-v2-flash")
    assert [i for i, t in enumerate(cfg.layer_types) if t == FULL] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert cfg.layer_types.count(SLIDING) == 39
    assert cfg.rotary_dim == 64 and cfg.num_kv_heads(0) == 4 and cfg.num_kv_heads(1) == 8


def test_unknown_model_type_is_named():
    with pytest.raises(UserError, match="unknown model_type 'llama'"):
        config_from_hf({"model_type": "llama", "num_hidden_layers": 2})


def test_layer_cut_keeps_the_first_layers():
    cfg = preset("mimo-v2-flash", layers=6)
    assert cfg.num_hidden_layers == 6 and cfg.layer_types[5] == FULL and not cfg.is_moe(0) and cfg.is_moe(5)
    with pytest.raises(UserError, match="--layers 49"):
        preset("mimo-v2-flash", layers=49)
