#!/usr/bin/env bash
# Nsight Compute on one plain megakernel step (GPU machine, repository root):
#
#     bash tools/ncu_step.sh OUTDIR [profile_step.py arguments, default: --layers 6 --context 8192]
#
# Runs 4 steps of the plain kernel (tools/profile_step.py --plain-steps 4) and profiles the 4th
# launch with the warp-state, source-counter (PC sampling), speed-of-light and memory sections,
# clocks left as they are.  Writes OUTDIR/ncu.ncu-rep, the details page as CSV and the source
# page (per SASS instruction: executions and stall samples) as CSV, xz-compressed; then
# `python tools/ncu_stalls.py OUTDIR/ncu_source.csv.xz CUBIN_DIS` attributes the stall samples to
# the device functions (needs the cubin's nvdisasm listing, made on the development machine).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: ncu_step.sh OUTDIR [profile_step args]}
shift
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--layers 6 --context 8192)
mkdir -p "$out"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "ncu not found"; exit 1; }
timeout 400 "$ncu" --clock-control none -k tilert_megakernel --launch-skip 3 --launch-count 1 \
  --section WarpStateStats --section SourceCounters --section SpeedOfLight --section MemoryWorkloadAnalysis \
  --section LaunchStats --import-source no -f -o "$out/ncu" \
  python3 tools/profile_step.py "${args[@]}" --plain-steps 4 > "$out/ncu.log" 2>&1
rc=$?
tail -5 "$out/ncu.log"
[ -f "$out/ncu.ncu-rep" ] || { echo "ncu wrote no report (rc $rc)"; exit 1; }
"$ncu" -i "$out/ncu.ncu-rep" --page details --csv > "$out/ncu_details.csv" 2>&1
"$ncu" -i "$out/ncu.ncu-rep" --page details --print-details all > "$out/ncu_details.txt" 2>&1
"$ncu" -i "$out/ncu.ncu-rep" --page source --csv --print-source sass > "$out/ncu_source.csv" 2>&1
xz -T0 -f "$out/ncu_source.csv"
grep -iE "stall|warp cycles|no instruction|issued" "$out/ncu_details.txt" | head -60
ls -la "$out"
