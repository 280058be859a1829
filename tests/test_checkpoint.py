"""Checkpoint reading (hub, fused-QKV and transformers layouts) and writing (synth, transformers)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import checkpoint
from model.checkpoint import load_checkpoint, save_transformers_layout, write_synthetic
from model.config import preset
from model.formats import fp8
from model.weights import FP8, FP32, MXFP4, expected_tensors
from tilert.errors import UserError

TINY = preset("mimo-tiny")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_synthetic(TINY, out, seed=7, shard_bytes=150_000)  # several shards
    return out


@pytest.fixture(scope="module")
def tiny_weights(synth_dir):
    return load_checkpoint(synth_dir)[1]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _as_single_file(ckpt: Path, edit) -> None:
    """Rewrite a checkpoint as one model.safetensors after `edit(tensors)` changes the tensors."""
    tensors = {}
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (ckpt / checkpoint.INDEX_FILE).unlink(missing_ok=True)
    edit(tensors)
    save_file(tensors, ckpt / checkpoint.SINGLE_FILE)


def _assert_same_values(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].dequantize(), b[name].dequantize()), name


# ---- synth -> load ------------------------------------------------------------------------------

def test_synth_writes_sharded_hub_layout(synth_dir):
    shards = sorted(p.name for p in synth_dir.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((synth_dir / checkpoint.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" in index["weight_map"]
    assert json.loads((synth_dir / "config.json").read_text())["model_type"] == "mimo_v2_flash"


def test_synth_loads_every_expected_tensor(synth_dir, tiny_weights):
    cfg, _ = load_checkpoint(synth_dir)
    assert cfg == TINY
    specs = expected_tensors(TINY)
    assert set(tiny_weights) == {s.name for s in specs}
    for s in specs:
        t = tiny_weights[s.name]
        assert (t.fmt, t.shape) == (s.fmt, s.shape), s.name
        assert tuple(t.dequantize().shape) == s.shape
        assert torch.isfinite(t.dequantize()).all()


def test_synth_values_are_scaled_for_depth(tiny_weights):
    norm = tiny_weights["model.layers.0.input_layernorm.weight"].dequantize()
    assert 0.7 < norm.mean() < 1.3 and norm.std() > 0.01
    q = tiny_weights["model.layers.0.self_attn.q_proj.weight"].dequantize()
    assert 0.7 < q.std() * TINY.hidden_size**0.5 < 1.3  # ~ N(0, 1/in)
    bias = tiny_weights["model.layers.1.mlp.gate.e_score_correction_bias"].dequantize()
    assert bias.abs().max() < 0.1
    sink = tiny_weights["model.layers.1.self_attn.attention_sink_bias"].dequantize()
    assert sink.std() > 0.1


def test_synth_is_deterministic_in_the_seed(synth_dir, tiny_weights, tmp_path):
    write_synthetic(TINY, tmp_path / "same", seed=7)  # other sharding, same values
    _assert_same_values(tiny_weights, load_checkpoint(tmp_path / "same")[1])
    write_synthetic(TINY, tmp_path / "other", seed=8)
    other = load_checkpoint(tmp_path / "other")[1]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(other[name].dequantize(), tiny_weights[name].dequantize())


def test_synth_cut_model_keeps_the_same_first_layers(tiny_weights, tmp_path):
    write_synthetic(TINY.with_layers(2), tmp_path / "two", seed=7)
    cfg, two = load_checkpoint(tmp_path / "two")
    assert cfg.num_hidden_layers == 2
    for name, t in two.items():
        assert torch.equal(t.dequantize(), tiny_weights[name].dequantize()), name


def test_synth_mxfp4_experts(tmp_path):
    cfg = dataclasses.replace(TINY, expert_format="mxfp4")
    write_synthetic(cfg, tmp_path / "mx", seed=1)
    loaded_cfg, w = load_checkpoint(tmp_path / "mx")
    assert loaded_cfg.expert_format == "mxfp4"
    t = w["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert t.fmt == MXFP4 and t.data.shape == (64, 16) and t.scale.shape == (64, 1)
    assert t.rows(10, 20).shape == (10, 32)


def test_load_with_fewer_layers(synth_dir):
    cfg, w = load_checkpoint(synth_dir, layers=2)
    assert cfg.num_hidden_layers == 2
    assert set(w) == {s.name for s in expected_tensors(TINY.with_layers(2))}


# ---- other layouts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_layout_loads_to_the_same_model(tiny_weights, tmp_path, dtype):
    out = tmp_path / "tf"
    save_transformers_layout(TINY, tiny_weights, out, dtype=dtype)
    with safe_open(str(out / checkpoint.SINGLE_FILE), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.self_attn.sinks" in names
    assert not any(".experts.0." in n or "scale" in n for n in names)
    cfg, w = load_checkpoint(out)
    assert cfg.layer_types == TINY.layer_types and cfg.swa_num_kv_heads == TINY.swa_num_kv_heads
    if dtype == torch.float32:
        _assert_same_values(tiny_weights, w)  # fp32 holds every dequantized value exactly
        assert w["model.layers.0.self_attn.q_proj.weight"].fmt == FP32
    else:
        assert w["model.layers.0.self_attn.q_proj.weight"].fmt == "bf16"
        for name, t in w.items():
            assert torch.equal(t.dequantize(), tiny_weights[name].dequantize(torch.bfloat16).float()), name


def test_transformers_gate_up_rows_are_gate_then_up(tiny_weights, tmp_path):
    save_transformers_layout(TINY, tiny_weights, tmp_path / "tf")
    gate_up = load_file(tmp_path / "tf" / checkpoint.SINGLE_FILE)["model.layers.2.mlp.experts.gate_up_proj"]
    I = TINY.moe_intermediate_size
    assert torch.equal(gate_up[5, :I], tiny_weights["model.layers.2.mlp.experts.5.gate_proj.weight"].dequantize())
    assert torch.equal(gate_up[5, I:], tiny_weights["model.layers.2.mlp.experts.5.up_proj.weight"].dequantize())


def test_hub_names_with_float_tensors_load(synth_dir, tiny_weights, tmp_path):
    """transformers >= 5 save_pretrained writes hub names, dequantized, without scales."""
    ckpt = _copy(synth_dir, tmp_path)

    def dequantize_all(tensors):
        for name in list(tensors):
            if name.endswith(("_scale_inv", "_scale")):
                del tensors[name]
        for name, t in tiny_weights.items():
            tensors[name] = t.dequantize()

    _as_single_file(ckpt, dequantize_all)
    _assert_same_values(tiny_weights, load_checkpoint(ckpt)[1])


def _fuse(cfg, w, layer, pad: bool):
    """Per KV head [Q_i | K_i | V_i] rows (optionally padded to 128 rows) from split q/k/v."""
    p = f"model.layers.{layer}.self_attn"
    q, k, v = (w[f"{p}.{n}_proj.weight"].dequantize() for n in "qkv")
    kv, hd, vd = cfg.num_kv_heads(layer), cfg.head_dim, cfg.v_head_dim
    qg = cfg.num_attention_heads // kv * hd
    groups = []
    for g in range(kv):
        rows = torch.cat([q[g * qg:(g + 1) * qg], k[g * hd:(g + 1) * hd], v[g * vd:(g + 1) * vd]])
        if pad:
            rows = torch.cat([rows, torch.zeros(-rows.shape[0] % 128, rows.shape[1])])
        groups.append(rows)
    return groups


# A geometry where a per-group block grid and the plain grid differ in shape in every layer (for
# mimo-tiny's SWA layers they coincide, and the loader then reads the plain grid), and where each
# group's Q rows fill one whole 128-row block, as in MiMo-V2.5-Pro (16 heads x 192 = 24 blocks).
WIDE_HEADS = dataclasses.replace(
    TINY, num_attention_heads=8, head_dim=32, v_head_dim=16, ga_num_kv_heads=2, swa_num_kv_heads=2)


@pytest.fixture(scope="module")
def wide_heads_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "wide"
    write_synthetic(WIDE_HEADS, out, seed=3)
    return out


@pytest.mark.parametrize("grid", ["global", "per_group", "padded", "bf16"])
def test_fused_qkv_is_split(wide_heads_dir, tmp_path, grid):
    cfg = WIDE_HEADS
    ckpt = _copy(wide_heads_dir, tmp_path)
    split = load_checkpoint(wide_heads_dir)[1]
    expected = {}

    def fuse(tensors):
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}.self_attn"
            for n in "qkv":
                del tensors[f"{p}.{n}_proj.weight"], tensors[f"{p}.{n}_proj.weight_scale_inv"]
            groups = _fuse(cfg, split, i, pad=grid == "padded")
            if grid == "bf16":
                tensors[f"{p}.qkv_proj.weight"] = torch.cat(groups).bfloat16()
                deq = [g.bfloat16().float() for g in groups]
            elif grid == "global":
                q, s = fp8.quantize(torch.cat(groups))
                tensors[f"{p}.qkv_proj.weight"], tensors[f"{p}.qkv_proj.weight_scale_inv"] = q, s
                deq = list(fp8.dequantize(q, s).split(groups[0].shape[0]))
            else:  # one block grid per group
                parts = [fp8.quantize(g) for g in groups]
                tensors[f"{p}.qkv_proj.weight"] = torch.cat([q for q, _ in parts])
                tensors[f"{p}.qkv_proj.weight_scale_inv"] = torch.cat([s for _, s in parts])
                deq = [fp8.dequantize(q, s) for q, s in parts]
            kv, hd, vd = cfg.num_kv_heads(i), cfg.head_dim, cfg.v_head_dim
            qg = cfg.num_attention_heads // kv * hd
            expected[f"{p}.q_proj.weight"] = torch.cat([d[:qg] for d in deq])
            expected[f"{p}.k_proj.weight"] = torch.cat([d[qg:qg + hd] for d in deq])
            expected[f"{p}.v_proj.weight"] = torch.cat([d[qg + hd:qg + hd + vd] for d in deq])

    _as_single_file(ckpt, fuse)
    _, w = load_checkpoint(ckpt)
    assert set(w) == set(split)
    for name, want in expected.items():
        assert tuple(w[name].shape) == tuple(want.shape)
        assert torch.equal(w[name].dequantize(), want), name
    # Q of a group starts on a block boundary unless the grid is global: then q stays FP8.
    assert w["model.layers.0.self_attn.q_proj.weight"].fmt == {"bf16": "bf16", "global": FP32}.get(grid, FP8)


def test_per_head_fp8_grid_for_k_proj(synth_dir, tiny_weights, tmp_path):
    """k/v scale grids that restart at every head (reported for MiMo-V2-Flash)."""
    ckpt = _copy(synth_dir, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    heads = tiny_weights[name].dequantize().split(TINY.head_dim)
    parts = [fp8.quantize(h) for h in heads]

    def per_head(tensors):
        tensors[name] = torch.cat([q for q, _ in parts])
        tensors[name + "_scale_inv"] = torch.cat([s for _, s in parts])

    _as_single_file(ckpt, per_head)
    t = load_checkpoint(ckpt)[1][name]
    assert torch.equal(t.dequantize(), torch.cat([fp8.dequantize(q, s) for q, s in parts]))


def test_known_extras_are_ignored(synth_dir, tiny_weights, tmp_path):
    ckpt = _copy(synth_dir, tmp_path)

    def add(tensors):
        tensors["model.mtp.layers.0.enorm.weight"] = torch.ones(64)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(12)

    _as_single_file(ckpt, add)
    _assert_same_values(tiny_weights, load_checkpoint(ckpt)[1])


# ---- bad inputs: one UserError naming the culprit --------------------------------------------------

Q0 = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.2.input_layernorm.weight"


def _drop(name):
    def edit(t):
        del t[name]
    return edit


def _put(name, value):
    def edit(t):
        t[name] = value
    return edit


def _fused_experts(gate_up_rows=64, dtype=torch.float32):
    """Layer 1's experts in transformers' fused layout, possibly broken."""
    p = "model.layers.1.mlp.experts"

    def edit(t):
        for name in [n for n in t if n.startswith(p + ".")]:
            del t[name]
        t[p + ".gate_up_proj"] = torch.ones(8, gate_up_rows, 64).to(dtype)
        t[p + ".down_proj"] = torch.ones(8, 64, 32)
    return edit


@pytest.mark.parametrize("edit, pattern", [
    (_drop(NORM), rf"{NORM} \(shape \[64\]\) is missing"),
    (_drop(Q0 + "_scale_inv"), rf"{Q0} has no {Q0}_scale_inv"),
    (_put("model.layers.0.self_attn.bogus", torch.ones(3)), r"unexpected tensor model\.layers\.0\.self_attn\.bogus"),
    (_put(NORM, torch.ones(65, dtype=torch.bfloat16)), rf"{NORM}: expected shape \[64\], found \[65\]"),
    (_put(NORM, torch.ones(64, dtype=torch.int32)), rf"{NORM}: expected dtype .*found I32"),
    (_put(Q0, torch.zeros(96, 63).to(torch.float8_e4m3fn)), rf"{Q0}: expected shape \[96, 64\], found \[96, 63\]"),
    (_put(Q0 + "_scale_inv", torch.ones(2, 1)), rf"{Q0}_scale_inv: expected shape \[1, 1\] .*found \[2, 1\]"),
    (_fused_experts(gate_up_rows=63), r"experts\.gate_up_proj: expected shape \[8, 64, 64\], found \[8, 63, 64\]"),
    (_fused_experts(dtype=torch.int8), r"experts\.gate_up_proj: expected a float dtype .*found I8"),
])
def test_bad_tensors_raise_user_error(synth_dir, tmp_path, edit, pattern):
    ckpt = _copy(synth_dir, tmp_path)
    _as_single_file(ckpt, edit)
    with pytest.raises(UserError, match=pattern) as e:
        load_checkpoint(ckpt)
    assert str(ckpt) in str(e.value)


def test_truncated_shard(synth_dir, tmp_path):
    ckpt = _copy(synth_dir, tmp_path)
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"{shard}: not a readable safetensors file"):
        load_checkpoint(ckpt)


def test_garbage_shard(synth_dir, tmp_path):
    ckpt = _copy(synth_dir, tmp_path)
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match=str(shard)):
        load_checkpoint(ckpt)


def test_unknown_model_type(synth_dir, tmp_path):
    ckpt = _copy(synth_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config\.json: unknown model_type 'llama'"):
        load_checkpoint(ckpt)


def test_index_pointing_at_missing_shard(synth_dir, tmp_path):
    ckpt = _copy(synth_dir, tmp_path)
    index = json.loads((ckpt / checkpoint.INDEX_FILE).read_text())
    index["weight_map"][NORM] = "model-00009-of-00009.safetensors"
    (ckpt / checkpoint.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"{NORM} is mapped to model-00009-of-00009.safetensors, which does not exist"):
        load_checkpoint(ckpt)


def test_index_entry_not_in_its_shard(synth_dir, tmp_path):
    ckpt = _copy(synth_dir, tmp_path)
    index = json.loads((ckpt / checkpoint.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][NORM] = next(s for s in shards if s != index["weight_map"][NORM])
    (ckpt / checkpoint.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"{NORM} is mapped to .*which does not hold it"):
        load_checkpoint(ckpt)


def test_no_weights_at_all(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hub_config()))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


# ---- writing safely ---------------------------------------------------------------------------------

def test_synth_refuses_a_non_empty_out_dir(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=rf"{out}: already exists and is not an empty directory"):
        write_synthetic(TINY, out, seed=0)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_synth_into_an_empty_existing_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    write_synthetic(TINY.with_layers(1), tmp_path / "empty", seed=0)
    assert load_checkpoint(tmp_path / "empty")[0].num_hidden_layers == 1


def test_failed_synth_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic(TINY, tmp_path / "out", seed=0, shard_bytes=100_000)
    assert list(tmp_path.iterdir()) == []
