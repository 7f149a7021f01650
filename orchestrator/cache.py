"""The expert cache: routed experts resident as MLX arrays, filled from the shared-memory pool.

For every tensor of an expert record the cache holds one MLX array of shape
``[nslots, *tensor_shape]`` in the compute dtype. A streamed expert bank passes cache slot ids as
the ``rhs_indices`` of ``gather_mm`` / ``gather_qmm``, so a hit costs nothing but an index and no
expert is ever stacked or copied per call.

A bank call asks for one layer's experts and gets a ``Handle`` (``loads.py``)::

    h = cache.request(layer, experts, lane)  # hits pinned; misses get slots and are queued
    h.wait()  /  h.landed()  /  h.defer()    # their loads land (loads.py)
    cache.prefetch.guess(lane, keys)         # the next layer's guesses (prefetch.py)

and its lane releases the handle after its next routing sync (``lane.py``). A miss: the slot
table hands out a cache slot (evicting the least recently used unpinned one, or taking a guess's),
a loader worker reads the record into a staging slot of the shared-memory pool, and the
coordinator copies the staging slot into the cache slot (``fill``, converting bf16/f16 to the
compute dtype on the way). On the CPU backend MLX cannot wrap shared memory without a copy, so
this one copy per *miss* is the cheapest honest path: it replaces a copy per *use*.

Writing into an MLX array's buffer is safe because no slot is handed out for new bytes while a
queued, running or lazy kernel may still read it: its pins last until its lane's next routing
sync (``Lane.route``). The slot table, the loads and the guesses share one lock."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from flashmoe.errors import BudgetError
from flashmoe.orchestrator.lane import Lane
from flashmoe.orchestrator.loads import Awaited, Handle, Load, Loads
from flashmoe.orchestrator.prefetch import Prefetch
from flashmoe.orchestrator.slots import PoolExhausted, SlotTable
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


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    io_wait_s: float = 0.0
    copy_s: float = 0.0
    calls: int = 0
    prefetched: int = 0  # guessed experts whose loads were started (sent to a loader)
    prefetch_used: int = 0  # of those, the ones a computation then asked for
    overlapped: int = 0  # bank calls overlapping compute or graph building with their loads
    parts: int = 0  # the pieces those calls were computed in (cached, then as misses landed)

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
    """Cache slots as MLX arrays, their slot table, the loads that fill them and the guesses.

    Args:
        layout: the record layout of the store (same for every MoE layer).
        plan: cache and staging slot counts.
        compute: the compute dtype.
        loader: a ``LoaderPool`` (``submit(slot, extents, checksum, urgent)``, ``poll(timeout)``).
        pool: the shared-memory ``ExpertPool`` whose slots the loader fills (staging).
        store: the store index (``extents``, ``checksum``).
        shared: several compute lanes (threads) use the cache at once.
        prefetch_depth: guessed loads in flight at once.
    """

    def __init__(self, layout: RecordLayout, plan: PoolPlan, compute: mx.Dtype, loader, pool,
                 store, load_timeout_s: float = 60.0, copier=None, shared: bool = False,
                 prefetch_depth: int = 2):
        self.layout = layout
        self.plan = plan
        self.compute = compute
        self.store = store
        self.shared = shared
        # A device copier replacing ``fill`` on a GPU: ``fill(slot, stage)`` queues a copy,
        # ``sync()`` waits for the queued ones (``Loads._sync_copies``).
        self.copier = copier
        self.table = SlotTable(plan.cache_slots)
        self.stats = CacheStats()
        self.lock = threading.RLock()
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
        self._staging_views = [pool.tensor_views(i, layout) for i in range(plan.staging_slots)]
        self.loads = Loads(self, loader, plan.staging_slots, load_timeout_s, shared)
        self.prefetch = Prefetch(self, prefetch_depth)
        self.lane = Lane(self)  # for callers outside any scheduler's lanes

    @property
    def nslots(self) -> int:
        return self.plan.cache_slots

    def nbytes(self) -> int:
        return self.plan.nbytes

    def request(self, layer: int, experts: Iterable[int], lane: Lane | None = None) -> Handle:
        """Pin the experts of ``layer`` and queue loads for the missing ones; the handle's
        slots are in the order given. With a ``lane``, it holds the handle until its next
        routing sync; without, the caller releases it."""
        h = Handle(self, lane)
        slots, hit = [], []
        with self.lock:
            try:
                for e in experts:
                    key = (layer, int(e))
                    slot, status = self._acquire_demanded(key)
                    slots.append(slot)
                    hit.append(status == "hit")
                    if status == "miss":
                        h.todo.append(Load(slot, self.table.generation(slot), key, h))
                    elif status == "wait":  # another lane (or a guess) is loading it
                        h.waits.append(Awaited(slot, key))
                    self.prefetch.asked(key)
            except BaseException:
                for ld in h.todo:  # allocated but never sent: free them
                    self.table.failed(ld.slot, ld.gen, cancelled=True)
                for s in slots:
                    self.table.release(int(s))
                raise
            st = self.stats
            st.calls += 1
            st.hits += len(slots) - len(h.todo) - len(h.waits)
            st.misses += len(h.todo) + len(h.waits)
            if lane is not None:  # after this layer's hits are pinned (none is evicted)
                self.prefetch.reached(lane, layer)
                lane.hold(h)
        h.slots = np.asarray(slots, dtype=np.int32)
        h.hit = np.asarray(hit, dtype=bool)
        if h.todo:
            self.loads.queue(h)
        return h

    def acquire(self, layer: int, experts: Iterable[int]) -> np.ndarray:
        """Pin the experts of ``layer``, loading the missing ones; their slots in the order
        given, once every miss has arrived. The caller releases them."""
        h = self.request(layer, experts)
        try:
            h.wait()
        except BaseException:
            h.release()
            raise
        return h.slots

    def release(self, slots: Iterable[int]) -> None:
        with self.lock:
            for s in slots:
                self.table.release(int(s))

    def tend(self) -> None:
        """While the engine idles: supervise the loaders, collect what arrived."""
        self.loads.tend()

    def _acquire_demanded(self, key: tuple[int, int]) -> tuple[int, str]:
        """``table.acquire`` for an expert a computation needs: when every slot is pinned or
        loading, guesses that nobody asked for give their slots up, one at a time."""
        while True:
            try:
                return self.table.acquire(key)
            except PoolExhausted:
                if not self.prefetch.yield_slot():
                    raise

    def fill(self, slot: int, stage: int) -> None:
        """Copy staging slot ``stage`` into cache slot ``slot``, converting as needed."""
        src = self._staging_views[stage]
        for t in self.layout.tensors:
            _copy_convert(self._host[t.name][slot], src[t.name], t.dtype)
