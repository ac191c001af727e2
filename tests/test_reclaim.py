"""No idle slot while work waits, with real processes: a job prefetched behind a long one moves to a
worker that joins later (the broker's RECLAIM, the worker's RETURNED)."""

from __future__ import annotations

from pathlib import Path

import zfarm
from tests import jobs
from tests.helpers import Procs, require_status, wait_for, wait_for_workers

RESULT_TIMEOUT_S = 30.0
#: a worker's start and registration, and the job's way back and out again, on a loaded machine
MOVE_TIMEOUT_S = 40.0


def test_a_job_prefetched_behind_a_long_one_starts_on_a_worker_that_joins_later(
        procs: Procs, tmp_path: Path) -> None:
    release = tmp_path / "release"
    _, endpoint = procs.broker()
    procs.worker(endpoint, procs=1)
    wait_for_workers(endpoint, 1)
    with zfarm.Client(endpoint) as client:
        try:
            futures = [client.submit(jobs.hold, str(release), i) for i in range(2)]
            wait_for(futures[0].running, RESULT_TIMEOUT_S, message="the first job to run")
            # The only worker holds both: one in its slot, one prefetched behind it.
            wait_for(lambda: [w["busy"] for w in require_status(endpoint)["workers"]] == [2],
                     RESULT_TIMEOUT_S, interval_s=0.1, message="the first worker to hold both jobs")
            procs.worker(endpoint, procs=1)
            wait_for(lambda: all(f.running() for f in futures), MOVE_TIMEOUT_S,
                     message="the second job to start on the worker that joined, while the first runs")
            busy = sorted(w["busy"] for w in require_status(endpoint)["workers"])
            assert busy == [1, 1], busy
        finally:
            release.touch()
        assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [0, 1]
