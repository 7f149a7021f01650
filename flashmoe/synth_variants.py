"""Variants of a synthesized checkpoint that real downloads have (``flashmoe synth`` options).

- ``fp8``: FP8 (e4m3) weights with a float32 ``weight_scale_inv`` per 128x128 block on every
  linear layer, experts included, as DeepSeek-V3 / R1 and MiniMax publish them;
- ``mtp``: a multi-token-prediction module (DeepSeek: decoder layer ``num_hidden_layers`` with its
  own experts; Qwen3.5: ``mtp.*``), which mlx-lm drops;
- ``vision``: a vision tower (``model.visual.*`` in Hugging Face checkpoints, ``vision_tower.*``
  in mlx-vlm conversions), which mlx-lm drops;
- ``legacy``: per-expert quantized experts (``experts.E.w1.{weight,scales,biases}``), as older
  mlx-community Mixtral conversions hold them.
"""

from __future__ import annotations

import math
import re

from flashmoe.errors import FlashMoeError

FP8_BLOCK = 128
_LAYER = re.compile(r"^(model\.language_model\.|model\.)layers\.(\d+)\.")
_NOT_FP8 = (".mlp.gate.weight", "embed_tokens.weight", "lm_head.weight")


def fp8(tensors: list, config: dict) -> list:
    """Every 2-D linear weight in bf16 becomes e4m3 codes plus its block scales."""
    T = type(tensors[0])
    out = []
    for t in tensors:
        if (t.dtype != "BF16" or len(t.shape) != 2 or not t.name.endswith(".weight")
                or "norm" in t.name or t.name.endswith(_NOT_FP8)):
            out.append(t)
            continue
        rows, cols = t.shape
        blocks = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        out.append(T(t.name, "F8_E4M3", t.shape, "fp8", key=t.key))
        out.append(T(t.name + "_scale_inv", "F32", blocks, "scale_inv", t.std or 0.02,
                     key=t.key + "_scale_inv"))
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                     "quant_method": "fp8", "weight_block_size": [128, 128]}
    return out


def mtp(arch: str, tensors: list, config: dict) -> list:
    """A multi-token-prediction module: a copy of the last decoder layer's tensors (its experts
    included) under the names the family publishes, and the config entry that declares it."""
    T = type(tensors[0])
    text = config.get("text_config", config)
    last = text["num_hidden_layers"] - 1
    hidden = text["hidden_size"]
    layer = [t for t in tensors if (m := _LAYER.match(t.name)) and int(m[2]) == last]
    if arch == "qwen3_5_moe":
        new, text["mtp_num_hidden_layers"] = "mtp.layers.0.", 1
        head = ["mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight",
                "mtp.pre_fc_norm_hidden.weight"]
    elif arch in ("deepseek_v3", "glm4_moe"):
        new = f"model.layers.{last + 1}."
        text["num_nextn_predict_layers"] = 1
        head = [new + n for n in ("eh_proj.weight", "enorm.weight", "hnorm.weight",
                                  "shared_head.norm.weight")]
    else:
        raise FlashMoeError(f"--mtp: {arch} publishes no multi-token prediction module")
    out = list(tensors)
    for t in layer:
        name = _LAYER.sub(new, t.name, count=1)
        out.append(T(name, t.dtype, t.shape, t.fill, t.std, t.bits, key=name))
    for name in head:
        shape = (hidden, 2 * hidden) if name.endswith(("fc.weight", "eh_proj.weight")) else (
            hidden,)
        fill = "normal" if len(shape) == 2 else "const"
        out.append(T(name, "BF16", shape, fill, 1 / math.sqrt(2 * hidden) if fill == "normal"
                     else 1.0, key=name))
    return out


def vision(tensors: list, config: dict, layout: str, depth: int = 2, width: int = 64) -> list:
    """A small vision tower (patch embedding, ``depth`` blocks, merger) under its published
    prefix, and its ``vision_config``."""
    T = type(tensors[0])
    prefix = "model.visual." if layout == "hf" else "vision_tower."
    hidden = config.get("text_config", config)["hidden_size"]
    shapes = {"patch_embed.proj.weight": (width, 3, 2, 16, 16),
              "merger.norm.weight": (width,),
              "merger.linear_fc1.weight": (4 * width, 4 * width),
              "merger.linear_fc2.weight": (hidden, 4 * width)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * width, width), b + "attn.proj.weight":
                       (width, width), b + "norm1.weight": (width,), b + "norm2.weight": (width,),
                       b + "mlp.linear_fc1.weight": (4 * width, width),
                       b + "mlp.linear_fc2.weight": (width, 4 * width)})
    config["vision_config"] = {"depth": depth, "hidden_size": width, "out_hidden_size": hidden,
                               "patch_size": 16, "temporal_patch_size": 2, "in_channels": 3}
    out = list(tensors)
    for name, shape in shapes.items():
        fill, std = ("const", 1.0) if len(shape) == 1 else ("normal", 1 / math.sqrt(shape[-1]))
        out.append(T(prefix + name, "BF16", shape, fill, std, key=prefix + name))
    return out


def legacy_experts(tensors: list, names: dict[str, str]) -> list:
    """Stacked ``switch_mlp`` tensors as per-expert ones (``names``: mlx projection ->
    the published one, e.g. gate_proj -> w1), each expert with its own bytes."""
    T = type(tensors[0])
    out = []
    for t in tensors:
        if ".switch_mlp." not in t.name:
            out.append(t)
            continue
        prefix, rest = t.name.split(".switch_mlp.")
        proj, kind = rest.split(".")
        for e in range(t.shape[0]):
            name = f"{prefix}.experts.{e}.{names[proj]}.{kind}"
            key = f"{prefix}.experts.{e}.{names[proj]}." + ("weight" if kind == "weight"
                                                          else "scales")
            out.append(T(name, t.dtype, t.shape[1:], t.fill, t.std, t.bits, key=key))
    return out
