"""The broker's records of jobs and peers: plain data the scheduler keeps and changes.

One source of truth: a job's ``state`` and the worker whose ``jobs`` hold it say
where the job is; a worker's ``credit`` is what the worker last said it can take.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zfarm import protocol as p
from zfarm.broker.records import PerSecond

Route = bytes  # a ROUTER routing id


@dataclass(frozen=True, slots=True)
class Auth:
    """Who a peer is by its CURVE key: the roles its key may take, and the key itself."""

    roles: frozenset[str]
    key: str


class JobState(str, enum.Enum):
    """Where a job is; it moves only through :func:`zfarm.broker.jobstate.JobMoves.move`."""

    SUBMITTED = "submitted"  # accepted, not yet in a queue
    WAITING = "waiting"  # its phase has not begun: earlier jobs of its client's project are unfinished
    QUEUED = "queued"
    ASSIGNED = "assigned"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class Departure(str, enum.Enum):
    """Why a peer's record ends. Behaviour depends on the member, never on its text."""

    LEFT = "left"
    RECONNECTED = "reconnected"
    REPLACED = "replaced by a new HELLO on its connection"
    ENDED_SESSION = "ended its session"
    UNREACHABLE = "unreachable"
    SILENT = "silent"
    AWAY_TOO_LONG = "away too long"

    @property
    def alive(self) -> bool:
        """Whether the peer's process may well be alive: a worker's jobs are not counted as lost."""
        return self in (Departure.LEFT, Departure.RECONNECTED, Departure.REPLACED)


class OnError(str, enum.Enum):
    """What a project does when one of its jobs fails."""

    CONTINUE = "continue"
    SUSPEND = "suspend"  # stop dispatching its queued jobs; running ones finish
    CANCEL = "cancel"  # cancel the rest


@dataclass(slots=True)
class Request:
    """What a job needs of a worker: amounts of resources (cpus, mem in bytes, gpus, custom) and tags."""

    amounts: dict[str, float]
    tags: frozenset[str]


@dataclass(slots=True, eq=False)
class Queue:
    """Jobs waiting to be dispatched, oldest first: one per project, and one per client for its jobs of no
    project. Dispatch takes the highest ``priority`` first; among equals, the lowest ``pass_``, which
    grows by each job's slot-time over ``share`` (stride scheduling: running slots in proportion to the
    shares; see :mod:`zfarm.broker.farm`)."""

    name: str  # the project's name ("" for a client's own queue)
    owner: str  # the client that made it
    priority: int = 0
    share: float = 1.0
    on_error: OnError = OnError.CONTINUE
    suspended: bool = False
    why_suspended: str = ""
    jobs: deque[Job] = field(default_factory=deque)  # QUEUED jobs (and ones that left it: skipped)
    scheduled: bool = False  # in the farm's heap of queues with queued jobs (``Farm.active``)
    order: int = 0  # when it was scheduled (among equals, the first scheduled goes first)
    version: int = 0  # of its latest entry in the heap (older ones are stale)
    pass_: float = 0.0
    submitted: int = 0
    queued: int = 0
    running: int = 0  # ASSIGNED
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    #: unfinished jobs per (client, phase) (``Project.barrier``): a client's phase starts when every
    #: earlier one of its jobs here is over; its jobs wait (WAITING) in ``waiting`` until then
    phases: dict[tuple[str, int], int] = field(default_factory=dict)
    waiting: dict[tuple[str, int], list[Job]] = field(default_factory=dict)
    waiting_jobs: int = 0
    #: why its first queued job can run on no connected worker ("" if it can)
    unschedulable: str = ""
    #: queued jobs no connected worker could ever hold, set aside until another worker joins
    parked: list[Job] = field(default_factory=list)
    created_at: float = 0.0
    #: its jobs finished (or ended by its cancel) in each of the last 60 s: its rate and ETA
    finished: PerSecond = field(default_factory=lambda: PerSecond(0.0))
    #: a running mean of its jobs' run times (0: none reported yet): what a dispatch charges its pass
    #: (fair share by slot-time, :meth:`zfarm.broker.farm.Farm.charge`)
    run_estimate_s: float = 0.0
    #: the slot-time its jobs' results measured, in seconds (what fair share shared: `zfarm project list`)
    slot_s: float = 0.0

    def first_phase(self, client_id: str) -> int | None:
        """The lowest phase with unfinished jobs of this client here (None: none)."""
        return min((k for (c, k), n in self.phases.items() if c == client_id and n > 0), default=None)


@dataclass(slots=True, eq=False)
class Job:
    client_id: str
    seq: int
    fn_id: bytes
    frames: tuple[Any, ...]  # opaque payload frames, never decoded here
    options: dict[str, Any]
    queued_at: float
    queue: Queue  # its project's, or its client's own
    state: JobState = JobState.SUBMITTED
    worker: str | None = None
    #: ids of the workers the job was given to, in order; its attempt number is the length
    history: tuple[str, ...] = ()  # a tuple: the empty one is shared, so a queued job carries none
    #: the workers that died while running it, with why and when (poison detection)
    losses: tuple[str, ...] = ()
    #: a session's jobs: a hash of function and arguments, to tell a resubmission from a new job
    digest: bytes = b""
    #: read back from the journal: the broker that gave it out is gone, so any worker may answer an
    #: attempt after this one (earlier ones ran a job this one replaced); -1: not read back
    recovered_after: int = -1
    #: what its dispatch added to its queue's pass (fair share), replaced by its measured slot-time
    #: when its result comes (:meth:`zfarm.broker.farm.Farm.ran`)
    charged: float = 0.0
    phase: int = 0
    request: Request | None = None
    devices: tuple[str, ...] = ()  # GPU ids given to it while assigned
    #: the farm's ``workers_epoch`` when it was last checked against every worker (-1: never): the
    #: answer changes only when a worker joins or leaves, so a job waiting for room is checked once
    checked: int = -1
    #: its upstream jobs (option ``after``: seqs of its client), whose results go with it to its slot
    after: tuple[int, ...] = ()
    #: those of them still unfinished (it is WAITING until this is empty)
    waiting_for: set[int] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.client_id, self.seq)

    @property
    def name(self) -> str:
        return f"{self.client_id}:{self.seq}"


@dataclass(slots=True, eq=False)
class Peer:
    id: str
    route: Route
    host: str
    pid: int
    joined_at: float
    last_seen: float
    last_sent: float
    key: str = ""  # with CURVE: the public key it connected with; its id is bound to it


@dataclass(slots=True, eq=False)
class WorkerRecord(Peer):
    slots: int = 0
    credit: int = 0
    #: what it announced (cpus defaults to its slots) and what its assigned jobs leave free
    resources: dict[str, float] = field(default_factory=dict)
    free: dict[str, float] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    gpu_ids: list[str] = field(default_factory=list)  # free GPU ids
    jobs: dict[tuple[str, int], Job] = field(default_factory=dict)
    fns: dict[bytes, None] = field(default_factory=dict)  # mirrors the worker's function cache
    done: int = 0
    failed: int = 0
    outbox: list[Job] = field(default_factory=list)
    cancels: list[list[Any]] = field(default_factory=list)  # keys to tell it to drop, sent in one batch
    #: its jobs it reported STARTED (they have run 10 ms or more): a job prefetched behind them waits
    started: set[Job] = field(default_factory=set)
    #: its prefetched jobs the broker asked back (RECLAIM) and that have not come back, started or ended
    reclaiming: set[Job] = field(default_factory=set)
    reclaims: list[list[Any]] = field(default_factory=list)  # keys to ask back, sent in one batch


@dataclass(slots=True)
class Held:
    """A result the client has not yet said it received: sent again when it asks for the job again."""

    outcome: int
    frames: list[Any] | None  # None: only on disk (read back when the result is sent again)
    info: str
    stats: list[Any]
    digest: bytes = b""
    size: int = 0  # payload bytes while ``frames`` is in memory
    kind: int = 0  # its ResultKind (kept in memory only: read back from a journal it is PLAIN)


@dataclass(slots=True, eq=False)
class ClientRecord(Peer):
    #: the session name: its jobs and results outlive the client's connection ("" for none)
    session: str = ""
    #: connected now; an absent client's results are held for it
    present: bool = True
    #: when it went away (scheduler clock), for expiry
    absent_since: float = 0.0
    held: dict[int, Held] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)  # seqs to acknowledge (sessions only)
    #: a session's cancelled or replaced jobs: attempts used under each number, continued by the next
    attempts_used: dict[int, int] = field(default_factory=dict)
    own: Queue = field(default_factory=lambda: Queue("", ""))  # its jobs of no project
    queued: int = 0
    waiting: int = 0  # jobs WAITING for their phase or upstream jobs
    #: WAITING jobs by the unfinished upstream job they wait for
    dependents: dict[int, list[Job]] = field(default_factory=dict)
    jobs: dict[int, Job] = field(default_factory=dict)
    fns: dict[bytes, Any] = field(default_factory=dict)
    fn_users: dict[bytes, int] = field(default_factory=dict)  # unfinished jobs per function
    fn_idle: dict[bytes, float] = field(default_factory=dict)  # unused functions, since when
    submitted: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    out_rows: list[list[Any]] = field(default_factory=list)
    out_frames: list[Any] = field(default_factory=list)
    out_stats: list[list[Any]] = field(default_factory=list)
    started: list[int] = field(default_factory=list)  # seqs whose jobs a worker started (RUNNING)


@dataclass(slots=True, eq=False)
class MonitorRecord(Peer):
    #: with CURVE, a worker's key may look but not act on projects (only a client's key may)
    read_only: bool = False


@dataclass(slots=True)
class Counters:
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    requeued: int = 0
    workers_lost: int = 0
    late_results: int = 0
    malformed: int = 0
    bounced: int = 0  # jobs handed back unaccepted (queue full, function let go): clients resend them
    recovered: int = 0  # jobs read back from the journal at start
    corrupted: int = 0  # journal rows that failed their seal (their jobs fail with JournalCorrupted)


def role_of(peer: Peer) -> str:
    if isinstance(peer, WorkerRecord):
        return p.Role.WORKER.value
    if isinstance(peer, ClientRecord):
        return p.Role.CLIENT.value
    return p.Role.MONITOR.value


NO_OPTIONS: dict[str, Any] = {}  # shared by every job without options; never changed
#: payload frames up to this size are kept as bytes: a zmq.Frame object costs more than the copy, and
#: a frame this small points into ZeroMQ's shared receive buffer (ZMQ_IN_BATCH_SIZE, 8 KiB), which
#: one kept frame would keep alive whole
COMPACT_FRAME_BYTES = 8192


def compact(frame: Any) -> Any:
    """A small payload frame as bytes (kept by value); a large one as it is (zero copy)."""
    if type(frame) is bytes:  # (already: once per frame of every job, so without a failed getattr)
        return frame
    buffer = getattr(frame, "buffer", None)
    if buffer is not None and buffer.nbytes <= COMPACT_FRAME_BYTES:
        return frame.bytes
    return frame


def check_hello(msg: p.Hello) -> str:
    """Why a HELLO cannot be accepted ("" if it can)."""
    if msg.role not in {r.value for r in p.Role}:
        return f"unknown role {msg.role!r}: expected worker, client or monitor"
    if not msg.peer_id or len(msg.peer_id) > p.MAX_ID_CHARS:  # (decode refuses longer ones already)
        return f"peer id must be 1 to {p.MAX_ID_CHARS} characters"
    if msg.role == p.Role.WORKER and not 0 < msg.slots <= 100_000:
        return f"a worker must announce 1 to 100000 slots, not {msg.slots}"
    return ""


MAX_RESOURCES = 32


def valid_amounts(amounts: object) -> bool:
    """Whether a map of resources is up to 32 short names with amounts of 0 or more (mem in bytes)."""
    return isinstance(amounts, dict) and len(amounts) <= MAX_RESOURCES and all(
        isinstance(k, str) and 0 < len(k) <= 64 and isinstance(v, (int, float)) and not isinstance(v, bool)
        and 0 <= v < 1e18 for k, v in amounts.items())


def valid_tags(tags: object) -> bool:
    """Whether tags are a list of up to 32 short texts."""
    return isinstance(tags, list) and len(tags) <= MAX_RESOURCES and all(
        isinstance(t, str) and 0 < len(t) <= 64 for t in tags)
