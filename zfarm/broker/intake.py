"""Jobs coming in: SUBMIT accepted, bounced or recognised as a resubmission; CANCEL.

A session's jobs carry a digest of their function and arguments, so that a rerun sending the same
job under the same number is answered from what the broker has (the job goes on, or its held
result is sent again), and one sending other content under that number replaces it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from zfarm import protocol as p
from zfarm.broker.delivery import Delivery
from zfarm.broker.dependencies import Dependencies, upstream_of
from zfarm.broker.farm import Farm
from zfarm.broker.functions import Functions
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.projects import BadProject, Projects
from zfarm.broker.state import (
    NO_OPTIONS,
    ClientRecord,
    Job,
    JobState,
    Queue,
    Request,
    compact,
    valid_amounts,
    valid_tags,
)

log = logging.getLogger("zfarm.broker.scheduler")
QUEUED = JobState.QUEUED


class Intake:
    def __init__(self, farm: Farm, moves: JobMoves, delivery: Delivery, functions: Functions,
                 projects: Projects, dependencies: Dependencies) -> None:
        self.projects = projects
        self.dependencies = dependencies
        self.farm = farm
        self.moves = moves
        self.delivery = delivery
        self.functions = functions

    def submit(self, client: ClientRecord, msg: p.Submit, now: float) -> None:
        farm = self.farm
        frames = msg.frames
        fn_id = msg.fn_id
        if msg.with_fn:
            self.functions.store(client, fn_id, frames[0])
            frames = frames[1:]
        known_fn = fn_id in client.fns
        max_queued = farm.settings.max_queued
        end = 0
        for wire in msg.jobs:  # (this runs once per job: nothing made that is not needed)
            seq, nframes, options = wire  # p.SubmitRow.from_wire(wire), spelt out
            start, end = end, end + nframes
            digest = _digest(fn_id, frames[start:end]) if client.session else b""
            if (seq in client.jobs or seq in client.held) and self._resubmitted(client, seq, digest, now):
                continue
            if (not known_fn or (max_queued and farm.queued >= max_queued)
                    or (farm.journal is not None and farm.journal.problem)):
                self._bounce(client, seq, known_fn, now)
                continue
            payload = tuple(map(compact, frames[start:end]))
            if not options:  # the usual job: its client's own queue, no phase, request or upstream jobs
                job = Job(client.id, seq, fn_id, payload, NO_OPTIONS, now, client.own, digest=digest)
            else:
                try:
                    queue, phase, request = self.placement_of(client, options, now)
                    after = upstream_of(options, seq)
                except BadProject as exc:
                    self.delivery.bounce(client, seq, p.Outcome.LOST, str(exc), now, p.ResultKind.REFUSED)
                    continue
                job = Job(client.id, seq, fn_id, payload, options, now, queue, digest=digest, phase=phase,
                          request=request, after=after)
            if client.attempts_used:
                job.history = ("",) * client.attempts_used.pop(seq, 0)  # attempts of a retired job
            if client.session:
                client.accepted.append(seq)
            self.admit(client, job, now)
        if known_fn and not client.fn_users.get(fn_id):  # no job it accepted uses the function
            self.functions.idle_since(client, fn_id, now)

    def _bounce(self, client: ClientRecord, seq: int, known_fn: bool, now: float) -> None:
        """Hand a new job straight back: its function is unknown, the queue is full, or the journal
        cannot be written (it could promise nothing)."""
        farm = self.farm
        if not known_fn:
            self.delivery.bounce(client, seq, p.Outcome.LOST, p.FUNCTION_MISSING, now,
                                 p.ResultKind.FUNCTION_MISSING)
        elif farm.settings.max_queued and farm.queued >= farm.settings.max_queued:
            self.delivery.bounce(client, seq, p.Outcome.BUSY, "the broker's queue is full", now)
        elif farm.journal is not None:
            self.delivery.bounce(client, seq, p.Outcome.JOURNAL_FULL, f"the broker cannot write its "
                                 f"journal {farm.journal.path} ({farm.journal.problem})", now)

    def admit(self, client: ClientRecord, job: Job, now: float) -> None:
        """A new job queues, or waits for its upstream jobs or its phase."""
        if job.after:
            self.dependencies.admit(client, job, now)
        elif job.phase:
            self.moves.admit(job, client, now)
        else:
            self.moves.move(job, JobState.QUEUED, client, now)

    def placement_of(self, client: ClientRecord, options: dict[str, Any],
                      now: float) -> tuple[Queue, int, Request | None]:
        """A job's queue, phase and resource request, from its options.

        Raises:
            BadProject: an option of the wrong type or range.
        """
        if options is NO_OPTIONS:
            return client.own, 0, None
        queue = self.projects.queue_for(client, options, now)
        phase = options.get("phase", 0)
        if not isinstance(phase, int) or isinstance(phase, bool) or not 0 <= phase <= 1_000_000:
            raise BadProject(f"a job's phase is an integer from 0 to 1000000, not {phase!r}")
        return queue, phase, request_of(options)

    def cancel(self, client: ClientRecord, msg: p.Cancel, now: float) -> None:
        for seq in msg.seqs:
            job = client.jobs.get(seq)
            if job is not None:
                self.retire(client, job, now)

    def retire(self, client: ClientRecord, job: Job, now: float) -> None:
        """Cancel a client's unfinished job. A session may send its number again with other content:
        the next job under that number goes on counting attempts, so the old run's result is refused."""
        self.moves.move(job, JobState.CANCELLED, client, now)  # (its dependents fail)
        if client.session and job.history:
            client.attempts_used[job.seq] = len(job.history)

    def _resubmitted(self, client: ClientRecord, seq: int, digest: bytes, now: float) -> bool:
        """Whether a submitted job is one we have: unfinished (it goes on) or held (sent again).

        A session's job whose function or arguments differ from what we have under its
        number is a new job: what we had is dropped, never answered in its place.
        """
        job = client.jobs.get(seq)
        held = client.held.get(seq)
        if job is not None and job.digest == digest:
            if client.session:
                client.accepted.append(seq)
                worker = self.farm.workers.get(job.worker) if job.worker else None
                if worker is not None and job in worker.started:
                    client.started.append(seq)  # a rejoining client hears that it runs
            return True
        if held is not None and held.outcome == p.Outcome.CORRUPTED:
            digest = held.digest  # what the job was is unknown: whatever asks for it hears it is damaged
        same = held is not None and held.digest == digest
        whole = self.delivery.held_result(client, seq, held, now) if held is not None and same else None
        if whole is not None and whole.frames is not None:
            if client.session:
                client.accepted.append(seq)
            self.delivery.resend(client, seq, whole)
            return True
        if job is not None or held is not None:
            if held is not None and held.digest == digest:  # the same job, but its result is gone
                log.error("job %s:%d: the journal has lost its held result; running it again", client.id, seq)
            else:
                log.warning("session %s sent job %d with other content than before: running the new one",
                            p.clip(client.session), seq)
                self.farm.records.event(now, "job-replaced",
                                        f"job {client.id}:{seq} changed: the new one runs")
            if job is not None:
                self.retire(client, job, now)
            self.delivery.drop_held(client, seq)
        return False


def _digest(fn_id: bytes, frames: Sequence[Any]) -> bytes:
    """What a session's job is: its function and arguments, hashed."""
    h = hashlib.blake2b(fn_id, digest_size=16)
    for frame in frames:
        h.update(p.buffer_of(frame))
    return h.digest()


def request_of(options: dict[str, Any]) -> Request | None:
    """A job's request from its options ``resources`` ({name: amount}, mem in bytes) and ``tags``.

    Raises:
        BadProject: amounts that are not numbers of 0 or more, names or tags that are not short texts.
    """
    amounts, tags = options.get("resources"), options.get("tags")
    if amounts is None and tags is None:
        return None
    amounts = amounts if amounts is not None else {}
    tags = tags if tags is not None else []
    if not valid_amounts(amounts):
        raise BadProject(f"resources are up to 32 names with amounts of 0 or more (mem in bytes), not "
                         f"{str(amounts)[:200]}")
    if not valid_tags(tags):
        raise BadProject(f"tags are up to 32 short texts, not {str(tags)[:200]}")
    return Request({k: float(v) for k, v in amounts.items() if v}, frozenset(tags))
