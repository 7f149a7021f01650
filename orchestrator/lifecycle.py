"""One daemon process's life: its pid file, its log, detaching, and serving until it is stopped.

The pid file next to the socket holds an exclusive ``flock`` for the daemon's whole life, so a
second daemon on the same socket is refused and a stale one (dead owner) is recognised without
trusting pids. The pid file and the log are opened without following links and must be regular
files of this user (``--socket`` may point into a shared folder); the log rotates past
``LOG_MAX_BYTES``. Signal handlers only flip state: SIGTERM/SIGINT start a graceful stop (stop
accepting, let running requests finish for ``--drain-timeout`` seconds, then cancel them); a
second one cancels at once.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import logging.handlers
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashmoe.configs import load_settings
from flashmoe.errors import FlashMoeError
from flashmoe.orchestrator.service import Front, Service
from flashmoe.progress import loading
from flashmoe.protocol import sockets
from flashmoe.protocol.client import (
    Client,
    ClientError,
    DaemonPaths,
    daemon_paths,
    pid_alive,
    read_pid,
)

log = logging.getLogger("flashmoe.daemon")

LOG_MAX_BYTES = 16 << 20  # the log rotates past this size, keeping one older log
_MAX_SOCKET_PATH = 100  # sun_path is 104 (macOS) / 108 (Linux) bytes
_FAILED = "flashmoe-daemon failed: "  # marks the reason in the log for `start` to print
# engine settings given as flags: (flag, attribute of the parsed args, Engine keyword)
ENGINE_FLAGS = (
    ("--memory-budget", "memory_budget", "memory_budget"),
    ("--workers", "workers", "workers"),
    ("--threads", "io_threads", "io_threads"),
    ("--dtype", "dtype", "dtype"),
    ("--experts-per-token", "experts_per_token", "experts_per_token"),
    ("--lanes", "lanes", "lanes"),
    ("--max-context", "max_context", "max_context"),
)


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
    fd = sockets.open_private(paths.pid, os.O_RDWR | os.O_CREAT)
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
        fd = sockets.open_private(paths.pid, os.O_RDONLY)
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


class LogFile(logging.handlers.RotatingFileHandler):
    """The daemon's log: never opened through a link; past ``LOG_MAX_BYTES`` it becomes
    ``<log>.1``. When stdout and stderr are the log (a detached daemon), they follow it."""

    def __init__(self, path: Path, owns_std: bool):
        self._owns_std = owns_std
        super().__init__(path, maxBytes=LOG_MAX_BYTES, backupCount=1, encoding="utf-8")

    def _open(self):
        fd = sockets.open_private(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fdopen(fd, "a", encoding="utf-8")

    def doRollover(self) -> None:
        super().doRollover()
        if self._owns_std and self.stream is not None:
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


def _setup_logging(paths: DaemonPaths) -> None:
    try:  # detached: stderr is the log file already
        detached = os.path.samestat(os.fstat(2), paths.log.lstat())
    except OSError:
        detached = False
    handlers: list[logging.Handler] = [] if detached else [logging.StreamHandler(sys.stderr)]
    handlers.append(LogFile(paths.log, owns_std=detached))
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)


def _remove_stale_socket(path: Path) -> None:
    """Remove the socket a dead daemon left; anything else at that path is not ours to remove."""
    if not os.path.lexists(path):
        return
    sockets.check_own(path, stat.S_ISSOCK)
    log.info("removing the stale socket of a dead daemon: %s", path)
    path.unlink()


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Engine keywords that flags gave (the others come from settings)."""
    kw = {key: getattr(args, attr, None) for _, attr, key in ENGINE_FLAGS}
    return {k: v for k, v in kw.items() if v is not None}


def serve(args: argparse.Namespace, engine_factory: Callable | None = None) -> int:
    """Run the daemon in this process until stopped (``start --foreground``)."""
    paths = daemon_paths(args.socket)
    if len(str(paths.socket).encode()) > _MAX_SOCKET_PATH:
        print(f"flashmoe-daemon: socket path too long: {paths.socket}", file=sys.stderr)
        return 2
    os.umask(0o077)  # socket, pid and log files: owner only
    paths.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _lock_pid_file(paths)
    if lock is None:
        pid = read_pid(paths)
        print(f"flashmoe-daemon: already running (pid {pid}) on {paths.socket}", file=sys.stderr)
        return 1
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())
    front = None
    try:
        _setup_logging(paths)
        _remove_stale_socket(paths.socket)
    except FlashMoeError as e:
        print(f"flashmoe-daemon: {e}", file=sys.stderr)
        paths.pid.unlink(missing_ok=True)
        os.close(lock)
        return 2
    stale = remove_stale_sockets()
    if stale:
        log.info("removed %d loader socket(s) of dead daemons", len(stale))
    state: dict[str, Any] = {"front": None, "stops": 0}

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
    engine = http = None
    t0 = time.monotonic()
    try:
        if args.http:  # before the model loads: a refused address fails at once
            from flashmoe.orchestrator.http_guard import check_bind

            host, port = parse_http(args.http)
            warning = check_bind(host, args.api_key, args.allow_public)
            if warning:
                log.warning("%s", warning)
        model = os.path.abspath(args.model)  # `--model .` is served under the folder's name
        log.info("flashmoe-daemon pid %d: loading %s", os.getpid(), model)
        engine = factory(model, settings, **engine_kwargs(args))
        engine.start()
        service = Service(engine, settings)
        if getattr(args, "served_model_name", None):
            service.model_name = args.served_model_name
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
        return 2
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
        if front is not None:
            paths.socket.unlink(missing_ok=True)
        paths.pid.unlink(missing_ok=True)
        os.close(lock)  # last: `stop` waits for this lock to know everything is cleaned up
        log.info("exited")


def start_detached(args: argparse.Namespace) -> int:
    """Start ``serve`` in a new session with its output in the log; wait until it answers."""
    paths = daemon_paths(args.socket)
    pid = running_pid(paths)
    if pid is not None:
        print(f"flashmoe-daemon: already running (pid {pid}) on {paths.socket}", file=sys.stderr)
        return 1
    paths.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = [sys.executable, "-m", "flashmoe.orchestrator.daemon", "start", "--foreground",
           "--model", args.model, "--socket", str(paths.socket), "--engine", args.engine,
           "--drain-timeout", str(args.drain_timeout)]  # fmt: skip
    flags = [(f, a) for f, a, _ in ENGINE_FLAGS] + [("--http", "http"),
                                                     ("--served-model-name", "served_model_name")]
    for flag, attr in flags:
        value = getattr(args, attr, None)
        if value is not None:
            cmd += [flag, str(value)]
    cmd += [a for o in args.allow_origin or () for a in ("--allow-origin", o)]
    cmd += ["--allow-public"] if args.allow_public else []
    env = dict(os.environ)
    if args.api_key:  # through the environment: argv is visible to every user in `ps`
        env["FLASHMOE_API_KEY"] = args.api_key
    fd = sockets.open_private(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    log_start = os.fstat(fd).st_size
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env, start_new_session=True
        )
    finally:
        os.close(fd)
    with loading(args.model):
        rc = _wait_ready(proc, paths, t0, args.start_timeout)
    if rc is None:
        _print_failure(paths, log_start)
        return proc.returncode or 1
    return rc


def _wait_ready(proc: subprocess.Popen, paths: DaemonPaths, t0: float, timeout: float
                ) -> int | None:
    """0 once the daemon answers, 1 after ``timeout``, None if it exited."""
    while proc.poll() is None:
        try:
            with Client(paths.socket, timeout=0.5) as c:
                st = c.status()
            if st.get("pid") == proc.pid:
                extra = f", http {st['http']}" if st.get("http") else ""
                print(
                    f"flashmoe-daemon: ready in {time.monotonic() - t0:.1f} s (pid "
                    f"{proc.pid}, model {st.get('model')}, socket {paths.socket}{extra})"
                )
                return 0
        except ClientError:
            pass
        if time.monotonic() - t0 > timeout:
            proc.terminate()
            print(f"flashmoe-daemon: not ready after {timeout:g} s (--start-timeout); see "
                  f"{paths.log}", file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(0.1)
    return None


def _print_failure(paths: DaemonPaths, log_start: int) -> None:
    with os.fdopen(sockets.open_private(paths.log, os.O_RDONLY), "rb") as f:
        f.seek(log_start)
        lines = f.read().decode(errors="replace").strip().splitlines()
    reasons = [ln.split(_FAILED, 1)[1] for ln in lines if _FAILED in ln]
    # Our own error line when there is one, else the end of whatever the child printed.
    detail = [reasons[-1]] if reasons else ["", *lines[-20:]]
    print(f"flashmoe-daemon: failed to start (see {paths.log}):", *detail, file=sys.stderr)
