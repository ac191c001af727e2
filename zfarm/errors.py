"""One exception tree for everything zfarm raises.

Every error says what happened and, where there is one, what to do next.
Errors that cross the wire (a job's failure) are pickled by the worker and
raised in the caller; they keep plain constructor arguments so that pickling
them round-trips.
"""

from __future__ import annotations

import signal


class ZfarmError(Exception):
    """Base of every error zfarm raises."""


class ProtocolError(ZfarmError):
    """A message on the wire was malformed, of another version, or unexpected."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    def __init__(self, version: int, ours: int) -> None:
        self.version = version
        self.ours = ours
        super().__init__(
            f"peer speaks zfarm protocol version {version}, this side speaks {ours}: "
            "install the same zfarm release on every machine of the farm"
        )

    def __reduce__(self) -> tuple[type, tuple[int, int]]:
        return (type(self), (self.version, self.ours))


class FieldTooLarge(ProtocolError):
    """A field of a message is over its bound (a host name of a megabyte): the message is refused."""

    def __init__(self, field: str, limit: int, size: int = 0) -> None:
        self.field = field
        self.limit = limit
        self.size = size  # 0: more than the limit (a map is measured only up to it)
        told = f"{size} long" if size else "larger"
        super().__init__(f"{field} is {told}, over its limit of {limit}: send a shorter one")

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:
        return (type(self), (self.field, self.limit, self.size))


class SecurityError(ZfarmError):
    """Keys are missing, unsafe, or do not let this peer in."""


class ConfigError(ZfarmError):
    """A setting is invalid (bad endpoint, negative interval, ...)."""


class BrokerUnavailable(ZfarmError):
    """The broker did not answer within the deadline."""

    def __init__(self, address: str, waited_s: float, detail: str = "") -> None:
        self.address = address
        self.waited_s = waited_s
        self.detail = detail
        text = (
            f"no answer from the zfarm broker at {address} after {waited_s:.1f} s"
            f"{': ' + detail if detail else ''}; check that `zfarm broker --bind "
            f"{address}` is running and reachable from this machine"
        )
        super().__init__(text)

    def __reduce__(self) -> tuple[type, tuple[str, float, str]]:
        return (type(self), (self.address, self.waited_s, self.detail))


class Refused(ZfarmError):
    """The broker refused this peer (another protocol version, bad handshake)."""


class JobError(ZfarmError):
    """A job raised an exception that could not be re-created in the caller.

    Attributes:
        type_name: the qualified name of the remote exception's type.
        message: ``str()`` of the remote exception.
        remote_traceback: the traceback text as printed on the worker.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class JobCrashed(ZfarmError):
    """The process running a job died (segfault, ``os._exit``, killed by the OS).

    The worker replaced the slot and lives on; the job is not retried because
    it would most likely crash again.
    """

    def __init__(self, job: str, exitcode: int | None, host: str = "") -> None:
        self.job = job
        self.exitcode = exitcode
        self.host = host
        super().__init__(f"job {job} killed the process running it{_where(host)}: {describe_exit(exitcode)}")

    def __reduce__(self) -> tuple[type, tuple[str, int | None, str]]:
        return (type(self), (self.job, self.exitcode, self.host))


class JobTimeout(ZfarmError, TimeoutError):
    """A job ran past its time limit; its slot was killed and replaced."""

    def __init__(self, job: str, limit_s: float, ran_s: float) -> None:
        self.job = job
        self.limit_s = limit_s
        self.ran_s = ran_s
        super().__init__(f"job {job} ran {ran_s:.1f} s, past its limit of {limit_s:g} s: it was killed. "
                         "Raise job_timeout_s if it needs longer")

    def __reduce__(self) -> tuple[type, tuple[str, float, float]]:
        return (type(self), (self.job, self.limit_s, self.ran_s))


class MemoryLimitExceeded(ZfarmError, MemoryError):
    """A job's slot process grew past its memory limit; it was killed and replaced."""

    def __init__(self, job: str, limit: int, reached: int) -> None:
        self.job = job
        self.limit = limit
        self.reached = reached
        super().__init__(f"job {job} reached {reached / 2**20:.0f} MiB resident memory, over its limit of "
                         f"{limit / 2**20:.0f} MiB: it was killed. Raise mem_limit if it needs more")

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:
        return (type(self), (self.job, self.limit, self.reached))


class WorkerLost(ZfarmError):
    """The worker running a job died or left, and the job was not run elsewhere."""

    def __init__(self, job: str, detail: str = "") -> None:
        self.job = job
        self.detail = detail
        super().__init__(f"job {job} lost its worker{': ' + detail if detail else ''}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.job, self.detail))


class DependencyFailed(ZfarmError):
    """A job whose argument was another job's future did not run: that upstream job failed, was
    cancelled, or its result is no longer held.

    ``detail``: how the upstream job ended and the first line of its error, as the broker saw it
    (e.g. ``it failed: ZeroDivisionError: division by zero``)."""

    def __init__(self, job: str, upstream: str, detail: str = "") -> None:
        self.job = job
        self.upstream = upstream
        self.detail = detail
        super().__init__(f"job {job} did not run: its upstream job {upstream} did not succeed"
                         f"{f' ({detail})' if detail else ''}; fix or rerun {upstream} first")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.job, self.upstream, self.detail))


class FutureInArguments(ConfigError):
    """A job's future met while pickling another job's arguments: where zfarm does not look for
    futures (inside an object other than a list, tuple or dict, or too deep), so the job would not
    wait for it."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        super().__init__(f"the future of job {seq} is inside an object zfarm does not look into: pass "
                         "futures as arguments, or inside lists, tuples and dicts up to 8 levels deep (the "
                         "job then waits for them), or pass future.result()")

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return (type(self), (self.seq,))


class RemoteTraceback(Exception):
    """Carries a remote traceback; set as ``__cause__`` of a re-raised job error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def _where(host: str) -> str:
    return f" on {host}" if host else ""


_LIKELY_CAUSE = {
    signal.SIGSEGV: "segmentation fault: most likely a bug in a C extension or a ctypes call",
    signal.SIGKILL: "killed: most likely the kernel's out-of-memory killer or a `kill -9`",
    signal.SIGABRT: "aborted: a C library called abort(), often a failed assertion",
    signal.SIGBUS: "bus error: a bad memory access in native code",
    signal.SIGFPE: "floating point exception in native code",
    signal.SIGTERM: "terminated by SIGTERM from outside the worker",
}


def describe_exit(exitcode: int | None) -> str:
    """Say in words how a process ended, from a ``multiprocessing`` exit code."""
    if exitcode is None:
        return "the process vanished without an exit status"
    if exitcode < 0:
        try:
            sig = signal.Signals(-exitcode)
        except ValueError:
            return f"killed by signal {-exitcode}"
        cause = _LIKELY_CAUSE.get(sig, "")
        return f"killed by signal {-exitcode} ({sig.name}){'; ' + cause if cause else ''}"
    return f"the process exited with code {exitcode} (a call to os._exit or sys.exit inside the job?)"


class PayloadTooLarge(ZfarmError, ValueError):
    """A job's arguments or result are larger than the broker accepts in one message."""

    def __init__(self, size: int, limit: int, what: str = "this job's arguments") -> None:
        self.size = size
        self.limit = limit
        self.what = what
        super().__init__(
            f"{what} pickle to {size} bytes, over the broker's limit of {limit} bytes; pass large "
            "data through shared storage, or start the broker with a larger --max-message-bytes"
        )

    def __reduce__(self) -> tuple[type, tuple[int, int, str]]:
        return (type(self), (self.size, self.limit, self.what))


class CommandFailed(JobError):
    """A command job exited with a non-zero status, or was killed by a signal (``check=True``).

    Attributes:
        command: the command line, as text.
        returncode: its exit status; negative: ``-signal`` (as ``subprocess``).
        signal: the name of the signal that killed it, or "".
        stderr_tail: the last lines of its standard error.
        host: the machine it ran on.
        result: the whole :class:`zfarm.CommandResult` (stdout and stderr included).
        timed_out_after_s: set when the command ran past its own time limit (job arrays).
    """

    def __init__(self, command: str, returncode: int, stderr_tail: str = "", host: str = "",
                 result: object = None, timed_out_after_s: float | None = None) -> None:
        self.command = command
        self.returncode = returncode
        self.signal = _signal_name(-returncode) if returncode < 0 else ""
        self.stderr_tail = stderr_tail
        self.host = host
        self.result = result
        self.timed_out_after_s = timed_out_after_s
        how = f"was killed by signal {-returncode} ({self.signal})" if returncode < 0 else \
            f"exited with status {returncode}"
        if timed_out_after_s is not None:
            how = f"ran {timed_out_after_s:.1f} s, past its time limit, and was killed"
        tail = f"; the end of its stderr:\n{stderr_tail}" if stderr_tail else " (nothing on its stderr)"
        text = f"command {command} {how}{_where(host)}{tail}"
        ZfarmError.__init__(self, text)
        self.type_name, self.message, self.remote_traceback = "zfarm.CommandFailed", text, ""

    def __reduce__(self) -> tuple[type, tuple[str, int, str, str, object, float | None]]:  # type: ignore[override]
        return (type(self), (self.command, self.returncode, self.stderr_tail, self.host, self.result,
                             self.timed_out_after_s))


class CommandNotFound(ZfarmError, FileNotFoundError):
    """A command job's program (or its working directory) does not exist on the worker's machine."""

    def __init__(self, command: str, host: str = "", detail: str = "") -> None:
        self.command = command
        self.host = host
        self.detail = detail
        why = f" ({detail})" if detail else ""
        super().__init__(f"command not found{_where(host)}: {command}{why}; "
                         "install it there, give its full path, or use shell=True for a shell line")

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.command, self.host, self.detail))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class JournalCorrupted(ZfarmError):
    """A job's payload in the broker's journal no longer matches its seal: it is not run or delivered.

    The file changed on disk after the broker wrote it (a damaged disk, an edit by hand). The job
    is failed rather than run with arguments, or answered with a result, that may not be its own.
    """

    def __init__(self, job: str, journal: str, detail: str = "") -> None:
        self.job = job
        self.journal = journal
        self.detail = detail
        where = f" in the broker's journal {journal}" if journal else ""
        super().__init__(f"job {job} was damaged{where}{': ' + detail if detail else ''}; it was neither run "
                         "nor delivered: submit it again (as a new job or in a new session)")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (self.job, self.journal, self.detail))


class JournalFull(ZfarmError):
    """The broker cannot write its journal (a full disk): it takes no new jobs until it can."""

    def __init__(self, job: str, detail: str = "") -> None:
        self.job = job
        self.detail = detail
        super().__init__(f"the broker refused job {job}: {detail or 'it cannot write its journal'}. It "
                         "still finishes the jobs it holds and takes new ones once its journal can be "
                         "written again (free space on its disk); submit this one again later")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.job, self.detail))
