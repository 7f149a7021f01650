"""A progress line on stderr while a model loads (``run``, ``flashmoe-daemon start``): the model's
name and the time so far, refreshed by a thread, shown only on a terminal."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def loading(model: str, enabled: bool | None = None) -> Iterator[None]:
    """Show ``loading NAME: 0:03`` until the block ends (``enabled``: default, stderr is a tty)."""
    if not (sys.stderr.isatty() if enabled is None else enabled):
        yield
        return
    from tqdm import tqdm

    name = os.path.basename(os.path.abspath(model))
    bar = tqdm(desc=f"loading {name}", bar_format="{desc}: {elapsed}", file=sys.stderr,
               leave=False)  # fmt: skip
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.25):
            bar.refresh()

    t = threading.Thread(target=tick, name="flashmoe-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        bar.close()
