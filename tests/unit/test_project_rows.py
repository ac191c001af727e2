"""Projects' rows in the journal that must go: a suspended project nobody is left to resume, and a
damaged row whose name is not text. Plain data and a fake clock, on a real journal file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.unit.test_projects import ERROR, act, finish, restart, restart_tampered, submit, view
from tests.unit.test_scheduler import CA, CB, FN, MON, W1, Farm, job_rows
from zfarm import protocol as p
from zfarm.broker.journal import Journal
from zfarm.broker.journal_rows import JournalProject
from zfarm.broker.placement import MAX_CREDIT


def names(farm: Farm, now: float) -> list[str]:
    return [v["name"] for v in farm.snap(now)["projects"]]


def rows_in(farm: Farm) -> list[str]:
    """The project rows in the journal as a restart would read them."""
    farm.sched.journal.commit()  # type: ignore[union-attr]
    return [r.name for r in farm.sched.journal._load().projects]  # type: ignore[union-attr]


def journaled_farm(path: str) -> Farm:
    farm = Farm(journal=Journal(path))
    farm.client(CA, "ca")  # no session: gone once it leaves
    farm.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), 0.0)
    farm.worker(W1, "w1", slots=1, credit=1)
    return farm


def test_a_suspended_project_with_no_job_left_goes_with_its_owner_and_its_name_runs_again(
        tmp_path: Path) -> None:
    """on_error=suspend stopped it; while its owner is here it stays (it may resume it); once the owner
    has left, it and its row go: a restart brings nothing back and a new run of the name is not held."""
    path = str(tmp_path / "j.db")
    farm = journaled_farm(path)
    submit(farm, [1], project="nightly", on_error="suspend")
    (row,) = job_rows(farm.out(0.0), W1)
    finish(farm, [row], 1.0, outcome=ERROR)
    assert view(farm, "nightly")["state"] == "suspended"
    farm.sched.tick(3.0)
    assert names(farm, 3.0) == ["nightly"] and rows_in(farm) == ["nightly"]  # its owner may resume it
    farm.send(CA, p.Disconnect("done"), 4.0)
    farm.sched.tick(6.0)
    assert names(farm, 6.0) == [] and rows_in(farm) == []
    again = restart(farm, path, 7.0)
    assert names(again, 7.0) == []
    again.client(CB, "cb", 7.0)
    again.send(CB, p.Submit(FN, True, [[1, 1, {"project": "nightly"}]], [b"fn", b"arg"]), 7.0)
    again.worker(W1, "w1", 7.0, credit=MAX_CREDIT)
    assert len(job_rows(again.out(7.0), W1)) == 1 and view(again, "nightly")["state"] == "running"


def test_a_suspended_row_whose_owner_was_gone_before_a_restart_is_dropped_after_it(tmp_path: Path) -> None:
    """The row a broker left behind (its owner gone before tidying ran) does not come back suspended
    at every restart: read back, then dropped within a second."""
    path = str(tmp_path / "j.db")
    farm = journaled_farm(path)
    submit(farm, [1], project="held")
    act(farm, "suspend", "held", 0.5)
    act(farm, "cancel", "held", 0.6)
    farm.send(CA, p.Disconnect("done"), 0.7)
    again = restart(farm, path, 1.0)  # (before any tick: its row is still there)
    assert view(again, "held")["state"] == "suspended"
    again.sched.tick(3.0)
    assert names(again, 3.0) == [] and rows_in(again) == []
    again = restart(again, path, 4.0)
    assert names(again, 4.0) == []


def test_a_damaged_project_row_whose_name_is_not_text_is_deleted_and_counted_once(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    Journal(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT INTO projects VALUES(x'01ff', x'80', x'00')")  # a name of bytes
        db.execute("INSERT INTO projects VALUES(NULL, x'80', x'00')")  # and none at all
    db.close()
    farm = Farm(1.0, journal=Journal(path))
    assert farm.counter("corrupted") == 2
    again = restart(farm, path, 2.0)
    assert again.counter("corrupted") == 0
    again.sched.journal.close()  # type: ignore[union-attr]
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM projects").fetchone() == (0,)
    db.close()


def test_a_project_row_reads_back_with_or_without_counts_and_keeps_its_state_whatever_they_are() -> None:
    """A row of a zfarm that kept no counts still reads (its counts are unknown); so does one whose
    counts are not four counts and a number of seconds (another zfarm's): its suspension is kept."""
    row = JournalProject("p", "ca", 1, 2.0, "continue", True, "why", 100.0, (7, 1, 1, 1, 2.5))
    assert JournalProject.from_row("p", row.to_state()) == row
    old = {k: v for k, v in row.to_state().items() if k != "counts"}
    assert JournalProject.from_row("p", old) == JournalProject("p", "ca", 1, 2.0, "continue", True, "why",
                                                               100.0)
    for counts in ([7, 1, 1], [7, 1, 1, -1, 0.0], [7, 1, 1, True, 0.0], [7, 1, 1, 1, float("nan")], "7",
                   [7, 1, 1, 1, 2.5, 9]):
        back = JournalProject.from_row("p", {**old, "counts": counts})
        assert (back.counts, back.suspended, back.why_suspended) == (None, True, "why")


def test_a_project_counts_its_jobs_lost_while_read_back_as_failed(tmp_path: Path) -> None:
    """A job whose row fails its seal after a restart fails (CORRUPTED, its client told): its project
    counts it failed, so its counts still add up to what it was sent."""
    path = str(tmp_path / "j.db")
    farm = journaled_farm(path)
    submit(farm, range(1, 4), project="counted")
    farm.out(0.0)
    again = restart_tampered(farm, path, "UPDATE jobs SET seal=x'00' WHERE seq=2", 1.0)
    again.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), 1.0)
    again.worker(W1, "w1", 1.0, credit=MAX_CREDIT)
    for row in job_rows(again.out(1.0), W1):
        again.result(W1, row, 2.0, credit=0)
    again.out(2.0)
    counted = view(again, "counted")
    assert [counted[k] for k in ("state", "submitted", "done", "failed", "cancelled")] == ["done", 3, 2, 1, 0]
