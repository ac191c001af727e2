"""The broker's pure core, driven with encoded frames and a fake clock (plain floats for ``now``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zfarm import protocol as p
from zfarm.broker import scheduler
from zfarm.broker.journal import Journal
from zfarm.broker.scheduler import Scheduler
from zfarm.broker.spill import Spill
from zfarm.broker.state import Auth
from zfarm.config import BrokerSettings

SETTINGS = BrokerSettings(heartbeat_interval_s=1.0, liveness=3)
FN = b"\xf1" * 16
FN2 = b"\xf2" * 16
OK, ERROR = int(p.Outcome.OK), int(p.Outcome.ERROR)

W1, W2, W3 = b"\x00route-w1", b"\x00route-w2", b"\x00route-w3"
CA, CB = b"\x00route-ca", b"\x00route-cb"
MON = b"\x00route-mon"
STRANGER = b"\x00route-unknown"


class Farm:
    """A scheduler plus helpers that speak to it as peers would: encoded frames in, messages out."""

    def __init__(self, now: float = 0.0, journal: Journal | None = None,
                 settings: BrokerSettings = SETTINGS, spill: Spill | None = None) -> None:
        self.sched = Scheduler(settings, now, broker_id="b-test", journal=journal, spill=spill)

    def send(self, route: bytes, msg: p.Message, now: float) -> None:
        self.sched.handle(route, p.encode(msg), now)

    def out(self, now: float) -> list[tuple[bytes, p.Message]]:
        """What the broker would send now; every message must survive the wire (encode → decode)."""
        return [(route, p.decode(p.encode(msg))) for route, msg in self.sched.flush(now)]

    def worker(self, route: bytes, wid: str, now: float = 0.0, credit: int = 0, slots: int = 4) -> None:
        self.send(route, p.Hello("worker", wid, "node", 100, slots, {}), now)
        if credit:
            self.send(route, p.Ready(credit), now)

    def client(self, route: bytes, cid: str, now: float = 0.0, session: str = "") -> None:
        info = {"session": session} if session else {}
        self.send(route, p.Hello("client", cid, "laptop", 200, 0, info), now)

    def submit(self, route: bytes, seqs: Sequence[int], now: float, fn: bytes = FN, with_fn: bool = True,
               payloads: dict[int, list[Any]] | None = None, options: dict[str, Any] | None = None) -> None:
        payloads = payloads or {seq: [f"arg{seq}".encode()] for seq in seqs}
        rows = [p.SubmitRow(seq, len(payloads[seq]), options or {}).to_wire() for seq in seqs]
        frames = ([b"fn-blob:" + fn] if with_fn else []) + [f for seq in seqs for f in payloads[seq]]
        self.send(route, p.Submit(fn, with_fn, rows, frames), now)

    def result(self, route: bytes, row: Sequence[Any], now: float, credit: int = 1, outcome: int = OK,
               frames: Sequence[Any] | None = None, info: str = "") -> None:
        """Report one job from a JOBS row ``[client, seq, attempt, fn_id, nframes, options]``."""
        frames = [f"result:{row[0]}:{row[1]}".encode()] if frames is None else list(frames)
        if outcome not in (OK, ERROR):
            frames = []
        rows = [[row[0], row[1], row[2], outcome, len(frames), info]]
        self.send(route, p.Results(credit, rows, frames), now)

    def snap(self, now: float = 0.0) -> dict[str, Any]:
        return self.sched.snapshot(now)

    def counter(self, name: str) -> int:
        return int(getattr(self.sched.counters, name))


def to(out: list[tuple[bytes, p.Message]], route: bytes, kind: type[p.Message] | None = None) -> list[Any]:
    return [m for r, m in out if r == route and (kind is None or isinstance(m, kind))]


def job_rows(out: list[tuple[bytes, p.Message]], route: bytes) -> list[list[Any]]:
    return [row for m in to(out, route, p.Jobs) for row in m.jobs]


def job_seqs(out: list[tuple[bytes, p.Message]], route: bytes) -> list[int]:
    return [row[1] for row in job_rows(out, route)]


def result_rows(out: list[tuple[bytes, p.Message]], route: bytes) -> list[tuple[list[Any], list[Any]]]:
    """(row, frames) of every RESULT entry sent to ``route``."""
    found = []
    for m in to(out, route, p.Result):
        per_row = p.split_frames(m.frames, [row[2] for row in m.results])
        found.extend(zip(m.results, per_row, strict=True))
    return found


def one_job_on_w1(seq: int) -> tuple[Farm, list[Any]]:
    """Client ca and worker w1 (credit 1); ca submits job ``seq`` and w1 gets it: its JOBS row."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.submit(CA, [seq], 0.0)
    (row,) = job_rows(farm.out(0.0), W1)
    return farm, row


def busy(farm: Farm) -> dict[str, int]:
    return {w["id"]: w["busy"] for w in farm.snap()["workers"]}


# ---- handshake -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["worker", "client", "monitor"])
def test_hello_gets_welcome_with_the_settings(role: str) -> None:
    farm = Farm()
    farm.send(W1, p.Hello(role, "peer-1", "node", 7, 2, {}), 0.0)
    out = farm.out(0.0)
    assert len(out) == 1
    route, msg = out[0]
    assert route == W1
    assert isinstance(msg, p.Welcome)
    assert msg.broker_id == "b-test"
    assert msg.heartbeat_interval_s == 1.0
    assert msg.liveness == 3
    assert msg.max_message_bytes == SETTINGS.max_message_bytes
    assert farm.counter("malformed") == 0


def test_worker_registration_shows_in_snapshot() -> None:
    farm = Farm()
    farm.worker(W1, "w1", slots=6)
    farm.client(CA, "ca")
    snap = farm.snap(0.5)
    assert [(w["id"], w["slots"], w["busy"], w["credit"]) for w in snap["workers"]] == [("w1", 6, 0, 0)]
    assert [c["id"] for c in snap["clients"]] == ["ca"]
    assert snap["heartbeat_interval_s"] == 1.0 and snap["liveness"] == 3


@pytest.mark.parametrize("hello", [
    p.Hello("gardener", "x", "h", 1, 1, {}),
    p.Hello("worker", "", "h", 1, 1, {}),
    p.Hello("worker", "w" * 500, "h", 1, 1, {}),
    p.Hello("worker", "w", "h", 1, 0, {}),
    p.Hello("worker", "w", "h", 1, -3, {}),
], ids=["bad-role", "empty-id", "long-id", "zero-slots", "negative-slots"])
def test_bad_hello_is_refused(hello: p.Hello) -> None:
    farm = Farm()
    farm.send(W1, hello, 0.0)
    out = farm.out(0.0)
    assert [(r, type(m)) for r, m in out] == [(W1, p.Refused)]
    assert farm.snap()["workers"] == [] and farm.snap()["clients"] == []


def test_hello_of_another_protocol_version_is_refused() -> None:
    farm = Farm()
    frames = p.encode(p.Hello("worker", "w1", "h", 1, 2, {}))
    farm.sched.handle(W1, [b"ZF\x09", *frames[1:]], 0.0)
    out = farm.out(0.0)
    assert [(r, type(m)) for r, m in out] == [(W1, p.Refused)]
    reason = out[0][1].reason  # type: ignore[attr-defined]
    assert "version 9" in reason and f"speaks {p.PROTOCOL_VERSION}" in reason
    assert farm.snap()["workers"] == []


def test_repeated_hello_is_answered_and_changes_nothing() -> None:
    farm = Farm()
    farm.worker(W1, "w1", credit=2)
    farm.client(CA, "ca")
    farm.submit(CA, [0, 1], 0.0)
    farm.out(0.0)
    farm.send(W1, p.Hello("worker", "w1", "node", 100, 4, {}), 0.5)
    out = farm.out(0.5)
    assert [(r, type(m)) for r, m in out] == [(W1, p.Welcome)]
    assert busy(farm) == {"w1": 2}
    assert farm.counter("workers_lost") == 0 and farm.counter("requeued") == 0


# ---- credit and dispatch -------------------------------------------------------------------------


def test_jobs_dispatched_never_exceed_credit() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=2)
    farm.worker(W2, "w2", credit=2)
    farm.submit(CA, range(10), 0.0)
    out = farm.out(0.0)
    assert len(job_rows(out, W1)) == 2
    assert len(job_rows(out, W2)) == 2
    assert sorted(job_seqs(out, W1) + job_seqs(out, W2)) == [0, 1, 2, 3]
    snap = farm.snap()
    assert (snap["queued"], snap["in_flight"]) == (6, 4)
    assert busy(farm) == {"w1": 2, "w2": 2}
    assert [w["credit"] for w in snap["workers"]] == [0, 0]
    assert farm.out(0.1) == []  # no credit, nothing more goes out
    farm.send(W1, p.Ready(1), 0.2)
    out = farm.out(0.2)
    assert job_seqs(out, W1) == [4] and job_rows(out, W2) == []
    assert farm.snap()["queued"] == 5


def test_ready_without_jobs_keeps_credit_for_later() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=3)
    assert [type(m) for _r, m in farm.out(0.0)] == [p.Welcome, p.Welcome]  # credit but no jobs yet
    farm.submit(CA, range(5), 1.0)
    out = farm.out(1.0)
    assert job_seqs(out, W1) == [0, 1, 2]
    assert farm.snap()["queued"] == 2


def test_a_lone_job_goes_out_at_once_and_many_are_batched() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=50)
    farm.out(0.0)
    farm.submit(CA, [0], 0.1)
    out = farm.out(0.1)
    assert [len(m.jobs) for m in to(out, W1, p.Jobs)] == [1]
    farm.submit(CA, range(1, 31), 0.2)
    out = farm.out(0.2)
    assert [len(m.jobs) for m in to(out, W1, p.Jobs)] == [30]  # one message, thirty jobs


def test_results_return_credit_and_reach_the_client_with_payload_untouched() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    arg = bytearray(b"argument bytes")
    farm.submit(CA, [0, 1], 0.0, payloads={0: [arg], 1: [b"a1"]})
    out = farm.out(0.0)
    (jobs_msg,) = to(out, W1, p.Jobs)
    assert jobs_msg.jobs == [["ca", 0, 1, FN, 1, {}]]
    assert jobs_msg.frames[-1] is arg  # the client's frame object itself, routed unread

    head, tail = bytearray(b"pickled result"), memoryview(b"out-of-band buffer")
    farm.result(W1, jobs_msg.jobs[0], 0.5, credit=1, frames=[head, tail], info="")
    out = farm.out(0.5)
    ((row, frames),) = result_rows(out, CA)
    assert row == [0, OK, 2, "", p.ResultKind.PLAIN]
    assert frames[0] is head and frames[1] is tail
    assert job_seqs(out, W1) == [1]  # the returned credit took the next job at once
    snap = farm.snap(0.5)
    assert (snap["done"], snap["failed"], snap["queued"], snap["in_flight"]) == (1, 0, 0, 1)


def test_failed_outcome_is_delivered_and_counted() -> None:
    farm, row = one_job_on_w1(3)
    farm.result(W1, row, 0.1, outcome=ERROR, frames=[b"pickled exception"], info="ValueError: boom")
    ((result, frames),) = result_rows(farm.out(0.1), CA)
    assert result == [3, ERROR, 1, "ValueError: boom", p.ResultKind.PLAIN]
    assert frames == [b"pickled exception"]
    snap = farm.snap()
    assert (snap["done"], snap["failed"]) == (0, 1)
    assert snap["workers"][0]["failed"] == 1 and snap["clients"][0]["failed"] == 1


def test_function_is_sent_to_a_worker_only_once() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.submit(CA, [0, 1, 2], 0.0)
    out = farm.out(0.0)
    (first,) = to(out, W1, p.Jobs)
    assert first.fns == [FN]
    assert first.frames == [b"fn-blob:" + FN, b"arg0"]
    previous = first
    for seq in (1, 2):
        farm.result(W1, previous.jobs[0], float(seq))
        (later,) = to(farm.out(float(seq)), W1, p.Jobs)
        assert later.fns == []
        assert later.frames == [f"arg{seq}".encode()]
        previous = later
    # another worker gets the function with its first job
    farm.submit(CA, [3], 5.0, with_fn=False)
    farm.worker(W2, "w2", now=5.0, credit=1)
    (w2_first,) = to(farm.out(5.0), W2, p.Jobs)
    assert w2_first.fns == [FN] and w2_first.frames == [b"fn-blob:" + FN, b"arg3"]


def test_submit_of_an_unknown_function_is_lost_at_once() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=5)
    farm.submit(CA, [0], 0.0, fn=FN2, with_fn=False)
    out = farm.out(0.0)
    assert job_rows(out, W1) == []
    ((row, frames),) = result_rows(out, CA)
    assert row[:3] == [0, int(p.Outcome.LOST), 0] and "function" in row[3]
    assert frames == []


def test_round_robin_keeps_a_small_client_from_waiting_behind_a_big_one() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.client(CB, "cb")
    farm.worker(W1, "w1", credit=1)
    farm.submit(CA, range(1000), 0.0)
    farm.submit(CB, range(10), 0.0)
    dispatched: list[tuple[str, int]] = []
    delivered: dict[bytes, list[int]] = {CA: [], CB: []}
    now = 0.0
    for _ in range(1010):
        out = farm.out(now)
        for client in (CA, CB):
            delivered[client].extend(row[0] for row, _frames in result_rows(out, client))
        rows = job_rows(out, W1)
        assert len(rows) == 1  # credit 1: one job at a time
        dispatched.append((rows[0][0], rows[0][1]))
        now += 0.001
        farm.result(W1, rows[0], now)
    out = farm.out(now)
    for client in (CA, CB):
        delivered[client].extend(row[0] for row, _frames in result_rows(out, client))
    b_positions = [i for i, (cid, _seq) in enumerate(dispatched) if cid == "cb"]
    assert len(b_positions) == 10
    assert max(b_positions) < 25, f"client B's jobs went out at positions {b_positions}"
    assert sorted(delivered[CB]) == list(range(10))
    assert sorted(delivered[CA]) == list(range(1000))
    assert farm.snap(now)["done"] == 1010


# ---- worker death and late results ---------------------------------------------------------------


def _two_jobs_on_w1_then_w1_expires(farm: Farm) -> None:
    """w1 takes jobs 0 and 1 of five at t=0, goes silent; w2 joins at t=2; w1 is expired at t=3.5."""
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=2)
    farm.submit(CA, range(5), 0.0)
    assert job_seqs(farm.out(0.0), W1) == [0, 1]
    farm.worker(W2, "w2", now=2.0)
    farm.send(CA, p.Heartbeat(), 2.0)
    farm.out(2.0)
    farm.sched.tick(2.9)
    assert [w["id"] for w in farm.snap(2.9)["workers"]] == ["w1", "w2"]  # not yet: 2.9 s < 3 s
    farm.out(2.9)
    farm.send(CA, p.Heartbeat(), 3.4)
    farm.send(W2, p.Heartbeat(), 3.4)
    farm.sched.tick(3.5)
    snap = farm.snap(3.5)
    assert [w["id"] for w in snap["workers"]] == ["w2"]
    assert [c["id"] for c in snap["clients"]] == ["ca"]
    assert (snap["workers_lost"], snap["requeued"], snap["queued"], snap["in_flight"]) == (1, 2, 5, 0)
    farm.out(3.5)


def test_silent_worker_expires_and_its_jobs_go_first_to_another_worker() -> None:
    farm = Farm()
    _two_jobs_on_w1_then_w1_expires(farm)
    farm.send(W2, p.Ready(2), 3.6)
    rows = job_rows(farm.out(3.6), W2)
    assert [(row[1], row[2]) for row in rows] == [(0, 2), (1, 2)]  # the requeued jobs, attempt 2
    assert farm.snap(3.6)["queued"] == 3


def test_message_from_an_expired_worker_gets_reconnect() -> None:
    farm = Farm()
    _two_jobs_on_w1_then_w1_expires(farm)
    farm.result(W1, ["ca", 0, 1], 3.6)
    out = farm.out(3.6)
    assert [(r, type(m)) for r, m in out] == [(W1, p.Reconnect)]
    assert result_rows(out, CA) == []


def test_late_result_from_a_dead_worker_is_delivered_once() -> None:
    farm = Farm()
    _two_jobs_on_w1_then_w1_expires(farm)
    farm.send(W2, p.Ready(1), 3.6)
    assert [(r[1], r[2]) for r in job_rows(farm.out(3.6), W2)] == [(0, 2)]
    # w1 was only cut off: it comes back on a new connection and reports job 0 (attempt 1)
    w1_again = b"\x00route-w1-again"
    farm.worker(w1_again, "w1", now=4.0)
    farm.out(4.0)
    farm.result(w1_again, ["ca", 0, 1], 4.1, credit=0, frames=[b"first"])
    out = farm.out(4.1)
    assert [(row, frames) for row, frames in result_rows(out, CA)] == [([0, OK, 1, "", 0], [b"first"])]
    assert [m.keys for m in to(out, W2, p.CancelJobs)] == [[["ca", 0]]]  # w2 need not finish it
    # w2 finished it anyway: its result is dropped and counted
    farm.result(W2, ["ca", 0, 2], 4.2, frames=[b"second"])
    out = farm.out(4.2)
    assert result_rows(out, CA) == []
    snap = farm.snap(4.2)
    assert snap["late_results"] == 1
    assert snap["done"] == 1
    assert snap["clients"][0]["done"] == 1


def test_result_from_a_worker_never_given_the_job_is_dropped() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.worker(W2, "w2")
    farm.submit(CA, [0], 0.0)
    assert job_seqs(farm.out(0.0), W1) == [0]
    farm.result(W2, ["ca", 0, 1], 0.5, credit=0, frames=[b"forged"])
    out = farm.out(0.5)
    assert result_rows(out, CA) == []
    snap = farm.snap(0.5)
    assert (snap["late_results"], snap["done"], snap["in_flight"]) == (1, 0, 1)
    assert busy(farm) == {"w1": 1, "w2": 0}
    farm.result(W1, ["ca", 0, 1], 0.6, frames=[b"real"])
    assert [frames for _row, frames in result_rows(farm.out(0.6), CA)] == [[b"real"]]


def test_result_for_an_unknown_client_is_dropped_and_counted() -> None:
    farm = Farm()
    farm.worker(W1, "w1", credit=1)
    farm.out(0.0)
    farm.result(W1, ["nobody", 0, 1], 0.1)
    assert farm.out(0.1) == []
    assert farm.counter("late_results") == 1


def test_duplicate_result_from_the_same_worker_is_delivered_once() -> None:
    farm, row = one_job_on_w1(0)
    farm.result(W1, row, 0.1)
    farm.result(W1, row, 0.2)
    assert len(result_rows(farm.out(0.2), CA)) == 1
    assert farm.counter("late_results") == 1 and farm.counter("done") == 1


def test_worker_disconnect_requeues_without_counting_a_loss() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=2)
    farm.worker(W2, "w2")
    farm.submit(CA, range(3), 0.0)
    assert job_seqs(farm.out(0.0), W1) == [0, 1]
    farm.send(W1, p.Disconnect("worker stopping"), 0.5)
    snap = farm.snap(0.5)
    assert [w["id"] for w in snap["workers"]] == ["w2"]
    assert (snap["workers_lost"], snap["requeued"], snap["queued"], snap["in_flight"]) == (0, 2, 3, 0)
    farm.send(W2, p.Ready(3), 0.6)
    assert job_seqs(farm.out(0.6), W2) == [0, 1, 2]


def test_returned_outcome_requeues_the_job() -> None:
    farm, row = one_job_on_w1(0)
    farm.result(W1, row, 0.5, credit=0, outcome=int(p.Outcome.RETURNED))
    out = farm.out(0.5)
    assert result_rows(out, CA) == [] and job_rows(out, W1) == []
    snap = farm.snap(0.5)
    assert (snap["queued"], snap["in_flight"], snap["requeued"], snap["done"]) == (1, 0, 1, 0)
    farm.worker(W2, "w2", now=0.6, credit=1)
    assert [(r[1], r[2]) for r in job_rows(farm.out(0.6), W2)] == [(0, 2)]


def test_peer_unreachable_removes_the_peer() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=2)
    farm.submit(CA, range(2), 0.0)
    farm.out(0.0)
    farm.sched.peer_unreachable(W1, 0.5)
    snap = farm.snap(0.5)
    assert snap["workers"] == []
    assert (snap["workers_lost"], snap["requeued"], snap["queued"]) == (1, 2, 2)
    farm.sched.peer_unreachable(CA, 0.6)
    snap = farm.snap(0.6)
    assert snap["clients"] == [] and snap["queued"] == 0
    farm.sched.peer_unreachable(STRANGER, 0.7)  # unknown: nothing to do, nothing raised
    assert farm.out(0.7) == []


def test_worker_reconnecting_under_its_id_replaces_the_old_record() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.submit(CA, [0], 0.0)
    farm.out(0.0)
    farm.worker(W2, "w1", now=1.0, credit=1)  # same id, new connection
    snap = farm.snap(1.0)
    assert [(w["id"], w["busy"]) for w in snap["workers"]] == [("w1", 0)]
    assert (snap["requeued"], snap["workers_lost"], snap["queued"]) == (1, 1, 1)
    out = farm.out(1.0)
    assert busy(farm) == {"w1": 1}
    assert [(r[1], r[2]) for r in job_rows(out, W2)] == [(0, 2)]
    assert to(out, W1, p.Jobs) == []
    farm.send(W1, p.Heartbeat(), 1.1)  # the old connection is forgotten
    assert [(r, type(m)) for r, m in farm.out(1.1)] == [(W1, p.Reconnect)]


# ---- clients: duplicates, cancel, departure -------------------------------------------------------


def test_duplicate_submit_of_a_seq_is_ignored() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.submit(CA, [0, 1], 0.0)
    farm.submit(CA, [1, 2], 0.1)
    snap = farm.snap(0.1)
    assert snap["queued"] == 3 and snap["clients"][0]["submitted"] == 3
    farm.worker(W1, "w1", now=0.2, credit=10)
    out = farm.out(0.2)
    assert job_seqs(out, W1) == [0, 1, 2]
    assert [r[4] for r in job_rows(out, W1)] == [1, 1, 1]
    farm.submit(CA, [1], 0.3)  # a resubmission while the job runs
    assert farm.out(0.3) == [] and farm.snap(0.3)["queued"] == 0


def test_cancel_of_a_queued_job_means_it_is_never_dispatched() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.submit(CA, range(4), 0.0)
    farm.send(CA, p.Cancel([1, 3]), 0.1)
    snap = farm.snap(0.1)
    assert (snap["queued"], snap["cancelled"]) == (2, 2)
    assert snap["clients"][0]["queued"] == 2
    farm.worker(W1, "w1", now=0.2, credit=10)
    out = farm.out(0.2)
    assert job_seqs(out, W1) == [0, 2]
    assert farm.snap(0.2)["queued"] == 0
    assert busy(farm) == {"w1": 2}


def test_cancel_of_an_assigned_job_tells_its_worker() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.submit(CA, [0, 1], 0.0)
    assert job_seqs(farm.out(0.0), W1) == [0]
    farm.send(CA, p.Cancel([0]), 0.1)
    out = farm.out(0.1)
    assert [m.keys for m in to(out, W1, p.CancelJobs)] == [[["ca", 0]]]
    assert result_rows(out, CA) == []
    snap = farm.snap(0.1)
    assert (snap["in_flight"], snap["cancelled"]) == (0, 1)
    # the worker acknowledges with CANCELLED and its credit: no late result, the next job goes out
    farm.result(W1, ["ca", 0, 1], 0.2, outcome=int(p.Outcome.CANCELLED))
    out = farm.out(0.2)
    assert job_seqs(out, W1) == [1]
    assert result_rows(out, CA) == []
    assert farm.counter("late_results") == 0


def test_cancel_of_unknown_seqs_is_harmless() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.out(0.0)
    farm.send(CA, p.Cancel([5, 6]), 0.1)
    assert farm.out(0.1) == []
    assert farm.counter("cancelled") == 0 and farm.counter("malformed") == 0


def test_silent_client_is_removed_with_its_jobs() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.submit(CA, range(3), 0.0)
    assert job_seqs(farm.out(0.0), W1) == [0]
    farm.send(W1, p.Heartbeat(), 2.0)
    farm.sched.tick(2.0)
    farm.out(2.0)
    farm.send(W1, p.Heartbeat(), 3.4)
    farm.sched.tick(3.5)
    out = farm.out(3.5)
    assert [m.keys for m in to(out, W1, p.CancelJobs)] == [[["ca", 0]]]
    snap = farm.snap(3.5)
    assert snap["clients"] == []
    assert (snap["queued"], snap["in_flight"], snap["cancelled"]) == (0, 0, 3)
    assert [w["id"] for w in snap["workers"]] == ["w1"]
    farm.send(W1, p.Ready(5), 3.6)
    assert job_rows(farm.out(3.6), W1) == []


def test_client_reconnecting_keeps_its_jobs_and_gets_results_on_the_new_route() -> None:
    farm, row = one_job_on_w1(0)
    new_route = b"\x00route-ca-again"
    farm.client(new_route, "ca", now=0.5)
    farm.out(0.5)
    farm.result(W1, row, 0.6)
    out = farm.out(0.6)
    assert [r[0] for r, _f in result_rows(out, new_route)] == [0]
    assert result_rows(out, CA) == []


# ---- robustness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [p.Heartbeat(), p.Ready(1), p.Status(), p.Cancel([1]),
                                 p.Results(1, [["c", 0, 1, OK, 0, ""]], [])],
                         ids=lambda m: type(m).__name__)
def test_message_from_an_unknown_route_gets_reconnect(msg: p.Message) -> None:
    farm = Farm()
    farm.send(STRANGER, msg, 0.0)
    out = farm.out(0.0)
    assert [(r, type(m)) for r, m in out] == [(STRANGER, p.Reconnect)]
    assert farm.snap()["workers"] == [] and farm.counter("late_results") == 0


def test_disconnect_from_an_unknown_route_is_ignored() -> None:
    farm = Farm()
    farm.send(STRANGER, p.Disconnect("bye"), 0.0)
    assert farm.out(0.0) == []


def _registered() -> Farm:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.send(MON, p.Hello("monitor", "m", "h", 1), 0.0)
    farm.submit(CA, [0], 0.0)
    farm.out(0.0)
    return farm


def _envelope(command: p.Command, envelope: Any, *payload: bytes) -> list[bytes]:
    return [p.HEADER, bytes([command]), msgpack.packb(envelope, use_bin_type=True), *payload]


MALFORMED: dict[str, tuple[bytes, list[Any]]] = {
    "one frame": (W1, [b"junk"]),
    "garbage header": (CA, [b"GET / HTTP/1.1", b"\x01", b"\x90"]),
    "unknown command": (W1, [p.HEADER, b"\x77", b"\x90"]),
    "bad envelope": (W1, [p.HEADER, bytes([p.Command.READY]), b"\xc1"]),
    "bool credit": (W1, _envelope(p.Command.READY, [True])),
    "negative credit": (W1, p.encode(p.Ready(-1))),
    "worker submits": (W1, p.encode(p.Submit(FN, True, [[9, 0, {}]], [b"fn"]))),
    "worker cancels": (W1, p.encode(p.Cancel([0]))),
    "worker sends jobs": (W1, p.encode(p.Jobs([], [], []))),
    "client readies": (CA, p.encode(p.Ready(5))),
    "client sends results": (CA, p.encode(p.Results(1, [["ca", 0, 1, OK, 0, ""]], []))),
    "client sends welcome": (CA, p.encode(p.Welcome("x", 1.0, 3, 10, {}))),
    "monitor readies": (MON, p.encode(p.Ready(5))),
    "monitor submits": (MON, p.encode(p.Submit(FN, True, [[0, 0, {}]], [b"fn"]))),
    "unknown outcome": (W1, p.encode(p.Results(1, [["ca", 0, 1, 99, 0, ""]], []))),
    "frame count mismatch": (W1, _envelope(p.Command.RESULTS, [1, [["ca", 0, 1, OK, 2, ""]]], b"x")),
    "negative frame count": (CA, _envelope(p.Command.SUBMIT, [FN, False, [[5, -1, {}]]])),
    "results kinds a list": (W1, _envelope(p.Command.RESULTS, [1, [["ca", 0, 1, OK, 0, ""]], [], [[]]])),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_is_counted_and_never_raises(case: tuple[bytes, list[Any]]) -> None:
    farm = _registered()
    route, frames = case
    before = farm.snap(0.1)
    farm.sched.handle(route, frames, 0.1)
    assert farm.counter("malformed") == 1
    assert farm.out(0.1) == []
    after = farm.snap(0.1)
    for key in ("queued", "in_flight", "done", "failed", "cancelled", "late_results"):
        assert after[key] == before[key], key
    assert [w["id"] for w in after["workers"]] == ["w1"] and [c["id"] for c in after["clients"]] == ["ca"]


def test_status_request_gets_a_snapshot() -> None:
    farm = _registered()
    farm.send(MON, p.Status(), 0.2)
    ((route, reply),) = farm.out(0.2)
    assert route == MON and isinstance(reply, p.StatusReply)
    assert reply.snapshot["broker_id"] == "b-test"
    assert reply.snapshot["in_flight"] == 1
    assert [w["id"] for w in reply.snapshot["workers"]] == ["w1"]


# ---- liveness ------------------------------------------------------------------------------------


def test_heartbeats_go_to_quiet_peers_every_interval() -> None:
    farm = Farm()
    farm.worker(W1, "w1")
    farm.client(CA, "ca")
    farm.out(0.0)
    farm.sched.tick(0.5)
    assert farm.out(0.5) == []
    farm.sched.tick(1.0)
    out = farm.out(1.0)
    assert sorted((r, type(m)) for r, m in out) == sorted([(W1, p.Heartbeat), (CA, p.Heartbeat)])
    farm.send(W1, p.Heartbeat(), 1.5)
    farm.send(CA, p.Status(), 1.6)  # the client gets a reply: it is not quiet
    assert [(r, type(m)) for r, m in farm.out(1.6)] == [(CA, p.StatusReply)]
    farm.sched.tick(1.7)
    assert farm.out(1.7) == []
    farm.sched.tick(2.0)
    assert [(r, type(m)) for r, m in farm.out(2.0)] == [(W1, p.Heartbeat)]
    farm.sched.tick(2.6)
    assert [(r, type(m)) for r, m in farm.out(2.6)] == [(CA, p.Heartbeat)]
    # peers that keep talking are never expired, whatever the time
    now = 2.6
    for _ in range(20):
        now += 0.9
        farm.send(W1, p.Heartbeat(), now)
        farm.send(CA, p.Heartbeat(), now)
        farm.sched.tick(now)
        farm.out(now)
    snap = farm.snap(now)
    assert [w["id"] for w in snap["workers"]] == ["w1"] and [c["id"] for c in snap["clients"]] == ["ca"]
    assert snap["workers_lost"] == 0


def test_worker_running_a_long_job_stays_alive_on_heartbeats() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.submit(CA, [0], 0.0)
    farm.out(0.0)
    now = 0.0
    while now < 3600.0:  # an hour-long job
        now += 1.0
        farm.send(W1, p.Heartbeat(), now)
        farm.send(CA, p.Heartbeat(), now)
        farm.sched.tick(now)
        farm.out(now)
    assert busy(farm) == {"w1": 1}
    assert farm.counter("requeued") == 0


# ---- snapshot ------------------------------------------------------------------------------------


def test_snapshot_numbers() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.client(CB, "cb")
    farm.worker(W1, "w1", credit=2)
    farm.worker(W2, "w2", credit=1)
    farm.submit(CA, range(6), 0.0)
    farm.submit(CB, [0, 1], 0.0)
    out = farm.out(0.0)
    w1_rows, w2_rows = job_rows(out, W1), job_rows(out, W2)
    assert (len(w1_rows), len(w2_rows)) == (2, 1)
    snap = farm.snap(0.0)
    assert (snap["queued"], snap["in_flight"], snap["done"], snap["failed"]) == (5, 3, 0, 0)

    farm.result(W1, w1_rows[0], 1.0)
    farm.result(W2, w2_rows[0], 1.0, outcome=ERROR, frames=[b"exc"])
    snap = farm.snap(1.5)
    assert (snap["queued"], snap["in_flight"], snap["done"], snap["failed"]) == (5, 1, 1, 1)
    workers = {w["id"]: w for w in snap["workers"]}
    assert (workers["w1"]["busy"], workers["w1"]["done"], workers["w1"]["failed"], workers["w1"]["credit"]) \
        == (1, 1, 0, 1)
    assert (workers["w2"]["busy"], workers["w2"]["done"], workers["w2"]["failed"], workers["w2"]["credit"]) \
        == (0, 0, 1, 1)
    assert workers["w1"]["heartbeat_age_s"] == 0.5
    clients = {c["id"]: c for c in snap["clients"]}
    finished = {(row[0], row[1]) for row in (w1_rows[0], w2_rows[0])}
    for cid, submitted in (("ca", 6), ("cb", 2)):
        c = clients[cid]
        mine_done = sum(1 for owner, _seq in finished if owner == cid)
        assert c["submitted"] == submitted
        assert c["done"] + c["failed"] == mine_done
        assert c["queued"] + c["in_flight"] + c["done"] + c["failed"] == submitted
    assert sum(c["queued"] for c in clients.values()) == 5
    assert sum(c["in_flight"] for c in clients.values()) == 1


# ---- random conversations ------------------------------------------------------------------------

WORKER_IDS = ("w1", "w2", "w3")
WORKER_SLOTS = (4, 2, 1)  # few slots: prefetched jobs, and RECLAIM when another worker idles
CLIENT_IDS = ("ca", "cb")
#: outcomes a worker reports on its own (CANCELLED only ever answers a CANCEL_JOBS)
OUTCOMES = (OK, OK, ERROR, int(p.Outcome.RETURNED))

#: operation names, repeated to weight the everyday ones
KINDS = (
    *("ready", "submit", "finish", "finish", "finish", "time") * 4,
    "hello", "new_route", "forge", "cancel", "resubmit", "leave", "unreachable", "client_gone",
    "client_hello", "silence", "start", "start", "give_back", "give_back",
)
#: (kind, a, b, dt): each operation reads what it needs from a, b and dt
operation = st.tuples(st.sampled_from(KINDS), st.integers(0, 30), st.integers(0, 30), st.floats(0.0, 2.0))


class Conversation:
    """Plays peers against the scheduler and checks what it sends against what it was told."""

    def __init__(self, journal: str = "", sessions: bool = False) -> None:
        self.journal = journal
        self.sessions = sessions  # the clients are sessions: their jobs outlive their connection
        self.farm = Farm(journal=Journal(journal) if journal else None)
        self.now = 0.0
        self.next_route = 0
        self.worker_route = {wid: self._route(wid) for wid in WORKER_IDS}
        self.client_route = {cid: self._route(cid) for cid in CLIENT_IDS}
        self.credit: dict[bytes, int] = {}  # credit granted by each route, in total
        self.sent: dict[bytes, int] = {}  # jobs the broker sent each route, in total
        self.held: dict[bytes, list[list[Any]]] = {}  # JOBS rows a route holds and has not answered
        self.next_seq = {cid: 0 for cid in CLIENT_IDS}
        self.delivered: dict[str, dict[int, list[Any]]] = {cid: {} for cid in CLIENT_IDS}
        self.cancelled: dict[str, set[int]] = {cid: set() for cid in CLIENT_IDS}  # and not sent since
        self.started: dict[bytes, set[tuple[str, int]]] = {}  # held jobs each route said it runs
        self.asked: dict[bytes, set[tuple[str, int]]] = {}  # held jobs the broker asked back (RECLAIM)
        for c in range(len(CLIENT_IDS)):
            self.op_client_hello(c)
        for i in range(len(WORKER_IDS)):
            self.op_hello(i)
            self.op_ready(i, 2)
        self.flush()

    def _route(self, name: str) -> bytes:
        self.next_route += 1
        return f"\x00{name}-{self.next_route}".encode()

    def send(self, route: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Ready | p.Results):
            self.credit[route] = self.credit.get(route, 0) + msg.credit
        self.farm.send(route, msg, self.now)

    def run(self, op: tuple[str, int, int, float]) -> None:
        kind, a, b, dt = op
        worker, client = a % len(WORKER_IDS), a % len(CLIENT_IDS)
        calls: dict[str, Any] = {
            "hello": lambda: self.op_hello(worker),
            "new_route": lambda: self.op_new_route(worker),
            "ready": lambda: self.op_ready(worker, b % 5),
            "submit": lambda: self.op_submit(client, 1 + b % 6),
            "finish": lambda: self.op_finish(a, b, OUTCOMES[b % len(OUTCOMES)]),
            "forge": lambda: self.op_forge(worker, b),
            "cancel": lambda: self.op_cancel(client, b),
            "resubmit": lambda: self.op_resubmit(client, b),
            "leave": lambda: self.op_leave(worker),
            "unreachable": lambda: self.op_unreachable(worker),
            "client_gone": lambda: self.op_client_gone(client),
            "client_hello": lambda: self.op_client_hello(client),
            "time": lambda: self.op_time(dt * 0.75, 0),
            "silence": lambda: self.op_time(dt, 1 + b),  # some peers say nothing meanwhile
            "restart": self.op_restart,
            "start": lambda: self.op_start(a, 1 + b % 5),
            "give_back": self.op_give_back,
        }
        calls[kind]()
        self.flush()

    # -- stimuli, one per operation --

    def op_hello(self, i: int) -> None:
        wid = WORKER_IDS[i]
        self.send(self.worker_route[wid], p.Hello("worker", wid, "node", 1, WORKER_SLOTS[i], {}))

    def op_new_route(self, i: int) -> None:
        self.worker_route[WORKER_IDS[i]] = self._route(WORKER_IDS[i])
        self.op_hello(i)

    def op_ready(self, i: int, credit: int) -> None:
        self.send(self.worker_route[WORKER_IDS[i]], p.Ready(credit))

    def op_submit(self, c: int, count: int) -> None:
        cid = CLIENT_IDS[c]
        seqs = list(range(self.next_seq[cid], self.next_seq[cid] + count))
        self.next_seq[cid] += count
        self._submit(cid, seqs)

    def _submit(self, cid: str, seqs: list[int]) -> None:
        self.cancelled[cid].difference_update(seqs)
        payloads = {s: [f"{cid}:{s}".encode()] for s in seqs}
        self.farm.submit(self.client_route[cid], seqs, self.now, payloads=payloads)

    def op_finish(self, which: int, pick: int, outcome: int) -> None:
        """One of the routes holding jobs reports one of them."""
        holders = [r for r, rows in self.held.items() if rows]
        if holders:
            route = holders[which % len(holders)]
            rows = self.held[route]
            self._report(route, rows.pop(pick % len(rows)), outcome, credit=1)

    def op_forge(self, i: int, pick: int) -> None:
        """Report a job held by another route (never given to this one, or given before)."""
        route = self.worker_route[WORKER_IDS[i]]
        others = [rows for r, rows in self.held.items() if r != route and rows]
        if others:
            rows = others[pick % len(others)]
            self._report(route, rows[pick % len(rows)], OK, credit=0)

    def _report(self, route: bytes, row: list[Any], outcome: int, credit: int) -> None:
        self.started.get(route, set()).discard((row[0], row[1]))  # over here (or handed back)
        frames = [f"done:{row[0]}:{row[1]}".encode()] if outcome in (OK, ERROR) else []
        self.send(route, p.Results(credit, [[row[0], row[1], row[2], outcome, len(frames), ""]], frames))

    def op_cancel(self, c: int, pick: int) -> None:
        cid = CLIENT_IDS[c]
        seq = pick % max(1, self.next_seq[cid])
        if seq not in self.delivered[cid]:  # a client cancels only what it has no result for
            self.cancelled[cid].add(seq)
        self.farm.send(self.client_route[cid], p.Cancel([seq]), self.now)

    def op_resubmit(self, c: int, pick: int) -> None:
        cid = CLIENT_IDS[c]
        seq = pick % max(1, self.next_seq[cid])
        if self.next_seq[cid] and seq not in self.delivered[cid]:
            self._submit(cid, [seq])

    def op_start(self, which: int, count: int) -> None:
        """One of the routes holding jobs says the first of them run (STARTED)."""
        holders = [r for r, rows in self.held.items() if rows]
        if holders:
            route = holders[which % len(holders)]
            keys = [(row[0], row[1]) for row in self.held[route][:count]]
            self.started.setdefault(route, set()).update(keys)
            self.send(route, p.Started([list(k) for k in keys]))

    def op_give_back(self) -> None:
        """Every route asked for jobs back gives those it holds and has not started (RETURNED, credit)."""
        for route, asked in self.asked.items():
            started = self.started.get(route, set())
            given = [row for row in self.held.get(route, []) if (row[0], row[1]) in asked - started]
            asked.clear()
            if given:
                self.held[route] = [row for row in self.held[route] if row not in given]
                returned = [[row[0], row[1], row[2], int(p.Outcome.RETURNED), 0, ""] for row in given]
                self.send(route, p.Results(len(given), returned, []))

    def op_leave(self, i: int) -> None:
        self.farm.send(self.worker_route[WORKER_IDS[i]], p.Disconnect("bye"), self.now)

    def op_unreachable(self, i: int) -> None:
        self.farm.sched.peer_unreachable(self.worker_route[WORKER_IDS[i]], self.now)

    def op_client_gone(self, c: int) -> None:
        self.farm.sched.peer_unreachable(self.client_route[CLIENT_IDS[c]], self.now)

    def op_client_hello(self, c: int) -> None:
        cid = CLIENT_IDS[c]
        info = {"session": cid} if self.sessions else {}
        self.farm.send(self.client_route[cid], p.Hello("client", cid, "laptop", 2, 0, info), self.now)

    def op_restart(self) -> None:
        """The broker dies after its last turn and starts again on its journal (or in memory).

        Workers go on with the jobs they hold; everyone says HELLO again, and clients send again
        every job they have no result for, as they do after a reconnect.
        """
        if self.farm.sched.journal is not None:
            self.farm.sched.journal.close()
        self.farm = Farm(self.now, journal=Journal(self.journal) if self.journal else None)
        for i in range(len(WORKER_IDS)):
            self.op_hello(i)
            self.op_ready(i, 2)
        for c, cid in enumerate(CLIENT_IDS):
            self.op_client_hello(c)
            undelivered = [s for s in range(self.next_seq[cid]) if s not in self.delivered[cid]]
            if undelivered:
                self._submit(cid, undelivered)

    def op_time(self, dt: float, silent: int) -> None:
        """Advance the clock; peers whose bit is set in ``silent`` say nothing meanwhile."""
        routes = [*(self.worker_route[w] for w in WORKER_IDS), *(self.client_route[c] for c in CLIENT_IDS)]
        for bit, route in enumerate(routes):
            if not silent & (1 << bit) and route in self.farm.sched.peers:
                self.farm.send(route, p.Heartbeat(), self.now)
        self.now += dt
        self.farm.sched.tick(self.now)

    # -- checks --

    def flush(self) -> None:
        for route, msg in self.farm.out(self.now):
            if isinstance(msg, p.Jobs):
                self._got_jobs(route, msg)
            elif isinstance(msg, p.Result):
                self._got_results(route, msg)
            elif isinstance(msg, p.CancelJobs):
                keys = {tuple(k) for k in msg.keys}
                self.held[route] = [r for r in self.held.get(route, []) if (r[0], r[1]) not in keys]
            elif isinstance(msg, p.Reclaim):
                asked = self.asked.setdefault(route, set())
                held = {(r[0], r[1]) for r in self.held.get(route, [])}
                for key in map(tuple, msg.keys):
                    assert key not in asked, f"{key} asked back twice"
                    assert key in held or route not in self.farm.sched.peers, f"{key} asked of another route"
                    assert key not in self.started.get(route, set()), f"{key} asked back after it started"
                    asked.add(key)
        snap = self.farm.snap(self.now)
        assert snap["in_flight"] == sum(c["in_flight"] for c in snap["clients"])
        assert snap["queued"] == sum(c["queued"] for c in snap["clients"])
        assert all(c["queued"] >= 0 and c["in_flight"] >= 0 for c in snap["clients"])
        assert self.farm.counter("malformed") == 0

    def _got_jobs(self, route: bytes, msg: p.Jobs) -> None:
        self.sent[route] = self.sent.get(route, 0) + len(msg.jobs)
        for row in msg.jobs:  # a new attempt: not started yet, whatever an earlier one did
            self.started.get(route, set()).discard((row[0], row[1]))
        self.held.setdefault(route, []).extend(msg.jobs)
        assert len(msg.frames) == len(msg.fns) + len(msg.jobs)
        assert list(msg.frames[len(msg.fns):]) == [f"{r[0]}:{r[1]}".encode() for r in msg.jobs]
        assert self.sent[route] <= self.credit.get(route, 0), "more jobs than credit"

    def _got_results(self, route: bytes, msg: p.Result) -> None:
        cid = next(c for c, r in self.client_route.items() if r == route)
        per_row = p.split_frames(msg.frames, [row[2] for row in msg.results])
        for row, frames in zip(msg.results, per_row, strict=True):
            seq = row[0]
            assert seq not in self.delivered[cid], f"{cid}:{seq} delivered twice"
            assert 0 <= seq < self.next_seq[cid]
            if row[1] in (OK, ERROR):
                assert frames == [f"done:{cid}:{seq}".encode()]
            self.delivered[cid][seq] = row

    def drain(self) -> None:
        """Everyone alive, one generous worker, answer every job: nothing may stay stuck."""
        for cid in CLIENT_IDS:
            self.op_client_hello(CLIENT_IDS.index(cid))
        route = self._route("drainer")
        self.send(route, p.Hello("worker", "drainer", "node", 1, 8, {}))
        self.send(route, p.Ready(100_000))
        self.flush()
        self._answer_everything()
        # Back, each client sends again every job it has no result for, as after a reconnect (a plain
        # client not the ones it cancelled: it forgot them); then every one of them must have one.
        wanted = {cid: {s for s in range(self.next_seq[cid]) if self.sessions or s not in self.cancelled[cid]}
                  for cid in CLIENT_IDS}
        for cid in CLIENT_IDS:
            if undelivered := sorted(wanted[cid] - set(self.delivered[cid])):
                self._submit(cid, undelivered)
        self.flush()
        self._answer_everything()
        for cid in CLIENT_IDS:
            missing = sorted(wanted[cid] - set(self.delivered[cid]))
            assert not missing, (cid, missing)
        snap = self.farm.snap(self.now)
        assert (snap["queued"], snap["in_flight"]) == (0, 0), snap

    def _answer_everything(self) -> None:
        for _ in range(200):
            pending = [(r, rows) for r, rows in self.held.items() if rows and r in self.farm.sched.peers]
            if not pending:
                break
            for r, rows in pending:
                self.held[r] = []
                results = [[row[0], row[1], row[2], OK, 1, ""] for row in rows]
                frames = [f"done:{row[0]}:{row[1]}".encode() for row in rows]
                self.send(r, p.Results(len(rows), results, frames))
            self.flush()


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=5, max_size=60))
def test_random_conversations_keep_credit_and_deliver_once(ops: list[tuple[str, int, int, float]]) -> None:
    """Whatever peers do, the broker never over-sends credit, never delivers a job twice, never gets stuck."""
    conversation = Conversation()
    for op in ops:
        conversation.run(op)
    conversation.drain()


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(operation, st.just(("restart", 0, 0, 0.0))), min_size=5, max_size=60),
       st.booleans())
def test_random_conversations_with_broker_restarts_on_a_journal_deliver_once(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int, float]],
        sessions: bool) -> None:
    """The same, with the broker dying and starting again on its journal between any two turns."""
    conversation = Conversation(str(tmp_path_factory.mktemp("journal") / "journal.db"), sessions)
    for op in ops:
        conversation.run(op)
    conversation.drain()
    conversation.op_restart()  # a last restart: nothing is left to recover
    assert conversation.farm.counter("recovered") == 0


# ---- function caches --------------------------------------------------------------------------------


def test_a_function_is_let_go_after_its_last_job_and_asked_for_again() -> None:
    farm = Farm()
    farm.worker(W1, "w1", credit=2)
    farm.client(CA, "ca")
    farm.submit(CA, [1], 0.1)
    (row,) = job_rows(farm.out(0.1), W1)
    farm.result(W1, row, 0.2)
    farm.out(0.2)
    farm.submit(CA, [2], 1.0, with_fn=False)  # soon after: the broker still has the function
    (row2,) = job_rows(farm.out(1.0), W1)
    farm.result(W1, row2, 1.1)
    farm.out(1.1)
    later = 1.1 + scheduler.FN_KEEP_S + 1.0
    for step in range(1, int(later * 2)):  # both peers stay alive meanwhile
        farm.send(W1, p.Heartbeat(), step / 2)
        farm.send(CA, p.Heartbeat(), step / 2)
        farm.sched.tick(step / 2)
    farm.sched.tick(later)
    farm.submit(CA, [3], later, with_fn=False)  # the client still thinks the broker has it
    (lost, _frames), = [r for r in result_rows(farm.out(later), CA) if r[0][0] == 3]
    assert lost[1] == int(p.Outcome.LOST) and lost[4] == p.ResultKind.FUNCTION_MISSING
    farm.submit(CA, [3], later, with_fn=True)  # the client's answer: send it again
    assert job_seqs(farm.out(later), W1) == [3]


def test_the_worker_function_cache_is_mirrored_and_bounded() -> None:
    farm = Farm()
    farm.worker(W1, "w1", credit=1)
    farm.client(CA, "ca")
    sent: list[bytes] = []
    now = 0.0
    for seq in range(p.FN_CACHE_SIZE + 2):
        fn = f"fn-{seq:04d}".encode().ljust(16, b".")
        farm.submit(CA, [seq], now, fn=fn)
        (jobs,) = to(farm.out(now), W1, p.Jobs)
        sent.extend(jobs.fns)
        farm.result(W1, jobs.jobs[0], now)
        farm.out(now)
        now += 0.01
    assert len(sent) == p.FN_CACHE_SIZE + 2  # each function went once
    first = b"fn-0000".ljust(16, b".")
    farm.submit(CA, [999], now, fn=first)  # evicted from the worker's cache: sent again
    (jobs,) = to(farm.out(now), W1, p.Jobs)
    assert jobs.fns == [first]
    assert len(farm.sched.workers["w1"].fns) == p.FN_CACHE_SIZE


# ---- identities bound to keys -------------------------------------------------------------------------


def test_with_keys_an_id_stays_with_the_key_that_first_used_it() -> None:
    farm = Farm()
    alice = Auth(frozenset({"client", "monitor"}), "key-alice")
    mallory = Auth(frozenset({"client", "monitor"}), "key-mallory")
    farm.sched.handle(CA, p.encode(p.Hello("client", "c-1", "laptop", 1)), 0.0, alice)
    farm.sched.handle(CB, p.encode(p.Hello("client", "c-1", "evil", 2)), 0.1, mallory)
    out = farm.out(0.1)
    (refused,) = to(out, CB, p.Refused)
    assert "belongs to another key" in refused.reason
    assert farm.sched.clients["c-1"].route == CA  # still Alice's connection
    farm.sched.handle(CB, p.encode(p.Hello("client", "c-1", "laptop", 1)), 0.2, alice)  # Alice reconnects
    assert to(farm.out(0.2), CB, p.Welcome)
    assert farm.sched.clients["c-1"].route == CB


def test_with_keys_a_client_key_cannot_say_it_is_a_worker() -> None:
    farm = Farm()
    client_key = Auth(frozenset({"client", "monitor"}), "key-c")
    farm.sched.handle(W1, p.encode(p.Hello("worker", "w-1", "node", 1, 2, {})), 0.0, client_key)
    (refused,) = to(farm.out(0.0), W1, p.Refused)
    assert "may not connect as a worker" in refused.reason
    assert not farm.sched.workers


# ---- poison jobs ---------------------------------------------------------------------------------------


def test_only_the_jobs_a_dead_worker_was_running_count_towards_poison() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.submit(CA, [1, 2], 0.0)  # on a 1-slot worker, job 1 runs and job 2 waits in its prefetch
    now = 0.0
    for round_ in range(3):
        route = f"w-route-{round_}".encode()
        farm.worker(route, f"w{round_}", now, credit=2, slots=1)
        assert sorted(job_seqs(farm.out(now), route)) == [1, 2]
        farm.sched.peer_unreachable(route, now + 0.1)  # the worker died
        now += 1.0
        farm.send(CA, p.Heartbeat(), now)
    out = farm.out(now)
    (lost,) = [row for row, _ in result_rows(out, CA) if row[0] == 1]
    assert lost[1] == int(p.Outcome.LOST) and "3 workers died while running it" in lost[3]
    assert farm.sched.clients["ca"].jobs.keys() == {2}  # the prefetched job is still queued, not poisoned


def test_a_worker_that_reconnects_costs_its_jobs_nothing() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.submit(CA, [1], 0.0)
    for round_ in range(5):  # the same live worker, on a new connection each time
        route = f"w-route-{round_}".encode()
        farm.worker(route, "w-same", float(round_), credit=1, slots=1)
        farm.out(float(round_))
    assert farm.sched.clients["ca"].jobs[1].losses == ()


# ---- a job's start reaches its client (RUNNING) -----------------------------------------------------


def test_started_from_the_worker_holding_the_job_tells_its_client_running() -> None:
    farm, _row = one_job_on_w1(7)
    farm.send(W1, p.Started([["ca", 7]]), 0.1)
    (running,) = to(farm.out(0.1), CA, p.Running)
    assert running.seqs == [7]


def test_started_from_another_worker_or_for_a_finished_job_is_not_passed_on() -> None:
    farm, row = one_job_on_w1(7)
    farm.worker(W2, "w2")
    farm.send(W2, p.Started([["ca", 7], ["nobody", 1]]), 0.1)  # w2 was never given it
    assert to(farm.out(0.1), CA, p.Running) == []
    farm.result(W1, row, 0.2)
    farm.send(W1, p.Started([["ca", 7]]), 0.3)  # late: the job is done
    assert to(farm.out(0.3), CA, p.Running) == []


# ---- bounds on peer text, and results resent after a reconnect ------------------------------------


def test_a_hello_with_a_host_over_its_bound_is_refused_and_registers_nothing() -> None:
    farm = Farm()
    farm.send(W1, p.Hello("worker", "w1", "h" * 50_000, 100, 4, {}), 0.0)
    [(route, refused)] = farm.out(0.0)
    assert route == W1 and isinstance(refused, p.Refused)
    assert "HELLO host is 50000 long, over its limit of 255" in refused.reason
    assert farm.snap()["workers"] == [] and farm.counter("malformed") == 0


def test_a_field_over_its_bound_from_a_registered_peer_is_dropped_and_counted() -> None:
    farm, row = one_job_on_w1(0)
    farm.result(W1, row, 0.1, outcome=ERROR, info="x" * (p.MAX_TEXT_CHARS + 1))
    assert result_rows(farm.out(0.1), CA) == []
    assert farm.counter("malformed") == 1 and farm.snap()["in_flight"] == 1


def test_a_resent_result_of_an_earlier_attempt_cancels_the_later_copy_on_the_same_worker() -> None:
    """w1 is declared dead while it runs job 0, comes back, is given job 0 again (attempt 2), then
    resends its attempt-1 result: that result wins, and w1 is told to drop attempt 2."""
    farm, row = one_job_on_w1(0)
    farm.send(CA, p.Heartbeat(), 3.0)
    farm.sched.tick(3.5)  # w1 silent past the liveness window: job 0 requeued
    w1_again = b"\x00route-w1-again"
    farm.worker(w1_again, "w1", now=3.6, credit=1)
    assert [(r[1], r[2]) for r in job_rows(farm.out(3.6), w1_again)] == [(0, 2)]
    farm.result(w1_again, row, 3.7, credit=0, frames=[b"first"])
    out = farm.out(3.7)
    assert [frames for _row, frames in result_rows(out, CA)] == [[b"first"]]
    assert [m.keys for m in to(out, w1_again, p.CancelJobs)] == [[["ca", 0]]]
    farm.result(w1_again, ["ca", 0, 2], 3.8, outcome=int(p.Outcome.CANCELLED))
    assert farm.out(3.8) == []
    assert (farm.counter("late_results"), farm.counter("done")) == (0, 1)


def test_a_long_lost_reason_reaches_the_client_clipped_to_the_bound() -> None:
    """A poison job's reason lists every lost worker with its host: it may be longer than a client
    accepts, so the broker sends no more than the bound (else the client drops the whole RESULT)."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.send(CA, p.Submit(FN, True, [[0, 1, {"max_losses": 6}]], [b"fn", b"arg"]), 0.0)
    now = 0.0
    for round_ in range(6):
        route = f"w-route-{round_}".encode()
        farm.send(route, p.Hello("worker", f"w{round_}-" + "i" * 120, "h" * p.MAX_HOST_CHARS, 1, 1, {}), now)
        farm.send(route, p.Ready(1), now)
        assert job_seqs(farm.out(now), route) == [0]
        farm.sched.peer_unreachable(route, now + 0.1)
        now += 1.0
        farm.send(CA, p.Heartbeat(), now)
    ((lost, _frames),) = result_rows(farm.out(now), CA)  # decoded as the client does
    assert lost[1] == int(p.Outcome.LOST) and len(lost[3]) == p.MAX_TEXT_CHARS
    assert lost[3].startswith("6 workers died while running it")
