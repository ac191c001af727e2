"""The hand-off between two jobs in a slot: a freed slot gets its next job before the worker reports.

A real broker and a real worker (its own process, real slot processes) whose pool and link write down
what they do, in order, to a file the test reads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import zfarm
from tests import jobs
from tests.helpers import Procs, wait_for

SEEN_S = 60.0


def run_recording_worker(endpoint: str, record: str) -> None:
    """A one-slot worker that appends to ``record``: ``jobs KEY…`` as JOBS arrive, ``run KEY`` as a job
    is written to its slot, ``results KEY…`` as RESULTS go to the broker. Runs until SIGTERM."""
    from zfarm import protocol as p
    from zfarm.config import WorkerSettings
    from zfarm.link import Link
    from zfarm.worker.chaperone import SlotPool, SlotTask
    from zfarm.worker.core import WorkerCore
    from zfarm.worker.shell import Worker, stop_on_signals

    def write(line: str) -> None:
        with open(record, "a") as f:
            f.write(line + "\n")

    def keys(rows: list[list[Any]]) -> str:
        return " ".join(f"{row[0]}:{row[1]}" for row in rows)

    run, carry_out, on_message = SlotPool.run, Link.carry_out, WorkerCore.on_message

    def recorded_run(pool: SlotPool, task: SlotTask) -> Any:
        write(f"run {task.name}")
        return run(pool, task)

    def recorded_carry_out(link: Link, msgs: list[p.Message], drop: bool) -> None:
        for msg in msgs:
            if isinstance(msg, p.Results) and msg.results:
                write(f"results {keys(msg.results)}")
        carry_out(link, msgs, drop)

    def recorded_on_message(core: WorkerCore, msg: p.Message, now: float) -> Any:
        if isinstance(msg, p.Jobs):
            write(f"jobs {keys(msg.jobs)}")
        return on_message(core, msg, now)

    SlotPool.run = recorded_run  # type: ignore[method-assign]
    Link.carry_out = recorded_carry_out  # type: ignore[method-assign]
    WorkerCore.on_message = recorded_on_message  # type: ignore[method-assign]
    worker = Worker(WorkerSettings(address=endpoint, procs=1, prefetch=1, heartbeat_interval_s=0.2))
    stop_on_signals(worker)
    worker.serve()


def test_a_freed_slot_gets_its_next_job_before_the_result_is_reported(procs: Procs, tmp_path: Path) -> None:
    _, endpoint = procs.broker(None, "--heartbeat-interval", "0.2")
    record, release = tmp_path / "record", tmp_path / "release"
    code = "import sys; from tests.test_worker_handoff import run_recording_worker as r; r(*sys.argv[1:])"
    worker = procs.spawn(endpoint, str(record), name="recording-worker", command=[sys.executable, "-c", code])

    def seen(what: str) -> list[list[int]]:
        """The job numbers of each line of this kind (``jobs``, ``run``, ``results``), in order."""
        lines = record.read_text().splitlines() if record.exists() else []
        return [[int(key.rsplit(":", 1)[1]) for key in line.split()[1:]] for line in lines
                if line.split()[0] == what]

    with zfarm.Client(endpoint) as client:
        first = client.submit(jobs.hold, str(release), 1)
        second = client.submit(jobs.noop)
        # the second job waits at the worker (prefetched) while the first holds the slot
        wait_for(lambda: any(second.seq in seqs for seqs in seen("jobs")), SEEN_S,
                 message="the second job at the worker")
        release.touch()
        assert first.result(SEEN_S) == 1 and second.result(SEEN_S) is None
    worker.terminate()
    lines = record.read_text().splitlines()
    reported = next(i for i, line in enumerate(lines)
                    if line.startswith("results") and line.endswith(f":{first.seq}"))
    assert any(line.startswith("run") and line.endswith(f":{second.seq}") for line in lines[:reported]), \
        "\n".join(lines)
