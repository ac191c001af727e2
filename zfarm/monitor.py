"""Short-lived monitor connections: ask the broker for its snapshot or its job history."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

import zmq

from zfarm import protocol as p
from zfarm.config import check_endpoint
from zfarm.errors import BrokerUnavailable, ProtocolError, Refused, SecurityError
from zfarm.security import HandshakeWatch, PeerKeys

M = TypeVar("M", bound=p.Message)


def monitor_keys(folder: str) -> PeerKeys:
    """A monitor uses the folder's client key, or its worker key where it holds no client key."""
    has_client_key = any(Path(folder, "clients").glob("*.key_secret"))
    return PeerKeys.load(folder, "client" if has_client_key else "worker")


def monitor_hello(prefix: str) -> p.Hello:
    peer_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
    return p.Hello(p.Role.MONITOR.value, peer_id, socket.gethostname(), os.getpid())


def open_monitor(address: str, hello: p.Hello, keys: str = "",
                 context: zmq.Context[Any] | None = None) -> zmq.Socket[Any]:
    """A DEALER to the broker that has said ``hello`` (with the folder's keys, if any).

    Raises:
        ConfigError: ``address`` is not an endpoint a monitor can connect to.
    """
    check_endpoint(address)
    sock: zmq.Socket[Any] = (context or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:
        monitor_keys(keys).apply(sock)
    sock.connect(address)
    sock.send_multipart(p.encode(hello))
    return sock


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


Table = tuple[list[str], list[list[Any]]]


def fetch_history(address: str, last: int = 0, timeout_s: float = 10.0,
                  context: zmq.Context[Any] | None = None, keys: str = "") -> Table:
    """The broker's records of finished jobs, oldest first: ``(columns, rows)``."""
    reply = ask(address, p.History(last), p.HistoryReply, timeout_s, context, keys)
    return reply.columns, reply.rows


def ask(address: str, request: p.Message, reply_type: type[M], timeout_s: float,
        context: zmq.Context[Any] | None = None, keys: str = "") -> M:
    """Introduce ourselves as a monitor, send ``request``, return the first ``reply_type`` answer."""
    sock = open_monitor(address, monitor_hello("m"), keys, context)
    watch = HandshakeWatch(sock, "monitor", bool(keys))
    deadline = time.monotonic() + timeout_s
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(watch.monitor, zmq.POLLIN)
    try:
        sock.send_multipart(p.encode(request))
        while True:
            remaining_ms = (deadline - time.monotonic()) * 1000
            ready = dict(poller.poll(max(1, int(remaining_ms)))) if remaining_ms > 0 else {}
            if ready.get(watch.monitor) and (problem := watch.read()):
                raise SecurityError(f"the broker at {address} did not let us in: {problem}")
            if not ready.get(sock):
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(address, timeout_s)
                continue
            try:
                msg = p.decode(sock.recv_multipart())
            except ProtocolError:
                continue
            if isinstance(msg, p.Refused):
                raise Refused(f"the broker at {address} refused us: {msg.reason}")
            if isinstance(msg, reply_type):
                sock.send_multipart(p.encode(p.Disconnect("monitor done")))
                watch.close()
                sock.close(linger=500)  # let the goodbye out, so the broker logs no lost peer
                return msg
    finally:
        watch.close()
        sock.close(linger=0)
