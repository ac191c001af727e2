"""The job transition table: every allowed move keeps its counters and queues in step, every other
move is refused, and no code but ``JobMoves.move`` assigns a job's state."""

from __future__ import annotations

import ast
from dataclasses import astuple
from pathlib import Path

import pytest

from zfarm import protocol as p
from zfarm.broker.farm import Farm
from zfarm.broker.held import HeldResults
from zfarm.broker.jobstate import ALLOWED, IllegalMove, JobMoves
from zfarm.broker.records import Records
from zfarm.broker.state import ClientRecord, Job, JobState, WorkerRecord
from zfarm.config import BrokerSettings

S = JobState
FN = b"\xf1" * 16


def farm_with_peers() -> tuple[Farm, JobMoves, ClientRecord, WorkerRecord]:
    farm = Farm(BrokerSettings(), Records(0.0), HeldResults(1 << 20, None, None))
    moves = JobMoves(farm)
    client = ClientRecord(id="c", route=b"c", host="h", pid=1, joined_at=0.0, last_seen=0.0, last_sent=0.0)
    worker = WorkerRecord(id="w", route=b"w", host="h", pid=2, joined_at=0.0, last_seen=0.0, last_sent=0.0,
                          slots=2, credit=2)
    farm.clients["c"], farm.workers["w"] = client, worker
    return farm, moves, client, worker


def job_in(state: JobState, moves: JobMoves, client: ClientRecord, worker: WorkerRecord, seq: int = 1) -> Job:
    """A job brought to ``state`` through allowed moves only."""
    job = Job("c", seq, FN, (b"arg",), {}, 0.0, client.own)
    path = {S.SUBMITTED: [], S.WAITING: [S.WAITING], S.QUEUED: [S.QUEUED], S.ASSIGNED: [S.QUEUED, S.ASSIGNED],
            S.FINISHED: [S.QUEUED, S.ASSIGNED, S.FINISHED], S.CANCELLED: [S.QUEUED, S.CANCELLED]}[state]
    for to in path:
        if to is S.ASSIGNED:
            client.own.jobs.remove(job)  # as dispatch pops it
        moves.move(job, to, client, 0.0, worker=worker if to is S.ASSIGNED else None,
                   finisher=worker if to is S.FINISHED else None, outcome=p.Outcome.OK)
    return job


@pytest.mark.parametrize(("start", "finish"), sorted(ALLOWED))
def test_every_allowed_move_keeps_counts_queues_and_holders(start: JobState, finish: JobState) -> None:
    farm, moves, client, worker = farm_with_peers()
    job = job_in(start, moves, client, worker)
    if start is S.QUEUED and finish is S.ASSIGNED:
        client.own.jobs.remove(job)
    moves.move(job, finish, client, 1.0, worker=worker if finish is S.ASSIGNED else None,
               finisher=worker if finish is S.FINISHED else None, outcome=p.Outcome.OK)
    assert job.state is finish
    queued = 1 if finish is S.QUEUED else 0
    assert (client.queued, farm.queued) == (queued, queued)
    if finish is S.QUEUED:  # (one that leaves QUEUED leaves the queue lazily: dispatch skips it)
        assert job in client.own.jobs
    assert (job.key in worker.jobs) == (finish is S.ASSIGNED)
    unfinished = (S.WAITING, S.QUEUED, S.ASSIGNED)
    assert (job.seq in client.jobs) == (finish in unfinished)
    assert client.fn_users[FN] == (1 if finish in unfinished else 0)
    if finish is S.WAITING:  # (one that leaves WAITING leaves its list lazily, as a queue)
        assert job in client.own.waiting[("c", 0)]
    assert client.own.waiting_jobs == (1 if finish is S.WAITING else 0)
    assert farm.counters.requeued == (1 if (start, finish) == (S.ASSIGNED, S.QUEUED) else 0)
    assert farm.counters.cancelled == (1 if finish is S.CANCELLED else 0)
    assert (farm.counters.done, client.done) == ((1, 1) if finish is S.FINISHED else (0, 0))
    if finish is S.ASSIGNED:
        assert job.worker == "w" and worker.credit == 1 and worker.outbox == [job]
    if (start, finish) == (S.ASSIGNED, S.CANCELLED):
        assert worker.outbox == []  # never sent: taken back out of the outbox, no CANCEL_JOBS needed


ALL = [(a, b) for a in S for b in S if (a, b) not in ALLOWED]


@pytest.mark.parametrize(("start", "finish"), ALL)
def test_every_other_move_is_refused_and_changes_nothing(start: JobState, finish: JobState) -> None:
    farm, moves, client, worker = farm_with_peers()
    job = job_in(start, moves, client, worker)
    def facts() -> tuple[object, ...]:
        return client.queued, farm.queued, dict(worker.jobs), dict(client.jobs), astuple(farm.counters)

    before = facts()
    with pytest.raises(IllegalMove, match=f"from {start.value} to {finish.value}"):
        moves.move(job, finish, client, 1.0, worker=worker)
    assert job.state is start
    assert facts() == before


def test_no_code_but_the_transition_table_assigns_a_job_state() -> None:
    broker = Path(__file__).resolve().parents[2] / "zfarm" / "broker"
    offenders = []
    for module in broker.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Attribute) and leaf.attr == "state":
                        offenders.append(f"{module.name}:{node.lineno}")
    assert len(offenders) == 1 and offenders[0].startswith("jobstate.py:"), offenders
