"""A journal damaged while its broker is stopped, and a journal that cannot be written, with real processes.

::

    zfarm.Client (session) ──► zfarm broker --journal J ◄── zfarm worker
                                  stopped; J or J-wal changed byte by byte; started again
                                  RLIMIT_FSIZE lowered under it (a full disk), then raised

A changed row is never run or delivered (JournalCorrupted); a damaged or missing write-ahead log
is reported at error level; a journal that cannot be written refuses new jobs (JournalFull) and
takes them again once it can.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
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


def snapshot(ctx: zmq.Context[Any], endpoint: str) -> dict[str, Any]:
    return fetch_status(endpoint, 5.0, ctx)


def leave_jobs(endpoint: str, session: str, values: list[str], ctx: zmq.Context[Any]) -> None:
    """A session submits ``echo(value)`` for each value and leaves; no worker runs them yet."""
    client = zfarm.Client(endpoint, session=session)
    try:
        for value in values:
            client.submit(jobs.echo, value)
    finally:
        client.shutdown(wait=False)
    wait_for(lambda: [(c["present"], c["queued"]) for c in snapshot(ctx, endpoint)["clients"]
                      if c["session"] == session] == [(False, len(values))], 30,
             message=f"{len(values)} jobs queued for the absent session")


def stop(broker: Proc) -> None:
    """A clean stop: the journal is checkpointed into its main file and its write-ahead log removed."""
    assert broker.terminate(10) == 0, broker.log_tail()


def test_a_job_changed_in_a_stopped_brokers_journal_fails_with_journal_corrupted_and_never_runs(
        procs: Procs, tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    journal = tmp_path / "journal.db"
    broker, endpoint = procs.broker(None, *FAST, "--journal", str(journal))
    values = [f"value-{x:06d}" for x in range(120, 130)]
    leave_jobs(endpoint, "sweep", values, ctx)
    stop(broker)
    data = journal.read_bytes()
    assert data.count(b"value-000123") == 1 and not journal.with_name("journal.db-wal").exists()
    journal.write_bytes(data.replace(b"value-000123", b"value-000129"))  # one digit of one argument

    broker, _ = procs.broker(endpoint, *FAST, "--journal", str(journal))
    procs.worker(endpoint, procs=2)
    wait_for_workers(endpoint, 1)
    with zfarm.Client(endpoint, session="sweep") as client:  # the rerun
        futures = [client.submit(jobs.echo, v) for v in values]
        for value, future in zip(values, futures, strict=True):
            if value == "value-000123":
                with pytest.raises(zfarm.JournalCorrupted) as caught:
                    future.result(30)
                assert caught.value.job.endswith(":4") and str(journal) in str(caught.value)
            else:
                assert future.result(30) == value
    assert "ERROR" in broker.log() and "JournalCorrupted" in broker.log()
    snap = snapshot(ctx, endpoint)
    assert snap["corrupted"] == 1 and snap["done"] == 9  # the damaged job never ran


def wal_of(journal: Path) -> Path:
    return journal.with_name(journal.name + "-wal")


def truncate_half(wal: Path) -> None:
    os.truncate(wal, wal.stat().st_size // 2)


def flip_a_byte(wal: Path) -> None:
    data = bytearray(wal.read_bytes())
    data[len(data) * 2 // 3] ^= 0x40
    wal.write_bytes(bytes(data))


def cut_at_a_transaction_end(wal: Path) -> None:
    """Cut the log where a transaction ends, half-way through them: it reads as a log that ended there."""
    data = wal.read_bytes()
    frame_bytes = 24 + int.from_bytes(data[8:12], "big")
    ends = [end for end in range(32 + frame_bytes, len(data) + 1, frame_bytes)
            if int.from_bytes(data[end - frame_bytes + 4:end - frame_bytes + 8], "big")]  # commit frames
    earlier = [end for end in ends if end < len(data)]
    assert earlier, f"the log holds one transaction only ({len(data)} bytes)"
    os.truncate(wal, earlier[len(earlier) // 2])


@pytest.mark.parametrize("damage, said", [
    (truncate_half, "ends in the middle"),
    (cut_at_a_transaction_end, "shorter than when the broker last committed"),
    (Path.unlink, "is missing"),
    (flip_a_byte, "fails its checksum"),
], ids=["truncated", "cut-at-a-transaction-end", "deleted", "byte-flipped"])
def test_a_damaged_write_ahead_log_is_reported_loudly(procs: Procs, tmp_path: Path, ctx: zmq.Context[Any],
                                                      damage: Callable[[Path], None], said: str) -> None:
    journal = tmp_path / "journal.db"
    broker, endpoint = procs.broker(None, *FAST, "--journal", str(journal))
    leave_jobs(endpoint, "first", [f"a{x}" for x in range(30)], ctx)
    stop(broker)  # these 30 are in the main file
    broker, _ = procs.broker(endpoint, *FAST, "--journal", str(journal))
    leave_jobs(endpoint, "second", [f"b{x}" for x in range(30)], ctx)
    broker.kill()  # these 30 only in the write-ahead log
    broker.wait(10)
    assert wal_of(journal).stat().st_size > 0
    damage(wal_of(journal))

    broker, _ = procs.broker(endpoint, *FAST, "--journal", str(journal))
    broker.wait_for_log("recovered", 20)
    log = " ".join(broker.log().split())  # as one line: the console wraps long ones
    assert said in log and "ERROR" in log, log
    assert "journal-damaged" in [e["kind"] for e in snapshot(ctx, endpoint)["events"]]


def test_a_half_truncated_journal_is_refused_with_one_clear_line(procs: Procs, tmp_path: Path,
                                                                 ctx: zmq.Context[Any]) -> None:
    journal = tmp_path / "journal.db"
    broker, endpoint = procs.broker(None, *FAST, "--journal", str(journal))
    leave_jobs(endpoint, "first", [f"a{x:0500d}" for x in range(200)], ctx)
    stop(broker)  # in the main file
    broker, _ = procs.broker(endpoint, *FAST, "--journal", str(journal))
    leave_jobs(endpoint, "second", [f"b{x}" for x in range(30)], ctx)
    broker.kill()  # in the write-ahead log
    broker.wait(10)
    os.truncate(journal, journal.stat().st_size // 2 // 4096 * 4096)  # half of its pages
    broker = procs.spawn("broker", "--bind", endpoint, "--journal", str(journal))
    assert broker.wait(20) == 1
    assert f"zfarm: cannot open the journal {journal}" in " ".join(broker.log().split())
    assert "Traceback" not in broker.log(), broker.log()


def set_file_size_limit(pid: int, limit: int) -> None:
    """What a full disk does to a process's writes (RLIMIT_FSIZE: works on a process of ours, no root)."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_a_journal_that_cannot_be_written_refuses_new_jobs_serves_the_rest_and_recovers(
        procs: Procs, tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    journal = tmp_path / "journal.db"
    broker, endpoint = procs.broker(None, *FAST, "--journal", str(journal))
    procs.worker(endpoint, procs=2)
    wait_for_workers(endpoint, 1)
    with zfarm.Client(endpoint, broker_timeout_s=60) as client:
        assert client.submit(jobs.square, 3).result(30) == 9
        running = client.submit(jobs.sleep_then, "held on", 2.0)
        wait_for(lambda: snapshot(ctx, endpoint)["in_flight"] == 1, 20, message="the slow job running")
        set_file_size_limit(broker.pid, wal_of(journal).stat().st_size)  # the disk is full from now on
        probe = client.submit(jobs.echo, b"x" * 20_000)  # its turn's commit fails: run, or refused
        wait_for(lambda: snapshot(ctx, endpoint)["journal_problem"], 20, message="the journal full")
        assert probe.exception(30) is None or isinstance(probe.exception(), zfarm.JournalFull)

        refused = [client.submit(jobs.echo, b"x" * 20_000) for _ in range(5)]
        for future in refused:
            with pytest.raises(zfarm.JournalFull) as caught:
                future.result(30)
        assert str(journal) in str(caught.value)
        assert running.result(30) == "held on"  # what it held goes on
        snap = snapshot(ctx, endpoint)
        assert snap["journal_problem"] and broker.alive
        assert broker.log().count("cannot write the journal") == 1  # said once

        set_file_size_limit(broker.pid, resource.RLIM_INFINITY)  # space again
        broker.wait_for_log("can be written again", 20)
        assert client.submit(jobs.square, 4).result(30) == 16
    assert broker.alive
    broker.signal(signal.SIGTERM)
    assert broker.wait(10) == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root and mount; skipped elsewhere), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                             capture_output=True, timeout=10)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:  # lazily: a process of the test may still hold a file there until its teardown
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)


def fill(disk: Path) -> Path:
    """Leave the disk no room: one file takes what is free."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.write(b"\0" * (stats.f_bavail * stats.f_frsize))
    return filler


@pytest.mark.slow
def test_a_full_disk_restarted_broker_serves_what_it_holds_and_takes_work_when_space_returns(
        procs: Procs, small_disk: Path, ctx: zmq.Context[Any]) -> None:
    journal = small_disk / "journal.db"
    broker, endpoint = procs.broker(None, *FAST, "--journal", str(journal))
    leave_jobs(endpoint, "kept", ["k1", "k2"], ctx)  # held in the journal, for after the restart
    filler = fill(small_disk)
    with zfarm.Client(endpoint, broker_timeout_s=60) as client:
        probe = client.submit(jobs.echo, b"x" * 50_000)  # its turn's commit fails: run later, or refused
        wait_for(lambda: snapshot(ctx, endpoint)["journal_problem"], 20, message="the journal full")
        assert "SQLITE_FULL" in snapshot(ctx, endpoint)["journal_problem"]
        with pytest.raises(zfarm.JournalFull):
            client.submit(jobs.echo, "more").result(30)
        client.shutdown(cancel_futures=True)
    del probe
    stop(broker)  # what could not be written is lost, and said so
    assert "could not be written" in broker.log()

    broker, _ = procs.broker(endpoint, *FAST, "--journal", str(journal))  # on the still-full disk
    procs.worker(endpoint, procs=2)
    wait_for_workers(endpoint, 1)
    with zfarm.Client(endpoint, session="kept") as kept:  # what it held is served
        assert [kept.submit(jobs.echo, v).result(30) for v in ("k1", "k2")] == ["k1", "k2"]
    wait_for(lambda: snapshot(ctx, endpoint)["journal_problem"], 20, message="the journal still full")
    with zfarm.Client(endpoint, broker_timeout_s=60) as client:
        with pytest.raises(zfarm.JournalFull):
            client.submit(jobs.echo, b"y" * 50_000).result(30)
        filler.unlink()  # space returns
        broker.wait_for_log("can be written again", 20)
        assert client.submit(jobs.echo, "back").result(30) == "back"
    assert broker.alive
