"""The client's pure core, fake clock: batching, retries, back-pressure, lazy pirate, RECEIVED, sessions."""

from __future__ import annotations

import random
from typing import Any

import pytest

from zfarm import protocol as p
from zfarm.client.core import Actions, ClientCore, PendingJob
from zfarm.client.futures import JobFuture
from zfarm.client.receipts import RECEIVED_DELAY_S
from zfarm.client.waiting import BUSY_BATCH, BUSY_MIN_S
from zfarm.config import ClientSettings
from zfarm.errors import BrokerUnavailable, ConfigError, DependencyFailed, Refused
from zfarm.link import LinkState

FN = b"\xf1" * 16
OK, ERROR = p.Outcome.OK, p.Outcome.ERROR


class Owner:
    """What a future needs of the I/O thread (here: nothing happens on cancel)."""

    session = ""
    read_seqs: list[int] = []

    def cancel(self, seq: int) -> None:
        pass

    def accepted(self, seq: int) -> bool:
        return False


def make_core(**overrides: Any) -> ClientCore:
    settings = ClientSettings(**{"address": "tcp://127.0.0.1:5555", **overrides})
    return ClientCore(settings, "c-1", now=0.0, rng=random.Random(1))


def wire(msg: p.Message) -> p.Message:
    """What the other side gets after the message crossed the network."""
    return p.decode(p.encode(msg))


def sent(actions: Actions, kind: type[p.Message]) -> list[Any]:
    return [wire(m) for m in actions.send if isinstance(m, kind)]


def ready_core(now: float = 0.0, **overrides: Any) -> ClientCore:
    core = make_core(**overrides)
    core.connected(now)
    (hello,) = sent(core.flush(now), p.Hello)
    assert hello.role == "client" and hello.peer_id == "c-1"
    core.on_message(wire(p.Welcome("b-1", 1.0, 3, 1 << 30, {})), now)
    assert core.flush(now).welcomed
    return core


def jobs(*seqs: int, retries: int = 0) -> list[PendingJob]:
    return [PendingJob(seq, FN, [f"arg{seq}".encode()], JobFuture(Owner(), seq), 4, retries=retries)
            for seq in seqs]


def result(*rows: tuple[Any, ...]) -> p.Result:
    """RESULT rows from (seq, outcome, info) or (seq, outcome, info, kind)."""
    full = [(*row, p.ResultKind.PLAIN) if len(row) == 3 else row for row in rows]
    frames = [b"r%d" % seq for seq, outcome, *_ in full if outcome in (OK, ERROR)]
    return p.Result([p.ResultRow(seq, int(outcome), int(outcome in (OK, ERROR)), info, int(kind)).to_wire()
                     for seq, outcome, info, kind in full], frames)


def test_a_burst_of_jobs_waits_for_the_welcome_then_leaves_as_one_submit_with_its_function() -> None:
    core = make_core()
    core.submit(FN, b"fn-blob", jobs(1, 2), now=0.0)
    core.submit(FN, b"fn-blob", jobs(3), now=0.0)
    core.connected(0.0)
    assert sent(core.flush(0.0), p.Submit) == []  # HELLO only: no WELCOME yet
    core.on_message(wire(p.Welcome("b-1", 1.0, 3, 1 << 30, {})), 0.1)
    (submit,) = sent(core.flush(0.1), p.Submit)
    assert submit.with_fn and [row[0] for row in submit.jobs] == [1, 2, 3]
    assert submit.frames[0] == b"fn-blob" and len(submit.frames) == 4
    core.submit(FN, b"fn-blob", jobs(4), now=0.2)
    (again,) = sent(core.flush(0.2), p.Submit)
    assert not again.with_fn and [row[0] for row in again.jobs] == [4]  # the broker has the function


def test_results_settle_their_futures_once_and_are_acknowledged_in_one_received() -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1, 2, 3), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, OK, ""), (2, OK, ""))), 0.01)
    actions = core.flush(0.01)
    assert [job.seq for job, *_ in actions.settle] == [1, 2]
    assert sent(actions, p.Received) == []  # batched: not yet
    core.on_message(wire(result((1, OK, ""))), 0.02)  # the job ran twice: its second result is dropped
    assert core.flush(0.02).settle == [] and core.duplicates == 1
    (received,) = sent(core.flush(0.01 + RECEIVED_DELAY_S), p.Received)
    assert received.seqs == [1, 2, 1] and received.below == 3  # job 3 is still out


def test_a_silent_broker_means_a_new_socket_and_every_unfinished_job_again() -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1, 2), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, OK, ""))), 0.5)
    core.flush(0.5)
    assert core.flush(3.4).reconnect is False  # within liveness (1 s x 3), heartbeats go out
    actions = core.flush(3.6)
    assert actions.reconnect and core.live.state is LinkState.DOWN
    assert core.live.reconnect_at == pytest.approx(4.6)  # backoff 1 s, then 2, 4 ... 32
    assert core.wait_s(3.6) == pytest.approx(0.25)
    core.connected(4.6)
    assert sent(core.flush(4.6), p.Hello)
    core.on_message(wire(p.Welcome("b-2", 1.0, 3, 1 << 30, {})), 4.7)
    (submit,) = sent(core.flush(4.7), p.Submit)
    assert submit.with_fn and [row[0] for row in submit.jobs] == [2]  # the new broker may lack the function


def test_jobs_the_broker_has_no_room_for_go_back_in_small_batches_later() -> None:
    core = ready_core()
    seqs = list(range(1, 41))
    core.submit(FN, b"fn", jobs(*seqs), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result(*[(seq, p.Outcome.BUSY, "") for seq in seqs])), 0.1)
    assert sent(core.flush(0.1), p.Submit) == []  # not at once: the queue is full
    core.submit(FN, b"fn", jobs(41), now=0.11)  # a later job waits behind the bounced ones
    assert sent(core.flush(0.11), p.Submit) == []
    wait_s = core.wait_s(0.11)
    assert BUSY_MIN_S - 0.011 <= wait_s <= 1.5 * BUSY_MIN_S
    (first,) = sent(core.flush(0.11 + wait_s), p.Submit)
    assert [row[0] for row in first.jobs] == seqs[:BUSY_BATCH]
    assert sent(core.flush(0.11 + wait_s), p.Submit) == []  # the next batch after BUSY_MIN_S
    (second,) = sent(core.flush(0.11 + wait_s + BUSY_MIN_S), p.Submit)
    assert [row[0] for row in second.jobs] == seqs[BUSY_BATCH:2 * BUSY_BATCH]


def test_a_job_that_raised_runs_again_after_its_backoff_and_the_broker_drops_the_old_result_first() -> None:
    core = ready_core(retry_backoff_s=1.0)
    core.submit(FN, b"fn", jobs(1, retries=1), now=0.0)
    core.submit(FN, b"fn", jobs(2, retries=1), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, ERROR, "ValueError: bad luck"),
                                (2, ERROR, "zfarm.errors.JobTimeout: ran 2 s", p.ResultKind.LIMIT))), 0.1)
    actions = core.flush(0.1)
    assert [job.seq for job, *_ in actions.settle] == [2]  # a time-out (a LIMIT) is not retried
    assert sent(core.flush(1.05), p.Submit) == []
    actions = core.flush(1.1)
    (drop,) = [m for m in sent(actions, p.Received) if m.seqs == [1]]
    (rerun,) = sent(actions, p.Submit)
    assert actions.send.index(next(m for m in actions.send if isinstance(m, p.Submit))) > 0, "RECEIVED first"
    assert drop.seqs == [1] and [row[0] for row in rerun.jobs] == [1]
    core.on_message(wire(result((1, ERROR, "ValueError: bad luck again"))), 1.2)
    assert [job.seq for job, *_ in core.flush(1.2).settle] == [1]  # no retries left: it fails


def test_a_function_the_broker_let_go_is_sent_again_with_its_job() -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, p.Outcome.LOST, "", p.ResultKind.FUNCTION_MISSING))), 0.1)
    (submit,) = sent(core.flush(0.1), p.Submit)
    assert submit.with_fn and [row[0] for row in submit.jobs] == [1]


def test_jobs_fail_with_broker_unavailable_once_it_was_silent_for_broker_timeout() -> None:
    core = make_core(broker_timeout_s=5.0)
    core.submit(FN, b"fn", jobs(1), now=0.0)
    core.connected(0.0)
    core.flush(0.0)
    assert core.flush(4.9).fail == []
    (job, error), = core.flush(5.1).fail
    assert job.seq == 1 and isinstance(error, BrokerUnavailable)


def test_during_an_outage_each_job_fails_broker_timeout_after_its_own_submission_oldest_first() -> None:
    core = make_core(broker_timeout_s=5.0)
    core.connected(0.0)
    core.flush(0.0)
    for seq in range(1, 5):  # submitted one a second while the broker says nothing
        core.submit(FN, b"fn", jobs(seq), now=float(seq))
        core.flush(float(seq))
    assert core.flush(5.9).fail == []
    assert [job.seq for job, _ in core.flush(7.1).fail] == [1, 2]
    assert core.flush(7.9).fail == []
    assert [job.seq for job, _ in core.flush(9.1).fail] == [3, 4]
    assert not core.jobs


def test_a_refusal_fails_every_job_and_stops() -> None:
    core = make_core()
    core.submit(FN, b"fn", jobs(1), now=0.0)
    core.connected(0.0)
    core.on_message(wire(p.Refused("protocol version 2 is not served")), 0.1)
    actions = core.flush(0.1)
    assert isinstance(actions.fatal, Refused) and core.stopping
    assert [job.seq for job, _ in actions.fail] == [1]


def test_leaving_a_session_waits_until_the_broker_holds_every_job() -> None:
    core = ready_core(session="nightly")
    core.submit(FN, b"fn", jobs(1, 2), now=0.0)
    core.leave_by(10.0, now=0.0)
    assert not core.stopping
    core.flush(0.0)
    core.on_message(wire(p.Accepted([1])), 0.1)
    core.flush(0.1)
    assert not core.stopping  # job 2 is not held yet
    core.on_message(wire(p.Accepted([2])), 0.2)
    core.flush(0.2)
    assert core.stopping
    actions, reason = core.goodbye(0.2)
    assert reason == "client closed" and [job.seq for job in actions.cancel] == [1, 2]


def test_a_session_that_never_hears_the_broker_leaves_at_its_deadline() -> None:
    core = make_core(session="nightly")
    core.submit(FN, b"fn", jobs(1), now=0.0)
    core.stop(end_session=True, now=0.0)  # the broker must hear it: wait for it a while
    assert not core.stopping
    core.flush(5.0)
    assert not core.stopping
    core.flush(10.5)
    assert core.stopping
    _, reason = core.goodbye(10.5)
    assert reason == ""  # nobody to say goodbye to


def test_a_session_releases_only_the_results_its_program_read_at_a_clean_close() -> None:
    core = ready_core(session="nightly")
    core.submit(FN, b"fn", jobs(1, 2), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, OK, ""), (2, OK, ""))), 0.1)
    assert sent(core.flush(1.0), p.Received) == []  # a session keeps its results at the broker
    core.receipts.read_seqs.append(2)
    core.stop(end_session=False, now=1.0)
    actions, reason = core.goodbye(1.0)
    (received,) = sent(actions, p.Received)
    assert received.seqs == [2] and received.below == 0 and reason == "client closed"


def test_cancels_leave_as_one_message() -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1, 2, 3), now=0.0)
    core.flush(0.0)
    core.cancel(1)
    core.cancel(3)
    (cancel,) = sent(core.flush(0.1), p.Cancel)
    assert cancel.seqs == [1, 3] and set(core.jobs) == {2}


def test_the_kind_decides_not_the_text() -> None:
    core = ready_core(retry_backoff_s=1.0)
    core.submit(FN, b"fn", jobs(1, 2, retries=1), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, p.Outcome.LOST, p.FUNCTION_MISSING),  # a job's own text, PLAIN: it ended
                                (2, ERROR, "zfarm.errors.JobTimeout: said by the job itself"))), 0.1)
    actions = core.flush(0.1)
    assert [job.seq for job, *_ in actions.settle] == [1]  # not sent again as if its function were missing
    assert 2 in core.jobs  # a PLAIN error is retried whatever its text says


def test_a_failure_that_suspended_its_project_is_not_retried_and_warns(
        caplog: pytest.LogCaptureFixture) -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1, retries=3), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, ERROR, "ValueError: bad", p.ResultKind.PROJECT_SUSPENDED))), 0.1)
    assert [job.seq for job, *_ in core.flush(0.1).settle] == [1]
    assert "suspended its project" in caplog.text


def test_a_notice_is_logged_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1, 2), now=0.0)
    core.flush(0.0)
    for seq in (1, 2):
        core.on_message(wire(p.Notice(p.NoticeKind.UNSCHEDULABLE, [seq], "no worker has gpus=4")), 0.1)
    assert caplog.text.count("can run on no connected worker") == 1 and "gpus=4" in caplog.text
    assert set(core.jobs) == {1, 2}  # a warning only: the jobs wait on


def test_a_dependency_failed_row_fails_the_future_with_dependency_failed() -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1), now=0.0)
    core.flush(0.0)
    failed = (1, p.Outcome.LOST, "c-1:7: it raised", p.ResultKind.DEPENDENCY_FAILED)
    core.on_message(wire(result(failed)), 0.1)
    actions = core.flush(0.1)
    ((job, error),) = actions.fail
    assert actions.settle == [] and job.seq == 1
    assert isinstance(error, DependencyFailed) and error.upstream == "c-1:7" and error.detail == "it raised"
    assert str(error) == ("job c-1:1 did not run: its upstream job c-1:7 did not succeed (it raised); "
                          "fix or rerun c-1:7 first")


def test_a_pinned_result_is_not_acknowledged_until_its_dependent_job_is_over() -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1, 2), now=0.0)
    core.flush(0.0)
    core.pin(1)  # job 3 takes job 1's future as an argument
    (dependent,) = jobs(3)
    dependent.options = {"after": [1]}
    core.submit(FN, b"fn", [dependent], now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, OK, ""), (2, OK, ""))), 0.1)
    assert len(core.take_ended().settle) == 2  # settled before the flush that may acknowledge them
    (received,) = sent(core.flush(0.1 + RECEIVED_DELAY_S), p.Received)
    assert received.seqs == [2] and received.below == 1  # job 1's result stays held for job 3
    assert core.wait_s(0.2) > 0  # a pinned result is not a RECEIVED always due (no busy loop)
    core.on_message(wire(result((3, OK, ""))), 0.3)
    core.flush(0.3)
    (received,) = sent(core.flush(0.3 + 2 * RECEIVED_DELAY_S), p.Received)
    assert sorted(received.seqs) == [1, 3] and received.below == 4


def test_a_job_refused_for_its_options_fails_with_a_config_error_not_a_lost_worker() -> None:
    core = ready_core()
    core.submit(FN, b"fn", jobs(1), now=0.0)
    core.flush(0.0)
    core.on_message(wire(result((1, p.Outcome.LOST, "bad priority", p.ResultKind.REFUSED))), 0.1)
    ((job, error),) = core.flush(0.1).fail
    assert job.seq == 1 and isinstance(error, ConfigError) and "bad priority" in str(error)


def test_the_records_of_results_leave_with_their_futures() -> None:
    """A program woken by its last future must find that job's record in stats()."""
    core = ready_core()
    core.submit(FN, b"fn", jobs(1, 2), now=0.0)
    core.flush(0.0)
    at = [1.0, 1.0, 1.0]
    stats = [p.JobStats("w-1", "h", 1, *at, 0.5, 0).to_wire()] * 2
    msg = result((1, OK, ""), (2, OK, ""))
    core.on_message(wire(p.Result(msg.results, msg.frames, stats)), 0.01)
    ended = core.take_ended()
    assert [job.seq for job, *_ in ended.settle] == [1, 2]
    assert [record.id for record in ended.records] == [f"{core.client_id}:1", f"{core.client_id}:2"]
