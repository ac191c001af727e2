"""``SSHCluster``: workers on other hosts, started through the system ``ssh`` client.

::

    this machine: broker ◄────────────── tcp (CURVE) ──────────────┐
                  ssh host ── stdin: settings + worker key, then "retire" / EOF
                      └────► host: python -m zfarm.cluster.remote ─ Worker
                  ◄── its stdout/stderr, logged as "host: line"

The user's ``~/.ssh/config``, agent, ``ProxyJump`` and known hosts apply, because it is their
``ssh``. ``BatchMode`` keeps a host that asks for a password from hanging the launcher: it fails
and is retried with a back-off, as is a host that cannot be reached; other hosts go on.
When the launcher goes, the write end of each ``ssh``'s standard input closes with it: ``ssh``
passes the end of input on, the remote worker stops at once, and its ``ssh`` exits (a host that
no longer answers: after ``ServerAliveInterval`` times ``ServerAliveCountMax``). No ``preexec_fn``:
Python code run between fork and exec in a multithreaded program may deadlock.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import shlex
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import IO

from zfarm.cluster.base import Cluster
from zfarm.cluster.remote import settings_blob
from zfarm.cluster.supervision import Launched
from zfarm.errors import ConfigError
from zfarm.local import free_tcp_endpoint

log = logging.getLogger("zfarm.cluster.ssh")

SSH_OPTIONS = ("-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3")
#: ssh's own exit code when the connection failed (cannot reach, refused, authentication)
SSH_FAILED = 255


class SSHHandle:
    """One ``ssh host python -m zfarm.cluster.remote`` and the thread logging its output."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str) -> None:
        self.proc = proc
        self.host = host
        self.last_lines: collections.deque[str] = collections.deque(maxlen=3)
        assert proc.stdout is not None
        self._reader = threading.Thread(target=self._log_output, args=(proc.stdout,), daemon=True,
                                        name=f"ssh-{host}-output")
        self._reader.start()

    def _log_output(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.last_lines.append(line)
                log.info("%s: %s", self.host, line)

    def ended(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        self._reader.join(2.0)  # its last words say why
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        said = " / ".join(self.last_lines) or "nothing"
        if code == SSH_FAILED:
            return f"ssh to {self.host} failed (it said: {said})"
        return f"the worker on {self.host} exited with code {code} (last output: {said})"

    def pending(self) -> bool:
        return False

    def retire(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"retire\n")
            self.proc.stdin.flush()
        except OSError:  # the channel is gone already
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # ssh exits, the channel closes, the remote worker stops at once


class SSHCluster(Cluster):
    """One worker per host (``n_workers`` to have more or fewer, spread over the hosts in turn).

    Args:
        hosts: ssh destinations (``host``, ``user@host``, a ``~/.ssh/config`` alias).
        procs_per_worker: slots of each remote worker (None: one per remote CPU).
        python: the remote python with zfarm installed (default ``python3``).
        remote_env: environment variables set for the remote worker.
        n_workers: workers to start (default: one per host).
        ssh_options: more arguments for ``ssh`` (e.g. ``("-p", "2222")``).
        bind: where the broker listens (default ``tcp://*:PORT``, a free port, which needs
            ``keys``; without keys, a fresh keys folder is made for this cluster and its
            clients; ``Client(cluster)`` uses it). Other arguments as :class:`Cluster`.
    """

    kind = "ssh"
    networked = True

    def __init__(self, hosts: Sequence[str], procs_per_worker: int | None = None, python: str | None = None,
                 remote_env: Mapping[str, str] | None = None, *, n_workers: int | None = None,
                 ssh_options: Sequence[str] = (), **common: object) -> None:
        if isinstance(hosts, str) or not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise ConfigError(f"hosts must be a list of ssh destinations, not {hosts!r}")
        self.hosts = list(hosts)
        self.procs_per_worker = procs_per_worker or 0
        self.python = python or "python3"
        self.remote_env = dict(remote_env or {})
        self.ssh_options = list(ssh_options)
        super().__init__(**common)  # type: ignore[arg-type]
        try:  # e.g. a keys folder with two worker keys: the broker started must not outlive us
            self.slots_per_worker = self.procs_per_worker or 1
            self.restarts.max_quick_deaths = 20  # a host that is down may come back: retry for ~15 min
            self._blob = json.dumps(settings_blob(self.address, self.keys, self.heartbeat_interval_s,
                                                  self.worker_grace_s, self.log_level)).encode() + b"\n"
            self._begin(len(self.hosts) if n_workers is None else n_workers)
        except BaseException:
            self._abandon()
            raise

    def _default_bind(self) -> str:
        return free_tcp_endpoint("*")

    def _place(self, index: int) -> tuple[str, str]:
        host = self.hosts[index % len(self.hosts)]
        return f"ssh-{host}-{index}", host  # the index keeps names apart when a host is listed twice

    def remote_command(self, worker_id: str) -> str:
        env = [f"{k}={shlex.quote(v)}" for k, v in self.remote_env.items()]
        argv = [self.python, "-m", "zfarm.cluster.remote", "--worker-id", worker_id,
                "--procs", str(self.procs_per_worker), *self.offer_args()]
        return " ".join([*(["env", *env] if env else []), *map(shlex.quote, argv)])

    def _launch(self, worker: Launched) -> SSHHandle:
        # the user's options first: for each option ssh keeps the first value it is given
        argv = ["ssh", *self.ssh_options, *SSH_OPTIONS, worker.where, self.remote_command(worker.worker_id)]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        handle = SSHHandle(proc, worker.where)
        try:
            assert proc.stdin is not None
            proc.stdin.write(self._blob)  # the key travels inside the encrypted channel only
            proc.stdin.flush()
        except OSError:
            pass  # ssh already failed: ended() will say why
        return handle

