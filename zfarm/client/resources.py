"""What a client owns apart from itself: the ZeroMQ context, the I/O thread, the embedded farm.

Kept in ``_OPEN`` until closed, so that a client the program dropped is still closed: when its jobs
are done (from the client's finalizer), or at exit, as ``concurrent.futures`` does: wait for every
submitted job; Ctrl-C kills them.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import sys
import threading
import weakref
from typing import Any

import zmq

from zfarm.client.futures import JobFuture
from zfarm.client.mapping import MapRun
from zfarm.client.shell import IOThread
from zfarm.cluster.base import Cluster
from zfarm.config import ClientSettings

log = logging.getLogger(__name__)


class Resources:
    """What a client owns (context, I/O thread, embedded farm), apart from the client itself."""

    def __init__(self, context: zmq.Context[Any], connection: IOThread,
                 cluster: Cluster | None) -> None:
        self.context = context
        self.connection = connection
        self.cluster = cluster
        self._futures: weakref.WeakSet[JobFuture] = weakref.WeakSet()  # pending ones stay referenced
        self._maps: weakref.WeakSet[MapRun] = weakref.WeakSet()  # maps the program may still read
        # Re-entrant: the garbage collector may run the client's finalizer (close_when_done, which
        # takes this lock) in a thread that holds it already, while it walks the weak sets below.
        self._lock = threading.RLock()
        self._closed = False
        self._released = threading.Event()  # set once closed: the context ended and the farm stopped
        self.end_session = False  # on close, tell the broker to forget the session

    @classmethod
    def open(cls, settings: ClientSettings, client_id: str, cluster: Cluster | None) -> Resources:
        context: zmq.Context[Any] = zmq.Context()
        try:
            connection = IOThread(settings, client_id, context)
        except BaseException:
            _term(context)
            if cluster is not None:
                cluster.stop()
            raise
        res = cls(context, connection, cluster)
        _OPEN.add(res)
        connection.start()
        return res

    @property
    def closed(self) -> bool:
        return self._closed or self.connection.closed

    def track(self, future: JobFuture) -> None:
        with self._lock:
            self._futures.add(future)

    def track_map(self, run: MapRun) -> None:
        with self._lock:
            self._maps.add(run)

    def unfinished(self) -> list[JobFuture]:
        with self._lock:
            return [f for f in self._futures if not f.done()]

    def _live_maps(self) -> list[MapRun]:
        with self._lock:  # a map's own lock is taken outside ours: a filling map holds its, then takes ours
            maps = list(self._maps)
        return [run for run in maps if run.live]

    def complete_maps(self) -> None:
        """Submit what maps still being read have left, so they can be read to the end after close."""
        for run in self._live_maps():
            run.complete()

    def abandon_maps(self) -> None:
        """Maps still being read read no more input (a shutdown that cancels, or an exception)."""
        for run in self._live_maps():
            run.stop()

    def _on_io_thread(self) -> bool:
        return threading.current_thread() is self.connection

    def _first_to_close(self) -> bool:
        """Mark closed; True for the one caller that closes. Another waits until that one is done
        (but not on the I/O thread, which the first caller may be waiting for)."""
        with self._lock:
            closing = self._closed
            self._closed = True
        if closing and not self._on_io_thread():
            self._released.wait(RELEASE_WAIT_S)
        return not closing

    def detach(self) -> None:
        """Leave a session once the broker holds every job (DETACH_TIMEOUT_S at most)."""
        if self._first_to_close():
            self.connection.detach(DETACH_TIMEOUT_S)
            self._release()

    def close_when_done(self, block: bool = False, interrupted: bool = False) -> None:
        """Close once every job is done and no map is being read (in a thread of its own, or ``block``)."""
        if block:
            self.wait_for_jobs(interrupted)
            self.close()
        elif not self.unfinished() and not self._live_maps() and not self._on_io_thread():
            self.close()
        else:  # also from a done-callback: the I/O thread cannot close (join) itself
            name = f"zfarm-close-{self.connection.client_id}"
            closer = threading.Thread(target=self._close_later, name=name, daemon=True)
            closer.start()

    def _close_later(self) -> None:
        while not self._closed and (self.unfinished() or self._live_maps()):
            self.wait_a_while()
        self.close()

    def wait_a_while(self) -> None:
        """Wait for the unfinished jobs, at most CLOSER_POLL_S (so Ctrl-C and new maps are seen)."""
        concurrent.futures.wait(self.unfinished(), timeout=CLOSER_POLL_S)

    def wait_for_jobs(self, interrupted: bool = False) -> None:
        """Wait until every job is done. Ctrl-C says what we wait for; a second one kills the jobs.

        ``interrupted``: Ctrl-C was pressed already (it is why we are here).
        Raises:
            KeyboardInterrupt: the second Ctrl-C, once the jobs are killed and the client closed.
        """
        if self._on_io_thread():
            raise RuntimeError("a done-callback cannot wait for jobs: it runs on the client's I/O thread, "
                               "which settles them; use shutdown(wait=False) there")
        warned = interrupted
        if interrupted:
            self._say_waiting()
        stop = False
        while self.unfinished():
            try:
                self.wait_a_while()
            except KeyboardInterrupt:
                if warned:
                    stop = True
                    break
                warned = True
                self._say_waiting()
        if stop:  # raised here, outside the handler: one traceback, not two
            for future in self.unfinished():
                future.kill()
            self.close()
            raise KeyboardInterrupt

    def _say_waiting(self) -> None:
        if unfinished := len(self.unfinished()):
            sys.stderr.write(f"zfarm: waiting for {_jobs(unfinished)} (press Ctrl-C again to cancel them)\n")
            sys.stderr.flush()

    def close(self) -> None:
        """Close (once); a second caller waits until the first has stopped everything."""
        if not self._first_to_close():
            return
        if self._on_io_thread():  # a done-callback closing the client: done beside it, not by it
            threading.Thread(target=self._close_now, name=f"zfarm-close-{self.connection.client_id}",
                             daemon=True).start()
            return
        self._close_now()

    def _close_now(self) -> None:
        self.connection.close(end_session=self.end_session)
        self._release()

    def _release(self) -> None:
        try:
            _term(self.context)
            if self.cluster is not None:
                self.cluster.stop()
        finally:
            _OPEN.discard(self)
            self._released.set()


def _jobs(n: int) -> str:
    return f"{n} unfinished job{'' if n == 1 else 's'}"


def _term(context: zmq.Context[Any]) -> None:
    """Terminate a context within TERM_TIMEOUT_S: ``term`` blocks while any socket is open."""
    closer = threading.Thread(target=context.term, name="zfarm-context-term", daemon=True)
    closer.start()
    closer.join(TERM_TIMEOUT_S)
    if closer.is_alive():
        log.warning("a zfarm client's ZeroMQ context did not close within %.0f s: left to the exit",
                    TERM_TIMEOUT_S)


_OPEN: set[Resources] = set()
#: how long a session's client leaving waits for the broker to hold every job it submitted
DETACH_TIMEOUT_S = 10.0
#: how long closing the client's ZeroMQ context may take
TERM_TIMEOUT_S = 10.0
#: how long a second close waits for the first (closing the socket, the context, stopping the farm)
RELEASE_WAIT_S = DETACH_TIMEOUT_S + TERM_TIMEOUT_S + 15.0
#: how often a background close looks again for maps that finished
CLOSER_POLL_S = 0.5
#: at exit, say that we wait for unfinished jobs once they have taken this long
EXIT_NOTICE_S = 1.0


@atexit.register
def _close_all_clients() -> None:
    """At exit, as ``concurrent.futures`` does: wait for every submitted job; Ctrl-C kills them.

    A session's client leaves instead: its jobs go on at the broker, for a later run.
    """
    try:
        for res in list(_OPEN):
            try:
                if res.connection.settings.session:
                    res.detach()
                    continue
                concurrent.futures.wait(res.unfinished(), timeout=EXIT_NOTICE_S)
                if left := len(res.unfinished()):
                    sys.stderr.write(f"zfarm: waiting for {_jobs(left)} before exiting "
                                     "(Ctrl-C cancels them)\n")
                while res.unfinished():
                    res.wait_a_while()
                res.close()
            except KeyboardInterrupt:
                raise
            except Exception:  # at exit, one client's failure must not keep others' processes alive
                log.exception("could not close a zfarm client at exit")
    except KeyboardInterrupt:  # Ctrl-C at exit: stop at once
        for res in list(_OPEN):
            for future in res.unfinished():
                future.kill()
            res.close()
