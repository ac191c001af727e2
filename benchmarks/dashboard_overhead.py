"""How much does an attached dashboard slow the broker down?

A real broker and two workers (subprocesses on loopback TCP) run a no-op map of ``--jobs`` jobs
(``--chunksize`` a message) ``--reps`` times for each mode, the modes alternating within each
repetition so drift on a shared machine hits them alike:

    off    no dashboard
    4 Hz   a dashboard-like poller: one persistent monitor connection (the dashboard's own), a
           STATUS every 0.25 s, each snapshot rendered to an off-screen rich console
    10 Hz  the same every 0.1 s

Prints each run, the median jobs/s per mode and the relative drop against ``off``::

    python benchmarks/dashboard_overhead.py [--jobs 100000] [--chunksize 10] [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zfarm
from benchmarks._workloads import cpu_s
from zfarm.dashboard import DashboardState, _Link, render
from zfarm.local import LocalCluster

REPO_ROOT = Path(__file__).resolve().parent.parent


def noop(x: object) -> None:
    return None


def poll_forever(address: str, hz: float, draw: bool) -> None:
    """The poller process: what ``zfarm dashboard`` does each refresh, minus the terminal.

    Until SIGTERM: ask for a snapshot, wait for it, render it off-screen; print "ready" after the
    first, and how many at the end.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    link = _Link(address)
    console = Console(file=io.StringIO(), width=160)
    snapshots = 0
    try:
        next_ask = time.monotonic()
        while True:
            next_ask += 1.0 / hz  # pace by the clock, so asking and drawing do not slow the rate
            time.sleep(max(0.0, next_ask - time.monotonic()))
            now = time.monotonic()
            if link.asked_at is not None and now - link.asked_at > 2.0:
                link.reset()  # as the dashboard does when the broker stops answering
            link.ask(now)
            _quit, snapshot = link.wait(None, 2.0)
            if snapshot is not None:
                snapshots += 1
                if snapshots == 1:
                    print("ready", flush=True)  # started up: time the map from here
                if draw:
                    console.print(render(snapshot, DashboardState(address)))
                    console.file = io.StringIO()
    finally:
        link.close()
        print(snapshots, flush=True)


class Poller:
    """A dashboard-like poller in its own process, as the real dashboard would be."""

    def __init__(self, address: str, hz: float, draw: bool = True) -> None:
        self.argv = [sys.executable, __file__, "--poll", address, "--hz", str(hz)]
        self.argv += [] if draw else ["--no-draw"]
        self.snapshots = 0

    def __enter__(self) -> Poller:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert self.proc.stdout is not None
        started = select.select([self.proc.stdout], [], [], 30)[0]
        if not started or self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            self.proc.communicate()
            raise SystemExit("the poller did not start within 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.snapshots = int(out.strip() or 0) - 1  # those during the map


def wait_for_workers(address: str, count: int, timeout_s: float = 30.0) -> None:
    from zfarm.monitor import fetch_status

    deadline = time.monotonic() + timeout_s
    while len(fetch_status(address, 5.0)["workers"]) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} workers did not register within {timeout_s} s")
        time.sleep(0.1)


def broker_cpu_per_status(address: str, broker_pid: int, hz: float = 200.0, seconds: float = 5.0) -> float:
    """Broker CPU seconds per STATUS answered (idle farm, polled fast; the idle baseline subtracted)."""
    before = cpu_s(broker_pid)
    time.sleep(seconds)
    idle_s = cpu_s(broker_pid) - before
    before = cpu_s(broker_pid)
    with Poller(address, hz, draw=False) as poller:
        time.sleep(seconds)
    return max(0.0, cpu_s(broker_pid) - before - idle_s) / max(1, poller.snapshots)


def one_run(client: zfarm.Client, jobs: int, chunksize: int, hz: float) -> tuple[float, int]:
    """Jobs per second of one map, and how many snapshots the poller rendered meanwhile."""
    poller = Poller(client.address, hz) if hz else None
    with poller if poller else contextlib.nullcontext():
        started = time.perf_counter()
        done = sum(1 for _ in client.map(noop, range(jobs), chunksize=chunksize))
        elapsed = time.perf_counter() - started
    assert done == jobs
    return jobs / elapsed, poller.snapshots if poller else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--chunksize", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--procs", type=int, default=1, help="slots per worker (2 workers)")
    parser.add_argument("--poll", metavar="ADDR", help=argparse.SUPPRESS)  # run as the poller process
    parser.add_argument("--hz", type=float, default=4.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-draw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll:
        poll_forever(args.poll, args.hz, not args.no_draw)
        return
    # the embedded farm's broker and workers: started together, stopped together (whatever happens)
    farm = LocalCluster(n_workers=2, procs_per_worker=args.procs)
    address = farm.address
    try:
        wait_for_workers(address, 2)
        modes: dict[str, float] = {"off": 0.0, "4 Hz": 4.0, "10 Hz": 10.0}
        rates: dict[str, list[float]] = {m: [] for m in modes}
        with zfarm.Client(address) as client:
            one_run(client, args.jobs // 4, args.chunksize, 0.0)  # warm up: imports, connections
            for rep in range(args.reps):
                order = list(modes) if rep % 2 == 0 else list(reversed(modes))
                for mode in order:
                    rate, snapshots = one_run(client, args.jobs, args.chunksize, modes[mode])
                    rates[mode].append(rate)
                    print(f"rep {rep + 1} {mode:>5}: {rate:8,.0f} jobs/s  ({snapshots} snapshots rendered)",
                          flush=True)
        per_status_s = broker_cpu_per_status(address, farm.broker.pid)
        base = statistics.median(rates["off"])
        print(f"\n{args.jobs:,} no-op jobs, chunksize {args.chunksize}, 2 workers x {args.procs} slots, "
              f"{args.reps} reps; {os.cpu_count()} CPUs")
        for mode, values in rates.items():
            median = statistics.median(values)
            spread = f"{min(values):,.0f}..{max(values):,.0f}"
            drop = "" if mode == "off" else f"  drop {100 * (base - median) / base:+.1f} %"
            paired = [rate / off - 1 for rate, off in zip(values, rates["off"], strict=True)]
            if mode != "off":
                drop += f"; paired (same rep) median change {100 * statistics.median(paired):+.1f} %"
            print(f"{mode:>5}: median {median:8,.0f} jobs/s  (range {spread}){drop}")
        print(f"broker CPU per STATUS answered: {per_status_s * 1e6:,.0f} us, i.e. "
              f"{per_status_s * 4 * 100:.3f} % of one core at 4 Hz, {per_status_s * 10 * 100:.3f} % at 10 Hz")
    finally:
        farm.stop()  # the workers first, then the broker; SIGKILL whatever does not stop in time


if __name__ == "__main__":
    main()
