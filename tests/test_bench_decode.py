"""``flashmoe bench decode`` end to end on a tiny model: both sides, streams, traces, replay."""

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
         "--memory-budget", "1600KiB", "--tokens", "6", "--prompt-tokens", "5", "--streams", "2",
         "--baseline", "--profile", "--trace-out", str(trace), "--disk-seconds", "0.2", "--json"],
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
    assert (r["read_amplification"] is None) == (r["device_bytes_read"] is None)
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
    assert r["guess_trace"] is None

    # The same run with its recorded routing as the guesses: every guess read is used.
    out = subprocess.run(
        [sys.executable, "-m", "flashmoe.cli", "bench", "decode", "--model", str(model),
         "--memory-budget", "1600KiB", "--tokens", "6", "--prompt-tokens", "5",
         "--streams", "2", "--guess-trace", str(trace), "--disk-seconds", "0.2", "--json"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FLASHMOE_PREFETCH": "on"},
    )
    assert out.returncode == 0, out.stderr
    g = json.loads(out.stdout)
    assert g["guess_trace"] == str(trace)
    assert g["streamed"]["prefetch_settings"]["depth"] == 2
    assert g["guesses_per_token"] > 0
    assert g["guesses_used_per_token"] == g["guesses_per_token"]
    assert g["needed_bytes_per_token"] == g["bytes_per_token"]
    assert g["aggregate_tokens_per_s"]["2"] > 0  # two streams ran after the replayed one


def test_routing_replay_guesses_the_recorded_layers_and_stops_where_the_run_departs():
    from flashmoe.bench_probe import RoutingReplay
    from flashmoe.errors import ConfigError

    calls = [(0, [1, 2]), (1, [3]), (2, [4, 5]), (0, [6]), (1, [7]), (2, [0])]
    trace: list = []
    replay = RoutingReplay(calls, trace)
    trace.append((0, [1, 2]))
    assert replay.keys(1) == [(1, 3)]
    trace.append((1, [3]))
    assert replay.keys(2) == [(2, 4), (2, 5)]
    trace.append((2, [4, 5]))
    assert replay.keys(3) == []  # the next forward pass (layer 0 again) is not guessed
    trace.append((0, [6]))
    assert replay.keys(1) == [(1, 7)]
    trace.append((1, [7, 8]))  # this run routed differently from the recording
    with pytest.raises(ConfigError, match="departs from this run at bank call 5 .layer 1."):
        replay.keys(2)
    trace[-1] = (1, [7])
    trace.append((2, [0]))
    assert replay.keys(3) == []  # the recording ends here
    trace.append((0, [1]))
    with pytest.raises(ConfigError, match="ends after 6 bank calls"):
        replay.keys(1)


def test_guess_trace_errors_are_clear(tmp_path):
    from types import SimpleNamespace

    from flashmoe.bench_decode import _replay
    from flashmoe.bench_io import read_trace
    from flashmoe.errors import FlashMoeError

    with pytest.raises(FlashMoeError, match="cannot read routing trace"):
        read_trace(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"layer": 0, "experts": [1]}\n{"layer": 1}\n')
    with pytest.raises(FlashMoeError, match=r"bad.jsonl:2: not a routing record"):
        read_trace(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(FlashMoeError, match="no routing records"):
        read_trace(str(empty))
    good = tmp_path / "good.jsonl"
    good.write_text('{"layer": 0, "experts": [1, 2]}\n')
    assert read_trace(str(good)) == [(0, [1, 2])]
    no_prefetch = SimpleNamespace(banks=[SimpleNamespace(ahead=None)])
    with pytest.raises(FlashMoeError, match="prefetch, which is off"):
        _replay(no_prefetch, str(good))


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
