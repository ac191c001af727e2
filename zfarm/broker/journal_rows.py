"""The journal's rows as read back, and the seals that prove them unchanged.

A seal is a hash of a row's table and columns, written with the row and checked when it is read
back: a row that fails it is :class:`Damaged`, never run or delivered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from zfarm.broker.state import Held
from zfarm.protocol import as_bytes


@dataclass(frozen=True, slots=True)
class JournalJob:
    client: str
    seq: int
    fn_id: bytes
    frames: list[bytes]
    options: dict[str, Any]
    queued_at: float  # epoch seconds
    digest: bytes
    losses: tuple[str, ...]
    attempts_before: int  # attempts of jobs it replaced under the same number (their results are void)


@dataclass(frozen=True, slots=True)
class JournalProject:
    """A project's state and settings, as the broker last changed them (suspend, resume, set, a job's
    options): read back after a restart, they win over the settings its jobs carried; and its counts
    as of the last turn that changed them while it was owed something."""

    name: str
    owner: str
    priority: int
    share: float
    on_error: str  # an OnError value
    suspended: bool
    why_suspended: str
    created_at: float  # epoch seconds
    #: its counts as of the turn that last changed them: submitted, done, failed, cancelled, and the
    #: slot-seconds its results measured (None: a row from a zfarm that did not keep them)
    counts: tuple[int, int, int, int, float] | None = None

    def to_state(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in _PROJECT_FIELDS}
        if self.counts is not None:
            state["counts"] = list(self.counts)
        return state

    @classmethod
    def from_row(cls, name: object, state: object) -> JournalProject:
        """From a row whose seal held; still checked field by field (a newer zfarm may add fields).

        Raises:
            ValueError: a field is missing or of the wrong type.
        """
        if not isinstance(name, str) or not isinstance(state, dict):
            raise ValueError("not a project row")
        values: list[Any] = [state.get(k) for k in _PROJECT_FIELDS]
        if not all(isinstance(v, kind) and not (kind is int and isinstance(v, bool))
                   for v, kind in zip(values, _PROJECT_KINDS, strict=True)):
            raise ValueError("a project row's field has the wrong type")
        counts = state.get("counts")
        if not (isinstance(counts, list) and len(counts) == 5  # (else unknown: the state and settings
                and all(type(n) is int and n >= 0 for n in counts[:4])  # still count, a suspension above all)
                and type(counts[4]) in (int, float) and 0.0 <= counts[4] < float("inf")):
            counts = None
        return cls(name, **dict(zip(_PROJECT_FIELDS, values, strict=True)),
                   counts=(counts[0], counts[1], counts[2], counts[3], float(counts[4])) if counts else None)


_PROJECT_FIELDS = ("owner", "priority", "share", "on_error", "suspended", "why_suspended", "created_at")
_PROJECT_KINDS: tuple[Any, ...] = (str, int, (int, float), str, bool, str, (int, float))


@dataclass(frozen=True, slots=True)
class Damaged:
    """A row that failed its seal: it is never run or delivered."""

    table: str  # clients, functions, jobs, results or projects
    client: str  # as read: it may itself be what changed (a project row: the project's name)
    seq: int  # the job's number (-1 for a client, function or project row)
    fn_id: bytes = b""  # a function row's id
    #: a project row's SQLite rowid: what deletes it, whatever its damaged name holds (-1: other rows)
    rowid: int = -1


@dataclass(slots=True)
class Recovered:
    """What a journal held when it was opened, oldest first."""

    clients: list[tuple[str, str, str]] = field(default_factory=list)  # id, session, CURVE key
    functions: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # client, fn_id, blob
    jobs: list[JournalJob] = field(default_factory=list)
    results: list[tuple[str, int, Held]] = field(default_factory=list)  # client, seq, result
    projects: list[JournalProject] = field(default_factory=list)
    damaged: list[Damaged] = field(default_factory=list)
    #: what the journal's write-ahead log lost before it was opened ("" if nothing)
    lost: str = ""


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


def pack_frames(frames: Iterable[Any]) -> bytes:
    return pack([as_bytes(f) for f in frames])


def seal(table: str, *columns: Any) -> bytes:
    """A row's seal: a hash of its table and columns (bytes, text, numbers), checked when read back."""
    h = hashlib.blake2b(table.encode(), digest_size=16)
    for column in columns:
        # bytes as they are (a payload may be large: no repr of it); text encoded; an integer as the
        # number SQLite gives back (an IntEnum's repr is not); anything else by repr
        raw = (column if isinstance(column, bytes) else column.encode() if isinstance(column, str)
               else str(int(column)).encode() if isinstance(column, int) else repr(column).encode())
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.digest()


def sound(table: str, stored: bytes, *columns: Any) -> bool:
    """Whether a row matches its seal (a row written before seals existed is taken as it is)."""
    return not stored or stored == seal(table, *columns)


def losses_of(raw: bytes) -> tuple[str, ...]:
    """A job's poison record (kept outside its seal: it changes): unreadable counts as none."""
    try:
        losses = unpack(raw)
    except (ValueError, msgpack.UnpackException):
        return ()
    return tuple(str(x) for x in losses) if isinstance(losses, list) else ()
