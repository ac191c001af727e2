"""Queues and placement: which queued job goes to which worker, within the credit it gave.

::

    queues (a heap: priority, then pass) ──► idle slots first, spread evenly ──► prefetch credit ──► JOBS

A worker's credit is what the worker said it can take (READY adds, RESULTS returns); the broker
never sends it more. Queues (each project's, each client's own) are served by priority, then in
proportion to their shares of running slot-time (stride scheduling charged by run time:
:mod:`zfarm.broker.farm`), so one client's million jobs cannot starve another's ten, and long jobs
do not take every slot from short ones; the next queue comes off a heap (a dispatch costs a heap
step, not a scan of every queue).
A job whose worker is lost goes back to the front of its queue; one that has lost ``max_losses``
workers is declared poison and fails with LOST.
"""

from __future__ import annotations

import logging
import math
import time
from heapq import heappop, heappush
from typing import Any

from zfarm import protocol as p
from zfarm.broker.delivery import Delivery
from zfarm.broker.dependencies import Dependencies
from zfarm.broker.farm import Farm
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.state import (
    NO_OPTIONS,
    Departure,
    Job,
    JobState,
    Queue,
    Request,
    WorkerRecord,
)
from zfarm.errors import ProtocolError

log = logging.getLogger("zfarm.broker.scheduler")

MAX_CREDIT = 1_000_000
ASSIGNED = JobState.ASSIGNED


class Placement:
    def __init__(self, farm: Farm, moves: JobMoves, delivery: Delivery, dependencies: Dependencies) -> None:
        self.dependencies = dependencies
        self.farm = farm
        self.moves = moves
        self.delivery = delivery
        self.hungry: dict[str, WorkerRecord] = {}  # workers with credit, in arrival order
        #: workers given more jobs than slots (prefetch), while they hold more or have jobs asked back
        self.prefetched: dict[str, WorkerRecord] = {}

    def add_credit(self, worker: WorkerRecord, credit: int) -> None:
        if credit < 0:
            raise ProtocolError(f"negative credit {credit}")
        worker.credit = min(worker.credit + credit, MAX_CREDIT)
        if worker.credit > 0:
            self.hungry[worker.id] = worker

    def settled(self, worker: WorkerRecord) -> None:
        """A worker's results came: one that holds no more jobs than slots (and has none asked back) has
        nothing to reclaim (forgotten here, not at every dispatch)."""
        if worker.id in self.prefetched and len(worker.jobs) <= worker.slots and not worker.reclaiming:
            del self.prefetched[worker.id]

    def reset_credit(self, worker: WorkerRecord) -> None:
        """After every WELCOME a worker sends its full credit and starts its function cache afresh."""
        worker.credit = 0
        worker.fns.clear()
        self.hungry.pop(worker.id, None)

    def forget(self, worker: WorkerRecord) -> None:
        """A worker's record ended: it takes no more jobs."""
        self.hungry.pop(worker.id, None)
        if self.prefetched.get(worker.id) is worker:
            del self.prefetched[worker.id]

    def dispatch(self, now: float, reclaim: bool = True) -> None:
        """Fill idle slots first, spreading jobs evenly; only then use prefetch credit. Then, while a slot
        is idle, ask back a job prefetched behind long ones elsewhere (:meth:`reclaim`)."""
        farm = self.farm
        hungry, clients, move = self.hungry, farm.clients, self.moves.move
        for prefetch in (False, True):
            while farm.queued and hungry:
                room = {w: n for w in hungry.values()
                        if (n := w.credit if prefetch else min(w.credit, w.slots - len(w.jobs))) > 0}
                if not room:
                    break
                share = max(1, math.ceil(farm.queued / len(room)))
                placed = 0
                for worker, n in room.items():
                    for _ in range(min(n, share)):
                        job = self._next_for(worker, now)
                        if job is None:
                            break
                        move(job, ASSIGNED, clients[job.client_id], now, worker=worker)
                        placed += 1
                    if prefetch and len(worker.jobs) > worker.slots:
                        self.prefetched[worker.id] = worker
                    if worker.credit <= 0:
                        del self.hungry[worker.id]
                if not placed:
                    break
        if reclaim and self.prefetched and self.reclaim(now):
            self.dispatch(now, reclaim=False)  # jobs taken back unsent go to the idle slots now

    def reclaim(self, now: float) -> bool:
        """Take back prefetched jobs that would wait while a slot is idle elsewhere; returns whether some
        were taken back at once (never sent), to be dispatched again.

        One job comes back per idle slot (less those already being asked back), the newest first. One
        still in its worker's outbox comes back at once, for free. One already sent is asked back with
        RECLAIM only when every slot of its worker runs a job that reported STARTED (it has run 10 ms
        or more): behind shorter jobs it is about to start anyway, and asking would cost two messages
        for nothing. The worker gives it back (RETURNED: queued first, so the idle slot takes it, not
        the worker it came from), or had started it, and then it stays.
        """
        idle = [(w, n) for w in self.hungry.values() if (n := min(w.credit, w.slots - len(w.jobs))) > 0]
        if not idle:  # (the usual case while work waits: every slot took some)
            return False
        candidates = [job for h in self._holders() for job in _spare(h)]
        if not candidates:
            return False
        budget = sum(n for _, n in idle) - sum(len(h.reclaiming) for h in self.prefetched.values())
        taken_back = False
        for worker, free in idle:
            for _ in range(min(free, budget)):
                job = next((j for j in candidates if j.worker != worker.id and _fits_free(j, worker)), None)
                if job is None:
                    break
                candidates.remove(job)
                budget -= 1
                taken_back |= self._ask_back(job, now)
            if budget <= 0:
                break
        return taken_back

    def _holders(self) -> list[WorkerRecord]:
        """Workers holding more jobs than slots (forgetting those that hold no more and ask nothing)."""
        farm = self.farm
        for worker in list(self.prefetched.values()):
            if farm.workers.get(worker.id) is not worker or (
                    len(worker.jobs) <= worker.slots and not worker.reclaiming):
                del self.prefetched[worker.id]
        return [w for w in self.prefetched.values() if len(w.jobs) > w.slots]

    def _ask_back(self, job: Job, now: float) -> bool:
        """Take back a prefetched job now if it is unsent (True), else ask its worker with RECLAIM."""
        holder = self.farm.workers[job.worker or ""]
        if job in holder.outbox:
            self.farm.refund(job)  # it held no slot: its dispatch's charge goes back (as in give_back)
            self.moves.move(job, JobState.QUEUED, self.farm.clients[job.client_id], now, front=True)
            self.hungry[holder.id] = holder  # (its credit for the job is back)
            return True
        holder.reclaiming.add(job)
        holder.reclaims.append([job.client_id, job.seq])
        log.debug("asked worker %s to give back job %s: a slot is idle elsewhere", holder.id, job.name)
        return False

    def _next_for(self, worker: WorkerRecord, now: float) -> Job | None:
        """The next job for ``worker``: from the queue of highest priority, then lowest pass, whose
        first job may run now and fits what the worker has free."""
        farm = self.farm
        active = farm.active
        if len(active) == 1:  # one queue waiting (a lone client's, the usual): its entry is read and left
            queue = active[0][4]  # in place, lagging below the charged pass (no heap step)
            job = _first_queued(queue) if active[0][3] == queue.version else None
            if (job is not None and job.options is NO_OPTIONS and job.request is None
                    and not queue.suspended):
                queue.jobs.popleft()
                farm.charge(queue, job, listed=True)
                return job
        skipped: list[tuple[int, float, int, int, Queue]] = []  # their first job does not fit here
        found: tuple[Queue, Job] | None = None
        while active:
            entry = heappop(active)
            queue = entry[4]
            if entry[3] != queue.version:
                continue  # stale: the queue has a newer entry
            if entry[1] < queue.pass_:  # its pass grew since (a result's slot-time): put back in its place
                heappush(active, (entry[0], queue.pass_, entry[2], entry[3], queue))
                continue
            job = _first_queued(queue)
            if job is None or queue.suspended or (job.options is not NO_OPTIONS and _held_back(queue, job)):
                queue.scheduled = False  # scheduled again by resume, or when one of its jobs is over
                continue
            if job.request is not None and not self._fits(job, worker, now):
                skipped.append(entry)
                continue
            found = queue, job
            break
        for entry in skipped:
            heappush(active, entry)
        if found is None:
            return None
        queue, job = found
        queue.jobs.popleft()
        farm.charge(queue, job)  # fair share by slot-time: its pass moves on by the job's estimated run time
        return job

    def _fits(self, job: Job, worker: WorkerRecord, now: float) -> bool:
        """Whether ``job`` fits what ``worker`` has free now; if not, and the workers changed since it
        was last looked at, whether any worker could ever hold it (:meth:`_check_schedulable`)."""
        if _fits_free(job, worker):
            return True
        if job.checked != self.farm.workers_epoch:
            self._check_schedulable(job, now)
        return False

    def _check_schedulable(self, job: Job, now: float) -> None:
        """A job no connected worker could ever hold is shown as unschedulable; its client is told once."""
        request = job.request
        job.checked = self.farm.workers_epoch
        if request is None or not self.farm.workers:
            return
        why = unschedulable(request, list(self.farm.workers.values()))
        if not why:
            return
        client = self.farm.clients.get(job.client_id)
        queue = job.queue  # set aside: the jobs behind it go on
        queue.unschedulable = why
        if queue.jobs and queue.jobs[0] is job:
            queue.parked.append(queue.jobs.popleft())
        log.warning("job %s can run on no connected worker: %s", job.name, why)
        self.farm.records.event(now, "job-unschedulable", f"job {job.name}: {why}")
        if client is not None and client.present:
            self.farm.send(client, p.Notice(p.NoticeKind.UNSCHEDULABLE, [job.seq], why), now)

    def unpark(self) -> None:
        """A worker joined: jobs set aside as unschedulable are tried again, first in their queues."""
        for queue in self.farm.queues():
            if queue.parked:
                for job in reversed(queue.parked):
                    if job.state is JobState.QUEUED:  # (checked again: the workers changed)
                        queue.jobs.appendleft(job)
                queue.parked.clear()
                queue.unschedulable = ""
                if queue.queued:
                    self.farm.schedule(queue)

    def jobs_message(self, worker: WorkerRecord, now: float) -> p.Jobs:
        fns: list[bytes] = []
        fn_frames: list[Any] = []
        rows: list[list[Any]] = []
        job_frames: list[Any] = []
        clients = self.farm.clients
        upstream_results: dict[tuple[str, int], list[Any]] = {}  # each read once, however many dependents
        for job in worker.outbox:
            if job.fn_id not in worker.fns:
                fns.append(job.fn_id)
                fn_frames.append(clients[job.client_id].fns[job.fn_id])
                p.remember_fn(worker.fns, job.fn_id, None)
            options = job.options
            if job.devices:  # the slot sets CUDA_VISIBLE_DEVICES to these
                options = {**options, "gpu_ids": list(job.devices)}
            job_frames.extend(job.frames)
            nframes = len(job.frames)
            if job.after:  # the upstream results follow its own frames; the slot puts them in place
                upstream, counts = self.dependencies.frames(clients[job.client_id], job, now,
                                                            upstream_results)
                options = {**options, "upstream": counts}
                job_frames.extend(upstream)
                nframes += len(upstream)
            # p.JobRow(client_id, seq, attempt, fn_id, nframes, options).to_wire(), spelt out: once per job
            rows.append([job.client_id, job.seq, len(job.history), job.fn_id, nframes, options])
        worker.outbox = []
        return p.Jobs(fns, rows, fn_frames + job_frames)

    def give_back(self, worker: WorkerRecord, jobs: list[Job], now: float) -> None:
        """Jobs a worker returned unrun (it is leaving): they queue again, first."""
        for job in jobs:
            client = self.farm.clients.get(job.client_id)
            if job.state is JobState.ASSIGNED and worker.jobs.get(job.key) is job and client is not None:
                self.farm.refund(job)  # it held no slot: its dispatch's charge goes back to its queue
                self.moves.move(job, JobState.QUEUED, client, now, finisher=worker, front=True)

    def requeue(self, worker: WorkerRecord, why: Departure, detail: str, now: float) -> None:
        """A worker's record ended: its jobs queue again, first (those it died running count a loss)."""
        jobs = list(worker.jobs.values())  # in the order they were given to it
        if not why.alive:  # the worker died running some of these: count it against them
            unsent = set(worker.outbox)  # (sets of jobs by identity: a list scan per job is quadratic)
            # The oldest `slots` jobs it had received are the ones running; the rest were prefetched.
            running = set([job for job in jobs if job not in unsent][:worker.slots])
            jobs = [job for job in jobs if job not in running or not self._poisoned(job, worker, detail, now)]
        if jobs:
            log.warning("worker %s %s: requeued its %d jobs", worker.id, detail, len(jobs))
        for job in reversed(jobs):  # each goes to the front: keep the original order
            client = self.farm.clients.get(job.client_id)
            if client is not None and job.state is JobState.ASSIGNED:
                self.moves.move(job, JobState.QUEUED, client, now, front=True)
        worker.jobs.clear()
        worker.outbox.clear()
        worker.started.clear()
        worker.reclaiming.clear()
        worker.reclaims.clear()

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
        self.delivery.end_unrun(client, job, p.Outcome.LOST, info, now, worker=worker)
        return True


def _spare(holder: WorkerRecord) -> list[Job]:
    """The prefetched jobs of ``holder`` that may be taken back, newest first: unsent ones, and sent
    ones waiting behind long jobs (every slot runs one that reported STARTED); none asked back already."""
    excess = len(holder.jobs) - holder.slots - len(holder.reclaiming)
    behind_long = len(holder.started) >= holder.slots
    if excess <= 0 or not (behind_long or holder.outbox):
        return []
    unsent = set(holder.outbox)
    spare: list[Job] = []
    for job in reversed(holder.jobs.values()):
        if job in holder.started or job in holder.reclaiming or not (behind_long or job in unsent):
            continue
        spare.append(job)
        if len(spare) == excess:
            break
    return spare


def _fits_free(job: Job, worker: WorkerRecord) -> bool:
    """Whether ``job`` fits what ``worker`` has free now."""
    request = job.request
    return request is None or (request.tags <= worker.tags
                               and all(worker.free.get(k, 0.0) >= v for k, v in request.amounts.items()))


def _first_queued(queue: Queue) -> Job | None:
    """The queue's first job still QUEUED (those that left the state are dropped here, lazily)."""
    jobs = queue.jobs
    while jobs:
        job = jobs[0]
        if job.state is JobState.QUEUED:
            return job
        jobs.popleft()
    return None


def _held_back(queue: Queue, job: Job) -> bool:
    """Whether the queue's first job must wait: its queue runs as many jobs as it allows (option
    ``max_running``: job arrays, projects)."""
    cap = job.options.get("max_running")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        return False
    return queue.running >= cap


def unschedulable(request: Request, workers: list[WorkerRecord]) -> str:
    """Why no worker of these could ever hold a job asking ``request`` ("" if one could)."""
    if any(request.tags <= w.tags and all(w.resources.get(k, 0.0) >= v for k, v in request.amounts.items())
           for w in workers):
        return ""
    wanted = ", ".join([f"{k}={_amount(k, v)}" for k, v in sorted(request.amounts.items())]
                       + [f"tag {t}" for t in sorted(request.tags)])
    most = {k: max(w.resources.get(k, 0.0) for w in workers) for k in request.amounts}
    have = [f"at most {', '.join(f'{k}={_amount(k, v)}' for k, v in sorted(most.items()))}"] if most else []
    tags = sorted({t for w in workers for t in w.tags})
    if request.tags:
        have.append(f"tags {','.join(tags)}" if tags else "no tags")
    whom = "the connected worker has" if len(workers) == 1 else f"the {len(workers)} connected workers have"
    return (f"it asks for {wanted}; {whom} {' and '.join(have)}: start a worker with "
            f"--resources/--tags that fit, or ask for less")


def _amount(name: str, value: float) -> str:
    if name == "mem":
        return f"{value / 2**30:.3g}G"
    return f"{value:g}"
