"""What a memory budget buys: cache slots for experts, and what else sits between the disk and
the cache (the staging slots the loaders read into, their bounce buffers, the widening of
floating tensors to the compute dtype). The engine plans its pool here and ``flashmoe inspect
--memory-budget`` shows the same plan."""

from __future__ import annotations

import mlx.core as mx

from flashmoe.configs import Settings
from flashmoe.orchestrator.cache import PoolPlan, plan_pool
from flashmoe.orchestrator.cuda_copy import MAX_ARRAY_BYTES, on_cuda
from flashmoe.shm.pool import staging_slots
from flashmoe.workers.loader import BOUNCE_PIECE


def _prefetch_on(settings: Settings) -> bool:
    from flashmoe.orchestrator.engine import resolve_prefetch

    return resolve_prefetch(settings.prefetch)


def plan_for(store, settings: Settings, budget: int, dtype: mx.Dtype, top_k: int) -> PoolPlan:
    """The pool the engine makes for ``budget`` bytes: staging for the reads the loaders keep in
    flight, every other byte for cache slots."""
    depth = settings.prefetch_depth if _prefetch_on(settings) else 0
    return plan_pool(budget, store.layout, dtype, top_k, store.num_experts,
                     parallel_reads=staging_slots(settings.workers, settings.io_threads, depth),
                     max_slot_array_bytes=MAX_ARRAY_BYTES if on_cuda() else None,
                     total_experts=len(store.moe_layers) * store.num_experts)


def describe_pool(store, settings: Settings, budget: int, dtype: mx.Dtype,
                  top_k: int | None = None) -> dict:
    """The plan for ``budget`` and the bytes between the disk and the cache."""
    plan = plan_for(store, settings, budget, dtype, top_k or store.top_k)
    total = len(store.moe_layers) * store.num_experts
    threads = max(1, settings.workers) * max(1, settings.io_threads)
    return {
        "memory_budget": budget,
        "dtype": str(dtype).split(".")[-1],
        "cache_slots": plan.cache_slots,
        "cached_share": plan.cache_slots / total,
        "cache_record_bytes": plan.cache_record_bytes,
        "widening_bytes": plan.cache_slots * (plan.cache_record_bytes - store.layout.nbytes),
        "staging_slots": plan.staging_slots,
        "staging_bytes": plan.staging_slots * plan.staging_slot_bytes,
        # outside the budget: each I/O thread's buffer for unaligned (in-place) extents
        "bounce_bytes": threads * BOUNCE_PIECE if store.kind != "packed" else 0,
        "pool_bytes": plan.nbytes,
    }


def inspect_budget(store, budget_text: str) -> tuple[dict, list[tuple[str, str]]]:
    """``flashmoe inspect --memory-budget``: the plan as a dict and as rows to print."""
    from flashmoe.configs import format_size, load_settings, parse_size
    from flashmoe.orchestrator.budget import plan_for_engine
    from flashmoe.orchestrator.engine import casts_model, resolve_dtype

    settings = load_settings()
    dtype = resolve_dtype(settings.dtype, store.config)
    cast = casts_model(settings.dtype, dtype, store.config)
    bp = plan_for_engine(store, parse_size(budget_text), dtype, cast, settings)
    d = describe_pool(store, settings, bp.pool_bytes, dtype)
    d.update(memory_budget=bp.budget, dense_bytes=bp.dense_bytes, max_context=bp.max_context)
    widened = d["cache_record_bytes"] - store.layout.nbytes
    guesses = " and prefetch guess" if _prefetch_on(settings) else ""
    rows = [
        ("memory budget", f"{d['memory_budget']:,} ({format_size(d['memory_budget'])}), of it "
                          f"{format_size(d['pool_bytes'])} expert pool, "
                          f"{format_size(d['dense_bytes'])} dense weights, KV cache for "
                          f"{d['max_context']:,} tokens"),
        ("cache slots", f"{d['cache_slots']:,} ({d['cached_share']:.1%} of the experts), "
                        f"{d['cache_record_bytes']:,} B each in {d['dtype']}"
                        + (f" ({widened:,} B widened)" if widened > 0 else "")),
        ("staging slots", f"{d['staging_slots']} ({format_size(d['staging_bytes'])}: one per "
                          f"I/O thread{guesses})"),
        ("bounce buffers", f"{format_size(d['bounce_bytes'])} in the loaders, outside the budget"),
    ]
    return d, rows
