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
from typing import BinaryIO

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
    """Check the write-ahead log at ``path`` (a missing or empty file is a clean one).

    Reads it a frame at a time: a log can be large (a turn's transaction holds its jobs' payloads).
    """
    if not os.path.exists(path):
        return WalDamage()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return _inspect(f, size) if size else WalDamage()


def _inspect(f: BinaryIO, size: int) -> WalDamage:
    header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        return WalDamage(f"its header is cut short ({size} bytes of {HEADER_BYTES})", -1, size)
    magic, _version, page_size, _ckpt, salt1, salt2, sum1, sum2 = struct.unpack(">8I", header)
    if magic not in _MAGIC or page_size < 512 or page_size & (page_size - 1):
        return WalDamage("its header is not a write-ahead log header", -1, size)
    big_endian = bool(magic & 1)
    if _checksum(header[:24], (0, 0), big_endian) != (sum1, sum2):
        return WalDamage("its header fails its checksum", -1, size)
    frame_bytes = FRAME_HEADER_BYTES + page_size
    seed = (sum1, sum2)
    good_end = offset = HEADER_BYTES  # good_end: the end of the last whole transaction
    while offset + frame_bytes <= size:
        frame = f.read(frame_bytes)
        head = struct.unpack(">6I", frame[:FRAME_HEADER_BYTES])
        if (head[2], head[3]) != (salt1, salt2):
            return WalDamage()  # a frame of an earlier pass over the file: the log ends here, as written
        seed = _checksum(frame[FRAME_HEADER_BYTES:], _checksum(frame[:8], seed, big_endian), big_endian)
        if seed != (head[4], head[5]):
            return WalDamage(f"the frame at byte {offset} fails its checksum",
                             _later_commits(f, size, frame_bytes, salt1, salt2), size - good_end)
        offset += frame_bytes
        if head[1]:  # this frame ends a transaction
            good_end = offset
    if offset < size:
        return WalDamage(f"it ends in the middle of a frame ({size - offset} bytes of {frame_bytes})",
                         -1, size - good_end)
    if good_end < size:
        return WalDamage("it ends in the middle of a transaction", -1, size - good_end)
    return WalDamage()


def _later_commits(f: BinaryIO, size: int, frame_bytes: int, salt1: int, salt2: int) -> int:
    """Transactions whose last frame lies after the file's position in this pass over it (all lost)."""
    count = 0
    offset = f.tell()
    while offset + frame_bytes <= size:
        f.seek(offset)
        _page, commit, s1, s2 = struct.unpack(">4I", f.read(16))
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
