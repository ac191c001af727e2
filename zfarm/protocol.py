"""The zfarm wire protocol: one module, one frozen dataclass per message.

Every message is a ZeroMQ multipart message::

    frame 0   b"ZF" + version byte        protocol header (PROTOCOL_VERSION)
    frame 1   one byte                    Command
    frame 2   msgpack array               the envelope: the message's fields in order
    frame 3…  opaque bytes                user payloads (functions, arguments, results)

The broker prepends/strips the ROUTER routing id; nothing else differs between
directions. The broker decodes frames 0-2 only and routes payload frames
untouched: it never unpickles user data. ``decode`` validates everything it
reads and raises :class:`ProtocolError`; it never asserts.

See docs/protocol.md for the conversation between peers.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import msgpack

from zfarm.errors import FieldTooLarge, ProtocolError, VersionMismatch

PROTOCOL_VERSION = 5  # 2: results held until RECEIVED; sessions (ACCEPTED); 3: STARTED, RUNNING;
#                        4: RESULT rows carry a ResultKind; RECLAIM, PROJECT, PROJECT_REPLY, NOTICE;
#                        5: PEEK, PEEK_REPLY, CLUSTER
MAGIC = b"ZF"
HEADER = MAGIC + bytes([PROTOCOL_VERSION])
#: job numbers are 0 … 2**63 - 1 (they are stored as SQLite integers)
MAX_SEQ = 2**63 - 1
#: Envelopes are small (ids and counts); anything larger is an attack or a bug.
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
# Bounds on each text and map a peer puts in an envelope. The broker keeps, logs and shows these,
# so none may grow with what a peer chooses to send: ``decode`` refuses a field over its bound.
MAX_ID_CHARS = 128  # a role, a peer id, a client id in a row, a broker id
MAX_HOST_CHARS = 255  # a host name (a DNS name is at most 253)
MAX_TEXT_CHARS = 1024  # a reason (REFUSED, RECONNECT, DISCONNECT), a result's info line
MAX_INFO_COST = 4096  # a HELLO's or WELCOME's info map, measured by ``map_cost``
MAX_OPTIONS_COST = 65536  # a job's options map, measured by ``map_cost``
MAX_FN_ID_BYTES = 64  # a function id (a 16-byte digest)
#: room left for the envelope and other jobs' results beside one job's payload (client and worker
#: both check a payload against the broker's message limit less this)
ENVELOPE_ALLOWANCE = 64 * 1024
#: peer text in a log line is clipped to this many characters (see ``clip``)
LOG_TEXT_CHARS = 200
#: the most workers a CLUSTER report may count in any of its numbers
MAX_CLUSTER_WORKERS = 1_000_000
#: bounds of a CLUSTER report's ``every_s`` (seconds between its reports)
CLUSTER_EVERY_S = (0.05, 3600.0)
#: the longest run time a stats row may report (seconds, about 116 days): fair share charges it
MAX_RUN_S = 1e7
#: a project's share is from MIN_SHARE to MAX_SHARE: a job's slot-time over its share (what fair
#: share charges) stays a finite number, however long it ran (``MAX_RUN_S``)
MIN_SHARE, MAX_SHARE = 1e-6, 1e6


def valid_share(share: Any) -> bool:
    """Whether ``share`` is a number from MIN_SHARE to MAX_SHARE (NaN and infinity are not)."""
    return isinstance(share, (int, float)) and not isinstance(share, bool) and MIN_SHARE <= share <= MAX_SHARE


Frame = Any  # bytes, memoryview or zmq.Frame: payloads are never looked into


class Command(enum.IntEnum):
    HELLO = 1  # peer → broker: who I am
    WELCOME = 2  # broker → peer: the settings we both use
    REFUSED = 3  # broker → peer: you cannot be served (stable across versions)
    RECONNECT = 4  # broker → peer: I do not know you (I restarted?): say HELLO again
    HEARTBEAT = 5  # both ways, while otherwise quiet
    DISCONNECT = 6  # both ways: I am leaving
    READY = 7  # worker → broker: I can take `credit` more jobs
    JOBS = 8  # broker → worker: jobs to run (batched), functions it lacks
    RESULTS = 9  # worker → broker: finished jobs (batched), credit returned
    CANCEL_JOBS = 10  # broker → worker: drop or kill these jobs
    SUBMIT = 11  # client → broker: jobs (batched) for one function
    RESULT = 12  # broker → client: results (batched)
    CANCEL = 13  # client → broker: cancel these jobs
    STATUS = 14  # any peer → broker: send me a snapshot
    STATUS_REPLY = 15  # broker → peer: the snapshot
    HISTORY = 16  # any peer → broker: send me the records of the last finished jobs
    HISTORY_REPLY = 17  # broker → peer: those records
    RECEIVED = 18  # client → broker: these results arrived; the broker may forget them
    ACCEPTED = 19  # broker → session client: these jobs are held (in the journal, if any)
    STARTED = 20  # worker → broker: these jobs went into a slot (only those that run a while)
    RUNNING = 21  # broker → client: these jobs of yours started on a worker
    RECLAIM = 22  # broker → worker: give these jobs back if no slot has started them (RETURNED)
    PROJECT = 23  # client or monitor → broker: list, change, suspend, resume or cancel projects
    PROJECT_REPLY = 24  # broker → peer: the projects (after the change), or why it was refused
    NOTICE = 25  # broker → client: something about these jobs of yours worth a warning
    PEEK = 26  # client or monitor → broker → worker: a running job's output from these offsets
    PEEK_REPLY = 27  # worker → broker → asker: that output (bounded chunks), or why there is none
    CLUSTER = 28  # a cluster's monitor → broker: the workers it launched (answered with STATUS_REPLY)


class Role(str, enum.Enum):
    WORKER = "worker"
    CLIENT = "client"
    MONITOR = "monitor"


class Outcome(enum.IntEnum):
    """How a job ended, as carried in RESULTS and RESULT entries."""

    OK = 0  # payload: the pickled return value
    ERROR = 1  # payload: the pickled exception raised by the job
    CRASHED = 2  # payload: a pickled JobCrashed made by the worker
    LOST = 3  # no payload; the broker gave up on the job (info says why)
    CANCELLED = 4  # no payload; the job was cancelled before it finished
    RETURNED = 5  # no payload; worker → broker only: given back unrun (the worker is leaving)
    BUSY = 6  # no payload; broker → client only: the queue is full, send this job again later
    CORRUPTED = 7  # no payload; broker → client only: the journal's copy failed its seal (info says where)
    JOURNAL_FULL = 8  # no payload; broker → client only: refused, the journal cannot be written (info: why)


class ResultKind(enum.IntEnum):
    """What a client does with a RESULT row besides its outcome: behaviour never rests on ``info``."""

    PLAIN = 0  # the job's result (or failure) as its outcome says
    FUNCTION_MISSING = 1  # LOST, unaccepted: the broker let the function go; send it and the job again
    LIMIT = 2  # ERROR: the job outgrew a limit it was given (time, memory, result size): never retried
    PROJECT_SUSPENDED = 3  # a failure that suspended its project (on_error="suspend")
    REFUSED = 4  # LOST, unaccepted: the job's options cannot be taken (info: why); not sent again
    DEPENDENCY_FAILED = 5  # LOST: an upstream job (option "after") did not succeed (info names it)


class NoticeKind(enum.IntEnum):
    UNSCHEDULABLE = 1  # no connected worker could ever hold these jobs (text: why)


class PeekStatus(enum.IntEnum):
    """Where a job asked about by PEEK stands; chunks come only with RUNNING."""

    RUNNING = 0  # in a slot: the chunks read from its streams follow
    QUEUED = 1  # not started yet (waiting, queued, or held by a worker with no free slot)
    FINISHED = 2  # over (or not on this worker any more): its result holds the rest
    UNKNOWN = 3  # the broker knows no unfinished job or held result by that client and number


#: the most bytes of each stream one PEEK_REPLY carries
PEEK_CHUNK_BYTES = 64 * 1024
#: a PEEK's reply_to: a ROUTER routing id (ZeroMQ's are at most 255 bytes)
MAX_ROUTE_BYTES = 255
#: stream positions in PEEK and PEEK_REPLY lists: [stdout, stderr]
STREAMS = 2


class ProjectAction(str, enum.Enum):
    LIST = "list"
    SET = "set"  # settings: priority, share
    SUSPEND = "suspend"
    RESUME = "resume"
    CANCEL = "cancel"


# Row layouts of the batched messages (msgpack arrays inside the envelope).
# (Each layout's *_LIMITS: (column, bound) of its texts, bytes and maps; see MAX_* above.)
# JOBS row:    [client_id, seq, attempt, fn_id, nframes, options]
JOB_ROW = (str, int, int, bytes, int, dict)
JOB_ROW_LIMITS = ((0, MAX_ID_CHARS), (3, MAX_FN_ID_BYTES), (5, MAX_OPTIONS_COST))
# RESULTS row: [client_id, seq, attempt, outcome, nframes, info]
RESULTS_ROW = (str, int, int, int, int, str)
RESULTS_ROW_LIMITS = ((0, MAX_ID_CHARS), (5, MAX_TEXT_CHARS))
# SUBMIT row:  [seq, nframes, options]
SUBMIT_ROW = (int, int, dict)
SUBMIT_ROW_LIMITS = ((2, MAX_OPTIONS_COST),)
# RESULT row:  [seq, outcome, nframes, info, kind]   (kind: a ResultKind)
RESULT_ROW = (int, int, int, str, int)
RESULT_ROW_LIMITS = ((3, MAX_TEXT_CHARS),)
# job keys in CANCEL_JOBS: [client_id, seq]
KEY_ROW = (str, int)
KEY_ROW_LIMITS = ((0, MAX_ID_CHARS),)
_NUM = (int, float)
# RESULTS stats row, one per result row: [started_at, finished_at, run_s, peak_rss_bytes] (epoch seconds)
RUN_STATS_ROW = (_NUM, _NUM, _NUM, int)
# RESULT stats row: [worker_id, host, attempts, queued_at, started_at, finished_at, run_s, peak_rss_bytes]
JOB_STATS_ROW = (str, str, int, _NUM, _NUM, _NUM, _NUM, int)
JOB_STATS_ROW_LIMITS = ((0, MAX_ID_CHARS), (1, MAX_HOST_CHARS))


@dataclass(frozen=True, slots=True)
class Message:
    command: ClassVar[Command]
    #: isinstance checks for the envelope fields, in order (bool excluded from int).
    schema: ClassVar[tuple[type | tuple[type, ...], ...]] = ()


@dataclass(frozen=True, slots=True)
class Hello(Message):
    command = Command.HELLO
    schema = (str, str, str, int, int, dict)
    role: str
    peer_id: str
    host: str
    pid: int
    slots: int = 0
    #: open-ended facts: resources, session name, software versions
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    command = Command.WELCOME
    schema = (str, (int, float), int, int, dict)
    broker_id: str
    heartbeat_interval_s: float
    liveness: int
    max_message_bytes: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refused(Message):
    command = Command.REFUSED
    schema = (str,)
    reason: str


@dataclass(frozen=True, slots=True)
class Reconnect(Message):
    command = Command.RECONNECT
    schema = (str,)
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    command = Command.HEARTBEAT


@dataclass(frozen=True, slots=True)
class Disconnect(Message):
    command = Command.DISCONNECT
    schema = (str,)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ready(Message):
    command = Command.READY
    schema = (int,)
    credit: int


@dataclass(frozen=True, slots=True)
class Jobs(Message):
    """Jobs for a worker. Frames: one per fn_id in ``fns``, then each job's frames."""

    command = Command.JOBS
    schema = (list, list)
    fns: list[bytes]
    jobs: list[list[Any]]  # JOB_ROW
    frames: Sequence[Frame] = ()


@dataclass(frozen=True, slots=True)
class Results(Message):
    """Finished jobs from a worker, and the credit their slots free."""

    command = Command.RESULTS
    schema = (int, list, list, list)
    credit: int
    results: list[list[Any]]  # RESULTS_ROW
    frames: Sequence[Frame] = ()
    stats: list[list[Any]] = field(default_factory=list)  # RUN_STATS_ROW per result, or none
    kinds: list[int] = field(default_factory=list)  # a ResultKind per result, or none (all PLAIN)


@dataclass(frozen=True, slots=True)
class CancelJobs(Message):
    command = Command.CANCEL_JOBS
    schema = (list,)
    keys: list[list[Any]]  # KEY_ROW


@dataclass(frozen=True, slots=True)
class Submit(Message):
    """Jobs of one function. Frames: the function if ``with_fn``, then each job's frames."""

    command = Command.SUBMIT
    schema = (bytes, bool, list)
    fn_id: bytes
    with_fn: bool
    jobs: list[list[Any]]  # SUBMIT_ROW
    frames: Sequence[Frame] = ()


@dataclass(frozen=True, slots=True)
class Result(Message):
    command = Command.RESULT
    schema = (list, list)
    results: list[list[Any]]  # RESULT_ROW
    frames: Sequence[Frame] = ()
    stats: list[list[Any]] = field(default_factory=list)  # JOB_STATS_ROW per result, or none


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    command = Command.CANCEL
    schema = (list,)
    seqs: list[int]


@dataclass(frozen=True, slots=True)
class Status(Message):
    command = Command.STATUS


@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    command = Command.STATUS_REPLY
    schema = (dict,)
    snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class History(Message):
    command = Command.HISTORY
    schema = (int,)
    last: int  # how many of the newest records; 0: all the broker keeps


@dataclass(frozen=True, slots=True)
class HistoryReply(Message):
    command = Command.HISTORY_REPLY
    schema = (list, list)
    columns: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True, slots=True)
class Received(Message):
    """Results that reached the client: until it says so, the broker holds them to send again."""

    command = Command.RECEIVED
    schema = (list, int)
    seqs: list[int]
    below: int = 0  # and every result of a seq under this one


@dataclass(frozen=True, slots=True)
class Accepted(Message):
    """Jobs a session's broker holds for it, so that the client may leave without losing them."""

    command = Command.ACCEPTED
    schema = (list,)
    seqs: list[int]


@dataclass(frozen=True, slots=True)
class Started(Message):
    """Jobs that a slot started (and that still run): the broker tells their clients."""

    command = Command.STARTED
    schema = (list,)
    keys: list[list[Any]]  # KEY_ROW


@dataclass(frozen=True, slots=True)
class Running(Message):
    """A client's jobs that started on a worker: their futures say ``running()``."""

    command = Command.RUNNING
    schema = (list,)
    seqs: list[int]


@dataclass(frozen=True, slots=True)
class Reclaim(Message):
    """Prefetched jobs the broker wants back (a slot is free elsewhere): those a slot has not started
    come back as RETURNED, with their credit; started ones run on and report as usual."""

    command = Command.RECLAIM
    schema = (list,)
    keys: list[list[Any]]  # KEY_ROW


@dataclass(frozen=True, slots=True)
class Project(Message):
    """Act on a project by name (``action``: a ProjectAction; LIST takes no name)."""

    command = Command.PROJECT
    schema = (str, str, dict)
    action: str
    name: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProjectReply(Message):
    """Every project's view after the action, or ``error`` saying why it was refused."""

    command = Command.PROJECT_REPLY
    schema = (list, str)
    projects: list[dict[str, Any]]
    error: str = ""


@dataclass(frozen=True, slots=True)
class Notice(Message):
    command = Command.NOTICE
    schema = (int, list, str)
    kind: int  # a NoticeKind
    seqs: list[int]
    text: str


@dataclass(frozen=True, slots=True)
class Peek(Message):
    """Ask for a running job's output: each stream from a byte offset (-1: that stream not wanted).

    An asker leaves ``reply_to`` empty; the broker fills it with the asker's route when it forwards
    the request to the job's worker, which puts it in its reply: the broker keeps nothing between.
    """

    command = Command.PEEK
    schema = (str, int, list, int, bytes)
    client_id: str
    seq: int
    offsets: list[int]  # [stdout, stderr]
    ask: int = 0  # the asker's number for this request, echoed in the reply
    reply_to: bytes = b""


@dataclass(frozen=True, slots=True)
class PeekReply(Message):
    """A job's output from the asked offsets (at most PEEK_CHUNK_BYTES a stream), or its status.

    Frames: with RUNNING, the stdout chunk and the stderr chunk; otherwise none. ``sizes``: each
    stream's length when read, ``ids``: which run of the job's output it is (another one: the job
    started over, as a command run again by its retries).
    """

    command = Command.PEEK_REPLY
    schema = (str, int, int, int, list, list, list, bytes)
    client_id: str
    seq: int
    ask: int
    status: int  # a PeekStatus
    offsets: list[int] = field(default_factory=lambda: [-1, -1])  # where each chunk starts
    sizes: list[int] = field(default_factory=lambda: [-1, -1])
    ids: list[int] = field(default_factory=lambda: [0, 0])
    reply_to: bytes = b""
    frames: Sequence[Frame] = ()


@dataclass(frozen=True, slots=True)
class ClusterReport(Message):
    """What a cluster launched, said by its supervisor every ``every_s`` (and ``leaving`` when it
    closes); the broker keeps the last report per ``cluster_id`` for its snapshot and answers with
    STATUS_REPLY, so one round trip both reports and reads the broker's view."""

    command = Command.CLUSTER
    schema = (str, str, str, int, int, int, int, int, int, int, list, (int, float), bool)
    cluster_id: str  # "slurm-3f2a1c": unique to one cluster object
    name: str  # a run profile's name, or ""
    launcher: str  # "local", "ssh", "slurm", ...
    requested: int  # workers wanted now (scale's n, or adapt's current decision)
    launched: int  # started and not ended (any state but failed and stopped)
    running: int  # registered with the broker
    coming: int  # launched or about to be, not yet registered (pending, starting, restarting)
    pending: int  # of those coming: waiting for resources in a batch system
    retiring: int  # asked to finish their jobs and leave
    failed: int  # given up on (died at start too often)
    adapt: list[int]  # [minimum, maximum] under adapt(); [] with a fixed size
    every_s: float  # seconds between reports: the broker forgets a cluster silent for a few of them
    leaving: bool = False  # the cluster closed: forget it now


MESSAGE_TYPES: dict[Command, type[Message]] = {
    cls.command: cls
    for cls in (
        Hello, Welcome, Refused, Reconnect, Heartbeat, Disconnect, Ready, Jobs, Results,
        CancelJobs, Submit, Result, Cancel, Status, StatusReply, History, HistoryReply, Received,
        Accepted, Started, Running, Reclaim, Project, ProjectReply, Notice, ClusterReport, Peek, PeekReply,
    )
}
_ENVELOPE_FIELDS: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls) if f.name != "frames") for cls in MESSAGE_TYPES.values()
}
#: the bound of each text, bytes and map field of an envelope (rows are bounded by *_ROW_LIMITS)
_FIELD_LIMITS: dict[type[Message], dict[str, int]] = {
    Hello: {"role": MAX_ID_CHARS, "peer_id": MAX_ID_CHARS, "host": MAX_HOST_CHARS, "info": MAX_INFO_COST},
    Welcome: {"broker_id": MAX_ID_CHARS, "info": MAX_INFO_COST},
    Refused: {"reason": MAX_TEXT_CHARS},
    Reconnect: {"reason": MAX_TEXT_CHARS},
    Disconnect: {"reason": MAX_TEXT_CHARS},
    Submit: {"fn_id": MAX_FN_ID_BYTES},
    Project: {"action": MAX_ID_CHARS, "name": MAX_ID_CHARS, "settings": MAX_INFO_COST},
    Notice: {"text": MAX_TEXT_CHARS},
    ClusterReport: {"cluster_id": MAX_ID_CHARS, "name": MAX_ID_CHARS, "launcher": MAX_ID_CHARS, "adapt": 2},
    Peek: {"client_id": MAX_ID_CHARS, "reply_to": MAX_ROUTE_BYTES},
    PeekReply: {"client_id": MAX_ID_CHARS, "reply_to": MAX_ROUTE_BYTES},
}
#: the same, as (position in the envelope, bound, name for a refusal) per message type
_ENVELOPE_LIMITS: dict[type[Message], tuple[tuple[int, int, str], ...]] = {
    cls: tuple((_ENVELOPE_FIELDS[cls].index(name), limit, f"{cls.command.name} {name}")
               for name, limit in _FIELD_LIMITS.get(cls, {}).items())
    for cls in MESSAGE_TYPES.values()
}


def encode(msg: Message) -> list[Frame]:
    """Turn a message into the frames to send (without any routing id)."""
    cls = type(msg)
    envelope = [getattr(msg, name) for name in _ENVELOPE_FIELDS[cls]]
    out: list[Frame] = [HEADER, _COMMAND_BYTES[cls.command], msgpack.packb(envelope, use_bin_type=True)]
    if _FRAMES_AT[cls] is not None:
        out.extend(msg.frames)  # type: ignore[attr-defined]
    return out


_COMMAND_BYTES = {c: bytes([c]) for c in Command}
_HELLO_BYTE = _COMMAND_BYTES[Command.HELLO]


def buffer_of(frame: Frame) -> Any:
    """The bytes-like view of a frame (zmq.Frame exposes ``.buffer``)."""
    return getattr(frame, "buffer", frame)


def as_bytes(frame: Frame) -> bytes:
    """A frame's content as bytes (copied only if it is not bytes already)."""
    return frame if isinstance(frame, bytes) else bytes(buffer_of(frame))


def decode(frames: Sequence[Frame]) -> Message:
    """Validate frames and build the message they carry.

    Raises:
        ProtocolError: the frames are not a well-formed message of this version. Nothing else: what
            a peer sends can end no process (broker, worker or client), even through a check missed.
    """
    try:
        return _decode(frames)
    except ProtocolError:
        raise
    except Exception as exc:  # a check missed: still bad input (and a bug in zfarm to report)
        raise ProtocolError(f"a message escaped the protocol's checks ({type(exc).__name__}: {exc}; a bug "
                            f"in zfarm)") from exc


def _decode(frames: Sequence[Frame]) -> Message:
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}")
    cmd_bytes = as_bytes(frames[1])
    if as_bytes(frames[0]) != HEADER:
        return _foreign(frames, cmd_bytes)
    cls = _BY_COMMAND_BYTES.get(cmd_bytes)
    if cls is None:
        raise ProtocolError(f"unknown command {cmd_bytes[:8]!r}")
    raw = as_bytes(frames[2])
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise ProtocolError(f"{cls.__name__} envelope of {len(raw)} bytes is over the limit")
    try:
        envelope = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"{cls.__name__} envelope is not valid msgpack: {exc}") from None
    # Every message of every job comes through here: the usual envelope is told by one comparison of
    # its fields' exact types, and the message is made from it by position (no names, no dict).
    if type(envelope) is not list or list(map(type, envelope)) != _USUAL_ENVELOPE[cls]:
        _check_envelope(cls, envelope)
    for position, limit, what in _ENVELOPE_LIMITS[cls]:
        check_size(envelope[position], limit, what)
    frames_at = _FRAMES_AT[cls]
    if frames_at is not None:
        payload = list(frames[3:])
        envelope.insert(frames_at, payload)
        msg = cls(*envelope)
        _FRAME_RULES[cls](msg, len(payload))
        return msg
    if len(frames) > 3:
        raise ProtocolError(f"{cls.__name__} carries no payload frames, got {len(frames) - 3}")
    msg = cls(*envelope)
    _check_plain_rows(msg)
    return msg


def _check_envelope(cls: type[Message], envelope: Any) -> None:
    """The whole check of an envelope whose field types are not the usual ones (a choice, or wrong)."""
    names = _ENVELOPE_FIELDS[cls]
    if not isinstance(envelope, list) or len(envelope) != len(names):
        raise ProtocolError(f"{cls.__name__} envelope must be an array of {len(names)} fields")
    for name, value, kind in zip(names, envelope, cls.schema, strict=True):
        if not _is(value, kind):
            raise ProtocolError(f"{cls.__name__}.{name} has the wrong type {type(value).__name__}")


def _foreign(frames: Sequence[Frame], cmd_bytes: bytes) -> Refused:
    """A message under another header: another version's REFUSED is read, the rest rejected."""
    header = as_bytes(frames[0])
    if len(header) != 3 or header[:2] != MAGIC:
        raise ProtocolError(f"not a zfarm message (header {header[:8]!r})")
    if cmd_bytes != _COMMAND_BYTES[Command.REFUSED]:  # REFUSED is readable in every version
        raise VersionMismatch(header[2], PROTOCOL_VERSION)
    try:
        envelope = msgpack.unpackb(as_bytes(frames[2]), raw=False)
        reason = str(envelope[0])
    except Exception:
        reason = "the broker speaks another protocol version"
    return Refused(reason)


_BY_COMMAND_BYTES = {bytes([c]): cls for c, cls in MESSAGE_TYPES.items()}


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int to isinstance, never to the protocol
        return kind is bool or (isinstance(kind, tuple) and bool in kind)
    return isinstance(value, kind)


def check_rows(rows: list[Any], layout: tuple[Any, ...], what: str,
               limits: tuple[tuple[int, int], ...] = ()) -> None:
    """Validate batched rows (each an array laid out as ``layout``; ``limits``: (column, bound) pairs)."""
    usual = _usual_types(layout)
    for row in rows:
        if type(row) is not list or list(map(type, row)) != usual:  # the hot path: one comparison
            _check_row_types(row, layout, what)
        for column, limit in limits:  # the common case inline: a short text, an empty map
            value = row[column]
            if len(value) > limit or (isinstance(value, dict) and value and map_cost(value, limit) > limit):
                check_size(value, limit, f"{what} row field {column}")


#: by the layout's id (hashing the layout itself would cost as much as the check): (layout, types);
#: the layout is kept in its entry, so its id stays its own; bounded for layouts made on the fly
_USUAL_TYPES: dict[int, tuple[tuple[Any, ...], list[type]]] = {}


def _usual_types(layout: tuple[Any, ...]) -> list[type]:
    """The exact types a row of ``layout`` usually has (the last of a choice: float for a number)."""
    known = _USUAL_TYPES.get(id(layout))
    if known is None:
        if len(_USUAL_TYPES) >= 256:
            _USUAL_TYPES.clear()
        known = _USUAL_TYPES[id(layout)] = (layout, [kind if isinstance(kind, type) else kind[-1]
                                                     for kind in layout])
    return known[1]


#: each message type's envelope field types as they usually come (the last of a choice: float for a
#: number); anything else gets the whole check
_USUAL_ENVELOPE: dict[type[Message], list[type]] = {
    cls: _usual_types(cls.schema) for cls in MESSAGE_TYPES.values()
}
#: where the payload frames go among a message's fields (None: it carries none)
_FRAMES_AT: dict[type[Message], int | None] = {
    cls: next((i for i, f in enumerate(fields(cls)) if f.name == "frames"), None)
    for cls in MESSAGE_TYPES.values()
}


def _check_row_types(row: Any, layout: tuple[Any, ...], what: str) -> None:
    if not isinstance(row, list) or len(row) != len(layout):
        raise ProtocolError(f"{what} row must be an array of {len(layout)} fields")
    for value, kind in zip(row, layout, strict=True):
        if type(value) is not kind and not _is(value, kind):
            raise ProtocolError(f"{what} row field has the wrong type {type(value).__name__}")


def check_size(value: Any, limit: int, what: str) -> None:
    """Refuse a text, bytes or map field over its bound.

    Raises:
        FieldTooLarge: naming the field, its bound and (for a text) its length.
    """
    if isinstance(value, dict):
        if map_cost(value, limit) > limit:
            raise FieldTooLarge(what, limit)
    elif len(value) > limit:
        raise FieldTooLarge(what, limit, len(value))


def map_cost(value: Any, budget: int) -> int:
    """What a map (or any msgpack value) weighs against ``budget``: each text or bytes its length,
    each list or map 1 plus its number of entries, anything else 1 — and its entries in turn.

    Counting stops as soon as the budget is passed, so a map of a million keys costs no more to
    refuse than one just over the budget.
    """
    cost = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            cost += len(item)
        elif isinstance(item, dict):
            cost += 1 + len(item)
            if cost <= budget:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, list):
            cost += 1 + len(item)
            if cost <= budget:
                stack.extend(item)
        else:
            cost += 1
        if cost > budget:
            break
    return cost


def clip(text: str, limit: int = LOG_TEXT_CHARS) -> str:
    """Peer text made fit for a log line: at most ``limit`` characters, control characters escaped.

    A log handler may spend time that grows faster than the line (rich wraps and highlights it),
    so every peer-chosen text (a host, a reason, an info line) goes through here before logging.
    """
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def is_hello(frames: Sequence[Frame]) -> bool:
    """Whether these frames (without a routing id) claim to be a HELLO of this version."""
    return len(frames) > 1 and as_bytes(frames[0]) == HEADER and as_bytes(frames[1]) == _HELLO_BYTE


def _check_seqs(seqs: list[Any], what: str) -> None:
    # (in C: exact ints only, which leaves bools out, then their range)
    if seqs and (set(map(type, seqs)) != _JUST_INT or min(seqs) < 0 or max(seqs) > MAX_SEQ):
        raise ProtocolError(f"{what} seqs must be integers from 0 to {MAX_SEQ}")


_JUST_INT = {int}


def _check_jobs_frames(msg: Jobs, nframes: int) -> None:
    check_rows(msg.jobs, JOB_ROW, "JOBS", JOB_ROW_LIMITS)
    if not all(isinstance(f, bytes) for f in msg.fns):
        raise ProtocolError("JOBS fns must be byte strings")
    for fn_id in msg.fns:
        check_size(fn_id, MAX_FN_ID_BYTES, "JOBS fn id")
    _check_count(msg, len(msg.fns) + _sum_frames(msg.jobs, 4), nframes)


def _check_results_frames(msg: Results, nframes: int) -> None:
    check_rows(msg.results, RESULTS_ROW, "RESULTS", RESULTS_ROW_LIMITS)
    _check_stats(msg.stats, RUN_STATS_ROW, len(msg.results), "RESULTS")
    if msg.kinds and (len(msg.kinds) != len(msg.results) or set(map(type, msg.kinds)) != _JUST_INT
                      or not all(k in _KINDS for k in msg.kinds)):  # (types first: a list is unhashable)
        raise ProtocolError(f"RESULTS kinds must be one ResultKind per result, or none: {msg.kinds[:8]}")
    _check_count(msg, _sum_frames(msg.results, 4), nframes)


def _check_submit_frames(msg: Submit, nframes: int) -> None:
    check_rows(msg.jobs, SUBMIT_ROW, "SUBMIT", SUBMIT_ROW_LIMITS)
    _check_seqs([row[0] for row in msg.jobs], "SUBMIT")
    _check_count(msg, int(msg.with_fn) + _sum_frames(msg.jobs, 1), nframes)


def _check_result_frames(msg: Result, nframes: int) -> None:
    check_rows(msg.results, RESULT_ROW, "RESULT", RESULT_ROW_LIMITS)
    _check_stats(msg.stats, JOB_STATS_ROW, len(msg.results), "RESULT", JOB_STATS_ROW_LIMITS)
    _check_count(msg, _sum_frames(msg.results, 2), nframes)


def _check_peek_reply_frames(msg: PeekReply, nframes: int) -> None:
    _check_peek_reply(msg)
    _check_count(msg, STREAMS if msg.status == PeekStatus.RUNNING else 0, nframes)
    if not all(memoryview(buffer_of(f)).nbytes <= PEEK_CHUNK_BYTES for f in msg.frames):
        raise ProtocolError(f"PEEK_REPLY chunks must be at most {PEEK_CHUNK_BYTES} bytes")


def _check_count(msg: Message, expected: int, nframes: int) -> None:
    if expected != nframes:
        raise ProtocolError(f"{type(msg).__name__} announces {expected} payload frames, carries {nframes}")


#: the checks of each message type that carries payload frames (its rows and its frame count)
_FRAME_RULES: dict[type[Message], Callable[[Any, int], None]] = {
    Jobs: _check_jobs_frames, Results: _check_results_frames, Submit: _check_submit_frames,
    Result: _check_result_frames, PeekReply: _check_peek_reply_frames,
}


_KINDS = {int(k) for k in ResultKind}


def _check_stats(stats: list[Any], layout: tuple[Any, ...], rows: int, what: str,
                 limits: tuple[tuple[int, int], ...] = ()) -> None:
    if stats and len(stats) != rows:
        raise ProtocolError(f"{what} carries {len(stats)} stats rows for {rows} results")
    check_rows(stats, layout, f"{what} stats", limits)
    if not stats:
        return
    # By column, in C (this runs for every result): a sum is finite only if each of its terms is
    first, run = layout.index(_NUM), len(layout) - 2  # the times: from the first number to run_s
    if len(stats) == 1:  # (one job a message, the usual) the same test without the columns
        row = stats[0]
        if 0.0 <= row[run] <= MAX_RUN_S and math.isfinite(sum(row[first:run])):
            return
    columns = list(zip(*stats, strict=True))[first:run + 1]
    runs = columns[-1]
    if not (all(map(math.isfinite, map(sum, columns))) and min(runs) >= 0.0 and max(runs) <= MAX_RUN_S):
        bad = next((row for row in stats if not (0.0 <= row[run] <= MAX_RUN_S  # (False for NaN too)
                                                 and all(map(math.isfinite, row[first:run])))), stats[0])
        raise ProtocolError(f"{what} stats rows carry finite times and a run time from 0 to "
                            f"{MAX_RUN_S:g} s, not {bad[first:run + 1]}")


def _sum_frames(rows: list[list[Any]], column: int) -> int:
    total = 0
    for row in rows:
        n = row[column]
        if n < 0:
            raise ProtocolError("negative frame count")
        total += n
    return total


def _check_plain_rows(msg: Message) -> None:
    if isinstance(msg, (CancelJobs, Started, Reclaim)):
        check_rows(msg.keys, KEY_ROW, msg.command.name, KEY_ROW_LIMITS)
    elif isinstance(msg, (Cancel, Received, Accepted, Running, Notice)):
        _check_seqs(msg.seqs, msg.command.name)
        if isinstance(msg, Received):
            _check_seqs([msg.below], "RECEIVED below")
    elif isinstance(msg, Peek):
        _check_seqs([msg.seq], "PEEK")
        _check_numbers(msg.offsets, -1, "PEEK offsets")
        if not 0 <= msg.ask <= MAX_SEQ:
            raise ProtocolError(f"PEEK ask must be an integer from 0 to {MAX_SEQ}")
    elif isinstance(msg, History) and msg.last < 0:
        raise ProtocolError("HISTORY last must not be negative")
    elif isinstance(msg, HistoryReply) and not all(isinstance(r, list) for r in msg.rows):
        raise ProtocolError("HISTORY_REPLY rows must be arrays")
    elif isinstance(msg, ClusterReport):
        _check_cluster(msg)
    elif isinstance(msg, Hello) and not msg.host.isprintable():  # shown in `zfarm status`, logs
        raise ProtocolError("HELLO host must be printable text (no control characters)")


_CLUSTER_COUNTS = ("requested", "launched", "running", "coming", "pending", "retiring", "failed")


def _check_cluster(msg: ClusterReport) -> None:
    if not msg.cluster_id:
        raise ProtocolError("CLUSTER cluster_id must not be empty")
    for name in ("cluster_id", "name", "launcher"):  # shown on terminals: no escape sequences
        if not getattr(msg, name).isprintable():
            raise ProtocolError(f"CLUSTER {name} must be printable text (no control characters)")
    for name in _CLUSTER_COUNTS:
        if not 0 <= getattr(msg, name) <= MAX_CLUSTER_WORKERS:
            raise ProtocolError(f"CLUSTER {name} must be from 0 to {MAX_CLUSTER_WORKERS}")
    if msg.pending > msg.coming:
        raise ProtocolError("CLUSTER pending counts workers that are coming: it cannot be more than coming")
    adapt = msg.adapt
    if adapt and (len(adapt) != 2 or not all(_is(n, int) for n in adapt)
                  or not 0 <= adapt[0] <= adapt[1] <= MAX_CLUSTER_WORKERS):
        raise ProtocolError(f"CLUSTER adapt must be [] or [minimum, maximum] with 0 <= minimum <= maximum <= "
                            f"{MAX_CLUSTER_WORKERS}")
    low, high = CLUSTER_EVERY_S
    if not low <= msg.every_s <= high:  # NaN fails this too
        raise ProtocolError(f"CLUSTER every_s must be from {low:g} to {high:g} seconds")


def _check_numbers(values: list[Any], least: int, what: str) -> None:
    """One integer per stream, each from ``least`` to MAX_SEQ."""
    if len(values) != STREAMS or not all(_is(v, int) and least <= v <= MAX_SEQ for v in values):
        raise ProtocolError(f"{what} must be {STREAMS} integers from {least} to {MAX_SEQ}")


_PEEK_STATUSES = {int(s) for s in PeekStatus}


def _check_peek_reply(msg: PeekReply) -> None:
    _check_seqs([msg.seq], "PEEK_REPLY")
    if not 0 <= msg.ask <= MAX_SEQ:
        raise ProtocolError(f"PEEK_REPLY ask must be an integer from 0 to {MAX_SEQ}")
    if msg.status not in _PEEK_STATUSES:
        raise ProtocolError(f"PEEK_REPLY status {msg.status} is not a PeekStatus")
    _check_numbers(msg.offsets, -1, "PEEK_REPLY offsets")
    _check_numbers(msg.sizes, -1, "PEEK_REPLY sizes")
    _check_numbers(msg.ids, 0, "PEEK_REPLY ids")


#: DISCONNECT reason of a session's client that is done with the session: the broker forgets it
END_SESSION = "session ended"
#: functions a worker (and each of its slots) keeps; the broker mirrors the worker's cache
FN_CACHE_SIZE = 64
#: LOST info for a job whose function the broker no longer had; the client sends it again
FUNCTION_MISSING = "function missing at the broker: the client sends it again"


def remember_fn(cache: dict[bytes, Any], fn_id: bytes, value: Any, size: int = FN_CACHE_SIZE) -> None:
    """Add to a bounded function cache, forgetting the oldest first.

    Both ends of a link apply this same rule in the same order (the broker to what
    it sent a worker, the worker to what it received; a worker to what it sent a
    slot, the slot to what it received), so each knows what the other still holds.
    """
    cache.pop(fn_id, None)
    cache[fn_id] = value
    while len(cache) > size:
        del cache[next(iter(cache))]


def payload_limit(max_message_bytes: int) -> int | None:
    """The most bytes one job's payload (its function and arguments, or its result) may take under
    a broker's message limit, leaving ``ENVELOPE_ALLOWANCE`` for the rest of the message; None
    while the limit is not known (0: no WELCOME yet)."""
    return max_message_bytes - ENVELOPE_ALLOWANCE if max_message_bytes else None


def split_frames(frames: Sequence[Frame], counts: Sequence[int]) -> list[list[Frame]]:
    """Cut a flat payload into one list of frames per row."""
    out: list[list[Frame]] = []
    pos = 0
    for n in counts:
        out.append(list(frames[pos : pos + n]))
        pos += n
    return out


# ---- typed rows: each batched row as a small record, read by name, never by position -------------
# NamedTuples: made from a decoded row (already checked against its layout) at the cost of a tuple.


class JobRow(NamedTuple):
    """A JOBS row: one job for a worker."""

    client_id: str
    seq: int
    attempt: int
    fn_id: bytes
    nframes: int
    options: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_wire(cls, row: list[Any]) -> JobRow:
        """From a row :func:`decode` has checked against JOB_ROW."""
        return cls._make(row)


class ResultsRow(NamedTuple):
    """A RESULTS row: one finished job, from a worker."""

    client_id: str
    seq: int
    attempt: int
    outcome: int
    nframes: int
    info: str

    def to_wire(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_wire(cls, row: list[Any]) -> ResultsRow:
        """From a row :func:`decode` has checked against RESULTS_ROW."""
        return cls._make(row)


class SubmitRow(NamedTuple):
    """A SUBMIT row: one job of the message's function."""

    seq: int
    nframes: int
    options: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_wire(cls, row: list[Any]) -> SubmitRow:
        """From a row :func:`decode` has checked against SUBMIT_ROW."""
        return cls._make(row)


class ResultRow(NamedTuple):
    """A RESULT row: one job's end, for its client."""

    seq: int
    outcome: int
    nframes: int
    info: str
    kind: int = ResultKind.PLAIN

    def to_wire(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_wire(cls, row: list[Any]) -> ResultRow:
        """From a row :func:`decode` has checked against RESULT_ROW."""
        return cls._make(row)


class RunStats(NamedTuple):
    """A RESULTS stats row: when and how long a job ran, and its peak memory."""

    started_at: float  # epoch seconds
    finished_at: float
    run_s: float
    peak_rss_bytes: int

    @classmethod
    def from_wire(cls, row: list[Any]) -> RunStats:
        return cls._make(row)


NO_RUN_STATS = RunStats(0.0, 0.0, 0.0, 0)


class JobStats(NamedTuple):
    """A RESULT stats row: where and when a job ran, for its client's records."""

    worker_id: str
    host: str
    attempts: int
    queued_at: float  # epoch seconds
    started_at: float
    finished_at: float
    run_s: float
    peak_rss_bytes: int

    def to_wire(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_wire(cls, row: list[Any]) -> JobStats:
        return cls._make(row)
