"""Leave a sweep running, crash the broker, come back and collect every result.

Run it with::

    python examples/durable_session.py

It starts ``zfarm broker --journal`` and one worker (two slots) as child processes on a
private ipc endpoint. A client in session "sweep-42" maps 12 slow jobs and leaves at once
(``shutdown(wait=False)``): the jobs run without it. Once they have run, the broker is
SIGKILLed and started again on the same journal. A new client in the same session runs
the same map and gets all 12 results straight away: they came from the journal, and each
job ran once (every run leaves a mark in a folder, which the script counts). Every process
it started is stopped in a ``finally`` block.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zfarm
from zfarm.monitor import fetch_status

JOBS = 12


def slow_cube(x: int, marks: str) -> int:
    """Cube x slowly; leave one file per run so the caller can count executions."""
    Path(marks, f"{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(0.3)
    return x**3


def start(*args: str) -> subprocess.Popen[bytes]:
    # A new session per process: cleanup can signal a worker together with its slot processes.
    return subprocess.Popen([sys.executable, "-m", "zfarm", *args, "--log-level", "warning"],
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_until(what: str, condition, timeout_s: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except zfarm.BrokerUnavailable:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gave up after {timeout_s} s waiting for {what}")


def main() -> int:
    folder = tempfile.mkdtemp(prefix="zfarm-example-")
    address = f"ipc://{folder}/broker.sock"
    journal = os.path.join(folder, "journal.db")
    marks = Path(folder, "marks")
    marks.mkdir()
    broker = start("broker", "--bind", address, "--journal", journal)
    processes = [broker, start("worker", "--connect", address, "--procs", "2")]
    try:
        wait_until("the worker", lambda: fetch_status(address, timeout_s=2)["workers"])

        first = zfarm.Client(address, session="sweep-42")
        first.map(slow_cube, range(JOBS), [str(marks)] * JOBS)  # submitted; nobody reads the results
        first.shutdown(wait=False)  # leave the session: the broker holds the jobs
        print(f"the client left; {JOBS} jobs run without it")
        held = lambda: fetch_status(address, timeout_s=2)["clients"][0]["held"]  # noqa: E731
        wait_until("every result held", lambda: held() == JOBS)

        print(f"SIGKILL the broker (pid {broker.pid}) and start it again on {journal}")
        broker.kill()
        broker.wait()
        processes.append(start("broker", "--bind", address, "--journal", journal))
        clients = wait_until("the restarted broker", lambda: fetch_status(address, timeout_s=2)["clients"])
        print(f"the new broker holds {clients[0]['held']} results for {clients[0]['id']}")

        with zfarm.Client(address, session="sweep-42") as again:
            results = list(again.map(slow_cube, range(JOBS), [str(marks)] * JOBS))
        ok = results == [x**3 for x in range(JOBS)]
        runs = len(list(marks.iterdir()))
        print(f"collected {len(results)} results, all right: {ok}; {runs} runs for {JOBS} jobs")
        return 0 if ok and runs == JOBS else 1
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
