"""Job functions that tests submit to workers.

Workers import these by reference as ``tests.jobs.<name>``; the test harness puts the repo root first on
``PYTHONPATH`` so that works in every worker process. Keep them top-level and free of test state.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

HOLD_LIMIT_S = 60.0
POLL_INTERVAL_S = 0.01


def square(x: int) -> int:
    return x * x


def add(a: Any, b: Any) -> Any:
    return a + b


def noop(x: object = None) -> None:
    return None


def slow_square(x: int, delay_s: float = 0.05) -> int:
    time.sleep(delay_s)
    return x * x


def sleep_then(x: T, seconds: float) -> T:
    time.sleep(seconds)
    return x


def boom(x: object) -> NoReturn:
    raise ValueError(f"boom {x}")


class CustomError(Exception):
    """An exception whose constructor takes two arguments, to test that it survives pickling."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"custom error {self.code}: {self.detail}"


def raise_custom(x: int) -> NoReturn:
    raise CustomError(x, f"raised for {x}")


def segfault(x: object = None) -> NoReturn:
    """Crash the worker process with SIGSEGV by reading address 0."""
    ctypes.string_at(0)
    raise AssertionError("unreachable: reading address 0 did not crash")


def hard_exit(code: int) -> NoReturn:
    """Leave the process at once, skipping cleanup, as a crashing extension would."""
    os._exit(code)


def echo(payload: T) -> T:
    return payload


def make_bytes(n: int) -> bytes:
    return bytes(n)


def length(data: Any) -> int:
    return len(data)


def pid(x: object = None) -> int:
    return os.getpid()


def hold(path: str | os.PathLike[str], x: T) -> T:
    """Keep the job in flight until ``path`` exists (the test creates it), then return ``x``."""
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"hold: {path} did not appear within {HOLD_LIMIT_S} s")
        time.sleep(POLL_INTERVAL_S)
    return x


def wait_forever(x: object = None) -> NoReturn:
    """Never return; the test cancels the job or kills the worker."""
    while True:
        time.sleep(0.1)


def square_or_boom(x: int, bad: int) -> int:
    """``x * x``, except for ``x == bad``, which raises ValueError("boom BAD") (a map failing mid-way)."""
    if x == bad:
        boom(x)
    return x * x


def touch_and_hold(started: str | os.PathLike[str], release: str | os.PathLike[str], x: T) -> T:
    """Create ``started`` (the test waits for it: the job now runs in a slot), then ``hold(release, x)``."""
    Path(started).touch()
    return hold(release, x)


def mark_then_sleep(marker_dir: str | os.PathLike[str], x: T, seconds: float) -> T:
    """Create ``marker_dir/started-<x>`` (so the test knows the job runs), sleep, return ``x``."""
    Path(marker_dir, f"started-{x}").touch()
    time.sleep(seconds)
    return x


def kill_my_worker(x: int = 0) -> int:
    """SIGKILL the worker running this job (as a job that brings its machine down would)."""
    os.kill(int(os.environ["ZFARM_WORKER_PID"]), signal.SIGKILL)
    time.sleep(60)
    return x


def hog_memory(megabytes: int, hold_s: float = 30.0) -> int:
    """Touch ``megabytes`` MiB of memory and hold it (for memory-limit tests)."""
    block = bytearray(megabytes * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(hold_s)
    return len(block)


def fail_times(counter_dir: str | os.PathLike[str], times: int, x: int) -> int:
    """Raise on the first ``times`` runs (counted in files under ``counter_dir``), then return x."""
    runs = len(list(Path(counter_dir).iterdir()))
    Path(counter_dir, f"run-{runs}").touch()
    if runs < times:
        raise RuntimeError(f"attempt {runs + 1} fails")
    return x


def record_run(marker_dir: str | os.PathLike[str], x: int, seconds: float) -> int:
    """Leave ``started-X-…`` and, after sleeping, ``finished-X-…`` in ``marker_dir``; return ``x * 10``.

    One pair of files per run, so tests count how many times each job ran.
    """
    run = f"{x}-{os.getpid()}-{time.monotonic_ns()}"
    Path(marker_dir, f"started-{run}").touch()
    time.sleep(seconds)
    Path(marker_dir, f"finished-{run}").touch()
    return x * 10


def record_held_run(marker_dir: str | os.PathLike[str], release: str | os.PathLike[str], x: int) -> int:
    """As ``record_run``, but the run lasts until ``release`` exists (``hold``), not a fixed time."""
    run = f"{x}-{os.getpid()}-{time.monotonic_ns()}"
    Path(marker_dir, f"started-{run}").touch()
    hold(release, x)
    Path(marker_dir, f"finished-{run}").touch()
    return x * 10


def leave_orphans(pid_file: str | os.PathLike[str], hold_s: float) -> list[int]:
    """Start a ``setsid`` child and a double-forked daemon, write their pids, then run ``hold_s``.

    Both escape the job's process group; only a subreaper (or a cgroup) still finds them.
    """
    import subprocess

    setsid_child = subprocess.Popen(["sleep", "1000"], start_new_session=True).pid
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the first fork: leaves a daemon behind and exits at once
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            os.close(read_end)
            os.close(write_end)
            time.sleep(1000)
            os._exit(0)
        os.write(write_end, str(daemon).encode())
        os._exit(0)
    os.close(write_end)
    daemon = int(os.read(read_end, 32))
    os.close(read_end)
    pids = [setsid_child, daemon]
    tmp = Path(f"{pid_file}.tmp")
    tmp.write_text(" ".join(map(str, pids)))
    tmp.replace(pid_file)  # whole, or not there
    time.sleep(hold_s)
    return pids


def print_everywhere(n_bytes: int = 0) -> str:
    """Print through Python, through fd 1 directly, and from a child process; optionally ``n_bytes`` more."""
    import sys

    print("from python")
    print("to stderr", file=sys.stderr)
    sys.stdout.flush()
    os.write(1, b"from fd 1\n")
    os.system("echo from a child; echo child err >&2")
    block = b"y" * 65536
    for _ in range(n_bytes // len(block)):
        os.write(1, block)
    return "done"


def identify(obj: Any, x: int = 0) -> tuple[int, int, int, int]:
    """Which slot ran this, which object it got (its id), and its length and checksum."""
    import zlib

    data = obj["inside"][0] if isinstance(obj, dict) else obj
    return os.getpid(), id(data), len(data), zlib.crc32(data)


def print_until(path: str) -> str:
    """Print a line, wait until ``path`` exists (at most HOLD_LIMIT_S), print another (live output)."""
    os.write(1, b"before\n")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
    os.write(1, b"after\n")
    return "done"
