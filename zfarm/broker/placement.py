"""Queues and placement: which queued job goes to which worker, within the credit it gave.

::

    clients' queues (round-robin) ──► idle slots first, spread evenly ──► prefetch credit ──► JOBS

A worker's credit is what the worker said it can take (READY adds, RESULTS returns); the broker
never sends it more. Queues are per client and served round-robin, so one client's million jobs
cannot starve another's ten. A job whose worker is lost goes back to the front of its queue; one
that has lost ``max_losses`` workers is declared poison and fails with LOST.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from zfarm import protocol as p
from zfarm.broker.delivery import Delivery
from zfarm.broker.farm import Farm
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.state import ClientRecord, Departure, Job, JobState, WorkerRecord
from zfarm.errors import ProtocolError

log = logging.getLogger("zfarm.broker.scheduler")

MAX_CREDIT = 1_000_000


class Placement:
    def __init__(self, farm: Farm, moves: JobMoves, delivery: Delivery) -> None:
        self.farm = farm
        self.moves = moves
        self.delivery = delivery
        self.hungry: dict[str, WorkerRecord] = {}  # workers with credit, in arrival order

    def add_credit(self, worker: WorkerRecord, credit: int) -> None:
        if credit < 0:
            raise ProtocolError(f"negative credit {credit}")
        worker.credit = min(worker.credit + credit, MAX_CREDIT)
        if worker.credit > 0:
            self.hungry[worker.id] = worker

    def reset_credit(self, worker: WorkerRecord) -> None:
        """After every WELCOME a worker sends its full credit and starts its function cache afresh."""
        worker.credit = 0
        worker.fns.clear()
        self.hungry.pop(worker.id, None)

    def dispatch(self, now: float) -> None:
        """Fill idle slots first, spreading jobs evenly; only then use prefetch credit."""
        farm = self.farm
        for prefetch in (False, True):
            while farm.queued:
                room = {w: (w.credit if prefetch else min(w.credit, w.slots - len(w.jobs)))
                        for w in self.hungry.values()}
                room = {w: n for w, n in room.items() if n > 0}
                if not room:
                    break
                share = max(1, math.ceil(farm.queued / len(room)))
                for worker, n in room.items():
                    for _ in range(min(n, share)):
                        found = self._next_queued()
                        if found is None:
                            return
                        self.moves.move(found[1], JobState.ASSIGNED, found[0], now, worker=worker)
                    if worker.credit <= 0:
                        del self.hungry[worker.id]

    def _next_queued(self) -> tuple[ClientRecord, Job] | None:
        active = self.farm.active
        while active:
            client = active[0]
            if _at_max_running(client):  # scheduled again when one of its jobs is over (JobMoves)
                active.popleft()
                client.scheduled = False
                continue
            while client.queue:
                job = client.queue.popleft()
                if job.state is JobState.QUEUED:
                    if client.queued > 1:
                        active.rotate(-1)
                    else:
                        active.popleft()
                        client.scheduled = False
                    return client, job
            active.popleft()
            client.scheduled = False
        return None

    def jobs_message(self, worker: WorkerRecord) -> p.Jobs:
        fns: list[bytes] = []
        fn_frames: list[Any] = []
        rows: list[list[Any]] = []
        job_frames: list[Any] = []
        clients = self.farm.clients
        for job in worker.outbox:
            if job.fn_id not in worker.fns:
                fns.append(job.fn_id)
                fn_frames.append(clients[job.client_id].fns[job.fn_id])
                p.remember_fn(worker.fns, job.fn_id, None)
            rows.append(p.JobRow(job.client_id, job.seq, len(job.history), job.fn_id, len(job.frames),
                                 job.options).to_wire())
            job_frames.extend(job.frames)
        worker.outbox = []
        return p.Jobs(fns, rows, fn_frames + job_frames)

    def give_back(self, worker: WorkerRecord, jobs: list[Job], now: float) -> None:
        """Jobs a worker returned unrun (it is leaving): they queue again, first."""
        for job in jobs:
            client = self.farm.clients.get(job.client_id)
            if job.state is JobState.ASSIGNED and worker.jobs.get(job.key) is job and client is not None:
                self.moves.move(job, JobState.QUEUED, client, now, finisher=worker, front=True)

    def requeue(self, worker: WorkerRecord, why: Departure, detail: str, now: float) -> None:
        """A worker's record ended: its jobs queue again, first (those it died running count a loss)."""
        jobs = list(worker.jobs.values())  # in the order they were given to it
        received = [job for job in jobs if job not in worker.outbox]
        if not why.alive:  # the worker died running some of these: count it against them
            # The oldest `slots` jobs it had received are the ones running; the rest were prefetched.
            running = received[:worker.slots]
            jobs = [job for job in jobs if job not in running or not self._poisoned(job, worker, detail, now)]
        if jobs:
            log.warning("worker %s %s: requeued its %d jobs", worker.id, detail, len(jobs))
        for job in reversed(jobs):  # each goes to the front: keep the original order
            client = self.farm.clients.get(job.client_id)
            if client is not None and job.state is JobState.ASSIGNED:
                self.moves.move(job, JobState.QUEUED, client, now, front=True)
        worker.jobs.clear()
        worker.outbox.clear()

    def _poisoned(self, job: Job, worker: WorkerRecord, why: str, now: float) -> bool:
        """Record a worker lost while running ``job``; end the job once it has lost too many."""
        farm = self.farm
        at = time.strftime("%H:%M:%S", time.localtime(farm.records.wall(now)))
        job.losses += (f"{worker.id} on {worker.host} ({why}, at {at})",)
        if farm.journal is not None:
            farm.journal.losses(job)
        limit = job.options.get("max_losses")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            limit = farm.settings.max_losses
        client = farm.clients.get(job.client_id)
        if len(job.losses) < limit or client is None:
            return False
        info = (f"{len(job.losses)} workers died while running it, so it is not tried again (it may be "
                f"what kills them): {'; '.join(job.losses)}")
        log.warning("job %s declared poison: %s", job.name, p.clip(info))
        farm.records.event(now, "job-failed", f"job {job.name} lost {len(job.losses)} workers: not retried")
        self.moves.move(job, JobState.FINISHED, client, now)
        ended_at = farm.records.wall(now)
        self.delivery.deliver(client, job, worker, p.Outcome.LOST, [], info,
                              p.RunStats(ended_at, ended_at, 0.0, 0), now)
        return True


def _at_max_running(client: ClientRecord) -> bool:
    """Whether a client runs as many jobs as its next one allows (option ``max_running``: job arrays)."""
    cap = client.queue[0].options.get("max_running") if client.queue else None
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        return False
    return len(client.jobs) - client.queued >= cap
