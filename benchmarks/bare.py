"""The bare pyzmq limit for ``benchmarks/run.py``: a broker, workers and a client in a few lines each.

::

    BareClient (DEALER) ──[J, id, pickle(fn, args)]──► broker (ROUTER) ──► a free worker (DEALER)
           ▲                                              │ ◄──[D, client, id, pickle(result)]──┘
           └────────────────[id, pickle(result)]──────────┘

One job a message, a worker takes one job at a time (no prefetch), no ids beyond a counter, no
heartbeats, no retries, no journal, no validation: what pyzmq and pickle cost on this machine,
the floor under any broker written in Python. Not a product: a reference row.

    python -m benchmarks.bare broker ADDRESS
    python -m benchmarks.bare worker ADDRESS
"""

from __future__ import annotations

import pickle
import sys
from collections import deque
from typing import Any

import zmq

READY, JOB, DONE = b"R", b"J", b"D"


def broker(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    free: deque[bytes] = deque()
    waiting: deque[list[Any]] = deque()  # [client, id, payload]
    while True:
        frames = sock.recv_multipart(copy=False)
        peer, kind = frames[0].bytes, frames[1].bytes
        if kind == JOB:
            waiting.append([peer, frames[2], frames[3]])
        elif kind == DONE:
            sock.send_multipart([frames[2], frames[3], frames[4]], copy=False)
            free.append(peer)
        elif kind == READY:
            free.append(peer)
        while free and waiting:
            sock.send_multipart([free.popleft(), *waiting.popleft()], copy=False)


def worker(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    sock.send(READY)
    while True:
        client, job_id, payload = sock.recv_multipart(copy=False)
        fn, args = pickle.loads(payload.buffer)
        result = pickle.dumps(fn(*args), protocol=5)
        sock.send_multipart([DONE, client, job_id, result], copy=False)


class BareClient:
    """Sends jobs, reads results; synchronous (no futures, no thread)."""

    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.next_id = 0

    def submit(self, fn: Any, *args: Any) -> None:
        self.next_id += 1
        self.sock.send_multipart([JOB, self.next_id.to_bytes(8, "little"),
                                  pickle.dumps((fn, args), protocol=5)], copy=False)

    def result(self, timeout_s: float) -> Any:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no result from the bare broker within {timeout_s:.0f} s")
        _job_id, payload = self.sock.recv_multipart(copy=False)
        return pickle.loads(payload.buffer)

    def map(self, fn: Any, items: list[Any], timeout_s: float) -> list[Any]:
        for item in items:
            self.submit(fn, item)
        return [self.result(timeout_s) for _ in items]

    def close(self) -> None:
        self.sock.close(linger=0)


if __name__ == "__main__":
    {"broker": broker, "worker": worker}[sys.argv[1]](sys.argv[2])
