"""The worker's shell: the socket, the slots, signals and the clock around a :class:`WorkerCore`.

::

    broker ◄──Link (DEALER)──► Worker.serve: poll ──► WorkerCore ──► Actions (send, kill, reconnect)
                                   ▲                      │ tasks ▲ outcomes
                                   └── slots' pipes ◄─────▼       │
                                                   SlotPool (chaperone): one process per slot

Because jobs run in other processes, the loop keeps heartbeating however long a job runs.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Any

import zmq

from zfarm import protocol as p
from zfarm.config import WorkerSettings
from zfarm.link import Link, LinkState
from zfarm.security import PeerKeys
from zfarm.stats import plural
from zfarm.worker.chaperone import SlotOutcome, SlotPool
from zfarm.worker.core import Actions, WorkerCore
from zfarm.worker.offer import announced

log = logging.getLogger(__name__)


class Worker:
    """The shell: sockets, slots, signals and the clock around a :class:`WorkerCore`."""

    def __init__(self, settings: WorkerSettings, context: zmq.Context[Any] | None = None,
                 keys: PeerKeys | None = None) -> None:
        """``keys``: this worker's keys as given (a launcher's, never on disk), instead of a keys folder."""
        self.settings = settings
        # first, so that unusable keys stop us before any socket or process exists
        if keys is None and settings.keys:
            keys = PeerKeys.load(settings.keys, "worker", settings.key_name)
        self.keys = keys
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.core = WorkerCore(settings, time.monotonic(), offer=announced(settings))
        self.pool: SlotPool | None = None
        self.link = Link(self.context, settings.address, self.keys, "worker", self.core.id)
        self._signals = 0  # stop requests so far (set from signal handlers: only counted there)
        self._signals_seen = 0
        self._grace_until = 0.0

    def serve(self) -> None:
        """Run until stopped by :meth:`request_stop` (twice: at once), or the parent is gone."""
        core = self.core
        os.environ["ZFARM_WORKER_PID"] = str(os.getpid())  # jobs may read it; set before slots start
        os.environ["ZFARM_WORKER_ID"] = core.id
        self.pool = SlotPool(core.slots, core.host, self.settings.output_dir)
        log.info("worker %s on %s pid %d: %d %s, connecting to %s", core.id, core.host, core.pid,
                 core.slots, "slot" if core.slots == 1 else "slots", self.settings.address)
        try:
            while True:
                now = time.monotonic()
                if not core.stopping and self.link.reopen_if_due(core.live, now):
                    self._apply(core.connect(now))
                self._poll_once()
                self._drain_if_due()
                self._handle_stop_requests()
                self._apply(core.tick(time.monotonic()))
                if self._should_exit():
                    break
        finally:
            self._shutdown()

    def _poll_once(self) -> None:
        assert self.pool is not None
        core, pool = self.core, self.pool
        slot_fds = pool.fds()
        poller = self.link.poller(*slot_fds)
        timeout_s = core.live.interval_s / 4
        if core.live.state is LinkState.DOWN:
            timeout_s = max(0.0, min(timeout_s, core.live.reconnect_at - time.monotonic()))
        deadline = pool.next_deadline()
        if deadline is not None:  # wake up in time to stop a job at its limit
            timeout_s = max(0.0, min(timeout_s, deadline - time.monotonic() + 0.001))
        report_at = core.next_report_at()
        if report_at is not None:  # and to say that a job runs
            timeout_s = max(0.0, min(timeout_s, report_at - time.monotonic() + 0.001))
        ready = dict(poller.poll(int(timeout_s * 1000)))
        if self.link.readable(ready):  # first, so that a cancel or a reclaim acts before jobs start
            for msg in self.link.receive():
                self._apply(core.on_message(msg, time.monotonic()))
        outcomes: list[SlotOutcome] = []
        for fd, slot in slot_fds.items():
            if ready.get(fd) and (outcome := pool.collect(slot)) is not None:
                outcomes.append(outcome)
        now = time.monotonic()
        outcomes += pool.enforce_limits(now)
        # A freed slot gets its next job before anything else: building and sending the report are
        # done while that job runs. (A copy of a job that just ended, given again, waits in take_tasks;
        # finished drops it.)
        started_dead = []
        for task in core.take_tasks(pool.free, now):
            if (outcome := pool.run(task)) is not None:
                started_dead.append(outcome)
        self._apply(core.finished(outcomes, now, from_slots=len(outcomes)))
        self._apply(core.finished(started_dead, now, from_slots=len(started_dead)))
        now = time.monotonic()
        self._apply(core.report_started(now))
        self._apply(core.hand_back_burst(now))

    def _apply(self, actions: Actions) -> None:
        if actions.peek and self.pool is not None:  # read here: the slots are busy running the jobs
            actions.send.extend(self.pool.peek(msg) for msg in actions.peek)
        if not (actions.send or actions.kill or actions.reconnect):
            return
        if actions.kill and self.pool is not None:
            cancelled = [o for key in actions.kill if (o := self.pool.cancel(key)) is not None]
            self._apply(self.core.finished(cancelled, time.monotonic(), from_slots=len(cancelled)))
        self.link.carry_out(actions.send, drop=actions.reconnect)

    def request_stop(self) -> None:
        """First call: drain gracefully within the grace period. Second call: stop now.

        Only counts the request, so it is safe in a signal handler; the loop acts on it.
        """
        self._signals += 1

    def _drain_if_due(self) -> None:
        """At ``drain_at`` (a batch job's end, less its grace), stop as on a first SIGTERM."""
        if self.settings.drain_at and not self._signals and time.time() >= self.settings.drain_at:
            log.info("worker %s: its allocation ends soon: draining", self.core.id)
            self.request_stop()

    def _handle_stop_requests(self) -> None:
        if self._signals and not self._signals_seen:
            self._grace_until = time.monotonic() + self.settings.grace_s
            self._apply(self.core.stop(time.monotonic()))
        self._signals_seen = self._signals

    def _should_exit(self) -> bool:
        if self.settings.parent_pid and os.getppid() != self.settings.parent_pid:
            log.info("parent process %d is gone: stopping", self.settings.parent_pid)
            return True
        if not self.core.stopping:
            return False
        assert self.pool is not None
        if self.core.running == 0:
            return True
        if self._signals > 1 or time.monotonic() >= self._grace_until:
            keys = self.pool.running()
            log.warning("handing back %d running jobs unfinished", len(keys))
            outcomes = []
            for key in keys:
                outcome = self.pool.cancel(key)
                if outcome is not None:
                    outcomes.append(SlotOutcome(key, outcome.attempt, p.Outcome.RETURNED, []))
            self._apply(self.core.finished(outcomes, time.monotonic(), from_slots=len(outcomes)))
            return True
        return False

    def _shutdown(self) -> None:
        self._apply(self.core.goodbye(time.monotonic()))
        if self.pool is not None:
            self.pool.close()
        self.link.close()
        if self._own_context:
            self.context.term()
        log.info("worker %s stopped: %s succeeded here", self.core.id, plural(self.core.done, "job"))


def stop_on_signals(worker: Worker) -> None:
    """SIGINT and SIGTERM stop ``worker``: the first gracefully, the second at once."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: %s", signal.Signals(signum).name,
                 "stopping now" if worker._signals else "finishing running jobs, then stopping")
        worker.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def run_worker(settings: WorkerSettings) -> None:
    """The ``zfarm worker`` command: serve until SIGINT/SIGTERM (twice: at once)."""
    worker = Worker(settings)
    stop_on_signals(worker)
    worker.serve()
