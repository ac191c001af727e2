"""Fair share's accounts: what a queue is charged for the slot-time its jobs used, with many jobs in
flight before the first result, a share changed while they run, jobs handed back unrun, and run
times no worker could have measured. Plain data and a fake clock."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.unit.test_projects import act, submit
from tests.unit.test_scheduler import CA, MON, OK, W1, Farm, job_rows
from zfarm import protocol as p
from zfarm.broker.state import Queue


def hundred_running(share: float = 1.0) -> tuple[Farm, list[list[Any]], Queue]:
    """A worker of 100 slots running the first 100 of project "long"'s 1,000 jobs."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), 0.0)
    farm.worker(W1, "w1", slots=100, credit=100)
    submit(farm, range(1, 1001), project="long", share=share)
    rows = job_rows(farm.out(0.0), W1)
    assert len(rows) == 100
    return farm, rows, farm.sched.farm.projects["long"]


def report(farm: Farm, row: list[Any], run_s: float, now: float) -> None:
    """w1 reports ``row``'s job done after ``run_s`` seconds, as a worker's RESULTS does."""
    stats = [[now - run_s, now, run_s, 0]]
    farm.send(W1, p.Results(0, [[row[0], row[1], row[2], OK, 1, ""]], [b"r"], stats), now)


def test_a_hundred_jobs_running_at_once_are_charged_the_slot_time_they_used() -> None:
    """Dispatched before any result (charged the first estimate, 1 s each), then each reports an
    hour: the queue pays 100 hours of slot-time, not one hour and 99 guesses."""
    farm, rows, queue = hundred_running()
    assert queue.pass_ == pytest.approx(100.0)  # 100 dispatches at the first estimate
    for row in rows:
        report(farm, row, 3600.0, 3600.0)
    assert queue.pass_ * queue.share == pytest.approx(100 * 3600.0)
    (shown,) = act(farm, "list", "", 3600.0).projects  # what `zfarm project list` shows
    assert shown["slot_s"] == pytest.approx(100 * 3600.0)


def test_a_share_changed_while_a_hundred_jobs_run_is_applied_to_their_run_time_not_their_charge() -> None:
    """Charged at share 1, then the share is set to 1e-6 and they report 0.01 s each: what each
    dispatch charged is taken back as it was, and 0.01 s over the new share is charged (a correction
    made with the new share would throw the pass a million seconds back per job)."""
    farm, rows, queue = hundred_running()
    before = queue.pass_
    assert act(farm, "set", "long", 1.0, share=1e-6).error == ""
    for row in rows:
        report(farm, row, 0.01, 2.0)
    assert queue.pass_ == pytest.approx(before + 100 * (0.01 / 1e-6 - 1.0))
    assert queue.pass_ > before


def test_jobs_handed_back_unrun_get_their_charge_back_and_lost_ones_keep_it() -> None:
    farm, rows, queue = hundred_running()
    assert queue.pass_ == pytest.approx(100.0)
    back = [[r[0], r[1], r[2], int(p.Outcome.RETURNED), 0, ""] for r in rows[50:]]
    farm.send(W1, p.Results(0, back, []), 1.0)  # it is leaving: 50 jobs it had not started
    assert queue.pass_ == pytest.approx(50.0)
    farm.send(W1, p.Disconnect("stopping"), 2.0)  # the 50 it ran: lost with it, charged the estimate
    assert queue.pass_ == pytest.approx(50.0)


@pytest.mark.parametrize("run_s", [math.nan, math.inf, -1.0, 1e8])
def test_a_run_time_no_worker_measured_is_refused_and_every_pass_stays_a_number(run_s: float) -> None:
    farm, rows, queue = hundred_running()
    with pytest.raises(p.ProtocolError, match="run time"):
        p.decode(p.encode(p.Results(0, [["ca", 1, 1, OK, 1, ""]], [b"r"], [[0.0, 1.0, run_s, 0]])))
    report(farm, rows[0], run_s, 1.0)
    assert farm.counter("malformed") == 1
    report(farm, rows[1], 2.0, 1.0)
    assert queue.pass_ == pytest.approx(100.0 + 2.0 - 1.0)
    assert farm.sched.farm.run_estimate_s == 2.0


@pytest.mark.parametrize("run_s", [math.nan, math.inf, -1.0])
def test_a_run_time_that_is_not_a_number_never_reaches_a_pass_or_an_estimate(run_s: float) -> None:
    """The protocol refuses it; the broker's accounts would ignore it anyway (the last guard)."""
    farm, rows, queue = hundred_running()
    job = farm.sched.clients["ca"].jobs[rows[0][1]]
    farm.sched.farm.ran(job, run_s)
    assert queue.pass_ == pytest.approx(100.0) and farm.sched.farm.run_estimate_s == 0.0


def test_a_result_with_a_nan_start_time_is_refused() -> None:
    with pytest.raises(p.ProtocolError, match="finite times"):
        p.decode(p.encode(p.Results(0, [["ca", 1, 1, OK, 1, ""]], [b"r"], [[math.nan, 1.0, 1.0, 0]])))
    stats = ["w", "h", 1, 0.0, 0.0, math.inf, 1.0, 0]
    with pytest.raises(p.ProtocolError, match="finite times"):
        p.decode(p.encode(p.Result([[1, OK, 1, "", 0]], [b"r"], [stats])))


def test_a_share_below_one_millionth_is_refused() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.send(MON, p.Hello("monitor", "m", "h", 3, 0, {}), 0.0)
    submit(farm, [1], project="tiny", share=1e-6)
    assert act(farm, "set", "tiny", 1.0, share=5e-324).error.startswith("a project's share is a number from")


def test_a_lone_queue_keeps_one_entry_in_the_dispatch_heap_however_many_jobs_pass() -> None:
    """One client's jobs, one at a time through one slot, each reporting more slot-time than it was
    charged: the heap of queues holds one entry throughout (replaced in place, its pass let lag), not
    a stale one left behind per result for the next dispatch to skip."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", slots=1, credit=1)
    heap = farm.sched.farm.active
    queue = farm.sched.farm.clients["ca"].own
    submit(farm, range(1, 51))
    sizes = []
    for step in range(50):
        (row,) = job_rows(farm.out(float(step)), W1)
        sizes.append(len(heap))
        farm.send(W1, p.Results(1, [[row[0], row[1], row[2], OK, 1, ""]], [b"r"],
                                [[step, step + 0.5, 0.5, 0]]), step + 0.5)
        sizes.append(len(heap))
    assert max(sizes) == 1
    assert queue.pass_ == pytest.approx(50 * 0.5)  # every job paid the slot-time it held


def test_queues_whose_passes_grew_by_their_results_still_take_turns_by_slot_time() -> None:
    """Two projects of equal share: "slow" jobs report 1 s, "fast" ones 0.1 s; through one slot the
    fast project gets about ten jobs for each slow one (the slow queue's heap entry lags behind its
    pass until it comes up, and is then put back where its pass says)."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", slots=1, credit=1)
    submit(farm, range(1, 101), project="slow")
    submit(farm, range(101, 301), project="fast", with_fn=False)
    ran = {"slow": 0, "fast": 0}
    for step in range(110):
        (row,) = job_rows(farm.out(float(step)), W1)
        name, run_s = ("slow", 1.0) if row[1] <= 100 else ("fast", 0.1)
        ran[name] += 1
        farm.send(W1, p.Results(1, [[row[0], row[1], row[2], OK, 1, ""]], [b"r"],
                                [[step, step + run_s, run_s, 0]]), step + 0.5)
    assert 8 <= ran["fast"] / ran["slow"] <= 12, ran
