"""``zfarm.Client``: a ``concurrent.futures.Executor`` whose jobs run on a farm.

::

    Client.submit / map ──pickle in the caller's thread──► IOThread (I/O thread) ──SUBMIT──► broker
          ▲                                                        │
          └──────────── futures resolve as RESULT messages arrive ◄┘

``Client()`` with no address starts an embedded broker and workers on this
machine (a :class:`zfarm.cluster.LocalCluster`); ``Client("tcp://host:5555")`` uses a farm,
``Client(cluster)`` a cluster's, ``Client(profile="NAME")`` a run profile's (docs/clusters.md).
The same code runs on both.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import zmq

from zfarm import (
    projects,  # (as a module: zfarm.projects imports the client package)
    scatter,
)
from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.client.core import PendingJob
from zfarm.client.futures import JobFuture
from zfarm.client.mapping import ChunkJobs, start_map
from zfarm.client.resources import Resources
from zfarm.cluster.base import Cluster
from zfarm.commands import CommandResult, CommandSpec, echo_output, run_command
from zfarm.config import ClientSettings, check_positive, resolve
from zfarm.errors import BrokerUnavailable, ConfigError, PayloadTooLarge
from zfarm.progress import track
from zfarm.scatter import Scattered
from zfarm.stats import Stats, summarize

log = logging.getLogger(__name__)

#: functions bundled with scattered objects kept ready to send (each holds the objects' bytes)
BUNDLES_KEPT = 8

class Client(concurrent.futures.Executor):
    """Run Python functions on a zfarm broker's workers.

    Args:
        address: the broker's endpoint (``tcp://host:5555``), or a cluster (``zfarm.SSHCluster``...:
            its broker and keys; the cluster stays yours to close). None: ``ZFARM_ADDRESS`` if set,
            else a local broker and ``n_workers`` workers that stop with this client.
        n_workers: workers of the embedded farm (default: one per CPU).
        connect_timeout_s: how long to wait for the broker's first answer.
        broker_timeout_s: how long unfinished jobs wait for a silent broker.
        window: how many jobs ``map`` keeps unfinished at once.
        heartbeat_interval_s: heartbeat interval of the embedded broker.
        keys: a keys folder (or ``ZFARM_KEYS``): connect with CURVE (docs/security.md).
        key_name: which of the folder's client keys to use (default: the only one).
        job_timeout_s: default time limit of each job (see ``map``); None: no limit.
        mem_limit: default memory limit of each job's slot, bytes; None: no limit.
        retries: default number of re-runs of a job whose function raised (default 0).
        retry_backoff_s: the first wait before such a re-run (doubling, up to 30 s).
        session: a name (or ``ZFARM_SESSION``): the broker keeps this client's jobs running and
            their results while the client is away, and a client that comes back under the
            same name and submits the same jobs in the same order collects them instead of
            running them again (docs/reliability.md). One process per session at a time.
        echo_output: print what each job printed (its stdout and stderr, captured on the
            worker) here as its result arrives, each line prefixed with the job's id.
        profile: a run profile's name in ``zfarm.toml``: start its broker and workers, which stop
            with this client (docs/clusters.md).

    Raises:
        BrokerUnavailable: the broker did not answer within ``connect_timeout_s``.
    """

    def __init__(self, address: str | Cluster | None = None, *, n_workers: int | None = None,
                 connect_timeout_s: float | None = None, broker_timeout_s: float | None = None,
                 window: int | None = None, heartbeat_interval_s: float | None = None,
                 keys: str | None = None, key_name: str | None = None, job_timeout_s: float | None = None,
                 mem_limit: int | None = None, retries: int | None = None,
                 retry_backoff_s: float | None = None, session: str | None = None,
                 echo_output: bool = False, profile: str | None = None) -> None:
        self._options = job_options(job_timeout_s, mem_limit, retries)  # checked before any farm starts
        cluster, address, keys = _farm(address, profile, keys)
        try:
            self.settings = resolve(ClientSettings, {
                "address": address, "connect_timeout_s": connect_timeout_s,
                "broker_timeout_s": broker_timeout_s, "window": window, "keys": keys, "key_name": key_name,
                "retry_backoff_s": retry_backoff_s, "session": session})
        except BaseException:
            if cluster is not None:  # the profile's farm started for this client: stop it again
                cluster.close()
            raise
        self.session = self.settings.session
        # A session's id is its name, so the broker knows it again; job numbers then repeat in a rerun.
        self.id = f"s-{self.session}" if self.session else f"c-{uuid.uuid4().hex[:12]}"
        self._echo_output = echo_output
        self._seq = itertools.count(1)
        #: functions bundled with scattered objects, by function and objects (built once, newest last)
        self._bundles: dict[tuple[bytes, ...], tuple[bytes, bytes]] = {}
        self._bundles_lock = threading.Lock()
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        if cluster is None and address is None and not os.environ.get("ZFARM_ADDRESS"):
            from zfarm.cluster.local import LocalCluster

            cluster = LocalCluster(n_workers=n_workers or None, heartbeat_interval_s=heartbeat_interval_s,
                                   keys=self.settings.keys, worker_grace_s=2.0)
            self.settings = dataclasses.replace(self.settings, address=cluster.address)
        self._res = Resources.open(self.settings, self.id, cluster)
        self._connection = self._res.connection
        # A client dropped without shutdown() closes once its jobs are done; at exit, at once.
        weakref.finalize(self, self._res.close_when_done).atexit = False
        # woken by a WELCOME, a fatal error, or a handshake the broker refused (keys: it will not change)
        self._connection.welcomed.wait(self.settings.connect_timeout_s)
        if not self._connection.core.welcomed or self._connection.fatal is not None:
            fatal, problem = self._connection.fatal, self._connection.handshake_problem
            self._res.close()
            if isinstance(fatal, zmq.ZMQError):  # the address passed our checks, yet ZeroMQ refused it
                raise ConfigError(f"cannot connect to {self.settings.address!r}: {fatal}; use tcp://HOST:PORT"
                                  " (for example tcp://127.0.0.1:5555) or ipc:///path") from fatal
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
        return self._connection.core.duplicates

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
        return self._submit(fn, args, kwargs, self._options)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                options: dict[str, Any]) -> concurrent.futures.Future[Any]:
        fn_id, blob = ser.dump_function(fn)
        args, kwargs, after = projects.upstream_arguments(args, kwargs, self._connection)
        if after:  # it runs when these jobs have succeeded, with their results in their futures' places
            options = {**options, "after": after}
        try:
            with scatter.collecting() as used:
                frames = ser.dump_call(args, kwargs)
            fn_id, blob = self._with_scattered(fn_id, blob, used)
            job = self._job(fn_id, frames, len(blob), options)
            self._connection.submit(fn_id, blob, [job])
        except BaseException:
            if after:  # never submitted: its upstream results need not stay held for it
                self._connection.unpin(after)
            raise
        return job.future

    def scatter(self, obj: Any) -> Scattered:
        """Send ``obj`` to the workers once; return a handle to pass to jobs in its place.

        The handle works as an argument of ``submit``, ``map`` and ``with_options`` jobs, and inside
        lists, dicts or other objects they get; in the job it is ``obj``. Its bytes go with the
        job's function, which the broker and every worker cache: a 200 MB array used by 1,000 jobs
        crosses the network once per worker, not 1,000 times (docs/performance.md).

        Raises:
            PayloadTooLarge: (at submit) the object and the function are over the broker's limit.
        """
        return Scattered(obj)

    def _with_scattered(self, fn_id: bytes, blob: bytes, used: dict[bytes, Scattered]) -> tuple[bytes, bytes]:
        """The function to send with jobs that use scattered objects: it carries their bytes."""
        if not used:
            return fn_id, blob
        key = (fn_id, *sorted(used))
        with self._bundles_lock:
            if (made := self._bundles.get(key)) is None:
                made = self._bundles[key] = scatter.bundle(fn_id, blob, used)
                while len(self._bundles) > BUNDLES_KEPT:
                    del self._bundles[next(iter(self._bundles))]
        return made

    def run(self, args: str | Sequence[str | os.PathLike[str]], *, shell: bool = False,
            cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
            check: bool = True, input: str | bytes | None = None) -> concurrent.futures.Future[CommandResult]:
        """Run a command on a worker, as ``subprocess.run`` would there; return a future of its result.

        The future gives a :class:`zfarm.CommandResult` (``returncode``, ``stdout``, ``stderr`` as
        text, ``run_s``, ``worker``, ``host``). A command job is a function job (docs/batch.md):
        the client's limits, retries, cancel, sessions and the journal apply to it.

        Args:
            args: the program and its arguments, or one shell line with ``shell=True``.
            cwd: the folder to run it in, on the worker (default: the worker's).
            env: variables added to the worker's environment for it.
            check: a non-zero exit raises :class:`zfarm.CommandFailed` (with the code, the signal,
                the end of its stderr, and the result itself).
            input: sent to its standard input (default: none, stdin is /dev/null).

        Raises:
            ConfigError: no arguments, or one string without ``shell=True`` (here, at once).
            CommandNotFound: (from the future) the program does not exist on the worker's machine.
        """
        return self._run(args, shell, cwd, env, check, input, self._options)

    def _run(self, args: str | Sequence[str | os.PathLike[str]], shell: bool,
             cwd: str | os.PathLike[str] | None, env: Mapping[str, str] | None, check: bool,
             input: str | bytes | None, options: dict[str, Any]) -> concurrent.futures.Future[CommandResult]:
        spec = CommandSpec.of(args, shell=shell, cwd=cwd, env=env, check=check, input=input)
        return self._submit(run_command, (spec,), {}, options)

    def run_many(self, commands: Iterable[str | Sequence[str]], *, shell: bool = False,
                 cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                 check: bool = True, timeout: float | None = None,
                 progress: bool = False) -> Iterator[CommandResult]:
        """Run many commands, read lazily, as ``map`` runs a function: results in input order.

        The commands are read a window ahead of the results, so a generator of a million
        commands runs in bounded memory. Arguments as :meth:`run`; ``timeout`` and ``progress``
        as :meth:`map`. With ``check=True`` the first failed command raises here, after the
        results before it.
        """
        specs = (CommandSpec.of(c, shell=shell, cwd=cwd, env=env, check=check) for c in commands)
        return self._map(run_command, (specs,), timeout, None, progress, self._options)

    def with_options(self, *, job_timeout_s: float | None = None, mem_limit: int | None = None,
                     retries: int | None = None, resources: Mapping[str, Any] | None = None,
                     tags: Iterable[str] | None = None) -> JobLimits:
        """``submit`` and ``map`` with limits and retries for these jobs only (they override the client's).

        ``resources`` ({"gpus": 1, "mem": "4G", "cpus": 2}) and ``tags`` ({"avx512"}): the broker places
        these jobs only on a worker with that much free and those tags (see docs/projects.md).

        >>> client.with_options(job_timeout_s=60, mem_limit=2 * 2**30, retries=2).submit(simulate, params)
        """
        return JobLimits(self, {**self._options, **job_options(job_timeout_s, mem_limit, retries),
                                **projects.request_options(resources, tags)})

    def project(self, name: str, *, priority: int = 0, share: float = 1.0, on_error: str = "continue",
                resources: Mapping[str, Any] | None = None, tags: Iterable[str] | None = None,
                max_running: int | None = None) -> projects.Project:
        """A :class:`zfarm.Project`: an Executor whose jobs belong to project ``name`` at the broker.

        ``priority``: higher goes first; ``share``: its part of the slots among equal priorities;
        ``on_error``: "continue", "suspend" (at the first failed job) or "cancel" (the rest);
        ``resources``/``tags``: what each of its jobs asks of a worker; ``max_running``: at most this
        many of its jobs run at once. See docs/projects.md.
        """
        return projects.Project(self, name, priority=priority, share=share, on_error=on_error,
                                resources=resources, tags=tags, max_running=max_running)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False, job_timeout_s: float | None = None,
            mem_limit: int | None = None, retries: int | None = None) -> Iterator[Any]:
        """Like ``Executor.map``, but the inputs are read lazily within a bounded window.

        Work starts at once on the first window of jobs; the rest is submitted as
        results are consumed, so an endless generator runs in bounded memory.
        Results come in input order. An item whose job raised raises here, after the
        results before it. Leaving the loop early cancels the jobs still running.

        Args:
            timeout: seconds, from this call, after which a result not yet in raises TimeoutError.
            chunksize: items per job. Default: adaptive, from the jobs' observed run time
                (see docs/performance.md); 1 sends every item as its own job. In a session the
                default is 1, so that a rerun cuts the input into the same jobs.
            progress: show a progress bar on stderr (done/total, rate, time left).
            job_timeout_s: the longest one item may run (a chunk of n items gets n times this);
                past it the job is killed and raises JobTimeout.
            mem_limit: bytes of resident memory a job's slot may reach before it is killed
                (MemoryLimitExceeded).
            retries: how many more times a job whose function raised is run (after 1, 2, 4 … s);
                crashes, time-outs and memory limits are not retried.
        """
        options = {**self._options, **job_options(job_timeout_s, mem_limit, retries)}
        return self._map(fn, iterables, timeout, chunksize, progress, options)

    def _map(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], timeout: float | None,
             chunksize: int | None, progress: bool, options: dict[str, Any]) -> Iterator[Any]:
        if self._shutdown:
            raise RuntimeError("cannot start a map after the client was shut down")
        jobs = ChunkJobs(self._connection, options, functools.partial(self._job, in_map=True),
                         self._with_scattered)
        return start_map(jobs, fn, iterables, self.settings.window, self._res.track_map, timeout=timeout,
                         chunksize=chunksize, progress=progress, session=bool(self.session))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the client (and its embedded farm), as ``Executor.shutdown`` does.

        Args:
            wait: first wait for every unfinished job (and run a ``map`` still being read to its
                end, keeping its results for the reader). Ctrl-C while waiting says what it waits
                for; a second Ctrl-C kills the jobs and raises KeyboardInterrupt. ``wait=False``
                returns at once: the jobs go on, and maps started before still yield every result.
                In a session, ``wait=False`` leaves at once: the broker runs the jobs and keeps
                their results for a later client of the session.
            cancel_futures: cancel the jobs that have not started (running ones finish, as in
                ``concurrent.futures``; :meth:`cancel` with ``force=True`` kills them). In a
                session, end it instead: the broker drops whatever it still runs or holds for it.
        """
        with self._shutdown_lock:
            if self._shutdown:
                return
            self._shutdown = True
        self._finish(wait, cancel_futures)

    def cancel(self, futures: Iterable[concurrent.futures.Future[Any]] | None = None, *,
               force: bool = False) -> int:
        """Cancel jobs; return how many were cancelled.

        Args:
            futures: this client's futures (default: every unfinished one).
            force: also kill jobs that already run on a worker (and every process they started);
                without it, as ``Future.cancel``, only jobs that have not started are cancelled.
        """
        chosen = self._res.unfinished() if futures is None else list(futures)
        return sum(f.kill() if force and isinstance(f, JobFuture) else f.cancel() for f in chosen)

    def _finish(self, wait: bool, cancel_futures: bool, interrupted: bool = False,
                failed: bool = False) -> None:
        """``failed``: leaving a ``with`` block by an exception: maps read no more input."""
        if cancel_futures or failed or interrupted:
            self._res.abandon_maps()
        if cancel_futures:
            self.cancel(force=bool(self.session))
            self._res.end_session = bool(self.session)
        if self.session and not wait and not cancel_futures:
            self._res.detach()
        elif wait:
            if not (cancel_futures or failed or interrupted):
                self._res.complete_maps()
            self._res.close_when_done(block=True, interrupted=interrupted)
        else:  # jobs (and maps being read) go on; the connection closes when they are done
            self._res.close_when_done()

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        """Leaving a ``with`` block waits for the jobs; a session left by an exception leaves them.

        Left by Ctrl-C, it says how many jobs it waits for; Ctrl-C again kills them, and the
        first KeyboardInterrupt goes on alone (no second traceback).
        """
        with self._shutdown_lock:
            if self._shutdown:
                return False
            self._shutdown = True
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        try:
            self._finish(wait=not (self.session and exc_type is not None), cancel_futures=False,
                         interrupted=interrupted, failed=exc_type is not None)
        except KeyboardInterrupt:
            if not interrupted:
                raise
        return False

    def _job(self, fn_id: bytes, frames: list[Any], fn_size: int, options: dict[str, Any],
             in_map: bool = False) -> PendingJob:
        if (self._shutdown and not in_map) or self._res.closed:
            raise RuntimeError("cannot submit jobs after the client was shut down (or closed at exit)")
        if self._connection.fatal is not None:
            raise self._connection.fatal
        size = sum(memoryview(f).nbytes for f in frames)
        limit = p.payload_limit(self._connection.core.max_message_bytes)
        if limit is not None and size + fn_size > limit:
            raise PayloadTooLarge(size + fn_size, limit, "this job's function and arguments")
        seq = next(self._seq)
        future = JobFuture(self._connection, seq)
        if self._echo_output:
            future.add_done_callback(functools.partial(echo_output, f"{self.id}:{seq}"))
        self._res.track(future)
        wire = {k: v for k, v in options.items() if k != "retries"}  # retrying is the client's business
        return PendingJob(seq, fn_id, frames, future, size, options=wire, retries=options.get("retries", 0))

    def _number_spent(self, value: Any) -> concurrent.futures.Future[Any]:
        """Use up a job number without a job: a future already resolved to ``value``. A session's job
        numbers must stay where they were (an array's cancelled job keeps its place: zfarm/batch.py)."""
        self._connection.skip([next(self._seq)])  # (the I/O thread counts it as posted)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(value)
        return future

    def __repr__(self) -> str:
        where = "embedded" if self._res.cluster else self.settings.address
        return f"<zfarm.Client {self.id} {where}{' shut down' if self._shutdown else ''}>"


def as_completed(futures: Iterable[concurrent.futures.Future[Any]], timeout: float | None = None,
                 progress: bool = False) -> Iterator[concurrent.futures.Future[Any]]:
    """Yield futures as they complete (``concurrent.futures.as_completed``), optionally with a bar."""
    futures = list(futures)
    done = concurrent.futures.as_completed(futures, timeout)
    return track(done, len(futures), "jobs") if progress else done


def job_options(job_timeout_s: float | None, mem_limit: int | None,
                retries: int | None = None) -> dict[str, Any]:
    """A job's options (only those set): limits for its worker, retries for the client.

    Raises:
        ConfigError: a limit that is not a positive number, or negative retries.
    """
    options: dict[str, Any] = {}
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be a whole number of at least 0, not {retries!r}")
        options["retries"] = retries
    for name, value in (("timeout_s", job_timeout_s), ("mem_limit", mem_limit)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a positive number, not {value!r}")
        check_positive(**{name: value})
        options[name] = value
    return options


class JobLimits:
    """``submit``, ``map`` and ``run`` of a client, with job limits (from :meth:`Client.with_options`).

    ``options`` may be a function, called for each submission (a project's: its phase then).
    """

    def __init__(self, client: Client, options: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        self._client = client
        self._options = options

    def options(self) -> dict[str, Any]:
        """The options of a job submitted now."""
        return self._options() if callable(self._options) else self._options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self._client._submit(fn, args, kwargs, self.options())

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        return self._client._map(fn, iterables, timeout, chunksize, progress, self.options())

    def run(self, args: str | Sequence[str | os.PathLike[str]], *, shell: bool = False,
            cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
            check: bool = True, input: str | bytes | None = None) -> concurrent.futures.Future[CommandResult]:
        return self._client._run(args, shell, cwd, env, check, input, self.options())


def _farm(address: str | Cluster | None, profile: str | None,
          keys: str | None) -> tuple[Cluster | None, str | None, str | None]:
    """``(cluster this client owns, address, keys)`` from ``Client``'s first arguments."""
    if isinstance(address, Cluster):
        if profile:
            raise ConfigError("pass a cluster or a profile, not both")
        return None, address.address, keys or address.keys or None  # the caller owns the cluster
    if profile:
        if address:
            raise ConfigError("pass an address or a profile, not both")
        from zfarm.cluster.profile import start_profile

        cluster = start_profile(profile)
        return cluster, cluster.address, keys or cluster.keys or None
    return None, address, keys
