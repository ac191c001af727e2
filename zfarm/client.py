"""``zfarm.Client``: a ``concurrent.futures.Executor`` whose jobs run on a farm.

::

    Client.submit / map ──pickle in the caller's thread──► Connection (I/O thread) ──SUBMIT──► broker
          ▲                                                        │
          └──────────── futures resolve as RESULT messages arrive ◄┘

``Client()`` with no address starts an embedded broker and workers on this
machine (see :mod:`zfarm.local`); ``Client("tcp://host:5555")`` uses a farm.
The same code runs on both.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zmq

from zfarm import serialization as ser
from zfarm.config import ClientSettings, resolve
from zfarm.connection import Connection, JobFuture, PendingJob
from zfarm.errors import BrokerUnavailable, PayloadTooLarge
from zfarm.local import LocalCluster
from zfarm.progress import known_length, track
from zfarm.stats import Stats, summarize
from zfarm.worker import ENVELOPE_ALLOWANCE

log = logging.getLogger(__name__)

_LIVE_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


class Client(concurrent.futures.Executor):
    """Run Python functions on a zfarm broker's workers.

    Args:
        address: the broker's endpoint (``tcp://host:5555``). None: ``ZFARM_ADDRESS`` if set,
            else a local broker and ``n_workers`` workers that stop with this client.
        n_workers: workers of the embedded farm (default: one per CPU).
        connect_timeout_s: how long to wait for the broker's first answer.
        broker_timeout_s: how long unfinished jobs wait for a silent broker.
        window: how many jobs ``map`` keeps unfinished at once.
        heartbeat_interval_s: heartbeat interval of the embedded broker.
        keys: a keys folder (or ``ZFARM_KEYS``): connect with CURVE (docs/security.md).

    Raises:
        BrokerUnavailable: the broker did not answer within ``connect_timeout_s``.
    """

    def __init__(self, address: str | None = None, *, n_workers: int | None = None,
                 connect_timeout_s: float | None = None, broker_timeout_s: float | None = None,
                 window: int | None = None, heartbeat_interval_s: float | None = None,
                 keys: str | None = None) -> None:
        self._cluster: LocalCluster | None = None
        self.settings = resolve(ClientSettings, {
            "address": address, "connect_timeout_s": connect_timeout_s, "broker_timeout_s": broker_timeout_s,
            "window": window, "keys": keys})
        if address is None and not os.environ.get("ZFARM_ADDRESS"):
            self._cluster = LocalCluster(n_workers=n_workers, heartbeat_interval_s=heartbeat_interval_s)
            self.settings = dataclasses.replace(self.settings, address=self._cluster.address)
        self.id = f"c-{uuid.uuid4().hex[:12]}"
        self._seq = itertools.count(1)
        self._shutdown = False
        self._closed = False
        self._shutdown_lock = threading.Lock()
        self._futures: weakref.WeakSet[JobFuture] = weakref.WeakSet()  # pending ones stay referenced
        self._futures_lock = threading.Lock()
        self._context: zmq.Context[Any] = zmq.Context()
        self._connection = Connection(self.settings, self.id, self._context)
        self._connection.start()
        _LIVE_CLIENTS.add(self)
        if not self._connection.welcomed.wait(self.settings.connect_timeout_s):
            fatal, problem = self._connection.fatal, self._connection.handshake_problem
            self._close()
            if fatal is not None:
                raise fatal
            raise BrokerUnavailable(self.settings.address, self.settings.connect_timeout_s,
                                    problem or "no answer to our handshake")
        log.debug("client %s connected to %s", self.id, self.settings.address)

    @property
    def address(self) -> str:
        return self.settings.address

    @property
    def duplicates_dropped(self) -> int:
        """Results that arrived for jobs already resolved (their jobs ran twice)."""
        return self._connection.duplicates

    def stats(self) -> Stats:
        """Records of this client's finished jobs (the newest 100,000) and their summary.

        Each record says where and when the job ran: worker, host, times queued,
        started and finished (epoch seconds), run time, attempts, the slot's peak
        memory, the outcome and the first line of its error.
        """
        with self._connection.records_lock:
            records = list(self._connection.records)
        return Stats(records, summarize(records))

    # ---- Executor API ----------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker; return its future.

        Raises:
            RuntimeError: the client was shut down.
            PayloadTooLarge: the arguments are over the broker's message limit.
        """
        fn_id, blob = ser.dump_function(fn)
        job = self._job(fn_id, ser.dump_call(args, kwargs), len(blob))
        self._connection.submit(fn_id, blob, [job])
        return job.future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        """Like ``Executor.map``, but the inputs are read lazily within a bounded window.

        Work starts at once on the first window of jobs; the rest is submitted as
        results are consumed, so an endless generator runs in bounded memory.
        Results come in input order. An item whose job raised raises here, after the
        results before it. Leaving the loop early cancels the jobs still running.

        Args:
            timeout: seconds, from this call, after which a result not yet in raises TimeoutError.
            chunksize: items per job (default 1); larger chunks cost less per item.
            progress: show a progress bar on stderr (done/total, rate, time left).
        """
        total = known_length(*iterables) if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        size = max(1, chunksize or 1)
        fn_id, blob = ser.dump_function(fn)
        items = zip(*iterables, strict=False)  # like zip: stops at the shortest
        chunks = iter(lambda: list(itertools.islice(items, size)), [])
        pending: deque[JobFuture] = deque()
        self._fill(pending, chunks, fn_id, blob)
        results = self._map_results(pending, chunks, fn_id, blob, deadline)
        return track(results, total, f"map {getattr(fn, '__name__', 'fn')}") if progress else results

    def _fill(self, pending: deque[JobFuture], chunks: Iterator[list[tuple[Any, ...]]], fn_id: bytes,
              blob: Any) -> None:
        room = self.settings.window - len(pending)
        jobs = [self._job(fn_id, ser.dump_chunk(chunk), len(blob))
                for chunk in itertools.islice(chunks, max(0, room))]
        if jobs:
            self._connection.submit(fn_id, blob, jobs)
            pending.extend(job.future for job in jobs)

    def _map_results(self, pending: deque[JobFuture], chunks: Iterator[list[tuple[Any, ...]]], fn_id: bytes,
                     blob: Any, deadline: float | None) -> Iterator[Any]:
        try:
            while pending:
                future = pending[0]
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    values = future.result(remaining)
                except concurrent.futures.CancelledError:
                    raise
                except BaseException:
                    yield from future.partial or ()
                    raise
                pending.popleft()
                self._fill(pending, chunks, fn_id, blob)
                yield from values
        finally:
            for future in pending:
                future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the client (and its embedded farm).

        Args:
            wait: first wait for every unfinished job.
            cancel_futures: cancel the jobs that have not finished.
        """
        with self._shutdown_lock:
            if self._shutdown:
                return
            self._shutdown = True
        if cancel_futures:
            for future in self._unfinished():
                future.cancel()
        if wait:
            concurrent.futures.wait(self._unfinished())
            self._close()
        else:  # jobs go on; the connection closes when they are done
            threading.Thread(target=self._close_when_done, name=f"zfarm-close-{self.id}", daemon=True).start()

    def _unfinished(self) -> list[JobFuture]:
        with self._futures_lock:
            return [f for f in self._futures if not f.done()]

    def _close_when_done(self) -> None:
        concurrent.futures.wait(self._unfinished())
        self._close()

    def _close(self) -> None:
        with self._shutdown_lock:
            if self._closed:
                return
            self._closed = self._shutdown = True
        self._connection.close()
        self._context.term()
        if self._cluster is not None:
            self._cluster.stop()
        _LIVE_CLIENTS.discard(self)

    def _job(self, fn_id: bytes, frames: list[Any], fn_size: int) -> PendingJob:
        if self._shutdown:
            raise RuntimeError("cannot submit jobs after the client was shut down")
        if self._connection.fatal is not None:
            raise self._connection.fatal
        size = sum(memoryview(f).nbytes for f in frames)
        limit = self._connection.max_message_bytes - ENVELOPE_ALLOWANCE
        if self._connection.max_message_bytes and size + fn_size > limit:
            raise PayloadTooLarge(size + fn_size, limit, "this job's function and arguments")
        seq = next(self._seq)
        future = JobFuture(self._connection, seq)
        with self._futures_lock:
            self._futures.add(future)
        return PendingJob(seq, fn_id, frames, future, size)

    def __repr__(self) -> str:
        where = "embedded" if self._cluster else self.settings.address
        return f"<zfarm.Client {self.id} {where}{' shut down' if self._shutdown else ''}>"


def as_completed(futures: Iterable[concurrent.futures.Future[Any]], timeout: float | None = None,
                 progress: bool = False) -> Iterator[concurrent.futures.Future[Any]]:
    """Yield futures as they complete (``concurrent.futures.as_completed``), optionally with a bar."""
    futures = list(futures)
    done = concurrent.futures.as_completed(futures, timeout)
    return track(done, len(futures), "jobs") if progress else done


@atexit.register
def _close_all_clients() -> None:
    for client in list(_LIVE_CLIENTS):
        try:
            for future in client._unfinished():
                future.cancel()
            client._close()
        except Exception:  # at exit, one client's failure must not keep others' processes alive
            log.exception("could not close %r at exit", client)
