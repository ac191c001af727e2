"""The journal and sessions, through the broker's pure core: a restarted scheduler on the same journal.

A "restart" here is a new ``Scheduler`` opened on the journal file the old one wrote (after its last
commit, as the broker's loop does before it sends anything), with the old one thrown away.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_scheduler import CA, CB, FN, W1, W2, Farm, job_rows, job_seqs, result_rows, to
from zfarm import protocol as p
from zfarm.broker import journal as journal_module
from zfarm.broker import spill as spill_module
from zfarm.broker.state import Held
from zfarm.config import BrokerSettings
from zfarm.errors import JournalCorrupted, ZfarmError

OPEN: list[Journal | Spill] = []  # what this module's tests opened and have not closed


class Journal(journal_module.Journal):
    """A journal closed after its test if the test did not close it (its lock and its write-ahead
    mark's file go with it)."""

    def __init__(self, path: str, sync: str = "full") -> None:
        super().__init__(path, sync)
        OPEN.append(self)

    def close(self) -> None:
        if self in OPEN:
            OPEN.remove(self)
            super().close()

    def abandon(self) -> None:
        if self in OPEN:
            OPEN.remove(self)
            super().abandon()


class Spill(spill_module.Spill):
    """A spill file closed after its test if the test did not close it."""

    def __init__(self, folder: str | None = None) -> None:
        super().__init__(folder)
        OPEN.append(self)

    def close(self) -> None:
        if self in OPEN:
            OPEN.remove(self)
        super().close()


@pytest.fixture(autouse=True)
def close_what_the_test_opened() -> Iterator[None]:
    yield
    while OPEN:
        OPEN[-1].close()


def restart(farm: Farm, path: Path, now: float = 100.0) -> Farm:
    """Commit, drop ``farm`` as a SIGKILL would (no goodbye) and start a new scheduler on its journal,
    with the same settings."""
    assert farm.sched.journal is not None
    farm.sched.journal.commit()
    farm.sched.journal.close()
    return Farm(now, journal=Journal(str(path)), settings=farm.sched.settings)


def test_a_restarted_broker_recovers_queued_and_assigned_jobs_and_undelivered_results(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    farm.worker(W1, "w1", credit=2, slots=2)
    farm.client(CA, "ca")
    farm.submit(CA, [1, 2, 3, 4], 0.1)
    rows = job_rows(farm.out(0.1), W1)
    assert [r[1] for r in rows] == [1, 2]
    farm.result(W1, rows[0], 0.2)  # job 1 finishes; the client has not said it received it
    assert [r[0][0] for r in result_rows(farm.out(0.2), CA)] == [1]

    farm = restart(farm, path)
    snap = farm.snap(100.0)
    assert snap["queued"] == 3  # job 2 was running, jobs 3 and 4 queued: all three queue again
    assert farm.counter("recovered") == 3
    assert [(c["id"], c["present"], c["held"]) for c in snap["clients"]] == [("ca", False, 1)]
    assert snap["journal"] == str(path)

    farm.worker(W2, "w2", 100.0, credit=3, slots=3)  # a worker that never saw these jobs
    jobs = [m for m in to(farm.out(100.0), W2, p.Jobs)]
    assert [r[1] for m in jobs for r in m.jobs] == [2, 3, 4]
    assert jobs[0].fns == [FN] and jobs[0].frames[0] == b"fn-blob:" + FN  # the function came back too

    # The old worker, still running job 2, answers the new broker: the first result wins.
    farm.worker(W1, "w1", 100.1, slots=2)
    farm.result(W1, rows[1], 100.2)
    farm.client(CA, "ca", 100.3)  # the client comes back and sends everything it has not received
    farm.submit(CA, [1, 2, 3, 4], 100.3)
    out = farm.out(100.3)
    got = {row[0]: frames for row, frames in result_rows(out, CA)}
    assert got == {1: [b"result:ca:1"], 2: [b"result:ca:2"]}  # 1 held since before the crash, 2 just now
    assert job_seqs(out, W2) == []  # nothing ran twice because it was sent again
    assert farm.snap(100.3)["queued"] == 0


def test_received_results_leave_memory_and_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    farm.worker(W1, "w1", credit=2)
    farm.client(CA, "ca")
    farm.submit(CA, [1, 2], 0.1)
    for row in job_rows(farm.out(0.1), W1):
        farm.result(W1, row, 0.2)
    farm.out(0.2)
    farm.send(CA, p.Received([1]), 0.3)
    assert farm.snap(0.3)["clients"][0]["held"] == 1

    farm = restart(farm, path)
    assert farm.snap(100.0)["clients"][0]["held"] == 1
    farm.client(CA, "ca", 100.0)
    farm.submit(CA, [1, 2], 100.0)
    out = farm.out(100.0)
    assert [row[0] for row, _ in result_rows(out, CA)] == [2]  # 2 was held; 1 had arrived, so it runs again
    assert farm.snap(100.0)["queued"] == 1


def test_a_plain_client_that_leaves_takes_its_jobs_and_results_out_of_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    farm.client(CA, "ca")
    farm.submit(CA, [1, 2], 0.1)
    farm.send(CA, p.Disconnect("bye"), 0.2)
    farm = restart(farm, path)
    assert farm.snap(100.0)["clients"] == [] and farm.snap(100.0)["queued"] == 0


def test_a_recovered_plain_client_that_never_returns_is_dropped_after_the_grace(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    farm.client(CA, "ca")
    farm.submit(CA, [1], 0.1)
    farm = restart(farm, path, now=10.0)
    farm.sched.tick(10.0 + 60.0)
    assert [c["id"] for c in farm.snap(70.0)["clients"]] == ["ca"]
    farm.sched.tick(10.0 + 121.0)
    assert farm.snap(131.0)["clients"] == [] and farm.snap(131.0)["queued"] == 0


def test_a_session_keeps_its_jobs_and_results_while_its_client_is_away() -> None:
    farm = Farm()
    farm.worker(W1, "w1", credit=1)
    farm.client(CA, "s-sweep", session="sweep")
    farm.submit(CA, [1, 2], 0.1)
    out = farm.out(0.1)
    assert [m.seqs for m in to(out, CA, p.Accepted)] == [[1, 2]]
    rows = job_rows(out, W1)
    farm.send(CA, p.Disconnect("client closed"), 0.2)  # gone, mid-run
    farm.client(CB, "c-plain")
    farm.submit(CB, [1], 0.2)
    farm.send(CB, p.Disconnect("client closed"), 0.3)  # a plain client's jobs go with it
    farm.result(W1, rows[0], 0.4, credit=1)
    out = farm.out(0.4)
    assert to(out, CA) == []  # nobody to send to: held
    row2 = job_rows(out, W1)
    assert [r[1] for r in row2] == [2]  # the session's next job ran while it was away; c-plain's did not
    farm.result(W1, row2[0], 0.5)
    assert [(c["id"], c["present"], c["held"]) for c in farm.snap(0.5)["clients"]] == [("s-sweep", False, 2)]

    farm.client(CA, "s-sweep", 5.0, session="sweep")  # back, from a new process: it sends the same jobs
    farm.submit(CA, [1, 2], 5.0)
    out = farm.out(5.0)
    assert sorted(row[0] for row, _ in result_rows(out, CA)) == [1, 2]
    assert job_seqs(out, W1) == []
    farm.send(CA, p.Received([1, 2]), 5.1)
    farm.send(CA, p.Disconnect("client closed"), 5.2)
    assert farm.snap(5.2)["clients"] == []  # nothing left to keep: the session ends


def test_a_session_job_sent_again_with_other_arguments_runs_anew() -> None:
    farm = Farm()
    farm.worker(W1, "w1", credit=4)
    farm.client(CA, "s-x", session="x")
    farm.submit(CA, [1], 0.1, payloads={1: [b"old"]})
    farm.result(W1, job_rows(farm.out(0.1), W1)[0], 0.2, frames=[b"old result"])
    farm.out(0.2)
    farm.send(CA, p.Disconnect(), 0.3)
    farm.client(CA, "s-x", 1.0, session="x")
    farm.submit(CA, [1], 1.0, payloads={1: [b"new"]})
    out = farm.out(1.0)
    assert result_rows(out, CA) == []  # never the old answer for the new question
    assert [r[1] for r in job_rows(out, W1)] == [1]
    assert farm.counter("done") == 1


def test_an_away_session_expires_after_its_ttl() -> None:
    farm = Farm(settings=BrokerSettings(heartbeat_interval_s=1.0, liveness=3, session_ttl_s=50.0))
    farm.client(CA, "s-x", session="x")
    farm.submit(CA, [1], 0.1)
    farm.send(CA, p.Disconnect(), 1.0)
    farm.sched.tick(40.0)
    assert farm.snap(40.0)["queued"] == 1
    farm.sched.tick(52.0)
    assert farm.snap(52.0)["clients"] == [] and farm.snap(52.0)["queued"] == 0


def test_a_poison_count_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    settings = BrokerSettings(heartbeat_interval_s=1.0, liveness=3, max_losses=2)
    farm = Farm(journal=Journal(str(path)), settings=settings)
    farm.worker(W1, "w1", credit=1, slots=1)
    farm.client(CA, "ca")
    farm.submit(CA, [1], 0.1)
    farm.out(0.1)
    farm.send(CA, p.Heartbeat(), 9.9)
    farm.sched.tick(10.0)  # w1 silent: lost while running job 1 (one loss)
    farm = restart(farm, path)
    farm.client(CA, "ca", 100.0)
    farm.worker(W2, "w2", 100.0, credit=1, slots=1)
    farm.out(100.0)
    farm.send(CA, p.Heartbeat(), 109.9)
    farm.sched.tick(110.0)  # w2 lost too: the second loss ends the job
    rows = result_rows(farm.out(110.0), CA)
    assert [(row[0], row[1]) for row, _ in rows] == [(1, int(p.Outcome.LOST))]
    assert "2 workers died" in rows[0][0][3]


def test_a_second_broker_cannot_open_a_journal_in_use(tmp_path: Path) -> None:
    first = Journal(str(tmp_path / "journal.db"))
    try:
        with pytest.raises(ZfarmError, match="another broker"):
            Journal(str(tmp_path / "journal.db"))
    finally:
        first.close()


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(ZfarmError, match="zfarm journal"):
        Journal(str(bad))




def test_a_session_connected_when_the_broker_died_gets_its_full_ttl_after_the_restart(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    settings = BrokerSettings(heartbeat_interval_s=1.0, liveness=3, session_ttl_s=50.0)
    farm = Farm(journal=Journal(str(path)), settings=settings)
    farm.client(CA, "s-long", session="long")
    farm.submit(CA, [1], 0.1)
    for t in range(10, 61, 2):  # connected for longer than the ttl
        farm.send(CA, p.Heartbeat(), float(t))
    farm = restart(farm, path, now=61.0)
    farm.sched.tick(61.0)
    farm.sched.tick(100.0)
    assert farm.snap(100.0)["queued"] == 1  # still waiting for its client
    farm.sched.tick(112.0)
    assert farm.snap(112.0)["clients"] == []


@pytest.mark.parametrize("how", ["replaced", "cancelled then sent again"])
def test_the_old_run_of_a_session_job_never_answers_its_new_content(how: str) -> None:
    farm = Farm()
    farm.worker(W1, "w1", credit=2, slots=2)
    farm.client(CA, "s-x", session="x")
    farm.submit(CA, [1], 0.1, payloads={1: [b"old"]})
    old_row = job_rows(farm.out(0.1), W1)[0]
    if how == "cancelled then sent again":
        farm.send(CA, p.Cancel([1]), 0.2)
    farm.submit(CA, [1], 0.3, payloads={1: [b"new"]}, with_fn=False)
    out = farm.out(0.3)
    assert [type(m).__name__ for m in to(out, W1)] == ["CancelJobs", "Jobs"]  # the cancel first
    new_row = job_rows(out, W1)[0]
    assert new_row[2] == old_row[2] + 1  # the new run goes on counting attempts
    farm.result(W1, old_row, 0.4, frames=[b"result of old"], credit=0)  # raced the cancel
    assert result_rows(farm.out(0.4), CA) == []
    assert farm.counter("late_results") == 1
    farm.result(W1, new_row, 0.5, frames=[b"result of new"])
    assert [frames for _, frames in result_rows(farm.out(0.5), CA)] == [[b"result of new"]]


def test_a_replacement_bounced_by_a_full_queue_leaves_no_orphan_in_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    settings = BrokerSettings(heartbeat_interval_s=1.0, liveness=3, max_queued=1)
    farm = Farm(journal=Journal(str(path)), settings=settings)
    farm.worker(W1, "w1", credit=1, slots=1)
    farm.client(CA, "s-x", session="x")
    farm.client(CB, "cb")
    farm.submit(CA, [1], 0.1, payloads={1: [b"old"]})
    farm.out(0.1)  # job 1 runs on w1
    farm.submit(CB, [1], 0.2)  # fills the queue
    farm.submit(CA, [1], 0.3, payloads={1: [b"new"]}, with_fn=False)
    assert [row[1] for row, _ in result_rows(farm.out(0.3), CA)] == [int(p.Outcome.BUSY)]
    farm = restart(farm, path)
    assert farm.counter("recovered") == 1  # cb's job only: the replaced one left the journal


def test_received_below_frees_results_whose_received_was_lost() -> None:
    farm = Farm()
    farm.worker(W1, "w1", credit=4)
    farm.client(CA, "ca")
    farm.submit(CA, [1, 2, 3], 0.1)
    for row in job_rows(farm.out(0.1), W1):
        farm.result(W1, row, 0.2)
    farm.out(0.2)
    farm.send(CA, p.Received([], 3), 0.3)  # the RECEIVED for 1 and 2 never arrived; 3 is unfinished here
    assert farm.snap(0.3)["clients"][0]["held"] == 1


def test_a_seq_too_large_for_the_journal_is_malformed_input(tmp_path: Path) -> None:
    farm = Farm(journal=Journal(str(tmp_path / "journal.db")))
    farm.client(CA, "ca")
    farm.submit(CA, [2**63], 0.1)
    farm.send(CA, p.Cancel([2**64 - 1]), 0.1)
    assert farm.counter("malformed") == 2
    farm.submit(CA, [2**63 - 1], 0.2)
    assert farm.snap(0.2)["queued"] == 1
    farm.sched.journal.commit()  # type: ignore[union-attr]


def test_a_client_that_ends_its_session_takes_its_jobs_and_results_with_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    farm.worker(W1, "w1", credit=1, slots=1)
    farm.client(CA, "s-x", session="x")
    farm.submit(CA, [1, 2, 3], 0.1)
    row = job_rows(farm.out(0.1), W1)[0]
    farm.result(W1, row, 0.2, credit=0)
    farm.send(CA, p.Disconnect(p.END_SESSION), 0.3)
    out = farm.out(0.3)
    assert to(out, W1) == []  # jobs 2 and 3 were queued (w1 had no credit): dropped, nothing to kill
    assert farm.snap(0.3)["clients"] == [] and farm.snap(0.3)["queued"] == 0
    assert farm.counter("cancelled") == 2
    farm = restart(farm, path)
    assert farm.snap(100.0)["clients"] == [] and farm.counter("recovered") == 0


def test_after_a_restart_the_old_run_of_a_replaced_session_job_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    farm.worker(W1, "w1", credit=2, slots=2)
    farm.client(CA, "s-x", session="x")
    farm.submit(CA, [1], 0.1, payloads={1: [b"old"]})
    old_row = job_rows(farm.out(0.1), W1)[0]  # the old content runs on w1 ...
    farm.submit(CA, [1], 0.2, payloads={1: [b"new"]}, with_fn=False)  # ... when it is replaced
    farm = restart(farm, path)  # and the broker dies before w1 hears of it
    farm.worker(W1, "w1", 100.0, credit=0, slots=2)
    farm.client(CA, "s-x", 100.0, session="x")
    farm.result(W1, old_row, 100.1, frames=[b"result of old"], credit=0)
    assert result_rows(farm.out(100.1), CA) == []  # not an answer to the new content
    farm.send(W1, p.Ready(1), 100.2)
    new_row = job_rows(farm.out(100.2), W1)[0]
    assert new_row[2] == old_row[2] + 1
    farm.result(W1, new_row, 100.3, frames=[b"result of new"])
    assert [frames for _, frames in result_rows(farm.out(100.3), CA)] == [[b"result of new"]]


def test_another_programs_database_is_not_taken_for_a_journal(tmp_path: Path) -> None:
    import sqlite3

    other = tmp_path / "inventory.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE parts(name TEXT)")
    with pytest.raises(ZfarmError, match="other tables"):
        Journal(str(other))
    with sqlite3.connect(other) as db:  # and it was left as it was
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["parts"]


def test_a_journal_in_a_missing_folder_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ZfarmError, match="does not exist"):
        Journal(str(tmp_path / "no-such-folder" / "journal.db"))


def test_a_second_process_under_a_session_name_takes_it_over_and_the_first_is_told() -> None:
    farm = Farm()
    farm.send(CA, p.Hello("client", "s-x", "laptop", 100, 0, {"session": "x"}), 0.0)
    farm.send(CB, p.Hello("client", "s-x", "desktop", 200, 0, {"session": "x"}), 0.1)
    out = farm.out(0.1)
    (refused,) = to(out, CA, p.Refused)
    assert "taken over by a client on desktop (pid 200)" in refused.reason
    assert to(out, CB, p.Welcome)
    farm.send(CA, p.Hello("client", "s-x", "laptop", 100, 0, {"session": "x"}), 0.2)  # the first again
    farm.send(CA, p.Hello("client", "s-x", "laptop", 100, 0, {"session": "x"}), 0.3)  # a repeated HELLO
    assert [type(m).__name__ for m in to(farm.out(0.3), CB)] == ["Refused"]  # told once


# ---- damage, a journal that cannot be written, held results on disk ----------------------------------


def session_with_one_result_held(farm: Farm) -> None:
    """Session s-x leaves job 1 with the broker; it runs and its result ("result:s-x:1") is held."""
    farm.worker(W1, "w1", credit=1)
    farm.client(CA, "s-x", session="x")
    farm.submit(CA, [1], 0.1)
    rows = job_rows(farm.out(0.1), W1)
    farm.send(CA, p.Disconnect("client closed"), 0.2)
    farm.result(W1, rows[0], 0.3)
    farm.out(0.3)


def test_a_held_result_changed_on_disk_is_never_delivered(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    session_with_one_result_held(farm)
    journal = farm.sched.journal
    assert journal is not None
    journal.commit()
    # The disk changes one byte of the payload, ":1" to ":9", under the broker (the journal is locked: the
    # same connection).
    journal._db.execute("UPDATE results SET frames=CAST(replace(frames, X'3a31', X'3a39') AS BLOB)")
    farm.client(CA, "s-x", 1.0, session="x")
    farm.submit(CA, [1], 1.0)
    [(row, frames)] = result_rows(farm.out(1.0), CA)
    assert row[1] == p.Outcome.CORRUPTED and frames == [] and str(path) in row[3]
    assert farm.counter("corrupted") == 1 and farm.snap(1.0)["done"] == 1  # it ran once, never again


def test_a_job_changed_in_the_journal_fails_after_a_restart_and_its_neighbours_run(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    farm.client(CA, "ca")
    farm.submit(CA, [1, 2], 0.1)
    assert farm.sched.journal is not None
    farm.sched.journal.commit()
    farm.sched.journal.close()
    db = sqlite3.connect(path)
    # arg1 → arg9
    db.execute("UPDATE jobs SET frames=CAST(replace(frames, X'61726731', X'61726739') AS BLOB) WHERE seq=1")
    db.commit()
    db.close()
    farm = Farm(100.0, journal=Journal(str(path)))
    assert farm.counter("recovered") == 1 and farm.counter("corrupted") == 1
    farm.worker(W1, "w1", 100.0, credit=2)
    assert job_seqs(farm.out(100.0), W1) == [2]  # the damaged job is not run
    farm.client(CA, "ca", 100.1)
    farm.submit(CA, [1, 2], 100.1)
    [(row, _)] = result_rows(farm.out(100.1), CA)
    assert row[:2] == [1, p.Outcome.CORRUPTED]


def test_a_full_journal_refuses_new_jobs_keeps_its_changes_and_writes_them_once_it_has_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("zfarm.broker.journal.RETRY_S", 0.0)
    path = tmp_path / "journal.db"
    farm = Farm(journal=Journal(str(path)))
    journal = farm.sched.journal
    assert journal is not None
    farm.client(CA, "s-x", session="x")
    farm.submit(CA, [1], 0.1)
    assert journal.commit()
    pages = journal._db.execute("PRAGMA page_count").fetchone()[0]
    journal._db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "database or disk is full"
    farm.submit(CA, [2], 0.2, payloads={2: [b"x" * 20_000]})  # accepted before the write fails
    assert not journal.commit() and "SQLITE_FULL" in journal.problem
    farm.submit(CA, [3], 0.3)
    out = farm.out(0.3)
    assert [(row[0], row[1]) for row, _ in result_rows(out, CA)] == [(3, p.Outcome.JOURNAL_FULL)]
    assert farm.snap(0.3)["journal_problem"] == journal.problem
    journal._db.execute("PRAGMA max_page_count=1073741823")
    assert journal.commit() and journal.problem == ""
    farm = restart(farm, path)
    assert farm.counter("recovered") == 2  # job 2, accepted while the journal was full, is on disk now


def test_results_past_the_memory_bound_go_to_the_spill_file_and_come_back_whole() -> None:
    spill = Spill()
    farm = Farm(settings=BrokerSettings(held_memory_bytes=40), spill=spill)
    farm.worker(W1, "w1", credit=3)
    farm.client(CA, "s-x", session="x")
    farm.submit(CA, [1, 2, 3], 0.1)
    for row in job_rows(farm.out(0.1), W1):
        farm.result(W1, row, 0.2, frames=[bytes([row[1]]) * 30])  # 30 bytes each: one fits in 40
    farm.out(0.2)
    snap = farm.snap(0.2)
    assert (snap["held_memory_bytes"], snap["held_on_disk"]) == (30, 2)
    farm.send(CA, p.Disconnect("client closed"), 0.3)
    farm.client(CA, "s-x", 1.0, session="x")
    farm.submit(CA, [1, 2, 3], 1.0)
    got = {row[0]: (row[1], frames) for row, frames in result_rows(farm.out(1.0), CA)}
    assert got == {seq: (p.Outcome.OK, [bytes([seq]) * 30]) for seq in (1, 2, 3)}
    farm.send(CA, p.Received([1, 2, 3]), 1.1)
    snap = farm.snap(1.1)
    assert (snap["held_memory_bytes"], snap["held_on_disk"]) == (0, 0)
    spill.close()


def test_a_spilled_result_changed_on_disk_fails_its_seal() -> None:
    spill = Spill()
    held = Held(int(p.Outcome.OK), [b"value-000123"], "", [], b"")
    assert spill.put("c", 1, held)
    assert spill.get("c", 1, held) == held
    assert spill._db is not None
    spill._db.execute("UPDATE results SET frames=CAST(replace(frames, X'33', X'39') AS BLOB)")
    with pytest.raises(JournalCorrupted):
        spill.get("c", 1, held)
    spill.close()


def test_a_journal_written_before_seals_is_upgraded_and_read(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES('schema', '1');
        CREATE TABLE clients(id TEXT PRIMARY KEY, session TEXT NOT NULL, key TEXT NOT NULL);
        CREATE TABLE functions(client TEXT, fn BLOB, blob BLOB NOT NULL, PRIMARY KEY(client, fn));
        CREATE TABLE jobs(client TEXT, seq INTEGER, fn BLOB NOT NULL, frames BLOB NOT NULL,
            options BLOB NOT NULL, queued_at REAL NOT NULL, digest BLOB NOT NULL, losses BLOB NOT NULL,
            attempts_before INTEGER NOT NULL, PRIMARY KEY(client, seq));
        CREATE TABLE results(client TEXT, seq INTEGER, outcome INTEGER NOT NULL,
            frames BLOB NOT NULL, info TEXT NOT NULL, stats BLOB NOT NULL, digest BLOB NOT NULL,
            PRIMARY KEY(client, seq));
        INSERT INTO clients VALUES('ca', '', '');
        INSERT INTO functions VALUES('ca', X'f1', X'00');
        INSERT INTO jobs VALUES('ca', 1, X'f1', X'91c403617267', X'80', 0.0, X'', X'90', 0);
    """)
    db.commit()
    db.close()
    journal = Journal(str(path))
    saved = journal.load()
    assert [(j.client, j.seq, j.frames) for j in saved.jobs] == [("ca", 1, [b"arg"])] and not saved.damaged
    journal.client("cb", "", "")  # new rows are sealed
    assert journal.commit()
    journal.close()
    again = Journal(str(path))
    assert [c[0] for c in again.load().clients] == ["ca", "cb"]
    again.close()
