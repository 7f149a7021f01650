"""Soaks (``make test-slow`` or ``python -m pytest -m slow tests/test_soak.py``): what weeks of
service do, compressed. Each prints its figures (run with ``-s`` to see them)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support import (
    PROMPTS,
    SMALL_BUDGET,
    Daemon,
    WorkerKiller,
    loader_workers,
    rss,
    shm_segments,
    start_stop_cycles,
)

pytestmark = pytest.mark.slow


def _small(model: Path, *extra: str) -> Daemon:
    d = Daemon(model, "--memory-budget", str(SMALL_BUDGET), "--workers", "2", *extra)
    d.wait_ready()
    return d


def test_workers_killed_every_three_tokens_of_a_long_generation(tiny_model: Path) -> None:
    n = 400
    d = _small(tiny_model)
    try:
        with d.client(timeout=60) as c, d.client(timeout=10) as probe:
            want = c.generate(PROMPTS[3], max_tokens=n).token_ids
            got: list[int] = []
            with WorkerKiller(lambda: probe.status()["workers"]) as k:
                for chunk in c.generate(PROMPTS[3], max_tokens=n, stream=True):
                    got += chunk.token_ids
                    if len(got) % 3 == 0:
                        k.poke()
            assert got == want

            def settled(st: dict) -> bool:
                ready = all(w["state"] == "ready" for w in st["workers"])
                return ready and st["worker_restarts"] >= k.kills

            deadline = time.monotonic() + 30
            while not settled(st := probe.status()) and time.monotonic() < deadline:
                c.generate(PROMPTS[0], max_tokens=2)  # the pool hears Hellos while it loads
        assert st["worker_restarts"] == k.kills >= n // 4
        assert all(w["state"] == "ready" for w in st["workers"])
        assert {p.pid for p in loader_workers(d.proc.pid)} == {w["pid"] for w in st["workers"]}
        print(f"\n{len(got)} tokens, {k.kills} workers killed, {st['worker_restarts']} "
              f"replaced, last replacement {st['last_restart_s']:.3f} s")  # fmt: skip
    finally:
        d.close()


def test_fifty_start_stop_cycles_leave_nothing(tiny_model: Path, runtime_dir: Path) -> None:
    took = start_stop_cycles(tiny_model, runtime_dir, 50)
    print(f"\n50 start+stop cycles: mean {sum(took) / len(took):.2f} s, max {max(took):.2f} s")


def test_memory_stays_bounded(tiny_model: Path, reference: dict) -> None:
    """One 200-token generation (the tiny budget's context limit is 256 tokens), then 200
    requests in a row: the pool within its budget, the daemon's RSS flat over the second half."""
    d = _small(tiny_model)
    pid = d.proc.pid
    try:
        with d.client(timeout=120) as c:
            rss_start = rss(pid)
            r = c.generate(PROMPTS[5], max_tokens=200)
            long_tokens = len(r.token_ids)
            assert r.finish_reason == "length" or long_tokens > 0
            st = c.status()
            assert st["pool_bytes"] <= st["budget_bytes"] == SMALL_BUDGET
            rss_long = rss(pid)
            samples = []
            for i in range(200):
                r = c.generate(PROMPTS[i % len(PROMPTS)], max_tokens=16,
                               temperature=0.7 if i % 3 else 0.0, seed=i)  # fmt: skip
                assert r.finish_reason in ("length", "stop")
                if i % 20 == 19:
                    samples.append(rss(pid))
            st = c.status()
            assert st["pool_bytes"] <= st["budget_bytes"]
            assert st["requests_running"] == 0
            want = reference[PROMPTS[0]][0]
            assert c.generate(PROMPTS[0], max_tokens=len(want)).token_ids == want
        second_half = samples[len(samples) // 2 :]
        growth = max(second_half) - second_half[0]
        mib = [f"{s / 2**20:.1f}" for s in samples]
        print(f"\nlong generation {long_tokens} tokens; RSS start {rss_start / 2**20:.1f} MiB, "
              f"after it {rss_long / 2**20:.1f} MiB, every 20 requests {mib} MiB; "
              f"pool {st['pool_bytes']} of budget {st['budget_bytes']} bytes")  # fmt: skip
        assert growth < 16 * 2**20, mib
        assert d.stop() == 0
        assert not shm_segments(pid) and not loader_workers(pid)
    finally:
        d.close()
