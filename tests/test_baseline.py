"""The CUDA-graph baseline decoder computes what the reference decoder computes."""

from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.reference import ReferenceDecoder
from tests.helpers import random_weights
from tilert.baseline import StaticDecoder
from tilert.layout import runtime_weights


@pytest.mark.parametrize("experts", ["gather", "dense"])
def test_static_decoder_matches_reference(experts):
    cfg = preset("mimo-tiny")
    weights = random_weights(cfg, seed=4)
    tokens = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(1))
    want = ReferenceDecoder(cfg, weights, max_seq_len=64).forward(tokens)
    dec = StaticDecoder(cfg, runtime_weights(cfg, weights), 64, dtype=torch.float32, device="cpu",
                        experts=experts)
    got = torch.cat([dec.step(tokens[i:i + 1], torch.tensor([i])) for i in range(len(tokens))])
    assert float((got - want).norm() / want.norm()) < 1e-5
