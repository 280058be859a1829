"""Read and write a DFlash drafter checkpoint: `dflash_config.json` plus `model.safetensors`.

The directory (conventionally `draft/` inside the target's checkpoint directory) holds
- `dflash_config.json`: the `DFlashConfig` fields (`target_layers` as a list);
- `model.safetensors`: exactly the tensors `expected_draft_tensors` lists, under those names, in
  a float dtype (bf16 as written by `save_drafter`; the sink logits fp32).  The drafter has no
  embedding or head: it borrows the target's.
Every tensor keeps its stored precision (a `StoredTensor` in bf16 or fp32); the whole file is
checked against the config from the safetensors header before any data is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.dflash import DFlashConfig, expected_draft_tensors
from model.weights import BF16, FP32, StoredTensor
from tilert.errors import UserError

CONFIG_FILE = "dflash_config.json"
WEIGHTS_FILE = "model.safetensors"
_FLOAT_FMT = {"BF16": BF16, "F32": FP32, "F16": FP32}
_TORCH = {BF16: torch.bfloat16, FP32: torch.float32}


def drafter_config_to_dict(dcfg: DFlashConfig) -> dict:
    d = dataclasses.asdict(dcfg)
    d["target_layers"] = list(dcfg.target_layers)
    return d


def drafter_config_from_dict(d: dict, source: str = CONFIG_FILE) -> DFlashConfig:
    names = {f.name for f in dataclasses.fields(DFlashConfig)}
    required = {f.name for f in dataclasses.fields(DFlashConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(d))
    if missing:
        raise UserError(f"{source}: missing required key(s) {', '.join(missing)}")
    kw = {k: v for k, v in d.items() if k in names}
    kw["target_layers"] = tuple(int(x) for x in kw["target_layers"])
    try:
        return DFlashConfig(**kw).validate()
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None


def load_drafter(path: str | Path) -> tuple[DFlashConfig, dict[str, StoredTensor]]:
    """(DFlashConfig, {canonical name: StoredTensor}) from a drafter directory."""
    root = Path(path)
    cfg_file, w_file = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise UserError(f"{root}: no {CONFIG_FILE} found (not a DFlash drafter directory)")
    if not w_file.is_file():
        raise UserError(f"{root}: no {WEIGHTS_FILE} found")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
    dcfg = drafter_config_from_dict(d, str(cfg_file))
    try:
        f = safe_open(str(w_file), framework="pt")
        header = {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{w_file}: not a readable safetensors file ({e})") from None

    specs = expected_draft_tensors(dcfg)
    expected = {s.name for s in specs}
    extra = sorted(set(header) - expected)
    if extra:
        raise UserError(f"{w_file}: unexpected tensor {extra[0]}; it is not part of the drafter {CONFIG_FILE} describes")
    for s in specs:
        if s.name not in header:
            raise UserError(f"{w_file}: tensor {s.name} (shape {list(s.shape)}) is missing")
        dtype, shape = header[s.name]
        if dtype not in _FLOAT_FMT:
            raise UserError(f"{w_file}: tensor {s.name}: expected a float dtype ({', '.join(_FLOAT_FMT)}), "
                            f"found {dtype}")
        if shape != s.shape:
            raise UserError(f"{w_file}: tensor {s.name}: expected shape {list(s.shape)}, found {list(shape)}")

    weights = {}
    for s in specs:
        fmt = _FLOAT_FMT[header[s.name][0]]
        t = f.get_tensor(s.name).to(_TORCH[fmt]).contiguous()
        weights[s.name] = StoredTensor(fmt, s.shape, t)
    return dcfg, weights


def save_drafter(dcfg: DFlashConfig, weights: dict[str, torch.Tensor | StoredTensor], out_dir: str | Path) -> None:
    """Write a drafter directory; float tensors are stored in their TensorSpec format (bf16, sinks fp32)."""
    out = Path(out_dir)
    specs = expected_draft_tensors(dcfg.validate())
    missing = [s.name for s in specs if s.name not in weights]
    if missing:
        raise ValueError(f"save_drafter: missing tensors {missing[:3]}")
    tensors = {}
    for s in specs:
        w = weights[s.name]
        st = w if isinstance(w, StoredTensor) else StoredTensor.from_float(w.detach().to(torch.float32), s.fmt)
        if st.fmt not in (BF16, FP32) or tuple(st.shape) != s.shape:
            raise ValueError(f"save_drafter: {s.name} must be a bf16/fp32 tensor of shape {s.shape}")
        tensors[s.name] = st.data.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(drafter_config_to_dict(dcfg), indent=2) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    (out / WEIGHTS_FILE).chmod(0o666 & ~umask)  # safetensors writes a private (0600) file
