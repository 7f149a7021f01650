"""Loader worker processes: right bytes for every store kind, clear failures, supervision."""

import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from flashmoe.errors import LoadError
from flashmoe.orchestrator.loaders import LoaderPool
from flashmoe.shm.pool import ExpertPool
from flashmoe.store import open_store


def wait_all(lp: LoaderPool, reqs, timeout_s: float = 30.0) -> dict:
    """req id -> Completion, for every request in ``reqs``; never waits past ``timeout_s``."""
    want = set(reqs)
    got = {}
    deadline = time.monotonic() + timeout_s
    while want - got.keys():
        assert time.monotonic() < deadline, f"timed out: {len(want - got.keys())} left"
        for c in lp.poll(0.5):
            got[c.req] = c
    return got


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from flashmoe.pack import pack
    from flashmoe.synth import synth

    d = tmp_path_factory.mktemp("stores")
    hf = synth(d / "hf", "qwen3_moe", layout="hf", experts=8, layers=2)
    mlx = synth(d / "mlx", "qwen3_moe", layout="mlx", experts=8, layers=2)
    return {
        "hf": hf,
        "mlx": mlx,
        "packed": pack(hf, d / "packed", progress=False),
        "packed-mlx": pack(mlx, d / "packed-mlx", progress=False),
    }


@pytest.fixture(scope="module")
def loader():
    with ExpertPool.create(16, 256 << 10) as pool:
        lp = LoaderPool(pool, workers=2, threads=3, start_timeout_s=30, load_timeout_s=30)
        try:
            yield lp
        finally:
            lp.close()


def assert_record(pool: ExpertPool, slot: int, store, layer: int, expert: int) -> None:
    want = store.read_record(layer, expert)
    got = pool.slot(slot)
    for t in store.layout.tensors:  # gaps between tensors are not part of the record
        a, b = t.offset, t.offset + t.nbytes
        assert bytes(got[a:b]) == want[a:b], (store.kind, layer, expert, t.name)


@pytest.mark.parametrize("kind", ["hf", "mlx", "packed", "packed-mlx"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_fills_slots_with_the_right_bytes(stores, loader, kind, direct):
    store = open_store(stores[kind])
    pool = loader.pool
    assert store.layout.nbytes <= pool.slot_bytes
    keys = [(layer, e) for layer in store.moe_layers for e in range(store.num_experts)]
    for batch in range(0, len(keys), pool.nslots):
        todo = keys[batch : batch + pool.nslots]
        pool.slot(0)  # slots hold the previous batch: a missing write would show
        reqs = {  # every other one a guess: read in pieces by the threads left free
            loader.submit(i, store.extents(*k), store.checksum(*k), direct,
                          urgent=i % 2 == 0): (i, k)
            for i, k in enumerate(todo)
        }
        done = wait_all(loader, reqs)
        for rid, (slot, (layer, e)) in reqs.items():
            c = done[rid]
            assert c.ok, c.error
            assert c.slot == slot and c.nbytes == store.layout.nbytes and c.us > 0
            assert_record(pool, slot, store, layer, e)
    assert loader.inflight() == 0
    store.close()


def test_urgent_pieces_go_first_and_guesses_take_few_threads():
    import threading

    from flashmoe.workers.loader import _Tasks

    t = _Tasks(guess_threads=2)
    for i in range(4):
        t.put(f"g{i}", urgent=False)
    t.put("u0", urgent=True)
    t.put("u1", urgent=True)
    assert [t.get() for _ in range(4)] == [("u0", True), ("u1", True), ("g0", False),
                                           ("g1", False)]
    got = []
    th = threading.Thread(target=lambda: got.append(t.get()), daemon=True)
    th.start()  # two guessed pieces are being read: a third waits...
    th.join(0.2)
    assert th.is_alive() and not got
    t.put("u2", urgent=True)  # ...but an urgent one does not
    th.join(5)
    assert got == [("u2", True)]
    t.guess_done()  # a guess thread is free again: the next guess goes
    assert t.get() == ("g2", False)
    t.stop(1)  # a stop waits for the guesses left
    t.guess_done()
    t.guess_done()
    assert t.get() == ("g3", False)
    t.guess_done()
    assert t.get() == (None, True)


def test_checksum_mismatch_names_the_file(stores, loader):
    store = open_store(stores["packed"])
    ext = store.extents(store.moe_layers[0], 3)
    bad = store.checksum(store.moe_layers[0], 3) ^ 1
    c = wait_all(loader, [loader.submit(0, ext, bad)])
    (c,) = c.values()
    assert not c.ok and "checksum mismatch" in c.error and ext[0].path in c.error


def test_crc_of_pieces_is_zlibs_crc():
    import random

    from flashmoe.workers.crc import combine, crc_of_pieces

    rng = random.Random(0)
    for _ in range(50):
        a, b = rng.randbytes(rng.randrange(0, 3000)), rng.randbytes(rng.randrange(0, 3000))
        assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    data = rng.randbytes(300_000)
    cuts = [0, *sorted(rng.sample(range(1, len(data)), 6)), len(data)]
    pieces = [(s, e - s, zlib.crc32(data[s:e])) for s, e in zip(cuts[:-1], cuts[1:], strict=True)]
    rng.shuffle(pieces)  # threads finish in any order
    assert crc_of_pieces(pieces, len(data)) == zlib.crc32(data)
    assert crc_of_pieces(pieces[1:], len(data)) is None  # a gap: checked whole instead
    assert crc_of_pieces(pieces, len(data) + 1) is None
    assert crc_of_pieces([*pieces, pieces[0]], len(data)) is None  # an overlap
    s, n, _ = pieces[0]
    halves = [(s, n // 2, zlib.crc32(data[s:s + n // 2])),
              (s + n // 2, n - n // 2, zlib.crc32(data[s + n // 2:s + n]))]
    assert crc_of_pieces([*halves, *pieces[1:]], len(data)) == zlib.crc32(data)


def test_record_checked_in_pieces(tmp_path):
    """Read in many pieces by several threads, a record passes its crc32, and one flipped byte
    in any piece fails it."""
    data = bytearray(os.urandom(5 * 65536 + 1000))
    f = tmp_path / "rec.bin"
    f.write_bytes(data)
    good = zlib.crc32(data)
    data[3 * 65536 + 17] ^= 0x40
    (tmp_path / "bad.bin").write_bytes(data)
    with ExpertPool.create(2, len(data)) as pool, \
            LoaderPool(pool, workers=1, threads=4, chunk_bytes=65536) as lp:
        for _ in range(5):
            r1 = lp.submit(0, [[str(f), 0, len(data), 0]], good)
            r2 = lp.submit(1, [[str(tmp_path / "bad.bin"), 0, len(data), 0]], good)
            done = wait_all(lp, [r1, r2])
            assert done[r1].ok, done[r1].error
            assert not done[r2].ok and "checksum mismatch" in done[r2].error


def test_truncated_and_missing_files_fail_clearly(tmp_path, loader):
    f = tmp_path / "short.bin"
    f.write_bytes(os.urandom(10000))
    r1 = loader.submit(0, [[str(f), 8192, 4096, 0]])
    r2 = loader.submit(1, [[str(f), 0, 4096, 0], [str(tmp_path / "gone.bin"), 0, 10, 8192]])
    r3 = loader.submit(2, [[str(f), 0, 100, 0]], checksum=None, direct=True)
    r4 = loader.submit(3, [[str(f), 0, 100, loader.pool.slot_bytes]])
    done = wait_all(loader, [r1, r2, r3, r4])
    assert not done[r1].ok and "short read" in done[r1].error
    assert str(f) in done[r1].error and "offset 10000" in done[r1].error
    assert not done[r2].ok and "gone.bin" in done[r2].error
    assert done[r3].ok and bytes(loader.pool.slot(2)[:100]) == f.read_bytes()[:100]
    assert not done[r4].ok and "overruns" in done[r4].error


@pytest.fixture
def big_file(tmp_path) -> Path:
    f = tmp_path / "big.bin"
    f.write_bytes(os.urandom(32 << 20))
    return f


def test_sigkilled_worker_is_replaced_and_every_request_completes(big_file):
    data = big_file.read_bytes()
    n, size = 48, 256 << 10
    with ExpertPool.create(n, size) as pool, LoaderPool(pool, workers=2, threads=2) as lp:
        victim = lp.workers_info()[0]["pid"]
        reqs = {}
        for i in range(n):
            off = (i * 7919 % 127) * size
            reqs[
                lp.submit(i, [[str(big_file), off, size, 0]], zlib.crc32(data[off : off + size]))
            ] = (
                i,
                off,
            )
        os.kill(victim, signal.SIGKILL)
        done = wait_all(lp, reqs)
        assert all(c.ok for c in done.values()), [c.error for c in done.values() if not c.ok]
        for slot, off in reqs.values():
            assert bytes(pool.slot(slot)[:size]) == data[off : off + size]
        assert lp.restarts == 1
        assert victim not in [w["pid"] for w in lp.workers_info()]
        # the replacement has said hello by now (it was needed, or we wait for it)
        deadline = time.monotonic() + 30
        while lp.last_restart_s is None and time.monotonic() < deadline:
            lp.poll(0.1)
        print(f"\nworker replaced in {lp.last_restart_s * 1000:.0f} ms")
        assert all(w["state"] == "ready" for w in lp.workers_info())


def test_hung_worker_is_killed_after_load_timeout(big_file):
    with ExpertPool.create(4, 64 << 10) as pool:
        with LoaderPool(pool, workers=1, threads=1, load_timeout_s=1.0) as lp:
            pid = lp.workers_info()[0]["pid"]
            os.kill(pid, signal.SIGSTOP)  # alive but never answers
            try:
                rid = lp.submit(0, [[str(big_file), 0, 4096, 0]])
                done = wait_all(lp, [rid], timeout_s=30)
            finally:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert done[rid].ok and lp.restarts == 1


def test_start_timeout_names_the_setting():
    with ExpertPool.create(1, 16384) as pool:
        with pytest.raises(LoadError, match="worker_start_timeout_s"):
            LoaderPool(pool, workers=1, threads=1, start_timeout_s=0.001)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); its state says otherwise
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_workers_exit_when_the_coordinator_dies(tmp_path):
    code = (
        "import os\n"
        "from flashmoe.shm.pool import ExpertPool\n"
        "from flashmoe.orchestrator.loaders import LoaderPool\n"
        "pool = ExpertPool.create(2, 16384)\n"
        "lp = LoaderPool(pool, workers=2, threads=1)\n"
        "print(pool.name, *[w['pid'] for w in lp.workers_info()], flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    log = tmp_path / "out.txt"
    with open(log, "w") as f:  # a file, not a pipe: the workers inherit it
        subprocess.run([sys.executable, "-c", code], stdout=f, timeout=60)
    name, *pids = log.read_text().split()
    deadline = time.monotonic() + 10
    while any(_alive(int(p)) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(int(p)) for p in pids)
    from flashmoe.shm.pool import cleanup_stale

    cleanup_stale()  # another flashmoe process on this machine may have beaten us to it
    assert not Path("/dev/shm", name).exists()


def test_close_leaves_no_socket_and_no_processes():
    with ExpertPool.create(1, 16384) as pool:
        lp = LoaderPool(pool, workers=2, threads=1)
        pids = [w["pid"] for w in lp.workers_info()]
        path = Path(lp.endpoint[len("ipc://") :])
        assert path.exists()
        lp.close()
        assert not path.exists()
        assert not any(_alive(p) for p in pids)


def test_round_trips_complete_in_order_of_submission(tmp_path, loader):
    """Tiny loads one after another: each completes, as its own request, into its slot."""
    f = tmp_path / "tiny.bin"
    f.write_bytes(b"x" * 64)
    for i in range(50):
        rid = loader.submit(i % 4, [[str(f), 0, 64, 0]])
        done = []
        while not done:
            done = loader.poll(5.0)
        assert [(c.req, c.slot, c.ok) for c in done] == [(rid, i % 4, True)]


def cached_pages(path: Path) -> list[bool]:
    """Which pages of ``path`` the page cache holds (Linux ``mincore`` on a fresh mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return [bool(b & 1) for b in vec]


def evict(path: Path) -> None:
    """Drop this one file's pages from the page cache (written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(sys.platform != "linux", reason="mincore's page flags are Linux's")
@pytest.mark.parametrize("kind", ["hf", "mlx"])
def test_record_read_in_place_caches_no_neighbours(stores, kind):
    """A record read from a checkpoint in place brings in its own pages only: readahead of the
    neighbours would cost disk time and memory for bytes nobody asked for."""
    import mmap

    from flashmoe.diskstats import device_bytes_read
    from flashmoe.workers.loader import DEFAULT_CHUNK, PieceReader, plan

    store = open_store(stores[kind])
    layer, expert = store.moe_layers[0], store.num_experts // 2
    extents = [[str(x.path), x.offset, x.length, x.dest] for x in store.extents(layer, expert)]
    files = sorted({Path(x[0]) for x in extents})
    if device_bytes_read(files[0]) is None:
        pytest.skip("no block device under the store (tmpfs): there is no readahead to see")
    for f in files:
        evict(f)
    assert not any(any(cached_pages(f)) for f in files), "could not evict the test's own files"
    slot = mmap.mmap(-1, -(-store.layout.nbytes // 16384) * 16384)
    reader = PieceReader()
    try:
        for p in plan(extents, len(slot), True, DEFAULT_CHUNK):  # as io_mode "auto" reads
            reader.read(memoryview(slot), p)
    finally:
        reader.close()
    page = mmap.PAGESIZE
    for f in files:
        own = {i for path, off, n, _ in extents if Path(path) == f
               for i in range(off // page, -(-(off + n) // page))}
        extra = [i for i, c in enumerate(cached_pages(f)) if c and i not in own]
        assert not extra, f"{len(extra)} pages of {f.name} cached beyond the record's own"
    want = store.read_record(layer, expert)  # read only now: it may read ahead itself
    for t in store.layout.tensors:
        assert slot[t.offset:t.offset + t.nbytes] == want[t.offset:t.offset + t.nbytes]
    store.close()


def test_unaligned_extents_are_read_as_aligned_blocks():
    """An extent at an unaligned offset goes direct as the blocks around it: every piece starts
    on a block, the wanted bytes of the pieces tile the extent, and no read is larger than the
    bounce buffer."""
    from flashmoe.workers.loader import BOUNCE_PIECE, DIRECT_ALIGN, plan

    extents = [["f", 4096 * 3 + 100, 700_000, 0], ["f", 5, 10, 704_512]]
    for chunk in (0, 64 << 10):
        pieces = plan(extents, 1 << 20, True, chunk)
        got = []
        for p in pieces:
            assert p.direct and p.offset % DIRECT_ALIGN == 0 and p.length % DIRECT_ALIGN == 0
            assert p.skip + p.need <= p.length <= max(BOUNCE_PIECE, chunk)
            got.append((p.offset + p.skip, p.dest, p.need))
        assert sum(n for *_, n in got) == 700_010
        for off, dest, n in got:  # each piece's bytes sit at the same place of its extent
            ext = next(e for e in extents if e[1] <= off < e[1] + e[2])
            assert dest - ext[3] == off - ext[1] and off + n <= ext[1] + ext[2]
    assert len(plan(extents, 1 << 20, False, 0)) == 2  # buffered: as they are


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs")
def test_unaligned_direct_piece_falls_back_on_a_filesystem_without_o_direct():
    import mmap

    from flashmoe.workers.loader import PieceReader, plan

    data = os.urandom(3 << 20)
    path = Path("/dev/shm") / f"flashmoe-test-{os.getpid()}"
    path.write_bytes(data)
    reader = PieceReader()
    try:
        slot = mmap.mmap(-1, 2 << 20)
        for p in plan([[str(path), 12345, 1 << 20, 4096]], len(slot), True, 0):
            reader.read(memoryview(slot), p)
        assert slot[4096:4096 + (1 << 20)] == data[12345:12345 + (1 << 20)]
        assert slot[:4096] == bytes(4096)  # nothing outside the extent's place was written
    finally:
        reader.close()
        path.unlink()
