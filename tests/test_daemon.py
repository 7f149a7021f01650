"""flashmoe-daemon as a process: a real daemon on a tiny model, compared with ``Engine.generate``.

Every wait has a timeout; a daemon that does not come up fails the test, it never
hangs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import (
    BUDGET,
    CHAT,
    DAEMON,
    MAX_TOKENS,
    PROMPTS,
    SAMPLED,
    Daemon,
    shm_segments,
    short_dir,
    wait_for,
)

from flashmoe.protocol import sockets
from flashmoe.protocol.client import (
    Client,
    DaemonNotRunning,
    RequestRejected,
    pid_alive,
)
from flashmoe.protocol.messages import (
    CLIENT_ACCEPTS,
    PROTOCOL_VERSION,
    Error,
    Generate,
    StatusReply,
    StatusRequest,
    Token,
    decode,
    encode,
)

# -- serving ------------------------------------------------------------------------------------


def test_generate_equals_engine(daemon: Daemon, reference: dict) -> None:
    ids, text = reference[PROMPTS[0]]
    with daemon.client() as c:
        r = c.generate(PROMPTS[0], max_tokens=MAX_TOKENS)
        assert (r.token_ids, r.text) == (ids, text)
        assert r.finish_reason in ("length", "stop")
        assert r.stats["generation_tokens"] == len(ids) and r.stats["prompt_tokens"] > 0
        stream = c.generate(PROMPTS[0], max_tokens=MAX_TOKENS, stream=True)
        chunks = list(stream)
        assert [t for ch in chunks for t in ch.token_ids] == ids
        assert "".join(ch.text for ch in chunks) == text
        assert stream.result.token_ids == ids
        r = c.generate(PROMPTS[0], max_tokens=MAX_TOKENS, **SAMPLED)
        assert r.token_ids == reference["sampled"][0]


def test_chat_equals_engine(daemon: Daemon, reference: dict) -> None:
    with daemon.client() as c:
        r = c.chat(CHAT, max_tokens=MAX_TOKENS)
        assert (r.token_ids, r.text) == reference["chat"]
        chunks = list(c.chat(CHAT, max_tokens=MAX_TOKENS, stream=True))
        assert [t for ch in chunks for t in ch.token_ids] == reference["chat"][0]


def test_status(daemon: Daemon, reference: dict) -> None:
    with daemon.client() as c:
        st = c.status()
    assert st["pid"] == daemon.proc.pid
    assert st["model"] == reference["name"]
    assert st["workers"] and all(isinstance(w["pid"], int) and w["state"] for w in st["workers"])
    for key in ("uptime_s", "requests_served", "tokens_generated", "expert_hit_rate", "pool_bytes"):
        assert key in st
    out = subprocess.run(
        [*DAEMON, "status", "--socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    for row in ("model", "memory budget", "expert hit rate", "decode", "requests", "workers",
                "uptime", str(daemon.proc.pid), reference["name"], "context limit",
                f"{st['max_context']:,} tokens", "prefix cache"):
        assert row in out.stdout, (row, out.stdout)
    out = subprocess.run(
        [*DAEMON, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "FLASHMOE_SOCKET": str(daemon.socket)},
    )
    assert out.returncode == 0 and json.loads(out.stdout)["pid"] == daemon.proc.pid


def test_eight_concurrent_clients(daemon: Daemon, reference: dict) -> None:
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            with daemon.client() as c:
                if i % 2:
                    results[i] = c.generate(PROMPTS[i], max_tokens=MAX_TOKENS).token_ids
                else:
                    stream = c.generate(PROMPTS[i], max_tokens=MAX_TOKENS, stream=True)
                    results[i] = [t for ch in stream for t in ch.token_ids]
        except Exception as e:  # reported below, in the test's thread
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert results == {i: reference[PROMPTS[i]][0] for i in range(8)}


def test_bad_messages_get_errors_and_the_loop_survives(daemon: Daemon) -> None:
    huge = Generate(id="x", prompt="hi", max_tokens=10**6)
    bad_version = encode(Generate(id="v", prompt="hi"))
    v = PROTOCOL_VERSION
    bad_version[1] = bad_version[1].replace(b"\xa1v" + bytes([v]), b"\xa1v" + bytes([v + 99]))
    cases = {
        "bad_frames": [b"\x10"],
        "unknown_type": [b"\xff", b"\x80"],
        "unexpected_type": encode(Token(id="t", text="", ids=[])),
        "bad_payload": [bytes([Generate.TAG]), b"\xc1"],
        "bad_version": bad_version,
        "too_large": [bytes([Generate.TAG]), b"\x00" * (4 * 1024 * 1024 + 1)],
        "invalid_request": encode(huge),
    }
    sock = sockets.dealer(daemon.paths.endpoint)
    try:
        for code, frames in cases.items():
            sock.send_multipart(frames)
            reply = decode(sockets.recv_with_timeout(sock, 10), CLIENT_ACCEPTS)
            assert type(reply) is Error and reply.code == code, (code, reply)
        sock.send_multipart(encode(StatusRequest()))
        assert type(decode(sockets.recv_with_timeout(sock, 10), CLIENT_ACCEPTS)) is StatusReply
    finally:
        sock.close(linger=0)
    with daemon.client() as c:
        with pytest.raises(RequestRejected, match="top_p"):
            c.generate("hi", top_p=0.0)
        with pytest.raises(RequestRejected, match="max_tokens"):
            c.generate("hi", max_tokens=0)  # caught by the client before sending


def _running(daemon: Daemon) -> int:
    with daemon.client() as c:
        return c.status()["requests_running"]


def test_closed_stream_and_gone_client_are_cancelled(daemon: Daemon) -> None:
    with daemon.client() as c:
        before = c.status()
        stream = c.generate(PROMPTS[0], max_tokens=480, stream=True)
        next(stream)
        stream.close()  # sends Cancel
        wait_for(lambda: _running(daemon) == 0, 10, "the closed stream to be cancelled")
        t0 = time.monotonic()
        stream = c.generate(PROMPTS[1], max_tokens=480, stream=True)
        next(stream)
        del stream  # garbage-collected: cancelled too
        wait_for(lambda: _running(daemon) == 0, 10, "the dropped stream to be cancelled")
        assert time.monotonic() - t0 < 10
        after = c.status()  # counted apart from the requests served
        assert after["requests_cancelled"] == before["requests_cancelled"] + 2
        assert after["requests_served"] == before["requests_served"]
    # A raw peer that vanishes without a Cancel: the daemon notices when a token cannot be sent.
    sock = sockets.dealer(daemon.paths.endpoint)
    sock.send_multipart(encode(Generate(id="gone", prompt="hi", max_tokens=480)))
    assert sockets.recv_with_timeout(sock, 10) is not None
    sock.close(linger=0)
    wait_for(lambda: _running(daemon) == 0, 10, "the vanished client's request to be cancelled")


# -- lifecycle ------------------------------------------------------------------------------------


def test_detached_start_status_logs_stop(tiny_model: Path) -> None:
    d = short_dir()
    sock = str(d / "d.sock")
    try:
        out = subprocess.run(
            [
                *DAEMON,
                "start",
                "--model",
                str(tiny_model),
                "--socket",
                sock,
                "--memory-budget",
                BUDGET,
                "--workers",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "ready in" in out.stdout
        with Client(sock, timeout=10) as c:
            st = c.status()
        pid = st["pid"]
        assert pid != os.getpid() and shm_segments(pid)
        for mode in ([], ["--foreground"]):  # a second start on the same socket is refused
            again = subprocess.run(
                [*DAEMON, "start", *mode, "--model", str(tiny_model), "--socket", sock],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert again.returncode != 0 and "already running" in again.stderr
            assert f"pid {pid}" in again.stderr
        logs = subprocess.run(
            [*DAEMON, "logs", "--socket", sock, "-n", "5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert logs.returncode == 0 and "ready in" in logs.stdout
        stop = subprocess.run(
            [*DAEMON, "stop", "--socket", sock], capture_output=True, text=True, timeout=90
        )
        assert stop.returncode == 0, stop.stderr
        assert sorted(os.listdir(d)) == ["d.sock.log"]  # no socket, no pid file
        assert not shm_segments(pid)
        wait_for(lambda: not any(pid_alive(w["pid"]) for w in st["workers"]), 10, "workers to exit")
        with pytest.raises(DaemonNotRunning):
            Client(sock)
        out = subprocess.run(
            [*DAEMON, "stop", "--socket", sock], capture_output=True, text=True, timeout=30
        )
        assert out.returncode != 0 and "not running" in out.stderr
    finally:
        subprocess.run([*DAEMON, "stop", "--socket", sock], capture_output=True, timeout=90)
        shutil.rmtree(d, ignore_errors=True)


def test_start_failure_prints_the_reason(tmp_path: Path) -> None:
    d = short_dir()
    try:
        out = subprocess.run(
            [*DAEMON, "start", "--model", str(tmp_path / "missing"), "--socket", str(d / "d.sock")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode != 0
        assert "failed to start" in out.stderr and "missing" in out.stderr
        assert not (d / "d.sock").exists() and not (d / "d.sock.pid").exists()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_stale_files_are_removed_and_sigkill_mid_request_raises(tiny_model: Path) -> None:
    from flashmoe.shm.pool import cleanup_stale

    sock = short_dir() / "d.sock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    sock.with_name("d.sock.pid").write_text(f"{dead.pid}\n")
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(sock))  # the socket file a SIGKILLed daemon leaves behind
    left.close()
    d = Daemon(tiny_model, sock=sock)
    try:
        st = d.wait_ready()
        assert st["pid"] == d.proc.pid
        errors: list[Exception] = []

        def blocking() -> None:
            try:
                with d.client(timeout=60) as c:
                    c.generate(PROMPTS[1], max_tokens=200)
            except Exception as e:
                errors.append(e)

        t = threading.Thread(target=blocking)
        t.start()
        with d.client(timeout=60) as c:
            stream = c.generate(PROMPTS[0], max_tokens=200, stream=True)
            next(stream)
            os.kill(d.proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(DaemonNotRunning, match="died"):
                for _ in stream:
                    pass
            assert time.monotonic() - t0 < 5
        t.join(10)
        assert not t.is_alive() and type(errors[0]) is DaemonNotRunning
    finally:
        d.close()
        cleanup_stale()  # a SIGKILLed creator cannot unlink its segment: the next start does


def test_sigterm_drains_and_cleans_up(tiny_model: Path) -> None:
    d = Daemon(tiny_model)
    try:
        d.wait_ready()
        with d.client() as c:
            stream = c.generate(PROMPTS[0], max_tokens=MAX_TOKENS, stream=True)
            next(stream)
            d.proc.send_signal(signal.SIGTERM)
            list(stream)  # the running request finishes
            assert stream.result.finish_reason in ("length", "stop")
        assert d.proc.wait(30) == 0
        assert not d.socket.exists() and not d.paths.pid.exists()
        assert not shm_segments(d.proc.pid)
    finally:
        d.close()


def test_socket_is_private(daemon: Daemon) -> None:
    assert (daemon.socket.stat().st_mode & 0o777) == 0o600
