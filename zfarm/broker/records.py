"""What the broker remembers of the past: events, finished jobs, throughput.

Plain bounded data, fed by the scheduler with the time of each event: the
latest lifecycle events (for the dashboard), one record per finished job (for
``zfarm history``) and per-second completion counts for the last minute.
Memory stays bounded however long the broker runs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

#: the columns of a job record, as sent in HISTORY_REPLY and written by ``zfarm history --csv``
JOB_COLUMNS = ["id", "client", "worker", "host", "queued_at", "started_at", "finished_at", "run_s",
               "attempts", "outcome", "peak_rss_bytes", "error"]
THROUGHPUT_WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class Event:
    at: float  # the scheduler's clock
    kind: str  # worker-joined, worker-left, worker-lost, client-joined, client-left, job-failed
    text: str


class PerSecond:
    """How many events happened in each of the last ``seconds`` whole seconds (the current one last):
    a rate over a window, in bounded memory however many events there are."""

    __slots__ = ("_counts", "_next_s", "_second")

    def __init__(self, now: float, seconds: int = THROUGHPUT_WINDOW_S) -> None:
        self._second = math.floor(now)
        self._next_s = self._second + 1  # when the current second ends (one comparison per event)
        self._counts: deque[int] = deque([0] * seconds, maxlen=seconds)

    def add(self, now: float) -> None:
        if now >= self._next_s:
            self._roll(now)
        self._counts[-1] += 1

    def counts(self, now: float) -> list[int]:
        self._roll(now)
        return list(self._counts)

    def rate(self, now: float, age_s: float) -> float:
        """Events per second over the window (the seconds before it, and the part of the current one
        gone by), or over ``age_s`` if that is shorter."""
        self._roll(now)
        span = min(age_s, len(self._counts) - 1 + (now - self._second))
        return sum(self._counts) / span if span > 0 else 0.0

    def _roll(self, now: float) -> None:
        second = math.floor(now)
        if second > self._second:
            self._counts.extend([0] * min(second - self._second, len(self._counts)))
            self._second = second
            self._next_s = second + 1


class Records:
    def __init__(self, now: float, wall_offset_s: float = 0.0, history_size: int = 50_000,
                 event_count: int = 200) -> None:
        self.wall_offset_s = wall_offset_s
        self.events: deque[Event] = deque(maxlen=event_count)
        self.jobs: deque[tuple[Any, ...]] = deque(maxlen=history_size)
        self.lost_workers: deque[dict[str, Any]] = deque(maxlen=50)
        self._finished = PerSecond(now)

    def wall(self, now: float) -> float:
        """Epoch seconds for a time on the scheduler's clock."""
        return round(now + self.wall_offset_s, 6)

    def event(self, now: float, kind: str, text: str) -> None:
        self.events.append(Event(now, kind, text))

    def job(self, now: float, record: tuple[Any, ...]) -> None:
        """A job finished (in any way); ``record`` follows JOB_COLUMNS."""
        self.jobs.append(record)
        self._finished.add(now)

    def throughput(self, now: float) -> list[int]:
        """Jobs finished in each of the last 60 whole seconds, oldest first (the current one last)."""
        return self._finished.counts(now)

    def history(self, last: int = 0) -> list[list[Any]]:
        rows = self.jobs if not last else list(self.jobs)[-last:]
        return [list(r) for r in rows]

    def recent_events(self, now: float, count: int = 30) -> list[dict[str, Any]]:
        return [{"age_s": round(now - e.at, 3), "at": self.wall(e.at), "kind": e.kind, "text": e.text}
                for e in list(self.events)[-count:]]
