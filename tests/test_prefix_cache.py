"""The prompt (prefix) cache: a prompt that starts with an earlier request's tokens continues
from its KV cache, gives the tokens it gives without the cache, and the cache stays bounded."""

from __future__ import annotations

import threading
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache
from support import BUDGET, PROMPTS

from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.orchestrator.prefix_cache import PrefixCache


def _cache(n_tokens: int, layers: int = 2) -> list:
    out = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 2, n_tokens, 4)), mx.zeros((1, 2, n_tokens, 4)))
        out.append(c)
    return out


def test_prefix_cache_finds_and_bounds() -> None:
    pc = PrefixCache(max_entries=2, max_bytes=1 << 30)
    assert pc.fetch([1, 2, 3]) == (None, 0)
    pc.insert([1, 2, 3, 4], _cache(4))
    cache, n = pc.fetch([1, 2, 3, 4, 5, 6])
    assert n == 4 and cache[0].offset == 4
    cache, n = pc.fetch([1, 2, 3, 4])  # all cached: the last token is computed again
    assert n == 3 and cache[0].offset == 3
    cache, n = pc.fetch([1, 2, 9])  # a longer entry trimmed to the shared prefix
    assert n == 2 and cache[0].offset == 2
    pc.insert([7, 8], _cache(2))
    pc.insert([5, 6], _cache(2))
    st = pc.stats()
    assert st["prefix_cache_entries"] == 2 and pc.fetch([1, 2, 3, 4, 5])[1] == 0  # LRU out
    assert st["prefix_cache_hits"] == 3 and st["prefix_tokens_reused"] == 9
    small = PrefixCache(max_entries=10, max_bytes=_cache(4)[0].nbytes * 2 * 2)
    for i in range(5):
        small.insert([100 + i, 1, 2, 3], _cache(4))
    assert small.stats()["prefix_cache_bytes"] <= _cache(4)[0].nbytes * 4


def _submit(eng: Engine, req: GenRequest) -> tuple[list[int], dict]:
    done = threading.Event()
    ids: list[int] = []
    out: dict = {}

    def on_chunk(c) -> None:
        ids.extend(c.token_ids)
        if c.finish_reason is not None:
            out.update(c.stats or {}, finish=c.finish_reason, error=c.error)
            done.set()

    eng.submit(req, on_chunk)
    assert done.wait(120)
    assert out["error"] is None, out
    return ids, out


@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    with Engine(str(tiny_model), memory_budget=BUDGET, workers=1, lanes=1) as eng:
        eng.start()
        yield eng


def test_next_turn_reuses_the_earlier_prompt_and_reply(engine: Engine) -> None:
    first = engine.encode(GenRequest(id="p", prompt=PROMPTS[3]))
    ids, st = _submit(engine, GenRequest(id="a", prompt=first, max_tokens=8))
    assert st["prompt_tokens_reused"] == 0
    turn2 = first + ids + first[1:6]
    got, st2 = _submit(engine, GenRequest(id="b", prompt=turn2, max_tokens=8))
    assert st2["prompt_tokens_reused"] >= len(first) + len(ids) - 1
    assert st2["prompt_tokens"] == len(turn2)
    cache, engine.prefix_cache = engine.prefix_cache, None
    try:
        want, st3 = _submit(engine, GenRequest(id="c", prompt=turn2, max_tokens=8))
    finally:
        engine.prefix_cache = cache
    assert st3["prompt_tokens_reused"] == 0 and got == want
    status = engine.status()
    assert status["prefix_tokens_reused"] >= st2["prompt_tokens_reused"]
    assert 1 <= status["prefix_cache_entries"] <= engine.settings.prefix_cache_entries
