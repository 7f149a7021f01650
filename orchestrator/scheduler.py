"""Continuous batching on compute lanes: the requests of a lane decode in one model call.

The requests of a lane step together through mlx-lm's ``BatchGenerator``, so each MoE layer
routes the lane's whole batch at once and loads the union of its experts once. Each request
keeps its own sampler, token budget and detokenizer. A request that fails in a step (a corrupt
expert, say) fails its lane's batch: the batch state is then unknown, so every active request of
that lane gets the error and a fresh generator takes the next ones.

``Lanes`` runs several such schedulers, each on its own thread and so on its own MLX stream,
over one shared expert cache: while one lane waits for its experts or its routing sync, another
computes. On the CPU backend a lane computes on one core (a batch of N rows costs N single rows
there), so lanes are what turns concurrent requests into more tokens per second. (On a GPU a
second lane measured no gain: one lane there by default.) Experts loaded by one lane are hits
for the others.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.lane import Lane


def is_finite(logprobs: mx.array, token: int) -> bool:
    """Whether the sampled token's log-probability is a number. ``logprobs`` has been evaluated
    with the token: read it in place (an MLX op would queue behind the next step's work)."""
    if logprobs.dtype in (mx.float32, mx.float16):
        return bool(np.isfinite(np.array(logprobs, copy=False).reshape(-1)[token]))
    return bool(mx.isfinite(logprobs.reshape(-1)[token]).item())  # bf16: numpy has no view


def check_finite(logprobs: mx.array, token: int, step: int) -> None:
    """Refuse to go on from a NaN/inf log-probability: greedy sampling would silently turn it
    into token 0 (a broken kernel, an overflowing dtype or corrupt weights, never a model's
    answer)."""
    if not is_finite(logprobs, token):
        raise FlashMoeError(f"non-finite logits at generated token {step}: the computation "
                            "broke down (dtype or backend problem); no token was produced")


@dataclass
class GenRequest:
    id: str
    prompt: str | list[int] | None = None  # a string, or token ids as they are
    messages: list[dict] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


@dataclass
class Chunk:
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last chunk
    stats: dict | None = None
    error: str | None = None


@dataclass
class _Active:
    req: object
    on_chunk: Callable
    prompt_len: int
    detok: object
    snap: tuple
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    ids: list[int] = field(default_factory=list)


def sampler_for(req):
    # Below 1e-6, 1/T overflows; greedy is the limit of a vanishing temperature.
    temp = req.temperature if req.temperature >= 1e-6 else 0.0
    return make_sampler(temp, top_p=req.top_p if req.top_p < 1 else 0.0,
                        min_p=req.min_p, top_k=req.top_k)


class Scheduler:
    """Runs the engine's request queue with up to ``max_batch`` sequences in flight."""

    def __init__(self, engine, max_batch: int = 8):
        self.engine = engine
        self.max_batch = max_batch
        self.gen: BatchGenerator | None = None
        self.active: dict[int, _Active] = {}
        self._tend_error: str | None = None

    def _new_gen(self) -> BatchGenerator:
        eos = [[t] for t in self.engine.tokenizer.eos_token_ids]
        return BatchGenerator(self.engine.model, stop_tokens=eos,
                              completion_batch_size=self.max_batch,
                              prefill_batch_size=self.max_batch)

    def run(self, requests: queue.Queue, cancelled: set) -> None:
        with Lane(self.engine.cache) as self.lane:
            self._run(requests, cancelled)

    def _run(self, requests: queue.Queue, cancelled: set) -> None:
        stopping = False
        while not stopping or self.active:
            stopping = self._admit(requests, cancelled) or stopping
            if not self.active:
                self._idle()
                continue
            self._cancel(cancelled)
            if not self.active:
                continue
            try:
                _, responses = self.gen.next()
            except Exception as e:  # the thread must survive; the batch state is unknown now
                msg = str(e) if isinstance(e, (FlashMoeError, ValueError)) else \
                    f"internal error: {type(e).__name__}: {e}"
                print(f"engine: batch step failed: {e!r}", file=sys.stderr, flush=True)
                for uid in list(self.active):
                    self._finish(uid, "error", error=msg)
                self.gen = None
                continue
            now = time.perf_counter()
            for r in responses:
                a = self.active.get(r.uid)
                if a is None:
                    continue
                a.t_first = a.t_first or now
                try:
                    check_finite(r.logprobs, r.token, len(a.ids))
                except FlashMoeError as e:
                    if r.finish_reason is None:
                        self.gen.remove([r.uid])
                    self._finish(r.uid, "error", error=str(e))
                    continue
                if r.finish_reason == "stop":
                    self._finish(r.uid, "stop")
                    continue
                a.ids.append(r.token)
                a.detok.add_token(r.token)
                a.on_chunk(Chunk(a.req.id, a.detok.last_segment, [r.token]))
                if r.finish_reason == "length":
                    self._finish(r.uid, "length")

    def _idle(self) -> None:
        """Nothing active: once this lane's queued work has run, its deferred pins go; the
        loader workers are supervised (about twice a second while idle)."""
        self.lane.idle()
        try:
            self.engine.cache.tend()
            self._tend_error = None
        except Exception as e:  # a worker that cannot be replaced: the next load reports it
            if repr(e) != self._tend_error:  # once per distinct failure, not twice a second
                print(f"engine: loader supervision failed: {e!r}", file=sys.stderr, flush=True)
            self._tend_error = repr(e)

    def _admit(self, requests: queue.Queue, cancelled: set) -> bool:
        """Insert queued requests; blocks only while nothing is active. True on shutdown."""
        while len(self.active) < self.max_batch:
            try:
                item = requests.get(block=not self.active, timeout=0.5 if not self.active else 0)
            except queue.Empty:
                return False
            if item is None:
                return True
            req, on_chunk = item
            if req.id in cancelled:
                cancelled.discard(req.id)
                on_chunk(Chunk(req.id, "", [], finish_reason="cancelled"))
                continue
            try:
                self.engine.validate(req)
                prompt = self.engine.encode(req)
                if req.seed is not None:
                    mx.random.seed(req.seed)  # exact only for a request that runs alone
                if self.gen is None:
                    self.gen = self._new_gen()
                (uid,) = self.gen.insert([prompt], max_tokens=[req.max_tokens],
                                         samplers=[sampler_for(req)])
            except Exception as e:  # one bad request must not end the engine thread
                on_chunk(Chunk(req.id, "", [], finish_reason="error", error=str(e)))
                continue
            detok = self.engine.tokenizer.detokenizer  # a fresh copy each time
            self.active[uid] = _Active(req, on_chunk, len(prompt), detok, self.engine.snapshot())
        return False

    def _cancel(self, cancelled: set) -> None:
        gone = [uid for uid, a in self.active.items() if a.req.id in cancelled]
        if gone:
            self.gen.remove(gone)
            for uid in gone:
                cancelled.discard(self.active[uid].req.id)
                self._finish(uid, "cancelled")

    def _finish(self, uid: int, reason: str, error: str | None = None) -> None:
        a = self.active.pop(uid)
        a.detok.finalize()
        stats = self.engine.request_stats(a.snap, a.prompt_len, len(a.ids), a.t0,
                                          a.t_first or time.perf_counter(), time.perf_counter())
        try:
            a.on_chunk(Chunk(a.req.id, a.detok.last_segment, [],
                                         finish_reason=reason, stats=stats, error=error))
        except Exception as e:  # a broken callback must not take the engine down
            print(f"engine: callback for {a.req.id} failed: {e!r}", file=sys.stderr, flush=True)


class Lanes:
    """``n`` schedulers on their own threads, fed from one request queue: each request goes to
    the lane with the fewest requests assigned and not finished."""

    def __init__(self, engine, n: int, max_batch: int = 8):
        per_lane = max(1, -(-max_batch // n))
        self.lanes = [Scheduler(engine, max_batch=per_lane) for _ in range(n)]
        self.queues: list[queue.Queue] = [queue.Queue() for _ in range(n)]
        self.assigned = [0] * n
        self._lock = threading.Lock()

    def run(self, requests: queue.Queue, cancelled: set) -> None:
        threads = [threading.Thread(target=lane.run, args=(q, cancelled), daemon=True,
                                    name=f"flashmoe-lane-{i}")
                   for i, (lane, q) in enumerate(zip(self.lanes, self.queues, strict=True))]
        for t in threads:
            t.start()
        try:
            while True:
                item = requests.get()
                if item is None:
                    break
                req, on_chunk = item
                with self._lock:
                    i = min(range(len(self.lanes)), key=self.assigned.__getitem__)
                    self.assigned[i] += 1
                self.queues[i].put((req, self._counted(i, on_chunk)))
        finally:
            for q in self.queues:
                q.put(None)
            for t in threads:
                t.join()

    def _counted(self, i: int, on_chunk: Callable) -> Callable:
        def wrapped(chunk: Chunk) -> None:
            if chunk.finish_reason is not None:
                with self._lock:
                    self.assigned[i] -= 1
            on_chunk(chunk)

        return wrapped
