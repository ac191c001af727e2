"""What every part of the broker's core shares: its peers, counters, journal and outbox.

One instance per :class:`~zfarm.broker.scheduler.Scheduler`; each part (peers, placement,
intake, delivery, functions, recovery) holds it and changes only the facts it owns.
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
from zfarm.broker.state import ClientRecord, Counters, Peer, Queue, Route, WorkerRecord
from zfarm.config import BrokerSettings

log = logging.getLogger("zfarm.broker.scheduler")

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
    #: An entry whose version is not its queue's is stale (its priority changed): skipped when popped
    active: list[tuple[int, float, int, int, Queue]] = field(default_factory=list)
    _scheduled: int = 0  # queues scheduled so far: each one's ``order``
    #: projects by name
    projects: dict[str, Queue] = field(default_factory=dict)
    #: counts changes to ``workers`` (a worker joined or its record ended): what could run somewhere
    workers_epoch: int = 0
    #: the pass of the last queue dispatched from: a queue that was idle starts there (no banked turns)
    vtime: float = 0.0
    out: list[Outbound] = field(default_factory=list)
    _log_second: int = 0
    _logged: int = 0
    _unlogged: int = 0

    @property
    def journal_path(self) -> str:
        return self.journal.path if self.journal is not None else ""

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
        heapq.heappush(self.active, (-queue.priority, queue.pass_, queue.order, queue.version, queue))

    def set_priority(self, queue: Queue, priority: int) -> None:
        if priority != queue.priority:
            queue.priority = priority
            if queue.scheduled:
                self.push(queue)  # (its old entry is stale)
