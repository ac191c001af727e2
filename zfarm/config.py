"""Settings: frozen dataclasses resolved once, flag → ``ZFARM_*`` variable → default.

Nothing else in zfarm reads the environment; the CLI and ``Client`` call
:func:`resolve` and pass the result down.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from zfarm.errors import ConfigError

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
GIB = 1024**3
MIN_MESSAGE_BYTES = 1024**2
#: full: each journal commit reaches the disk; normal: the operating system writes it when it likes
JOURNAL_SYNC_MODES = ("full", "normal")


@dataclass(frozen=True)
class BrokerSettings:
    bind: str = DEFAULT_ADDRESS
    heartbeat_interval_s: float = 1.0
    liveness: int = 3
    #: ZMQ_MAXMSGSIZE on the broker socket: larger messages cut the sender off.
    max_message_bytes: int = 2 * GIB
    #: exit when this process id is no longer our parent (embedded use)
    parent_pid: int = 0
    #: keys folder: CURVE on, peers admitted by the allow-lists in it (docs/security.md)
    keys: str = ""
    #: listen beyond loopback without keys (only on a network you trust)
    insecure: bool = False
    #: a connection must finish the ZeroMQ (and CURVE) handshake within this time
    handshake_timeout_s: float = 10.0
    #: finished jobs' records kept for `zfarm history` (about 200 bytes each)
    history: int = 50_000
    #: a job whose workers died this many times while running it fails with WorkerLost
    max_losses: int = 3
    #: jobs queued at most (0: no limit); past it, submitters are told to send again later
    max_queued: int = 0
    #: SQLite file keeping accepted jobs and undelivered results across broker restarts ("": none)
    journal: str = ""
    #: "full": each journal commit reaches the disk (survives a power cut); "normal": the OS's
    #: (survives the broker's death, not the machine's; faster)
    journal_sync: str = "full"
    #: how long a session's jobs and results wait for a client that went away
    session_ttl_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        _check_endpoint(self.bind)
        check_positive(heartbeat_interval_s=self.heartbeat_interval_s, liveness=self.liveness,
                        handshake_timeout_s=self.handshake_timeout_s, session_ttl_s=self.session_ttl_s)
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(f"max_message_bytes must be at least {MIN_MESSAGE_BYTES} (1 MiB), "
                              f"got {self.max_message_bytes}")
        object.__setattr__(self, "journal_sync", self.journal_sync.lower())
        if self.journal_sync not in JOURNAL_SYNC_MODES:
            raise ConfigError(f"journal_sync must be full or normal, not {self.journal_sync!r}")
        if self.max_queued < 0:
            raise ConfigError(f"max_queued must not be negative, got {self.max_queued}")
        if self.max_losses < 1:
            raise ConfigError(f"max_losses must be at least 1, got {self.max_losses}")
        if self.history < 0:
            raise ConfigError(f"history must not be negative, got {self.history}")


@dataclass(frozen=True)
class WorkerSettings:
    address: str = DEFAULT_ADDRESS  # the broker to connect to (ZFARM_ADDRESS, as for clients)
    procs: int = 0  # 0: one slot per CPU
    #: jobs held beyond the free slots, so a slot never waits on the network
    prefetch: int = 1
    worker_id: str = ""
    heartbeat_interval_s: float = 1.0  # until the broker's WELCOME says otherwise
    liveness: int = 3
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 32.0
    #: on SIGTERM, how long running jobs may take to finish before they are handed back
    grace_s: float = 30.0
    parent_pid: int = 0
    keys: str = ""  # keys folder: connect with CURVE using workers/KEY_NAME.key_secret
    key_name: str = ""
    #: epoch seconds: stop gracefully then (as on SIGTERM), e.g. before a batch job's walltime; 0: never
    drain_at: float = 0.0

    def __post_init__(self) -> None:
        _check_endpoint(self.address)
        if self.procs < 0 or self.prefetch < 0 or self.grace_s < 0 or self.drain_at < 0:
            raise ConfigError("procs, prefetch, grace_s and drain_at must not be negative")
        check_positive(heartbeat_interval_s=self.heartbeat_interval_s, liveness=self.liveness,
                        reconnect_min_s=self.reconnect_min_s, reconnect_max_s=self.reconnect_max_s)

    @property
    def slots(self) -> int:
        return self.procs or os.cpu_count() or 1


@dataclass(frozen=True)
class ClientSettings:
    address: str = DEFAULT_ADDRESS
    #: how long to wait for the broker's first answer before raising BrokerUnavailable
    connect_timeout_s: float = 10.0
    #: how long unfinished jobs wait for a silent broker before they fail with BrokerUnavailable
    broker_timeout_s: float = 60.0
    heartbeat_interval_s: float = 1.0  # until the broker's WELCOME says otherwise
    liveness: int = 3
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 32.0
    #: jobs `map` keeps unfinished at once; bounds memory for endless inputs
    window: int = 4096
    #: first wait before a job that raised runs again (doubling, up to 30 s), for retries=N
    retry_backoff_s: float = 1.0
    keys: str = ""  # keys folder: connect with CURVE using clients/KEY_NAME.key_secret
    key_name: str = ""
    #: a session name: the broker keeps this client's jobs and results while it is away
    session: str = ""

    def __post_init__(self) -> None:
        _check_endpoint(self.address)
        check_session(self.session)
        if not math.isfinite(self.retry_backoff_s) or self.retry_backoff_s < 0:
            raise ConfigError(f"retry_backoff_s must be finite and not negative, not {self.retry_backoff_s}")
        check_positive(connect_timeout_s=self.connect_timeout_s, broker_timeout_s=self.broker_timeout_s,
                        heartbeat_interval_s=self.heartbeat_interval_s, liveness=self.liveness,
                        window=self.window)


S = TypeVar("S")


def resolve(cls: type[S], flags: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> S:
    """Build settings: a flag that is not None wins, then ``ZFARM_<FIELD>``, then the default.

    Raises:
        ConfigError: a value cannot be parsed or is out of range.
    """
    flags = flags or {}
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if flags.get(f.name) is not None:
            values[f.name] = flags[f.name]
            continue
        raw = env.get(f"ZFARM_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _parse(f.name, raw, type(f.default))
    unknown = set(flags) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"unknown setting(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    return cls(**values)


def _parse(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        return kind(raw)
    except ValueError:
        raise ConfigError(f"ZFARM_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None


def reconnect_interval_ms(address: str) -> tuple[int, int]:
    """ZeroMQ's own reconnect interval and its cap for a socket connecting to ``address``.

    A local (ipc) broker may still be starting, as the embedded farm's is: retry often, so
    the first result is not held up by a backoff. Across a network, back off up to 2 s.
    """
    return (10, 0) if address.startswith(("ipc://", "inproc://")) else (100, 2000)


def _check_endpoint(address: str) -> None:
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in {"tcp", "ipc", "inproc"} or not rest:
        raise ConfigError(
            f"{address!r} is not a ZeroMQ endpoint: use tcp://HOST:PORT (for example "
            f"{DEFAULT_ADDRESS}) or ipc:///path/to/socket"
        )


SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_session(name: str) -> None:
    """Raise ConfigError unless ``name`` is "" or a usable session name."""
    if name and not SESSION_NAME.fullmatch(name):
        raise ConfigError(f"session name {name!r} must be 1 to 100 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")


def check_positive(**values: float) -> None:
    """Raise ConfigError naming the first value that is not a finite number above 0."""
    for name, value in values.items():
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
