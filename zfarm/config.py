"""Settings: frozen dataclasses resolved once, flag → ``ZFARM_*`` variable → default.

Nothing else in zfarm reads the environment; the CLI and ``Client`` call
:func:`resolve` and pass the result down.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

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
    #: result payloads held in memory at most; past it they wait on disk (the journal, or a temporary
    #: spill file without one) until their client asks for them
    held_memory_bytes: int = 256 * 1024**2

    def __post_init__(self) -> None:
        check_endpoint(self.bind, bind=True, inproc=True)
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
        if self.held_memory_bytes < 0:
            raise ConfigError(f"held_memory_bytes must not be negative, got {self.held_memory_bytes}")


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
    #: keep every job's whole stdout and stderr as files here ("": only the last 1 MiB, with the result)
    output_dir: str = ""
    #: epoch seconds: stop gracefully then (as on SIGTERM), e.g. before a batch job's walltime; 0: never
    drain_at: float = 0.0
    #: what jobs may ask of it, "cpus=8,mem=32G,gpus=2,licenses=4" ("": its slots, the machine's memory,
    #: the GPUs it finds); and its tags, "bigmem,avx512"
    resources: str = ""
    tags: str = ""

    def __post_init__(self) -> None:
        check_endpoint(self.address, inproc=True)  # inproc: a worker embedded with the broker's context
        parse_resources(self.resources)
        parse_tags(self.tags)
        for name, flag in (("procs", "--procs"), ("prefetch", "--prefetch"), ("grace_s", "--grace"),
                           ("drain_at", "ZFARM_DRAIN_AT")):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag} must not be negative, got {getattr(self, name)}")
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
        check_endpoint(self.address)
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


#: the longest ipc path the operating system takes (sockaddr_un.sun_path less its final NUL)
IPC_PATH_MAX_BYTES = int(getattr(zmq, "IPC_PATH_MAX_LEN", 0) or 103)
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252}[A-Za-z0-9_])?")


def check_endpoint(address: str, *, bind: bool = False, inproc: bool = False) -> None:
    """Refuse an address ZeroMQ would reject, or accept and never reach, before any socket exists.

    ``tcp://HOST:PORT`` with HOST a name, an IPv4 address or ``[IPv6]`` and PORT 1 to 65535; a
    ``bind`` may also use ``*`` as HOST (every interface) and ``*`` or ``0`` as PORT (any free
    port: the broker logs the one it got). ``ipc://PATH``: a path short enough for a Unix socket
    whose folder exists when binding. ``inproc://NAME`` only where ``inproc`` says the caller can
    share its ZeroMQ context (a broker or worker embedded in the same process).

    Raises:
        ConfigError: naming the address, what is wrong with it and a correct example.
    """
    if not isinstance(address, str):
        raise ConfigError(f"an endpoint must be a string such as {DEFAULT_ADDRESS}, not {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in {"tcp", "ipc", "inproc"} or not rest:
        raise ConfigError(f"{address!r} is not a ZeroMQ endpoint: use tcp://HOST:PORT (for example "
                          f"{DEFAULT_ADDRESS}) or ipc:///path/to/socket")
    if scheme == "tcp":
        problem = _tcp_problem(rest, bind)
    elif scheme == "ipc":
        problem = _ipc_problem(rest, bind)
    else:
        problem = "" if inproc else ("inproc:// reaches only sockets in the same process and ZeroMQ context, "
                                     "so nothing could answer here")
    if problem:
        raise ConfigError(f"endpoint {address!r}: {problem}; use tcp://HOST:PORT (for example "
                          f"{DEFAULT_ADDRESS}) or ipc:///path/to/socket")


def is_ipv6_endpoint(address: str) -> bool:
    """Whether ``address`` is ``tcp://[IPv6]:PORT``: a ZeroMQ socket must have ``IPV6`` set to bind or
    connect there (it is off by default; it is not set for other addresses, where it could make a
    host name resolve to an IPv6 address that nothing listens on)."""
    scheme, _, rest = address.partition("://")
    return scheme == "tcp" and rest.startswith("[")


def _tcp_problem(rest: str, bind: bool) -> str:
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        return "the port is missing"
    if port in {"*", "0"}:
        if not bind:
            return f"port {port} means 'any free port', which only a broker's --bind can use"
    elif not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"the port must be a number from 1 to 65535, not {port!r}"
    if host == "*":
        return "" if bind else "host * (every interface) is for binding; connect to a host name or address"
    if host.startswith("[") and host.endswith("]"):
        return "" if _is_ip(host[1:-1], ipaddress.IPv6Address) else f"{host} is not an IPv6 address"
    if ":" in host:
        return f"an IPv6 address goes in brackets, as in tcp://[{host.strip('[]')}]:{port}"
    if host.replace(".", "").isdigit():  # looks like IPv4: it must be one
        return "" if _is_ip(host, ipaddress.IPv4Address) else f"{host} is not an IPv4 address"
    return "" if _HOST_NAME.fullmatch(host) else f"{host!r} is not a host name"


def _is_ip(text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _ipc_problem(path: str, bind: bool) -> str:
    size = len(path.encode())
    if size > IPC_PATH_MAX_BYTES:
        return (f"the socket path is {size} bytes long; this system takes at most {IPC_PATH_MAX_BYTES}: "
                "choose a shorter one, e.g. in /tmp")
    if "\0" in path:
        return "the socket path holds a NUL character"
    abstract = path.startswith("@")  # Linux's abstract namespace: no file
    if bind and not abstract and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return f"the folder {os.path.dirname(os.path.abspath(path))} does not exist"
    return ""


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


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def is_short_name(text: object) -> bool:
    """Whether ``text`` is a resource name or a tag: a letter, then up to 63 letters, digits, _ . -"""
    return isinstance(text, str) and _NAME.match(text) is not None


def parse_amount(name: str, value: Any) -> float:
    """An amount of a resource: a number of 0 or more, or for ``mem`` a size such as 512M or 4G (bytes).

    Raises:
        ConfigError: anything else, saying what to give.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _SIZE.match(str(value))
    if match is None or (match.group(2) and name != "mem"):
        raise ConfigError(f"resource {name}={value!r}: give a number of 0 or more"
                          f"{' or a size such as 512M or 4G' if name == 'mem' else ''}")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_resources(text: str) -> dict[str, float]:
    """``"cpus=8,mem=32G,gpus=2"`` as {name: amount} (mem in bytes).

    Raises:
        ConfigError: an entry that is not NAME=AMOUNT.
    """
    out: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, eq, value = entry.partition("=")
        if not eq or not _NAME.match(name.strip()):
            raise ConfigError(f"--resources entry {entry!r}: write NAME=AMOUNT, e.g. cpus=8,mem=32G,gpus=2")
        out[name.strip()] = parse_amount(name.strip(), value.strip())
    return out


def parse_tags(text: str) -> list[str]:
    """``"bigmem,avx512"`` as a list of tags.

    Raises:
        ConfigError: a tag that is not a short name.
    """
    tags = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tags if not _NAME.match(t)]
    if bad:
        raise ConfigError(f"--tags {', '.join(bad)}: a tag is a letter then up to 63 letters, digits, _ . -")
    return tags
