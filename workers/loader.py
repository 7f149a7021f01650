"""The loader worker: reads expert records from disk into shared-memory slots.

Started by the coordinator as a subprocess (never a fork of it: it holds MLX state)::

    python -m flashmoe.workers.loader --endpoint ipc://... --pool NAME --slots N \
        --slot-bytes B --threads T --worker-id K

Its DEALER connects to the coordinator's ROUTER and says ``Hello``, then serves ``LoadRequest``s.
T I/O threads read with ``os.preadv`` (which releases the GIL) straight into the slot: O_DIRECT
(``F_NOCACHE`` on macOS) where the request asks for it and offset, length and destination are
4 KiB aligned, else bounced (below). A request that arrives while several threads are idle is cut
into pieces (at least ``--chunk-bytes``) that they share; one that arrives while they are busy
is read in whole extents (fewer, larger reads). A request that is not ``urgent`` (a guess that
nobody waits for yet) always goes in pieces, and only ``--guess-threads`` threads read such pieces
at a time; an urgent piece is taken before any of them, so a demanded load finds at most that many
guessed pieces being read ahead of it. The thread that finishes a request's last piece
sends the reply on its own DEALER (a zmq socket belongs to one thread; identity
``<worker id>:<thread>``), so a reply costs no hop back through the main thread. A checksummed
record is checked in parallel: each thread takes the crc32 of the piece it just read, and the
thread with the last piece combines them (``crc.crc_of_pieces``), so no serial crc32 of the whole
record stands between its last byte and the reply.

An extent that is not aligned (a checkpoint read in place: each expert is a slice of tensors at
arbitrary file offsets) is read with O_DIRECT too, as the aligned blocks around it, through a
small per-thread bounce buffer whose unneeded head and tail are dropped: buffered reads would let
the kernel's readahead pull in the neighbouring experts, evicted before anyone asks for them.
Buffered reads (``io_mode`` buffered, filesystems that refuse O_DIRECT) tell the kernel that the
file is read at random.

The worker keeps no state worth saving: it can be killed at any time, and exits by itself when
its parent dies.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import signal
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

import zmq

from flashmoe import __version__
from flashmoe.protocol import messages as wire
from flashmoe.protocol.sockets import dealer
from flashmoe.shm.pool import ExpertPool
from flashmoe.workers.crc import crc_of_pieces

DIRECT_ALIGN = 4096
DEFAULT_CHUNK = 256 << 10  # see the io_chunk setting
BOUNCE_PIECE = 256 << 10  # largest unaligned piece: bounds each I/O thread's bounce buffer
_HAVE_O_DIRECT = hasattr(os, "O_DIRECT")
_HAVE_NOCACHE = sys.platform == "darwin"
_HAVE_FADVISE = hasattr(os, "posix_fadvise")


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass
class _Job:
    req: wire.LoadRequest
    t0: float
    remaining: int
    record_end: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: str | None = None
    crcs: list = field(default_factory=list)  # (start in slot, bytes, crc32) of read pieces


@dataclass(frozen=True)
class _Piece:
    path: str
    offset: int  # in the file
    dest: int  # in the slot
    length: int  # bytes to ask for (rounded up to a block for O_DIRECT)
    need: int  # bytes that must arrive (the rest is slot padding)
    direct: bool
    skip: int = 0  # bytes read before the piece's first wanted byte (aligned reads of unaligned)


def plan(extents: list[list], slot_bytes: int, direct: bool, chunk: int) -> list[_Piece]:
    """Cut extents into pieces; O_DIRECT straight into the slot where offset, dest and length
    can be aligned, else (``direct`` asked for) as the aligned blocks around each piece.

    A length that is not a block multiple is rounded up when the extra bytes land in slot space
    that no other extent writes (the padding after the record), so packed records stay direct.
    """
    ordered = sorted(extents, key=lambda e: e[3])
    pieces = []
    for i, (path, off, length, dest) in enumerate(ordered):
        if dest + length > slot_bytes:
            raise ValueError(f"extent of {path} ({dest}+{length}) overruns the {slot_bytes} B slot")
        if i + 1 < len(ordered) and ordered[i + 1][3] < dest + length:
            raise ValueError(f"extents overlap in the slot at byte {ordered[i + 1][3]}")
        limit = ordered[i + 1][3] if i + 1 < len(ordered) else slot_bytes
        want = _round_up(length, DIRECT_ALIGN)
        d = direct and off % DIRECT_ALIGN == 0 and dest % DIRECT_ALIGN == 0 and dest + want <= limit
        if direct and not d:
            pieces += _unaligned(path, off, length, dest, chunk)
            continue
        span = want if d else length
        step = max(DIRECT_ALIGN, chunk - chunk % DIRECT_ALIGN) if chunk > 0 else max(span, 1)
        for s in range(0, max(span, 1), step):
            n = min(step, span - s)
            need = max(0, min(n, length - s))
            if n > 0:
                pieces.append(_Piece(path, off + s, dest + s, n, need, d))
    return pieces


def _unaligned(path: str, off: int, length: int, dest: int, chunk: int) -> list[_Piece]:
    """An unaligned extent as O_DIRECT pieces: aligned file blocks, cut at block boundaries into
    at most ``BOUNCE_PIECE`` (or ``chunk``, if smaller) bytes, each with the bytes to skip."""
    step = min(chunk, BOUNCE_PIECE) if chunk > 0 else BOUNCE_PIECE
    step = max(DIRECT_ALIGN, step - step % DIRECT_ALIGN)
    start, end = off - off % DIRECT_ALIGN, _round_up(off + length, DIRECT_ALIGN)
    out = []
    for f in range(start, end, step):
        lo, hi = max(f, off), min(f + step, off + length)
        out.append(_Piece(path, f, dest + lo - off, min(step, end - f), hi - lo, True, lo - f))
    return out


def chunk_for(total: int, idle: int, chunk: int) -> int:
    """The piece size for a ``total``-byte demanded record when ``idle`` I/O threads are free to
    share it (0: read whole extents, one busy thread is enough)."""
    if chunk <= 0 or idle < 2:
        return 0
    return max(chunk, _round_up(-(-total // idle), DIRECT_ALIGN))


class PieceReader:
    """Reads pieces into a buffer with ``os.preadv``: O_DIRECT (``F_NOCACHE`` on macOS) where
    the piece allows it and the filesystem accepts it, buffered otherwise; an unaligned piece
    through this thread's bounce buffer. Keeps one fd per (file, mode); safe to share between
    threads."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str, bool], int] = {}
        self._fd_lock = threading.Lock()
        self._no_direct: set[str] = set()  # filesystems that refuse O_DIRECT (tmpfs)
        self._local = threading.local()  # .bounce: this thread's aligned buffer

    def read(self, buf: memoryview, p: _Piece) -> None:
        """Fill ``buf[p.dest:]`` with the piece; EOFError if the file ends before it does."""
        direct = p.direct and (_HAVE_O_DIRECT or _HAVE_NOCACHE) and p.path not in self._no_direct
        if direct:
            try:
                if self._bounced(buf, p) if p.skip or p.dest % DIRECT_ALIGN else \
                        self._pread(buf, p, True):
                    return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._no_direct.add(p.path)  # this filesystem refuses O_DIRECT: go buffered
        if p.skip:  # only the wanted bytes, straight into the slot
            p = _Piece(p.path, p.offset + p.skip, p.dest, p.need, p.need, False)
        self._pread(buf, p, False)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: str, direct: bool) -> int:
        key = (path, direct)
        fd = self._fds.get(key)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(key)
                if fd is None:
                    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
                    if direct and _HAVE_O_DIRECT:
                        flags |= os.O_DIRECT
                    fd = os.open(path, flags)
                    if not direct and _HAVE_FADVISE:
                        # Pieces are whole records or parts of them, never a stream: readahead
                        # would only pull in neighbours that are evicted before anyone asks.
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    if direct and _HAVE_NOCACHE:
                        import fcntl

                        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
                    self._fds[key] = fd
        return fd

    def _bounced(self, buf: memoryview, p: _Piece) -> bool:
        """An O_DIRECT read of the piece's aligned blocks into this thread's buffer, then its
        wanted bytes into ``buf``; False when the file ends short of a block boundary."""
        bounce = getattr(self._local, "bounce", None)
        if bounce is None or len(bounce) < p.length:
            bounce = self._local.bounce = mmap.mmap(-1, max(p.length, BOUNCE_PIECE))  # aligned
        view = memoryview(bounce)
        try:
            if not self._pread(view, _Piece(p.path, p.offset, 0, p.length, p.skip + p.need, True),
                               True):
                return False
            buf[p.dest : p.dest + p.need] = view[p.skip : p.skip + p.need]
        finally:
            view.release()
        return True

    def _pread(self, buf: memoryview, p: _Piece, direct: bool) -> bool:
        """Read a piece; False when an O_DIRECT read came back short of a block boundary."""
        fd = self._fd(p.path, direct)
        length = p.length if direct else p.need
        mv = buf[p.dest : p.dest + length]
        got = 0
        while got < length:
            n = os.preadv(fd, [mv[got:]], p.offset + got)
            if n == 0:
                break
            got += n
            if direct and got % DIRECT_ALIGN:
                break  # end of file inside a block: no further aligned read is possible
        if got < p.need:
            if direct and got % DIRECT_ALIGN:
                return False
            raise EOFError(
                f"short read: {p.path} at offset {p.offset + got}: end of file after "
                f"{got} of {p.need} bytes"
            )
        return True


class _Tasks:
    """The I/O threads' pieces to read: urgent ones first, in order; guessed ones only while
    fewer than ``guess_threads`` threads read guessed pieces."""

    def __init__(self, guess_threads: int):
        self.guess_threads = max(1, guess_threads)
        self.idle = 0  # threads waiting for a piece
        self._cv = threading.Condition()
        self._urgent: deque = deque()
        self._guess: deque = deque()
        self._guessing = 0  # threads reading a guessed piece
        self._stops = 0

    def put(self, item, urgent: bool) -> None:
        with self._cv:
            (self._urgent if urgent else self._guess).append(item)
            self._cv.notify()

    def stop(self, n: int) -> None:
        """Stop ``n`` threads once no piece is left."""
        with self._cv:
            self._stops += n
            self._cv.notify_all()

    def get(self):
        """The next piece as (item, urgent), or (None, True) to stop."""
        with self._cv:
            self.idle += 1
            try:
                while True:
                    if self._urgent:
                        return self._urgent.popleft(), True
                    if self._guess and self._guessing < self.guess_threads:
                        self._guessing += 1
                        return self._guess.popleft(), False
                    if self._stops and not self._guess:
                        self._stops -= 1
                        return None, True
                    self._cv.wait()
            finally:
                self.idle -= 1

    def guess_done(self) -> None:
        with self._cv:
            self._guessing -= 1
            self._cv.notify()


class Loader:
    """The I/O side: threads that fill slots and send the replies on their own sockets."""

    def __init__(
        self,
        pool: ExpertPool,
        threads: int,
        endpoint: str | None = None,
        worker_id: int = 0,
        chunk: int = DEFAULT_CHUNK,
        guess_threads: int | None = None,
    ):
        self.pool = pool
        self.chunk = chunk
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.tasks = _Tasks(guess_threads or max(1, threads // 4))
        self._local = threading.local()  # .send: this thread's socket
        self.reader = PieceReader()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"flashmoe-read{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, req: wire.LoadRequest) -> None:
        t0 = time.perf_counter()
        try:
            if not 0 <= req.slot < self.pool.nslots:
                raise ValueError(f"slot {req.slot} out of range (pool has {self.pool.nslots})")
            chunk = self._chunk_for(req) if req.urgent else max(self.chunk, 0)
            pieces = plan(req.extents, self.pool.slot_bytes, req.direct, chunk)
        except ValueError as e:
            self._reply(_Job(req, t0, 0, 0), str(e))
            return
        end = max((e[3] + e[2] for e in req.extents), default=0)
        job = _Job(req, t0, len(pieces), end)
        if not pieces:
            self._finish(job)
        for p in pieces:
            self.tasks.put((job, p), req.urgent)

    def _chunk_for(self, req: wire.LoadRequest) -> int:
        """Split only across threads that are idle now; a busy worker reads whole extents."""
        return chunk_for(sum(e[2] for e in req.extents), self.tasks.idle, self.chunk)

    def close(self, timeout_s: float = 2.0) -> None:
        self.tasks.stop(len(self._threads))
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.reader.close()

    # -- I/O threads ---------------------------------------------------------------------------

    def _run(self, index: int) -> None:
        sock = dealer(self.endpoint, identity=f"{self.worker_id}:{index}".encode())
        self._local.send = sock.send_multipart
        try:
            self._serve()
        finally:
            sock.close(0)

    def _serve(self) -> None:
        while True:
            item, urgent = self.tasks.get()
            if item is None:
                return
            try:
                self._piece(*item)
            finally:
                if not urgent:
                    self.tasks.guess_done()

    def _piece(self, job: _Job, p: _Piece) -> None:
        err = crc = None
        if job.error is None:  # a failed request skips its remaining pieces
            try:
                self.reader.read(self.pool.buffer(job.req.slot), p)
                if job.req.checksum is not None and p.need:
                    crc = zlib.crc32(self.pool.buffer(job.req.slot)[p.dest:p.dest + p.need])
            except OSError as e:
                err = f"{p.path} at offset {p.offset}: {e.strerror or e}"
            except EOFError as e:
                err = str(e)
            except Exception as e:  # noqa: BLE001 - a reply, never a thread that dies silently
                err = f"{p.path} at offset {p.offset}: {type(e).__name__}: {e}"
        with job.lock:
            if err and job.error is None:
                job.error = err
            if crc is not None:
                job.crcs.append((p.dest, p.need, crc))
            job.remaining -= 1
            last = job.remaining == 0
        if last:
            self._finish(job)

    # -- replies -------------------------------------------------------------------------------

    def _finish(self, job: _Job) -> None:
        err = job.error
        req = job.req
        if err is None and req.checksum is not None:
            crc = crc_of_pieces(job.crcs, job.record_end)
            if crc is None:  # the pieces leave gaps (padding between extents): check it whole
                crc = zlib.crc32(self.pool.buffer(req.slot)[: job.record_end])
            if crc != req.checksum:
                files = sorted({e[0] for e in req.extents})
                err = (
                    f"checksum mismatch: record of {job.record_end} bytes from {', '.join(files)} "
                    f"has crc32 {crc:08x}, the store says {req.checksum:08x}"
                )
        self._reply(job, err)

    def _reply(self, job: _Job, err: str | None) -> None:
        req = job.req
        if err is None:
            us = int((time.perf_counter() - job.t0) * 1e6)
            msg = wire.LoadDone(req.req, req.generation, req.slot, job.record_end, us)
        else:
            msg = wire.LoadFailed(req.req, req.generation, req.slot, err)
        self._local.send(wire.encode(msg))


def serve(args: argparse.Namespace) -> int:
    pool = ExpertPool.attach(args.pool, args.slots, args.slot_bytes)
    loader = Loader(pool, args.threads, args.endpoint, args.worker_id, args.chunk_bytes,
                    args.guess_threads)
    sock = dealer(args.endpoint, identity=str(args.worker_id).encode())
    loader._local.send = sock.send_multipart  # replies for requests refused up front
    sock.send_multipart(wire.encode(wire.Hello(args.worker_id, os.getpid(), __version__)))
    # The coordinator's pid comes on the command line: one that died while this process was
    # still starting has already handed it to a reaper, so getppid() alone cannot tell.
    parent = args.parent_pid or os.getppid()
    running = os.getppid() == parent
    try:
        while running:
            if sock.poll(200, zmq.POLLIN):
                while running:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = wire.decode(frames, wire.WORKER_ACCEPTS)
                    except wire.ProtocolError as e:  # the coordinator is trusted: log, keep serving
                        print(f"loader {args.worker_id}: dropped message: {e}", file=sys.stderr)
                        continue
                    if isinstance(msg, wire.Shutdown):
                        running = False
                    else:
                        loader.submit(msg)
            if os.getppid() != parent:
                break  # orphaned: the coordinator died without a Shutdown
    finally:
        loader.close()
        sock.close(0)
        pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flashmoe.workers.loader", description=__doc__)
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--slots", type=int, required=True)
    ap.add_argument("--slot-bytes", type=int, required=True)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--worker-id", type=int, required=True)
    ap.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK)
    ap.add_argument("--guess-threads", type=int, default=None,
                    help="threads that may read guessed (not urgent) loads at once "
                         "(default: a quarter of --threads, at least 1)")
    ap.add_argument("--parent-pid", type=int, help="the coordinator (default: the parent)")
    args = ap.parse_args(argv)
    # Ctrl-C reaches the whole process group; the coordinator decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return serve(args)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip interpreter teardown: a zmq context waits there for any socket still open in a
    # straggling I/O thread, and an orphaned worker must never linger.
    os._exit(code)
