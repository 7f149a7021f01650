"""The slot table state machine (pure, no I/O)."""

import pytest

from flashmoe.orchestrator.slots import LOADING, READY, PoolExhausted, SlotTable


def load(t: SlotTable, key):
    slot, status = t.acquire(key)
    assert status == "miss"
    assert t.loaded(slot, t.generation(slot))
    return slot


def test_miss_then_hit():
    t = SlotTable(2)
    slot, status = t.acquire((0, 5))
    assert status == "miss" and t.state(slot) == LOADING and t.key_of(slot) == (0, 5)
    assert t.loaded(slot, t.generation(slot))
    assert t.state(slot) == READY
    t.release(slot)
    assert t.acquire((0, 5)) == (slot, "hit")
    assert t.pins(slot) == 1
    s = t.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 1, 0)


def test_merged_wait_shares_the_load():
    t = SlotTable(2)
    slot, _ = t.acquire("a")
    assert t.acquire("a") == (slot, "wait")
    assert t.pins(slot) == 2
    assert t.loaded(slot, t.generation(slot))
    t.release(slot)
    t.release(slot)
    assert t.stats()["waits"] == 1


def test_stale_generation_ignored():
    t = SlotTable(1)
    slot, _ = t.acquire("a")
    old = t.generation(slot)
    assert t.failed(slot, old)
    assert not t.loaded(slot, old)  # the failed load's late reply
    t.release(slot)
    slot2, status = t.acquire("b")
    assert slot2 == slot and status == "miss" and t.generation(slot) != old
    assert not t.loaded(slot, old)
    assert t.state(slot) == LOADING
    assert t.loaded(slot, t.generation(slot))
    assert t.stats()["stale"] == 2


def test_failed_slot_freed_only_when_unpinned():
    t = SlotTable(1)
    slot, _ = t.acquire("a")
    t.acquire("a")  # a waiter
    t.failed(slot, t.generation(slot))
    assert t.lookup("a") is None
    t.release(slot)
    with pytest.raises(PoolExhausted):
        t.acquire("b")  # still pinned by the waiter
    t.release(slot)
    assert t.acquire("b")[1] == "miss"


def test_lru_order_and_pins_block_eviction():
    t = SlotTable(3)
    a, b, c = (load(t, k) for k in "abc")
    t.release(a)
    t.release(c)
    t.release(b)  # LRU order: a, c, b
    t.release(t.acquire("a")[0])  # touch a: now c, b, a
    slot, status = t.acquire("d")
    assert (slot, status) == (c, "miss") and t.lookup("c") is None
    t.acquire("b")  # pin b: only a can go
    t.loaded(slot, t.generation(slot))
    slot, _ = t.acquire("e")
    assert slot == a
    assert t.stats()["evictions"] == 2


def test_loading_slot_is_never_evicted():
    t = SlotTable(1)
    slot, _ = t.acquire("a")
    t.release(slot)  # unpinned but still loading
    with pytest.raises(PoolExhausted):
        t.acquire("b")
    t.loaded(slot, t.generation(slot))
    assert t.acquire("b") == (slot, "miss")


def test_all_pinned_raises_clear_error():
    t = SlotTable(4)
    for k in range(4):
        load(t, k)
    with pytest.raises(PoolExhausted) as e:
        t.acquire(99)
    msg = str(e.value)
    assert "all 4 expert slots" in msg and "4 pinned" in msg and "--memory-budget" in msg


def test_double_release_is_an_error():
    t = SlotTable(1)
    slot = load(t, "a")
    t.release(slot)
    with pytest.raises(ValueError):
        t.release(slot)


def test_many_ops_consistent():
    import random

    rng = random.Random(0)
    t = SlotTable(8)
    held: list[int] = []
    for _ in range(20000):
        if held and (len(held) > 6 or rng.random() < 0.5):
            t.release(held.pop(rng.randrange(len(held))))
            continue
        try:
            slot, status = t.acquire(rng.randrange(20))
        except PoolExhausted:
            continue
        if status == "miss":
            t.loaded(slot, t.generation(slot))
        held.append(slot)
    s = t.stats()
    assert s["hits"] + s["misses"] + s["waits"] > 0
    assert s["pinned"] == len(set(held))
    for k in range(20):
        slot = t.lookup(k)
        if slot is not None:
            assert t.key_of(slot) == k


def test_cold_slots_are_evicted_first():
    t = SlotTable(3)
    a, b = load(t, "a"), load(t, "b")
    t.release(a)
    t.release(b)
    g, _ = t.acquire("guess")
    assert t.loaded(g, t.generation(g), cold=True)  # still pinned: no place in the LRU yet
    t.release(g, cold=True)
    slot, status = t.acquire("c")  # the guess goes first, not the older "a"
    assert (slot, status) == (g, "miss") and t.lookup("guess") is None and t.lookup("a") == a
    t.release(slot)
    h, _ = t.acquire("guess2")
    t.release(h, cold=True)  # unpinned while loading: lands as the oldest candidate
    assert t.loaded(h, t.generation(h), cold=True)
    assert t.acquire("d")[0] == h


def test_cancelled_load_is_not_a_failure():
    t = SlotTable(1)
    slot, _ = t.acquire("a")
    assert t.failed(slot, t.generation(slot), cancelled=True)
    t.release(slot)
    s = t.stats()
    assert (s["failures"], s["cancelled"], s["free"]) == (0, 1, 1)
