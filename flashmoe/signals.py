"""SIGTERM and SIGINT end a foreground command (``run``, ``bench``) by unwinding it, so every
``with`` block on the way out closes what it opened: loader workers, their sockets, the shared
memory. A second signal during that cleanup is ignored, so the cleanup runs to its end."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Terminated(BaseException):
    """SIGTERM arrived (a ``BaseException``, like ``KeyboardInterrupt``: nothing catches it)."""


def _unwind(signum: int, frame: object) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


@contextmanager
def unwind_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` and SIGINT ``KeyboardInterrupt`` in the
    main thread; the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _unwind) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
