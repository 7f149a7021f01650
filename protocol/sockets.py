"""Every ZeroMQ socket of the system is made here: one context, linger 0, bounded queues, ipc
endpoints in a private per-user runtime directory, and receives that always time out."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import zmq

from flashmoe.errors import RuntimeFileError
from flashmoe.protocol.messages import MAX_MESSAGE_BYTES, decode, encode

HWM = 100_000  # messages; the real bound is the slot count (one request per slot)
_MAX_IPC_PATH = 100  # sun_path is 104 (macOS) / 108 (Linux) bytes


def context() -> zmq.Context:
    """The process-wide context (workers are spawned, never forked, so one per process)."""
    return zmq.Context.instance()


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/flashmoe`` or ``<tempdir>/flashmoe-<uid>``, created with mode 0700."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    d = Path(xdg) / "flashmoe" if xdg else Path(tempfile.gettempdir()) / f"flashmoe-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = d.lstat()
    # A shared /tmp lets another user pre-create the directory: refuse it rather than trust it.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"runtime directory {d} is not a directory owned by this user")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(d, 0o700)
    return d


def ipc_endpoint(name: str) -> str:
    """``ipc://<runtime dir>/<name>``; raises if the path is too long for a unix socket."""
    path = runtime_dir() / name
    if len(str(path).encode()) > _MAX_IPC_PATH:
        raise ValueError(f"ipc path too long for a unix socket ({len(str(path))} bytes): {path}")
    return f"ipc://{path}"


def fresh_endpoint(prefix: str) -> str:
    """A new, unused ipc endpoint ``<prefix>-<pid>-<random>.sock``."""
    return ipc_endpoint(f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}.sock")


def check_own(path: Path, is_kind=stat.S_ISREG) -> os.stat_result:
    """``lstat(path)``, refusing a link, another kind of file, or a file of another user."""
    st = path.lstat()
    if not is_kind(st.st_mode) or st.st_uid != os.getuid():
        raise RuntimeFileError(f"{path} is a link, of another kind or not owned by this user")
    return st


def open_private(path: Path, flags: int) -> int:
    """``os.open`` of a runtime file (pid file, log) that never follows a link at ``path`` and
    refuses a file that is not a regular file of this user (mode 0600 when created)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RuntimeFileError(f"{path} is a symbolic link: refusing to follow it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise RuntimeFileError(f"{path} is not a regular file owned by this user")
    os.set_blocking(fd, True)
    return fd


def probe_unix_socket(path: Path) -> str | None:
    """None if something listens on the unix socket ``path``, else why not (missing, not a
    socket, nobody listening): a client can fail at once instead of after its timeout."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return "no such socket"
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISSOCK(mode):
        return "not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except OSError as e:  # ECONNREFUSED: a socket file left by a dead process
        return f"nobody listens ({e.strerror or e})"
    finally:
        probe.close()
    return None


def endpoint_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


class WakePipe:
    """A pipe that one thread polls beside its sockets (``fileno`` in a ``zmq.Poller``) and any
    other thread, or a signal handler, writes to (``wake``) to end that poll at once."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except OSError:  # full (a wake is pending anyway: BlockingIOError) or closed
            pass

    def drain(self) -> None:
        """Read the pending wakes, so that the next poll waits again."""
        try:
            while os.read(self._r, 4096):
                pass
        except OSError:  # empty (BlockingIOError) or closed
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


def _socket(kind: int, max_bytes: int) -> zmq.Socket:
    s = context().socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, HWM)
    s.setsockopt(zmq.RCVHWM, HWM)
    # Frames beyond the message limit are dropped by zmq itself (+ room for the tag frame).
    s.setsockopt(zmq.MAXMSGSIZE, max_bytes + 64)
    return s


def router(bind: str, max_bytes: int = MAX_MESSAGE_BYTES) -> zmq.Socket:
    """A ROUTER bound to ``bind``; sends to a peer that is gone raise instead of vanishing."""
    s = _socket(zmq.ROUTER, max_bytes)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    s.bind(bind)
    return s


def dealer(
    connect: str, identity: bytes | None = None, max_bytes: int = MAX_MESSAGE_BYTES
) -> zmq.Socket:
    """A DEALER connected to ``connect`` (``identity`` lets a ROUTER address it)."""
    s = _socket(zmq.DEALER, max_bytes)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    s.connect(connect)
    return s


def recv_with_timeout(sock: zmq.Socket, timeout_s: float) -> list[bytes] | None:
    """One multipart message, or None after ``timeout_s`` seconds."""
    if sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
        return sock.recv_multipart()
    return None


def send_msg(sock: zmq.Socket, msg: Any, identity: bytes | None = None) -> None:
    """Encode and send; ``identity`` addresses one peer of a ROUTER."""
    frames = encode(msg)
    sock.send_multipart(frames if identity is None else [identity, *frames])


def split_routed(frames: list[bytes]) -> tuple[bytes, list[bytes]]:
    """ROUTER frames -> (peer identity, message frames)."""
    return frames[0], frames[1:]


def recv_msg(
    sock: zmq.Socket, accept: frozenset[type], timeout_s: float, max_bytes: int = MAX_MESSAGE_BYTES
) -> Any:
    """Receive and decode one message (DEALER side) or None on timeout; ProtocolError if bad."""
    frames = recv_with_timeout(sock, timeout_s)
    return None if frames is None else decode(frames, accept, max_bytes)
