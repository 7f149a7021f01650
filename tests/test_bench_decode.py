"""``flashmoe bench decode`` end to end on a tiny model: both sides, streams, trace, JSON keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flashmoe.synth import synth


def test_bench_decode_json(tmp_path):
    model = synth(tmp_path / "m", "qwen3_moe", layout="mlx", bits=4, seed=2)
    trace = tmp_path / "trace.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "flashmoe.cli", "bench", "decode", "--model", str(model),
         "--memory-budget", "400KiB", "--tokens", "6", "--prompt-tokens", "5", "--streams", "2",
         "--baseline", "--profile", "--trace-out", str(trace), "--json"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FLASHMOE_PREFETCH": "on"},
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for key in ("decode_tokens_per_s", "baseline_decode_tokens_per_s", "ratio",
                "prefill_tokens_per_s", "hit_rate", "bytes_per_token"):
        assert isinstance(r[key], float), key
    assert r["ratio"] > 0 and 0 <= r["hit_rate"] <= 1
    assert r["bytes_per_token"] > 0  # 400 KiB holds a fraction of the experts
    # guesses nobody used do not count as needed, and the I/O floor uses the needed bytes
    assert 0 < r["needed_bytes_per_token"] <= r["bytes_per_token"]
    assert 0 <= r["guesses_used_per_token"] <= r["guesses_per_token"]
    before, after = r["disk_gb_per_s_before_after"]
    assert before > 0 and after > 0 and r["disk_gb_per_s"] == (before + after) / 2
    assert abs(r["io_floor_tokens_per_s"] * r["needed_bytes_per_token"]
               - r["disk_gb_per_s"] * 1e9) < 1e-3 * r["disk_gb_per_s"] * 1e9
    assert set(r["aggregate_tokens_per_s"]) == {"1", "2"}
    assert set(r["baseline_aggregate_tokens_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in r["baseline_aggregate_tokens_per_s"].values())
    assert set(r["streamed"]["profile"]) >= {"io_wait", "expert_compute", "dense_and_routing"}
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert lines and all({"layer", "experts"} <= set(x) for x in lines)
