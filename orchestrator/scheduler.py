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

from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.lane import Lane
from flashmoe.orchestrator.sampling import StopText, sampler_for, token_logprobs
from flashmoe.protocol.request import Request


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


GenRequest = Request  # the engine's name for the one request type


@dataclass
class Chunk:
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last chunk
    stats: dict | None = None
    error: str | None = None
    logprobs: list[dict] | None = None  # one per token id, when the request asked for them
    stop_sequence: str | None = None  # the stop string that ended it, if one did


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
    stop: StopText = field(default_factory=lambda: StopText([]))
    reused: int = 0  # prompt tokens taken from the prefix cache
    kept: tuple | None = None  # (tokens, KV cache) for the prefix cache when it finishes


class Scheduler:
    """Runs the engine's request queue with up to ``max_batch`` sequences in flight."""

    def __init__(self, engine, max_batch: int = 8, lane_id: int = 0):
        self.engine = engine
        self.max_batch = max_batch
        self.lane_id = lane_id
        self.gen: BatchGenerator | None = None
        self.active: dict[int, _Active] = {}
        self._waiting = None  # a request whose KV cache does not fit until others finish
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
        while not stopping or self.active or self._waiting:
            stopping = self._admit(requests, cancelled) or stopping
            if not self.active:
                self._idle()
                if self._waiting:  # the other lanes hold the KV budget: wait for them
                    time.sleep(0.02)
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
                if r.finish_reason is not None and r.prompt_cache is not None:
                    a.kept = (r.all_tokens, r.prompt_cache)  # kept once the batch let it go
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
                self._emit(r.uid, a, r)

    def _emit(self, uid: int, a: _Active, r) -> None:
        """Hand one generated token on, cut at a stop string if it completes one."""
        a.ids.append(r.token)
        a.detok.add_token(r.token)
        text, hit = a.stop.feed(a.detok.last_segment)
        lps = [token_logprobs(r.logprobs, r.token, a.req.top_logprobs)] if a.req.logprobs \
            else None
        if hit:
            if r.finish_reason is None:
                for cache, tokens in self.gen.remove([uid], return_prompt_caches=True).values():
                    a.kept = (tokens, cache)
            self._finish(uid, "stop", text=text, token_ids=[r.token], logprobs=lps)
            return
        a.on_chunk(Chunk(a.req.id, text, [r.token], logprobs=lps))
        if r.finish_reason == "length":
            self._finish(uid, "length")

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
            if self._waiting is not None:
                item, self._waiting = self._waiting, None
            else:
                try:
                    item = requests.get(block=not self.active,
                                        timeout=0.5 if not self.active else 0)
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
                prompt = self.engine.prepare(req)  # tokenized once: by the front, if it checked
                if not self.engine.kv_ledger.reserve(self.lane_id,
                                                     self._lengths(len(prompt) + req.max_tokens)):
                    self._waiting = item
                    return False
                if self.gen is None:
                    self.gen = self._new_gen()
                cache, reused = self._fetch(prompt)
                (uid,) = self.gen.insert([prompt[reused:]], max_tokens=[req.max_tokens],
                                         samplers=[sampler_for(req)],
                                         caches=[cache] if cache else None,
                                         all_tokens=[prompt[:reused]] if cache else None)
            except Exception as e:  # one bad request must not end the engine thread
                self.engine.kv_ledger.release(self.lane_id, self._lengths())
                on_chunk(Chunk(req.id, "", [], finish_reason="error", error=str(e)))
                continue
            detok = self.engine.tokenizer.detokenizer  # a fresh copy each time
            self.active[uid] = _Active(req, on_chunk, len(prompt), detok, self.engine.snapshot(),
                                       stop=StopText(req.stop), reused=reused)
        return False

    def _lengths(self, *more: int) -> list[int]:
        """Tokens each active sequence (and ``more``) may reach: prompt plus max_tokens."""
        return [a.prompt_len + a.req.max_tokens for a in self.active.values()] + list(more)

    def _fetch(self, prompt: list[int]) -> tuple[list | None, int]:
        prefix = getattr(self.engine, "prefix_cache", None)
        return prefix.fetch(prompt) if prefix is not None else (None, 0)

    def _keep(self, tokens: list[int], cache: list) -> None:
        prefix = getattr(self.engine, "prefix_cache", None)
        if prefix is not None:
            prefix.insert(tokens, cache, room=self.engine.kv_ledger.room())

    def _cancel(self, cancelled: set) -> None:
        gone = [uid for uid, a in self.active.items() if a.req.id in cancelled]
        if gone:
            self.gen.remove(gone)
            for uid in gone:
                cancelled.discard(self.active[uid].req.id)
                self._finish(uid, "cancelled")

    def _finish(self, uid: int, reason: str, error: str | None = None, text: str | None = None,
                token_ids: tuple = (), logprobs: list[dict] | None = None) -> None:
        a = self.active.pop(uid)
        self.engine.kv_ledger.release(self.lane_id, self._lengths())
        if a.kept is not None and reason != "error":
            self._keep(*a.kept)
        if text is None:  # the detokenizer's tail, unless a stop string already ended the text
            a.detok.finalize()
            text, hit = a.stop.feed(a.detok.last_segment)
            reason = "stop" if hit and reason == "length" else reason
            text += "" if hit else a.stop.flush()
        stats = self.engine.request_stats(a.snap, a.prompt_len, len(a.ids), a.t0,
                                          a.t_first or time.perf_counter(), time.perf_counter())
        stats["prompt_tokens_reused"] = a.reused
        try:
            a.on_chunk(Chunk(a.req.id, text, list(token_ids), finish_reason=reason, stats=stats,
                             error=error, logprobs=logprobs, stop_sequence=a.stop.matched))
        except Exception as e:  # a broken callback must not take the engine down
            print(f"engine: callback for {a.req.id} failed: {e!r}", file=sys.stderr, flush=True)


class Lanes:
    """``n`` schedulers on their own threads, fed from one request queue: each request goes to
    the lane with the fewest requests assigned and not finished."""

    def __init__(self, engine, n: int, max_batch: int = 8):
        per_lane = max(1, -(-max_batch // n))
        self.lanes = [Scheduler(engine, max_batch=per_lane, lane_id=i) for i in range(n)]
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
