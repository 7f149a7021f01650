"""The slot table: which expert is in which pool slot. A pure state machine, owned by one process.

States of a slot::

    FREE --acquire (miss)--> LOADING --loaded(gen)--> READY --acquire (hit)--> READY, pinned
      ^                        |  failed(gen)            |  evicted (LRU, zero pins)
      +------------------------+-------------------------+

Every miss gives the slot a fresh generation; ``loaded``/``failed`` with any other generation is
stale (a late reply from a killed worker, or for a slot since reused) and is ignored. A slot is
evicted only when READY with no pins, least recently released first; when every slot is pinned or
loading, ``acquire`` raises ``PoolExhausted`` instead of waiting. O(1) per operation; no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from flashmoe.errors import BudgetError

FREE, LOADING, READY, FAILED = "free", "loading", "ready", "failed"


class PoolExhausted(BudgetError):
    """Every slot is pinned or loading: nothing can be evicted for a new expert."""


class SlotTable:
    """Maps keys (the coordinator uses ``(layer, expert)``) to slots with pins and LRU eviction."""

    def __init__(self, nslots: int):
        if nslots <= 0:
            raise ValueError(f"slot table needs at least one slot, got {nslots}")
        self.nslots = nslots
        self._state = [FREE] * nslots
        self._pins = [0] * nslots
        self._gen = [0] * nslots
        self._key: list[Hashable | None] = [None] * nslots
        self._slot_of: dict[Hashable, int] = {}
        self._free = list(range(nslots - 1, -1, -1))  # pop() hands out slot 0 first
        self._lru: OrderedDict[int, None] = OrderedDict()  # READY, unpinned; oldest first
        self._next_gen = 0
        self._pinned = 0  # slots with pins > 0
        self._stats = dict(hits=0, misses=0, waits=0, evictions=0, failures=0, cancelled=0,
                           stale=0)

    def acquire(self, key: Hashable) -> tuple[int, str]:
        """Pin the slot for ``key``: ("hit" | "wait" | "miss"). On "miss" the caller loads it."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._pin(slot)
            if self._state[slot] == READY:
                self._stats["hits"] += 1
                return slot, "hit"
            self._stats["waits"] += 1
            return slot, "wait"
        if self._free:
            slot = self._free.pop()
        elif self._lru:
            slot, _ = self._lru.popitem(last=False)
            del self._slot_of[self._key[slot]]
            self._stats["evictions"] += 1
        else:
            loading = sum(1 for s in self._state if s == LOADING)
            raise PoolExhausted(
                f"all {self.nslots} expert slots are in use ({self._pinned} pinned, {loading} "
                f"loading): nothing to evict for {key!r}; raise --memory-budget or run fewer "
                f"concurrent sequences"
            )
        self._next_gen += 1
        self._gen[slot] = self._next_gen
        self._state[slot] = LOADING
        self._key[slot] = key
        self._slot_of[key] = slot
        self._pin(slot)
        self._stats["misses"] += 1
        return slot, "miss"

    def loaded(self, slot: int, generation: int, cold: bool = False) -> bool:
        """The load of ``generation`` finished: LOADING -> READY. False if stale (ignored).
        ``cold``: if unpinned, the slot becomes the first eviction candidate (a guess)."""
        if self._state[slot] != LOADING or self._gen[slot] != generation:
            self._stats["stale"] += 1
            return False
        self._state[slot] = READY
        if self._pins[slot] == 0:
            self._to_lru(slot, cold)
        return True

    def failed(self, slot: int, generation: int, cancelled: bool = False) -> bool:
        """The load of ``generation`` failed (or was ``cancelled`` before it was sent): the key
        is forgotten, the slot freed once unpinned."""
        if self._state[slot] != LOADING or self._gen[slot] != generation:
            self._stats["stale"] += 1
            return False
        self._stats["cancelled" if cancelled else "failures"] += 1
        del self._slot_of[self._key[slot]]
        self._key[slot] = None
        self._state[slot] = FAILED
        self._next_gen += 1
        self._gen[slot] = self._next_gen  # whatever lands later for the old load is stale
        if self._pins[slot] == 0:
            self._to_free(slot)
        return True

    def release(self, slot: int, cold: bool = False) -> None:
        """Drop one pin; an unpinned READY slot becomes the newest eviction candidate, or with
        ``cold`` the oldest."""
        if self._pins[slot] <= 0:
            raise ValueError(f"slot {slot} released more often than acquired")
        self._pins[slot] -= 1
        if self._pins[slot]:
            return
        self._pinned -= 1
        if self._state[slot] == READY:
            self._to_lru(slot, cold)
        elif self._state[slot] == FAILED:
            self._to_free(slot)

    def generation(self, slot: int) -> int:
        return self._gen[slot]

    def key_of(self, slot: int) -> Hashable | None:
        return self._key[slot]

    def state(self, slot: int) -> str:
        return self._state[slot]

    def pins(self, slot: int) -> int:
        return self._pins[slot]

    def lookup(self, key: Hashable) -> int | None:
        """The slot holding or loading ``key``, without pinning or touching LRU order."""
        return self._slot_of.get(key)

    def stats(self) -> dict[str, int]:
        ready = sum(1 for s in self._state if s == READY)
        return dict(
            self._stats,
            slots=self.nslots,
            free=len(self._free),
            ready=ready,
            loading=sum(1 for s in self._state if s == LOADING),
            pinned=self._pinned,
        )

    def _pin(self, slot: int) -> None:
        if self._pins[slot] == 0:
            self._pinned += 1
            self._lru.pop(slot, None)
        self._pins[slot] += 1

    def _to_lru(self, slot: int, cold: bool) -> None:
        self._lru[slot] = None
        if cold:
            self._lru.move_to_end(slot, last=False)

    def _to_free(self, slot: int) -> None:
        self._state[slot] = FREE
        self._free.append(slot)
