"""Output folders of ``pack`` and ``synth``: they only ever remove what flashmoe itself wrote.

A command writes into ``OUT.partial`` and renames it to ``OUT`` at the end. Each such folder holds
a small marker file, written before anything else, so that:

- an ``OUT.partial`` with our marker is the leftover of an interrupted run and is removed; any
  other ``OUT.partial`` (a file, a link, someone's folder) is an error;
- ``--force`` replaces ``OUT`` only when it is a real folder (not a link) that flashmoe wrote,
  never one holding the source being read, never a file.

Writes that fail because the disk is full, read-only or not ours end in one ``OutputError`` line.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flashmoe.errors import OutputError

MARKER = ".flashmoe-output"
# errnos of the place written to, not of flashmoe: each is one line for the user
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                         errno.EFBIG, errno.ENAMETOOLONG, errno.ENOTDIR})  # fmt: skip


def is_ours(path: Path, also: Callable[[Path], bool] | None = None) -> bool:
    """True if ``path`` is a real folder (not a link) that flashmoe wrote: it holds our marker as a
    regular file, or ``also(path)`` recognises it (a packed store's manifest)."""
    try:
        if not stat.S_ISDIR(path.lstat().st_mode):
            return False
        if stat.S_ISREG((path / MARKER).lstat().st_mode):
            return True
    except OSError:
        pass
    try:
        return also is not None and stat.S_ISDIR(path.lstat().st_mode) and also(path)
    except OSError:
        return False


def _holds(folder: Path, inner: Path) -> bool:
    folder, inner = folder.resolve(), inner.resolve()
    return inner == folder or folder in inner.parents


def _check_target(out: Path, force: bool, sources: Iterable[Path], also) -> None:
    for src in sources:
        if _holds(out, src):
            raise OutputError(f"{out} holds the source {src}: write the output somewhere else")
    if not os.path.lexists(out):
        return
    if not is_ours(out, also):
        kind = "a link" if out.is_symlink() else "a file" if not out.is_dir() else "a folder"
        raise OutputError(
            f"{out} exists and is {kind} that flashmoe did not write: choose another path "
            "(--force only replaces an earlier output of pack or synth)"
        )
    if not force:
        raise OutputError(f"{out} exists (use --force to overwrite)")


def _fresh_partial(out: Path, tool: str) -> Path:
    partial = out.with_name(out.name + ".partial")
    if os.path.lexists(partial):
        if not is_ours(partial):
            raise OutputError(
                f"{partial} exists and is not an unfinished output of flashmoe: remove it "
                "yourself or choose another path"
            )
        shutil.rmtree(partial)  # left by an interrupted run
    out.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(partial)
    (partial / MARKER).write_text(json.dumps({"written_by": f"flashmoe {tool}"}) + "\n")
    return partial


def _publish(partial: Path, out: Path, also) -> None:
    if not os.path.lexists(out):
        os.rename(partial, out)
        return
    if not is_ours(out, also):  # it changed while we wrote
        raise OutputError(f"{out} changed while writing and is no longer flashmoe's; left as is")
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(old)


@contextmanager
def output_dir(
    out: str | os.PathLike,
    tool: str,
    *,
    force: bool = False,
    sources: Iterable[str | os.PathLike] = (),
    also: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Check ``out``, yield a fresh marked ``OUT.partial`` to write into, then move it to ``out``.

    Args:
        out: the folder to produce.
        tool: the command's name, recorded in the marker ("pack", "synth").
        force: replace an existing ``out`` that flashmoe wrote.
        sources: folders being read; ``out`` may not hold any of them.
        also: recognises an earlier output without a marker (a packed store's manifest).

    Raises:
        OutputError: ``out`` or ``OUT.partial`` is not ours to replace, or the disk refused a write.
    """
    out = Path(out).absolute()
    try:
        _check_target(out, force, [Path(s) for s in sources], also)
        partial = _fresh_partial(out, tool)
    except OSError as e:
        raise _disk_error(out, e) from None
    try:
        yield partial
        _publish(partial, out, also)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError):
            raise _disk_error(out, e) from None
        raise


def _disk_error(out: Path, e: OSError) -> Exception:
    if e.errno not in DISK_ERRNOS:
        return e
    return OutputError(f"cannot write {out}: {e.strerror or e}")
