"""Sorting a checkpoint's tensors: routed-expert pieces, dense tensors, and what mlx-lm ignores.

The expert banks come from mlx-lm's model tree (``flashmoe.banks``), so the names to look for
follow from the model itself:

- mlx layout (what ``mlx_lm.convert`` writes, any architecture): ``<bank path>.<proj>.<kind>``,
  experts stacked on the first axis;
- Hugging Face layouts, per family, as each model's ``sanitize()`` in mlx-lm reads them:
  per-expert ``<block>.experts.<e>.<proj>.<kind>`` (projection names ``w1``/``w2``/``w3`` where
  the family uses them; the kinds the family stacks) and Qwen3.5's fused
  ``<block>.experts.gate_up_proj`` / ``down_proj``.

Multi-token-prediction layers (decoder layers past ``num_hidden_layers``, ``mtp.*``) and vision
or audio towers are dropped by mlx-lm's ``sanitize``; they are *ignored* here: neither experts nor
dense bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flashmoe.banks import Bank, ModelTree
from flashmoe.errors import CheckpointError

_W123 = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_QUANT_KINDS = ("weight", "scales", "biases")
_FP8_KINDS = ("weight", "weight_scale_inv")


@dataclass(frozen=True)
class HFFamily:
    """How mlx-lm's ``sanitize`` reads a family's original expert tensors."""

    projs: dict[str, str] | None = None  # checkpoint projection -> mlx-lm's (None: same names)
    kinds: tuple[str, ...] = ("weight",)  # per-expert tensor kinds it stacks
    fused: bool = False  # experts.gate_up_proj [E, 2I, H] + experts.down_proj [E, H, I]
    refused: str = ""  # why its original layout cannot be read in place


HF_FAMILIES = {
    "qwen3_moe": HFFamily(),
    "qwen3_next": HFFamily(),
    "qwen3_5_moe": HFFamily(fused=True),
    "qwen2_moe": HFFamily(kinds=_QUANT_KINDS),
    "olmoe": HFFamily(kinds=_QUANT_KINDS),
    "deepseek_v3": HFFamily(kinds=_QUANT_KINDS + ("weight_scale_inv",)),
    "glm4_moe": HFFamily(kinds=_QUANT_KINDS),
    "minimax": HFFamily(projs=_W123, kinds=_FP8_KINDS),
    "mixtral": HFFamily(projs=_W123, kinds=_QUANT_KINDS),
    "gpt_oss": HFFamily(refused=(
        "the original gpt_oss checkpoint interleaves gate and up rows in "
        "experts.gate_up_proj_blocks (mlx-lm splits them with a stride of 2); flashmoe reads "
        "contiguous ranges only: convert it with mlx_lm.convert first")),
}

# top-level parts that mlx-lm's sanitize drops (vision and audio towers, MTP heads)
IGNORED_PREFIXES = ("mtp.", "model.mtp.", "model.visual.", "visual.", "vision_tower.",
                    "model.vision_tower.", "vision_model.", "model.vision_model.", "audio_tower.",
                    "model.audio_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
                    "embed_vision.", "embed_audio.", "mm_projector.")
_DECODER_LAYER = re.compile(
    r"^(?:model\.|model\.language_model\.|language_model\.model\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(
    r"^(?P<parent>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<kind>\w+)$")
_FUSED = re.compile(r"^(?P<parent>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)(?P<rest>\w*)$")


@dataclass
class Sorted:
    """A checkpoint's tensors by role. ``experts[layer][record name]`` lists each expert's piece
    (a ``TensorInfo``, in expert order); ``kind`` is ``mlx`` or ``hf``."""

    kind: str = "hf"
    experts: dict[int, dict[str, list]] = field(default_factory=dict)
    dense: dict[str, object] = field(default_factory=dict)
    ignored: dict[str, object] = field(default_factory=dict)


def canonical_model_type(model_type: str) -> str:
    from mlx_lm.utils import MODEL_REMAPPING

    return MODEL_REMAPPING.get(model_type, model_type)


def _aliases(name: str) -> tuple[str, ...]:
    # the renames mlx-lm's multimodal sanitizers apply before anything else
    if name.startswith("model.language_model."):
        return (name, "language_model.model." + name[len("model.language_model."):])
    return (name, "language_model." + name)


def ignored_reason(name: str, drop: tuple[str, ...], num_layers: int) -> str | None:
    """Why mlx-lm never loads tensor ``name`` (None: it may); ``drop`` from ``dropped_parts``."""
    if name.startswith(drop):
        return next(p for p in drop if name.startswith(p)).rstrip(".")
    m = _DECODER_LAYER.match(name)
    if m and int(m[1]) >= num_layers:
        return f"layer {m[1]} (multi-token prediction)"
    return None


def dropped_parts(tree: ModelTree) -> tuple[str, ...]:
    """The ignorable top-level parts that mlx-lm's model for ``tree`` does not have."""
    return tuple(p for p in IGNORED_PREFIXES if not any(k.startswith(p) for k in tree.params))


def sort_tensors(tensors: dict, tree: ModelTree, num_layers: int) -> Sorted:
    """Sort ``tensors`` (name -> TensorInfo) into expert pieces, dense and ignored tensors."""
    out = Sorted()
    by_path = {b.path: b for b in tree.banks.values()}
    by_parent = {b.path.rpartition(".")[0]: b for b in tree.banks.values()}
    family = HF_FAMILIES.get(canonical_model_type(tree.model_type))
    hf: dict[tuple[int, str], dict[int, object]] = {}
    where: dict[tuple[int, str], tuple[str, str]] = {}  # (layer, record name) -> checkpoint's
    drop = dropped_parts(tree)
    for name, info in tensors.items():
        if ignored_reason(name, drop, num_layers):
            out.ignored[name] = info
            continue
        module, _, kind = name.rpartition(".")
        path, _, proj = module.rpartition(".")
        if path in by_path:
            bank = by_path[path]
            _check_proj(bank, proj, name)
            out.kind = "mlx"
            E = bank.projs[proj].experts
            if not info.shape or info.shape[0] != E:
                raise CheckpointError(
                    f"{name} has shape {list(info.shape)} but config.json says {E} experts")
            row = info.nbytes // E
            out.experts.setdefault(bank.layer, {})[f"{proj}.{kind}"] = [
                type(info)(info.path, info.offset + e * row, row, info.dtype, info.shape[1:])
                for e in range(E)]
            continue
        if (m := _PER_EXPERT.match(name)) and (bank := _bank_of(m["parent"], by_parent)):
            fam = _family(family, tree, name)
            proj = m["proj"]
            if fam.projs is not None:
                proj = fam.projs.get(proj, "?" + proj)  # a name this family's sanitize ignores
            _check_proj(bank, proj, name)
            if m["kind"] not in fam.kinds:
                raise CheckpointError(
                    f"{name}: mlx-lm's {tree.model_type} does not read per-expert "
                    f"{m['kind']!r} tensors (it stacks {', '.join(fam.kinds)}), so neither does "
                    "flashmoe")
            E = bank.projs[proj].experts
            e = int(m["expert"])
            if e >= E:
                raise CheckpointError(f"{name}: config.json says {E} experts in that layer")
            hf.setdefault((bank.layer, f"{proj}.{m['kind']}"), {})[e] = info
            where[(bank.layer, f"{proj}.{m['kind']}")] = (m["parent"], f"{m['proj']}.{m['kind']}")
            continue
        if (m := _FUSED.match(name)) and (bank := _bank_of(m["parent"], by_parent)):
            fam = _family(family, tree, name)
            if not fam.fused or m["rest"]:
                raise CheckpointError(f"{name}: fused expert tensors of this kind are not read "
                                      f"by mlx-lm's {tree.model_type}")
            _split_fused(bank, m["proj"], name, info, out)
            continue
        out.dense[name] = info
    for (layer, rec), by_expert in hf.items():
        E = tree.banks[layer].projs[rec.split(".")[0]].experts
        missing = [e for e in range(E) if e not in by_expert]
        if missing:
            parent, leaf = where[(layer, rec)]
            raise CheckpointError(f"missing expert tensor {parent}.experts.{missing[0]}.{leaf} "
                                  f"({len(missing)} of {E} experts missing)")
        out.experts.setdefault(layer, {})[rec] = [by_expert[e] for e in range(E)]
    return out


def _bank_of(parent: str, by_parent: dict[str, Bank]) -> Bank | None:
    for alias in _aliases(parent):
        if alias in by_parent:
            return by_parent[alias]
    return None


def _family(family: HFFamily | None, tree: ModelTree, name: str) -> HFFamily:
    if family is None:
        raise CheckpointError(
            f"{name}: the original Hugging Face layout of {tree.model_type!r} is not mapped "
            f"(mapped: {', '.join(sorted(HF_FAMILIES))}); convert it with mlx_lm.convert, whose "
            "output flashmoe reads for any architecture")
    if family.refused:
        raise CheckpointError(f"{name}: {family.refused}")
    return family


def _check_proj(bank: Bank, proj: str, name: str) -> None:
    if proj not in bank.projs:
        raise CheckpointError(f"{name}: mlx-lm's expert bank {bank.path} has no projection "
                              f"{proj!r} (it has {', '.join(sorted(bank.projs))})")


def _split_fused(bank: Bank, proj: str, name: str, info, out: Sorted) -> None:
    gate, down = bank.projs.get("gate_proj"), bank.projs.get("down_proj")
    if gate is None or down is None:
        raise CheckpointError(f"{name}: bank {bank.path} has no gate_proj / down_proj")
    E, inter, hidden = gate.experts, gate.out_dim, gate.in_dim
    want = (E, 2 * inter, hidden) if proj == "gate_up_proj" else (E, down.out_dim, down.in_dim)
    if tuple(info.shape) != want:
        raise CheckpointError(f"{name} has shape {list(info.shape)} but config.json implies "
                              f"{list(want)}")
    blk = info.nbytes // E
    recs = out.experts.setdefault(bank.layer, {})
    T = type(info)
    if proj == "down_proj":
        recs["down_proj.weight"] = [T(info.path, info.offset + e * blk, blk, info.dtype, want[1:])
                                    for e in range(E)]
        return
    half = blk // 2
    for j, p in enumerate(("gate_proj", "up_proj")):
        recs[f"{p}.weight"] = [T(info.path, info.offset + e * blk + j * half, half, info.dtype,
                                 (inter, hidden)) for e in range(E)]
