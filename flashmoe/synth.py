"""``flashmoe synth``: write a random-weight MoE checkpoint in a layout that is published for real.

Two layouts:

- ``hf``: the original Hugging Face checkpoint (bf16, per-expert or fused expert tensors, the
  architecture's own tensor names and ``config.json``);
- ``mlx``: what ``mlx_lm.convert(quantize=True)`` writes (names after mlx-lm's ``sanitize``,
  stacked ``switch_mlp`` tensors, uint32 packed weights with bf16 scales and biases).

The tensor list comes from mlx-lm itself: the model class is built from the config *lazily* (its
random initial weights are never evaluated), quantized with mlx-lm's own routine for the ``mlx``
layout, and read back with ``tree_flatten``; the ``hf`` layout maps those names back to the
published ones. The bytes are generated with numpy, tensor by tensor and chunk by chunk, from an
RNG seeded by (seed, tensor name), and streamed into safetensors files written here, so memory
stays bounded whatever the checkpoint size and the same seed gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoe import synth_variants as variants
from flashmoe.errors import CheckpointError, FlashMoeError
from flashmoe.outdir import output_dir
from flashmoe.synth_configs import generic_config

ARCHS = ("qwen3_moe", "qwen3_5_moe", "deepseek_v3", "mixtral")
LAYOUTS = ("hf", "mlx")
ROUTER_GAIN = 4.0  # router logits std ~4: trained routers are decisive, not near-uniform
CHUNK = 1 << 18  # elements generated per RNG call: bounds memory for any tensor size
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_ITEMSIZE = {"F32": 4, "U32": 4, "BF16": 2, "U8": 1, "F8_E4M3": 1}
_MX_DTYPE = {"float32": "F32", "uint32": "U32", "bfloat16": "BF16", "uint8": "U8"}
MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
_LEGACY_NAMES = {"mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}}
_FP_TYPICAL = {"mxfp4": 2.5, "nvfp4": 2.5, "mxfp8": 60.0}  # std of random codes of each mode


@dataclass(frozen=True)
class Dims:
    """Model sizes; the defaults make a tiny model that loads and generates in milliseconds."""

    layers: int = 4
    hidden: int = 128
    experts: int = 16
    topk: int = 4
    moe_inter: int = 64
    vocab: int = 512


@dataclass(frozen=True)
class _Tensor:
    """One tensor to write and how to fill it.

    fill: ``normal`` (std), ``const`` (value in std), ``log_uniform`` (A_log), ``packed`` (random
    quantized codes), ``scales`` / ``biases`` (affine quantization params whose dequantized weight
    has std ``std``). ``key`` seeds the RNG; scales and biases of one weight share it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    fill: str
    std: float = 0.0
    bits: int = 0
    key: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


# ---------------------------------------------------------------------------------------------
# config.json, as each model's Hugging Face repository publishes it


def _qwen3_moe_config(d: Dims, tok: dict) -> dict:
    heads = max(2, d.hidden // 64)
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok["<|endoftext|>"],
        "decoder_sparse_step": 1,
        "eos_token_id": tok["<|im_end|>"],
        "head_dim": 128 if d.hidden >= 1024 else 32,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": 3 * d.hidden,
        "max_position_embeddings": 40960,
        "max_window_layers": d.layers,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": d.moe_inter,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts": d.experts,
        "num_experts_per_tok": d.topk,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": max(1, heads // 8),
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": d.vocab,
    }


def _qwen3_5_moe_config(d: Dims, tok: dict) -> dict:
    big = d.hidden >= 1024
    heads = max(2, d.hidden // 128)
    k_heads = max(2, d.hidden // 256)
    interval = 4
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "bos_token_id": tok["<|endoftext|>"],
        "dtype": "bfloat16",
        "eos_token_id": tok["<|im_end|>"],
        "full_attention_interval": interval,
        "head_dim": 256 if big else 64,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "layer_types": [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(d.layers)
        ],
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128 if big else 32,
        "linear_num_key_heads": k_heads,
        "linear_num_value_heads": 4 * k_heads,
        "linear_value_head_dim": 128 if big else 32,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": d.moe_inter,
        "mtp_num_hidden_layers": 0,
        "num_attention_heads": heads,
        "num_experts": d.experts,
        "num_experts_per_tok": d.topk,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": max(1, heads // 16),
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": [11, 11, 10],
            "partial_rotary_factor": 0.25,
            "rope_theta": 10000000,
            "rope_type": "default",
        },
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": d.moe_inter,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": d.vocab,
    }
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0",
    }


def _deepseek_groups(d: Dims) -> tuple[int, int]:
    for n_group in (8, 4, 2, 1):
        if d.experts % n_group == 0 and d.experts // n_group >= 2:
            topk_group = max(1, n_group // 2)
            if topk_group * (d.experts // n_group) >= d.topk:
                return n_group, topk_group
    raise CheckpointError(f"deepseek_v3: cannot group {d.experts} experts for top-{d.topk}")


def _deepseek_v3_config(d: Dims, tok: dict) -> dict:
    if d.layers > 61:
        raise CheckpointError(
            "deepseek_v3: mlx-lm drops layer 61 (the MTP layer); use --layers <= 61"
        )
    big = d.hidden >= 1024
    heads = max(2, d.hidden // 64)
    n_group, topk_group = _deepseek_groups(d)
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok["<|endoftext|>"],
        "eos_token_id": tok["<|im_end|>"],
        "ep_size": 1,
        "first_k_dense_replace": 1 if d.layers > 1 else 0,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": 9 * d.moe_inter,
        "kv_lora_rank": 512 if big else 64,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": d.moe_inter,
        "moe_layer_freq": 1,
        "n_group": n_group,
        "n_routed_experts": d.experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts_per_tok": d.topk,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": heads,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": 1536 if big else 64,
        "qk_nope_head_dim": 128 if big else 64,
        "qk_rope_head_dim": 64 if big else 32,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": topk_group,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "v_head_dim": 128 if big else 64,
        "vocab_size": d.vocab,
    }


def _mixtral_config(d: Dims, tok: dict) -> dict:
    heads = max(2, d.hidden // 128)
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": tok["<|endoftext|>"],
        "eos_token_id": tok["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.moe_inter,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": heads,
        "num_experts_per_tok": d.topk,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": max(1, heads // 4),
        "num_local_experts": d.experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0",
        "use_cache": True,
        "vocab_size": d.vocab,
    }


# ---------------------------------------------------------------------------------------------
# What to fill each tensor with


def _float_fill(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """(fill, std or value) for a float tensor, chosen by its role in the model."""
    if name.endswith("norm.weight"):
        return "const", 1.0
    if name.endswith(".bias"):
        return "const", 0.0
    if name.endswith("e_score_correction_bias"):
        return "normal", 0.01
    if name.endswith("A_log"):
        return "log_uniform", 0.0
    if name.endswith("dt_bias"):
        return "const", 1.0
    if name.endswith("embed_tokens.weight"):
        return "normal", 1.0
    if "conv1d" in name:
        return "normal", 1.0 / math.sqrt(math.prod(shape[1:]))
    if name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight")):
        return "normal", ROUTER_GAIN / math.sqrt(shape[-1])
    return "normal", 1.0 / math.sqrt(shape[-1])


def _spec(name: str, dtype: str, shape: tuple[int, ...]) -> _Tensor:
    fill, std = _float_fill(name, shape)
    return _Tensor(name, dtype, tuple(shape), fill, std, key=name)


# ---------------------------------------------------------------------------------------------
# mlx-lm names -> published Hugging Face names


def _unstack_experts(params: list[tuple[str, tuple, str]], bank: str, names: dict) -> list:
    """Per-expert tensors in place of mlx-lm's stacked ``switch_mlp`` ones.

    names: mlx projection -> HF projection, in the order HF lists them per expert.
    """
    shapes = {n: s for n, s, _ in params}
    out = []
    for name, shape, dtype in params:
        if f".{bank}.switch_mlp." not in name:
            out.append(_spec(name, dtype, shape))
            continue
        if not name.endswith("switch_mlp.gate_proj.weight"):
            continue  # emitted together with gate_proj
        prefix = name[: name.index(".switch_mlp.")]
        for e in range(shape[0]):
            for mlx_name, hf_name in names.items():
                s = shapes[f"{prefix}.switch_mlp.{mlx_name}.weight"][1:]
                out.append(_spec(f"{prefix}.experts.{e}.{hf_name}.weight", dtype, s))
    return out


def _hf_qwen3_moe(params: list, cfg: dict) -> list[_Tensor]:
    proj = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
    return _unstack_experts(params, "mlp", proj)


def _hf_mixtral(params: list, cfg: dict) -> list[_Tensor]:
    proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    return _unstack_experts(params, "block_sparse_moe", proj)


def _hf_deepseek_v3(params: list, cfg: dict) -> list[_Tensor]:
    proj = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
    out = []
    for t in _unstack_experts(params, "mlp", proj):
        if t.name.endswith("self_attn.unembed_out.weight"):
            continue
        if t.name.endswith("self_attn.embed_q.weight"):
            # mlx-lm splits kv_b_proj [heads * (nope + v), kv_lora] into embed_q / unembed_out
            heads = cfg["num_attention_heads"]
            rows = heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"])
            name = t.name.replace("embed_q", "kv_b_proj")
            t = _spec(name, t.dtype, (rows, cfg["kv_lora_rank"]))
        out.append(t)
    return out


_QWEN3_5_ZERO_CENTERED = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)


def _hf_qwen3_5_moe(params: list, cfg: dict) -> list[_Tensor]:
    shapes = {n: s for n, s, _ in params}
    out = []
    for name, shape, dtype in params:
        hf = name.replace("language_model.model.", "model.language_model.", 1)
        hf = hf.replace("language_model.lm_head.", "lm_head.", 1)
        if ".switch_mlp." in name:
            if name.endswith("switch_mlp.gate_proj.weight"):
                prefix = hf[: hf.index(".switch_mlp.")]
                e, inter, hidden = shape
                out.append(_spec(f"{prefix}.experts.gate_up_proj", dtype, (e, 2 * inter, hidden)))
                down = shapes[name.replace("gate_proj", "down_proj")]
                out.append(_spec(f"{prefix}.experts.down_proj", dtype, down))
            continue
        if "conv1d.weight" in name:
            shape = (shape[0], 1, shape[1])  # HF Conv1d [C, 1, K]; mlx-lm moves K last
        t = _spec(hf, dtype, shape)
        if hf.endswith(_QWEN3_5_ZERO_CENTERED):
            # HF stores these RMSNorm weights as (w - 1); mlx-lm's sanitize adds the 1 back
            t = _Tensor(hf, dtype, tuple(shape), "const", 0.0, key=hf)
        out.append(t)
    return out


_CONFIGS: dict[str, Callable[[Dims, dict], dict]] = {
    "qwen3_moe": _qwen3_moe_config,
    "qwen3_5_moe": _qwen3_5_moe_config,
    "deepseek_v3": _deepseek_v3_config,
    "mixtral": _mixtral_config,
}
_HF_NAMES: dict[str, Callable[[list, dict], list[_Tensor]]] = {
    "qwen3_moe": _hf_qwen3_moe,
    "qwen3_5_moe": _hf_qwen3_5_moe,
    "deepseek_v3": _hf_deepseek_v3,
    "mixtral": _hf_mixtral,
}


# ---------------------------------------------------------------------------------------------
# The lazy mlx-lm model: names, shapes and dtypes without evaluating a single weight


def _lazy_model(config: dict):
    """mlx-lm's model for ``config``; like mlx-lm, its args may rewrite parts of ``config``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.utils import _get_classes

    from flashmoe.banks import find_banks

    model_class, args_class = _get_classes(config=config)
    model = model_class(args_class.from_dict(config))
    if not find_banks(model):
        raise CheckpointError(f"{config.get('model_type')}: mlx-lm's model has no routed experts "
                              "(no SwitchGLU / SwitchMLP bank)")
    # as convert does after loading a bf16 checkpoint: float params in bf16, except where the
    # model asks to keep them (A_log, e_score_correction_bias stay float32 as published)
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(k, v):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.astype(mx.bfloat16 if keep(k) else mx.float32)
        return v

    model.update(tree_map_with_path(cast, model.parameters()))
    return model, tree_flatten


def _param_list(model, tree_flatten) -> list[tuple[str, tuple, str]]:
    out = []
    for name, v in tree_flatten(model.parameters()):
        dtype = str(v.dtype).split(".")[-1]
        if dtype not in _MX_DTYPE:
            raise FlashMoeError(f"unexpected dtype {dtype} for {name}")
        out.append((name, tuple(v.shape), _MX_DTYPE[dtype]))
    return out


def _plan_hf(arch: str, config: dict) -> tuple[list[_Tensor], dict, dict]:
    model, tree_flatten = _lazy_model(copy.deepcopy(config))
    cfg = config.get("text_config", config)
    params = _param_list(model, tree_flatten)
    if arch in _HF_NAMES:
        return _HF_NAMES[arch](params, cfg), config, {}
    return _hf_per_expert(arch, params, model), config, {}


def _hf_gpt_oss(params: list, cfg: dict) -> list[_Tensor]:
    """gpt-oss as OpenAI publishes it: mxfp4 experts, gate and up rows interleaved in one
    ``gate_up_proj`` (blocks of 16 bytes = 32 e2m1 codes, one e8m0 scale per block)."""
    shapes = {n: s for n, s, _ in params}
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    out = []
    for name, shape, dtype in params:
        if ".mlp.experts." not in name:
            out.append(_spec(name, dtype, shape))
            continue
        prefix, _, leaf = name.partition(".mlp.experts.")
        base = f"{prefix}.mlp.experts."
        if leaf == "gate_proj.weight":
            e, rows, cols = shape
            fused, n_rows = "gate_up_proj", 2 * rows
        elif leaf == "down_proj.weight":
            e, n_rows, cols = shape
            fused = "down_proj"
        elif leaf in ("gate_proj.bias", "down_proj.bias"):
            rows = shapes[name][-1] * (2 if leaf.startswith("gate") else 1)
            fused = "gate_up_proj" if leaf.startswith("gate") else "down_proj"
            out.append(_Tensor(f"{base}{fused}_bias", dtype, (shape[0], rows), "const", 0.0,
                               key=f"{base}{fused}_bias"))
            continue
        else:
            continue  # up_proj: inside gate_up_proj
        std = 1.0 / math.sqrt(cols)
        out.append(_Tensor(f"{base}{fused}_blocks", "U8", (e, n_rows, cols // 32, 16), "bytes",
                           key=f"{base}{fused}_blocks"))
        out.append(_Tensor(f"{base}{fused}_scales", "U8", (e, n_rows, cols // 32),
                           "scales_mxfp4", std, key=f"{base}{fused}_scales"))
    return out


_HF_NAMES["gpt_oss"] = _hf_gpt_oss


def _hf_per_expert(arch: str, params: list, model) -> list[_Tensor]:
    """Per-expert tensors under the names the family's ``sanitize`` in mlx-lm stacks
    (``flashmoe.checkpoint.HF_FAMILIES``); the rest as mlx-lm names it."""
    from flashmoe.banks import find_banks
    from flashmoe.checkpoint import HF_FAMILIES, canonical_model_type

    family = HF_FAMILIES.get(canonical_model_type(arch))
    if family is None or family.fused or family.refused:
        raise CheckpointError(f"--layout hf: no per-expert Hugging Face names known for {arch}")
    published = {v: k for k, v in (family.projs or {}).items()}
    banks = {path for path, _, _ in find_banks(model)}
    out = []
    for name, shape, dtype in params:
        module, _, kind = name.rpartition(".")
        bank, _, proj = module.rpartition(".")
        if bank not in banks:
            out.append(_spec(name, dtype, shape))
            continue
        parent = bank.rpartition(".")[0]
        for e in range(shape[0]):
            out.append(_spec(f"{parent}.experts.{e}.{published.get(proj, proj)}.{kind}", dtype,
                             shape[1:]))
    return out


def _plan_mlx(config: dict, bits: int, group_size: int | None, mode: str = "affine",
              recipe: str | None = None) -> tuple[list[_Tensor], dict, dict]:
    from mlx_lm.utils import get_total_parameters, quantize_model

    # convert builds the model from the very dict it saves (mlx-lm's args rewrite some fields,
    # e.g. qwen3_5's rope_type -> type), after load_config merged generation_config's eos ids
    config = copy.deepcopy(config)
    model, tree_flatten = _lazy_model(config)
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints a bits/weight line
        predicate = None
        if recipe is not None:
            from mlx_lm.convert import mixed_quant_predicate_builder

            predicate = mixed_quant_predicate_builder(recipe, model, group_size or 64)
        model, qconfig = quantize_model(model, config, group_size, bits, mode=mode,
                                        quant_predicate=predicate)
    modules = dict(model.named_modules())
    tensors = []
    for name, shape, dtype in _param_list(model, tree_flatten):
        path, _, leaf = name.rpartition(".")
        module = modules.get(path)
        qbits = getattr(module, "bits", None)
        if qbits is None or leaf not in ("weight", "scales", "biases"):
            tensors.append(_spec(name, dtype, shape))
            continue
        w_shape = modules[path].weight.shape
        unpacked = (*w_shape[:-1], w_shape[-1] * 32 // qbits)
        _, std = _float_fill(f"{path}.weight", unpacked)
        fill = {"weight": "packed", "scales": "scales", "biases": "biases"}[leaf]
        qmode = getattr(module, "mode", "affine")
        if qmode != "affine" and leaf != "biases":
            fill = {"weight": "packed_fp8" if qmode == "mxfp8" else "packed",
                    "scales": f"scales_{qmode}"}[leaf]
        key = name if leaf == "weight" else f"{path}.scales"  # scales and biases must agree
        tensors.append(_Tensor(name, dtype, shape, fill, std, qbits, key=key))
    qconfig.pop("_name_or_path", None)
    qconfig.pop("vision_config", None)
    meta = {"total_parameters": get_total_parameters(model)}
    return tensors, dict(sorted(qconfig.items())), meta


# ---------------------------------------------------------------------------------------------
# Bytes


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    return np.random.default_rng([seed, *words])


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = x.astype(np.float32, copy=False).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return (_bf16(x).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _chunks(t: _Tensor, seed: int) -> Iterator[bytes]:
    """The tensor's bytes, in pieces of at most CHUNK elements."""
    n = math.prod(t.shape)
    rng = _rng(seed, t.key)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        if t.fill in ("packed", "bytes"):
            yield rng.bytes((4 if t.fill == "packed" else 1) * m)
            continue
        if t.fill in ("fp8", "packed_fp8"):  # e4m3 codes of magnitude 1/8..4, never NaN
            n = m * (4 if t.fill == "packed_fp8" else 1)
            sign = rng.integers(0, 2, n, dtype=np.uint8) << np.uint8(7)
            exp = rng.integers(4, 9, n, dtype=np.uint8) << np.uint8(3)
            yield (sign | exp | rng.integers(0, 8, n, dtype=np.uint8)).tobytes()
            continue
        if t.fill.startswith("scales_"):  # uint8 scales: e8m0 (mx modes) or e4m3 (nvfp4)
            mode = t.fill[len("scales_"):]
            e = round(math.log2(t.std / _FP_TYPICAL[mode]))
            jitter = rng.integers(-1, 2, m)
            if mode == "nvfp4":
                code = (np.clip(e + 7 + jitter, 1, 14) << 3) | rng.integers(0, 8, m)
            else:
                code = np.clip(e + 127 + jitter, 1, 254)
            yield code.astype(np.uint8).tobytes()
            continue
        if t.fill in ("scales", "biases"):
            levels = (1 << t.bits) - 1
            # uniform codes 0..levels have std levels/sqrt(12)-ish: pick scale for std t.std
            base = t.std / math.sqrt(((1 << t.bits) ** 2 - 1) / 12)
            scale = _bf16_round(base * rng.uniform(0.8, 1.2, m).astype(np.float32))
            x = scale if t.fill == "scales" else -scale * (levels / 2)
        elif t.fill == "normal":
            x = rng.standard_normal(m, dtype=np.float32) * np.float32(t.std)
        elif t.fill == "const":
            x = np.full(m, t.std, dtype=np.float32)
        elif t.fill == "scale_inv":  # FP8 block scales: e4m3 codes have std ~1.5
            x = (t.std / 1.5 * rng.uniform(0.8, 1.2, m)).astype(np.float32)
        elif t.fill == "log_uniform":
            x = np.log(rng.uniform(1.0, 16.0, m)).astype(np.float32)
        else:
            raise AssertionError(t.fill)
        yield (_bf16(x) if t.dtype == "BF16" else x.astype(np.float32)).tobytes()


def _shards(tensors: list[_Tensor], shard_size: int) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = []
    size = 0
    for t in tensors:
        if not shards or (size + t.nbytes > shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    # widest dtypes first so every tensor starts aligned to its item size (no gaps allowed)
    return [sorted(s, key=lambda t: -_ITEMSIZE[t.dtype]) for s in shards]


def _write_shard(path: Path, tensors: list[_Tensor], fmt: str, seed: int, bar) -> None:
    header: dict = {"__metadata__": {"format": fmt}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            _write_tensor(f, t, seed, bar)


def _write_tensor(f, t: _Tensor, seed: int, bar) -> None:
    for piece in _chunks(t, seed):
        f.write(piece)
        bar.update(len(piece))


# ---------------------------------------------------------------------------------------------
# Tokenizer: a small deterministic byte-level BPE with ChatML special tokens


_CORPUS_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water "
    "been call who its now find long down day did get come made may part hello world hi model "
    "expert token stream memory layer router weight random answer question 0 1 2 3 4 5 6 7 8 9"
).split()


def _tokenizer_json(vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_regular = vocab - len(SPECIAL_TOKENS)
    w = _CORPUS_WORDS
    corpus = [" ".join(w[i:] + w[:i]) for i in range(len(w))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    model = data["model"]
    vocab_map: dict[str, int] = model["vocab"]
    merges: list = model["merges"]
    # the corpus runs out of merges long before a real vocabulary size: add synthetic ones
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:64]
    tokens = sorted(vocab_map, key=vocab_map.get)
    i = 0
    while len(vocab_map) < n_regular:
        left = tokens[i]
        for right in alphabet:
            if len(vocab_map) >= n_regular:
                break
            if left + right not in vocab_map:
                vocab_map[left + right] = len(vocab_map)
                tokens.append(left + right)
                merges.append([left, right])
        i += 1
    data["added_tokens"] = [
        {
            "id": n_regular + j,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for j, s in enumerate(SPECIAL_TOKENS)
    ]
    text = json.dumps(data, ensure_ascii=False, indent=2)
    Tokenizer.from_str(text)  # fail here, not in the user's loader
    return text


def _tokenizer_config(vocab: int) -> dict:
    first = vocab - len(SPECIAL_TOKENS)
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(first + j): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for j, s in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


# ---------------------------------------------------------------------------------------------
# Public API


def make_config(arch: str, **sizes: int) -> dict:
    """The ``config.json`` ``synth`` writes for ``arch`` (sizes as ``Dims``' fields), to edit and
    hand back to ``synth(config=...)``."""
    d = Dims(**sizes)
    return _CONFIGS[arch](d, {s: d.vocab - len(SPECIAL_TOKENS) + j
                              for j, s in enumerate(SPECIAL_TOKENS)})


def _eos_ids(special: dict) -> list[int]:
    return [special["<|im_end|>"], special["<|endoftext|>"]]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def synth(
    out: str | Path,
    arch: str,
    layout: str = "hf",
    bits: int = 4,
    group_size: int | None = None,
    layers: int | None = None,
    hidden: int | None = None,
    experts: int | None = None,
    topk: int | None = None,
    moe_inter: int | None = None,
    vocab: int | None = None,
    seed: int = 0,
    shard_size: int = 2 << 30,
    progress: bool = False,
    force: bool = False,
    mode: str = "affine",
    recipe: str | None = None,
    fp8: bool = False,
    mtp: bool = False,
    vision: bool = False,
    legacy: bool = False,
    config: dict | None = None,
) -> Path:
    """Write a random-weight checkpoint of ``arch`` in ``layout`` to ``out`` and return its path.

    Sizes left as None give a tiny model. The checkpoint is written to ``OUT.partial`` and renamed
    at the end; an existing ``out`` is an error unless ``force`` and flashmoe wrote it. ``mode``
    and ``recipe`` (one of mlx-lm's mixed-bit recipes, e.g. ``mixed_4_6``) quantize the ``mlx``
    layout as ``mlx_lm.convert`` would; ``fp8``, ``mtp``, ``vision`` and ``legacy`` add what some
    published checkpoints have (``flashmoe.synth_variants``). ``config`` replaces the built-in
    ``config.json`` (any mlx-lm architecture, ``mlx`` layout).
    """

    if mode not in MODES:
        raise FlashMoeError(f"unknown quantization mode {mode!r}; known: {', '.join(MODES)}")
    if legacy and arch not in _LEGACY_NAMES:
        raise FlashMoeError(f"legacy per-expert quantized layout: only {', '.join(_LEGACY_NAMES)}")
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "mlx" and mode == "affine" and bits not in (2, 3, 4, 5, 6, 8):
        raise FlashMoeError(f"--bits {bits} is not an mlx affine width (2, 3, 4, 5, 6, 8)")
    given = dict(
        layers=layers, hidden=hidden, experts=experts, topk=topk, moe_inter=moe_inter, vocab=vocab
    )
    d = Dims(**{k: v for k, v in given.items() if v is not None})
    if min(d.layers, d.hidden, d.experts, d.topk, d.moe_inter) < 1:
        raise FlashMoeError("sizes must be positive")
    if d.topk > d.experts:
        raise FlashMoeError(f"--topk {d.topk} is more than --experts {d.experts}")
    if d.vocab < 260 + len(SPECIAL_TOKENS):
        raise FlashMoeError(f"--vocab {d.vocab} is too small for a byte-level BPE (>= 263)")
    if seed < 0:
        raise FlashMoeError(f"--seed must be >= 0, got {seed}")
    if shard_size < 1:
        raise FlashMoeError("--shard-size must be positive")

    out = Path(out)
    special = {s: d.vocab - len(SPECIAL_TOKENS) + j for j, s in enumerate(SPECIAL_TOKENS)}
    if config:
        config = copy.deepcopy(config)
    elif arch in _CONFIGS:
        config = _CONFIGS[arch](d, special)
    else:  # any other mlx-lm architecture, from its ModelArgs
        config = generic_config(arch, d)
        config.update(bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"])
    if layout == "hf":
        tensors, config, meta = _plan_hf(arch, config)
        if fp8:
            tensors = variants.fp8(tensors, config)
    else:
        config["eos_token_id"] = _eos_ids(special)
        if mode != "affine":  # each such mode has one (bits, group size): mlx-lm's defaults
            bits, group_size = None, None
        tensors, config, meta = _plan_mlx(config, bits, group_size, mode, recipe)
        if legacy:
            tensors = variants.legacy_experts(tensors, _LEGACY_NAMES[arch])
    if mtp:
        tensors = variants.mtp(arch, tensors, config)
    if vision:
        tensors = variants.vision(tensors, config, layout)

    with output_dir(out, "synth", force=force) as tmp:
        _write_all(tmp, tensors, config, meta, special, d.vocab, layout, seed, shard_size, progress)
    return out


def _write_all(
    tmp: Path,
    tensors: list[_Tensor],
    config: dict,
    meta: dict,
    special: dict,
    vocab: int,
    layout: str,
    seed: int,
    shard_size: int,
    progress: bool,
) -> None:
    from tqdm import tqdm

    shards = _shards(tensors, shard_size)
    total = sum(t.nbytes for t in tensors)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    fmt = "pt" if layout == "hf" else "mlx"
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="synth") as bar:
        for name, shard in zip(names, shards, strict=True):
            _write_shard(tmp / name, shard, fmt, seed, bar)
            weight_map.update({t.name: name for t in shard})
    (tmp / "tokenizer.json").write_text(_tokenizer_json(vocab))
    _write_json(tmp / "tokenizer_config.json", _tokenizer_config(vocab))
    generation = {"bos_token_id": special["<|endoftext|>"], "eos_token_id": _eos_ids(special)}
    _write_json(tmp / "generation_config.json", generation)
    index = {
        "metadata": {"total_size": total, **meta},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(tmp / "model.safetensors.index.json", index)
    _write_json(tmp / "config.json", config)  # last: a config marks a complete checkpoint


def cmd_synth(args) -> int:
    """CLI entry: ``flashmoe synth OUT --arch A [--layout hf|mlx] ...``."""
    from flashmoe.configs import parse_size

    try:
        shard_size = parse_size(args.shard_size)
    except ValueError as e:
        raise FlashMoeError(str(e)) from None
    out = synth(
        args.out,
        args.arch,
        layout=args.layout,
        bits=args.bits,
        group_size=args.group_size,
        layers=args.layers,
        hidden=args.hidden,
        experts=args.experts,
        topk=args.topk,
        moe_inter=args.moe_inter,
        vocab=args.vocab,
        seed=args.seed,
        shard_size=shard_size,
        progress=True,
        force=args.force,
        mode=args.mode,
        recipe=args.recipe,
        fp8=args.fp8,
        mtp=args.mtp,
        vision=args.vision,
        legacy=args.legacy,
    )
    print(out)
    return 0
