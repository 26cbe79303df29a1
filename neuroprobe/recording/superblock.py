"""The HDF5 superblock (versions 2 and 3, at the file's start), read without HDF5.

Two parts of neuroprobe need it before HDF5 opens a file: the writer clears the
"open for write" flags a killed SWMR writer leaves behind (``h5clear -s``), and the
reader tells a file marked open for write (a live or killed writer: read it as SWMR)
from a finished one, and says how long HDF5 expects a damaged file to be.  Layout
(HDF5 file format specification, superblock versions 2 and 3): signature (8 bytes),
version, size of offsets, size of lengths, status flags, then four addresses (base,
superblock extension, end of file, root group object header), then a lookup3
checksum of everything before it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

#: The first 8 bytes of an HDF5 superblock.
SIGNATURE = b"\x89HDF\r\n\x1a\n"


def lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` with seed 0: HDF5's metadata checksum."""
    mask = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    n = len(data)
    a = b = c = (0xDEADBEEF + n) & mask
    i = 0
    while n - i > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & mask
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & mask
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & mask
        a = (a - c) & mask; a ^= rot(c, 4); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 6); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 8); b = (b + a) & mask  # noqa: E702
        a = (a - c) & mask; a ^= rot(c, 16); c = (c + b) & mask  # noqa: E702
        b = (b - a) & mask; b ^= rot(a, 19); a = (a + c) & mask  # noqa: E702
        c = (c - b) & mask; c ^= rot(b, 4); b = (b + a) & mask  # noqa: E702
        i += 12
    if i == n:
        return c
    rest = data[i:] + bytes(12 - (n - i))
    a = (a + int.from_bytes(rest[0:4], "little")) & mask
    b = (b + int.from_bytes(rest[4:8], "little")) & mask
    c = (c + int.from_bytes(rest[8:12], "little")) & mask
    c ^= b; c = (c - rot(b, 14)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 11)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 25)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 16)) & mask  # noqa: E702
    a ^= c; a = (a - rot(c, 4)) & mask  # noqa: E702
    b ^= a; b = (b - rot(a, 14)) & mask  # noqa: E702
    c ^= b; c = (c - rot(b, 24)) & mask  # noqa: E702
    return c


@dataclass(frozen=True)
class Superblock:
    """A version 2/3 superblock whose checksum holds.

    Attributes
    ----------
    block
        Its bytes up to (without) the checksum.
    flags
        The status flags: non-zero while a writer has the file open (or was killed with it open).
    eof
        The end-of-file address: how long HDF5 expects the file to be.
    """

    block: bytes
    flags: int
    eof: int


def read(path: str | Path) -> Superblock | None:
    """The superblock at the start of ``path`` if it is version 2 or 3 and its checksum holds, else ``None``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12 + 4 * 8 + 4)
    except OSError:
        return None
    if len(head) < 12 or head[:8] != SIGNATURE or head[8] not in (2, 3) or head[9] not in (2, 4, 8):
        return None
    width = head[9]
    end = 12 + 4 * width
    if len(head) < end + 4 or lookup3(head[:end]) != struct.unpack("<I", head[end : end + 4])[0]:
        return None
    return Superblock(block=head[:end], flags=head[11], eof=int.from_bytes(head[12 + 2 * width : 12 + 3 * width], "little"))
