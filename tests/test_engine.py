"""The coordinator against mlx-lm as the reference: same checkpoint, same dtype, same tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate

from flashmoe.errors import BudgetError
from flashmoe.orchestrator.budget import budget_for_pool
from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.pack import pack
from flashmoe.store import open_store
from flashmoe.synth import synth

ARCHS = ["qwen3_moe", "qwen3_5_moe", "deepseek_v3", "mixtral"]
PROMPT = "The expert pool holds"
N_TOKENS = 32


def reference_ids(path: Path, prompt, n: int) -> list[int]:
    model, tok = mlx_load(str(path))
    model.set_dtype(mx.float32)
    ids = []
    for r in stream_generate(model, tok, prompt, max_tokens=n):
        if r.finish_reason == "stop":
            break
        ids.append(r.token)
    return ids


def quarter_budget(path: Path, quarters: int = 1) -> int:
    store = open_store(path)
    pool = max(store.expert_bytes_total() * 2 * quarters // 4, 1)  # f32 cache of bf16/4-bit
    return budget_for_pool(store, pool, mx.float32)


def engine_ids(path: Path, budget: int, **req) -> tuple[list[int], dict]:
    with Engine(str(path), memory_budget=budget, workers=2, dtype="float32") as eng:
        ids, stats = [], {}
        for c in eng.generate(GenRequest(id="t", max_tokens=N_TOKENS, **req)):
            ids.extend(c.token_ids)
            stats = c.stats or stats
        return ids, stats


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        out[(arch, "hf")] = synth(root / f"{arch}-hf", arch, layout="hf", seed=1)
        out[(arch, "mlx")] = synth(root / f"{arch}-mlx", arch, layout="mlx", bits=4, seed=1)
        out[(arch, "packed")] = pack(out[(arch, "hf")], root / f"{arch}-packed")
    return out


@pytest.mark.parametrize("layout", ["hf", "mlx", "packed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_mlx_lm(models, arch, layout):
    path = models[(arch, layout)]
    source = models[(arch, "hf")] if layout == "packed" else path
    want = reference_ids(source, PROMPT, N_TOKENS)
    budget = quarter_budget(path)
    got, stats = engine_ids(path, budget, prompt=PROMPT)
    assert got == want
    assert len(got) > 0
    # a quarter of the experts fit: they were evicted and read again
    assert stats["pool_bytes"] <= budget
    assert stats["expert_misses"] > open_store(path).num_experts
    assert 0.0 <= stats["expert_hit_rate"] < 1.0


def test_chat_template_and_sampling_seed(models):
    path = models[("qwen3_moe", "mlx")]
    model, tok = mlx_load(str(path))
    model.set_dtype(mx.float32)
    msgs = [{"role": "user", "content": "hello there"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    want = reference_ids(path, prompt, N_TOKENS)
    got, _ = engine_ids(path, quarter_budget(path), messages=msgs)
    assert got == want
    a, _ = engine_ids(path, quarter_budget(path), prompt=PROMPT, temperature=1.0, seed=7)
    b, _ = engine_ids(path, quarter_budget(path), prompt=PROMPT, temperature=1.0, seed=7)
    assert a == b


def test_budget_too_small_names_minimum(models):
    path = models[("qwen3_moe", "mlx")]
    with pytest.raises(BudgetError, match=r"--memory-budget \d+"):
        Engine(str(path), memory_budget=1000, workers=1)


def test_experts_per_token_override(models):
    path = models[("mixtral", "mlx")]
    store = open_store(path)
    k = max(1, store.top_k - 1)
    model, tok = mlx_load(str(path), model_config={"num_experts_per_tok": k})
    model.set_dtype(mx.float32)
    want = []
    for r in stream_generate(model, tok, PROMPT, max_tokens=N_TOKENS):
        if r.finish_reason == "stop":
            break
        want.append(r.token)
    with Engine(str(path), memory_budget=quarter_budget(path), experts_per_token=k,
                dtype="float32") as eng:
        got = [t for c in eng.generate(GenRequest(id="k", prompt=PROMPT, max_tokens=N_TOKENS))
               for t in c.token_ids]
    assert got == want


def test_run_cli_json(models):
    path = models[("qwen3_moe", "mlx")]
    out = subprocess.run(
        [sys.executable, "-m", "flashmoe.cli", "run", "--model", str(path), "--prompt", PROMPT,
         "--max-tokens", "8", "--memory-budget", str(quarter_budget(path)), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert obj["token_ids"] == reference_ids(path, PROMPT, 8)
    for key in ("prompt_tokens", "generation_tokens", "prefill_tokens_per_s",
                "decode_tokens_per_s", "expert_hit_rate", "bytes_read", "pool_bytes",
                "dense_bytes", "peak_rss_bytes", "zero_copy"):
        assert key in obj["stats"]
    bad = subprocess.run(
        [sys.executable, "-m", "flashmoe.cli", "run", "--model", str(path), "--prompt", "x",
         "--memory-budget", "10"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "too small" in bad.stderr


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_prefetch_keeps_tokens_exact(models, arch, monkeypatch):
    monkeypatch.setenv("FLASHMOE_PREFETCH", "1")
    path = models[(arch, "mlx")]
    want = reference_ids(path, PROMPT, N_TOKENS)
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        assert any(b.ahead for b in eng.banks)
        got = [t for c in eng.generate(GenRequest(id="p", prompt=PROMPT, max_tokens=N_TOKENS))
               for t in c.token_ids]
        st = eng.cache.stats
        assert st.prefetched > 0 and st.prefetch_used > 0  # guesses reach the next layer
    assert got == want


@pytest.mark.parametrize("arch", ["qwen3_moe"])
def test_io_thread_and_doorbells_keep_tokens_exact(models, arch, monkeypatch):
    """The I/O thread drives the loaders while the lane computes, and the lane spins on the
    doorbells while it waits: same tokens as mlx-lm, and the thread ends with the engine."""
    monkeypatch.setenv("FLASHMOE_PREFETCH", "1")
    monkeypatch.setenv("FLASHMOE_IO_THREAD", "on")
    monkeypatch.setenv("FLASHMOE_IO_SPIN_US", "3000")
    monkeypatch.setenv("FLASHMOE_LANES", "1")  # the I/O thread serves a single lane
    path = models[(arch, "mlx")]
    want = reference_ids(path, PROMPT, N_TOKENS)
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        thread = eng.cache._io_thread
        assert thread is not None and thread.is_alive() and eng.cache.spin_s == 0.003
        got = [t for c in eng.generate(GenRequest(id="t", prompt=PROMPT, max_tokens=N_TOKENS))
               for t in c.token_ids]
        st = eng.cache.stats
        assert st.misses > 0 and st.prefetched > 0
    assert got == want
    assert not thread.is_alive()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_loader_threads_keep_tokens_exact(models, arch, monkeypatch):
    """The coordinator's own loader threads instead of worker processes (with prefetch and the
    I/O thread, which sleeps in their ``wait``): same tokens as mlx-lm, no worker process."""
    from flashmoe.orchestrator.loaders import ThreadLoader

    monkeypatch.setenv("FLASHMOE_LOADER", "threads")
    monkeypatch.setenv("FLASHMOE_PREFETCH", "1")
    monkeypatch.setenv("FLASHMOE_IO_THREAD", "on")
    monkeypatch.setenv("FLASHMOE_LANES", "1")
    path = models[(arch, "mlx")]
    want = reference_ids(path, PROMPT, N_TOKENS)
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        assert isinstance(eng.loader, ThreadLoader) and eng.loader.workers_info() == []
        got = [t for c in eng.generate(GenRequest(id="t", prompt=PROMPT, max_tokens=N_TOKENS))
               for t in c.token_ids]
        st = eng.cache.stats
        assert st.misses > 0 and st.prefetched > 0 and eng.loader.inflight() == 0
    assert got == want


def test_loader_setting(models, monkeypatch):
    from flashmoe.configs import ConfigError
    from flashmoe.orchestrator.engine import resolve_loader

    assert resolve_loader("auto") == "processes" and resolve_loader(" Threads ") == "threads"
    monkeypatch.setenv("FLASHMOE_LOADER", "fibers")
    with pytest.raises(ConfigError, match="setting loader: expected auto, processes or threads"):
        Engine(str(models[("qwen3_moe", "mlx")]), dtype="float32")


def test_io_thread_setting(models, monkeypatch):
    from flashmoe.configs import ConfigError

    path = models[("qwen3_moe", "mlx")]
    monkeypatch.setenv("FLASHMOE_LANES", "1")  # the I/O thread serves a single lane
    for prefetch, io_thread, want in [("on", "auto", True), ("off", "auto", False),
                                      ("on", "off", False), ("off", "on", True)]:
        monkeypatch.setenv("FLASHMOE_PREFETCH", prefetch)
        monkeypatch.setenv("FLASHMOE_IO_THREAD", io_thread)
        with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
            assert (eng.cache._io_thread is not None) is want, (prefetch, io_thread)
    monkeypatch.setenv("FLASHMOE_IO_THREAD", "sometimes")
    with pytest.raises(ConfigError, match="io_thread"):
        Engine(str(path), memory_budget=quarter_budget(path), dtype="float32")


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])  # logits / (indices, scores)
def test_guesses_are_the_next_routers_first_choices(models, arch, monkeypatch):
    monkeypatch.setenv("FLASHMOE_PREFETCH", "1")
    monkeypatch.setenv("FLASHMOE_PREFETCH_TOP", "2")
    monkeypatch.setenv("FLASHMOE_PREFETCH_AHEAD", "2")
    monkeypatch.setenv("FLASHMOE_PREFETCH_LATE", "1")
    path = models[(arch, "mlx")]
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        layers = [b.layer for b in eng.banks]
        for i, bank in enumerate(eng.banks):  # the next two MoE layers, fewer near the end
            assert [a[0] for a in bank.ahead] == layers[i + 1:i + 3]
        bank = eng.banks[0]
        x = mx.random.normal((1, 3, eng.model.args.hidden_size), key=mx.random.key(0))
        got = np.array(bank._guess(x))
        assert got.shape == (1, 3, 2, 3)  # batch, token, layer ahead, rank (2 early + 1 late)
        assert bank.early_top == 2
        for d, (_layer, gate, k) in enumerate(bank.ahead):
            assert bank.guess_top == 3 < k
            g = gate(x)
            if isinstance(g, tuple):
                inds, scores = (np.array(a) for a in g)
                want = np.take_along_axis(inds, np.argsort(-scores, axis=-1), axis=-1)
            else:
                want = np.argsort(-np.array(g), axis=-1)
            assert np.array_equal(got[:, :, d], want[..., :3])


def test_prefetch_setting():
    from flashmoe.configs import ConfigError
    from flashmoe.orchestrator.engine import resolve_prefetch

    assert resolve_prefetch("auto") is (mx.default_device() != mx.cpu)
    assert resolve_prefetch("on") is resolve_prefetch(True) is resolve_prefetch("1") is True
    assert resolve_prefetch("off") is resolve_prefetch(False) is resolve_prefetch("0") is False
    with pytest.raises(ConfigError, match="prefetch"):
        resolve_prefetch("sometimes")


@pytest.mark.parametrize("name,bad", [("PREFETCH_AHEAD", "0"), ("PREFETCH_DEPTH", "0"),
                                      ("PREFETCH_TOP", "-1"), ("PREFETCH_AHEAD", "two"),
                                      ("PREFETCH_LATE", "-2"),
                                      ("PREFETCH_THREADS", "-1"), ("IO_SPIN_US", "-1"),
                                      ("IO_SPIN_US", "fast")])
def test_prefetch_counts_are_checked(name, bad, monkeypatch):
    from flashmoe.configs import ConfigError, load_settings

    monkeypatch.setenv(f"FLASHMOE_{name}", bad)
    with pytest.raises(ConfigError, match=f"setting {name.lower()}"):
        load_settings()


def test_late_guesses_reach_the_cache_as_late(models, monkeypatch):
    """prefetch_late: a decode step guesses the next router's best prefetch_top experts as early
    guesses and its next prefetch_late as late ones (sent only while no demanded load is read)."""
    monkeypatch.setenv("FLASHMOE_PREFETCH", "1")
    monkeypatch.setenv("FLASHMOE_PREFETCH_TOP", "1")
    monkeypatch.setenv("FLASHMOE_PREFETCH_LATE", "1")
    path = models[("qwen3_moe", "mlx")]
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        calls = []
        real = eng.cache.prefetch

        def spy(keys, limit=None, early=None):
            calls.append((list(keys), early))
            return real(keys, limit=limit, early=early)

        monkeypatch.setattr(eng.cache, "prefetch", spy)
        list(eng.generate(GenRequest(id="l", prompt=[1, 2, 3], max_tokens=3)))
        per_pass = len(eng.banks) - 1  # every bank but the last guesses
        one_token = calls[-2 * per_pass:]  # the last two decode steps
        assert len(calls) >= 2 * per_pass
        assert all(len(k) == 2 and e == 1 for k, e in one_token)  # one token's 2 guesses
        assert all(k[0][0] == k[1][0] for k, _e in one_token)  # both for the next layer


def test_guesses_go_best_first():
    from flashmoe.orchestrator.streamed import _best_first

    guess = np.array([[[[5, 2, 9]], [[2, 7, 5]]]])  # two tokens, each its best three
    assert _best_first(guess, [3]) == ([(3, 5), (3, 2), (3, 7), (3, 9)], 4)
    # the first choices are early; 7 and 9 only come second and third: late
    assert _best_first(guess, [3], 1) == ([(3, 5), (3, 2), (3, 7), (3, 9)], 2)
    assert _best_first(guess, [3], 2) == ([(3, 5), (3, 2), (3, 7), (3, 9)], 3)
    # two layers ahead: the nearest layer's guesses first, the farther ones all late
    guess = np.array([[[[5, 2], [1, 5]], [[2, 7], [1, 4]]]])  # token, layer, rank
    want = [(3, 5), (3, 2), (3, 7), (4, 1), (4, 5), (4, 4)]
    assert _best_first(guess, [3, 4]) == (want, 3)
    assert _best_first(guess, [3, 4], 1) == (want, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_deferred_loads_keep_tokens_exact(models, arch, monkeypatch):
    """The GPU pipeline, run on the CPU: a bank with loads in flight returns its lazy output and
    the next bank waits for those loads before evaluating anything. mlx-lm's forward pass of
    every supported architecture must evaluate nothing in between."""
    import flashmoe.orchestrator.streamed as streamed

    monkeypatch.setattr(streamed, "PROGRESSIVE", False)
    monkeypatch.setattr(streamed, "DEFER", True)
    path = models[(arch, "mlx")]
    want = reference_ids(path, PROMPT, N_TOKENS)
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        assert [b.defer for b in eng.banks] == [True] * (len(eng.banks) - 1) + [False]
        got = [t for c in eng.generate(GenRequest(id="d", prompt=PROMPT, max_tokens=N_TOKENS))
               for t in c.token_ids]
        assert eng.cache.stats.overlapped > 0  # some banks did return early
        assert eng.cache.table.stats()["pinned"] == 0
    assert got == want


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetch_guesses_fill_idle_disk_time(models, depth, monkeypatch):
    """Guesses go to a loader only once every demanded load has been sent, best first,
    ``depth`` at a time; unsent ones are dropped by the next layer at no cost (no slot); a sent
    one that is asked for is counted and holds the right expert; the rest are evicted first."""
    monkeypatch.setenv("FLASHMOE_PREFETCH_DEPTH", str(depth))
    path = models[("qwen3_moe", "mlx")]
    with Engine(str(path), memory_budget=quarter_budget(path, 3), dtype="float32") as eng:
        cache, t, st = eng.cache, eng.cache.table, eng.cache.stats
        l0, l1 = eng.store.moe_layers[:2]
        cache.release(cache.acquire(l0, [0, 1, 2]))
        assert cache.prefetch([(l0, 1), (l0, 2)]) == 0  # cached: nothing to guess
        # More misses than staging slots: some demanded loads wait to be sent, so do guesses.
        misses = [e for e in range(eng.store.num_experts) if t.lookup((l0, e)) is None]
        assert len(misses) > cache.plan.staging_slots
        p0 = cache.begin(l0, misses)
        assert cache.prefetch([(l1, e) for e in (7, 5, 6)]) == 3
        assert st.prefetched == 0 and t.lookup((l1, 7)) is None
        cache.finish(p0)  # all sent and landed: the guesses go out, best first
        cache.release(p0.slots)
        sent = [t.lookup((l1, e)) is not None for e in (7, 5, 6)]
        assert st.prefetched >= depth and sent == [True] * st.prefetched + [False] * (
            3 - st.prefetched)
        p = cache.begin(l1, [7, 3])  # asks for the best guess
        cache.finish(p)
        assert st.prefetch_used == 1
        name = cache.layout.tensors[0].name
        got = np.array(cache.arrays[name][p.slots[0]])
        assert np.array_equal(got, eng.store.record_arrays(l1, 7)[name])
        cache.release(p.slots)
        # Nothing in flight: ``depth`` guesses go at once, the rest wait for them to land.
        deadline = time.monotonic() + 10
        while t.stats()["loading"]:  # the guesses nobody asked for land on their own
            assert time.monotonic() < deadline
            cache.tend()
        l2 = eng.store.moe_layers[2]
        a, b, c, d = [e for e in range(eng.store.num_experts) if t.lookup((l2, e)) is None][:4]
        before = st.prefetched
        assert cache.prefetch([(l2, e) for e in (a, b, c, d)]) == 4
        assert st.prefetched == before + depth
        guess = t.lookup((l2, a))
        cache.release(cache.acquire(l2, [d]))  # not a guess it asked for
        assert t.lookup((l2, c)) is None  # never sent: dropped without a slot
        assert st.prefetched == before + depth
        deadline = time.monotonic() + 10
        while t.state(guess) != "ready":  # unpinned, it lands on its own
            assert time.monotonic() < deadline
            cache.tend()
        assert t.pins(guess) == 0
        unasked = {t.lookup(k) for k in [(l2, b), (l1, 5), (l1, 6)]} | {guess}
        filler = [t.acquire(("filler", i))[0] for i in range(t.stats()["free"])]
        fresh = t.acquire(("new", 0))[0]  # the first eviction takes a guess
        assert fresh in unasked - {None}
        assert t.lookup((l0, 0)) is not None  # older, but asked for: still cached
        for s in filler + [fresh]:
            t.failed(s, t.generation(s), cancelled=True)
            t.release(s)


def test_guesses_stay_pinned_until_their_layer(models, monkeypatch):
    """A guess for a layer two ahead survives the layer in between (pinned, never evicted) and
    is unpinned, as the first to evict, when its own layer begins without asking for it; a new
    forward pass unpins whatever is left of the last one."""
    monkeypatch.setenv("FLASHMOE_PREFETCH_DEPTH", "4")
    path = models[("qwen3_moe", "mlx")]
    with Engine(str(path), memory_budget=quarter_budget(path, 3), dtype="float32") as eng:
        cache, t, st = eng.cache, eng.cache.table, eng.cache.stats
        l0, l1, l2, l3 = eng.store.moe_layers[:4]

        def settle():
            deadline = time.monotonic() + 10
            while t.stats()["loading"]:
                assert time.monotonic() < deadline
                cache.tend()

        cache.release(cache.acquire(l0, [0]))
        assert cache.prefetch([(l1, 1), (l2, 2), (l2, 3), (l3, 4)]) == 4
        settle()
        assert st.prefetched == 4
        g1, g2, g3, g4 = (t.lookup(k) for k in [(l1, 1), (l2, 2), (l2, 3), (l3, 4)])
        cache.release(cache.acquire(l1, [5]))  # l1's guess unused: unpinned; the rest stay
        assert [t.pins(g) for g in (g1, g2, g3, g4)] == [0, 1, 1, 1]
        cache.release(cache.acquire(l2, [2]))  # asks for one of its two guesses
        assert st.prefetch_used == 1
        assert [t.pins(g) for g in (g2, g3, g4)] == [0, 0, 1]
        cache.release(cache.acquire(l0, [0]))  # a new pass: l3's guess is stale
        assert t.pins(g4) == 0 and t.stats()["pinned"] == 0
        filler = [t.acquire(("filler", i))[0] for i in range(t.stats()["free"])]
        first = [t.acquire(("new", i))[0] for i in range(3)]  # the unused guesses go first
        assert set(first) == {g1, g3, g4}
        for s in filler + first:
            t.failed(s, t.generation(s), cancelled=True)
            t.release(s)


def test_late_guesses_wait_for_the_demanded_loads(models, monkeypatch):
    """Guesses for the next layer may be read beside the demanded loads; farther ones (late)
    only once the disk has nothing demanded left to read."""
    monkeypatch.setenv("FLASHMOE_PREFETCH_DEPTH", "4")
    path = models[("qwen3_moe", "mlx")]
    with Engine(str(path), memory_budget=quarter_budget(path, 3), dtype="float32") as eng:
        cache, t = eng.cache, eng.cache.table
        l0, l1, l2 = eng.store.moe_layers[:3]
        p = cache.begin(l0, [0, 1])  # two demanded loads in flight
        assert p.inflight
        assert cache.prefetch([(l1, 2), (l2, 3), (l2, 4)], early=1) == 3
        assert t.lookup((l1, 2)) is not None  # the early one goes at once
        assert t.lookup((l2, 3)) is None and t.lookup((l2, 4)) is None  # the late ones wait
        cache.finish(p)
        cache.release(p.slots)
        assert t.lookup((l2, 3)) is not None and t.lookup((l2, 4)) is not None
        assert cache.stats.prefetched == 3


def test_exhausted_pool_leaves_no_stuck_slot(models):
    path = models[("qwen3_moe", "mlx")]
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        cache, held = eng.cache, []
        with pytest.raises(BudgetError, match="in use"):
            for layer in eng.store.moe_layers:  # pin whole layers until nothing is left
                held.append(cache.acquire(layer, range(eng.store.num_experts)))
        stats = cache.table.stats()
        assert stats["loading"] == 0
        for slots in held:
            cache.release(slots)
        assert cache.table.stats()["pinned"] == 0
        cache.release(cache.acquire(eng.store.moe_layers[-1], range(eng.store.num_experts)))


def test_bad_requests_do_not_end_the_engine_thread(models):
    path = models[("qwen3_moe", "mlx")]
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        eng.start()
        done = {}
        ev = threading.Event()

        def on_chunk(c):
            if c.finish_reason:
                done[c.id] = c
                if len(done) == 3:
                    ev.set()

        eng.submit(GenRequest(id="empty", prompt=""), on_chunk)
        eng.submit(GenRequest(id="tiny-t", prompt=PROMPT, max_tokens=8, temperature=1e-300),
                   on_chunk)
        eng.submit(GenRequest(id="ok", prompt=PROMPT, max_tokens=8), on_chunk)
        assert ev.wait(120)
        assert done["empty"].finish_reason == "error" and "empty" in done["empty"].error
        assert done["ok"].finish_reason == "length"
    want = reference_ids(path, PROMPT, 8)
    tiny, _ = engine_ids(path, quarter_budget(path), prompt=PROMPT, temperature=1e-300)
    assert tiny[:8] == want


def test_bfloat16_cache_matches_mlx_lm(models):
    """bf16 cache arrays are filled through uint16 views of the same buffer."""
    path = models[("qwen3_moe", "mlx")]
    model, tok = mlx_load(str(path))
    model.set_dtype(mx.bfloat16)
    want = []
    for r in stream_generate(model, tok, PROMPT, max_tokens=16):
        if r.finish_reason == "stop":
            break
        want.append(r.token)
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="bfloat16") as eng:
        got = [t for c in eng.generate(GenRequest(id="b", prompt=PROMPT, max_tokens=16))
               for t in c.token_ids]
        assert eng.cache.arrays["gate_proj.scales"].dtype == mx.bfloat16
    assert got == want


def test_long_prompt_overlaps_and_stays_exact(models):
    """A prompt long enough for mlx-lm's sorted path, on a budget with partial hits."""
    path = models[("qwen3_moe", "mlx")]
    prompt = " ".join(f"word{i} and more" for i in range(40))
    want = reference_ids(path, prompt, 8)
    with Engine(str(path), memory_budget=quarter_budget(path, 2), dtype="float32") as eng:
        list(eng.generate(GenRequest(id="warm", prompt=prompt[:200], max_tokens=2)))
        got = [t for c in eng.generate(GenRequest(id="l", prompt=prompt, max_tokens=8))
               for t in c.token_ids]
        assert eng.cache.stats.overlapped > 0
    assert got == want


def test_cold_prefill_computes_experts_as_they_land(models):
    """Nothing cached: each layer's pairs are computed in pieces as their experts arrive, and
    the tokens are still mlx-lm's."""
    path = models[("deepseek_v3", "packed")]
    prompt = " ".join(f"token{i}" for i in range(30))
    want = reference_ids(models[("deepseek_v3", "hf")], prompt, 6)
    with Engine(str(path), memory_budget=quarter_budget(path, 2), dtype="float32",
                workers=2) as eng:
        got = [t for c in eng.generate(GenRequest(id="c", prompt=prompt, max_tokens=6))
               for t in c.token_ids]
        st = eng.cache.stats
        assert st.overlapped > 0 and st.parts > st.overlapped  # more than one piece per call
    assert got == want


def test_budget_beyond_the_model_plans_no_more_than_every_expert(models):
    path = models[("mixtral", "mlx")]
    store = open_store(path)
    with Engine(str(path), memory_budget="8GiB", dtype="float32") as eng:
        assert eng.plan.cache_slots == len(store.moe_layers) * store.num_experts
        assert eng.plan.nbytes < 8 << 30
