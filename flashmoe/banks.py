"""A checkpoint's expert banks, as mlx-lm's own model tree has them.

mlx-lm computes every routed expert bank with a ``SwitchGLU`` or ``SwitchMLP`` module. Building
the model class for a ``config.json`` lazily (its random initial weights are never evaluated) and
walking its modules tells, for any architecture mlx-lm knows, where each bank sits, which decoder
layer it belongs to, its projections and their shapes before quantization, and which top-level
parts the model has at all (what a checkpoint holds beyond them, mlx-lm never loads).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from flashmoe.errors import CheckpointError

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")  # decoder layer lists
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "n_activated_experts", "num_activated_experts",
                "moe_top_k", "num_experts_per_token", "top_k_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "num_activated_experts",
               "moe_k", "top_k", "moe_top_k", "num_experts_per_token", "top_k_experts")


@dataclass(frozen=True)
class Proj:
    """One projection of a bank: ``experts`` stacked ``[out_dim, in_dim]`` weights."""

    name: str
    experts: int
    out_dim: int
    in_dim: int
    bias: bool


@dataclass(frozen=True)
class Bank:
    """An expert bank: its module path, decoder layer, projections (by name)."""

    path: str
    layer: int
    projs: dict[str, Proj]


@dataclass(frozen=True)
class ModelTree:
    """What a checkpoint's mlx-lm model holds: its banks (by layer), top-k, parameter names."""

    model_type: str
    banks: dict[int, Bank]
    top_k: int
    params: frozenset[str]
    num_layers: int  # decoder layers of the model (those past it in a checkpoint: MTP)


def bank_types() -> tuple[type, ...]:
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    return (SwitchGLU, SwitchMLP)


def find_banks(model) -> list[tuple[str, int, object]]:
    """Every expert bank of ``model`` as (module path, decoder layer index, bank)."""
    types = bank_types()
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, types):
            layers = _LAYER.findall("." + name + ".")
            if not layers:
                raise ValueError(f"cannot tell the layer of expert bank {name!r}")
            found.append((name, int(layers[-1]), mod))
    return found


_EVALUATES = re.compile(r"mx\.eval\(|\.item\(\)|\.tolist\(\)|np\.array\(")


def evaluates_midway(model) -> str | None:
    """Why ``model``'s forward pass evaluates arrays on the host (None: it never does)."""
    import inspect

    for cls in {type(m) for m in model.modules()}:
        call = cls.__dict__.get("__call__")
        if call is None or not cls.__module__.startswith("mlx_lm."):
            continue
        try:
            found = _EVALUATES.search(inspect.getsource(call))
        except (OSError, TypeError):
            continue
        if found:
            return f"{cls.__name__}.__call__ calls {found[0].rstrip('(')}"
    return None


def model_tree(config: dict, where: str = "config.json") -> ModelTree:
    """Build mlx-lm's model for ``config`` lazily and describe its expert banks."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = copy.deepcopy(config)
    try:
        model_class, args_class = _get_classes(config=config)
    except ValueError as e:
        raise CheckpointError(f"{where}: mlx-lm cannot build this model ({e})") from None
    try:
        args = args_class.from_dict(config)
        model = model_class(args)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: mlx-lm cannot build this model ({e!r})") from None
    banks: dict[int, Bank] = {}
    top_k = None
    modules = dict(model.named_modules())
    for path, layer, bank in find_banks(model):
        if layer in banks:
            raise CheckpointError(
                f"{where}: layer {layer} has two expert banks ({banks[layer].path}, {path}); "
                "streaming assumes one per layer"
            )
        projs = {}
        for name, lin in bank.items():
            w = lin.get("weight") if isinstance(lin, dict) else None
            if w is None or w.ndim != 3:
                continue
            projs[name] = Proj(name, int(w.shape[0]), int(w.shape[1]), int(w.shape[2]),
                               "bias" in lin)
        banks[layer] = Bank(path, layer, projs)
        parent = modules.get(path.rpartition(".")[0])
        for attr in _TOP_K_ATTRS:
            k = getattr(parent, attr, None)
            if isinstance(k, int) and k > 0:
                top_k = top_k or k
    if not banks:
        raise CheckpointError(
            f"{where}: model_type {config.get('model_type')!r} has no routed experts in mlx-lm "
            "(no SwitchGLU / SwitchMLP bank): not a mixture-of-experts model"
        )
    if top_k is None:  # the config's own setting, or the default mlx-lm's ModelArgs has
        top_k = _config_top_k(config) or _config_top_k(vars(args))
    if top_k is None:
        raise CheckpointError(f"{where}: cannot tell how many experts each token uses")
    if why := evaluates_midway(model):
        raise CheckpointError(
            f"{where}: mlx-lm's {config.get('model_type')} cannot be streamed exactly: {why}, "
            "and a GPU bank hands on its output before its loads land (nothing may be "
            "evaluated between two MoE layers)"
        )
    params = frozenset(k for k, _ in tree_flatten(model.parameters()))
    first = next(iter(banks.values())).path
    container = first[: list(_LAYER.finditer("." + first + "."))[-1].start(1) - 1]
    layers = {int(k[len(container):].split(".")[0]) for k in params if k.startswith(container)}
    return ModelTree(str(config.get("model_type", "")), banks, top_k, params, max(layers) + 1)


def _config_top_k(config: dict) -> int | None:
    text = config.get("text_config") or {}
    for cfg in (text if isinstance(text, dict) else vars(text), config):
        for key in _TOP_K_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    return None
