"""Compute lanes: concurrent requests decode on several threads over one shared expert cache.

The reference is mlx-lm with the whole model in memory: every request's greedy tokens must be
its tokens, whatever lane it ran on and whatever the other lane evicted meanwhile.
"""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate

from flashmoe.configs import ConfigError
from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.budget import budget_for_pool
from flashmoe.orchestrator.cache import cache_record_bytes
from flashmoe.orchestrator.engine import Engine, GenRequest, resolve_lanes
from flashmoe.store import RECORD_ALIGN, open_store
from flashmoe.synth import synth

PROMPTS = ["The expert pool holds", "Lanes share one cache", "A third request", "and a fourth"]
N_TOKENS = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # 8 MoE layers x 16 experts: a cache of 80 slots lets two lanes run (2 x 2 x 16 = 64) and
    # still has to evict (128 experts).
    return synth(tmp_path_factory.mktemp("lanes") / "m", "qwen3_moe", layout="mlx", bits=4,
                 layers=8, seed=5)


@pytest.fixture(scope="module")
def reference(model):
    m, tok = mlx_load(str(model))
    m.set_dtype(mx.float32)
    out = {}
    for p in PROMPTS:
        ids = []
        for r in stream_generate(m, tok, p, max_tokens=N_TOKENS):
            if r.finish_reason == "stop":
                break
            ids.append(r.token)
        out[p] = ids
    return out


def budget_for(model, slots: int) -> int:
    store = open_store(model)
    rec = cache_record_bytes(store.layout, mx.float32)
    stage = -(-store.layout.nbytes // RECORD_ALIGN) * RECORD_ALIGN
    return budget_for_pool(store, slots * rec + 8 * stage, mx.float32)


def run_concurrently(eng: Engine, prompts: list[str]) -> dict[str, list[int]]:
    eng.start()
    done = threading.Event()
    ids: dict[str, list[int]] = {p: [] for p in prompts}
    finished: dict[str, str] = {}

    def on_chunk(c):
        ids[c.id].extend(c.token_ids)
        if c.finish_reason:
            finished[c.id] = c.error or c.finish_reason
            if len(finished) == len(prompts):
                done.set()

    for p in prompts:
        eng.submit(GenRequest(id=p, prompt=p, max_tokens=N_TOKENS), on_chunk)
    assert done.wait(180), f"not all requests finished: {finished}"
    assert set(finished.values()) <= {"length", "stop"}, finished
    return ids


@pytest.mark.parametrize("mode", ["demand", "prefetch", "deferred"])
def test_two_lanes_with_evictions_give_mlx_lm_tokens(model, reference, mode, monkeypatch):
    prefetch = mode == "prefetch"
    monkeypatch.setenv("FLASHMOE_PREFETCH", "1" if prefetch else "0")
    with Engine(str(model), memory_budget=budget_for(model, 80), dtype="float32",
                lanes=2, max_batch=4) as eng:
        if mode == "deferred":  # the GPU pipeline, on the CPU
            from flashmoe.orchestrator.streamed import use_path

            use_path(eng.banks, "deferred")
        assert eng.lanes == 2 and eng.cache.shared
        assert 64 <= eng.plan.cache_slots < 128
        got = run_concurrently(eng, PROMPTS)
        for p in PROMPTS:
            assert got[p] == reference[p], p
        table = eng.cache.table
        assert table.stats()["evictions"] > 0
        deadline = time.monotonic() + 10
        while table.stats()["pinned"] and time.monotonic() < deadline:
            time.sleep(0.05)  # the lanes drop their deferred pins once idle
        assert table.stats()["pinned"] == 0
        assert (eng.cache.stats.prefetched > 0) == prefetch
        # a second round on the same engine (lanes idle in between) is as exact
        again = run_concurrently(eng, PROMPTS[:2])
        assert again == {p: reference[p] for p in PROMPTS[:2]}


def test_single_request_on_a_shared_cache_is_exact(model, reference):
    with Engine(str(model), memory_budget=budget_for(model, 80), dtype="float32",
                lanes=2) as eng:
        ids = [t for c in eng.generate(GenRequest(id="g", prompt=PROMPTS[0],
                                                  max_tokens=N_TOKENS)) for t in c.token_ids]
        assert ids == reference[PROMPTS[0]]
        assert eng.cache.table.stats()["pinned"] == 0


def test_a_lane_waits_for_the_load_another_lane_started(model):
    with Engine(str(model), memory_budget=budget_for(model, 80), dtype="float32",
                lanes=2) as eng:
        cache = eng.cache
        first = cache.request(0, [3, 5])  # LOADING, nobody has waited for it yet
        assert not first.ready
        second = {}

        def other_lane():
            h = cache.request(0, [5, 7])
            second["waits"] = [a.key[1] for a in h.waits]
            h.wait()  # completes expert 5 through whichever lane polls
            second["slots"] = h.slots

        t = threading.Thread(target=other_lane)
        t.start()
        t.join(30)
        assert not t.is_alive()
        assert second["waits"] == [5]
        first.wait()
        assert second["slots"][0] == first.slots[1]  # one slot, loaded once
        assert cache.table.state(int(first.slots[1])) == "ready"
        cache.release(first.slots)
        cache.release(second["slots"])
        assert cache.table.stats()["pinned"] == 0
        table = cache.table.stats()
        assert table["misses"] == 3 and table["waits"] == 1  # three reads for four requests


def test_lane_count_follows_the_setting_and_the_cache():
    assert resolve_lanes("3", 10_000, 128) == 3
    assert resolve_lanes("3", 2 * 2 * 128, 128) == 2  # room for two lanes only
    assert resolve_lanes("4", 100, 128) == 1
    assert 1 <= resolve_lanes("auto", 10_000, 128) <= 4
    for bad in ("0", "-1", "many"):
        with pytest.raises(ConfigError, match="lanes"):
            resolve_lanes(bad, 10_000, 128)


def test_non_finite_logits_are_an_error_not_token_zero(model):
    with Engine(str(model), memory_budget=budget_for(model, 80), dtype="float32",
                lanes=2) as eng:
        norm = eng.model.model.norm
        norm.weight = mx.full(norm.weight.shape, float("nan"))
        with pytest.raises(FlashMoeError, match="non-finite logits at generated token 0"):
            list(eng.generate(GenRequest(id="g", prompt=PROMPTS[0], max_tokens=4)))
        eng.start()
        got = []
        done = threading.Event()

        def on_chunk(c):
            got.append(c)
            if c.finish_reason:
                done.set()

        eng.submit(GenRequest(id="d", prompt=PROMPTS[1], max_tokens=4), on_chunk)
        assert done.wait(60)
        assert got[-1].finish_reason == "error" and "non-finite" in got[-1].error
        assert not any(c.token_ids for c in got)


def test_two_lanes_survive_killed_workers(model, reference):
    from support import WorkerKiller

    with Engine(str(model), memory_budget=budget_for(model, 80), dtype="float32",
                lanes=2, max_batch=4, workers=2) as eng:
        with WorkerKiller(eng.loader.workers_info, every_s=0.15) as killer:
            got = run_concurrently(eng, PROMPTS)
        assert killer.kills > 0 and eng.loader.restarts > 0
        assert got == reference


def test_corrupt_expert_is_an_error_on_every_lane_and_the_engine_goes_on(
        model, reference, tmp_path):
    from flashmoe.pack import pack

    packed = pack(model, tmp_path / "packed", progress=False)
    store = open_store(packed)
    layer = store.moe_layers[0]
    originals = {}
    for e in range(store.num_experts):  # every expert of the first MoE layer: all requests meet one
        ext = store.extents(layer, e)[0]
        with open(ext.path, "r+b") as f:
            f.seek(ext.offset + 7)
            b = f.read(1)
            originals[(ext.path, ext.offset + 7)] = b
            f.seek(ext.offset + 7)
            f.write(bytes([b[0] ^ 0xFF]))
    with Engine(str(packed), memory_budget=budget_for(packed, 80), dtype="float32",
                lanes=2, max_batch=4) as eng:
        eng.start()
        done = threading.Event()
        ends: dict[str, object] = {}

        def on_chunk(c):
            if c.finish_reason:
                ends[c.id] = c
                if len(ends) == 2:
                    done.set()

        for p in PROMPTS[:2]:
            eng.submit(GenRequest(id=p, prompt=p, max_tokens=N_TOKENS), on_chunk)
        assert done.wait(120)
        for c in ends.values():
            assert c.finish_reason == "error" and "checksum" in c.error, c.error
            assert f"layer {layer}" in c.error
        for (path, off), b in originals.items():  # repaired: the same engine serves again
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(b)
        assert run_concurrently(eng, PROMPTS[2:]) == {p: reference[p] for p in PROMPTS[2:]}


def test_cancel_on_one_lane_leaves_the_other_exact(model, reference):
    with Engine(str(model), memory_budget=budget_for(model, 80), dtype="float32",
                lanes=2, max_batch=4) as eng:
        eng.start()
        done = threading.Event()
        chunks: dict[str, list] = {"long": [], "short": []}

        def on_chunk(c):
            chunks[c.id].append(c)
            if c.id == "long" and c.token_ids and len(chunks["long"]) == 3:
                eng.cancel("long")
            if all(x and x[-1].finish_reason for x in chunks.values()):
                done.set()

        eng.submit(GenRequest(id="long", prompt=PROMPTS[0], max_tokens=200), on_chunk)
        eng.submit(GenRequest(id="short", prompt=PROMPTS[1], max_tokens=N_TOKENS), on_chunk)
        assert done.wait(120)
        assert chunks["long"][-1].finish_reason == "cancelled"
        assert sum(len(c.token_ids) for c in chunks["long"]) < 200
        assert [t for c in chunks["short"] for t in c.token_ids] == reference[PROMPTS[1]]
