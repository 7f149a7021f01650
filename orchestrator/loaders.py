"""Loader workers as seen from the coordinator: spawn, dispatch, collect, supervise.

``LoaderPool`` binds a ROUTER on a fresh ipc endpoint, starts ``workers`` loader subprocesses
(``python -m flashmoe.workers.loader``) and waits for each one's ``Hello``. ``submit`` sends a
``LoadRequest`` to the least-loaded worker; ``poll`` returns ``Completion``s.

Supervision: a worker that dies, or holds a request longer than ``load_timeout_s``, is killed,
reaped and replaced, and every request it held is re-sent with a new dispatch generation, so a
late reply from the old process is recognised as stale and dropped. A request whose worker died
``MAX_ATTEMPTS`` times completes with ``ok=False`` rather than killing workers forever.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from flashmoe import __version__
from flashmoe.errors import LoadError
from flashmoe.protocol.messages import (
    COORDINATOR_ACCEPTS,
    Hello,
    LoadDone,
    LoadFailed,
    LoadRequest,
    ProtocolError,
    Shutdown,
    decode,
    encode,
)
from flashmoe.protocol.sockets import endpoint_path, fresh_endpoint, router
from flashmoe.shm.pool import ExpertPool

MAX_ATTEMPTS = 3
SUPERVISE_EVERY_S = 0.1
REAP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Completion:
    req: int
    slot: int
    ok: bool
    nbytes: int = 0
    us: int = 0
    error: str | None = None


@dataclass
class _Request:
    req: int
    slot: int
    extents: list[list]
    checksum: int | None
    direct: bool
    urgent: bool = True
    nbytes: int = 0  # the record's end in the slot, as a worker reports it
    generation: int = 0
    worker: int | None = None  # index into LoaderPool._workers
    sent_at: float = 0.0
    attempts: int = 0


@dataclass
class _Worker:
    index: int
    wid: int  # unique per process, the DEALER identity
    proc: subprocess.Popen
    started_at: float
    ready: bool = False
    held: set[int] = field(default_factory=set)

    @property
    def identity(self) -> bytes:
        return str(self.wid).encode()


def extent_list(extents: Any) -> list[list]:
    """Extents (``store.Extent``s or lists) as the ``[path, offset, length, dest]`` lists that
    loaders read."""
    out = []
    for e in extents:
        if isinstance(e, (list, tuple)):
            path, off, length, dest = e
        else:  # flashmoe.store.Extent
            path, off, length, dest = e.path, e.offset, e.length, e.dest
        out.append([os.fspath(path), int(off), int(length), int(dest)])
    return out


class LoaderPool:
    """``workers`` loader processes with ``threads`` I/O threads each, filling ``pool``'s slots."""

    def __init__(
        self,
        pool: ExpertPool,
        workers: int = 2,
        threads: int = 8,
        io_mode: str = "auto",
        start_timeout_s: float = 30.0,
        load_timeout_s: float = 30.0,
        chunk_bytes: int | None = None,
        guess_threads: int | None = None,
    ):
        if io_mode not in ("auto", "direct", "buffered"):
            raise ValueError(f"io_mode must be auto, direct or buffered, got {io_mode!r}")
        if workers < 1 or threads < 1:
            raise ValueError(f"need at least one worker and one thread, got {workers}, {threads}")
        self.pool = pool
        self.threads = threads
        # "auto" and "direct" both ask for O_DIRECT; the worker reads unaligned extents buffered.
        self.direct = io_mode != "buffered"
        self.start_timeout_s = start_timeout_s
        self.load_timeout_s = load_timeout_s
        self.chunk_bytes = chunk_bytes
        self.guess_threads = guess_threads
        self.restarts = 0
        self.last_restart_s: float | None = None  # death noticed -> replacement said Hello
        self.endpoint = fresh_endpoint("loaders")
        self._sock = router(self.endpoint)
        self._wids = itertools.count()
        self._reqs = itertools.count(1)
        self._gens = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._backlog: deque[int] = deque()  # requests waiting for a ready worker
        self._done: list[Completion] = []
        self._by_identity: dict[bytes, _Worker] = {}
        self._replacing: dict[int, float] = {}  # worker index -> when its death was noticed
        self._last_supervise = time.monotonic()
        self._workers: list[_Worker] = []
        try:
            for i in range(workers):
                self._workers.append(self._spawn(i))
            self._wait_ready(self._workers)
        except BaseException:
            self.close()
            raise

    # -- public API ----------------------------------------------------------------------------

    def submit(
        self, slot: int, extents: Any, checksum: int | None = None, direct: bool | None = None,
        urgent: bool = True,
    ) -> int:
        """Queue a load of ``extents`` into ``slot``; returns the request id.

        ``extents``: ``store.Extent``s or ``[path, offset, length, dest]`` lists. ``direct``
        overrides the pool's io_mode for this request (None: keep it). ``urgent=False``: a
        guess, read with the I/O threads that urgent loads leave free.
        """
        rid = next(self._reqs)
        d = self.direct if direct is None else bool(direct)
        ext = extent_list(extents)
        self._requests[rid] = _Request(rid, slot, ext, checksum, d, bool(urgent),
                                       max((e[3] + e[2] for e in ext), default=0))
        self._dispatch(rid)
        return rid

    def poll(self, timeout_s: float = 0.0) -> list[Completion]:
        """Completions so far, waiting up to ``timeout_s`` for the first one."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._drain()
            now = time.monotonic()
            if now - self._last_supervise >= SUPERVISE_EVERY_S:
                self._supervise()
            if self._done or now >= deadline:
                break
            wait = max(1, int(min(deadline - now, SUPERVISE_EVERY_S) * 1000))
            if not self._sock.poll(wait, zmq.POLLIN):
                self._supervise()
        out, self._done = self._done, []
        return out

    def inflight(self) -> int:
        """Requests submitted and not yet completed."""
        return len(self._requests)

    def workers_info(self) -> list[dict]:
        return [
            dict(
                pid=w.proc.pid,
                state="ready" if w.ready else ("dead" if w.proc.poll() is not None else "starting"),
                inflight=len(w.held),
            )
            for w in self._workers
        ]

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask every worker to stop, wait, kill stragglers; remove the socket."""
        for w in self._workers:
            if w.proc.poll() is None and not (w.ready and self._send(w, encode(Shutdown()))):
                w.proc.kill()  # not connected yet: nothing to drain, it is stateless
        deadline = time.monotonic() + timeout_s
        for w in self._workers:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(REAP_TIMEOUT_S)
        self._workers = []
        if not self._sock.closed:
            self._sock.close(0)
            p = endpoint_path(self.endpoint)
            if p is not None:
                p.unlink(missing_ok=True)

    def __enter__(self) -> LoaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes -----------------------------------------------------------------------------

    def _spawn(self, index: int) -> _Worker:
        wid = next(self._wids)
        cmd = [
            sys.executable, "-m", "flashmoe.workers.loader",
            "--endpoint", self.endpoint,
            "--pool", self.pool.name,
            "--slots", str(self.pool.nslots),
            "--slot-bytes", str(self.pool.slot_bytes),
            "--threads", str(self.threads),
            "--worker-id", str(wid),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if self.chunk_bytes is not None:
            cmd += ["--chunk-bytes", str(self.chunk_bytes)]
        if self.guess_threads:
            cmd += ["--guess-threads", str(self.guess_threads)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True)
        w = _Worker(index, wid, proc, time.monotonic())
        self._by_identity[w.identity] = w
        return w

    def _wait_ready(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not all(w.ready for w in workers):
            for w in workers:
                if w.proc.poll() is not None:
                    raise LoadError(
                        f"loader worker {w.wid} exited with code {w.proc.returncode} during start"
                    )
            if time.monotonic() >= deadline:
                raise LoadError(
                    f"loader workers did not say hello within {self.start_timeout_s:g} s "
                    "(setting worker_start_timeout_s, env FLASHMOE_WORKER_START_TIMEOUT_S)"
                )
            if self._sock.poll(50, zmq.POLLIN):
                self._drain()

    def _replace(self, w: _Worker, why: str) -> None:
        """Kill and reap ``w``, start a replacement, re-dispatch what it held."""
        if w.proc.poll() is None:
            w.proc.kill()
        try:
            w.proc.wait(REAP_TIMEOUT_S)
            reaped = True
        except subprocess.TimeoutExpired:
            reaped = False  # stuck in the kernel: its I/O may still land in those slots
        self._by_identity.pop(w.identity, None)
        held, w.held = sorted(w.held), set()
        nw = self._spawn(w.index)
        self._workers[w.index] = nw
        self._replacing[w.index] = time.monotonic()
        self.restarts += 1
        print(f"flashmoe: loader worker {w.wid} (pid {w.proc.pid}) {why}; restarted",
              file=sys.stderr)  # fmt: skip
        for rid in held:
            r = self._requests[rid]
            r.worker = None
            if not reaped:
                self._fail(r, f"loader worker {w.wid} {why} and could not be reaped")
            elif r.attempts >= MAX_ATTEMPTS:
                self._fail(r, f"loader worker {why} {r.attempts} times while loading slot {r.slot}")
            else:
                self._dispatch(rid)

    def _supervise(self) -> None:
        now = time.monotonic()
        self._last_supervise = now
        for w in list(self._workers):
            if self._workers[w.index] is not w:
                continue  # replaced meanwhile, by a nested call (a failed send re-dispatches)
            code = w.proc.poll()
            if code is not None:
                self._replace(w, f"died (exit code {code})")
            elif not w.ready and now - w.started_at > self.start_timeout_s:
                raise LoadError(
                    f"a replacement loader worker did not say hello within "
                    f"{self.start_timeout_s:g} s (setting worker_start_timeout_s)"
                )
            elif any(now - self._requests[r].sent_at > self.load_timeout_s for r in w.held):
                self._replace(w, f"held a load longer than {self.load_timeout_s:g} s "
                                 "(setting load_timeout_s)")  # fmt: skip

    # -- messages ------------------------------------------------------------------------------

    def _dispatch(self, rid: int) -> None:
        ready = [w for w in self._workers if w.ready]
        if not ready:
            self._backlog.append(rid)
            return
        w = min(ready, key=lambda w: len(w.held))
        r = self._requests[rid]
        r.generation = next(self._gens)
        r.worker = w.index
        r.sent_at = time.monotonic()
        r.attempts += 1
        w.held.add(rid)
        msg = LoadRequest(rid, r.generation, r.slot, r.extents, r.checksum, r.direct, r.urgent)
        if not self._send(w, encode(msg)):
            self._replace(w, "dropped its connection")  # re-dispatches rid with what it held

    def _send(self, w: _Worker, frames: list[bytes]) -> bool:
        try:
            self._sock.send_multipart([w.identity, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH (ROUTER_MANDATORY): the worker disconnected
            return False

    def _drain(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            w = self._by_identity.get(frames[0].split(b":")[0])  # "<wid>:<thread>" replies
            if w is None:
                continue  # a replaced worker's last words
            try:
                msg = decode(frames[1:], COORDINATOR_ACCEPTS)
            except ProtocolError as e:
                print(f"flashmoe: loader worker {w.wid}: bad message: {e}", file=sys.stderr)
                continue
            if isinstance(msg, Hello):
                self._hello(w, msg)
                continue
            r = self._requests.get(msg.req)
            if r is None or r.generation != msg.generation or r.worker != w.index:
                continue  # stale: re-dispatched since
            w.held.discard(r.req)
            del self._requests[r.req]
            if isinstance(msg, LoadDone):
                self._done.append(Completion(r.req, r.slot, True, msg.nbytes, msg.us))
            else:
                assert isinstance(msg, LoadFailed)
                self._done.append(Completion(r.req, r.slot, False, error=msg.error))

    def _hello(self, w: _Worker, msg: Hello) -> None:
        if msg.version != __version__ or msg.worker != w.wid:
            w.proc.kill()
            raise LoadError(
                f"loader worker {w.wid} says it is worker {msg.worker} of flashmoe "
                f"{msg.version}, expected {__version__}: reinstall flashmoe in one environment"
            )
        w.ready = True
        t = self._replacing.pop(w.index, None)
        if t is not None:
            self.last_restart_s = time.monotonic() - t
        # Each request once: a send that fails (w was killed since its Hello) replaces w and
        # puts its requests back on the backlog, which ``while self._backlog`` would spin on.
        backlog, self._backlog = self._backlog, deque()
        for rid in backlog:
            if rid in self._requests:
                self._dispatch(rid)

    def _fail(self, r: _Request, error: str) -> None:
        self._requests.pop(r.req, None)
        self._done.append(Completion(r.req, r.slot, False, error=error))
