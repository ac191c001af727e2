"""The processes a cluster starts: its broker, and what every launcher gives a worker (the command,
the environment); :class:`Handle`, one launched worker as its launcher sees it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Protocol

log = logging.getLogger("zfarm.cluster")

#: settings that name one process or one shared farm, which a cluster's own broker and workers
#: must not take from the environment: another broker's journal (two brokers would fight over
#: it), an endpoint, a worker's id, and the client's key name
NOT_INHERITED = ("ZFARM_JOURNAL", "ZFARM_JOURNAL_SYNC", "ZFARM_SESSION_TTL_S", "ZFARM_BIND",
                 "ZFARM_WORKER_ID", "ZFARM_KEY_NAME", "ZFARM_ADDRESS", "ZFARM_DRAIN_AT")


class Handle(Protocol):
    """One launched worker as its launcher sees it."""

    def ended(self) -> str | None:
        """None while it runs or waits for resources; else how it ended, in words."""

    def pending(self) -> bool:
        """Still waiting for resources (a queued batch job)."""

    def retire(self) -> None:
        """Ask it to finish its running jobs, hand back the rest and leave."""

    def kill(self) -> None:
        """End it now."""


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}


def zfarm_command(python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "zfarm"]


def make_keys(folder: str) -> str:
    """A keys folder made in ``folder`` for a cluster whose workers connect over the network and
    that was given none: CURVE, only its workers and clients get in.

    Raises:
        SecurityError: it could not be made.
    """
    from zfarm.security import init_keys

    keys = os.path.join(folder, "keys")
    init_keys(keys)
    log.info("made keys for this cluster in %s: CURVE, only its workers and clients get in", keys)
    return keys


def start_broker(bind: str, keys: str, insecure: bool, journal: str, log_level: str,
                 heartbeat_interval_s: float | None) -> subprocess.Popen[bytes]:
    """A ``zfarm broker`` for a cluster: it exits with this process; a Ctrl-C meant for us is not for it.

    Raises:
        SecurityError: ``bind`` reaches beyond this machine without keys or ``insecure`` (said
            here, not as the broker's exit code).
    """
    from zfarm.security import check_bind_is_safe

    check_bind_is_safe(bind, keys, insecure)
    args = [*zfarm_command(), "broker", "--bind", bind, "--parent-pid", str(os.getpid()),
            "--log-level", log_level]
    args += ["--keys", keys] if keys else []
    args += ["--insecure"] if insecure else []
    args += ["--journal", journal] if journal else []
    if heartbeat_interval_s is not None:
        args += ["--heartbeat-interval", str(heartbeat_interval_s)]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True)


def stop_broker(broker: subprocess.Popen[bytes] | None) -> None:
    """Stop a cluster's broker (SIGTERM, then SIGKILL after 5 s); None: there is none."""
    from zfarm.local import stop_processes

    if broker is not None:
        stop_processes([broker], time.monotonic() + 5.0)


def public_address(bind: str) -> str:
    """The address others connect to for a broker bound at ``bind`` (a wildcard becomes this host)."""
    import socket

    scheme, _, rest = bind.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme == "tcp" and sep and host in ("*", "0.0.0.0", "[::]", "::"):
        name = socket.getfqdn()
        if name.startswith("localhost"):  # /etc/hosts names this machine so: others need its name
            name = socket.gethostname()
        return f"tcp://{name}:{port}"
    return bind

