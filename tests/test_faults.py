"""Fault tests with real processes: workers, brokers and clients really SIGKILLed, SIGSTOPped, fed garbage.

::

    test ──Client / raw DEALER──► zfarm broker (heartbeat 0.2 s, liveness 3) ◄── zfarm worker(s)
      │                                   ▲
      └──── SIGKILL / SIGSTOP / SIGTERM ──┴── fetch_status (in-process monitor, fast polling)

The broker runs with short heartbeats so a silent peer is declared dead after ~0.6 s; clients and
workers adopt these settings from the broker's WELCOME. State is read with an in-process monitor
(``fetch_status``) rather than ``zfarm status`` so that timings can be measured to ~10 ms.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgpack
import pytest
import zmq

import zfarm
from tests import jobs
from tests.helpers import (
    Proc,
    Procs,
    free_tcp_endpoint,
    live_pids,
    recv_message,
    require_status,
    run_zfarm,
    wait_for,
    wait_for_worker_pids,
)
from zfarm import protocol as p
from zfarm.monitor import fetch_status

HEARTBEAT_S = 0.2
LIVENESS = 3
DEAD_AFTER_S = HEARTBEAT_S * LIVENESS
#: slack on top of the liveness window for a loaded machine (scan period, polling, scheduling)
DETECTION_MARGIN_S = 1.0
FAST = ("--heartbeat-interval", str(HEARTBEAT_S), "--liveness", str(LIVENESS))
RESULT_TIMEOUT_S = 30.0


# ---- helpers --------------------------------------------------------------------------------------


def snapshot(ctx: zmq.Context[Any], endpoint: str, timeout_s: float = 5.0) -> dict[str, Any]:
    return fetch_status(endpoint, timeout_s, ctx)


def worker_pids(snap: dict[str, Any]) -> list[int]:
    return [w["pid"] for w in snap["workers"]]


def worker_entry(snap: dict[str, Any], pid: int) -> dict[str, Any] | None:
    return next((w for w in snap["workers"] if w["pid"] == pid), None)


def wait_workers(
    ctx: zmq.Context[Any], endpoint: str, workers: list[Proc], timeout_s: float = 20.0
) -> dict[str, Any]:
    """Wait until the broker lists exactly these workers (by pid); return that snapshot."""
    return wait_for_worker_pids(lambda: snapshot(ctx, endpoint), [w.pid for w in workers], timeout_s)


def farm(procs: Procs, ctx: zmq.Context[Any], n_workers: int, slots: int = 1,
         endpoint: str | None = None) -> tuple[Proc, str, list[Proc]]:
    """A broker with fast heartbeats and ``n_workers`` registered workers."""
    broker, endpoint = procs.broker(endpoint, *FAST)
    workers = [procs.worker(endpoint, procs=slots) for _ in range(n_workers)]
    wait_workers(ctx, endpoint, workers)
    return broker, endpoint, workers


def timed_wait(predicate: Any, timeout_s: float, message: str) -> float:
    """Wait for ``predicate`` and return how long it took."""
    started = time.monotonic()
    wait_for(predicate, timeout_s, interval_s=0.01, message=message)
    return time.monotonic() - started


# ---- 1. a worker SIGKILLed mid-map ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_worker_sigkilled_mid_map_every_result_arrives_once(procs: Procs, ctx: zmq.Context[Any]) -> None:
    n, kill_after = 2000, 300
    _, endpoint, (victim, survivor) = farm(procs, ctx, n_workers=2, slots=2)
    victim_children = victim.children()
    assert victim_children, "the worker should have slot processes"

    results = []
    with zfarm.Client(endpoint) as client:
        for value in client.map(jobs.slow_square, range(n), [0.005] * n, timeout=60, chunksize=1):
            results.append(value)
            if len(results) == kill_after:
                entry = worker_entry(snapshot(ctx, endpoint), victim.pid)
                assert entry is not None and entry["done"] > 0, f"the victim did no work: {entry}"
                victim.kill()

    assert len(results) == n
    assert results == [x * x for x in range(n)]
    snap = snapshot(ctx, endpoint)
    assert snap["workers_lost"] == 1, snap
    assert snap["requeued"] >= 1, snap
    assert worker_pids(snap) == [survivor.pid]
    assert snap["queued"] == 0 and snap["in_flight"] == 0, snap
    assert snap["done"] == n, "the broker forwards each job's result once"
    wait_for(lambda: not live_pids(victim_children), 10.0,
             message=f"slot processes {sorted(victim_children)} of the killed worker to exit")


# ---- 2. a worker SIGSTOPped -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_worker_sigstopped_is_declared_dead_and_rejoins_after_sigcont(
    procs: Procs, ctx: zmq.Context[Any], tmp_path: Path
) -> None:
    n = 8
    release = tmp_path / "release"
    _, endpoint, (frozen, other) = farm(procs, ctx, n_workers=2, slots=1)

    with zfarm.Client(endpoint) as client:
        results = client.map(jobs.hold, [str(release)] * n, range(n), timeout=RESULT_TIMEOUT_S, chunksize=1)

        def both_busy() -> dict[str, Any] | None:
            snap = snapshot(ctx, endpoint)
            entries = [worker_entry(snap, w.pid) for w in (frozen, other)]
            return snap if all(e is not None and e["busy"] > 0 for e in entries) else None

        wait_for(both_busy, 20.0, message="both workers holding jobs")
        frozen.stop()
        dead_after_s = timed_wait(lambda: frozen.pid not in worker_pids(snapshot(ctx, endpoint)), 10.0,
                                  "the stopped worker to be declared dead")
        assert dead_after_s <= DEAD_AFTER_S + DETECTION_MARGIN_S, (
            f"stopped worker declared dead after {dead_after_s:.2f} s; liveness window is {DEAD_AFTER_S} s")

        release.touch()
        values = list(results)  # the stopped worker cannot report anything: all ran on the other
        assert values == list(range(n))
        snap = snapshot(ctx, endpoint)
        assert worker_pids(snap) == [other.pid]
        assert snap["workers_lost"] == 1, snap
        assert snap["requeued"] >= 1, snap
        assert snap["done"] == n, snap

        frozen.cont()
        wait_for(lambda: frozen.pid in worker_pids(snapshot(ctx, endpoint)), 15.0, interval_s=0.05,
                 message="the resumed worker to register again")
        again = list(client.map(jobs.square, range(50), timeout=RESULT_TIMEOUT_S, chunksize=1))
        assert again == [x * x for x in range(50)]

    snap = snapshot(ctx, endpoint)
    assert snap["done"] == n + 50, f"a result was forwarded twice: {snap}"
    assert sorted(worker_pids(snap)) == sorted([frozen.pid, other.pid])


# ---- 3. the broker SIGKILLed and restarted ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_broker_restarted_on_same_endpoint_map_completes(procs: Procs, ctx: zmq.Context[Any]) -> None:
    n, kill_after = 400, 100
    endpoint = free_tcp_endpoint()
    old_broker, endpoint, workers = farm(procs, ctx, n_workers=2, slots=1, endpoint=endpoint)
    old_id = snapshot(ctx, endpoint)["broker_id"]

    results = []
    with zfarm.Client(endpoint) as client:
        for value in client.map(jobs.slow_square, range(n), [0.01] * n, timeout=50, chunksize=1):
            results.append(value)
            if len(results) == kill_after:
                old_broker.kill()
                old_broker.wait(10)
                procs.broker(endpoint, *FAST)

    assert len(results) == n
    assert results == [x * x for x in range(n)]
    snap = wait_workers(ctx, endpoint, workers)
    assert snap["broker_id"] != old_id
    assert snap["queued"] == 0 and snap["in_flight"] == 0, snap


# ---- 4. jobs that crash their process ---------------------------------------------------------------

CRASHES = [  # (job, argument, exit code, words the error must contain)
    (jobs.segfault, None, -11, ["SIGSEGV", "killed"]),
    (jobs.hard_exit, 7, 7, ["exited with code 7"]),
]


def test_crashing_jobs_raise_job_crashed_and_worker_lives_on(procs: Procs, ctx: zmq.Context[Any]) -> None:
    _, endpoint, (worker,) = farm(procs, ctx, n_workers=1, slots=1)
    with zfarm.Client(endpoint) as client:
        for fn, arg, exitcode, words in CRASHES:
            with pytest.raises(zfarm.JobCrashed) as info:
                client.submit(fn, arg).result(RESULT_TIMEOUT_S)
            message = str(info.value)
            assert info.value.exitcode == exitcode, message
            for word in words:
                assert word in message, f"{word!r} not in {message!r}"
            assert worker.alive(), worker.log_tail()
            assert worker_pids(snapshot(ctx, endpoint)) == [worker.pid]
            assert client.submit(jobs.square, 12).result(RESULT_TIMEOUT_S) == 144
    snap = snapshot(ctx, endpoint)
    assert snap["failed"] == len(CRASHES) and snap["done"] == len(CRASHES), snap
    assert snap["workers_lost"] == 0 and snap["requeued"] == 0, snap


# ---- 5. clients that go away --------------------------------------------------------------------------

CLIENT_SCRIPT = """
import threading, zfarm
from tests import jobs
client = zfarm.Client({endpoint!r}, connect_timeout_s=20)
futures = [client.submit(jobs.hold, {release!r}, i) for i in range({n})]
print("submitted", client.id, flush=True)
threading.Event().wait(120)  # until the test SIGKILLs us
"""


def farm_is_idle(ctx: zmq.Context[Any], endpoint: str) -> dict[str, Any] | None:
    snap = snapshot(ctx, endpoint)
    idle = not snap["clients"] and snap["queued"] == 0 and snap["in_flight"] == 0
    return snap if idle and all(w["busy"] == 0 for w in snap["workers"]) else None


def assert_runs_promptly(endpoint: str) -> None:
    with zfarm.Client(endpoint) as client:
        assert client.submit(jobs.square, 9).result(10.0) == 81  # raises TimeoutError past 10 s


def test_killed_client_leaves_no_jobs_behind(procs: Procs, ctx: zmq.Context[Any], tmp_path: Path) -> None:
    n = 200
    release = tmp_path / "never-created"
    _, endpoint, _ = farm(procs, ctx, n_workers=1, slots=2)
    script = CLIENT_SCRIPT.format(endpoint=endpoint, release=str(release), n=n)
    client_proc = procs.spawn(name="client", command=[sys.executable, "-c", script])
    client_proc.wait_for_log("submitted", 20.0)

    def all_submitted() -> dict[str, Any] | None:
        snap = snapshot(ctx, endpoint)
        ok = len(snap["clients"]) == 1 and snap["clients"][0]["submitted"] == n and snap["in_flight"] == 3
        return snap if ok else None

    held = wait_for(all_submitted, 20.0, message=f"the client's {n} jobs at the broker, 3 in flight")
    assert held["queued"] == n - 3, held

    client_proc.kill()
    cleaned_s = timed_wait(lambda: farm_is_idle(ctx, endpoint), 10.0, "the dead client's jobs to go")
    assert cleaned_s <= DEAD_AFTER_S + DETECTION_MARGIN_S, f"took {cleaned_s:.2f} s"
    assert snapshot(ctx, endpoint)["cancelled"] == n
    assert_runs_promptly(endpoint)


def test_client_cancel_with_force_then_shutdown_drains_queue(
    procs: Procs, ctx: zmq.Context[Any], tmp_path: Path
) -> None:
    n = 200
    release = tmp_path / "never-created"
    _, endpoint, _ = farm(procs, ctx, n_workers=1, slots=1)
    client = zfarm.Client(endpoint)
    try:
        futures = [client.submit(jobs.hold, str(release), i) for i in range(n)]
        wait_for(lambda: snapshot(ctx, endpoint)["queued"] == n - 2, 20.0,
                 message=f"{n - 2} jobs queued, 2 held by the worker")
        started = time.monotonic()
        assert client.cancel(force=True) == n  # queued, prefetched and running alike
        client.shutdown(wait=False)
        assert all(f.cancelled() for f in futures)
        timed_wait(lambda: farm_is_idle(ctx, endpoint), 10.0, "the queue to drain")
        drained_s = time.monotonic() - started
        assert drained_s <= DEAD_AFTER_S + DETECTION_MARGIN_S, f"took {drained_s:.2f} s"
    finally:
        client.shutdown(wait=False)
        closer = f"zfarm-close-{client.id}"
        wait_for(lambda: all(t.name != closer for t in threading.enumerate()), 10.0,
                 message="the client to close")
    assert snapshot(ctx, endpoint)["cancelled"] == n
    assert_runs_promptly(endpoint)


# ---- 6. SIGTERM drains a worker gracefully ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_worker_sigterm_finishes_running_job_and_hands_back_prefetched(
    procs: Procs, ctx: zmq.Context[Any], tmp_path: Path
) -> None:
    n = 4
    _, endpoint, (leaving, staying) = farm(procs, ctx, n_workers=2, slots=1)
    with zfarm.Client(endpoint) as client:
        futures = [client.submit(jobs.mark_then_sleep, str(tmp_path), i, 1.5) for i in range(n)]

        def both_full() -> dict[str, Any] | None:
            snap = snapshot(ctx, endpoint)
            entries = [worker_entry(snap, w.pid) for w in (leaving, staying)]
            return snap if all(e is not None and e["busy"] == 2 for e in entries) else None

        # One slot each: two jobs started means each worker runs one; busy 2 means it holds one more.
        wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2, 20.0,
                 message="a job running on each worker")
        wait_for(both_full, 5.0, message="each worker running one job and holding one more")
        leaving.terminate(timeout_s=20.0)
        assert leaving.returncode == 0, leaving.log_tail()
        values = [f.result(RESULT_TIMEOUT_S) for f in futures]

    assert values == list(range(n))
    log = leaving.log()
    assert "handed back 1 queued jobs" in log, log
    assert "stopped: 1 job succeeded here" in log, log
    snap = snapshot(ctx, endpoint)
    assert worker_pids(snap) == [staying.pid]
    assert snap["workers_lost"] == 0, snap
    assert snap["requeued"] == 1, snap
    assert snap["done"] == n, snap


# ---- 7. malformed input -------------------------------------------------------------------------------


def envelope(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def command(cmd: p.Command) -> bytes:
    return bytes([cmd])


def hello(role: str, peer_id: str) -> list[bytes]:
    return p.encode(p.Hello(role, peer_id, "test-host", 4242, 0, {}))


MALFORMED: list[tuple[str, list[bytes]]] = [
    ("garbage single frame", [b"\xde\xad\xbe\xef garbage"]),
    ("empty frame", [b""]),
    ("not a zfarm header", [b"HTTP/1.1", command(p.Command.STATUS), envelope()]),
    ("unknown command byte", [p.HEADER, b"\x63", envelope()]),
    ("two-byte command", [p.HEADER, b"\x0e\x0e", envelope()]),
    ("truncated msgpack", [p.HEADER, command(p.Command.SUBMIT),
                           envelope(b"f" * 8, False, [[1, 0, {}]])[:-4]]),
    ("envelope not an array", [p.HEADER, command(p.Command.CANCEL), msgpack.packb({"seqs": [1]})]),
    ("wrong field type", [p.HEADER, command(p.Command.CANCEL), envelope("not a list")]),
    ("wrong row type", [p.HEADER, command(p.Command.CANCEL), envelope(["one"])]),
    ("bool as int", [p.HEADER, command(p.Command.SUBMIT), envelope(b"f", False, [[True, 0, {}]])]),
    ("SUBMIT frame count too high", [p.HEADER, command(p.Command.SUBMIT),
                                     envelope(b"fn", True, [[1, 2, {}]]), b"fn", b"arg"]),
    ("SUBMIT frame count too low", [p.HEADER, command(p.Command.SUBMIT),
                                    envelope(b"fn", True, [[1, 0, {}]]), b"fn", b"arg", b"extra"]),
    ("SUBMIT negative frame count", [p.HEADER, command(p.Command.SUBMIT),
                                     envelope(b"fn", False, [[1, -1, {}]])]),
    ("payload on a plain message", [p.HEADER, command(p.Command.CANCEL), envelope([1]), b"extra"]),
    ("a client sending READY", p.encode(p.Ready(5))),
    ("a client sending RESULTS", p.encode(p.Results(1, [["c-x", 1, 1, 0, 0, ""]], []))),
]


def dealer(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def send_raw_tcp_garbage(endpoint: str) -> None:
    url = urlparse(endpoint)
    assert url.hostname and url.port
    for garbage in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 8,
                    b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03" + b"\x00" * 100):
        with socket.create_connection((url.hostname, url.port), timeout=5) as raw:
            raw.sendall(garbage)


def test_malformed_input_leaves_broker_serving(procs: Procs, ctx: zmq.Context[Any]) -> None:
    _, endpoint, _ = farm(procs, ctx, n_workers=1, slots=2)
    send_raw_tcp_garbage(endpoint)

    # Another protocol version gets a clear refusal.
    sock = dealer(ctx, endpoint)
    try:
        sock.send_multipart([b"ZF\x09", *hello("client", "c-future")[1:]])
        reply = recv_message(sock)
        assert isinstance(reply, p.Refused), reply
        assert "protocol version" in reply.reason, reply.reason
    finally:
        sock.close()

    # RESULTS from a peer that never said HELLO: not served, told to introduce itself.
    sock = dealer(ctx, endpoint)
    try:
        sock.send_multipart(p.encode(p.Results(1, [["c-nobody", 1, 1, 0, 1, ""]], [b"x"])))
        reply = recv_message(sock)
        assert isinstance(reply, p.Reconnect), reply
    finally:
        sock.close()

    # Every malformed message from a registered client is counted and dropped.
    sock = dealer(ctx, endpoint)
    try:
        sock.send_multipart(hello("client", "c-garbage"))
        assert isinstance(recv_message(sock), p.Welcome)
        before = snapshot(ctx, endpoint)["malformed"]
        for _name, frames in MALFORMED:
            sock.send_multipart(frames)
        sock.send_multipart(p.encode(p.Status()))  # same connection: answered after all of the above
        reply = recv_message(sock)
        while not isinstance(reply, p.StatusReply):
            reply = recv_message(sock)
        assert reply.snapshot["malformed"] - before == len(MALFORMED), [name for name, _ in MALFORMED]
        assert reply.snapshot["queued"] == 0, "a malformed SUBMIT must not queue jobs"
        sock.send_multipart(p.encode(p.Disconnect("done")))
    finally:
        sock.close()

    with zfarm.Client(endpoint) as client:
        values = list(client.map(jobs.square, range(100), timeout=RESULT_TIMEOUT_S, chunksize=1))
    assert values == [x * x for x in range(100)]
    assert require_status(endpoint)["malformed"] - before == len(MALFORMED)  # zfarm status reads it too


# ---- 8. status against nobody ------------------------------------------------------------------------


def test_status_unreachable_endpoint_exits_1_naming_address() -> None:
    endpoint = free_tcp_endpoint()  # nothing listens there
    timeout_s = 1.0
    started = time.monotonic()
    result = run_zfarm("status", "--connect", endpoint, "--timeout", str(timeout_s), timeout_s=30)
    elapsed_s = time.monotonic() - started
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert endpoint in result.stderr and "nothing listens there" in result.stderr, result.stderr
    assert elapsed_s < timeout_s + 15.0, f"took {elapsed_s:.1f} s"  # (a refused connection: at once)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_job_that_kills_its_workers_is_declared_poison(procs: Procs, ctx: zmq.Context[Any]) -> None:
    """After --max-losses workers died running it, the job fails with WorkerLost naming them."""
    _, endpoint = procs.broker(None, *FAST, "--max-losses", "2")
    workers = [procs.worker(endpoint, *FAST, procs=1) for _ in range(3)]
    wait_workers(ctx, endpoint, workers)
    with zfarm.Client(endpoint) as client:
        poison = client.submit(jobs.kill_my_worker, 1)
        with pytest.raises(zfarm.WorkerLost) as info:
            poison.result(RESULT_TIMEOUT_S)
        assert client.submit(jobs.square, 7).result(RESULT_TIMEOUT_S) == 49  # the last worker serves on
    text = str(info.value)
    assert "2 workers died while running it" in text
    dead = [w for w in workers if not w.alive()]
    assert len(dead) == 2
    snap = snapshot(ctx, endpoint)
    assert snap["workers_lost"] == 2 and snap["failed"] == 1
    assert [w["pid"] for w in snap["workers"]] == [w.pid for w in workers if w.alive()]
