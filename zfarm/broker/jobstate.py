"""The one door through which a job changes state, checked against the allowed moves.

::

    SUBMITTED ──► QUEUED ──dispatch──► ASSIGNED(worker) ──result / poison──► FINISHED
                    ▲  │ └──── result from before a broker restart ─────────────────┘
                    │  │                  │
                    │  │                  └── worker dead, left, gave it back ──► QUEUED
                    │  └── cancel ──► CANCELLED ◄── cancel ──┘

:meth:`JobMoves.move` is the only code that assigns ``job.state``. Along with the state it keeps
what depends on it in step: the queued and running counts (client, queue, farm), the job's queue
(its project's or its client's own) and that queue's place in the dispatch list and phases, the
worker's jobs, credit, outbox and free resources, the client's unfinished jobs and
their functions' users, the requeued counter, the done, failed and cancelled counts of the job's
queue, client and farm (by its outcome: one ended CANCELLED counts as cancelled, whoever ended it),
its dependents (told it is over), and the journal's job rows (a finished job's row is replaced by
its result row, written with the result).
"""

from __future__ import annotations

from collections.abc import Callable

from zfarm import protocol as p
from zfarm.broker.farm import Farm
from zfarm.broker.state import ClientRecord, Job, JobState, Queue, WorkerRecord

S = JobState
#: every (from, to) a job may take; anything else is a bug in the broker and raises
ALLOWED: frozenset[tuple[JobState, JobState]] = frozenset({
    (S.SUBMITTED, S.QUEUED),  # accepted from a client, or read back from the journal
    (S.SUBMITTED, S.WAITING),  # the same, while earlier phases of its project are unfinished
    (S.WAITING, S.QUEUED),  # its phase began
    (S.WAITING, S.CANCELLED),  # cancelled before its phase began
    (S.WAITING, S.FINISHED),  # its project was cancelled
    (S.QUEUED, S.ASSIGNED),  # dispatched to a worker with credit
    (S.ASSIGNED, S.QUEUED),  # its worker died, left or gave it back: it runs again
    (S.ASSIGNED, S.FINISHED),  # a result came, or it was declared poison
    (S.QUEUED, S.FINISHED),  # read back from a journal, it waited; the old broker's worker answered
    (S.QUEUED, S.CANCELLED),  # its client cancelled it, replaced it or went away for good
    (S.ASSIGNED, S.CANCELLED),
})


QUEUED, ASSIGNED, CANCELLED, WAITING, FINISHED = S.QUEUED, S.ASSIGNED, S.CANCELLED, S.WAITING, S.FINISHED
OK = p.Outcome.OK


class IllegalMove(RuntimeError):
    """A move the table does not allow: a bug in the broker, never caused by a peer."""

    def __init__(self, job: str, start: JobState, finish: JobState) -> None:
        super().__init__(f"job {job}: no move from {start.value} to {finish.value} (a bug in the broker)")
        self.job, self.start, self.finish = job, start, finish


class JobMoves:
    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        #: told of each job that is over (its outcome, and its info line): its dependents go on or fail
        self.on_ended: Callable[[ClientRecord, Job, int, str, float], None] = lambda *_: None

    def move(self, job: Job, to: JobState, client: ClientRecord, now: float, *,
             worker: WorkerRecord | None = None, finisher: WorkerRecord | None = None,
             front: bool = False, outcome: int | None = None, info: str = "") -> None:
        """Move ``job`` of ``client`` to ``to``.

        ``worker``: the worker it is assigned to (ASSIGNED). ``finisher``: the worker that answered
        for it (it is not told to cancel it). ``front``: queue it first (a requeued job).
        ``outcome``: how it ended (FINISHED; a job moved to CANCELLED ended CANCELLED). ``info``: its
        result's info line (why it failed: its dependents' results say it).

        Raises:
            IllegalMove: the table does not allow this move.
        """
        start = job.state
        if ((start, to) not in ALLOWED or (to is ASSIGNED and worker is None)
                or (to is FINISHED and outcome is None)):
            raise IllegalMove(job.name, start, to)
        farm = self.farm
        queue = job.queue
        # leave the old state (a queued job leaves its queue lazily: dispatch skips it)
        if start is QUEUED:
            client.queued -= 1
            queue.queued -= 1
            farm.queued -= 1
        elif start is ASSIGNED:
            queue.running -= 1
            self._release(job, finisher)
        else:  # SUBMITTED or WAITING
            self._arrive(start, client, queue, job)
        job.state = to
        if to is WAITING:
            if not job.waiting_for:  # (one waiting for upstream jobs joins it when they are done: ready)
                queue.waiting.setdefault((client.id, job.phase), []).append(job)
            queue.waiting_jobs += 1
            client.waiting += 1
        elif to is QUEUED:
            job.worker = None
            if front:
                queue.jobs.appendleft(job)
            else:
                queue.jobs.append(job)
            client.queued += 1
            queue.queued += 1
            farm.queued += 1
            if not queue.scheduled:
                farm.schedule(queue)
            if start is ASSIGNED:
                farm.counters.requeued += 1
        elif to is ASSIGNED and worker is not None:  # (checked above: a move there names its worker)
            job.worker = worker.id
            job.history += (worker.id,)
            worker.jobs[(job.client_id, job.seq)] = job
            worker.credit -= 1
            worker.outbox.append(job)
            queue.running += 1
            if job.request is not None:
                take(worker, job)
        else:  # FINISHED or CANCELLED: over for its client
            self._forget(client, queue, job, now, p.Outcome.CANCELLED if to is CANCELLED else outcome, info)

    def admit(self, job: Job, client: ClientRecord, now: float) -> None:
        """A new job queues, or waits if an earlier phase of its client's jobs in its queue is unfinished."""
        queue = job.queue
        first = queue.first_phase(client.id) if job.phase else None
        self.move(job, WAITING if first is not None and first < job.phase else QUEUED, client, now)

    def ready(self, job: Job, client: ClientRecord, now: float) -> None:
        """A WAITING job's upstream jobs succeeded: it queues, or waits on for its phase."""
        queue = job.queue
        first = queue.first_phase(client.id) if job.phase else None
        if first is not None and first < job.phase:
            queue.waiting.setdefault((client.id, job.phase), []).append(job)  # (still WAITING)
        else:
            self.move(job, QUEUED, client, now)

    def _arrive(self, start: JobState, client: ClientRecord, queue: Queue, job: Job) -> None:
        """Out of SUBMITTED (a new job: one of the client's unfinished jobs, a user of its function,
        journaled) or of WAITING (it leaves its waiting list when its phase begins, or lazily)."""
        if start is WAITING:
            queue.waiting_jobs -= 1
            client.waiting -= 1
            return
        client.jobs[job.seq] = job
        fn_id = job.fn_id
        client.fn_users[fn_id] = client.fn_users.get(fn_id, 0) + 1
        if client.fn_idle:
            client.fn_idle.pop(fn_id, None)
        client.submitted += 1
        queue.submitted += 1
        key = (client.id, job.phase)
        queue.phases[key] = queue.phases.get(key, 0) + 1
        journal = self.farm.journal
        if journal is not None:
            if job.recovered_after < 0:  # a recovered job's row is there already
                journal.job(job, self.farm.records.wall(job.queued_at))
            if queue.name:
                self.farm.counted.add(queue)  # (its row's counts are written with this turn)

    def _next_phase(self, client: ClientRecord, queue: Queue, now: float) -> None:
        """A phase of ``client``'s jobs here is over: the jobs of the next one queue."""
        for job in _begun(queue, client):
            if job.state is WAITING:  # (listed once; checked again all the same)
                self.move(job, QUEUED, client, now)

    def _release(self, job: Job, finisher: WorkerRecord | None) -> None:
        """Take a job back from the worker holding it (telling that worker if it still runs it)."""
        holder = self.farm.workers.get(job.worker or "")
        if holder is not None and holder.jobs.pop((job.client_id, job.seq), None) is not None:
            if job.request is not None:
                give_back(holder, job)
            if holder.started:
                holder.started.discard(job)
            if holder.reclaiming:
                holder.reclaiming.discard(job)
            if holder is finisher:
                return
            if job in holder.outbox:  # never sent: the worker never counted it against its credit
                holder.outbox.remove(job)
                holder.credit += 1
            else:
                holder.cancels.append([job.client_id, job.seq])

    def _forget(self, client: ClientRecord, queue: Queue, job: Job, now: float,
                outcome: int | None, info: str = "") -> None:
        """The job is over for its client, counted by its outcome; its dependents are told; its function
        is kept a little while for the next jobs."""
        farm = self.farm
        counters = farm.counters
        known = farm.clients.get(client.id) is client  # (a dropped client's jobs end with it)
        if outcome == OK:
            queue.done += 1
            client.done += 1
            counters.done += 1
        elif outcome == p.Outcome.CANCELLED:
            queue.cancelled += 1
            client.cancelled += 1
            counters.cancelled += 1
        else:
            queue.failed += 1
            client.failed += 1
            counters.failed += 1
        if job.state is FINISHED:
            if queue.name:  # a project's throughput
                queue.finished.add(now)
        elif farm.journal is not None and known:  # (a dropped client's rows go with it)
            farm.journal.drop_job(client.id, job.seq)  # (a finished job's is replaced by its result's)
        if queue.name and farm.journal is not None:
            farm.counted.add(queue)  # (its row's counts are written with this turn)
        client.jobs.pop(job.seq, None)
        key = (client.id, job.phase)
        left = queue.phases[key] = queue.phases[key] - 1
        if not left:
            del queue.phases[key]
            if queue.waiting_jobs:
                self._next_phase(client, queue, now)
        if queue.queued and not queue.scheduled and known:
            self.farm.schedule(queue)  # it was held back by its max_running
        users = client.fn_users.get(job.fn_id, 0) - 1
        client.fn_users[job.fn_id] = users
        if users <= 0:
            client.fn_idle[job.fn_id] = now  # let go FN_KEEP_S from now (see Functions)
        if client.dependents and known:
            self.on_ended(client, job, int(p.Outcome.CANCELLED) if outcome is None else outcome, info, now)


def take(worker: WorkerRecord, job: Job) -> None:
    """A job's request is taken from what its worker has free (GPU ids too)."""
    if job.request is None:
        return
    for name, amount in job.request.amounts.items():
        worker.free[name] = worker.free.get(name, 0.0) - amount
    gpus = int(job.request.amounts.get("gpus", 0))
    if gpus:
        job.devices, worker.gpu_ids = tuple(worker.gpu_ids[:gpus]), worker.gpu_ids[gpus:]


def give_back(worker: WorkerRecord, job: Job) -> None:
    if job.request is None:
        return
    for name, amount in job.request.amounts.items():
        worker.free[name] = worker.free.get(name, 0.0) + amount
    worker.gpu_ids.extend(job.devices)
    job.devices = ()


def _begun(queue: Queue, client: ClientRecord) -> list[Job]:
    """The waiting jobs of ``client`` in ``queue`` whose phase has begun, taken out of waiting."""
    first = queue.first_phase(client.id)
    begun: list[Job] = []
    for key in sorted(k for k in queue.waiting if k[0] == client.id):
        if first is not None and key[1] > first:
            break
        begun.extend(j for j in queue.waiting.pop(key) if j.state is WAITING and not j.waiting_for)
    return begun
