"""The client's futures: standard ``concurrent.futures`` ones that also cancel jobs at the broker.

The I/O thread settles them (:func:`settle`), turning a RESULT's frames into a value or an
exception here, in the client's process: the broker never unpickles user data.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any, Protocol

from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.errors import FutureInArguments, JobCrashed, JournalCorrupted, JournalFull, WorkerLost
from zfarm.output import JobOutput
from zfarm.output import take as take_output


class Owner(Protocol):
    """What a future asks of the client's I/O thread."""

    session: str
    read_seqs: list[int]

    def cancel(self, seq: int) -> None: ...

    def accepted(self, seq: int) -> bool: ...


class JobFuture(Future[Any]):
    """A standard future whose ``cancel()`` also cancels the job at the broker."""

    def __init__(self, owner: Owner, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self._owner = owner
        #: for a chunk of a map that failed: the results of the items before the failing one
        self.partial: list[Any] | None = None
        #: how long the job ran in its slot, once it is done (None if unknown)
        self.run_s: float | None = None
        #: what the job printed (the end of its stdout and stderr), once it is done; None: nothing
        self.output: JobOutput | None = None
        self._was_read = False

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        finally:
            self._read()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        finally:
            self._read()

    def _read(self) -> None:
        """In a session, the program has this result now: a clean close may release it."""
        if self._owner.session and not self._was_read and self.done():
            self._was_read = True
            self._owner.read_seqs.append(self.seq)

    def __reduce__(self) -> Any:
        """A future is never pickled: where zfarm looks for futures among a job's arguments it puts a
        placeholder in its place first. Met anywhere else, it says so (a map tells by this that a
        chunk holds one, at no cost to the chunks that do not)."""
        raise FutureInArguments(self.seq)

    def accepted(self) -> bool:
        """Whether the broker has said it holds this job (a session's), or the job is done."""
        return self.done() or self._owner.accepted(self.seq)

    def cancel(self) -> bool:
        """Cancel the job unless it is known to have started (as ``concurrent.futures`` does).

        True means the future is cancelled for good: its result is never delivered, and the
        broker drops the job, or, if a worker started it in the meantime (before we heard of
        it), stops it. False: the job runs (see :meth:`kill`) or is done.
        """
        if self.done():
            return self.cancelled()
        if not cancel_future(self):
            return False
        self._owner.cancel(self.seq)
        return True

    def kill(self) -> bool:
        """Cancel the job even if it runs: its worker kills it (and whatever it started).

        Returns False only if the job was already done (finished, failed or cancelled).
        """
        if self.done():
            return self.cancelled()
        if not cancel_future(self, force=True):
            return self.cancelled()
        self._owner.cancel(self.seq)
        return True


def settle(future: JobFuture, job_id: str, outcome: int, frames: list[Any], info: str) -> None:
    """Resolve a job's future from its RESULT row and frames."""
    future.output = take_output(frames)
    if outcome == p.Outcome.OK:
        try:
            value = ser.loads(frames)
        except Exception as exc:
            set_future(future, error=TypeError(f"job {job_id} finished but its result could not be "
                                               f"unpickled here: {exc!r}"))
            return
        set_future(future, value=value)
    elif outcome in (p.Outcome.ERROR, p.Outcome.CRASHED):
        error, future.partial = ser.load_exception(frames)
        set_future(future, error=error)
    elif outcome == p.Outcome.CANCELLED:
        cancel_future(future, force=True)
    elif outcome == p.Outcome.LOST:
        set_future(future, error=WorkerLost(job_id, info))
    elif outcome == p.Outcome.CORRUPTED:
        set_future(future, error=JournalCorrupted(job_id, "", info))
    elif outcome == p.Outcome.JOURNAL_FULL:
        set_future(future, error=JournalFull(job_id, info))
    else:
        set_future(future, error=JobCrashed(job_id, None))


def cancel_future(future: Future[Any], force: bool = False) -> bool:
    """Cancel a future and wake whoever waits on it (``wait``, ``as_completed``).

    ``Future.cancel`` alone leaves those waiters asleep until an executor's thread calls
    ``set_running_or_notify_cancel``; zfarm has no such thread, so this does both steps at once.
    The done-callbacks run after the future's lock is let go, as ``Future.cancel`` runs them, so a
    callback that takes other locks cannot deadlock with a thread that holds one of those and then
    looks at this future. ``force``: cancel a running future too (the standard one refuses).
    """
    with future._condition:
        state = future._state
        if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            return True
        if state == FINISHED or (state == RUNNING and not force):
            return False
        future._state = CANCELLED_AND_NOTIFIED
        for waiter in future._waiters:
            waiter.add_cancelled(future)
        future._condition.notify_all()
    future._invoke_callbacks()  # type: ignore[attr-defined]
    return True


def mark_running(future: Future[Any]) -> None:
    """A worker started the job: ``running()`` is True from now on (unless it ended meanwhile)."""
    with future._condition:
        if future._state == PENDING:
            future.set_running_or_notify_cancel()


def set_future(future: Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass  # cancelled by the user meanwhile
