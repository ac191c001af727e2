"""Jobs a client holds back before sending them again: a retry's backoff, or the broker's
back-pressure (BUSY). Sans-IO, part of :class:`zfarm.client.core.ClientCore`.

A job that raised and has retries left waits ``retry_backoff_s * 2 ** (attempt - 1)`` (at most
``RETRY_BACKOFF_MAX_S``). Jobs the broker had no room for wait in order — with every job submitted
after them, so none overtakes — and go back in batches of ``BUSY_BATCH``, less often while the
broker stays full (``BUSY_MIN_S`` doubling to ``BUSY_MAX_S``, with jitter so that clients bounced
together do not come back together).
"""

from __future__ import annotations

import heapq
import random
from collections import deque

#: back-pressure: jobs bounced by a full broker go back BUSY_BATCH at a time, waiting BUSY_MIN_S,
#: doubling up to BUSY_MAX_S while the broker stays full
BUSY_BATCH = 16
BUSY_MIN_S = 0.05
BUSY_MAX_S = 2.0


class Waiting:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._retry_at: list[tuple[float, int]] = []  # (when, seq): jobs waiting out a retry backoff
        self._retrying: set[int] = set()  # their seqs
        self.bounced: deque[int] = deque()  # in order: none overtakes a bounced job
        self._busy_backoff_s = BUSY_MIN_S
        self._busy_retry_at = 0.0

    def retry_at(self, seq: int, when: float) -> None:
        heapq.heappush(self._retry_at, (when, seq))
        self._retrying.add(seq)

    def retrying(self, seq: int) -> bool:
        return seq in self._retrying

    def seqs(self) -> set[int]:
        """Every job held back now."""
        return self._retrying | set(self.bounced)

    def note_room(self, busy: bool, now: float) -> None:
        """After a RESULT: if the broker bounced jobs, wait longer before offering them again."""
        if busy:
            jitter = 1 + self.rng.random() / 2  # clients that bounced together do not return together
            self._busy_retry_at = now + self._busy_backoff_s * jitter
            self._busy_backoff_s = min(self._busy_backoff_s * 2, BUSY_MAX_S)
        else:  # results mean the queue moves: offer the next batch soon
            self._busy_backoff_s = BUSY_MIN_S

    def due(self, now: float) -> tuple[list[int], list[int]]:
        """The retries whose backoff is over, and the next batch of bounced jobs if it may go."""
        retries: list[int] = []
        while self._retry_at and self._retry_at[0][0] <= now:
            _, seq = heapq.heappop(self._retry_at)
            self._retrying.discard(seq)
            retries.append(seq)
        batch: list[int] = []
        if self.bounced and now >= self._busy_retry_at:
            batch = [self.bounced.popleft() for _ in range(min(BUSY_BATCH, len(self.bounced)))]
            self._busy_retry_at = now + BUSY_MIN_S  # the next batch once this one has had a chance
        return retries, batch

    def next_at(self) -> float | None:
        """When something is next due (None: nothing waits)."""
        times = [self._retry_at[0][0]] if self._retry_at else []
        if self.bounced:
            times.append(self._busy_retry_at)
        return min(times) if times else None

    def take_all(self) -> list[int]:
        """Every job held back, at once (leaving a session: the broker runs them without us)."""
        waiting = [seq for _, seq in self._retry_at] + list(self.bounced)
        self._retry_at.clear()
        self._retrying.clear()
        self.bounced.clear()
        return waiting
