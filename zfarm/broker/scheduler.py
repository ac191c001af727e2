"""The broker's pure core: who is connected, which job is where, what to send.

Sans-IO: the broker shell feeds it decoded events with the time they happened
and sends whatever it returns. It owns no socket and reads no clock, so unit
tests drive it with plain data and a fake clock.

Job life (one source of truth: ``Job.state`` and where the job is held)::

    SUBMIT ──► QUEUED ──dispatch──► ASSIGNED(worker) ──RESULTS──► held ──RECEIVED──► forgotten
                 ▲                      │
                 └── worker dead/left ──┘          CANCEL: QUEUED|ASSIGNED ──► cancelled

A result is held until its client says it received it, and sent again if the
client asks for the job again. A session client's jobs and results outlive its
connection, and its client says RECEIVED only when it closes after its jobs, so a
rerun finds every result. With a journal (see :mod:`zfarm.broker.journal`) everything
held outlives the broker too.

Queues are per client and served round-robin, so one client's million jobs
cannot starve another's ten. A worker's credit is what the worker said it can
take; the scheduler never sends it more. Results are accepted from any worker
the job was ever given to, and only the first is delivered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

from zfarm import __version__
from zfarm import protocol as p
from zfarm.config import BrokerSettings
from zfarm.errors import FieldTooLarge, JournalCorrupted, ProtocolError, VersionMismatch
from zfarm.broker.held import HeldResults
from zfarm.broker.journal import Damaged, Journal, Recovered
from zfarm.broker.records import JOB_COLUMNS, Records
from zfarm.broker.spill import Spill
from zfarm.broker.state import (
    NO_OPTIONS,
    Auth,
    ClientRecord,
    Counters,
    Held,
    Job,
    JobState,
    MonitorRecord,
    Peer,
    Route,
    WorkerRecord,
    check_hello,
    compact,
    role_of,
)

log = logging.getLogger(__name__)

Outbound = tuple[Route, p.Message]
MAX_CREDIT = 1_000_000
MALFORMED_LOGS_PER_S = 5
#: ways a worker record ends while its process may well be alive: not counted against its jobs
ALIVE_REASONS = ("left", "reconnected", "replaced by a new HELLO on its connection")
#: how long a client's function outlives its last job at the broker (the client may send more)
FN_KEEP_S = 3.0
#: how often the core scans peers for expiry and heartbeats, as a fraction of the interval
SCANS_PER_INTERVAL = 4
#: why a session client was dropped when it said DISCONNECT("session ended")
ENDED_SESSION = "ended its session"
#: how long jobs read back from a journal wait for a client without a session to come back
RECOVERY_GRACE_S = 120.0


class Scheduler:
    """Feed it ``handle``/``tick``/``peer_unreachable``; send what ``flush`` returns."""

    def __init__(self, settings: BrokerSettings, now: float, broker_id: str | None = None,
                 wall_offset_s: float = 0.0, journal: Journal | None = None,
                 spill: Spill | None = None) -> None:
        """``wall_offset_s``: add it to a time on the caller's clock to get epoch seconds.

        ``journal``: record what clients are owed there, and start from what it holds.
        ``spill``: without a journal, where held results past ``settings.held_memory_bytes`` go.
        """
        self.settings = settings
        self.records = Records(now, wall_offset_s, settings.history)
        self.broker_id = broker_id or uuid.uuid4().hex[:12]
        self.started_at = now
        self.peers: dict[Route, Peer] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.clients: dict[str, ClientRecord] = {}
        self.hungry: dict[str, WorkerRecord] = {}  # workers with credit, in arrival order
        self.active: deque[ClientRecord] = deque()  # clients with queued jobs, round-robin
        self.queued = 0
        self.counters = Counters()
        self._out: list[Outbound] = []
        self._log_second, self._logged, self._unlogged = 0, 0, 0
        self._next_scan = now
        self.deadline_s = settings.heartbeat_interval_s * settings.liveness
        self.journal = journal
        self.held_results = HeldResults(settings.held_memory_bytes, journal, spill)
        if journal is not None:
            self._recover(journal.load(), now)

    def _recover(self, saved: Recovered, now: float) -> None:
        """Start from a journal: its clients are away until they say HELLO; their jobs queue now."""
        for client_id, session, key in saved.clients:
            # Away from now: a client connected when the broker died gets its full time to come back.
            self.clients[client_id] = ClientRecord(
                id=client_id, route=b"", host="", pid=0, joined_at=now, last_seen=now, last_sent=now, key=key,
                session=session, present=False, absent_since=now)
        for client_id, fn_id, blob in saved.functions:
            if (client := self.clients.get(client_id)) is not None:
                client.fns[fn_id] = blob
        if saved.lost:
            log.error("journal %s: %s", self.journal_path, saved.lost)
            self.records.event(now, "journal-damaged", saved.lost)
        jobs = self._recover_jobs(saved, now)
        for client_id, seq, held in saved.results:
            if (client := self.clients.get(client_id)) is not None:
                client.held[seq] = self.held_results.on_disk_record(held.outcome, held.digest)
                self.held_results.recovered(1)
        self._recover_damaged(saved.damaged, now)
        for client in self.clients.values():
            for fn_id in client.fns:
                if not client.fn_users.get(fn_id):
                    client.fn_idle[fn_id] = now
        log.log(logging.ERROR if saved.damaged or saved.lost else logging.INFO,
                "journal %s: recovered %d jobs and %d results for %d clients%s", self.journal_path, jobs,
                len(saved.results), len(saved.clients),
                f"; {len(saved.damaged)} damaged rows failed their seal (not run or delivered)"
                if saved.damaged else "; SOME WERE LOST (above)" if saved.lost else "")
        if saved.clients:
            self.records.event(now, "recovered", f"from the journal: {jobs} jobs, {len(saved.results)} "
                               f"results for {len(saved.clients)} clients")
        self.counters.recovered = jobs

    def _recover_jobs(self, saved: Recovered, now: float) -> int:
        """Queue the journal's jobs again; those whose function is damaged fail. Returns how many queue."""
        offset = self.records.wall_offset_s
        bad_fns = {(d.client, d.fn_id) for d in saved.damaged if d.table == "functions"}
        jobs = 0
        for row in saved.jobs:
            client = self.clients.get(row.client)
            if client is not None and (row.client, row.fn_id) in bad_fns:
                self._damaged(client, row.seq, "the function it runs fails its seal", now)
                continue
            if client is None or row.fn_id not in client.fns:
                log.warning("journal: job %s:%d has no client or function recorded: dropped", row.client,
                            row.seq)
                if self.journal is not None:
                    self.journal.drop_job(row.client, row.seq)
                continue
            job = Job(row.client, row.seq, row.fn_id, tuple(row.frames), row.options or NO_OPTIONS,
                      row.queued_at - offset, losses=row.losses, digest=row.digest,
                      history=("",) * row.attempts_before, recovered_after=row.attempts_before)
            self._enqueue(client, job)
            jobs += 1
        return jobs

    def _recover_damaged(self, damaged: list[Damaged], now: float) -> None:
        """Rows that fail their seal: a job or result of a known client fails with JournalCorrupted."""
        for row in damaged:
            client = self.clients.get(row.client)
            if row.table in ("jobs", "results") and client is not None:
                self._damaged(client, row.seq, f"its {row.table[:-1]} fails its seal", now)
            elif row.table != "functions":  # a function's jobs fail with it (above)
                self.counters.corrupted += 1
                log.error("journal %s: a row of %s (client %s, job %d) fails its seal: dropped",
                          self.journal_path, row.table, row.client, row.seq)

    def _damaged(self, client: ClientRecord, seq: int, why: str, now: float, where: str = "") -> None:
        """A job whose payload on disk changed: never run or delivered, it fails with JournalCorrupted.

        ``where``: the file, if not the journal (the spill file)."""
        where = where or f"the broker's journal {self.journal_path}"
        info = f"{where}: {why}"
        log.error("job %s:%d is damaged in %s: it fails with JournalCorrupted instead of running or being "
                  "delivered (%s)", client.id, seq, where, why)
        self.records.event(now, "job-damaged", f"job {client.id}:{seq} damaged in {where} ({why})")
        self.counters.corrupted += 1
        if (old := client.held.pop(seq, None)) is not None:
            self.held_results.forget(client.id, seq, old)
        at = self.records.wall(now)
        held = Held(int(p.Outcome.CORRUPTED), [], info, ["", "", 0, at, at, at, 0.0, 0])
        client.held[seq] = held
        self.held_results.keep(client.id, seq, held)
        if self.journal is not None:
            self.journal.result(client.id, seq, held)  # replaces the damaged row, sealed afresh

    @property
    def journal_path(self) -> str:
        return self.journal.path if self.journal is not None else ""

    # ---- stimuli ---------------------------------------------------------------------------------

    def handle(self, route: Route, frames: Sequence[Any], now: float, auth: Auth | None = None) -> None:
        """One message from ``route``. Bad input is logged and dropped, never raised.

        ``auth``: with CURVE, who the peer's key says it is (None: no keys, anyone may be anything).
        """
        try:
            msg = p.decode(frames)
        except VersionMismatch as exc:
            log.warning("refused peer %s: %s", route.hex(), exc)
            self._out.append((route, p.Refused(str(exc))))
            return
        except FieldTooLarge as exc:
            if p.is_hello(frames):  # a HELLO it cannot accept, like any other: the peer is told why
                log.warning("refused peer %s: %s", route.hex(), exc)
                self._send_to(route, p.Refused(str(exc)))
            else:
                self._malformed(now, "dropped message from %s: %s", route.hex(), exc)
            return
        except ProtocolError as exc:
            self._malformed(now, "dropped malformed message from %s: %s", route.hex(), p.clip(str(exc)))
            return
        if isinstance(msg, p.Hello) and auth is not None and (reason := self._refusal(msg, auth)):
            log.warning("refused %s %s from %s: %s", msg.role, msg.peer_id, p.clip(msg.host), reason)
            self._send_to(route, p.Refused(reason))
            return
        try:
            self._dispatch_message(route, msg, now, auth.key if auth else "")
        except ProtocolError as exc:
            peer = self.peers.get(route)
            who = f"{role_of(peer)} {peer.id}" if peer else route.hex()
            self._malformed(now, "dropped %s from %s: %s", type(msg).__name__, who, p.clip(str(exc)))

    def _refusal(self, msg: p.Hello, auth: Auth) -> str:
        """Why a key may not say this HELLO ("" if it may)."""
        if msg.role not in auth.roles:
            return (f"this key may not connect as a {msg.role}; it may connect as: "
                    f"{', '.join(sorted(auth.roles)) or 'nothing'}. Use a key from the keys folder's "
                    f"{msg.role}s/ list")
        owner = self.workers.get(msg.peer_id) if msg.role == p.Role.WORKER else self.clients.get(msg.peer_id)
        if owner is not None and owner.key != auth.key:
            return f"the {msg.role} id {msg.peer_id} belongs to another key"
        return ""

    def _malformed(self, now: float, text: str, *args: Any) -> None:
        """Count bad input; log a few lines a second at most, so a flood cannot slow the broker."""
        self.counters.malformed += 1
        second = int(now)
        if second != self._log_second:
            if self._unlogged:
                log.warning("dropped %d more malformed messages without logging them", self._unlogged)
            self._log_second, self._logged, self._unlogged = second, 0, 0
        if self._logged < MALFORMED_LOGS_PER_S:
            self._logged += 1
            log.warning(text, *args)
        else:
            self._unlogged += 1

    def _dispatch_message(self, route: Route, msg: p.Message, now: float, key: str) -> None:
        if isinstance(msg, p.Hello):
            self._hello(route, msg, now, key)
            return
        peer = self.peers.get(route)
        if peer is None:
            if not isinstance(msg, p.Disconnect):
                self._send_to(route, p.Reconnect("this broker does not know you (it may have restarted)"))
            return
        peer.last_seen = now
        if isinstance(msg, p.Heartbeat):
            return
        if isinstance(msg, p.Disconnect):
            log.info("%s %s left: %s", role_of(peer), peer.id, p.clip(msg.reason) or "no reason given")
            self._remove(peer, now, why=ENDED_SESSION if msg.reason == p.END_SESSION else "left")
        elif isinstance(msg, p.Status):
            self._send(peer, p.StatusReply(self.snapshot(now)), now)
        elif isinstance(msg, p.History):
            self._send(peer, p.HistoryReply(JOB_COLUMNS, self.records.history(msg.last)), now)
        elif isinstance(peer, WorkerRecord):
            self._worker_message(peer, msg, now)
        elif isinstance(peer, ClientRecord):
            self._client_message(peer, msg, now)
        else:
            raise ProtocolError(f"a monitor cannot send {type(msg).__name__}")

    def _worker_message(self, worker: WorkerRecord, msg: p.Message, now: float) -> None:
        if isinstance(msg, p.Ready):
            self._add_credit(worker, msg.credit)
        elif isinstance(msg, p.Results):
            self._results(worker, msg, now)
        elif isinstance(msg, p.Started):
            self._started(worker, msg)
        else:
            raise ProtocolError(f"a worker cannot send {type(msg).__name__}")

    def _started(self, worker: WorkerRecord, msg: p.Started) -> None:
        """Tell clients which of their jobs run now (their futures' ``running()``)."""
        for client_id, seq in msg.keys:
            client = self.clients.get(client_id)
            job = client.jobs.get(seq) if client is not None else None
            if client is not None and job is not None and client.present and job.worker == worker.id:
                client.started.append(seq)

    def _client_message(self, client: ClientRecord, msg: p.Message, now: float) -> None:
        if isinstance(msg, p.Submit):
            self._submit(client, msg, now)
        elif isinstance(msg, p.Received):
            # ``below``: the client has every result under it (it covers RECEIVEDs that were lost)
            below = [seq for seq in client.held if seq < msg.below] if msg.below else []
            for seq in [*msg.seqs, *below]:
                self._drop_held(client, seq)
        elif isinstance(msg, p.Cancel):
            for seq in msg.seqs:
                job = client.jobs.get(seq)
                if job is not None:
                    self._retire(client, job, now)
        else:
            raise ProtocolError(f"a client cannot send {type(msg).__name__}")

    def peer_unreachable(self, route: Route, now: float) -> None:
        """The socket could not route to ``route``: the peer's connection is gone."""
        peer = self.peers.get(route)
        if peer is not None:
            log.info("%s %s is unreachable", role_of(peer), peer.id)
            self._remove(peer, now, why="unreachable")

    def tick(self, now: float) -> None:
        """Expire silent peers and heartbeat quiet ones; cheap to call on every loop."""
        if now < self._next_scan:
            return
        interval = self.settings.heartbeat_interval_s
        self._next_scan = now + interval / SCANS_PER_INTERVAL
        self._drop_idle_functions(now)
        self._expire_absent_clients(now)
        for peer in list(self.peers.values()):
            silent_s = now - peer.last_seen
            if silent_s > self.deadline_s:
                log.warning("%s %s on %s silent for %.1f s: declared dead", role_of(peer), peer.id,
                            p.clip(peer.host), silent_s)
                self._remove(peer, now, why=f"silent for {silent_s:.1f} s")
            elif now - peer.last_sent >= interval:
                self._send(peer, p.Heartbeat(), now)

    def goodbye(self) -> list[Outbound]:
        """DISCONNECT for every peer: the broker is stopping."""
        return [(peer.route, p.Disconnect("broker stopping")) for peer in self.peers.values()]

    def next_wakeup(self) -> float:
        """When ``tick`` next has work, on the caller's clock."""
        return self._next_scan

    def flush(self, now: float) -> list[Outbound]:
        """Dispatch what can be dispatched and return every message to send, batched per peer."""
        self._dispatch(now)
        for worker in self.workers.values():
            if worker.cancels:  # first: a replaced job's new run may share the old one's key
                self._send(worker, p.CancelJobs(worker.cancels), now)
                worker.cancels = []
            if worker.outbox:
                self._send(worker, self._jobs_message(worker), now)
        for client in self.clients.values():
            # (an absent client has none: they are cleared when it leaves, and none are added meanwhile)
            if client.accepted:
                self._send(client, p.Accepted(client.accepted), now)
                client.accepted = []
            if client.started:
                self._send(client, p.Running(client.started), now)
                client.started = []
            if client.out_rows:
                self._send(client, p.Result(client.out_rows, client.out_frames, client.out_stats), now)
                client.out_rows, client.out_frames, client.out_stats = [], [], []
        out, self._out = self._out, []
        return out

    # ---- handshake and departure -----------------------------------------------------------------

    def _hello(self, route: Route, msg: p.Hello, now: float, key: str = "") -> None:
        problem = check_hello(msg)
        if problem:
            log.warning("refused peer %s: %s", route.hex(), problem)
            self._send_to(route, p.Refused(problem))
            return
        known = self.peers.get(route)
        if known is not None and known.id == msg.peer_id and role_of(known) == msg.role:
            known.last_seen = now  # a repeated HELLO: answer again
            if isinstance(known, WorkerRecord):  # after every WELCOME a worker sends its full credit
                known.credit = 0  # and starts its function cache afresh
                known.fns.clear()
                self.hungry.pop(known.id, None)
            self._send(known, self._welcome(), now)
            return
        if known is not None:
            self._remove(known, now, why="replaced by a new HELLO on its connection")
        peer = self._register(route, msg, now, key)
        peer.key = key
        self.peers[route] = peer
        self._send(peer, self._welcome(), now)

    def _register(self, route: Route, msg: p.Hello, now: float, key: str) -> Peer:
        common = dict(id=msg.peer_id, route=route, host=msg.host, pid=msg.pid, joined_at=now,
                      last_seen=now, last_sent=now)
        if msg.role == p.Role.WORKER:
            old = self.workers.get(msg.peer_id)
            if old is not None:
                self._remove(old, now, why="reconnected")
            worker = WorkerRecord(**common, slots=msg.slots)  # type: ignore[arg-type]
            self.workers[worker.id] = worker
            slots = f"{worker.slots} slot{'' if worker.slots == 1 else 's'}"
            log.info("worker %s joined from %s pid %d with %s", worker.id, p.clip(worker.host), worker.pid,
                     slots)
            self.records.event(now, "worker-joined",
                               f"worker {worker.id} joined from {worker.host} with {slots}")
            return worker
        if msg.role == p.Role.CLIENT:
            client = self.clients.get(msg.peer_id)
            if client is not None:  # the same client on a new connection keeps its jobs
                if client.present:
                    self.peers.pop(client.route, None)
                    if (client.host, client.pid) != (msg.host, msg.pid):  # another process: it takes over
                        self._send_to(client.route, p.Refused(
                            f"session {p.clip(client.session or client.id)} was taken over by a client "
                            f"on {p.clip(msg.host)} (pid {msg.pid}): one process per session at a time"))
                client.route, client.last_seen, client.host, client.pid = route, now, msg.host, msg.pid
                client.present = True
                log.info("client %s reconnected from %s pid %d (%d jobs unfinished, %d results held)",
                         client.id, p.clip(client.host), client.pid, len(client.jobs), len(client.held))
                return client
            session = msg.info.get("session")
            client = ClientRecord(**common, session=session if isinstance(session, str) else "")  # type: ignore[arg-type]
            self.clients[client.id] = client
            if self.journal is not None:
                self.journal.client(client.id, client.session, key)
            log.info("client %s joined from %s pid %d", client.id, p.clip(client.host), client.pid)
            self.records.event(now, "client-joined", f"client {client.id} joined from {client.host}"
                               f"{f' (session {p.clip(client.session)})' if client.session else ''}")
            return client
        return MonitorRecord(**common)  # type: ignore[arg-type]

    def _welcome(self) -> p.Welcome:
        s = self.settings
        return p.Welcome(self.broker_id, s.heartbeat_interval_s, s.liveness, s.max_message_bytes,
                         {"version": __version__})

    def _remove(self, peer: Peer, now: float, why: str) -> None:
        if self.peers.get(peer.route) is peer:
            del self.peers[peer.route]
        if isinstance(peer, WorkerRecord) and self.workers.get(peer.id) is peer:
            del self.workers[peer.id]
            self.hungry.pop(peer.id, None)
            held = len(peer.jobs)
            if why == "left":
                self.records.event(now, "worker-left", f"worker {peer.id} left ({held} jobs handed back)")
            else:
                self.counters.workers_lost += 1
                self.records.event(now, "worker-lost", f"worker {peer.id} on {peer.host} lost ({why}); "
                                   f"{held} jobs requeued")
                self.records.lost_workers.append({**self._worker_view(peer, now), "state": "lost",
                                                  "lost_at": self.records.wall(now), "why": why})
            self._requeue(peer, why, now)
        elif isinstance(peer, ClientRecord) and self.clients.get(peer.id) is peer and peer.present:
            if peer.session and (peer.jobs or peer.held) and why != ENDED_SESSION:
                self._detach(peer, now, why)
            else:
                self._drop_client(peer, now, why)

    def _detach(self, client: ClientRecord, now: float, why: str) -> None:
        """A session's client went away: its jobs go on and their results wait for it."""
        client.present, client.absent_since = False, now
        client.out_rows, client.out_frames, client.out_stats, client.accepted = [], [], [], []
        log.info("client %s of session %s away (%s): its %d unfinished jobs go on, %d results held",
                 client.id, p.clip(client.session), why, len(client.jobs), len(client.held))
        self.records.event(now, "client-away", f"session {client.session} away ({why}); "
                           f"{len(client.jobs)} jobs go on")

    def _drop_client(self, client: ClientRecord, now: float, why: str) -> None:
        """Forget a client: its unfinished jobs are cancelled and its held results dropped."""
        del self.clients[client.id]
        if client.present:
            self.peers.pop(client.route, None)
        dropped, held = len(client.jobs), len(client.held)
        for job in list(client.jobs.values()):
            self._cancel(job, client)
        client.jobs.clear()
        client.fns.clear()
        self.held_results.forget_client(client.id, client.held.values())
        client.held.clear()
        if self.journal is not None:
            self.journal.drop_client(client.id)
        if dropped or held:
            log.info("client %s gone (%s): dropped its %d unfinished jobs and %d results held for it",
                     client.id, why, dropped, held)
        self.records.event(now, "client-left", f"client {client.id} {why}"
                           f"{f'; dropped its {dropped} unfinished jobs' if dropped else ''}")

    def _expire_absent_clients(self, now: float) -> None:
        for client in [c for c in self.clients.values() if not c.present]:
            limit_s = self.settings.session_ttl_s if client.session else RECOVERY_GRACE_S
            if now - client.absent_since > limit_s:
                self._drop_client(client, now, why=f"away for {now - client.absent_since:.0f} s")

    def _requeue(self, worker: WorkerRecord, why: str, now: float) -> None:
        jobs = list(worker.jobs.values())  # in the order they were given to it
        received = [job for job in jobs if job not in worker.outbox]
        worker.jobs.clear()
        worker.outbox.clear()
        if why not in ALIVE_REASONS:  # the worker died running some of these: count it against them
            # The oldest `slots` jobs it had received are the ones running; the rest were prefetched.
            running = received[:worker.slots]
            jobs = [job for job in jobs if job not in running or not self._poisoned(job, worker, why, now)]
        if jobs:
            log.warning("worker %s %s: requeued its %d jobs", worker.id, why, len(jobs))
        self._requeue_jobs(jobs)

    def _poisoned(self, job: Job, worker: WorkerRecord, why: str, now: float) -> bool:
        """Record a worker lost while running ``job``; end the job once it has lost too many."""
        at = time.strftime("%H:%M:%S", time.localtime(self.records.wall(now)))
        job.losses += (f"{worker.id} on {worker.host} ({why}, at {at})",)
        if self.journal is not None:
            self.journal.losses(job)
        limit = job.options.get("max_losses")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            limit = self.settings.max_losses
        client = self.clients.get(job.client_id)
        if len(job.losses) < limit or client is None:
            return False
        info = (f"{len(job.losses)} workers died while running it, so it is not tried again (it may be "
                f"what kills them): {'; '.join(job.losses)}")
        log.warning("job %s declared poison: %s", job.name, p.clip(info))
        self.records.event(now, "job-failed", f"job {job.name} lost {len(job.losses)} workers: not retried")
        self._forget_job(client, job, now)
        job.state = JobState.FINISHED
        ended_at = self.records.wall(now)
        self._deliver(client, job, worker, p.Outcome.LOST, [], info, [ended_at, ended_at, 0.0, 0], now)
        return True

    def _requeue_jobs(self, jobs: list[Job]) -> None:
        for job in reversed(jobs):  # appendleft reverses; keep the original order
            client = self.clients.get(job.client_id)
            if client is None:
                continue
            job.state, job.worker = JobState.QUEUED, None
            client.queue.appendleft(job)
            client.queued += 1
            self.queued += 1
            self.counters.requeued += 1
            if not client.scheduled:
                client.scheduled = True
                self.active.appendleft(client)

    # ---- jobs ------------------------------------------------------------------------------------

    def _submit(self, client: ClientRecord, msg: p.Submit, now: float) -> None:
        frames = msg.frames
        if msg.with_fn:
            client.fns[msg.fn_id] = frames[0]
            if self.journal is not None:
                self.journal.function(client.id, msg.fn_id, frames[0])
            frames = frames[1:]
        known_fn = msg.fn_id in client.fns
        per_job = p.split_frames(frames, [row[1] for row in msg.jobs])
        for (seq, _n, options), job_frames in zip(msg.jobs, per_job, strict=True):
            digest = _digest(msg.fn_id, job_frames) if client.session else b""
            if self._resubmitted(client, seq, digest, now):
                continue
            if not known_fn:
                self._bounce(client, seq, p.Outcome.LOST, p.FUNCTION_MISSING, now)
                continue
            if self.settings.max_queued and self.queued >= self.settings.max_queued:
                self._bounce(client, seq, p.Outcome.BUSY, "the broker's queue is full", now)
                continue
            if self.journal is not None and self.journal.problem:  # it could promise nothing
                self._bounce(client, seq, p.Outcome.JOURNAL_FULL, f"the broker cannot write its journal "
                             f"{self.journal.path} ({self.journal.problem})", now)
                continue
            payload = tuple(compact(f) for f in job_frames)
            job = Job(client.id, seq, msg.fn_id, payload, options or NO_OPTIONS, now, digest=digest)
            if client.attempts_used:
                job.history = ("",) * client.attempts_used.pop(seq, 0)  # attempts of a retired job
            if self.journal is not None:
                self.journal.job(job, self.records.wall(now))
            if client.session:
                client.accepted.append(seq)
            self._enqueue(client, job)
            client.fn_idle.pop(msg.fn_id, None)
        if known_fn and not client.fn_users.get(msg.fn_id):  # nothing accepted uses it: let it go in time
            client.fn_idle.setdefault(msg.fn_id, now)

    def _enqueue(self, client: ClientRecord, job: Job) -> None:
        """A job accepted for ``client`` joins the back of its queue."""
        client.jobs[job.seq] = job
        client.fn_users[job.fn_id] = client.fn_users.get(job.fn_id, 0) + 1
        client.queue.append(job)
        client.queued += 1
        client.submitted += 1
        self.queued += 1
        if not client.scheduled:
            client.scheduled = True
            self.active.append(client)

    def _resubmitted(self, client: ClientRecord, seq: int, digest: bytes, now: float) -> bool:
        """Whether a submitted job is one we have: unfinished (it goes on) or held (sent again).

        A session's job whose function or arguments differ from what we have under its
        number is a new job: what we had is dropped, never answered in its place.
        """
        job = client.jobs.get(seq)
        held = client.held.get(seq)
        if job is not None and job.digest == digest:
            if client.session:
                client.accepted.append(seq)
            return True
        if held is not None and held.outcome == p.Outcome.CORRUPTED:
            digest = held.digest  # what the job was is unknown: whatever asks for it hears it is damaged
        same = held is not None and held.digest == digest
        whole = self._held_result(client, seq, held, now) if held is not None and same else None
        if whole is not None and whole.frames is not None:
            if client.session:
                client.accepted.append(seq)
            _to_client(client, seq, whole.outcome, whole.frames, whole.info, whole.stats)
            return True
        if job is not None or held is not None:
            if held is not None and held.digest == digest:  # the same job, but its result is gone
                log.error("job %s:%d: the journal has lost its held result; running it again", client.id, seq)
            else:
                log.warning("session %s sent job %d with other content than before: running the new one",
                            p.clip(client.session), seq)
                self.records.event(now, "job-replaced", f"job {client.id}:{seq} changed: the new one runs")
            if job is not None:
                self._retire(client, job, now)
            self._drop_held(client, seq)
        return False

    def _drop_held(self, client: ClientRecord, seq: int) -> None:
        held = client.held.pop(seq, None)
        if held is not None:
            self.held_results.forget(client.id, seq, held)
            if self.journal is not None:
                self.journal.drop_result(client.id, seq)

    def _held_result(self, client: ClientRecord, seq: int, held: Held, now: float) -> Held | None:
        """A held result whole, from memory or from disk (None: it is gone; a damaged one is now a
        JournalCorrupted failure)."""
        try:
            return self.held_results.read(client.id, seq, held)
        except JournalCorrupted as exc:
            self._damaged(client, seq, exc.detail, now, where=exc.journal if self.journal is None else "")
            return client.held[seq]

    def _retire(self, client: ClientRecord, job: Job, now: float) -> None:
        """Cancel a client's unfinished job. A session may send its number again with other content:
        the next job under that number goes on counting attempts, so the old run's result is refused."""
        self._forget_job(client, job, now)
        self._cancel(job, client)
        if client.session and job.history:
            client.attempts_used[job.seq] = len(job.history)
        if self.journal is not None:
            self.journal.drop_job(client.id, job.seq)

    def _add_credit(self, worker: WorkerRecord, credit: int) -> None:
        if credit < 0:
            raise ProtocolError(f"negative credit {credit}")
        worker.credit = min(worker.credit + credit, MAX_CREDIT)
        if worker.credit > 0:
            self.hungry[worker.id] = worker

    def _dispatch(self, now: float) -> None:
        """Fill idle slots first, spreading jobs evenly; only then use prefetch credit."""
        for prefetch in (False, True):
            while self.queued:
                room = {w: (w.credit if prefetch else min(w.credit, w.slots - len(w.jobs)))
                        for w in self.hungry.values()}
                room = {w: n for w, n in room.items() if n > 0}
                if not room:
                    break
                share = max(1, math.ceil(self.queued / len(room)))
                for worker, n in room.items():
                    for _ in range(min(n, share)):
                        job = self._next_queued()
                        if job is None:
                            return
                        self._assign(job, worker)
                    if worker.credit <= 0:
                        del self.hungry[worker.id]

    def _next_queued(self) -> Job | None:
        while self.active:
            client = self.active[0]
            if _at_max_running(client):  # scheduled again when one of its jobs is over (_forget_job)
                self.active.popleft()
                client.scheduled = False
                continue
            while client.queue:
                job = client.queue.popleft()
                if job.state is JobState.QUEUED:
                    client.queued -= 1
                    self.queued -= 1
                    if client.queued:
                        self.active.rotate(-1)
                    else:
                        self.active.popleft()
                        client.scheduled = False
                    return job
            self.active.popleft()
            client.scheduled = False
        return None

    def _assign(self, job: Job, worker: WorkerRecord) -> None:
        job.state, job.worker = JobState.ASSIGNED, worker.id
        job.history += (worker.id,)
        worker.jobs[job.key] = job
        worker.credit -= 1
        worker.outbox.append(job)

    def _jobs_message(self, worker: WorkerRecord) -> p.Jobs:
        fns: list[bytes] = []
        fn_frames: list[Any] = []
        rows: list[list[Any]] = []
        job_frames: list[Any] = []
        for job in worker.outbox:
            if job.fn_id not in worker.fns:
                client = self.clients[job.client_id]
                fns.append(job.fn_id)
                fn_frames.append(client.fns[job.fn_id])
                p.remember_fn(worker.fns, job.fn_id, None)
            rows.append([job.client_id, job.seq, len(job.history), job.fn_id, len(job.frames), job.options])
            job_frames.extend(job.frames)
        worker.outbox = []
        return p.Jobs(fns, rows, fn_frames + job_frames)

    def _results(self, worker: WorkerRecord, msg: p.Results, now: float) -> None:
        self._add_credit(worker, msg.credit)
        per_row = p.split_frames(msg.frames, [row[4] for row in msg.results])
        stats = msg.stats or [[0.0, 0.0, 0.0, 0]] * len(msg.results)
        for (client_id, seq, attempt, outcome, _n, info), frames, run in zip(msg.results, per_row, stats,
                                                                             strict=True):
            client = self.clients.get(client_id)
            job = client.jobs.get(seq) if client else None
            if job is None or client is None or not _ran(job, worker, attempt):
                if outcome != p.Outcome.CANCELLED:
                    self.counters.late_results += 1
                continue
            if outcome == p.Outcome.CANCELLED:
                continue  # only a client's CANCEL ends a job; this acknowledges one
            if outcome == p.Outcome.RETURNED:
                self._give_back(worker, job)
                continue
            if outcome not in _OUTCOMES:
                raise ProtocolError(f"unknown outcome {outcome}")
            if job.worker == worker.id and attempt < len(job.history):
                # a resent result of an earlier attempt: the later copy this worker holds is not needed
                worker.cancels.append([client_id, seq])
            self._finish_job(worker, client, job, p.Outcome(outcome), [compact(f) for f in frames], info, run,
                             now)

    def _finish_job(self, worker: WorkerRecord, client: ClientRecord, job: Job, outcome: p.Outcome,
                    frames: list[Any], info: str, run: list[Any], now: float) -> None:
        self._release(job, finisher=worker)
        self._forget_job(client, job, now)
        job.state = JobState.FINISHED
        ok = outcome == p.Outcome.OK
        worker.done += ok
        worker.failed += not ok
        if not ok:
            log.info("job %s failed on worker %s: %s", job.name, worker.id, p.clip(info))
            self.records.event(now, "job-failed", f"job {job.name} failed on {worker.id}: {info}")
        self._deliver(client, job, worker, outcome, frames, info, run, now)

    def _deliver(self, client: ClientRecord, job: Job, worker: WorkerRecord, outcome: p.Outcome,
                 frames: list[Any], info: str, run: list[Any], now: float) -> None:
        """Keep the finished job's record in the history and send its result to its client."""
        started_at, finished_at, run_s, peak_rss = run
        queued_at = self.records.wall(job.queued_at)
        self.records.job(now, (job.name, job.client_id, worker.id, worker.host, queued_at, started_at,
                               finished_at, round(run_s, 6), len(job.history), outcome.name.lower(),
                               peak_rss, info))
        stats = [worker.id, worker.host, len(job.history), queued_at, started_at, finished_at, run_s,
                 peak_rss]
        self._finish_for_client(client, job, outcome, frames, info, stats)

    def _forget_job(self, client: ClientRecord, job: Job, now: float) -> None:
        """The job is over for its client; its function is kept a little while for the next jobs."""
        del client.jobs[job.seq]
        if client.queued and not client.scheduled:  # it was held back by its max_running
            client.scheduled = True
            self.active.append(client)
        users = client.fn_users.get(job.fn_id, 0) - 1
        client.fn_users[job.fn_id] = users
        if users <= 0:
            client.fn_idle[job.fn_id] = now

    def _drop_idle_functions(self, now: float) -> None:
        for client in self.clients.values():
            for fn_id, since in list(client.fn_idle.items()):
                if now - since > FN_KEEP_S:
                    del client.fn_idle[fn_id]
                    client.fns.pop(fn_id, None)
                    client.fn_users.pop(fn_id, None)
                    if self.journal is not None:
                        self.journal.drop_function(client.id, fn_id)

    def _give_back(self, worker: WorkerRecord, job: Job) -> None:
        if job.state is JobState.ASSIGNED and worker.jobs.pop(job.key, None) is job:
            self._requeue_jobs([job])

    def _release(self, job: Job, finisher: WorkerRecord | None = None) -> None:
        """Take a job back from the worker holding it (telling that worker if it still runs it)."""
        if job.state is JobState.QUEUED:
            job.state = JobState.CANCELLED  # removed lazily from its client's queue
            client = self.clients.get(job.client_id)
            if client is not None:
                client.queued -= 1
            self.queued -= 1
            return
        holder = self.workers.get(job.worker or "")
        if holder is not None and holder.jobs.pop(job.key, None) is not None and holder is not finisher:
            if job in holder.outbox:
                holder.outbox.remove(job)
            else:
                holder.cancels.append([job.client_id, job.seq])

    def _cancel(self, job: Job, client: ClientRecord) -> None:
        self._release(job)
        job.state = JobState.CANCELLED
        self.counters.cancelled += 1

    def _bounce(self, client: ClientRecord, seq: int, outcome: p.Outcome, info: str, now: float) -> None:
        """Hand a job straight back, unaccepted: the client sends it again (counted nowhere)."""
        at = self.records.wall(now)
        _to_client(client, seq, outcome, [], info, ["", "", 0, at, at, at, 0.0, 0])
        self.counters.bounced += 1

    def _finish_for_client(self, client: ClientRecord, job: Job, outcome: p.Outcome, frames: list[Any],
                           info: str, stats: list[Any]) -> None:
        """Hold the result until the client says it has it, and send it if the client is here."""
        ok = outcome == p.Outcome.OK
        client.done += ok
        client.failed += not ok
        self.counters.done += ok
        self.counters.failed += not ok
        held = Held(int(outcome), frames, info, stats, job.digest)
        client.held[job.seq] = held
        if self.journal is not None:
            self.journal.result(client.id, job.seq, held)
        # A session's are kept until the session ends: with a journal, on disk, not in memory.
        self.held_results.keep(client.id, job.seq, held, disk_only=bool(client.session and self.journal))
        if client.present:  # else it is sent when the client asks for the job again
            _to_client(client, job.seq, outcome, frames, info, stats)

    # ---- output and views ------------------------------------------------------------------------

    def _send(self, peer: Peer, msg: p.Message, now: float) -> None:
        peer.last_sent = now
        self._out.append((peer.route, msg))

    def _send_to(self, route: Route, msg: p.Message) -> None:
        self._out.append((route, msg))

    def snapshot(self, now: float) -> dict[str, Any]:
        """Plain data describing the farm now (for ``zfarm status`` and the dashboard)."""
        in_flight = sum(len(w.jobs) for w in self.workers.values())
        return {
            "broker_id": self.broker_id,
            "version": __version__,
            "protocol": p.PROTOCOL_VERSION,
            "address": self.settings.bind,
            "uptime_s": round(now - self.started_at, 3),
            "started_at": self.records.wall(self.started_at),
            "heartbeat_interval_s": self.settings.heartbeat_interval_s,
            "liveness": self.settings.liveness,
            "queued": self.queued,
            "in_flight": in_flight,
            "workers": [self._worker_view(w, now) for w in self.workers.values()],
            "lost_workers": list(self.records.lost_workers),
            "journal": self.journal_path,
            "journal_problem": self.journal.problem if self.journal is not None else "",
            "held_memory_bytes": self.held_results.memory_bytes,
            "held_on_disk": self.held_results.on_disk,
            "clients": [
                {"id": c.id, "host": c.host, "pid": c.pid, "submitted": c.submitted, "queued": c.queued,
                 "in_flight": len(c.jobs) - c.queued, "done": c.done, "failed": c.failed,
                 "session": c.session, "present": c.present, "held": len(c.held)}
                for c in self.clients.values()
            ],
            **dataclasses.asdict(self.counters),
            "throughput": self.records.throughput(now),
            "events": self.records.recent_events(now),
        }

    def _worker_view(self, w: WorkerRecord, now: float) -> dict[str, Any]:
        return {"id": w.id, "host": w.host, "pid": w.pid, "slots": w.slots, "busy": len(w.jobs),
                "credit": w.credit, "done": w.done, "failed": w.failed,
                "state": "busy" if w.jobs else "idle",
                "heartbeat_age_s": round(now - w.last_seen, 3), "uptime_s": round(now - w.joined_at, 3)}


_OUTCOMES = {int(o) for o in p.Outcome}


def _to_client(client: ClientRecord, seq: int, outcome: int, frames: list[Any], info: str,
               stats: list[Any]) -> None:
    """Add a result to the RESULT message the client gets at the next flush."""
    client.out_rows.append([seq, int(outcome), len(frames), info[:p.MAX_TEXT_CHARS]])  # the client's bound
    client.out_frames.extend(frames)
    client.out_stats.append(stats)


def _ran(job: Job, worker: WorkerRecord, attempt: int) -> bool:
    """Whether ``worker`` was given this very job as this attempt (a result for it is an answer).

    A job read back from a journal takes a result from any worker: the broker that gave it out is gone.
    Not of an attempt that ran the job it replaced, though.
    """
    if 0 <= job.recovered_after < attempt:
        return True
    return 0 < attempt <= len(job.history) and job.history[attempt - 1] == worker.id


def _at_max_running(client: ClientRecord) -> bool:
    """Whether a client runs as many jobs as its next one allows (option ``max_running``: job arrays)."""
    cap = client.queue[0].options.get("max_running") if client.queue else None
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        return False
    return len(client.jobs) - client.queued >= cap


def _digest(fn_id: bytes, frames: Sequence[Any]) -> bytes:
    """What a session's job is: its function and arguments, hashed."""
    h = hashlib.blake2b(fn_id, digest_size=16)
    for frame in frames:
        h.update(p.buffer_of(frame))
    return h.digest()
