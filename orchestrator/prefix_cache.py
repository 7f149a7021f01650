"""Prompt (prefix) cache: a request whose prompt begins with tokens an earlier request already
ran through the model starts from that request's KV cache instead of recomputing them.

For a streamed model every recomputed prompt token re-reads experts, so a chat's next turn, which
repeats the whole history, gains most. The store is mlx-lm's own ``LRUPromptCache`` (a token
trie, least recently used first out, bounded by entries and bytes; a longer cached sequence is
trimmed to the shared prefix); this wraps it for the compute lanes that share it: a lock, evaluated
arrays (a lane's lazy slices must not be computed on another lane's stream), and counters for the
stats and metrics.
"""

from __future__ import annotations

import threading
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

_MODEL = "model"  # one model per engine: the trie's model key


class PrefixCache:
    """Bounded by ``max_entries`` sequences and ``max_bytes`` of KV arrays."""

    def __init__(self, max_entries: int, max_bytes: int):
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self._lock = threading.Lock()
        self.lookups = self.hits = self.tokens_reused = 0

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """(a KV cache holding the first ``n`` of ``tokens``, ``n``), or (None, 0). At least one
        token is always left to compute: the model must see one to give the next logits."""
        with self._lock:
            self.lookups += 1
            cache, rest = self._lru.fetch_nearest_cache(_MODEL, tokens)
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt was cached: recompute its last token
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        n = len(tokens) - len(rest)
        if n <= 0:
            return None, 0
        with self._lock:
            self.hits += 1
            self.tokens_reused += n
        return cache, n

    def insert(self, tokens: list[int], cache: list[Any], room: int | None = None) -> None:
        """Keep ``cache``, the KV state after ``tokens``, for later requests, in at most
        ``room`` bytes in all (the KV budget's share left by the sequences in flight)."""
        if not tokens or not cache:
            return
        mx.eval([c.state for c in cache])
        with self._lock:
            self._lru.insert_cache(_MODEL, list(tokens), cache)
            if room is not None:
                self._lru.trim_to(n_bytes=room)

    def shrink_to(self, n_bytes: int) -> None:
        """Drop least recently used entries until at most ``n_bytes`` are kept."""
        with self._lock:
            self._lru.trim_to(n_bytes=n_bytes)

    def stats(self) -> dict:
        with self._lock:
            return {"prefix_cache_entries": len(self._lru),
                    "prefix_cache_bytes": self._lru.nbytes,
                    "prefix_cache_lookups": self.lookups, "prefix_cache_hits": self.hits,
                    "prefix_tokens_reused": self.tokens_reused}
