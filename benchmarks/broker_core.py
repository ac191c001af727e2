"""The broker's own cost per job, without sockets or other processes: jobs/s through its sans-IO core.

::

    python benchmarks/broker_core.py [--jobs 100000] [--repeat 3] [--window 4] [--profile]

One client and two one-slot workers (credit 2 each: a job in the slot and one prefetched) speak to a
``Scheduler`` with encoded frames, as the broker's shell would hand them over: the client sends
each job in its own SUBMIT (``submit()``), keeping ``--window`` jobs in flight; each worker answers
each job in its own RESULTS; the client acknowledges each RESULT with a RECEIVED. What is timed is
the broker's side only: ``handle`` of every message, ``flush``, and encoding what it returns. The
peers' messages are encoded outside the timed part. Works with the code before the broker's split
(``zfarm.scheduler``) and after it (``zfarm.broker.scheduler``), to compare the two.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from typing import Any

from zfarm import protocol as p
from zfarm.config import BrokerSettings

try:
    from zfarm.broker.scheduler import Scheduler
except ImportError:  # the code before the split
    from zfarm.scheduler import Scheduler  # type: ignore[no-redef]

FN = b"\xf1" * 16
CLIENT, WORKERS = b"\x00client", (b"\x00worker-1", b"\x00worker-2")
RUN_STATS = [1.0, 1.001, 0.0005, 1000]


def one_run(jobs: int, window: int) -> float:
    """Seconds the broker's core spent on ``jobs`` jobs."""
    clock = time.perf_counter
    spent = 0.0
    now = 0.0
    sched = Scheduler(BrokerSettings(), now, broker_id="bench")

    def handle(route: bytes, frames: list[Any]) -> None:
        nonlocal spent
        started = clock()
        sched.handle(route, frames, now)
        spent += clock() - started

    def flush() -> list[tuple[bytes, p.Message]]:
        nonlocal spent
        started = clock()
        out = sched.flush(now)
        for _route, msg in out:
            p.encode(msg)
        spent += clock() - started
        return out

    handle(CLIENT, p.encode(p.Hello("client", "c", "host", 1, 0, {})))
    for i, route in enumerate(WORKERS):
        handle(route, p.encode(p.Hello("worker", f"w{i}", "host", 2 + i, 1, {})))
        handle(route, p.encode(p.Ready(2)))
    flush()
    submitted = received = 0
    in_flight = 0
    payload = b"\x80\x05N."  # a pickled None
    while received < jobs:
        while in_flight < window and submitted < jobs:
            frames = ([b"fn"] if submitted == 0 else []) + [payload]
            handle(CLIENT, p.encode(p.Submit(FN, submitted == 0, [[submitted, 1, {}]], frames)))
            submitted += 1
            in_flight += 1
        now += 0.0001
        for route, msg in flush():
            if isinstance(msg, p.Jobs):
                for row in msg.jobs:  # each job answered on its own, as submit()'s jobs are
                    results = [[row[0], row[1], row[2], int(p.Outcome.OK), 1, ""]]
                    handle(route, p.encode(p.Results(1, results, [payload], [RUN_STATS])))
            elif isinstance(msg, p.Result):
                seqs = [row[0] for row in msg.results]
                handle(CLIENT, p.encode(p.Received(seqs)))
                received += len(seqs)
                in_flight -= len(seqs)
        now += 0.0001
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--window", type=int, default=4, help="jobs in flight (default 4)")
    parser.add_argument("--profile", action="store_true",
                        help="one run under cProfile: the 30 functions of most own time")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(one_run, args.jobs, args.window)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    rates = [args.jobs / one_run(args.jobs, args.window) for _ in range(args.repeat)]
    print(f"broker core: {statistics.median(rates):,.0f} jobs/s (median of {len(rates)}; "
          f"{', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
