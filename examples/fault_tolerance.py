"""Kill a worker in the middle of a map and watch every result still arrive exactly once.

Run it with::

    python examples/fault_tolerance.py

It starts its own farm as child processes: ``zfarm broker`` and two ``zfarm worker``
processes (two slots each) on a private ipc endpoint, with 0.2 s heartbeats so that a dead
worker is noticed within 0.6 s. Halfway through a map of 40 jobs it SIGKILLs one worker.
The broker notices the silence, puts that worker's jobs back at the front of the queue,
and the other worker runs them. Each job also leaves a mark in a folder each time it
runs, so the script can show that some jobs ran twice (execution is at least once) while
the map still yields each result once, in order (delivery is exactly once). Every
process it started is stopped in a ``finally`` block.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zfarm
from zfarm.monitor import fetch_status

JOBS = 40


def slow_square(x: int, marks: str) -> int:
    """Square x slowly; leave one file per run so the caller can count executions."""
    Path(marks, f"{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(0.2)
    return x * x


def start(*args: str) -> subprocess.Popen[bytes]:
    # A new session per process: cleanup can signal a worker together with its slot processes.
    return subprocess.Popen([sys.executable, "-m", "zfarm", *args, "--log-level", "warning"],
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for_workers(address: str, count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if len(fetch_status(address, timeout_s=2)["workers"]) >= count:
                return
        except zfarm.BrokerUnavailable:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{count} workers did not register within {timeout_s} s")


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM to the zfarm process only: a worker then stops its slots itself
    for proc in processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group (slot processes)
        except ProcessLookupError:
            pass
        proc.wait()


def main() -> int:
    folder = tempfile.mkdtemp(prefix="zfarm-example-")
    address = f"ipc://{folder}/broker.sock"
    marks = Path(folder, "marks")
    marks.mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(start("broker", "--bind", address, "--heartbeat-interval", "0.2"))
        victim = start("worker", "--connect", address, "--procs", "2", "--worker-id", "victim")
        survivor = start("worker", "--connect", address, "--procs", "2", "--worker-id", "survivor")
        processes += [victim, survivor]
        wait_for_workers(address, 2)

        results = []
        with zfarm.Client(address) as client:
            for i, value in enumerate(client.map(slow_square, range(JOBS), [str(marks)] * JOBS)):
                results.append(value)
                if i == JOBS // 2:
                    print(f"result {i} is in: SIGKILL the worker 'victim' (pid {victim.pid})")
                    victim.kill()
            duplicates = client.duplicates_dropped
        status = fetch_status(address, timeout_s=5)

        runs = len(list(marks.iterdir()))
        ok = results == [x * x for x in range(JOBS)]
        print(f"{len(results)} results, each once and in order: {ok}")
        print(f"{runs} executions for {JOBS} jobs; the broker requeued {status['requeued']} jobs "
              f"after losing {status['workers_lost']} worker(s); the client dropped {duplicates} duplicates")
        return 0 if ok else 1
    finally:
        stop_all(processes)
        for path in marks.iterdir():
            path.unlink()
        marks.rmdir()
        for path in Path(folder).iterdir():
            path.unlink()
        os.rmdir(folder)


if __name__ == "__main__":
    sys.exit(main())
