"""Results: from the worker that ran a job to the client that owns it, held until it says RECEIVED.

::

    RESULTS(worker) ──► accept the first answer for the attempt ──► FINISHED ──► held ──► RESULT(client)
                                                                                  │
                           RECEIVED(client) ──► forgotten ◄───────────────────────┘

A result is held until its client says it received it, and sent again if the client asks for the
job again. A session client's results outlive its connection; with a journal they outlive the
broker too. Where a held result's payload lives (memory, journal, spill file) is
:class:`~zfarm.broker.held.HeldResults`'s business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from zfarm import protocol as p
from zfarm.broker.farm import Farm
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.state import ClientRecord, Held, Job, JobState, WorkerRecord, compact
from zfarm.errors import JournalCorrupted, ProtocolError

log = logging.getLogger("zfarm.broker.scheduler")

_OUTCOMES = {int(o) for o in p.Outcome}
_NAMES = {int(o): o.name.lower() for o in p.Outcome}  # as the history shows them
OK, CANCELLED, RETURNED = int(p.Outcome.OK), int(p.Outcome.CANCELLED), int(p.Outcome.RETURNED)
PLAIN = int(p.ResultKind.PLAIN)
FINISHED = JobState.FINISHED
_new_tuple = tuple.__new__  # a typed row from a checked wire row, in C (RunStats.from_wire, spelt out)


class Delivery:
    def __init__(self, farm: Farm, moves: JobMoves) -> None:
        self.farm = farm
        self.moves = moves
        #: told of each failed job (its project's on_error); returns the kind its result row carries
        self.on_failure: Callable[[Job, float], int] = lambda _job, _now: p.ResultKind.PLAIN

    # ---- from workers ----------------------------------------------------------------------------

    def results(self, worker: WorkerRecord, msg: p.Results, now: float) -> list[Job]:
        """Take a worker's results; returns the jobs it gave back unrun (RETURNED), to queue again."""
        returned: list[Job] = []
        clients = self.farm.clients
        frames, stats, kinds = msg.frames, msg.stats, msg.kinds
        end = 0
        for i, wire in enumerate(msg.results):  # (this runs once per job: nothing made that is not needed)
            client_id, seq, attempt, outcome, nframes, info = wire  # p.ResultsRow.from_wire, spelt out
            start, end = end, end + nframes
            client = clients.get(client_id)
            job = client.jobs.get(seq) if client is not None else None
            if job is None or client is None or not _ran(job, worker, attempt):
                if outcome != CANCELLED:
                    self.farm.counters.late_results += 1
                continue
            if outcome == CANCELLED:
                continue  # only a client's CANCEL ends a job; this acknowledges one
            if outcome == RETURNED:
                returned.append(job)
                continue
            if outcome not in _OUTCOMES:
                raise ProtocolError(f"unknown outcome {outcome}")
            if job.worker == worker.id and attempt < len(job.history):
                # a resent result of an earlier attempt: the later copy this worker holds is not needed
                worker.cancels.append([client_id, seq])
            self.finish(worker, client, job, outcome, list(map(compact, frames[start:end])), info,
                        _new_tuple(p.RunStats, stats[i]) if stats else p.NO_RUN_STATS, now,
                        kinds[i] if kinds else PLAIN)
        return returned

    def finish(self, worker: WorkerRecord, client: ClientRecord, job: Job, outcome: int,
               frames: list[Any], info: str, run: p.RunStats, now: float, kind: int = PLAIN) -> None:
        """A worker's result ends the job (``outcome``: a :class:`~zfarm.protocol.Outcome`)."""
        if run.finished_at:  # fair share: charge the slot-time it really took (a job read back from the
            self.farm.ran(job, run.run_s)  # journal too, answered by the old broker's worker: none charged)
        self.moves.move(job, FINISHED, client, now, finisher=worker, outcome=outcome, info=info)
        if outcome == OK:
            worker.done += 1
        else:
            worker.failed += 1
            log.info("job %s failed on worker %s: %s", job.name, worker.id, p.clip(info))
            self.farm.records.event(now, "job-failed", f"job {job.name} failed on {worker.id}: {info}")
            if kind == PLAIN:
                kind = self.on_failure(job, now)
        self.deliver(client, job, outcome, frames, info, run, now, kind, worker)

    def end_unrun(self, client: ClientRecord, job: Job, outcome: p.Outcome, info: str, now: float,
                  kind: int = p.ResultKind.PLAIN, worker: WorkerRecord | None = None) -> None:
        """End an unfinished job that did not run to its end (cancelled with its project, an upstream
        job failed, poison): FINISHED with ``outcome``, its client told. ``worker``: the one it was on."""
        self.moves.move(job, FINISHED, client, now, outcome=outcome, info=info)
        at = self.farm.records.wall(now)
        self.deliver(client, job, outcome, [], info, p.RunStats(at, at, 0.0, 0), now, kind, worker)

    def deliver(self, client: ClientRecord, job: Job, outcome: int, frames: list[Any], info: str,
                run: p.RunStats, now: float, kind: int = PLAIN, worker: WorkerRecord | None = None) -> None:
        """Keep the finished job's record in the history, hold its result until the client says it has
        it, and send it if the client is here (it was counted, and its dependents told, as it moved to
        FINISHED: :class:`JobMoves`).

        ``worker``: the one that ran it (None: none did)."""
        farm = self.farm
        records = farm.records
        queued_at = records.wall(job.queued_at)
        worker_id, host = (worker.id, worker.host) if worker is not None else ("", "")
        attempt = len(job.history)
        records.job(now, (job.name, job.client_id, worker_id, host, queued_at, run.started_at,
                          run.finished_at, round(run.run_s, 6), attempt, _NAMES[outcome],
                          run.peak_rss_bytes, info))
        # p.JobStats(...).to_wire(), spelt out: this runs once per job
        stats = [worker_id, host, attempt, queued_at, run.started_at, run.finished_at, run.run_s,
                 run.peak_rss_bytes]
        seq = job.seq
        held = Held(outcome, frames, info, stats, job.digest, kind=kind)
        client.held[seq] = held
        if farm.journal is not None:
            farm.journal.result(client.id, seq, held)  # it replaces the job's row
        # A session's are kept until the session ends: with a journal, on disk, not in memory.
        farm.held_results.keep(client.id, seq, held, farm.journal is not None and client.session != "")
        if not client.present:
            return  # it is sent when the client asks for the job again
        if len(info) > p.MAX_TEXT_CHARS:
            to_client(client, p.ResultRow(seq, outcome, len(frames), info, kind), frames, stats)
        else:  # the same, spelt out (p.ResultRow(...).to_wire()): this runs once per job
            client.out_rows.append([seq, outcome, len(frames), info, kind])
            client.out_frames.extend(frames)
            client.out_stats.append(stats)

    def started(self, worker: WorkerRecord, msg: p.Started) -> None:
        """Tell clients which of their jobs run now (their futures' ``running()``); the worker's jobs
        known to run are what placement reclaims prefetched jobs behind (no longer one to reclaim)."""
        for client_id, seq in msg.keys:
            client = self.farm.clients.get(client_id)
            job = client.jobs.get(seq) if client is not None else None
            if client is None or job is None or worker.jobs.get(job.key) is not job:
                continue
            worker.started.add(job)
            worker.reclaiming.discard(job)  # it ran before our RECLAIM reached it: it stays there
            if client.present:
                client.started.append(seq)

    # ---- held results ----------------------------------------------------------------------------

    def received(self, client: ClientRecord, msg: p.Received) -> None:
        # ``below``: the client has every result under it (it covers RECEIVEDs that were lost)
        below = [seq for seq in client.held if seq < msg.below] if msg.below else []
        for seq in [*msg.seqs, *below]:
            self.drop_held(client, seq)

    def drop_held(self, client: ClientRecord, seq: int) -> None:
        held = client.held.pop(seq, None)
        if held is not None:
            self.farm.held_results.forget(client.id, seq, held)
            if self.farm.journal is not None:
                self.farm.journal.drop_result(client.id, seq)

    def held_result(self, client: ClientRecord, seq: int, held: Held, now: float) -> Held | None:
        """A held result whole, from memory or from disk (None: it is gone; a damaged one is now a
        JournalCorrupted failure)."""
        try:
            return self.farm.held_results.read(client.id, seq, held)
        except JournalCorrupted as exc:
            self.damaged(client, seq, exc.detail, now, where=exc.journal if self.farm.journal is None else "")
            return client.held[seq]

    def resend(self, client: ClientRecord, seq: int, whole: Held) -> None:
        """Send a held result again (its client asked for the job again)."""
        frames = whole.frames or []
        to_client(client, p.ResultRow(seq, whole.outcome, len(frames), whole.info, whole.kind), frames,
                  whole.stats)

    def damaged(self, client: ClientRecord, seq: int, why: str, now: float, where: str = "") -> None:
        """A job whose payload on disk changed: never run or delivered, it fails with JournalCorrupted.

        ``where``: the file, if not the journal (the spill file)."""
        farm = self.farm
        where = where or f"the broker's journal {farm.journal_path}"
        info = f"{where}: {why}"
        log.error("job %s:%d is damaged in %s: it fails with JournalCorrupted instead of running or being "
                  "delivered (%s)", client.id, seq, where, why)
        farm.records.event(now, "job-damaged", f"job {client.id}:{seq} damaged in {where} ({why})")
        farm.counters.corrupted += 1
        if (old := client.held.pop(seq, None)) is not None:
            farm.held_results.forget(client.id, seq, old)
        at = farm.records.wall(now)
        held = Held(int(p.Outcome.CORRUPTED), [], info, _no_run(at))
        client.held[seq] = held
        farm.held_results.keep(client.id, seq, held)
        if farm.journal is not None:
            farm.journal.result(client.id, seq, held)  # replaces the damaged row, sealed afresh

    def bounce(self, client: ClientRecord, seq: int, outcome: p.Outcome, info: str, now: float,
               kind: p.ResultKind = p.ResultKind.PLAIN) -> None:
        """Hand a job straight back, unaccepted: the client sends it again (counted nowhere)."""
        at = self.farm.records.wall(now)
        to_client(client, p.ResultRow(seq, int(outcome), 0, info, kind), [], _no_run(at))
        self.farm.counters.bounced += 1


def _no_run(at: float) -> list[Any]:
    """The RESULT stats of a job that ran nowhere, at ``at`` (epoch seconds)."""
    return p.JobStats("", "", 0, at, at, at, 0.0, 0).to_wire()


def to_client(client: ClientRecord, row: p.ResultRow, frames: list[Any], stats: list[Any]) -> None:
    """Add a result to the RESULT message the client gets at the next flush."""
    if len(row.info) > p.MAX_TEXT_CHARS:  # the client's bound
        row = p.ResultRow(row.seq, row.outcome, row.nframes, row.info[:p.MAX_TEXT_CHARS], row.kind)
    client.out_rows.append(row.to_wire())
    client.out_frames.extend(frames)
    client.out_stats.append(stats)


def _ran(job: Job, worker: WorkerRecord, attempt: int) -> bool:
    """Whether ``worker`` was given this very job as this attempt (a result for it is an answer).

    A job read back from a journal takes a result from any worker: the broker that gave it out is gone.
    Not of an attempt that ran the job it replaced, though.
    """
    if 0 <= job.recovered_after < attempt:
        return True
    return 0 < attempt <= len(job.history) and job.history[attempt - 1] == worker.id
