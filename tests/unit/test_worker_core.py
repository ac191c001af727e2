"""The worker's pure core: handshake, credit, cancel, heartbeats and backoff, with a fake clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zfarm import protocol as p
from zfarm.broker.scheduler import Scheduler
from zfarm.config import BrokerSettings, WorkerSettings
from zfarm.errors import Refused
from zfarm.link import Checked, LinkState, Liveness
from zfarm.worker.chaperone import SlotOutcome
from zfarm.worker.core import Actions, WorkerCore

FN = b"\xf1" * 16
OK = p.Outcome.OK


def make_core(**overrides: Any) -> WorkerCore:
    settings = WorkerSettings(**{"procs": 2, "prefetch": 1, "worker_id": "w-test", **overrides})
    return WorkerCore(settings, now=0.0, host="h", pid=1)


def welcome(interval_s: float = 1.0, liveness: int = 3) -> p.Welcome:
    return p.Welcome("b-1", interval_s, liveness, 1 << 30, {})


def wire(msg: p.Message) -> p.Message:
    """What the core gets after the message crossed the network."""
    return p.decode(p.encode(msg))


def jobs(seqs: list[int], with_fn: bool = True, client: str = "c") -> p.Jobs:
    rows = [[client, seq, 1, FN, 1, {}] for seq in seqs]
    frames = ([b"fn-blob"] if with_fn else []) + [f"arg{seq}".encode() for seq in seqs]
    return p.Jobs([FN] if with_fn else [], rows, frames)


def ready_core(now: float = 0.0, **overrides: Any) -> WorkerCore:
    core = make_core(**overrides)
    core.connect(now)
    core.on_message(wire(welcome()), now)
    return core


def only(actions: Actions, kind: type[p.Message]) -> Any:
    assert len(actions.send) == 1, actions
    (msg,) = actions.send
    assert isinstance(msg, kind), msg
    return wire(msg)  # whatever the core sends must survive the wire


def outcome(seq: int, result: bytes = b"r", client: str = "c", kind: p.Outcome = OK) -> SlotOutcome:
    return SlotOutcome((client, seq), 1, kind, [result] if kind in (OK, p.Outcome.ERROR) else [], "")


# ---- handshake -----------------------------------------------------------------------------------


def test_connect_says_hello() -> None:
    core = make_core()
    hello = only(core.connect(0.0), p.Hello)
    assert (hello.role, hello.peer_id, hello.host, hello.pid, hello.slots) == ("worker", "w-test", "h", 1, 2)
    assert hello.info.get("prefetch") == 1
    assert core.live.state is LinkState.CONNECTING


def test_generated_worker_id_is_stable_and_distinct() -> None:
    a, b = make_core(worker_id=""), make_core(worker_id="")
    assert a.id and b.id and a.id != b.id
    assert only(a.connect(0.0), p.Hello).peer_id == a.id


def test_welcome_gets_ready_with_slots_plus_prefetch_and_adopts_the_broker_settings() -> None:
    core = make_core()
    core.connect(0.0)
    ready = only(core.on_message(wire(welcome(interval_s=0.25, liveness=5)), 0.1), p.Ready)
    assert ready.credit == 3
    assert core.live.state is LinkState.READY
    assert (core.live.interval_s, core.live.liveness, core.broker_id) == (0.25, 5, "b-1")


def test_refused_raises() -> None:
    core = make_core()
    core.connect(0.0)
    with pytest.raises(Refused, match="version 9"):
        core.on_message(wire(p.Refused("protocol version 9")), 0.1)


# ---- jobs and credit -----------------------------------------------------------------------------


def test_jobs_are_handed_out_no_more_than_free_slots() -> None:
    core = ready_core()
    assert core.on_message(wire(jobs([0, 1, 2])), 0.1).send == []
    first = core.take_tasks(2, 0.1)
    assert [t.key for t in first] == [("c", 0), ("c", 1)]
    assert all(t.fn_id == FN and t.fn_blob == b"fn-blob" for t in first)
    assert [t.frames for t in first] == [[b"arg0"], [b"arg1"]]
    assert first[0].attempt == 1
    assert core.take_tasks(0, 0.1) == []
    assert [t.key for t in core.take_tasks(5, 0.1)] == [("c", 2)]
    assert core.take_tasks(5, 0.1) == []
    assert (core.running, len(core.pending)) == (3, 0)


def test_function_is_kept_for_later_jobs() -> None:
    core = ready_core()
    core.on_message(wire(jobs([0])), 0.1)
    core.on_message(wire(jobs([1], with_fn=False)), 0.2)
    tasks = core.take_tasks(2, 0.2)
    assert [t.fn_blob for t in tasks] == [b"fn-blob", b"fn-blob"]
    assert [t.frames for t in tasks] == [[b"arg0"], [b"arg1"]]


def test_finished_jobs_are_reported_with_their_credit() -> None:
    core = ready_core()
    core.on_message(wire(jobs([0, 1, 2])), 0.1)
    core.take_tasks(2, 0.1)
    big = bytearray(b"result-one")
    results = only(core.finished([outcome(0, big), outcome(1, b"e", kind=p.Outcome.ERROR)], 0.5,
                                 from_slots=2), p.Results)
    assert results.credit == 2
    assert results.results == [["c", 0, 1, int(OK), 1, ""], ["c", 1, 1, int(p.Outcome.ERROR), 1, ""]]
    assert results.frames == [big, b"e"]
    assert core.running == 0 and len(core.pending) == 1
    assert core.finished([], 0.6, from_slots=0).send == []


def test_cancel_of_a_pending_job_answers_cancelled_and_of_a_running_one_asks_for_a_kill() -> None:
    core = ready_core()
    core.on_message(wire(jobs([0, 1, 2])), 0.1)
    core.take_tasks(1, 0.1)  # job 0 runs; 1 and 2 wait
    actions = core.on_message(wire(p.CancelJobs([["c", 0], ["c", 2]])), 0.2)
    results = only(actions, p.Results)
    assert results.results == [["c", 2, 1, int(p.Outcome.CANCELLED), 0, ""]]
    assert results.credit == 1
    assert actions.kill == [("c", 0)]
    assert [t.key for t in core.take_tasks(5, 0.2)] == [("c", 1)]


def test_reclaim_gives_back_waiting_jobs_with_their_credit_and_lets_running_ones_run() -> None:
    core = ready_core()
    core.on_message(wire(jobs([0, 1, 2])), 0.1)
    core.take_tasks(1, 0.1)  # job 0 runs; 1 and 2 wait
    actions = core.on_message(wire(p.Reclaim([["c", 0], ["c", 2]])), 0.2)
    results = only(actions, p.Results)
    assert results.results == [["c", 2, 1, int(p.Outcome.RETURNED), 0, ""]]
    assert results.credit == 1  # the broker may use it again, where no slot is free elsewhere
    assert actions.kill == []  # job 0 runs on: its result comes as usual
    assert [t.key for t in core.take_tasks(5, 0.2)] == [("c", 1)]
    assert core.on_message(wire(p.Reclaim([["c", 1]])), 0.3).send == []  # started: nothing to give back


def test_cancel_of_unknown_jobs_sends_nothing() -> None:
    core = ready_core()
    actions = core.on_message(wire(p.CancelJobs([["c", 9]])), 0.2)
    assert actions.send == []
    # the shell asks its pool, which does not have it either: no harm either way
    assert actions.kill == [("c", 9)]  # the core cannot know; the shell's pool finds nothing to kill


# ---- heartbeats and reconnects -------------------------------------------------------------------


def test_heartbeat_after_an_interval_of_quiet() -> None:
    core = ready_core(now=0.0)
    assert core.tick(0.5).send == []
    assert only(core.tick(1.0), p.Heartbeat) == p.Heartbeat()
    assert core.tick(1.5).send == []
    core.on_message(wire(p.Heartbeat()), 1.6)
    core.finished([], 1.7)
    assert only(core.tick(2.0), p.Heartbeat) == p.Heartbeat()


def test_sending_results_counts_as_not_quiet() -> None:
    core = ready_core(now=0.0)
    core.on_message(wire(jobs([0])), 0.1)
    core.take_tasks(1, 0.1)
    core.finished([outcome(0)], 0.8, from_slots=1)
    assert core.tick(1.0).send == []
    assert only(core.tick(1.8), p.Heartbeat) == p.Heartbeat()


def test_liveness_check_says_heartbeat_when_quiet_and_drops_a_silent_or_unanswered_link() -> None:
    live = Liveness(1.0, 3, 1.0, 32.0, now=0.0)
    assert live.check(10.0) is Checked.NOTHING  # down: waits for its reconnect, never expires
    live.connecting(10.0)
    assert live.check(12.0) is Checked.NOTHING  # no heartbeat before WELCOME
    assert live.check(13.5) is Checked.UNANSWERED and live.state is LinkState.DOWN
    assert live.reconnect_at == 14.5 and live.backoff_s == 2.0
    live.connecting(14.5)
    live.welcomed(1.0, 3)
    live.sent(14.5)
    assert live.check(15.0) is Checked.NOTHING
    assert live.check(15.5) is Checked.HEARTBEAT
    assert live.check(17.6) is Checked.SILENT and live.state is LinkState.DOWN
    assert live.check(17.7) is Checked.NOTHING


def test_no_heartbeat_before_welcome() -> None:
    core = make_core()
    core.connect(0.0)
    assert core.tick(1.5).send == []


def test_silent_broker_means_reconnect_with_doubling_backoff_capped() -> None:
    core = ready_core(now=0.0)
    core.on_message(wire(p.Heartbeat()), 0.0)
    assert core.tick(2.9).reconnect is False  # 2.9 s of silence < 3 intervals
    now = 3.5
    delays = []
    for _ in range(8):
        actions = core.tick(now)
        assert actions.reconnect is True and actions.send == []
        assert core.live.state is LinkState.DOWN
        delays.append(core.live.reconnect_at - now)
        assert core.tick(now + 0.1).reconnect is False  # down: nothing to do until reconnect_at
        now = core.live.reconnect_at
        only(core.connect(now), p.Hello)  # no WELCOME comes back
        now += 3.5
    assert delays == pytest.approx([1, 2, 4, 8, 16, 32, 32, 32])


def test_welcome_resets_the_backoff() -> None:
    core = ready_core(now=0.0)
    now = 3.5
    for _ in range(3):
        assert core.tick(now).reconnect
        now = core.live.reconnect_at
        core.connect(now)
        now += 3.5
    assert core.tick(now).reconnect
    assert core.live.reconnect_at - now == pytest.approx(8)
    core.connect(core.live.reconnect_at)
    core.on_message(wire(welcome()), core.live.reconnect_at + 0.1)
    now = core.live.reconnect_at + 5.0
    assert core.tick(now).reconnect
    assert core.live.reconnect_at - now == pytest.approx(1)


def test_reconnect_message_says_hello_again() -> None:
    core = ready_core()
    hello = only(core.on_message(wire(p.Reconnect("broker restarted")), 1.0), p.Hello)
    assert hello.peer_id == "w-test" and hello.slots == 2
    assert core.live.state is LinkState.CONNECTING
    ready = only(core.on_message(wire(welcome()), 1.1), p.Ready)
    assert ready.credit == 3


def test_broker_disconnect_drops_the_link() -> None:
    core = ready_core()
    actions = core.on_message(wire(p.Disconnect("broker stopping")), 1.0)
    assert actions.reconnect is True
    assert core.live.state is LinkState.DOWN and core.live.reconnect_at == pytest.approx(2.0)


# ---- stopping and results across reconnects -------------------------------------------------------


def test_stop_hands_back_pending_jobs_with_no_credit() -> None:
    core = ready_core()
    core.on_message(wire(jobs([0, 1, 2])), 0.1)
    core.take_tasks(1, 0.1)
    results = only(core.stop(0.2), p.Results)
    assert results.credit == 0
    assert results.results == [["c", 1, 1, int(p.Outcome.RETURNED), 0, ""],
                               ["c", 2, 1, int(p.Outcome.RETURNED), 0, ""]]
    assert core.take_tasks(5, 0.2) == []
    assert core.stop(0.3).send == []  # a second stop changes nothing
    # jobs that still arrive go straight back, and the running one reports without credit
    late = only(core.on_message(wire(jobs([3], with_fn=False)), 0.4), p.Results)
    assert (late.credit, late.results) == (0, [["c", 3, 1, int(p.Outcome.RETURNED), 0, ""]])
    done = only(core.finished([outcome(0)], 0.5, from_slots=1), p.Results)
    assert done.credit == 0 and done.results[0][:4] == ["c", 0, 1, int(OK)]
    assert core.running == 0
    assert only(core.goodbye(0.6), p.Disconnect).reason


def test_results_finished_while_disconnected_are_sent_after_the_next_welcome() -> None:
    core = ready_core()
    core.on_message(wire(jobs([0, 1, 2])), 0.1)
    core.take_tasks(2, 0.1)  # 0 and 1 run, 2 waits
    assert core.tick(3.5).reconnect  # the broker went quiet
    assert core.finished([outcome(0, b"kept")], 3.6, from_slots=1).send == []
    core.connect(4.5)
    actions = core.on_message(wire(welcome()), 4.6)
    assert len(actions.send) == 2
    results, ready = (wire(m) for m in actions.send)  # results first: the broker reads them before it
    assert isinstance(ready, p.Ready) and isinstance(results, p.Results)  # could hand the jobs out again
    assert ready.credit == 3 - 2  # capacity 3, in hand: job 1 running and job 2 waiting
    assert results.credit == 0  # the new READY already counts these slots
    assert results.results == [["c", 0, 1, int(OK), 1, ""]]
    assert results.frames == [b"kept"]
    # once the broker has used credit offered after them, they are sent no more
    core.on_message(wire(jobs([3], with_fn=False)), 4.7)
    assert only(core.on_message(wire(welcome()), 4.8), p.Ready).credit == 0


def test_ready_after_a_welcome_while_stopping_offers_no_credit() -> None:
    core = ready_core()
    core.stop(0.1)
    assert only(core.on_message(wire(p.Reconnect("restarted")), 0.2), p.Hello)
    assert only(core.on_message(wire(welcome()), 0.3), p.Ready).credit == 0


def test_tiny_jobs_widen_the_credit_and_a_long_one_gives_the_burst_back() -> None:
    from zfarm.worker.core import BURST_HANDBACK_S, BURST_PREFETCH

    core = ready_core(procs=1, prefetch=1)  # READY 2
    offered, sent = 2, 0
    for step in range(4):  # tiny jobs, one at a time
        core.on_message(wire(jobs([sent], with_fn=sent == 0)), float(step))
        sent += 1
        (task,) = core.take_tasks(1, float(step))
        done = SlotOutcome(task.key, task.attempt, OK, [b"r"], run_s=0.0001)
        offered += only(core.finished([done], float(step), from_slots=1), p.Results).credit
    burst = 1 + BURST_PREFETCH
    assert core.capacity == burst and offered - sent == burst  # the broker may send a burst now
    core.on_message(wire(jobs(list(range(sent, sent + burst)))), 10.0)
    core.take_tasks(1, 10.0)  # the first runs, the others wait behind it
    assert core.hand_back_burst(10.0 + BURST_HANDBACK_S / 2).send == []  # not long yet
    only(core.report_started(10.0 + BURST_HANDBACK_S / 2), p.Started)
    assert core.next_report_at() == pytest.approx(10.0 + BURST_HANDBACK_S)
    back = only(core.hand_back_burst(10.0 + BURST_HANDBACK_S), p.Results)
    assert [row[3] for row in back.results] == [int(p.Outcome.RETURNED)] * (burst - 2)
    assert [row[1] for row in back.results] == list(range(sent + 2, sent + burst))  # the newest go back
    assert back.credit == 0 and core.capacity == 2 and len(core.pending) == 1  # the usual prefetch stays


def test_short_jobs_keep_a_job_ready_for_every_slot_and_a_long_one_gives_the_extra_back() -> None:
    """Jobs of 10 ms on two slots with prefetch 1: two slots that free at once both find a job here."""
    from zfarm.worker.core import BURST_HANDBACK_S

    core = ready_core(procs=2, prefetch=1)  # READY 3
    core.on_message(wire(jobs([0, 1, 2])), 0.0)
    done = [SlotOutcome(t.key, t.attempt, OK, [b"r"], run_s=0.01) for t in core.take_tasks(2, 0.0)]
    results = only(core.finished(done, 0.01, from_slots=2), p.Results)
    assert core.capacity == 4 and results.credit == 3  # the two reported, and one more ready
    core.on_message(wire(jobs([3, 4, 5], with_fn=False)), 0.02)
    core.take_tasks(2, 0.02)
    assert len(core.pending) == 2  # one ready for each busy slot
    back = only(core.hand_back_burst(0.02 + BURST_HANDBACK_S), p.Results)  # a job runs long
    assert [row[1] for row in back.results] == [5] and back.credit == 0
    assert core.capacity == 3 and len(core.pending) == 1  # the usual prefetch again


def test_credit_outstanding_plus_jobs_in_hand_is_always_the_capacity() -> None:
    """However jobs arrive and finish, credit offered and not used plus jobs held equals slots + prefetch."""
    core = ready_core()
    offered = 3  # the READY of the handshake
    sent = 0  # jobs the broker sent, never more than offered
    running: list[Any] = []
    for step in range(60):
        now = 0.1 * (step + 1)
        unused = offered - sent
        if unused > 0:
            count = 1 + step % unused
            core.on_message(wire(jobs(list(range(sent, sent + count)), with_fn=sent == 0)), now)
            sent += count
        running.extend(core.take_tasks(2 - core.running, now))
        assert core.running == len(running) <= 2
        finishing, running = running[: step % 3], running[step % 3:]
        if finishing:
            done = [SlotOutcome(t.key, t.attempt, OK, [b"r"]) for t in finishing]
            offered += only(core.finished(done, now, from_slots=len(done)), p.Results).credit
        assert (offered - sent) + core.in_hand == core.capacity == 3
    assert sent > 20


# ---- the worker core against the broker core (no sockets: frames passed by hand) ------------------


class Wire:
    """A worker core and a scheduler, with the frames between them carried by hand, in order."""

    ROUTE = b"\x00worker-route"
    CLIENT = b"\x00client-route"

    def __init__(self, core: WorkerCore, now: float) -> None:
        self.core = core
        self.sched = Scheduler(BrokerSettings(heartbeat_interval_s=1.0, liveness=3), now, broker_id="b-2")
        self.to_broker: list[list[Any]] = []
        self.to_worker: list[p.Message] = []
        self.to_client: list[p.Message] = []
        self.jobs_received = 0

    def worker_does(self, actions: Actions) -> None:
        self.to_broker.extend(p.encode(m) for m in actions.send)

    def deliver_to_broker(self, now: float) -> None:
        for frames in self.to_broker:
            self.sched.handle(self.ROUTE, frames, now)
        self.to_broker = []
        for route, msg in self.sched.flush(now):
            if route == self.ROUTE:
                self.to_worker.append(p.decode(p.encode(msg)))
            elif route == self.CLIENT:
                self.to_client.append(p.decode(p.encode(msg)))

    def deliver_to_worker(self, now: float) -> None:
        inbox, self.to_worker = self.to_worker, []
        for msg in inbox:
            if isinstance(msg, p.Jobs):
                self.jobs_received += len(msg.jobs)
            self.worker_does(self.core.on_message(msg, now))


def test_several_reconnect_replies_do_not_inflate_the_workers_credit() -> None:
    """A restarted broker answers each message of a worker it does not know with RECONNECT.

    The worker had sent two heartbeats before the first RECONNECT arrived, so two come back; it
    must still end up offering its capacity once, not twice.
    """
    core = ready_core(now=0.0)  # registered with a broker that has since restarted
    link = Wire(core, now=0.0)
    link.worker_does(core.tick(1.0))
    link.deliver_to_broker(1.0)
    link.worker_does(core.tick(2.0))
    link.deliver_to_broker(2.0)
    assert [type(m) for m in link.to_worker] == [p.Reconnect, p.Reconnect]
    for step in range(4):  # let the conversation settle
        now = 2.1 + step * 0.1
        link.deliver_to_worker(now)
        link.deliver_to_broker(now)
    (worker,) = link.sched.snapshot(3.0)["workers"]
    assert worker["credit"] == core.capacity, f"broker thinks the worker takes {worker['credit']} jobs"
    # a client with many jobs: the worker must never be sent more than it can hold
    link.sched.handle(link.CLIENT, p.encode(p.Hello("client", "c", "h", 2)), 3.0)
    rows = [[seq, 1, {}] for seq in range(10)]
    link.sched.handle(link.CLIENT, p.encode(p.Submit(FN, True, rows, [b"fn"] + [b"a"] * 10)), 3.0)
    link.deliver_to_broker(3.0)
    link.deliver_to_worker(3.0)
    assert link.jobs_received == core.capacity  # as many as it can hold, never more
    assert core.in_hand == core.capacity


# ---- STARTED: a job that runs a while is reported --------------------------------------------------


def test_a_job_still_running_after_the_report_delay_is_reported_started() -> None:
    from zfarm.worker.core import STARTED_REPORT_S

    core = ready_core()
    core.on_message(wire(jobs([1, 2])), 0.0)
    assert [t.key for t in core.take_tasks(2, now=0.0)] == [("c", 1), ("c", 2)]
    assert core.report_started(0.0).send == []  # too early: a quick job reports only its result
    assert core.next_report_at() == STARTED_REPORT_S
    core.finished([outcome(1)], STARTED_REPORT_S / 2, from_slots=1)  # job 1 was quick
    started = only(core.report_started(STARTED_REPORT_S), p.Started)
    assert started.keys == [["c", 2]]
    assert core.report_started(1.0).send == [] and core.next_report_at() is None


def test_nothing_is_reported_started_while_the_broker_is_away() -> None:
    core = ready_core()
    core.on_message(wire(jobs([1])), 0.0)
    core.take_tasks(1, now=0.0)
    core.tick(100.0)  # the broker went silent: link down
    assert core.live.state is LinkState.DOWN
    assert core.next_report_at() is None
    assert core.report_started(100.0).send == []


# ---- results kept until the broker has them --------------------------------------------------------


def registered(now: float = 0.0, **overrides: Any) -> Wire:
    """A worker core registered with a scheduler, and a client "c" connected to it."""
    link = Wire(make_core(**overrides), now)
    link.worker_does(link.core.connect(now))
    link.deliver_to_broker(now)
    link.deliver_to_worker(now)  # WELCOME → READY
    link.deliver_to_broker(now)
    link.sched.handle(link.CLIENT, p.encode(p.Hello("client", "c", "h", 2)), now)
    return link


def submit(link: Wire, seqs: list[int], now: float) -> None:
    rows = [[seq, 1, {}] for seq in seqs]
    link.sched.handle(link.CLIENT, p.encode(p.Submit(FN, True, rows, [b"fn"] + [b"a"] * len(seqs))), now)


def delivered(link: Wire) -> list[int]:
    return [row[0] for m in link.to_client if isinstance(m, p.Result) for row in m.results]


def test_a_result_the_broker_did_not_read_is_sent_again_before_ready_and_the_job_runs_once() -> None:
    """Paused past the liveness window, the worker sends its result to a broker that has forgotten
    it: RECONNECT. After the new WELCOME the result goes again, first; the job is done, not rerun."""
    link = registered()
    submit(link, [0], 0.0)
    link.deliver_to_broker(0.0)
    link.deliver_to_worker(0.0)
    assert [t.key for t in link.core.take_tasks(2, 0.0)] == [("c", 0)]
    link.sched.handle(link.CLIENT, p.encode(p.Heartbeat()), 3.0)
    link.sched.tick(3.5)  # the worker was stopped: declared dead, its job queued again
    assert link.sched.snapshot(3.5)["workers"] == []
    link.worker_does(link.core.finished([outcome(0, b"done once")], 3.6, from_slots=1))
    for step in range(4):  # RESULTS → RECONNECT → HELLO → WELCOME → RESULTS again, READY
        link.deliver_to_broker(3.6 + step * 0.1)
        link.deliver_to_worker(3.6 + step * 0.1)
    assert delivered(link) == [0]
    snap = link.sched.snapshot(4.0)
    assert (snap["done"], snap["queued"], snap["in_flight"], snap["late_results"]) == (1, 0, 0, 0)
    assert link.jobs_received == 1, "the job must not be handed out again"
    assert [w["credit"] for w in snap["workers"]] == [link.core.capacity]


def test_results_are_forgotten_once_the_broker_uses_credit_offered_after_them() -> None:
    link = registered()
    submit(link, list(range(40)), 0.0)
    now = 0.0
    for _ in range(60):
        now += 0.01
        link.deliver_to_broker(now)
        link.deliver_to_worker(now)
        tasks = link.core.take_tasks(2, now)
        done = [SlotOutcome(t.key, t.attempt, OK, [b"r"]) for t in tasks]
        link.worker_does(link.core.finished(done, now, from_slots=len(done)))
        kept = sum(len(batch) for _offered, batch in link.core.unacked)
        assert kept <= link.core.capacity, "kept results are bounded by the credit offered"
    assert sorted(delivered(link)) == list(range(40))
    # a new registration sends again only what the broker may not have read: the last few, at most
    link.worker_does(link.core.connect(now))
    link.deliver_to_broker(now)
    resent = [m for m in link.to_worker if isinstance(m, p.Welcome)]
    assert resent
    actions = link.core.on_message(resent[0], now)
    again = [row[1] for m in actions.send if isinstance(m, p.Results) for row in m.results]
    assert 0 < len(again) <= link.core.capacity and set(again) <= set(range(40))


def test_cancelled_and_returned_outcomes_are_not_kept() -> None:
    core = ready_core()
    core.on_message(wire(jobs([0, 1])), 0.1)
    core.take_tasks(1, 0.1)
    core.on_message(wire(p.CancelJobs([["c", 1]])), 0.2)  # not started: answered CANCELLED
    core.stop(0.3)
    assert not core.unacked
    core.finished([outcome(0, kind=p.Outcome.CRASHED)], 0.4, from_slots=1)
    assert [[o.key for o in batch] for _offered, batch in core.unacked] == [[("c", 0)]]


def test_a_result_larger_than_the_broker_takes_goes_as_a_limit_error() -> None:
    core = make_core()
    core.connect(0.0)
    core.on_message(wire(p.Welcome("b-1", 1.0, 3, 2**20, {})), 0.0)
    core.on_message(wire(jobs([0, 1])), 0.1)
    core.take_tasks(2, 0.1)
    fits = b"x" * (2**20 - p.ENVELOPE_ALLOWANCE)
    results = only(core.finished([outcome(0, fits), outcome(1, fits + b"x")], 0.2, from_slots=2), p.Results)
    assert [row[3] for row in results.results] == [int(OK), int(p.Outcome.ERROR)]
    assert results.kinds == [int(p.ResultKind.PLAIN), int(p.ResultKind.LIMIT)]
    assert "PayloadTooLarge" in results.results[1][5]


def test_a_result_info_line_is_cut_to_what_the_broker_accepts() -> None:
    core = ready_core()
    core.on_message(wire(jobs([0])), 0.1)
    core.take_tasks(1, 0.1)
    failed = SlotOutcome(("c", 0), 1, p.Outcome.ERROR, [b"e"], "ValueError: " + "x" * 5000)
    results = only(core.finished([failed], 0.2, from_slots=1), p.Results)  # decodes: within the bound
    assert len(results.results[0][5]) == p.MAX_TEXT_CHARS


def test_a_job_given_again_while_its_first_copy_runs_here_waits_and_is_dropped_when_it_ends() -> None:
    """Paused for less than its job, the worker is declared dead and given the job again (attempt 2)
    while attempt 1 still runs in a slot: attempt 2 is not started; attempt 1's result goes, and
    attempt 2 is handed back as CANCELLED with its credit."""
    core = ready_core(procs=2)
    core.on_message(wire(jobs([0])), 0.1)
    assert [t.key for t in core.take_tasks(2, 0.1)] == [("c", 0)]
    again = p.Jobs([], [["c", 0, 2, FN, 1, {}], ["c", 1, 1, FN, 1, {}]], [b"arg0", b"arg1"])
    core.on_message(wire(again), 0.2)
    assert [(t.key, t.attempt) for t in core.take_tasks(2, 0.2)] == [(("c", 1), 1)]  # job 0 waits
    assert [(t.key, t.attempt) for t in core.pending] == [(("c", 0), 2)]
    results = only(core.finished([outcome(0, b"first")], 0.3, from_slots=1), p.Results)
    cancelled = int(p.Outcome.CANCELLED)
    assert [row[:4] for row in results.results] == [["c", 0, 1, int(OK)], ["c", 0, 2, cancelled]]
    assert results.credit == 2 and not core.pending and core.running == 1


def test_a_job_given_again_after_its_first_copy_was_cancelled_runs() -> None:
    core = ready_core(procs=2)
    core.on_message(wire(jobs([0])), 0.1)
    core.take_tasks(2, 0.1)
    core.on_message(wire(p.Jobs([], [["c", 0, 2, FN, 1, {}]], [b"arg0"])), 0.2)
    assert core.take_tasks(2, 0.2) == []
    core.finished([outcome(0, kind=p.Outcome.CANCELLED)], 0.3, from_slots=1)
    assert [(t.key, t.attempt) for t in core.take_tasks(2, 0.3)] == [(("c", 0), 2)]


class PausedAndCut:
    """One worker core and a scheduler (through ``Wire``), six jobs, and slots simulated by hand."""

    STEPS = ("broker", "worker", "start", "finish", "expire", "cut")

    def __init__(self) -> None:
        self.link = registered()
        self.core = self.link.core
        submit(self.link, list(range(6)), 0.0)
        self.running: list[Any] = []
        self.starts: Counter[Any] = Counter()
        self.routes = 0
        self.now = 0.0

    def step(self, name: str) -> None:
        self.now += 0.01
        if name == "broker":
            self.link.deliver_to_broker(self.now)
        elif name == "worker":
            self.link.deliver_to_worker(self.now)
        elif name == "start":
            self.start()
        elif name == "finish" and self.running:
            self.finish()
        elif name == "expire":  # the worker was paused: the broker heard nothing from it for a while
            self.now += 4.0
            self.link.sched.handle(self.link.CLIENT, p.encode(p.Heartbeat()), self.now)
            self.link.sched.tick(self.now)
        elif name == "cut":
            self.cut()

    def cut(self) -> None:
        """The connection breaks with whatever was on its way; the worker says HELLO on a new one."""
        self.routes += 1
        self.link.to_broker.clear()
        self.link.to_worker.clear()
        self.link.ROUTE = f"\x00route-{self.routes}".encode()
        self.core.on_message(p.Disconnect("connection cut"), self.now)
        self.link.worker_does(self.core.connect(self.now))

    def start(self) -> None:
        tasks = self.core.take_tasks(self.core.slots - len(self.running), self.now)
        self.starts.update(t.key for t in tasks)
        self.running.extend(tasks)
        assert len({t.key for t in self.running}) == len(self.running), "two copies of a job run at once"

    def finish(self) -> None:
        task = self.running.pop(0)
        done = SlotOutcome(task.key, task.attempt, OK, [b"r"])
        self.link.worker_does(self.core.finished([done], self.now, from_slots=1))

    def settle(self) -> None:
        """The farm runs on, both sides heartbeating, until every result is delivered."""
        link = self.link
        for _ in range(100):
            self.now += 0.3
            if self.core.live.state is LinkState.DOWN:
                self.cut()
            self.start()
            while self.running:
                self.finish()
            link.sched.handle(link.CLIENT, p.encode(p.Heartbeat()), self.now)
            link.sched.tick(self.now)
            link.worker_does(self.core.tick(self.now))
            link.deliver_to_broker(self.now)
            link.deliver_to_worker(self.now)
            if len(delivered(link)) >= 6 and not self.core.pending:
                return


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PausedAndCut.STEPS), max_size=50))
def test_random_pauses_and_cuts_run_and_deliver_every_job_once(steps: list[str]) -> None:
    """At any point: a turn of either side, slots starting or finishing jobs, the broker declaring
    the worker dead (a pause), or the connection cut with whatever was on its way. However they
    interleave, each job runs once and its result reaches the client once."""
    farm = PausedAndCut()
    for step in steps:
        farm.step(step)
    farm.settle()
    assert sorted(delivered(farm.link)) == list(range(6)), "every result reaches the client once"
    assert farm.starts == Counter(("c", seq) for seq in range(6)), f"a job ran twice: {farm.starts}"
