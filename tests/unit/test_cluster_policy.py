"""The clusters' plain-data parts: restart back-off, adapt's decisions, the allocation's end."""

from __future__ import annotations

import pytest

from zfarm.cluster.adaptive import Adaptive
from zfarm.cluster.remote import allocation_end
from zfarm.cluster.supervision import Launched, Restarts, State
from zfarm.errors import ConfigError


def test_a_worker_dying_at_start_backs_off_doubling_then_is_given_up() -> None:
    restarts = Restarts(quick_death_s=10, first_backoff_s=1, max_backoff_s=4, max_quick_deaths=5)
    w = Launched("local-0", "localhost")
    waits = []
    now = 0.0
    while True:
        w.started_at = now
        restarts.ended(w, "exited with code 2", now + 0.5, wanted=True)
        if w.state is State.FAILED:
            break
        waits.append(w.restart_at - (now + 0.5))
        assert not restarts.due(w, w.restart_at - 0.01) and restarts.due(w, w.restart_at)
        now = w.restart_at
    assert waits == [1, 2, 4, 4]
    assert w.last_exit == "exited with code 2"


def test_a_worker_that_ran_a_while_starts_again_at_once_and_an_unwanted_one_stops() -> None:
    restarts = Restarts(quick_death_s=10)
    w = Launched("local-0", "localhost", started_at=100.0, quick_deaths=3)
    restarts.ended(w, "killed by signal 9 (SIGKILL)", 200.0, wanted=True)
    assert (w.state, w.restart_at, w.quick_deaths) == (State.WAITING, 200.0, 0)
    restarts.ended(w, "exited normally", 300.0, wanted=False)
    assert w.state is State.STOPPED


def snapshot(queued: int, in_flight: int, per_second: list[int] | None = None) -> dict[str, object]:
    return {"queued": queued, "in_flight": in_flight, "throughput": [*(per_second or []), 0]}


def test_adapt_wants_one_slot_per_job_before_it_knows_run_times_within_bounds() -> None:
    policy = Adaptive(minimum=1, maximum=10)
    assert policy.wanted(snapshot(0, 0), slots_per_worker=2) == 1
    assert policy.wanted(snapshot(5, 2), slots_per_worker=2) == 4
    assert policy.wanted(snapshot(500, 0), slots_per_worker=2) == 10


def test_adapt_counts_no_demand_for_jobs_no_connected_worker_could_hold() -> None:
    policy = Adaptive(minimum=0, maximum=10)
    assert policy.wanted({**snapshot(6, 0), "unschedulable": 6}, slots_per_worker=1) == 0
    assert policy.wanted({**snapshot(9, 1), "unschedulable": 6}, slots_per_worker=1) == 4


def test_adapt_uses_measured_run_times_to_size_for_the_target_duration() -> None:
    policy = Adaptive(minimum=0, maximum=100, target_duration_s=10)
    # 4 jobs in flight, 40 finished per second: each takes 0.1 s; 1004 jobs = 100.4 s of work
    assert policy.wanted(snapshot(1000, 4, [40] * 10), slots_per_worker=1) == 11


def test_adapt_grows_at_once_by_a_bounded_step_and_shrinks_only_after_a_steady_lull() -> None:
    policy = Adaptive(minimum=0, maximum=50, wait_count=3, max_step=8)
    assert policy.decide(snapshot(40, 0), 1, current=2) == 10
    assert policy.decide(snapshot(0, 0), 1, current=10) == 10
    assert policy.decide(snapshot(0, 0), 1, current=10) == 10
    assert policy.decide(snapshot(10, 0), 1, current=10) == 10  # demand came back: the lull starts over
    assert [policy.decide(snapshot(0, 0), 1, current=10) for _ in range(3)] == [10, 10, 2]


def test_adapt_refuses_impossible_bounds() -> None:
    with pytest.raises(ConfigError, match="minimum <= maximum"):
        Adaptive(minimum=5, maximum=2)


def test_the_allocation_end_comes_from_slurm_job_end_time() -> None:
    assert allocation_end({"SLURM_JOB_END_TIME": "1900000000"}) == 1900000000.0
    assert allocation_end({}) == 0.0
