"""Dependencies: a job whose arguments hold other jobs' futures waits until those jobs succeed.

::

    SUBMIT row options {"after": [seq, …]}  (the client's ``Upstream`` placeholders, in order)
        upstream unfinished ──► WAITING ── each upstream OK ──► QUEUED ──► JOBS: its frames, then each
        upstream failed, cancelled or unknown ──► FINISHED (LOST, DEPENDENCY_FAILED)      upstream result's

The broker never unpickles: it appends each upstream job's held result frames to the job's own
(option ``upstream``: how many frames each), and the slot puts the values in place of the
placeholders. The client keeps upstream results held (it does not say RECEIVED for them) until
their dependents are over, so they are there to send. A chain runs while its client is away.
A dependent that does not run says why in its result's info: ``UPSTREAM: how it ended[: the first
line of its info]``, e.g. ``c-…:8: it failed: ZeroDivisionError: division by zero``.
"""

from __future__ import annotations

import logging
from typing import Any

from zfarm import protocol as p
from zfarm.broker.delivery import Delivery
from zfarm.broker.farm import Farm
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.projects import BadProject
from zfarm.broker.state import ClientRecord, Job, JobState

log = logging.getLogger("zfarm.broker.scheduler")

MAX_UPSTREAM = 1024


def upstream_of(options: dict[str, Any], seq: int) -> tuple[int, ...]:
    """A job's upstream seqs from its options (``after``).

    Raises:
        BadProject: not a list of up to 1024 earlier job numbers.
    """
    after = options.get("after")
    if after is None:
        return ()
    if (not isinstance(after, list) or len(after) > MAX_UPSTREAM
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < seq for s in after)):
        raise BadProject(f"a job's upstream jobs (after) are up to {MAX_UPSTREAM} numbers of earlier jobs, "
                         f"not {str(after)[:200]}")
    return tuple(after)


#: how an upstream job that did not succeed ended, by its outcome (its info line follows)
_ENDINGS = {
    p.Outcome.ERROR: "it failed",
    p.Outcome.CRASHED: "it crashed",
    p.Outcome.LOST: "it was lost",
    p.Outcome.CANCELLED: "it was cancelled",
    p.Outcome.CORRUPTED: "its stored copy is damaged",
}
#: the upstream job's info line in its dependents' (a chain's root cause shows in each, nested)
WHY_CHARS = 300


def how_it_ended(outcome: int, info: str) -> str:
    """Why an upstream job's dependents do not run: how it ended and the first line of its info (its
    error, e.g. ``it failed: ZeroDivisionError: division by zero``), clipped: the broker never
    unpickles the error itself."""
    try:
        ended = _ENDINGS.get(p.Outcome(outcome), f"it ended {p.Outcome(outcome).name.lower()}")
    except ValueError:
        ended = f"it ended with outcome {outcome}"
    lines = info.strip().splitlines()
    return f"{ended}: {p.clip(lines[0], WHY_CHARS)}" if lines else ended


class Dependencies:
    def __init__(self, farm: Farm, moves: JobMoves, delivery: Delivery) -> None:
        self.farm = farm
        self.moves = moves
        self.delivery = delivery

    def admit(self, client: ClientRecord, job: Job, now: float) -> None:
        """A new job with upstream jobs: it waits for the unfinished ones, fails if one failed."""
        unfinished: set[int] = set()
        for seq in job.after:
            if seq in client.jobs:
                unfinished.add(seq)
                continue
            held = client.held.get(seq)
            if held is None or held.outcome != p.Outcome.OK:
                why = "its result is no longer held"
                if held is not None:  # (its info is read back if its result is on disk: a failure's is small)
                    whole = self.delivery.held_result(client, seq, held, now) or held
                    why = how_it_ended(whole.outcome, whole.info)
                self.moves.move(job, JobState.WAITING, client, now)
                self._fail(client, job, seq, why, now)
                return
        if not unfinished:
            self.moves.admit(job, client, now)
            return
        job.waiting_for = unfinished
        self.moves.move(job, JobState.WAITING, client, now)
        for seq in unfinished:
            client.dependents.setdefault(seq, []).append(job)

    def ended(self, client: ClientRecord, upstream: Job, outcome: int, info: str, now: float) -> None:
        """An upstream job is over: its dependents go on (OK) or fail, saying how it ended (``info``:
        its result's info line)."""
        why = "" if outcome == p.Outcome.OK else how_it_ended(outcome, info)
        for job in client.dependents.pop(upstream.seq, ()):
            if job.state is not JobState.WAITING or job.waiting_for is None:
                continue
            if why:
                self._fail(client, job, upstream.seq, why, now)
                continue
            job.waiting_for.discard(upstream.seq)
            if not job.waiting_for:
                job.waiting_for = None
                self.moves.ready(job, client, now)

    def _fail(self, client: ClientRecord, job: Job, upstream: int, why: str, now: float) -> None:
        name = f"{client.id}:{upstream}"
        log.info("job %s did not run: its upstream job %s did not succeed (%s)", job.name, name, why)
        self.delivery.end_unrun(client, job, p.Outcome.LOST, f"{name}: {why}", now,
                                p.ResultKind.DEPENDENCY_FAILED)

    def frames(self, client: ClientRecord, job: Job, now: float,
               known: dict[tuple[str, int], list[Any]]) -> tuple[list[Any], list[int]]:
        """The held result frames of ``job``'s upstream jobs, and how many each (for its JOBS row).

        ``known``: upstream results read already, by (client, seq); those read here are added (a
        result on disk is read and checked once for all the dependents in a JOBS message)."""
        frames: list[Any] = []
        counts: list[int] = []
        for seq in job.after:
            result = known.get((client.id, seq))
            if result is None:
                held = client.held.get(seq)
                whole = self.delivery.held_result(client, seq, held, now) if held is not None else None
                result = known[(client.id, seq)] = list(whole.frames or []) if whole is not None else []
            frames.extend(result)
            counts.append(len(result))
        return frames, counts
