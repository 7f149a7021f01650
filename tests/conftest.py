"""Helpers shared by the fault, fuzz and soak tests (test_faults.py, test_fuzz.py, test_soak.py).

The daemon helpers and the session fixtures ``tiny_model`` / ``reference`` stay in test_daemon.py,
which the other test files import; what lives here finds what a process left behind: loader
workers, shared-memory segments, sockets.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

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


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ``XDG_RUNTIME_DIR`` for this test and the daemons it starts; yields the
    ``flashmoe`` directory in it, where the loader sockets go."""
    d = scratch_dir("flr")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    yield d / "flashmoe"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def packed_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a packed store (per-layer files with checksums)."""
    from flashmoe.pack import pack

    return pack(tiny_model, tmp_path_factory.mktemp("packed") / "tiny-packed")
