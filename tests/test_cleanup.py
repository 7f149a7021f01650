"""Every exit path cleans up: ``flashmoe run`` ended by SIGTERM or SIGINT mid-generation leaves no
shared-memory segment, loader socket or loader worker; the daemon's runtime files are never
opened through a link; its log rotates; `--model .` is served under the folder's name."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import Daemon, loader_workers, shm_segments, short_dir, wait_for

from flashmoe.errors import RuntimeFileError
from flashmoe.orchestrator import lifecycle
from flashmoe.protocol import sockets
from flashmoe.protocol.client import DaemonPaths


def _loader_sockets(pid: int) -> list[str]:
    return [p.name for p in sockets.runtime_dir().glob(f"loaders-{pid}-*.sock")]


def test_run_killed_mid_generation_leaves_nothing(tiny_model: Path) -> None:
    """SIGTERM (Ctrl-C takes the same way out: flashmoe.signals)."""
    sig = signal.SIGTERM
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashmoe.cli", "run", "--model", str(tiny_model), "--prompt",
         "Once upon a time", "--max-tokens", "240", "--memory-budget", "1600KiB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        first = proc.stdout.read(1)  # generation has begun: workers, pool and socket exist
        assert first, proc.stderr.read().decode()
        assert shm_segments(proc.pid) and _loader_sockets(proc.pid) and loader_workers(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err.decode()
    assert b"Traceback" not in err
    assert shm_segments(proc.pid) == [] and _loader_sockets(proc.pid) == []
    wait_for(lambda: not loader_workers(proc.pid), 10, "loader workers to exit")


def test_runtime_files_never_follow_links(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "d.sock.pid"
    link.symlink_to(victim)
    with pytest.raises(RuntimeFileError, match="link"):
        sockets.open_private(link, os.O_RDWR | os.O_CREAT)
    with pytest.raises(RuntimeFileError):
        sockets.open_private(tmp_path, os.O_RDONLY)  # not a regular file
    assert victim.read_text() == "precious"
    # the daemon refuses to start on a linked pid file or log, in one line, touching nothing
    for name in ("d.sock.pid", "d.sock.log"):
        for p in tmp_path.glob("d.sock*"):
            p.unlink()
        (tmp_path / name).symlink_to(victim)
        out = subprocess.run(
            [sys.executable, "-m", "flashmoe.orchestrator.daemon", "start", "--foreground",
             "--model", str(tmp_path), "--socket", str(tmp_path / "d.sock")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert "link" in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert victim.read_text() == "precious"


def test_stop_removes_only_a_dead_daemons_socket(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out = subprocess.run(
        [sys.executable, "-m", "flashmoe.orchestrator.daemon", "stop", "--socket", str(notes)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "not running" in out.stderr
    assert notes.read_text() == "mine"


def test_log_rotates(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(lifecycle, "LOG_MAX_BYTES", 4096)
    paths = DaemonPaths(tmp_path / "d.sock")
    handler = lifecycle.LogFile(paths.log, owns_std=False)
    logger = logging.getLogger("flashmoe.test-rotation")
    logger.addHandler(handler)
    try:
        for i in range(400):
            logger.warning("line %d %s", i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert paths.log.stat().st_size <= 4096
    old = paths.log.with_name(paths.log.name + ".1")
    assert old.stat().st_size <= 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.sock.log", "d.sock.log.1"]


def test_model_dot_is_served_under_its_folder_name(tiny_model: Path) -> None:
    sock = short_dir() / "d.sock"
    cwd = os.getcwd()
    os.chdir(tiny_model)
    try:
        d = Daemon(Path("."), sock=sock)
    finally:
        os.chdir(cwd)
    try:
        assert d.wait_ready()["model"] == tiny_model.name
    finally:
        d.close()
    d = Daemon(tiny_model, "--served-model-name", "house-model")
    try:
        assert d.wait_ready()["model"] == "house-model"
    finally:
        d.close()


def test_broken_pipe_is_one_line(tiny_model: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashmoe.cli", "run", "--model", str(tiny_model), "--prompt",
         "Once upon a time", "--max-tokens", "2000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.read(1)
    proc.stdout.close()  # `| head -c1`
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 2, err
    assert "Traceback" not in err and err.strip().splitlines() == [
        "error: output closed before the end (broken pipe)"
    ]
    assert shm_segments(proc.pid) == [] and _loader_sockets(proc.pid) == []


def test_client_errors_carry_no_server_paths() -> None:
    from flashmoe.orchestrator.service import public_error

    msg = "layer 3 expert 17: /srv/models/q/experts/layer-003.bin at offset 4096: I/O error"
    assert public_error(msg) == "layer 3 expert 17: layer-003.bin at offset 4096: I/O error"
    assert public_error("cannot read /home/u/m/") == "cannot read <dir>"


def test_signals_unwind_and_handlers_come_back() -> None:
    from flashmoe.signals import Terminated, unwind_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for sig, exc in ((signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)):
        with pytest.raises(exc), unwind_on_signals():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises here, at once
        assert {s: signal.getsignal(s) for s in before} == before
