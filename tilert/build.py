"""Build a generated megakernel source into an sm_90a cubin with nvcc, and read ptxas's report.

Builds are cached by content: the cubin's name carries a hash of the source, the static
device code (tilert/cuda/*.cuh), the flags and nvcc's version, so an unchanged kernel is
never rebuilt (the GPU machine can reuse cubins carried from here).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tilert.codegen import CUDA_DIR, KERNEL_NAME
from tilert.errors import UserError

ARCH_FLAGS = ["-gencode", "arch=compute_90a,code=sm_90a"]
BASE_FLAGS = ["--cubin", "-O3", "-std=c++17", "-Xptxas", "-v", "-lineinfo"]


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or (str(Path("/usr/local/cuda/bin/nvcc")) if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def _static_code_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(CUDA_DIR.glob("*.cuh")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def parse_ptxas(text: str, kernel: str = KERNEL_NAME) -> dict:
    """Registers, spills, shared memory and stack frame of `kernel` from `ptxas -v` output."""
    report = {"registers": None, "spill_stores": 0, "spill_loads": 0, "spills": 0, "smem": 0, "stack": 0,
              "cmem": 0, "raw": text}
    block = text
    m = re.search(rf"Compiling entry function '{re.escape(kernel)}'(.*?)(?=Compiling entry function|\Z)", text, re.DOTALL)
    if m:
        block = m.group(1)
    if (r := re.search(r"Used (\d+) registers", block)):
        report["registers"] = int(r.group(1))
    if (r := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)):
        report["stack"], report["spill_stores"], report["spill_loads"] = map(int, r.groups())
        report["spills"] = report["spill_stores"] + report["spill_loads"]
    if (r := re.search(r"(\d+) bytes smem", block)):
        report["smem"] = int(r.group(1))
    if (r := re.search(r"(\d+) bytes cmem\[0\]", block)):
        report["cmem"] = int(r.group(1))
    return report


def build_cubin(source: str, out_dir: str | Path, profile: bool = False, extra_flags: list[str] | None = None,
                ) -> tuple[Path, dict]:
    """Compile `source` for sm_90a.  Returns (cubin path, ptxas report: registers, spills, smem,
    stack, raw text, seconds, cached).  Raises UserError when nvcc is missing or fails."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise UserError("nvcc not found on PATH: install the CUDA toolkit (13.0) to build the GPU megakernel")
    flags = ARCH_FLAGS + BASE_FLAGS + [f"-I{CUDA_DIR}", f"-DTILERT_PROFILE={int(profile)}"] + list(extra_flags or [])
    key = hashlib.sha256("\n".join([source, _static_code_digest(), " ".join(flags),
                                    _nvcc_version(nvcc)]).encode()).hexdigest()[:16]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{KERNEL_NAME}-{key}{'-prof' if profile else ''}"
    cu, cubin, log = out / f"{stem}.cu", out / f"{stem}.cubin", out / f"{stem}.ptxas.txt"
    if cubin.exists() and log.exists():
        report = parse_ptxas(log.read_text())
        report.update(seconds=0.0, cached=True)
        return cubin, report
    cu.write_text(source)
    tmp = cubin.with_suffix(f".tmp{os.getpid()}")
    t0 = time.time()
    proc = subprocess.run([nvcc, *flags, "-o", str(tmp), str(cu)], capture_output=True, text=True, check=False)
    seconds = time.time() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        errors = [ln for ln in text.splitlines() if "error" in ln.lower()][:10] or text.splitlines()[:20]
        raise UserError(f"nvcc failed to build the megakernel ({cu}):\n" + "\n".join(errors))
    log.write_text(text)
    tmp.replace(cubin)
    report = parse_ptxas(text)
    report.update(seconds=seconds, cached=False)
    return cubin, report
