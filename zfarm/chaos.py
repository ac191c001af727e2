"""A chaos soak: a real farm keeps its promise while its processes are killed.

    python -m zfarm.chaos --jobs 10000 --workers 4 --kill-every 0.5 --broker-restarts 2

starts a broker (with a journal, in a temporary folder unless --journal names one) and K workers
on a loopback port, runs a map of N jobs through them, and meanwhile
SIGKILLs a random worker every X seconds (and starts a new one), SIGSTOPs a worker for longer than
the liveness window and resumes it, and SIGKILLs and restarts the broker on the same port and
journal a few times. It then prints submitted, received, lost, duplicates delivered, wrong
results and the wall time, and exits 1 unless lost = duplicates = wrong = 0.

With ``--client-kills K`` the client runs in a process of its own under a session, and is SIGKILLed
K times as well, spread over the run; each time the same map is started again in a new process
under the same session, as a user would rerun a script. The counts are those of the last run,
which must deliver every result once.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zfarm
from zfarm.local import free_tcp_endpoint, stop_processes

HEARTBEAT_S = 0.25
LIVENESS = 3


def chaos_job(x: int, work_s: float) -> tuple[int, int]:
    """The job: a little work, then a result that says which input it came from."""
    time.sleep(work_s)
    return x, x * x


class Farm:
    """The broker and workers, started as ``python -m zfarm`` processes; all stopped by ``stop``."""

    def __init__(self, workers: int, log: Any, journal: str) -> None:
        self.address = free_tcp_endpoint()
        self.log = log
        self.journal = journal
        self.broker = self._start_broker()
        self.workers = [self._start_worker() for _ in range(workers)]
        self.lock = threading.Lock()

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        liveness = ["--heartbeat-interval", str(HEARTBEAT_S), "--liveness", str(LIVENESS)]
        return subprocess.Popen([sys.executable, "-m", "zfarm", *args, *liveness, "--log-level", "warning"],
                                stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)

    def _start_broker(self) -> subprocess.Popen[bytes]:
        journal = ("--journal", self.journal) if self.journal else ()
        return self._spawn("broker", "--bind", self.address, *journal)

    def _start_worker(self) -> subprocess.Popen[bytes]:
        return self._spawn("worker", "--connect", self.address, "--procs", "1", "--grace", "1")

    def kill_a_worker(self, rng: random.Random) -> None:
        with self.lock:
            victim = rng.randrange(len(self.workers))
            self.workers[victim].kill()
            self.workers[victim].wait()
            self.workers[victim] = self._start_worker()

    def stop_a_worker(self, rng: random.Random, pause_s: float, stopping: threading.Event) -> None:
        with self.lock:
            victim = self.workers[rng.randrange(len(self.workers))]
            victim.send_signal(signal.SIGSTOP)
        stopping.wait(pause_s)
        victim.send_signal(signal.SIGCONT)

    def restart_broker(self) -> None:
        with self.lock:
            self.broker.kill()
            self.broker.wait()
            self.broker = self._start_broker()

    def stop(self) -> None:
        with self.lock:
            procs = [*self.workers, self.broker]
        stop_processes(procs, time.monotonic() + 10)


def _chaos(farm: Farm, args: argparse.Namespace, received: list[int], stopping: threading.Event,
           events: list[str]) -> None:
    """Kill, stop and restart things until ``stopping`` is set."""
    rng = random.Random(args.seed)
    restarts_done = 0
    next_kill = time.monotonic() + args.kill_every
    next_stop = time.monotonic() + args.stop_every
    while not stopping.wait(0.05):
        now = time.monotonic()
        if args.kill_every and now >= next_kill:
            farm.kill_a_worker(rng)
            events.append("worker-kill")
            next_kill = now + args.kill_every
        if args.stop_every and now >= next_stop:
            farm.stop_a_worker(rng, HEARTBEAT_S * LIVENESS * 2, stopping)
            events.append("worker-stop")
            next_stop = time.monotonic() + args.stop_every
        due = args.jobs * (restarts_done + 1) // (args.broker_restarts + 1)
        if restarts_done < args.broker_restarts and received[0] >= due:
            farm.restart_broker()
            events.append("broker-restart")
            restarts_done += 1


@dataclass
class Tally:
    """What the (last) client received."""

    seen: dict[int, int] = field(default_factory=dict)
    wrong: int = 0
    dropped: int = 0  # duplicates the client dropped
    failure: str = ""

    def add(self, x: int, square: int) -> None:
        self.seen[x] = self.seen.get(x, 0) + 1
        self.wrong += square != x * x


def _map_here(farm: Farm, args: argparse.Namespace, received: list[int], chaos: threading.Thread) -> Tally:
    tally = Tally()
    with zfarm.Client(farm.address, broker_timeout_s=args.time_limit, session=args.session) as client:
        chaos.start()
        results = client.map(chaos_job, range(args.jobs), [args.work_s] * args.jobs,
                             timeout=args.time_limit, chunksize=args.chunksize)
        try:
            for x, square in results:
                tally.add(x, square)
                received[0] += 1
        except TimeoutError:
            print(f"chaos: time limit of {args.time_limit:.0f} s reached", file=sys.stderr)
        except zfarm.ZfarmError as exc:  # reported below as lost results
            tally.failure = f"{type(exc).__name__}: {exc}"
        tally.dropped = client.duplicates_dropped
    return tally


def _map_in_processes(farm: Farm, args: argparse.Namespace, received: list[int], chaos: threading.Thread,
                      folder: str, events: list[str]) -> Tally:
    """Run the map in a client process, SIGKILL it ``--client-kills`` times and start it again."""
    deadline = time.monotonic() + args.time_limit
    chaos.start()
    tally = Tally()
    for run in range(args.client_kills + 1):
        out = Path(folder, f"client-{run}.txt")
        out.touch()
        proc = subprocess.Popen(
            [sys.executable, "-m", "zfarm.chaos", "--client-of", farm.address, "--out", str(out),
             "--session", args.session, "--jobs", str(args.jobs), "--work-s", str(args.work_s),
             "--chunksize", str(args.chunksize), "--time-limit", str(args.time_limit)],
            stdin=subprocess.DEVNULL, stdout=farm.log, stderr=farm.log)
        last = run == args.client_kills
        kill_at = None if last else args.jobs * (run + 1) // (args.client_kills + 1)
        received[0] = 0
        with open(out, "rb") as progress:  # read on from where we were: only the new lines are counted
            while proc.poll() is None:
                received[0] += progress.read().count(b"\n")
                if time.monotonic() > deadline:
                    proc.kill()
                    tally.failure = f"time limit of {args.time_limit:.0f} s reached"
                elif kill_at is not None and received[0] >= kill_at:
                    proc.kill()
                    proc.wait()  # dead before the next look: a slow exit is not killed (and counted) twice
                    events.append("client-kill")
                    kill_at = None
                time.sleep(0.02)
        if proc.wait() != 0 and (tally.failure or last):
            tally.failure = tally.failure or f"the last client exited with {proc.returncode}"
            break
    lines = out.read_text().splitlines()
    for line in lines:
        if line[:1].isdigit():
            x, square = line.split()
            tally.add(int(x), int(square))
    dropped = [line for line in lines if line.startswith("dropped ")]
    tally.dropped = int(dropped[-1].split()[1]) if dropped else 0
    received[0] = sum(tally.seen.values())
    return tally


def _client_process(args: argparse.Namespace) -> int:
    """``--client-of``: one client run of a ``--client-kills`` soak, its results in ``--out``."""
    with open(args.out, "w", buffering=1) as out, zfarm.Client(
            args.client_of, broker_timeout_s=args.time_limit, session=args.session) as client:
        for x, square in client.map(chaos_job, range(args.jobs), [args.work_s] * args.jobs,
                                    timeout=args.time_limit, chunksize=args.chunksize):
            out.write(f"{x} {square}\n")
        out.write(f"dropped {client.duplicates_dropped}\n")
    return 0


def run(args: argparse.Namespace) -> int:
    log_path = args.log or os.devnull
    with open(log_path, "ab") as log, tempfile.TemporaryDirectory(prefix="zfarm-chaos-") as folder:
        journal = "" if args.no_journal else args.journal or os.path.join(folder, "journal.db")
        farm = Farm(args.workers, log, journal)
        received = [0]
        stopping = threading.Event()
        events: list[str] = []
        chaos = threading.Thread(target=_chaos, args=(farm, args, received, stopping, events), daemon=True)
        started = time.monotonic()
        try:
            if args.client_kills:
                tally = _map_in_processes(farm, args, received, chaos, folder, events)
            else:
                tally = _map_here(farm, args, received, chaos)
        finally:
            stopping.set()
            if chaos.is_alive():
                chaos.join(30)
            farm.stop()
    wall_s = time.monotonic() - started
    lost = sum(1 for x in range(args.jobs) if x not in tally.seen)
    duplicates = sum(n - 1 for n in tally.seen.values() if n > 1)
    print(f"submitted            {args.jobs}")
    print(f"results received     {sum(tally.seen.values())}")
    print(f"lost                 {lost}")
    print(f"duplicates delivered {duplicates}")
    print(f"wrong results        {tally.wrong}")
    print(f"duplicates dropped   {tally.dropped} (results that came twice, from a job run twice or a held "
          "result sent again; delivered once)")
    print(f"chaos                {events.count('worker-kill')} worker kills, "
          f"{events.count('worker-stop')} worker stops, {events.count('broker-restart')} broker restarts, "
          f"{events.count('client-kill')} client kills")
    if args.client_kills:
        print(f"client reruns        {args.client_kills} (session {args.session}: each rerun collects what "
              "the killed one left)")
    where = args.journal or ("a temporary file, removed now" if journal else
                             "none (the client resubmits after a broker restart)")
    print(f"journal              {where}")
    print(f"wall time            {wall_s:.1f} s")
    if tally.failure:
        print(f"the map stopped on   {tally.failure}")
    return 0 if lost == duplicates == tally.wrong == 0 and not tally.failure else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zfarm.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs to run (default 10000)")
    parser.add_argument("--workers", type=int, default=4, help="workers, one slot each (default 4)")
    parser.add_argument("--kill-every", type=float, default=0.5,
                        help="seconds between worker SIGKILLs (0: none)")
    parser.add_argument("--stop-every", type=float, default=5.0,
                        help="seconds between SIGSTOPs of a worker for twice the liveness window (0: none)")
    parser.add_argument("--broker-restarts", type=int, default=2,
                        help="broker SIGKILL + restarts (default 2)")
    parser.add_argument("--work-s", type=float, default=0.002, help="seconds each job works (default 0.002)")
    parser.add_argument("--chunksize", type=int, default=1, help="items a job (default 1: every job alone)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("--seed", type=int, default=None, help="random seed, to repeat a run")
    parser.add_argument("--log", default=None, help="file for the farm's logs (default: discard)")
    parser.add_argument("--journal", default=None, metavar="PATH",
                        help="the broker's journal (default: one in a temporary folder)")
    parser.add_argument("--no-journal", action="store_true", help="run the broker without a journal")
    parser.add_argument("--session", default=None,
                        help="run the client in this session (with --client-kills: default chaos)")
    parser.add_argument("--client-kills", type=int, default=0,
                        help="SIGKILL the client this many times and rerun it (in a session; default 0)")
    parser.add_argument("--client-of", help=argparse.SUPPRESS)  # one client run of a --client-kills soak
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.workers < 1:
        parser.error("--jobs and --workers must be at least 1")
    if args.client_of:
        return _client_process(args)
    if args.client_kills and not args.session:
        args.session = "chaos"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
