"""Test harness: polling with deadlines, endpoints, and owned ``zfarm`` subprocesses.

Every integration test drives real processes through :class:`Proc`::

    test --procs.broker()--> Proc(zfarm broker) --log--> tmp_path/broker-0.log
         --procs.worker()--> Proc(zfarm worker) --log--> tmp_path/worker-1.log
         --status()--------> zfarm status --json --stdout--> dict

Each ``Proc`` starts in its own session, so its process group holds it and every descendant that
does not call ``setsid``; teardown kills the group and the descendants found by walking parent links,
which also catches children orphaned when a test SIGKILLs their parent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from zfarm.local import free_tcp_endpoint

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
ZFARM_COMMAND: tuple[str, ...] = (sys.executable, "-m", "zfarm")
STATUS_TIMEOUT_S = 10.0
IPC_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS; keep a margin
BROKER_START_TIMEOUT_S = 20.0
TERMINATE_GRACE_S = 5.0

# Process groups of every Proc started in this pytest process, for the session-end leak check.
STARTED_PGIDS: set[int] = set()


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.02,
    message: str = "",
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Exceptions raised by ``predicate`` count as "not yet"; the last one is chained as ``__cause__``
    of the AssertionError raised when ``timeout_s`` passes.
    """
    deadline = time.monotonic() + timeout_s
    last_value: Any = None
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_value, last_error = value, None
        except Exception as exc:
            last_error = exc
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            break
        time.sleep(min(interval_s, remaining_s))
    seen = f"last error: {last_error!r}" if last_error is not None else f"last value: {last_value!r}"
    what = message or getattr(predicate, "__name__", "condition")
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; {seen}") from last_error


def ipc_endpoint(tmp_path: Path, name: str = "zfarm") -> str:
    """Return an ``ipc://`` endpoint in ``tmp_path``, or in the temp dir if that path is too long."""
    path = tmp_path / f"{name}.ipc"
    if len(str(path)) > IPC_PATH_MAX:
        path = Path(tempfile.gettempdir()) / f"zfarm-{uuid.uuid4().hex[:12]}.ipc"
    return f"ipc://{path}"


def zfarm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: ours, with the repo root first on PYTHONPATH."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


# --- process table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str  # "Z" for zombies

    @property
    def live(self) -> bool:
        return not self.state.startswith(("Z", "X"))


def process_table() -> list[ProcInfo]:
    """All processes visible to us, from /proc on Linux or ``ps`` elsewhere."""
    if Path("/proc/self/stat").exists():
        return list(_proc_table_from_procfs())
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    rows = (line.split() for line in out.splitlines())
    return [ProcInfo(int(r[0]), int(r[1]), int(r[2]), r[3]) for r in rows if len(r) >= 4]


def _proc_table_from_procfs() -> Iterable[ProcInfo]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        yield ProcInfo(int(entry.name), int(fields[1]), int(fields[2]), fields[0])


def family(roots: Iterable[int], pgids: Iterable[int] = ()) -> set[int]:
    """Live pids that descend from ``roots`` or belong to process groups ``pgids`` (roots excluded)."""
    table = [p for p in process_table() if p.live]
    children: dict[int, list[int]] = {}
    for p in table:
        children.setdefault(p.ppid, []).append(p.pid)
    root_set = set(roots)
    found = {p.pid for p in table if p.pgid in set(pgids)}
    stack = list(root_set)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return found - root_set


def live_pids(pids: Iterable[int]) -> set[int]:
    wanted = set(pids)
    return {p.pid for p in process_table() if p.pid in wanted and p.live}


def send_signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cmdline(pid: int) -> str:
    """A process's command line ("" when it is gone or /proc cannot tell)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def describe_pid(pid: int) -> str:
    return f"pid {pid}: {cmdline(pid).strip() or '?'}"


def kill_pids(pids: Iterable[int], timeout_s: float = 5.0) -> set[int]:
    """SIGKILL ``pids`` and wait for them to go; return those still alive at the deadline."""
    pids = set(pids)
    for pid in pids:
        send_signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while (alive := live_pids(pids)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


# --- subprocesses --------------------------------------------------------------------------------


class Proc:
    """A subprocess (``python -m zfarm ARGS`` by default) with its output in a log file.

    The output goes to a file rather than a pipe so a chatty process can never block on a full pipe.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        *,
        command: Sequence[str] = ZFARM_COMMAND,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = [*command, *args]
        self.log_path = log_path
        self.name = log_path.stem
        with open(log_path, "wb") as log_file:  # the child keeps its own copy of the descriptor
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env if env is not None else zfarm_env(),
                cwd=cwd or log_path.parent,
                start_new_session=True,  # own process group: teardown can reach every descendant
            )
        self.pgid = self._popen.pid
        STARTED_PGIDS.add(self.pgid)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} {describe_exit(self.returncode)}>"

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            send_signal(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)

    def wait(self, timeout_s: float) -> int:
        """Wait for exit and return the exit code; raises subprocess.TimeoutExpired at the deadline."""
        return self._popen.wait(timeout=timeout_s)

    def terminate(self, timeout_s: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if still running after ``timeout_s``; return the exit code."""
        self.cont()
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait(timeout_s)

    def children(self) -> set[int]:
        """Live descendants of this process (found through parent links only)."""
        return family([self.pid])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout_s: float = 10.0, *, count: int = 1) -> str:
        """Wait until ``text`` appears ``count`` times in the output; return the output.

        Fails at once, with the log tail, if the process exits before writing it.
        """

        def seen_or_exited() -> bool:
            return self.log().count(text) >= count or not self.alive()

        try:
            wait_for(seen_or_exited, timeout_s, message=f"{text!r} in the log of {self.name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log tail ---\n{self.log_tail()}") from None
        output = self.log()
        if output.count(text) < count:
            raise AssertionError(
                f"{self.name} {describe_exit(self.returncode)} before logging {text!r}:\n{self.log_tail()}"
            )
        return output


class Procs:
    """Starts zfarm processes for one test and owns them: :meth:`shutdown` leaves none running.

    Logs go to ``tmp_path/NN-NAME.log``, numbered in start order.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proc] = []

    def spawn(
        self,
        *args: str,
        name: str | None = None,
        command: Sequence[str] = ZFARM_COMMAND,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start ``python -m zfarm ARGS`` (or ``command ARGS``) and track it."""
        label = name or (args[0] if args and tuple(command) == ZFARM_COMMAND else "proc")
        label = re.sub(r"[^\w.-]+", "_", label)[:40]
        log_path = self.tmp_path / f"{len(self.started):02d}-{label}.log"
        proc = Proc(args, log_path, command=command, env=env)
        self.started.append(proc)
        return proc

    def broker(
        self, endpoint: str | None = None, *extra_args: str, timeout_s: float = BROKER_START_TIMEOUT_S
    ) -> tuple[Proc, str]:
        """Start a broker (on a fresh TCP port unless ``endpoint`` is given) and wait until it listens."""
        endpoint = endpoint or free_tcp_endpoint()
        proc = self.spawn("broker", "--bind", endpoint, "--log-level", "info", *extra_args)
        proc.wait_for_log("listening on", timeout_s)
        return proc, endpoint

    def worker(self, endpoint: str, *extra_args: str, procs: int = 1) -> Proc:
        """Start a worker with ``procs`` slots; it does not wait for the broker to register it."""
        return self.spawn("worker", "--connect", endpoint, "--procs", str(procs), *extra_args)

    def farm(self, *broker_args: str, workers: int = 1, procs: int = 1) -> tuple[str, list[Proc]]:
        """A broker and ``workers`` workers of ``procs`` slots, all registered; returns the endpoint."""
        _, endpoint = self.broker(None, *broker_args)
        started = [self.worker(endpoint, procs=procs) for _ in range(workers)]
        wait_for_workers(endpoint, workers)
        return endpoint, started

    def shutdown(self, grace_s: float = TERMINATE_GRACE_S) -> list[str]:
        """Stop everything started here and every descendant; return what needed force, as text."""
        roots = [p.pid for p in self.started]
        pgids = [p.pgid for p in self.started]
        tree = family(roots, pgids)  # before any leader exits and orphans its children
        problems: list[str] = []
        for pgid in pgids:  # a stopped process cannot act on SIGTERM
            try:
                os.killpg(pgid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in reversed(self.started):
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in reversed(self.started):
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"{proc.name} (pid {proc.pid}) ignored SIGTERM for {grace_s} s; SIGKILLed")
                proc.kill()
                proc.wait(grace_s)
        leftovers = live_pids(tree) | family(roots, pgids)
        if leftovers:
            problems.append(
                "descendants outlived their parents; SIGKILLed:\n  "
                + "\n  ".join(describe_pid(pid) for pid in sorted(leftovers))
            )
            if unkillable := kill_pids(leftovers):
                raise RuntimeError(f"processes survived SIGKILL: {sorted(unkillable)}")
        return problems

    def report(self, lines: int = 40) -> str:
        """The state and log tail of every process, for a failed test's output."""
        parts = []
        for proc in self.started:
            parts.append(f"----- {proc.name}: {shlex.join(proc.argv[1:])} [{describe_exit(proc.returncode)}]")
            parts.append(proc.log_tail(lines) or "(no output)")
        return "\n".join(parts)


def run_zfarm(*args: str, timeout_s: float = 60.0,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m zfarm ARGS`` to completion (for commands that exit by themselves)."""
    return subprocess.run([*ZFARM_COMMAND, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=zfarm_env(env), timeout=timeout_s)


def status(endpoint: str, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any] | None:
    """Run ``zfarm status --json`` against ``endpoint``; return the snapshot, or None if it failed."""
    try:
        result = run_zfarm("status", "--connect", endpoint, "--json", timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    try:
        snapshot = json.loads(result.stdout)
    except json.JSONDecodeError:
        return None
    return snapshot if isinstance(snapshot, dict) else None


def require_status(endpoint: str) -> dict[str, Any]:
    """``status``, failing the test when the broker does not answer."""
    snapshot = status(endpoint)
    if snapshot is None:
        raise AssertionError(f"zfarm status failed against {endpoint}")
    return snapshot


def wait_for_workers(endpoint: str, count: int, timeout_s: float = 20.0) -> dict[str, Any]:
    """Wait until the broker at ``endpoint`` lists exactly ``count`` workers; return that snapshot."""

    def snapshot_with_workers() -> dict[str, Any]:
        snapshot = require_status(endpoint)
        ids = [w.get("id") for w in snapshot.get("workers", [])]
        if len(ids) != count:
            raise AssertionError(f"broker lists {len(ids)} workers: {ids}")
        return snapshot

    return wait_for(
        snapshot_with_workers, timeout_s, interval_s=0.1, message=f"{count} workers at {endpoint}"
    )


def wait_for_worker_pids(fetch: Callable[[], dict[str, Any]], pids: Iterable[int],
                         timeout_s: float = 20.0) -> dict[str, Any]:
    """Wait until the snapshots ``fetch`` returns list exactly the workers with these pids."""
    wanted = sorted(pids)

    def listed() -> dict[str, Any] | None:
        snapshot = fetch()
        return snapshot if sorted(w["pid"] for w in snapshot["workers"]) == wanted else None

    return wait_for(listed, timeout_s, interval_s=0.05, message=f"workers with pids {wanted} registered")


def recv_message(sock: Any, timeout_s: float = 10.0) -> Any:
    """The next message a raw ZeroMQ socket receives from the broker, decoded."""
    from zfarm import protocol

    assert sock.poll(int(timeout_s * 1000)), "no reply from the broker"
    return protocol.decode(sock.recv_multipart())
