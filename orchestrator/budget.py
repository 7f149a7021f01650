"""One memory budget for everything flashmoe holds: dense weights, the KV cache for the context
limit, the prefill workspace, and the expert pool (cache + staging), which gets what is left.

The KV cache's size per token is measured, not derived from a formula per architecture: a model
of the checkpoint's own mlx-lm class with one period of layers (one full-attention layer, or one
of each kind where layers alternate) and random weights runs 1 and then 257 tokens, and the
difference of its caches' ``nbytes`` is 256 tokens' worth; what does not grow (linear
attention's state) is the fixed part. The figures are then scaled to the model's layer count.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from flashmoe.errors import BudgetError

# Tokens per prefill step (mlx-lm's generate_step default): the attention scores of one step
# are the largest transient buffer of a long prompt on a backend without fused attention.
PREFILL_STEP = 2048
FLOATS = ("bfloat16", "float16", "float32")
# Checkpoint tensors mlx-lm's text models never load: multi-token-prediction heads and the
# vision or audio towers of multimodal checkpoints (and layers past num_hidden_layers, where
# DeepSeek keeps its MTP layer).
_NOT_LOADED = re.compile(
    r"(^|\.)(mtp|visual|vision_tower|vision_model|multi_modal_projector|audio_tower)\.")
_LAYER = re.compile(r"layers\.(\d+)\.")
# Every context limit is a whole number of mlx-lm's KV allocation steps.
KV_STEP = 256
# The largest default context limit (the engine's max_prompt_tokens default).
MAX_DEFAULT_CONTEXT = 32768


def _text(config: dict) -> dict:
    return config.get("text_config", config)


def kv_group_size(config: dict) -> int:
    """The quantized KV cache's group size: 64, or 32 for heads narrower than that."""
    tc = _text(config)
    dim = tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]
    return 64 if dim % 64 == 0 else 32


def layer_period(config: dict) -> int:
    """Layers after which the pattern of layer kinds repeats (qwen3.5: one full-attention layer
    every ``full_attention_interval``); 1 for models whose layers are all alike."""
    return max(1, int(_text(config).get("full_attention_interval", 1)))


def small_config(config: dict, layers: int, experts: int | None = None,
                 vocab: int | None = None) -> dict:
    """``config`` with ``layers`` layers, all of them MoE layers, optionally fewer experts (at
    least top-k) and a smaller vocabulary: a model of the same shape that is cheap to build."""
    tc = dict(_text(config))
    tc["num_hidden_layers"] = layers
    if "layer_types" in tc:
        tc["layer_types"] = tc["layer_types"][:layers]
    if "mlp_only_layers" in tc:
        tc["mlp_only_layers"] = []
    tc["decoder_sparse_step"] = 1
    if "first_k_dense_replace" in tc:
        tc["first_k_dense_replace"] = 0
    if experts is not None:
        for key in ("num_experts", "n_routed_experts", "num_local_experts"):
            if key in tc:
                tc[key] = max(experts, int(tc.get("num_experts_per_tok", 1)))
        if "n_group" in tc:  # group routing needs the experts to split into the groups
            tc["n_group"], tc["topk_group"] = 1, 1
    if vocab is not None:
        tc["vocab_size"] = min(int(tc["vocab_size"]), vocab)
    tc.pop("quantization", None)
    tc.pop("quantization_config", None)
    if "text_config" in config:
        return {**config, "text_config": tc, "num_hidden_layers": layers}
    return tc


def with_layers(config: dict, layers: int) -> dict:
    """``config`` with ``layers`` decoder layers (a pipeline stage's count, for its KV cache)."""
    if "text_config" in config:
        return {**config, "text_config": {**config["text_config"], "num_hidden_layers": layers}}
    return {**config, "num_hidden_layers": layers}


def build_model(config: dict, dtype: mx.Dtype) -> nn.Module:
    """An mlx-lm model of ``config``'s class with random weights (lazy until evaluated)."""
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(dtype)
    return model


@dataclass(frozen=True)
class KVShape:
    """KV cache bytes of the whole model: ``fixed + per_token * tokens`` (tokens rounded up to
    mlx-lm's 256-token allocation step)."""

    per_token: float
    fixed: int
    bits: int | None  # quantized KV cache (mlx-lm's QuantizedKVCache), or None

    def bytes_at(self, tokens: int) -> int:
        alloc = math.ceil(max(tokens, 1) / KV_STEP) * KV_STEP
        return int(self.fixed + self.per_token * alloc)


_MEASURED: dict[tuple, KVShape] = {}


def measure_kv(config: dict, dtype: mx.Dtype, kv_bits: int | None = None) -> KVShape:
    """The KV cache per token, measured on a one-period model of this shape (once per shape in
    a process: linear attention's recurrence makes it take a second); where such a model cannot
    be built or run (a layer pattern it does not reproduce), the plain attention bound."""
    key = (json.dumps(config, sort_keys=True, default=str), str(dtype), kv_bits)
    if key not in _MEASURED:
        try:
            _MEASURED[key] = _measure_kv(config, dtype, kv_bits)
        except Exception:  # the measurement is a refinement; the bound below is never smaller
            _MEASURED[key] = attention_kv_bound(config, dtype, kv_bits)
    return _MEASURED[key]


def attention_kv_bound(config: dict, dtype: mx.Dtype, kv_bits: int | None = None) -> KVShape:
    """Keys and values of every layer for every token, as plain multi-head attention stores
    them (quantized: ``kv_bits`` per element plus a scale and a bias per group)."""
    tc = _text(config)
    heads = int(tc.get("num_key_value_heads") or tc.get("num_attention_heads") or 1)
    dim = int(tc.get("head_dim") or tc["hidden_size"] // int(tc.get("num_attention_heads") or 1))
    elements = 2 * int(tc["num_hidden_layers"]) * heads * dim
    if kv_bits:
        per_token = elements * kv_bits / 8 + elements / kv_group_size(config) * 2 * dtype.size
    else:
        per_token = elements * dtype.size
    return KVShape(per_token, 0, kv_bits)


def _measure_kv(config: dict, dtype: mx.Dtype, kv_bits: int | None) -> KVShape:
    """The caches of 256 and 512 tokens of a one-period model (see the module docstring; a
    first call of a whole number of 256-token steps allocates exactly that)."""
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    period = layer_period(config)
    layers = int(_text(config)["num_hidden_layers"])
    model = build_model(small_config(config, period, experts=2, vocab=512), dtype)

    def cache_bytes(n: int) -> int:
        cache = make_prompt_cache(model)
        model(mx.zeros((1, n), dtype=mx.int32), cache=cache)
        maybe_quantize_kv_cache(cache, 0, kv_group_size(config), kv_bits)
        mx.eval([c.state for c in cache])
        return sum(c.nbytes for c in cache)

    one, two = cache_bytes(KV_STEP), cache_bytes(2 * KV_STEP)
    per_token = (two - one) / KV_STEP * layers / period
    fixed = max(0, int(one * layers / period - per_token * KV_STEP))
    return KVShape(per_token, fixed, kv_bits)


def attention_heads(config: dict) -> int:
    return int(_text(config).get("num_attention_heads", 1))


def prefill_workspace(config: dict, context: int, itemsize: int) -> int:
    """The attention scores of one prefill step against the whole context, with a quarter on
    top for the rest of the step: MLX's CPU backend computes attention unfused, so the scores
    are materialized."""
    step = min(PREFILL_STEP, context)
    return attention_heads(config) * step * context * itemsize * 5 // 4


@dataclass(frozen=True)
class BudgetPlan:
    """How a memory budget splits: everything here is held for the engine's whole life."""

    budget: int
    dense_bytes: int
    max_context: int
    kv_bytes: int
    workspace_bytes: int
    pool_bytes: int  # expert cache + staging: what is left
    kv: KVShape | None = None  # the KV cache's bytes per token, for sequences in flight

    def as_dict(self) -> dict:
        return dict(budget_bytes=self.budget, dense_bytes=self.dense_bytes,
                    max_context=self.max_context, kv_bytes=self.kv_bytes,
                    workspace_bytes=self.workspace_bytes, pool_bytes=self.pool_bytes)


def fixed_bytes(config: dict, kv: KVShape, dense_bytes: int, context: int,
                itemsize: int) -> int:
    """Dense weights + KV cache + prefill workspace at a context limit of ``context`` tokens."""
    return dense_bytes + kv.bytes_at(context) + prefill_workspace(config, context, itemsize)


def default_context(budget: int, config: dict, kv: KVShape, dense_bytes: int, min_pool: int,
                    itemsize: int) -> int:
    """The longest context (a multiple of 256, at most 32,768) whose KV cache and workspace
    leave the expert pool at least ``min_pool`` bytes, or 0 if not even 256 tokens do; the
    longest such context is also capped so that it takes at most half of what the dense weights
    leave, so that a large budget still gives the experts most of it."""
    room = budget - dense_bytes - min_pool
    best = 0
    ctx = KV_STEP
    while ctx <= MAX_DEFAULT_CONTEXT:
        need = kv.bytes_at(ctx) + prefill_workspace(config, ctx, itemsize)
        if need > room or (best and need > (budget - dense_bytes) / 2):
            break
        best = ctx
        ctx += KV_STEP
    return best


def plan_budget(budget: int, config: dict, kv: KVShape, dense_bytes: int, min_pool: int,
                itemsize: int, max_context: int | None = None) -> BudgetPlan:
    """Split ``budget``; ``max_context`` None chooses it (``default_context``). Raises
    ``BudgetError`` naming the numbers when dense + KV + workspace + the smallest pool do not
    fit."""
    if max_context is None:
        max_context = default_context(budget, config, kv, dense_bytes, min_pool, itemsize)
        if max_context == 0:
            need = fixed_bytes(config, kv, dense_bytes, KV_STEP, itemsize) + min_pool
            raise BudgetError(
                f"memory budget {budget} bytes is too small: dense weights {dense_bytes} + KV "
                f"cache and workspace for {KV_STEP} tokens + the smallest expert pool "
                f"{min_pool} need {need} bytes; use --memory-budget {need} or more")
    elif max_context < 1:
        raise BudgetError(f"--max-context must be >= 1, got {max_context}")
    kv_bytes = kv.bytes_at(max_context)
    work = prefill_workspace(config, max_context, itemsize)
    pool = budget - dense_bytes - kv_bytes - work
    if pool < min_pool:
        need = dense_bytes + kv_bytes + work + min_pool
        raise BudgetError(
            f"memory budget {budget} bytes is too small for a context of {max_context} tokens: "
            f"dense weights {dense_bytes} + KV cache {kv_bytes} + prefill workspace {work} + "
            f"the smallest expert pool {min_pool} = {need} bytes; raise --memory-budget to "
            f"{need} or lower --max-context")
    return BudgetPlan(budget, dense_bytes, max_context, kv_bytes, work, pool, kv)


def kv_args(kv_bits: int, config: dict) -> dict:
    """``generate_step``'s arguments for a quantized KV cache from the first token on."""
    if not kv_bits:
        return {}
    return dict(kv_bits=kv_bits, kv_group_size=kv_group_size(config), quantized_kv_start=0)


def check_request(prompt_tokens: int, max_tokens: int, max_context: int) -> None:
    """Raise ``ValueError`` naming the numbers when a request cannot fit the context limit."""
    if prompt_tokens + max_tokens > max_context:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} = "
            f"{prompt_tokens + max_tokens} tokens exceeds the context limit of {max_context} "
            f"tokens that the memory budget holds a KV cache for; shorten the prompt, lower "
            f"max_tokens, or raise --memory-budget / --max-context")


def dense_bytes_of(model: nn.Module, banks: tuple[str, ...] = ()) -> int:
    """Bytes of a model's parameters outside the expert banks at ``banks`` (module paths)."""
    prefixes = tuple(p + "." for p in banks)
    return sum(v.nbytes for k, v in tree_flatten(model.parameters())
               if not k.startswith(prefixes))


def ignored_tensors(store) -> dict:
    """Checkpoint tensors the model does not load (MTP heads, vision towers): the store's own
    list where it keeps one, else those whose names say so."""
    own = getattr(store, "ignored_tensors", None)
    if callable(own):
        return dict(own())
    out = {}
    for name, info in store.dense_tensors().items():
        m = _LAYER.search(name)
        if _NOT_LOADED.search(name) or (m and int(m[1]) >= store.num_layers):
            out[name] = info
    return out


def dense_in_memory(store, compute: mx.Dtype, cast: bool, layers: range | None = None) -> int:
    """Bytes the dense weights take once loaded: the tensors the model loads (of ``layers``
    and the layer-less ones, for a pipeline stage), floating ones in ``compute`` when the engine
    casts the model (``cast``)."""
    ignored = ignored_tensors(store)
    total = 0
    for name, t in store.dense_tensors().items():
        m = _LAYER.search(name)
        if name in ignored or (layers is not None and m and int(m[1]) not in layers):
            continue
        if cast and t.dtype in FLOATS:
            total += math.prod(t.shape) * compute.size
        else:
            total += t.nbytes
    return total


def min_pool_bytes(store, compute: mx.Dtype) -> int:
    """The smallest expert pool that can run: one layer's ``top_k`` experts cached and one
    staging slot (what ``plan_pool`` demands)."""
    from flashmoe.orchestrator.cache import cache_record_bytes
    from flashmoe.store import RECORD_ALIGN

    stage = -(-store.layout.nbytes // RECORD_ALIGN) * RECORD_ALIGN
    return store.top_k * cache_record_bytes(store.layout, compute) + stage


def parse_context(setting) -> int | None:
    """The ``max_context`` setting: ``auto`` (None) or a token count >= 1."""
    v = str(setting).strip().lower()
    if v == "auto":
        return None
    if not v.isdigit() or int(v) < 1:
        raise BudgetError(f"max context must be auto or a number of tokens >= 1, got {setting!r}")
    return int(v)


def plan_for_engine(store, setting, compute: mx.Dtype, cast: bool, settings,
                    layers: range | None = None) -> BudgetPlan:
    """The engine's split of its ``memory_budget`` setting (``auto``: the dense weights plus
    ``auto_budget_fraction`` of the memory available beyond them); a pipeline stage holds the
    dense weights and KV cache of its ``layers`` only."""
    import psutil

    from flashmoe.configs import parse_size

    if settings.kv_bits not in (0, 4, 8):
        raise BudgetError(f"kv bits must be 4 or 8 (0 = off), got {settings.kv_bits}")
    dense = dense_in_memory(store, compute, cast, layers)
    if str(setting) == "auto":
        avail = psutil.virtual_memory().available
        budget = dense + max(0, int((avail - dense) * settings.auto_budget_fraction))
    else:
        budget = parse_size(setting)
    config = store.config if layers is None else with_layers(store.config, len(layers))
    kv = measure_kv(config, compute, settings.kv_bits or None)
    return plan_budget(budget, store.config, kv, dense, min_pool_bytes(store, compute),
                       compute.size, parse_context(settings.max_context))


def budget_for_pool(store, pool_bytes: int, compute: mx.Dtype, cast: bool = True) -> int:
    """The budget that leaves the expert pool ``pool_bytes`` at the shortest context limit
    (256 tokens): for tests and benchmarks sized by their expert cache."""
    kv = measure_kv(store.config, compute)
    return pool_bytes + fixed_bytes(store.config, kv, dense_in_memory(store, compute, cast),
                                    KV_STEP, compute.size)
