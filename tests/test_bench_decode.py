"""``flashmoe bench decode`` end to end on a tiny model: both sides, streams, trace, JSON keys."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys

import pytest

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
    busy = r["disk_busy_fraction"]  # None where the store's filesystem has no disk counter
    assert busy is None or 0 <= busy <= 1.05  # io_ticks count whole milliseconds
    before, after = r["disk_gb_per_s_before_after"]
    assert before > 0 and after > 0 and r["disk_gb_per_s"] == (before + after) / 2
    # each figure is the best of the ways the disk was read
    ways = r["disk_gb_per_s_by_way"]
    assert [set(w) for w in ways] == [{"whole x32", "pieces x32", "pieces x8"}] * 2
    assert [max(w.values()) for w in ways] == [before, after]
    assert abs(r["io_floor_tokens_per_s"] * r["needed_bytes_per_token"]
               - r["disk_gb_per_s"] * 1e9) < 1e-3 * r["disk_gb_per_s"] * 1e9
    assert set(r["aggregate_tokens_per_s"]) == {"1", "2"}
    assert set(r["baseline_aggregate_tokens_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in r["baseline_aggregate_tokens_per_s"].values())
    assert set(r["streamed"]["profile"]) >= {"io_wait", "expert_compute", "dense_and_routing"}
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert lines and all({"layer", "experts"} <= set(x) for x in lines)


def test_busy_ms_counts_the_disk_of_a_path(tmp_path):
    from flashmoe.bench_decode import busy_ms

    assert busy_ms("/dev/shm") is None  # a tmpfs has no disk
    assert busy_ms(str(tmp_path / "missing")) is None
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(8 << 20))
    before = busy_ms(str(f))
    if before is None:
        pytest.skip("the test folder is on no block device with a counter")
    fd = os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        buf = mmap.mmap(-1, 8 << 20)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    assert busy_ms(str(f)) >= before
