"""The embedded farm behind ``Client()``: a broker and workers as child processes.

They run the same code as ``zfarm broker`` and ``zfarm worker`` (started as
``python -m zfarm``), talk over an ipc endpoint in a private temporary folder,
watch this process's pid so that they exit if it dies, and are stopped by
:meth:`LocalCluster.stop` (called by ``Client.shutdown`` and at interpreter exit).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

log = logging.getLogger(__name__)


class LocalCluster:
    def __init__(self, n_workers: int | None = None, procs_per_worker: int = 1,
                 heartbeat_interval_s: float | None = None, log_level: str = "warning",
                 keys: str = "") -> None:
        self.n_workers = n_workers or os.cpu_count() or 1
        self._tmpdir = tempfile.mkdtemp(prefix="zfarm-")
        self.address = _private_endpoint(self._tmpdir)
        common = ["--parent-pid", str(os.getpid()), "--log-level", log_level]
        if heartbeat_interval_s is not None:
            common += ["--heartbeat-interval", str(heartbeat_interval_s)]
        if keys:
            common += ["--keys", keys]
        self.broker = _spawn(["broker", "--bind", self.address, *common])
        self.workers = [
            _spawn(["worker", "--connect", self.address, "--procs", str(procs_per_worker), "--grace", "2",
                    *common])
            for _ in range(self.n_workers)
        ]
        log.info("embedded farm at %s: broker pid %d, %d workers", self.address, self.broker.pid,
                 self.n_workers)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every process (politely, then by force) and remove the temporary folder."""
        deadline = time.monotonic() + timeout_s
        stop_processes(self.workers, deadline)  # workers first, so none of them sees its broker leave
        stop_processes([self.broker], deadline)
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def stop_processes(procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
    """SIGTERM each (resumed first, if it was stopped); SIGKILL any still running at ``deadline``."""
    for proc in procs:
        if proc.poll() is None:
            if hasattr(signal, "SIGCONT"):  # not on Windows
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in time: killing it", proc.pid)
            proc.kill()
            proc.wait()


#: settings that name one process or one shared farm, which the private, embedded farm must not
#: take from the environment: another broker's journal (two brokers would fight over it), an
#: endpoint, a worker's id, and the client's key name (its workers use the folder's one worker key)
_NOT_INHERITED = ("ZFARM_JOURNAL", "ZFARM_JOURNAL_SYNC", "ZFARM_SESSION_TTL_S", "ZFARM_BIND",
                  "ZFARM_WORKER_ID", "ZFARM_KEY_NAME")


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    return subprocess.Popen([sys.executable, "-m", "zfarm", *args], stdin=subprocess.DEVNULL, env=env)


def _private_endpoint(folder: str) -> str:
    if os.name != "nt":
        return f"ipc://{folder}/broker.sock"
    return free_tcp_endpoint()  # Windows has no ipc transport


def free_tcp_endpoint() -> str:
    """``tcp://127.0.0.1:PORT`` with a port the kernel just reported free."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
