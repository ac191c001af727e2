"""Job statistics and history, checked against the jobs that really ran.

A real broker and two real workers run a known set of jobs (some fail, one
crashes its slot); ``Client.stats()`` and ``zfarm history`` must describe
exactly those jobs: ids, workers, hosts, outcomes, times in order, attempts.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import time
from pathlib import Path

import pytest

import zfarm
from tests import jobs
from tests.helpers import Procs, free_tcp_endpoint, require_status, run_zfarm, wait_for
from zfarm.stats import JobRecord, summarize

pytestmark = pytest.mark.timeout(90)


def test_client_stats_and_broker_history_describe_the_jobs_that_ran(procs: Procs) -> None:
    endpoint, workers = procs.farm(workers=2)
    snap = require_status(endpoint)
    worker_ids = {w["id"] for w in snap["workers"]}
    assert {w["pid"] for w in snap["workers"]} == {w.pid for w in workers}
    before = time.time()
    with zfarm.Client(endpoint) as client:
        squares = list(client.map(jobs.slow_square, range(20), [0.01] * 20, chunksize=1))
        failures = [client.submit(jobs.boom, i) for i in range(3)]
        crash = client.submit(jobs.segfault, 0)
        for future in failures:
            with pytest.raises(ValueError):
                future.result(30)
        with pytest.raises(zfarm.JobCrashed):
            crash.result(30)
        stats = client.stats()
        client_id = client.id
    after = time.time()
    assert squares == [x * x for x in range(20)]

    records = {r.id: r for r in stats.records}
    assert len(records) == 24 == len(stats.records)  # one record per job, none twice
    assert set(records) == {f"{client_id}:{seq}" for seq in range(1, 25)}
    for record in records.values():
        assert record.worker in worker_ids
        assert record.host == socket.gethostname()
        assert record.attempts == 1
        assert before - 1 <= record.queued_at <= record.started_at <= record.finished_at <= after + 1
        assert record.run_s >= 0
    ok = [r for r in stats.records if r.outcome == "ok"]
    assert len(ok) == 20
    assert all(r.run_s >= 0.009 for r in ok)  # each slept 10 ms
    assert all(r.peak_rss_bytes > 1_000_000 for r in ok)  # a Python process is at least a few MB
    failed = sorted(r.outcome for r in stats.records if r.outcome != "ok")
    assert failed == ["crashed", "error", "error", "error"]
    assert all(r.error.startswith("ValueError: boom") for r in stats.records if r.outcome == "error")

    summary = stats.summary
    assert (summary.count, summary.ok, summary.failed) == (24, 20, 4)
    assert summary.failures_by_type == {"ValueError": 3, "zfarm.errors.JobCrashed": 1}
    assert sum(summary.jobs_per_worker.values()) == 24 and set(summary.jobs_per_worker) <= worker_ids
    assert 0 <= summary.p50_run_s <= summary.p95_run_s <= summary.max_run_s
    assert summary.p50_run_s >= 0.009  # most jobs slept 10 ms

    # the broker's history holds the same 24 jobs with the same facts
    result = run_zfarm("history", "--connect", endpoint, "--json")
    assert result.returncode == 0, result.stderr
    history = {row["id"]: row for row in json.loads(result.stdout)}
    assert set(history) == set(records)
    for job_id, row in history.items():
        record = records[job_id]
        assert (row["worker"], row["host"], row["attempts"], row["outcome"]) == (
            record.worker, record.host, record.attempts, record.outcome)
        assert row["client"] == client_id
        assert row["started_at"] == pytest.approx(record.started_at)
        assert row["run_s"] == pytest.approx(record.run_s, abs=1e-5)

    result = run_zfarm("history", "--connect", endpoint, "--csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {row["id"] for row in rows} == set(records)
    assert rows[0].keys() >= {"id", "client", "worker", "host", "queued_at", "started_at", "finished_at",
                              "run_s", "attempts", "outcome", "peak_rss_bytes", "error"}

    last = run_zfarm("history", "--connect", endpoint, "--json", "--last", "5")
    assert last.returncode == 0, last.stderr
    assert [row["id"] for row in json.loads(last.stdout)] == [row["id"] for row in rows[-5:]]


def test_a_summary_prints_as_a_few_readable_lines() -> None:
    def record(i: int, worker: str, run_s: float, error: str = "") -> JobRecord:
        outcome = "error" if error else "ok"
        return JobRecord(f"c-1:{i}", worker, "h", 1, 0.0, 0.0, 0.0, run_s, 0, outcome, error)

    records = [record(1, "w-a", 0.5), record(2, "w-a", 0.25), record(3, "w-b", 1.5),
               record(4, "w-b", 0.002, "ValueError: bad input 4")]
    assert str(summarize(records)) == (
        "4 jobs: 3 ok, 1 failed\n"
        "run time: mean 563 ms, median 250 ms, 95% 1.5 s, max 1.5 s\n"
        "per worker: w-a 2, w-b 2\n"
        "failures: ValueError 1")
    assert str(summarize([record(1, "w-a", 2e-5)])).startswith("1 job: 1 ok, 0 failed\nrun time: mean 20 µs")
    assert str(summarize([])) == "no finished jobs"
    assert repr(summarize([])).startswith("Summary(count=0")  # the fields stay there for code


def test_history_counts_a_requeued_job_attempts(procs: Procs, tmp_path: Path) -> None:
    """A job whose worker is killed runs again elsewhere; its record says attempts == 2."""
    endpoint, (first,) = procs.farm("--heartbeat-interval", "0.2")
    started = tmp_path / "started"
    started.mkdir()
    with zfarm.Client(endpoint) as client:
        future = client.submit(jobs.mark_then_sleep, str(started), 7, 0.5)
        wait_for(lambda: (started / "started-7").exists(), 30, message="the job never started")
        first.kill()
        procs.worker(endpoint, procs=1)
        assert future.result(30) == 7
        (record,) = client.stats().records
    assert record.attempts == 2
    assert record.outcome == "ok"


def test_history_of_an_unreachable_broker_fails_cleanly() -> None:
    endpoint = free_tcp_endpoint()  # nothing listens there
    result = run_zfarm("history", "--connect", endpoint, "--timeout", "1")
    assert result.returncode == 1
    assert endpoint in result.stderr
