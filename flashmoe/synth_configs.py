"""A tiny ``config.json`` for any mlx-lm architecture, from its ``ModelArgs`` alone.

``synth`` has hand-written configs, as published, for a few architectures; for the others it
fills mlx-lm's ``ModelArgs`` fields by name (sizes from ``Dims``: hidden, experts, top-k, layers)
and by type, so every mixture-of-experts model in mlx-lm can be synthesized in the ``mlx``
layout. A field it cannot fill makes ``generic_config`` fail with the field's name.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing

from flashmoe.errors import FlashMoeError


def _sizes(d) -> dict:
    heads = max(2, d.hidden // 32)
    return {
        "hidden_size": d.hidden, "num_hidden_layers": d.layers, "num_layers": d.layers,
        "intermediate_size": 2 * d.hidden, "ffn_hidden_size": 2 * d.hidden,
        "moe_intermediate_size": d.moe_inter, "expert_ffn_hidden_size": d.moe_inter,
        "shared_expert_intermediate_size": d.moe_inter, "shared_intermediate_size": d.moe_inter,
        "num_attention_heads": heads, "num_key_value_heads": heads // 2,
        "num_attention_groups": heads // 2, "swa_num_attention_heads": heads,
        "swa_num_key_value_heads": heads // 2, "head_dim": 32, "swa_head_dim": 32,
        "v_head_dim": 32, "swa_v_head_dim": 32, "vocab_size": d.vocab,
        "num_experts": d.experts, "n_routed_experts": d.experts, "num_local_experts": d.experts,
        "moe_num_experts": d.experts, "num_experts_per_tok": d.topk, "moe_topk": d.topk,
        "moe_k": d.topk, "top_k": d.topk, "moe_top_k": d.topk, "num_experts_per_token": d.topk,
        "n_shared_experts": 1,
        "num_shared_experts": 1,
        "num_shared_expert": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
        "num_dense_layers": 0, "moe_layer_freq": 1, "decoder_sparse_step": 1,
        "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
        "rotary_dim": 16, "index_head_dim": 32, "index_n_heads": 2, "index_topk": 4,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "conv_kernel": 4,
        "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1,
        "mamba_d_conv": 4, "mamba_d_state": 16, "mamba_expand": 2, "conv_L_cache": 3,
    }


def _fills() -> dict:
    # settings, not sizes: used only where ModelArgs has no default of its own
    return {
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 4096, "model_max_length": 4096, "sliding_window": 64,
        "sliding_window_size": 64, "rms_norm_eps": 1e-6, "norm_eps": 1e-6,
        "layernorm_epsilon": 1e-6, "layer_norm_epsilon": 1e-6, "rope_theta": 10000.0,
        "swa_rope_theta": 10000.0, "routed_scaling_factor": 1.0, "partial_rotary_factor": 1.0,
        "norm_topk_prob": True, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_only_layers": [], "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "use_qk_norm": False, "use_bias": False, "mlp_bias": False, "rope_scaling": None,
        "logits_scaling": 1.0, "attention_multiplier": 1.0, "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0, "zero_expert_num": 0, "zero_expert_type": "identity",
        "layer_group_size": 1, "group_norm_size": 1, "cla_share_factor": 1,
        "attn_layer_offset": 0, "attn_layer_period": 1, "expert_layer_offset": 0,
        "expert_layer_period": 1, "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
    }


def _special(arch: str, d) -> dict:
    """Settings some architectures need that no name or type rule gives."""
    half = max(1, d.layers // 2)
    full = {"rope_theta": 10000.0, "rope_type": "default"}
    kda = {"kda_layers": [1], "num_heads": 2, "head_dim": 32, "short_conv_kernel_size": 4}
    return {
        "granitemoehybrid": {"layer_types": ["attention"] * d.layers},
        "glm_moe_dsa": {"rope_parameters": full},
        "mellum": {"layer_types": ["full_attention"] * d.layers,
                   "rope_parameters": {"full_attention": full}},
        "longcat_flash": {"attention_method": "MLA"},
        # mlx-lm's llama4 routes one expert per token; its fourth layer is the first global one
        "muse_spark": {"num_shared_experts": 0, "moe_hidden_size": d.moe_inter},
        "llama4": {"num_experts_per_tok": 1, "num_hidden_layers": max(4, d.layers)},
        "deepseek_v2": {"rope_scaling": {
            "factor": 1.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "type": "yarn"}},
        "hunyuan": {"rope_scaling": {"alpha": 1.0, "factor": 1.0, "type": "dynamic"}},
        "kimi_linear": {"linear_attn_config": kda},
        "kimi_k3": {"linear_attn_config": kda},
        "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # a mamba and an attention
        "mimo_v2_flash": {"hybrid_layer_pattern": [0, 1] * half, "num_hidden_layers": 2 * half,
                          "moe_layer_freq": [1] * (2 * half)},
        "minimax_m3_vl": {"moe_layer_freq": [1] * d.layers},
        "lfm2_moe": {"layer_types": ["conv", "full_attention"] * half,
                     "num_hidden_layers": 2 * half},
        "nemotron_h": {"hybrid_override_pattern": ["M", "*", "E"], "num_hidden_layers": 3,
                       "routed_scaling_factor": 1.0},
        "gemma4_text": {"layer_types": ["sliding_attention", "full_attention"] * half,
                        "num_kv_shared_layers": 0, "enable_moe_block": True,
                        "top_k_experts": d.topk,
                        "num_hidden_layers": 2 * half},
        "mistral4": {"rope_parameters": {**full, "llama_4_scaling_beta": 0.1,
                                         "original_max_position_embeddings": 4096}},
    }.get(arch, {})


def generic_config(arch: str, d) -> dict:
    """A config for mlx-lm's ``arch`` at the sizes ``d`` (a ``synth.Dims``)."""
    try:
        module = importlib.import_module(f"mlx_lm.models.{arch}")
        args_class = module.ModelArgs
    except (ImportError, AttributeError):
        raise FlashMoeError(f"mlx-lm has no model {arch!r}") from None
    fills = {**_fills(), **_special(arch, d)}
    config = _fill_dataclass(arch, args_class, d, _sizes(d), fills)
    return {"model_type": arch, **config, **_special(arch, d)}


def _fill_dataclass(arch: str, args_class, d, sizes: dict, fills: dict) -> dict:
    hints = typing.get_type_hints(args_class)
    config: dict = {}
    for f in dataclasses.fields(args_class):
        if f.name in sizes:
            config[f.name] = sizes[f.name]
        elif f.name == "model_type":
            continue
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            config[f.name] = fills[f.name] if f.name in fills else _by_type(
                arch, f.name, hints.get(f.name), d)
    return config


def _by_type(arch: str, name: str, hint, d):
    # a nested settings class (text_config of multimodal wrappers): filled the same way
    for inner in typing.get_args(hint) or (hint,):
        if dataclasses.is_dataclass(inner):
            inner_type = inner.__module__.rsplit(".", 1)[-1]
            special = _special(inner_type, d)
            cfg = _fill_dataclass(arch, inner, d, _sizes(d), {**_fills(), **special})
            return {**cfg, **special, "model_type": inner_type}
    if name == "layer_types":
        return ["full_attention"] * d.layers
    if name == "is_moe_layer":
        return [True] * d.layers
    if hint is dict and name == "text_config":  # the wrapper's own text model settings
        module = importlib.import_module(f"mlx_lm.models.{arch}")
        for cls in ("TextModelArgs", "TextArgs", "TextConfig"):
            if dataclasses.is_dataclass(getattr(module, cls, None)):
                special = _special(arch, d)
                cfg = _fill_dataclass(arch, getattr(module, cls), d, _sizes(d),
                                      {**_fills(), **special})
                return {**cfg, **special, "model_type": arch}
        raise FlashMoeError(f"{arch}: no settings class for its text_config")
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float, bool):
        item = typing.get_args(hint)[0]  # one value per layer
        return [item(10000.0 if "theta" in name else 1)] * d.layers
    if hint is bool:
        return False
    if hint is int:
        return 1
    if hint is float:
        return 1.0
    raise FlashMoeError(f"{arch}: no tiny value for the setting {name!r} ({hint})")
