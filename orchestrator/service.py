"""The daemon's service loop: one engine shared by the fronts (the ZeroMQ socket, HTTP).

- ``Service`` holds what every front shares: validation, the requests in flight, counters.
- ``Front`` is the ROUTER loop, run by the main thread, the only thread that touches that socket.
  It decodes and checks every message at the edge: a malformed one gets an ``Error`` reply and
  the loop goes on. It also sends every reply. The engine thread's chunk callbacks only put the
  chunk on a queue and poke a wake-up pipe that the front polls next to the ROUTER.

A client that is gone (ROUTER_MANDATORY send fails) or stops reading (its queue is full) has its
requests cancelled. Errors sent to clients keep the layer and expert but not the server's paths.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from flashmoe.configs import Settings
from flashmoe.protocol import messages as wire
from flashmoe.protocol import sockets
from flashmoe.protocol.client import DaemonPaths
from flashmoe.protocol.request import Request

log = logging.getLogger("flashmoe.daemon")

PEER_BACKLOG = 4096  # replies queued for one client before it counts as "not reading"
_ABS_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/:'\",()]+/)+([^\s/:'\",()]*)")


def public_error(message: str) -> str:
    """``message`` as a client may see it: absolute paths reduced to their file's name."""
    return _ABS_PATH.sub(lambda m: m.group(1) or "<dir>", message)


class ServiceStopping(RuntimeError):
    """The daemon is draining and takes no new requests."""


def plain(obj: Any) -> Any:
    """``obj`` as msgpack/JSON-safe data: numpy scalars to Python, non-finite floats to None."""
    if hasattr(obj, "item") and not isinstance(obj, (dict, list, tuple, str)):
        try:
            obj = obj.item()  # numpy / MLX scalar
        except (TypeError, ValueError):
            return str(obj)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)  # IntEnum and friends: the wire format wants a plain int
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return str(obj)


def check(engine: Any, req: Any) -> None:
    """``engine.validate(req)``, with whatever a chat template or tokenizer raises on odd input
    turned into a ``ValueError`` (so the client gets ``invalid_request``)."""
    try:
        engine.validate(req)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read the request: {type(e).__name__}: {e}") from None


def new_request(**fields: Any) -> Request:
    """A ``Request`` with its fields checked (``RequestError``, a ``ValueError``, if not)."""
    return Request(**fields)


class Service:
    """The engine plus what both fronts share: validation, the in-flight set, counters.

    Args:
        engine: a started ``Engine`` (or anything with its interface).
        settings: request limits (``max_tokens_limit``, ``max_message_bytes``).
    """

    def __init__(self, engine: Any, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.model_name: str = engine.model_name
        self.started = time.time()
        self.accepting = True
        self.info: dict = {"pid": os.getpid()}  # socket, http: filled in by the fronts
        self.requests_served = 0  # finished by length or a stop token
        self.requests_cancelled = 0
        self.requests_failed = 0
        self.tokens_generated = 0
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._validate_lock = threading.Lock()

    def submit(self, req: Any, on_chunk: Callable[[Any], None]) -> None:
        """Check and queue ``req``; ``on_chunk`` runs on the engine thread for every chunk.

        Raises:
            ValueError: the request is invalid. ServiceStopping: the daemon is stopping.
        """
        if not self.accepting:
            raise ServiceStopping("flashmoe-daemon is stopping")
        self.prepare(req)

        def relay(chunk: Any) -> None:
            with self._lock:
                self.tokens_generated += len(chunk.token_ids)
                if chunk.finish_reason is not None:
                    self._running.discard(req.id)
                    if chunk.finish_reason == "cancelled":
                        self.requests_cancelled += 1
                    elif chunk.finish_reason == "error":
                        self.requests_failed += 1
                    else:
                        self.requests_served += 1
            if chunk.finish_reason == "error":
                log.warning("request %s failed: %s", req.id, chunk.error)
            try:
                on_chunk(chunk)
            except Exception:  # a front's bug must not kill the engine thread
                log.exception("chunk callback failed for %s", req.id)

        with self._lock:
            if req.id in self._running:
                raise ValueError(f"request id {req.id!r} is already in flight")
            self._running.add(req.id)
        try:
            self.engine.submit(req, relay)
        except BaseException:
            with self._lock:
                self._running.discard(req.id)
            raise

    def prepare(self, req: Any) -> list[int]:
        """Check ``req`` and tokenize its prompt (once; ``ValueError`` if it cannot be served)."""
        with self._validate_lock:  # the front and the HTTP threads share one tokenizer
            check(self.engine, req)
        return req.tokens

    def cancel(self, req_id: str) -> None:
        """Cancel a running request (a no-op if it already finished)."""
        with self._lock:
            running = req_id in self._running
        if running:
            self.engine.cancel(req_id)

    def running(self) -> list[str]:
        with self._lock:
            return sorted(self._running)

    def status(self) -> dict:
        """Engine status plus the daemon's: pid, uptime, requests served/running, tokens."""
        out = dict(self.engine.status())
        out["model"] = self.model_name  # the served name
        rec = getattr(getattr(self.engine, "plan", None), "cache_record_bytes", None)
        if "pool_bytes_used" not in out and rec and "cache_slots_ready" in out:
            out["pool_bytes_used"] = out["cache_slots_ready"] * rec  # until the engine says
        loader = getattr(self.engine, "loader", None)
        if loader is not None and hasattr(loader, "restarts"):
            out.update(worker_restarts=loader.restarts, last_restart_s=loader.last_restart_s)
        with self._lock:
            out.update(
                requests_served=self.requests_served,
                requests_cancelled=self.requests_cancelled,
                requests_failed=self.requests_failed,
                requests_running=len(self._running),
                tokens_generated=self.tokens_generated,
            )
        out.update(self.info, uptime_s=round(time.time() - self.started, 3))
        return plain(out)


@dataclass
class _Req:
    ident: bytes
    client_id: str
    stream: bool
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


class Front:
    """The ROUTER loop: reads requests, submits them, sends back Token/Done/Error/StatusReply."""

    def __init__(self, service: Service, paths: DaemonPaths, settings: Settings):
        self.service = service
        self.settings = settings
        self.stop_requested = 0  # number of stop requests (signals, Shutdown messages)
        self._paths = paths
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reqs: dict[str, _Req] = {}  # internal id -> request; front thread only
        self._pipe = sockets.WakePipe()  # wakes the front thread's poll
        self._router = sockets.router(paths.endpoint, settings.max_message_bytes)
        # Applies to every peer: none can have connected between bind and here.
        self._router.setsockopt(zmq.SNDHWM, PEER_BACKLOG)
        sockets.check_own(paths.socket, stat.S_ISSOCK)  # what we bound, not a link put there
        os.chmod(paths.socket, 0o600)
        service.info["socket"] = str(paths.socket)

    def request_stop(self) -> None:
        """Ask for a graceful stop (a second call cancels running requests). Signal-safe."""
        self.stop_requested += 1
        self._wake()

    def serve(self, drain_timeout: float) -> None:
        """Run until a stop was requested and running requests finished (or were cancelled)."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pipe.fileno(), zmq.POLLIN)
        drain_until = cancelled_at = None
        while True:
            events = dict(poller.poll(250))
            if self._pipe.fileno() in events:
                self._pipe.drain()
            if self._router in events:
                self._read_router()
            self._flush()
            if self.stop_requested and drain_until is None:
                self.service.accepting = False
                drain_until = time.monotonic() + drain_timeout
                log.info("stopping: %d request(s) running", len(self.service.running()))
            if drain_until is None:
                continue
            if not self.service.running() and not self._reqs:
                break
            now = time.monotonic()
            if cancelled_at is None and (now >= drain_until or self.stop_requested > 1):
                log.warning("cancelling %d request(s) to stop", len(self.service.running()))
                for req_id in self.service.running():
                    self.service.cancel(req_id)
                cancelled_at = now
            if cancelled_at is not None and now - cancelled_at > 10:
                log.error("requests did not end after cancel; stopping anyway")
                break

    def close(self) -> None:
        """Close the ROUTER and remove the socket file."""
        self._router.close(linger=0)
        self._pipe.close()
        self._paths.socket.unlink(missing_ok=True)

    # -- engine thread -> front ----------------------------------------------------------------

    def _post(self, chunk: Any) -> None:
        self._outbox.put(chunk)
        self._wake()

    def _wake(self) -> None:
        self._pipe.wake()

    # -- front thread ------------------------------------------------------------------------

    def _read_router(self) -> None:
        for _ in range(256):  # then flush replies, so a flood of requests cannot starve them
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident, body = frames[0], frames[1:]
            try:
                self._handle(ident, body)
            except Exception as e:
                log.exception("handling a message failed")
                self._send(ident, wire.Error(id=None, code="internal",
                                             message=public_error(str(e))))

    def _handle(self, ident: bytes, body: list[bytes]) -> None:
        try:
            msg = wire.decode(body, wire.DAEMON_ACCEPTS, self.settings.max_message_bytes)
        except wire.ProtocolError as e:
            log.warning("bad message from %s: %s", ident.hex(), e)
            self._send(ident, wire.Error(id=None, code=e.code, message=e.message))
            return
        kind = type(msg)
        if kind is wire.Generate:
            self._generate(ident, msg)
        elif kind is wire.Cancel:
            key = _key(ident, msg.id)
            if key in self._reqs:
                self.service.cancel(key)
        elif kind is wire.StatusRequest:
            self._send(ident, wire.StatusReply(status=self.service.status()))
        elif kind is wire.Shutdown:
            log.info("shutdown requested by a client")
            self._send(ident, wire.StatusReply(status={"stopping": True, "pid": os.getpid()}))
            self.request_stop()

    def _generate(self, ident: bytes, msg: wire.Generate) -> None:
        key = _key(ident, msg.id)
        if key in self._reqs:
            self._send(ident, wire.Error(msg.id, "duplicate_id", f"request {msg.id} is in flight"))
            return
        req = new_request(
            id=key,
            prompt=msg.prompt if msg.prompt_ids is None else list(msg.prompt_ids),
            messages=msg.messages,
            max_tokens=msg.max_tokens,
            temperature=msg.temperature,
            top_p=msg.top_p,
            top_k=msg.top_k,
            min_p=msg.min_p,
            seed=msg.seed,
            stop=list(msg.stop),
            logprobs=msg.logprobs,
            top_logprobs=msg.top_logprobs,
        )
        self._reqs[key] = _Req(ident, msg.id, msg.stream)
        try:
            self.service.submit(req, self._post)
        except (ValueError, ServiceStopping) as e:
            del self._reqs[key]
            code = "invalid_request" if isinstance(e, ValueError) else "stopping"
            self._send(ident, wire.Error(msg.id, code, str(e)))

    def _flush(self) -> None:
        while True:
            try:
                chunk = self._outbox.get_nowait()
            except queue.Empty:
                return
            r = self._reqs.get(chunk.id)
            if r is None:  # its client is gone
                continue
            r.text.append(chunk.text)
            r.ids.extend(chunk.token_ids)
            if r.stream and (chunk.text or chunk.token_ids):
                token = wire.Token(r.client_id, chunk.text, list(chunk.token_ids))
                if not self._send(r.ident, token):
                    continue
            if chunk.finish_reason is None:
                continue
            del self._reqs[chunk.id]
            if chunk.finish_reason == "error":
                why = public_error(chunk.error or "engine error")
                reply = wire.Error(r.client_id, "engine_error", why)
            else:
                stats = plain(chunk.stats or {})
                reply = wire.Done(r.client_id, "".join(r.text), r.ids, stats, chunk.finish_reason)
            self._send(r.ident, reply)

    def _send(self, ident: bytes, msg: Any) -> bool:
        try:
            frames = wire.encode(msg)
        except wire.ProtocolError as e:  # our own bug; the client still gets an answer
            log.error("cannot encode %s: %s", type(msg).__name__, e)
            frames = wire.encode(wire.Error(getattr(msg, "id", None), "internal", str(e)))
        try:
            self._router.send_multipart([ident, *frames], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: peer gone; EAGAIN: peer stopped reading
            self._drop_peer(ident, e)
            return False

    def _drop_peer(self, ident: bytes, why: Exception) -> None:
        keys = [k for k, r in self._reqs.items() if r.ident == ident]
        if keys:
            log.info(
                "client %s unreachable (%s): cancelling %d request(s)", ident.hex(), why, len(keys)
            )
        for k in keys:
            del self._reqs[k]
            self.service.cancel(k)


def _key(ident: bytes, client_id: str) -> str:
    # Client ids are only unique per client: the engine sees them qualified by the peer.
    return f"{ident.hex()}-{client_id}"

