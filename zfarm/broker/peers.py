"""Peers: the handshake, who may say what with which key, liveness, and how each peer leaves.

::

    HELLO ──► check ──► register (worker | client | monitor) ──► WELCOME
                                  │
    silent past the deadline, DISCONNECT, unreachable, replaced ──► remove(peer, Departure)
         worker: its jobs queue again        client: kept away (session) or dropped with its jobs

A session client that goes away keeps its jobs and results for ``session_ttl_s``; clients read back
from a journal are away until they say HELLO again.
"""

from __future__ import annotations

import logging

from zfarm import __version__
from zfarm import protocol as p
from zfarm.broker.farm import Farm
from zfarm.broker.jobstate import JobMoves
from zfarm.broker.placement import Placement
from zfarm.broker.state import (
    Auth,
    ClientRecord,
    Departure,
    JobState,
    MonitorRecord,
    Peer,
    Route,
    WorkerRecord,
    check_hello,
    role_of,
    valid_amounts,
    valid_tags,
)

log = logging.getLogger("zfarm.broker.scheduler")

#: how long jobs read back from a journal wait for a client without a session to come back
RECOVERY_GRACE_S = 120.0


class Peers:
    def __init__(self, farm: Farm, moves: JobMoves, placement: Placement, broker_id: str) -> None:
        self.farm = farm
        self.moves = moves
        self.placement = placement
        self.broker_id = broker_id

    def refusal(self, msg: p.Hello, auth: Auth) -> str:
        """Why a key may not say this HELLO ("" if it may)."""
        if msg.role not in auth.roles:
            return (f"this key may not connect as a {msg.role}; it may connect as: "
                    f"{', '.join(sorted(auth.roles)) or 'nothing'}. Use a key from the keys folder's "
                    f"{msg.role}s/ list")
        farm = self.farm
        owner = farm.workers.get(msg.peer_id) if msg.role == p.Role.WORKER else farm.clients.get(msg.peer_id)
        if owner is not None and owner.key != auth.key:
            return f"the {msg.role} id {msg.peer_id} belongs to another key"
        return ""

    def hello(self, route: Route, msg: p.Hello, now: float, key: str = "") -> None:
        farm = self.farm
        problem = check_hello(msg) or (check_resources(msg.info) if msg.role == p.Role.WORKER else "")
        if problem:
            log.warning("refused peer %s: %s", route.hex(), problem)
            farm.send_to(route, p.Refused(problem))
            return
        known = farm.peers.get(route)
        if known is not None and known.id == msg.peer_id and role_of(known) == msg.role:
            known.last_seen = now  # a repeated HELLO: answer again
            if isinstance(known, WorkerRecord):
                self.placement.reset_credit(known)
            farm.send(known, self.welcome(), now)
            return
        if known is not None:
            self.remove(known, now, Departure.REPLACED)
        peer = self._register(route, msg, now, key)
        peer.key = key
        farm.peers[route] = peer
        farm.send(peer, self.welcome(), now)

    def _register(self, route: Route, msg: p.Hello, now: float, key: str) -> Peer:
        farm = self.farm
        common = dict(id=msg.peer_id, route=route, host=msg.host, pid=msg.pid, joined_at=now,
                      last_seen=now, last_sent=now)
        if msg.role == p.Role.WORKER:
            old = farm.workers.get(msg.peer_id)
            if old is not None:
                self.remove(old, now, Departure.RECONNECTED)
            worker = WorkerRecord(**common, slots=msg.slots)  # type: ignore[arg-type]
            announced = msg.info.get("resources", {})
            resources = {"cpus": float(msg.slots), **{k: float(v) for k, v in announced.items()}}
            worker.resources, worker.free = resources, dict(resources)
            worker.tags = frozenset(msg.info.get("tags", ()))
            worker.gpu_ids = [str(g) for g in msg.info.get("gpu_ids", ())][:int(resources.get("gpus", 0))]
            farm.add_worker(worker)
            self.placement.unpark()
            slots = f"{worker.slots} slot{'' if worker.slots == 1 else 's'}"
            if len(resources) > 1 or worker.tags:
                slots += f" ({', '.join(_amount(k, v) for k, v in sorted(resources.items()))}" + (
                    f"; tags {','.join(sorted(worker.tags))})" if worker.tags else ")")
            log.info("worker %s joined from %s pid %d with %s", worker.id, p.clip(worker.host), worker.pid,
                     slots)
            farm.records.event(now, "worker-joined",
                               f"worker {worker.id} joined from {worker.host} with {slots}")
            return worker
        if msg.role == p.Role.CLIENT:
            client = farm.clients.get(msg.peer_id)
            if client is not None:  # the same client on a new connection keeps its jobs
                if client.present:
                    farm.peers.pop(client.route, None)
                    if (client.host, client.pid) != (msg.host, msg.pid):  # another process: it takes over
                        farm.send_to(client.route, p.Refused(
                            f"session {p.clip(client.session or client.id)} was taken over by a client "
                            f"on {p.clip(msg.host)} (pid {msg.pid}): one process per session at a time"))
                client.route, client.last_seen, client.host, client.pid = route, now, msg.host, msg.pid
                client.present = True
                log.info("client %s reconnected from %s pid %d (%d jobs unfinished, %d results held)",
                         client.id, p.clip(client.host), client.pid, len(client.jobs), len(client.held))
                return client
            session = msg.info.get("session")
            client = ClientRecord(**common, session=session if isinstance(session, str) else "")  # type: ignore[arg-type]
            farm.clients[client.id] = client
            if farm.journal is not None:
                farm.journal.client(client.id, client.session, key)
            log.info("client %s joined from %s pid %d", client.id, p.clip(client.host), client.pid)
            farm.records.event(now, "client-joined", f"client {client.id} joined from {client.host}"
                               f"{f' (session {p.clip(client.session)})' if client.session else ''}")
            return client
        return MonitorRecord(**common)  # type: ignore[arg-type]

    def welcome(self) -> p.Welcome:
        s = self.farm.settings
        return p.Welcome(self.broker_id, s.heartbeat_interval_s, s.liveness, s.max_message_bytes,
                         {"version": __version__})

    def remove(self, peer: Peer, now: float, why: Departure, detail: str = "") -> None:
        """End a peer's record. ``detail``: how to say ``why`` in logs (default: its text)."""
        farm = self.farm
        detail = detail or why.value
        if farm.peers.get(peer.route) is peer:
            del farm.peers[peer.route]
        if isinstance(peer, WorkerRecord) and farm.workers.get(peer.id) is peer:
            farm.remove_worker(peer)
            self.placement.forget(peer)
            held = len(peer.jobs)
            if why is Departure.LEFT:
                farm.records.event(now, "worker-left", f"worker {peer.id} left ({held} jobs handed back)")
            else:
                farm.counters.workers_lost += 1
                farm.records.event(now, "worker-lost", f"worker {peer.id} on {peer.host} lost ({detail}); "
                                   f"{held} jobs requeued")
                farm.records.lost_workers.append({**worker_view(peer, now), "state": "lost",
                                                  "lost_at": farm.records.wall(now), "why": detail})
            self.placement.requeue(peer, why, detail, now)
        elif isinstance(peer, ClientRecord) and farm.clients.get(peer.id) is peer and peer.present:
            if peer.session and (peer.jobs or peer.held) and why is not Departure.ENDED_SESSION:
                self._detach(peer, now, detail)
            else:
                self.drop_client(peer, now, detail)

    def _detach(self, client: ClientRecord, now: float, why: str) -> None:
        """A session's client went away: its jobs go on and their results wait for it."""
        client.present, client.absent_since = False, now
        client.out_rows, client.out_frames, client.out_stats, client.accepted = [], [], [], []
        log.info("client %s of session %s away (%s): its %d unfinished jobs go on, %d results held",
                 client.id, p.clip(client.session), why, len(client.jobs), len(client.held))
        self.farm.records.event(now, "client-away", f"session {client.session} away ({why}); "
                                f"{len(client.jobs)} jobs go on")

    def drop_client(self, client: ClientRecord, now: float, why: str) -> None:
        """Forget a client: its unfinished jobs are cancelled and its held results dropped."""
        farm = self.farm
        del farm.clients[client.id]
        if client.present:
            farm.peers.pop(client.route, None)
        dropped, held = len(client.jobs), len(client.held)
        for job in list(client.jobs.values()):
            self.moves.move(job, JobState.CANCELLED, client, now)
        client.fns.clear()
        farm.held_results.forget_client(client.id, client.held.values())
        client.held.clear()
        if farm.journal is not None:
            farm.journal.drop_client(client.id)
        if dropped or held:
            log.info("client %s gone (%s): dropped its %d unfinished jobs and %d results held for it",
                     client.id, why, dropped, held)
        farm.records.event(now, "client-left", f"client {client.id} {why}"
                           f"{f'; dropped its {dropped} unfinished jobs' if dropped else ''}")

    def scan(self, now: float, deadline_s: float) -> None:
        """Drop clients away too long; declare silent peers dead; heartbeat quiet ones."""
        farm = self.farm
        for client in [c for c in farm.clients.values() if not c.present]:
            limit_s = farm.settings.session_ttl_s if client.session else RECOVERY_GRACE_S
            if now - client.absent_since > limit_s:
                self.drop_client(client, now, why=f"away for {now - client.absent_since:.0f} s")
        interval = farm.settings.heartbeat_interval_s
        for peer in list(farm.peers.values()):
            silent_s = now - peer.last_seen
            if silent_s > deadline_s:
                log.warning("%s %s on %s silent for %.1f s: declared dead", role_of(peer), peer.id,
                            p.clip(peer.host), silent_s)
                self.remove(peer, now, Departure.SILENT, f"silent for {silent_s:.1f} s")
            elif now - peer.last_sent >= interval:
                farm.send(peer, p.Heartbeat(), now)


def worker_view(w: WorkerRecord, now: float) -> dict[str, object]:
    return {"id": w.id, "host": w.host, "pid": w.pid, "slots": w.slots, "busy": len(w.jobs),
            "resources": w.resources, "free": w.free, "tags": sorted(w.tags),
            "credit": w.credit, "done": w.done, "failed": w.failed,
            "state": "busy" if w.jobs else "idle",
            "heartbeat_age_s": round(now - w.last_seen, 3), "uptime_s": round(now - w.joined_at, 3)}


def check_resources(info: dict[str, object]) -> str:
    """Why a worker's HELLO resources, tags or GPU ids cannot be taken ("" if they can)."""
    gpu_ids = info.get("gpu_ids", [])
    if not valid_amounts(info.get("resources", {})):
        return "a worker's resources are up to 32 names with amounts of 0 or more (mem in bytes)"
    if not valid_tags(info.get("tags", [])):
        return "a worker's tags are up to 32 short texts"
    if not isinstance(gpu_ids, list) or len(gpu_ids) > 1024 or not all(isinstance(g, (str, int))
                                                                       for g in gpu_ids):
        return "a worker's GPU ids are a list of texts or numbers"
    return ""


def _amount(name: str, value: float) -> str:
    """A resource for people: memory in GiB, counts as numbers."""
    return f"{name}={value / 2**30:.1f}GiB" if name == "mem" else f"{name}={value:g}"
