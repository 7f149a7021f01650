"""The loads in flight: the one owner of the loader socket (submit, wait, complete).

A miss becomes a ``Load``: queued on its bank call's ``Handle`` until a staging slot of the
shared-memory pool is free, then sent to a loader worker, which reads the record into that staging
slot; on completion the coordinator copies it into the cache slot (``ExpertCache.fill``, or a queued
device copy on CUDA, synced before anything computes on it) and frees the staging slot. A reply
whose slot has moved on (a guess that gave its slot up, see ``prefetch.py``) is stale: its bytes
are dropped.

The loader pool's socket is used by one thread at a time, the one holding ``_io`` (the leader):
it sends every lane's queued loads, collects completions for all of them and wakes the others
(followers), who wait on a condition of the cache's lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from flashmoe.errors import LoadError
from flashmoe.orchestrator.slots import LOADING, READY


@dataclass(eq=False)
class Load:
    """One record read into one cache slot: queued, then in flight in staging slot ``stage``."""

    slot: int
    gen: int  # the slot's generation when it was handed out: a later one means stale
    key: tuple[int, int]  # (layer, expert)
    handle: Handle | None = None  # None: a guess, nobody waits for it
    stage: int = -1


@dataclass(frozen=True)
class Awaited:
    """A slot that another load (another lane's, or a guess) is filling for this call."""

    slot: int
    key: tuple[int, int]


@dataclass(eq=False)
class Handle:
    """One bank call's experts in the cache: their slots (pinned), which were hits, and the
    loads still to land. ``wait`` for all of them, or take ``landed`` ones as they come;
    ``defer`` hands the wait to the lane's next routing sync. The lane releases the pins after
    its next routing sync (``Lane.route``); a caller without a lane calls ``release``."""

    cache: object
    lane: object | None
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    hit: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    todo: list[Load] = field(default_factory=list)  # not sent yet: no staging slot was free
    inflight: dict[int, Load] = field(default_factory=dict)  # request id -> load
    waits: list[Awaited] = field(default_factory=list)
    landed_slots: list[int] = field(default_factory=list)  # since the last ``landed``
    error: str | None = None
    released: bool = False

    @property
    def ready(self) -> bool:
        """Nothing of this call is loading any more (it may still have failed)."""
        return not (self.todo or self.inflight or self.waits)

    def wait(self) -> None:
        """Wait for every load; ``LoadError`` if one failed (the pins stay either way)."""
        self.cache.loads.finish(self)

    def landed(self) -> list[int]:
        """Wait until one more load has landed (or none is left to wait for); the slots that
        landed since the last call, ready to compute. ``wait`` still follows."""
        return self.cache.loads.progress(self)

    def defer(self) -> None:
        """A bank built its (lazy) output before these loads landed: the lane's next routing
        sync waits for them before it evaluates anything."""
        self.lane.deferred = self

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.cache.release(self.slots)


class Loads:
    """Queued and in-flight loads of one cache, and its loader."""

    POLL_SLICE_S = 0.002  # shared: longest a leader holds the loader socket in one poll

    def __init__(self, cache, loader, staging_slots: int, load_timeout_s: float, shared: bool):
        self.cache = cache
        self.loader = loader
        self.table = cache.table
        self.lock = cache.lock
        self._cv = threading.Condition(self.lock)
        self._io = threading.Lock()  # held by the one thread that talks to the loader pool
        self.load_timeout_s = load_timeout_s
        self.shared = shared
        self.staging_free = list(range(staging_slots))
        self.guessing = 0  # guessed loads in flight
        self.filling: set[int] = set()  # slots a landed load is being copied into
        self._owner: dict[int, Load] = {}  # request id -> its load
        self._queued: list[Handle] = []  # handles with loads not sent yet
        self._copying: list[int] = []  # staging slots whose device copies are not synced yet
        self._why: dict[tuple[int, int], str] = {}  # key -> why its last load failed

    def queue(self, h: Handle) -> None:
        with self.lock:
            self._queued.append(h)
        self.kick()

    def kick(self) -> None:
        """Send what waits to be sent, unless another thread drives the loader."""
        if self._io.acquire(blocking=False):
            try:
                with self.lock:
                    self._pump()
            finally:
                self._io.release()

    def tend(self) -> None:
        """While the engine idles: let the loader pool supervise its workers (a dead one is
        replaced now, not at the next load), collect what arrived and send what waits."""
        if self._io.acquire(blocking=False):
            try:
                self._collect(0.0)
                with self.lock:
                    self._pump()
            finally:
                self._io.release()

    def send_guess(self, load: Load) -> None:
        """Send a guess (lock and ``_io`` held, a staging slot free)."""
        self.guessing += 1
        self._submit(load)

    def finish(self, h: Handle) -> None:
        t0 = time.perf_counter()
        try:
            self._wait(h, lambda: False)
        finally:
            with self.lock:
                self._drop_unsent(h)  # never sent after an error
                for a in h.waits:
                    if self.table.state(a.slot) != READY and h.error is None:
                        layer, e = a.key
                        h.error = self._why.get(a.key,
                                                f"layer {layer} expert {e}: its load failed")
                h.waits = []
                self._sync_copies()
            self.cache.stats.io_wait_s += time.perf_counter() - t0
        if h.error is not None:
            raise LoadError(h.error)
        if self.cache.prefetch.waiting:  # held back while this call's loads waited for staging
            self.kick()

    def progress(self, h: Handle) -> list[int]:
        t0 = time.perf_counter()
        try:
            self._wait(h, lambda: bool(h.landed_slots))
        finally:
            self.cache.stats.io_wait_s += time.perf_counter() - t0
        with self.lock:
            out, h.landed_slots = h.landed_slots, []
            if out:
                self._sync_copies()
        return out

    def _wait(self, h: Handle, enough) -> None:
        """Drive or follow the loader until ``h`` is settled or ``enough()``."""
        deadline = time.perf_counter() + self.load_timeout_s
        while True:
            with self.lock:
                if self._settled(h) or enough():
                    return
            if self._io.acquire(blocking=False):  # lead: drive the loader for everyone
                try:
                    with self.lock:
                        self._pump()
                        if self._settled(h) or enough():
                            return
                    left = max(0.0, deadline - time.perf_counter())
                    self._collect(min(left, self.POLL_SLICE_S) if self.shared else left)
                finally:
                    self._io.release()
                with self._cv:
                    self._cv.notify_all()
            else:  # follow: the leader completes our loads too
                with self._cv:
                    if not (self._settled(h) or enough()):
                        self._cv.wait(self.POLL_SLICE_S)
            if time.perf_counter() >= deadline:
                with self.lock:
                    n = len(h.inflight) + len(h.todo) + len(h.waits)
                raise LoadError(f"timed out after {self.load_timeout_s:.0f}s waiting for "
                                f"{n} expert loads (setting load_timeout_s)")

    def _settled(self, h: Handle) -> bool:
        """Whether ``h`` has nothing left to wait for (lock held)."""
        if h.inflight:
            return False
        if h.error is not None:
            return True
        if h.todo:
            return False
        return all(self.table.state(a.slot) != LOADING for a in h.waits)

    def _drop_unsent(self, h: Handle) -> None:
        for ld in h.todo:
            self.table.failed(ld.slot, ld.gen, cancelled=True)
        h.todo = []
        if h in self._queued:
            self._queued.remove(h)

    def _pump(self) -> None:
        """Send queued loads while staging slots are free, then guesses if nothing demanded
        waits to be sent (lock and ``_io`` held)."""
        if not self.staging_free and (self._queued or self.cache.prefetch.waiting):
            self._sync_copies()  # staging slots whose copies have landed are free again
        while self._queued and self.staging_free:
            h = self._queued[0]
            if not h.todo or h.error is not None:
                self._queued.pop(0)
                continue
            self._submit(h.todo.pop(0))
        if not self._queued:
            self.cache.prefetch.send()

    def _submit(self, ld: Load) -> None:
        ld.stage = self.staging_free.pop()
        layer, e = ld.key
        store = self.cache.store
        req = self.loader.submit(ld.stage, store.extents(layer, e), store.checksum(layer, e),
                                 urgent=ld.handle is not None)
        self._owner[req] = ld
        if ld.handle is not None:
            ld.handle.inflight[req] = ld

    def _collect(self, timeout_s: float) -> None:
        """Poll the loaders (``_io`` held) and complete what landed."""
        for c in self.loader.poll(timeout_s):
            self._complete(c)

    def _complete(self, c) -> None:
        with self.lock:
            ld = self._owner.pop(c.req, None)
            if ld is None:
                return
            h = ld.handle
            if h is None:
                self.guessing -= 1
            # a guess that gave its slot up to a demanded load: what lands is stale
            current = self.table.state(ld.slot) == LOADING and \
                self.table.generation(ld.slot) == ld.gen
            # good bytes are kept even if another load of ``h`` failed: other lanes may be
            # waiting for this expert
            ok = c.ok and current
            device = ok and self.cache.copier is not None
            if device:
                t1 = time.perf_counter()
                self.cache.copier.fill(ld.slot, ld.stage)  # synced before compute reads it
                self._copying.append(ld.stage)
                self.cache.stats.copy_s += time.perf_counter() - t1
            elif ok:
                self.filling.add(ld.slot)  # no guess may give it up while it is filled
        if ok and not device:  # LOADING and pinned: nobody else touches its bytes
            t1 = time.perf_counter()
            try:
                self.cache.fill(ld.slot, ld.stage)
            finally:
                with self.lock:
                    self.filling.discard(ld.slot)
                    self.cache.stats.copy_s += time.perf_counter() - t1
        with self.lock:
            if h is not None:
                del h.inflight[c.req]
            if ok:
                self.cache.stats.bytes_read += c.nbytes
                self.table.loaded(ld.slot, ld.gen, cold=h is None)
                self._why.pop(ld.key, None)
                if h is not None:
                    h.landed_slots.append(ld.slot)
            elif current:
                self.table.failed(ld.slot, ld.gen)
                layer, e = ld.key
                why = f"layer {layer} expert {e}: {c.error}"
                if len(self._why) >= 4096:
                    self._why.clear()
                self._why[ld.key] = why  # for lanes that wait on the same load
                if h is not None and h.error is None:
                    h.error = why
            if not device:
                self.staging_free.append(ld.stage)  # else once its copy is synced

    def _sync_copies(self) -> None:
        """Wait for the queued device copies and free their staging slots (lock held). Called
        before a bank may compute on filled slots (``finish``, ``progress``) and when loads
        wait for staging slots; a READY slot whose copy is still queued is never computed on,
        since every computation goes through ``finish`` first."""
        if not self._copying:
            return
        t0 = time.perf_counter()
        self.cache.copier.sync()
        self.staging_free.extend(self._copying)
        self._copying.clear()
        self.cache.stats.copy_s += time.perf_counter() - t0
