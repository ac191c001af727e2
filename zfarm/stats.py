"""Job statistics on the client side: one record per finished job, and a summary.

The broker stamps each result with where and when the job ran (worker, host,
times queued/started/finished, run time, attempts, the slot's peak memory);
the client keeps the newest records (bounded) for :meth:`zfarm.Client.stats`.
A ``map`` with ``chunksize`` > 1 makes one record per chunk.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from zfarm.protocol import JobStats

_ERROR_TYPE = re.compile(r"^(?:item \d+ of the chunk: )?([\w.]+)")


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    worker: str
    host: str
    attempts: int
    queued_at: float  # epoch seconds
    started_at: float
    finished_at: float
    run_s: float
    peak_rss_bytes: int
    outcome: str  # ok, error, crashed, lost
    error: str = ""  # the first line of the error, for failed jobs

    @property
    def error_type(self) -> str:
        match = _ERROR_TYPE.match(self.error)
        return match.group(1) if match else ""


@dataclass(frozen=True)
class Summary:
    count: int = 0
    ok: int = 0
    failed: int = 0
    mean_run_s: float = 0.0
    p50_run_s: float = 0.0
    p95_run_s: float = 0.0
    max_run_s: float = 0.0
    jobs_per_worker: dict[str, int] = field(default_factory=dict)
    failures_by_type: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        """A few lines for people, as ``print(client.stats().summary)`` shows them::

            12 jobs: 11 ok, 1 failed
            run time: mean 0.512 s, median 0.498 s, 95% 0.901 s, max 1.2 s
            per worker: w-1 6, w-2 6
            failures: ValueError 1
        """
        if not self.count:
            return "no finished jobs"
        lines = [f"{plural(self.count, 'job')}: {self.ok:,} ok, {self.failed:,} failed",
                 f"run time: mean {_seconds(self.mean_run_s)}, median {_seconds(self.p50_run_s)}, "
                 f"95% {_seconds(self.p95_run_s)}, max {_seconds(self.max_run_s)}"]
        if self.jobs_per_worker:
            busiest = sorted(self.jobs_per_worker.items(), key=lambda item: (-item[1], item[0]))
            lines.append("per worker: " + ", ".join(f"{worker} {count:,}" for worker, count in busiest))
        if self.failures_by_type:
            common = sorted(self.failures_by_type.items(), key=lambda item: (-item[1], item[0]))
            lines.append("failures: " + ", ".join(f"{kind} {count:,}" for kind, count in common))
        return "\n".join(lines)


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless it is one: "1 job", "1,024 jobs"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _seconds(value: float) -> str:
    """Seconds to three significant digits, in ms or µs below a second so small times stay readable."""
    if value >= 1 or value == 0:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


@dataclass(frozen=True)
class Stats:
    records: list[JobRecord]
    summary: Summary


def summarize(records: Sequence[JobRecord]) -> Summary:
    """Count, run-time percentiles, jobs per worker and failures by exception type."""
    if not records:
        return Summary()
    times = sorted(r.run_s for r in records)
    failed = [r for r in records if r.outcome != "ok"]
    return Summary(
        count=len(records),
        ok=len(records) - len(failed),
        failed=len(failed),
        mean_run_s=statistics.fmean(times),
        p50_run_s=_percentile(times, 0.50),
        p95_run_s=_percentile(times, 0.95),
        max_run_s=times[-1],
        jobs_per_worker=dict(Counter(r.worker for r in records if r.worker)),
        failures_by_type=dict(Counter(r.error_type or r.outcome for r in failed)),
    )


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted data."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def record_of(job_id: str, outcome: str, error: str, stats: JobStats) -> JobRecord:
    """Build a record from a RESULT's stats row."""
    return JobRecord(job_id, stats.worker_id, stats.host, stats.attempts, stats.queued_at, stats.started_at,
                     stats.finished_at, stats.run_s, stats.peak_rss_bytes, outcome, error)
