"""What every part of the broker's core shares: its peers, counters, journal and outbox.

One instance per :class:`~zfarm.broker.scheduler.Scheduler`; each part (peers, placement,
intake, delivery, functions, recovery) holds it and changes only the facts it owns.

It also keeps the dispatch list's clock: fair share by **slot-time** (stride scheduling whose
stride is the time a job holds its slot, not one per dispatch)::

    dispatch (Placement._next_for) ── charge(queue, job): job.charged = estimate / share; pass += it
    a result (Delivery.finish) ──── ran(job, run_s):       pass += run_s / share - job.charged
    handed back unrun (give_back) ─ refund(job):           pass -= job.charged

A dispatch charges the queue's estimate of one job's run time (a running mean of its jobs' run
times as their workers measured them; before it has one, the mean over every queue; before any, one
second), and the job keeps what it was charged; when its result comes, that charge is replaced by
the slot-time it really held over the queue's share as it is then. So what a queue is charged in the
end is the slot-time its jobs used, however many ran at once and however its share changed while
they ran; and among queues of equal priority each holds running slots in proportion to its share
however long its jobs are: a queue of 10 s jobs beside a queue of 0.1 s jobs gets half of the
slot-time, not nearly every slot. A job whose worker died keeps its dispatch's charge (the slot-time
its lost attempt held is not known: the estimate stands for it), and so does a cancelled one; a job
handed back unrun gets it back. A dispatch is one heap step (none while one queue waits), plus one
for each entry found lagging below its queue's pass; a result at most one push.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Any

from zfarm import protocol as p
from zfarm.broker.held import HeldResults
from zfarm.broker.journal import Journal
from zfarm.broker.records import Records
from zfarm.broker.state import ClientRecord, Counters, Job, Peer, Queue, Route, WorkerRecord
from zfarm.config import BrokerSettings

log = logging.getLogger("zfarm.broker.scheduler")

#: what one dispatch charges before any job has reported how long it ran (seconds)
FIRST_ESTIMATE_S = 1.0
#: the least a job is charged: jobs that take no measurable time still take turns
MIN_CHARGE_S = 1e-3
#: the newest run time's weight in a queue's (and the farm's) estimate of its jobs' run time
RUN_SMOOTHING = 0.2

Outbound = tuple[Route, p.Message]
MALFORMED_LOGS_PER_S = 5


@dataclass(slots=True, eq=False)
class Farm:
    settings: BrokerSettings
    records: Records
    held_results: HeldResults
    journal: Journal | None = None
    peers: dict[Route, Peer] = field(default_factory=dict)
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    #: jobs waiting in every client's queue
    queued: int = 0
    #: queues with queued jobs (projects', clients' own): a heap of ``(-priority, pass, order, version,
    #: queue)``, the one to dispatch from next first (highest priority, lowest pass, scheduled first).
    #: An entry whose version is not its queue's is stale (its priority changed): skipped when popped.
    #: An entry's pass is never above its queue's (:meth:`ran` lets it lag below): one popped with a
    #: lower pass goes back with its queue's, so the one taken has the lowest pass of all
    active: list[tuple[int, float, int, int, Queue]] = field(default_factory=list)
    _scheduled: int = 0  # queues scheduled so far: each one's ``order``
    #: projects by name
    projects: dict[str, Queue] = field(default_factory=dict)
    #: projects whose counts changed this turn (with a journal: their rows are written at the flush)
    counted: set[Queue] = field(default_factory=set)
    #: counts changes to ``workers`` (a worker joined or its record ended): what could run somewhere
    workers_epoch: int = 0
    #: the pass of the last queue dispatched from: a queue that was idle starts there (no banked turns)
    vtime: float = 0.0
    #: the mean run time of recent jobs of every queue: what a queue none of whose jobs has run yet
    #: is charged per dispatch (0: none measured yet)
    run_estimate_s: float = 0.0
    out: list[Outbound] = field(default_factory=list)
    _log_second: int = 0
    _logged: int = 0
    _unlogged: int = 0

    @property
    def journal_path(self) -> str:
        return self.journal.path if self.journal is not None else ""

    def queues(self) -> list[Queue]:
        """Every queue: each project's, and each client's own."""
        return [*self.projects.values(), *(c.own for c in self.clients.values())]

    def add_worker(self, worker: WorkerRecord) -> None:
        self.workers[worker.id] = worker
        self.workers_epoch += 1

    def remove_worker(self, worker: WorkerRecord) -> None:
        del self.workers[worker.id]
        self.workers_epoch += 1

    def send(self, peer: Peer, msg: p.Message, now: float) -> None:
        peer.last_sent = now
        self.out.append((peer.route, msg))

    def send_to(self, route: Route, msg: p.Message) -> None:
        self.out.append((route, msg))

    def malformed(self, now: float, text: str, *args: Any) -> None:
        """Count bad input; log a few lines a second at most, so a flood cannot slow the broker."""
        self.counters.malformed += 1
        second = int(now)
        if second != self._log_second:
            if self._unlogged:
                log.warning("dropped %d more malformed messages without logging them", self._unlogged)
            self._log_second, self._logged, self._unlogged = second, 0, 0
        if self._logged < MALFORMED_LOGS_PER_S:
            self._logged += 1
            log.warning(text, *args)
        else:
            self._unlogged += 1

    def schedule(self, queue: Queue) -> None:
        """A queue with queued jobs joins the dispatch list (its pass no further back than now)."""
        if not queue.scheduled:
            queue.scheduled = True
            queue.pass_ = max(queue.pass_, self.vtime)
            self._scheduled += 1
            queue.order = self._scheduled
            self.push(queue)

    def push(self, queue: Queue) -> None:
        """A scheduled queue (re)enters the heap with its priority and pass as they are now."""
        queue.version += 1
        entry = (-queue.priority, queue.pass_, queue.order, queue.version, queue)
        active = self.active
        if len(active) == 1 and active[0][4] is queue:  # the only queue waiting: its entry replaced in
            active[0] = entry  # place (a heap of one), not a stale one left behind for dispatch to skip
        else:
            heapq.heappush(active, entry)

    def set_priority(self, queue: Queue, priority: int) -> None:
        if priority != queue.priority:
            queue.priority = priority
            if queue.scheduled:
                self.push(queue)  # (its old entry is stale)

    # ---- fair share by slot-time (see the module's docstring) ---------------------------------------

    def charge(self, queue: Queue, job: Job, listed: bool = False) -> None:
        """``job`` of ``queue`` was dispatched: its pass moves on by the job's estimated slot-time, which
        the job keeps (``Job.charged``) until its result says what it really took.

        ``listed``: the queue's entry is still in the heap (it may lag below the new pass: no push)."""
        self.vtime = queue.pass_
        # what one job of the queue is charged: how long its jobs run, as far as known
        job.charged = (queue.run_estimate_s or self.run_estimate_s or FIRST_ESTIMATE_S) / queue.share
        queue.pass_ += job.charged
        if not listed:
            self.push(queue)

    def ran(self, job: Job, run_s: float) -> None:
        """``job`` held its slot ``run_s`` seconds: its queue is charged that slot-time (over its share
        as it is now) instead of what its dispatch charged, and the estimates learn from it.

        A run time that is not a number, or out of bounds, is not believed: the dispatch's charge
        stands and nothing is learnt (the protocol refuses such rows; this is the last guard, since
        one NaN in a pass would stop fair share for every queue)."""
        if not 0.0 <= run_s <= p.MAX_RUN_S:  # (False for NaN too; once per result: no more calls)
            return
        if run_s < MIN_CHARGE_S:
            run_s = MIN_CHARGE_S
        queue = job.queue
        queue.slot_s += run_s
        correction = run_s / queue.share - job.charged
        queue.pass_ += correction
        job.charged = 0.0
        mean = queue.run_estimate_s
        queue.run_estimate_s = mean + RUN_SMOOTHING * (run_s - mean) if mean else run_s
        mean = self.run_estimate_s
        self.run_estimate_s = mean + RUN_SMOOTHING * (run_s - mean) if mean else run_s
        if queue.scheduled and correction < 0.0:
            self.push(queue)  # (its entry's pass is too high: it would wait too long)
        # A pass that grew leaves its entry lower than it: dispatch puts it back with the right one when
        # it comes up (a heap step only then, not one per result).

    def refund(self, job: Job) -> None:
        """``job`` was handed back unrun by its worker (leaving, or giving back what it prefetched): its
        queue gets back what its dispatch charged (it is charged again when it is dispatched again)."""
        queue = job.queue
        queue.pass_ -= job.charged
        job.charged = 0.0
        if queue.scheduled:
            self.push(queue)
