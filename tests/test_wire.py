"""Wire promises with real processes: what a peer may say is bounded, and no result is thrown away.

::

    raw DEALER ──HELLO(host of 1 MB)──► zfarm broker ◄── zfarm worker (healthy)
         ◄────────── REFUSED ──────────     ▲
    Client ── map ──────────────────────────┘  zfarm status answers; nobody is declared lost

    Client ── submit(record_run) ──► zfarm broker ◄── zfarm worker (the only one: SIGSTOPped
                                                       until declared dead and its job finished)
         ◄── the result of that one run ──  (after SIGCONT it sends the result again; no rerun)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq

import zfarm
from tests import jobs
from tests.helpers import Procs, recv_message, require_status, wait_for, wait_for_worker_pids
from zfarm import protocol as p
from zfarm.monitor import fetch_status

HEARTBEAT_S = 0.2
LIVENESS = 3
FAST = ("--heartbeat-interval", str(HEARTBEAT_S), "--liveness", str(LIVENESS))
RESULT_TIMEOUT_S = 30.0
#: how long the broker may take to refuse a hostile HELLO and serve a map and `zfarm status` after it
RESPONSIVE_S = 15.0


def worker_pids(ctx: zmq.Context[Any], endpoint: str) -> list[int]:
    return [w["pid"] for w in fetch_status(endpoint, 5.0, ctx)["workers"]]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_hello_with_a_huge_host_is_refused_and_the_broker_stays_responsive(
    procs: Procs, ctx: zmq.Context[Any]
) -> None:
    broker, endpoint = procs.broker(None)  # the default (rich) log handler, default liveness
    healthy = procs.worker(endpoint)
    wait_for_worker_pids(lambda: fetch_status(endpoint, 5.0, ctx), [healthy.pid])

    started = time.monotonic()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        hostile = [p.Hello("worker", "w-hostile", "h" * 1_000_000, 1, 1, {}),
                   p.Hello("client", "s-hostile", "laptop", 1, 0, {"session": "s" * 100_000})]
        for hello in hostile:
            sock.send_multipart(p.encode(hello))
            reply = recv_message(sock, timeout_s=RESPONSIVE_S)
            assert isinstance(reply, p.Refused), reply
            assert "over its limit" in reply.reason and len(reply.reason) < 200, reply.reason
    finally:
        sock.close()

    with zfarm.Client(endpoint, connect_timeout_s=RESPONSIVE_S) as client:
        values = list(client.map(jobs.square, range(20), timeout=RESULT_TIMEOUT_S, chunksize=1))
    assert values == [x * x for x in range(20)]
    snap = require_status(endpoint)  # the `zfarm status` command
    took_s = time.monotonic() - started
    assert took_s < RESPONSIVE_S, f"refusals, a map and a status took {took_s:.1f} s"
    assert [w["pid"] for w in snap["workers"]] == [healthy.pid], snap["workers"]
    assert snap["workers_lost"] == 0
    assert len(broker.log()) < 50_000, "a log line carried the peer's text whole"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_result_finished_while_the_only_worker_was_stopped_is_kept_and_the_job_runs_once(
    procs: Procs, ctx: zmq.Context[Any], tmp_path: Path
) -> None:
    _, endpoint = procs.broker(None, *FAST)
    worker = procs.worker(endpoint)  # the only worker: a rerun could only happen on it
    wait_for_worker_pids(lambda: fetch_status(endpoint, 5.0, ctx), [worker.pid])
    runs = tmp_path / "runs"
    runs.mkdir()

    with zfarm.Client(endpoint) as client:
        future = client.submit(jobs.record_run, str(runs), 7, 1.0)
        wait_for(lambda: list(runs.glob("started-*")), 20.0, message="the job to start")
        worker.stop()  # the worker process only: its slot goes on running the job
        stopped_at = time.monotonic()
        wait_for(lambda: worker.pid not in worker_pids(ctx, endpoint), 20.0, interval_s=0.05,
                 message="the stopped worker to be declared dead")
        wait_for(lambda: list(runs.glob("finished-*")), 20.0, message="the job to finish in its slot")
        stopped_s = time.monotonic() - stopped_at
        worker.cont()
        assert future.result(timeout=RESULT_TIMEOUT_S) == 70

    def settled() -> dict[str, Any] | None:
        snap = fetch_status(endpoint, 5.0, ctx)
        back = [w["pid"] for w in snap["workers"]] == [worker.pid]
        return snap if back and snap["queued"] == 0 and snap["in_flight"] == 0 else None

    snap = wait_for(settled, 20.0, interval_s=0.05, message="the worker back and nothing left to run")
    assert stopped_s > HEARTBEAT_S * LIVENESS
    assert len(list(runs.glob("started-*"))) == 1, f"the job ran again: {sorted(runs.iterdir())}"
    assert (snap["done"], snap["workers_lost"], snap["late_results"]) == (1, 1, 0), snap


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_job_given_again_to_its_only_worker_while_it_still_runs_there_runs_once(
    procs: Procs, ctx: zmq.Context[Any], tmp_path: Path
) -> None:
    """Stopped for less than its job: declared dead, the worker comes back while the job still runs
    in its slot and is given the job again; the second copy waits and is dropped, never started."""
    _, endpoint = procs.broker(None, *FAST)
    worker = procs.worker(endpoint)
    wait_for_worker_pids(lambda: fetch_status(endpoint, 5.0, ctx), [worker.pid])
    runs, release = tmp_path / "runs", tmp_path / "release"
    runs.mkdir()

    with zfarm.Client(endpoint) as client:
        future = client.submit(jobs.record_held_run, str(runs), str(release), 7)
        wait_for(lambda: list(runs.glob("started-*")), 20.0, message="the job to start")
        worker.stop()
        wait_for(lambda: worker.pid not in worker_pids(ctx, endpoint), 20.0, interval_s=0.05,
                 message="the stopped worker to be declared dead")
        worker.cont()

        def given_again() -> bool:
            snap = fetch_status(endpoint, 5.0, ctx)
            busy = [(w["pid"], w["busy"]) for w in snap["workers"]]
            return busy == [(worker.pid, 1)] and not snap["queued"]

        wait_for(given_again, 20.0, interval_s=0.05, message="the job handed to the resumed worker again")
        release.touch()
        assert future.result(timeout=RESULT_TIMEOUT_S) == 70

    def settled() -> dict[str, Any] | None:
        snap = fetch_status(endpoint, 5.0, ctx)
        idle = [w["busy"] for w in snap["workers"]] == [0]
        return snap if idle and snap["in_flight"] == 0 else None

    snap = wait_for(settled, 20.0, interval_s=0.05, message="nothing left to run")
    assert len(list(runs.glob("started-*"))) == 1, f"the job ran again: {sorted(runs.iterdir())}"
    assert (snap["done"], snap["workers_lost"], snap["requeued"]) == (1, 1, 1), snap
