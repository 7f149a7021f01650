"""What the daemon, HTTP, client, fault and fuzz tests share: a daemon subprocess on a private
socket, the requests they send and small waits. Their fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from flashmoe.protocol.client import Client, DaemonNotRunning, daemon_paths, pid_alive

BUDGET = "8MiB"
PROMPTS = [f"Request {i}: the quick brown fox jumps over" for i in range(8)]
CHAT = [{"role": "user", "content": "Tell me about foxes."}]
MAX_TOKENS = 12
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
DAEMON = [sys.executable, "-m", "flashmoe.orchestrator.daemon"]


def short_dir() -> Path:
    # Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="fm", dir="/tmp" if os.path.isdir("/tmp") else None))


def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Daemon:
    """A ``start --foreground`` daemon subprocess on a private socket."""

    def __init__(self, model: Path, *extra: str, sock: Path | None = None):
        self.socket = sock or short_dir() / "d.sock"
        self.dir = self.socket.parent
        self.paths = daemon_paths(self.socket)
        self.stderr = open(self.dir / "stderr", "wb")
        cmd = [
            *DAEMON,
            "start",
            "--foreground",
            "--model",
            str(model),
            "--socket",
            str(self.socket),
            "--memory-budget",
            BUDGET,
            "--workers",
            "1",
            *extra,
        ]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr
        )
        self.ready_s = None

    def log(self) -> str:
        return (self.dir / "stderr").read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(DaemonNotRunning, Exception):
                with Client(self.socket, timeout=1.0) as c:
                    st = c.status()
                self.ready_s = time.monotonic() - self.t0
                return st
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.log()}")

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception), self.client(timeout=5.0) as c:
                c.shutdown()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


KEY = "sk-test-key"
JSON = {"Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


LOADER_MODULE = "flashmoe.workers.loader"
# 16 cache slots of the tiny model's 64 experts (a miss on most tokens), beside its f32 dense
# weights, KV cache and prefill workspace for 256 tokens (budget_for_pool's 1,075,712 bytes).
SMALL_BUDGET = 300_000 + 1_075_712


def scratch_dir(prefix: str = "flt") -> Path:
    """A short private directory (unix socket paths are limited to ~100 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


def loader_workers(coordinator_pid: int) -> list[psutil.Process]:
    """Live loader workers started by ``coordinator_pid`` (its pid is in their endpoint name)."""
    mark = f"loaders-{coordinator_pid}-"
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = p.info["cmdline"] or []
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if LOADER_MODULE in cmd and any(mark in a for a in cmd):
            found.append(p)
    return found


def shm_segments(pid: int) -> list[str]:
    """This user's pool segments created by ``pid``."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"flashmoe-{os.getuid()}-{pid}-")]


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


class WorkerKiller:
    """A thread that SIGKILLs one ready loader worker (``workers_info()`` gives them) every
    ``every_s`` seconds, and at once on every ``poke()``."""

    def __init__(self, workers_info, every_s: float = 3600.0):
        self.workers_info = workers_info
        self.every_s = every_s
        self.kills = 0
        self.killed: set[int] = set()
        self._i = 0
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread = threading.Thread(target=self._run, name="killer", daemon=True)

    def poke(self) -> None:
        self._poke.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poke.wait(self.every_s)
            self._poke.clear()
            if self._stop.is_set():
                return
            ready = [w["pid"] for w in self.workers_info() if w["state"] == "ready"]
            pids = [p for p in ready if p not in self.killed]  # dead ones look ready until reaped
            if not pids:
                continue
            pid = pids[self._i % len(pids)]
            self._i += 1
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed.add(pid)
            self.kills += 1

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._poke.set()
        self._thread.join(10)


def leftovers(runtime: Path, sock_dir: Path) -> list[str]:
    files = sorted(os.listdir(runtime)) if runtime.exists() else []
    return files + sorted(p for p in os.listdir(sock_dir) if not p.endswith((".log", "stderr")))


def start_stop_cycles(model: Path, runtime: Path, cycles: int) -> list[float]:
    """``flashmoe-daemon start`` / ``stop`` (detached) ``cycles`` times; asserts each leaves
    nothing behind in /dev/shm, the runtime directory or the socket's directory."""
    d = scratch_dir()
    sock = str(d / "d.sock")
    took = []
    try:
        for _ in range(cycles):
            t0 = time.monotonic()
            args = ["--socket", sock, "--memory-budget", BUDGET, "--workers", "1"]
            out = subprocess.run([*DAEMON, "start", "--model", str(model), *args],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            assert out.returncode == 0, out.stderr
            with Client(sock, timeout=10) as c:
                pid = c.status()["pid"]
            assert loader_workers(pid) and shm_segments(pid)
            out = subprocess.run([*DAEMON, "stop", "--socket", sock],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            assert out.returncode == 0, out.stderr
            took.append(time.monotonic() - t0)
            # `stop` returns once the pid file's lock is released, just before the exit
            wait_for(lambda pid=pid: not pid_alive(pid), 10, "the daemon to exit")
            wait_for(lambda pid=pid: not loader_workers(pid), 10, "workers to exit")
            assert not shm_segments(pid)
            assert leftovers(runtime, d) == []
    finally:
        subprocess.run([*DAEMON, "stop", "--socket", sock], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)
    return took


def mlx_lm_ids(path, prompt, n: int, dtype=None, model_config: dict | None = None) -> list[int]:
    """mlx-lm's greedy token ids for ``prompt`` on the checkpoint at ``path``, the reference every
    exactness test compares with: cast to ``dtype``, or as ``mlx_lm.load`` leaves it (None)."""
    from mlx_lm import load, stream_generate

    model, tok = load(str(path), model_config=model_config or {})
    if dtype is not None:
        model.set_dtype(dtype)
    ids = []
    for r in stream_generate(model, tok, prompt, max_tokens=n):
        if r.finish_reason == "stop":
            break
        ids.append(r.token)
    return ids
