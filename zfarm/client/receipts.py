"""Which results the broker may forget: RECEIVED, batched, and a session's results read here.

The broker holds each result until the client says it has it. Outside a session the client says
so for every result that arrives, in batches (RECEIVED_BATCH results, or RECEIVED_DELAY_S after the
first), with the number below which every job's result has arrived (so the broker may also drop
what it holds for jobs the client no longer knows). A session says RECEIVED only for a re-run and,
at a clean close after all its jobs, for the results the program read: the others stay with the
session for a later run.

A result that a job still being submitted or run depends on (its future was that job's argument)
is pinned: no RECEIVED names it, and none says "every result below" past it, until the dependent
jobs are over, so the broker still holds it to hand to their slots.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Container, Iterable

from zfarm import protocol as p

#: RECEIVED goes out once this many results are unacknowledged, or RECEIVED_DELAY_S after the first
RECEIVED_BATCH = 4096
RECEIVED_DELAY_S = 0.05


class Pins:
    """Results kept held at the broker for dependent jobs: seq → how many jobs wait for it.

    Pinned from user threads (while a dependent job's arguments are walked, before its upstream
    future could settle) and released from either side, hence the lock; it guards only this map.
    """

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, seq: int) -> None:
        with self._lock:
            self._count[seq] = self._count.get(seq, 0) + 1

    def release(self, seqs: Iterable[int]) -> None:
        with self._lock:
            for seq in seqs:
                left = self._count.get(seq, 0) - 1
                if left > 0:
                    self._count[seq] = left
                else:
                    self._count.pop(seq, None)

    def snapshot(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._count)


class Receipts:
    """Plain bookkeeping (no I/O, no clock) owned by :class:`zfarm.client.core.ClientCore`."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.pending: list[int] = []  # results to tell the broker about, batched
        self.pins = Pins()
        self._kept: list[int] = []  # results that arrived while pinned: told once they are not
        self.since = 0.0  # when the first of them arrived
        #: a session's results that reached us (released, once read, by a clean close)
        self.arrived: set[int] = set()
        #: seqs whose result the program read, appended from user threads (list.append is atomic);
        #: only a close looks at them, so reading a result never wakes the I/O thread
        self.read_seqs: list[int] = []
        self._unfinished: list[int] = []  # seqs of unfinished jobs, for the oldest (stale ones popped late)
        self._posted_upto = 1  # every seq below it has been posted to the I/O thread
        self._posted_above: set[int] = set()

    def submitted(self, seq: int) -> None:
        heapq.heappush(self._unfinished, seq)
        self.posted(seq)

    def posted(self, seq: int) -> None:
        """Seq ``seq`` reached the I/O thread (as a job, or as a number never used)."""
        self._posted_above.add(seq)
        while self._posted_upto in self._posted_above:
            self._posted_above.discard(self._posted_upto)
            self._posted_upto += 1

    def note(self, seqs: list[int], now: float) -> None:
        if seqs:
            if not self.pending:
                self.since = now
            self.pending.extend(seqs)

    def due_at(self) -> float | None:
        return self.since + RECEIVED_DELAY_S if self.pending else None

    def take(self, now: float, unfinished: Container[int], force: bool = False) -> p.Received | None:
        """The RECEIVED to send now, if one is due (``force``: whatever is pending)."""
        if not self.pending and not self._kept:
            return None  # most I/O turns: nothing arrived, nothing set aside (no lock, no snapshot)
        pinned = self.pins.snapshot()
        if self._kept and (free := [seq for seq in self._kept if seq not in pinned]):
            self._kept = [seq for seq in self._kept if seq in pinned]
            self.note(free, now)
        if pinned and self.pending:  # held for a dependent job: set aside, not due meanwhile
            self._kept.extend(seq for seq in self.pending if seq in pinned)
            self.pending = [seq for seq in self.pending if seq not in pinned]
        due = force or len(self.pending) >= RECEIVED_BATCH or now - self.since >= RECEIVED_DELAY_S
        if not self.pending or not due:
            return None
        msg = p.Received(self.pending, self.oldest_unfinished(unfinished, pinned))
        self.pending = []
        return msg

    def oldest_unfinished(self, unfinished: Container[int], pinned: frozenset[int] | None = None) -> int:
        """Every result of a job numbered below this one has arrived (0 in a session: keep them all).

        Seqs are taken in user threads, one after the other from 1, and posted here in any order:
        none at or above the lowest seq not posted yet is counted as arrived.
        """
        if self.session:
            return 0
        heap = self._unfinished
        while heap and heap[0] not in unfinished:  # seqs leave for good: pop them as they surface
            heapq.heappop(heap)
        below = min(self._posted_upto, heap[0]) if heap else self._posted_upto
        pinned = self.pins.snapshot() if pinned is None else pinned
        return min(below, min(pinned)) if pinned else below

    def read_results(self) -> list[int]:
        """A session's results that arrived here and that the program then read."""
        return sorted(self.arrived.intersection(self.read_seqs))
