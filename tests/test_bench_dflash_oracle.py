"""tools/bench_dflash_oracle.py on the CPU: the prescribed acceptance, the projection arithmetic,
and the whole oracle loop on the VM (the GPU run only adds timing)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import preset
from model.dflash import DFlashConfig
from tools.bench_dflash_oracle import main, oracle_commits, per_layer_projection


@given(tau=st.floats(1.0, 8.0), rounds=st.integers(1, 300))
@settings(max_examples=200, deadline=None)
def test_oracle_commits_keep_every_prefix_mean_at_tau(tau, rounds):
    commits = oracle_commits(tau, 8, rounds)
    assert len(commits) == rounds
    assert all(c in (math.floor(tau), math.ceil(tau)) and 1 <= c <= 8 for c in commits)
    for n in range(1, rounds + 1):  # a prefix of n rounds commits floor(n tau) tokens (rounding aside)
        assert abs(sum(commits[:n]) - n * tau) < 1 + 1e-6


def test_oracle_commits_refuse_an_acceptance_past_the_block():
    with pytest.raises(ValueError, match="outside 1..8"):
        oracle_commits(8.5, 8, 4)


def test_projection_extends_the_per_layer_slope():
    rows = [{"layers": 6, "plain_s": 1.0e-3, "verify_s": 4.0e-3, "draft_s": 2.0e-3, "host_round_s": 1e-4,
             "host_token_s": 5e-5},
            {"layers": 12, "plain_s": 1.6e-3, "verify_s": 6.4e-3, "draft_s": 2.0e-3, "host_round_s": 1e-4,
             "host_token_s": 5e-5}]
    p = per_layer_projection(rows, layers=48)
    assert p["plain_per_layer_s"] == pytest.approx(1e-4) and p["verify_per_layer_s"] == pytest.approx(4e-4)
    assert p["plain_s"] == pytest.approx(1.6e-3 + 36 * 1e-4)
    assert p["round_s"] == pytest.approx(2.0e-3 + 6.4e-3 + 36 * 4e-4 + 1e-4)
    assert p["oracle_tok_s"]["coding"] == pytest.approx(6.30 / p["round_s"])
    with pytest.raises(ValueError, match="two different depths"):
        per_layer_projection(rows[:1] * 2)


def test_flash_drafter_has_mimo_dflash_shape():
    d = DFlashConfig.flash_for(preset("mimo-v2-flash"))
    assert (d.num_layers, d.hidden_size, d.num_kv_heads, d.head_dim, d.block_size, d.sliding_window) == \
        (5, 4096, 8, 128, 8, 1024)
    assert d.target_layers == (0, 11, 23, 35, 47)  # shared/notes: MiMo's conditioning layers


def test_oracle_loop_on_the_vm_commits_the_prescribed_acceptance(tmp_path, capsys):
    out = tmp_path / "oracle.json"
    assert main(["--backend", "vm", "--new-tokens", "24", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    for name, o in row["oracle"].items():
        # 24 tokens in rounds of floor/ceil(tau): the measured mean is tau up to the last round's cut
        assert abs(o["acceptance_length"] - o["tau"]) < 0.5, (name, o)
        assert o["rounds"] == pytest.approx(24 / o["tau"], abs=1.5)
    assert "ORACLE" in capsys.readouterr().out
