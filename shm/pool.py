"""The expert pool: a fixed set of equal slots in one POSIX shared-memory segment.

Loader workers write expert records into slots; the coordinator reads them (and copies them into
its MLX cache). Only the coordinator decides which slot holds what (``orchestrator/slots.py``);
this module only creates, maps, names and removes the segment.

Byte layout of the segment (all integers little-endian)::

    offset 0        header page (HEADER_BYTES = 16 KiB)
        0   8 bytes  magic  b"FMOEPOOL"
        8   u32      layout version (3)
        12  u32      nslots
        16  u64      slot_bytes
        24  u64      creator pid
        ...          zero
    offset HEADER_BYTES + i * slot_bytes   slot i, slot_bytes long (a multiple of 16 KiB)

The mapping base is page-aligned (mmap) and slots are 16 KiB multiples, so every slot starts on a
page boundary (16 KiB on Apple Silicon, 4 KiB on x86 Linux): O_DIRECT reads land straight in a
slot, and Metal can wrap a slot without a copy.

Name: ``flashmoe-<uid>-<creator pid>-<6 hex>`` (``/``-prefixed for shm_open; short enough for
macOS's 31-character limit). Only the creator unlinks. ``cleanup_stale()`` unlinks segments of
this user whose creator pid is dead (a crash or SIGKILL), and is called at every start.

We use ``_posixshmem.shm_open`` + ``mmap`` rather than ``multiprocessing.shared_memory``: the
latter registers every segment, even an attached one, with a resource tracker that unlinks it
or warns about it behind our back when a worker exits.
"""

from __future__ import annotations

import _posixshmem
import errno
import mmap
import os
import secrets
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from flashmoe.store import RecordLayout

SLOT_ALIGN = 16384
HEADER_BYTES = 16384
MAGIC = b"FMOEPOOL"
LAYOUT_VERSION = 3
_HEADER = struct.Struct("<8sIIQQ")
_PREFIX = "flashmoe-"

# numpy has no bfloat16: its bits are viewed as uint16 (MLX views them back as bfloat16).
_NP_DTYPES = {
    "bfloat16": "uint16",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
}


def round_up(n: int, align: int = SLOT_ALIGN) -> int:
    return -(-n // align) * align


def _registry_dir() -> Path | None:
    """Where created names are recorded on systems without a listable /dev/shm (macOS)."""
    if os.path.isdir("/dev/shm"):
        return None
    d = Path(tempfile.gettempdir()) / f"flashmoe-{os.getuid()}" / "shm"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _list_segments() -> list[str]:
    reg = _registry_dir()
    where = reg if reg is not None else Path("/dev/shm")
    try:
        return [p.name for p in where.iterdir() if p.name.startswith(_PREFIX)]
    except OSError:
        return []


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) holds nothing any more
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass
    reg = _registry_dir()
    if reg is not None:
        (reg / name).unlink(missing_ok=True)


def cleanup_stale() -> list[str]:
    """Unlink this user's pool segments whose creator process is dead; return their names."""
    mine = f"{_PREFIX}{os.getuid()}-"
    removed = []
    for name in _list_segments():
        if not name.startswith(mine):
            continue
        try:
            pid = int(name[len(mine) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            _unlink(name)
            removed.append(name)
    return removed


class ExpertPool:
    """``nslots`` slots of ``slot_bytes`` each in one shared-memory segment."""

    def __init__(self, name: str, nslots: int, slot_bytes: int, mm: mmap.mmap, owner: bool):
        self.name = name
        self.nslots = nslots
        self.slot_bytes = slot_bytes
        self.nbytes = HEADER_BYTES + nslots * slot_bytes
        self.owner = owner
        self._mm: mmap.mmap | None = mm
        self._buf: memoryview | None = memoryview(mm)
        self._np: Any = None

    # -- lifetime ------------------------------------------------------------------------------

    @classmethod
    def create(cls, nslots: int, slot_bytes: int) -> ExpertPool:
        """Create a segment (slot_bytes rounded up to 16 KiB); the caller owns and unlinks it."""
        if nslots <= 0 or slot_bytes <= 0:
            raise ValueError(f"pool needs nslots, slot_bytes > 0, got {nslots}, {slot_bytes}")
        slot_bytes = round_up(slot_bytes)
        size = HEADER_BYTES + nslots * slot_bytes
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR
        for _ in range(16):
            name = f"{_PREFIX}{os.getuid()}-{os.getpid()}-{secrets.token_hex(3)}"
            try:
                fd = _posixshmem.shm_open("/" + name, flags, 0o600)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover
            raise OSError(errno.EEXIST, "could not find a free shared-memory name")
        reg = _registry_dir()
        if reg is not None:
            (reg / name).touch()
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        os.close(fd)
        _HEADER.pack_into(mm, 0, MAGIC, LAYOUT_VERSION, nslots, slot_bytes, os.getpid())
        return cls(name, nslots, slot_bytes, mm, owner=True)

    @classmethod
    def attach(cls, name: str, nslots: int, slot_bytes: int) -> ExpertPool:
        """Map an existing segment; checks its header against the expected geometry."""
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0o600)
        try:
            size = os.fstat(fd).st_size
            want = HEADER_BYTES + nslots * slot_bytes
            if size < want:
                raise ValueError(f"shm segment {name} is {size} bytes, expected {want}")
            mm = mmap.mmap(fd, want, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        magic, ver, n, sb, _pid = _HEADER.unpack_from(mm, 0)
        if (magic, ver, n, sb) != (MAGIC, LAYOUT_VERSION, nslots, slot_bytes):
            mm.close()
            raise ValueError(
                f"shm segment {name} has geometry {n} x {sb} (v{ver}), expected "
                f"{nslots} x {slot_bytes} (v{LAYOUT_VERSION})"
            )
        return cls(name, nslots, slot_bytes, mm, owner=False)

    def close(self) -> None:
        """Unmap. Views still alive keep the mapping until they are dropped."""
        self._np = None
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds a numpy view; the mapping goes with it
            self._mm = None

    def unlink(self) -> None:
        """Remove the segment name (creator only); existing mappings stay valid."""
        if not self.owner:
            raise PermissionError(f"only the creator (pid in {self.name}) unlinks the pool")
        _unlink(self.name)

    def __enter__(self) -> ExpertPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()

    # -- access --------------------------------------------------------------------------------

    def offset(self, i: int) -> int:
        """Byte offset of slot ``i`` inside the segment."""
        if not 0 <= i < self.nslots:
            raise IndexError(f"slot {i} out of range (pool has {self.nslots})")
        return HEADER_BYTES + i * self.slot_bytes

    def buffer(self, i: int) -> memoryview:
        """A writable memoryview of slot ``i`` (what the loader worker reads into)."""
        if self._buf is None:
            raise ValueError("pool is closed")
        o = self.offset(i)
        return self._buf[o : o + self.slot_bytes]

    def slot(self, i: int) -> np.ndarray:
        """A writable uint8 numpy view of slot ``i``."""
        import numpy as np

        if self._np is None:
            if self._mm is None:
                raise ValueError("pool is closed")
            self._np = np.frombuffer(self._mm, dtype=np.uint8)
        o = self.offset(i)
        return self._np[o : o + self.slot_bytes]

    def tensor_views(self, i: int, layout: RecordLayout) -> dict[str, np.ndarray]:
        """Numpy views of each tensor of the record in slot ``i`` (bfloat16 as uint16)."""
        s = self.slot(i)
        if layout.nbytes > self.slot_bytes:
            raise ValueError(f"record of {layout.nbytes} bytes > slot of {self.slot_bytes}")
        out = {}
        for t in layout.tensors:
            dt = _NP_DTYPES.get(t.dtype)
            if dt is None:
                raise ValueError(f"tensor {t.name}: unsupported dtype {t.dtype}")
            out[t.name] = s[t.offset : t.offset + t.nbytes].view(dt).reshape(t.shape)
        return out

    def mlx_views(self, i: int, layout: RecordLayout) -> tuple[dict[str, Any], bool]:
        """MLX arrays of the record in slot ``i`` and whether they share the slot's memory.

        Zero-copy where MLX can import the memory (Metal on Apple Silicon); otherwise each tensor
        is copied once (MLX's CPU backend refuses to wrap foreign CPU memory).
        """
        import mlx.core as mx

        out: dict[str, Any] = {}
        zero_copy = True
        for name, v in self.tensor_views(i, layout).items():
            a = None
            if zero_copy:
                try:
                    a = mx.from_dlpack(v, copy=False)
                except (ValueError, TypeError, RuntimeError):
                    zero_copy = False  # the backend cannot wrap it: copy this and the rest
            if a is None:
                a = mx.array(v)
            if layout.tensor(name).dtype == "bfloat16":
                a = a.view(mx.bfloat16)
            out[name] = a
        return out, zero_copy and bool(out)


def staging_slots(workers: int, io_threads: int, prefetch_depth: int = 0) -> int:
    """Staging slots the loaders can fill at once: one record per I/O thread (a thread reads one
    piece at a time, so a record beyond that would only wait in a slot of its own), plus the
    guessed records prefetch keeps in flight. The rest of the budget buys cache slots."""
    return max(1, workers) * max(1, io_threads) + max(0, prefetch_depth)
