"""The memory budget's accounting: KV bytes per token measured from mlx-lm's own caches, the
split of a budget, the context limit, and the engine refusing a request that cannot fit."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from flashmoe.errors import BudgetError
from flashmoe.orchestrator import budget as B
from flashmoe.synth import synth


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("budget") / "tiny", "qwen3_moe", layout="mlx", bits=4)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("budget") / "q35", "qwen3_5_moe", layout="mlx", bits=4)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_kv_per_token_matches_the_attention_shape(tiny):
    cfg = _config(tiny)
    kv = B.measure_kv(cfg, mx.float32)
    heads, dim = cfg["num_key_value_heads"], cfg.get("head_dim") or (
        cfg["hidden_size"] // cfg["num_attention_heads"])
    assert kv.per_token == 2 * heads * dim * 4 * cfg["num_hidden_layers"]
    assert kv.fixed == 0
    assert kv.bytes_at(1) == kv.bytes_at(256) == 256 * kv.per_token
    assert kv.bytes_at(257) == 512 * kv.per_token


def test_quantized_kv_is_smaller(tiny):
    cfg = _config(tiny)
    full = B.measure_kv(cfg, mx.float32)
    q8, q4 = B.measure_kv(cfg, mx.float32, 8), B.measure_kv(cfg, mx.float32, 4)
    g = B.kv_group_size(cfg)
    # per element: bits/8 plus a float32 scale and bias per group
    assert q4.per_token == pytest.approx(full.per_token / 4 * (0.5 + 8 / g))
    assert q8.per_token == pytest.approx(full.per_token / 4 * (1 + 8 / g))


def test_linear_attention_state_is_fixed(hybrid):
    cfg = _config(hybrid)
    kv = B.measure_kv(cfg, mx.float32)
    tc = cfg.get("text_config", cfg)
    full_layers = tc["num_hidden_layers"] // tc["full_attention_interval"]
    dim = tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]
    assert kv.per_token == 2 * tc["num_key_value_heads"] * dim * 4 * full_layers
    assert kv.fixed > 0  # the linear-attention layers' recurrent and conv state


def test_plan_splits_the_budget_and_names_the_numbers():
    kv = B.KVShape(per_token=1000.0, fixed=0, bits=None)
    cfg = {"num_attention_heads": 2, "num_hidden_layers": 1}
    plan = B.plan_budget(10**9, cfg, kv, dense_bytes=10_000_000, min_pool=1_000_000,
                         itemsize=4, max_context=4096)
    work = 2 * 2048 * 4096 * 4 * 5 // 4
    assert plan.kv_bytes == 4096 * 1000 and plan.workspace_bytes == work
    assert plan.pool_bytes == 10**9 - 10_000_000 - 4096 * 1000 - work
    with pytest.raises(BudgetError, match=r"context of 65536 tokens.*dense weights 10000000"):
        B.plan_budget(10**9, cfg, kv, 10_000_000, 1_000_000, 4, max_context=65536)


def test_default_context_leaves_the_experts_most_of_the_budget():
    kv = B.KVShape(per_token=1000.0, fixed=0, bits=None)
    cfg = {"num_attention_heads": 2}
    plan = B.plan_budget(200_000_000, cfg, kv, 10_000_000, 1_000_000, 4)
    assert plan.max_context % B.KV_STEP == 0 and 0 < plan.max_context <= B.MAX_DEFAULT_CONTEXT
    assert plan.kv_bytes + plan.workspace_bytes <= (200_000_000 - 10_000_000) / 2
    longer = B.plan_budget(200_000_000, cfg, kv, 10_000_000, 1_000_000, 4,
                           max_context=plan.max_context + B.KV_STEP)
    assert longer.kv_bytes + longer.workspace_bytes > (200_000_000 - 10_000_000) / 2
    with pytest.raises(BudgetError, match="too small"):
        B.plan_budget(11_000_000, cfg, kv, 10_000_000, 1_000_000, 4)


def test_check_request_names_the_numbers():
    B.check_request(100, 28, 128)
    with pytest.raises(ValueError, match=r"100 tokens \+ max_tokens 29 = 129 .* 128"):
        B.check_request(100, 29, 128)


def test_dense_bytes_widen_floats_and_skip_ignored(tiny):
    from flashmoe.store import open_store

    store = open_store(tiny)
    raw = store.dense_bytes()
    as_is = B.dense_in_memory(store, mx.float32, cast=False)
    wide = B.dense_in_memory(store, mx.float32, cast=True)
    assert as_is == raw and wide > raw
    assert B.ignored_tensors(store) == {}


def test_ignored_by_name():
    class Fake:
        num_layers = 2

        def dense_tensors(self):
            return {n: None for n in ("model.layers.0.self_attn.q_proj.weight",
                                      "model.layers.2.eh_proj.weight", "mtp.fc.weight",
                                      "model.visual.blocks.0.weight", "lm_head.weight")}

    assert sorted(B.ignored_tensors(Fake())) == [
        "model.layers.2.eh_proj.weight", "model.visual.blocks.0.weight", "mtp.fc.weight"]


def test_engine_refuses_a_request_past_its_context(tiny, capsys):
    from flashmoe.cli import main
    from flashmoe.store import open_store

    store = open_store(tiny)
    budget = store.expert_bytes_total() * 4
    code = main(["run", "--model", str(tiny), "--memory-budget", str(budget),
                 "--max-context", "64", "--prompt", "hello " * 40, "--max-tokens", "40"])
    err = capsys.readouterr().err
    assert code == 2
    assert "exceeds the context limit of 64 tokens" in err and "Traceback" not in err


def test_quantized_kv_cache_gives_mlx_lm_s_tokens(tiny):
    """``--kv-bits 8``: the same greedy tokens as mlx-lm with the same quantized KV cache, a
    KV cache counted at a fraction of its full-precision bytes; the batched path refuses it."""
    from mlx_lm import load, stream_generate

    from flashmoe.errors import FlashMoeError
    from flashmoe.orchestrator.engine import Engine, GenRequest

    prompt, n = "The expert pool holds", 16
    model, tok = load(str(tiny))
    model.set_dtype(mx.float32)
    want = [r.token for r in stream_generate(model, tok, prompt, max_tokens=n,
                                             **B.kv_args(8, _config(tiny)))
            if r.finish_reason != "stop"]
    store_budget = "64MiB"
    with Engine(str(tiny), memory_budget=store_budget, dtype="float32", kv_bits=8) as eng:
        got = [t for c in eng.generate(GenRequest(id="q", prompt=prompt, max_tokens=n))
               for t in c.token_ids]
        quantized = eng.budget_plan.kv_bytes / eng.max_context  # bytes per token of context
        with pytest.raises(FlashMoeError, match="kv_bits works with `flashmoe run` only"):
            eng.start()
    with Engine(str(tiny), memory_budget=store_budget, dtype="float32") as eng:
        full = eng.budget_plan.kv_bytes / eng.max_context
    assert got == want
    assert quantized < 0.6 * full
