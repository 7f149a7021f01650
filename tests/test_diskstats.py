"""The block device's own read counter: what the disk delivered, readahead included."""

import mmap
import os

import pytest

from flashmoe.diskstats import DeviceReads, amplification, device_bytes_read


def test_no_counter_on_a_tmpfs_or_a_missing_path(tmp_path):
    assert device_bytes_read(tmp_path / "missing") is None
    if os.path.isdir("/dev/shm"):
        assert device_bytes_read("/dev/shm") is None  # no block device of its own
        assert DeviceReads("/dev/shm").since() is None
    assert amplification(None, 10) is None and amplification(5, 0) is None
    assert amplification(15, 10) == 1.5


def test_counts_the_bytes_a_direct_read_fetched(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(8 << 20))
    if device_bytes_read(f) is None:
        pytest.skip("the test folder is on no block device with a counter")
    fd = os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        reads = DeviceReads(f)
        buf = mmap.mmap(-1, 8 << 20)
        assert os.preadv(fd, [buf], 0) == 8 << 20
    finally:
        os.close(fd)
    assert reads.since() >= 8 << 20  # other processes on the disk may add to it
