"""The client library and the ``flashmoe generate`` / ``chat`` commands.

Failure modes run against a fake daemon (a bare ROUTER that never answers); the rest against a
real daemon on the tiny model (its fixtures in conftest.py, helpers in support.py).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from support import CHAT, MAX_TOKENS, PROMPTS, Daemon, short_dir

import flashmoe
from flashmoe.cli import main as cli_main
from flashmoe.protocol import sockets
from flashmoe.protocol.client import (
    Client,
    ClientError,
    DaemonNotRunning,
    RequestRejected,
    Timeout,
    daemon_paths,
)
from flashmoe.protocol.messages import DAEMON_ACCEPTS, Cancel, Generate, decode


@pytest.fixture
def fake_daemon():
    """A ROUTER on a private socket that reads but never answers; the pid file names us."""
    d = short_dir()
    paths = daemon_paths(d / "d.sock")
    router = sockets.router(paths.endpoint)
    paths.pid.write_text(f"{os.getpid()}\n")
    yield paths, router
    router.close(linger=0)
    shutil.rmtree(d, ignore_errors=True)


def test_exceptions_and_reexport() -> None:
    assert flashmoe.Client is Client and flashmoe.__version__
    for exc in (DaemonNotRunning, Timeout, RequestRejected):
        assert issubclass(exc, ClientError) and issubclass(exc, flashmoe.FlashMoeError)
        assert getattr(flashmoe, exc.__name__) is exc


def test_no_daemon(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="no flashmoe-daemon"):
        Client(tmp_path / "none.sock")
    sock = tmp_path / "stale.sock"
    sock.write_bytes(b"")
    daemon_paths(sock).pid.write_text("999999999\n")  # beyond any pid_max
    with pytest.raises(DaemonNotRunning):
        Client(sock)


def test_timeout_cancels_the_request(fake_daemon) -> None:
    paths, router = fake_daemon
    with Client(paths.socket, timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(Timeout, match="timeout"):
            c.generate("hi")
        assert time.monotonic() - t0 < 2
        with pytest.raises(Timeout):
            c.status()
    got = []
    while (frames := sockets.recv_with_timeout(router, 0.3)) is not None:
        got.append(decode(frames[1:], DAEMON_ACCEPTS))
    assert type(got[0]) is Generate and type(got[1]) is Cancel and got[1].id == got[0].id


def test_daemon_gone_mid_request(fake_daemon) -> None:
    paths, router = fake_daemon
    errors: list[Exception] = []

    def waiting() -> None:
        try:
            with Client(paths.socket, timeout=60) as c:
                c.generate("hi")
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=waiting)
    t.start()
    assert sockets.recv_with_timeout(router, 10) is not None
    paths.socket.unlink()  # what a stopping daemon does
    t.join(10)
    assert not t.is_alive() and type(errors[0]) is DaemonNotRunning


def test_cancel_by_id(daemon: Daemon) -> None:
    with daemon.client() as c:
        stream = c.generate(PROMPTS[0], max_tokens=480, stream=True)
        next(stream)
        c.cancel(stream.id)
        n = sum(1 for _ in stream)
        assert stream.result.finish_reason == "cancelled" and n < 480


def test_generate_from_token_ids(daemon: Daemon, reference: dict) -> None:
    ids = reference["prompt_ids"]
    with daemon.client() as c:
        r = c.generate(ids, max_tokens=MAX_TOKENS)
        assert r.token_ids == reference[PROMPTS[2]][0]
        streamed = [t for ch in c.generate(tuple(ids), max_tokens=MAX_TOKENS, stream=True)
                    for t in ch.token_ids]
        assert streamed == reference[PROMPTS[2]][0]
        for bad in ([], [-1], [1.5], [True], [2**40]):
            with pytest.raises(RequestRejected):
                c.generate(bad, max_tokens=4)
        with pytest.raises(RequestRejected, match="0"):
            c.generate([10**9], max_tokens=4)  # past the vocabulary: the engine says so


def test_options_are_the_requests_fields(daemon: Daemon, reference: dict) -> None:
    """generate and chat take every field a request has (stop, logprobs, ...) and refuse
    others by name before anything is sent."""
    want = reference[PROMPTS[2]][0]
    with daemon.client() as c:
        full = c.generate(PROMPTS[2], max_tokens=MAX_TOKENS)
        assert full.token_ids == want
        cut = c.generate(PROMPTS[2], max_tokens=MAX_TOKENS, stop=[full.text[4:8]])
        assert cut.finish_reason == "stop" and full.text.startswith(cut.text)
        assert len(cut.text) < len(full.text)
        with pytest.raises(RequestRejected, match="unknown request option: bogus"):
            c.generate("hi", bogus=1)
        with pytest.raises(RequestRejected, match="unknown request option: prompt"):
            c.chat([{"role": "user", "content": "hi"}], prompt="x")


def test_one_client_shared_by_threads(daemon: Daemon, reference: dict) -> None:
    out: dict[int, object] = {}
    with daemon.client() as c:

        def one(i: int) -> None:
            try:
                out[i] = [t for ch in c.generate(PROMPTS[i], max_tokens=MAX_TOKENS, stream=True)
                          for t in ch.token_ids]  # fmt: skip
            except Exception as e:
                out[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert out == {i: reference[PROMPTS[i]][0] for i in range(4)}


def test_cli_generate(daemon: Daemon, reference: dict, capsys: pytest.CaptureFixture) -> None:
    text = reference[PROMPTS[0]][1]
    args = ["generate", PROMPTS[0], "--socket", str(daemon.socket), "--max-tokens", str(MAX_TOKENS)]
    assert cli_main(args) == 0
    assert capsys.readouterr().out == text + "\n"
    assert cli_main([*args, "--no-stream"]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert cli_main([*args, "--top-p", "0"]) == 2
    assert "top-p" in capsys.readouterr().err


def test_socket_from_environment(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHMOE_SOCKET", str(daemon.socket))
    with Client(timeout=10) as c:
        assert c.status()["pid"] == daemon.proc.pid


def test_cli_no_daemon(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["generate", "hi", "--socket", str(tmp_path / "none.sock")]) == 2
    assert "error: no flashmoe-daemon" in capsys.readouterr().err


def test_cli_chat_keeps_history(
    daemon: Daemon, reference: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = reference["chat"][1]
    monkeypatch.setattr(
        "sys.stdin", io.StringIO(f"{CHAT[0]['content']}\n\nAnd wolves?\n/exit\nx\n")
    )
    args = ["chat", "--socket", str(daemon.socket), "--max-tokens", str(MAX_TOKENS)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    history = [
        *CHAT,
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And wolves?"},
    ]
    with daemon.client() as c:
        second = c.chat(history, max_tokens=MAX_TOKENS).text
    assert out == f"{first}\n{second}\n"
