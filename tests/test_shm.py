"""The shared-memory pool: geometry, views, attach, and no leaked segments."""

import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flashmoe.shm.pool import HEADER_BYTES, ExpertPool, cleanup_stale
from flashmoe.store import RecordLayout, TensorSpec

SHM = Path("/dev/shm")
linux_only = pytest.mark.skipif(not SHM.is_dir(), reason="needs a listable /dev/shm")


def segments() -> set[str]:
    return {p.name for p in SHM.glob(f"flashmoe-{os.getuid()}-*")} if SHM.is_dir() else set()


def test_geometry_and_alignment():
    with ExpertPool.create(3, 10000) as pool:
        assert pool.slot_bytes == 16384 and pool.nslots == 3
        assert pool.nbytes == HEADER_BYTES + 3 * 16384
        assert pool.name.startswith(f"flashmoe-{os.getuid()}-{os.getpid()}-")
        for i in range(3):
            s = pool.slot(i)
            assert s.dtype == np.uint8 and s.size == 16384 and s.flags.writeable
            assert s.ctypes.data % mmap.PAGESIZE == 0  # 16 KiB on Apple Silicon, 4 KiB here
        with pytest.raises(IndexError):
            pool.slot(3)


def test_attach_shares_bytes_and_checks_geometry():
    with ExpertPool.create(2, 16384) as pool:
        other = ExpertPool.attach(pool.name, 2, 16384)
        try:
            other.slot(1)[:4] = [1, 2, 3, 4]
            assert list(pool.slot(1)[:4]) == [1, 2, 3, 4]
            assert pool.slot(0)[:4].sum() == 0
            with pytest.raises(PermissionError):
                other.unlink()
        finally:
            other.close()
        with pytest.raises(ValueError, match="geometry"):
            ExpertPool.attach(pool.name, 1, 32768)


LAYOUT = RecordLayout(
    tensors=(
        TensorSpec("gate_proj.weight", "uint32", (4, 8), 0, 128),
        TensorSpec("gate_proj.scales", "bfloat16", (4, 2), 128, 16),
        TensorSpec("down_proj.weight", "float32", (3,), 256, 12),
    ),
    nbytes=268,
)


def test_tensor_and_mlx_views():
    import mlx.core as mx

    with ExpertPool.create(2, 4096) as pool:
        v = pool.tensor_views(1, LAYOUT)
        v["gate_proj.weight"][:] = np.arange(32, dtype=np.uint32).reshape(4, 8)
        bf = np.array([1.0, -2.5, 3.0, 0.5, 1, 2, 3, 4], np.float32)
        v["gate_proj.scales"][:] = (bf.view(np.uint32) >> 16).astype(np.uint16).reshape(4, 2)
        v["down_proj.weight"][:] = [1.5, 2.5, 3.5]
        assert v["gate_proj.scales"].dtype == np.uint16
        arrays, zero_copy = pool.mlx_views(1, LAYOUT)
        assert isinstance(zero_copy, bool)
        assert arrays["gate_proj.scales"].dtype == mx.bfloat16
        assert arrays["gate_proj.weight"].shape == (4, 8)
        got = np.array(arrays["gate_proj.scales"].astype(mx.float32)).ravel()
        assert np.array_equal(got, bf)
        assert np.array_equal(np.array(arrays["down_proj.weight"]), [1.5, 2.5, 3.5])
        del v, arrays


@linux_only
def test_close_and_unlink_leave_nothing():
    before = segments()
    pool = ExpertPool.create(2, 16384)
    assert pool.name in segments()
    view = pool.slot(0)  # a live view must not make close() raise
    pool.close()
    pool.unlink()
    del view
    assert segments() == before


@linux_only
def test_cleanup_stale_removes_dead_creators_segment():
    code = (
        "import os; from flashmoe.shm.pool import ExpertPool; "
        "p = ExpertPool.create(1, 16384); print(p.name, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    name = out.stdout.strip()
    assert name.startswith("flashmoe-")  # its creator died without unlinking it
    with ExpertPool.create(1, 16384) as live:
        removed = cleanup_stale()
        # Any flashmoe process starting meanwhile runs cleanup_stale too and may have won.
        assert name not in segments() and live.name not in removed
        assert live.name in segments()  # ours (alive) is kept


@linux_only
def test_cleanup_stale_decides_by_creator_pid(monkeypatch):
    # A creator that is alive, declared dead: no other process on the machine races us for it.
    from flashmoe.shm import pool as pool_mod

    code = (
        "import time; from flashmoe.shm.pool import ExpertPool; "
        "p = ExpertPool.create(1, 16384); print(p.name, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        name = child.stdout.readline().strip()
        assert name in segments()
        assert name not in cleanup_stale()  # its creator lives
        monkeypatch.setattr(pool_mod, "_pid_alive", lambda pid: pid != child.pid)
        assert name in cleanup_stale() and name not in segments()
    finally:
        child.kill()
        child.wait(10)


def test_staging_slots_follow_the_reads_in_flight():
    from flashmoe.shm.pool import staging_slots

    assert staging_slots(2, 8) == 16  # one record per I/O thread
    assert staging_slots(2, 8, prefetch_depth=2) == 18  # and the guesses in flight
    assert staging_slots(0, 0) == 1
