"""The GPU's code path, run on the CPU with delays: tokens stay mlx-lm's.

On a GPU a bank hands on its lazy output before its loads land (deferral), its kernels are
queued without waiting (``EAGER``), landed records are copied into the cache asynchronously and
prefetch guesses the next layer's experts. A slot overwritten while a queued or lazy kernel may
still read it gives wrong tokens only now and then there. Here every one of those mechanisms is
on, the copier is a fake device copier that poisons a slot the moment its copy is queued and
writes the record only later, from another thread, and the loader hands back its completions
late and out of order: a slot written too early reads as NaN, so a broken rule shows as a
different token every time rather than once in a while.
"""

from __future__ import annotations

import queue
import random
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
import support

from flashmoe.errors import BudgetError
from flashmoe.orchestrator import engine, streamed
from flashmoe.orchestrator.budget import budget_for_pool
from flashmoe.orchestrator.cache import PoolPlan, cache_record_bytes
from flashmoe.orchestrator.engine import Engine, GenRequest
from flashmoe.store import RECORD_ALIGN, open_store
from flashmoe.synth import synth

PROMPT = "The expert pool holds"
N_TOKENS = 16
# The case that diverged on an H100 (qwen3_moe, HF layout), and the shapes whose small budgets
# ran out of slots there (mixtral's 8 experts top-2, qwen3_5_moe).
# Then qwen3_5_moe in mlx-lm's 4-bit layout: the case that still varied on an H100 (the poisoned
# records there are uint32 weights of all-ones nibbles and NaN scales).
CASES = {
    "qwen3_moe": dict(layers=4, hidden=256, experts=40, topk=4),
    "mixtral": dict(experts=8, topk=2),
    "qwen3_5_moe": {},
    "deepseek_v3": {},
    "qwen3_5_moe-mlx": dict(layout="mlx", bits=4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-path")
    out = {}
    for name, dims in CASES.items():
        dims = {"layout": "hf", **dims}
        out[name] = synth(root / name, name.split("-")[0], seed=2, **dims)
    return out


def mlx_lm_ids(path) -> list[int]:
    return support.mlx_lm_ids(path, PROMPT, N_TOKENS, mx.float32)


def quarter_budget(path) -> int:
    store = open_store(path)  # a float32 cache of a quarter of the experts
    rec = cache_record_bytes(store.layout, mx.float32)
    return budget_for_pool(store, rec * len(store.moe_layers) * store.num_experts // 4,
                           mx.float32)


@pytest.fixture
def gpu_path(monkeypatch):
    """What a GPU runs by default (deferred banks, prefetch, one lane), with every bank's
    kernels left lazy until the next host sync: a queued kernel runs as late as it may."""
    real = streamed.install_streamed_banks

    def install(*args, **kw):
        banks = real(*args, **kw)
        streamed.use_path(banks, "deferred")
        return banks

    monkeypatch.setattr(engine, "install_streamed_banks", install)
    monkeypatch.setattr(streamed.mx, "async_eval", lambda *a: None)  # kernels run late
    monkeypatch.setenv("FLASHMOE_PREFETCH", "on")
    monkeypatch.setenv("FLASHMOE_LANES", "1")


class PoisoningCopier:
    """A device copier for the CPU: ``fill`` poisons the slot at once (a copy under way leaves
    it garbage) and a thread writes the record after a random delay; ``sync`` waits for them."""

    def __init__(self, cache, seed: int):
        self.cache = cache
        self.rng = random.Random(seed)
        self.fills = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def fill(self, slot: int, stage: int) -> None:
        for view in self.cache._host.values():
            dst = view[slot]
            if dst.dtype.kind == "f":
                dst[...] = np.nan
            else:
                dst.view(np.uint8)[...] = 0xFF  # a NaN in bf16 (uint16 view) and in scales
        self.fills += 1
        self._queue.put((slot, stage, self.rng.uniform(0, 0.003)))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            slot, stage, delay = item
            try:
                time.sleep(delay)
                self.cache.fill(slot, stage)
            finally:
                self._queue.task_done()

    def sync(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


class LateLoader:
    """A loader whose completions come back late (a random 0-2 ms more per poll) and out of
    order, a random few at a time."""

    def __init__(self, inner, seed: int):
        self.inner = inner
        self.rng = random.Random(seed)
        self.held: list = []

    def poll(self, timeout_s: float = 0.0, spin_s: float = 0.0):
        self.held += self.inner.poll(0.0 if self.held else timeout_s)
        time.sleep(self.rng.uniform(0, 0.002))
        if not self.held:
            return []
        self.rng.shuffle(self.held)
        n = self.rng.randint(1, len(self.held))
        out, self.held = self.held[:n], self.held[n:]
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def tight_plan(path, extra_records: int, staging: int, monkeypatch) -> int:
    """Plan ``top_k + extra_records`` cache slots and ``staging`` staging slots; the budget."""
    store = open_store(path)
    rec = cache_record_bytes(store.layout, mx.float32)
    stage = -(-store.layout.nbytes // RECORD_ALIGN) * RECORD_ALIGN
    plan = PoolPlan(store.top_k + extra_records, staging, rec, stage)
    monkeypatch.setattr(engine, "plan_for", lambda *a, **k: plan)
    return budget_for_pool(store, plan.nbytes, mx.float32)


def run_slowed(path, budget: int, seed: int) -> tuple[list[int], Engine]:
    with Engine(str(path), memory_budget=budget, workers=2, dtype="float32") as eng:
        eng.cache.copier = copier = PoisoningCopier(eng.cache, seed)
        eng.cache.loader = LateLoader(eng.loader, seed)
        try:
            ids = [t for c in eng.generate(GenRequest(id="s", prompt=PROMPT,
                                                      max_tokens=N_TOKENS))
                   for t in c.token_ids]
        finally:
            eng.cache.copier = None
            copier.close()
        assert copier.fills > 0
        assert eng.cache.table.stats()["pinned"] == 0
        return ids, eng


@pytest.mark.parametrize("arch", list(CASES))
def test_gpu_path_with_late_loads_and_copies_keeps_tokens(checkpoints, arch, gpu_path):
    path = checkpoints[arch]
    want = mlx_lm_ids(path)
    got, eng = run_slowed(path, quarter_budget(path), seed=len(arch))
    st = eng.cache.stats
    assert st.overlapped > 0  # banks did hand on their output before their loads landed
    if arch == "qwen3_moe":
        assert st.prefetched > 0  # and guesses went out
    assert got == want


@pytest.mark.parametrize("arch,extra,staging", [
    *(("mixtral", e, s) for e, s in ((0, 1), (1, 2), (2, 2), (4, 3))),
    ("qwen3_5_moe", 0, 1), ("qwen3_5_moe", 2, 2),  # the slower model: both ends of the range
])
def test_small_budgets_run_with_prefetch_on(checkpoints, arch, extra, staging, gpu_path,
                                            monkeypatch):
    """A budget that runs with prefetch off runs with it on: guesses give their slots up to
    the loads the computation asks for, down to one layer's experts and no more."""
    path = checkpoints[arch]
    got, eng = run_slowed(path, tight_plan(path, extra, staging, monkeypatch), seed=extra)
    assert eng.plan.cache_slots == open_store(path).top_k + extra
    assert got == mlx_lm_ids(path)


def test_a_banks_slots_stay_pinned_until_the_next_routing_sync(checkpoints, gpu_path):
    """A bank's output may still be lazy (or queued) when the call returns: none of its slots
    can be evicted before this lane's next routing sync, deferred or not."""
    path = checkpoints["mixtral"]
    with Engine(str(path), memory_budget=quarter_budget(path), workers=1,
                dtype="float32") as eng:
        cache, table = eng.cache, eng.cache.table
        hidden = eng.model.args.hidden_size
        for bank in (eng.banks[0], eng.banks[-1]):  # deferring, and the last (never defers)
            x = mx.random.normal((1, 1, hidden), key=mx.random.key(bank.layer))
            out = bank(x, mx.array([[[0, 1]]], dtype=mx.uint32))
            cache.lane.settle()  # what the next bank does first
            used = {table.lookup((bank.layer, e)) for e in (0, 1)}
            grabbed = []
            with pytest.raises(BudgetError):
                while True:
                    grabbed.append(table.acquire(("other", bank.layer, len(grabbed)))[0])
            assert not used & set(grabbed)
            mx.eval(out)
            assert mx.all(mx.isfinite(out)).item()
            for s in grabbed:
                table.failed(s, table.generation(s), cancelled=True)
                table.release(s)
            cache.lane.route(mx.array(0))  # the next routing sync
            assert all(table.pins(s) == 0 for s in used)
