"""No idle slot while work waits: the broker takes back prefetched jobs when a slot is idle elsewhere.

The scheduler driven as in ``test_scheduler``: encoded frames in, messages out, a fake clock.
"""

from __future__ import annotations

from tests.unit.test_scheduler import CA, W1, W2, W3, Farm, job_rows, job_seqs, result_rows, to
from zfarm import protocol as p
from zfarm.broker.farm import FIRST_ESTIMATE_S

RETURNED = int(p.Outcome.RETURNED)


def two_on_w1_then_w2(jobs: int = 2, started: bool = True) -> tuple[Farm, list[list[object]]]:
    """w1 (one slot, prefetch) takes ``jobs`` jobs alone, says the first runs (if ``started``); then
    w2 (one slot) joins with credit. Returns the farm and w1's JOBS rows; nothing flushed since."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=jobs, slots=1)
    farm.submit(CA, list(range(1, jobs + 1)), 0.0)
    rows = job_rows(farm.out(0.0), W1)
    assert [r[1] for r in rows] == list(range(1, jobs + 1))
    if started:
        farm.send(W1, p.Started([["ca", 1]]), 0.02)
    assert not to(farm.out(0.02), W1, p.Reclaim)  # nothing idle: nothing asked back
    farm.worker(W2, "w2", 0.5, credit=2, slots=1)
    return farm, rows


def returned(farm: Farm, route: bytes, row: list[object], now: float) -> None:
    """The worker gives a job back unrun, with its credit."""
    farm.send(route, p.Results(1, [[row[0], row[1], row[2], RETURNED, 0, ""]], []), now)


def test_a_job_prefetched_behind_a_long_one_is_asked_back_and_goes_to_the_idle_slot() -> None:
    farm, rows = two_on_w1_then_w2()
    out = farm.out(0.5)
    (reclaim,) = to(out, W1, p.Reclaim)
    assert reclaim.keys == [["ca", 2]]
    assert not job_rows(out, W2)  # nothing queued for it until w1 gives the job back
    returned(farm, W1, rows[1], 0.6)
    out = farm.out(0.6)
    assert job_seqs(out, W2) == [2] and job_rows(out, W2)[0][2] == 2  # its second attempt
    assert not job_rows(out, W1)  # not back where it came from, though w1 has credit again
    assert farm.counter("requeued") == 1


def test_the_newest_held_job_is_asked_back_one_per_idle_slot_once() -> None:
    farm, _ = two_on_w1_then_w2(jobs=3)
    out = farm.out(0.5)
    assert [m.keys for m in to(out, W1, p.Reclaim)] == [[["ca", 3]]]  # one idle slot: one job, the newest
    farm.send(W1, p.Heartbeat(), 0.7)
    farm.send(W2, p.Heartbeat(), 0.7)
    assert not to(farm.out(0.7), W1, p.Reclaim)  # not asked again, nor another for the same slot


def test_a_job_behind_one_that_may_be_short_is_not_asked_back_until_that_one_runs_long() -> None:
    farm, _ = two_on_w1_then_w2(started=False)
    assert not to(farm.out(0.5), W1, p.Reclaim)  # job 1 may end in a moment: job 2 is next anyway
    farm.send(W1, p.Started([["ca", 1]]), 0.6)
    assert [m.keys for m in to(farm.out(0.6), W1, p.Reclaim)] == [[["ca", 2]]]


def test_no_job_is_asked_back_while_no_slot_is_idle() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=2, slots=1)
    farm.worker(W2, "w2", credit=2, slots=1)
    farm.submit(CA, [1, 2, 3, 4], 0.0)
    out = farm.out(0.0)
    assert sorted(job_seqs(out, W1) + job_seqs(out, W2)) == [1, 2, 3, 4]
    farm.send(W1, p.Started([[r[0], r[1]] for r in job_rows(out, W1)]), 0.1)
    farm.send(W2, p.Started([[r[0], r[1]] for r in job_rows(out, W2)]), 0.1)
    assert not [m for _, m in farm.out(0.1) if isinstance(m, p.Reclaim)]


def test_a_job_that_started_before_the_reclaim_reached_its_worker_is_delivered_once() -> None:
    farm, rows = two_on_w1_then_w2()
    assert to(farm.out(0.5), W1, p.Reclaim)
    # w1's first job ended and its slot took job 2 before the RECLAIM arrived: both results come
    farm.result(W1, rows[0], 0.6)
    farm.send(W1, p.Started([["ca", 2]]), 0.65)
    out = farm.out(0.65)
    assert not to(out, W1, p.Reclaim) and not job_rows(out, W2)
    farm.result(W1, rows[1], 0.7)
    farm.result(W1, rows[1], 0.71)  # a duplicate: dropped
    out = farm.out(0.7)
    assert [row[0] for row, _ in result_rows(out, CA)] == [2]
    assert not result_rows(farm.out(0.8), CA)
    assert farm.counter("done") == 2 and farm.counter("requeued") == 0
    assert not farm.sched.workers["w1"].reclaiming


def test_a_result_for_a_job_being_asked_back_ends_it_once_and_a_late_return_is_ignored() -> None:
    farm, rows = two_on_w1_then_w2()
    assert to(farm.out(0.5), W1, p.Reclaim)
    farm.result(W1, rows[1], 0.6)  # job 2 ran and ended before the RECLAIM came
    assert [row[0] for row, _ in result_rows(farm.out(0.6), CA)] == [2]
    assert not farm.sched.workers["w1"].reclaiming
    returned(farm, W1, rows[1], 0.7)  # (a worker never does both; if it did, it is a late answer)
    out = farm.out(0.7)
    assert not job_rows(out, W2) and not result_rows(out, CA)
    assert farm.counter("done") == 1


def test_a_job_prefetched_behind_one_that_followed_a_quick_one_is_asked_back() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=3, slots=1)
    farm.submit(CA, [1, 2, 3], 0.0)
    rows = job_rows(farm.out(0.0), W1)
    farm.result(W1, rows[0], 0.01, credit=0)  # job 1 quick; job 2 starts and runs long
    farm.send(W1, p.Started([["ca", 2]]), 0.05)
    farm.worker(W2, "w2", 0.5, credit=1, slots=1)
    assert [m.keys for m in to(farm.out(0.5), W1, p.Reclaim)] == [[["ca", 3]]]
    returned(farm, W1, rows[2], 0.6)
    assert job_seqs(farm.out(0.6), W2) == [3]


def test_an_unsent_prefetched_job_is_taken_back_at_once_for_an_idle_slot() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=2, slots=1)
    farm.submit(CA, [1, 2], 0.0)
    farm.sched.placement.dispatch(0.0)  # both given to w1, not sent yet
    farm.worker(W2, "w2", 0.0, credit=1, slots=1)
    out = farm.out(0.0)
    assert job_seqs(out, W1) == [1] and job_seqs(out, W2) == [2]
    assert not to(out, W1, p.Reclaim)
    assert farm.sched.workers["w1"].credit == 1  # the job it never got left its credit with it
    assert farm.counter("requeued") == 1
    # fair share: job 2 held no slot on w1, so its queue is charged for it once (a second each), not twice
    assert farm.sched.clients["ca"].own.pass_ == 2 * FIRST_ESTIMATE_S


def test_an_asked_back_job_goes_only_where_it_fits() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.send(W1, p.Hello("worker", "w1", "node", 100, 1, {"tags": ["gpu"]}), 0.0)
    farm.send(W1, p.Ready(2), 0.0)
    farm.submit(CA, [1, 2], 0.0, options={"tags": ["gpu"]})
    assert job_seqs(farm.out(0.0), W1) == [1, 2]
    farm.send(W1, p.Started([["ca", 1]]), 0.1)
    farm.worker(W2, "w2", 0.5, credit=1, slots=1)  # no gpu tag: job 2 cannot run there
    assert not to(farm.out(0.5), W1, p.Reclaim)
    farm.send(W3, p.Hello("worker", "w3", "node", 100, 1, {"tags": ["gpu"]}), 0.6)
    farm.send(W3, p.Ready(1), 0.6)
    assert [m.keys for m in to(farm.out(0.6), W1, p.Reclaim)] == [[["ca", 2]]]


def test_results_still_reach_the_client_when_a_reclaimed_job_is_returned_and_run_elsewhere() -> None:
    farm, rows = two_on_w1_then_w2()
    farm.out(0.5)
    returned(farm, W1, rows[1], 0.6)
    (row2,) = job_rows(farm.out(0.6), W2)
    farm.result(W2, row2, 0.7)
    farm.result(W1, rows[0], 0.8)
    assert sorted(row[0] for row, _ in result_rows(farm.out(0.8), CA)) == [1, 2]
    assert farm.counter("done") == 2 and farm.counter("late_results") == 0
