"""One ``Client.map`` call: lazy input, adaptive chunks, a bounded window, ordered results.

::

    inputs ──zip, lazily──► chunks (sized by ChunkSizer) ──submit──► broker
                                         ▲                            │
                 observed run time/item ─┘◄── futures, in input order ┘──► yield values

Chunk sizes adapt to the jobs: the first chunks hold one item each; once a
result reports its run time, chunks grow so that each runs for about
``TARGET_CHUNK_S`` — thousands of items for no-op functions, one item for
jobs of a second or more — so that short jobs cost little per item and long
ones still spread over every worker. The window bounds both the chunks and
the items in flight, so an endless generator runs in bounded memory.

An item with futures of the client's jobs among its arguments (at top level, or inside lists,
tuples and dicts) becomes a job of its own, cut out of its chunk when pickling meets a future
(:class:`ChunkJobs`): it waits at the broker for those jobs, as a submitted job does, and the
items around it are neither held back nor failed with it. Chunks without futures pay nothing.
Each such job's upstream results are pinned (held at the broker for it) from the moment its item
is walked until it is submitted, and unpinned on every way out before that, Ctrl-C included.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zfarm import (
    projects,  # (as a module: zfarm.projects imports the client package)
    scatter,
)
from zfarm import serialization as ser
from zfarm.client.core import PendingJob
from zfarm.client.futures import JobFuture, cancel_future
from zfarm.errors import FutureInArguments
from zfarm.progress import known_length, track

if TYPE_CHECKING:
    from zfarm.client.shell import IOThread
    from zfarm.scatter import Scattered

#: how long one chunk should run once job durations are known
TARGET_CHUNK_S = 0.005
MAX_CHUNK = 10_000
#: single-item chunks sent before any run time is known
PROBES = 4
#: the newest observation's weight in the running per-item estimate
SMOOTHING = 0.3


class ChunkSizer:
    """Picks chunk sizes: ``fixed`` if given, else from the observed run time per item."""

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = max(1, fixed) if fixed else None
        self.per_item_s: float | None = None

    @property
    def measured(self) -> bool:
        return self.fixed is not None or self.per_item_s is not None

    def size(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.per_item_s is None:
            return 1
        return max(1, min(MAX_CHUNK, int(TARGET_CHUNK_S / max(self.per_item_s, 1e-9))))

    def observe(self, items: int, run_s: float | None) -> None:
        if run_s is None or items <= 0:
            return
        per_item = run_s / items
        if self.per_item_s is None:
            self.per_item_s = per_item
        else:
            self.per_item_s += SMOOTHING * (per_item - self.per_item_s)


#: what a map's ``submit`` returns: the jobs of the first chunks, and why the next one could not go.
#: It may cut a chunk in place (an item with futures among its arguments goes as a job of its own, which
#: waits for them at the broker): the list of chunks it was given then says what each job holds
Submitted = tuple[list[PendingJob], "BaseException | None"]
#: one chunk's job, not yet handed to the I/O thread: (fn_id, frames, fn_size, options) → the job
MakeJob = Callable[[bytes, list[Any], int, dict[str, Any]], PendingJob]
#: the function to send with jobs that use scattered objects: (fn_id, blob, objects) → (fn_id, blob)
Bundle = Callable[[bytes, Any, "dict[bytes, Scattered]"], tuple[bytes, Any]]
#: a chunk pickled: its frames, how many items it holds, the upstream jobs it waits for (pinned)
Payload = tuple[list[Any], int, list[int]]


def start_map(jobs: ChunkJobs, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], window: int,
              keep: Callable[[MapRun], None], *, timeout: float | None, chunksize: int | None,
              progress: bool, session: bool) -> Iterator[Any]:
    """Start one map: its first window of input runs at once, read or not; returns its results.

    ``keep``: the client keeps the run (to complete or stop it at close). In a ``session`` every
    item is its own job by default (a rerun cuts the input the same way), and jobs left when the
    caller stops reading go on (a rerun collects them).

    Raises:
        ValueError: a chunk size that is not a whole number of at least 1.
    """
    if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                  or chunksize < 1):
        raise ValueError(f"chunksize must be a whole number of at least 1, not {chunksize!r}")
    total = known_length(*iterables) if progress else None
    deadline = None if timeout is None else time.monotonic() + timeout
    if session and chunksize is None:
        chunksize = 1
    run = MapRun(jobs, fn, zip(*iterables, strict=False), window, chunksize, cancel_left=not session)
    keep(run)
    try:
        run.start()  # work starts now, not at the first next(): the first window runs, read or not
    except BaseException:
        run.stop()  # (Ctrl-C while its first items were pickled: none of them went, and none will)
        raise
    results = run.results(deadline)
    weakref.finalize(results, run.drop_reader)  # dropped unread: its first window still runs
    return track(results, total, f"map {getattr(fn, '__name__', 'fn')}") if progress else results


@dataclass(frozen=True, slots=True)
class ChunkJobs:
    """A map's chunks as jobs, handed to the I/O thread in one SUBMIT (what :class:`MapRun` calls).

    Returns the jobs made, and why the next one could not be (it raises in its place). An item with
    futures among its arguments becomes a job of its own that waits for them, as a submit does: its
    chunk is cut in place (``chunks`` then says what each job holds). Ctrl-C while pickling sends none
    of them, and leaves no result pinned for them.
    """

    connection: IOThread
    options: dict[str, Any]
    make_job: MakeJob
    with_scattered: Bundle

    def __call__(self, fn_id: bytes, blob: Any, chunks: list[list[Any]]) -> Submitted:
        jobs: list[PendingJob] = []
        error: BaseException | None = None
        payloads: list[Payload] = []
        try:
            with scatter.collecting() as used:
                error = self._pickle(chunks, payloads)
            fn_id, blob = self.with_scattered(fn_id, blob, used)
            for frames, items, after in payloads:
                options = _per_chunk(self.options, items)
                jobs.append(self.make_job(fn_id, frames, len(blob), {**options, "after": after} if after
                                          else options))
        except Exception as exc:  # too large, or the client closed: it raises in its place
            error = exc
            self.connection.unpin(_upstream(payloads[len(jobs):]))
        except BaseException:
            self.connection.unpin(_upstream(payloads))
            self._abandon(jobs)
            raise
        if jobs:
            try:
                self.connection.submit(fn_id, blob, jobs)
            except BaseException:
                self.connection.unpin(_upstream(payloads[:len(jobs)]))
                self._abandon(jobs)
                raise
        return jobs, error

    def _pickle(self, chunks: list[list[Any]], payloads: list[Payload]) -> Exception | None:
        """Pickle ``chunks`` into ``payloads`` until one cannot be: returns why (None: all were)."""
        while len(payloads) < len(chunks):
            at = len(payloads)
            chunk = chunks[at]
            pinned: list[int] = []  # pinned for this item's job until its payload holds them
            try:
                try:
                    frames = ser.dump_chunk(chunk)
                except FutureInArguments:  # (pickling met a future: chunks without pay nothing)
                    chunks[at:at + 1] = pieces = projects.cut_at_futures(chunk)
                    chunk, pinned = projects.upstream_items(pieces[0], self.connection)
                    frames = ser.dump_chunk(chunk)
                payloads.append((frames, len(chunk), pinned))
                pinned = []
            except Exception as exc:  # an item that cannot be pickled: it raises in its place
                return exc
            finally:
                if pinned:  # an exception, or Ctrl-C: this item's job will never be
                    self.connection.unpin(pinned)
        return None

    def _abandon(self, jobs: list[PendingJob]) -> None:
        """Jobs made but never handed to the I/O thread: cancel their futures, leave no gap in seqs."""
        for job in jobs:
            cancel_future(job.future, force=True)
        if not self.connection.closed:
            self.connection.skip([job.seq for job in jobs])


def _upstream(payloads: list[Payload]) -> list[int]:
    return [seq for _, _, after in payloads for seq in after]


def _per_chunk(options: dict[str, Any], items: int) -> dict[str, Any]:
    """A chunk of ``items`` items may run ``items`` times an item's time limit."""
    if "timeout_s" not in options or items == 1:
        return options
    return {**options, "timeout_s": options["timeout_s"] * items}


class MapRun:
    """One ``map`` call's state, shared by the caller's thread and the client's I/O thread.

    At call time the map reads up to ``window`` items (or, with a fixed chunk size, fills its
    window of chunks) and every one of them runs whether or not the results are read: the
    first few go alone to measure the run time, the rest follow (from the I/O thread, as the
    first results arrive) in chunks of the measured size. Reading results reads more input.
    """

    def __init__(self, submit: Callable[[bytes, Any, list[list[tuple[Any, ...]]]], Submitted],
                 fn: Callable[..., Any], items: Iterator[tuple[Any, ...]], window: int,
                 chunksize: int | None, cancel_left: bool = True) -> None:
        """``cancel_left``: cancel the jobs still unfinished when the caller stops early."""
        self._submit = submit
        self._cancel_left = cancel_left
        self.fn_id, self.blob = ser.dump_function(fn)
        self._items = items
        self._window = window
        self.sizer = ChunkSizer(chunksize)
        self._pending: deque[tuple[JobFuture, int]] = deque()
        self._items_in_flight = 0
        self._exhausted = False
        #: items read at call time, not submitted yet (they go as soon as run times are known)
        self._read_ahead: deque[tuple[Any, ...]] = deque()
        #: what the input (or pickling an item) raised: raised to the caller after the results before it
        self._input_error: BaseException | None = None
        self._lock = threading.RLock()
        self._filling = False
        self._refill = False  # a fill was asked for while one ran in this thread: run another after it
        #: the caller is done reading this map (read to its end, or stopped early)
        self.finished = False
        #: the caller dropped the results unread: only what was read at call time still goes
        self.reader_gone = False
        #: no more input goes (the client cancels, or is left by an exception)
        self.stopped = False

    @property
    def live(self) -> bool:
        """Whether this map may still submit jobs, so the client must stay open for it."""
        with self._lock:
            return not (self.finished or self.stopped) and (not self.reader_gone or bool(self._read_ahead))

    def drop_reader(self) -> None:
        """The caller dropped the results without reading them (their generator was collected)."""
        with self._lock:
            self.reader_gone = True

    def stop(self) -> None:
        """Read and submit nothing more (what is submitted runs on)."""
        with self._lock:
            self.stopped = True
            self._read_ahead.clear()

    def start(self) -> None:
        """At call time: take this map's first window of input and start it."""
        if not self.sizer.measured:
            self._read_ahead.extend(self._read(self._window))
        self.fill()

    def _read(self, n: int) -> list[tuple[Any, ...]]:
        if self._exhausted:
            return []
        items: list[tuple[Any, ...]] = []
        try:
            items.extend(itertools.islice(self._items, n))
        except Exception as exc:  # the caller's generator failed: finish what we have first
            self._input_error = exc
        if len(items) < n or self._input_error is not None:
            self._exhausted = True
        return items

    def _next_chunk(self, size: int, read_input: bool) -> list[tuple[Any, ...]]:
        chunk: list[tuple[Any, ...]] = []
        while self._read_ahead and len(chunk) < size:
            chunk.append(self._read_ahead.popleft())
        if read_input and len(chunk) < size:
            chunk.extend(self._read(size - len(chunk)))
        return chunk

    def fill(self, read_input: bool = True, unbounded: bool = False) -> None:
        """Submit chunks until the window (of chunks and of items) is full or the input ends.

        ``read_input``: False takes only the items read ahead (from the I/O thread, which must
        not run the caller's generator). ``unbounded``: submit everything that is left.
        """
        with self._lock:
            if self._filling:  # a job finished inside our own submit (its callback): fill again after
                self._refill = True
                return
            self._filling = True
            try:
                self._fill(read_input, unbounded)
                while self._refill:
                    self._refill = False
                    self._fill(read_input, unbounded)
            finally:
                self._filling = False

    def _fill(self, read_input: bool, unbounded: bool) -> None:
        if self.finished or self.stopped:
            return
        read_input = read_input and not self.reader_gone
        size = self.sizer.size()
        item_cap = max(self._window, 32 * size)
        chunk_cap = self._window if self.sizer.measured else PROBES
        chunks: list[list[tuple[Any, ...]]] = []
        while unbounded or (len(self._pending) + len(chunks) < chunk_cap
                            and self._items_in_flight < item_cap):
            chunk = self._next_chunk(size, read_input)
            if not chunk:
                break
            chunks.append(chunk)
            self._items_in_flight += len(chunk)
        if not chunks:
            return
        jobs, error = self._submit(self.fn_id, self.blob, chunks)
        if error is not None:  # an item could not be pickled: it raises in its place
            self._input_error = error
            self._exhausted = True
            self._read_ahead.clear()
            self._items_in_flight -= sum(len(chunk) for chunk in chunks[len(jobs):])
        added = [(job.future, len(chunk)) for job, chunk in zip(jobs, chunks, strict=False)]
        self._pending.extend(added)
        for future, items in added:
            future.add_done_callback(functools.partial(self._job_done, items))

    def _job_done(self, items: int, future: Any) -> None:
        """A chunk finished (in the I/O thread): learn its run time, send what was read ahead."""
        self.sizer.observe(items, future.run_s)
        if self._read_ahead and not (self.finished or self.stopped):
            try:
                self.fill(read_input=False)
            except Exception as exc:  # the client closed meanwhile: the caller hears of it in order
                with self._lock:
                    self._input_error, self._exhausted = exc, True
                    self._read_ahead.clear()

    def complete(self) -> None:
        """Submit every item left, so the results can be read after the client closes (only what was
        read ahead, if nobody will read them)."""
        self.fill(read_input=not self.reader_gone, unbounded=True)

    def results(self, deadline: float | None) -> Iterator[Any]:
        """Yield results in input order; cancel what is left when the caller stops early (if asked)."""
        try:
            while self._pending:
                future, items = self._pending[0]
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    values = future.result(remaining)
                except concurrent.futures.CancelledError:
                    raise
                except BaseException:
                    yield from future.partial or ()
                    raise
                with self._lock:
                    self._pending.popleft()
                    self._items_in_flight -= items
                del future  # a yielded value must not stay alive here once the caller drops it
                self.fill()
                values.reverse()
                while values:
                    yield values.pop()
            if self._input_error is not None:
                raise self._input_error
        finally:
            with self._lock:
                self.finished = True
                left = [future for future, _ in self._pending]
            if self._cancel_left:  # the caller stopped early: its jobs are of no use, even running
                for future in left:
                    future.kill()
