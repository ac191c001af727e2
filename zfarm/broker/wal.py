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


class WalMark:
    """Where the log ended at the last commit, in a small file beside the journal (``PATH-mark``).

    A log cut exactly at the end of a transaction reads as a log that ended there; only a record
    kept outside it tells. After each commit the broker writes the log's salts and size (16 bytes,
    not synced: a few microseconds); at the next start a log of the same pass (same salts) that is
    shorter than its mark was cut, or, with ``--journal-sync normal``, lost its tail to a power cut.
    SQLite itself never shortens the log while the broker runs (it only does at the checkpoint the
    broker asks for at start, after this check).
    """

    _FORMAT = ">IIQ"  # salt-1, salt-2, size in bytes

    def __init__(self, journal: str) -> None:
        self.path = journal + "-mark"
        self.wal = wal_path(journal)
        self._wal_fd = -1
        self._fd = -1

    def check(self) -> str:
        """What the log lost since the mark ("" if nothing or no mark)."""
        try:
            with open(self.path, "rb") as f:
                mark = f.read(struct.calcsize(self._FORMAT))
            with open(self.wal, "rb") as f:
                header = f.read(HEADER_BYTES)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return ""
        if len(mark) != struct.calcsize(self._FORMAT) or len(header) < HEADER_BYTES:
            return ""
        salt1, salt2, marked = struct.unpack(self._FORMAT, mark)
        if struct.unpack(">II", header[16:24]) != (salt1, salt2) or size >= marked:
            return ""  # another pass over the log (or the same one, whole)
        return (f"its write-ahead log {self.wal} is {marked - size} bytes shorter than when the broker last "
                f"committed to it ({size} of {marked}): the transactions in those bytes are lost. The file "
                "was cut, or, with --journal-sync normal, the machine lost power before writing it")

    def start(self) -> None:
        """Keep the mark from now on (after the start's checkpoint)."""
        try:
            self._wal_fd = os.open(self.wal, os.O_RDONLY)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            self.close(clean=False)  # no mark kept: only a cut at a transaction's end goes unnoticed
            return
        self.note()

    def note(self) -> None:
        """A commit succeeded: the log ends where it is now."""
        if self._fd < 0:
            return
        try:
            size = os.fstat(self._wal_fd).st_size
            salts = os.pread(self._wal_fd, 8, 16) if size >= HEADER_BYTES else b"\0" * 8
            os.pwrite(self._fd, salts + size.to_bytes(8, "big"), 0)
        except OSError:
            pass  # a full disk: the next commit tries again

    def close(self, clean: bool) -> None:
        """Stop keeping the mark; after a clean stop (the log is gone) the mark goes too."""
        for fd in (self._wal_fd, self._fd):
            if fd >= 0:
                os.close(fd)
        self._wal_fd = self._fd = -1
        if clean and not os.path.exists(self.wal):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
