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
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from zfarm import serialization as ser
from zfarm.connection import JobFuture, PendingJob

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


class MapRun:
    def __init__(self, submit: Callable[[bytes, Any, list[list[tuple[Any, ...]]]], list[PendingJob]],
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
        #: what the input raised: raised to the caller after the results before it
        self._input_error: BaseException | None = None

    def fill(self) -> None:
        """Submit chunks until the window (of chunks and of items) is full or the input ends."""
        chunks: list[list[tuple[Any, ...]]] = []
        size = self.sizer.size()
        item_cap = max(self._window, 32 * size)
        chunk_cap = self._window if self.sizer.measured else PROBES
        while (not self._exhausted and len(self._pending) + len(chunks) < chunk_cap
               and self._items_in_flight < item_cap):
            chunk: list[tuple[Any, ...]] = []
            try:
                chunk.extend(itertools.islice(self._items, size))
            except Exception as exc:  # the caller's generator failed: finish what we have first
                self._input_error = exc
            if len(chunk) < size or self._input_error is not None:
                self._exhausted = True
            if not chunk:
                break
            chunks.append(chunk)
            self._items_in_flight += len(chunk)
        if chunks:
            jobs = self._submit(self.fn_id, self.blob, chunks)
            self._pending.extend((job.future, len(chunk)) for job, chunk in zip(jobs, chunks, strict=True))

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
                self._pending.popleft()
                self._items_in_flight -= items
                self.sizer.observe(items, future.run_s)
                self.fill()
                yield from values
            if self._input_error is not None:
                raise self._input_error
        finally:
            if self._cancel_left:
                for future, _ in self._pending:
                    future.cancel()
