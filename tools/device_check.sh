#!/usr/bin/env bash
# The megakernel's whole GPU check in one call, run on the GPU machine from the repository root:
#
#     bash tools/device_check.sh            (logs under $OUT, else build/device-check)
#
# 1. prints the GPU, driver and toolchain; checks the Python imports the runtime needs;
# 2. builds every cubin the tests use (mimo-tiny B = 1, 8 with the loader ring, direct loads,
#    256-byte and 1 KiB ring slots; a 2-layer mimo-v2-flash geometry with fp8 and with MXFP4
#    experts) in parallel, reusing build/cubins when it was carried from the development machine;
# 3. greps the SASS of one cubin for what ptxas -v cannot show (acquire loads invalidating L1,
#    bulk copies, local memory);
# 4. runs tests/test_gpu.py: per-task prefix diff against the VM (names the first differing
#    task), 256 greedy tokens, sampling, a planted hang caught by the watchdog, and the
#    2-layer mimo-v2-flash geometry (fp8 and MXFP4 experts) against the VM with a timing
#    line; tests/test_gpu_speculative.py: the draft step's megakernel against the DraftVM, and
#    speculative decoding on the GPU equal to plain decoding (greedy, sampled).  pytest stops after 4 failures rather than the first, so one call tells which
#    variants (loader / direct / small slots) fail; no test can hang: the kernel's watchdog
#    and `timeout` bound them.
# Takes about 2-3 minutes; the last lines are a summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/device-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0

echo "== environment" | tee "$OUT/env.txt"
{ nvidia-smi; nvcc --version | tail -2; python3 --version; } 2>&1 | tee -a "$OUT/env.txt"

echo "== imports" | tee "$OUT/imports.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/imports.txt"
import torch, numpy
from cuda.bindings import driver
import tilert.gpu, tilert.codegen, tilert.build
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} cuda {torch.version.cuda}; {p.name} sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
EOF
imports=${PIPESTATUS[0]}

echo "== build (cached in build/cubins)" | tee "$OUT/build.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/build.txt"
import concurrent.futures as cf, shutil, sys
sys.path.insert(0, ".")
from tests.test_gpu import BUILD_DIR, kernel_sources
from tilert.build import build_cubin
sources = kernel_sources()
with cf.ThreadPoolExecutor(len(sources) + 1) as ex:
    futs = [ex.submit(build_cubin, src, BUILD_DIR) for src in sources]
    futs.append(ex.submit(build_cubin, sources[0], BUILD_DIR, True))  # a profiling build
for f in futs:
    path, rep = f.result()
    print(f"{path.name}: {rep['registers']} regs, spills {rep['spill_stores']}+{rep['spill_loads']} B, "
          f"stack {rep['stack']} B, {rep['seconds']:.1f} s{' (cached)' if rep['cached'] else ''}")
shutil.copy(futs[0].result()[0], "build/device-check-b1.cubin")  # mimo-tiny B=1, loader ring
EOF
build=${PIPESTATUS[0]}

echo "== SASS of the B=1 loader kernel" | tee "$OUT/sass-summary.txt"
if command -v cuobjdump >/dev/null && [ -f build/device-check-b1.cubin ]; then
  cuobjdump -sass build/device-check-b1.cubin > "$OUT/sass-b1.txt" 2>&1
  for op in "CCTL.IVALL" "LDG.E.STRONG.GPU" "UBLKCP" "SYNCS" "LDL" "STL" "NANOSLEEP" "ATOMG\|REDG\|RED.E"; do
    printf "%-22s %s\n" "$op" "$(grep -c "$op" "$OUT/sass-b1.txt")" | tee -a "$OUT/sass-summary.txt"
  done
else
  echo "cuobjdump not found: skipped" | tee -a "$OUT/sass-summary.txt"
fi

echo "== tests/test_gpu.py tests/test_gpu_speculative.py" | tee "$OUT/test_gpu.txt"
timeout 900 python3 -m pytest --maxfail=4 -s -q -rfE --durations=8 -p no:cacheprovider tests/test_gpu.py \
  tests/test_gpu_speculative.py 2>&1 | tee -a "$OUT/test_gpu.txt"
tests=${PIPESTATUS[0]}

echo "== summary"
printf "%-8s %s\n" imports "$([ "$imports" = 0 ] && echo ok || echo FAILED)" build "$([ "$build" = 0 ] && echo ok || echo FAILED)" \
  tests "$([ "$tests" = 0 ] && echo ok || echo "FAILED (rc $tests)")"
grep -E "passed|failed|error" "$OUT/test_gpu.txt" | tail -3
exit $(( imports || build || tests ))
