#!/usr/bin/env bash
# One device call that does a whole round (GPU machine, repository root):
#
#     bash tools/device_round.sh [COMMIT] [ab_profile --variant specs...]
#
# 1. tools/device_check.sh (every GPU test; its SASS dump is dropped);
# 2. with variant specs, tools/ab_profile.py over them (6 layers, context 8192), e.g.
#    "new=" "swa4=--set swa_splits=4" "pf0=--define TILERT_X=0";
# 3. tools/bench_speculative.py (DFlash on the trained tiny pair: plain vs speculative tokens/s,
#    draft and verify steps vs their floors);
# 4. tools/bench.py (6 and 12 layers, contexts 8192 and 512: megakernel, eager, CUDA graph, floor);
# 5. tools/op_bench.py (each op alone in one-layer cuts of mimo-v2-flash and mimo-v2.5-pro).
# STAGES (default "check ab spec bench ops") picks stages; the whole round runs past the device
# tool's 10 minutes, so a call takes a part of it, e.g. STAGES="check spec bench".
# Logs and tables go to $OUT as ONE archive, $OUT/round.tgz (the device tool returns only a
# few files per call), re-packed after every stage so a call cut off at its time limit still
# returns what finished; the stages' time limits add up to under the device tool's 10 minutes.
# Carry build/cubins (prebuilt on the development machine) to skip most nvcc runs here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/device-round}"
commit="${1:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
shift || true
work="$(mktemp -d)"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
pack() { find "$work" -name '*.cubin' -delete; tar czf "$OUT/round.tgz" -C "$work" .; }

STAGES="${STAGES:-check ab spec bench ops}"
has() { [[ " $STAGES " == *" $1 "* ]]; }
# The CLI-compiled artifacts of the speculative tests cache their cubins here (carry it too).
[ -d build/spec-cache ] && export TILERT_CACHE="$PWD/build/spec-cache"

if has check; then
  OUT="$work/check" timeout 300 bash tools/device_check.sh > "$work/check.log" 2>&1
  echo "check rc=$?"; tail -4 "$work/check.log"
  rm -f "$work/check/sass-b1.txt"
  pack
fi

if has ab && [ $# -gt 0 ]; then
  variants=()
  for v in "$@"; do variants+=(--variant "$v"); done
  timeout 220 python3 tools/ab_profile.py --out "$work/ab" "${variants[@]}" > "$work/ab.log" 2>&1
  echo "ab rc=$?"; grep -h "rel_err" "$work"/ab/*.txt; grep -A24 "^| | " "$work/ab.log" | head -26
  pack
fi

if has spec; then
  timeout 120 python3 tools/bench_speculative.py --commit "$commit" --out "$work/spec.json" \
    --log "$work/spec_log.md" > "$work/spec.txt" 2>&1
  echo "spec rc=$?"; grep -v "it/s\|%|" "$work/spec.txt" | tail -16
  pack
fi

has bench && timeout 100 python3 tools/bench.py --layers 6,12 --contexts 8192,512 --reps 20 --workdir build/cubins \
  --commit "$commit" --out "$work/bench.json" --log "$work/bench_log.md" > "$work/bench.txt" 2>&1
echo "bench rc=$?"; tail -6 "$work/bench.txt"
pack

has ops && timeout 150 python3 tools/op_bench.py --contexts 512,8192,32768 --commit "$commit" --out "$work/op_bench.json" \
  --log "$work/op_bench_log.md" > "$work/op_bench.txt" 2>&1
echo "op_bench rc=$?"; grep "^|" "$work/op_bench.txt" | head -40

pack
ls -la "$OUT"
