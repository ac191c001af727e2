"""Projects: named queues of jobs with a priority, a share, a state and a rule for failures.

::

    SUBMIT row options {"project": name, "priority", "share", "on_error", "phase"}
        └─► the project's queue (made by its first job; its later jobs may change priority and share)
    PROJECT(action, name, settings) ─► list | set | suspend | resume | cancel ─► PROJECT_REPLY(views)
    a failed job of a project with on_error suspend|cancel ─► suspended | the rest cancelled

A project's settings travel with its jobs, so a client that reconnects, and a broker restarted from
its journal, know it again from the jobs themselves. Suspending stops dispatch (running jobs finish);
cancelling ends the queued and running jobs with CANCELLED results for their clients.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from zfarm import protocol as p
from zfarm.broker.delivery import Delivery
from zfarm.broker.farm import Farm
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.state import ClientRecord, Job, OnError, Queue

log = logging.getLogger("zfarm.broker.scheduler")

MAX_PROJECT_CHARS = 128


class BadProject(ValueError):
    """A job's project options that cannot be taken (the job is handed back with the reason)."""


class Projects:
    def __init__(self, farm: Farm, moves: JobMoves, delivery: Delivery) -> None:
        self.farm = farm
        self.moves = moves
        self.delivery = delivery

    def queue_for(self, client: ClientRecord, options: dict[str, Any], now: float) -> Queue:
        """The queue a job with these options joins: its project's (made or updated here), or its
        client's own.

        Raises:
            BadProject: a project option of the wrong type or range.
        """
        name = options.get("project")
        if name is None:
            return client.own
        if not isinstance(name, str) or not 0 < len(name) <= MAX_PROJECT_CHARS or not name.isprintable():
            raise BadProject(f"a project name is 1 to {MAX_PROJECT_CHARS} printable characters, not {name!r}")
        priority, share, on_error = _settings(options)
        queue = self.farm.projects.get(name)
        if queue is None:
            queue = Queue(name, client.id, created_at=now)
            self.farm.projects[name] = queue
            log.info("project %s opened by client %s (priority %d, share %g, on_error %s)", p.clip(name),
                     client.id, priority if priority is not None else 0, share or 1.0,
                     on_error.value if on_error else "continue")
            self.farm.records.event(now, "project-opened", f"project {name} opened by {client.id}")
        if priority is not None:
            self.farm.set_priority(queue, priority)
        if share is not None:
            queue.share = share
        if on_error is not None:
            queue.on_error = on_error
        return queue

    # ---- actions -----------------------------------------------------------------------------------

    def act(self, msg: p.Project, now: float) -> p.ProjectReply:
        try:
            action = p.ProjectAction(msg.action)
        except ValueError:
            return self._reply(now, f"unknown action {p.clip(msg.action)!r}: expected one of "
                                    f"{', '.join(a.value for a in p.ProjectAction)}")
        if action is p.ProjectAction.LIST:
            return self._reply(now)
        queue = self.farm.projects.get(msg.name)
        if queue is None:
            known = ", ".join(sorted(self.farm.projects)[:20]) or "none"
            return self._reply(now, f"no project {p.clip(msg.name)!r} at this broker (projects: {known})")
        if action is p.ProjectAction.SET:
            try:
                priority, share, _ = _settings(msg.settings)
            except BadProject as exc:
                return self._reply(now, str(exc))
            if priority is not None:
                self.farm.set_priority(queue, priority)
            queue.share = queue.share if share is None else share
        elif action is p.ProjectAction.SUSPEND:
            self.suspend(queue, "suspended by request", now)
        elif action is p.ProjectAction.RESUME:
            self.resume(queue, now)
        else:
            self.cancel(queue, "the project was cancelled", now)
        return self._reply(now)

    def _reply(self, now: float, error: str = "") -> p.ProjectReply:
        return p.ProjectReply([self.view(q, now) for q in self.farm.projects.values()], error)

    def suspend(self, queue: Queue, why: str, now: float) -> None:
        if not queue.suspended:
            queue.suspended, queue.why_suspended = True, why
            log.info("project %s suspended: %s", p.clip(queue.name), why)
            self.farm.records.event(now, "project-suspended", f"project {queue.name} suspended: {why}")

    def resume(self, queue: Queue, now: float) -> None:
        if queue.suspended:
            queue.suspended, queue.why_suspended = False, ""
            log.info("project %s resumed", p.clip(queue.name))
            self.farm.records.event(now, "project-resumed", f"project {queue.name} resumed")
            if queue.queued:
                self.farm.schedule(queue)

    def cancel(self, queue: Queue, why: str, now: float) -> None:
        """End every unfinished job of the project: queued ones dropped, running ones killed."""
        jobs = [(c, j) for c in self.farm.clients.values() for j in list(c.jobs.values()) if j.queue is queue]
        for client, job in jobs:
            self.end(client, job, why, now)
        log.info("project %s cancelled (%s): %d unfinished jobs ended", p.clip(queue.name), why, len(jobs))
        self.farm.records.event(now, "project-cancelled",
                                f"project {queue.name} cancelled: {len(jobs)} jobs ended")

    def end(self, client: ClientRecord, job: Job, why: str, now: float) -> None:
        """One job ends CANCELLED, its client told (its future is cancelled)."""
        self.delivery.end_unrun(client, job, p.Outcome.CANCELLED, why, now)

    def failed(self, job: Job, now: float) -> int:
        """A job of the project failed: apply its rule. Returns the kind its result row carries."""
        queue = job.queue
        if not queue.name or queue.on_error is OnError.CONTINUE:  # (a client's own queue has no rule)
            return p.ResultKind.PLAIN
        if queue.on_error is OnError.SUSPEND:
            was = queue.suspended
            self.suspend(queue, f"job {job.name} failed (on_error=suspend)", now)
            return p.ResultKind.PLAIN if was else p.ResultKind.PROJECT_SUSPENDED
        self.cancel(queue, f"job {job.name} of the project failed (on_error=cancel)", now)
        return p.ResultKind.PLAIN

    # ---- views -------------------------------------------------------------------------------------

    def view(self, queue: Queue, now: float) -> dict[str, Any]:
        rate = queue.finished.rate(now, now - queue.created_at)
        left = queue.queued + queue.running + queue.waiting_jobs
        state = ("suspended" if queue.suspended else "done" if not left
                 else "running" if queue.running else "queued")
        return {"name": queue.name, "owner": queue.owner, "state": state, "priority": queue.priority,
                "share": queue.share, "on_error": queue.on_error.value, "why_suspended": queue.why_suspended,
                "submitted": queue.submitted, "queued": queue.queued, "running": queue.running,
                "done": queue.done, "failed": queue.failed, "cancelled": queue.cancelled,
                "waiting": queue.waiting_jobs, "unschedulable": queue.unschedulable,
                "jobs_per_s": round(rate, 3),
                "eta_s": round(left / rate, 1) if rate > 0 and left else (0.0 if not left else None)}


def _settings(options: dict[str, Any]) -> tuple[int | None, float | None, OnError | None]:
    """A project's priority, share and on_error from job options or a SET (None: not given)."""
    priority, share, on_error = options.get("priority"), options.get("share"), options.get("on_error")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or abs(priority) > 1_000_000):
        raise BadProject(f"a project's priority is an integer from -1000000 to 1000000, not {priority!r}")
    if share is not None and (not isinstance(share, (int, float)) or isinstance(share, bool)
                              or not math.isfinite(share) or not 0 < share <= 1e6):
        raise BadProject(f"a project's share is a number above 0 (up to 1e6), not {share!r}")
    try:
        rule = OnError(on_error) if on_error is not None else None
    except ValueError:
        raise BadProject(f"on_error is one of continue, suspend, cancel, not {on_error!r}") from None
    return priority, float(share) if share is not None else None, rule
