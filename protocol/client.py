"""The client library of ``flashmoe-daemon``.

    from flashmoe import Client

    with Client() as c:                      # the default socket, or Client(socket="...")
        r = c.generate("The quick brown fox", max_tokens=32)
        print(r.text, r.token_ids, r.finish_reason, r.stats)
        for chunk in c.chat([{"role": "user", "content": "Hi"}], stream=True):
            print(chunk.text, end="", flush=True)

A client owns one DEALER socket. It is safe to share between threads (one lock guards the
socket; replies are sorted by request id), but a Client per thread is simpler and just as cheap.
Every wait is cut into short slices; between slices the client checks that the daemon's process
and socket still exist, so a daemon that dies mid-request raises ``DaemonNotRunning`` instead of
hanging. ``timeout`` bounds the wait for each message: the next token of a stream, or the whole
result of a non-streamed request.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil
import zmq

from flashmoe.configs import load_settings
from flashmoe.errors import FlashMoeError
from flashmoe.protocol import sockets
from flashmoe.protocol.messages import (
    CLIENT_ACCEPTS,
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

SOCKET_NAME = "daemon.sock"
_SLICE_S = 0.05  # longest a waiter holds the socket lock
_LIVENESS_EVERY_S = 0.2


# The options of generate/chat: a request's fields, less those the client sets itself.
_OPTIONS = {f.name for f in fields(Generate)} - {"id", "stream", "prompt", "messages",
                                                  "prompt_ids"}


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise RequestRejected(f"unknown request option: {unknown[0]}", "bad_request")
    return options


class ClientError(FlashMoeError):
    """Base class of every error the client raises."""


class DaemonNotRunning(ClientError):
    """No daemon at the socket, or it died while a request was in flight."""


class Timeout(ClientError):
    """The daemon sent nothing for ``timeout`` seconds."""


class RequestRejected(ClientError):
    """The daemon refused or failed the request; ``code`` is its short reason."""

    def __init__(self, message: str, code: str = "rejected"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DaemonPaths:
    """The socket of a daemon and the files that live next to it."""

    socket: Path

    @property
    def pid(self) -> Path:
        return self.socket.with_name(self.socket.name + ".pid")

    @property
    def log(self) -> Path:
        return self.socket.with_name(self.socket.name + ".log")

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket}"


def daemon_paths(socket: str | os.PathLike | None = None) -> DaemonPaths:
    """Resolve the daemon socket: ``socket``, else ``FLASHMOE_SOCKET`` / settings, else the default
    ``<runtime dir>/daemon.sock``."""
    chosen = socket or load_settings().socket
    path = Path(chosen).expanduser().absolute() if chosen else sockets.runtime_dir() / SOCKET_NAME
    return DaemonPaths(path)


def read_pid(paths: DaemonPaths) -> int | None:
    """The pid in the pid file, or None when there is none (or it is unreadable)."""
    try:
        fd = sockets.open_private(paths.pid, os.O_RDONLY)
    except (OSError, FlashMoeError):  # missing, a link, not this user's
        return None
    with os.fdopen(fd) as f:
        try:
            return int(f.read(64).split()[0])
        except (ValueError, IndexError):
            return None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (a killed child not yet reaped counts as dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


@dataclass
class Result:
    """A finished request: the generated text and token ids, engine stats and why it ended."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)


@dataclass
class StreamChunk:
    """One piece of a streamed request, as the engine produced it."""

    text: str
    token_ids: list[int]


class _Closing:
    """``with`` closes it, and so does garbage collection (a stream dropped unread is
    cancelled, a client dropped unclosed lets its socket go)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown, a closed client: nothing left to release
            pass


class Stream(_Closing):
    """Iterator of ``StreamChunk``s; ``result`` holds the ``Result`` once it is exhausted.

    Closing it (or dropping it) before the end cancels the request in the daemon.
    """

    def __init__(self, client: Client, req_id: str):
        self.id = req_id
        self.result: Result | None = None
        self._client = client
        self._done = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        try:
            msg = self._client._recv(self.id)
        except ClientError:
            self.close()
            raise
        if type(msg) is Token:
            return StreamChunk(msg.text, msg.ids)
        self._finish()
        if type(msg) is Done:
            self.result = Result(msg.id, msg.text, msg.ids, msg.finish_reason, msg.stats)
            raise StopIteration
        raise RequestRejected(msg.message, msg.code)

    def wait(self) -> Result:
        """Consume the rest of the stream and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def close(self) -> None:
        """Cancel the request if it has not finished."""
        if not self._done:
            self._finish()
            self._client._cancel_quietly(self.id)

    def _finish(self) -> None:
        self._done = True
        self._client._forget(self.id)


class Client(_Closing):
    """A connection to a running ``flashmoe-daemon``.

    Args:
        socket: the daemon's socket path (default: ``FLASHMOE_SOCKET`` or the per-user default).
        timeout: seconds to wait for each message from the daemon.

    Raises:
        DaemonNotRunning: no live daemon owns the socket.
    """

    def __init__(self, socket: str | os.PathLike | None = None, timeout: float = 60.0):
        self.paths = daemon_paths(socket)
        self.timeout = timeout
        self._pid = read_pid(self.paths)
        why = sockets.probe_unix_socket(self.paths.socket)
        if why is None and self._pid is not None and not pid_alive(self._pid):
            why = f"its daemon (pid {self._pid}) is gone"
        if why is not None:
            raise DaemonNotRunning(
                f"no flashmoe-daemon at {self.paths.socket}: {why} "
                "(start one with `flashmoe-daemon start --model M`)"
            )
        self._lock = threading.RLock()  # RLock: a Stream collected mid-call may cancel re-entrantly
        self._inbox: dict[str, deque] = {}
        self._replies: deque = deque()  # StatusReply and id-less Errors
        self._streams: weakref.WeakValueDictionary[str, Stream] = weakref.WeakValueDictionary()
        self._next_check = 0.0
        self._sock: zmq.Socket | None = sockets.dealer(self.paths.endpoint)

    # -- public API ---------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], *, stream: bool = False,
                 **options: Any) -> Result | Stream:
        """Complete raw text, or token ids (a list of ints, used as they are, no special
        tokens added). Returns a ``Result``, or with ``stream=True`` a ``Stream``. ``options``
        are a request's fields (``flashmoe.protocol.request.Request``): ``max_tokens`` (256),
        ``temperature`` (0: greedy), ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``,
        ``logprobs``, ``top_logprobs``.

        Raises:
            RequestRejected: invalid parameters, prompt too long, engine error.
            Timeout, DaemonNotRunning: see the class docstring.
        """
        ids = isinstance(prompt, (list, tuple))
        return self._start(stream, prompt=None if ids else prompt,
                           prompt_ids=list(prompt) if ids else None, **_options(options))

    def chat(self, messages: list[dict], *, stream: bool = False,
             **options: Any) -> Result | Stream:
        """Like ``generate`` for a conversation ``[{"role": ..., "content": ...}, ...]``, rendered
        with the model's chat template."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self._start(stream, messages=messages, **_options(options))

    def status(self) -> dict:
        """The daemon's status: model, pid, uptime, workers, pool, hit rate, tokens/s, ..."""
        self._send(StatusRequest())
        msg = self._recv(None)
        if type(msg) is Error:
            raise RequestRejected(msg.message, msg.code)
        return msg.status

    def cancel(self, request_id: str) -> None:
        """Cancel one of this client's requests (it ends with finish_reason ``cancelled``)."""
        self._send(Cancel(id=request_id))

    def shutdown(self) -> None:
        """Ask the daemon to drain and stop; returns once it has acknowledged."""
        self._send(Shutdown())
        self._recv(None)

    def close(self) -> None:
        """Cancel unfinished streams and close the socket."""
        with self._lock:
            if self._sock is None:
                return
            for s in list(self._streams.values()):
                s.close()
            self._sock.close(linger=0)
            self._sock = None

    # -- internals ----------------------------------------------------------------------------

    def _start(self, stream: bool, **fields: Any) -> Result | Stream:
        req_id = uuid.uuid4().hex
        try:
            msg = Generate(id=req_id, stream=stream, **fields)
            frames = encode(msg)
        except ProtocolError as e:  # caught here so a bad value never reaches the daemon
            raise RequestRejected(e.message, e.code) from None
        with self._lock:
            self._inbox[req_id] = deque()
            self._send_frames(frames)
            s = Stream(self, req_id)
            self._streams[req_id] = s
        return s if stream else s.wait()

    def _send(self, msg: Any) -> None:
        self._send_frames(encode(msg))

    def _send_frames(self, frames: list[bytes]) -> None:
        with self._lock:
            if self._sock is None:
                raise ClientError("client is closed")
            try:
                self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                msg = f"flashmoe-daemon at {self.paths.socket} is not reading"
                raise DaemonNotRunning(msg) from None

    def _recv(self, req_id: str | None) -> Any:
        """The next message for ``req_id`` (None: the next status/ack reply)."""
        deadline = time.monotonic() + self.timeout
        while True:
            with self._lock:
                box = self._replies if req_id is None else self._inbox.get(req_id)
                if box is None:
                    raise ClientError(f"request {req_id} is not in flight")
                if box:
                    return box.popleft()
                if self._sock is None:
                    raise ClientError("client is closed")
                left = deadline - time.monotonic()
                if self._sock.poll(int(max(0.0, min(left, _SLICE_S)) * 1000) or 1, zmq.POLLIN):
                    self._route(self._sock.recv_multipart())
                    continue
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + _LIVENESS_EVERY_S
                self._check_alive()
            if now >= deadline:
                if req_id is not None:
                    self._cancel_quietly(req_id)
                raise Timeout(
                    f"no reply from flashmoe-daemon in {self.timeout:g} s "
                    "(raise Client(timeout=...) / --timeout)"
                )

    def _route(self, frames: list[bytes]) -> None:
        try:
            msg = decode(frames, CLIENT_ACCEPTS)
        except ProtocolError as e:
            raise ClientError(f"bad reply from flashmoe-daemon: {e}") from None
        req_id = getattr(msg, "id", None)
        if req_id is None or type(msg) is StatusReply:
            self._replies.append(msg)
        elif req_id in self._inbox:
            self._inbox[req_id].append(msg)
        # else: a late message for a request already cancelled or finished

    def _check_alive(self) -> None:
        if not self.paths.socket.exists():
            raise DaemonNotRunning(f"flashmoe-daemon at {self.paths.socket} has stopped")
        if self._pid is not None and not pid_alive(self._pid):
            raise DaemonNotRunning(f"flashmoe-daemon (pid {self._pid}) died")

    def _cancel_quietly(self, req_id: str) -> None:
        with self._lock:
            self._forget(req_id)
            if self._sock is not None:
                try:
                    self._sock.send_multipart(encode(Cancel(id=req_id)), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def _forget(self, req_id: str) -> None:
        with self._lock:
            self._inbox.pop(req_id, None)
            self._streams.pop(req_id, None)
