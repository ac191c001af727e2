"""Read an SQLite write-ahead log before SQLite does, to tell a log that ends from one that was cut.

SQLite takes the first frame that fails its checksum (or a file cut in the middle of a
frame) as the end of the log and silently drops everything after it. For the broker's
journal that means jobs clients were told were accepted. :func:`inspect_wal` walks the
frames the way SQLite does and says what SQLite would drop and why, so the broker can
say so loudly instead of starting with less than it had.

Format (https://www.sqlite.org/fileformat2.html#walformat): a 32-byte header
(magic, version, page size, checkpoint number, two salts, a checksum), then frames of a
24-byte header (page number, database size for the frame that ends a transaction, the
two salts, a running checksum) and one page.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

HEADER_BYTES = 32
FRAME_HEADER_BYTES = 24
_MAGIC = (0x377F0682, 0x377F0683)  # the low bit: checksums over big-endian words


@dataclass(frozen=True, slots=True)
class WalDamage:
    """What SQLite would drop from a write-ahead log, and why ("" when nothing)."""

    problem: str = ""
    #: transactions written whole after the damage (lost with it); -1: cannot tell
    transactions_lost: int = 0
    bytes_lost: int = 0


def inspect_wal(path: str) -> WalDamage:
    """Check the write-ahead log at ``path`` (a missing or empty file is a clean one)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return WalDamage()
    if not data:
        return WalDamage()
    if len(data) < HEADER_BYTES:
        return WalDamage(f"its header is cut short ({len(data)} bytes of {HEADER_BYTES})", -1, len(data))
    magic, _version, page_size, _ckpt, salt1, salt2, sum1, sum2 = struct.unpack(">8I", data[:HEADER_BYTES])
    if magic not in _MAGIC or page_size < 512 or page_size & (page_size - 1):
        return WalDamage("its header is not a write-ahead log header", -1, len(data))
    big_endian = bool(magic & 1)
    if _checksum(data[:24], (0, 0), big_endian) != (sum1, sum2):
        return WalDamage("its header fails its checksum", -1, len(data))
    frame_bytes = FRAME_HEADER_BYTES + page_size
    seed = (sum1, sum2)
    good_end = HEADER_BYTES  # the end of the last whole transaction
    offset = HEADER_BYTES
    while offset + frame_bytes <= len(data):
        head = struct.unpack(">6I", data[offset:offset + FRAME_HEADER_BYTES])
        if (head[2], head[3]) != (salt1, salt2):
            return WalDamage()  # a frame of an earlier pass over the file: the log ends here, as written
        seed = _checksum(data[offset + FRAME_HEADER_BYTES:offset + frame_bytes],
                         _checksum(data[offset:offset + 8], seed, big_endian), big_endian)
        if seed != (head[4], head[5]):
            return WalDamage(f"the frame at byte {offset} fails its checksum",
                             _later_commits(data, offset + frame_bytes, frame_bytes, salt1, salt2),
                             len(data) - good_end)
        offset += frame_bytes
        if head[1]:  # this frame ends a transaction
            good_end = offset
    if offset < len(data):
        return WalDamage(f"it ends in the middle of a frame ({len(data) - offset} bytes of {frame_bytes})",
                         -1, len(data) - good_end)
    if good_end < len(data):
        return WalDamage("it ends in the middle of a transaction", -1, len(data) - good_end)
    return WalDamage()


def _later_commits(data: bytes, offset: int, frame_bytes: int, salt1: int, salt2: int) -> int:
    """Transactions whose last frame lies after ``offset`` in this pass over the file (all lost)."""
    count = 0
    while offset + frame_bytes <= len(data):
        _page, commit, s1, s2 = struct.unpack(">4I", data[offset:offset + 16])
        if (s1, s2) != (salt1, salt2):
            break
        count += commit != 0
        offset += frame_bytes
    return count


def _checksum(block: bytes, seed: tuple[int, int], big_endian: bool) -> tuple[int, int]:
    """SQLite's running checksum over 32-bit word pairs."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(block) // 4}I", block)
    s0, s1 = seed
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_path(journal: str) -> str:
    return journal + "-wal"


def wal_exists(journal: str) -> bool:
    return os.path.exists(wal_path(journal))
