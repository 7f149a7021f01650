"""The KV budget shared by batched sequences and the prompt cache: a batch never holds more KV
than the budget set aside, requests that do not fit yet wait (never fail), and the prompt cache
gives way."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from flashmoe.orchestrator.budget import KV_STEP, KVShape
from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.orchestrator.kv_ledger import KvLedger


class FakePrefix:
    def __init__(self, held: int):
        self.held = held

    def shrink_to(self, n: int) -> None:
        self.held = min(self.held, n)


def test_a_lane_holds_its_longest_sequence_times_its_size():
    kv = KVShape(per_token=10.0, fixed=100, bits=None)
    # 10,440 bytes: two sequences of 512 tokens, each with its own fixed part
    led = KvLedger(kv, capacity=2 * kv.bytes_at(512))
    assert led.lane_bytes([300, 100]) == 2 * kv.bytes_at(512)  # padded to the longest
    assert led.reserve(0, [300, 100])
    assert not led.reserve(0, [300, 100, 700])  # 3 x 768 tokens > 1,024: refused, unchanged
    assert led.held() == 2 * kv.bytes_at(512)
    assert not led.reserve(1, [700])  # another lane: 10,440 + 7,780 > 10,440
    led.release(0, [100])  # the 300-token sequence finished
    assert led.held() == kv.bytes_at(256)
    assert led.reserve(1, [700])
    led.release(0, [])
    led.release(1, [])
    assert led.held() == 0 and led.room() == led.capacity


def test_the_prompt_cache_gives_way_to_sequences():
    kv = KVShape(per_token=1.0, fixed=0, bits=None)
    prefix = FakePrefix(held=900)
    led = KvLedger(kv, capacity=1024, prefix=prefix)
    assert led.reserve(0, [KV_STEP])
    assert prefix.held == 1024 - KV_STEP
    assert led.room() == 1024 - KV_STEP


def test_batched_requests_beyond_the_kv_budget_wait_and_all_finish(tiny_model: Path):
    """Six requests of up to 256 tokens each against a context limit of 512: at most two
    sequences (one 256-token KV step each) are ever in flight, and every request completes."""
    with Engine(str(tiny_model), memory_budget="64MiB", max_context=512,
                max_batch=8) as eng:
        assert eng.max_context == 512
        eng.start()
        done = threading.Event()
        finished: dict[str, str] = {}
        most = [0]
        lock = threading.Lock()

        def on_chunk(c):
            with lock:
                most[0] = max(most[0], eng.kv_ledger.held())
                if c.finish_reason:
                    finished[c.id] = c.error or c.finish_reason
                    if len(finished) == 6:
                        done.set()

        for i in range(6):
            eng.submit(GenRequest(id=f"r{i}", prompt=f"Request {i}: the fox", max_tokens=120),
                       on_chunk)
        assert done.wait(240), finished
        assert set(finished.values()) <= {"length", "stop"}, finished
        assert 0 < most[0] <= eng.budget_plan.kv_bytes
        assert most[0] >= 2 * eng.kv_ledger.kv.bytes_at(KV_STEP)  # two did run side by side
        deadline = time.monotonic() + 5
        while eng.kv_ledger.held() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.kv_ledger.held() == 0


def test_a_waiting_request_can_be_cancelled(tiny_model: Path):
    with Engine(str(tiny_model), memory_budget="64MiB", max_context=256,
                max_batch=4) as eng:
        eng.start()
        finished: dict[str, str] = {}
        done = threading.Event()

        def on_chunk(c):
            if c.finish_reason:
                finished[c.id] = c.finish_reason
                if len(finished) == 2:
                    done.set()

        eng.submit(GenRequest(id="long", prompt="the fox", max_tokens=200), on_chunk)
        eng.submit(GenRequest(id="next", prompt="the dog", max_tokens=200), on_chunk)
        time.sleep(0.3)
        eng.cancel("next")
        assert done.wait(120), finished
        assert finished == {"long": "length", "next": "cancelled"}
