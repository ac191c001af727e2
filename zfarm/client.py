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
import functools
import itertools
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import zmq

from zfarm import serialization as ser
from zfarm.commands import CommandResult, CommandSpec, echo_output, run_command
from zfarm.config import ClientSettings, check_positive, resolve
from zfarm.connection import Connection, JobFuture, PendingJob, cancel_future
from zfarm.errors import BrokerUnavailable, ConfigError, PayloadTooLarge
from zfarm.local import LocalCluster
from zfarm.mapping import MapRun, Submitted
from zfarm.progress import known_length, track
from zfarm.projects import Project, request_options, upstream_arguments
from zfarm.stats import Stats, summarize
from zfarm.worker import ENVELOPE_ALLOWANCE

log = logging.getLogger(__name__)

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

    Raises:
        BrokerUnavailable: the broker did not answer within ``connect_timeout_s``.
    """

    def __init__(self, address: str | None = None, *, n_workers: int | None = None,
                 connect_timeout_s: float | None = None, broker_timeout_s: float | None = None,
                 window: int | None = None, heartbeat_interval_s: float | None = None,
                 keys: str | None = None, key_name: str | None = None, job_timeout_s: float | None = None,
                 mem_limit: int | None = None, retries: int | None = None,
                 retry_backoff_s: float | None = None, session: str | None = None,
                 echo_output: bool = False) -> None:
        self.settings = resolve(ClientSettings, {
            "address": address, "connect_timeout_s": connect_timeout_s, "broker_timeout_s": broker_timeout_s,
            "window": window, "keys": keys, "key_name": key_name, "retry_backoff_s": retry_backoff_s,
            "session": session})
        self.session = self.settings.session
        # A session's id is its name, so the broker knows it again; job numbers then repeat in a rerun.
        self.id = f"s-{self.session}" if self.session else f"c-{uuid.uuid4().hex[:12]}"
        self._options = job_options(job_timeout_s, mem_limit, retries)
        self._echo_output = echo_output
        self._seq = itertools.count(1)
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        cluster = None
        if address is None and not os.environ.get("ZFARM_ADDRESS"):
            cluster = LocalCluster(n_workers=n_workers, heartbeat_interval_s=heartbeat_interval_s,
                                   keys=self.settings.keys)
            self.settings = dataclasses.replace(self.settings, address=cluster.address)
        self._res = _Resources.open(self.settings, self.id, cluster)
        self._connection = self._res.connection
        # A client dropped without shutdown() closes once its jobs are done; at exit, at once.
        weakref.finalize(self, self._res.close_when_done).atexit = False
        welcomed = self._connection.welcomed.wait(self.settings.connect_timeout_s)
        if not welcomed or self._connection.fatal is not None:
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
        return self._submit(fn, args, kwargs, self._options)

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                options: dict[str, Any]) -> concurrent.futures.Future[Any]:
        fn_id, blob = ser.dump_function(fn)
        args, kwargs, after = upstream_arguments(args, kwargs, self._connection)
        if after:  # it runs when these jobs have succeeded, with their results in their futures' places
            options = {**options, "after": after}
        job = self._job(fn_id, ser.dump_call(args, kwargs), len(blob), options)
        self._connection.submit(fn_id, blob, [job])
        return job.future

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
                                **request_options(resources, tags)})

    def project(self, name: str, *, priority: int = 0, share: float = 1.0, on_error: str = "continue",
                resources: Mapping[str, Any] | None = None, tags: Iterable[str] | None = None,
                max_running: int | None = None) -> Project:
        """A :class:`zfarm.Project`: an Executor whose jobs belong to project ``name`` at the broker.

        ``priority``: higher goes first; ``share``: its part of the slots among equal priorities;
        ``on_error``: "continue", "suspend" (at the first failed job) or "cancel" (the rest);
        ``resources``/``tags``: what each of its jobs asks of a worker; ``max_running``: at most this
        many of its jobs run at once. See docs/projects.md.
        """
        return Project(self, name, priority=priority, share=share, on_error=on_error, resources=resources,
                       tags=tags, max_running=max_running)

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
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                      or chunksize < 1):
            raise ValueError(f"chunksize must be a whole number of at least 1, not {chunksize!r}")
        total = known_length(*iterables) if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout

        def submit_chunks(fn_id: bytes, blob: Any, chunks: list[list[Any]]) -> Submitted:
            # A map started before shutdown(wait=False) goes on submitting its input (in_map).
            jobs: list[PendingJob] = []
            error: BaseException | None = None
            try:
                for chunk in chunks:
                    limits = _per_chunk(options, len(chunk))
                    jobs.append(self._job(fn_id, ser.dump_chunk(chunk), len(blob), limits, in_map=True))
            except Exception as exc:  # an item that cannot be pickled: it raises in its place
                error = exc
            except BaseException:  # Ctrl-C while pickling: none of these go
                self._abandon(jobs)
                raise
            if jobs:
                try:
                    self._connection.submit(fn_id, blob, jobs)
                except BaseException:
                    self._abandon(jobs)
                    raise
            return jobs, error

        if self.session and chunksize is None:
            chunksize = 1
        # A session's jobs outlive an interrupted loop: a rerun collects them.
        run = MapRun(submit_chunks, fn, zip(*iterables, strict=False), self.settings.window, chunksize,
                     cancel_left=not self.session)
        self._res.track_map(run)
        run.start()  # work starts now, not at the first next(): the first window runs, read or not
        results = run.results(deadline)
        return track(results, total, f"map {getattr(fn, '__name__', 'fn')}") if progress else results

    def _abandon(self, jobs: list[PendingJob]) -> None:
        """Jobs made but never handed to the I/O thread: cancel their futures, leave no gap in seqs."""
        for job in jobs:
            cancel_future(job.future, force=True)
        if not self._connection.closed:
            self._connection.skip([job.seq for job in jobs])

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

    def _finish(self, wait: bool, cancel_futures: bool, interrupted: bool = False) -> None:
        if cancel_futures:
            self.cancel(force=bool(self.session))
            self._res.end_session = bool(self.session)
        if self.session and not wait and not cancel_futures:
            self._res.detach()
        elif wait:
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
                         interrupted=interrupted)
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
        limit = self._connection.max_message_bytes - ENVELOPE_ALLOWANCE
        if self._connection.max_message_bytes and size + fn_size > limit:
            raise PayloadTooLarge(size + fn_size, limit, "this job's function and arguments")
        seq = next(self._seq)
        future = JobFuture(self._connection, seq)
        if self._echo_output:
            future.add_done_callback(functools.partial(echo_output, f"{self.id}:{seq}"))
        self._res.track(future)
        wire = {k: v for k, v in options.items() if k != "retries"}  # retrying is the client's business
        return PendingJob(seq, fn_id, frames, future, size, options=wire, retries=options.get("retries", 0))

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


def _per_chunk(options: dict[str, Any], items: int) -> dict[str, Any]:
    if "timeout_s" not in options or items == 1:
        return options
    return {**options, "timeout_s": options["timeout_s"] * items}


class JobLimits:
    """``submit`` and ``map`` of a client, with job limits (from :meth:`Client.with_options`)."""

    def __init__(self, client: Client, options: dict[str, Any]) -> None:
        self._client = client
        self._options = options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self._client._submit(fn, args, kwargs, self._options)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        return self._client._map(fn, iterables, timeout, chunksize, progress, self._options)

    def run(self, args: str | Sequence[str | os.PathLike[str]], *, shell: bool = False,
            cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
            check: bool = True, input: str | bytes | None = None) -> concurrent.futures.Future[CommandResult]:
        return self._client._run(args, shell, cwd, env, check, input, self._options)


class _Resources:
    """What a client owns (context, I/O thread, embedded farm), apart from the client itself.

    Kept in ``_OPEN`` until closed, so that a client the program dropped is still
    closed: when its jobs are done (from the client's finalizer), or at exit.
    """

    def __init__(self, context: zmq.Context[Any], connection: Connection,
                 cluster: LocalCluster | None) -> None:
        self.context = context
        self.connection = connection
        self.cluster = cluster
        self._futures: weakref.WeakSet[JobFuture] = weakref.WeakSet()  # pending ones stay referenced
        self._maps: weakref.WeakSet[MapRun] = weakref.WeakSet()  # maps the program may still read
        self._lock = threading.Lock()
        self._closed = False
        self._released = threading.Event()  # set once closed: the context ended and the farm stopped
        self.end_session = False  # on close, tell the broker to forget the session

    @classmethod
    def open(cls, settings: ClientSettings, client_id: str, cluster: LocalCluster | None) -> _Resources:
        context: zmq.Context[Any] = zmq.Context()
        try:
            connection = Connection(settings, client_id, context)
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
        with self._lock:
            return [run for run in self._maps if not run.finished]

    def complete_maps(self) -> None:
        """Submit what maps still being read have left, so they can be read to the end after close."""
        for run in self._live_maps():
            run.complete()

    def detach(self) -> None:
        """Leave a session once the broker holds every job (DETACH_TIMEOUT_S at most)."""
        with self._lock:
            closing = self._closed
            self._closed = True
        if closing:
            self._released.wait(RELEASE_WAIT_S)
            return
        self.connection.detach(DETACH_TIMEOUT_S)
        self._release()

    def close_when_done(self, block: bool = False, interrupted: bool = False) -> None:
        """Close once every job is done and no map is being read (in a thread of its own, or ``block``)."""
        if block:
            self.wait_for_jobs(interrupted)
            self.close()
        elif not self.unfinished() and not self._live_maps():
            self.close()
        else:
            name = f"zfarm-close-{self.connection.client_id}"
            closer = threading.Thread(target=self._close_later, name=name, daemon=True)
            closer.start()

    def _close_later(self) -> None:
        while not self._closed and (self.unfinished() or self._live_maps()):
            concurrent.futures.wait(self.unfinished(), timeout=CLOSER_POLL_S)
        self.close()

    def wait_for_jobs(self, interrupted: bool = False) -> None:
        """Wait until every job is done. Ctrl-C says what we wait for; a second one kills the jobs.

        ``interrupted``: Ctrl-C was pressed already (it is why we are here).
        Raises:
            KeyboardInterrupt: the second Ctrl-C, once the jobs are killed and the client closed.
        """
        warned = False
        if interrupted:
            warned = self._say_waiting()
        stop = False
        while unfinished := self.unfinished():
            try:
                concurrent.futures.wait(unfinished, timeout=CLOSER_POLL_S)
            except KeyboardInterrupt:
                if warned:
                    stop = True
                    break
                warned = self._say_waiting()
        if stop:  # raised here, outside the handler: one traceback, not two
            for future in self.unfinished():
                future.kill()
            self.close()
            raise KeyboardInterrupt

    def _say_waiting(self) -> bool:
        unfinished = len(self.unfinished())
        if unfinished:
            sys.stderr.write(f"zfarm: waiting for {_jobs(unfinished)} (press Ctrl-C again to cancel them)\n")
            sys.stderr.flush()
        return True

    def close(self) -> None:
        """Close (once); a second caller waits until the first has stopped everything."""
        with self._lock:
            closing = self._closed
            self._closed = True
        if closing:
            self._released.wait(RELEASE_WAIT_S)
            return
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


_OPEN: set[_Resources] = set()
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
                if res.unfinished():
                    concurrent.futures.wait(res.unfinished(), timeout=EXIT_NOTICE_S)
                    if left := len(res.unfinished()):
                        sys.stderr.write(f"zfarm: waiting for {_jobs(left)} before exiting "
                                         "(Ctrl-C cancels them)\n")
                    while unfinished := res.unfinished():
                        concurrent.futures.wait(unfinished, timeout=CLOSER_POLL_S)
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
