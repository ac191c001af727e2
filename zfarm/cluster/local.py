"""``LocalCluster``: a broker and workers as child processes of this one (also ``Client()``'s farm).

They run the same code as ``zfarm broker`` and ``zfarm worker`` (started as ``python -m
zfarm``), talk over an ipc endpoint in a private temporary folder, watch this process's pid so
that they exit if it dies, and are supervised: a worker that dies (killed, out of memory) is
started again while it is wanted.
"""

from __future__ import annotations

import os
import subprocess

from zfarm.cluster.base import Cluster
from zfarm.cluster.spawn import child_env, zfarm_command
from zfarm.cluster.supervision import Launched
from zfarm.errors import describe_exit
from zfarm.local import terminate_gently


class ProcessHandle:
    """A worker process on this machine."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def ended(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        return "exited normally" if code == 0 else describe_worker_exit(code)

    def pending(self) -> bool:
        return False

    def retire(self) -> None:
        terminate_gently(self.proc)  # the worker drains on SIGTERM

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def describe_worker_exit(code: int) -> str:
    if code < 0:
        return describe_exit(code).split(";")[0] + ("; the out-of-memory killer?" if code == -9 else "")
    return f"exited with code {code} (see its log above)"


class LocalCluster(Cluster):
    """``n_workers`` workers of ``procs_per_worker`` slots each, on this machine.

    Args:
        n_workers: workers to keep (default: one per CPU).
        procs_per_worker: slots of each worker.
        bind: where the broker listens (default: an ipc socket in a private folder); other
            arguments as :class:`Cluster`.
    """

    kind = "local"

    def __init__(self, n_workers: int | None = None, procs_per_worker: int = 1, **common: object) -> None:
        self.procs_per_worker = procs_per_worker
        super().__init__(**common)  # type: ignore[arg-type]
        self.slots_per_worker = procs_per_worker
        self.n_workers = (os.cpu_count() or 1) if n_workers is None else n_workers
        self._begin(self.n_workers)

    def _default_bind(self) -> str:
        if os.name != "nt":
            return f"ipc://{self._tmpdir}/broker.sock"
        from zfarm.local import free_tcp_endpoint

        return free_tcp_endpoint()  # Windows has no ipc transport

    def _place(self, index: int) -> tuple[str, str]:
        return f"local-{index}", "localhost"

    def _launch(self, worker: Launched) -> ProcessHandle:
        args = [*zfarm_command(), "worker", "--connect", self.address, "--procs", str(self.procs_per_worker),
                "--worker-id", worker.worker_id, "--grace", str(self.worker_grace_s),
                "--parent-pid", str(os.getpid()), "--log-level", self.log_level]
        if self.heartbeat_interval_s is not None:
            args += ["--heartbeat-interval", str(self.heartbeat_interval_s)]
        if self.keys:
            args += ["--keys", self.keys]
        args += self.offer_args()
        # its own session: a Ctrl-C meant for this program does not reach it; the cluster stops it
        return ProcessHandle(subprocess.Popen(args, stdin=subprocess.DEVNULL, env=child_env(),
                                              start_new_session=True))
