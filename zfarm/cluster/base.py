"""``Cluster``: a broker, the workers launched for it, and the thread that keeps them alive.

::

    scale(n) / adapt(min, max) ──► target ──┐
                                            ▼
    supervisor thread (every 0.5 s): poll each launched worker ─ ended while wanted? ─► Restarts
        └─ launch the missing, retire the excess (idle first; SIGTERM drains: no job is lost)
    reporter thread (reporter.py), every 2 s: CLUSTER (what we launched) ─► the broker keeps it for
        `zfarm status` and the dashboard, and answers with its snapshot ─► which workers registered,
        which are idle, demand (status() shows it; wait_for_workers() waits for it, asking no more
        often). The supervisor never waits for the broker; the reporter never waits for a launch.
    close(): workers retire; then a last CLUSTER (leaving) so the broker forgets us at once

Subclasses say how to launch one worker (:meth:`Cluster._launch`, returning a :class:`Handle`)
and where the n-th one goes; everything else (supervision, back-off, adapt, close) is here.
All launches and stops happen on the supervisor thread, so a launcher's child processes have
one parent thread for their whole life.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from zfarm import protocol as p
from zfarm import scratch
from zfarm.cluster.adaptive import Adaptive
from zfarm.cluster.offer import offer_args, resources_text, tags_text
from zfarm.cluster.reporter import STATUS_EVERY_S, Reporter, cluster_report
from zfarm.cluster.spawn import Handle, make_keys, public_address, start_broker, stop_broker
from zfarm.cluster.supervision import Launched, Restarts, State, count_workers, excess, log_ended
from zfarm.config import check_endpoint
from zfarm.errors import BrokerUnavailable, ZfarmError

__all__ = ["STATUS_EVERY_S", "Cluster"]  # STATUS_EVERY_S: how often a cluster reports (reporter.py)

log = logging.getLogger("zfarm.cluster")

#: how often the supervisor looks at its workers
TICK_S = 0.5
#: after the grace, how long a kill of the workers still there may take before close gives up
KILL_WAIT_S = 5.0


class Cluster:
    """Workers launched and kept alive for one broker (started here, or given by ``address``).

    Args (shared by every launcher):
        address: use this running broker instead of starting one.
        bind: where the started broker listens (default: the launcher's choice).
        keys: a keys folder (CURVE): the broker, the workers and clients of this cluster use it.
        insecure: let the started broker listen beyond loopback without keys.
        journal: the started broker's journal file (docs/reliability.md).
        heartbeat_interval_s: the started broker's heartbeat interval.
        worker_grace_s: how long a retiring worker's running jobs may take before they are
            handed back.
        log_level: of the started broker and workers.
        resources: what each worker offers jobs, ``{"gpus": 1, "mem": "32G"}`` or
            ``"gpus=1,mem=32G"`` (its ``--resources``; default: its slots, its machine's memory
            and GPUs).
        tags: tags each worker offers jobs, ``{"bigmem"}`` or ``"bigmem,avx512"`` (its ``--tags``).
        name: how ``zfarm status`` and the dashboard name the cluster (a run profile's name).

    Raises:
        ConfigError: a bad endpoint, resource or tag (before anything starts).
    """

    kind = "cluster"
    #: workers connect over the network: without keys (or insecure), make keys for this cluster
    networked = False

    def __init__(self, *, address: str | None = None, bind: str | None = None, keys: str = "",
                 insecure: bool = False, journal: str = "", heartbeat_interval_s: float | None = None,
                 worker_grace_s: float = 30.0, log_level: str = "warning",
                 resources: Mapping[str, Any] | str | None = None, tags: Iterable[str] | str | None = None,
                 name: str = "") -> None:
        # first: a bad endpoint (a profile's too) is a usage error now, not a broker that never starts
        if address:
            check_endpoint(address)
        if bind:
            check_endpoint(bind, bind=True)
            bind = _with_a_port(bind)
        #: every launched worker's --resources and --tags, checked ("": none given)
        self.worker_resources, self.worker_tags = resources_text(resources), tags_text(tags)
        self._tmpdir = scratch.make_owned_dir(self.kind)  # (a killed cluster's is swept by the next)
        if not keys and self.networked and not insecure and not address:
            try:
                keys = make_keys(self._tmpdir)
            except BaseException:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                raise
        self.keys = os.path.abspath(keys) if keys else ""
        self.worker_grace_s = worker_grace_s
        self.log_level = log_level
        self.heartbeat_interval_s = heartbeat_interval_s
        #: how the broker lists this cluster: unique to this object; ``name``: a run profile's, or ""
        self.cluster_id = f"{self.kind}-{uuid.uuid4().hex[:6]}"
        self.name = name
        self.slots_per_worker = 1
        self.restarts = Restarts()
        self._records: list[Launched] = []
        self._target = 0
        self._adaptive: Adaptive | None = None
        self._next_adapt = 0.0
        self._snapshot: dict[str, Any] = {}
        self._broker_answered: bool | None = None  # the last report got the snapshot (None: none yet)
        self._reporter: Reporter | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when the broker's view came in
        self._wake = threading.Event()
        self._closing = False
        self._give_up_at = 0.0  # closing: workers still there then are killed (monotonic)
        self._thread: threading.Thread | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self._broker_said = False
        if address:
            self.address = address
        else:
            try:
                self.address = self._start_broker(bind or self._default_bind(), insecure, journal)
            except BaseException:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                raise

    # ---- what subclasses provide -------------------------------------------------------------

    def _default_bind(self) -> str:
        raise NotImplementedError

    def _place(self, index: int) -> tuple[str, str]:
        """``(name, where)`` of the ``index``-th worker slot (0-based, never reused)."""
        raise NotImplementedError

    def _launch(self, worker: Launched) -> Handle:
        """Start ``worker`` (its ``worker_id`` is set); raise ZfarmError/OSError if it cannot start."""
        raise NotImplementedError

    def _refresh(self) -> None:
        """Once per supervisor tick, before handles are asked (e.g. one ``squeue`` for all jobs)."""

    def _cleanup(self) -> None:
        """After every worker ended: remove what the launcher left (files, connections)."""

    def offer_args(self) -> list[str]:
        """``--resources``/``--tags`` for each worker launched (none if the cluster was given none)."""
        return offer_args(self.worker_resources, self.worker_tags)

    # ---- public interface ---------------------------------------------------------------------

    def scale(self, n: int) -> None:
        """Keep ``n`` workers: launch the missing, retire the excess (their jobs are handed back)."""
        if n < 0:
            raise ValueError(f"cannot scale to {n} workers")
        with self._lock:
            self._adaptive = None
            self._target = n
            for w in self._records:
                if w.state is State.FAILED:  # given up on: try again
                    w.state, w.quick_deaths, w.restart_at = State.WAITING, 0, 0.0
        self._wake.set()

    def adapt(self, minimum: int = 0, maximum: int = 8, **tuning: Any) -> Adaptive:
        """Follow the queue's demand between ``minimum`` and ``maximum`` workers (``scale`` stops it).

        ``tuning`` sets :class:`Adaptive`'s other fields (their defaults are there): it grows at
        once toward the work queued and running (cleared in ``target_duration_s`` at the measured
        run time), by at most ``max_step`` workers every ``interval_s``; shrinks after
        ``wait_count`` decisions in a row wanted fewer, retiring idle workers only.

        Raises:
            ConfigError: impossible bounds or tuning.
            TypeError: a keyword that is not a field of :class:`Adaptive`.
        """
        policy = Adaptive(minimum, maximum, **tuning)
        with self._lock:
            self._adaptive = policy
            self._target = max(minimum, min(maximum, self._target))
            self._next_adapt = 0.0
        self._wake.set()
        return policy

    @property
    def workers(self) -> list[dict[str, Any]]:
        """What was launched: name, worker id, where, state, launches, how it ended last."""
        with self._lock:
            return [w.view() for w in self._records]

    def status(self) -> dict[str, Any]:
        """The cluster's own view: requested, launched, running, coming (of them: pending in a batch
        system) workers, and under ``broker`` the broker's snapshot as the last report read it,
        every 2 s (None: it did not answer, or was not asked yet)."""
        with self._lock:
            broker = self._snapshot if self._broker_answered else None
            asked = self._broker_answered is not None
            adapt = self._adaptive
            return {"id": self.cluster_id, "name": self.name, "launcher": self.kind, "address": self.address,
                    **self._counts(), "adaptive": adapt is not None,
                    "adapt": {"minimum": adapt.minimum, "maximum": adapt.maximum} if adapt else None,
                    "workers": [w.view() for w in self._records], "broker": broker, "broker_asked": asked}

    def _counts(self) -> dict[str, int]:
        return count_workers(self._records, self._target)  # (under the lock)

    def wait_for_workers(self, n: int, timeout_s: float = 60.0) -> None:
        """Block until ``n`` workers registered with the broker.

        Raises:
            BrokerUnavailable: they did not within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        if self._reporter is not None:
            self._reporter.soon()  # one look now; then at the reporter's pace
        with self._changed:
            while sum(w.state is State.RUNNING for w in self._records) < n:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    raise BrokerUnavailable(self.address, timeout_s, f"fewer than {n} workers registered: "
                                            f"{[w.view() for w in self._records]}")
                self._changed.wait(remaining_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Retire every worker (jobs handed back), stop the broker this cluster started."""
        grace = self.worker_grace_s + 5.0 if timeout_s is None else timeout_s
        with self._lock:
            if self._closing:
                return
            self._adaptive = None
            self._target = 0
            self._closing = True
            # one deadline for the supervisor and for us: it kills what is left then, and cleans up
            # (cancels batch jobs, removes key files) before we stop waiting for it
            self._give_up_at = time.monotonic() + grace
        self._wake.set()
        if self._thread is not None:
            self._thread.join(grace + 2 * KILL_WAIT_S + 5.0)
        self._stop_broker()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        log.info("%s cluster at %s closed", self.kind, self.address)

    stop = close  # the name the embedded farm's owner uses

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.status()
        return (f"<{type(self).__name__} {self.address}: {s['running']} running, {s['coming']} coming, "
                f"{s['requested']} requested>")

    # ---- the broker -----------------------------------------------------------------------------

    def _start_broker(self, bind: str, insecure: bool, journal: str) -> str:
        self.broker = start_broker(bind, self.keys, insecure, journal, self.log_level,
                                   self.heartbeat_interval_s)
        return public_address(bind)

    def _stop_broker(self) -> None:
        stop_broker(self.broker)

    def _abandon(self) -> None:
        """Undo a subclass's ``__init__`` that failed after the broker started: stop it, remove the
        folder (no one will call :meth:`close` on an object that was never made)."""
        self._stop_broker()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _begin(self, n: int) -> None:
        """Start supervising with ``n`` workers wanted (the last line of a subclass's ``__init__``)."""
        self._target = n
        self._reporter = Reporter(self.address, self.keys, self.kind, self._report, self._heard)
        self._thread = threading.Thread(target=self._supervise, name=f"zfarm-{self.kind}-cluster",
                                        daemon=True)
        self._thread.start()
        self._reporter.start()
        _OPEN.add(self)

    # ---- the supervisor thread --------------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            now = time.monotonic()
            try:
                self._check_broker()
                self._refresh()
                self._reap(now)
                self._reconcile(now)
            except Exception:  # the supervisor must outlive any one launcher's surprise
                log.exception("%s cluster: supervision step failed", self.kind)
            with self._lock:
                closing = self._closing
                live = [w for w in self._records if w.handle is not None]
            if closing:
                if not live:
                    break
                if now >= self._give_up_at:
                    for w in live:
                        log.warning("%s did not leave in time: killing it", w.name)
                        with contextlib.suppress(Exception):
                            w.handle.kill()
                    self._give_up_at = now + KILL_WAIT_S  # then once more, in case a kill was lost
            self._wake.wait(TICK_S)
            self._wake.clear()
        if self._reporter is not None:
            self._reporter.close()  # the broker forgets us now, not a few rounds later
        try:
            self._cleanup()
        except Exception:
            log.exception("%s cluster: cleanup failed", self.kind)

    def _check_broker(self) -> None:
        if self.broker is None or self._broker_said or self._closing:
            return
        code = self.broker.poll()
        if code is not None:
            self._broker_said = True
            log.error("the broker this %s cluster started exited (code %s; its log says why): workers "
                      "will wait for it in vain; close the cluster", self.kind, code)

    def _reap(self, now: float) -> None:
        with self._lock:
            launched = [(w, w.handle) for w in self._records if w.handle is not None]
        # asked outside the lock: an ssh handle joins its output thread, a Slurm job reads a file
        answers = [(w, handle, handle.ended(), handle.pending()) for w, handle in launched]
        with self._lock:
            for w, handle, how, pending in answers:
                if w.handle is not handle:
                    continue
                if how is None:
                    if w.state is State.PENDING and not pending:
                        w.state = State.STARTING
                    continue
                wanted = w.state is not State.RETIRING and not self._closing
                self.restarts.ended(w, how, now, wanted)
                log_ended(w, how, now)

    def _report(self, leaving: bool) -> p.ClusterReport:
        """What the broker is told about us (on the reporter's thread)."""
        with self._lock:
            adapt = [self._adaptive.minimum, self._adaptive.maximum] if self._adaptive else []
            return cluster_report(self.cluster_id, self.name, self.kind, self._counts(), adapt, leaving)

    def _heard(self, snapshot: dict[str, Any] | None) -> None:
        """The broker's answer to a report (None: it did not answer): which launched workers
        registered, which are idle, and the demand. On the reporter's thread."""
        now = time.monotonic()
        if snapshot is None:
            with self._lock:
                self._broker_answered = False
            return
        registered = {w["id"] for w in snapshot.get("workers", [])}
        adapted = False
        with self._changed:
            self._snapshot, self._broker_answered = snapshot, True
            for w in self._records:
                if w.state is State.STARTING and w.worker_id in registered:
                    w.state = State.RUNNING
                    w.quick_deaths = 0
            self._changed.notify_all()  # wait_for_workers looks again
            if self._adaptive is not None and not self._closing and now >= self._next_adapt:
                self._next_adapt = now + self._adaptive.interval_s
                target = self._adaptive.decide(snapshot, self.slots_per_worker, self._target)
                if target != self._target:
                    log.info("%s cluster adapts: %d -> %d workers (queued %s, in flight %s)", self.kind,
                             self._target, target, snapshot.get("queued"), snapshot.get("in_flight"))
                    self._target, adapted = target, True
        if adapted:
            self._wake.set()  # the supervisor launches or retires now

    def _reconcile(self, now: float) -> None:
        to_launch: list[Launched] = []
        to_retire: list[Launched] = []
        with self._lock:
            wanted = [w for w in self._records if w.state not in (State.RETIRING, State.STOPPED)]
            missing = self._target - len(wanted)
            for _ in range(max(0, missing)):
                name, where = self._place(len(self._records))
                w = Launched(name, where, State.WAITING)
                self._records.append(w)
                wanted.append(w)
            if missing < 0:
                to_retire = self._excess(wanted, -missing)
            to_launch = [w for w in wanted if w not in to_retire and self.restarts.due(w, now)]
        for w in to_retire:
            self._retire(w)
        for w in to_launch:
            self._start(w, now)

    def _excess(self, wanted: list[Launched], count: int) -> list[Launched]:
        busy = {w["id"] for w in self._snapshot.get("workers", []) if w.get("busy")}
        return excess(wanted, count, busy, keep_busy=self._adaptive is not None)  # adapt never sends one away

    def _retire(self, w: Launched) -> None:
        with self._lock:
            if w.handle is None:
                w.state = State.STOPPED
                return
            w.state = State.RETIRING
        log.info("retiring %s (%s)", w.name, w.where)
        try:
            w.handle.retire()
        except Exception as exc:
            log.warning("could not retire %s gracefully (%s): killing it", w.name, exc)
            with contextlib.suppress(Exception):
                w.handle.kill()

    def _start(self, w: Launched, now: float) -> None:
        with self._lock:
            if self._closing:
                return
            w.launches += 1
            w.worker_id = f"{w.name}.{w.launches}"
            w.started_at = now
            w.state = State.STARTING
        try:
            handle = self._launch(w)
        except (ZfarmError, OSError, subprocess.SubprocessError) as exc:
            with self._lock:
                self.restarts.ended(w, f"could not launch: {exc}", now, wanted=True)
            log.warning("%s (%s) could not launch: %s", w.name, w.where, exc)
            return
        with self._lock:
            w.handle = handle
            if handle.pending():
                w.state = State.PENDING
        log.info("launched %s (%s) as worker %s", w.name, w.where, w.worker_id)


_OPEN: weakref.WeakSet[Cluster] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Close clusters the program left open, so no worker outlives it (nor a batch job stays queued)."""
    for cluster in list(_OPEN):
        with contextlib.suppress(Exception):
            cluster.close(timeout_s=10.0)


def _with_a_port(bind: str) -> str:
    """A TCP bind asking for any free port (``*`` or ``0``) given one now: the workers launched must be
    told where the broker listens, and a broker's log is not where a cluster reads it."""
    scheme, _, rest = bind.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or port not in ("*", "0"):
        return bind
    from zfarm.local import free_tcp_endpoint

    return free_tcp_endpoint(host)
