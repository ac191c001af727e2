"""A durable broker and client sessions, with real processes: brokers SIGKILLed on their journal,
clients SIGKILLed, SIGSTOPped or gone, and every job still run and its result delivered.

::

    tests.map_client (own process) ──► zfarm broker --journal J ◄── zfarm worker
         SIGSTOP / SIGKILL / leaves        SIGKILL, restart on J

Each job (``tests.jobs.record_run``) leaves a file per run, so the tests count runs: a job that ran
from the journal while its client was stopped, or whose held result was collected, ran once.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import zfarm
from tests import jobs
from tests.helpers import Proc, Procs, wait_for, wait_for_workers
from zfarm.monitor import fetch_status

pytestmark = pytest.mark.timeout(120)

FAST = ("--heartbeat-interval", "0.2", "--liveness", "3")
MAP_CLIENT = (sys.executable, "-m", "tests.map_client")


def runs(markers: Path, kind: str) -> Counter[int]:
    """How many runs of each job have ``kind`` (started or finished)."""
    return Counter(int(m.group(1)) for f in markers.iterdir() if (m := re.match(rf"{kind}-(\d+)-", f.name)))


def results_of(client: Proc) -> dict[int, int]:
    return {int(x): int(v) for x, v in re.findall(r"^result (\d+) (-?\d+)$", client.log(), re.M)}


def map_client(procs: Procs, endpoint: str, markers: Path, *args: str) -> Proc:
    return procs.spawn("--connect", endpoint, "--markers", str(markers), *args, command=MAP_CLIENT,
                       name="map_client")


def snapshot(ctx: zmq.Context[Any], endpoint: str) -> dict[str, Any]:
    return fetch_status(endpoint, 5.0, ctx)


@pytest.fixture
def leaving_clients() -> Iterator[Callable[..., zfarm.Client]]:
    """Clients a test leaves by hand; any still open at the end (the test failed) leave then."""
    opened: list[zfarm.Client] = []

    def open_client(*args: Any, **kwargs: Any) -> zfarm.Client:
        opened.append(zfarm.Client(*args, **kwargs))
        return opened[-1]

    yield open_client
    for client in opened:
        client.shutdown(wait=False)  # does nothing for a client already shut down


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


def test_broker_sigkilled_with_jobs_queued_and_in_flight_runs_them_from_its_journal(
        procs: Procs, tmp_path: Path, markers: Path, ctx: zmq.Context[Any]) -> None:
    journal = str(tmp_path / "journal.db")
    broker, endpoint = procs.broker(None, *FAST, "--journal", journal)
    procs.worker(endpoint, "--prefetch", "0", procs=1)  # one job runs, the other four wait at the broker
    wait_for_workers(endpoint, 1)
    client = map_client(procs, endpoint, markers, "--jobs", "5", "--seconds", "0.5")
    wait_for(lambda: runs(markers, "started")[0] == 1 and snapshot(ctx, endpoint)["queued"] == 4, 30,
             message="job 0 running and 4 queued")
    client.stop()  # the client cannot send its jobs again: only the journal has them
    broker.kill()
    broker.wait(10)

    procs.broker(endpoint, *FAST, "--journal", journal)
    snap = snapshot(ctx, endpoint)
    assert snap["recovered"] + sum(c["held"] for c in snap["clients"]) == 5, snap
    assert [c["present"] for c in snap["clients"]] == [False]
    wait_for(lambda: set(runs(markers, "finished")) == set(range(5)), 30,
             message="all 5 jobs run while their client is stopped")

    client.cont()
    client.wait_for_log("done", 30)
    assert client.wait(10) == 0
    assert results_of(client) == {x: x * 10 for x in range(5)}
    started = runs(markers, "started")
    assert all(started[x] == 1 for x in range(1, 5)), started  # queued at the crash: run once, from J
    assert started[0] in (1, 2), started  # running at the crash: its worker may finish it as well


def test_a_session_collects_results_that_finished_while_it_and_the_broker_were_gone(
        procs: Procs, tmp_path: Path, markers: Path, ctx: zmq.Context[Any]) -> None:
    journal = str(tmp_path / "journal.db")
    broker, endpoint = procs.broker(None, *FAST, "--journal", journal)
    procs.worker(endpoint, procs=2)
    wait_for_workers(endpoint, 1)
    first = map_client(procs, endpoint, markers, "--session", "sweep-42", "--jobs", "6", "--leave")
    first.wait_for_log("left", 30)
    assert first.wait(10) == 0
    def held() -> list[tuple[str, bool, int]]:
        return [(c["id"], c["present"], c["held"]) for c in snapshot(ctx, endpoint)["clients"]]

    wait_for(lambda: held() == [("s-sweep-42", False, 6)], 30, message="6 results held, nobody waiting")

    broker.kill()  # the results are in the journal only
    broker.wait(10)
    procs.broker(endpoint, *FAST, "--journal", journal)

    second = map_client(procs, endpoint, markers, "--session", "sweep-42", "--jobs", "6")
    second.wait_for_log("done", 30)
    assert second.wait(10) == 0
    assert results_of(second) == {x: x * 10 for x in range(6)}
    assert runs(markers, "started") == Counter(range(6))  # collected, not run again
    wait_for(lambda: snapshot(ctx, endpoint)["clients"] == [], 10, message="the finished session forgotten")


def test_a_session_whose_client_was_sigkilled_goes_on_and_a_rerun_collects_it(
        procs: Procs, markers: Path, ctx: zmq.Context[Any]) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=2)  # no journal: sessions live in the broker's memory
    # Jobs of 1.5 s: none can have finished (and been received) by the time the client is killed.
    first = map_client(procs, endpoint, markers, "--session", "tiles", "--jobs", "6", "--seconds", "1.5")
    wait_for(lambda: any(c["submitted"] == 6 for c in snapshot(ctx, endpoint)["clients"]), 30,
             message="6 jobs at the broker")
    assert not runs(markers, "finished")
    first.kill()
    wait_for(lambda: [c["present"] for c in snapshot(ctx, endpoint)["clients"]] == [False], 10,
             message="the session's client declared away")
    second = map_client(procs, endpoint, markers, "--session", "tiles", "--jobs", "6", "--seconds", "1.5")
    second.wait_for_log("done", 60)
    assert second.wait(10) == 0
    assert results_of(second) == {x: x * 10 for x in range(6)}
    assert runs(markers, "started") == Counter(range(6))  # every job ran once, across both clients


def test_a_session_never_answers_a_changed_job_with_an_old_result(procs: Procs,
                                                                 ctx: zmq.Context[Any],
        leaving_clients: Callable[..., zfarm.Client]) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1)
    client = leaving_clients(endpoint, session="changes")
    client.submit(jobs.square, 3)
    client.submit(jobs.sleep_then, "same", 0.2)
    client.shutdown(wait=False)  # leaves before any result: both are held for the session
    wait_for(lambda: [c["held"] for c in snapshot(ctx, endpoint)["clients"]] == [2], 30,
             message="both results held")
    again = leaving_clients(endpoint, session="changes")
    try:
        assert again.submit(jobs.square, 4).result(30) == 16  # job 1 again, another argument: not 9
        assert again.submit(jobs.sleep_then, "same", 0.2).result(30) == "same"  # job 2 as before
    finally:
        again.shutdown()
    assert snapshot(ctx, endpoint)["done"] == 3  # job 1 ran twice (old and new content), job 2 once


def test_shutdown_with_cancel_futures_ends_a_session(procs: Procs, ctx: zmq.Context[Any],
        leaving_clients: Callable[..., zfarm.Client]) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1)
    client = leaving_clients(endpoint, session="abandoned")
    for x in range(5):
        client.submit(jobs.sleep_then, x, 30.0)
    client.shutdown(wait=False)  # left: the jobs go on
    wait_for(lambda: [c["present"] for c in snapshot(ctx, endpoint)["clients"]] == [False], 10,
             message="the session away")
    zfarm.Client(endpoint, session="abandoned").shutdown(cancel_futures=True)  # changed our mind
    wait_for(lambda: snapshot(ctx, endpoint)["clients"] == [], 10, message="the session forgotten")
    snap = snapshot(ctx, endpoint)
    assert snap["queued"] == 0 and snap["in_flight"] == 0 and snap["cancelled"] == 5


def test_a_session_left_by_an_exception_goes_on_and_its_rerun_collects_every_result(
        procs: Procs, tmp_path: Path, markers: Path, ctx: zmq.Context[Any]) -> None:
    endpoint, _ = procs.farm(*FAST, "--journal", str(tmp_path / "journal.db"), workers=1, procs=2)
    first = map_client(procs, endpoint, markers, "--session", "partial", "--jobs", "6", "--seconds", "2.0",
                       "--read", "2")
    first.wait_for_log("failing", 30)
    assert first.wait(10) == 3
    assert sum(runs(markers, "finished").values()) < 6  # left without waiting for the jobs
    assert results_of(first) == {0: 0, 1: 10}

    def held() -> list[tuple[bool, int]]:
        return [(c["present"], c["held"]) for c in snapshot(ctx, endpoint)["clients"]]

    # A session keeps every result until it ends, read or not: 0 to 2 were read before the failure.
    wait_for(lambda: held() == [(False, 6)], 30, message="the 6 results held")
    second = map_client(procs, endpoint, markers, "--session", "partial", "--jobs", "6", "--seconds", "2.0")
    second.wait_for_log("done", 60)
    assert second.wait(10) == 0
    assert results_of(second) == {x: x * 10 for x in range(6)}
    assert runs(markers, "started") == Counter(range(6))  # nothing ran again
    wait_for(lambda: held() == [], 10, message="the session over once its client finished")


def test_leaving_a_session_sends_a_job_waiting_out_its_retry_at_once(
        procs: Procs, tmp_path: Path, ctx: zmq.Context[Any],
        leaving_clients: Callable[..., zfarm.Client]) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1)
    counter = tmp_path / "runs"
    counter.mkdir()
    client = leaving_clients(endpoint, session="retrying", retry_backoff_s=60)
    client.with_options(retries=1).submit(jobs.fail_times, str(counter), 1, 7)
    wait_for(lambda: len(client.stats().records) == 1, 20, message="the first run's error at the client")
    started = time.monotonic()
    client.shutdown(wait=False)
    assert time.monotonic() - started < 5  # not the 60 s backoff, nor the 10 s limit on leaving
    wait_for(lambda: [c["held"] for c in snapshot(ctx, endpoint)["clients"]] == [1], 20,
             message="the re-run's result held for the session")
    assert len(list(counter.iterdir())) == 2
    with zfarm.Client(endpoint, session="retrying") as again:
        assert again.with_options(retries=1).submit(jobs.fail_times, str(counter), 1, 7).result(20) == 7
    assert len(list(counter.iterdir())) == 2  # collected, not run a third time


def test_a_client_that_collects_part_of_a_session_leaves_the_rest_alone(procs: Procs,
                                                                        ctx: zmq.Context[Any],
        leaving_clients: Callable[..., zfarm.Client]) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=2)
    first = leaving_clients(endpoint, session="shared")
    for x in range(6):
        first.submit(jobs.sleep_then, x, 0.3)
    first.shutdown(wait=False)
    with zfarm.Client(endpoint, session="shared") as check:  # looks at the first job only, and ends well
        assert check.submit(jobs.sleep_then, 0, 0.3).result(30) == 0

    def session() -> list[tuple[bool, int, int]]:
        return [(c["present"], c["held"], c["in_flight"] + c["queued"]) for c in
                snapshot(ctx, endpoint)["clients"]]

    seen: list[Any] = []

    def five_held() -> bool:
        seen[:] = [session()]
        return seen[0] == [(False, 5, 0)]

    try:
        wait_for(five_held, 60, message="the other 5 results held for the session")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the session's (present, held, unfinished) last: {seen}") from exc
    assert snapshot(ctx, endpoint)["cancelled"] == 0
    with zfarm.Client(endpoint, session="shared") as last:
        assert [last.submit(jobs.sleep_then, x, 0.3).result(30) for x in range(6)] == list(range(6))
    wait_for(lambda: session() == [], 10, message="the session over")


def test_a_script_that_reads_one_result_of_a_session_map_leaves_the_others(
        procs: Procs, ctx: zmq.Context[Any],
        leaving_clients: Callable[..., zfarm.Client]) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=2)
    first = leaving_clients(endpoint, session="sweep")
    first.map(jobs.sleep_then, range(6), [0.2] * 6)  # submitted, not read
    first.shutdown(wait=False)
    with zfarm.Client(endpoint, session="sweep") as check:
        assert next(iter(check.map(jobs.sleep_then, range(6), [0.2] * 6))) == 0  # only the first one

    def session() -> list[tuple[bool, int]]:
        return [(c["present"], c["held"]) for c in snapshot(ctx, endpoint)["clients"]]

    wait_for(lambda: session() == [(False, 5)], 30, message="the 5 results it did not read still held")
    with zfarm.Client(endpoint, session="sweep") as last:
        assert list(last.map(jobs.sleep_then, range(6), [0.2] * 6)) == list(range(6))
    wait_for(lambda: session() == [], 10, message="the session over")
    assert snapshot(ctx, endpoint)["done"] == 7  # job 0 twice (its result was released), the rest once


def test_an_embedded_farm_does_not_take_a_shared_brokers_journal_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = tmp_path / "shared.db"
    monkeypatch.setenv("ZFARM_JOURNAL", str(journal))
    monkeypatch.delenv("ZFARM_ADDRESS", raising=False)
    with zfarm.Client(n_workers=1) as client:
        assert client.submit(jobs.square, 5).result(30) == 25
    assert not journal.exists()
