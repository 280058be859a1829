"""Build, on the development machine, every cubin a device round needs (tools/device_round.sh),
so the GPU machine finds them in its nvcc cache (tilert/build.py keys cubins by source hash) and
spends its time running, not compiling:

    python tools/prebuild_cubins.py [--jobs 2]        # then carry build/cubins with the call

- the GPU tests' kernels (tests/test_gpu.py `kernel_sources`, plus a profiling build of the first);
- tools/profile_step.py / ab_profile.py default: 6 layers of mimo-v2-flash, plain and profiling,
  and its B = 8 verify step with and without expert_union (profile_step --tokens 8);
- tools/bench.py: 6 and 12 layers at contexts 8192 and 512 (one source per depth: the program
  is data), copied into bench's L{layers}_C{context}/ caches; tools/autotune_schedule.py uses the
  same kernels (every placement runs on one cubin) and, with --capture, the DFlash target's;
- tools/op_bench.py: the dense and moe one-layer cuts of mimo-v2-flash and mimo-v2.5-pro, plain
  and profiling.
The local nvcc must match the device's (CUDA 13.0 on both here); a mismatch only costs the
device the rebuild.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.config import preset  # noqa: E402
from tilert.build import build_cubin  # noqa: E402
from tilert.codegen import generate  # noqa: E402
from tilert.compiler import compile_steps  # noqa: E402
from tilert.lower import load_recipe, recipe_with  # noqa: E402


def flash(layers: int):
    return preset("mimo-v2-flash", layers=layers, expert_format="mxfp4")


def jobs() -> list[tuple[str, str, bool, tuple[str, ...]]]:
    """(label, source, profiling build, the subdirectories of the output its cubin also goes to)
    of every cubin (tools/bench.py builds in L{layers}_C{context}/, the others in the root)."""
    from tests.test_gpu import kernel_sources
    from tools.op_bench import cut_config

    out = [(f"test {i}", src, False, ()) for i, src in enumerate(kernel_sources())]
    out.append(("test 0 profiling", out[0][1], True, ()))
    for layers in (6, 12):
        cfg = flash(layers)
        src = generate(compile_steps(cfg, load_recipe("mimo-v2-flash", "h100"), [1], max_seq_len=8200)[1],
                       cfg).source
        out.append((f"flash {layers}L", src, False, tuple(f"L{layers}_C{c}" for c in (8192, 512))))
        if layers == 6:
            out.append(("flash 6L profiling", src, True, ()))
    # tools/autotune_schedule.py --capture: the DFlash target's B = 1 step (capture tasks)
    from model.dflash import DFlashConfig

    cfg = flash(6)
    s = compile_steps(cfg, load_recipe("mimo-v2-flash", "h100"), [1], max_seq_len=8200,
                      capture_layers=DFlashConfig.flash_for(cfg).target_layers)[1]
    out.append(("flash 6L capture (autotune --capture)", generate(s, cfg).source, False, ()))
    cfg = flash(6)
    for union in (False, True):  # profile_step --tokens 8 [--set expert_union=true]: a verify step
        recipe = dict(load_recipe("mimo-v2-flash", "h100"), expert_union=union)
        src = generate(compile_steps(cfg, recipe, [8], max_seq_len=8200)[8], cfg).source
        out += [(f"flash 6L B=8{' union' if union else ''}", src, False, ()),
                (f"flash 6L B=8{' union' if union else ''} profiling", src, True, ())]
    for model in ("mimo-v2-flash", "mimo-v2.5-pro"):
        for cut in ("dense", "moe"):
            cfg = cut_config(model, cut)
            src = generate(compile_steps(cfg, load_recipe(model, "h100"), [1], max_seq_len=520)[1], cfg).source
            out += [(f"{model} {cut}", src, False, ()), (f"{model} {cut} profiling", src, True, ())]
    merged: dict[tuple[str, bool], list] = {}
    for label, src, prof, subdirs in out:
        if (src, prof) in merged:
            merged[(src, prof)][3] += subdirs
        else:
            merged[(src, prof)] = [label, src, prof, subdirs]
    return [tuple(v) for v in merged.values()]


def ab_jobs(sets: list[str], defines: list[str]) -> list[tuple[str, str, bool, tuple[str, ...]]]:
    """The 6-layer flash cubins (plain and profiling) of tools/ab_profile.py variants: one per
    `--set KEY=VALUE` (a recipe override) and one per `--define NAME=VALUE` (a device switch),
    built from the very source tools/profile_step.py generates for them."""
    import json

    cfg = flash(6)
    out = []
    for kv in sets:
        key, _, value = kv.partition("=")
        recipe = recipe_with(load_recipe("mimo-v2-flash", "h100"), key, json.loads(value))
        src = generate(compile_steps(cfg, recipe, [1], max_seq_len=8200)[1], cfg).source
        out += [(f"ab --set {kv}", src, False, ()), (f"ab --set {kv} profiling", src, True, ())]
    base = generate(compile_steps(cfg, load_recipe("mimo-v2-flash", "h100"), [1], max_seq_len=8200)[1], cfg).source
    for d in defines:
        src = f"#define {d.replace('=', ' ', 1)}\n" + base
        out += [(f"ab --define {d}", src, False, ()), (f"ab --define {d} profiling", src, True, ())]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--ab-set", action="append", default=[], metavar="KEY=VALUE",
                    help="also the cubins of an ab_profile variant `--set KEY=VALUE` (repeatable)")
    ap.add_argument("--ab-define", action="append", default=[], metavar="NAME=VALUE",
                    help="also the cubins of an ab_profile variant `--define NAME=VALUE` (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "build" / "cubins"))
    ap.add_argument("--clean", action="store_true",
                    help="then delete the other cubins there (keeps the carried tree under the device tool's 64 MiB)")
    args = ap.parse_args(argv)
    todo = jobs() + ab_jobs(args.ab_set, args.ab_define)
    t0 = time.time()
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        futs = {ex.submit(build_cubin, src, Path(args.out), prof): (label, subdirs)
                for label, src, prof, subdirs in todo}
        stems = set()
        for f in cf.as_completed(futs):
            path, rep = f.result()
            label, subdirs = futs[f]
            stems.add(path.stem)
            for sub in subdirs:  # the same files where that tool's cache looks
                (Path(args.out) / sub).mkdir(parents=True, exist_ok=True)
                for made in path.parent.glob(path.stem + ".*"):
                    shutil.copy(made, Path(args.out) / sub / made.name)
            print(f"{label:34s} {path.name}: {rep['registers']} regs, spills {rep['spills']} B"
                  f"{' (cached)' if rep.get('cached') else ''}", flush=True)
    if args.clean:
        stale = [f for f in Path(args.out).rglob("tilert_megakernel-*") if f.name.split(".")[0] not in stems]
        for f in stale:
            f.unlink()
        print(f"removed {len(stale)} files of other kernels")
    print(f"{len(todo)} cubins in {time.time() - t0:.0f} s under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
