"""One message a job each way on a slot's pipe: a msgpack header and the frames, in one write.

::

    [length of the rest: 4 bytes, big-endian]   ← multiprocessing's own framing (recv_bytes reads it)
    [length of the header: 4 bytes, big-endian][msgpack header + the frames' lengths][frame 0][frame 1]…

Sent with one ``writev`` (no copy of the frames on this side), read straight into one buffer of
the message's size (the frames come back as views of it: no copy on this side either). One
message instead of one per frame means the reader never blocks between the parts of a job while
the writer waits for the CPU, and two system calls per hop instead of one or two per frame.
"""

from __future__ import annotations

import os
import struct
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from zfarm.protocol import buffer_of

#: more parts than this go through one joined buffer (writev takes at most IOV_MAX parts)
MAX_PARTS = 512


def send(conn: Connection, header: list[Any], frames: list[Any]) -> None:
    """Send ``header`` and ``frames`` as one message (raises OSError if the other end is gone)."""
    views = [memoryview(buffer_of(f)).cast("B") for f in frames]
    head = msgpack.packb([*header, [v.nbytes for v in views]])
    body = 4 + len(head) + sum(v.nbytes for v in views)
    parts: list[Any] = [struct.pack("!iI", body, len(head)), head, *views]
    if len(parts) > MAX_PARTS:
        parts = [b"".join(parts)]
    fd = conn.fileno()
    written = os.writev(fd, parts)
    total = 4 + body
    if written < total:  # a signal cut the write short: send the rest
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest):]


def receive(conn: Connection) -> tuple[list[Any], list[memoryview]]:
    """One message: its header fields and its frames (views of the buffer read).

    Raises:
        EOFError, OSError: the other end is gone.
    """
    fd = conn.fileno()
    (size,) = struct.unpack("!i", _read_exactly(fd, 4))
    buf = memoryview(_read_exactly(fd, size))
    (head_len,) = struct.unpack_from("!I", buf)
    header = msgpack.unpackb(buf[4:4 + head_len])
    frames = []
    at = 4 + head_len
    for size in header.pop():
        frames.append(buf[at:at + size])
        at += size
    return header, frames


def _read_exactly(fd: int, size: int) -> bytearray:
    """``size`` bytes from a blocking pipe, read into one buffer (EOFError if it closes first)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the other end of the slot's pipe closed")
        got += n
    return buf
