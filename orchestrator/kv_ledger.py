"""The KV cache's share of the memory budget, shared by every sequence in flight and the kept
prefixes of the prompt cache.

The budget holds KV bytes for one sequence of ``max_context`` tokens (``BudgetPlan.kv_bytes``).
The daemon decodes several sequences at once: mlx-lm's batched cache pads every sequence of a
batch to the longest, so a lane of ``n`` sequences holds ``n`` times the KV of its longest one
(prompt plus ``max_tokens``, rounded up to the cache's allocation step). A lane admits a request
only when the lanes' total, with the prompt cache's entries, stays within that share; the prompt
cache gives its least recently used entries up first, and a request that does not fit yet waits
for sequences to finish. One request alone always fits: longer ones are refused before any work
(``check_request``).
"""

from __future__ import annotations

import threading

from flashmoe.orchestrator.budget import KVShape


class KvLedger:
    """Bytes of KV cache held per lane against ``capacity``, with the prompt cache's entries."""

    def __init__(self, kv: KVShape, capacity: int, prefix=None):
        self.kv = kv
        self.capacity = capacity
        self.prefix = prefix  # a PrefixCache, or None
        self._lanes: dict[int, int] = {}
        self._lock = threading.Lock()

    def lane_bytes(self, lengths: list[int]) -> int:
        """KV bytes of a batch whose sequences may reach ``lengths`` tokens (padded to the
        longest)."""
        return len(lengths) * self.kv.bytes_at(max(lengths)) if lengths else 0

    def reserve(self, lane: int, lengths: list[int]) -> bool:
        """Set ``lane``'s batch to sequences of up to ``lengths`` tokens if the total fits,
        making room by dropping prompt-cache entries; False (nothing changed) otherwise."""
        want = self.lane_bytes(lengths)
        with self._lock:
            others = sum(b for k, b in self._lanes.items() if k != lane)
            if others + want > self.capacity:
                return False
            if self.prefix is not None:
                self.prefix.shrink_to(self.capacity - others - want)
            self._lanes[lane] = want
            return True

    def release(self, lane: int, lengths: list[int]) -> None:
        """``lane``'s batch after sequences left it (never more than it held)."""
        with self._lock:
            self._lanes[lane] = min(self._lanes.get(lane, 0), self.lane_bytes(lengths))

    def room(self) -> int:
        """Bytes the prompt cache may hold now."""
        with self._lock:
            return max(0, self.capacity - sum(self._lanes.values()))

    def held(self) -> int:
        with self._lock:
            return sum(self._lanes.values())
