"""The client's pure core: what to send the broker and which futures to settle, no I/O.

::

    user threads ──submit/cancel/stop──► IOThread ──events, now──► ClientCore ──► Actions
                                            ▲  DEALER (Link)                       │ send, settle,
                                            └──────────────────────────────────────┘ reconnect

Fed with events and the time they happened (:meth:`ClientCore.submit`, :meth:`on_message`, ...),
it keeps every unfinished job and collects what to do in an :class:`Actions`, which
:meth:`ClientCore.flush` hands over once per turn of the I/O thread's loop: jobs waiting to go
leave as one SUBMIT per function (so a burst of ``submit()`` calls becomes one message), results
acknowledged in one RECEIVED, cancels in one CANCEL.

Lazy pirate: when the broker is silent past its liveness window the core asks for a new socket
(``reconnect``), introduces itself again after the backoff (1 s → 32 s) and resubmits every
unfinished job. The broker ignores jobs it already holds, and a result for a job already settled
here is dropped and counted, so every future resolves exactly once even when its job ran twice.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any

from zfarm import protocol as p
from zfarm.client.futures import JobFuture
from zfarm.client.receipts import Receipts
from zfarm.client.waiting import Waiting
from zfarm.config import ClientSettings
from zfarm.errors import BrokerUnavailable, ConfigError, DependencyFailed, Refused
from zfarm.link import Checked, LinkState, Liveness
from zfarm.stats import JobRecord, record_of

log = logging.getLogger(__name__)

_OUTCOME_NAMES = {int(o): o.name.lower() for o in p.Outcome}
RETRY_BACKOFF_MAX_S = 30.0
#: how long ending a session waits for the broker to be reachable, to tell it
END_SESSION_WAIT_S = 10.0
#: SUBMIT messages are cut at this size so one message never holds up the broker for long
SUBMIT_BATCH_BYTES = 16 * 1024 * 1024


def bounced(row: p.ResultRow) -> bool:
    """Whether the broker handed the job back unaccepted (it goes again later), rather than ended it."""
    return row.outcome == p.Outcome.BUSY or row.kind == p.ResultKind.FUNCTION_MISSING


def retryable(row: p.ResultRow) -> bool:
    """Whether a failure may be cured by running the job again: an ERROR the job raised, not one of
    its limits (LIMIT), nor one that suspended its project."""
    return row.outcome == p.Outcome.ERROR and row.kind == p.ResultKind.PLAIN


@dataclass(slots=True, eq=False)
class PendingJob:
    seq: int
    fn_id: bytes
    frames: list[Any]
    future: JobFuture
    size: int = 0
    submitted_at: float = 0.0  # when the I/O thread took it (monotonic)
    options: dict[str, Any] = field(default_factory=dict)  # limits the worker enforces
    retries: int = 0  # runs left after the job raised (not after it crashed or timed out)
    attempt: int = 0  # retries used so far
    accepted: bool = False  # a session's broker said it holds the job (ACCEPTED)
    drop_held: bool = False  # a re-run: the broker must forget the result it holds first (RECEIVED)


@dataclass(slots=True)
class Actions:
    """What the shell must do after the core took in events."""

    send: list[p.Message] = field(default_factory=list)
    #: finished jobs to settle from their RESULT rows: (job, outcome, frames, info)
    settle: list[tuple[PendingJob, int, list[Any], str]] = field(default_factory=list)
    fail: list[tuple[PendingJob, BaseException]] = field(default_factory=list)  # futures to fail (also
    #: jobs whose upstream job did not succeed: DependencyFailed)
    cancel: list[PendingJob] = field(default_factory=list)  # futures to cancel (even if running)
    started: list[PendingJob] = field(default_factory=list)  # futures whose job a worker runs
    records: list[JobRecord] = field(default_factory=list)  # for Client.stats()
    reconnect: bool = False  # close the socket; open a new one at ``core.live.reconnect_at``
    welcomed: bool = False  # the broker answered our HELLO
    fatal: BaseException | None = None  # the client cannot go on (refused by the broker)


class ClientCore:
    """Every unfinished job of one client and the conversation with the broker about them.

    Args:
        settings: the client's settings.
        client_id: its id (a session's name makes its id, so the broker knows it again).
        now: the current time (monotonic seconds).
        rng: jitter for the back-pressure backoff (a seeded one in tests).
    """

    def __init__(self, settings: ClientSettings, client_id: str, now: float,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self.session = settings.session
        self.live = Liveness(settings.heartbeat_interval_s, settings.liveness, settings.reconnect_min_s,
                             settings.reconnect_max_s, now)
        self.rng = rng or random.Random()
        self.max_message_bytes = 0
        self.duplicates = 0  # results that arrived for jobs already settled
        self.welcomed = False
        self.stopping = False
        #: why the last ZeroMQ handshake failed, in words (set by the shell; said in BrokerUnavailable)
        self.handshake_problem = ""
        self.jobs: dict[int, PendingJob] = {}  # in submission order (the broker-timeout look needs it)
        self._fns: dict[bytes, Any] = {}
        self._fn_users: dict[bytes, int] = {}
        self._fns_sent: set[bytes] = set()
        self._to_send: list[int] = []
        self.waiting = Waiting(self.rng)  # jobs held back: a retry's backoff, the broker's BUSY
        self.receipts = Receipts(self.session)
        self._cancels: list[int] = []  # to send once the broker listens
        self._noticed: set[int] = set()  # NOTICE kinds already logged (once each: the status says it all)
        #: leaving a session: stop once the broker holds every job, or at this time (monotonic)
        self._detach_by: float | None = None
        self.end_session = False
        self._out = Actions()

    # ---- events ----------------------------------------------------------------------------------

    def connected(self, now: float) -> None:
        """A new socket is open: introduce ourselves."""
        self._hello(now)

    def submit(self, fn_id: bytes, blob: Any, jobs: list[PendingJob], now: float) -> None:
        self._fns[fn_id] = blob
        self._fn_users[fn_id] = self._fn_users.get(fn_id, 0) + len(jobs)
        queue = self.waiting.bounced or self._to_send  # none overtakes a bounced one
        for job in jobs:
            job.submitted_at = now
            self.jobs[job.seq] = job
            queue.append(job.seq)
            self.receipts.submitted(job.seq)
        self.live.retry_now(now)

    def cancel(self, seq: int) -> None:
        if self._forget(seq) is not None:
            self._cancels.append(seq)

    def pin(self, seq: int) -> None:
        """Keep job ``seq``'s result held at the broker (no RECEIVED) until :meth:`unpin`: a job being
        submitted depends on it. From any thread (see :class:`zfarm.client.receipts.Pins`)."""
        self.receipts.pins.add(seq)

    def unpin(self, seqs: list[int]) -> None:
        """A dependent job no longer needs these results held (from any thread)."""
        self.receipts.pins.release(seqs)

    def skip(self, seqs: list[int]) -> None:
        """Seqs taken for jobs that were never posted."""
        for seq in seqs:
            self.receipts.posted(seq)

    def stop(self, end_session: bool, now: float) -> None:
        """Close: at once, unless the broker must hear something first (then wait for it a while)."""
        self.end_session = end_session
        must_tell = end_session or (not self.jobs and bool(self.receipts.read_results()))
        if must_tell and not self.live.ready:
            self.leave_by(now + END_SESSION_WAIT_S, now)
        else:
            self.stopping = True

    def leave_by(self, deadline: float, now: float) -> None:
        """Leave once the broker holds every job and can hear us say so (or at ``deadline``).

        Jobs waiting out a retry or a full queue go now: the broker runs them without us.
        """
        self._detach_by = deadline
        self._to_send.extend(seq for seq in self.waiting.take_all() if seq in self.jobs)
        self.live.retry_now(now)

    def accepted(self, seq: int) -> bool:
        job = self.jobs.get(seq)
        return job is not None and job.accepted

    def on_message(self, msg: p.Message, now: float) -> None:
        self.live.heard(now)
        if isinstance(msg, p.Result):
            self._results(msg, now)
        elif isinstance(msg, (p.Accepted, p.Running, p.Notice)):
            self._about_jobs(msg)
        elif isinstance(msg, p.Welcome):
            self._welcome(msg)
        elif isinstance(msg, p.Reconnect):
            log.info("client %s: broker does not know us (%s); introducing ourselves again",
                     self.client_id, p.clip(msg.reason))
            self._hello(now)
        elif isinstance(msg, p.Refused):
            error = Refused(f"the broker at {self.settings.address} refused this client: {msg.reason}")
            self.fail_all(error)
            self._out.fatal = error
            self.stopping = True
        elif isinstance(msg, p.Disconnect):
            self._drop_link(now)

    def flush(self, now: float) -> Actions:
        """The periodic work (retries due, RECEIVED, SUBMIT, CANCEL, heartbeats, liveness), then
        everything to do since the last flush."""
        self._release_retries(now)
        if self.live.ready:
            self._acknowledge(now)
            self._send_jobs(now)
            if self._cancels:  # one message however many were cancelled
                self._send(p.Cancel(self._cancels), now)
                self._cancels = []
        self._check_liveness(now)
        if self._detach_by is not None and (now > self._detach_by
                                            or (self.live.ready and self._all_accepted())):
            self.stopping = True
        out, self._out = self._out, Actions()
        return out

    def take_ended(self) -> Actions:
        """The futures to settle or fail so far, ahead of :meth:`flush`: the shell settles them before
        the RECEIVED that flush may send, so a job that depends on one of them either pins it in time
        or finds its future done (and takes its value)."""
        out = Actions(settle=self._out.settle, fail=self._out.fail, records=self._out.records)
        self._out.settle, self._out.fail, self._out.records = [], [], []  # records with their futures
        return out

    def wait_s(self, now: float) -> float:
        """How long the shell may sleep: a quarter interval, or less if something is due sooner."""
        due = now + self.live.interval_s / 4
        if (waiting_at := self.waiting.next_at()) is not None:
            due = min(due, waiting_at)
        if (received_at := self.receipts.due_at()) is not None:
            due = min(due, received_at)
        if self.live.state is LinkState.DOWN:
            due = min(due, self.live.reconnect_at)
        return max(0.0, due - now)

    def fail_all(self, error: BaseException) -> None:
        for seq in list(self.jobs):
            if (job := self._forget(seq)) is not None:
                self._out.fail.append((job, error))

    def goodbye(self, now: float) -> tuple[Actions, str]:
        """Last words: what to send, the futures left to cancel, and the DISCONNECT reason ("": none)."""
        if self._detach_by is not None:
            if self.live.ready:
                self._send_jobs(now)  # a session's last jobs reach the broker before we say goodbye
            if not self._all_accepted():
                log.warning("client %s left session %s before the broker held %d of its jobs: a rerun "
                            "submits them again", self.client_id, self.session,
                            sum(not job.accepted for job in self.jobs.values()))
            elif not self.live.ready and self.jobs:
                log.warning("client %s left session %s while the broker was unreachable: its %d jobs are "
                            "safe if the broker runs with --journal, else a rerun submits them again",
                            self.client_id, self.session, len(self.jobs))
        elif not self.jobs and (read := self.receipts.read_results()):
            # Closed after all its jobs: this program has the results it read, so the broker may forget
            # them; what other clients of the session left stays (the session ends if nothing does).
            self.receipts.note(read, now)
        if (self.end_session or self.receipts.pending) and not self.live.ready:
            log.warning("client %s could not reach the broker to %s: it keeps them for its --session-ttl",
                        self.client_id, f"end session {self.session}" if self.end_session else
                        f"release {len(self.receipts.pending)} results of session {self.session}")
        reason = ""
        if self.live.ready:
            self._acknowledge(now, force=True)
            reason = p.END_SESSION if self.end_session else "client closed"
        for seq in list(self.jobs):  # the client was shut down without waiting for these
            if (job := self._forget(seq)) is not None:
                self._out.cancel.append(job)
        out, self._out = self._out, Actions()
        return out, reason

    # ---- the conversation ------------------------------------------------------------------------

    def _hello(self, now: float) -> None:
        self.live.connecting(now)
        self._fns_sent.clear()
        info = {"session": self.session} if self.session else {}
        hello = p.Hello(p.Role.CLIENT.value, self.client_id, socket.gethostname(), os.getpid(), 0, info)
        self._send(hello, now)

    def _welcome(self, msg: p.Welcome) -> None:
        first = not self.welcomed
        self.live.welcomed(msg.heartbeat_interval_s, msg.liveness)
        self.max_message_bytes = msg.max_message_bytes
        for job in self.jobs.values():  # this broker may not be the one that accepted them
            job.accepted = False
            # a re-run's RECEIVED may have died with the old connection: say it again, or the broker
            # answers the re-run with the failed result it still holds
            job.drop_held = job.drop_held or job.attempt > 0
        # every unfinished job (the broker drops what it has) but those held back: they go in their time
        self._to_send = sorted(set(self.jobs) - self.waiting.seqs())
        if not first:
            log.info("client %s reconnected to broker %s; resubmitting %d unfinished jobs", self.client_id,
                     msg.broker_id, len(self._to_send))
        self.welcomed = True
        self._out.welcomed = True

    def _results(self, msg: p.Result, now: float) -> None:
        per_row = p.split_frames(msg.frames, [row[2] for row in msg.results])
        stats: list[list[Any] | None] = [*msg.stats] or [None] * len(msg.results)
        received = []
        busy = False
        out = self._out
        for wire_row, frames, stats_row in zip(msg.results, per_row, stats, strict=True):
            result = p.ResultRow.from_wire(wire_row)
            row = None if stats_row is None else p.JobStats.from_wire(stats_row)
            seq, outcome, info = result.seq, result.outcome, result.info
            if bounced(result):
                self._bounced_back(seq, result)
                busy = busy or outcome == p.Outcome.BUSY
                continue
            if row is not None and outcome != p.Outcome.CANCELLED and seq in self.jobs:
                name = _OUTCOME_NAMES.get(outcome, str(outcome))
                out.records.append(record_of(f"{self.client_id}:{seq}", name, info, row))
            if result.kind == p.ResultKind.PROJECT_SUSPENDED:
                log.warning("client %s: job %d failed and suspended its project (on_error=suspend): %s; "
                            "resume it with project.resume() or `zfarm project resume NAME`", self.client_id,
                            seq, p.clip(info))
            if retryable(result) and self._retry(seq, info, now):
                continue  # the re-run's SUBMIT tells the broker to forget this result
            job = self._forget(seq)
            if not self.session:
                received.append(seq)  # the broker holds each result until we say we have it
            elif job is not None and outcome != p.Outcome.CANCELLED:
                self.receipts.arrived.add(seq)  # released, once read, when this client closes after its jobs
            if job is None:
                self.duplicates += 1
                continue
            if row is not None:
                job.future.run_s = row.run_s
            if result.kind == p.ResultKind.DEPENDENCY_FAILED:  # info: "UPSTREAM: why"
                upstream, _, why = info.partition(": ")
                out.fail.append((job, DependencyFailed(f"{self.client_id}:{seq}", upstream, why)))
            elif result.kind == p.ResultKind.REFUSED:  # its options, not a worker: say so
                out.fail.append((job, ConfigError(f"the broker refused job {self.client_id}:{seq}: {info}; "
                                                  "fix its options (project, resources, tags) and submit it "
                                                  "again")))
            else:
                out.settle.append((job, outcome, frames, info))
        self.receipts.note(received, now)
        self.waiting.note_room(busy, now)

    def _about_jobs(self, msg: p.Accepted | p.Running | p.Notice) -> None:
        if isinstance(msg, p.Notice):
            if msg.kind not in self._noticed:  # once per kind: the project's status says it for every job
                self._noticed.add(msg.kind)
                log.warning("client %s: %s %s can run on no connected worker: %s", self.client_id,
                            "job" if len(msg.seqs) == 1 else "jobs", ", ".join(str(s) for s in msg.seqs[:10]),
                            p.clip(msg.text))
            return
        for seq in msg.seqs:
            if (job := self.jobs.get(seq)) is not None:
                if isinstance(msg, p.Accepted):
                    job.accepted = True
                else:
                    self._out.started.append(job)

    def _bounced_back(self, seq: int, row: p.ResultRow) -> None:
        """The broker handed this job back unaccepted: it goes again later."""
        if (job := self.jobs.get(seq)) is None:
            return
        job.accepted = False
        if row.kind == p.ResultKind.FUNCTION_MISSING:
            self._fns_sent.discard(job.fn_id)  # the broker let it go: send it again
            self._to_send.append(seq)
        else:  # back-pressure: send it later
            self.waiting.bounced.append(seq)

    def _retry(self, seq: int, info: str, now: float) -> bool:
        """Run a job that raised again later, if it has retries left (backoff 1, 2, 4 … 30 s)."""
        job = self.jobs.get(seq)
        if job is None or job.retries <= 0 or self.waiting.retrying(seq):
            return False
        job.retries -= 1
        job.attempt += 1
        job.accepted = False  # leaving the session waits for the re-run to be accepted
        job.drop_held = True
        delay_s = min(self.settings.retry_backoff_s * 2 ** (job.attempt - 1), RETRY_BACKOFF_MAX_S)
        log.info("job %s:%d raised (%s): running it again in %.1f s, %d retries left", self.client_id, seq,
                 p.clip(info), delay_s, job.retries)
        self.waiting.retry_at(seq, now + delay_s)
        return True

    def _release_retries(self, now: float) -> None:
        retries, bounced = self.waiting.due(now)
        self._to_send.extend(seq for seq in retries if seq in self.jobs)
        self._to_send.extend(bounced)

    def _acknowledge(self, now: float, force: bool = False) -> None:
        """Tell the broker which results arrived, in batches: it holds each result until then."""
        if (msg := self.receipts.take(now, self.jobs, force)) is not None:
            self._send(msg, now)

    def _forget(self, seq: int) -> PendingJob | None:
        job = self.jobs.pop(seq, None)
        if job is not None:
            if "after" in job.options:  # its upstream results need not stay held for it now
                self.receipts.pins.release(job.options["after"])
            users = self._fn_users[job.fn_id] - 1
            if users:
                self._fn_users[job.fn_id] = users
            else:
                del self._fn_users[job.fn_id]
                del self._fns[job.fn_id]
                self._fns_sent.discard(job.fn_id)
        return job

    def _send_jobs(self, now: float) -> None:
        """Everything waiting goes now: one SUBMIT per run of jobs of one function."""
        if not self._to_send:
            return
        batch: list[PendingJob] = []
        size = 0
        for seq in self._to_send:
            job = self.jobs.get(seq)
            if job is None:
                continue
            if batch and (job.fn_id != batch[0].fn_id or size + job.size > SUBMIT_BATCH_BYTES):
                self._send_batch(batch, now)
                batch, size = [], 0
            batch.append(job)
            size += job.size
        if batch:
            self._send_batch(batch, now)
        self._to_send = []

    def _send_batch(self, batch: list[PendingJob], now: float) -> None:
        fn_id = batch[0].fn_id
        with_fn = fn_id not in self._fns_sent
        frames: list[Any] = [self._fns[fn_id]] if with_fn else []
        rows = []
        for job in batch:
            rows.append([job.seq, len(job.frames), job.options])
            frames.extend(job.frames)
        reruns = [job.seq for job in batch if job.drop_held]
        if reruns:  # else the broker answers a re-run with the error it holds from the last run
            for job in batch:
                job.drop_held = False
            self._send(p.Received(reruns, self.receipts.oldest_unfinished(self.jobs)), now)
        self._fns_sent.add(fn_id)
        self._send(p.Submit(fn_id, with_fn, rows, frames), now)

    def _check_liveness(self, now: float) -> None:
        live = self.live
        limit_s = self.settings.broker_timeout_s
        if self.jobs and now - live.last_heard > limit_s:
            # Each job waits broker_timeout_s from its own submission, not from the last message heard.
            # Jobs are kept in submission order, so the first that has not waited that long ends the
            # look: a turn costs the jobs it gives up, not every job submitted during the outage.
            expired: list[tuple[int, float]] = []
            for seq, job in self.jobs.items():
                waited_s = now - max(live.last_heard, job.submitted_at)
                if waited_s <= limit_s:
                    break
                expired.append((seq, waited_s))
            detail = self.handshake_problem or "unfinished jobs given up"
            for seq, waited_s in expired:
                if (gone := self._forget(seq)) is not None:
                    self._out.fail.append((gone, BrokerUnavailable(self.settings.address, waited_s, detail)))
        checked = live.check(now)
        if checked.dropped:
            log.warning("client %s: broker silent for %.1f s; reconnecting in %.0f s", self.client_id,
                        live.silent_s(now), live.reconnect_at - now)
            self._out.reconnect = True
        elif checked is Checked.HEARTBEAT:
            self._send(p.Heartbeat(), now)

    def _drop_link(self, now: float) -> None:
        self.live.drop(now)
        self._out.reconnect = True

    def _all_accepted(self) -> bool:
        return all(job.accepted for job in self.jobs.values())

    def _send(self, msg: p.Message, now: float) -> None:
        self._out.send.append(msg)
        self.live.sent(now)
