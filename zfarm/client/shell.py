"""The client's I/O thread: the one owner of the client's DEALER socket, around a :class:`ClientCore`.

::

    user threads ──submit/cancel──► inbox (deque) ──wake──►┐
                                                          IOThread ◄──Link (DEALER)──► broker
    futures ◄──────────── settle / fail / cancel ─────────┘  │ events, now ▲ Actions
                                                              ▼             │
                                                          ClientCore (sans-IO)

The thread's loop: poll (the wake-up pipe, the socket, its handshake watch) → hand the inbox and
every arrived message to the core → ``core.flush(now)`` → send what it says, settle the futures it
names. Results are unpickled here, in this thread, never at the broker.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import Any

import zmq

from zfarm.client.core import END_SESSION_WAIT_S, Actions, ClientCore, PendingJob
from zfarm.client.futures import cancel_future, mark_running, set_future, settle
from zfarm.config import ClientSettings
from zfarm.link import Link
from zfarm.security import PeerKeys
from zfarm.stats import JobRecord

log = logging.getLogger(__name__)

#: job records kept for Client.stats(), newest last
RECORDS_KEPT = 100_000


class IOThread(threading.Thread):
    """Runs the socket; every method but the public ones below runs in this thread."""

    def __init__(self, settings: ClientSettings, client_id: str, context: zmq.Context[Any]) -> None:
        super().__init__(name=f"zfarm-client-{client_id}", daemon=True)
        # first, so that unusable keys raise before any socket exists
        keys = PeerKeys.load(settings.keys, "client", settings.key_name) if settings.keys else None
        self.settings = settings
        self.client_id = client_id
        self.context = context
        self.core = ClientCore(settings, client_id, time.monotonic())
        self.session = self.core.session
        #: seqs whose result the program read (see :class:`zfarm.client.receipts.Receipts`)
        self.read_seqs = self.core.receipts.read_seqs
        self.link = Link(context, settings.address, keys, "client", client_id)
        self.welcomed = threading.Event()
        self.records: deque[JobRecord] = deque(maxlen=RECORDS_KEPT)
        self.records_lock = threading.Lock()
        self.fatal: BaseException | None = None
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._woken = False
        self._lock = threading.Lock()
        self._closed_for_posts = False  # the I/O thread has ended: nothing posted would be seen

    @property
    def handshake_problem(self) -> str:
        return self.link.problem

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
        return self.core.accepted(seq)

    def pin(self, seq: int) -> None:
        """Keep job ``seq``'s result held at the broker for a job being submitted (see ClientCore.pin)."""
        self.core.pin(seq)

    def unpin(self, seqs: list[int]) -> None:
        self.core.unpin(seqs)

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
            # a session's goodbye may wait END_SESSION_WAIT_S for an unreachable broker
            self.join(max(timeout_s, END_SESSION_WAIT_S + 2.0))
        # the wake-up pair is the thread's: it closes it when it ends (see run), never under it

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
                # under the lock: the thread closes the pair only after refusing posts under it
                self._wake_w.send(b"\0")
            except OSError:
                pass
        return True

    # ---- the I/O thread ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.core.stopping:
                self._step()
        except BaseException as exc:  # never die silently: fail the futures with the reason
            log.exception("client %s I/O thread failed", self.client_id)
            self.fatal = exc
            self.core.fail_all(exc)
            self._apply(self.core.flush(time.monotonic()))
            self.welcomed.set()  # wake the constructor: it raises ``fatal``
        finally:
            try:
                self._goodbye()
            finally:
                self.link.close()
                self._refuse_posts()
                self._wake_r.close()
                self._wake_w.close()

    def _step(self) -> None:
        core, link = self.core, self.link
        now = time.monotonic()
        if link.reopen_if_due(core.live, now):
            core.connected(now)
            self._apply(core.flush(now))  # HELLO while the new connection's pipe exists
        ready = dict(link.poller(self._wake_r).poll(int(core.wait_s(now) * 1000)))
        if self._inbox or ready.get(self._wake_r.fileno()):
            self._take_inbox()
        if link.readable(ready):
            for msg in link.receive():
                core.on_message(msg, time.monotonic())
            self._apply(core.take_ended())  # before flush's RECEIVED (see ClientCore.take_ended)
        core.handshake_problem = link.problem
        if link.problem and not core.welcomed:  # keys refused: no use waiting for a WELCOME
            self.welcomed.set()
        self._apply(core.flush(time.monotonic()))

    def _apply(self, actions: Actions) -> None:
        self.link.carry_out(actions.send, drop=actions.reconnect)
        if actions.records:  # before the futures settle: a program woken by the last one sees every record
            with self.records_lock:
                self.records.extend(actions.records)
        if actions.fatal is not None:
            self.fatal = actions.fatal
        for job, outcome, frames, info in actions.settle:
            settle(job.future, f"{self.client_id}:{job.seq}", outcome, frames, info)
        for job, error in actions.fail:
            set_future(job.future, error=error)
        for job in actions.cancel:
            cancel_future(job.future, force=True)
        for job in actions.started:
            mark_running(job.future)
        if actions.welcomed or actions.fatal is not None:
            self.welcomed.set()  # wake the constructor (it raises ``fatal``, if any)

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
        core = self.core
        now = time.monotonic()
        while self._inbox:
            what, payload = self._inbox.popleft()
            if what == "submit":
                fn_id, blob, jobs = payload
                core.submit(fn_id, blob, jobs, now)
            elif what == "cancel":
                core.cancel(payload)
            elif what == "stop":
                core.stop(bool(payload), now)
            elif what == "detach":
                core.leave_by(now + payload, now)
            elif what == "skip":  # seqs taken for jobs that were never posted
                core.skip(payload)

    def _goodbye(self) -> None:
        actions, reason = self.core.goodbye(time.monotonic())
        self.link.send_all(actions.send)
        for job in actions.cancel:
            cancel_future(job.future, force=True)
        if reason:
            self.link.goodbye(reason, linger_ms=200)
        self.link.close(linger_ms=200)
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
