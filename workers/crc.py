"""crc32 of a record from the crc32s of its pieces, so the pieces are checked in parallel.

A record is read in pieces by several I/O threads. Each thread takes the crc32 of its own piece
right after reading it (``zlib.crc32`` lets go of the GIL), and the thread that reads the last
piece combines them: ``crc(A + B) = crc(A) * x^(8 len(B)) + crc(B)`` over GF(2) modulo the crc32
polynomial (zlib's ``crc32_combine``, which Python's zlib does not expose). Checking a 2.6 MB
record no longer costs a serial crc32 of the whole record after its last byte arrives.
"""

from __future__ import annotations

from functools import lru_cache

_POLY = 0xEDB88320  # crc32's polynomial, bits reversed as zlib keeps them
_ONE = 1 << 31  # the polynomial 1 in that order


def _mulmod(a: int, b: int) -> int:
    """a(x) * b(x) modulo the crc32 polynomial (reflected bit order)."""
    m = _ONE
    p = 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _powers() -> list[int]:
    """x^(2^k) modulo the polynomial, k = 0..31."""
    out = [_ONE >> 1]  # x^1
    for _ in range(31):
        out.append(_mulmod(out[-1], out[-1]))
    return out


_X2N = _powers()


@lru_cache(maxsize=256)
def _shift(nbytes: int) -> int:
    """x^(8 nbytes) modulo the polynomial: moves a crc past ``nbytes`` appended bytes."""
    p = _ONE
    k = 3  # 8 * nbytes = nbytes << 3
    n = nbytes
    while n:
        if n & 1:
            p = _mulmod(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def combine(crc1: int, crc2: int, len2: int) -> int:
    """The crc32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    return _mulmod(_shift(len2), crc1) ^ crc2 if len2 else crc1


def crc_of_pieces(pieces: list[tuple[int, int, int]], end: int) -> int | None:
    """The crc32 of bytes ``[0, end)`` from ``(start, length, crc32)`` pieces, or None when the
    pieces do not tile that range exactly (a gap or an overlap: the caller checks it whole)."""
    crc = 0
    pos = 0
    for start, length, c in sorted(pieces):
        if start != pos:
            return None
        crc = combine(crc, c, length)
        pos += length
    return crc if pos == end else None

