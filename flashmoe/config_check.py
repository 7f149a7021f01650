"""Check a checkpoint's ``config.json`` values against the types mlx-lm's model declares for them,
so that a bad value is one ``CheckpointError`` naming the key, not a traceback from deep inside
model construction or the first forward pass."""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from pathlib import Path
from typing import Any

from flashmoe.errors import CheckpointError

# integer settings of which 0 makes no model (sizes, counts, steps)
POSITIVE = frozenset({
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "num_experts",
    "num_local_experts", "n_routed_experts", "num_experts_per_tok", "max_position_embeddings",
    "decoder_sparse_step", "moe_layer_freq", "full_attention_interval",
})  # fmt: skip

INT_MAX = 2**31 - 1  # no size or count of a model is larger


def arg_types(model_type: str) -> dict[str, Any]:
    """Field name -> type of mlx-lm's ``ModelArgs`` for the model (and of the ``TextModelArgs`` of
    its text model, for a model whose settings sit under ``text_config``)."""
    types: dict[str, Any] = {}
    try:
        args = importlib.import_module(f"mlx_lm.models.{model_type}").ModelArgs
    except (ImportError, AttributeError):
        return types
    classes = [args]
    if "text_config" in {f.name for f in dataclasses.fields(args)}:
        try:
            text = importlib.import_module(f"mlx_lm.models.{model_type.removesuffix('_moe')}")
            classes.append(text.TextModelArgs)
        except (ImportError, AttributeError):
            pass
    for cls in classes:
        hints = typing.get_type_hints(cls)
        types.update({f.name: hints[f.name] for f in dataclasses.fields(cls)})
    return types


def _bad(key: str, value: Any, want: Any) -> str | None:
    """Why ``value`` does not fit ``want``, or None."""
    optional = typing.get_origin(want) is typing.Union and type(None) in typing.get_args(want)
    if value is None:
        return None if optional else "must not be null"
    if optional:
        want = next(a for a in typing.get_args(want) if a is not type(None))
    if want is int:
        if type(value) is not int:
            return "must be an integer"
        if value < (1 if key in POSITIVE else 0):
            return "must be positive" if key in POSITIVE else "must not be negative"
        if value > INT_MAX:
            return f"must be at most {INT_MAX}"
    elif want is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            return "must be a finite number"
        if key.endswith(("eps", "theta")) and value <= 0:
            return "must be positive"
    elif want is bool:
        if type(value) is not bool:
            return "must be true or false"
    elif want is str:
        if not isinstance(value, str):
            return "must be a string"
    elif typing.get_origin(want) in (list, typing.List):  # noqa: UP006
        if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
            return "must be a list of non-negative integers"
    elif want is dict or typing.get_origin(want) in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, dict):
            return "must be an object"
    return None


def check_config(path: Path, config: dict, text_config: dict) -> None:
    """Raise ``CheckpointError`` for the first value of ``config.json`` that mlx-lm cannot use."""
    where = path / "config.json"
    types = arg_types(str(config.get("model_type")))
    for scope in (config, text_config) if text_config is not config else (config,):
        for key, want in types.items():
            if key in scope and key != "text_config":
                why = _bad(key, scope[key], want)
                if why:
                    raise CheckpointError(f"{where}: {key} {why}, got {scope[key]!r}"[:300])
    heads, kv = text_config.get("num_attention_heads"), text_config.get("num_key_value_heads")
    if type(heads) is int and type(kv) is int and kv > 0 and heads % kv:
        raise CheckpointError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
        )
