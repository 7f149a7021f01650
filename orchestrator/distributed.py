"""Pipeline stages across processes or machines: the model's layers split with mlx-lm's own
pipeline (``model.model.pipeline(group)``), each rank holding only its stage's dense weights and
streaming only its stage's experts (its own loaders, pool, cache and memory budget), activations
passed by mlx-lm's model code through ``mx.distributed``.

Started by ``mlx.launch`` (``flashmoe run --distributed``). Rank 0 owns the tokenizer, the
sampling and every stop decision; the other ranks follow it, step for step. Every message is a
collective on mlx-lm's generation stream, so each rank runs them in one order with the model's
own sends, receives and gathers:

- a request: ``[kind, prompt tokens, max_tokens]``, then the prompt's token ids (``bcast``);
- before every model call (a prefill chunk or a decode step): a control word, GO or STOP, and
  for a decode step the token rank 0 sampled, which the followers feed in place of their own
  (they never sample, so ranks on different machines cannot disagree). Rank 0 decides to stop
  (end of sequence, a stop string, a cancel) only after mlx-lm's ``generate_step`` has queued
  the next step, so the followers learn it at their next call;
- after a request: STOP, then every rank's counters (``all_gather``).

A lost peer surfaces as MLX's ``[ring] connection to a peer was lost``; a peer that stops
answering without closing its sockets is caught by a watchdog after ``distributed_timeout_s``
without a model call, which removes this rank's shared memory and loaders and exits.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import sys
import threading
import time

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.pipeline import PipelineMixin

from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.budget import kv_args
from flashmoe.orchestrator.scheduler import Chunk
from flashmoe.protocol.sockets import endpoint_path, runtime_dir
from flashmoe.shm.pool import _list_segments, _pid_alive, cleanup_stale

GO, STOP = 1, 2
REQUEST, SHUTDOWN = 1, 2
_HOST_BYTES = 64
_REAP_S = 2.0  # a killed process's sockets close a moment before it can be told dead
_UNWIND_S = 5.0  # after SIGTERM/SIGINT: time the main thread has to clean up and exit
# per-rank counters gathered after each request, in this order
_COUNTERS = ("rank", "start", "end", "budget_bytes", "expert_hits", "expert_misses", "bytes_read",
             "peak_rss_bytes", "pool_bytes", "dense_bytes")


def start_daemon(args, serve) -> int:
    """``flashmoe-daemon start --distributed`` under mlx.launch: rank 0 runs the daemon (in the
    foreground: ``serve``), the other ranks serve their stage until it stops."""
    from flashmoe.configs import load_settings
    from flashmoe.orchestrator.engine import Engine
    from flashmoe.orchestrator.lifecycle import engine_kwargs
    from flashmoe.signals import unwind_on_signals

    stage = join(args.split)
    stage.watch_signals = stage.rank != 0

    def factory(model: str, settings, **kw) -> Engine:
        engine = Engine(model, settings, stage=stage, **kw)
        try:
            stage.ready(engine)
        except BaseException:
            engine.close()
            raise
        return engine

    try:
        if stage.rank == 0:
            return serve(args, factory)
        settings = load_settings().with_overrides(memory_budget=args.memory_budget,
                                                  workers=args.workers)
        with unwind_on_signals(), factory(os.path.abspath(args.model), settings,
                                          **engine_kwargs(args)) as engine:
            stage.follow(engine)
        return 0
    except BaseException as e:
        stage.broken = True
        if not lost_peer(e):
            raise
        print(lost_peer_line(stage, e), file=sys.stderr)
        return 2
    finally:
        stage.leave()


class Stopped(Exception):
    """Rank 0 ended the request: a follower leaves mlx-lm's generation loop."""


def lost_peer(e: BaseException | None) -> bool:
    """Whether ``e`` is MLX's distributed backend reporting a lost or failed peer."""
    return isinstance(e, RuntimeError) and str(e).startswith(("[ring]", "[mpi]", "[jaccl]"))


def lost_peer_line(stage: Stage, e: BaseException) -> str:
    """The one line a rank prints when the pipeline lost a peer (``lost_peer(e)``)."""
    return f"error: {lost_peer_message(stage, e)}"


def lost_peer_message(stage: Stage, e: BaseException) -> str:
    return f"rank {stage.rank} ({stage.host}): lost the connection to another rank of the " \
        f"pipeline ({e})"


def join(split: list[int] | None = None) -> Stage:
    """This process's stage of the group ``mlx.launch`` started; refuses a lone process."""
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError:
        group = None
    if group is None or group.size() < 2:
        raise FlashMoeError("--distributed needs a group of 2 or more processes: start them with "
                            "mlx.launch (e.g. mlx.launch -n 2 --backend ring -- flashmoe run "
                            "--distributed ...)")
    if split is not None and len(split) != group.size():
        raise FlashMoeError(f"--split has {len(split)} entries for {group.size()} ranks")
    stage = Stage(group, split)
    stage.watch()
    return stage


class Stage:
    """One rank's part of the pipeline: its layers, and the messages it exchanges."""

    def __init__(self, group: mx.distributed.Group, split: list[int] | None = None):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.split = split
        self.host = socket.gethostname()
        self.start = self.end = 0
        self.timeout_s = 0.0
        self._mark: float | None = None  # when the request in flight last made a model call
        self.broken = False  # a peer was lost, or this rank was told to stop: send nothing more
        self.ranks: list[dict] | None = None  # every rank's counters, as last gathered
        self.watch_signals = True  # False where the main thread handles signals (daemon rank 0)
        self._engine = None

    # -- layers -----------------------------------------------------------------------------
    def narrow(self, store) -> None:
        """Take this rank's layers as mlx-lm's pipeline splits them, and keep only their expert
        banks in ``store``'s view."""

        class Layers:
            layers = list(range(store.num_layers))

        stand_in = Layers()
        try:
            PipelineMixin.pipeline(stand_in, self.group, split=self.split)
        except ValueError as e:
            raise FlashMoeError(f"--split: {e}") from None
        self.start, self.end = stand_in.start_idx, stand_in.end_idx
        store.moe_layers = [x for x in store.moe_layers if self.start <= x < self.end]
        if not store.moe_layers:
            raise FlashMoeError(f"rank {self.rank}: layers {self.start}..{self.end - 1} hold no "
                                f"expert banks; choose another --split")

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def apply(self, model, model_type: str) -> None:
        """Split ``model`` (lazy, nothing read yet) with mlx-lm's pipeline."""
        inner = getattr(model, "model", None)
        if not isinstance(inner, PipelineMixin):
            raise FlashMoeError(f"{model_type}: mlx-lm has no pipeline support for this "
                                f"architecture, so it cannot be split across ranks")
        inner.pipeline(self.group, split=self.split)
        if (inner.start_idx, inner.end_idx) != (self.start, self.end):
            raise FlashMoeError(f"rank {self.rank}: mlx-lm split layers "
                                f"{inner.start_idx}..{inner.end_idx}, expected "
                                f"{self.start}..{self.end}")

    # -- messages ---------------------------------------------------------------------------
    def bcast(self, values, dtype=mx.int32) -> mx.array:
        """Rank 0's ``values`` on every rank (the others pass zeros of the same shape); lazy."""
        x = values if isinstance(values, mx.array) else mx.array(values, dtype=dtype)
        if self.rank != 0:
            x = mx.zeros_like(x)
        return mx.distributed.all_sum(x, group=self.group, stream=generation_stream)

    def _control(self, word: int, token: mx.array | None = None) -> tuple[int, int]:
        """Rank 0's control word and the token it sampled last (-1: none; lazy on rank 0)."""
        x = mx.array([word, -1], dtype=mx.int32)
        if token is not None and self.rank == 0:
            x = mx.concatenate([x[:1], token.astype(mx.int32).reshape(1)])
        word, tok = self.bcast(x).tolist()
        return word, tok

    def _counters(self, engine) -> list[dict]:
        st = engine.cache.stats
        from flashmoe.orchestrator.engine import _peak_rss

        mine = [self.rank, self.start, self.end, engine.budget, st.hits, st.misses, st.bytes_read,
                _peak_rss(), engine.plan.nbytes, engine.dense_bytes]
        host = list(self.host.encode()[:_HOST_BYTES].ljust(_HOST_BYTES, b"\0"))
        x = mx.array(mine + host, dtype=mx.int64)
        rows = np.array(mx.distributed.all_gather(x[None], group=self.group,
                                                  stream=generation_stream))
        out = []
        for row in rows.reshape(-1, rows.shape[-1]):
            d = dict(zip(_COUNTERS, (int(v) for v in row[:len(_COUNTERS)]), strict=True))
            d["host"] = bytes(int(b) for b in row[len(_COUNTERS):]).rstrip(b"\0").decode(
                errors="replace")
            d["layers"] = [d.pop("start"), d.pop("end")]
            out.append(d)
        self.ranks = out
        return out

    def ready(self, engine) -> None:
        """Every rank has built its engine: gather their counters once (status shows them)."""
        self._counters(engine)

    # -- rank 0 -----------------------------------------------------------------------------
    def lead(self, engine, prompt: list[int], max_tokens: int, sampler) -> Lead:
        """Tell the followers about a request; the model and sampler rank 0 generates with."""
        self._arm(engine)
        mx.eval(self.bcast([REQUEST, len(prompt), max_tokens]))
        mx.eval(self.bcast(prompt))
        return Lead(self, engine, sampler)

    def shutdown(self) -> None:
        """Rank 0: let the followers go (they close their engines and exit)."""
        if self.rank == 0 and not self.broken:
            try:
                mx.eval(self.bcast([SHUTDOWN, 0, 0]))
            except RuntimeError:  # a rank is gone already; the rest end on the lost connection
                pass

    def serve_queue(self, engine, requests: queue.Queue, cancelled: set) -> None:
        """The daemon's engine thread on rank 0: one request at a time through the pipeline
        (batching would need every rank to follow mlx-lm's batch generator)."""
        while (item := requests.get()) is not None:
            req, on_chunk = item
            if req.id in cancelled or self.broken:
                why = f"rank {self.rank} ({self.host}): the pipeline lost a rank"
                on_chunk(Chunk(req.id, "", [], finish_reason="cancelled" if not self.broken
                               else "error", error=why if self.broken else None))
                continue
            try:
                for chunk in engine.generate(req):
                    on_chunk(chunk)
            except Exception as e:  # the request fails; the daemon goes on unless a rank is lost
                lost = lost_peer(e)
                msg = lost_peer_message(self, e) if lost else f"{type(e).__name__}: {e}"
                on_chunk(Chunk(req.id, "", [], finish_reason="error", error=msg))
                if lost:
                    self.broken = True
                    os.kill(os.getpid(), signal.SIGTERM)  # the daemon stops, and says why
                    print(lost_peer_line(self, e), file=sys.stderr, flush=True)

    # -- ranks > 0 ---------------------------------------------------------------------------
    def follow(self, engine) -> None:
        """Serve this stage of rank 0's requests until it shuts down."""
        self._arm(engine)
        gen_kwargs = kv_args(engine.settings.kv_bits, engine.config)
        while True:
            kind, n, max_tokens = self.bcast([0, 0, 0]).tolist()
            if kind == SHUTDOWN:
                return
            if kind != REQUEST or n < 1:
                raise FlashMoeError(f"rank {self.rank}: unexpected message {kind} from rank 0")
            prompt = self.bcast(np.zeros(n, dtype=np.int32))
            mx.eval(prompt)
            follower = _Follower(self, engine.model)
            self._mark = time.monotonic()
            try:
                for _ in generate_step(prompt, follower, max_tokens=max_tokens,
                                       sampler=_placeholder, **gen_kwargs):
                    pass
            except Stopped:
                pass
            finally:
                engine.cache.lane.idle()
            if not follower.stopped and self._control(0)[0] != STOP:
                raise FlashMoeError(f"rank {self.rank}: rank 0 went on past max_tokens")
            self._mark = None
            self._counters(engine)

    def leave(self) -> None:
        """On the way out: after a failure, what a rank killed on this host left behind (its
        pool and socket; it is reaped a moment after its sockets close), signals ignored."""
        if self.broken:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
            if self._engine is not None:  # a signal may have cut its close short
                release(self._engine)
            deadline = time.monotonic() + _REAP_S
            while cleanup_dead() and time.monotonic() < deadline:
                time.sleep(0.1)

    # -- watchdog ---------------------------------------------------------------------------
    def step(self) -> None:
        self._mark = time.monotonic()

    def _arm(self, engine) -> None:
        self._engine = engine
        self.timeout_s = float(engine.settings.distributed_timeout_s)

    def watch(self) -> None:
        """Start the watchdog (main thread, once). MLX can block in a collective forever once a
        peer is gone (its ring backend fails the pending tasks, not always the one waited on),
        and a thread blocked in MLX runs no Python signal handler; so this thread ends the
        process when a request makes no model step for ``distributed_timeout_s``, or when
        SIGTERM or SIGINT (mlx.launch ends the other ranks so when one fails) has not ended it
        within ``_UNWIND_S``."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        threading.Thread(target=self._watchdog, args=(r,), name="flashmoe-watchdog",
                         daemon=True).start()

    def _watchdog(self, wake: int) -> None:
        while True:
            ready, _, _ = select.select([wake], [], [], 0.5)
            if ready and not self.watch_signals:
                os.read(wake, 1)
            elif ready:
                signum = os.read(wake, 1)[0]
                time.sleep(1.0)
                if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # unwinding: let it
                    time.sleep(_UNWIND_S)
                self._abandon(f"signal {signum} did not stop this rank: it was blocked waiting "
                              f"for another rank", 128 + signum)
            mark = self._mark
            if mark is not None and self.timeout_s > 0 \
                    and time.monotonic() - mark > self.timeout_s:
                self._abandon(f"the pipeline made no step in {self.timeout_s:g} s: another "
                              f"rank is stuck or unreachable (setting distributed_timeout_s)", 2)

    def _abandon(self, why: str, code: int) -> None:
        """Leave no loader, shared memory or socket behind, and exit now: the main thread is
        blocked in MLX, so nothing can be closed in order."""
        print(f"error: rank {self.rank} ({self.host}): {why}", file=sys.stderr, flush=True)
        if self._engine is not None:
            release(self._engine)
        cleanup_dead()
        os._exit(code)


def release(engine) -> None:
    """Kill ``engine``'s loaders and remove its pool and socket, whatever state it is in."""
    for w in engine.loader.workers_info():
        try:
            os.kill(w["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    engine.pool.unlink()
    path = endpoint_path(engine.loader.endpoint)
    if path is not None:
        path.unlink(missing_ok=True)


def cleanup_dead() -> bool:
    """Remove what flashmoe processes on this host that died without cleaning up (a rank killed
    with SIGKILL) left: their shared-memory pools and loader sockets; whether pools of other
    live processes remain (a peer still closing, or one not yet reaped)."""
    cleanup_stale()
    for path in runtime_dir().glob("loaders-*-*.sock"):
        try:
            pid = int(path.name.split("-")[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            path.unlink(missing_ok=True)
    return any(f"-{os.getpid()}-" not in name for name in _list_segments())


class _Model:
    """mlx-lm's model behind a control word per call; everything else is the model's own."""

    def __init__(self, stage: Stage, model):
        self._stage = stage
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)


def _placeholder(logprobs: mx.array) -> mx.array:
    """A follower's "sample": it never samples, rank 0's token comes with the next control."""
    return mx.zeros(logprobs.shape[:-1], dtype=mx.uint32)


class _Follower(_Model):
    stopped = False

    def __call__(self, inputs, *args, **kwargs):
        self._stage.step()
        word, token = self._stage._control(0)
        if word == STOP:
            self.stopped = True
            raise Stopped
        if token >= 0:  # a decode step: rank 0's token in place of the placeholder
            inputs = mx.array([[token]], dtype=mx.uint32)
        return self._model(inputs, *args, **kwargs)


class Lead(_Model):
    """Rank 0's side of one request: ``model`` and ``sampler`` for ``generate_step``, and
    ``end()`` once the caller stops consuming it."""

    def __init__(self, stage: Stage, engine, sampler):
        super().__init__(stage, engine.model)
        self._engine = engine
        self._sample = sampler
        self._last: mx.array | None = None  # the token sampled since the last model call
        self.ranks: list[dict] | None = None

    def sampler(self, logprobs: mx.array) -> mx.array:
        self._last = self._sample(logprobs)
        return self._last

    @property
    def model(self) -> Lead:
        return self

    def __call__(self, *args, **kwargs):
        self._stage.step()
        self._stage._control(GO, self._last)  # a decode step's input is the token sent here
        self._last = None
        return self._model(*args, **kwargs)

    def end(self, error: BaseException | None) -> None:
        """STOP, then every rank's counters (kept in ``ranks``); nothing after a lost peer or
        a signal (a collective may then never return), and a lost peer is not raised again
        after another error: that error is the one to report."""
        stage = self._stage
        stage.broken |= lost_peer(error) or (error is not None and not isinstance(error,
                                                                                  Exception))
        try:
            if not stage.broken:
                stage._control(STOP)
                self.ranks = stage._counters(self._engine)
        except RuntimeError as e:
            stage.broken = stage.broken or lost_peer(e)
            if error is None or not lost_peer(e):
                raise
        finally:
            stage._mark = None
