"""What the cluster launched, and when to launch a dead worker again (plain data, no I/O but logging).

A launched worker is a :class:`Launched` record: its name, its state, where it runs and how it
ended last. :class:`Restarts` decides, from how long a worker lived, when it may start again: a
worker that dies at start waits 1, 2, 4 ... 60 s, and after ``max_quick_deaths`` such deaths in a
row the cluster gives up on that place and says why; one that ran a while starts again at once.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("zfarm.cluster")

#: a worker that lived less than this died "at start" (bad python, unreachable host, bad keys)
QUICK_DEATH_S = 15.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
#: quick deaths in a row after which a place is given up
MAX_QUICK_DEATHS = 6


class State(str, enum.Enum):
    PENDING = "pending"  # waiting for resources in the batch system (coming)
    STARTING = "starting"  # launched, not yet registered with the broker (coming)
    RUNNING = "running"  # registered with the broker
    RETIRING = "retiring"  # asked to finish its jobs and leave
    WAITING = "waiting"  # ended while wanted: starts again at ``restart_at``
    FAILED = "failed"  # died at start too often: given up
    STOPPED = "stopped"  # ended and not wanted

    @property
    def coming(self) -> bool:
        return self in (State.PENDING, State.STARTING, State.WAITING)

    @property
    def ended(self) -> bool:
        return self in (State.FAILED, State.STOPPED)


@dataclass
class Launched:
    """One place a worker runs (a local process, a host's ``procs``-th worker, a Slurm job)."""

    name: str  # stable: "local-2", "ssh-node1-0", "slurm-3"
    where: str  # host, or host and job id
    state: State = State.STARTING
    worker_id: str = ""  # the id of its current incarnation, as the broker lists it
    started_at: float = 0.0  # time.monotonic() of the last launch
    launches: int = 0
    quick_deaths: int = 0
    restart_at: float = 0.0
    last_exit: str = ""  # how it ended last, in words
    handle: Any = field(default=None, repr=False)

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "worker_id": self.worker_id, "where": self.where,
                "state": self.state.value, "launches": self.launches, "last_exit": self.last_exit}


@dataclass
class Restarts:
    quick_death_s: float = QUICK_DEATH_S
    first_backoff_s: float = FIRST_BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S
    max_quick_deaths: int = MAX_QUICK_DEATHS

    def ended(self, worker: Launched, how: str, now: float, wanted: bool) -> None:
        """Record that ``worker`` ended (``how``, in words) and set when it may start again."""
        worker.last_exit = how
        worker.handle = None
        if not wanted:
            worker.state = State.STOPPED
            return
        lived_s = now - worker.started_at
        worker.quick_deaths = worker.quick_deaths + 1 if lived_s < self.quick_death_s else 0
        if worker.quick_deaths >= self.max_quick_deaths:
            worker.state = State.FAILED
            return
        backoff_s = 0.0 if worker.quick_deaths == 0 else min(
            self.max_backoff_s, self.first_backoff_s * 2 ** (worker.quick_deaths - 1))
        worker.state = State.WAITING
        worker.restart_at = now + backoff_s

    def due(self, worker: Launched, now: float) -> bool:
        return worker.state is State.WAITING and now >= worker.restart_at


def count_workers(records: list[Launched], requested: int) -> dict[str, int]:
    """Launched workers by what they are doing, as a cluster's status and its reports say it."""
    live = [w for w in records if not w.state.ended]
    return {"requested": requested,
            "launched": sum(w.handle is not None for w in live),
            "running": sum(w.state is State.RUNNING for w in live),
            "coming": sum(w.state.coming for w in live),
            "pending": sum(w.state is State.PENDING for w in live),
            "retiring": sum(w.state is State.RETIRING for w in live),
            "failed": sum(w.state is State.FAILED for w in records)}


def excess(wanted: list[Launched], count: int, busy: set[str], keep_busy: bool) -> list[Launched]:
    """Which ``count`` workers go: not started first, then idle ones; busy ones (ids in ``busy``)
    last, and never with ``keep_busy``."""
    order = {State.FAILED: 0, State.WAITING: 0, State.PENDING: 1, State.STARTING: 2, State.RUNNING: 3}
    ranked = sorted(wanted, key=lambda w: (order.get(w.state, 9), w.worker_id in busy, -w.started_at))
    if keep_busy:
        ranked = [w for w in ranked if not (w.state is State.RUNNING and w.worker_id in busy)]
    return ranked[:count]


def log_ended(w: Launched, how: str, now: float) -> None:
    """One line for a launched worker that ended, saying what happens next."""
    if w.state is State.FAILED:
        log.error("%s (%s) died at start %d times in a row, last: %s; giving up on it "
                  "(scale again to retry)", w.name, w.where, w.quick_deaths, how)
    elif w.state is State.WAITING:
        log.warning("%s (%s) ended (%s): starting it again in %.0f s", w.name, w.where, how,
                    w.restart_at - now)
    else:
        log.info("%s (%s) left: %s", w.name, w.where, how)
