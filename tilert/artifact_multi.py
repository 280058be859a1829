"""A multi-GPU artifact (`tilert compile --gpus N`): one ordinary artifact per rank, plus a manifest.

    ARTIFACT/
      manifest.json    the whole model's config, the partition (what each rank owns), GPU count,
                       target GPU, max_seq_len, steps, recipe, source, tool and format versions,
                       and the sha256 of every rank's metadata.json (which hashes the rest)
      tokenizer.json   the checkpoint's, when it has one
      rank0/ .. rankN-1/
                       each a complete artifact (tilert/artifact.py): its schedules (the rank's
                       tasks, workers and the counters living on its GPU; schedule meta "comm"
                       lists the signals it sends to other GPUs), its weight shard, and in
                       metadata.json its local config and `rank` (its index and slice)

Each rank directory is what one GPU needs, and reads with read_artifact like any artifact; but a
rank's schedule cannot run alone (its counters wait for other GPUs), so `tilert run`, `inspect`
and read_multi_artifact take the top directory and join the ranks (tilert/multigpu.py).
Writing is all or nothing, like a single artifact: built beside the output path, renamed at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tilert
from model.config import MimoConfig
from model.weights import StoredTensor
from tilert.artifact import (METADATA_FILE, TOKENIZER_FILE, Artifact, ArtifactMeta, _atomic_dir, _check_hash,
                             _check_version, _read_json, read_artifact, sha256_file, write_artifact)
from tilert.errors import UserError
from tilert.partition import Partition, unshard_weights
from tilert.schedule import Schedule

MANIFEST_FILE = "manifest.json"


def rank_dir(rank: int) -> str:
    return f"rank{rank}"


def is_multi_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


@dataclass
class MultiArtifact(ArtifactMeta):
    path: Path
    cfg: MimoConfig  # the whole model
    part: Partition
    ranks: list[Artifact]
    meta: dict[str, Any]  # manifest.json
    _weights: dict[str, StoredTensor] | None = field(default=None, repr=False)

    @property
    def steps(self) -> list[int]:
        return sorted(int(b) for b in self.meta["steps"])

    @property
    def schedule_only(self) -> bool:
        return bool(self.meta.get("schedule_only"))

    @property
    def rank_schedules(self) -> list[dict[int, Schedule]]:
        return [a.schedules for a in self.ranks]

    @property
    def weights(self) -> dict[str, StoredTensor]:
        """The whole model's runtime weights put back together (fp32): for the reference backend."""
        if self._weights is None:
            self._weights = unshard_weights(self.part, [a.weights for a in self.ranks])
        return self._weights

    def vm(self):
        from tilert.vm_multi import MultiVM

        return MultiVM(self.part, self.rank_schedules, [a.weights for a in self.ranks], self.max_seq_len)


def write_multi_artifact(out_dir: str | Path, cfg: MimoConfig, part: Partition,
                         schedules: list[dict[int, Schedule]], weights: list[dict[str, StoredTensor]] | None,
                         meta: dict[str, Any], tokenizer: str | Path | None = None, force: bool = False) -> Path:
    """Write ARTIFACT/ (see the module doc): rank r gets schedules[r] and weights[r]."""
    out = Path(out_dir)
    steps = sorted(int(b) for b in schedules[0])

    def fill(tmp: Path) -> None:
        hashes = {}
        for r in range(part.n):
            rank_meta = {**meta, "rank": {"rank": r, "ranks": part.n, "slice": part.ranks[r].to_json()}}
            write_artifact(tmp / rank_dir(r), part.local_config(r), schedules[r],
                           None if weights is None else weights[r], rank_meta)
            rel = f"{rank_dir(r)}/{METADATA_FILE}"
            hashes[rel] = sha256_file(tmp / rel)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            hashes[TOKENIZER_FILE] = sha256_file(tmp / TOKENIZER_FILE)
        manifest = {
            **meta,
            "format_version": tilert.SCHEDULE_FORMAT_VERSION,
            "tool_version": tilert.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kind": "multi-gpu",
            "gpus": part.n,
            "config": cfg.to_dict(),
            "partition": part.to_json(),
            "steps": steps,
            "schedule_only": weights is None,
            "hashes": hashes,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")

    _atomic_dir(out, force, fill)
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """manifest.json of a multi-GPU artifact, after checking its format version."""
    root = Path(path)
    manifest = _read_json(root / MANIFEST_FILE, "not a multi-GPU tilert artifact")
    _check_version(manifest, root / MANIFEST_FILE)
    return manifest


def read_multi_artifact(path: str | Path, load_weights: bool = True, steps: list[int] | None = None) -> MultiArtifact:
    """Read and check every rank of a multi-GPU artifact (hashes, versions, rank order)."""
    root = Path(path)
    manifest = read_manifest(root)
    try:
        cfg = MimoConfig.from_dict(manifest["config"])
        part = Partition.from_json(cfg, manifest["partition"])
        hashes = dict(manifest["hashes"])
        int(manifest["max_seq_len"])
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{root / MANIFEST_FILE}: corrupt ({type(e).__name__}: {e})") from None
    if load_weights and manifest.get("schedule_only"):
        raise UserError(f"{root}: compiled with --schedule-only, it holds no weights to run; recompile "
                        f"without --schedule-only")
    ranks = []
    for r in range(part.n):
        _check_hash(root, f"{rank_dir(r)}/{METADATA_FILE}", hashes)
        art = read_artifact(root / rank_dir(r), load_weights=load_weights, steps=steps)
        if (art.meta.get("rank") or {}).get("rank") != r:
            raise UserError(f"{root / rank_dir(r)}: is not rank {r} of this artifact")
        ranks.append(art)
    if TOKENIZER_FILE in hashes:
        _check_hash(root, TOKENIZER_FILE, hashes)
    return MultiArtifact(root, cfg, part, ranks, manifest)
