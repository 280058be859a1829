"""Where the megakernel's warps stall, by device function: Nsight Compute's PC samples attributed
to source through the cubin's line table.

    python tools/ncu_stalls.py ncu_source.csv.xz KERNEL.cubin [--by inner|outer|line] [--top 40]

`ncu_source.csv.xz` is the source page tools/ncu_step.sh exports (per SASS instruction: stall
samples by reason); KERNEL.cubin is the cubin that ran (built with -lineinfo, as tilert/build.py
builds it).  nvdisasm (CUDA toolkit, or the copy in Triton's wheel) turns the cubin into
instructions with their inlining chains; each instruction's samples go to the outermost task
kind of tilert/cuda/kinds.cuh it was inlined into (`outer`), to the innermost function (`inner`),
or to file:line (`line`).  Prints a table of samples per place and reason, largest first.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import lzma
import re
import shutil
import subprocess
import sys
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent.parent / "tilert" / "cuda"
REASONS = ("barrier", "long_sb", "wait", "selected", "not_selected", "short_sb", "branch_resolving", "math",
           "no_inst", "mio", "dispatch", "lg", "sleep", "misc", "membar")
_FN = re.compile(r'^(?:TILERT_DEV|TILERT_OUTLINE|TILERT_MMA_FN|__device__|extern "C" __global__)[^(]*?(\w+)\(')


def function_at_line(paths) -> dict[str, dict[int, str]]:
    """file name -> line -> the device function whose definition encloses it (by position)."""
    out = {}
    for path in paths:
        cur, table = "?", {}
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            if m := _FN.match(line):
                cur = m.group(1)
            table[i] = cur
        out[Path(path).name] = table
    return out


def instruction_places(cubin: Path) -> dict[int, tuple[str, str, str]]:
    """Instruction offset -> (outermost kind, innermost function, innermost file:line)."""
    nvdisasm = shutil.which("nvdisasm")
    if nvdisasm is None:
        raise SystemExit("nvdisasm not found (CUDA toolkit, or triton/backends/nvidia/bin in Triton's wheel)")
    text = subprocess.run([nvdisasm, "--print-line-info-inline", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    fns = function_at_line(sorted(CUDA_DIR.glob("*.cuh")))

    def fn(f, n):
        name = f.split("/")[-1]
        return f"{name}:{fns.get(name, {}).get(int(n), '?')}"

    places, chain, fresh, in_text = {}, [], True, False
    here = ("?", "?", "?")
    for line in text.splitlines():
        if line.startswith("\t.section"):
            in_text = ".text" in line
        s = line.strip()
        if s.startswith("//## File"):
            if fresh:
                chain = []
            fresh = False
            chain += re.findall(r'"([^"]+)", line (\d+)', s)
            kinds = [fn(f, n) for f, n in chain if f.endswith("kinds.cuh")]
            inner = fn(*chain[0])
            here = (kinds[-1] if kinds else inner, inner, f"{chain[0][0].split('/')[-1]}:{chain[0][1]}")
        elif in_text and (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/", line)):
            fresh = True
            places[int(m.group(1), 16)] = here
    return places


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("cubin")
    ap.add_argument("--by", choices=("outer", "inner", "line"), default="outer")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--only", default=None, help="only instructions inlined into this outermost kind (e.g. k_topk)")
    args = ap.parse_args(argv)
    raw = lzma.open(args.csv, "rt") if args.csv.endswith(".xz") else open(args.csv)
    rows = list(csv.reader(io.StringIO(raw.read())))
    header_at = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header, body = rows[header_at], [r for r in rows[header_at + 1:] if r and r[0].startswith("0x")]
    col = {name: i for i, name in enumerate(header)}
    base = min(int(r[0], 16) for r in body)
    places = instruction_places(Path(args.cubin))
    which = {"outer": 0, "inner": 1, "line": 2}[args.by]
    samples = collections.defaultdict(collections.Counter)
    for r in body:
        where = places.get(int(r[0], 16) - base, ("?", "?", "?"))
        if args.only and not where[0].endswith(args.only):
            continue
        place = where[which]
        for reason in REASONS:
            key = f"stall_{reason}"
            if key in col and r[col[key]] not in ("", "-"):
                samples[place][reason] += int(r[col[key]])
    total = sum(sum(c.values()) for c in samples.values())
    print(f"{total} samples; columns: share of all samples (%), then samples by reason (% of the place's)")
    print(f"{'place':44s} {'all %':>6s} " + " ".join(f"{r[:8]:>8s}" for r in REASONS[:9]))
    for place, c in sorted(samples.items(), key=lambda kv: -sum(kv[1].values()))[:args.top]:
        n = sum(c.values())
        print(f"{place[:44]:44s} {100 * n / total:6.1f} " + " ".join(f"{100 * c[r] / n:8.1f}" for r in REASONS[:9]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
