"""Keys, CURVE and who may do what: everything zfarm does to keep strangers out.

A keys folder (``zfarm keys init DIR``) holds::

    DIR/broker.key            the broker's public key       (every machine needs it)
    DIR/broker.key_secret     the broker's secret key       (the broker's machine only)
    DIR/workers/NAME.key      a worker key, public          (the broker's allow-list)
    DIR/workers/NAME.key_secret                             (worker machines only)
    DIR/clients/NAME.key      a client key, public          (the broker's allow-list)
    DIR/clients/NAME.key_secret                             (client machines only)

With keys, every socket speaks CURVE: traffic is encrypted, the broker is
authenticated by its public key, and the broker admits only peers whose public
key is in ``workers/`` or ``clients/``. ZAP tells the broker which list a peer's
key came from, so a client's key can never register a worker (which would see
other people's jobs) and a worker's key can never submit jobs (which would run
code on every worker).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from zfarm.config import is_ipv6_endpoint, reconnect_interval_ms
from zfarm.errors import ConfigError, SecurityError

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ROLE_FOLDERS = {"worker": "workers", "client": "clients"}
#: which roles a key from each allow-list may claim in its HELLO
ROLES_OF_KEY = {"worker": {"worker", "monitor"}, "client": {"client", "monitor"}}


def init_keys(folder: str | os.PathLike[str]) -> list[Path]:
    """Create a keys folder: the broker's keypair, one worker and one client keypair.

    Raises:
        SecurityError: the folder already holds a broker key (never overwrite keys).
    """
    root = Path(folder)
    if (root / "broker.key_secret").exists():
        raise SecurityError(f"{root} already holds keys; add more with `zfarm keys add {root} NAME`")
    _private_dir(root)
    written = _create(root, "broker")
    written += add_key(root, "worker", "worker")
    written += add_key(root, "client", "client")
    return written


def keys_root(folder: str | os.PathLike[str]) -> Path:
    """A keys folder that exists (``zfarm keys init`` made it).

    Raises:
        ConfigError: there is no such folder (a mistyped --keys, ZFARM_KEYS or keys=).
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"keys folder {str(root)!r} does not exist: make one with `zfarm keys init "
                          f"{root}`, or give the folder it made")
    return root


def add_key(folder: str | os.PathLike[str], name: str, role: str) -> list[Path]:
    """Add a keypair for a worker or a client; the broker admits it after a restart."""
    if role not in ROLE_FOLDERS:
        raise ConfigError(f"role must be worker or client, not {role!r}")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{name!r} is not a usable key name")
    root = keys_root(folder)
    if not (root / "broker.key").exists():
        raise ConfigError(f"{root} is not a keys folder (it has no broker.key): make one with "
                          f"`zfarm keys init {root}`")
    where = root / ROLE_FOLDERS[role]
    _private_dir(where)
    if (where / f"{name}.key").exists():
        raise SecurityError(f"a {role} key named {name!r} exists already in {where}")
    return _create(where, name)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _create(folder: Path, name: str) -> list[Path]:
    public, secret = (Path(p) for p in zmq.auth.create_certificates(folder, name))
    secret.chmod(0o600)
    public.chmod(0o644)
    return [public, secret]


def _load_secret(path: Path) -> tuple[bytes, bytes]:
    if not path.exists():
        raise SecurityError(f"no secret key at {path}: create keys with `zfarm keys init DIR`")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"{path} can be read by other users (mode {stat.filemode(mode)}); "
                            f"zfarm will not use it: run `chmod 600 {path}`")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise SecurityError(f"{path} holds no secret key")
    return public, secret


def _load_public(path: Path) -> bytes:
    if not path.exists():
        raise SecurityError(f"no public key at {path}: copy the broker's broker.key there")
    public, _ = zmq.auth.load_certificate(path)
    return public


@dataclass(frozen=True)
class PeerKeys:
    """What a worker, client or monitor needs: its own keypair and the broker's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, folder: str, role: str, name: str = "") -> PeerKeys:
        """Load keys for ``role`` (worker or client) from a keys folder.

        The keypair is ``{role}s/NAME.key_secret``; without a name, the folder must hold one.
        """
        root = keys_root(folder)
        where = root / ROLE_FOLDERS[role]
        if name:
            secret_file = where / f"{name}.key_secret"
        else:
            found = sorted(where.glob("*.key_secret"))
            if len(found) != 1:
                what = "no" if not found else f"{len(found)}"
                raise SecurityError(f"{what} {role} secret keys in {where}: keep exactly one there")
            secret_file = found[0]
        public, secret = _load_secret(secret_file)
        return cls(public, secret, _load_public(root / "broker.key"))

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


class BrokerKeys:
    """The broker's keypair and allow-lists, and its ZAP handler (polled by the broker loop)."""

    def __init__(self, folder: str) -> None:
        root = keys_root(folder)
        self.public, self.secret = _load_secret(root / "broker.key_secret")
        self.allowed: dict[bytes, set[str]] = {}
        for role, sub in ROLE_FOLDERS.items():
            for key_file in sorted((root / sub).glob("*.key")):
                self.allowed.setdefault(_load_public(key_file), set()).add(role)
        if not self.allowed:
            raise SecurityError(f"no worker or client public keys in {root}: nobody could connect")
        self.zap: zmq.Socket[Any] | None = None

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = b"zfarm"

    def start_zap(self, context: zmq.Context[Any]) -> zmq.Socket[Any]:
        """Bind the ZAP handler socket; call before binding the broker socket."""
        self.zap = context.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)
        return self.zap

    def answer_zap(self) -> None:
        """Answer one ZAP request: 200 with the key's roles as User-Id, or 400."""
        assert self.zap is not None
        frames = self.zap.recv_multipart()
        if len(frames) < 7:
            self.zap.send_multipart([b"1.0", b"", b"500", b"bad ZAP request", b"", b""])
            return
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        key = frames[6] if mechanism == b"CURVE" else b""
        roles = self.allowed.get(zmq.utils.z85.encode(key)) if len(key) == 32 else None
        if roles:
            user = f"{','.join(sorted(roles))}|{zmq.utils.z85.encode(key).decode()}".encode()
            self.zap.send_multipart([version, request_id, b"200", b"OK", user, b""])
        else:
            log.warning("refused a connection from %s: its key is not on the allow-list",
                        address.decode(errors="replace") or "?")
            self.zap.send_multipart([version, request_id, b"400", b"key not allowed", b"", b""])

    def close(self) -> None:
        if self.zap is not None:
            self.zap.close(linger=0)
            self.zap = None


def dealer_to_broker(context: zmq.Context[Any], address: str, keys: PeerKeys | None) -> zmq.Socket[Any]:
    """A DEALER connected to the broker as workers and clients use it: unbounded queues (their
    windows and credit bound them), quick local reconnects, CURVE when there are keys."""
    sock: zmq.Socket[Any] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    ivl_ms, ivl_max_ms = reconnect_interval_ms(address)
    sock.setsockopt(zmq.RECONNECT_IVL, ivl_ms)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, ivl_max_ms)
    set_ipv6_for(sock, address)
    if keys is not None:
        keys.apply(sock)
    return sock


def set_ipv6_for(sock: zmq.Socket[Any], address: str) -> None:
    """Let ``sock`` bind or connect to ``address`` if it is ``tcp://[IPv6]:PORT``: ZeroMQ refuses one
    without ``IPV6`` ("No such device"). Only there: elsewhere it could make a host name resolve to an
    IPv6 address that nothing listens on."""
    if is_ipv6_endpoint(address):
        sock.setsockopt(zmq.IPV6, 1)


def identity_of(user_id: str) -> tuple[frozenset[str], str]:
    """The roles a peer may claim and its public key, from the User-Id ZAP gave its connection."""
    lists, _, key = user_id.partition("|")
    allowed: set[str] = set()
    for key_role in lists.split(","):
        allowed |= ROLES_OF_KEY.get(key_role, set())
    return frozenset(allowed), key


def check_bind_is_safe(bind: str, keys: str, insecure: bool) -> None:
    """Refuse to listen beyond this machine without keys, unless told to with --insecure.

    Raises:
        ConfigError: the endpoint is reachable from other machines and there are no keys.
    """
    if keys or insecure or is_local_endpoint(bind):
        return
    raise ConfigError(
        f"refusing to listen on {bind} without keys: anyone who can reach it could run code on every "
        "worker. Create keys with `zfarm keys init keys/` and start the broker with --keys keys/ "
        "(see docs/security.md), or pass --insecure if this network is trusted"
    )


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc:// and inproc:// endpoints and tcp:// on loopback addresses."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in {"ipc", "inproc"}:
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host in {"*", ""}:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
_KEYS_HINT = {"client": "pass keys= or set ZFARM_KEYS", "worker": "start it with --keys or set ZFARM_KEYS",
              "monitor": "pass --keys FOLDER or set ZFARM_KEYS"}
#: the broker's allow-list a role's key must be on (a monitor uses a client key, or a worker key)
_KEY_LIST = {"client": "client", "worker": "worker", "monitor": "client (or worker)"}


def monitor_event(frames: list[bytes]) -> int:
    """The event number of a ZeroMQ monitor message (its first frame starts with it, 16 bits).

    Read here rather than with ``zmq.utils.monitor``, whose import pulls in asyncio: 20 ms of
    every process's start.
    """
    return int.from_bytes(frames[0][:2], sys.byteorder)


class HandshakeWatch:
    """Watches a socket's ZeroMQ handshakes with the broker and says, in words, why one failed.

    Without it a peer the broker will not let in only sees silence.
    """

    def __init__(self, sock: zmq.Socket[Any], role: str, with_keys: bool) -> None:
        self.socket = sock
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self.role = role
        self.with_keys = with_keys
        #: why the last handshake failed ("" if it did not, or none happened yet)
        self.problem = ""

    def read(self) -> str:
        """Take the pending events; return why the last handshake failed ("" if it did not)."""
        while self.monitor.poll(0):
            self.problem = self._problem(monitor_event(self.monitor.recv_multipart()))
        return self.problem

    def _problem(self, event: int) -> str:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return ""
        if not self.with_keys:
            return f"the broker requires keys (CURVE) and this {self.role} has none: {_KEYS_HINT[self.role]}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the broker refused our key: it is not on the broker's {_KEY_LIST[self.role]} list "
                    "(add it with `zfarm keys add` and restart the broker)")
        return ("the security handshake failed: our broker.key is not this broker's public key, or the "
                "broker does not use keys")

    def close(self) -> None:
        """Stop watching; called once, while the socket is open (its Link closes the watch first)."""
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
