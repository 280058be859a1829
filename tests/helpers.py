"""Test helpers: random fp32 weights for a target or a drafter, and the same weights in transformers."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from model.config import DENSE, FULL, SLIDING, SPARSE, MimoConfig, preset
from model.weights import FP32, StoredTensor, TensorSpec, expected_tensors, layer_prefix


def _random_tensor(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """Scales chosen so activations stay O(1) through many layers."""
    n = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    name = spec.name
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * n
    if name.endswith("attention_sink_bias") or name == "mask_embedding" or spec.role == "embedding":
        return n
    if name.endswith("e_score_correction_bias"):
        return 0.01 * n
    return n / spec.shape[1] ** 0.5  # a linear map: N(0, 1/in)


def random_stored(specs: list[TensorSpec], seed: int) -> dict[str, StoredTensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s.name: StoredTensor(FP32, s.shape, _random_tensor(s, gen)) for s in specs}


def random_weights(cfg: MimoConfig, seed: int = 0) -> dict[str, StoredTensor]:
    """fp32 StoredTensors for every tensor of the target model."""
    return random_stored(expected_tensors(cfg), seed)


def random_draft_weights(dcfg, seed: int = 0) -> dict[str, StoredTensor]:
    """fp32 StoredTensors for every tensor of a DFlash drafter."""
    from model.dflash import expected_draft_tensors

    return random_stored(expected_draft_tensors(dcfg), seed)


def transformers_model(cfg: MimoConfig, weights: dict[str, StoredTensor], dtype: torch.dtype = torch.float32):
    """transformers' MiMoV2FlashForCausalLM (eager attention) holding the same weights.

    In a lower dtype it is laid out as from_pretrained(dtype=...) would: the router weight and
    correction bias stay fp32 (_keep_in_fp32_modules_strict) and so do the RoPE inverse
    frequencies (a plain .to(dtype) would round them).
    """
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    tcfg = MiMoV2FlashConfig(**cfg.to_transformers_config())
    tcfg._attn_implementation = "eager"
    model = MiMoV2FlashForCausalLM(tcfg).eval()

    w = lambda name: weights[name].dequantize(torch.float32)
    state = {name: w(name) for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        names = [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.self_attn.{m}_proj.weight" for m in "qkvo"]
        if cfg.is_moe(i):
            names += [f"{p}.mlp.gate.weight", f"{p}.mlp.gate.e_score_correction_bias"]
            experts = range(cfg.n_routed_experts)
            gate_up = [torch.cat([w(f"{p}.mlp.experts.{e}.gate_proj.weight"),
                                  w(f"{p}.mlp.experts.{e}.up_proj.weight")]) for e in experts]
            state[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)  # [E, 2I, H]
            state[f"{p}.mlp.experts.down_proj"] = torch.stack(
                [w(f"{p}.mlp.experts.{e}.down_proj.weight") for e in experts])  # [E, H, I]
        else:
            names += [f"{p}.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
        if cfg.has_sink(i):
            state[f"{p}.self_attn.sinks"] = w(f"{p}.self_attn.attention_sink_bias")
        state.update({n: w(n) for n in names})

    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only the non-persistent RoPE buffers may stay as initialised.
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    if dtype != torch.float32:
        keep = {n: t.clone() for n, t in model.named_buffers() if "inv_freq" in n or "e_score" in n}
        keep.update({n: t.detach().clone() for n, t in model.named_parameters() if n.endswith("mlp.gate.weight")})
        model.to(dtype)
        for name, t in keep.items():
            module_name, _, attr = name.rpartition(".")
            getattr(model.get_submodule(module_name), attr).data = t
    return model


@st.composite
def small_configs(draw) -> MimoConfig:
    """Random small MiMo geometries that transformers can also build (SWA KV = 2 x GA KV)."""
    ga_kv = draw(st.sampled_from([1, 2]))
    swa_kv = 2 * ga_kv  # transformers ties SWA KV heads to 2 x GA KV heads
    heads = swa_kv * draw(st.sampled_from([1, 2]))
    head_dim, factor = draw(st.sampled_from([(8, 0.25), (12, 0.334), (16, 0.5), (16, 1.0), (24, 0.334)]))
    n = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 6))
    base = preset("mimo-tiny")
    return dataclasses.replace(
        base,
        vocab_size=64,
        hidden_size=draw(st.sampled_from([16, 32])),
        intermediate_size=24,
        num_attention_heads=heads,
        ga_num_kv_heads=ga_kv,
        swa_num_kv_heads=swa_kv,
        head_dim=head_dim,
        v_head_dim=draw(st.sampled_from([8, 16])),
        partial_rotary_factor=factor,
        sliding_window=draw(st.integers(1, 8)),
        layer_types=tuple(draw(st.lists(st.sampled_from([FULL, SLIDING]), min_size=n, max_size=n))),
        mlp_layer_types=tuple(draw(st.lists(st.sampled_from([DENSE, SPARSE]), min_size=n, max_size=n))),
        attention_value_scale=draw(st.sampled_from([1.0, 0.707])),
        n_routed_experts=experts,
        num_experts_per_tok=draw(st.integers(1, min(3, experts))),
        moe_intermediate_size=8,
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
    ).validate()


