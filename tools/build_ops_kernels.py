"""Build the op-by-op TileLang baseline's kernels (`--backend ops`) on this machine, for a GPU
machine without TileLang: lowers every kernel of the step to CUDA, builds the cubins with nvcc
and writes OUT/manifest.json (tilert.ops_backend.load_kernels reads it).

    python tools/build_ops_kernels.py --model mimo-v2-flash --layers 6 --max-seq-len 8200 --out build/ops-cubins
    python tools/build_ops_kernels.py --artifact ART --out build/ops-cubins   # for `tilert run ART --backend ops`

The kernels depend on the shapes: build for the same model, layers, expert format and max
sequence length the run uses (tools/bench.py runs context + 8).  Several calls may share OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import preset  # noqa: E402
from tilert.errors import UserError  # noqa: E402
from tilert.lower import load_recipe  # noqa: E402
from tilert.ops_backend import artifact_plan, build_kernels, ops_step_graph, plan_step  # noqa: E402


def build(model: str, layers: int | None, expert_format: str | None, max_seq_len: int, out: str, gpu: str = "h100"):
    cfg = preset(model, layers, expert_format)
    recipe = load_recipe(model if model.startswith("mimo-v2") else None, gpu)
    plan = plan_step(ops_step_graph(cfg, recipe, max_seq_len), cfg)
    return plan, build_kernels(plan, out)


def build_for_artifact(path: str, out: str):
    """The kernels `tilert run ART --backend ops` needs: the artifact's config, recipe and max sequence length."""
    from tilert.artifact import read_artifact

    _, plan = artifact_plan(read_artifact(Path(path), load_weights=False))
    return plan, build_kernels(plan, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mimo-v2-flash")
    ap.add_argument("--layers", default="6", help="comma-separated layer counts")
    ap.add_argument("--expert-format", default="mxfp4")
    ap.add_argument("--max-seq-len", default="8200", help="comma-separated")
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--artifact", help="build for a compiled artifact instead (its model, recipe and max_seq_len)")
    ap.add_argument("--out", default="build/ops-cubins")
    args = ap.parse_args(argv)
    try:
        if args.artifact:
            plan, built = build_for_artifact(args.artifact, args.out)
            print(f"{args.artifact}: {len(plan.launches)} launches, {len(built)} kernels in {args.out}")
            return 0
        for layers in args.layers.split(","):
            for msl in args.max_seq_len.split(","):
                plan, built = build(args.model, int(layers), args.expert_format or None, int(msl), args.out, args.gpu)
                print(f"{args.model} {layers} layers, max_seq_len {msl}: {len(plan.launches)} launches, "
                      f"{len(built)} kernels in {args.out}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
