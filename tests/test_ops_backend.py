"""The op-by-op TileLang baseline (tilert/ops_backend.py, tilert/tl_ops.py).

CPU: every op of the flash and tiny steps gets a kernel, bad steps are refused, and (where
TileLang and nvcc are installed) every kernel lowers and builds without spills.  GPU: decoding
with the baseline equals the VM step by step, across sliding-window ring wraps; its kernels come
from build/ops-cubins (tools/build_ops_kernels.py: the GPU machine has no TileLang) or are built
here when TileLang is installed.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint, write_synthetic
from model.config import preset
from tilert.compiler import compile_steps
from tilert.errors import UserError
from tilert.fusion import apply_fusions
from tilert.layout import runtime_weights
from tilert.lower import load_recipe, lower_step
from tilert.ops_backend import build_kernels, kernels_for, load_kernels, ops_step_graph, plan_step
from tilert.vm import VM

HAVE_TILELANG = importlib.util.find_spec("tilelang") is not None
HAVE_NVCC = shutil.which("nvcc") is not None
KERNELS = Path(__file__).resolve().parent.parent / "build" / "ops-cubins"
TINY_SEQ = 64


def tiny_plan(max_seq_len: int = TINY_SEQ, expert_format: str | None = None):
    cfg = preset("mimo-tiny", None, expert_format)
    graph = ops_step_graph(cfg, load_recipe(None, "h100"), max_seq_len)
    return cfg, graph, plan_step(graph, cfg)


@pytest.mark.parametrize("model,layers,fmt", [("mimo-tiny", None, None), ("mimo-v2-flash", 2, "mxfp4"),
                                              ("mimo-v2-flash", 2, "fp8")])
def test_every_op_gets_a_launch_with_every_buffer_bound(model, layers, fmt):
    cfg = preset(model, layers, fmt)
    graph = ops_step_graph(cfg, load_recipe(model if model != "mimo-tiny" else None, "h100"), 256)
    plan = plan_step(graph, cfg)
    assert {launch.op for launch in plan.launches} == {op.name for op in graph.ops}
    for launch in plan.launches:
        assert launch.kernel in plan.kernels
        for ref in launch.args.values():
            if ref.startswith("weight:"):
                assert ref.split(":")[1] in graph.buffers and graph.buffers[ref.split(":")[1]].kind == "weight"
            elif ref.startswith("extra:"):
                assert ref[len("extra:"):] in plan.extras
            else:
                assert ref in graph.buffers, ref
    # one kernel per distinct shape: the layers of one kind share theirs
    assert len(plan.kernels) < len(plan.launches)


def test_refuses_steps_it_cannot_run():
    cfg = preset("mimo-tiny")
    recipe = load_recipe(None, "h100")
    with pytest.raises(UserError, match="batch-1"):
        plan_step(lower_step(cfg, recipe, tokens=8, max_seq_len=64, max_tokens=8), cfg)
    fused = apply_fusions(lower_step(cfg, recipe, tokens=1, max_seq_len=64, max_tokens=1), recipe.get("fuse", []))
    if any(t.stages for t in fused.tasks):
        with pytest.raises(UserError, match="unfused"):
            plan_step(fused, cfg)


def test_missing_kernels_are_one_clear_error(tmp_path):
    _, _, plan = tiny_plan()
    with pytest.raises(UserError, match="no ops-baseline kernels"):
        load_kernels(plan, tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="lacks"):
        load_kernels(plan, tmp_path)


@pytest.mark.skipif(not (HAVE_TILELANG and HAVE_NVCC), reason="needs TileLang and nvcc")
def test_tiny_kernels_build_without_spills(tmp_path):
    _, _, plan = tiny_plan()
    built = build_kernels(plan, tmp_path, log=lambda *_: None)
    assert load_kernels(plan, tmp_path) == built
    for key, bk in built.items():
        report = bk.cubin.with_suffix(".ptxas.txt").read_text()
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
        assert spills and not any(spills), f"{key}: {report}"
    for launch in plan.launches:  # every kernel parameter is bound by its launch
        assert set(built[launch.kernel].params) <= set(launch.args)


def _kernels_for(plan):
    try:
        return kernels_for(plan, KERNELS)
    except UserError as e:
        pytest.skip(f"no ops-baseline kernels: {e}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (H100 / H200, sm_90a)")
@pytest.mark.parametrize("expert_format", ["fp8", "mxfp4"])
def test_ops_baseline_decodes_like_the_vm(tmp_path, expert_format):
    from tilert.ops_backend import OpsRuntime

    cfg, graph, plan = tiny_plan(expert_format=expert_format)
    write_synthetic(cfg, tmp_path / "ckpt", seed=7)
    cfg, weights = load_checkpoint(tmp_path / "ckpt")
    assert weights[next(n for n in weights if ".mlp.experts." in n)].fmt == expert_format
    weights = runtime_weights(cfg, weights)
    rt = OpsRuntime(cfg, graph, plan, _kernels_for(plan), weights, max_seq_len=TINY_SEQ)
    vm = VM(cfg, compile_steps(cfg, load_recipe(None, "h100"), [1], max_seq_len=TINY_SEQ), weights,
            max_seq_len=TINY_SEQ, device="cuda")
    token = 3
    for step in range(3 * cfg.sliding_window + 5):  # the sliding-window rings wrap several times
        want, want_tok = vm.step([token])
        got, got_tok = rt.step([token])
        assert torch.isfinite(got).all()
        err = float((got.double() - want.double().to(got.device)).norm() / want.double().norm())
        assert err < 1e-4, f"step {step}: rel err {err:.3g}"
        assert got_tok == want_tok, f"step {step}: token {got_tok} vs {want_tok}"
        token = want_tok[0]
    with pytest.raises(UserError, match="greedily"):
        rt.step([token], temperature=1.0)


def _compile_tiny(tmp_path, expert_format: str | None = None) -> Path:
    from tilert.cli import main

    ckpt = tmp_path / "ckpt"
    write_synthetic(preset("mimo-tiny", None, expert_format), ckpt, seed=3)
    art = tmp_path / "art"
    assert main(["compile", "--model", str(ckpt), "--out", str(art), "--max-seq-len", str(TINY_SEQ),
                 "--no-kernel"]) == 0
    return art


def test_run_backend_ops_refusals(tmp_path, capsys):
    from tilert.cli import main

    art = _compile_tiny(tmp_path)
    assert main(["run", str(art), "--prompt-ids", "1,2", "--backend", "ops", "--temperature", "0.7"]) != 0
    assert "decodes greedily" in capsys.readouterr().err
    assert main(["run", str(art), "--prompt-ids", "1,2", "--backend", "vm", "--ops-kernels", "x"]) != 0
    assert "--ops-kernels only applies" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", str(art), "--prompt-ids", "1,2", "--backend", "ops"]) != 0
        assert "CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (H100 / H200, sm_90a)")
def test_run_backend_ops_gives_the_vm_tokens(tmp_path, capsys):
    import json

    from tilert.cli import main

    art = _compile_tiny(tmp_path)
    _kernels_for(tiny_plan()[2])  # the artifact's step is mimo-tiny's at TINY_SEQ: these kernels
    common = ["run", str(art), "--prompt-ids", "5,6,7", "--max-new-tokens", "24", "--json"]
    assert main(common + ["--backend", "ops", "--ops-kernels", str(KERNELS)]) == 0
    ops = json.loads(capsys.readouterr().out)
    assert main(common + ["--backend", "vm"]) == 0
    vm = json.loads(capsys.readouterr().out)
    assert ops["tokens"] == vm["tokens"] and ops["backend"] == "ops"


def test_build_tool_plans_an_artifacts_step(tmp_path, monkeypatch):
    """tools/build_ops_kernels.py --artifact plans what `tilert run ART --backend ops` loads."""
    import tools.build_ops_kernels as tool

    art = _compile_tiny(tmp_path)
    seen = {}
    monkeypatch.setattr(tool, "build_kernels", lambda plan, out: seen.setdefault("plan", plan) and {})
    assert tool.main(["--artifact", str(art), "--out", str(tmp_path / "k")]) == 0
    assert set(seen["plan"].kernels) == set(tiny_plan()[2].kernels)
    assert tool.main(["--artifact", str(tmp_path / "missing")]) == 1
