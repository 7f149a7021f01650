"""The expert cache against an in-process fake loader: hits, merged waits, stale generations,
guesses that are dropped or give their slots up, a failed load reaching every waiter, an
exhausted pool, and the lane rule (a bank's slots outlive its call until the next routing sync).

The fake loader reads records with plain file reads into the real staging pool and completes
them only when the test says so (``land``), or at every poll (``auto``).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.errors import BudgetError, LoadError
from flashmoe.orchestrator.cache import ExpertCache, PoolPlan, cache_record_bytes
from flashmoe.orchestrator.lane import Lane
from flashmoe.orchestrator.loaders import Completion, extent_list
from flashmoe.shm.pool import ExpertPool
from flashmoe.store import RECORD_ALIGN, open_store
from flashmoe.synth import synth

L0, L1, L2 = 0, 1, 2  # MoE layers of the tiny model (qwen3_moe: every layer)


class FakeLoader:
    """Loads land when ``land`` says so (or at every poll with ``auto``); ``fail`` names keys
    whose loads fail."""

    def __init__(self, pool, store):
        self.pool = pool
        self.store = store
        self.auto = True
        self.fail: set[tuple[int, int]] = set()
        self.sent: dict[int, tuple] = {}  # req -> (stage, extents, urgent)
        self.submits = 0
        self._next = 0

    def submit(self, slot, extents, checksum=None, urgent=True):
        self._next += 1
        self.submits += 1
        self.sent[self._next] = (slot, extent_list(extents), urgent)
        return self._next

    def land(self, req: int | None = None) -> list[Completion]:
        reqs = list(self.sent) if req is None else [req]
        out = []
        for r in reqs:
            stage, ext, _ = self.sent.pop(r)
            if self.fail and self._key(ext) in self.fail:
                out.append(Completion(r, stage, False, error="checksum mismatch (fake)"))
                continue
            buf = self.pool.slot(stage)
            for path, offset, length, dest in ext:
                with open(path, "rb") as f:
                    f.seek(offset)
                    buf[dest:dest + length] = np.frombuffer(f.read(length), dtype=np.uint8)
            out.append(Completion(r, stage, True, nbytes=sum(x[2] for x in ext)))
        return out

    def _key(self, ext) -> tuple[int, int]:
        for layer in self.store.moe_layers:
            for e in range(self.store.num_experts):
                x = self.store.extents(layer, e)[0]
                if (str(x.path), x.offset) == (str(ext[0][0]), ext[0][1]):
                    return layer, e
        raise KeyError(ext[0])

    def poll(self, timeout_s: float = 0.0):
        return self.land() if self.auto else []

    def workers_info(self):
        return []


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = synth(tmp_path_factory.mktemp("cache") / "m", "qwen3_moe", layout="hf", seed=5)
    return open_store(path)


def make_cache(store, slots: int, staging: int = 4, depth: int = 2):
    rec = cache_record_bytes(store.layout, mx.float32)
    stage = -(-store.layout.nbytes // RECORD_ALIGN) * RECORD_ALIGN
    pool = ExpertPool.create(staging, stage)
    loader = FakeLoader(pool, store)
    cache = ExpertCache(store.layout, PoolPlan(slots, staging, rec, stage), mx.float32, loader,
                        pool, store, load_timeout_s=2.0, prefetch_depth=depth)
    return cache, loader, pool


@pytest.fixture
def caches(store):
    """``make(slots, staging, depth)``: a cache and its fake loader, closed after the test."""
    pools = []

    def make(**kw):
        cache, loader, pool = make_cache(store, **kw)
        pools.append(pool)
        return cache, loader

    yield make
    for pool in pools:
        pool.close()
        pool.unlink()


@pytest.fixture
def cache(caches):
    return caches(slots=6)


def holds(cache, slot: int, layer: int, e: int, store) -> bool:
    name = cache.layout.tensors[0].name
    want = store.record_arrays(layer, e)[name]
    if want.dtype == np.uint16:  # bf16 bits: the cache widens them to float32
        want = (want.astype(np.uint32) << 16).view(np.float32)
    return np.array_equal(np.array(cache.arrays[name][slot]), want)


def test_a_hit_costs_no_read(cache, store):
    c, loader = cache
    slots = c.acquire(L0, [0, 1])
    assert holds(c, int(slots[1]), L0, 1, store)
    c.release(slots)
    again = c.acquire(L0, [1, 0])
    assert list(again) == [slots[1], slots[0]] and loader.submits == 2
    assert c.stats.hits == 2 and c.stats.misses == 2
    c.release(again)


def test_two_calls_for_one_expert_share_one_load(cache, store):
    c, loader = cache
    loader.auto = False
    first = c.request(L0, [3])
    second = c.request(L0, [3, 4])
    assert loader.submits == 2  # expert 3 once, expert 4
    assert second.waits and second.slots[0] == first.slots[0]
    loader.auto = True
    second.wait()
    first.wait()
    assert holds(c, int(first.slots[0]), L0, 3, store)
    first.release()
    second.release()
    assert c.table.stats()["pinned"] == 0


def test_a_failed_load_reaches_every_waiter(cache):
    c, loader = cache
    loader.fail = {(L0, 2)}
    loader.auto = False
    first = c.request(L0, [2])
    second = c.request(L0, [2])
    loader.auto = True
    for h in (first, second):
        with pytest.raises(LoadError, match=f"layer {L0} expert 2: checksum mismatch"):
            h.wait()
        h.release()
    assert c.table.lookup((L0, 2)) is None and c.table.stats()["pinned"] == 0
    loader.fail = set()
    c.release(c.acquire(L0, [2]))  # asked again: read again


def test_a_guess_gives_its_slot_to_a_demanded_load_and_lands_stale(caches, store):
    c, loader = caches(slots=2)
    lane = Lane(c)
    loader.auto = False
    assert c.prefetch.guess(lane, [(L1, 5), (L1, 6)]) == 2
    guessed = {c.table.lookup((L1, 5)), c.table.lookup((L1, 6))}
    assert None not in guessed and c.stats.prefetched == 2  # both slots, in flight
    h = c.request(L0, [0, 1], lane)  # needs both slots: the guesses give them up
    assert set(h.slots) == guessed and c.table.lookup((L1, 5)) is None
    loader.auto = True
    h.wait()  # the guesses' replies land too, stale: their bytes are dropped
    assert c.loads.guessing == 0 and not loader.sent and c.table.lookup((L1, 5)) is None
    assert holds(c, int(h.slots[0]), L0, 0, store) and holds(c, int(h.slots[1]), L0, 1, store)
    lane.route(mx.array(0))
    assert c.table.stats()["pinned"] == 0


def test_unsent_guesses_are_dropped_by_the_next_request(caches, store):
    c, loader = caches(slots=6, staging=2, depth=1)
    lane = Lane(c)
    loader.auto = False
    assert c.prefetch.guess(lane, [(L1, 1), (L1, 2), (L1, 3)]) == 3
    assert c.stats.prefetched == 1  # one staging slot for guesses: the rest wait
    sent = c.table.lookup((L1, 1))
    h = c.request(L1, [4], lane)  # this lane's next layer: unsent guesses go, no slot
    assert c.table.lookup((L1, 2)) is None and c.table.lookup((L1, 3)) is None
    assert c.table.pins(sent) == 0  # its own layer began without asking for it
    loader.auto = True
    h.wait()
    lane.idle()
    assert c.table.stats()["pinned"] == 0
    first = c.table.acquire(("new", 0))[0]
    assert first != sent or c.table.stats()["free"] == 0  # free slots go before evictions


def test_guesses_stay_pinned_until_their_layer_and_go_first(caches, store):
    c, loader = caches(slots=8, staging=8, depth=4)
    lane = Lane(c)
    c.request(L0, [0], lane).wait()
    assert c.prefetch.guess(lane, [(L1, 1), (L1, 2)]) == 2
    c.tend()  # they land on their own
    g1, g2 = c.table.lookup((L1, 1)), c.table.lookup((L1, 2))
    assert c.table.pins(g1) == c.table.pins(g2) == 1  # pinned while L1 has not begun
    lane.route(mx.array(0))
    h = c.request(L1, [2], lane)  # asks for one of them
    assert c.stats.prefetch_used == 1 and c.table.pins(g1) == 0 and c.table.pins(g2) == 1
    h.wait()
    lane.route(mx.array(0))
    assert c.table.stats()["pinned"] == 0
    for i in range(c.table.stats()["free"]):
        c.table.acquire(("filler", i))
    assert c.table.acquire(("new", 0))[0] == g1  # the unused guess is the first to go


def test_a_lanes_slots_outlive_the_call_until_its_next_routing_sync(cache):
    c, _loader = cache
    lane = Lane(c)
    h = c.request(L0, [0, 1], lane)
    h.wait()
    used = set(h.slots.tolist())
    grabbed = []
    with pytest.raises(BudgetError, match="in use"):
        while True:
            grabbed.append(c.table.acquire(("other", len(grabbed)))[0])
    assert not used & set(grabbed)  # a queued kernel may still read them
    for s in grabbed:
        c.table.failed(s, c.table.generation(s), cancelled=True)
        c.table.release(s)
    lane.route(mx.array(0))
    assert all(c.table.pins(s) == 0 for s in used)


def test_an_exhausted_pool_leaves_no_stuck_slot(cache):
    c, _loader = cache
    held = [c.acquire(L0, range(4))]
    with pytest.raises(BudgetError, match="in use"):
        held.append(c.acquire(L1, range(4)))  # two of four fit
    assert c.table.stats()["loading"] == 0
    for slots in held:
        c.release(slots)
    assert c.table.stats()["pinned"] == 0
    c.release(c.acquire(L1, range(4)))


def test_lanes_follow_the_leader_for_their_loads(cache, store):
    """Two threads wait at once: one drives the loader, the other's loads land through it."""
    c, loader = cache
    out = {}

    def other():
        out["slots"] = c.acquire(L2, [7])

    t = threading.Thread(target=other)
    t.start()
    mine = c.acquire(L2, [8])
    t.join(10)
    assert not t.is_alive() and holds(c, int(out["slots"][0]), L2, 7, store)
    c.release(mine)
    c.release(out["slots"])
