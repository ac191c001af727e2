"""Helpers for processes on this machine: stop one or a group of them, find a free TCP port.

The embedded farm behind ``Client()`` is :class:`zfarm.cluster.LocalCluster` (still importable
from here).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from typing import Any

log = logging.getLogger(__name__)


def stop_processes(procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
    """SIGTERM each (resumed first, if it was stopped); SIGKILL any still running at ``deadline``."""
    for proc in procs:
        terminate_gently(proc)
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in time: killing it", proc.pid)
            proc.kill()
            proc.wait()


def terminate_gently(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc`` if it runs, resuming it first: a stopped process would not act on SIGTERM."""
    if proc.poll() is None:
        if hasattr(signal, "SIGCONT"):  # not on Windows
            proc.send_signal(signal.SIGCONT)
        proc.terminate()


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """``tcp://HOST:PORT`` with a port the kernel just reported free on ``host`` (``*``: every interface;
    ``[IPv6]`` in brackets, as an endpoint writes it)."""
    ipv6 = host.startswith("[")
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET) as s:
        s.bind(("" if host == "*" else host.strip("[]"), 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def __getattr__(name: str) -> Any:
    if name == "LocalCluster":  # its old home
        from zfarm.cluster.local import LocalCluster

        return LocalCluster
    raise AttributeError(f"module 'zfarm.local' has no attribute {name!r}")
