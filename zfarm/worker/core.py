"""The worker's pure core: handshake, credit, heartbeats, backoff, results kept until read.

::

    broker ◄──DEALER──► WorkerCore (pure: handshake, credit, heartbeats, backoff)
                            │ tasks ▲ outcomes
                            ▼       │
                          SlotPool (chaperone): one process per slot

The core never reads a clock or touches a socket; :class:`zfarm.worker.shell.Worker` is the
shell that polls the socket and the slots' pipes and feeds the core. Because
jobs run in other processes, the loop keeps heartbeating however long a job
runs. Credit is the worker's to give: READY says how many more jobs it can
hold (free slots plus a small prefetch), and every RESULTS returns the credit
of the jobs it reports.

A result is kept until the broker is known to have it, and sent again after the
next WELCOME (before READY) if the link broke first. There is no ack message:
the broker never sends more jobs than the credit it has read, and reads a
connection's messages in order, so a JOBS that takes the job count past the
credit offered before a RESULTS proves that RESULTS was read. Kept results are
so bounded by the credit offered (slots + prefetch).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.config import WorkerSettings
from zfarm.errors import PayloadTooLarge, Refused
from zfarm.link import Checked, LinkState, Liveness
from zfarm.worker.chaperone import Key, SlotOutcome, SlotTask

log = logging.getLogger(__name__)

#: a job still in its slot this long after it started is reported as started (STARTED, so its
#: client's future says ``running()``); a quicker one reports only its result: no extra message
STARTED_REPORT_S = 0.01
#: Tiny jobs (their run time in the slot, averaged, under TINY_JOB_S) make a worker ask for
#: BURST_PREFETCH more jobs a slot: JOBS then carry several, every process wakes up once for
#: several jobs, and no slot waits for a round trip to the broker between two jobs.
TINY_JOB_S = 0.002
BURST_PREFETCH = 8
#: ... and once a job has run this long, the jobs asked for beyond the usual prefetch go back to the
#: broker (RETURNED): a long job never keeps a burst of others waiting behind it. Jobs shorter than
#: this on average (not tiny) get one job held ready a slot, whatever the prefetch (at least 1).
BURST_HANDBACK_S = 0.05
#: how fast the average run time follows new jobs (the weight of the newest)
RUN_TIME_WEIGHT = 0.3
#: outcomes that end a job: kept until the broker has them (the others only return credit)
ENDS_JOB = frozenset({p.Outcome.OK, p.Outcome.ERROR, p.Outcome.CRASHED})


@dataclass
class Actions:
    """What the shell must do after feeding the core an event."""

    send: list[p.Message] = field(default_factory=list)
    kill: list[Key] = field(default_factory=list)  # running jobs to cancel
    peek: list[p.Peek] = field(default_factory=list)  # output asked of running jobs: read and answer
    reconnect: bool = False  # close the socket; open a new one at ``core.live.reconnect_at``


class WorkerCore:
    def __init__(self, settings: WorkerSettings, now: float, host: str | None = None,
                 pid: int | None = None, offer: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.id = settings.worker_id or f"w-{uuid.uuid4().hex[:10]}"
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.slots = settings.slots
        self.run_s: float | None = None  # the average run time of recent jobs, once measured
        self.live = Liveness(settings.heartbeat_interval_s, settings.liveness, settings.reconnect_min_s,
                             settings.reconnect_max_s, now)
        #: what jobs may ask of it (HELLO info: resources, tags, gpu_ids; see zfarm.worker.offer)
        self.offer: dict[str, Any] = offer or {}
        self.broker_id = ""
        self.max_message_bytes = 0  # the broker's, from WELCOME
        self.pending: deque[SlotTask] = deque()  # received, not yet in a slot
        self.fns: dict[bytes, Any] = {}
        self.unsent: list[SlotOutcome] = []  # finished while the broker did not know us
        self.unreported: dict[Key, float] = {}  # running jobs not yet reported started, and since when
        #: in a slot now, and since when, in start order; never two copies of one job at once
        self.started: dict[Key, float] = {}
        # This registration's credit offered and jobs received, and the results sent on it that the
        # broker may not have read yet, each batch with the credit offered before it.
        self.offered = 0
        self.received = 0
        self.unacked: deque[tuple[int, list[SlotOutcome]]] = deque()
        self.stopping = False
        self.done = 0

    @property
    def capacity(self) -> int:
        """Jobs we may hold: a job a slot plus the prefetch; while jobs are short, one more ready for
        each slot (a slot that frees finds its next job here, whichever slot it is and however close
        together they free), and a burst of them while jobs are tiny."""
        prefetch = self.settings.prefetch
        if prefetch and self.run_s is not None and self.run_s < BURST_HANDBACK_S:
            prefetch = max(prefetch, (BURST_PREFETCH if self.run_s < TINY_JOB_S else 1) * self.slots)
        return self.slots + prefetch

    @property
    def running(self) -> int:
        return len(self.started)

    @property
    def in_hand(self) -> int:
        return len(self.pending) + self.running

    def connect(self, now: float) -> Actions:
        """A new socket is open: introduce ourselves."""
        self.live.connecting(now)
        return self._out(now, [self._hello()])

    def _hello(self) -> p.Hello:
        return p.Hello(p.Role.WORKER.value, self.id, self.host, self.pid, self.slots,
                       {"prefetch": self.settings.prefetch, **self.offer})

    def on_message(self, msg: p.Message, now: float) -> Actions:
        self.live.heard(now)
        if isinstance(msg, p.Welcome):
            return self._welcome(msg, now)
        if isinstance(msg, p.Jobs):
            return self._jobs(msg, now)
        if isinstance(msg, p.CancelJobs):
            return self._cancel({(k[0], k[1]) for k in msg.keys}, now)
        if isinstance(msg, p.Reclaim):
            return self._reclaim({(k[0], k[1]) for k in msg.keys}, now)
        if isinstance(msg, p.Peek):
            return self._peek(msg, now)
        if isinstance(msg, p.Reconnect):
            if self.live.state is LinkState.CONNECTING:
                return Actions()  # our HELLO is on its way already
            log.info("broker does not know us (%s): introducing ourselves again", p.clip(msg.reason))
            return self.connect(now)
        if isinstance(msg, p.Refused):
            raise Refused(f"the broker refused this worker: {msg.reason}")
        if isinstance(msg, p.Disconnect):
            log.info("broker is leaving (%s): will reconnect", p.clip(msg.reason))
            self.live.drop(now)
            return Actions(reconnect=True)
        if not isinstance(msg, p.Heartbeat):
            log.warning("ignored unexpected %s from the broker", type(msg).__name__)
        return Actions()

    def _welcome(self, msg: p.Welcome, now: float) -> Actions:
        if not self.live.ready:
            log.info("worker %s registered with broker %s (%d %s)", self.id, msg.broker_id, self.slots,
                     "slot" if self.slots == 1 else "slots")
        self.live.welcomed(msg.heartbeat_interval_s, msg.liveness)
        self.fns.clear()  # the broker's mirror of our cache starts empty with each registration
        self.broker_id = msg.broker_id
        self.max_message_bytes = msg.max_message_bytes
        # What the broker may not have read goes first, so that it finishes those jobs before it
        # could hand them out again; then READY offers the free slots (those results' credit included).
        resend = [o for _offered, batch in self.unacked for o in batch] + self.unsent
        self.unacked.clear()
        self.unsent = []
        self.offered = self.received = 0
        send: list[p.Message] = [self._send_results(resend, credit=0)] if resend else []
        credit = 0 if self.stopping else self.capacity - self.in_hand
        self.offered += credit
        send.append(p.Ready(credit))
        return self._out(now, send)

    def _jobs(self, msg: p.Jobs, now: float) -> Actions:
        self.received += len(msg.jobs)
        while self.unacked and self.unacked[0][0] < self.received:
            self.unacked.popleft()  # the broker used credit offered after these results: it read them
        for fn_id, blob in zip(msg.fns, msg.frames, strict=False):  # frames go on past the fns
            p.remember_fn(self.fns, fn_id, blob)
        rows = [p.JobRow.from_wire(row) for row in msg.jobs]
        per_job = p.split_frames(msg.frames[len(msg.fns):], [row.nframes for row in rows])
        returned: list[SlotTask] = []
        for row, frames in zip(rows, per_job, strict=True):
            task = SlotTask((row.client_id, row.seq), row.attempt, row.fn_id, self.fns.get(row.fn_id), frames,
                            row.options)
            if self.stopping:
                returned.append(task)
            else:
                self.pending.append(task)
        return self.finished(_outcomes(returned, p.Outcome.RETURNED), now) if returned else Actions()

    def _cancel(self, keys: set[Key], now: float) -> Actions:
        dropped = self._take_pending(keys)
        actions = self.finished(_outcomes(dropped, p.Outcome.CANCELLED), now)
        actions.kill = sorted(keys - {t.key for t in dropped})
        return actions

    def _reclaim(self, keys: set[Key], now: float) -> Actions:
        """Give back the jobs still waiting here (RETURNED, with their credit); running ones run on."""
        given = self._take_pending(keys)
        if not given:
            return Actions()
        log.debug("worker %s gave back %d prefetched jobs", self.id, len(given))
        return self.finished(_outcomes(given, p.Outcome.RETURNED), now)

    def _peek(self, msg: p.Peek, now: float) -> Actions:
        """Output asked of a job: a running one's the shell reads from its streams; of any other
        we say at once where it stands (not started yet, or no longer here)."""
        key = (msg.client_id, msg.seq)
        if key in self.started:
            return Actions(peek=[msg])
        waiting = any(t.key == key for t in self.pending)
        status = p.PeekStatus.QUEUED if waiting else p.PeekStatus.FINISHED
        return self._out(now, [p.PeekReply(msg.client_id, msg.seq, msg.ask, status, reply_to=msg.reply_to)])

    def _take_pending(self, keys: set[Key]) -> list[SlotTask]:
        """Take the waiting jobs with these keys out of ``pending`` (the others keep their order)."""
        taken = [t for t in self.pending if t.key in keys]
        if taken:
            self.pending = deque(t for t in self.pending if t.key not in keys)
        return taken

    def take_tasks(self, free_slots: int, now: float) -> list[SlotTask]:
        """Tasks to start now on ``free_slots`` idle slots.

        A job given again while its first copy runs here (the broker thought us dead) waits: when
        the first copy ends, its result wins and the waiting copy is dropped (see ``finished``).
        """
        tasks: list[SlotTask] = []
        waiting: list[SlotTask] = []
        while self.pending and len(tasks) < free_slots:
            task = self.pending.popleft()
            if task.key in self.started:
                waiting.append(task)
            else:
                tasks.append(task)
                self.unreported[task.key] = now
                self.started[task.key] = now
        self.pending.extendleft(reversed(waiting))
        return tasks

    def report_started(self, now: float) -> Actions:
        """STARTED for the jobs that have run for ``STARTED_REPORT_S`` (and have not finished)."""
        if not self.live.ready or not self.unreported:
            return Actions()
        due = [key for key, since in self.unreported.items() if now - since >= STARTED_REPORT_S]
        if not due:
            return Actions()
        for key in due:
            del self.unreported[key]
        return self._out(now, [p.Started([list(key) for key in due])])

    def next_report_at(self) -> float | None:
        """When :meth:`report_started` or :meth:`hand_back_burst` next has something to do."""
        if not self.live.ready:
            return None
        due = []  # both dicts are in start order: their first entry is their oldest
        if (oldest_unreported := next(iter(self.unreported.values()), None)) is not None:
            due.append(oldest_unreported + STARTED_REPORT_S)
        if len(self.pending) > self.settings.prefetch and (oldest := self._oldest_start()) is not None:
            due.append(oldest + BURST_HANDBACK_S)
        return min(due, default=None)

    def _oldest_start(self) -> float | None:
        """When the longest-running job started (None: none runs)."""
        return next(iter(self.started.values()), None)

    def hand_back_burst(self, now: float) -> Actions:
        """A job runs long: give back the jobs held beyond the usual prefetch (RETURNED, no credit:
        they go to slots that are free elsewhere, or back here after the long job)."""
        extra = len(self.pending) - self.settings.prefetch
        oldest = self._oldest_start()
        if extra <= 0 or oldest is None or now - oldest < BURST_HANDBACK_S:
            return Actions()
        self.run_s = max(self.run_s or 0.0, BURST_HANDBACK_S)  # not tiny now: no burst until they are again
        given = [self.pending.pop() for _ in range(extra)][::-1]  # the newest go back
        log.debug("worker %s: a job runs long; gave back %d jobs held for a burst", self.id, extra)
        # the capacity is the usual one again, so these return no credit
        return self.finished(_outcomes(given, p.Outcome.RETURNED), now)

    def finished(self, outcomes: list[SlotOutcome], now: float, from_slots: int = 0) -> Actions:
        """Jobs left our hands (the first ``from_slots`` outcomes came from slots); report them."""
        if not outcomes:
            return Actions()
        ended: set[Key] = set()
        for o in outcomes[:from_slots]:
            self.started.pop(o.key, None)
            if o.outcome in ENDS_JOB:
                ended.add(o.key)
                if o.run_s > 0:  # 0: not measured (a slot that died, a job killed)
                    self.run_s = o.run_s if self.run_s is None else self.run_s + RUN_TIME_WEIGHT * (
                        o.run_s - self.run_s)
        if ended and (copies := self._take_pending(ended)):  # copies given again: not needed now
            outcomes = outcomes + _outcomes(copies, p.Outcome.CANCELLED)
        for outcome in outcomes:
            self.unreported.pop(outcome.key, None)
        outcomes = [self._fit(o) for o in outcomes]
        self.done += sum(o.outcome == p.Outcome.OK for o in outcomes)
        if not outcomes:
            return Actions()
        if not self.live.ready:
            self.unsent.extend(outcomes)
            return Actions()
        # Credit tops what the broker may still send plus what we hold up to the capacity (which grows
        # and shrinks with the jobs' run time); with a steady capacity that is one a job reported.
        credit = 0 if self.stopping else max(0, self.capacity - (self.offered - self.received) - self.in_hand)
        return self._out(now, [self._send_results(outcomes, credit=credit)])

    def _fit(self, outcome: SlotOutcome) -> SlotOutcome:
        """Turn a result too large for the broker into an error (sent whole, it would cut us off)."""
        size = sum(memoryview(f).nbytes for f in outcome.frames)
        limit = p.payload_limit(self.max_message_bytes)
        if limit is None or size <= limit:
            return outcome
        error = PayloadTooLarge(size, limit, "this job's result")
        return SlotOutcome(outcome.key, outcome.attempt, p.Outcome.ERROR, ser.dump_exception(error),
                           ser.error_line(error), outcome.run_s, outcome.started_at, outcome.finished_at,
                           outcome.peak_rss, p.ResultKind.LIMIT)

    def _send_results(self, outcomes: list[SlotOutcome], credit: int) -> p.Results:
        """RESULTS for these outcomes; those that end a job are kept until the broker has read them."""
        kept = [o for o in outcomes if o.outcome in ENDS_JOB]
        if kept:
            self.unacked.append((self.offered, kept))
        self.offered += credit
        rows = [[o.key[0], o.key[1], o.attempt, int(o.outcome), len(o.frames), o.info[:p.MAX_TEXT_CHARS]]
                for o in outcomes]
        frames = [f for o in outcomes for f in o.frames]
        kinds = [int(o.kind) for o in outcomes] if any(o.kind for o in outcomes) else []
        return p.Results(credit, rows, frames, [o.stats_row() for o in outcomes], kinds)

    def tick(self, now: float) -> Actions:
        """Heartbeat when quiet; give up on a silent broker and schedule a reconnect."""
        checked = self.live.check(now)
        if checked is Checked.HEARTBEAT:
            return self._out(now, [p.Heartbeat()])
        if not checked.dropped:
            return Actions()
        silent_s, wait_s = self.live.silent_s(now), self.live.reconnect_at - now
        if checked is Checked.UNANSWERED:  # said at every try, so a worker never waits in silence
            log.warning("no answer from a broker at %s for %.0f s (is `zfarm broker` running there?): "
                        "trying again in %.0f s", self.settings.address, silent_s, wait_s)
        else:
            log.warning("broker silent for %.1f s: reconnecting in %.0f s", silent_s, wait_s)
        return Actions(reconnect=True)

    def stop(self, now: float) -> Actions:
        """Take no more jobs; hand back those not started. Running ones may finish."""
        if self.stopping:
            return Actions()
        self.stopping = True
        returned = _outcomes(self.pending, p.Outcome.RETURNED)
        self.pending.clear()
        log.info("worker %s stopping: handed back %d queued jobs, %d running", self.id, len(returned),
                 self.running)
        return self.finished(returned, now)

    def goodbye(self, now: float) -> Actions:
        return self._out(now, [p.Disconnect("worker stopping")] if self.live.ready else [])

    def _out(self, now: float, msgs: list[p.Message]) -> Actions:
        self.live.sent(now)
        return Actions(send=msgs)


def _outcomes(tasks: Iterable[SlotTask], outcome: p.Outcome) -> list[SlotOutcome]:
    """Outcomes with no result for jobs that never ran here (cancelled, or given back)."""
    return [SlotOutcome(t.key, t.attempt, outcome, []) for t in tasks]
