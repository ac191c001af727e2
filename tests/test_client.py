"""Integration tests of ``zfarm.Client`` against a real broker and real workers.

Most tests share one farm (a broker and two one-slot workers, started once for this module); each of
them uses its own client and leaves the farm idle. Tests that need a farm of a given shape (a single
slot to prove that cancelling frees it) or none at all start their own processes::

    test ──zfarm.Client──► broker (module farm) ──► two workers (one slot each)
         ──zfarm status──► broker        (per-client counters: submitted, queued, in_flight, done)
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zfarm
from tests import jobs
from tests.helpers import (
    Proc,
    Procs,
    cmdline,
    family,
    free_tcp_endpoint,
    live_pids,
    process_table,
    require_status,
    wait_for,
    wait_for_workers,
)

MIB = 1024 * 1024
RESULT_TIMEOUT_S = 30.0


# --- fixtures and helpers --------------------------------------------------------------------------


FARM_WORKERS = 2


class Farm:
    """The module's broker and workers; a worker that died is reported and replaced between tests."""

    def __init__(self, registry: Procs) -> None:
        self.registry = registry
        self.broker, self.endpoint = registry.broker()
        self.workers = [registry.worker(self.endpoint, procs=1) for _ in range(FARM_WORKERS)]
        wait_for_workers(self.endpoint, FARM_WORKERS)

    def dead(self) -> list[Proc]:
        return [proc for proc in [self.broker, *self.workers] if not proc.alive()]

    def replace_dead_workers(self) -> None:
        if not self.broker.alive():
            pytest.fail(f"the module farm's broker is dead:\n{self.broker.log_tail()}")
        if any(not proc.alive() for proc in self.workers):
            self.workers = [
                proc if proc.alive() else self.registry.worker(self.endpoint, procs=1)
                for proc in self.workers
            ]
            try:
                wait_for_workers(self.endpoint, FARM_WORKERS)
            except AssertionError as exc:
                pytest.fail(f"could not replace the farm's dead workers: {exc}\n{self.registry.report()}")


@pytest.fixture(scope="module")
def module_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    registry = Procs(tmp_path_factory.mktemp("client-farm"))
    try:
        yield Farm(registry)
    finally:
        problems = registry.shutdown()
        if problems:
            print("\n".join(["", "===== module farm =====", *problems, registry.report()]))


@pytest.fixture
def farm(module_farm: Farm) -> Iterator[str]:
    """The endpoint of the shared farm (a broker and two one-slot workers), with every process alive.

    A test after which a farm process is dead fails, with that process's log; the next test gets a
    fresh worker in its place, so one crash does not make every later test hang.
    """
    module_farm.replace_dead_workers()
    yield module_farm.endpoint
    if dead := module_farm.dead():
        pytest.fail("farm processes died during this test:\n" + "\n".join(
            f"--- {proc.name} (pid {proc.pid}, {proc!r})\n{proc.log_tail()}" for proc in dead))


def client_row(endpoint: str, client_id: str) -> dict[str, Any]:
    """The broker's counters for one client (raises if the broker does not list it)."""
    rows = [row for row in require_status(endpoint)["clients"] if row["id"] == client_id]
    if len(rows) != 1:
        raise AssertionError(f"broker lists {len(rows)} clients with id {client_id}")
    return rows[0]


def wait_until_idle(endpoint: str, timeout_s: float = 20.0) -> dict[str, Any]:
    """Wait until the broker holds no queued and no in-flight job; return that snapshot."""

    def idle() -> dict[str, Any] | None:
        snap = require_status(endpoint)
        return snap if snap["queued"] == 0 and snap["in_flight"] == 0 else None

    return wait_for(idle, timeout_s, interval_s=0.1, message=f"an idle broker at {endpoint}")


def zfarm_descendants() -> set[int]:
    """Live descendants of this test process whose command line mentions zfarm."""
    return {pid for pid in family([os.getpid()]) if "zfarm" in cmdline(pid)}


# --- map -------------------------------------------------------------------------------------------


def test_map_returns_results_in_input_order(farm: str) -> None:
    with zfarm.Client(farm) as c:
        assert list(c.map(jobs.square, range(500))) == [x * x for x in range(500)]


def test_map_over_two_iterables_pairs_them(farm: str) -> None:
    with zfarm.Client(farm) as c:
        assert list(c.map(jobs.add, range(100), range(1000, 1100))) == [2 * x + 1000 for x in range(100)]


def test_map_with_chunksize_gives_the_same_results(farm: str) -> None:
    with zfarm.Client(farm) as c:
        assert list(c.map(jobs.square, range(500), chunksize=7)) == [x * x for x in range(500)]
        row = client_row(farm, c.id)
        assert row["submitted"] == -(-500 // 7)  # one job per chunk of 7


def test_map_over_empty_input_yields_nothing(farm: str) -> None:
    with zfarm.Client(farm) as c:
        assert list(c.map(jobs.square, [])) == []
        assert list(c.map(jobs.add, [], range(10))) == []


def test_map_reads_a_generator_only_within_its_window(farm: str) -> None:
    window, chunksize, n = 10, 3, 200
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield i

    with zfarm.Client(farm, window=window) as c:
        results = c.map(jobs.square, numbers(), chunksize=chunksize)
        assert 0 < pulled <= window * chunksize
        # Let the whole first window finish at the broker; nobody consumes, so nothing more is read.
        wait_for(lambda: client_row(farm, c.id)["done"] == window, 20, interval_s=0.1,
                 message="the first window of jobs to finish")
        assert pulled <= window * chunksize
        assert list(results) == [x * x for x in range(n)]
        assert pulled == n


@pytest.mark.timeout(60)
def test_breaking_out_of_an_endless_map_cancels_the_rest(farm: str) -> None:
    with zfarm.Client(farm) as c:
        cancelled_before = require_status(farm)["cancelled"]
        started = time.monotonic()
        got = []
        for value in c.map(jobs.square, itertools.count(), chunksize=1):
            got.append(value)
            if len(got) == 50:
                break
        assert time.monotonic() - started < 10
        assert got == [x * x for x in range(50)]

        def drained() -> dict[str, Any] | None:
            row = client_row(farm, c.id)
            return row if row["queued"] == 0 and row["in_flight"] == 0 else None

        row = wait_for(drained, 20, interval_s=0.1, message="the client's jobs to be gone from the broker")
        cancelled = require_status(farm)["cancelled"] - cancelled_before
        # every job the window submitted either ran or was cancelled: none is lost, none still runs
        assert row["submitted"] > 50
        assert row["done"] + row["failed"] + cancelled == row["submitted"]


# --- exceptions ------------------------------------------------------------------------------------


def test_job_exception_is_raised_with_the_remote_traceback(farm: str) -> None:
    with zfarm.Client(farm) as c:
        future = c.submit(jobs.boom, 3)
        with pytest.raises(ValueError, match=r"^boom 3$") as info:
            future.result(RESULT_TIMEOUT_S)
    cause = info.value.__cause__
    assert cause is not None
    assert "ValueError: boom 3" in str(cause)  # the remote traceback's last line


def test_custom_exception_round_trips_with_its_attributes(farm: str) -> None:
    with zfarm.Client(farm) as c, pytest.raises(jobs.CustomError) as info:
        c.submit(jobs.raise_custom, 7).result(RESULT_TIMEOUT_S)
    assert type(info.value) is jobs.CustomError
    assert info.value.code == 7
    assert info.value.detail == "raised for 7"
    assert str(info.value) == "custom error 7: raised for 7"


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_yields_results_before_the_failing_item_then_raises(farm: str, chunksize: int) -> None:
    # with chunksize 4 the failing item 6 sits in the middle of chunk [4, 5, 6, 7]
    got = []
    with zfarm.Client(farm) as c, pytest.raises(ValueError, match=r"^boom 6$"):
        for value in c.map(jobs.square_or_boom, range(10), itertools.repeat(6), chunksize=chunksize):
            got.append(value)
    assert got == [x * x for x in range(6)]


# --- functions by value ----------------------------------------------------------------------------


def test_lambdas_closures_and_local_functions_run_remotely(farm: str) -> None:
    k = 7
    offsets = {"base": 1000}

    def local_poly(x: int) -> int:
        return jobs.square(x) * k + offsets["base"]

    with zfarm.Client(farm) as c:
        assert c.submit(lambda x: x * k, 3).result(RESULT_TIMEOUT_S) == 21
        assert list(c.map(lambda x: x + k, range(20))) == [x + 7 for x in range(20)]
        assert c.submit(local_poly, 4).result(RESULT_TIMEOUT_S) == 16 * 7 + 1000
        assert list(c.map(local_poly, range(10), chunksize=3)) == [x * x * 7 + 1000 for x in range(10)]


# --- large payloads --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_fifty_mib_argument_and_result_go_through(farm: str) -> None:
    n = 50 * MIB
    with zfarm.Client(farm) as c:
        payload = bytes(range(256)) * (n // 256)
        assert c.submit(jobs.length, payload).result(60) == n
        del payload
        data = c.submit(jobs.make_bytes, n + 3).result(60)
        assert type(data) is bytes
        assert len(data) == n + 3
        assert data == bytes(n + 3)


# --- cancel ----------------------------------------------------------------------------------------


def test_cancelling_a_queued_job_means_it_never_runs(procs: Procs, tmp_path: Path) -> None:
    endpoint, _ = procs.farm()
    started, release = tmp_path / "started", tmp_path / "release"
    with zfarm.Client(endpoint) as c:
        try:
            running = c.submit(jobs.touch_and_hold, str(started), str(release), 1)
            wait_for(started.exists, 20, message="the first job to start in the only slot")
            prefetched = c.submit(jobs.hold, str(release), 2)  # the worker's one prefetch credit
            queued = c.submit(jobs.hold, str(release), 3)  # no credit left: stays at the broker
            wait_for(lambda: client_row(endpoint, c.id)["queued"] == 1, 20, interval_s=0.1,
                     message="the third job to be queued at the broker")
            cancelled_before = require_status(endpoint)["cancelled"]

            assert queued.cancel() is True
            assert queued.cancelled()

            def cancelled_at_broker() -> dict[str, Any] | None:
                snap = require_status(endpoint)
                return snap if snap["cancelled"] == cancelled_before + 1 and snap["queued"] == 0 else None

            wait_for(cancelled_at_broker, 20, interval_s=0.1, message="the broker to count the cancel")
        finally:
            release.touch()
        assert running.result(RESULT_TIMEOUT_S) == 1
        assert prefetched.result(RESULT_TIMEOUT_S) == 2
        # jobs run in order: had the cancelled job survived, it would run before this one
        assert c.submit(jobs.square, 5).result(RESULT_TIMEOUT_S) == 25
        assert queued.cancelled()
        row = client_row(endpoint, c.id)
        counts = tuple(row[key] for key in ("submitted", "done", "failed", "queued", "in_flight"))
        assert counts == (4, 3, 0, 0, 0)
        snap = require_status(endpoint)
        assert snap["done"] == 3
        assert snap["cancelled"] == cancelled_before + 1
        assert [w["done"] for w in snap["workers"]] == [3]


def test_cancelling_a_running_job_frees_its_slot(procs: Procs, tmp_path: Path) -> None:
    endpoint, _ = procs.farm()
    started, never = tmp_path / "started", tmp_path / "never-created"
    with zfarm.Client(endpoint) as c:
        stuck = c.submit(jobs.touch_and_hold, str(started), str(never), "stuck")
        wait_for(started.exists, 20, message="the job to start in the only slot")
        wait_for(stuck.running, 20, message="the future to say that its job runs")
        assert stuck.cancel() is False  # as concurrent.futures: a running job is not cancelled...
        assert not stuck.done()
        assert stuck.kill() is True  # ...unless killed
        assert stuck.cancelled()
        # The stuck job would hold the slot for jobs.HOLD_LIMIT_S (60 s): a prompt result proves the
        # worker killed it and gave the slot to the next job.
        assert c.submit(jobs.square, 9).result(20) == 81
        snap = wait_until_idle(endpoint)
        assert snap["cancelled"] == 1
        assert snap["done"] == 1
    assert not never.exists()


# --- as_completed and timeouts ---------------------------------------------------------------------


def test_as_completed_yields_every_future_exactly_once(farm: str) -> None:
    with zfarm.Client(farm) as c:
        futures = [c.submit(jobs.slow_square, i, 0.01) for i in range(30)]
        seen = list(zfarm.as_completed(futures, timeout=60))
        assert len(seen) == len(futures)
        assert {id(f) for f in seen} == {id(f) for f in futures}
        assert sorted(f.result() for f in seen) == [i * i for i in range(30)]

        more = [c.submit(jobs.square, i) for i in range(10)]
        again = list(concurrent.futures.as_completed(more, timeout=60))
        assert sorted(id(f) for f in again) == sorted(id(f) for f in more)


def test_as_completed_times_out_on_a_job_that_does_not_finish(farm: str, tmp_path: Path) -> None:
    with zfarm.Client(farm) as c:
        # quick first: it must not depend on which worker the broker gives it (see the next test)
        quick = c.submit(jobs.square, 4)
        stuck = c.submit(jobs.hold, str(tmp_path / "never-created"), 1)
        try:
            started = time.monotonic()
            completed = zfarm.as_completed([stuck, quick], timeout=2.0)
            assert next(completed) is quick
            with pytest.raises(concurrent.futures.TimeoutError):
                next(completed)
            assert time.monotonic() - started < 10
            assert quick.result() == 16
            assert not stuck.done()
        finally:
            assert stuck.kill() is True
    wait_until_idle(farm)


def test_short_job_does_not_wait_behind_a_stuck_job_while_a_worker_is_idle(farm: str, tmp_path: Path) -> None:
    started = tmp_path / "started"
    with zfarm.Client(farm) as c:
        stuck = c.submit(jobs.touch_and_hold, str(started), str(tmp_path / "never-created"), 1)
        try:
            wait_for(started.exists, 20, message="the stuck job to start")
            # One worker runs the stuck job; the other is idle, so this job must not wait for the
            # stuck one (which would take jobs.HOLD_LIMIT_S = 60 s).
            assert c.submit(jobs.square, 4).result(15) == 16
        finally:
            assert stuck.kill() is True
    wait_until_idle(farm)


def test_map_timeout_raises_timeout_error(farm: str) -> None:
    with zfarm.Client(farm) as c:
        started = time.monotonic()
        results = c.map(jobs.sleep_then, range(4), itertools.repeat(20.0), timeout=0.5)
        with pytest.raises(concurrent.futures.TimeoutError):
            next(results)
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 10
    # the map's jobs were cancelled when it raised: they do not keep the farm's slots for 20 s
    wait_until_idle(farm)


# --- shutdown --------------------------------------------------------------------------------------


def test_submit_after_shutdown_raises(farm: str) -> None:
    c = zfarm.Client(farm)
    try:
        future = c.submit(jobs.slow_square, 3, 0.2)
    finally:
        c.shutdown()
    assert future.result(0) == 9  # shutdown(wait=True) waited for it
    with pytest.raises(RuntimeError):
        c.submit(jobs.square, 1)
    with pytest.raises(RuntimeError):
        c.map(jobs.square, range(3))
    c.shutdown()  # a second shutdown is harmless


def test_shutdown_with_cancel_futures_cancels_jobs_not_started(farm: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    c = zfarm.Client(farm)
    try:
        futures = [c.submit(jobs.hold, str(release), i) for i in range(6)]
        wait_for(lambda: sum(f.running() for f in futures) == FARM_WORKERS, 20,
                 message="a job to run in each slot")
        c.shutdown(wait=False, cancel_futures=True)
        assert [f.cancelled() for f in futures] == [not f.running() for f in futures]
        assert sum(f.cancelled() for f in futures) == 6 - FARM_WORKERS
        with pytest.raises(RuntimeError):
            c.submit(jobs.square, 1)
        release.touch()
        running = [f for f in futures if not f.cancelled()]
        assert [f.result(RESULT_TIMEOUT_S) for f in running] == [futures.index(f) for f in running]
        wait_until_idle(farm)  # the workers dropped the cancelled jobs they held
    finally:
        c.cancel(force=True)
        release.touch()


def test_client_cancel_with_force_kills_running_jobs(farm: str, tmp_path: Path) -> None:
    release = tmp_path / "never-created"
    with zfarm.Client(farm) as c:
        futures = [c.submit(jobs.hold, str(release), i) for i in range(4)]
        wait_for(lambda: sum(f.running() for f in futures) == FARM_WORKERS, 20,
                 message="a job to run in each slot")
        assert c.cancel() == 4 - FARM_WORKERS  # only those that had not started
        assert c.cancel(force=True) == FARM_WORKERS
        assert all(f.cancelled() for f in futures)
        # The killed jobs would hold their slots for jobs.HOLD_LIMIT_S: prompt results prove they are gone.
        assert list(c.map(jobs.square, range(4))) == [0, 1, 4, 9]
    wait_until_idle(farm)


def test_client_as_context_manager_waits_for_its_jobs(farm: str) -> None:
    with zfarm.Client(farm) as c:
        futures = [c.submit(jobs.slow_square, i, 0.05) for i in range(8)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(8)]
    with pytest.raises(RuntimeError):
        c.submit(jobs.square, 1)


# --- the embedded farm -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_embedded_client_runs_map_and_stops_its_processes() -> None:
    before = zfarm_descendants()
    c = zfarm.Client(n_workers=2)
    try:
        started = zfarm_descendants() - before
        assert list(c.map(jobs.square, range(200))) == [x * x for x in range(200)]
        assert len(started) >= 3, f"expected a broker and 2 workers, found {started}"
    finally:
        c.shutdown()
    wait_for(lambda: not live_pids(started), 10, message="the embedded broker and workers to exit")
    wait_for(lambda: not (zfarm_descendants() - before), 10, message="no new zfarm process to remain")


@pytest.mark.timeout(90)
def test_embedded_client_is_cleaned_up_at_exit_without_shutdown(procs: Procs) -> None:
    code = "import zfarm; c = zfarm.Client(n_workers=1); print(sum(c.map(abs, range(-100, 0))))"
    proc = procs.spawn("-c", code, command=(sys.executable,), name="embedded-atexit")
    returncode = proc.wait(60)
    output = proc.log()
    assert returncode == 0, output
    assert "5050" in output.splitlines(), output
    assert "Traceback" not in output, output
    # The interpreter has exited: atexit must already have stopped the broker, the worker and its slots
    # (all in the process group of the interpreter, which Proc started in its own session).
    left = [p.pid for p in process_table() if p.pgid == proc.pgid and p.live]
    assert left == [], [cmdline(pid) for pid in left]


# --- connection errors -----------------------------------------------------------------------------


def test_client_without_broker_raises_broker_unavailable() -> None:
    endpoint = free_tcp_endpoint()
    started = time.monotonic()
    with pytest.raises(zfarm.BrokerUnavailable) as info:
        zfarm.Client(endpoint, connect_timeout_s=1)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 5
    assert endpoint in str(info.value)


def test_a_scattered_object_is_unpickled_once_a_slot_and_stands_for_itself_in_jobs(farm: str) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    with zfarm.Client(farm) as client:
        handle = client.scatter(data)
        seen = [client.submit(jobs.identify, handle, i).result(RESULT_TIMEOUT_S) for i in range(12)]
        seen.append(client.submit(jobs.identify, {"inside": [handle]}).result(RESULT_TIMEOUT_S))
        seen += client.map(jobs.identify, itertools.repeat(handle, 8), range(8), chunksize=1,
                           timeout=RESULT_TIMEOUT_S)
    assert {(size, crc) for _, _, size, crc in seen} == {(len(data), zlib.crc32(data))}
    per_slot: dict[int, set[int]] = {}
    for slot_pid, object_id, _, _ in seen:
        per_slot.setdefault(slot_pid, set()).add(object_id)
    assert all(len(ids) == 1 for ids in per_slot.values()), per_slot  # one copy a slot, not one a job
