"""The coordinator against mlx-lm as the reference: same checkpoint, same dtype, same tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from support import mlx_lm_ids

from flashmoe.errors import BudgetError
from flashmoe.orchestrator import engine as engine_module
from flashmoe.orchestrator.budget import budget_for_pool
from flashmoe.orchestrator.cache import PoolPlan, cache_record_bytes
from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.pack import pack
from flashmoe.store import RECORD_ALIGN, open_store
from flashmoe.synth import synth

ARCHS = ["qwen3_moe", "qwen3_5_moe", "deepseek_v3", "mixtral"]
PROMPT = "The expert pool holds"
N_TOKENS = 20


def reference_ids(path: Path, prompt, n: int) -> list[int]:
    return mlx_lm_ids(path, prompt, n, mx.float32)


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
    want = mlx_lm_ids(path, PROMPT, N_TOKENS, mx.float32, {"num_experts_per_tok": k})
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


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])  # logits / (indices, scores)
def test_guesses_are_the_next_routers_first_choices(models, arch, monkeypatch):
    monkeypatch.setenv("FLASHMOE_PREFETCH", "1")
    monkeypatch.setenv("FLASHMOE_PREFETCH_TOP", "3")
    path = models[(arch, "mlx")]
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        layers = [b.layer for b in eng.banks]
        for bank, nxt in zip(eng.banks, layers[1:] + [None], strict=True):
            assert (bank.ahead and bank.ahead[0]) == nxt  # the next MoE layer; none for the last
        bank = eng.banks[0]
        x = mx.random.normal((1, 3, eng.model.args.hidden_size), key=mx.random.key(0))
        got = np.array(bank._guess(x))
        assert got.shape == (1, 3, 3) and bank.guess_top == 3  # batch, token, rank
        g = bank.ahead[1](x)
        if isinstance(g, tuple):
            inds, scores = (np.array(a) for a in g)
            want = np.take_along_axis(inds, np.argsort(-scores, axis=-1), axis=-1)
        else:
            want = np.argsort(-np.array(g), axis=-1)
        assert np.array_equal(got, want[..., :3])


def test_prefetch_setting():
    from flashmoe.configs import ConfigError
    from flashmoe.orchestrator.engine import resolve_prefetch

    assert resolve_prefetch("auto") is (mx.default_device() != mx.cpu)
    assert resolve_prefetch("on") is resolve_prefetch(True) is resolve_prefetch("1") is True
    assert resolve_prefetch("off") is resolve_prefetch(False) is resolve_prefetch("0") is False
    with pytest.raises(ConfigError, match="prefetch"):
        resolve_prefetch("sometimes")


@pytest.mark.parametrize("name,bad", [("PREFETCH_DEPTH", "0"), ("PREFETCH_TOP", "-1"),
                                      ("PREFETCH_DEPTH", "two"), ("PREFETCH_THREADS", "-1")])
def test_prefetch_counts_are_checked(name, bad, monkeypatch):
    from flashmoe.configs import ConfigError, load_settings

    monkeypatch.setenv(f"FLASHMOE_{name}", bad)
    with pytest.raises(ConfigError, match=f"setting {name.lower()}"):
        load_settings()


def test_guesses_go_best_first():
    from flashmoe.orchestrator.streamed import _best_first

    guess = np.array([[[5, 2, 9], [2, 7, 5]]])  # two tokens, each its best three
    assert _best_first(guess) == [5, 2, 7, 9]  # every first choice, then every second, ...


@pytest.mark.parametrize("arch", ARCHS)
def test_deferred_loads_keep_tokens_exact(models, arch):
    """The GPU pipeline, run on the CPU: a bank with loads in flight returns its lazy output and
    the next bank waits for those loads before evaluating anything. mlx-lm's forward pass of
    every supported architecture must evaluate nothing in between."""
    from flashmoe.orchestrator.streamed import use_path

    path = models[(arch, "mlx")]
    want = reference_ids(path, PROMPT, N_TOKENS)
    with Engine(str(path), memory_budget=quarter_budget(path), dtype="float32") as eng:
        use_path(eng.banks, "deferred")
        assert [b.defer for b in eng.banks] == [True] * (len(eng.banks) - 1) + [False]
        got = [t for c in eng.generate(GenRequest(id="d", prompt=PROMPT, max_tokens=N_TOKENS))
               for t in c.token_ids]
        assert eng.cache.stats.overlapped > 0  # some banks did return early
        assert eng.cache.table.stats()["pinned"] == 0
    assert got == want


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
    want = mlx_lm_ids(path, PROMPT, 16, mx.bfloat16)
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


def test_a_layer_needing_more_experts_than_slots_goes_group_by_group(models, monkeypatch):
    """A prompt whose layers route to more experts than the cache has slots: each group's pairs
    are computed alone (the other groups' rows are not recomputed), and the tokens are mlx-lm's."""
    from flashmoe.orchestrator.streamed import StreamedBank

    path = models[("qwen3_moe", "mlx")]
    prompt = " ".join(f"word{i} and more" for i in range(40))
    want = reference_ids(path, prompt, 6)
    groups = []
    grouped = StreamedBank._grouped

    def spy(self, x, ids, experts):
        groups.append(-(-experts.size // self.cache.nslots))
        return grouped(self, x, ids, experts)

    monkeypatch.setattr(StreamedBank, "_grouped", spy)
    store = open_store(path)
    plan = PoolPlan(6, 4, cache_record_bytes(store.layout, mx.float32),
                    -(-store.layout.nbytes // RECORD_ALIGN) * RECORD_ALIGN)
    monkeypatch.setattr(engine_module, "plan_for", lambda *a, **k: plan)  # 6 of 16 experts
    with Engine(str(path), memory_budget=budget_for_pool(store, plan.nbytes, mx.float32),
                dtype="float32") as eng:
        assert eng.cache.nslots == 6
        got = [t for c in eng.generate(GenRequest(id="g", prompt=prompt, max_tokens=6))
               for t in c.token_ids]
    assert groups and max(groups) >= 2
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
