"""The broker's shell: one ROUTER socket around the pure :class:`Scheduler`.

::

    clients ─┐                  ┌──────────── Scheduler ────────────┐
    workers ─┼─► ROUTER ─recv─► │ handle(route, frames, now)         │
    monitors ┘     ▲            │ tick(now): expiry and heartbeats   │
                   └────send────│ flush(now) → [(route, message)]    │
                                └────────────────────────────────────┘

The loop drains every message that is waiting before it flushes, so a deep
queue travels in few large messages and a lone job goes out at once.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import socket
import sqlite3
import threading
import time
from types import FrameType
from typing import Any

import zmq

from zfarm import protocol as p
from zfarm.broker.journal import Journal
from zfarm.broker.scheduler import Outbound, Scheduler
from zfarm.broker.spill import Spill
from zfarm.broker.state import Auth
from zfarm.config import BrokerSettings
from zfarm.errors import ZfarmError
from zfarm.link import recv_frames, send_frames
from zfarm.security import BrokerKeys, check_bind_is_safe, identity_of, set_ipv6_for

log = logging.getLogger(__name__)

HELLO_COMMAND = bytes([p.Command.HELLO])
#: messages handled before the loop flushes and checks its timers
DRAIN_LIMIT = 1000
#: messages queued for one peer before it counts as gone (batches: one message holds many jobs)
SEND_QUEUE_MESSAGES = 10_000


class Broker:
    """Owns the socket; run it with :meth:`serve` (blocks until :meth:`stop`)."""

    def __init__(self, settings: BrokerSettings, context: zmq.Context[Any] | None = None) -> None:
        self.settings = settings
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.socket: zmq.Socket[Any] = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        # Credit and client windows bound what we queue for well-behaved peers; a peer that stops
        # reading hits this bound and is dropped (see _send) instead of growing our memory.
        self.socket.setsockopt(zmq.SNDHWM, SEND_QUEUE_MESSAGES)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HANDSHAKE_IVL, int(settings.handshake_timeout_s * 1000))
        set_ipv6_for(self.socket, settings.bind)  # tcp://[::]:5555 or [::1]
        self.keys = BrokerKeys(settings.keys) if settings.keys else None
        if self.keys is not None:
            self.keys.start_zap(self.context)
            self.keys.apply(self.socket)
        try:
            self.socket.bind(settings.bind)
        except zmq.ZMQError as exc:
            self.close()
            hint = ("is another broker running there? choose another endpoint with --bind"
                    if exc.errno == errno.EADDRINUSE else "check the endpoint given to --bind")
            raise ZfarmError(f"cannot listen on {settings.bind}: {exc.strerror}; {hint}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.spill = None if settings.journal else Spill()
        try:
            self.journal = Journal(settings.journal, settings.journal_sync) if settings.journal else None
        except ZfarmError:
            self.close()
            raise
        self.scheduler = Scheduler(settings, time.monotonic(), wall_offset_s=time.time() - time.monotonic(),
                                   journal=self.journal, spill=self.spill)
        self._stopping = threading.Event()
        #: ACCEPTED messages waiting for the journal to be written: a session may leave once it has one
        self._withheld: list[Outbound] = []

    def serve(self) -> None:
        """Run until :meth:`stop` is called (or the parent process named in settings is gone)."""
        log.info("broker %s listening on %s (heartbeat %.3g s, liveness %d)", self.scheduler.broker_id,
                 self.endpoint, self.settings.heartbeat_interval_s, self.settings.liveness)
        log.info("connect workers with: %s", worker_command(self.endpoint, self.settings.keys))
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        if self.keys is not None and self.keys.zap is not None:
            poller.register(self.keys.zap, zmq.POLLIN)
        sched = self.scheduler
        clean = False
        try:
            while not self._stopping.is_set():
                timeout_ms = max(0.0, (sched.next_wakeup() - time.monotonic()) * 1000)
                ready = dict(poller.poll(math.ceil(min(timeout_ms, 250))))  # (0 would spin until then)
                if self.keys is not None and self.keys.zap in ready:
                    self.keys.answer_zap()
                if self.socket in ready:
                    self._drain()
                now = time.monotonic()
                sched.tick(now)
                outbound = sched.flush(now)
                if self.journal is not None:
                    # What we are about to say has happened must be on disk first.
                    outbound = self._written(outbound, self.journal.commit())
                self._send(outbound)
                if self.settings.parent_pid and os.getppid() != self.settings.parent_pid:
                    log.info("parent process %d is gone: stopping", self.settings.parent_pid)
                    break
            clean = True
        except sqlite3.Error as exc:  # a read that failed: writes wait in memory instead (see Journal)
            raise ZfarmError(f"cannot use the journal {self.settings.journal}: {exc}; stopping, so that "
                             "nothing is promised that is not on disk (free space, or move the journal, "
                             "and start the broker again on it)") from None
        finally:
            if clean:
                self._send(self.scheduler.goodbye())  # peers reconnect at once instead of timing out
            elif self.journal is not None:
                self.journal.abandon()  # half a turn is not written: the journal stays as of the last turn
                self.journal = None
            self.close(linger_ms=500)

    def _written(self, outbound: list[Outbound], on_disk: bool) -> list[Outbound]:
        """What may be sent after a commit: while the journal cannot be written (a full disk), ACCEPTED
        waits (it promises the job is on disk); results, jobs for workers and refusals go on."""
        if on_disk:
            if self._withheld:
                outbound, self._withheld = self._withheld + outbound, []
            return outbound
        self._withheld.extend(m for m in outbound if isinstance(m[1], p.Accepted))
        return [m for m in outbound if not isinstance(m[1], p.Accepted)]

    def _drain(self) -> None:
        sched, socket = self.scheduler, self.socket
        for _ in range(DRAIN_LIMIT):
            frames = recv_frames(socket)
            if frames is None:
                return
            sched.handle(frames[0].bytes, frames[1:], time.monotonic(), self._auth(frames))

    def _auth(self, frames: list[Any]) -> Auth | None:
        """Who the key behind a HELLO is (ZAP's User-Id); only a HELLO needs it, so only it pays."""
        if self.keys is None or len(frames) < 3 or frames[2].bytes != HELLO_COMMAND:
            return None
        return Auth(*identity_of(str(frames[-1].get("User-Id"))))

    def _send(self, outbound: list[tuple[bytes, p.Message]]) -> None:
        socket = self.socket
        for route, msg in outbound:
            try:
                send_frames(socket, [route, *p.encode(msg)])
            except zmq.Again:
                log.warning("peer %s reads nothing: %d messages wait for it; dropping it", route.hex(),
                            SEND_QUEUE_MESSAGES)
                self.scheduler.peer_unreachable(route, time.monotonic())
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self.scheduler.peer_unreachable(route, time.monotonic())

    def stop(self) -> None:
        """Ask :meth:`serve` to return; safe from signal handlers and other threads."""
        self._stopping.set()

    def close(self, linger_ms: int = 0) -> None:
        if getattr(self, "journal", None) is not None:
            self.journal.close()  # type: ignore[union-attr]
            self.journal = None
        if getattr(self, "spill", None) is not None:
            self.spill.close()  # type: ignore[union-attr]
        self.socket.close(linger=linger_ms)
        if self.keys is not None:
            self.keys.close()
        if self._own_context:
            self.context.term()


def worker_command(endpoint: str, keys: str) -> str:
    """The command that connects a worker to this broker, with this host's name for a wildcard bind."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host in {"0.0.0.0", "*", "[::]", "::"}:
        endpoint = f"tcp://{socket.gethostname()}:{port}"
    return f"zfarm worker --connect {endpoint}" + (f" --keys {keys}" if keys else "")


def run_broker(settings: BrokerSettings) -> None:
    """The ``zfarm broker`` command: serve until SIGINT or SIGTERM."""
    check_bind_is_safe(settings.bind, settings.keys, settings.insecure)
    broker = Broker(settings)
    if settings.keys:
        log.info("CURVE on: admitting %d keys from %s", len(broker.keys.allowed) if broker.keys else 0,
                 settings.keys)
    if not settings.journal and settings.journal_sync != "full":
        log.warning("--journal-sync %s does nothing without --journal", settings.journal_sync)
    if settings.insecure and not settings.keys:
        log.warning("listening on %s WITHOUT keys (--insecure): anyone who reaches it can run code on "
                    "every worker", settings.bind)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        broker.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    broker.serve()
