"""The client's I/O thread: the one owner of the client's DEALER socket.

::

    user threads ──submit/cancel──► inbox (deque) ──wake──►┐
                                                          I/O thread ◄──DEALER──► broker
    futures ◄──────────── set_result / set_exception ─────┘

Lazy pirate: when the broker is silent past its liveness window the thread
drops the socket, reconnects with backoff (1 s → 32 s), introduces itself
again and resubmits every unfinished job. The broker ignores jobs it already
holds, and a result for a job already resolved here is dropped, so every
future resolves exactly once even when its job ran twice.
"""

from __future__ import annotations

import enum
import heapq
import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, PENDING, RUNNING
from dataclasses import dataclass, field
from typing import Any

import zmq

from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.config import ClientSettings
from zfarm.errors import (
    BrokerUnavailable,
    DependencyFailed,
    JobCrashed,
    JournalCorrupted,
    JournalFull,
    ProtocolError,
    Refused,
    WorkerLost,
)
from zfarm.output import JobOutput
from zfarm.output import take as take_output
from zfarm.security import HandshakeWatch, PeerKeys, dealer_to_broker
from zfarm.stats import JobRecord, record_of

log = logging.getLogger(__name__)

_OUTCOME_VALUES = {int(o) for o in p.Outcome}
RETRY_BACKOFF_MAX_S = 30.0
#: back-pressure: jobs bounced by a full broker go back BUSY_BATCH at a time, waiting BUSY_MIN_S,
#: doubling up to BUSY_MAX_S while the broker stays full
BUSY_BATCH = 16
BUSY_MIN_S = 0.05
BUSY_MAX_S = 2.0
#: job records kept for Client.stats(), newest last
RECORDS_KEPT = 100_000

#: RECEIVED goes out once this many results are unacknowledged, or RECEIVED_DELAY_S after the first
RECEIVED_BATCH = 4096
RECEIVED_DELAY_S = 0.05

#: how long ending a session waits for the broker to be reachable, to tell it
END_SESSION_WAIT_S = 10.0

#: SUBMIT messages are cut at this size so one message never holds up the broker for long
SUBMIT_BATCH_BYTES = 16 * 1024 * 1024


class Link(str, enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    READY = "ready"


class JobFuture(Future[Any]):
    """A standard future whose ``cancel()`` also cancels the job at the broker."""

    def __init__(self, connection: Connection, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self._connection = connection
        #: for a chunk of a map that failed: the results of the items before the failing one
        self.partial: list[Any] | None = None
        #: how long the job ran in its slot, once it is done (None if unknown)
        self.run_s: float | None = None
        #: what the job printed (the end of its stdout and stderr), once it is done; None: nothing
        self.output: JobOutput | None = None
        self._was_read = False

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            self._read()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        finally:
            self._read()

    def _read(self) -> None:
        """In a session, the program has this result now: a clean close may release it."""
        if self._connection.session and not self._was_read and self.done():
            self._was_read = True
            self._connection.read_seqs.append(self.seq)

    def accepted(self) -> bool:
        """Whether the broker has said it holds this job (a session's), or the job is done."""
        return self.done() or self._connection.accepted(self.seq)

    def cancel(self) -> bool:
        """Cancel the job unless it is known to have started (as ``concurrent.futures`` does).

        True means the future is cancelled for good: its result is never delivered, and the
        broker drops the job, or, if a worker started it in the meantime (before we heard of
        it), stops it. False: the job runs (see :meth:`kill`) or is done.
        """
        if self.done():
            return self.cancelled()
        if not cancel_future(self):
            return False
        self._connection.cancel(self.seq)
        return True

    def kill(self) -> bool:
        """Cancel the job even if it runs: its worker kills it (and whatever it started).

        Returns False only if the job was already done (finished, failed or cancelled).
        """
        if self.done():
            return self.cancelled()
        if not cancel_future(self, force=True):
            return self.cancelled()
        self._connection.cancel(self.seq)
        return True


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


class Connection(threading.Thread):
    """Runs the socket; every method but the public ones below runs in this thread."""

    def __init__(self, settings: ClientSettings, client_id: str, context: zmq.Context[Any]) -> None:
        super().__init__(name=f"zfarm-client-{client_id}", daemon=True)
        # first, so that unusable keys raise before any socket exists
        self._keys = PeerKeys.load(settings.keys, "client", settings.key_name) if settings.keys else None
        self.settings = settings
        self.client_id = client_id
        self.context = context
        self.welcomed = threading.Event()
        self.max_message_bytes = 0
        self.duplicates = 0
        self.records: deque[JobRecord] = deque(maxlen=RECORDS_KEPT)
        self.records_lock = threading.Lock()
        self.fatal: BaseException | None = None
        #: why the last ZeroMQ handshake with the broker failed, in words ("" if it did not)
        self.handshake_problem = ""
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._woken = False
        self._lock = threading.Lock()
        self._closed_for_posts = False  # the I/O thread has ended: nothing posted would be seen
        self._stopping = False
        #: leaving a session: stop once the broker holds every job, or at this time (monotonic)
        self._detach_by: float | None = None
        self._end_session = False
        # owned by the I/O thread from here on
        self._socket: zmq.Socket[Any] | None = None
        self._watch: HandshakeWatch | None = None
        self._socket_generation = 0  # counts sockets opened and closed
        self._poller_generation = -1  # the socket generation the cached poller was built for
        self._cached_poller = zmq.Poller()
        self._jobs: dict[int, PendingJob] = {}
        self._fns: dict[bytes, Any] = {}
        self._fn_users: dict[bytes, int] = {}
        self._fns_sent: set[bytes] = set()
        self._to_send: list[int] = []
        self._retry_at: list[tuple[float, int]] = []  # (when, seq): jobs waiting out a retry backoff
        self._retrying: set[int] = set()  # their seqs
        # Back-pressure: jobs the broker had no room for (BUSY) wait here, in order, with every
        # job submitted after them; they go back in small batches, less often while it stays full.
        self._bounced: deque[int] = deque()
        self._busy_backoff_s = BUSY_MIN_S
        self._busy_retry_at = 0.0
        self.session = settings.session
        self._received: list[int] = []  # results to tell the broker about (RECEIVED), batched
        self._received_since = 0.0
        # A session never says RECEIVED (but for a re-run): the broker keeps its results until it
        # ends, so that a rerun after a crash collects every finished job.
        # A session's results that reached us, and those the program then read: a clean close
        # releases the read ones (RECEIVED); the others stay with the session for a later run.
        self._arrived: set[int] = set()
        #: seqs whose result the program read, appended from user threads (list.append is atomic);
        #: only a close looks at them, so reading a result never wakes this thread
        self.read_seqs: list[int] = []
        self._unfinished_heap: list[int] = []  # seqs of _jobs, for the oldest one (stale ones popped late)
        self._noticed: set[int] = set()  # NOTICE kinds already logged
        self._pinned: dict[int, int] = {}  # results kept held for dependent jobs: seq → how many
        self._pin_lock = threading.Lock()
        self._posted_upto = 1  # every seq below it has been posted to this thread
        self._posted_above: set[int] = set()
        self._cancels: list[int] = []  # to send once the broker listens
        self._link = Link.DOWN
        self._interval_s = settings.heartbeat_interval_s
        self._liveness = settings.liveness
        now = time.monotonic()
        self._last_heard = now
        self._attempt_at = now
        self._last_sent = now
        self._backoff_s = settings.reconnect_min_s
        self._reconnect_at = now

    # ---- called from user threads ----------------------------------------------------------------

    def submit(self, fn_id: bytes, fn_blob: Any, jobs: list[PendingJob]) -> None:
        """Hand jobs to the I/O thread.

        Raises:
            RuntimeError: the connection is closed (the client was shut down, or closed at exit).
        """
        if not self._post("submit", (fn_id, fn_blob, jobs)):
            raise RuntimeError("cannot submit jobs: the client is closed (shut down, or closed at exit)")

    @property
    def closed(self) -> bool:
        return self._closed_for_posts

    def cancel(self, seq: int) -> None:
        self._post("cancel", seq)

    def accepted(self, seq: int) -> bool:
        """Whether the broker said ACCEPTED for unfinished job ``seq`` (a flag the I/O thread sets)."""
        job = self._jobs.get(seq)
        return job is not None and job.accepted

    def skip(self, seqs: list[int]) -> None:
        """Seqs taken for jobs that will never be submitted (their pickling failed)."""
        self._post("skip", seqs)

    def detach(self, timeout_s: float) -> None:
        """Leave a session: wait (up to ``timeout_s``) until the broker holds every job, then close."""
        self._post("detach", timeout_s)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s + 5.0)
        self.close()

    def close(self, timeout_s: float = 5.0, end_session: bool = False) -> None:
        """Say goodbye to the broker, stop the thread and close the socket.

        ``end_session``: the broker forgets the session's jobs and results, instead of keeping them.
        """
        self._post("stop", end_session)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)
        self._wake_r.close()
        self._wake_w.close()

    def _post(self, what: str, payload: Any) -> bool:
        """Queue work for the I/O thread; False if it has stopped taking any."""
        with self._lock:
            if self._closed_for_posts:
                return False
            self._inbox.append((what, payload))
            if self._woken:
                return True
            self._woken = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # closed: the thread is gone
        return True

    # ---- the I/O thread ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping:
                self._step()
        except BaseException as exc:  # never die silently: fail the futures with the reason
            log.exception("client %s I/O thread failed", self.client_id)
            self.fatal = exc
            self._fail_all(exc)
            self.welcomed.set()  # wake the constructor: it raises ``fatal``
        finally:
            try:
                self._goodbye()
            finally:
                self._close_socket()
                self._refuse_posts()

    def _step(self) -> None:
        now = time.monotonic()
        if self._link is Link.DOWN and now >= self._reconnect_at:
            self._connect(now)
        poller = self._poller()
        ready = dict(poller.poll(int(self._wait_s(now) * 1000)))
        if self._watch is not None and ready.get(self._watch.monitor):
            self._read_handshake_events()
        if self._inbox or ready.get(self._wake_r.fileno()):
            self._take_inbox()
        if self._socket is not None and ready.get(self._socket):
            self._drain()
        self._release_retries(time.monotonic())
        self._acknowledge(time.monotonic())
        self._flush()
        if self._cancels and self._link is Link.READY:  # one message however many were cancelled
            self._send(p.Cancel(self._cancels), time.monotonic())
            self._cancels = []
        self._check_liveness(time.monotonic())
        if self._detach_by is not None and (time.monotonic() > self._detach_by
                                            or (self._all_accepted() and self._link is Link.READY)):
            self._stopping = True

    def _wait_s(self, now: float) -> float:
        """How long the loop may sleep: a quarter interval, or less if a retry, a resend of bounced
        jobs or a RECEIVED is due sooner."""
        due = [now + self._interval_s / 4]
        if self._retry_at:
            due.append(self._retry_at[0][0])
        if self._bounced:
            due.append(self._busy_retry_at)
        if self._received:
            due.append(self._received_since + RECEIVED_DELAY_S)
        return max(0.0, min(due) - now)

    def _leave_by(self, deadline: float) -> None:
        """Leave once the broker holds every job and can hear us say so (or at ``deadline``).

        Jobs waiting out a retry or a full queue go now: the broker runs them without us.
        """
        self._detach_by = deadline
        waiting = [seq for _, seq in self._retry_at] + list(self._bounced)
        self._retry_at.clear()
        self._retrying.clear()
        self._bounced.clear()
        self._to_send.extend(seq for seq in waiting if seq in self._jobs)
        if self._link is Link.DOWN:  # try the broker now, not after the backoff
            self._reconnect_at = time.monotonic()
            self._backoff_s = self.settings.reconnect_min_s

    def _all_accepted(self) -> bool:
        return all(job.accepted for job in self._jobs.values())

    def _poller(self) -> zmq.Poller:
        """The poller for the wake-up pipe, socket and monitor, rebuilt only when they change."""
        if self._poller_generation != self._socket_generation:
            self._poller_generation, self._cached_poller = self._socket_generation, zmq.Poller()
            self._cached_poller.register(self._wake_r, zmq.POLLIN)
            if self._socket is not None:
                self._cached_poller.register(self._socket, zmq.POLLIN)
            if self._watch is not None:
                self._cached_poller.register(self._watch.monitor, zmq.POLLIN)
        return self._cached_poller

    def _connect(self, now: float) -> None:
        sock = dealer_to_broker(self.context, self.settings.address, self._keys)
        self._socket = sock  # owned from here on: closed by _close_socket whatever happens next
        self._socket_generation += 1
        self._watch = HandshakeWatch(sock, "client", self._keys is not None)
        sock.connect(self.settings.address)
        self._hello(now)

    def _hello(self, now: float) -> None:
        self._link = Link.CONNECTING
        self._attempt_at = now  # the broker gets a full liveness window to answer this HELLO
        self._fns_sent.clear()
        info = {"session": self.settings.session} if self.settings.session else {}
        hello = p.Hello(p.Role.CLIENT.value, self.client_id, socket.gethostname(), os.getpid(), 0, info)
        self._send(hello, now)

    def _take_inbox(self) -> None:
        # Drain the wake-up bytes before clearing the flag: a post that finds the flag still
        # set has already queued its item, which the loop below takes.
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            self._woken = False
        while self._inbox:
            what, payload = self._inbox.popleft()
            if what == "submit":
                self._take_jobs(*payload)
            elif what == "cancel":
                if self._forget(payload) is not None:
                    self._cancels.append(payload)
            elif what == "stop":
                self._take_stop(bool(payload))
            elif what == "detach":
                self._leave_by(time.monotonic() + payload)
            elif what == "skip":  # seqs taken for jobs that were never posted
                for seq in payload:
                    self._posted(seq)

    def _read_results(self) -> list[int]:
        """A session's results that arrived here and that the program then read."""
        return sorted(self._arrived.intersection(self.read_seqs))

    def _take_stop(self, end_session: bool) -> None:
        self._end_session = end_session
        must_tell = end_session or (not self._jobs and bool(self._read_results()))
        if must_tell and self._link is not Link.READY:  # the broker must hear it: wait for it a while
            self._leave_by(time.monotonic() + END_SESSION_WAIT_S)
        else:
            self._stopping = True

    def _take_jobs(self, fn_id: bytes, blob: Any, jobs: list[PendingJob]) -> None:
        self._fns[fn_id] = blob
        self._fn_users[fn_id] = self._fn_users.get(fn_id, 0) + len(jobs)
        now = time.monotonic()
        queue = self._bounced if self._bounced else self._to_send  # none overtakes a bounced one
        for job in jobs:
            job.submitted_at = now
            self._jobs[job.seq] = job
            queue.append(job.seq)
            heapq.heappush(self._unfinished_heap, job.seq)
            self._posted(job.seq)
        if self._link is Link.DOWN:  # new work: try the broker now, not after the backoff
            self._reconnect_at = now
            self._backoff_s = self.settings.reconnect_min_s

    def _drain(self) -> None:
        while self._socket is not None:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.monotonic()
            self._last_heard = now
            try:
                msg = p.decode(frames)
            except ProtocolError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            self._on_message(msg, now)

    def _on_message(self, msg: p.Message, now: float) -> None:
        if isinstance(msg, p.Result):
            self._results(msg, now)
        elif isinstance(msg, (p.Notice, p.Accepted, p.Running)):
            self._about_jobs(msg)
        elif isinstance(msg, p.Welcome):
            self._welcome(msg)
        elif isinstance(msg, p.Reconnect):
            log.info("client %s: broker does not know us (%s); introducing ourselves again",
                     self.client_id, msg.reason)
            self._hello(now)
        elif isinstance(msg, p.Refused):
            error = Refused(f"the broker at {self.settings.address} refused this client: {msg.reason}")
            self.fatal = error
            self._fail_all(error)
            self._stopping = True
            self.welcomed.set()  # wake the constructor: it raises ``fatal``
        elif isinstance(msg, p.Disconnect):
            self._drop_link(now)

    def _about_jobs(self, msg: p.Notice | p.Accepted | p.Running) -> None:
        if isinstance(msg, p.Notice):
            if msg.kind not in self._noticed:  # once per kind: the status says it for every job
                self._noticed.add(msg.kind)
                log.warning("client %s: jobs %s can run on no connected worker: %s", self.client_id,
                            ", ".join(str(s) for s in msg.seqs[:10]), msg.text)
            return
        for seq in msg.seqs:
            if (job := self._jobs.get(seq)) is not None:
                if isinstance(msg, p.Accepted):
                    job.accepted = True
                else:
                    mark_running(job.future)

    def _welcome(self, msg: p.Welcome) -> None:
        first = not self.welcomed.is_set()
        self._link = Link.READY
        self._interval_s, self._liveness = msg.heartbeat_interval_s, msg.liveness
        self.max_message_bytes = msg.max_message_bytes
        self._backoff_s = self.settings.reconnect_min_s
        for job in self._jobs.values():  # this broker may not be the one that accepted them
            job.accepted = False
        waiting = self._retrying | set(self._bounced)  # these go when their backoff is over
        self._to_send = sorted(set(self._jobs) - waiting)  # all unfinished: the broker drops what it has
        if not first:
            log.info("client %s reconnected to broker %s; resubmitting %d unfinished jobs", self.client_id,
                     msg.broker_id, len(self._to_send))
        self.welcomed.set()

    def _results(self, msg: p.Result, now: float) -> None:
        per_row = p.split_frames(msg.frames, [row[2] for row in msg.results])
        stats: list[list[Any] | None] = [*msg.stats] or [None] * len(msg.results)
        records: list[Any] = []
        received = []
        busy = False
        for wire_row, frames, row in zip(msg.results, per_row, stats, strict=True):
            result = p.ResultRow.from_wire(wire_row)
            seq, outcome, info = result.seq, result.outcome, result.info
            if self._bounced_back(seq, outcome, result.kind):
                busy = busy or outcome == p.Outcome.BUSY
                continue
            self._record(result, row, records)
            if outcome == p.Outcome.ERROR and result.kind == p.ResultKind.PLAIN and self._retry(seq, info):
                continue  # the re-run's SUBMIT tells the broker to forget this result
            job = self._forget(seq)
            if job is not None and "after" in job.options:
                self.unpin(job.options["after"])  # its upstream results may go now
            if not self.session:
                received.append(seq)  # the broker holds each result until we say we have it
            elif job is not None and outcome != p.Outcome.CANCELLED:
                self._arrived.add(seq)  # released, once read, when this client closes after its jobs
            if job is None:
                self.duplicates += 1
                continue
            if row is not None:
                job.future.run_s = p.JobStats.from_wire(row).run_s
            self._settle(job, result, frames)
        if records:
            with self.records_lock:
                self.records.extend(records)
        self._note_received(received, now)
        self._note_room(busy)

    def _record(self, result: p.ResultRow, row: list[Any] | None, records: list[Any]) -> None:
        """The job's record for ``stats()``; a warning if its failure suspended its project."""
        seq, outcome = result.seq, result.outcome
        if row is not None and outcome != p.Outcome.CANCELLED and seq in self._jobs:
            name = p.Outcome(outcome).name.lower() if outcome in _OUTCOME_VALUES else str(outcome)
            records.append(record_of(f"{self.client_id}:{seq}", name, result.info, row))
        if result.kind == p.ResultKind.PROJECT_SUSPENDED:
            log.warning("client %s: job %d failed and suspended its project (on_error=suspend): %s; "
                        "resume it with project.resume() or `zfarm project resume NAME`", self.client_id,
                        seq, result.info)

    def _settle(self, job: PendingJob, result: p.ResultRow, frames: list[Any]) -> None:
        if result.kind == p.ResultKind.DEPENDENCY_FAILED:  # info: "UPSTREAM: why"
            upstream, _, why = result.info.partition(": ")
            _set(job.future, error=DependencyFailed(f"{self.client_id}:{job.seq}", upstream, why))
        else:
            _resolve(job, result.outcome, frames, result.info, self.client_id)

    def _note_received(self, seqs: list[int], now: float) -> None:
        if seqs:
            if not self._received:
                self._received_since = now
            self._received.extend(seqs)

    def _posted(self, seq: int) -> None:
        self._posted_above.add(seq)
        while self._posted_upto in self._posted_above:
            self._posted_above.discard(self._posted_upto)
            self._posted_upto += 1

    def _bounced_back(self, seq: int, outcome: int, kind: int) -> bool:
        """Whether the broker handed this job back unaccepted; if so, it goes again later."""
        if kind == p.ResultKind.FUNCTION_MISSING:
            if (job := self._jobs.get(seq)) is not None:
                job.accepted = False
                self._fns_sent.discard(job.fn_id)  # the broker let it go: send it again
                self._to_send.append(seq)
            return True
        if outcome == p.Outcome.BUSY:  # the broker's queue is full: back-pressure, send it later
            if (job := self._jobs.get(seq)) is not None:
                job.accepted = False
                self._bounced.append(seq)
            return True
        return False

    def pin(self, seq: int) -> None:
        """Keep job ``seq``'s result held at the broker (no RECEIVED) until ``unpin``: a job submitted
        now depends on it. From any thread."""
        with self._pin_lock:
            self._pinned[seq] = self._pinned.get(seq, 0) + 1

    def unpin(self, seqs: Iterable[int]) -> None:
        with self._pin_lock:
            for seq in seqs:
                left = self._pinned.get(seq, 0) - 1
                if left > 0:
                    self._pinned[seq] = left
                else:
                    self._pinned.pop(seq, None)

    def _acknowledge(self, now: float, force: bool = False) -> None:
        """Tell the broker which results arrived, in batches: it holds each result until then (and
        while a job that depends on it is unfinished: it is pinned)."""
        due = force or len(self._received) >= RECEIVED_BATCH or now - self._received_since >= RECEIVED_DELAY_S
        if self._received and self._link is Link.READY and due:
            with self._pin_lock:
                pinned = set(self._pinned)
            below = min(self._oldest_unfinished(), min(pinned, default=self._oldest_unfinished()))
            if pinned:
                received = [s for s in self._received if s not in pinned]
                self._received = [s for s in self._received if s in pinned]
            else:
                received, self._received = self._received, []
            if received:
                self._send(p.Received(received, below), now)

    def _oldest_unfinished(self) -> int:
        """Every result of a job numbered below this one has arrived (0 in a session: keep them all).

        Seqs are taken in user threads, one after the other from 1, and posted here in any order:
        none at or above the lowest seq not posted yet is counted as arrived.
        """
        if self.session:
            return 0
        heap = self._unfinished_heap
        while heap and heap[0] not in self._jobs:  # seqs leave _jobs for good: pop them as they surface
            heapq.heappop(heap)
        return min(self._posted_upto, heap[0]) if heap else self._posted_upto

    def _note_room(self, busy: bool) -> None:
        """After a RESULT: if the broker bounced jobs, wait longer before offering them again."""
        if busy:
            jitter = 1 + random.random() / 2  # clients that bounced together do not return together
            self._busy_retry_at = time.monotonic() + self._busy_backoff_s * jitter
            self._busy_backoff_s = min(self._busy_backoff_s * 2, BUSY_MAX_S)
        else:  # results mean the queue moves: offer the next batch soon
            self._busy_backoff_s = BUSY_MIN_S

    def _retry(self, seq: int, info: str) -> bool:
        """Run a job that raised again later, if it has retries left (backoff 1, 2, 4 … 30 s)."""
        job = self._jobs.get(seq)
        if job is None or job.retries <= 0 or seq in self._retrying:
            return False
        job.retries -= 1
        job.attempt += 1
        job.accepted = False  # leaving the session waits for the re-run to be accepted
        job.drop_held = True
        delay_s = min(self.settings.retry_backoff_s * 2 ** (job.attempt - 1), RETRY_BACKOFF_MAX_S)
        log.info("job %s:%d raised (%s): running it again in %.1f s, %d retries left", self.client_id, seq,
                 info, delay_s, job.retries)
        heapq.heappush(self._retry_at, (time.monotonic() + delay_s, seq))
        self._retrying.add(seq)
        return True

    def _release_retries(self, now: float) -> None:
        while self._retry_at and self._retry_at[0][0] <= now:
            _, seq = heapq.heappop(self._retry_at)
            self._retrying.discard(seq)
            if seq in self._jobs:
                self._to_send.append(seq)
        if self._bounced and now >= self._busy_retry_at:
            for _ in range(min(BUSY_BATCH, len(self._bounced))):
                self._to_send.append(self._bounced.popleft())
            self._busy_retry_at = now + BUSY_MIN_S  # the next batch once this one has had a chance

    def _forget(self, seq: int) -> PendingJob | None:
        job = self._jobs.pop(seq, None)
        if job is not None:
            users = self._fn_users[job.fn_id] - 1
            if users:
                self._fn_users[job.fn_id] = users
            else:
                del self._fn_users[job.fn_id]
                del self._fns[job.fn_id]
                self._fns_sent.discard(job.fn_id)
        return job

    def _flush(self) -> None:
        if self._link is not Link.READY or not self._to_send:
            return
        now = time.monotonic()
        batch: list[PendingJob] = []
        size = 0
        for seq in self._to_send:
            job = self._jobs.get(seq)
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
            self._send(p.Received(reruns, self._oldest_unfinished()), now)
        self._fns_sent.add(fn_id)
        self._send(p.Submit(fn_id, with_fn, rows, frames), now)

    def _check_liveness(self, now: float) -> None:
        limit_s = self.settings.broker_timeout_s
        if self._jobs and now - self._last_heard > limit_s:
            # each job waits broker_timeout_s from its own submission, not from the last message heard
            detail = self.handshake_problem or "unfinished jobs given up"
            for seq, job in list(self._jobs.items()):
                waited_s = now - max(self._last_heard, job.submitted_at)
                if waited_s > limit_s and self._forget(seq) is not None:
                    _set(job.future, error=BrokerUnavailable(self.settings.address, waited_s, detail))
        if self._link is Link.DOWN:
            return
        silent_s = now - max(self._last_heard, self._attempt_at)
        if silent_s > self._interval_s * self._liveness:
            log.warning("client %s: broker silent for %.1f s; reconnecting in %.0f s", self.client_id,
                        silent_s, self._backoff_s)
            self._drop_link(now)
        elif self._link is Link.READY and now - self._last_sent >= self._interval_s:
            self._send(p.Heartbeat(), now)

    def _read_handshake_events(self) -> None:
        assert self._watch is not None
        problem = self._watch.read()
        if problem and problem != self.handshake_problem:  # once, not at every reconnect
            log.warning("client %s: %s", self.client_id, problem)
        self.handshake_problem = problem

    def _close_socket(self, linger_ms: int = 0) -> None:
        if self._socket is not None:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            self._socket.close(linger=linger_ms)
            self._socket = None
            self._socket_generation += 1

    def _drop_link(self, now: float) -> None:
        self._close_socket()
        self._link = Link.DOWN
        self._reconnect_at = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.settings.reconnect_max_s)

    def _send(self, msg: p.Message, now: float) -> None:
        if self._socket is not None:
            self._socket.send_multipart(p.encode(msg), copy=False)
            self._last_sent = now

    def _fail_all(self, error: BaseException) -> None:
        for seq in list(self._jobs):
            job = self._forget(seq)
            if job is not None:
                _set(job.future, error=error)

    def _goodbye(self) -> None:
        if self._detach_by is not None:
            self._flush()  # a session's last jobs reach the broker before we say goodbye
            if not self._all_accepted():
                log.warning("client %s left session %s before the broker held %d of its jobs: a rerun "
                            "submits them again", self.client_id, self.session,
                            sum(not job.accepted for job in self._jobs.values()))
            elif self._link is not Link.READY and self._jobs:
                log.warning("client %s left session %s while the broker was unreachable: its %d jobs are "
                            "safe if the broker runs with --journal, else a rerun submits them again",
                            self.client_id, self.session, len(self._jobs))
        elif not self._jobs and (read := self._read_results()):
            # Closed after all its jobs: this program has the results it read, so the broker may forget
            # them; what other clients of the session left stays (the session ends if nothing does).
            self._note_received(read, time.monotonic())
        if (self._end_session or self._received) and self._link is not Link.READY:
            log.warning("client %s could not reach the broker to %s: it keeps them for its --session-ttl",
                        self.client_id, f"end session {self.session}" if self._end_session else
                        f"release {len(self._received)} results of session {self.session}")
        self._acknowledge(time.monotonic(), force=True)
        if self._socket is not None and self._link is Link.READY:
            try:
                reason = p.END_SESSION if self._end_session else "client closed"
                self._socket.send_multipart(p.encode(p.Disconnect(reason)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._close_socket(linger_ms=200)
        for seq in list(self._jobs):  # the client was shut down without waiting for these
            job = self._forget(seq)
            if job is not None:
                cancel_future(job.future, force=True)
        self._refuse_posts()

    def _refuse_posts(self) -> None:
        """From now on posts are refused; jobs posted after the loop's last look are cancelled."""
        with self._lock:
            self._closed_for_posts = True
            left = list(self._inbox)
            self._inbox.clear()
        for what, payload in left:
            if what == "submit":
                for job in payload[2]:
                    cancel_future(job.future, force=True)


def _resolve(job: PendingJob, outcome: int, frames: list[Any], info: str, client_id: str) -> None:
    job.future.output = take_output(frames)
    if outcome == p.Outcome.OK:
        try:
            value = ser.loads(frames)
        except Exception as exc:
            _set(job.future, error=TypeError(f"job {client_id}:{job.seq} finished but its result could not "
                                             f"be unpickled here: {exc!r}"))
            return
        _set(job.future, value=value)
    elif outcome in (p.Outcome.ERROR, p.Outcome.CRASHED):
        error, job.future.partial = ser.load_exception(frames)
        _set(job.future, error=error)
    elif outcome == p.Outcome.CANCELLED:
        cancel_future(job.future, force=True)
    elif outcome == p.Outcome.LOST:
        _set(job.future, error=WorkerLost(f"{client_id}:{job.seq}", info))
    elif outcome == p.Outcome.CORRUPTED:
        _set(job.future, error=JournalCorrupted(f"{client_id}:{job.seq}", "", info))
    elif outcome == p.Outcome.JOURNAL_FULL:
        _set(job.future, error=JournalFull(f"{client_id}:{job.seq}", info))
    else:
        _set(job.future, error=JobCrashed(f"{client_id}:{job.seq}", None))


def cancel_future(future: Future[Any], force: bool = False) -> bool:
    """Cancel a future and wake whoever waits on it (``wait``, ``as_completed``).

    ``Future.cancel`` alone leaves those waiters asleep until an executor's thread calls
    ``set_running_or_notify_cancel``; zfarm has no such thread, so this does it at once.
    ``force``: cancel a running future too (the standard one refuses).
    """
    with future._condition:  # a re-entrant lock: the calls below take it again
        if future._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            return True
        if force and future._state == RUNNING:
            future._state = PENDING
        if not Future.cancel(future):
            return False
        future.set_running_or_notify_cancel()  # CANCELLED → CANCELLED_AND_NOTIFIED: waiters wake
    return True


def mark_running(future: Future[Any]) -> None:
    """A worker started the job: ``running()`` is True from now on (unless it ended meanwhile)."""
    with future._condition:
        if future._state == PENDING:
            future.set_running_or_notify_cancel()


def _set(future: Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass  # cancelled by the user meanwhile
