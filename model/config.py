"""MiMo-V2 model geometry: one canonical config, read from either flavour of `config.json`.

Two flavours of `config.json` exist for the same architecture:
- the Hugging Face hub checkpoint's own keys (`hybrid_layer_pattern`, `sliding_window_size`
  counting only the *previous* tokens, `swa_*` overrides, ...);
- transformers' `MiMoV2FlashConfig` (`layer_types`, `sliding_window` counting the query too,
  `rope_parameters` per layer type, SWA KV heads = 2 x `num_key_value_heads`).

`MimoConfig` is the one shape the rest of tilert reads.  Its `sliding_window` follows
transformers: the number of keys a query sees, the query included.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilert.errors import UserError

FULL = "full_attention"
SLIDING = "sliding_attention"
DENSE = "dense"
SPARSE = "sparse"
SUPPORTED_MODEL_TYPES = ("mimo_v2_flash", "mimo_v2")


@dataclass(frozen=True)
class MimoConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    ga_num_kv_heads: int
    swa_num_kv_heads: int
    head_dim: int  # q/k head dim
    v_head_dim: int
    sliding_window: int  # keys visible to a query in SWA layers, the query included
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    ga_rope_theta: float
    swa_rope_theta: float
    partial_rotary_factor: float
    attention_value_scale: float
    rms_norm_eps: float
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    swa_sinks: bool = True
    ga_sinks: bool = False
    max_position_embeddings: int = 262144
    bos_token_id: int | None = 1
    eos_token_id: int | None = None
    # Storage formats a synthetic checkpoint of this model uses (hub conventions).
    expert_format: str = "fp8"  # "fp8" (V2-Flash hub) or "mxfp4" (V2.5 hub)
    router_dtype: str = "fp32"

    # ---- derived geometry -------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def rotary_dim(self) -> int:
        # transformers: int(head_dim * partial_rotary_factor); 192 * 0.334 -> 64.
        return int(self.head_dim * self.partial_rotary_factor)

    def is_swa(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def is_moe(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == SPARSE

    def num_kv_heads(self, layer: int) -> int:
        return self.swa_num_kv_heads if self.is_swa(layer) else self.ga_num_kv_heads

    def rope_theta(self, layer: int) -> float:
        return self.swa_rope_theta if self.is_swa(layer) else self.ga_rope_theta

    def has_sink(self, layer: int) -> bool:
        return self.swa_sinks if self.is_swa(layer) else self.ga_sinks

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    def with_layers(self, n: int) -> "MimoConfig":
        """Keep the first `n` layers (benchmarks that must fit one GPU)."""
        if not 1 <= n <= self.num_hidden_layers:
            raise UserError(f"--layers {n}: must be between 1 and {self.num_hidden_layers}")
        return dataclasses.replace(
            self, layer_types=self.layer_types[:n], mlp_layer_types=self.mlp_layer_types[:n]
        )

    def validate(self) -> "MimoConfig":
        problems = []
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            problems.append(f"rotary dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        for name in ("ga_num_kv_heads", "swa_num_kv_heads"):
            if self.num_attention_heads % getattr(self, name):
                problems.append(f"num_attention_heads {self.num_attention_heads} not divisible by {name}")
        if len(self.layer_types) != len(self.mlp_layer_types):
            problems.append("layer_types and mlp_layer_types differ in length")
        if any(t not in (FULL, SLIDING) for t in self.layer_types):
            problems.append(f"unknown layer type in {sorted(set(self.layer_types))}")
        if any(t not in (DENSE, SPARSE) for t in self.mlp_layer_types):
            problems.append(f"unknown mlp layer type in {sorted(set(self.mlp_layer_types))}")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append("num_experts_per_tok exceeds n_routed_experts")
        if self.sliding_window < 1:
            problems.append("sliding_window must count at least the query")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))
        return self

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["mlp_layer_types"] = list(self.mlp_layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MimoConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["layer_types"] = tuple(kw["layer_types"])
        kw["mlp_layer_types"] = tuple(kw["mlp_layer_types"])
        return cls(**kw).validate()

    def to_hub_config(self) -> dict[str, Any]:
        """The hub flavour of config.json (what `tilert synth` writes)."""
        n = self.num_hidden_layers
        return {
            "architectures": ["MiMoV2FlashForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": n,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.ga_num_kv_heads,
            "swa_num_attention_heads": self.num_attention_heads,
            "swa_num_key_value_heads": self.swa_num_kv_heads,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "swa_head_dim": self.head_dim,
            "swa_v_head_dim": self.v_head_dim,
            "hybrid_layer_pattern": [1 if t == SLIDING else 0 for t in self.layer_types],
            "moe_layer_freq": [1 if t == SPARSE else 0 for t in self.mlp_layer_types],
            "sliding_window_size": self.sliding_window - 1,
            "rope_theta": self.ga_rope_theta,
            "swa_rope_theta": self.swa_rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "attention_value_scale": self.attention_value_scale,
            "add_swa_attention_sink_bias": self.swa_sinks,
            "add_full_attention_sink_bias": self.ga_sinks,
            "layernorm_epsilon": self.rms_norm_eps,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "n_group": 1,
            "topk_group": 1,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
            },
            "tilert_expert_format": self.expert_format,
        }

    def to_transformers_config(self) -> dict[str, Any]:
        """The transformers flavour (MiMoV2FlashConfig keyword arguments)."""
        if self.swa_num_kv_heads != 2 * self.ga_num_kv_heads:
            raise UserError(
                "transformers' MiMoV2FlashConfig needs SWA KV heads = 2 x GA KV heads; "
                f"this model has {self.swa_num_kv_heads} and {self.ga_num_kv_heads}"
            )
        return {
            "model_type": "mimo_v2_flash",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.ga_num_kv_heads,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "mlp_layer_types": list(self.mlp_layer_types),
            "rope_parameters": {
                FULL: {"rope_type": "default", "rope_theta": self.ga_rope_theta,
                       "partial_rotary_factor": self.partial_rotary_factor},
                SLIDING: {"rope_type": "default", "rope_theta": self.swa_rope_theta,
                          "partial_rotary_factor": self.partial_rotary_factor},
            },
            "attention_value_scale": self.attention_value_scale,
            "rms_norm_eps": self.rms_norm_eps,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
        }


def _pattern(d: dict, key: str, n: int, one: str, zero: str) -> tuple[str, ...] | None:
    pat = d.get(key)
    if pat is None:
        return None
    if isinstance(pat, int):  # moe_layer_freq may be a frequency in some configs
        return tuple(one if (i % pat == pat - 1 and i > 0) else zero for i in range(n))
    if len(pat) != n:
        raise UserError(f"config.json: {key} has {len(pat)} entries but num_hidden_layers is {n}")
    return tuple(one if int(v) else zero for v in pat)


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> MimoConfig:
    """Read either flavour of config.json into a MimoConfig."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{source}: unknown model_type {model_type!r}; tilert supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        n = int(d["num_hidden_layers"])
        heads = int(d["num_attention_heads"])
        kv = int(d["num_key_value_heads"])
        hidden = int(d["hidden_size"])
    except KeyError as e:
        raise UserError(f"{source}: missing required key {e.args[0]!r}") from None
    head_dim = int(d.get("head_dim") or hidden // heads)
    is_transformers = "layer_types" in d or "rope_parameters" in d or "sliding_window" in d and "sliding_window_size" not in d

    if is_transformers:
        layer_types = tuple(d.get("layer_types") or [
            FULL if (i == 0 or (i + 1) % 6 == 0) else SLIDING for i in range(n)])
        mlp_types = tuple(d.get("mlp_layer_types") or [DENSE] + [SPARSE] * (n - 1))
        rope = d.get("rope_parameters") or {}
        ga_rope = rope.get(FULL) or {}
        swa_rope = rope.get(SLIDING) or {}
        ga_theta = float(ga_rope.get("rope_theta", d.get("rope_theta", 5_000_000.0)))
        swa_theta = float(swa_rope.get("rope_theta", 10_000.0))
        prf = float(ga_rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.334)))
        window = int(d.get("sliding_window") or 129)  # counts the query
        if d.get("sliding_window_size") is not None:
            window = int(d["sliding_window_size"]) + 1
        swa_kv = 2 * kv
        swa_sinks, ga_sinks = True, False
        eps = float(d.get("rms_norm_eps", 1e-5))
    else:
        layer_types = _pattern(d, "hybrid_layer_pattern", n, SLIDING, FULL) or tuple(
            FULL if (i == 0 or (i + 1) % 6 == 0) else SLIDING for i in range(n))
        mlp_types = _pattern(d, "moe_layer_freq", n, SPARSE, DENSE) or tuple([DENSE] + [SPARSE] * (n - 1))
        ga_theta = float(d.get("rope_theta", 5_000_000.0))
        swa_theta = float(d.get("swa_rope_theta", 10_000.0))
        prf = float(d.get("partial_rotary_factor", 0.334))
        if d.get("sliding_window_size") is not None:
            window = int(d["sliding_window_size"]) + 1  # hub: previous tokens only
        else:
            window = int(d.get("sliding_window") or 128) + 1
        swa_kv = int(d.get("swa_num_key_value_heads", 2 * kv))
        if int(d.get("swa_num_attention_heads", heads)) != heads:
            raise UserError(f"{source}: swa_num_attention_heads differs from num_attention_heads; not supported")
        if int(d.get("swa_head_dim", head_dim)) != head_dim:
            raise UserError(f"{source}: swa_head_dim differs from head_dim; not supported")
        swa_sinks = bool(d.get("add_swa_attention_sink_bias", True))
        ga_sinks = bool(d.get("add_full_attention_sink_bias", False))
        eps = float(d.get("layernorm_epsilon", d.get("rms_norm_eps", 1e-5)))

    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    vscale = d.get("attention_value_scale")
    cfg = MimoConfig(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_attention_heads=heads,
        ga_num_kv_heads=kv,
        swa_num_kv_heads=swa_kv,
        head_dim=head_dim,
        v_head_dim=int(d.get("v_head_dim") or head_dim),
        sliding_window=window,
        layer_types=layer_types,
        mlp_layer_types=mlp_types,
        ga_rope_theta=ga_theta,
        swa_rope_theta=swa_theta,
        partial_rotary_factor=prf,
        attention_value_scale=float(vscale) if vscale is not None else 1.0,
        rms_norm_eps=eps,
        n_routed_experts=int(d.get("n_routed_experts", 256)),
        num_experts_per_tok=int(d.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(d.get("moe_intermediate_size", 2048)),
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor") or 1.0),
        swa_sinks=swa_sinks,
        ga_sinks=ga_sinks,
        max_position_embeddings=int(d.get("max_position_embeddings", 262144)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        expert_format=d.get("tilert_expert_format", "mxfp4" if model_type == "mimo_v2" else "fp8"),
        router_dtype="bf16" if model_type == "mimo_v2" else "fp32",
    )
    if int(d.get("n_group", 1)) != 1 or int(d.get("topk_group", 1)) != 1:
        raise UserError(f"{source}: grouped top-k routing (n_group > 1) is not supported")
    return cfg.validate()


def load_config(path: str | Path) -> MimoConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise UserError(f"{path}: no config.json found")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(d, source=str(path))


# ---- presets -------------------------------------------------------------------------------

def _hybrid(n: int, period: int) -> tuple[str, ...]:
    return tuple(FULL if (i == 0 or (i + 1) % period == 0) else SLIDING for i in range(n))


def _mimo_tiny() -> MimoConfig:
    # Every structural feature at toy size: GA and SWA layers with different KV-head counts,
    # qk dim != v dim, partial RoPE with per-type theta, sinks on SWA only, value scale,
    # a dense first layer then MoE layers, and a window small enough to wrap the ring often.
    n = 4
    return MimoConfig(
        model_type="mimo_v2_flash",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        ga_num_kv_heads=1,
        swa_num_kv_heads=2,
        head_dim=24,
        v_head_dim=16,
        sliding_window=9,
        layer_types=_hybrid(n, 3),  # GA, SWA, GA, SWA
        mlp_layer_types=tuple([DENSE] + [SPARSE] * (n - 1)),
        ga_rope_theta=5_000_000.0,
        swa_rope_theta=10_000.0,
        partial_rotary_factor=0.334,
        attention_value_scale=0.707,
        rms_norm_eps=1e-5,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=None,
        expert_format="fp8",
    ).validate()


def _mimo_v2_flash() -> MimoConfig:
    n = 48
    return MimoConfig(
        model_type="mimo_v2_flash",
        vocab_size=152576,
        hidden_size=4096,
        intermediate_size=16384,
        num_attention_heads=64,
        ga_num_kv_heads=4,
        swa_num_kv_heads=8,
        head_dim=192,
        v_head_dim=128,
        sliding_window=129,
        layer_types=_hybrid(n, 6),
        mlp_layer_types=tuple([DENSE] + [SPARSE] * (n - 1)),
        ga_rope_theta=5_000_000.0,
        swa_rope_theta=10_000.0,
        partial_rotary_factor=0.334,
        attention_value_scale=0.707,
        rms_norm_eps=1e-5,
        n_routed_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=2048,
        expert_format="fp8",
    ).validate()


def _mimo_v25_pro() -> MimoConfig:
    n = 70
    ga = {0, 7, 15, 23, 31, 39, 47, 55, 62, 69}
    return MimoConfig(
        model_type="mimo_v2",
        vocab_size=152576,
        hidden_size=6144,
        intermediate_size=16384,
        num_attention_heads=128,
        ga_num_kv_heads=8,
        swa_num_kv_heads=8,
        head_dim=192,
        v_head_dim=128,
        sliding_window=129,
        layer_types=tuple(FULL if i in ga else SLIDING for i in range(n)),
        mlp_layer_types=tuple([DENSE] + [SPARSE] * (n - 1)),
        ga_rope_theta=10_000_000.0,
        swa_rope_theta=10_000.0,
        partial_rotary_factor=0.334,
        attention_value_scale=0.612,
        rms_norm_eps=1e-5,
        n_routed_experts=384,
        num_experts_per_tok=8,
        moe_intermediate_size=2048,
        expert_format="mxfp4",
        router_dtype="bf16",
    ).validate()


PRESETS = {
    "mimo-tiny": _mimo_tiny,
    "mimo-v2-flash": _mimo_v2_flash,
    "mimo-v2.5-pro": _mimo_v25_pro,
}


def preset(name: str, layers: int | None = None, expert_format: str | None = None) -> MimoConfig:
    """A model config by name; `layers`: its first layers only; `expert_format`: the routed
    experts stored in that format instead (benchmarks run mimo-v2-flash cuts with MXFP4 experts)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg = cfg.with_layers(layers) if layers else cfg
    return dataclasses.replace(cfg, expert_format=expert_format) if expert_format else cfg
