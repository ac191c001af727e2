"""The worker agent: one DEALER to the broker, a pool of slot processes for the jobs.

::

    broker ◄──DEALER──► WorkerCore (pure: handshake, credit, heartbeats, backoff)
                            │ tasks ▲ outcomes
                            ▼       │
                          SlotPool (chaperone): one process per slot

The core never reads a clock or touches a socket; :class:`Worker` is the
shell that polls the socket and the slots' pipes and feeds the core. Because
jobs run in other processes, the loop keeps heartbeating however long a job
runs. Credit is the worker's to give: READY says how many more jobs it can
hold (free slots plus a small prefetch), and every RESULTS returns the credit
of the jobs it reports.

A result is kept until the broker is known to have it, and sent again after the
next WELCOME (before READY) if the link broke first. There is no ack message:
the broker never sends more jobs than the credit it has read, and reads a
connection's messages in order, so a JOBS that takes the job count past the
credit offered before a RESULTS proves that RESULTS was read. Kept results are
so bounded by the credit offered (slots + prefetch).
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import zmq

from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.chaperone import Key, SlotOutcome, SlotPool, SlotTask
from zfarm.config import WorkerSettings, parse_resources, parse_tags
from zfarm.errors import PayloadTooLarge, ProtocolError, Refused
from zfarm.security import HandshakeWatch, PeerKeys, dealer_to_broker

log = logging.getLogger(__name__)

#: room left for the envelope and other jobs' results beside one job's payload
ENVELOPE_ALLOWANCE = 64 * 1024
#: a job still in its slot this long after it started is reported as started (STARTED, so its
#: client's future says ``running()``); a quicker one reports only its result: no extra message
STARTED_REPORT_S = 0.01
#: outcomes that end a job: kept until the broker has them (the others only return credit)
ENDS_JOB = frozenset({p.Outcome.OK, p.Outcome.ERROR, p.Outcome.CRASHED})


class Link(str, enum.Enum):
    DOWN = "down"  # no socket: waiting out the reconnect backoff
    CONNECTING = "connecting"  # HELLO sent, no WELCOME yet
    READY = "ready"


@dataclass
class Actions:
    """What the shell must do after feeding the core an event."""

    send: list[p.Message] = field(default_factory=list)
    kill: list[Key] = field(default_factory=list)  # running jobs to cancel
    reconnect: bool = False  # close the socket; open a new one at ``core.reconnect_at``


class WorkerCore:
    def __init__(self, settings: WorkerSettings, now: float, host: str | None = None,
                 pid: int | None = None) -> None:
        self.settings = settings
        self.id = settings.worker_id or f"w-{uuid.uuid4().hex[:10]}"
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.slots = settings.slots
        #: what jobs may ask of it (HELLO info: resources, tags, gpu_ids)
        self.offer = announced(settings)
        self.capacity = self.slots + settings.prefetch
        self.interval_s = settings.heartbeat_interval_s
        self.liveness = settings.liveness
        self.link = Link.DOWN
        self.broker_id = ""
        self.max_message_bytes = 0  # the broker's, from WELCOME
        self.last_heard = now
        self.last_sent = now
        self.backoff_s = settings.reconnect_min_s
        self.reconnect_at = now
        self.pending: deque[SlotTask] = deque()  # received, not yet in a slot
        self.running_keys: set[Key] = set()  # in a slot now; never two copies of one job at once
        self.fns: dict[bytes, Any] = {}
        self.unsent: list[SlotOutcome] = []  # finished while the broker did not know us
        self.unreported: dict[Key, float] = {}  # running jobs not yet reported started, and since when
        # This registration's credit offered and jobs received, and the results sent on it that the
        # broker may not have read yet, each batch with the credit offered before it.
        self.offered = 0
        self.received = 0
        self.unacked: deque[tuple[int, list[SlotOutcome]]] = deque()
        self.stopping = False
        self.done = 0

    @property
    def running(self) -> int:
        return len(self.running_keys)

    @property
    def in_hand(self) -> int:
        return len(self.pending) + self.running

    def connect(self, now: float) -> Actions:
        """A new socket is open: introduce ourselves."""
        self.link = Link.CONNECTING
        self.last_heard = now
        return self._out(now, [self._hello()])

    def _hello(self) -> p.Hello:
        return p.Hello(p.Role.WORKER.value, self.id, self.host, self.pid, self.slots,
                       {"prefetch": self.settings.prefetch, **self.offer})

    def on_message(self, msg: p.Message, now: float) -> Actions:
        self.last_heard = now
        if isinstance(msg, p.Welcome):
            return self._welcome(msg, now)
        if isinstance(msg, p.Jobs):
            return self._jobs(msg, now)
        if isinstance(msg, p.CancelJobs):
            return self._cancel({(k[0], k[1]) for k in msg.keys}, now)
        if isinstance(msg, p.Reconnect):
            if self.link is Link.CONNECTING:
                return Actions()  # our HELLO is on its way already
            log.info("broker does not know us (%s): introducing ourselves again", p.clip(msg.reason))
            return self.connect(now)
        if isinstance(msg, p.Refused):
            raise Refused(f"the broker refused this worker: {msg.reason}")
        if isinstance(msg, p.Disconnect):
            log.info("broker is leaving (%s): will reconnect", p.clip(msg.reason))
            return self._drop_link(now)
        if not isinstance(msg, p.Heartbeat):
            log.warning("ignored unexpected %s from the broker", type(msg).__name__)
        return Actions()

    def _welcome(self, msg: p.Welcome, now: float) -> Actions:
        if self.link is not Link.READY:
            log.info("worker %s registered with broker %s (%d %s)", self.id, msg.broker_id, self.slots,
                     "slot" if self.slots == 1 else "slots")
        self.link = Link.READY
        self.fns.clear()  # the broker's mirror of our cache starts empty with each registration
        self.broker_id = msg.broker_id
        self.max_message_bytes = msg.max_message_bytes
        self.interval_s, self.liveness = msg.heartbeat_interval_s, msg.liveness
        self.backoff_s = self.settings.reconnect_min_s
        # What the broker may not have read goes first, so that it finishes those jobs before it
        # could hand them out again; then READY offers the free slots (those results' credit included).
        resend = [o for _offered, batch in self.unacked for o in batch] + self.unsent
        self.unacked.clear()
        self.unsent = []
        self.offered = self.received = 0
        send: list[p.Message] = [self._send_results(resend, credit=0)] if resend else []
        credit = 0 if self.stopping else self.capacity - self.in_hand
        self.offered += credit
        send.append(p.Ready(credit))
        return self._out(now, send)

    def _jobs(self, msg: p.Jobs, now: float) -> Actions:
        self.received += len(msg.jobs)
        while self.unacked and self.unacked[0][0] < self.received:
            self.unacked.popleft()  # the broker used credit offered after these results: it read them
        for fn_id, blob in zip(msg.fns, msg.frames, strict=False):  # frames go on past the fns
            p.remember_fn(self.fns, fn_id, blob)
        per_job = p.split_frames(msg.frames[len(msg.fns):], [row[4] for row in msg.jobs])
        returned: list[SlotOutcome] = []
        for (client_id, seq, attempt, fn_id, _n, options), frames in zip(msg.jobs, per_job, strict=True):
            task = SlotTask((client_id, seq), attempt, fn_id, self.fns.get(fn_id), frames, options)
            if self.stopping:
                returned.append(SlotOutcome(task.key, attempt, p.Outcome.RETURNED, []))
            else:
                self.pending.append(task)
        return self.finished(returned, now) if returned else Actions()

    def _cancel(self, keys: set[Key], now: float) -> Actions:
        dropped = [t for t in self.pending if t.key in keys]
        self.pending = deque(t for t in self.pending if t.key not in keys)
        cancelled = [SlotOutcome(t.key, t.attempt, p.Outcome.CANCELLED, []) for t in dropped]
        actions = self.finished(cancelled, now)
        actions.kill = sorted(keys - {t.key for t in dropped})
        return actions

    def take_tasks(self, free_slots: int, now: float = 0.0) -> list[SlotTask]:
        """Tasks to start now on ``free_slots`` idle slots.

        A job given again while its first copy runs here (the broker thought us dead) waits: when
        the first copy ends, its result wins and the waiting copy is dropped (see ``finished``).
        """
        tasks: list[SlotTask] = []
        waiting: list[SlotTask] = []
        while self.pending and len(tasks) < free_slots:
            task = self.pending.popleft()
            if task.key in self.running_keys:
                waiting.append(task)
            else:
                self.running_keys.add(task.key)
                tasks.append(task)
                self.unreported[task.key] = now
        self.pending.extendleft(reversed(waiting))
        return tasks

    def report_started(self, now: float) -> Actions:
        """STARTED for the jobs that have run for ``STARTED_REPORT_S`` (and have not finished)."""
        if self.link is not Link.READY or not self.unreported:
            return Actions()
        due = [key for key, since in self.unreported.items() if now - since >= STARTED_REPORT_S]
        if not due:
            return Actions()
        for key in due:
            del self.unreported[key]
        return self._out(now, [p.Started([list(key) for key in due])])

    def next_report_at(self) -> float | None:
        """When :meth:`report_started` next has something to send (the oldest start comes first)."""
        if self.link is not Link.READY:
            return None
        for since in self.unreported.values():
            return since + STARTED_REPORT_S
        return None

    def finished(self, outcomes: list[SlotOutcome], now: float, from_slots: int = 0) -> Actions:
        """Jobs left our hands (the first ``from_slots`` outcomes came from slots); report them."""
        ended = set()
        for o in outcomes[:from_slots]:
            self.running_keys.discard(o.key)
            if o.outcome in ENDS_JOB:
                ended.add(o.key)
        if ended and any(t.key in ended for t in self.pending):  # copies given again: not needed now
            outcomes = outcomes + [SlotOutcome(t.key, t.attempt, p.Outcome.CANCELLED, [])
                                   for t in self.pending if t.key in ended]
            self.pending = deque(t for t in self.pending if t.key not in ended)
        for outcome in outcomes:
            self.unreported.pop(outcome.key, None)
        outcomes = [self._fit(o) for o in outcomes]
        self.done += sum(o.outcome == p.Outcome.OK for o in outcomes)
        if not outcomes:
            return Actions()
        if self.link is not Link.READY:
            self.unsent.extend(outcomes)
            return Actions()
        return self._out(now, [self._send_results(outcomes, credit=0 if self.stopping else len(outcomes))])

    def _fit(self, outcome: SlotOutcome) -> SlotOutcome:
        """Turn a result too large for the broker into an error (sent whole, it would cut us off)."""
        size = sum(memoryview(f).nbytes for f in outcome.frames)
        limit = self.max_message_bytes - ENVELOPE_ALLOWANCE
        if not self.max_message_bytes or size <= limit:
            return outcome
        error = PayloadTooLarge(size, limit, "this job's result")
        return SlotOutcome(outcome.key, outcome.attempt, p.Outcome.ERROR, ser.dump_exception(error),
                           ser.error_line(error), outcome.run_s, outcome.started_at, outcome.finished_at,
                           outcome.peak_rss, p.ResultKind.LIMIT)

    def _send_results(self, outcomes: list[SlotOutcome], credit: int) -> p.Results:
        """RESULTS for these outcomes; those that end a job are kept until the broker has read them."""
        kept = [o for o in outcomes if o.outcome in ENDS_JOB]
        if kept:
            self.unacked.append((self.offered, kept))
        self.offered += credit
        rows = [[o.key[0], o.key[1], o.attempt, int(o.outcome), len(o.frames), o.info[:p.MAX_TEXT_CHARS]]
                for o in outcomes]
        frames = [f for o in outcomes for f in o.frames]
        kinds = [int(o.kind) for o in outcomes] if any(o.kind for o in outcomes) else []
        return p.Results(credit, rows, frames, [o.stats_row() for o in outcomes], kinds)

    def tick(self, now: float) -> Actions:
        """Heartbeat when quiet; give up on a silent broker and schedule a reconnect."""
        if self.link is Link.DOWN:
            return Actions()
        silent_s = now - self.last_heard
        if silent_s > self.interval_s * self.liveness:
            if self.link is Link.CONNECTING:  # said at every try, so a worker never waits in silence
                log.warning("no answer from a broker at %s for %.0f s (is `zfarm broker` running there?): "
                            "trying again in %.0f s", self.settings.address, silent_s, self.backoff_s)
            else:
                log.warning("broker silent for %.1f s: reconnecting in %.0f s", silent_s, self.backoff_s)
            return self._drop_link(now)
        if self.link is Link.READY and now - self.last_sent >= self.interval_s:
            return self._out(now, [p.Heartbeat()])
        return Actions()

    def _drop_link(self, now: float) -> Actions:
        self.link = Link.DOWN
        self.reconnect_at = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.settings.reconnect_max_s)
        return Actions(reconnect=True)

    def stop(self, now: float) -> Actions:
        """Take no more jobs; hand back those not started. Running ones may finish."""
        if self.stopping:
            return Actions()
        self.stopping = True
        returned = [SlotOutcome(t.key, t.attempt, p.Outcome.RETURNED, []) for t in self.pending]
        self.pending.clear()
        log.info("worker %s stopping: handed back %d queued jobs, %d running", self.id, len(returned),
                 self.running)
        return self.finished(returned, now)

    def goodbye(self, now: float) -> Actions:
        return self._out(now, [p.Disconnect("worker stopping")] if self.link is Link.READY else [])

    def _out(self, now: float, msgs: list[p.Message]) -> Actions:
        self.last_sent = now
        return Actions(send=msgs)


class Worker:
    """The shell: sockets, slots, signals and the clock around a :class:`WorkerCore`."""

    def __init__(self, settings: WorkerSettings, context: zmq.Context[Any] | None = None) -> None:
        self.settings = settings
        # first, so that unusable keys stop us before any socket or process exists
        self.keys = PeerKeys.load(settings.keys, "worker", settings.key_name) if settings.keys else None
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.core = WorkerCore(settings, time.monotonic())
        self.pool: SlotPool | None = None
        self.socket: zmq.Socket[Any] | None = None
        self._watch: HandshakeWatch | None = None
        self._handshake_problem = ""  # logged once, not at every reconnect
        self._poller_key: tuple[int, tuple[int, ...]] = (-1, ())
        self._socket_generation = 0  # counts sockets opened: the poller's key
        self._cached_poller = zmq.Poller()
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
                if core.link is Link.DOWN and now >= core.reconnect_at and not core.stopping:
                    self._open_socket()
                    self._apply(core.connect(now))
                self._poll_once()
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
        poller = self._poller(slot_fds)
        timeout_s = core.interval_s / 4
        if core.link is Link.DOWN:
            timeout_s = max(0.0, min(timeout_s, core.reconnect_at - time.monotonic()))
        deadline = pool.next_deadline()
        if deadline is not None:  # wake up in time to stop a job at its limit
            timeout_s = max(0.0, min(timeout_s, deadline - time.monotonic() + 0.001))
        report_at = core.next_report_at()
        if report_at is not None:  # and to say that a job runs
            timeout_s = max(0.0, min(timeout_s, report_at - time.monotonic() + 0.001))
        ready = dict(poller.poll(int(timeout_s * 1000)))
        if self._watch is not None and ready.get(self._watch.monitor):
            self._read_handshake_events()
        if self.socket is not None and ready.get(self.socket):
            self._drain_socket()
        outcomes: list[SlotOutcome] = []
        for fd, slot in slot_fds.items():
            if ready.get(fd) and (outcome := pool.collect(slot)) is not None:
                outcomes.append(outcome)
        now = time.monotonic()
        outcomes += pool.enforce_limits(now)
        self._apply(core.finished(outcomes, now, from_slots=len(outcomes)))
        started_dead = []
        for task in core.take_tasks(pool.free, now):
            if (outcome := pool.run(task)) is not None:
                started_dead.append(outcome)
        if started_dead:
            self._apply(core.finished(started_dead, now, from_slots=len(started_dead)))
        self._apply(core.report_started(time.monotonic()))

    def _poller(self, slot_fds: dict[int, Any]) -> zmq.Poller:
        """The poller for the socket and the slots' pipes, rebuilt only when one of them changed."""
        key = (self._socket_generation, tuple(slot_fds))
        if key != self._poller_key:
            self._poller_key, self._cached_poller = key, zmq.Poller()
            if self.socket is not None:
                self._cached_poller.register(self.socket, zmq.POLLIN)
            if self._watch is not None:
                self._cached_poller.register(self._watch.monitor, zmq.POLLIN)
            for fd in slot_fds:
                self._cached_poller.register(fd, zmq.POLLIN)
        return self._cached_poller

    def _drain_socket(self) -> None:
        assert self.socket is not None
        while self.socket is not None:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = p.decode(frames)
            except ProtocolError as exc:
                log.warning("dropped a malformed message from the broker: %s", p.clip(str(exc)))
                continue
            self._apply(self.core.on_message(msg, time.monotonic()))

    def _apply(self, actions: Actions) -> None:
        if actions.kill and self.pool is not None:
            cancelled = [o for key in actions.kill if (o := self.pool.cancel(key)) is not None]
            self._apply(self.core.finished(cancelled, time.monotonic(), from_slots=len(cancelled)))
        if self.socket is not None:
            for msg in actions.send:
                self.socket.send_multipart(p.encode(msg), copy=False)
        if actions.reconnect:
            self._close_socket()

    def _read_handshake_events(self) -> None:
        assert self._watch is not None
        problem = self._watch.read()
        if problem and problem != self._handshake_problem:
            log.warning("worker %s: %s", self.core.id, problem)
        self._handshake_problem = problem

    def _open_socket(self) -> None:
        sock = dealer_to_broker(self.context, self.settings.address, self.keys)
        self._watch = HandshakeWatch(sock, "worker", self.keys is not None)
        sock.connect(self.settings.address)
        self.socket = sock
        self._socket_generation += 1

    def _close_socket(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
            self._socket_generation += 1

    def request_stop(self) -> None:
        """First call: drain gracefully within the grace period. Second call: stop now.

        Only counts the request, so it is safe in a signal handler; the loop acts on it.
        """
        self._signals += 1

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
        self._close_socket()
        if self._own_context:
            self.context.term()
        log.info("worker %s stopped after %d jobs", self.core.id, self.core.done)


def announced(settings: WorkerSettings) -> dict[str, Any]:
    """The resources, tags and GPU ids a worker offers: its flags over what the machine has.

    Defaults: cpus = its slots, mem = the machine's memory, gpus = those ``nvidia-smi -L`` lists or
    ``CUDA_VISIBLE_DEVICES`` names. A job without a request takes one slot and asks for nothing.
    """
    gpu_ids = _gpu_ids()
    resources = {"cpus": float(settings.slots), "mem": float(_memory_bytes()), "gpus": float(len(gpu_ids)),
                 **parse_resources(settings.resources)}
    count = int(resources["gpus"])
    gpu_ids = (gpu_ids + [str(i) for i in range(len(gpu_ids), count)])[:count]
    return {"resources": resources, "tags": parse_tags(settings.tags), "gpu_ids": gpu_ids}


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _gpu_ids() -> list[str]:
    """GPU ids from ``CUDA_VISIBLE_DEVICES``, else from ``nvidia-smi -L`` (none if neither answers)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]


def run_worker(settings: WorkerSettings) -> None:
    """The ``zfarm worker`` command: serve until SIGINT/SIGTERM (twice: at once)."""
    worker = Worker(settings)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: %s", signal.Signals(signum).name,
                 "stopping now" if worker._signals else "finishing running jobs, then stopping")
        worker.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    worker.serve()
