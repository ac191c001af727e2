"""Starting from a journal: its clients are away until they say HELLO; their jobs queue again.

Jobs first (each one's options make or update its project), then the projects' own rows over them:
a project suspended, or set to another priority or share, before the restart is so again after it.
Rows that fail their seal are never run or delivered: their jobs fail with JournalCorrupted.
"""

from __future__ import annotations

import logging

from zfarm.broker.delivery import Delivery
from zfarm.broker.dependencies import upstream_of
from zfarm.broker.farm import Farm
from zfarm.broker.functions import Functions
from zfarm.broker.intake import Intake
from zfarm.broker.journal_rows import Damaged, Recovered
from zfarm.broker.projects import BadProject
from zfarm.broker.state import NO_OPTIONS, ClientRecord, Job

log = logging.getLogger("zfarm.broker.scheduler")



def recover(farm: Farm, delivery: Delivery, functions: Functions, saved: Recovered,
            now: float, intake: Intake) -> None:
    """Load what the journal held into ``farm``."""
    for client_id, session, key in saved.clients:
        # Away from now: a client connected when the broker died gets its full time to come back.
        farm.clients[client_id] = ClientRecord(
            id=client_id, route=b"", host="", pid=0, joined_at=now, last_seen=now, last_sent=now, key=key,
            session=session, present=False, absent_since=now)
    for client_id, fn_id, blob in saved.functions:
        if (client := farm.clients.get(client_id)) is not None:
            client.fns[fn_id] = blob
    if saved.lost:
        log.error("journal %s: %s", farm.journal_path, saved.lost)
        farm.records.event(now, "journal-damaged", saved.lost)
    _drop_damaged_projects(farm, saved.damaged)
    waiting = _recover_jobs(farm, delivery, saved, now, intake)
    intake.projects.restore(saved.projects, now)  # before any job queues: as it was, suspended or not
    for client_id, seq, held in saved.results:
        if (client := farm.clients.get(client_id)) is not None:
            client.held[seq] = farm.held_results.on_disk_record(held.outcome, held.digest)
            farm.held_results.recovered(1)
    for client, job in waiting:  # with every job and result known, each queues or waits again
        intake.admit(client, job, now)
    intake.projects.recount(saved.projects)
    jobs = len(waiting)
    _recover_damaged(farm, delivery, saved.damaged, now)
    functions.idle_all(now)
    log.log(logging.ERROR if saved.damaged or saved.lost else logging.INFO,
            "journal %s: recovered %d jobs and %d results for %d clients%s", farm.journal_path, jobs,
            len(saved.results), len(saved.clients),
            f"; {len(saved.damaged)} damaged rows failed their seal (not run or delivered)"
            if saved.damaged else "; SOME WERE LOST (above)" if saved.lost else "")
    if saved.clients:
        farm.records.event(now, "recovered", f"from the journal: {jobs} jobs, {len(saved.results)} "
                           f"results for {len(saved.clients)} clients")
    farm.counters.recovered = jobs


def _recover_jobs(farm: Farm, delivery: Delivery, saved: Recovered, now: float,
                  intake: Intake) -> list[tuple[ClientRecord, Job]]:
    """The journal's jobs to queue again (those whose function is damaged fail), by phase."""
    offset = farm.records.wall_offset_s
    bad_fns = {(d.client, d.fn_id) for d in saved.damaged if d.table == "functions"}
    jobs: list[tuple[ClientRecord, Job]] = []
    # by phase then number: an upstream job (an earlier number) is known before its dependents
    for row in sorted(saved.jobs, key=lambda r: (int((r.options or {}).get("phase", 0) or 0), r.seq)):
        client = farm.clients.get(row.client)
        if client is not None and (row.client, row.fn_id) in bad_fns:
            delivery.damaged(client, row.seq, "the function it runs fails its seal", now)
            continue
        if client is None or row.fn_id not in client.fns:
            log.warning("journal: job %s:%d has no client or function recorded: dropped", row.client, row.seq)
            if farm.journal is not None:
                farm.journal.drop_job(row.client, row.seq)
            continue
        options = row.options or NO_OPTIONS
        try:
            queue, phase, request = intake.placement_of(client, options, now)
            after = upstream_of(options, row.seq)
        except BadProject as exc:
            delivery.damaged(client, row.seq, f"its options cannot be taken: {exc}", now)
            continue
        job = Job(row.client, row.seq, row.fn_id, tuple(row.frames), options, row.queued_at - offset, queue,
                  losses=row.losses, digest=row.digest, history=("",) * row.attempts_before,
                  recovered_after=row.attempts_before, phase=phase, request=request, after=after)
        jobs.append((client, job))
    return jobs


def _drop_damaged_projects(farm: Farm, damaged: list[Damaged]) -> None:
    """Project rows that fail their seal go first: the projects come back from their jobs' settings
    (whose rows are written afresh as the jobs are read back), not suspended."""
    for row in damaged:
        if row.table == "projects":
            farm.counters.corrupted += 1
            log.error("journal %s: the row of project %s fails its seal: dropped (the project comes back "
                      "from its jobs' settings, not suspended)", farm.journal_path, row.client)
            if farm.journal is not None:
                farm.journal.drop_project_row(row.rowid)


def _recover_damaged(farm: Farm, delivery: Delivery, damaged: list[Damaged], now: float) -> None:
    """Rows that fail their seal: a job or result of a known client fails with JournalCorrupted."""
    for row in damaged:
        client = farm.clients.get(row.client)
        if row.table in ("jobs", "results") and client is not None:
            delivery.damaged(client, row.seq, f"its {row.table[:-1]} fails its seal", now)
        elif row.table == "projects":
            continue  # dropped before the jobs were read back (_drop_damaged_projects)
        elif row.table != "functions":  # a function's jobs fail with it (above)
            farm.counters.corrupted += 1
            log.error("journal %s: a row of %s (client %s, job %d) fails its seal: dropped",
                      farm.journal_path, row.table, row.client, row.seq)
