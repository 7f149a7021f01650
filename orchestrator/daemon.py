"""``flashmoe-daemon``: one model served to local clients over ZeroMQ (and optionally HTTP).

    flashmoe-daemon start --model M [--memory-budget SIZE] [--workers N] [--socket PATH]
                          [--http HOST:PORT] [--api-key KEY] [--allow-origin ORIGIN]
                          [--allow-public] [--foreground]
    flashmoe-daemon status [--json] | stop | logs [-n N]

Three kinds of thread share the service (vLLM style):

- the front (the main thread) owns the ROUTER socket, and is the only thread that touches it. It
  decodes and checks every message at the edge: a malformed one gets an ``Error`` reply and the
  loop goes on. It also sends every reply.
- the engine thread (``Engine.start``) does all MLX work. Its chunk callbacks only put the chunk
  on a queue and poke a wake-up pipe that the front polls next to the ROUTER.
- with ``--http``, uvicorn's thread serves ``http_api`` straight on the ``Service``.

Signal handlers only flip state: SIGTERM/SIGINT start a graceful stop (stop accepting, let
running requests finish for ``--drain-timeout`` seconds, then cancel them); a second one cancels
at once. The pid file next to the socket holds an exclusive ``flock`` for the daemon's whole life,
so a second daemon on the same socket is refused and a stale one (dead owner) is recognised
without trusting pids. A client that is gone (ROUTER_MANDATORY send fails) or stops reading (its
queue is full) has its requests cancelled.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from flashmoe.configs import Settings, load_settings
from flashmoe.errors import FlashMoeError
from flashmoe.protocol import sockets
from flashmoe.protocol.client import (
    Client,
    ClientError,
    DaemonPaths,
    daemon_paths,
    pid_alive,
    read_pid,
)
from flashmoe.protocol.messages import (
    DAEMON_ACCEPTS,
    Cancel,
    Done,
    Error,
    Generate,
    ProtocolError,
    Shutdown,
    StatusReply,
    StatusRequest,
    Token,
    decode,
    encode,
)
from flashmoe.protocol.request import Request

log = logging.getLogger("flashmoe.daemon")

DEFAULT_ENGINE = "flashmoe.orchestrator.engine:Engine"
PEER_BACKLOG = 4096  # replies queued for one client before it counts as "not reading"
_MAX_SOCKET_PATH = 100  # sun_path is 104 (macOS) / 108 (Linux) bytes
_FAILED = "flashmoe-daemon failed: "  # marks the reason in the log for `start` to print


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
        self.requests_served = 0
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
                    self.requests_served += 1
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
        out = {"model": self.model_name}
        out.update(self.engine.status())
        rec = getattr(getattr(self.engine, "plan", None), "cache_record_bytes", None)
        if "pool_bytes_used" not in out and rec and "cache_slots_ready" in out:
            out["pool_bytes_used"] = out["cache_slots_ready"] * rec  # until the engine says
        loader = getattr(self.engine, "loader", None)
        if loader is not None and hasattr(loader, "restarts"):
            out.update(worker_restarts=loader.restarts, last_restart_s=loader.last_restart_s)
        with self._lock:
            out.update(
                requests_served=self.requests_served,
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
                self._send(ident, Error(id=None, code="internal", message=str(e)))

    def _handle(self, ident: bytes, body: list[bytes]) -> None:
        try:
            msg = decode(body, DAEMON_ACCEPTS, self.settings.max_message_bytes)
        except ProtocolError as e:
            log.warning("bad message from %s: %s", ident.hex(), e)
            self._send(ident, Error(id=None, code=e.code, message=e.message))
            return
        kind = type(msg)
        if kind is Generate:
            self._generate(ident, msg)
        elif kind is Cancel:
            key = _key(ident, msg.id)
            if key in self._reqs:
                self.service.cancel(key)
        elif kind is StatusRequest:
            self._send(ident, StatusReply(status=self.service.status()))
        elif kind is Shutdown:
            log.info("shutdown requested by a client")
            self._send(ident, StatusReply(status={"stopping": True, "pid": os.getpid()}))
            self.request_stop()

    def _generate(self, ident: bytes, msg: Generate) -> None:
        key = _key(ident, msg.id)
        if key in self._reqs:
            self._send(ident, Error(msg.id, "duplicate_id", f"request {msg.id} is in flight"))
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
            self._send(ident, Error(msg.id, code, str(e)))

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
                if not self._send(r.ident, Token(r.client_id, chunk.text, list(chunk.token_ids))):
                    continue
            if chunk.finish_reason is None:
                continue
            del self._reqs[chunk.id]
            if chunk.finish_reason == "error":
                reply = Error(r.client_id, "engine_error", chunk.error or "engine error")
            else:
                stats = plain(chunk.stats or {})
                reply = Done(r.client_id, "".join(r.text), r.ids, stats, chunk.finish_reason)
            self._send(r.ident, reply)

    def _send(self, ident: bytes, msg: Any) -> bool:
        try:
            frames = encode(msg)
        except ProtocolError as e:  # our own bug; the client still gets an answer
            log.error("cannot encode %s: %s", type(msg).__name__, e)
            frames = encode(Error(getattr(msg, "id", None), "internal", str(e)))
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


# -- process management -------------------------------------------------------------------------


def remove_stale_sockets() -> list[str]:
    """Remove the loader sockets (``loaders-<pid>-*.sock``) that dead coordinators left behind."""
    removed = []
    for p in sockets.runtime_dir().glob("loaders-*-*.sock"):
        try:
            pid = int(p.name.split("-")[1])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def _lock_pid_file(paths: DaemonPaths) -> int | None:
    """Take the pid file's exclusive lock (retrying briefly: probes hold it for microseconds)."""
    fd = os.open(paths.pid, os.O_RDWR | os.O_CREAT, 0o600)
    for _ in range(20):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            time.sleep(0.05)
    os.close(fd)
    return None


def running_pid(paths: DaemonPaths) -> int | None:
    """The pid of the live daemon on ``paths``, or None (a stale pid file does not count)."""
    try:
        fd = os.open(paths.pid, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_pid(paths) or -1
    finally:
        os.close(fd)  # also drops the probe's lock
    return None


def parse_http(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host defaults to loopback; ``[::1]:PORT`` for v6)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"--http wants HOST:PORT or PORT, got {text!r}") from None


def _load_factory(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _setup_logging(paths: DaemonPaths) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    try:  # detached: stderr is the log file already
        same = os.path.samestat(os.fstat(2), os.stat(paths.log))
    except OSError:
        same = False
    if not same:
        handlers.append(logging.FileHandler(paths.log))
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)


def serve(args: argparse.Namespace, engine_factory: Callable | None = None) -> int:
    """Run the daemon in this process until stopped (``start --foreground``)."""
    paths = daemon_paths(args.socket)
    if len(str(paths.socket).encode()) > _MAX_SOCKET_PATH:
        print(f"flashmoe-daemon: socket path too long: {paths.socket}", file=sys.stderr)
        return 1
    os.umask(0o077)  # socket, pid and log files: owner only
    paths.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _lock_pid_file(paths)
    if lock is None:
        pid = read_pid(paths)
        print(f"flashmoe-daemon: already running (pid {pid}) on {paths.socket}", file=sys.stderr)
        return 1
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    _setup_logging(paths)
    if paths.socket.exists():
        log.info("removing the stale socket of a dead daemon: %s", paths.socket)
        paths.socket.unlink()
    stale = remove_stale_sockets()
    if stale:
        log.info("removed %d loader socket(s) of dead daemons", len(stale))
    state = {"front": None, "stops": 0}

    def on_signal(signum: int, frame: Any) -> None:
        state["stops"] += 1
        if state["front"] is not None:
            state["front"].request_stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    settings = load_settings().with_overrides(
        memory_budget=args.memory_budget, workers=args.workers, socket=str(paths.socket)
    )
    factory = engine_factory or _load_factory(args.engine)
    engine = http = front = None
    t0 = time.monotonic()
    try:
        if args.http:  # before the model loads: a refused address fails at once
            from flashmoe.orchestrator.http_guard import check_bind

            host, port = parse_http(args.http)
            warning = check_bind(host, args.api_key, args.allow_public)
            if warning:
                log.warning("%s", warning)
        log.info("flashmoe-daemon pid %d: loading %s", os.getpid(), args.model)
        kw = {"memory_budget": args.memory_budget, "workers": args.workers}
        engine = factory(args.model, settings, **{k: v for k, v in kw.items() if v is not None})
        engine.start()
        service = Service(engine, settings)
        if args.http:
            from flashmoe.orchestrator.http_api import HttpServer, create_app

            app = create_app(service, args.api_key, host, args.allow_origin)
            http = HttpServer(app, host, port)
            http.start()
            service.info["http"] = http.url
        front = Front(service, paths, settings)
        state["front"] = front
        for _ in range(state["stops"]):
            front.request_stop()
        log.info(
            "ready in %.2f s: model %s on %s%s",
            time.monotonic() - t0,
            service.model_name,
            paths.socket,
            f", http {http.url}" if http else "",
        )
        front.serve(args.drain_timeout)
        log.info("stopped serving")
        return 0
    except FlashMoeError as e:  # a user-facing reason: one line, no traceback
        log.error("%s%s", _FAILED, e)
        return 1
    except Exception as e:
        log.exception("%s%s: %s", _FAILED, type(e).__name__, e)
        return 1
    finally:
        if front is not None:
            front.close()
        if http is not None:
            http.stop()
        if engine is not None:
            try:
                engine.close()
            except Exception:
                log.exception("engine close failed")
        paths.socket.unlink(missing_ok=True)
        paths.pid.unlink(missing_ok=True)
        os.close(lock)  # last: `stop` waits for this lock to know everything is cleaned up
        log.info("exited")


def _start_detached(args: argparse.Namespace) -> int:
    paths = daemon_paths(args.socket)
    pid = running_pid(paths)
    if pid is not None:
        print(f"flashmoe-daemon: already running (pid {pid}) on {paths.socket}", file=sys.stderr)
        return 1
    paths.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = [
        sys.executable,
        "-m",
        "flashmoe.orchestrator.daemon",
        "start",
        "--foreground",
        "--model",
        args.model,
        "--socket",
        str(paths.socket),
        "--engine",
        args.engine,
        "--drain-timeout",
        str(args.drain_timeout),
    ]
    for flag, value in (
        ("--memory-budget", args.memory_budget),
        ("--workers", args.workers),
        ("--http", args.http),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += [a for o in args.allow_origin or () for a in ("--allow-origin", o)]
    cmd += ["--allow-public"] if args.allow_public else []
    env = dict(os.environ)
    if args.api_key:  # through the environment: argv is visible to every user in `ps`
        env["FLASHMOE_API_KEY"] = args.api_key
    fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    log_start = os.fstat(fd).st_size
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env, start_new_session=True
        )
    finally:
        os.close(fd)
    while True:
        rc = proc.poll()
        if rc is not None:
            with open(paths.log, "rb") as f:
                f.seek(log_start)
                lines = f.read().decode(errors="replace").strip().splitlines()
            reasons = [ln.split(_FAILED, 1)[1] for ln in lines if _FAILED in ln]
            # Our own error line when there is one, else the end of whatever the child printed.
            detail = [reasons[-1]] if reasons else ["", *lines[-20:]]
            print(f"flashmoe-daemon: failed to start (see {paths.log}):", *detail, file=sys.stderr)
            return rc or 1
        try:
            with Client(paths.socket, timeout=0.5) as c:
                st = c.status()
            if st.get("pid") == proc.pid:
                extra = f", http {st['http']}" if st.get("http") else ""
                took = time.monotonic() - t0
                print(
                    f"flashmoe-daemon: ready in {took:.1f} s (pid {proc.pid}, "
                    f"model {st.get('model')}, socket {paths.socket}{extra})"
                )
                return 0
        except ClientError:
            pass
        if time.monotonic() - t0 > args.start_timeout:
            proc.terminate()
            print(
                f"flashmoe-daemon: not ready after {args.start_timeout:g} s "
                f"(--start-timeout); see {paths.log}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.1)


def _stop(args: argparse.Namespace) -> int:
    paths = daemon_paths(args.socket)
    pid = running_pid(paths)
    if pid is None:
        for p in (paths.socket, paths.pid):
            p.unlink(missing_ok=True)
        print(f"flashmoe-daemon: not running on {paths.socket}", file=sys.stderr)
        return 1
    try:
        with Client(paths.socket, timeout=5.0) as c:
            c.shutdown()
    except ClientError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if running_pid(paths) is None:
            print(f"flashmoe-daemon: stopped (pid {pid})")
            return 0
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    print(
        f"flashmoe-daemon: pid {pid} did not stop in {args.timeout:g} s (--timeout); killed",
        file=sys.stderr,
    )
    return 1


def _status(args: argparse.Namespace) -> int:
    with Client(args.socket, timeout=args.timeout) as c:
        st = c.status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(
        f"flashmoe-daemon pid {st.get('pid')}, up {st.get('uptime_s', 0):.0f} s, "
        f"model {st.get('model')}"
    )
    workers = st.get("workers") or []
    print("workers: " + ", ".join(f"pid {w.get('pid')} {w.get('state')}" for w in workers))
    for k in sorted(st):
        if k not in ("pid", "uptime_s", "model", "workers"):
            print(f"{k}: {st[k]}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    paths = daemon_paths(args.socket)
    try:
        lines = paths.log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        print(f"flashmoe-daemon: no log at {paths.log}", file=sys.stderr)
        return 1
    print("\n".join(lines[-args.n :] if args.n > 0 else lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flashmoe-daemon", description="Serve a model to clients.")
    sub = ap.add_subparsers(dest="command", required=True)
    sock_help = "daemon socket (default: FLASHMOE_SOCKET or <runtime dir>/daemon.sock)"
    p = sub.add_parser("start", help="load a model and serve it")
    p.add_argument("--model", required=True, help="checkpoint or packed store directory")
    p.add_argument("--memory-budget", help="expert pool size: bytes, 512MiB, 2GiB (default: auto)")
    p.add_argument("--workers", type=int, help="loader worker processes")
    p.add_argument("--socket", help=sock_help)
    p.add_argument("--http", help="also serve the OpenAI-compatible API on HOST:PORT")
    p.add_argument(
        "--api-key",
        default=os.environ.get("FLASHMOE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on HTTP (FLASHMOE_API_KEY)",
    )
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="let browser pages of ORIGIN (e.g. http://localhost:3000, or *) call "
                   "the HTTP API; repeatable (default: none)")
    p.add_argument("--allow-public", action="store_true",
                   help="serve --http beyond loopback without --api-key (prints a warning)")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for ready")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running requests may take to finish on stop",
    )
    p.add_argument("--engine", default=DEFAULT_ENGINE, help=argparse.SUPPRESS)
    p = sub.add_parser("status", help="show the running daemon's status")
    p.add_argument("--socket", help=sock_help)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    p = sub.add_parser("stop", help="drain, stop workers, remove socket and shared memory")
    p.add_argument("--socket", help=sock_help)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait before SIGKILL")
    p = sub.add_parser("logs", help="print the end of the daemon's log")
    p.add_argument("--socket", help=sock_help)
    p.add_argument("-n", type=int, default=50, help="lines (0: all)")
    return ap


def main(argv: list[str] | None = None, *, engine_factory: Callable | None = None) -> int:
    """Entry point of ``flashmoe-daemon``; ``engine_factory`` replaces ``Engine`` (tests)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "start":
            if args.foreground or engine_factory is not None:
                return serve(args, engine_factory)
            return _start_detached(args)
        return {"stop": _stop, "status": _status, "logs": _logs}[args.command](args)
    except ClientError as e:
        print(f"flashmoe-daemon: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
