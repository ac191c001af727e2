"""Projects on the client side: an Executor whose jobs belong to a named project at the broker.

::

    client.project("nightly", priority=5) ──► Project ── submit / map / run ──► jobs with options
         {"project": "nightly", "priority": 5, "share": 1.0, "on_error": …, "phase": k, "resources": …}
    project.suspend() / resume() / cancel() / status() ──► PROJECT (a monitor connection) ──► PROJECT_REPLY

The project's settings travel with every job, so the broker knows the project again after a client
reconnects or the broker restarts from its journal. ``barrier()`` starts a new phase: the jobs
submitted after it wait at the broker until every job before it is over.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zfarm import protocol as p
from zfarm.client.futures import JobFuture
from zfarm.config import parse_amount
from zfarm.errors import ConfigError, DependencyFailed, ZfarmError
from zfarm.serialization import Upstream, error_line

if TYPE_CHECKING:
    from zfarm.client import Client
    from zfarm.client.executor import JobLimits
    from zfarm.client.shell import IOThread
    from zfarm.commands import CommandResult

ON_ERROR = ("continue", "suspend", "cancel")
#: argument types that hold no future: not walked
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
#: how long a project action waits for the broker's answer
ACTION_TIMEOUT_S = 10.0


def check_share(share: Any, what: str = "a project's share") -> float:
    """``share`` as a float, if the broker will take it.

    Raises:
        ConfigError: not a number from ``MIN_SHARE`` to ``MAX_SHARE`` (NaN and infinity included).
    """
    if not p.valid_share(share):
        raise ConfigError(f"{what} is a number from {p.MIN_SHARE:g} to {p.MAX_SHARE:g}, not {share!r}")
    return float(share)


@dataclass(frozen=True)
class ProjectStatus:
    """A project as the broker sees it now."""

    name: str
    state: str  # queued, running, suspended, done
    priority: int
    share: float
    submitted: int
    queued: int
    running: int
    done: int
    failed: int
    cancelled: int
    jobs_per_s: float  # finished over the last minute
    eta_s: float | None  # at that rate, until the queued and running jobs are over (None: unknown)
    why_suspended: str = ""
    unschedulable: str = ""
    slot_s: float = 0.0  # the slot-time its finished jobs took, in seconds (what fair share shares)

    @classmethod
    def from_view(cls, view: dict[str, Any]) -> ProjectStatus:
        return cls(**{k: view.get(k, "") for k in ("name", "state", "why_suspended", "unschedulable")},
                   **{k: view.get(k, 0) for k in ("priority", "share", "submitted", "queued", "running",
                                                  "done", "failed", "cancelled", "jobs_per_s")},
                   eta_s=view.get("eta_s"), slot_s=view.get("slot_s", 0.0))


class Project(concurrent.futures.Executor):
    """Jobs of one project: ``submit``, ``map`` and ``run`` as on the client, plus control.

    Made by :meth:`zfarm.Client.project`; it uses the client's connection and closes with it.
    """

    def __init__(self, client: Client, name: str, *, priority: int = 0, share: float = 1.0,
                 on_error: str = "continue", resources: Mapping[str, Any] | None = None,
                 tags: Iterable[str] | None = None, max_running: int | None = None) -> None:
        if not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isprintable():
            raise ConfigError(f"a project's name is 1 to 128 printable characters, not {name!r}")
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error is one of {', '.join(ON_ERROR)}, not {on_error!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ConfigError(f"a project's priority is an integer, not {priority!r}")
        self.client = client
        self.name = name
        self.priority = priority
        self.share = check_share(share)
        self.on_error = on_error
        self.phase = 0
        self._request = request_options(resources, tags)
        if max_running is not None:
            if not isinstance(max_running, int) or isinstance(max_running, bool) or max_running < 1:
                raise ConfigError(f"max_running is a whole number of 1 or more, not {max_running!r}")
            self._request["max_running"] = max_running  # the broker runs at most this many at once

    def _options(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        options = {**self.client._options, **self._request, **(extra or {}), "project": self.name,
                   "priority": self.priority, "share": self.share, "on_error": self.on_error}
        if self.phase:
            options["phase"] = self.phase
        return options

    # ---- the Executor ------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self.client._submit(fn, args, kwargs, self._options())

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, progress: bool = False) -> Iterator[Any]:
        return self.client._map(fn, iterables, timeout, chunksize, progress, self._options())

    def run(self, args: str | Sequence[str | os.PathLike[str]], *, shell: bool = False,
            cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
            check: bool = True, input: str | bytes | None = None) -> concurrent.futures.Future[CommandResult]:
        return self.client._run(args, shell, cwd, env, check, input, self._options())

    def with_options(self, *, resources: Mapping[str, Any] | None = None,
                     tags: Iterable[str] | None = None) -> JobLimits:
        """``submit``, ``map`` and ``run`` of this project with a resource request for those jobs
        (in the project's phase when each is submitted)."""
        from zfarm.client.executor import JobLimits  # (it imports this module)

        request = request_options(resources, tags)
        return JobLimits(self.client, lambda: self._options(request))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to release: the project lives on the client's connection (close the client)."""
        if cancel_futures:
            self.cancel()

    # ---- phases and control ------------------------------------------------------------------------

    def barrier(self) -> None:
        """Start a new phase: jobs submitted from now on start when every earlier job of it is over."""
        self.phase += 1

    def suspend(self) -> ProjectStatus:
        """Stop dispatching its queued jobs (running ones finish)."""
        return self._act(p.ProjectAction.SUSPEND)

    def resume(self) -> ProjectStatus:
        return self._act(p.ProjectAction.RESUME)

    def cancel(self) -> ProjectStatus:
        """Drop its queued jobs and kill its running ones; their futures are cancelled."""
        return self._act(p.ProjectAction.CANCEL)

    def set_priority(self, priority: int | None = None, share: float | None = None) -> ProjectStatus:
        """Change its priority or share, for its queued jobs too."""
        settings: dict[str, Any] = {}
        if priority is not None:
            self.priority = settings["priority"] = priority
        if share is not None:
            self.share = settings["share"] = check_share(share)
        return self._act(p.ProjectAction.SET, settings)

    def status(self) -> ProjectStatus:
        """Counts by state, throughput and ETA, as the broker has them."""
        return self._act(p.ProjectAction.LIST)

    def _act(self, action: p.ProjectAction, settings: dict[str, Any] | None = None) -> ProjectStatus:
        reply = act(self.client.address, action, self.name, settings, keys=self.client.settings.keys)
        for view in reply:
            if view.get("name") == self.name:
                return ProjectStatus.from_view(view)
        raise ZfarmError(f"the broker at {self.client.address} has no project {self.name!r} yet: submit a "
                         "job to it first")

    def __repr__(self) -> str:
        return f"<zfarm.Project {self.name!r} priority={self.priority} share={self.share:g}>"


def act(address: str, action: p.ProjectAction, name: str = "", settings: dict[str, Any] | None = None,
        timeout_s: float = ACTION_TIMEOUT_S, keys: str = "") -> list[dict[str, Any]]:
    """Ask the broker to act on a project; returns every project's view after it.

    Raises:
        ZfarmError: the broker refused (no such project, a key that may only look), saying why.
        BrokerUnavailable: no answer within ``timeout_s``.
    """
    from zfarm.monitor import ask

    reply = ask(address, p.Project(action.value, name, settings or {}), p.ProjectReply, timeout_s, keys=keys)
    if reply.error:
        raise ZfarmError(f"the broker at {address}: {reply.error}")
    return reply.projects


def request_options(resources: Mapping[str, Any] | None, tags: Iterable[str] | None) -> dict[str, Any]:
    """Job options asking for resources (``mem`` may be "4G") and tags."""
    options: dict[str, Any] = {}
    if resources:
        options["resources"] = {str(k): parse_amount(str(k), v) for k, v in resources.items()}
    if tags:
        options["tags"] = sorted({str(t) for t in tags})
    return options


def upstream_arguments(args: tuple[Any, ...], kwargs: dict[str, Any],
                       connection: IOThread) -> tuple[tuple[Any, ...], dict[str, Any], list[int]]:
    """Arguments with every future of this client's jobs (at top level, in lists, tuples and dicts)
    replaced: by its value if it is done, else by an ``Upstream`` placeholder the slot fills with
    the job's result. Returns them and the upstream job numbers, in placeholder order.

    Raises:
        ConfigError: a future of another client (the broker could not route its result).
        DependencyFailed: a future that is done but did not succeed.
    """
    if all(type(a) in _PLAIN for a in args) and all(type(v) in _PLAIN for v in kwargs.values()):
        return args, kwargs, []  # (the common case, at no cost)
    found = _Upstreams(connection)
    try:
        new_args = tuple(found.walk(a, 0) for a in args)
        new_kwargs = {k: found.walk(v, 0) for k, v in kwargs.items()}
    except BaseException:
        connection.unpin(found.after)  # (the futures before the one that failed were pinned for this job)
        raise
    return new_args, new_kwargs, found.after


class _Upstreams:
    """One job's arguments walked for futures (:func:`upstream_arguments`): the upstream job numbers
    found so far, each pinned once (its result stays held at the broker for this job)."""

    def __init__(self, connection: IOThread) -> None:
        self.connection = connection
        self.after: list[int] = []

    def walk(self, value: Any, depth: int) -> Any:
        if isinstance(value, JobFuture):
            return self.upstream(value)
        if depth > 8:
            return value
        if type(value) in (list, tuple):
            items = [self.walk(v, depth + 1) for v in value]
            return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
        if type(value) is dict:
            return {k: self.walk(v, depth + 1) for k, v in value.items()}
        return value

    def upstream(self, future: JobFuture) -> Any:
        connection, after = self.connection, self.after
        if future._owner is not connection:
            raise ConfigError(f"job {future.seq} belongs to another client: a job may depend only on "
                              "futures of its own client (pass the value, future.result(), instead)")
        connection.pin(future.seq)  # first: its result must stay held at the broker for this job
        if future.done():
            connection.unpin([future.seq])
            if future.cancelled():
                raise DependencyFailed("(not submitted)", f"{connection.client_id}:{future.seq}",
                                       "it was cancelled before this job was submitted")
            if (error := future.exception()) is not None:
                raise DependencyFailed("(not submitted)", f"{connection.client_id}:{future.seq}",
                                       f"it failed before this job was submitted: {error_line(error)}")
            return future.result()
        if future.seq not in after:
            after.append(future.seq)
        else:
            connection.unpin([future.seq])  # pinned once per dependent job
        return Upstream(after.index(future.seq))


def _holds_future(value: Any, depth: int) -> bool:
    """Whether ``value`` is a future or holds one in lists, tuples and dicts (as deep as
    :func:`upstream_arguments` looks)."""
    kind = type(value)
    if kind in _PLAIN:
        return False
    if kind is list or kind is tuple:  # (one pass over their types in C first: most hold plain values)
        return depth <= 8 and not set(map(type, value)) <= _PLAIN and any(
            _holds_future(v, depth + 1) for v in value)
    if kind is dict:
        return depth <= 8 and any(_holds_future(v, depth + 1) for v in value.values())
    return isinstance(value, JobFuture)


def cut_at_futures(items: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """A map's chunk cut so that each item with a future among its arguments (at top level or
    inside lists, tuples and dicts) is a chunk of its own, between the runs of items without."""
    pieces: list[list[tuple[Any, ...]]] = []
    plain: list[tuple[Any, ...]] = []
    for item in items:
        if any(type(arg) not in _PLAIN and _holds_future(arg, 0) for arg in item):
            if plain:
                pieces.append(plain)
                plain = []
            pieces.append([item])
        else:
            plain.append(item)
    if plain:
        pieces.append(plain)
    return pieces


def upstream_items(items: list[tuple[Any, ...]],
                   connection: IOThread) -> tuple[list[tuple[Any, ...]], list[int]]:
    """A map's chunk with futures replaced as :func:`upstream_arguments` replaces a job's arguments,
    and the upstream job numbers. Only a chunk of one item may hold futures (the map sends such an
    item as its own job, :func:`cut_at_futures`): a longer one is returned as it is.

    Raises:
        ConfigError: a future of another client.
        DependencyFailed: a future that is done but did not succeed.
    """
    if len(items) != 1:
        return items, []
    args, _, after = upstream_arguments(items[0], {}, connection)
    return [args], after
