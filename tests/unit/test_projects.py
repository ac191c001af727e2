"""Projects in the broker's core: fair share (by slot-time), priorities, phases, resources,
suspend/resume/cancel, on_error, and a project (suspended or not) read back from the journal; and, on
the client's side, a map's chunks cut around items holding futures. Plain data and a fake clock."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_scheduler import (
    CA,
    FN,
    MON,
    OK,
    W1,
    W2,
    W3,
    Conversation,
    Farm,
    job_rows,
    operation,
    result_rows,
    to,
)
from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.broker import placement
from zfarm.broker.dependencies import WHY_CHARS, how_it_ended
from zfarm.broker.journal import Journal
from zfarm.broker.placement import MAX_CREDIT
from zfarm.client.futures import JobFuture
from zfarm.errors import FutureInArguments
from zfarm.projects import cut_at_futures

ERROR = int(p.Outcome.ERROR)


def submit(farm: Farm, seqs: range | list[int], now: float = 0.0, with_fn: bool = True,
           **options: Any) -> None:
    rows = [[seq, 1, options] for seq in seqs]
    frames = ([b"fn"] if with_fn else []) + [f"arg{s}".encode() for s in seqs]
    farm.send(CA, p.Submit(FN, with_fn, rows, frames), now)


SENT: list[tuple[bytes, p.Message]] = []  # what the last ``act`` flushed besides its reply


def act(farm: Farm, action: str, name: str = "", now: float = 0.0, **settings: Any) -> p.ProjectReply:
    farm.send(MON, p.Project(action, name, settings), now)
    SENT[:] = farm.out(now)
    (reply,) = to(SENT, MON, p.ProjectReply)
    return reply


def view(farm: Farm, name: str) -> dict[str, Any]:
    return next(v for v in farm.snap()["projects"] if v["name"] == name)


def finish(farm: Farm, rows: list[list[Any]], now: float, outcome: int = OK, credit: int = 1) -> None:
    for row in rows:
        farm.result(W1, row, now, credit=credit, outcome=outcome)


def farm_with_one_slot() -> Farm:
    farm = Farm()
    farm.client(CA, "ca")
    farm.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), 0.0)
    farm.worker(W1, "w1", slots=1, credit=1)
    return farm


@pytest.mark.parametrize("run_s", [None, 0.5])
def test_fair_share_follows_the_shares_within_ten_percent_over_a_thousand_dispatches(
        run_s: float | None) -> None:
    """Jobs of equal length (their run time reported or not): dispatches follow the shares."""
    farm = farm_with_one_slot()
    submit(farm, range(1, 2001), project="a", share=1.0)
    submit(farm, range(2001, 4001), with_fn=False, project="b", share=3.0)
    counts: Counter[str] = Counter()
    for step in range(1000):
        (row,) = job_rows(farm.out(step), W1)
        counts["a" if row[1] <= 2000 else "b"] += 1
        if run_s is None:
            finish(farm, [row], step + 0.5)
        else:
            stats = [[step, step + run_s, run_s, 0]]
            farm.send(W1, p.Results(1, [[row[0], row[1], row[2], OK, 1, ""]], [b"r"], stats), step + run_s)
    assert abs(counts["a"] - 250) <= 25 and abs(counts["b"] - 750) <= 75, counts


def test_a_project_that_was_idle_gets_no_banked_turns() -> None:
    """Its pass starts where dispatch is: it shares from now on instead of taking every slot."""
    farm = farm_with_one_slot()
    submit(farm, range(1, 501), project="old")
    for step in range(200):
        (row,) = job_rows(farm.out(step), W1)
        finish(farm, [row], step + 0.5)
    submit(farm, range(1001, 1101), 300.0, with_fn=False, project="new")
    taken: Counter[str] = Counter()
    for step in range(300, 340):
        (row,) = job_rows(farm.out(step), W1)
        taken["new" if row[1] > 1000 else "old"] += 1
        finish(farm, [row], step + 0.5)
    assert taken == {"new": 20, "old": 20}


class Slots:
    """Worker w1 played with a fake clock: each job it gets runs for its project's job length
    (``length_s[seq // 10_000]``), then its result reports that run time, as a worker's does."""

    def __init__(self, farm: Farm, length_s: dict[int, float]) -> None:
        self.farm, self.length_s = farm, length_s
        self.now = 0.0
        self.running: list[tuple[float, int, list[Any]]] = []  # (when it ends, seq, its JOBS row)
        self.ended: dict[int, float] = {}  # seq: when it ended

    def run(self, seconds: float) -> dict[int, float]:
        """Run on for ``seconds``; returns the slot-seconds each project's jobs held meanwhile."""
        held: Counter[int] = Counter()
        end = self.now + seconds
        while True:
            for row in job_rows(self.farm.out(self.now), W1):
                self.running.append((self.now + self.length_s[row[1] // 10_000], row[1], row))
            self.running.sort()
            upto = min(self.running[0][0], end)
            for _, seq, _ in self.running if upto > self.now else ():
                held[seq // 10_000] += upto - self.now
            self.now = upto
            if self.running[0][0] > end:
                return dict(held)
            _, seq, row = self.running.pop(0)
            self.ended[seq] = self.now
            run = [[self.now - self.length_s[seq // 10_000], self.now, self.length_s[seq // 10_000], 0]]
            self.farm.send(W1, p.Results(1, [[row[0], seq, row[2], OK, 1, ""]], [b"r"], run), self.now)


def slot_time_farm(**shares: float) -> Farm:
    """A worker of 4 slots; for each project ``name=share`` 2,000 jobs, numbered from ``10_000 * k``
    for the k-th project (k from 1)."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", slots=4, credit=4)
    for k, (name, share) in enumerate(shares.items(), start=1):
        submit(farm, range(10_000 * k, 10_000 * k + 2000), with_fn=k == 1, project=name, share=share)
    return farm


@pytest.mark.parametrize(("share_long", "expected_long"), [(1.0, 0.5), (2.0, 2 / 3)])
def test_running_slot_time_follows_the_shares_whatever_the_jobs_lengths(share_long: float,
                                                                          expected_long: float) -> None:
    """10 s jobs beside 1 s jobs on 4 slots for five simulated minutes: slot-time, not dispatches,
    is shared (counting dispatches would give the long jobs nearly every slot)."""
    farm = slot_time_farm(long=share_long, short=1.0)
    held = Slots(farm, {1: 10.0, 2: 1.0}).run(300.0)
    fraction = held[1] / (held[1] + held[2])
    assert abs(fraction - expected_long) <= 0.1 * expected_long, held


def test_a_ten_job_project_gets_its_share_of_slot_time_at_once_beside_a_long_running_one() -> None:
    """Neither starved (it does not wait behind the big one's backlog) nor a burst (it banked nothing
    while it was idle): two of the four slots from the moment it arrives."""
    farm = slot_time_farm(big=1.0)
    slots = Slots(farm, {1: 1.0, 2: 1.0})
    assert slots.run(120.0) == {1: 480.0}
    submit(farm, range(20_000, 20_010), 120.0, with_fn=False, project="small")
    assert slots.run(1.0) == {1: 4.0}  # every slot was busy when it came: running jobs go on
    held = slots.run(4.0)
    assert held == {1: 8.0, 2: 8.0}, held  # from the next free slots on, half the slot-time each
    slots.run(1.0)
    assert max(slots.ended[seq] for seq in range(20_000, 20_010)) == 126.0  # its ten jobs: 5 s on 2 slots


def test_a_higher_priority_goes_first_without_stopping_running_jobs() -> None:
    farm = farm_with_one_slot()
    submit(farm, range(1, 11), project="low", priority=0)
    (running,) = job_rows(farm.out(0.0), W1)
    submit(farm, range(11, 14), 1.0, with_fn=False, project="high", priority=5)
    out = farm.out(1.0)
    assert not to(out, W1, p.CancelJobs)  # the running low job goes on
    order = []
    finish(farm, [running], 2.0)
    for step in range(3, 7):
        (row,) = job_rows(farm.out(step), W1)
        order.append(row[1])
        if step < 6:
            finish(farm, [row], step + 0.5)
    assert order == [11, 12, 13, 2]
    assert act(farm, "set", "low", 8.0, priority=9).error == ""  # changed while it runs
    submit(farm, range(20, 22), 8.0, with_fn=False, project="high", priority=5)
    finish(farm, [row], 8.5)
    (row,) = job_rows(farm.out(9.0), W1)
    assert row[1] == 3  # low now outranks high


def test_suspend_holds_queued_jobs_resume_releases_them_cancel_ends_them() -> None:
    farm = farm_with_one_slot()
    submit(farm, range(1, 6), project="p")
    (running,) = job_rows(farm.out(0.0), W1)
    assert act(farm, "suspend", "p", 1.0).projects[0]["state"] == "suspended"
    finish(farm, [running], 2.0)  # the running job finishes
    assert job_rows(farm.out(2.0), W1) == []
    assert view(farm, "p")["done"] == 1 and view(farm, "p")["queued"] == 4
    act(farm, "resume", "p", 3.0)
    (row,) = job_rows(SENT, W1)
    assert row[1] == 2
    reply = act(farm, "cancel", "p", 4.0)
    assert reply.projects[0]["cancelled"] == 4 and reply.projects[0]["queued"] == 0
    out = SENT
    assert [m.keys for m in to(out, W1, p.CancelJobs)] == [[["ca", 2]]]  # the running one is killed
    assert sorted(r[0][0] for r in result_rows(out, CA)) == [2, 3, 4, 5]
    assert {r[0][1] for r in result_rows(out, CA)} == {int(p.Outcome.CANCELLED)}


def test_on_error_suspend_and_cancel() -> None:
    farm = farm_with_one_slot()
    submit(farm, range(1, 5), project="s", on_error="suspend")
    (row,) = job_rows(farm.out(0.0), W1)
    finish(farm, [row], 1.0, outcome=ERROR)
    ((failed, _),) = result_rows(farm.out(1.0), CA)
    assert failed[4] == p.ResultKind.PROJECT_SUSPENDED
    assert view(farm, "s")["state"] == "suspended" and "failed" in view(farm, "s")["why_suspended"]
    act(farm, "cancel", "s", 2.0)
    submit(farm, range(10, 14), 3.0, with_fn=False, project="c", on_error="cancel")
    (row,) = job_rows(farm.out(3.0), W1)
    finish(farm, [row], 4.0, outcome=ERROR)
    assert view(farm, "c")["cancelled"] == 3 and view(farm, "c")["failed"] == 1


def test_a_project_cancel_counts_its_jobs_cancelled_not_failed_for_farm_client_and_project() -> None:
    farm = farm_with_one_slot()
    submit(farm, range(1, 5), project="c", on_error="cancel")
    submit(farm, [5], with_fn=False, after=[2])  # a dependent of a job the cancel ends
    (row,) = job_rows(farm.out(0.0), W1)
    finish(farm, [row], 1.0, outcome=ERROR)
    ends = {r[0]: (r[1], r[4]) for r, _ in result_rows(farm.out(1.0), CA)}
    cancelled = (p.Outcome.CANCELLED, p.ResultKind.PLAIN)
    assert ends == {1: (ERROR, p.ResultKind.PLAIN), 2: cancelled, 3: cancelled, 4: cancelled,
                    5: (p.Outcome.LOST, p.ResultKind.DEPENDENCY_FAILED)}
    snap = farm.snap(1.0)
    (client,) = snap["clients"]
    assert (snap["done"], snap["failed"], snap["cancelled"]) == (0, 2, 3)  # the job and its dependent
    assert (client["done"], client["failed"], client["cancelled"]) == (0, 2, 3)
    assert (view(farm, "c")["failed"], view(farm, "c")["cancelled"]) == (1, 3)
    submit(farm, [6], 2.0, with_fn=False)
    submit(farm, [7], 2.0, with_fn=False, after=[6])
    farm.send(CA, p.Cancel([6]), 2.0)  # a client's cancel: its dependent fails, counted once
    ((row, _),) = result_rows(farm.out(2.0), CA)
    assert (row[0], row[4]) == (7, p.ResultKind.DEPENDENCY_FAILED)
    snap = farm.snap(2.0)
    assert (snap["done"], snap["failed"], snap["cancelled"]) == (0, 3, 4)
    assert (snap["clients"][0]["failed"], snap["clients"][0]["cancelled"]) == (3, 4)


def test_a_project_reports_its_rate_and_eta_at_a_hundred_jobs_a_second() -> None:
    """More jobs finish in the window than the project remembers: the rate is over the time they span."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", slots=10, credit=10)
    submit(farm, range(1, 4001), project="r")
    for step in range(300):  # 30 s, ten jobs every tenth of a second
        now = step / 10
        finish(farm, job_rows(farm.out(now), W1), now)
    (status,) = farm.snap(now)["projects"]
    assert status["done"] == 3000
    assert 95 <= status["jobs_per_s"] <= 105 and 9.5 <= status["eta_s"] <= 10.5, status


def test_a_phase_starts_when_every_job_before_it_is_over() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", slots=4, credit=4)
    submit(farm, range(1, 3), project="ph")
    submit(farm, range(3, 5), 0.0, with_fn=False, project="ph", phase=1)
    first = job_rows(farm.out(0.0), W1)
    assert [r[1] for r in first] == [1, 2]  # phase 1 waits though slots are free
    farm.result(W1, first[0], 1.0)
    assert job_rows(farm.out(1.0), W1) == []
    farm.result(W1, first[1], 2.0)
    assert [r[1] for r in job_rows(farm.out(2.0), W1)] == [3, 4]


def test_a_job_is_placed_only_where_its_request_fits() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.send(W1, p.Hello("worker", "w1", "node", 100, 4, {"resources": {"mem": 8 * 2**30}}), 0.0)
    farm.send(W1, p.Ready(4), 0.0)
    info = {"resources": {"gpus": 2, "mem": 64 * 2**30}, "tags": ["bigmem"], "gpu_ids": ["3", "5"]}
    farm.send(W2, p.Hello("worker", "w2", "node", 101, 4, info), 0.0)
    farm.send(W2, p.Ready(4), 0.0)
    submit(farm, range(1, 4), resources={"gpus": 1})
    out = farm.out(0.0)
    assert job_rows(out, W1) == []
    rows = job_rows(out, W2)
    assert [r[5]["gpu_ids"] for r in rows] == [["3"], ["5"]]  # the third waits for a GPU
    farm.result(W2, rows[0], 1.0)
    (third,) = job_rows(farm.out(1.0), W2)
    assert third[1] == 3 and third[5]["gpu_ids"] == ["3"]
    submit(farm, [9], 2.0, with_fn=False, tags=["bigmem"], resources={"mem": 32 * 2**30})
    assert [r[1] for r in job_rows(farm.out(2.0), W2)] == [9]


def test_a_job_no_worker_can_hold_is_unschedulable_and_does_not_block_the_others() -> None:
    farm = farm_with_one_slot()
    submit(farm, [1], resources={"gpus": 2})
    submit(farm, [2], with_fn=False)
    out = farm.out(0.0)
    (notice,) = to(out, CA, p.Notice)
    assert notice.seqs == [1] and "gpus=2" in notice.text
    assert [r[1] for r in job_rows(out, W1)] == [2]
    (client,) = farm.snap()["clients"]
    assert "gpus=2" in client["unschedulable"]
    assert farm.snap()["unschedulable"] == 1  # queued, but no demand for adapt
    info = {"resources": {"gpus": 2}}
    farm.send(W2, p.Hello("worker", "w2", "node", 101, 1, info), 1.0)  # a worker that can: it runs there
    farm.send(W2, p.Ready(1), 1.0)
    assert [r[1] for r in job_rows(farm.out(1.0), W2)] == [1]


def test_a_job_that_fits_a_busy_worker_is_checked_against_every_worker_once_per_set_of_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[int] = []

    def counted(request: Any, workers: list[Any]) -> str:
        checks.append(len(workers))
        return real(request, workers)

    real = placement.unschedulable
    monkeypatch.setattr(placement, "unschedulable", counted)
    farm = Farm()
    farm.client(CA, "ca")
    gpu = {"resources": {"gpus": 1}}
    for route, wid in ((W1, "w1"), (W2, "w2")):
        farm.send(route, p.Hello("worker", wid, "node", 100, 2, gpu), 0.0)
        farm.send(route, p.Ready(2), 0.0)
    submit(farm, range(1, 5), resources={"gpus": 1})
    out = farm.out(0.0)
    assert sorted(r[1] for route in (W1, W2) for r in job_rows(out, route)) == [1, 2]
    for turn in range(1, 11):  # jobs 3 and 4 fit a worker, not now: the answer cannot change
        out = farm.out(turn)
        assert not to(out, W1, p.Jobs) and not to(out, W2, p.Jobs)
    assert checks == [2, 2]  # jobs 2 (on w1, before w2 took it) and 3, once each
    farm.send(W3, p.Hello("worker", "w3", "node", 102, 1, {}), 11.0)  # another worker: checked again
    farm.send(W3, p.Ready(1), 11.0)
    assert not to(farm.out(11.0), W3, p.Jobs)
    assert checks == [2, 2, 3]


def test_a_dependent_waits_for_its_upstream_and_gets_its_result_frames_or_fails_naming_it() -> None:
    farm = farm_with_one_slot()
    submit(farm, [1])
    submit(farm, [2], with_fn=False, after=[1])
    (row,) = job_rows(farm.out(0.0), W1)
    assert row[1] == 1  # 2 waits though nothing else is queued
    assert farm.snap()["clients"][0]["waiting"] == 1
    farm.result(W1, row, 1.0)
    (jobs_msg,) = to(farm.out(1.0), W1, p.Jobs)
    ((_, seq, _, _, nframes, options),) = jobs_msg.jobs
    assert (seq, nframes, options["upstream"]) == (2, 2, [1])
    assert list(jobs_msg.frames) == [b"arg2", b"result:ca:1"]  # its own frames, then the upstream result
    submit(farm, [3], 2.0, with_fn=False)
    submit(farm, [4], 2.0, with_fn=False, after=[3])
    submit(farm, [5], 2.0, with_fn=False, after=[4])
    farm.result(W1, jobs_msg.jobs[0], 3.0)
    (row,) = job_rows(farm.out(3.0), W1)
    farm.result(W1, row, 4.0, outcome=ERROR, frames=[b"exc"],
                info="ZeroDivisionError: division by zero\n  and more lines")
    rows = {r[0][0]: r[0] for r in result_rows(farm.out(4.0), CA)}
    assert rows[4][4] == rows[5][4] == p.ResultKind.DEPENDENCY_FAILED
    # each names its upstream, how it ended and the first line of its error (the chain's root cause too)
    assert rows[4][3] == "ca:3: it failed: ZeroDivisionError: division by zero"
    assert rows[5][3] == "ca:4: it was lost: ca:3: it failed: ZeroDivisionError: division by zero"
    submit(farm, [6], 5.0, with_fn=False, after=[3])  # an upstream that already failed
    ((late, _),) = result_rows(farm.out(5.0), CA)
    assert (late[0], late[4]) == (6, p.ResultKind.DEPENDENCY_FAILED)
    assert late[3] == "ca:3: it failed: ZeroDivisionError: division by zero"


def test_a_dependent_says_how_its_upstream_ended_clipped_to_one_line() -> None:
    assert how_it_ended(p.Outcome.CANCELLED, "") == "it was cancelled"
    crashed = how_it_ended(p.Outcome.CRASHED, "JobCrashed: the slot died\nits stderr")
    assert crashed == "it crashed: JobCrashed: the slot died"
    assert how_it_ended(99, "odd") == "it ended with outcome 99: odd"
    long = how_it_ended(p.Outcome.ERROR, "ValueError: " + "x" * 5000)
    assert long.startswith("it failed: ValueError: x") and len(long) < WHY_CHARS + 100
    assert how_it_ended(p.Outcome.ERROR, "bad\x1b[31m") == "it failed: bad\\x1b[31m"  # no control characters


def test_an_upstream_result_on_disk_is_read_once_for_all_its_dependents_in_a_jobs_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(str(tmp_path / "j.db"))
    farm = Farm(journal=journal)
    farm.client(CA, "ca", session="s")  # a session's results are held on disk only
    farm.worker(W1, "w1", slots=8, credit=1)
    submit(farm, [1])
    submit(farm, range(2, 7), with_fn=False, after=[1])
    (row,) = job_rows(farm.out(0.0), W1)
    reads: list[int] = []
    read = journal.held_result
    monkeypatch.setattr(journal, "held_result", lambda c, seq: reads.append(seq) or read(c, seq))
    farm.result(W1, row, 1.0, credit=5)
    (jobs_msg,) = to(farm.out(1.0), W1, p.Jobs)
    assert [r[1] for r in jobs_msg.jobs] == [2, 3, 4, 5, 6]
    assert list(jobs_msg.frames).count(b"result:ca:1") == 5
    assert reads == [1]
    journal.close()


def test_bad_project_options_are_refused_with_the_reason() -> None:
    farm = farm_with_one_slot()
    submit(farm, [1], project="x", share=-1)
    ((row, _),) = result_rows(farm.out(0.0), CA)
    assert row[1] == p.Outcome.LOST and row[4] == p.ResultKind.REFUSED and "share" in row[3]
    assert act(farm, "suspend", "nope").error.startswith("no project")


def test_a_project_is_known_again_after_a_restart_from_the_journal(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    farm = Farm(journal=Journal(path))
    farm.client(CA, "ca", session="s")
    submit(farm, range(1, 6), project="kept", priority=7, share=2.0)
    farm.out(0.0)
    farm.sched.journal.commit()  # type: ignore[union-attr]
    farm.sched.journal.close()  # type: ignore[union-attr]
    again = Farm(journal=Journal(path))
    (kept,) = again.snap()["projects"]
    assert (kept["name"], kept["priority"], kept["share"], kept["queued"]) == ("kept", 7, 2.0, 5)
    again.worker(W1, "w1", credit=MAX_CREDIT)
    assert len(job_rows(again.out(1.0), W1)) == 5


def journaled_farm(path: str) -> Farm:
    """A farm on a journal with a session client, a monitor and a one-slot worker of credit 1."""
    farm = Farm(journal=Journal(path))
    farm.client(CA, "ca", session="s")
    farm.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), 0.0)
    farm.worker(W1, "w1", slots=1, credit=1)
    return farm


def restart(farm: Farm, path: str, now: float) -> Farm:
    """The broker's turn ends (its journal committed), it dies, and another starts on the journal."""
    farm.out(now)
    farm.sched.journal.commit()  # type: ignore[union-attr]
    farm.sched.journal.close()  # type: ignore[union-attr]  # (what a turn committed is what a kill leaves)
    again = Farm(now, journal=Journal(path))
    again.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), now)
    return again


def restart_tampered(farm: Farm, path: str, sql: str, now: float) -> Farm:
    """The broker dies after its last commit, a row of its journal is changed on disk (``sql``), and
    another starts on the journal."""
    farm.sched.journal.close()  # type: ignore[union-attr]
    db = sqlite3.connect(path)
    with db:
        db.execute(sql)
    db.close()
    return Farm(now, journal=Journal(path))


def test_a_suspended_project_and_its_changed_settings_survive_a_restart_from_the_journal(
        tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    farm = journaled_farm(path)
    submit(farm, range(1, 6), project="held", priority=1, share=1.0)
    assert len(job_rows(farm.out(0.0), W1)) == 1  # one runs
    assert act(farm, "set", "held", 1.0, priority=7, share=3.0).error == ""
    assert act(farm, "suspend", "held", 2.0).projects[0]["state"] == "suspended"
    again = restart(farm, path, 3.0)
    kept = view(again, "held")
    assert (kept["state"], kept["priority"], kept["share"], kept["queued"]) == ("suspended", 7, 3.0, 5)
    assert kept["why_suspended"] == "suspended by request"
    again.worker(W1, "w1", 3.0, credit=MAX_CREDIT)
    assert job_rows(again.out(3.0), W1) == []  # the running one too is queued again, and held
    again = restart(again, path, 4.0)  # and again, with nothing changed in between
    again.worker(W1, "w1", 4.0, credit=MAX_CREDIT)
    assert job_rows(again.out(4.0), W1) == []
    assert act(again, "resume", "held", 5.0).error == ""
    assert sorted(r[1] for r in job_rows(SENT, W1)) == [1, 2, 3, 4, 5]
    again = restart(again, path, 6.0)  # resumed is kept too
    assert view(again, "held")["state"] == "queued" and view(again, "held")["priority"] == 7


def test_a_projects_counts_survive_a_restart_from_the_journal_as_of_the_last_turn(tmp_path: Path) -> None:
    """submitted, done, failed, cancelled and slot_s come back as the last committed turn left them
    (its recovered jobs are not counted as submitted twice); the queued ones run after it."""
    path = str(tmp_path / "j.db")
    farm = journaled_farm(path)
    submit(farm, range(1, 8), project="counted")
    (first,) = job_rows(farm.out(0.0), W1)
    stats = [[100.0, 102.5, 2.5, 1]]  # it ran 2.5 s
    farm.send(W1, p.Results(1, [["ca", first[1], first[2], OK, 1, ""]], [b"r"], stats), 1.0)
    (second,) = job_rows(farm.out(1.0), W1)
    finish(farm, [second], 2.0, outcome=ERROR)
    farm.send(CA, p.Cancel([7]), 2.5)
    job_rows(farm.out(2.5), W1)  # the third is running when the broker dies
    counts = ("submitted", "done", "failed", "cancelled", "queued", "running")
    before = view(farm, "counted")
    assert [before[k] for k in counts] == [7, 1, 1, 1, 3, 1]
    again = restart(farm, path, 3.0)
    after = view(again, "counted")
    assert [after[k] for k in counts] == [7, 1, 1, 1, 4, 0]
    assert after["slot_s"] == before["slot_s"] == 2.5
    again.worker(W1, "w1", 3.0, credit=MAX_CREDIT)
    for row in job_rows(again.out(3.0), W1):
        again.result(W1, row, 4.0, credit=0)
    again.out(4.0)
    done = view(again, "counted")
    assert (done["state"], done["submitted"], done["done"], done["failed"]) == ("done", 7, 5, 1)


def test_a_result_from_the_old_brokers_worker_counts_its_slot_time_after_a_restart(tmp_path: Path) -> None:
    """A job running when its broker died finishes on the same worker: the new broker, which never
    dispatched it, still counts the slot-time it took (slot_s, and fair share's pass)."""
    path = str(tmp_path / "j.db")
    farm = journaled_farm(path)
    submit(farm, [1], project="timed")
    (row,) = job_rows(farm.out(0.0), W1)
    again = restart(farm, path, 1.0)
    again.worker(W1, "w1", 1.0, credit=0)  # the same worker, still running it
    stats = [[100.0, 102.5, 2.5, 1]]  # it ran 2.5 s
    again.send(W1, p.Results(1, [["ca", row[1], row[2], OK, 1, ""]], [b"r"], stats), 2.0)
    again.out(2.0)
    timed = view(again, "timed")
    assert (timed["done"], timed["slot_s"]) == (1, 2.5)
    assert again.sched.farm.projects["timed"].pass_ == 2.5


def test_a_cancelled_project_stays_cancelled_after_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    farm = journaled_farm(path)
    submit(farm, range(1, 5), project="gone", on_error="suspend")
    job_rows(farm.out(0.0), W1)
    assert act(farm, "cancel", "gone", 1.0).projects[0]["cancelled"] == 4
    again = restart(farm, path, 2.0)
    again.worker(W1, "w1", 2.0, credit=MAX_CREDIT)
    assert job_rows(again.out(2.0), W1) == []
    assert [v["name"] for v in again.snap(2.0)["projects"]] == []  # nothing left of it to come back
    held = again.sched.clients["ca"].held  # its results are held for its client
    assert {seq: h.outcome for seq, h in held.items()} == dict.fromkeys(range(1, 5), int(p.Outcome.CANCELLED))


def test_a_project_row_is_dropped_once_the_project_is_owed_nothing(tmp_path: Path) -> None:
    """Done and not suspended: its row goes (the journal holds only what is owed); suspended, it stays."""
    path = str(tmp_path / "j.db")
    farm = journaled_farm(path)
    submit(farm, [1], project="quick")
    submit(farm, [2], with_fn=False, project="idle-suspended")
    (row,) = job_rows(farm.out(0.0), W1)
    act(farm, "suspend", "idle-suspended", 0.5)
    act(farm, "cancel", "idle-suspended", 0.6)
    act(farm, "suspend", "idle-suspended", 0.7)
    finish(farm, [row], 1.0)
    farm.sched.tick(5.0)
    farm.out(5.0)
    farm.sched.journal.commit()  # type: ignore[union-attr]
    assert [r.name for r in farm.sched.journal._load().projects] == ["idle-suspended"]  # type: ignore[union-attr]
    again = restart(farm, path, 6.0)
    assert [(v["name"], v["state"]) for v in again.snap(6.0)["projects"]] == [("idle-suspended", "suspended")]


def test_a_project_row_that_fails_its_seal_is_dropped_and_its_jobs_still_run(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    farm = Farm(journal=Journal(path))
    farm.client(CA, "ca", session="s")
    farm.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), 0.0)
    submit(farm, range(1, 3), project="tampered", priority=2)
    act(farm, "suspend", "tampered", 1.0)
    farm.out(1.0)
    again = restart_tampered(farm, path, "UPDATE projects SET seal=x'00'", 2.0)
    assert again.counter("corrupted") == 1
    (status,) = again.snap(2.0)["projects"]
    assert (status["state"], status["priority"], status["queued"]) == ("queued", 2, 2)
    again.worker(W1, "w1", 2.0, credit=MAX_CREDIT)
    assert len(job_rows(again.out(2.0), W1)) == 2


def test_a_maps_chunk_is_cut_around_each_item_holding_a_future_and_a_future_never_pickles() -> None:
    future = JobFuture(None, 1)  # type: ignore[arg-type]  # (no connection: only looked for here)
    items = [1, 2, future, 3, [4, (future,)], {"k": "v"}, {"k": [future]}, 5, 6]
    pieces = cut_at_futures([(x,) for x in items])
    assert [[x for (x,) in piece] for piece in pieces] == [
        [1, 2], [future], [3], [[4, (future,)]], [{"k": "v"}], [{"k": [future]}], [5, 6]]
    assert cut_at_futures([(1, "a"), (None, 2.5)]) == [[(1, "a"), (None, 2.5)]]
    with pytest.raises(FutureInArguments, match="future of job 1 is inside an object") as info:
        ser.dump_chunk([(1,), (SimpleNamespace(hidden=future),)])  # where nobody looks for it
    assert info.value.seq == 1


# ---- random conversations, with projects --------------------------------------------------------------


class ProjectConversation(Conversation):
    """The scheduler's random conversations, with jobs in projects of several priorities, shares and
    phases, projects suspended and resumed meanwhile, and some jobs asking for resources."""

    def __init__(self, journal: str = "", sessions: bool = False) -> None:
        super().__init__(journal, sessions)
        self.farm.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), self.now)

    def _submit(self, cid: str, seqs: list[int]) -> None:
        self.cancelled[cid].difference_update(seqs)
        for seq in seqs:  # each job its own options (one SUBMIT each: options are per row anyway)
            options: dict[str, Any] = {}
            if seq % 4:
                options = {"project": f"p{seq % 3}", "priority": seq % 2, "share": 1.0 + seq % 3,
                           "phase": seq // 7 % 3}
            if seq % 5 == 0:
                options["resources"] = {"cpus": 2}
            if seq % 6 == 5:  # it depends on the job before it
                options["after"] = [seq - 1]
            frames = [b"fn", f"{cid}:{seq}".encode()]
            self.farm.send(self.client_route[cid], p.Submit(FN, True, [[seq, 1, options]], frames), self.now)

    def _got_jobs(self, route: bytes, msg: p.Jobs) -> None:
        """As the base class checks, once each job's upstream result frames are set apart."""
        own: list[Any] = []
        frames = list(msg.frames[len(msg.fns):])
        for row in msg.jobs:
            extra = sum(row[5].get("upstream", []))
            own.extend(frames[:row[4] - extra])
            upstream = [f"done:{row[0]}:{s}".encode() for s in row[5].get("after", [])]
            assert frames[row[4] - extra:row[4]] == upstream
            frames = frames[row[4]:]
        rows = [[*r[:4], r[4] - sum(r[5].get("upstream", [])), r[5]] for r in msg.jobs]
        super()._got_jobs(route, p.Jobs(msg.fns, rows, [*msg.frames[:len(msg.fns)], *own]))

    def run(self, op: tuple[str, int, int, float]) -> None:
        kind, a, _b, _dt = op
        if kind in ("suspend", "resume"):
            self.farm.send(MON, p.Project(kind, f"p{a % 3}", {}), self.now)
            self.flush()
        else:
            super().run(op)

    def op_restart(self) -> None:
        super().op_restart()
        self.farm.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), self.now)

    def drain(self) -> None:
        for name in ("p0", "p1", "p2"):
            self.farm.send(MON, p.Project("resume", name, {}), self.now)
        super().drain()


PROJECT_OPS = st.one_of(operation, st.tuples(st.sampled_from(["suspend", "resume"]), st.integers(0, 30),
                                             st.integers(0, 30), st.floats(0.0, 2.0)))


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PROJECT_OPS, min_size=5, max_size=60))
def test_random_conversations_with_projects_keep_credit_and_deliver_once(
        ops: list[tuple[str, int, int, float]]) -> None:
    conversation = ProjectConversation()
    for op in ops:
        conversation.run(op)
    conversation.drain()


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(PROJECT_OPS, st.just(("restart", 0, 0, 0.0))), min_size=5, max_size=60),
       st.booleans())
def test_random_conversations_with_projects_and_restarts_deliver_once(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int, float]],
        sessions: bool) -> None:
    conversation = ProjectConversation(str(tmp_path_factory.mktemp("journal") / "journal.db"), sessions)
    for op in ops:
        conversation.run(op)
    conversation.drain()


def test_a_client_refuses_a_share_the_broker_would_refuse() -> None:
    from zfarm.errors import ConfigError
    from zfarm.projects import check_share

    assert check_share(2) == 2.0
    for bad in (0, -1, float("nan"), float("inf"), 1e-7, 1e7, True, "2"):
        with pytest.raises(ConfigError, match="share is a number from 1e-06 to 1e"):
            check_share(bad)
