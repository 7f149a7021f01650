"""``flashmoe fit``: the hit-rate model, routing traces, the forecast's arithmetic, and the
command on a tiny checkpoint (its numbers are measured, so only their consistency is checked)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from flashmoe import fit as F
from flashmoe.cli import main
from flashmoe.synth import synth


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("fit") / "tiny", "qwen3_moe", layout="mlx", bits=4)


def test_lru_hit_rate_of_uniform_routing_is_the_share_cached():
    rng = random.Random(0)
    layers, experts, k = 4, 64, 4
    calls = [(layer, rng.sample(range(experts), k)) for _ in range(2000) for layer in range(layers)]
    for share in (0.125, 0.25, 0.5):
        slots = int(share * layers * experts)
        assert F.lru_hit_rate(calls, slots, warm_calls=400) == pytest.approx(share, abs=0.03)
    assert F.lru_hit_rate(calls, layers * experts, warm_calls=400) > 0.999  # cold misses only


def test_lru_counts_only_after_the_warm_calls():
    calls = [(0, [1, 2]), (0, [1, 2]), (0, [3])]
    assert F.lru_hit_rate(calls, 2) == pytest.approx(2 / 5)
    assert F.lru_hit_rate(calls, 2, warm_calls=1) == pytest.approx(2 / 3)
    assert F.lru_hit_rate(calls, 1, warm_calls=1) == 0.0


def test_csv_trace_counts_decode_after_the_prompt(tmp_path):
    rows = ["# a comment", "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes"]
    for phase, step in ((0, 0), (0, 1), (1, 0), (1, 1)):
        for layer in (0, 1):
            for slot, e in enumerate((step, 5)):
                rows.append(f"0,{phase},{step},{layer},{slot},{e},0.5,0,100")
    p = tmp_path / "t.csv"
    p.write_text("\n".join(rows) + "\n")
    calls, warm = F.read_route_trace(str(p))
    assert len(calls) == 8 and warm == 4
    assert calls[0] == (0, [0, 5]) and calls[-1] == (1, [1, 5])
    rate, name = F.hit_rate_model(str(p), 99, 99, 9)  # the trace's own shape is used
    assert "LRU" in name and 0 < rate(0.5) <= 1


def test_jsonl_trace_and_bad_trace(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"layer": 0, "experts": [i, i + 1]}) for i in range(5)))
    calls, warm = F.read_route_trace(str(p))
    assert warm == 1 and calls[1] == (0, [1, 2])
    bad = tmp_path / "bad.csv"
    bad.write_text("0,1,x,0,0,3\n")
    with pytest.raises(F.FlashMoeError, match="not a routing row"):
        F.read_route_trace(str(bad))


def test_uniform_model_and_decode_parts():
    rate, _ = F.hit_rate_model(None, layers=8, experts=128, k=8)
    assert rate(0.3) == pytest.approx(0.3, abs=0.05)
    assert 0.9 < rate(2.0) < 1.0  # every expert fits: only first uses after the warm-up miss
    # a token's 12 lookups outnumber 10 slots: LRU evicts each expert before its turn
    few, _ = F.hit_rate_model(None, layers=6, experts=8, k=2)
    assert few(10 / 48) < 0.05
    c = F.ComputeRate(decode_s=0.1, decode_spread=0.0, prefill_s=0.05,
                      decode_at_context_s=0.2)
    io = F.IoRate(latency_s=0.001, per_record_s=0.002, copy_s=0.0005, spread=0.0,
                  record_bytes=1000)
    all_hit = F.decode_seconds(c, io, layers=4, k=2, hit=1.0)
    assert all_hit["io_s"] == 0 and all_hit["misses"] == 0
    none = F.decode_seconds(c, io, layers=4, k=2, hit=0.0)
    assert none["misses"] == 8
    assert none["io_s"] == pytest.approx(4 * 0.001 + 8 * 0.002)
    assert none["copy_s"] == pytest.approx(8 * 0.0005)


def test_fit_command_json(tiny, capsys):
    assert main(["fit", str(tiny), "--memory-budget", "64MiB", "--seconds", "0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("fits", "dense_bytes", "kv_bytes", "min_budget", "recommended_budget",
                "hit_rate", "bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in d
    assert d["fits"] is True and d["min_budget"] <= d["memory_budget"]
    for band in (d["decode_tokens_per_s"], d["decode_tokens_per_s_at_context"]):
        assert band["low"] < band["expected"] < band["high"] <= 1.3 * band["expected"]
    assert d["kv_bytes"] == d["kv_bytes_per_token"] * d["context"]
    assert 0 <= d["hit_rate"] <= 1
    assert d["min_budget"] < d["recommended_budget"]


def test_fit_too_small_and_bad_input(tiny, capsys):
    assert main(["fit", str(tiny), "--memory-budget", "100000", "--seconds", "0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and "too small" in d["why_not"]
    assert d["decode_tokens_per_s"] is None and d["min_budget"] > 100000
    assert main(["fit", str(tiny), "--context", "0"]) == 2
    assert "--context: 0 is out of range" in capsys.readouterr().err
    assert main(["fit", str(tiny / "nope")]) == 2
    assert main(["fit", str(tiny), "--memory-budget", "lots"]) == 2


@pytest.mark.parametrize("arch,layers", [("qwen3_moe", 1), ("qwen3_5_moe", 4)])
def test_decode_at_context_grows_the_attention_caches_only(arch, layers, tmp_path):
    """The long-context decode is timed over KV caches grown to the context: those of the
    measured period's attention layers (qwen3_5_moe: one of its four layers; linear attention
    keeps its fixed-size state)."""
    from mlx_lm.models.cache import make_prompt_cache

    from flashmoe.orchestrator import budget as B
    from flashmoe.store import open_store

    store = open_store(synth(tmp_path / arch, arch, layout="hf"))
    model = F._layers_model(store, B.layer_period(store.config), F.mx.float32)
    cache = make_prompt_cache(model)
    model(F.mx.array([[1, 2, 3]]), cache=cache)
    F._extend_kv(cache, 1000)
    assert len(cache) == layers
    assert [getattr(c, "offset", None) for c in cache][-1] == 1003
    assert all(not hasattr(c, "offset") for c in cache[:-1])


def test_fit_runs_on_a_hybrid_model(tmp_path, capsys):
    """qwen3.5's model reads attributes of its layers (``is_linear``) that fit's timing wrapper
    must pass through."""
    path = synth(tmp_path / "q35", "qwen3_5_moe", layout="mlx", bits=4)
    assert main(["fit", str(path), "--memory-budget", "64MiB", "--context", "1024",
                 "--seconds", "0.3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is True and d["context"] == 1024
    assert d["decode_tokens_per_s_at_context"]["expected"] > 0
