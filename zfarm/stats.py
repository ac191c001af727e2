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
from typing import Any

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


def record_of(job_id: str, outcome: str, error: str, stats: Sequence[Any]) -> JobRecord:
    """Build a record from a RESULT stats row (protocol.JOB_STATS_ROW)."""
    worker, host, attempts, queued_at, started_at, finished_at, run_s, peak_rss = stats
    return JobRecord(job_id, worker, host, attempts, queued_at, started_at, finished_at, run_s, peak_rss,
                     outcome, error)
