"""Job arrays: ``zfarm submit --array``, and how ``wait``, ``jobs``, ``logs`` and ``cancel`` find them again.

::

    zfarm submit ──► ArrayRecord (a JSON file) ──► session client "array-NAME" submits one
                     in the state folder             command job per index, leaves (detach)
                                                                │
    zfarm wait/jobs/logs ──► the same session, the same jobs, in the same order ──► the broker
                             answers finished ones from the results it holds and lets the others go on

An array is a session (docs/reliability.md): the broker runs its jobs and keeps
their results with nobody connected, and with ``--journal`` across its own
restarts. A command that watches the array rejoins the session and submits the
very same jobs, rebuilt from the record: a job that finished is answered from
the held result (never run again), one that has not goes on. So ``wait`` and
``jobs`` need no new broker query, and delivery stays exactly once. They leave
the session without releasing anything; ``forget`` ends it.

To tell which results the broker holds, ``jobs`` submits one more tiny job, the
*barrier*, only once the broker has accepted every job of the array: the broker
sends each held result in the turn that accepted its job, so when the barrier is
accepted every held result has arrived before it.

Cancelling kills the job (the broker drops it, or its worker kills it if it
runs) and notes its index in the array's record; every later rerun of the
session skips that job's number (no job is submitted for it), so a cancelled job
never comes back.
"""

from __future__ import annotations

import concurrent.futures
import enum
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zfarm import monitor
from zfarm.client.futures import JobFuture
from zfarm.commands import CommandResult, CommandSpec, run_command
from zfarm.errors import CommandFailed, ConfigError, Refused, ZfarmError
from zfarm.stats import JobRecord

#: the most jobs one array may hold: every watcher (wait, jobs, logs, cancel) rebuilds each job's
#: spec and future, about 2.8 KB a job measured (100,000 jobs: 280 MB), so ~1.4 GB here, results apart
MAX_ARRAY_JOBS = 500_000
TOO_MANY = (f"more than {MAX_ARRAY_JOBS:,} jobs: each `zfarm wait`, `jobs`, `logs` and `cancel` holds "
            "every job of an array in memory (about 3 KB each); split it into several arrays")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: how much longer than its --timeout the slot lets a command job run before killing the slot
TIMEOUT_BACKSTOP_S = 10.0
#: how long a watcher waits for the broker to accept the array's jobs again
ACCEPT_TIMEOUT_S = 60.0
#: how long ``submit`` waits for the broker to accept the array's jobs: this, plus ACCEPT_PER_JOB_S each
SUBMIT_ACCEPT_BASE_S = 30.0
ACCEPT_PER_JOB_S = 0.002
#: how often waiting for the broker to accept an array's jobs looks again
ACCEPT_POLL_S = 0.02


def parse_array(spec: str) -> list[int]:
    """Indexes of an ``--array`` spec: ``1-5000``, ``1-99:2``, ``1,5,7`` or a mix (``1-3,10``).

    Raises:
        ConfigError: anything else, an empty range, or more than ``MAX_ARRAY_JOBS`` jobs.
    """
    indexes: dict[int, None] = {}
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+)(?::(\d+))?)?\s*", part)
        if match is None:
            raise ConfigError(f"--array {spec!r}: {part!r} is not N, N-M or N-M:STEP (as in 1-100:2)")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        step = int(match[3]) if match[3] is not None else 1
        if last < first or step < 1:
            raise ConfigError(f"--array {spec!r}: {part!r} is an empty range")
        if len(indexes) + (last - first) // step + 1 > MAX_ARRAY_JOBS:
            raise ConfigError(f"--array {spec!r}: {TOO_MANY}")
        indexes.update(dict.fromkeys(range(first, last + 1, step)))
    return list(indexes)


def expand(template: list[str], item: str, index: int, append: bool) -> list[str]:
    """One job's command: ``{}`` becomes ``item``, ``{i}`` the index; ``append``: add ``item`` at the end."""
    args = [arg.replace("{}", item).replace("{i}", str(index)) for arg in template]
    return [*args, item] if append else args


@dataclass
class ArrayRecord:
    """What ``zfarm submit`` saved: enough to rebuild every job byte for byte."""

    name: str
    address: str
    command: list[str]
    indexes: list[int]
    items: list[str]  # what ``{}`` becomes for each job: its index, or its line of the args file
    append_item: bool = False  # an args file and no ``{}``: the line is the last argument (GNU parallel)
    keys: str = ""
    key_name: str = ""
    timeout_s: float | None = None
    mem_limit: int | None = None
    retries: int = 0
    max_running: int | None = None  # jobs of the array run at once, at most (the broker holds the rest)
    #: the array is a project of its name: its priority, and what each job asks of a worker
    priority: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cancelled: list[int] = field(default_factory=list)
    created_at: float = 0.0

    @property
    def session(self) -> str:
        return f"array-{self.name}"

    def job(self, position: int) -> CommandSpec:
        index, count = self.indexes[position], len(self.indexes)
        env = {**self.env, "ZFARM_ARRAY_NAME": self.name, "ZFARM_ARRAY_INDEX": str(index),
               "ZFARM_ARRAY_COUNT": str(count)}
        args = expand(self.command, self.items[position], index, self.append_item)
        return CommandSpec.of(args, cwd=self.cwd, env=env, check=True, retries=self.retries,
                              timeout_s=self.timeout_s)


def state_dir() -> Path:
    """Where array records live: ``$ZFARM_STATE_DIR``, else ``$XDG_DATA_HOME/zfarm``.

    (``~/.local/share/zfarm`` when ``XDG_DATA_HOME`` is not set.)
    """
    if os.environ.get("ZFARM_STATE_DIR"):
        return Path(os.environ["ZFARM_STATE_DIR"])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "zfarm"


def _path(name: str) -> Path:
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"array name {name!r}: use up to 64 letters, digits, '.', '_' or '-'")
    return state_dir() / "arrays" / f"{name}.json"


def new_name(command: list[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "", Path(command[0]).name)[:20] or "array"
    return f"{stem}-{secrets.token_hex(3)}"


def save(record: ArrayRecord, new: bool = False) -> Path:
    path = _path(record.name)
    if new and path.exists():
        raise ConfigError(f"an array named {record.name} exists already: `zfarm forget {record.name}` "
                          "first, or choose another --name")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(path)
    return path


def load(name: str) -> ArrayRecord:
    path = _path(name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no array named {name} was submitted from here (looked for {path}); "
                          "set ZFARM_STATE_DIR as when it was submitted") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the array record {path}: {exc}") from None
    return ArrayRecord(**data)


def remove(name: str) -> None:
    _path(name).unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class CancelledJob:
    """What a cancelled job of an array resolves to when its session is joined again."""

    index: int


def barrier() -> None:
    """A job that does nothing: see the module's docstring."""


class State(str, enum.Enum):
    """Where one job of an array stands."""

    PENDING = "pending"  # queued (or running for less than the 10 ms after which a start is told)
    RUNNING = "running"  # a worker started it
    OK = "ok"  # exited 0
    FAILED = "failed"  # exited non-zero, or a signal killed it
    TIMEOUT = "timeout"  # ran past --timeout and was killed (its output is kept)
    ERROR = "error"  # never ran to an exit: not found, time or memory limit, crash, lost
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class JobState:
    """One job of an array as a watcher sees it."""

    index: int
    state: State
    exit_code: int | None = None
    worker: str = ""
    host: str = ""
    run_s: float | None = None
    attempts: int = 0
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state not in (State.PENDING, State.RUNNING)

    @property
    def succeeded(self) -> bool:
        return self.state is State.OK

    @property
    def failed(self) -> bool:
        return self.state in (State.FAILED, State.TIMEOUT, State.ERROR)


def describe(index: int, future: concurrent.futures.Future[Any], where: JobRecord | None = None) -> JobState:
    """Job ``index``'s state from its future; ``where`` (its client's record of the job, if it ran)
    names the worker of a job that never ran to an exit (killed by a limit, crashed)."""
    if not future.done():
        return JobState(index, State.RUNNING if future.running() else State.PENDING)
    if future.cancelled():
        return JobState(index, State.CANCELLED)
    error = future.exception()
    if isinstance(error, CommandFailed) and isinstance(error.result, CommandResult):
        r = error.result
        state = State.TIMEOUT if r.timed_out else State.FAILED
        return JobState(index, state, r.returncode, r.worker, r.host, r.run_s, r.attempts, str(error))
    if error is not None:
        line = f"{type(error).__name__}: {error}".splitlines()[0]
        if where is None:
            return JobState(index, State.ERROR, error=line)
        return JobState(index, State.ERROR, None, where.worker, where.host, where.run_s, where.attempts, line)
    value = future.result()
    if isinstance(value, CancelledJob):
        return JobState(index, State.CANCELLED)
    if isinstance(value, CommandResult):
        v = value
        return JobState(index, State.OK, v.returncode, v.worker, v.host, v.run_s, v.attempts)
    return JobState(index, State.ERROR, error=f"unexpected result {value!r}")


def result_of(future: concurrent.futures.Future[Any]) -> CommandResult | None:
    """The command's result, whether it succeeded or failed (None: it did not run to an exit)."""
    if not future.done() or future.cancelled():
        return None
    error = future.exception()
    if isinstance(error, CommandFailed) and isinstance(error.result, CommandResult):
        return error.result
    value = None if error is not None else future.result()
    return value if isinstance(value, CommandResult) else None


class Attached:
    """An array's session, joined: every job submitted again, its future in ``futures`` (a cancelled
    job's number is skipped: its future is already resolved to a :class:`CancelledJob`).

    Raises (from the constructor):
        BrokerUnavailable: the broker did not answer.
    """

    def __init__(self, record: ArrayRecord, connect_timeout_s: float = 10.0) -> None:
        from zfarm.client.executor import Client, JobLimits, job_options
        from zfarm.projects import request_options

        self.record = record
        monitor.check_listening(record.address)
        self.client = Client(record.address, session=record.session, keys=record.keys or None,
                             key_name=record.key_name or None, connect_timeout_s=connect_timeout_s)
        try:
            # the command keeps its own time limit (and its output); the slot's is a backstop
            backstop = record.timeout_s + TIMEOUT_BACKSTOP_S if record.timeout_s else None
            options = job_options(backstop, record.mem_limit)
            if record.max_running:
                options["max_running"] = record.max_running  # read by the broker's scheduler
            # an array is a project: `zfarm project suspend NAME` and the status show it
            options.update(project=record.name, priority=record.priority)
            options.update(request_options(record.resources, record.tags))
            limited = JobLimits(self.client, options)
            cancelled = set(record.cancelled)
            self.futures: list[concurrent.futures.Future[Any]] = []
            for position, index in enumerate(record.indexes):
                if index in cancelled:  # its number used, no job: it never runs again, nothing is counted
                    self.futures.append(self.client._number_spent(CancelledJob(index)))
                else:
                    self.futures.append(limited.submit(run_command, record.job(position)))
        except BaseException:
            self.client.shutdown(wait=False)
            raise

    def states(self) -> list[JobState]:
        """Each job's state.

        Raises:
            Refused: another process took the session over (two watchers of one array at once).
        """
        for future in self.futures:
            if future.done() and not future.cancelled() and isinstance(error := future.exception(), Refused):
                raise error
        ran = self._ran()
        return [self.state(at, ran) for at in range(len(self.futures))]

    def state(self, at: int, ran: dict[str, JobRecord] | None = None) -> JobState:
        """The state of the array's job number ``at`` (its position, not its index)."""
        future = self.futures[at]
        where = (self._ran() if ran is None else ran).get(f"{self.client.id}:{getattr(future, 'seq', -1)}")
        return describe(self.record.indexes[at], future, where)

    def _ran(self) -> dict[str, JobRecord]:
        """Where each ended job ran, as its result said."""
        return {record.id: record for record in self.client.stats().records}

    def settle(self, timeout_s: float = ACCEPT_TIMEOUT_S) -> None:
        """Wait until every result the broker holds for the array has arrived (see the module docstring).

        Raises:
            ZfarmError: the broker did not accept the jobs within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        if _unaccepted(self.futures, deadline) or _unaccepted([self.client.submit(barrier)], deadline):
            raise ZfarmError(f"the broker at {self.record.address} did not take array "
                             f"{self.record.name}'s jobs back in time; try again")

    def wait_accepted(self, timeout_s: float) -> int:
        """Wait until the broker accepted every job; return how many it had not by ``timeout_s``."""
        return _unaccepted(self.futures, time.monotonic() + timeout_s)

    def wait(self, timeout_s: float | None, progress: bool = False) -> bool:
        """Wait for every job; False if ``timeout_s`` passed first. ``progress``: a bar on stderr."""
        if not progress:
            _, pending = concurrent.futures.wait(self.futures, timeout_s)
            return not pending
        from zfarm.progress import track

        done = concurrent.futures.as_completed(self.futures, timeout_s)
        try:
            for _ in track(done, len(self.futures), self.record.name):
                pass
        except concurrent.futures.TimeoutError:
            return False
        return True

    def leave(self) -> None:
        """Leave the session: unfinished jobs go on and every result stays held."""
        self.client.shutdown(wait=False)

    def forget(self) -> None:
        """End the session: the broker drops the array's jobs and results."""
        self.client.shutdown(wait=False, cancel_futures=True)


def _unaccepted(futures: list[concurrent.futures.Future[Any]], deadline: float) -> int:
    """Wait until the broker accepted each of ``futures`` (or it is over) or ``deadline`` passed;
    return how many it had not. Polled: acceptance is a count in the client, with no event to wait on."""
    waiting = list(futures)
    while True:
        waiting = [f for f in waiting if not (f.accepted() if isinstance(f, JobFuture) else f.done())]
        if not waiting or time.monotonic() >= deadline:
            return len(waiting)
        time.sleep(ACCEPT_POLL_S)


def read_args_file(lines: Iterator[str]) -> list[str]:
    """The jobs of an ``--args-file``: one a line, blank lines skipped (as GNU parallel)."""
    items = [line.rstrip("\r\n") for line in lines]
    items = [item for item in items if item.strip()]
    if len(items) > MAX_ARRAY_JOBS:
        raise ConfigError(f"--args-file: {TOO_MANY}")
    return items
