"""The compiled artifact: a directory holding everything `tilert run` needs.

    ARTIFACT/
      schedule.json    {"format_version", "tool_version", "schedules": {"1": ..., "8": ...}}
                       and, with a drafter, "draft": the draft step's schedule
      metadata.json    model config, target GPU, max_seq_len, step sizes, recipe, source,
                       sha256 of schedule.json and of every weights file, the weights index
                       (storage format and logical shape of each tensor), tool version, time
      weights/         safetensors in the runtime layout (absent for --schedule-only):
                       `<name>` holds the data, `<name>.scale` the scales of a quantized tensor;
                       shards of about 2 GB
      tokenizer.json   copied from the checkpoint, when it has one
      kernels/         the GPU megakernel of each step size B (absent with --no-kernel or without
                       nvcc): B{n}.cubin (sm_90a), B{n}/ (the GeneratedKernel: kernel.json,
                       program.npy, consts.npy, kernel.cu), B{n}.ptxas.txt (ptxas -v), and with
                       --profile-kernel B{n}.prof.cubin; metadata.json `kernel` holds the ptxas
                       report and the GPU memory footprint (or null and the reason)
    A DFlash drafter (`--draft`) adds its tensors to weights/ as `draft.<name>`, its config to
    metadata.json (`draft`), the draft step's schedule to schedule.json (`draft`, tilert/draft.py)
    and a `hidden` output to every target step.  An artifact without `draft` in schedule.json
    (compiled before) still reads and runs; only speculative decoding refuses it.

Writing is all or nothing: the artifact is built in a hidden sibling directory and renamed
into place at the end, so a failure leaves nothing at the output path.  Reading checks every
hash and the schedule format version before handing anything out, and names the problem in
one UserError.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import tilert
from model.config import MimoConfig
from model.weights import StoredTensor
from tilert.errors import UserError
from tilert.schedule import Schedule, gc_paused, schedule_from_json, schedule_to_json

SCHEDULE_FILE = "schedule.json"
METADATA_FILE = "metadata.json"
WEIGHTS_DIR = "weights"
TOKENIZER_FILE = "tokenizer.json"
KERNELS_DIR = "kernels"
SHARD_BYTES = 2 * 1024**3
SCALE_SUFFIX = ".scale"
DRAFT_PREFIX = "draft."  # a DFlash drafter's tensors (`--draft`), beside the target's


class ArtifactMeta:
    """What an artifact's metadata says alike for a one-GPU artifact (metadata.json) and a
    multi-GPU one (manifest.json): subclasses hold it as `meta`."""

    meta: dict[str, Any]

    @property
    def max_seq_len(self) -> int:
        return int(self.meta["max_seq_len"])

    @property
    def gpu(self) -> str:
        return str(self.meta.get("gpu", "h100"))


@dataclass
class Artifact(ArtifactMeta):
    path: Path
    cfg: MimoConfig
    schedules: dict[int, Schedule]
    weights: dict[str, StoredTensor] | None
    meta: dict[str, Any]
    draft_schedule: Schedule | None = None  # the DFlash draft step (compiled with --draft)

    @property
    def tokenizer_path(self) -> Path | None:
        p = self.path / TOKENIZER_FILE
        return p if p.is_file() else None

    @property
    def schedule_only(self) -> bool:
        return bool(self.meta.get("schedule_only"))

    @property
    def draft_config(self) -> dict | None:
        """The DFlash drafter's config (compiled with --draft), else None."""
        return (self.meta.get("draft") or {}).get("config")

    @property
    def draft_weights(self) -> dict[str, StoredTensor]:
        return {k[len(DRAFT_PREFIX):]: v for k, v in (self.weights or {}).items() if k.startswith(DRAFT_PREFIX)}

    @property
    def steps(self) -> list[int]:
        """Every step size compiled (the schedules read may be fewer: read_artifact(steps=))."""
        return sorted(int(b) for b in self.meta.get("steps") or self.schedules)


# ---- helpers ----------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _major(version: Any) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _is_artifact(path: Path) -> bool:
    # manifest.json: a multi-GPU artifact (tilert/artifact_multi.py)
    return any((path / f).is_file() for f in (METADATA_FILE, SCHEDULE_FILE, "manifest.json"))


def check_output_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an output path that holds something, unless `force` and it is an old artifact (or
    empty).  Called before any long work, and again by write_artifact just before the rename."""
    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return out
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return out
    if not force:
        raise UserError(f"{out}: already exists and is not empty; choose a new directory or pass --force "
                        f"to replace it")
    if not out.is_dir() or out.is_symlink() or not _is_artifact(out):
        raise UserError(f"{out}: exists and is not a tilert artifact; refusing to replace it even with --force")
    return out


def _stored_items(name: str, t: StoredTensor) -> dict[str, torch.Tensor]:
    items = {name: t.data}
    if t.scale is not None:
        items[name + SCALE_SUFFIX] = t.scale
    return items


def _shards(weights: dict[str, StoredTensor], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in weights.items():
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    return shards


def _normal_permissions(root: Path) -> None:
    """mkdtemp makes a private directory (and safetensors private files): give the finished
    artifact the usual permissions under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def _atomic_dir(out_dir: Path, force: bool, fill: Callable[[Path], None]) -> None:
    """Run `fill` on a hidden temp dir beside out_dir, then move it into place.  An existing
    artifact is replaced (with force) only once the new one is complete."""
    check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old: Path | None = None
    settled = False  # out_dir holds a complete artifact (the new one, or the old one put back)
    try:
        fill(tmp)
        _normal_permissions(tmp)
        check_output_dir(out_dir, force)  # nothing appeared meanwhile
        if out_dir.exists():
            if any(out_dir.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
                os.rename(out_dir, old / "artifact")
            else:
                out_dir.rmdir()
        os.rename(tmp, out_dir)
        settled = True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.rename(old / "artifact", out_dir)  # put the previous artifact back
            settled = True
        raise
    finally:
        if old is not None and settled:
            shutil.rmtree(old, ignore_errors=True)


# ---- writing ----------------------------------------------------------------------------------

def write_artifact(out_dir: str | Path, cfg: MimoConfig, schedules: dict[int, Schedule],
                   runtime_weights: dict[str, StoredTensor] | None, meta: dict[str, Any] | None = None,
                   tokenizer: str | Path | None = None, force: bool = False,
                   shard_bytes: int = SHARD_BYTES, progress: bool = False,
                   extra_files: dict[str, str | Path] | None = None, draft_schedule: Schedule | None = None) -> Path:
    """Write an artifact directory (see the module docstring); returns its path.

    `extra_files` maps artifact-relative paths (e.g. kernels/B1.cubin) to files to copy in; each
    is hashed like the rest.  A directory is copied whole, every file in it hashed.

    `meta` adds keys to metadata.json (gpu, max_seq_len, recipe, source, ...); the keys this
    function computes (hashes, weights index, versions) always win."""
    out = Path(out_dir)
    if not schedules:
        raise UserError("no schedules to write")
    meta = dict(meta or {})
    steps = sorted(int(b) for b in schedules)

    def fill(tmp: Path) -> None:
        hashes: dict[str, str] = {}
        with gc_paused():
            doc = {
                "format_version": tilert.SCHEDULE_FORMAT_VERSION,
                "tool_version": tilert.__version__,
                "schedules": {str(b): schedule_to_json(schedules[b]) for b in steps},
            }
            if draft_schedule is not None:
                doc["draft"] = schedule_to_json(draft_schedule)
        with gc_paused():  # json.dumps (C encoder) of a big dict; json.dump to a file is ~4x slower
            data = json.dumps(doc, separators=(",", ":")).encode()
        del doc
        (tmp / SCHEDULE_FILE).write_bytes(data)
        hashes[SCHEDULE_FILE] = hashlib.sha256(data).hexdigest()
        del data

        index: dict[str, dict[str, Any]] = {}
        if runtime_weights is not None:
            (tmp / WEIGHTS_DIR).mkdir()
            shards = _shards(runtime_weights, shard_bytes)
            total = sum(t.nbytes for t in runtime_weights.values())
            with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights",
                      disable=not progress, leave=False) as bar:
                for k, names in enumerate(shards):
                    rel = f"{WEIGHTS_DIR}/model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                    tensors: dict[str, torch.Tensor] = {}
                    for name in names:
                        t = runtime_weights[name]
                        tensors.update({n: v.contiguous() for n, v in _stored_items(name, t).items()})
                        index[name] = {"fmt": t.fmt, "shape": list(t.shape), "file": rel,
                                       "scale": t.scale is not None}
                    save_file(tensors, str(tmp / rel), metadata={"format": "pt", "writer": "tilert"})
                    bar.update(sum(runtime_weights[n].nbytes for n in names))
                    del tensors
                    hashes[rel] = sha256_file(tmp / rel)

        for rel, src in sorted((extra_files or {}).items()):
            src, dst = Path(src), tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
                files = sorted(p for p in dst.rglob("*") if p.is_file())
            else:
                shutil.copyfile(src, dst)
                files = [dst]
            for f in files:
                hashes[f.relative_to(tmp).as_posix()] = sha256_file(f)

        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            hashes[TOKENIZER_FILE] = sha256_file(tmp / TOKENIZER_FILE)

        md = {
            **meta,
            "format_version": tilert.SCHEDULE_FORMAT_VERSION,
            "tool_version": tilert.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": cfg.to_dict(),
            "steps": steps,
            "schedule_only": runtime_weights is None,
            "hashes": hashes,
            "weights": index,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(md, indent=1) + "\n")

    _atomic_dir(out, force, fill)
    return out


# ---- reading ----------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing; {what}")
    try:
        with gc_paused():
            d = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt, not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: corrupt, expected a JSON object")
    return d


def _check_version(d: dict, source: Path) -> None:
    found = d.get("format_version")
    if _major(found) != _major(tilert.SCHEDULE_FORMAT_VERSION):
        raise UserError(
            f"{source}: written by tilert {d.get('tool_version', '?')} with schedule format {found}; "
            f"this tilert ({tilert.__version__}) reads format {tilert.SCHEDULE_FORMAT_VERSION}: recompile")


def _check_hash(root: Path, rel: str, hashes: dict[str, str]) -> Path:
    path = root / rel
    if not path.is_file():
        raise UserError(f"{path}: missing from the artifact")
    want = hashes.get(rel)
    if want is None:
        raise UserError(f"{root / METADATA_FILE}: records no hash for {rel}; the artifact is corrupt")
    if sha256_file(path) != want:
        raise UserError(f"{path}: sha256 does not match the one in {METADATA_FILE}; the file was modified "
                        f"or damaged after compile: recompile")
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """metadata.json of an artifact, after checking its format version (nothing else is read)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: not an artifact directory (make one with `tilert compile`)")
    meta = _read_json(root / METADATA_FILE, "not a tilert artifact, or an incomplete one")
    _check_version(meta, root / METADATA_FILE)
    return meta


def read_artifact(path: str | Path, load_weights: bool = True, progress: bool = False,
                  steps: list[int] | None = None) -> Artifact:
    """Read and check an artifact.  With load_weights, a schedule-only artifact is refused.
    `steps` decodes only the schedules of those step sizes (all by default)."""
    root = Path(path)
    meta = read_metadata(root)
    hashes = meta.get("hashes")
    if not isinstance(hashes, dict):
        raise UserError(f"{root / METADATA_FILE}: corrupt, no hashes recorded")
    doc = _read_json(root / SCHEDULE_FILE, "the artifact is incomplete")
    _check_version(doc, root / SCHEDULE_FILE)
    _check_hash(root, SCHEDULE_FILE, hashes)
    if meta.get("schedule_only") and load_weights:
        raise UserError(f"{root}: compiled with --schedule-only, it holds no weights to run; recompile "
                        f"without --schedule-only")
    try:
        cfg = MimoConfig.from_dict(meta["config"])
        with gc_paused():
            schedules = {int(b): schedule_from_json(s) for b, s in doc["schedules"].items()
                         if steps is None or int(b) in steps}
            draft_schedule = schedule_from_json(doc["draft"]) if doc.get("draft") is not None else None
        int(meta["max_seq_len"])
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{root}: corrupt artifact ({type(e).__name__}: {e})") from None
    if not doc["schedules"]:
        raise UserError(f"{root / SCHEDULE_FILE}: holds no schedules")
    if steps is not None and not schedules:
        raise UserError(f"{root}: no schedule for steps {sorted(steps)}; compiled: {sorted(map(int, doc['schedules']))}")
    if TOKENIZER_FILE in hashes:
        _check_hash(root, TOKENIZER_FILE, hashes)
    for rel in hashes:  # the kernels are small: check them on every read
        if rel.startswith(KERNELS_DIR + "/"):
            _check_hash(root, rel, hashes)

    weights = None
    if load_weights:
        weights = _read_weights(root, meta, hashes, progress)
    return Artifact(root, cfg, schedules, weights, meta, draft_schedule)


def _read_weights(root: Path, meta: dict, hashes: dict[str, str], progress: bool) -> dict[str, StoredTensor]:
    index = meta.get("weights")
    if not isinstance(index, dict) or not index:
        raise UserError(f"{root / METADATA_FILE}: corrupt, no weights index")
    files = sorted({e["file"] for e in index.values()})
    handles = {}
    for rel in tqdm(files, desc="checking weights", disable=not progress, leave=False):
        p = _check_hash(root, rel, hashes)
        try:
            handles[rel] = safe_open(str(p), framework="pt")
        except (SafetensorError, OSError) as e:
            raise UserError(f"{p}: not a readable safetensors file ({e})") from None
    weights: dict[str, StoredTensor] = {}
    for name, e in index.items():
        f = handles[e["file"]]
        try:
            data = f.get_tensor(name)
            scale = f.get_tensor(name + SCALE_SUFFIX) if e.get("scale") else None
        except (SafetensorError, OSError) as err:
            raise UserError(f"{root / e['file']}: cannot read tensor {name} ({err})") from None
        weights[name] = StoredTensor(e["fmt"], tuple(e["shape"]), data, scale)
    return weights


# ---- kernels ----------------------------------------------------------------------------------

def kernel_info(meta: dict[str, Any]) -> dict[str, Any] | None:
    """metadata.json's `kernel` entry when the artifact holds kernels, else None."""
    k = meta.get("kernel")
    return k if isinstance(k, dict) and k.get("steps") else None


def load_kernels(art: Artifact, profile: bool = False) -> dict[int, tuple[Path, Any]]:
    """{B: (cubin path, GeneratedKernel)} of every step size, hashes checked (read_artifact checked
    them already; a file changed since is caught here too).  `profile`: the profiling cubins."""
    info = kernel_info(art.meta)
    if info is None:
        why = (art.meta.get("kernel_skipped") or "compiled without a kernel")
        raise UserError(f"{art.path}: holds no GPU megakernel ({why}); recompile with --gpu h100|h200 "
                        f"on a machine with nvcc")
    if profile and not info.get("profile"):
        raise UserError(f"{art.path}: holds no profiling kernel; recompile with --profile-kernel")
    return {int(b): _load_kernel_entry(art, entry, profile)
            for b, entry in sorted(info["steps"].items(), key=lambda kv: int(kv[0]))}


def load_draft_kernel(art: Artifact) -> tuple[Path, Any]:
    """(cubin path, GeneratedKernel) of the DFlash draft step, hashes checked."""
    info = kernel_info(art.meta)
    if info is None or not info.get("draft"):
        why = (info or {}).get("draft_skipped") or art.meta.get("kernel_skipped") or (
            "compiled without a drafter" if not art.meta.get("draft") else "compiled by a tilert without draft kernels")
        raise UserError(f"{art.path}: holds no GPU megakernel for the draft step ({why}); recompile with --draft DIR "
                        f"on a machine with nvcc")
    return _load_kernel_entry(art, info["draft"], profile=False)


def _load_kernel_entry(art: Artifact, entry: dict[str, Any], profile: bool) -> tuple[Path, Any]:
    from tilert.codegen import GeneratedKernel

    hashes = art.meta.get("hashes") or {}
    cubin = _check_hash(art.path, entry["prof_cubin" if profile else "cubin"], hashes)
    gdir = art.path / entry["generated"]
    for f in sorted(gdir.iterdir()):
        _check_hash(art.path, f.relative_to(art.path).as_posix(), hashes)
    try:
        gen = GeneratedKernel.load(gdir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{gdir}: unreadable generated kernel ({type(e).__name__}: {e})") from None
    return cubin, gen
