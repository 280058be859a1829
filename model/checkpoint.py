"""Read and write MiMo-V2 checkpoints: a directory of `config.json` plus safetensors.

Reading accepts
- the Hugging Face hub layout: the names `expected_tensors` lists, FP8 weights with
  `.weight_scale_inv` block scales, MXFP4 weights with `.weight_scale`, other tensors plain; also
  the fused `self_attn.qkv_proj` of the V2.5 family, and k/v scale grids that restart per head;
- transformers' in-memory layout (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`,
  `self_attn.sinks`) in float dtypes, as older `save_pretrained` wrote it;
- hub names holding plain float tensors (what transformers >= 5 `save_pretrained` writes).
Every tensor keeps its stored precision.  The whole checkpoint is validated from the safetensors
headers before any tensor data is read.

Writing: `write_synthetic` (hub layout, random weights) and `save_transformers_layout`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from model.config import MimoConfig, load_config
from model.formats import fp8, mxfp4
from model.weights import BF16, FP8, FP32, MXFP4, StoredTensor, TensorSpec, Weights, expected_tensors, layer_prefix
from tilert.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3

# Stored float dtypes and the StoredTensor format each keeps (fp16 widens to fp32 exactly).
_FLOAT_FMT = {"BF16": BF16, "F32": FP32, "F16": FP32}
_FLOAT_TORCH = {BF16: torch.bfloat16, FP32: torch.float32}
_FP8_DTYPE = "F8_E4M3"
_U8 = "U8"
# Tensors a checkpoint may hold that the served model does not use: multi-token-prediction
# modules and rotary caches.
_KNOWN_EXTRAS = re.compile(r"^model\.mtp\.|(^|\.)rotary_emb\.|\.inv_freq$")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def load_config_only(path: str | Path) -> MimoConfig:
    return load_config(path)


# ==== reading ================================================================================

@dataclass(frozen=True)
class _Stored:
    """One tensor as the safetensors header describes it (no data read)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = {"F8_E4M3": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4}.get(self.dtype, 4)
        return size * math.prod(self.shape)


class _Checkpoint:
    """Header view of every tensor in a checkpoint directory; reads data on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.tensors: dict[str, _Stored] = {}
        self._handles: dict[Path, object] = {}
        files, weight_map = self._shard_files()
        for file in files:
            for name in self._open(file).keys():
                if name in self.tensors:
                    raise UserError(f"{file}: tensor {name} is also stored in {self.tensors[name].file}")
                sl = self._open(file).get_slice(name)
                self.tensors[name] = _Stored(name, file, sl.get_dtype(), tuple(sl.get_shape()))
        for name, fname in weight_map.items():
            if self.tensors.get(name) is None or self.tensors[name].file != root / fname:
                raise UserError(f"{root / INDEX_FILE}: tensor {name} is mapped to {fname}, which does not hold it")

    def _shard_files(self) -> tuple[list[Path], dict[str, str]]:
        index = self.root / INDEX_FILE
        if index.exists():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e!r})") from None
            for name, fname in weight_map.items():
                if not (self.root / fname).is_file():
                    raise UserError(f"{index}: tensor {name} is mapped to {fname}, which does not exist")
            return list(dict.fromkeys(self.root / f for f in weight_map.values())), weight_map
        if (self.root / SINGLE_FILE).exists():
            return [self.root / SINGLE_FILE], {}
        raise UserError(f"{self.root}: no {INDEX_FILE} or {SINGLE_FILE} found")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise UserError(f"{file}: not a readable safetensors file ({e})") from None
        return self._handles[file]

    def read(self, name: str, index=None) -> torch.Tensor:
        t = self.tensors[name]
        try:
            if index is None:
                return self._open(t.file).get_tensor(name)
            return self._open(t.file).get_slice(name)[index]
        except (SafetensorError, OSError) as e:
            raise UserError(f"{t.file}: cannot read tensor {name} ({e})") from None

    def get(self, name: str) -> _Stored | None:
        return self.tensors.get(name)


@dataclass
class _Recipe:
    """How to build some canonical tensors from some stored ones."""

    outputs: list[str]
    sources: list[str]
    build: Callable[[_Checkpoint], dict[str, StoredTensor]]


def _expect_shape(src: _Stored, shape: tuple[int, ...], what: str = "") -> None:
    if src.shape != tuple(shape):
        raise UserError(
            f"{src.file}: tensor {src.name}{what}: expected shape {list(shape)}, found {list(src.shape)}"
        )


def _float_fmt(src: _Stored) -> str:
    if src.dtype not in _FLOAT_FMT:
        raise UserError(
            f"{src.file}: tensor {src.name}: expected a float dtype ({', '.join(_FLOAT_FMT)}), found {src.dtype}"
        )
    return _FLOAT_FMT[src.dtype]


def _plain(ckpt: _Checkpoint, name: str, fmt: str, index=None) -> StoredTensor:
    t = ckpt.read(name, index).to(_FLOAT_TORCH[fmt]).contiguous()
    return StoredTensor(fmt, tuple(t.shape), t)


def _find(ckpt: _Checkpoint, names: list[str], spec: TensorSpec) -> _Stored:
    for n in names:
        if (src := ckpt.get(n)) is not None:
            return src
    raise UserError(
        f"{ckpt.root}: tensor {spec.name} (shape {list(spec.shape)}) is missing from the checkpoint"
    )


def _fp8_scale(ckpt: _Checkpoint, src: _Stored) -> _Stored:
    scale = ckpt.get(src.name + "_scale_inv")
    if scale is None:
        raise UserError(f"{src.file}: FP8 tensor {src.name} has no {src.name}_scale_inv block scales")
    _float_fmt(scale)
    return scale


def _fp8_grid(src: _Stored, scale: _Stored, segment_options: list[int]) -> int:
    """Rows after which the block grid restarts: the whole matrix, or a head / KV-group size.

    The first option whose grid shape matches wins, so when two grids have the same shape the
    plain one (listed first) is assumed.
    """
    rows, cols = src.shape
    col_blocks = -(-cols // fp8.BLOCK)
    for seg in segment_options:
        if seg > 0 and rows % seg == 0 and scale.shape == (rows // seg * -(-seg // fp8.BLOCK), col_blocks):
            return seg
    raise UserError(
        f"{scale.file}: tensor {scale.name}: expected shape {list(fp8.scale_shape(rows, cols))} "
        f"(128x128 block scales of {src.name} {list(src.shape)}), found {list(scale.shape)}"
    )


def _fp8_rows(q: torch.Tensor, scale: torch.Tensor, segment: int, ranges: list[tuple[int, int]]) -> StoredTensor:
    """Rows `ranges` of an FP8 matrix whose block grid restarts every `segment` rows, stacked.

    Stays FP8 when the pieces fall on whole blocks; otherwise the 128-row blocks of the result
    would mix scales, so it is dequantized (exactly, to fp32) instead of re-quantized.
    """
    blocks_per_segment = -(-segment // fp8.BLOCK)
    pieces = []
    for r0, r1 in ranges:
        seg, off = divmod(r0, segment)
        s0 = seg * blocks_per_segment + off // fp8.BLOCK
        s1 = seg * blocks_per_segment + -(-(off + r1 - r0) // fp8.BLOCK)
        pieces.append((q[r0:r1], scale[s0:s1], off % fp8.BLOCK))
    aligned = all(o == 0 for _, _, o in pieces) and all(p.shape[0] % fp8.BLOCK == 0 for p, _, _ in pieces[:-1])
    if aligned:
        data = torch.cat([p for p, _, _ in pieces]).contiguous()
        return StoredTensor(FP8, tuple(data.shape), data, torch.cat([s for _, s, _ in pieces]).contiguous())
    data = torch.cat([fp8.dequantize_rows(p, s, o) for p, s, o in pieces])
    return StoredTensor(FP32, tuple(data.shape), data)


def _single_recipe(cfg: MimoConfig, ckpt: _Checkpoint, spec: TensorSpec) -> _Recipe:
    names = [spec.name]
    if spec.name.endswith(".self_attn.attention_sink_bias"):
        names.append(spec.name.replace("attention_sink_bias", "sinks"))  # transformers' name
    src = _find(ckpt, names, spec)
    quantizable = spec.role in ("linear", "expert") and len(spec.shape) == 2

    if src.dtype == _FP8_DTYPE and quantizable:
        _expect_shape(src, spec.shape)
        scale = _fp8_scale(ckpt, src)
        segment = _fp8_grid(src, scale, [spec.shape[0], cfg.head_dim, cfg.v_head_dim])

        def build(c: _Checkpoint) -> dict[str, StoredTensor]:
            q, s = c.read(src.name), c.read(scale.name).to(torch.float32)
            if segment == spec.shape[0]:
                return {spec.name: StoredTensor(FP8, spec.shape, q, s)}
            ranges = [(r, r + segment) for r in range(0, spec.shape[0], segment)]
            return {spec.name: _fp8_rows(q, s, segment, ranges)}

        return _Recipe([spec.name], [src.name, scale.name], build)

    if src.dtype == _U8 and quantizable:
        out, k = spec.shape
        if k % mxfp4.GROUP:
            raise UserError(f"{src.file}: tensor {src.name}: MXFP4 needs a K dimension divisible by 32, K is {k}")
        _expect_shape(src, (out, k // 2), " (MXFP4 codes, two per byte)")
        scale = ckpt.get(src.name + "_scale")
        if scale is None:
            raise UserError(f"{src.file}: MXFP4 tensor {src.name} has no {src.name}_scale E8M0 scales")
        if scale.dtype != _U8:
            raise UserError(f"{scale.file}: tensor {scale.name}: expected dtype U8 (E8M0), found {scale.dtype}")
        _expect_shape(scale, (out, k // mxfp4.GROUP), " (E8M0 scales)")

        def build(c: _Checkpoint) -> dict[str, StoredTensor]:
            return {spec.name: StoredTensor(MXFP4, spec.shape, c.read(src.name), c.read(scale.name))}

        return _Recipe([spec.name], [src.name, scale.name], build)

    if src.dtype not in _FLOAT_FMT:
        allowed = ", ".join(list(_FLOAT_FMT) + ([_FP8_DTYPE, _U8] if quantizable else []))
        raise UserError(f"{src.file}: tensor {src.name}: expected dtype {allowed}, found {src.dtype}")
    _expect_shape(src, spec.shape)
    fmt = _FLOAT_FMT[src.dtype]
    return _Recipe([spec.name], [src.name], lambda c: {spec.name: _plain(c, src.name, fmt)})


def _fused_qkv_recipe(cfg: MimoConfig, ckpt: _Checkpoint, layer: int) -> _Recipe:
    """V2.5 `qkv_proj`: per KV head a [Q_i | K_i | V_i] group of rows (maybe padded to 128 rows)."""
    p = f"{layer_prefix(layer)}.self_attn"
    src = ckpt.get(f"{p}.qkv_proj.weight")
    kv, hd, vd, H = cfg.num_kv_heads(layer), cfg.head_dim, cfg.v_head_dim, cfg.hidden_size
    q_rows = cfg.num_attention_heads // kv * hd
    group = q_rows + hd + vd
    padded = -(-group // fp8.BLOCK) * fp8.BLOCK
    stride = next((s for s in (group, padded) if src.shape == (kv * s, H)), None)
    if stride is None:
        _expect_shape(src, (kv * group, H), f" ({kv} KV groups of {q_rows}+{hd}+{vd} rows)")
    parts = {
        f"{p}.q_proj.weight": [(g * stride, g * stride + q_rows) for g in range(kv)],
        f"{p}.k_proj.weight": [(g * stride + q_rows, g * stride + q_rows + hd) for g in range(kv)],
        f"{p}.v_proj.weight": [(g * stride + q_rows + hd, g * stride + group) for g in range(kv)],
    }
    sources = [src.name]
    if src.dtype == _FP8_DTYPE:
        scale = _fp8_scale(ckpt, src)
        segment = _fp8_grid(src, scale, [kv * stride, stride])
        sources.append(scale.name)

        def build(c: _Checkpoint) -> dict[str, StoredTensor]:
            q, s = c.read(src.name), c.read(scale.name).to(torch.float32)
            return {name: _fp8_rows(q, s, segment, ranges) for name, ranges in parts.items()}
    else:
        fmt = _float_fmt(src)

        def build(c: _Checkpoint) -> dict[str, StoredTensor]:
            w = _plain(c, src.name, fmt).data
            out = {}
            for name, ranges in parts.items():
                data = torch.cat([w[a:b] for a, b in ranges]).contiguous()
                out[name] = StoredTensor(fmt, tuple(data.shape), data)
            return out

    return _Recipe(list(parts), sources, build)


def _fused_experts_recipe(cfg: MimoConfig, ckpt: _Checkpoint, layer: int) -> _Recipe:
    """transformers' `gate_up_proj` [E, 2I, H] (rows 0:I gate, I:2I up) and `down_proj` [E, H, I]."""
    p = f"{layer_prefix(layer)}.mlp.experts"
    E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate_up, down = ckpt.get(f"{p}.gate_up_proj"), ckpt.get(f"{p}.down_proj")
    if down is None:
        raise UserError(f"{gate_up.file}: {gate_up.name} is stored but {p}.down_proj is missing")
    _expect_shape(gate_up, (E, 2 * I, H))
    _expect_shape(down, (E, H, I))
    fmt_gu, fmt_d = _float_fmt(gate_up), _float_fmt(down)
    outputs = [f"{p}.{e}.{proj}.weight" for e in range(E) for proj in ("gate_proj", "up_proj", "down_proj")]

    def build(c: _Checkpoint) -> dict[str, StoredTensor]:
        out = {}
        for e in range(E):  # expert by expert: never a second copy of the whole stack
            out[f"{p}.{e}.gate_proj.weight"] = _plain(c, gate_up.name, fmt_gu, (e, slice(0, I)))
            out[f"{p}.{e}.up_proj.weight"] = _plain(c, gate_up.name, fmt_gu, (e, slice(I, 2 * I)))
            out[f"{p}.{e}.down_proj.weight"] = _plain(c, down.name, fmt_d, e)
        return out

    return _Recipe(outputs, [gate_up.name, down.name], build)


def _plan(cfg: MimoConfig, ckpt: _Checkpoint) -> list[_Recipe]:
    recipes: list[_Recipe] = []
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        if ckpt.get(f"{p}.self_attn.qkv_proj.weight") is not None:
            recipes.append(_fused_qkv_recipe(cfg, ckpt, i))
        if cfg.is_moe(i) and ckpt.get(f"{p}.mlp.experts.gate_up_proj") is not None:
            recipes.append(_fused_experts_recipe(cfg, ckpt, i))
    covered = {name for r in recipes for name in r.outputs}
    recipes += [_single_recipe(cfg, ckpt, s) for s in expected_tensors(cfg) if s.name not in covered]
    return recipes


def _check_no_extras(cfg: MimoConfig, ckpt: _Checkpoint, recipes: list[_Recipe]) -> None:
    used = {name for r in recipes for name in r.sources}
    for name, src in ckpt.tensors.items():
        if name in used or _KNOWN_EXTRAS.search(name):
            continue
        m = _LAYER_INDEX.match(name)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            continue  # a layer beyond the ones asked for (--layers)
        raise UserError(
            f"{src.file}: unexpected tensor {src.name} ({src.dtype} {list(src.shape)}); "
            f"it is not part of a {cfg.model_type} model as config.json describes it"
        )


def load_checkpoint(path: str | Path, layers: int | None = None) -> tuple[MimoConfig, Weights]:
    """Load a checkpoint directory; `layers` keeps only the first layers (later ones are skipped)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: not a checkpoint directory")
    cfg = load_config(root)
    if layers:
        cfg = cfg.with_layers(layers)
    ckpt = _Checkpoint(root)
    recipes = _plan(cfg, ckpt)
    _check_no_extras(cfg, ckpt, recipes)

    # Read in file order, so a sharded checkpoint streams through each shard once.
    order = {f: k for k, f in enumerate(dict.fromkeys(t.file for t in ckpt.tensors.values()))}
    recipes.sort(key=lambda r: order[ckpt.tensors[r.sources[0]].file])
    total = sum(ckpt.tensors[n].nbytes for r in recipes for n in r.sources)
    weights: Weights = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {root.name}", disable=None) as bar:
        for r in recipes:
            weights.update(r.build(ckpt))
            bar.update(sum(ckpt.tensors[n].nbytes for n in r.sources))
    return cfg, weights


# ==== writing ================================================================================

@dataclass
class _Item:
    """Stored tensors to write, produced on demand so a writer holds one shard at a time."""

    nbytes: int
    make: Callable[[], dict[str, torch.Tensor]]


def _stored_bytes(spec: TensorSpec) -> int:
    n = math.prod(spec.shape)
    if spec.fmt == FP8:
        return n + 4 * math.prod(fp8.scale_shape(*spec.shape))
    if spec.fmt == MXFP4:
        return n // 2 + n // mxfp4.GROUP
    return n * (2 if spec.fmt == BF16 else 4)


def _hub_tensors(name: str, t: StoredTensor) -> dict[str, torch.Tensor]:
    """One StoredTensor under its hub names (weight + scale tensor for quantized formats)."""
    if t.fmt == FP8:
        return {name: t.data, name + "_scale_inv": t.scale}
    if t.fmt == MXFP4:
        return {name: t.data, name + "_scale": t.scale}
    return {name: t.data}


def _write_atomically(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Run `fill` on a temp dir beside out_dir and rename it into place: all or nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not an empty directory; choose a new one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        fill(tmp)
        _default_permissions(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(directory: Path) -> None:
    # mkdtemp (and safetensors' own temp files) are private (0700/0600); give the finished
    # checkpoint the permissions a plain mkdir/open would have.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def _write_shards(
    out: Path, items: list[_Item], shard_bytes: int, desc: str, single_file: bool = False
) -> None:
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = sum(i.nbytes for i in items)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        for k, shard in enumerate(shards):
            fname = SINGLE_FILE if single_file and n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for item in shard:
                tensors.update(item.make())
                bar.update(item.nbytes)
            tensors = {name: t.contiguous() for name, t in tensors.items()}
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
    if not (single_file and n == 1):
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(out: Path, config: dict) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- synthetic weights ------------------------------------------------------------------------

def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per tensor name: values do not depend on write order or on the layer count.
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def synthetic_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Deterministic float32 values for one tensor, scaled so activations stay O(1) over depth."""
    g = _generator(seed, spec.name)
    x = torch.randn(spec.shape, generator=g, dtype=torch.float32)
    if spec.name.endswith("layernorm.weight") or spec.name == "model.norm.weight":
        return 1.0 + 0.1 * x
    if spec.name.endswith("e_score_correction_bias"):
        return 0.01 * x
    if spec.role == "embedding" or spec.name.endswith("attention_sink_bias"):
        return x
    if len(spec.shape) == 2:  # a linear map y = W h: unit-variance inputs give unit-variance outputs
        return x.mul_(spec.shape[1] ** -0.5)
    return x


def write_synthetic(
    cfg: MimoConfig, out_dir: str | Path, seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    """Write a random checkpoint in the hub layout, every tensor in its TensorSpec format."""

    def item(spec: TensorSpec) -> _Item:
        return _Item(_stored_bytes(spec), lambda: _hub_tensors(
            spec.name, StoredTensor.from_float(synthetic_tensor(spec, seed), spec.fmt)))

    def fill(tmp: Path) -> None:
        _write_config(tmp, cfg.to_hub_config())
        _write_shards(tmp, [item(s) for s in expected_tensors(cfg)], shard_bytes, desc="synth")

    _write_atomically(Path(out_dir), fill)


def write_checkpoint(
    cfg: MimoConfig, weights: dict[str, StoredTensor], out_dir: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES,
    single_file: bool = False, extra: Callable[[Path], None] | None = None,
) -> None:
    """Write `weights` (canonical names, as stored) in the hub layout, atomically; `extra(tmp)`
    may add files (a tokenizer) to the directory before it is moved into place."""
    items = [_Item(t.nbytes, (lambda n=name, t=t: _hub_tensors(n, t))) for name, t in weights.items()]

    def fill(tmp: Path) -> None:
        _write_config(tmp, cfg.to_hub_config())
        _write_shards(tmp, items, shard_bytes, desc="write", single_file=single_file)
        if extra is not None:
            extra(tmp)

    _write_atomically(Path(out_dir), fill)


# ---- transformers layout ----------------------------------------------------------------------

def save_transformers_layout(
    cfg: MimoConfig, weights: Weights, out_dir: str | Path, dtype: torch.dtype = torch.float32,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write dequantized weights as transformers' MiMoV2FlashForCausalLM holds them in memory."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"save_transformers_layout writes float32 or bfloat16, not {dtype}")
    E = cfg.n_routed_experts

    def one(name: str, out_name: str | None = None) -> _Item:
        t = weights[name]
        return _Item(math.prod(t.shape) * dtype.itemsize, lambda: {out_name or name: t.dequantize(dtype)})

    def experts(p: str) -> list[_Item]:
        def stack(projs: tuple[str, ...]) -> torch.Tensor:
            return torch.stack([torch.cat([weights[f"{p}.{e}.{proj}.weight"].dequantize(dtype) for proj in projs])
                                for e in range(E)])
        n = math.prod(weights[f"{p}.0.gate_proj.weight"].shape) * E * dtype.itemsize
        return [_Item(2 * n, lambda: {f"{p}.gate_up_proj": stack(("gate_proj", "up_proj"))}),
                _Item(n, lambda: {f"{p}.down_proj": stack(("down_proj",))})]

    items: list[_Item] = []
    done: set[str] = set()
    for spec in expected_tensors(cfg):
        if spec.role == "expert":
            p = spec.name.rsplit(".", 3)[0]  # model.layers.N.mlp.experts
            if p not in done:
                done.add(p)
                items += experts(p)
        elif spec.name.endswith(".attention_sink_bias"):
            items.append(one(spec.name, spec.name.replace("attention_sink_bias", "sinks")))
        else:
            items.append(one(spec.name))

    config = {"architectures": ["MiMoV2FlashForCausalLM"], **cfg.to_transformers_config(),
              "torch_dtype": "float32" if dtype == torch.float32 else "bfloat16"}

    def fill(tmp: Path) -> None:
        _write_config(tmp, config)
        _write_shards(tmp, items, shard_bytes, desc="save", single_file=True)

    _write_atomically(Path(out_dir), fill)
