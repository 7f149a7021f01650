"""The expert cache: routed experts resident as MLX arrays, filled from the shared-memory pool.

For every tensor of an expert record the cache holds one MLX array of shape
``[nslots, *tensor_shape]`` in the compute dtype. A streamed expert bank passes cache slot ids as
the ``rhs_indices`` of ``gather_mm`` / ``gather_qmm``, so a hit costs nothing but an index and no
expert is ever stacked or copied per call.

A miss: the slot table hands out a cache slot (evicting the least recently used unpinned one),
a loader worker reads the record into a staging slot of the shared-memory pool, and the
coordinator copies the staging slot into the cache slot (converting bf16/f16 to the compute dtype
on the way) and frees the staging slot. On the CPU backend MLX cannot wrap shared memory
without a copy, so this one copy per *miss* is the cheapest honest path: it replaces a copy per
*use*.

The rule that makes writing into an MLX array's buffer safe on every backend: no slot is
overwritten (by a fill, a device copy or a load landing) while a queued or running kernel may still
read it. A bank's pins outlive the bank call: ``unpin`` hands them to the lane, which releases them
after its next routing sync (``release_deferred``), a host sync that depends on every earlier read
of the cache by that lane; only then can the slot be evicted and refilled. A bank may also hand on
its output before its own loads land (``defer``): the next bank ``settle``s them (their copies
included) before it evaluates anything. Guesses (prefetch) go only into free or evictable slots,
which by the rule no pending kernel reads, and are never waited for unless asked for.

Prefetch fills the disk's idle time: once a layer's own loads have landed, the disk would idle
while the host computes that layer and routes the next one. A bank's guesses for the coming layers
are candidates, best first: ``_pump`` sends them once every demanded load has been sent, at most
``prefetch_depth`` at a time (and never more than half the staging slots, so demanded loads always
find staging), and sends the next as one lands. Loaders read guesses as not urgent, behind any
demanded piece. The lane's next ``begin`` drops the candidates not sent yet, so a wrong guess that
was never sent costs nothing, not even an eviction; a sent one stays pinned until the lane begins
the layer it was made for. Guesses yield: when a demanded load finds every slot pinned or loading,
a guess that nobody asked for gives up its slot (a load still in flight is then stale and its bytes
are dropped when they land).

Thread safety (``shared=True``): the slot table, the pending loads and the staging slots are
guarded by one lock; the loader pool's socket is used by one thread at a time, the one that
holds ``_io`` (leader), which submits every lane's queued loads, collects completions for all
of them and wakes the others (followers), who wait on a condition.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from flashmoe.errors import BudgetError, LoadError
from flashmoe.orchestrator.slots import LOADING, READY, PoolExhausted, SlotTable
from flashmoe.store import RECORD_ALIGN, RecordLayout, TensorSpec

_MX = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32,
       "uint32": mx.uint32, "uint8": mx.uint8, "int8": mx.int8, "uint16": mx.uint16}
_FLOATS = ("bfloat16", "float16", "float32")


def _roundup(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def cache_dtype(spec: TensorSpec, compute: mx.Dtype) -> mx.Dtype:
    """Floating tensors are cached in the compute dtype, integer (packed) ones as they are."""
    return compute if spec.dtype in _FLOATS else _MX[spec.dtype]


def cache_record_bytes(layout: RecordLayout, compute: mx.Dtype) -> int:
    return sum(int(np.prod(t.shape)) * cache_dtype(t, compute).size for t in layout.tensors)


@dataclass(frozen=True)
class PoolPlan:
    """How a memory budget splits into cache slots and staging slots."""

    cache_slots: int
    staging_slots: int
    cache_record_bytes: int
    staging_slot_bytes: int

    @property
    def nbytes(self) -> int:
        return (self.cache_slots * self.cache_record_bytes
                + self.staging_slots * self.staging_slot_bytes)


def plan_pool(budget: int, layout: RecordLayout, compute: mx.Dtype, top_k: int,
              num_experts: int, parallel_reads: int = 16,
              max_slot_array_bytes: int | None = None, total_experts: int | None = None
              ) -> PoolPlan:
    """Split ``budget`` bytes: at least ``top_k`` cache slots (one layer of one token), and up
    to ``parallel_reads`` staging slots (at least two where they fit) so the loaders can keep
    their I/O queues full.
    ``max_slot_array_bytes`` caps the cache slots so that no cache array is larger; no more
    slots than ``total_experts`` (every expert of the model) are ever planned."""
    rec = cache_record_bytes(layout, compute)
    stage = _roundup(layout.nbytes, RECORD_ALIGN)
    minimum = top_k * rec + stage
    if budget < minimum:
        raise BudgetError(
            f"memory budget {budget} bytes is too small: one layer's {top_k} experts need at "
            f"least {minimum} bytes ({top_k} x {rec} cached + one {stage}-byte staging slot); "
            f"use --memory-budget {minimum} or more"
        )
    room = (budget - top_k * rec) // stage
    # two staging slots where they fit: a guess then never holds the only one a demanded load needs
    nstage = max(1, min(2, parallel_reads, num_experts, room),
                 min(parallel_reads, num_experts, room // 4))
    ncache = min((budget - nstage * stage) // rec, total_experts or 0x7FFFFFFF)
    if max_slot_array_bytes is not None:
        largest = max(int(np.prod(t.shape)) * cache_dtype(t, compute).size
                      for t in layout.tensors)
        ncache = min(ncache, max(top_k, max_slot_array_bytes // largest))
    return PoolPlan(int(ncache), int(nstage), rec, stage)


@dataclass(eq=False)  # compared by identity
class Pending:
    """Loads started by ``ExpertCache.begin``: the pinned slots, which were hits, what is left."""

    slots: np.ndarray
    hit: np.ndarray
    todo: list
    inflight: dict = field(default_factory=dict)  # req -> (stage, slot, gen, layer, expert)
    error: str | None = None
    waits: list = field(default_factory=list)  # (slot, layer, expert) another lane is loading
    landed: list = field(default_factory=list)  # slots loaded since the last ``progress``
    guess: bool = False  # a load started for a guess: nobody waits for it

    def todo_or_inflight(self) -> bool:
        return bool(self.todo or self.inflight or self.waits)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    io_wait_s: float = 0.0
    copy_s: float = 0.0
    calls: int = 0
    # Set by benchmarks: the banks then also time routing and expert compute (an extra sync).
    profile: bool = False
    route_s: float = 0.0
    prefetched: int = 0  # guessed experts whose loads were started (sent to a loader)
    prefetch_used: int = 0  # of those, the ones a computation then asked for
    overlapped: int = 0  # bank calls overlapping compute or graph building with their loads
    parts: int = 0  # the pieces those calls were computed in (cached, then as misses landed)
    trace: list | None = None  # (layer, experts) per bank call, when a benchmark records it
    expert_s: float = 0.0

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _copy_convert(dst: np.ndarray, src: np.ndarray, src_dtype: str) -> None:
    """Copy one tensor into a cache slot, converting its float format where needed."""
    if dst.dtype == np.float32 and src_dtype == "bfloat16":
        # bf16 is the upper half of an f32: widen in place without a temporary.
        d = dst.view(np.uint32)
        d[...] = src
        d <<= 16
    elif dst.dtype.itemsize == 2 and src_dtype in ("bfloat16", "float16") and (
        (src_dtype == "bfloat16") == (dst.dtype == np.uint16)
    ):
        dst.view(src.dtype)[...] = src
    elif src_dtype == "bfloat16":
        wide = src.astype(np.uint32) << 16
        dst[...] = wide.view(np.float32).astype(dst.dtype)
    else:
        dst[...] = src


class ExpertCache:
    """Cache slots as MLX arrays plus the loads that fill them.

    Args:
        layout: the record layout of the store (same for every MoE layer).
        plan: cache and staging slot counts.
        compute: the compute dtype.
        loader: a ``LoaderPool`` (``submit(slot, extents, checksum)``, ``poll(timeout)``).
        pool: the shared-memory ``ExpertPool`` whose slots the loader fills (staging).
        store: the store index (``extents``, ``checksum``).
        shared: several compute lanes (threads) use the cache at once.
    """

    POLL_SLICE_S = 0.002  # shared: longest a leader holds the loader socket in one poll

    def __init__(self, layout: RecordLayout, plan: PoolPlan, compute: mx.Dtype, loader, pool,
                 store, load_timeout_s: float = 60.0, copier=None, shared: bool = False,
                 prefetch_depth: int = 2):
        self.layout = layout
        self.plan = plan
        self.compute = compute
        self.loader = loader
        self.pool = pool
        self.store = store
        self.load_timeout_s = load_timeout_s
        # Optional device copier replacing the host copy on a GPU: ``fill(slot, stage)`` queues
        # a copy, ``sync()`` waits for the queued ones (see ``_sync_copies``).
        self.copier = copier
        self._copying: list[int] = []  # staging slots whose copies are queued, not yet synced
        self.shared = shared
        self.table = SlotTable(plan.cache_slots)
        self.stats = CacheStats()
        self.arrays: dict[str, mx.array] = {}
        for t in layout.tensors:
            a = mx.zeros((plan.cache_slots, *t.shape), dtype=cache_dtype(t, compute))
            mx.eval(a)
            self.arrays[t.name] = a
        self._host = {}
        for name, a in self.arrays.items():
            # numpy has no bfloat16: view its bits as uint16 (the same buffer)
            view = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a, copy=False)
            if not view.flags.writeable or not view.flags.c_contiguous:
                raise RuntimeError("MLX did not expose a writable contiguous cache buffer")
            self._host[name] = view
        self._owner: dict[int, Pending] = {}  # request id -> the Pending it belongs to
        self._queued: list[Pending] = []  # pendings with loads not submitted yet (no staging)
        self._staging_free = list(range(plan.staging_slots))
        self._staging_views = [pool.tensor_views(i, layout) for i in range(plan.staging_slots)]
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._io = threading.Lock()  # held by the one thread that talks to the loader pool
        self._why: dict[tuple[int, int], str] = {}  # (layer, expert) -> why its last load failed
        self._local = threading.local()  # per lane: its deferred pins and loads
        self._guessed: dict[tuple[int, int], None] = {}  # prefetched, not asked for yet
        self._filling: set[int] = set()  # slots a landed load is being copied into
        # Guessed loads in flight at once: at most half the staging slots, so that a demanded
        # load never waits for staging that guesses hold (one staging slot: no guesses).
        self.prefetch_depth = min(max(1, int(prefetch_depth)), plan.staging_slots // 2)
        # Prefetch, per lane (thread id): guesses not sent yet (best first), the guessed loads
        # it sent, as (layer guessed, load), each pinned until the lane begins that layer, and
        # the last layer the lane began.
        self._cands: dict[int, list[tuple[int, int]]] = {}
        self._guesses: dict[int, list[tuple[int, Pending]]] = {}
        self._at: dict[int, int] = {}
        self._guessing = 0  # guessed loads in flight

    @property
    def nslots(self) -> int:
        return self.plan.cache_slots

    def nbytes(self) -> int:
        return self.plan.nbytes

    def acquire(self, layer: int, experts: Iterable[int]) -> np.ndarray:
        """Pin the experts of ``layer`` in the cache, loading the missing ones; returns their
        cache slots in the order given. Blocks until every miss has arrived."""
        p = self.begin(layer, experts)
        try:
            self.finish(p)
        except BaseException:
            self.release(p.slots)
            raise
        return p.slots

    def begin(self, layer: int, experts: Iterable[int]) -> Pending:
        """Pin the experts and start loading the missing ones without waiting for them."""
        slots, hit, todo, waits = [], [], [], []
        lane = threading.get_ident()
        with self._lock:
            # guesses not sent yet are dropped: this lane knows its real needs
            self._cands.pop(lane, None)
            try:
                for e in experts:
                    key = (layer, int(e))
                    slot, status = self._acquire_demanded(key)
                    slots.append(slot)
                    hit.append(status == "hit")
                    if status == "miss":
                        todo.append((slot, self.table.generation(slot), layer, int(e)))
                    elif status == "wait":  # another lane (or a guess) is loading it: wait
                        waits.append((slot, layer, int(e)))
                    if self._guessed and key in self._guessed:
                        del self._guessed[key]
                        self.stats.prefetch_used += 1
            except BaseException:
                for slot, gen, _layer, _e in todo:  # allocated but never sent: free them
                    self.table.failed(slot, gen, cancelled=True)
                for s in slots:
                    self.table.release(int(s))
                raise
            st = self.stats
            st.calls += 1
            st.hits += len(slots) - len(todo) - len(waits)
            st.misses += len(todo) + len(waits)
            # after this layer's hits are pinned (none is evicted): the guesses for this layer,
            # and any left from an earlier pass, are of no further use
            back = layer < self._at.get(lane, -1)
            self._at[lane] = layer
            if lane in self._guesses:
                self._unpin_guesses(lane, None if back else layer)
            p = Pending(np.asarray(slots, dtype=np.int32), np.asarray(hit, dtype=bool),
                        list(reversed(todo)), waits=waits)
            if p.todo:
                self._queued.append(p)
        if p.todo:
            self._kick()
        return p

    def _acquire_demanded(self, key: tuple[int, int]) -> tuple[int, str]:
        """``table.acquire`` for a demanded expert: when every slot is pinned or loading, guesses
        that nobody asked for give up their slots, one at a time (lock held)."""
        while True:
            try:
                return self.table.acquire(key)
            except PoolExhausted:
                if not self._yield_guess():
                    raise

    def _yield_guess(self) -> bool:
        """Give up the slot of one sent guess that only its guess pins (nobody asked for it,
        no landed bytes are being copied into it): a load in flight is cancelled (its bytes are
        dropped when they land), a landed one becomes the first to evict. Whether one did."""
        for lane, guesses in self._guesses.items():
            for i, (_layer, p) in enumerate(guesses):
                slot = int(p.slots[0])
                if self.table.pins(slot) != 1 or slot in self._filling:
                    continue
                del guesses[i]
                if not guesses:
                    del self._guesses[lane]
                self._guessed.pop(self.table.key_of(slot), None)
                if self.table.state(slot) == LOADING:  # in flight: what lands is stale
                    self.table.failed(slot, self.table.generation(slot), cancelled=True)
                self.table.release(slot, cold=True)
                return True
        return False

    def finish(self, p: Pending) -> None:
        """Wait for every load of ``p``; raise ``LoadError`` if one failed. The caller still
        holds the pins of ``p.slots`` either way and releases them."""
        t0 = time.perf_counter()
        try:
            self._wait(p, lambda: False)
        finally:
            with self._lock:
                self._drop_unsent(p)  # never submitted after an error
                for slot, layer, e in p.waits:
                    if self.table.state(slot) != READY and p.error is None:
                        p.error = self._why.get(
                            (layer, e), f"layer {layer} expert {e}: its load failed")
                p.waits = []
                self._sync_copies()
            self.stats.io_wait_s += time.perf_counter() - t0
        if p.error is not None:
            raise LoadError(p.error)
        if self._cands:  # guesses held back while this layer's loads waited for staging
            self._kick()

    def progress(self, p: Pending) -> list[int]:
        """Wait until one more of ``p``'s own loads has landed (or none is left to wait for);
        return the cache slots that landed since the last call, ready to compute. ``finish``
        still has to be called: it waits for the rest and raises errors."""
        t0 = time.perf_counter()
        try:
            self._wait(p, lambda: bool(p.landed))
        finally:
            self.stats.io_wait_s += time.perf_counter() - t0
        with self._lock:
            out, p.landed = p.landed, []
            if out:
                self._sync_copies()
        return out

    def _wait(self, p: Pending, enough) -> None:
        """Drive or follow the loader until ``p`` is settled or ``enough()`` (call without
        the lock: followers wait on it)."""
        deadline = time.perf_counter() + self.load_timeout_s
        with self._lock:
            if self._settled(p) or enough():
                return
        while True:
            with self._lock:
                if self._settled(p) or enough():
                    return
            if self._io.acquire(blocking=False):  # lead: drive the loader for everyone
                try:
                    with self._lock:
                        self._pump()
                        if self._settled(p) or enough():
                            return
                    left = max(0.0, deadline - time.perf_counter())
                    self._collect(min(left, self.POLL_SLICE_S) if self.shared else left)
                finally:
                    self._io.release()
                with self._cv:
                    self._cv.notify_all()
            else:  # follow: the leader completes our loads too
                with self._cv:
                    if not (self._settled(p) or enough()):
                        self._cv.wait(self.POLL_SLICE_S)
            if time.perf_counter() >= deadline:
                with self._lock:
                    n = len(p.inflight) + len(p.todo) + len(p.waits)
                raise LoadError(f"timed out after {self.load_timeout_s:.0f}s waiting for "
                                f"{n} expert loads (setting load_timeout_s)")

    def _settled(self, p: Pending) -> bool:
        """Whether ``p`` has nothing left to wait for (call with the lock held)."""
        if p.inflight:
            return False
        if p.error is not None:
            return True
        if p.todo:
            return False
        return all(self.table.state(slot) != LOADING for slot, _l, _e in p.waits)

    def prefetch(self, keys: Iterable[tuple[int, int]], limit: int | None = None) -> int:
        """Guess ``(layer, expert)``s of the next layer, best first; returns how many of them (at
        most ``limit``) are neither cached nor loading. They replace this lane's unsent
        guesses and are sent to a loader once no demanded load waits to be sent, at most
        ``prefetch_depth`` at a time (``_pump``). Nobody waits for a guess: a sent one
        stays pinned until this lane begins the guessed layer, which waits for it only
        if it asks for it (as for another lane's load); the rest become the first to
        evict. The lane's next ``begin`` drops the ones not sent yet."""
        lane = threading.get_ident()
        with self._lock:
            self._cands.pop(lane, None)
            keys = [(int(layer), int(e)) for layer, e in keys]
            want = [key for key in keys if self.table.lookup(key) is None]
            want = want[:limit] if limit is not None else want
            if want:
                self._cands[lane] = want  # consumed by ``_send_guesses``
        n = len(want)
        if n:
            self._kick()
        return n

    def _kick(self) -> None:
        """Send what waits to be sent, unless another thread drives the loader."""
        if self._io.acquire(blocking=False):
            try:
                with self._lock:
                    self._pump()
            finally:
                self._io.release()

    def _send_guesses(self) -> None:
        """Send the best candidates while no demanded load waits to be sent (``_io`` and the
        lock held)."""
        while (self._cands and self._guessing < self.prefetch_depth and self._staging_free
               and not self._queued):
            lane, cands = next(iter(self._cands.items()))
            key = cands.pop(0)
            if not cands:
                del self._cands[lane]
            if self.table.lookup(key) is not None:
                continue  # cached or loading by now
            try:
                slot, _status = self.table.acquire(key)  # not in the table: a miss
            except BudgetError:  # every slot pinned or loading: no room for guesses now
                self._cands.clear()
                return
            layer, e = key
            p = Pending(np.asarray([slot], dtype=np.int32), np.zeros(1, dtype=bool),
                        [(slot, self.table.generation(slot), layer, e)], guess=True)
            self._guesses.setdefault(lane, []).append((layer, p))
            self._guessed[key] = None
            self.stats.prefetched += 1
            self._submit(p)

    def _drop_unsent(self, p: Pending) -> None:
        """Forget ``p``'s loads that no loader has started (lock held)."""
        for slot, gen, _layer, _e in p.todo:
            self.table.failed(slot, gen, cancelled=True)
        p.todo = []
        if p in self._queued:
            self._queued.remove(p)

    def _drop_guesses(self, lane: int) -> None:
        """A lane's guesses are of no use any more: forget the unsent, unpin the rest (lock
        held)."""
        self._cands.pop(lane, None)
        self._at.pop(lane, None)
        self._unpin_guesses(lane)

    def _unpin_guesses(self, lane: int, upto: int | None = None) -> None:
        """Drop a lane's pins on its sent guesses for layers up to ``upto`` (None: all), as the
        first to evict (lock held); loads in flight go on and land unpinned."""
        keep = []
        for layer, p in self._guesses.pop(lane, None) or []:
            if upto is not None and layer > upto:
                keep.append((layer, p))
                continue
            for s in p.slots:
                self._guessed.pop(self.table.key_of(int(s)), None)  # asked for, or not, by now
                self.table.release(int(s), cold=True)
        if keep:
            self._guesses[lane] = keep

    def release(self, slots: Iterable[int]) -> None:
        with self._lock:
            for s in slots:
                self.table.release(int(s))
            if self.shared:
                self._cv.notify_all()

    def unpin(self, slots: np.ndarray) -> None:
        """A bank is done building its (lazy) output from ``slots``: the pins stay until this
        lane's next routing sync (``release_deferred``), since a queued or lazy kernel of this
        lane may still read them; only then may a load or a guess overwrite them."""
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = []
        held.append(slots)

    def defer(self, p: Pending) -> None:
        """A bank built its (lazy) output on ``p``'s slots before their loads landed: this
        lane's next ``settle`` waits for them, before anything evaluates that output."""
        self._local.unsettled = p

    def settle(self) -> None:
        """Finish this lane's deferred loads (raising ``LoadError`` if one failed) and unpin
        them; a no-op when nothing is deferred."""
        p = getattr(self._local, "unsettled", None)
        if p is None:
            return
        self._local.unsettled = None
        try:
            self.finish(p)
        finally:
            self.unpin(p.slots)

    def release_deferred(self, sync: bool = False) -> None:
        """Release this lane's deferred pins (none unless shared). ``sync``: first wait for
        this thread's queued MLX work, when the caller has not synchronised on it."""
        if sync and getattr(self._local, "unsettled", None) is not None:
            try:  # a forward pass that stopped half way (an error): its loads, its pins
                self.settle()
            except LoadError:
                pass  # already reported by the pass that failed
        lane = threading.get_ident()
        if sync and (lane in self._cands or lane in self._guesses or lane in self._at):
            with self._lock:  # idle: no next layer will ask for this lane's guesses
                self._drop_guesses(lane)
        held = getattr(self._local, "held", None)
        if not held:
            return
        if sync:
            mx.synchronize(generation_stream)
            mx.synchronize()
        self._local.held = []
        for slots in held:
            self.release(slots)

    def tend(self) -> None:
        """While the engine idles: let the loader pool supervise its workers (a dead one is
        replaced now, not at the next load), collect anything that arrived and send what
        waits."""
        if self._io.acquire(blocking=False):
            try:
                self._collect(0.0)
                with self._lock:
                    self._pump()
            finally:
                self._io.release()

    def _collect(self, timeout_s: float) -> bool:
        """Poll the loaders (``_io`` held) and complete what landed; whether anything did."""
        done = self.loader.poll(timeout_s)
        for c in done:
            self._complete(c)
        return bool(done)

    def _pump(self) -> None:
        """Submit queued loads while staging slots are free, then guesses if nothing demanded
        is left to read (``_io`` and the lock held)."""
        if (self._queued or self._cands) and not self._staging_free:
            self._sync_copies()  # staging slots whose copies have landed are free again
        while self._queued and self._staging_free:
            p = self._queued[0]
            if not p.todo or p.error is not None:
                self._queued.pop(0)
                continue
            self._submit(p)
        if self._cands:
            self._send_guesses()

    def _submit(self, p: Pending) -> None:
        """Send the next of ``p``'s loads to a loader (a staging slot is free; lock held)."""
        slot, gen, layer, e = p.todo.pop()
        stage = self._staging_free.pop()
        req = self.loader.submit(stage, self.store.extents(layer, e),
                                 self.store.checksum(layer, e), urgent=not p.guess)
        p.inflight[req] = (stage, slot, gen, layer, e)
        self._owner[req] = p
        if p.guess:
            self._guessing += 1

    def _complete(self, c) -> None:
        with self._lock:
            p = self._owner.pop(c.req, None)
            if p is None:
                return
            stage, slot, gen, layer, e = p.inflight[c.req]
            if p.guess:
                self._guessing -= 1
            # a guess that gave up its slot to a demanded load: its bytes are stale
            current = self.table.state(slot) == LOADING and self.table.generation(slot) == gen
            # good bytes are kept even if another load of ``p`` failed: other lanes may be
            # waiting for this expert
            ok = c.ok and current
            if ok and self.copier is not None:
                t1 = time.perf_counter()
                self.copier.fill(slot, stage)  # queued: synced before any compute reads it
                self._copying.append(stage)
                self.stats.copy_s += time.perf_counter() - t1
            elif ok:
                self._filling.add(slot)  # no guess may give it up while it is being filled
        if ok and self.copier is None:  # LOADING and pinned: nobody else touches its bytes
            t1 = time.perf_counter()
            try:
                self._fill(slot, stage)
            finally:
                with self._lock:
                    self._filling.discard(slot)
                    self.stats.copy_s += time.perf_counter() - t1
        with self._lock:
            del p.inflight[c.req]
            if ok:
                self.stats.bytes_read += c.nbytes
                self.table.loaded(slot, gen, cold=p.guess)
                self._why.pop((layer, e), None)
                p.landed.append(slot)
            elif current:
                self.table.failed(slot, gen)
                why = f"layer {layer} expert {e}: {c.error}"
                if len(self._why) >= 4096:
                    self._why.clear()
                self._why[(layer, e)] = why  # for lanes that wait on the same load
                if p.error is None:
                    p.error = why
            if not (ok and self.copier is not None):
                self._staging_free.append(stage)  # else once its copy is synced

    def _sync_copies(self) -> None:
        """Wait for the queued device copies and free their staging slots (lock held). Called
        before a bank may compute on filled slots (``finish``, ``progress``) and when loads wait
        for staging slots; a READY slot whose copy is still queued is never computed on, since
        every computation goes through ``finish`` first."""
        if not self._copying:
            return
        t0 = time.perf_counter()
        self.copier.sync()
        self._staging_free.extend(self._copying)
        self._copying.clear()
        self.stats.copy_s += time.perf_counter() - t0

    def _fill(self, slot: int, stage: int) -> None:
        src = self._staging_views[stage]
        for t in self.layout.tensors:
            _copy_convert(self._host[t.name][slot], src[t.name], t.dtype)
