"""Short-lived monitor connections: ask the broker for its snapshot or its job history, or tell it
what a cluster launched; read the answer. Also how a cluster's row of a snapshot reads (``cluster_line``)."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import zmq

from zfarm import protocol as p
from zfarm.config import check_endpoint
from zfarm.errors import BrokerUnavailable, Refused, SecurityError
from zfarm.link import Link
from zfarm.security import PeerKeys, dealer_to_broker, monitor_event

#: how long a refused connection may go on being refused (a broker still starting) before a command
#: says that no broker answers, instead of waiting out the whole connect timeout
LISTEN_CHECK_S = 0.5

M = TypeVar("M", bound=p.Message)

#: "throughput now" by default: the mean of this many complete seconds
RATE_NOW_WINDOW_S = 3


def rate_now(throughput: Sequence[int], window_s: int = RATE_NOW_WINDOW_S) -> float:
    """Jobs per second over the last ``window_s`` complete seconds of a snapshot's ``throughput``
    (jobs finished in each second, oldest first; the current, partial second is left out)."""
    complete = list(throughput[-1 - window_s:-1])
    return sum(complete) / len(complete) if complete else 0.0


def monitor_keys(folder: str) -> PeerKeys:
    """A monitor uses a client key of the folder (any one will do: the first by name), or its worker
    key where it holds no client key."""
    for role in ("client", "worker"):
        if found := sorted(Path(folder, f"{role}s").glob("*.key_secret")):
            return PeerKeys.load(folder, role, found[0].name.removesuffix(".key_secret"))
    return PeerKeys.load(folder, "worker")  # says what is missing


def monitor_hello(prefix: str) -> p.Hello:
    peer_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
    return p.Hello(p.Role.MONITOR.value, peer_id, socket.gethostname(), os.getpid())


def open_monitor(address: str, hello: p.Hello, keys: str = "",
                 context: zmq.Context[Any] | None = None) -> Link:
    """A link to the broker that has said ``hello`` (with the folder's keys, if any).

    Raises:
        ConfigError: ``address`` is not an endpoint a monitor can connect to.
    """
    check_endpoint(address)
    link = Link(context or zmq.Context.instance(), address, monitor_keys(keys) if keys else None, "monitor",
                hello.peer_id, log_problems=False)
    link.open()
    link.send(hello)
    return link


def fetch_status(address: str, timeout_s: float = 5.0, context: zmq.Context[Any] | None = None,
                 keys: str = "") -> dict[str, Any]:
    """Connect as a monitor, return the broker's snapshot, leave.

    Raises:
        ConfigError: ``address`` is not an endpoint (no port, port out of range, ...).
        BrokerUnavailable: no answer within ``timeout_s``.
        SecurityError: the broker needs keys we lack, or refused ours (said at once, not at the deadline).
        Refused: the broker refused us (another protocol version, a key not allowed).
    """
    return ask(address, p.Status(), p.StatusReply, timeout_s, context, keys).snapshot


def report_cluster(address: str, report: p.ClusterReport, timeout_s: float = 5.0,
                   context: zmq.Context[Any] | None = None, keys: str = "",
                   stop: threading.Event | None = None) -> dict[str, Any]:
    """Tell the broker what a cluster launched (CLUSTER) and return its snapshot: one round trip.

    ``stop``: when set, give up waiting at once (a cluster closing does not wait for a silent broker).

    Raises:
        as :func:`fetch_status`; BrokerUnavailable also when ``stop`` was set.
    """
    return ask(address, report, p.StatusReply, timeout_s, context, keys, stop).snapshot


def cluster_line(cluster: dict[str, Any]) -> str:
    """One line for a cluster of a snapshot's ``clusters``, e.g. ``cluster lab (slurm, slurm-3f2a1c):
    2 running, 1 coming (1 pending in Slurm), wants 4 (adapt 0-8)``. Its texts are the reporting
    peer's: control characters come out escaped, never as a terminal's commands."""
    name, launcher, cluster_id = (p.clip(str(cluster.get(k, "")), p.MAX_ID_CHARS)
                                  for k in ("name", "launcher", "id"))
    who = f"{name} ({launcher}, {cluster_id})" if name else f"{cluster_id} ({launcher})"
    parts = [f"{cluster['running']} running"]
    coming = f"{cluster['coming']} coming"
    if cluster.get("pending"):
        where = "Slurm" if cluster["launcher"] == "slurm" else "the batch system"
        coming += f" ({cluster['pending']} pending in {where})"
    parts.append(coming)
    parts += [f"{cluster[k]} {k}" for k in ("retiring", "failed") if cluster.get(k)]
    adapt = cluster.get("adapt")
    bounds = f" (adapt {adapt['minimum']}-{adapt['maximum']})" if adapt else ""
    age_s, every_s = cluster.get("report_age_s", 0.0), cluster.get("every_s", 0.0)
    late = f" (last report {age_s:.0f} s ago)" if every_s and age_s > 2 * every_s + 1 else ""  # gone?
    return f"cluster {who}: {', '.join(parts)}, wants {cluster['requested']}{bounds}{late}"


Table = tuple[list[str], list[list[Any]]]


def fetch_history(address: str, last: int = 0, timeout_s: float = 10.0,
                  context: zmq.Context[Any] | None = None, keys: str = "") -> Table:
    """The broker's records of finished jobs, oldest first: ``(columns, rows)``."""
    reply = ask(address, p.History(last), p.HistoryReply, timeout_s, context, keys)
    return reply.columns, reply.rows


#: how often a wait that may be stopped looks whether it was
STOP_CHECK_MS = 100


def ask(address: str, request: p.Message, reply_type: type[M], timeout_s: float,
        context: zmq.Context[Any] | None = None, keys: str = "", stop: threading.Event | None = None) -> M:
    """Introduce ourselves as a monitor, send ``request``, return the first ``reply_type`` answer
    (giving up at ``timeout_s``, or as soon as ``stop`` is set)."""
    link = open_monitor(address, monitor_hello("m"), keys, context)
    deadline = time.monotonic() + timeout_s
    slice_ms = STOP_CHECK_MS if stop is not None else None
    try:
        link.send(request)
        while True:
            if stop is not None and stop.is_set():
                raise BrokerUnavailable(address, timeout_s - (deadline - time.monotonic()), "stopped waiting")
            remaining_ms = (deadline - time.monotonic()) * 1000
            wait_ms = max(1, int(min(remaining_ms, slice_ms or remaining_ms)))
            ready = dict(link.poller().poll(wait_ms)) if remaining_ms > 0 else {}
            readable = link.readable(ready)
            if link.problem:
                raise SecurityError(f"the broker at {address} did not let us in: {link.problem}")
            if not readable:
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(address, timeout_s)
                continue
            for msg in link.receive():
                if isinstance(msg, p.Refused):
                    raise Refused(f"the broker at {address} refused us: {msg.reason}")
                if isinstance(msg, reply_type):
                    link.goodbye("monitor done", linger_ms=500)  # so the broker logs no lost peer
                    return msg
    finally:
        link.close()


def check_listening(address: str, within_s: float = LISTEN_CHECK_S) -> None:
    """Fail at once where nothing listens at ``address`` (a refused connection, still refused after
    ``within_s``); anything else (a connection, or no answer yet from a far host) is left to the
    client's own connect timeout and handshake checks.

    Raises:
        BrokerUnavailable: every connection failed (refused, or no such host) for ``within_s``.
    """
    context: zmq.Context[Any] = zmq.Context()
    sock = dealer_to_broker(context, address, None)
    watch = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)
    started = time.monotonic()
    refused = False
    try:
        try:
            sock.connect(address)
        except zmq.ZMQError:
            return  # not an address at all: the client says why, as a ConfigError
        while (left_s := started + within_s - time.monotonic()) > 0:
            if not watch.poll(max(1, int(left_s * 1000))):
                break
            event = monitor_event(watch.recv_multipart())
            if event == zmq.EVENT_CONNECTED:
                return
            refused = True  # EVENT_CONNECT_RETRIED: the connection failed; ZeroMQ tries again
    finally:
        sock.disable_monitor()
        watch.close(linger=0)
        sock.close(linger=0)
        context.term()
    if refused:
        raise BrokerUnavailable(address, time.monotonic() - started,
                                "nothing listens there (every connection failed: refused, or no such host)")
