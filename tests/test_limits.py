"""Per-job limits enforced by the worker: time and memory. The worker lives on and keeps heartbeating."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import zfarm
from tests import jobs
from tests.helpers import Procs, wait_for
from zfarm.monitor import fetch_status

pytestmark = pytest.mark.timeout(60)
# Heartbeats every 0.2 s, but a 2 s liveness window: a machine loaded by two test suites at once can
# hold a process off its CPU for more than 0.6 s, and these tests are about limits, not detection.
FAST = ("--heartbeat-interval", "0.2", "--liveness", "10")


@pytest.fixture
def farm(procs: Procs) -> tuple[str, int]:
    endpoint, (worker,) = procs.farm(*FAST)
    return endpoint, worker.pid


def test_a_job_past_its_time_limit_is_killed_and_the_worker_serves_on(farm: tuple[str, int]) -> None:
    endpoint, worker_pid = farm
    with zfarm.Client(endpoint, job_timeout_s=0.5) as client:
        started = time.monotonic()
        future = client.submit(jobs.sleep_then, 1, 30.0)
        with pytest.raises(zfarm.JobTimeout) as info:
            future.result(20)
        assert time.monotonic() - started < 10  # killed near its limit, not after 30 s
        assert info.value.limit_s == 0.5 and info.value.ran_s >= 0.5
        assert isinstance(info.value, TimeoutError)
        assert "raise job_timeout_s" in str(info.value).lower()
        assert client.submit(jobs.square, 6).result(20) == 36  # the slot was replaced
        timed_out, finished = client.stats().records
        assert timed_out.outcome == "error" and timed_out.error.startswith("zfarm.errors.JobTimeout")
        assert finished.outcome == "ok"
    snap = fetch_status(endpoint)
    assert [w["pid"] for w in snap["workers"]] == [worker_pid]  # the same worker, alive throughout
    assert snap["workers_lost"] == 0


def test_with_options_limits_only_those_jobs_and_map_scales_per_item(farm: tuple[str, int]) -> None:
    endpoint, _ = farm
    with zfarm.Client(endpoint) as client:
        limited = client.with_options(job_timeout_s=0.3)
        with pytest.raises(zfarm.JobTimeout):
            limited.submit(jobs.sleep_then, 1, 30.0).result(20)
        assert client.submit(jobs.sleep_then, 2, 0.5).result(20) == 2  # no limit on the client itself
        # each of 3 items may take 0.4 s; the chunk of 3 gets 1.2 s and finishes in ~0.6 s
        items = client.map(jobs.sleep_then, range(3), [0.2] * 3, chunksize=3, job_timeout_s=0.4)
        assert list(items) == [0, 1, 2]
        with pytest.raises(zfarm.ConfigError):
            client.with_options(job_timeout_s=-1)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="memory is read from /proc")
def test_a_job_over_its_memory_limit_is_killed(farm: tuple[str, int]) -> None:
    endpoint, _ = farm
    with zfarm.Client(endpoint) as client:
        hog = client.with_options(mem_limit=150 * 2**20).submit(jobs.hog_memory, 400, 30.0)
        with pytest.raises(zfarm.MemoryLimitExceeded) as info:
            hog.result(30)
        assert info.value.limit == 150 * 2**20
        assert info.value.reached > 150 * 2**20
        assert isinstance(info.value, MemoryError)
        small = client.with_options(mem_limit=150 * 2**20).submit(jobs.hog_memory, 10, 0.0)
        assert small.result(20) == 10 * 2**20


def test_retries_run_a_raising_job_again_with_backoff(farm: tuple[str, int], tmp_path: Path) -> None:
    endpoint, _ = farm
    with zfarm.Client(endpoint, retry_backoff_s=0.1) as client:
        flaky, never = tmp_path / "flaky", tmp_path / "never"
        flaky.mkdir()
        never.mkdir()
        started = time.monotonic()
        assert client.with_options(retries=2).submit(jobs.fail_times, str(flaky), 2, 5).result(20) == 5
        assert time.monotonic() - started >= 0.1 + 0.2  # waited out the backoff twice
        assert len(list(flaky.iterdir())) == 3
        with pytest.raises(RuntimeError, match="attempt 2 fails"):  # retries=1: two runs, then the error
            client.with_options(retries=1).submit(jobs.fail_times, str(never), 5, 0).result(20)
        assert len(list(never.iterdir())) == 2
        once = tmp_path / "once"
        once.mkdir()
        with pytest.raises(RuntimeError, match="attempt 1 fails"):  # default: no retry of user errors
            client.submit(jobs.fail_times, str(once), 1, 0).result(20)
        assert len(list(once.iterdir())) == 1


def test_an_immediate_retry_runs_the_job_again_not_the_held_result(farm: tuple[str, int],
                                                                  tmp_path: Path) -> None:
    """With no backoff the re-run goes out at once: the broker must not answer it with the error it holds."""
    endpoint, _ = farm
    for session in (None, "retrying"):
        counter = tmp_path / f"runs-{session}"
        counter.mkdir()
        with zfarm.Client(endpoint, retry_backoff_s=0, session=session) as client:
            assert client.with_options(retries=3).submit(jobs.fail_times, str(counter), 2, 7).result(20) == 7
        assert len(list(counter.iterdir())) == 3


def test_a_full_broker_holds_submitters_back_and_loses_nothing(procs: Procs) -> None:
    """--max-queued bounds the broker's queue; the client's extra jobs wait and all run in the end."""
    _, endpoint = procs.broker(None, *FAST, "--max-queued", "50")
    with zfarm.Client(endpoint) as client:
        results = client.map(jobs.square, range(400), chunksize=1)  # submits its first window at once
        # no worker yet: the queue fills to its bound, the rest is bounced back and resent, and stays out
        wait_for(lambda: fetch_status(endpoint)["queued"] == 50, 10, message="the queue to fill")
        wait_for(lambda: fetch_status(endpoint)["bounced"] > 350, 10, message="the broker to bounce jobs")
        held_until = time.monotonic() + 1.0  # and holds while the client keeps offering the rest
        while time.monotonic() < held_until:
            assert fetch_status(endpoint)["queued"] == 50
        procs.worker(endpoint, procs=2)
        assert list(results) == [x * x for x in range(400)]
    snap = fetch_status(endpoint)
    assert snap["done"] == 400 and snap["failed"] == 0 and snap["queued"] == 0


def test_a_job_killed_by_its_time_limit_is_not_retried(farm: tuple[str, int], tmp_path: Path) -> None:
    """The worker marks a limit's kill (ResultKind.LIMIT): the client does not spend its retries on it."""
    endpoint, _ = farm
    runs = tmp_path / "runs"
    runs.mkdir()
    with zfarm.Client(endpoint, retry_backoff_s=0) as client:
        future = client.with_options(retries=2, job_timeout_s=0.5).submit(jobs.record_run, str(runs), 1, 30.0)
        with pytest.raises(zfarm.JobTimeout):
            future.result(30)
    assert len(list(runs.iterdir())) == 1  # one run: not retried
