"""One DEALER link to the broker, the same for worker, client, monitor and dashboard.

::

    core (sans-IO) ── Liveness: state, heartbeats both ways, backoff 1 → 32 s (reads no clock)
       ▲ messages        │ send
       │                 ▼
    Link (I/O) ── DEALER ◄──► broker
       └── HandshakeWatch: why ZeroMQ's handshake failed, in words

:class:`Liveness` is plain data the sans-IO cores own (``WorkerCore``, ``ClientCore``): when the
broker was last heard, when we last sent, whether a heartbeat is due, when to try again after the
broker went silent. :class:`Link` owns the socket: open and close it, build the poller (rebuilt
only when the socket changes), receive and decode whatever has arrived, send.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from typing import Any

import zmq

from zfarm import protocol as p
from zfarm.errors import ProtocolError
from zfarm.security import HandshakeWatch, PeerKeys, dealer_to_broker

log = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK


# pyzmq's recv_multipart and send_multipart turn their flags into enums at every frame, which costs
# more than the frame itself: these two do the same with plain ints (broker, workers and clients).

def recv_frames(socket: zmq.Socket[Any]) -> list[zmq.Frame] | None:
    """The next whole message waiting on ``socket`` as frames (zero copy), or None if none waits."""
    recv = socket.recv
    try:
        frame = recv(_NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames = [frame]
    while frame.more:  # the rest of a multipart message is there already
        frame = recv(0, copy=False)
        frames.append(frame)
    return frames


def send_frames(socket: zmq.Socket[Any], frames: list[Any]) -> None:
    """Send one message without blocking.

    Raises:
        zmq.Again: it cannot be queued now (on a ROUTER, the broker's, at its first frame: nothing was
            sent; on a DEALER, ZeroMQ drops the part already queued).
        zmq.ZMQError: as the socket says (a ROUTER's unroutable peer: EHOSTUNREACH).
    """
    send = socket.send
    for frame in frames[:-1]:
        send(frame, _MORE_NOBLOCK, copy=False)
    send(frames[-1], _NOBLOCK, copy=False)


class LinkState(str, enum.Enum):
    DOWN = "down"  # no socket: waiting out the reconnect backoff
    CONNECTING = "connecting"  # HELLO sent, no WELCOME yet
    READY = "ready"


class Checked(str, enum.Enum):
    """What :meth:`Liveness.check` found: nothing to do, a heartbeat to send, or a link it dropped."""

    NOTHING = "nothing"
    HEARTBEAT = "heartbeat"  # we were quiet for an interval: send one
    UNANSWERED = "unanswered"  # dropped: no WELCOME came for our HELLO
    SILENT = "silent"  # dropped: the broker fell silent after it welcomed us

    @property
    def dropped(self) -> bool:
        return self in (Checked.UNANSWERED, Checked.SILENT)


class Liveness:
    """The link's state and clocks: heartbeats both ways and the reconnect backoff (no I/O).

    ``interval_s`` and ``liveness`` start as our settings and become the broker's at WELCOME. The
    broker is silent once nothing came for ``interval_s * liveness`` since it was last heard or
    since our last HELLO, whichever is later.
    """

    __slots__ = ("attempt_at", "backoff_max_s", "backoff_min_s", "backoff_s", "interval_s", "last_heard",
                 "last_sent", "liveness", "reconnect_at", "state")

    def __init__(self, interval_s: float, liveness: int, backoff_min_s: float, backoff_max_s: float,
                 now: float) -> None:
        self.state = LinkState.DOWN
        self.interval_s = interval_s
        self.liveness = liveness
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.backoff_s = backoff_min_s
        self.reconnect_at = now
        self.last_heard = now
        self.last_sent = now
        self.attempt_at = now

    @property
    def ready(self) -> bool:
        return self.state is LinkState.READY

    def connecting(self, now: float) -> None:
        """HELLO goes out now: the broker gets a full liveness window to answer it."""
        self.state = LinkState.CONNECTING
        self.attempt_at = now

    def welcomed(self, interval_s: float, liveness: int) -> None:
        self.state = LinkState.READY
        self.interval_s, self.liveness = interval_s, liveness
        self.backoff_s = self.backoff_min_s

    def heard(self, now: float) -> None:
        self.last_heard = now

    def sent(self, now: float) -> None:
        self.last_sent = now

    def silent_s(self, now: float) -> float:
        return now - max(self.last_heard, self.attempt_at)

    def check(self, now: float) -> Checked:
        """The periodic look: drop a link whose broker said nothing for its whole liveness window (the
        core asks its shell to close the socket), or say that a heartbeat is due. A DOWN link waits
        for its reconnect: it never expires."""
        if self.state is LinkState.DOWN:
            return Checked.NOTHING
        if self.silent_s(now) > self.interval_s * self.liveness:
            checked = Checked.UNANSWERED if self.state is LinkState.CONNECTING else Checked.SILENT
            self.drop(now)
            return checked
        if self.state is LinkState.READY and now - self.last_sent >= self.interval_s:
            return Checked.HEARTBEAT
        return Checked.NOTHING

    def drop(self, now: float) -> None:
        """The link is gone: try again after the backoff, which doubles up to its maximum."""
        self.state = LinkState.DOWN
        self.reconnect_at = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.backoff_max_s)

    def retry_now(self, now: float) -> None:
        """New work arrived while down: try the broker now, not after the backoff."""
        if self.state is LinkState.DOWN:
            self.reconnect_at = now
            self.backoff_s = self.backoff_min_s

    def reconnect_due(self, now: float) -> bool:
        return self.state is LinkState.DOWN and now >= self.reconnect_at


class Link:
    """The socket side: one DEALER at a time, its handshake watch and a cached poller.

    Args:
        context: the ZeroMQ context the socket belongs to.
        address: the broker's endpoint.
        keys: CURVE keys, or None.
        role: "worker", "client" or "monitor" (for the handshake's words).
        name: this peer's id, for log lines.
        log_problems: log a failed handshake (once); a one-shot monitor raises it instead.
    """

    def __init__(self, context: zmq.Context[Any], address: str, keys: PeerKeys | None, role: str,
                 name: str, log_problems: bool = True) -> None:
        self.context = context
        self.address = address
        self.keys = keys
        self.role = role
        self.name = name
        self.log_problems = log_problems
        self.socket: zmq.Socket[Any] | None = None
        self.watch: HandshakeWatch | None = None
        #: why the last ZeroMQ handshake with the broker failed, in words ("" if it did not)
        self.problem = ""
        self._generation = 0  # counts sockets opened and closed: the cached poller's key
        self._poller_key: tuple[int, tuple[Any, ...]] = (-1, ())
        self._poller = zmq.Poller()

    def open(self) -> zmq.Socket[Any]:
        """A new DEALER, connected (the old one, if any, is closed first)."""
        self.close()
        sock = dealer_to_broker(self.context, self.address, self.keys)
        self.socket = sock  # owned from here on: closed by close() whatever happens next
        self._generation += 1
        self.watch = HandshakeWatch(sock, self.role, self.keys is not None)
        sock.connect(self.address)
        return sock

    def reopen_if_due(self, live: Liveness, now: float) -> bool:
        """Open a new socket once the core's link is down and its backoff is over; True if so (the
        core says HELLO next)."""
        if not live.reconnect_due(now):
            return False
        self.open()
        return True

    def close(self, linger_ms: int = 0) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.socket is not None:
            self.socket.close(linger=linger_ms)
            self.socket = None
            self._generation += 1

    def poller(self, *extra: Any) -> zmq.Poller:
        """A poller for the socket, its handshake watch and ``extra`` sockets or fds, rebuilt only
        when one of them changed."""
        key = (self._generation, extra)
        if key != self._poller_key:
            self._poller_key, self._poller = key, zmq.Poller()
            if self.socket is not None:
                self._poller.register(self.socket, zmq.POLLIN)
            if self.watch is not None:
                self._poller.register(self.watch.monitor, zmq.POLLIN)
            for item in extra:
                self._poller.register(item, zmq.POLLIN)
        return self._poller

    def readable(self, ready: dict[Any, int]) -> bool:
        """After a poll: note a failed handshake (logged once); whether messages wait."""
        if self.watch is not None and ready.get(self.watch.monitor):
            self.read_problem()
        return self.socket is not None and bool(ready.get(self.socket))

    def read_problem(self) -> str:
        """Why the broker does not let us in ("" if it does, or we do not know); logged once."""
        if self.watch is not None:
            problem = self.watch.read()
            if problem and problem != self.problem and self.log_problems:  # once, not at every reconnect
                log.warning("%s %s: %s", self.role, self.name, problem)
            self.problem = problem
        return self.problem

    def receive(self) -> Iterator[p.Message]:
        """Every message that has arrived, decoded; malformed ones are logged and dropped."""
        while self.socket is not None:
            frames = recv_frames(self.socket)
            if frames is None:
                return
            try:
                yield p.decode(frames)
            except ProtocolError as exc:
                log.warning("%s %s dropped a malformed message from the broker: %s", self.role, self.name,
                            p.clip(str(exc)))

    def send(self, msg: p.Message) -> None:
        self.send_all([msg])

    def send_all(self, msgs: list[p.Message]) -> None:
        """Send, never blocking: queues are unbounded, so only a link with no peer at all (its
        handshake failed) refuses a message. It is dropped: such a link is silent, and what it
        carried goes again once the core has reconnected (unfinished jobs, kept results)."""
        if self.socket is None:
            return
        for msg in msgs:
            try:
                send_frames(self.socket, p.encode(msg))
            except zmq.Again:
                log.debug("%s %s: no connection to the broker; dropped a %s", self.role, self.name,
                          type(msg).__name__)

    def carry_out(self, msgs: list[p.Message], drop: bool) -> None:
        """Send what the core said, then close the socket if it dropped the link (a new one opens at
        :meth:`reopen_if_due`)."""
        self.send_all(msgs)
        if drop:
            self.close()

    def goodbye(self, reason: str, linger_ms: int) -> None:
        """Say DISCONNECT if the socket can take it now, then close, letting it out for ``linger_ms``."""
        if self.socket is not None:
            try:
                self.socket.send_multipart(p.encode(p.Disconnect(reason)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.close(linger_ms)
