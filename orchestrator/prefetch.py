"""Prefetch: the next layer's experts, guessed, read while the disk would idle.

Once a layer's own loads have landed the disk would idle while the host computes that layer and
routes the next one. A bank guesses the next layer's experts (its router applied to this layer's
input, ``streamed.py``) and hands them here, best first, as its lane's candidates. ``send`` reads
them once no demanded load waits to be sent, at most ``depth`` at a time, and never in more than
half the staging slots, so a demanded load always finds staging; loaders read them as not urgent,
behind any demanded piece. The lane's next request drops the candidates not sent yet, so a wrong
guess that was never sent costs nothing, not even an eviction.

A sent guess takes a free or evictable slot (by the lane rule no pending kernel reads one) and
stays pinned until its lane asks for the layer it was made for; then, asked for or not, it is
unpinned, and one that nobody asked for is the first to evict. Guesses yield: when a demanded
load finds every slot pinned or loading, a guess that only its own pin holds gives its slot up
(one in flight then lands stale and its bytes are dropped).
"""

from __future__ import annotations

from collections.abc import Iterable

from flashmoe.errors import BudgetError
from flashmoe.orchestrator.loads import Load
from flashmoe.orchestrator.slots import LOADING


class Prefetch:
    """The guesses of every lane of one cache (call with the cache's lock held, except
    ``guess``)."""

    def __init__(self, cache, depth: int):
        self.cache = cache
        self.table = cache.table
        self.depth = min(max(1, int(depth)), cache.plan.staging_slots // 2)
        self._lanes: dict = {}  # lanes with candidates or sent guesses, in order
        self._unasked: set[tuple[int, int]] = set()  # sent, not asked for yet

    @property
    def waiting(self) -> bool:
        """Whether some lane has candidates not sent yet."""
        return any(lane.candidates for lane in self._lanes)

    def guess(self, lane, keys: Iterable[tuple[int, int]], limit: int | None = None) -> int:
        """``lane``'s guesses for the next layer, best first, replacing its unsent ones;
        returns how many (at most ``limit``) are neither cached nor loading."""
        with self.cache.lock:
            want = [(int(layer), int(e)) for layer, e in keys]
            want = [k for k in want if self.table.lookup(k) is None][:limit]
            lane.candidates = want  # ``send`` takes them from the front
            if want:
                self._lanes[lane] = None
        n = len(want)
        if n:
            self.cache.loads.kick()
        return n

    def send(self) -> None:
        """Send candidates while guesses may take staging slots (lock and the loader held)."""
        loads = self.cache.loads
        for lane in list(self._lanes):
            while lane.candidates and loads.guessing < self.depth and loads.staging_free:
                key = lane.candidates.pop(0)
                if self.table.lookup(key) is not None:
                    continue  # cached or loading by now
                try:
                    slot, _ = self.table.acquire(key)
                except BudgetError:  # every slot pinned or loading: no room for guesses now
                    lane.candidates = []
                    return
                ld = Load(slot, self.table.generation(slot), key)
                lane.guesses.append(ld)
                self._unasked.add(key)
                self.cache.stats.prefetched += 1
                loads.send_guess(ld)

    def asked(self, key: tuple[int, int]) -> None:
        """A computation asked for ``key``: a guess of it was right."""
        if key in self._unasked:
            self._unasked.discard(key)
            self.cache.stats.prefetch_used += 1

    def reached(self, lane, layer: int) -> None:
        """``lane`` asked for ``layer``'s experts (those pinned already): its unsent candidates
        go, and the pins of its guesses for this layer (or for every layer, when a new forward
        pass began) are dropped."""
        lane.candidates = []
        back = layer < lane.layer
        lane.layer = layer
        keep = []
        for ld in lane.guesses:
            if not back and ld.key[0] > layer:
                keep.append(ld)
            else:
                self._unpin(ld)
        lane.guesses = keep
        if not keep:
            self._lanes.pop(lane, None)

    def drop(self, lane) -> None:
        """``lane`` is idle: no next layer will ask for its guesses."""
        with self.cache.lock:
            lane.candidates = []
            lane.layer = -1
            for ld in lane.guesses:
                self._unpin(ld)
            lane.guesses = []
            self._lanes.pop(lane, None)

    def yield_slot(self) -> bool:
        """Make one sent guess that only its own pin holds give its slot up (not while landed
        bytes are copied into it): one in flight is cancelled, a landed one becomes the first
        to evict. Whether one did."""
        for lane in self._lanes:
            for i, ld in enumerate(lane.guesses):
                if self.table.pins(ld.slot) != 1 or ld.slot in self.cache.loads.filling:
                    continue
                del lane.guesses[i]
                if self.table.state(ld.slot) == LOADING:  # in flight: what lands is stale
                    self.table.failed(ld.slot, ld.gen, cancelled=True)
                self._unpin(ld)
                return True
        return False

    def _unpin(self, ld: Load) -> None:
        self._unasked.discard(ld.key)  # asked for, or not, by now
        self.table.release(ld.slot, cold=True)
