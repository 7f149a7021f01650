"""What the disk itself read: the block device's own counters, readahead included.

The loaders count the record bytes they asked for; the device counts what it delivered. The
ratio shows the waste (readahead pulling in neighbours that are evicted before use). Linux's
``/sys/dev/block/<major>:<minor>/stat`` counts sectors of 512 bytes for every process using the
device, so a benchmark on a shared disk also sees its neighbours' reads. There is no such counter
on a tmpfs, an overlay or a btrfs subvolume (anonymous devices) or on macOS: None there.
"""

from __future__ import annotations

import os

SECTOR = 512  # the unit of the kernel's block statistics, whatever the device's sector size
_SECTORS_READ = 2  # field of the stat file


def _stat_file(path: str | os.PathLike) -> str | None:
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    if os.major(dev) == 0:  # tmpfs, overlay, btrfs: no block device of its own
        return None
    return f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"


def device_bytes_read(path: str | os.PathLike) -> int | None:
    """Bytes the block device holding ``path`` has read since boot, or None without a counter."""
    stat = _stat_file(path)
    if stat is None:
        return None
    try:
        with open(stat) as f:
            return int(f.read().split()[_SECTORS_READ]) * SECTOR
    except (OSError, IndexError, ValueError):
        return None


class DeviceReads:
    """Bytes the device under ``path`` reads from now on: ``DeviceReads(p)`` ... ``.since()``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.start = device_bytes_read(path)

    def since(self) -> int | None:
        now = device_bytes_read(self.path)
        return None if now is None or self.start is None else now - self.start


def amplification(device_bytes: int | None, requested: int) -> float | None:
    """Device bytes read per byte requested (1.0: nothing wasted), None without a counter."""
    if device_bytes is None or requested <= 0:
        return None
    return device_bytes / requested
