"""Projects with real processes: priorities, suspend and resume (from the CLI too), on_error, tags and
unschedulable requests.

::

    test ── Client.project(...) ──► zfarm broker ◄── zfarm worker (1 slot; a second one tagged bigmem)
         └─ zfarm project suspend|resume NAME (a monitor connection)
"""

from __future__ import annotations

import json
import operator
import threading
import time
from pathlib import Path

import pytest

import zfarm
from tests import jobs
from tests.helpers import Procs, run_zfarm, wait_for, wait_for_workers
from zfarm.monitor import fetch_status

pytestmark = pytest.mark.timeout(90)
FAST = ("--heartbeat-interval", "0.2")


def project_view(endpoint: str, name: str) -> dict[str, object]:
    return next(p for p in fetch_status(endpoint)["projects"] if p["name"] == name)


def runs(folder: Path, kind: str) -> dict[int, int]:
    """``record_run`` markers: {x: monotonic ns} of each job's start (or finish)."""
    out = {}
    for path in folder.glob(f"{kind}-*"):
        _, x, _pid, ns = path.name.split("-")
        out[int(x)] = int(ns)
    return out


@pytest.mark.slow
def test_a_high_priority_project_overtakes_the_queue_of_a_low_one(procs: Procs, tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=1)
    low_dir, high_dir = tmp_path / "low", tmp_path / "high"
    low_dir.mkdir()
    high_dir.mkdir()
    with zfarm.Client(endpoint) as client:
        low = client.project("low", priority=0)
        low_futures = [low.submit(jobs.record_run, str(low_dir), i, 0.1) for i in range(30)]
        wait_for(lambda: runs(low_dir, "started"), 20, message="the low project to start")
        high = client.project("high", priority=10)
        high_futures = [high.submit(jobs.record_run, str(high_dir), i, 0.1) for i in range(5)]
        assert [f.result(60) for f in high_futures] == [i * 10 for i in range(5)]
        assert [f.result(60) for f in low_futures] == [i * 10 for i in range(30)]
    high_done = max(runs(high_dir, "finished").values())
    low_started = sorted(runs(low_dir, "started").values())
    assert high_done < low_started[9], "the 5 high-priority jobs finish before the 10th low one starts"


@pytest.mark.slow
def test_suspend_stops_dispatch_and_resume_finishes_the_project(procs: Procs, tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=1)
    with zfarm.Client(endpoint) as client:
        project = client.project("pausable")
        futures = [project.submit(jobs.sleep_then, i, 0.1) for i in range(20)]
        wait_for(lambda: project_view(endpoint, "pausable")["done"] >= 2, 30, message="progress")
        result = run_zfarm("project", "suspend", "pausable", "--connect", endpoint)
        assert result.returncode == 0, result.stderr
        assert "suspended" in result.stdout
        wait_for(lambda: project_view(endpoint, "pausable")["running"] == 0, 30,
                 message="the running jobs to finish")
        done = project_view(endpoint, "pausable")["done"]
        assert done < 20
        # Suspension holds from the broker's next flush, and every status request is one; a job
        # dispatched would show as running (or done) at the next request: half a second of requests
        # (a few of the broker's heartbeat turns) that see none proves nothing is dispatched.
        seen: set[tuple[object, ...]] = set()
        since = time.monotonic()

        def quiet_for_half_a_second() -> bool:
            view = project_view(endpoint, "pausable")
            seen.add((view["done"], view["running"], view["state"]))
            return time.monotonic() - since >= 0.5

        wait_for(quiet_for_half_a_second, 20, interval_s=0.05, message="half a second of status requests")
        assert seen == {(done, 0, "suspended")}
        assert "pausable" in run_zfarm("project", "list", "--connect", endpoint).stdout
        assert project.resume().state in ("queued", "running")
        assert [f.result(60) for f in futures] == list(range(20))
    assert project_view(endpoint, "pausable")["state"] == "done"


def test_on_error_suspend_stops_the_project_at_its_first_failure(procs: Procs) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=1)
    with zfarm.Client(endpoint) as client:
        project = client.project("careful", on_error="suspend")
        failing = project.submit(jobs.boom, 1)
        rest = [project.submit(jobs.sleep_then, i, 0.05) for i in range(10)]
        with pytest.raises(ValueError):
            failing.result(30)
        status = wait_for(lambda: (s := project.status()).running == 0 and s, 30, message="running jobs over")
        assert status.state == "suspended" and "failed" in status.why_suspended
        assert status.queued > 0  # the rest waits
        cancelled = project.cancel()
        assert cancelled.queued == 0 and cancelled.cancelled >= status.queued
        wait_for(lambda: all(f.done() for f in rest), 30, message="the rest to be cancelled")
        assert any(f.cancelled() for f in rest)


def test_a_tagged_job_runs_only_on_the_tagged_worker(procs: Procs) -> None:
    _, endpoint = procs.broker(None, *FAST)
    procs.worker(endpoint, procs=2)
    tagged = procs.worker(endpoint, "--tags", "bigmem", "--resources", "mem=64G", procs=1)
    wait_for_workers(endpoint, 2)
    with zfarm.Client(endpoint) as client:
        big = client.with_options(tags={"bigmem"}, resources={"mem": "32G"})
        pids = {f.result(30) for f in [big.submit(jobs.pid) for _ in range(8)]}
    slots = [p for p in fetch_status(endpoint)["workers"] if "bigmem" in p["tags"]]
    assert len(slots) == 1 and slots[0]["pid"] == tagged.pid
    assert all(pid != tagged.pid for pid in pids)  # slots are children of the worker
    assert len(pids) == 1  # one slot: the same slot process ran them all


def test_a_job_asking_for_gpus_no_worker_has_is_reported_unschedulable(
        procs: Procs, caplog: pytest.LogCaptureFixture) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=1)
    with zfarm.Client(endpoint) as client:
        future = client.with_options(resources={"gpus": 2}).submit(jobs.square, 3)

        def shown() -> dict[str, object] | None:
            snap = fetch_status(endpoint)
            return snap if any(c["unschedulable"] for c in snap["clients"]) else None

        snap = wait_for(shown, 20, message="the job to be shown unschedulable")
        (why,) = [c["unschedulable"] for c in snap["clients"] if c["unschedulable"]]
        assert "gpus=2" in why and "gpus=0" in why
        wait_for(lambda: "can run on no connected worker" in caplog.text, 10, message="the client's warning")
        assert not future.done()
        assert client.submit(jobs.square, 4).result(30) == 16  # the rest of the farm serves on
        future.cancel()


@pytest.mark.slow
def test_a_chain_runs_while_its_session_client_is_away_and_a_rerun_collects_it(procs: Procs,
                                                                               tmp_path: Path) -> None:
    """a → b → c, futures passed as arguments (inside lists too): the broker routes each result to the
    next job's slot, so the chain finishes with its client gone; a rerun of the session collects it."""
    endpoint, _ = procs.farm(*FAST, workers=1, procs=2)
    markers = tmp_path / "markers"
    markers.mkdir()

    def chain(client: zfarm.Client) -> object:
        a = client.submit(jobs.record_run, str(markers), 2, 1.0)  # 20, after a second
        b = client.submit(jobs.add, a, 1)  # 21
        return client.submit(jobs.add, [b], [a])  # [21, 20]

    first = zfarm.Client(endpoint, session="chain")
    chain(first)
    first.shutdown(wait=False)  # the session's client leaves before a has finished
    assert not runs(markers, "finished")

    def away_with_three_results() -> bool:
        return [(c["present"], c["held"]) for c in fetch_status(endpoint)["clients"]] == [(False, 3)]

    wait_for(away_with_three_results, 30, message="the chain to finish while its client is away")
    with zfarm.Client(endpoint, session="chain") as again:
        assert chain(again).result(30) == [21, 20]  # type: ignore[attr-defined]
    assert len(runs(markers, "started")) == 1  # collected, not run again


def test_a_failed_upstream_fails_its_dependents_naming_it_and_its_error(procs: Procs) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=1)
    with zfarm.Client(endpoint) as client:
        upstream = client.submit(operator.truediv, 1, 0)
        middle = client.submit(jobs.add, upstream, 1)
        last = client.submit(jobs.square, middle)
        for future, named in ((middle, upstream), (last, middle)):
            with pytest.raises(zfarm.DependencyFailed) as info:
                future.result(30)
            assert info.value.upstream == f"{client.id}:{named.seq}"  # type: ignore[attr-defined]
            assert "ZeroDivisionError: division by zero" in str(info.value)  # why, not only that it failed
        detail = info.value.detail  # type: ignore[attr-defined]
        assert detail.startswith(f"it was lost: {client.id}:{upstream.seq}: it failed: ZeroDivisionError")
        with zfarm.Client(endpoint) as other, pytest.raises(zfarm.ConfigError, match="another client"):
            other.submit(jobs.square, middle)


def test_a_dependent_job_that_cannot_be_submitted_leaves_its_upstream_result_unpinned(procs: Procs) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=1)
    with zfarm.Client(endpoint) as client:
        upstream = client.submit(jobs.sleep_then, 3, 0.5)
        with pytest.raises(Exception):  # noqa: B017 (a lock cannot be pickled: whatever pickle raises)
            client.submit(jobs.add, upstream, threading.Lock())
        assert upstream.result(30) == 3
        # else the broker would hold the upstream result until the client closes
        assert client._connection.core.receipts.pins.snapshot() == frozenset()


@pytest.mark.slow
def test_a_suspended_project_stays_suspended_when_its_broker_is_sigkilled_and_restarted(
        procs: Procs, tmp_path: Path) -> None:
    journal = str(tmp_path / "journal.db")
    broker, endpoint = procs.broker(None, *FAST, "--journal", journal)
    procs.worker(endpoint, procs=1)
    wait_for_workers(endpoint, 1)
    markers = tmp_path / "markers"
    markers.mkdir()
    with zfarm.Client(endpoint, session="kept") as client:
        project = client.project("kept", priority=3)
        futures = [project.submit(jobs.record_run, str(markers), i, 0.1) for i in range(15)]
        wait_for(lambda: len(runs(markers, "finished")) >= 2, 30, message="progress")
        result = run_zfarm("project", "suspend", "kept", "--connect", endpoint)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: project_view(endpoint, "kept")["running"] == 0, 30, message="the running job to end")
        before = project_view(endpoint, "kept")
        assert before["done"] >= 2 and before["submitted"] == 15, before
        broker.kill()
        broker.wait(10)
        started = len(runs(markers, "started"))
        assert started < 15

        procs.broker(endpoint, *FAST, "--journal", journal)
        shown = run_zfarm("project", "show", "kept", "--json", "--connect", endpoint)
        assert shown.returncode == 0, shown.stderr
        view = json.loads(shown.stdout)
        assert (view["state"], view["priority"]) == ("suspended", 3), view
        assert (view["submitted"], view["done"], view["slot_s"]) == (15, before["done"], before["slot_s"])
        wait_for_workers(endpoint, 1)  # the worker is back: it would take a job if one were dispatched
        since = time.monotonic()

        def quiet_for_two_seconds() -> bool:
            now = project_view(endpoint, "kept")
            assert (now["state"], now["running"]) == ("suspended", 0), now
            assert len(runs(markers, "started")) == started
            return time.monotonic() - since >= 2.0

        wait_for(quiet_for_two_seconds, 20, interval_s=0.1, message="two seconds with nothing dispatched")
        assert run_zfarm("project", "resume", "kept", "--connect", endpoint).returncode == 0
        assert [f.result(60) for f in futures] == [i * 10 for i in range(15)]
        assert project_view(endpoint, "kept")["done"] == 15


class Interrupts:
    """An argument whose pickling is a Ctrl-C (KeyboardInterrupt while a map pickles its item)."""

    def __reduce__(self) -> str:
        raise KeyboardInterrupt


def test_map_waits_for_futures_among_its_items_and_inside_them(procs: Procs, tmp_path: Path) -> None:
    """Futures as map items (and inside list items) make those items' jobs wait for theirs, as submit's
    arguments do, whether they are done or still running when the map is submitted; the plain items
    around them go on in the same map, chunked or not. Ctrl-C while such an item is pickled leaves no
    result pinned at the broker."""
    endpoint, _ = procs.farm(*FAST, workers=1, procs=2)
    with zfarm.Client(endpoint) as client:
        f1 = client.submit(jobs.sleep_then, 1, 0.5)
        f2 = client.submit(jobs.sleep_then, 2, 0.2)
        f3 = client.submit(jobs.sleep_then, 3, 0.1)
        got = list(client.map(jobs.add, [f1, f2, [f3], [4]], [10, 20, [30], [40]], timeout=60))
        assert got == [11, 22, [3, 30], [4, 40]]
        pins = client._connection.core.receipts.pins
        gate = client.submit(jobs.hold, tmp_path / "release", 8)  # runs until the test says
        project = client.project("mapped")  # fixed chunks of 10: the items with futures are cut out
        try:
            results = project.map(jobs.echo, [5, gate, 6, {"x": (f2, [f3])}, 7], chunksize=10, timeout=60)
            assert not gate.done() and pins.snapshot() == {gate.seq}  # submitted while it runs
        finally:
            (tmp_path / "release").touch()
        assert list(results) == [5, 8, 6, {"x": (2, [3])}, 7]
        held = client.submit(jobs.hold, tmp_path / "release-2", 9)
        try:
            with pytest.raises(KeyboardInterrupt):
                client.map(jobs.add, [held], [Interrupts()])  # its item is pickled after ``held`` is pinned
            assert not held.done() and pins.snapshot() == frozenset()
        finally:
            (tmp_path / "release-2").touch()
        failed = client.submit(jobs.boom, 1)
        with pytest.raises(zfarm.DependencyFailed, match="ValueError: boom 1"):
            list(client.map(jobs.add, [7, failed], [1, 1], timeout=60))
        slow = client.submit(jobs.sleep_then, 0, 1.0)
        # failed is done: refused at once (saying why it failed), slow not held for it
        with pytest.raises(zfarm.DependencyFailed, match="before this job was submitted: ValueError: boom"):
            client.submit(jobs.add, slow, failed)
        assert client._connection.core.receipts.pins.snapshot() == frozenset()
