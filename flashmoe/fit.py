"""``flashmoe fit``: will a model run here within a memory budget, and how fast.

From the store's index (safetensors headers, config.json; no weights read) and a few seconds of
measurement on this machine, the forecast of a decode step is the sum of its parts, because the
engine waits for a layer's missed experts before computing it (prefetch is off on the CPU
backend; on a GPU it overlaps part of the reads, so there the forecast leans low):

- compute: a model of the checkpoint's own mlx-lm class with random weights and one period of
  layers (one layer, or one of each kind where kinds alternate), decoding random tokens with
  one routing sync per MoE layer as the streamed banks do; the layers' time, scaled to the
  model's layer count, plus the rest of the step (embedding, output head); timed after a
  16-token context, and again with the attention layers' KV cache grown to the context limit
  (random keys and values): attention over a long context slows every token;
- reads: the loader workers reading random records of the store into a staging pool, one record
  at a time and ``top_k`` at a time (``t = latency + n * per_record``);
- copies: a record from staging into cache arrays of the compute dtype;
- misses: ``layers * top_k * (1 - hit_rate)`` records per token.

The hit rate is the expert cache's (least recently used, over all layers), found by replaying
routing through an LRU of the engine's slot count. Without a trace, the routing is taken as
independent and uniform over a layer's experts: nothing in a checkpoint's index says more, it is
close to what random-weight checkpoints do, and a floor for trained ones, whose routing reuses
experts (on the published Qwen3-30B-A3B trace an LRU of 10 % of the experts hits about half the
lookups, uniform routing a tenth). ``--trace`` replays a recorded routing instead
(``bench decode --trace-out``, or a CSV ``turn,phase,step,layer,slot,expert,...`` as published
for real models), with the cache holding the same share of its experts.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import psutil

from flashmoe.configs import format_size, load_settings, parse_size
from flashmoe.errors import BudgetError, FlashMoeError
from flashmoe.orchestrator import budget as B
from flashmoe.orchestrator.cache import cache_dtype, cache_record_bytes
from flashmoe.orchestrator.pool_plan import plan_for
from flashmoe.store import RECORD_ALIGN, open_store

# The band around the forecast: what one layer's measurement leaves out (the cache's own Python
# per bank call, contention with the machine's other work) beside the spread of the repeats.
MODEL_MARGIN = 0.15
MAX_MARGIN = 0.30
DECODE_REPEATS = 8
# Decode steps and reads are each timed for this long at least by default: on a shared machine
# the load changes from second to second, and a longer window sees more of it (and its spread
# widens the band).
MEASURE_SECONDS = 3.5
UNIFORM_TOKENS = 96  # decode tokens of the uniform routing replayed through the LRU
SMALL_VOCAB = 32768  # the measured model's vocabulary at most (its output head is scaled up)


@dataclass(frozen=True)
class ComputeRate:
    """Seconds of compute per decode token and per prefill token."""

    decode_s: float
    decode_spread: float  # relative spread of the repeats (interquartile / median)
    prefill_s: float
    decode_at_context_s: float  # a decode token at the end of the context (attention grows)


@dataclass(frozen=True)
class IoRate:
    """A layer's missed records: ``latency + n * per_record`` seconds, plus the copy into the
    cache of each."""

    latency_s: float
    per_record_s: float
    copy_s: float
    spread: float
    record_bytes: int

    @property
    def bytes_per_s(self) -> float:
        return self.record_bytes / self.per_record_s if self.per_record_s > 0 else math.inf


# -- compute -------------------------------------------------------------------------------------


class _SyncedBank:
    """The expert bank with the streamed bank's one host sync on the routing per call."""

    def __init__(self, bank):
        self.bank = bank

    def __call__(self, x, indices):
        np.unique(np.array(indices))
        return self.bank(x, indices)


def _quantize(model: nn.Module, dense_q: dict | None, expert_q: dict | None) -> None:
    def predicate(path: str, module: nn.Module):
        q = expert_q if "switch_mlp" in path else dense_q
        if not q or not hasattr(module, "to_quantized"):
            return False
        if module.weight.shape[-1] % q["group_size"]:
            return False
        return {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}

    nn.quantize(model, class_predicate=predicate)


def _banks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent module, attribute, bank) of every expert bank."""
    out = []
    for path, module in model.named_modules():
        if path.endswith("switch_mlp"):
            parent = model
            *head, last = path.split(".")
            for part in head:
                parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
            out.append((parent, last, module))
    return out


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _experts(store) -> int:
    # A decode step computes top_k experts whatever the bank holds: building fewer is cheaper.
    return min(store.num_experts, max(2 * store.top_k, 32))


def _layers_model(store, layers: int, dtype: mx.Dtype) -> nn.Module:
    """A model of ``layers`` layers of the checkpoint's shape, quantized as it is, random."""
    cfg = B.small_config(store.config, layers, experts=_experts(store), vocab=SMALL_VOCAB)
    model = B.build_model(cfg, dtype)
    dense_q = store.config.get("quantization") or store.config.get("quantization_config")
    _quantize(model, dense_q if isinstance(dense_q, dict) else None, store.quantization)
    mx.eval(model.parameters())
    banks = _banks(model)
    for parent, attr, bank in banks:
        setattr(parent, attr, _SyncedBank(bank))
    return model


class _TimedLayer:
    """A decoder layer that evaluates its output and adds its time to ``spent``."""

    def __init__(self, layer, spent: list[float]):
        self.layer, self.spent = layer, spent

    def __getattr__(self, name):  # what the model reads of its layers (qwen3.5: is_linear)
        if name == "layer":
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __call__(self, *args, **kw):
        t0 = time.perf_counter()
        out = self.layer(*args, **kw)
        mx.eval(out)
        self.spent[0] += time.perf_counter() - t0
        return out


def _time_layers(model: nn.Module) -> list[float]:
    """Wrap the model's decoder layers so that their time is counted apart from the rest."""
    spent = [0.0]
    first = model.layers[0]
    for _, module in model.named_modules():
        layers = module.get("layers") if isinstance(module, dict) else None
        if isinstance(layers, list) and layers and layers[0] is first:
            layers[:] = [_TimedLayer(layer, spent) for layer in layers]
            return spent
    raise FlashMoeError("fit: cannot find the model's decoder layers")


def _steps(model: nn.Module, spent: list[float], tokens: int, repeats: int, vocab: int,
           seconds: float = 0.0, context: int = 16) -> tuple[list[float], list[float]]:
    """Per repeat (at least ``repeats``, for at least ``seconds``): seconds in the decoder
    layers and outside them, for a step of ``tokens`` random tokens after ``context`` tokens
    (16 through the model, the rest random keys and values put straight into the KV cache)."""
    from mlx_lm.models.cache import make_prompt_cache

    rng = np.random.default_rng(0)

    def filled_cache():
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array(rng.integers(0, vocab, (1, 16))), cache=cache))
        _extend_kv(cache, context - 16)
        return cache

    cache = filled_cache()
    layers, rest = [], []
    end = time.perf_counter() + seconds
    while len(layers) <= repeats or time.perf_counter() < end:
        ids = mx.array(rng.integers(0, vocab, (1, tokens)))
        if tokens > 1:  # a step of several tokens starts from the same context every time
            cache = filled_cache()
        spent[0] = 0.0
        t0 = time.perf_counter()
        mx.eval(model(ids, cache=cache))
        total = time.perf_counter() - t0
        layers.append(spent[0])
        rest.append(max(total - spent[0], 0.0))
    return layers[1:], rest[1:]  # the first step warms up


def _extend_kv(cache: list, extra: int) -> None:
    """Grow every attention layer's KV cache by ``extra`` random positions (caches of a fixed
    size, such as linear attention's state, stay as they are)."""
    if extra <= 0:
        return
    for c in cache:
        keys, values = getattr(c, "keys", None), getattr(c, "values", None)
        if not isinstance(keys, mx.array) or not isinstance(values, mx.array) or keys.ndim != 4:
            continue
        k = mx.random.normal((*keys.shape[:2], extra, keys.shape[3])).astype(keys.dtype)
        v = mx.random.normal((*values.shape[:2], extra, values.shape[3])).astype(values.dtype)
        mx.eval(c.update_and_fetch(k, v))


def measure_compute(store, dtype: mx.Dtype, seconds: float = MEASURE_SECONDS,
                    prefill_tokens: int = 64, context: int = 16) -> ComputeRate:
    """Time the decoder layers of one period and the rest of a step apart, and scale the
    layers' time to the model's layer count (see the module docstring); decode at a 16-token
    context and at ``context``."""
    period = B.layer_period(store.config)
    scale = store.num_layers / period
    model = _layers_model(store, period, dtype)
    spent = _time_layers(model)
    full_vocab = int(B._text(store.config)["vocab_size"])
    vocab = min(full_vocab, SMALL_VOCAB)
    head = full_vocab / vocab  # the output head's share of the rest grows with the vocabulary

    def per_step(layers, rest):
        return [head * r + scale * lt for lt, r in zip(layers, rest, strict=True)]

    short = per_step(*_steps(model, spent, 1, DECODE_REPEATS, vocab, seconds))
    q = statistics.quantiles(short, n=4)
    decode = statistics.median(short)
    at_context = decode
    if context > 16:
        at_context = statistics.median(per_step(*_steps(model, spent, 1, DECODE_REPEATS, vocab,
                                                        seconds, context)))
    prefill = statistics.median(per_step(*_steps(model, spent, prefill_tokens, 3,
                                                 vocab))) / prefill_tokens
    return ComputeRate(decode, (q[2] - q[0]) / decode, prefill, at_context)


# -- reads ---------------------------------------------------------------------------------------


def measure_io(store, settings, seconds: float, dtype: mx.Dtype) -> IoRate:
    """Read random records with the loader workers, ``1`` and ``top_k`` at a time."""
    from flashmoe.orchestrator.loaders import LoaderPool
    from flashmoe.shm.pool import ExpertPool, cleanup_stale

    k = store.top_k
    stage = -(-store.layout.nbytes // RECORD_ALIGN) * RECORD_ALIGN
    keys = [(layer, e) for layer in store.moe_layers for e in range(store.num_experts)]
    rng = random.Random(0)
    cleanup_stale()
    pool = ExpertPool.create(k, stage)
    times: dict[int, list[float]] = {1: [], k: []}
    try:
        with LoaderPool(pool, workers=settings.workers, threads=settings.io_threads,
                        io_mode=settings.io_mode,
                        chunk_bytes=parse_size(settings.io_chunk) or None) as lp:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or min(len(v) for v in times.values()) < 3:
                for n in times:
                    batch = rng.sample(keys, n)
                    t0 = time.perf_counter()
                    for slot, (layer, e) in enumerate(batch):
                        lp.submit(slot, store.extents(layer, e), store.checksum(layer, e))
                    done = 0
                    while done < n:
                        got = lp.poll(30.0)
                        if not got:
                            raise FlashMoeError("fit: the loader workers did not answer in 30 s")
                        for c in got:
                            if not c.ok:
                                raise FlashMoeError(f"fit: a read failed: {c.error}")
                        done += len(got)
                    times[n].append(time.perf_counter() - t0)
        copy = _copy_time(pool, store.layout, dtype)
    finally:
        pool.close()
        pool.unlink()
    one, many = statistics.median(times[1]), statistics.median(times[k])
    per = max((many - one) / (k - 1), 1e-7) if k > 1 else one
    spread = max((statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0])
                 / statistics.median(v) for v in times.values())
    return IoRate(max(one - per, 0.0), per, copy, spread, store.layout.nbytes)


def _copy_time(pool, layout, dtype: mx.Dtype) -> float:
    """Seconds to copy one record from staging into cache arrays of the compute dtype."""
    from flashmoe.store import NP_DTYPES

    src = pool.tensor_views(0, layout)
    dst = {t.name: np.empty(t.shape, dtype=np.float32 if cache_dtype(t, dtype) == mx.float32
                            and t.dtype != "float32" else NP_DTYPES[t.dtype])
           for t in layout.tensors}

    def copy():
        for t in layout.tensors:
            d, s = dst[t.name], src[t.name]
            if d.dtype == np.float32 and t.dtype == "bfloat16":
                w = d.view(np.uint32)
                w[...] = s
                w <<= 16
            else:
                d[...] = s
        mx.eval(mx.array(dst[layout.tensors[0].name]))

    return min(_time(copy, 5))


# -- hit rate ------------------------------------------------------------------------------------


def read_route_trace(path: str) -> tuple[list[tuple[int, list[int]]], int]:
    """A routing trace as ``(layer, experts)`` per decode call, and how many lookups come before
    the counted part: ``bench decode --trace-out``'s JSON lines (decode; the first quarter
    warms the cache), or a CSV
    ``turn,phase,step,layer,slot,expert,...`` (phase 1 = decode; '#' lines are comments)."""
    from flashmoe.bench_io import read_trace

    p = Path(path)
    try:
        first = next((ln for ln in p.open() if ln.strip() and not ln.startswith("#")), "")
    except OSError as e:
        raise FlashMoeError(f"cannot read routing trace {path}: {e.strerror or e}") from None
    if first.lstrip().startswith("{"):
        calls = read_trace(path)
        return calls, len(calls) // 4  # the recording engine's cache was warm from the prompt
    calls: OrderedDict[tuple, list[int]] = OrderedDict()
    warm = 0
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        f = line.split(",")
        if not f[0].strip().isdigit():
            continue  # a header row
        try:
            key = (int(f[0]), int(f[1]), int(f[2]), int(f[3]))
            calls.setdefault(key, []).append(int(f[5]))
        except (ValueError, IndexError):
            raise FlashMoeError(f"{path}:{n}: not a routing row") from None
    if not calls:
        raise FlashMoeError(f"{path}: no routing records")
    out = []
    for (_turn, phase, _step, layer), experts in calls.items():
        if phase == 0 and not out[warm:]:
            warm = len(out) + 1
        out.append((layer, experts))
    return out, warm


def lru_hit_rate(calls: list[tuple[int, list[int]]], slots: int, warm_calls: int = 0) -> float:
    """Hit rate of an LRU cache of ``slots`` (layer, expert) entries over ``calls``, counting
    the calls after the first ``warm_calls``."""
    lru: OrderedDict[tuple[int, int], None] = OrderedDict()
    hits = total = 0
    for i, (layer, experts) in enumerate(calls):
        for e in experts:
            key = (layer, e)
            hit = key in lru
            if hit:
                lru.move_to_end(key)
            else:
                lru[key] = None
                if len(lru) > slots:
                    lru.popitem(last=False)
            if i >= warm_calls:
                hits += hit
                total += 1
    return hits / total if total else 1.0


def uniform_calls(layers: int, experts: int, k: int, tokens: int = UNIFORM_TOKENS,
                  seed: int = 0) -> list[tuple[int, list[int]]]:
    """Decode routing that picks each layer's ``k`` experts uniformly at random, token by
    token, layer after layer."""
    rng = np.random.default_rng(seed)
    return [(layer, rng.choice(experts, k, replace=False).tolist())
            for _ in range(tokens) for layer in range(layers)]


def hit_rate_model(trace: str | None, layers: int, experts: int, k: int):
    """A function ``share of the model's experts cached -> hit rate``, and its name (module
    docstring). Uniform routing is replayed through the LRU too rather than taken as the share
    cached: where a token's lookups outnumber the slots, LRU evicts each expert just before
    its layer comes round again (8 experts, top-2, 6 layers, 10 slots: no hits at all)."""
    if trace is None:
        calls, warm = uniform_calls(layers, experts, k), UNIFORM_TOKENS // 4 * layers
        name = "uniform routing through the LRU cache"
    else:
        calls, warm = read_route_trace(trace)
        layers = len({layer for layer, _ in calls})
        experts = max(e for _, ex in calls for e in ex) + 1
        name = f"LRU over the trace {Path(trace).name} ({len(calls)} calls)"
    keys = len({(layer, e) for layer, ex in calls for e in ex})
    memo: dict[int, float] = {}

    def rate(share: float) -> float:
        slots = min(max(1, round(share * layers * experts)), keys)
        if slots not in memo:
            memo[slots] = lru_hit_rate(calls, slots, warm)
        return memo[slots]

    return rate, name


# -- the forecast --------------------------------------------------------------------------------


def decode_seconds(compute: ComputeRate, io: IoRate, layers: int, k: int, hit: float) -> dict:
    """Parts of a decode token's time at hit rate ``hit`` (see the module docstring)."""
    misses = layers * k * (1 - hit)
    layers_missing = layers * (1 - hit ** k)
    io_s = layers_missing * io.latency_s + misses * io.per_record_s
    return dict(compute_s=compute.decode_s, io_s=io_s, copy_s=misses * io.copy_s, misses=misses)


def forecast(store, plan: B.BudgetPlan, compute: ComputeRate, io: IoRate, hit_of, dtype,
             settings, prefill_tokens: int) -> dict:
    layers, k, E = len(store.moe_layers), store.top_k, store.num_experts
    pool = plan_for(store, settings, plan.pool_bytes, dtype, k)
    share = pool.cache_slots / (layers * E)
    hit = hit_of(share)
    parts = decode_seconds(compute, io, layers, k, hit)
    reads = parts["io_s"] + parts["copy_s"]
    margin = min(MAX_MARGIN, MODEL_MARGIN + max(compute.decode_spread, io.spread) / 2)

    def band(compute_s: float) -> dict:
        expected = 1 / (compute_s + reads)
        return dict(low=expected * (1 - margin), expected=expected, high=expected * (1 + margin))

    # Prefill: each step of up to 2,048 tokens reads the union of its experts once per layer,
    # group by group where the cache holds fewer (each group computes only its own tokens).
    step = min(B.PREFILL_STEP, prefill_tokens)
    steps = math.ceil(prefill_tokens / step)
    union = E * (1 - (1 - k / E) ** step)
    groups = math.ceil(union / pool.cache_slots)
    missed = layers * union * (1 - hit if groups == 1 else 1)
    read_s = steps * (layers * io.latency_s + missed * (io.per_record_s + io.copy_s))
    # A prompt's token attends to half the prompt on average, and attention costs about the
    # same per (query, key) whether queries come one at a time or in a step, so each token
    # adds half of what decode at the context limit (``prefill_tokens``) adds over decode.
    attention_s = max(compute.decode_at_context_s - compute.decode_s, 0.0) / 2
    compute_s = prefill_tokens * (compute.prefill_s + attention_s)
    return dict(
        cache_slots=pool.cache_slots, staging_slots=pool.staging_slots,
        cached_share=share, hit_rate=hit,
        bytes_per_token=parts["misses"] * store.layout.nbytes,
        misses_per_token=parts["misses"],
        compute_tokens_per_s=1 / parts["compute_s"],
        io_tokens_per_s=1 / reads if parts["misses"] else math.inf,
        decode_parts_s=parts,
        decode_tokens_per_s=band(compute.decode_s),
        decode_tokens_per_s_at_context=band(compute.decode_at_context_s),
        prefill_tokens_per_s=prefill_tokens / (compute_s + read_s),
        prefill_groups=groups,
    )


def recommend(store, base_fixed: int, min_pool: int, compute: ComputeRate, io: IoRate, hit_of,
              dtype) -> int:
    """The smallest budget whose misses cost at most a quarter of the compute time (decode
    within 80 % of the rate with every expert in memory), or the one holding every expert."""
    layers, k, E = len(store.moe_layers), store.top_k, store.num_experts
    rec = cache_record_bytes(store.layout, dtype)
    stage = min_pool - k * rec
    for pct in range(5, 101, 5):
        parts = decode_seconds(compute, io, layers, k, hit_of(pct / 100))
        if parts["io_s"] + parts["copy_s"] <= compute.decode_s / 4 or pct == 100:
            slots = max(k, math.ceil(pct / 100 * layers * E))
            return base_fixed + slots * rec + min(E, 4 * k) * stage
    raise AssertionError("unreachable")


def fit(model: str, budget: str | int | None, context: int | None, trace: str | None,
        kv_bits: int | None = None, seconds: float = MEASURE_SECONDS) -> dict:
    """The whole forecast as one dict (what ``--json`` prints)."""
    from flashmoe.orchestrator.engine import casts_model, resolve_dtype

    t0 = time.perf_counter()
    settings = load_settings()
    store = open_store(model)
    dtype = resolve_dtype(settings.dtype, store.config)
    cast = casts_model(settings.dtype, dtype, store.config)
    dense = B.dense_in_memory(store, dtype, cast)
    ignored = B.ignored_tensors(store)
    kv = B.measure_kv(store.config, dtype, kv_bits)
    rec = cache_record_bytes(store.layout, dtype)
    min_pool = store.top_k * rec + -(-store.layout.nbytes // RECORD_ALIGN) * RECORD_ALIGN
    available = psutil.virtual_memory().available
    total = parse_size(budget) if budget is not None else available
    out: dict = dict(
        model=str(store.path), store_kind=store.kind, model_type=store.model_type,
        moe_layers=len(store.moe_layers), experts_per_layer=store.num_experts,
        experts_per_token=store.top_k, record_bytes=store.layout.nbytes,
        cache_record_bytes=rec, expert_bytes=store.expert_bytes_total(),
        dense_bytes=dense, dtype=str(dtype).split(".")[-1],
        ignored_tensors=len(ignored), ignored_bytes=sum(t.nbytes for t in ignored.values()),
        kv_bits=kv_bits, kv_bytes_per_token=kv.per_token, available_bytes=available,
        memory_budget=total,
    )
    try:
        plan = B.plan_budget(total, store.config, kv, dense, min_pool, dtype.size, context)
        fits = True
    except BudgetError as e:
        plan, fits = None, False
        out["why_not"] = str(e)
    ctx = plan.max_context if plan else (context or B.KV_STEP)
    fixed = B.fixed_bytes(store.config, kv, dense, ctx, dtype.size)
    out.update(fits=fits, context=ctx, kv_bytes=kv.bytes_at(ctx),
               workspace_bytes=B.prefill_workspace(store.config, ctx, dtype.size),
               min_expert_cache=min_pool, min_budget=fixed + min_pool)
    t1 = time.perf_counter()
    compute = measure_compute(store, dtype, seconds, context=ctx)
    t2 = time.perf_counter()
    io = measure_io(store, settings, seconds, dtype)
    out["measure_s"] = dict(index_and_kv=t1 - t0, compute=t2 - t1,
                            io=time.perf_counter() - t2)
    hit_of, hit_model = hit_rate_model(trace, len(store.moe_layers), store.num_experts,
                                       store.top_k)
    out.update(hit_model=hit_model, disk_bytes_per_s=io.bytes_per_s,
               read_latency_s=io.latency_s, copy_s_per_record=io.copy_s,
               recommended_budget=recommend(store, fixed, min_pool, compute, io, hit_of, dtype))
    if plan is not None:
        out.update(pool_bytes=plan.pool_bytes,
                   **forecast(store, plan, compute, io, hit_of, dtype, settings, ctx))
    else:
        out.update(hit_rate=None, bytes_per_token=None, prefill_tokens_per_s=None,
                   decode_tokens_per_s=None, decode_tokens_per_s_at_context=None)
    store.close()
    out["fit_seconds"] = time.perf_counter() - t0
    out["load_average"] = os.getloadavg()[0]
    out["cpus"] = os.cpu_count() or 1
    return out


def _table(d: dict) -> str:
    gib = format_size
    rows = [
        ("model", f"{d['model']} ({d['model_type']}, {d['store_kind']}, {d['dtype']})"),
        ("memory budget", f"{gib(d['memory_budget'])} (available now {gib(d['available_bytes'])})"),
        ("fits", "yes" if d["fits"] else f"no: {d['why_not']}"),
        ("dense weights", gib(d["dense_bytes"])),
        ("KV cache", f"{gib(d['kv_bytes'])} for {d['context']} tokens "
                     f"({d['kv_bytes_per_token']:.0f} B/token"
                     + (f", {d['kv_bits']}-bit" if d["kv_bits"] else "") + ")"),
        ("prefill workspace", gib(d["workspace_bytes"])),
        ("smallest expert pool", f"{gib(d['min_expert_cache'])} (one layer's "
                                 f"{d['experts_per_token']} experts + one staging slot)"),
        ("smallest budget", gib(d["min_budget"])),
        ("recommended budget", gib(d["recommended_budget"])),
        ("ignored", f"{d['ignored_tensors']} tensors, {gib(d['ignored_bytes'])} (MTP, vision)"
         if d["ignored_tensors"] else "nothing"),
        ("experts", f"{d['moe_layers']} layers x {d['experts_per_layer']}, "
                    f"{gib(d['record_bytes'])} each, {gib(d['expert_bytes'])} in all"),
        ("disk", f"{d['disk_bytes_per_s'] / 1e6:.0f} MB/s per record read, "
                 f"{d['read_latency_s'] * 1e3:.2f} ms per layer's reads"),
    ]
    if d["fits"]:
        r, c = d["decode_tokens_per_s"], d["decode_tokens_per_s_at_context"]
        rows += [
            ("expert cache", f"{d['cache_slots']} slots = {d['cached_share']:.1%} of the experts"),
            ("hit rate", f"{d['hit_rate']:.1%} ({d['hit_model']})"),
            ("missed per token", f"{d['misses_per_token']:.1f} experts, "
                                 f"{gib(int(d['bytes_per_token']))}"),
            ("I/O-bound rate", f"{d['io_tokens_per_s']:.2f} tok/s"),
            ("compute-bound rate", f"{d['compute_tokens_per_s']:.2f} tok/s"),
            ("decode", f"{r['expected']:.2f} tok/s (band {r['low']:.2f} .. {r['high']:.2f})"),
            ("decode at the end", f"{c['expected']:.2f} tok/s (band {c['low']:.2f} .. "
                                  f"{c['high']:.2f}) with {d['context']} tokens of context"),
            ("prefill", f"{d['prefill_tokens_per_s']:.1f} tok/s for {d['context']} tokens"),
        ]
    rows.append(("fit took", f"{d['fit_seconds']:.1f} s"))
    if d["load_average"] > d["cpus"]:
        rows.append(("warning", f"load average {d['load_average']:.1f} on {d['cpus']} CPUs: "
                                "timings taken on a busy machine vary beyond the band"))
    return "\n".join(f"{k + ':':<22}{v}" for k, v in rows)


def cmd_fit(args) -> int:
    """``flashmoe fit MODEL [--memory-budget SIZE] [--context N] [--trace FILE] [--json]``."""
    if args.context is not None and args.context < 1:
        raise FlashMoeError(f"--context must be >= 1, got {args.context}")
    d = fit(args.model, args.memory_budget, args.context, args.trace, args.kv_bits, args.seconds)
    print(json.dumps(d) if args.json else _table(d))
    return 0
