"""Following a running job's output: ``zfarm logs NAME INDEX --follow``.

::

    Follower ──PEEK(job, offset)──► broker ──► the job's worker reads ≤ 64 KiB of the stream from the
       │  ▲                                    job's file in its live folder (zfarm.output)
       │  └───────────PEEK_REPLY(chunk)─────────────────────┘
       ▼
    stdout: what the job wrote so far, then each new chunk (asked again every POLL_S, at once while
    a whole chunk came); when the job's result arrives, the rest from the tail it carries

Pull, not push: the follower asks with the offset it has printed up to, so a lost or late reply
costs nothing but a second ask (each ask has a deadline), the broker and the worker keep nothing
about followers, and a follower that stops reading only stops asking. A reply of another file
than before (or one shorter than what was printed) means the job started over (a retry, or
another worker took it over): the follower says so and prints the new run from its start.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zfarm import protocol as p
from zfarm.errors import ConfigError, SecurityError
from zfarm.link import Link
from zfarm.monitor import monitor_hello, open_monitor

if TYPE_CHECKING:
    from zfarm.client.executor import Client

log = logging.getLogger(__name__)

#: how often a running job is asked for new output
POLL_S = 0.3
#: how long one ask waits for its answer before asking again (the worker may have died meanwhile)
REPLY_TIMEOUT_S = 5.0
#: asks in a row without an answer before the follower says so (it keeps asking)
UNANSWERED_ASKS = 3
STARTED_OVER = "the job started over (it runs again): its new output follows from the start"
#: the streams a follower may print, as placed in PEEK's offsets
STDOUT, STDERR = 0, 1


class Peeker:
    """One monitor link to the broker that asks for one job's output; every wait has a deadline.

    Raises (from the constructor):
        ConfigError: ``address`` is not an endpoint.
    """

    def __init__(self, address: str, keys: str, client_id: str, seq: int) -> None:
        self.address = address
        self.client_id = client_id
        self.seq = seq
        self._hello = monitor_hello("follow")
        self.link: Link = open_monitor(address, self._hello, keys)
        self._asks = 0

    def ask(self, stream: int, offset: int, timeout_s: float = REPLY_TIMEOUT_S) -> p.PeekReply | None:
        """The job's ``stream`` from ``offset``, or where the job stands; None: no answer in time.

        Raises:
            SecurityError: the broker does not let us in (keys).
        """
        self._asks += 1
        offsets = [offset if i == stream else -1 for i in range(p.STREAMS)]
        self.link.send(p.Peek(self.client_id, self.seq, offsets, self._asks))
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            ready = dict(self.link.poller().poll(max(1, int(left_s * 1000))))
            readable = self.link.readable(ready)
            if self.link.problem:
                raise SecurityError(f"the broker at {self.address} did not let us in: {self.link.problem}")
            if not readable:
                continue
            for msg in self.link.receive():
                if isinstance(msg, p.Reconnect):  # the broker forgot us (it restarted): introduce us again
                    self.link.send(self._hello)
                    self.link.send(p.Peek(self.client_id, self.seq, offsets, self._asks))
                elif isinstance(msg, p.PeekReply) and msg.ask == self._asks:
                    return msg
        return None

    def close(self) -> None:
        self.link.goodbye("follower done", linger_ms=200)


@dataclass
class Position:
    """How much of one stream of the job's current run has been printed."""

    offset: int = 0
    file_id: int = 0  # the run the printed bytes came from (0: none seen yet)
    said_waiting: bool = False  # "waiting for the job to start" was said

    def take(self, reply: p.PeekReply, stream: int) -> tuple[bytes, str]:
        """The new bytes a RUNNING reply carries, and a note for the user ("" if none)."""
        chunk = bytes(p.buffer_of(reply.frames[stream])) if reply.frames else b""
        size, file_id = reply.sizes[stream], reply.ids[stream]
        if file_id and self.file_id and (file_id != self.file_id or size < self.offset):
            note = STARTED_OVER if self.offset else ""
            self.offset = 0
            self.file_id = file_id
            return b"", note  # this chunk was read from the old offset: ask again from 0
        if file_id:
            self.file_id = file_id
        if reply.offsets[stream] != self.offset:
            return b"", ""  # an answer to an older ask
        self.offset += len(chunk)
        return chunk, ""

    def rest(self, tail: bytes, cut: int) -> tuple[bytes, str]:
        """What of a finished job's kept ``tail`` (``cut`` bytes dropped before it) is not printed yet."""
        if self.offset >= cut:
            return tail[self.offset - cut:], ""
        skipped = cut - self.offset
        return tail, f"{skipped} bytes were cut before the kept end; the last {len(tail)} follow"


def follow(peeker: Peeker, stream: int, position: Position, write: Callable[[bytes], None],
           say: Callable[[str], None], future: concurrent.futures.Future[Any] | None = None,
           poll_s: float = POLL_S) -> None:
    """Print the job's ``stream`` from ``position`` with ``write`` while it runs (notes with ``say``),
    until it is over (see :func:`pieces`); the caller prints the rest from its result."""
    for data, note in pieces(peeker, stream, position, future, poll_s):
        if note:
            say(note)
        if data:
            write(data)


def pieces(peeker: Peeker, stream: int, position: Position,
           future: concurrent.futures.Future[Any] | None = None,
           poll_s: float = POLL_S) -> Iterator[tuple[bytes, str]]:
    """The job's new output and notes for the user, ``(bytes, note)``, until it is over: its
    ``future`` done or, without one, the broker saying that it finished (or knows it no more)."""
    unanswered = 0
    while future is None or not future.done():
        reply = peeker.ask(stream, position.offset)
        if reply is None:
            unanswered += 1
            if unanswered == UNANSWERED_ASKS:
                yield b"", (f"no answer about the job for {UNANSWERED_ASKS * REPLY_TIMEOUT_S:g} s (its "
                            "worker may be gone); still asking")
            continue
        unanswered = 0
        if reply.status == p.PeekStatus.RUNNING:
            data, note = position.take(reply, stream)
            if data or note:
                yield data, note
            if len(data) == p.PEEK_CHUNK_BYTES:
                continue  # more is likely there: ask again at once
        elif reply.status == p.PeekStatus.QUEUED:
            if not position.said_waiting:
                position.said_waiting = True
                yield b"", "waiting for the job to start"
        elif future is None:
            return  # over, as far as the broker knows: its result holds the rest
        if future is None:
            time.sleep(poll_s)
        else:
            concurrent.futures.wait([future], poll_s)


def live_output(client: Client, future: concurrent.futures.Future[Any], stream: str = "stdout",
                poll_s: float = POLL_S) -> Iterator[bytes]:
    """A job's output as it runs, then the rest once it is over: every byte once, in order.

    For a command job (``client.run``) its command's output; for a function job what it printed
    (``future.output`` once it is done). The generator ends when the job does; its result is the
    future's, as ever.

    Args:
        client: the client that submitted the job.
        future: the job's future, from ``client.submit`` or ``client.run``.
        stream: "stdout" or "stderr".

    Raises:
        ConfigError: ``stream`` is neither.
        SecurityError: the broker does not let a monitor with the client's keys in.
    """
    if stream not in ("stdout", "stderr"):
        raise ConfigError(f"stream {stream!r}: expected 'stdout' or 'stderr'")
    which = STDOUT if stream == "stdout" else STDERR
    position = Position()
    if not future.done():
        peeker = Peeker(client.address, client.settings.keys, client.id, getattr(future, "seq", 0))
        try:
            for data, note in pieces(peeker, which, position, future, poll_s):
                if note:
                    log.info("job %s:%s: %s", client.id, getattr(future, "seq", "?"), note)
                if data:
                    yield data
        finally:
            peeker.close()
    tail, cut = kept_tail(future, which)
    rest, note = position.rest(tail, cut)
    if note:
        log.warning("job %s:%s: %s", client.id, getattr(future, "seq", "?"), note)
    if rest:
        yield rest


def kept_tail(future: concurrent.futures.Future[Any], stream: int) -> tuple[bytes, int]:
    """The end of a finished job's stream its result carries, and the bytes cut before it: a
    command's own output, else what the job printed (nothing for a job that did not run)."""
    from zfarm.batch import result_of

    result = result_of(future)
    kept = result if result is not None else getattr(future, "output", None)
    if kept is None:
        return b"", 0
    text, cut = (kept.stdout, kept.stdout_cut) if stream == STDOUT else (kept.stderr, kept.stderr_cut)
    return text.encode(), cut
