"""The broker's pure core: a thin facade over parts that each own one noun.

Sans-IO: the broker shell feeds it raw frames with the time they arrived and sends whatever it
returns. It owns no socket and reads no clock, so unit tests drive it with plain data and a fake
clock.

::

    handle(route, frames, now) ─► decode ─► Peers      HELLO, DISCONNECT, liveness (peers.py)
                                        ├─► Intake     SUBMIT, CANCEL (intake.py)
                                        ├─► Delivery   RESULTS, STARTED, RECEIVED (delivery.py)
                                        ├─► Peeks      PEEK, PEEK_REPLY: relayed (peek.py)
                                        └─► Placement  READY: credit (placement.py)
    tick(now)  ─► Functions.drop_idle, Peers.scan
    flush(now) ─► Placement.dispatch ─► JOBS, CANCEL_JOBS, RECLAIM, ACCEPTED, RUNNING, RESULT per peer

Every job state change goes through :class:`~zfarm.broker.jobstate.JobMoves` (the transition
table). What the parts share (peers, counters, journal, outbox) is one
:class:`~zfarm.broker.farm.Farm`. A journal, if given, is read back first
(:mod:`zfarm.broker.recovery`).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from zfarm import __version__
from zfarm import protocol as p
from zfarm.broker.clusters import Clusters
from zfarm.broker.delivery import Delivery
from zfarm.broker.dependencies import Dependencies
from zfarm.broker.farm import Farm, Outbound
from zfarm.broker.functions import FN_KEEP_S, Functions
from zfarm.broker.held import HeldResults
from zfarm.broker.intake import Intake
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.journal import Journal
from zfarm.broker.peek import Peeks
from zfarm.broker.peers import Peers, worker_view
from zfarm.broker.placement import Placement
from zfarm.broker.projects import Projects
from zfarm.broker.records import JOB_COLUMNS, Records
from zfarm.broker.recovery import recover
from zfarm.broker.spill import Spill
from zfarm.broker.state import (
    Auth,
    ClientRecord,
    Counters,
    Departure,
    MonitorRecord,
    Peer,
    Route,
    WorkerRecord,
    role_of,
)
from zfarm.config import BrokerSettings
from zfarm.errors import FieldTooLarge, ProtocolError, VersionMismatch

__all__ = ["FN_KEEP_S", "Outbound", "Scheduler"]

log = logging.getLogger(__name__)

#: how often the core scans peers for expiry and heartbeats, as a fraction of the interval
SCANS_PER_INTERVAL = 4


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
        self.broker_id = broker_id or uuid.uuid4().hex[:12]
        self.started_at = now
        self.farm = farm = Farm(settings, Records(now, wall_offset_s, settings.history),
                                HeldResults(settings.held_memory_bytes, journal, spill), journal)
        self.functions = Functions(farm)
        self.moves = JobMoves(farm)
        self.delivery = Delivery(farm, self.moves)
        self.dependencies = Dependencies(farm, self.moves, self.delivery)
        self.moves.on_ended = self.dependencies.ended
        self.placement = Placement(farm, self.moves, self.delivery, self.dependencies)
        self.projects = Projects(farm, self.moves, self.delivery)
        self.delivery.on_failure = self.projects.failed
        self.intake = Intake(farm, self.moves, self.delivery, self.functions, self.projects,
                             self.dependencies)
        self.peers_part = Peers(farm, self.moves, self.placement, self.broker_id)
        self.clusters = Clusters(farm.records)
        self.peeks = Peeks(farm)
        self._next_scan = now
        self.deadline_s = settings.heartbeat_interval_s * settings.liveness
        if journal is not None:
            recover(farm, self.delivery, self.functions, journal.load(), now, self.intake)

    # the farm's facts, as the shell and the tests read them
    @property
    def peers(self) -> dict[Route, Peer]:
        return self.farm.peers

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        return self.farm.workers

    @property
    def clients(self) -> dict[str, ClientRecord]:
        return self.farm.clients

    @property
    def counters(self) -> Counters:
        return self.farm.counters

    @property
    def records(self) -> Records:
        return self.farm.records

    @property
    def journal(self) -> Journal | None:
        return self.farm.journal

    @property
    def queued(self) -> int:
        return self.farm.queued

    # ---- stimuli ---------------------------------------------------------------------------------

    def handle(self, route: Route, frames: Sequence[Any], now: float, auth: Auth | None = None) -> None:
        """One message from ``route``. Bad input is logged and dropped, never raised.

        ``auth``: with CURVE, who the peer's key says it is (None: no keys, anyone may be anything).
        """
        farm = self.farm
        try:
            msg = p.decode(frames)
        except VersionMismatch as exc:
            log.warning("refused peer %s: %s", route.hex(), exc)
            farm.out.append((route, p.Refused(str(exc))))
            return
        except FieldTooLarge as exc:
            if p.is_hello(frames):  # a HELLO it cannot accept, like any other: the peer is told why
                log.warning("refused peer %s: %s", route.hex(), exc)
                farm.send_to(route, p.Refused(str(exc)))
            else:
                farm.malformed(now, "dropped message from %s: %s", route.hex(), exc)
            return
        except ProtocolError as exc:
            farm.malformed(now, "dropped malformed message from %s: %s", route.hex(), p.clip(str(exc)))
            return
        if isinstance(msg, p.Hello) and auth is not None and (reason := self.peers_part.refusal(msg, auth)):
            log.warning("refused %s %s from %s: %s", msg.role, msg.peer_id, p.clip(msg.host), reason)
            farm.send_to(route, p.Refused(reason))
            return
        try:
            self._dispatch_message(route, msg, now, auth.key if auth else "")
            if isinstance(msg, p.Hello) and auth is not None and "client" not in auth.roles:
                peer = farm.peers.get(route)
                if isinstance(peer, MonitorRecord):
                    peer.read_only = True
        except ProtocolError as exc:
            peer = farm.peers.get(route)
            who = f"{role_of(peer)} {peer.id}" if peer else route.hex()
            farm.malformed(now, "dropped %s from %s: %s", type(msg).__name__, who, p.clip(str(exc)))

    def _dispatch_message(self, route: Route, msg: p.Message, now: float, key: str) -> None:
        if isinstance(msg, p.Hello):
            self.peers_part.hello(route, msg, now, key)
            return
        farm = self.farm
        peer = farm.peers.get(route)
        if peer is None:
            if not isinstance(msg, p.Disconnect):
                farm.send_to(route, p.Reconnect("this broker does not know you (it may have restarted)"))
            return
        peer.last_seen = now
        kind = type(msg)
        if kind is p.Results or kind is p.Submit or kind is p.Received:  # the messages of every job:
            self._by_role(peer, msg, now)  # at once (the checks below would come to the same)
            return
        if isinstance(msg, p.Heartbeat):
            return
        if isinstance(msg, p.Disconnect):
            # a monitor (status, a cluster's report every few seconds) comes and goes often: debug only
            log.log(logging.DEBUG if isinstance(peer, MonitorRecord) else logging.INFO, "%s %s left: %s",
                    role_of(peer), peer.id, p.clip(msg.reason) or "no reason given")
            ended = msg.reason == p.END_SESSION
            self.peers_part.remove(peer, now, Departure.ENDED_SESSION if ended else Departure.LEFT)
        elif isinstance(msg, (p.Status, p.ClusterReport)):
            self._status(peer, msg, now)
        elif isinstance(msg, p.History):
            farm.send(peer, p.HistoryReply(JOB_COLUMNS, farm.records.history(msg.last)), now)
        elif isinstance(msg, p.Project) and isinstance(peer, (ClientRecord, MonitorRecord)):
            if isinstance(peer, MonitorRecord) and peer.read_only and msg.action != p.ProjectAction.LIST:
                reply = p.ProjectReply([], "this key may only look: act on projects with a client's key")
            else:
                reply = self.projects.act(msg, now)
            farm.send(peer, reply, now)
        else:
            self._by_role(peer, msg, now)

    def _by_role(self, peer: Peer, msg: p.Message, now: float) -> None:
        if isinstance(peer, WorkerRecord):
            self._worker_message(peer, msg, now)
        elif isinstance(peer, ClientRecord):
            self._client_message(peer, msg, now)
        else:
            self._monitor_message(peer, msg, now)

    def _status(self, peer: Peer, msg: p.Status | p.ClusterReport, now: float) -> None:
        """STATUS, or a cluster's report (kept first, so that the snapshot it gets back holds it)."""
        if isinstance(msg, p.ClusterReport):
            if isinstance(peer, WorkerRecord):
                raise ProtocolError("a worker cannot send ClusterReport")
            self.clusters.report(msg, peer, now)
        self.farm.send(peer, p.StatusReply(self.snapshot(now)), now)

    def _worker_message(self, worker: WorkerRecord, msg: p.Message, now: float) -> None:
        if isinstance(msg, p.Results):  # (the usual message first)
            self.placement.add_credit(worker, msg.credit)
            returned = self.delivery.results(worker, msg, now)
            if returned:
                self.placement.give_back(worker, returned, now)
            self.placement.settled(worker)
        elif isinstance(msg, p.Ready):
            self.placement.add_credit(worker, msg.credit)
        elif isinstance(msg, p.Started):
            self.delivery.started(worker, msg)
        elif isinstance(msg, p.PeekReply):
            self.peeks.relay(worker, msg, now)
        else:
            raise ProtocolError(f"a worker cannot send {type(msg).__name__}")

    def _client_message(self, client: ClientRecord, msg: p.Message, now: float) -> None:
        if isinstance(msg, p.Submit):
            self.intake.submit(client, msg, now)
        elif isinstance(msg, p.Received):
            self.delivery.received(client, msg)
        elif isinstance(msg, p.Cancel):
            self.intake.cancel(client, msg, now)
        elif isinstance(msg, p.Peek):
            self.peeks.ask(client, msg, now)
        else:
            raise ProtocolError(f"a client cannot send {type(msg).__name__}")

    def _monitor_message(self, monitor: Peer, msg: p.Message, now: float) -> None:
        if isinstance(msg, p.Peek):
            self.peeks.ask(monitor, msg, now)
        else:
            raise ProtocolError(f"a monitor cannot send {type(msg).__name__}")

    def peer_unreachable(self, route: Route, now: float) -> None:
        """The socket could not route to ``route``: the peer's connection is gone."""
        peer = self.farm.peers.get(route)
        if peer is not None:
            log.info("%s %s is unreachable", role_of(peer), peer.id)
            self.peers_part.remove(peer, now, Departure.UNREACHABLE)

    def tick(self, now: float) -> None:
        """Expire silent peers and heartbeat quiet ones; cheap to call on every loop."""
        if now < self._next_scan:
            return
        self._next_scan = now + self.settings.heartbeat_interval_s / SCANS_PER_INTERVAL
        self.functions.drop_idle(now)
        self.peers_part.scan(now, self.deadline_s)
        self.projects.tidy(now)  # journal rows of projects no longer owed anything

    def goodbye(self) -> list[Outbound]:
        """DISCONNECT for every peer: the broker is stopping."""
        return [(peer.route, p.Disconnect("broker stopping")) for peer in self.farm.peers.values()]

    def next_wakeup(self) -> float:
        """When ``tick`` next has work, on the caller's clock."""
        return self._next_scan

    def flush(self, now: float) -> list[Outbound]:
        """Dispatch what can be dispatched and return every message to send, batched per peer."""
        farm = self.farm
        self.placement.dispatch(now)
        for worker in farm.workers.values():
            if worker.cancels:  # first: a replaced job's new run may share the old one's key
                farm.send(worker, p.CancelJobs(worker.cancels), now)
                worker.cancels = []
            if worker.reclaims:
                farm.send(worker, p.Reclaim(worker.reclaims), now)
                worker.reclaims = []
            if worker.outbox:
                farm.send(worker, self.placement.jobs_message(worker, now), now)
        for client in farm.clients.values():
            # (an absent client has none: they are cleared when it leaves, and none are added meanwhile)
            if client.accepted:
                farm.send(client, p.Accepted(client.accepted), now)
                client.accepted = []
            if client.started:
                farm.send(client, p.Running(client.started), now)
                client.started = []
            if client.out_rows:
                farm.send(client, p.Result(client.out_rows, client.out_frames, client.out_stats), now)
                client.out_rows, client.out_frames, client.out_stats = [], [], []
        if farm.counted:
            self.projects.save_counted()
        out, farm.out = farm.out, []
        return out

    # ---- views -----------------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """Plain data describing the farm now (for ``zfarm status`` and the dashboard)."""
        farm = self.farm
        in_flight = sum(len(w.jobs) for w in farm.workers.values())
        return {
            "broker_id": self.broker_id,
            "version": __version__,
            "protocol": p.PROTOCOL_VERSION,
            "address": self.settings.bind,
            "uptime_s": round(now - self.started_at, 3),
            "started_at": farm.records.wall(self.started_at),
            "heartbeat_interval_s": self.settings.heartbeat_interval_s,
            "liveness": self.settings.liveness,
            "queued": farm.queued,
            # of those, set aside as unschedulable: no connected worker could ever hold them
            "unschedulable": sum(len(q.parked) for q in farm.queues()),
            "in_flight": in_flight,
            "workers": [worker_view(w, now) for w in farm.workers.values()],
            "lost_workers": list(farm.records.lost_workers),
            "journal": farm.journal_path,
            "journal_problem": farm.journal.problem if farm.journal is not None else "",
            "held_memory_bytes": farm.held_results.memory_bytes,
            "held_on_disk": farm.held_results.on_disk,
            "clients": [
                {"id": c.id, "host": c.host, "pid": c.pid, "submitted": c.submitted, "queued": c.queued,
                 "in_flight": len(c.jobs) - c.queued - c.waiting, "waiting": c.waiting, "done": c.done,
                 "failed": c.failed, "cancelled": c.cancelled,
                 "session": c.session, "present": c.present, "held": len(c.held),
                 "unschedulable": c.own.unschedulable}
                for c in farm.clients.values()
            ],
            "projects": [self.projects.view(q, now) for q in farm.projects.values()],
            "clusters": self.clusters.view(now),
            **dataclasses.asdict(farm.counters),
            "throughput": farm.records.throughput(now),
            "events": farm.records.recent_events(now),
        }
