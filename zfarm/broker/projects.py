"""Projects: named queues of jobs with a priority, a share, a state and a rule for failures.

::

    SUBMIT row options {"project": name, "priority", "share", "on_error", "phase"}
        └─► the project's queue (made by its first job; its later jobs may change priority and share)
    PROJECT(action, name, settings) ─► list | set | suspend | resume | cancel ─► PROJECT_REPLY(views)
    a failed job of a project with on_error suspend|cancel ─► suspended | the rest cancelled

A project's settings travel with its jobs, so a client that reconnects, and a broker restarted from
its journal, know it again from the jobs themselves. Suspending stops dispatch (running jobs finish);
cancelling ends the queued and running jobs with CANCELLED results for their clients.

With a journal, a project's own row holds its state and settings as they are now (suspended or not,
and priority, share and on_error however they last changed), written in the turn that changes
them, and its counts (submitted, done, failed, cancelled, slot-seconds), written once in each turn
that changes them while it is owed something (:meth:`Projects.save_counted`). A restarted broker
reads the jobs back first (each job's options make or update its project), then lays the project
rows over them: they are newer; once the jobs are queued again, the counts (:meth:`Projects.recount`).
A row is kept while its project has unfinished jobs or is suspended, and dropped
(:meth:`Projects.tidy`) once neither holds, so the journal holds only the projects still owed
something. A suspended project with no job left whose owner is gone (its session ended, or it left)
is dropped, row and all (:meth:`Projects.forget`): nobody is left to resume it, and a later run of
its name starts afresh.
"""

from __future__ import annotations

import logging
from typing import Any

from zfarm import protocol as p
from zfarm.broker.delivery import Delivery
from zfarm.broker.farm import Farm
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.journal_rows import JournalProject
from zfarm.broker.state import ClientRecord, Job, OnError, Queue

log = logging.getLogger("zfarm.broker.scheduler")

MAX_PROJECT_CHARS = 128
#: how often journaled projects are looked at for rows that may go (``Projects.tidy``)
TIDY_EVERY_S = 1.0


class BadProject(ValueError):
    """A job's project options that cannot be taken (the job is handed back with the reason)."""


class Projects:
    def __init__(self, farm: Farm, moves: JobMoves, delivery: Delivery) -> None:
        self.farm = farm
        self.moves = moves
        self.delivery = delivery
        #: with a journal: each project's row as last written there (what it would write again is
        #: not written); a project without one has none
        self.rows: dict[str, JournalProject] = {}
        self._tidy_at = 0.0

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
        before = (queue.priority, queue.share, queue.on_error)
        if priority is not None:
            self.farm.set_priority(queue, priority)
        if share is not None:
            queue.share = share
        if on_error is not None:
            queue.on_error = on_error
        if self.farm.journal is not None and (name not in self.rows or before != (
                queue.priority, queue.share, queue.on_error)):
            self.save(queue)  # (not once per job: only when its row is missing or out of date)
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
            self.save(queue)
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
            self.save(queue)
            log.info("project %s suspended: %s", p.clip(queue.name), why)
            self.farm.records.event(now, "project-suspended", f"project {queue.name} suspended: {why}")

    def resume(self, queue: Queue, now: float) -> None:
        if queue.suspended:
            queue.suspended, queue.why_suspended = False, ""
            self.save(queue)
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

    # ---- the journal -------------------------------------------------------------------------------

    def save(self, queue: Queue) -> None:
        """Write the project's row if it changed since it was last written (with a journal)."""
        journal = self.farm.journal
        if journal is None:
            return
        row = JournalProject(queue.name, queue.owner, queue.priority, queue.share, queue.on_error.value,
                             queue.suspended, queue.why_suspended, self.farm.records.wall(queue.created_at),
                             (queue.submitted, queue.done, queue.failed, queue.cancelled, queue.slot_s))
        if self.rows.get(queue.name) != row:
            self.rows[queue.name] = row
            journal.project(row)

    def save_counted(self) -> None:
        """The rows of the projects whose counts changed this turn, written in the turn's commit with
        the job and result rows that changed them (so a restart shows what the journal holds)."""
        projects = self.farm.projects
        for queue in self.farm.counted:
            # (one owed nothing needs no row: tidy drops it, and a restart does not bring it back)
            if projects.get(queue.name) is queue and (queue.suspended or _unfinished(queue)):
                self.save(queue)
        self.farm.counted.clear()

    def restore(self, rows: list[JournalProject], now: float) -> None:
        """After a restart, once the journal's jobs are read back (and made their projects): each
        project as it last was. A row whose project has no job left and is not suspended is dropped."""
        offset = self.farm.records.wall_offset_s
        for row in rows:
            queue = self.farm.projects.get(row.name)
            try:
                on_error = OnError(row.on_error)
            except ValueError:
                on_error = OnError.CONTINUE  # (a rule this zfarm does not know: none)
            if queue is None:
                if not row.suspended:
                    if self.farm.journal is not None:
                        self.farm.journal.drop_project(row.name)
                    continue
                queue = Queue(row.name, row.owner, created_at=row.created_at - offset)
                self.farm.projects[row.name] = queue
            self.farm.set_priority(queue, row.priority)
            queue.share, queue.on_error = row.share, on_error
            queue.suspended, queue.why_suspended = row.suspended, row.why_suspended
            queue.created_at = min(queue.created_at, row.created_at - offset)
            self.save(queue)
            if queue.suspended:
                log.info("project %s is suspended, as it was before the restart: %s", p.clip(row.name),
                         row.why_suspended)
        self._tidy_at = now + TIDY_EVERY_S

    def recount(self, rows: list[JournalProject]) -> None:
        """After a restart, once the recovered jobs are queued again: each project's counts as its row
        last had them. Its jobs read back were among the submitted then (each counted again as it
        queued: not twice); any that ended while being read back (an upstream failed) are added; and
        its jobs unfinished then that did not come back (a damaged row or function, no client) failed."""
        for row in rows:
            queue = self.farm.projects.get(row.name)
            if queue is None or row.counts is None:
                continue
            submitted, done, failed, cancelled, slot_s = row.counts
            back = queue.submitted  # its jobs read back
            lost = max(0, submitted - done - failed - cancelled - back)
            queue.submitted = max(back, submitted)
            queue.done += done
            queue.failed += failed + lost
            queue.cancelled += cancelled
            queue.slot_s += slot_s
            self.save(queue)

    def tidy(self, now: float) -> None:
        """Once a second (they are few, and a row that stays a little longer does no harm): drop the
        journal rows of projects with no unfinished job that are not suspended, and forget a
        suspended project with no job left whose owner is gone (:meth:`forget`)."""
        if now < self._tidy_at:
            return
        self._tidy_at = now + TIDY_EVERY_S
        journal = self.farm.journal
        projects = self.farm.projects
        for name in [n for n, row in self.rows.items() if not row.suspended]:
            queue = projects[name]
            if not (_unfinished(queue) or queue.suspended):
                del self.rows[name]
                if journal is not None:
                    journal.drop_project(name)
        clients = self.farm.clients
        for queue in [q for q in projects.values() if q.suspended and q.owner not in clients]:
            if not _unfinished(queue):
                self.forget(queue, now)

    def forget(self, queue: Queue, now: float) -> None:
        """Drop a suspended project, its row with it: it has no job left and the client that opened it
        is gone (its session ended, or it left), so nobody is left to resume it, and a later run
        that takes its name starts afresh instead of being held by a suspension it never saw."""
        del self.farm.projects[queue.name]
        if self.rows.pop(queue.name, None) is not None and self.farm.journal is not None:
            self.farm.journal.drop_project(queue.name)
        log.info("project %s dropped: suspended (%s) with no job left, and its owner %s is gone",
                 p.clip(queue.name), p.clip(queue.why_suspended), queue.owner)
        self.farm.records.event(now, "project-dropped", f"project {queue.name} dropped: suspended with no "
                                f"job left and its owner {queue.owner} gone")

    # ---- views -------------------------------------------------------------------------------------

    def view(self, queue: Queue, now: float) -> dict[str, Any]:
        rate = queue.finished.rate(now, now - queue.created_at)
        left = _unfinished(queue)
        state = ("suspended" if queue.suspended else "done" if not left
                 else "running" if queue.running else "queued")
        return {"name": queue.name, "owner": queue.owner, "state": state, "priority": queue.priority,
                "share": queue.share, "on_error": queue.on_error.value, "why_suspended": queue.why_suspended,
                "submitted": queue.submitted, "queued": queue.queued, "running": queue.running,
                "done": queue.done, "failed": queue.failed, "cancelled": queue.cancelled,
                "waiting": queue.waiting_jobs, "unschedulable": queue.unschedulable,
                "jobs_per_s": round(rate, 3), "slot_s": round(queue.slot_s, 1),
                "eta_s": round(left / rate, 1) if rate > 0 and left else (0.0 if not left else None)}


def _unfinished(queue: Queue) -> int:
    """How many of a project's jobs are not over (queued, running or waiting)."""
    return queue.queued + queue.running + queue.waiting_jobs


def _settings(options: dict[str, Any]) -> tuple[int | None, float | None, OnError | None]:
    """A project's priority, share and on_error from job options or a SET (None: not given)."""
    priority, share, on_error = options.get("priority"), options.get("share"), options.get("on_error")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or abs(priority) > 1_000_000):
        raise BadProject(f"a project's priority is an integer from -1000000 to 1000000, not {priority!r}")
    if share is not None and not p.valid_share(share):
        raise BadProject(f"a project's share is a number from {p.MIN_SHARE:g} to {p.MAX_SHARE:g}, "
                         f"not {share!r}")
    try:
        rule = OnError(on_error) if on_error is not None else None
    except ValueError:
        raise BadProject(f"on_error is one of continue, suspend, cancel, not {on_error!r}") from None
    return priority, float(share) if share is not None else None, rule
