"""The broker's own cost per job, without sockets or other processes: jobs/s through its sans-IO core.

::

    python benchmarks/broker_core.py [--jobs 100000] [--repeat 3] [--window 4] [--profile]

One client and two one-slot workers (credit 2 each: a job in the slot and one prefetched) speak to a
``Scheduler`` with encoded frames, as the broker's shell would hand them over: the client sends
each job in its own SUBMIT (``submit()``), keeping ``--window`` jobs in flight; each worker answers
each job in its own RESULTS; the client acknowledges each RESULT with a RECEIVED. What is timed is
the CPU time of the loop (not wall time: the machine is shared), which is the broker's side —
``handle`` of every message, ``flush``, and encoding what it returns — and a look-up of the peers'
answers, encoded before the clock starts. Works with the code before the broker's split
(``zfarm.scheduler``) and after it (``zfarm.broker.scheduler``), to compare the two.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

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
    """CPU seconds this process spent on ``jobs`` jobs: the broker's core, and the peers' side of the
    loop, which is a look-up of messages encoded beforehand (a RECEIVED is encoded on the way)."""
    now = 0.0
    sched = Scheduler(BrokerSettings(), now, broker_id="bench")
    payload = b"\x80\x05N."  # a pickled None
    submits = [p.encode(p.Submit(FN, seq == 0, [[seq, 1, {}]], ([b"fn"] if seq == 0 else []) + [payload]))
               for seq in range(jobs)]
    results = [p.encode(p.Results(1, [["c", seq, 1, int(p.Outcome.OK), 1, ""]], [payload], [RUN_STATS]))
               for seq in range(jobs)]
    sched.handle(CLIENT, p.encode(p.Hello("client", "c", "host", 1, 0, {})), now)
    for i, route in enumerate(WORKERS):
        sched.handle(route, p.encode(p.Hello("worker", f"w{i}", "host", 2 + i, 1, {})), now)
        sched.handle(route, p.encode(p.Ready(2)), now)
    sched.flush(now)
    submitted = received = in_flight = 0
    started = time.process_time()
    while received < jobs:
        while in_flight < window and submitted < jobs:
            sched.handle(CLIENT, submits[submitted], now)
            submitted += 1
            in_flight += 1
        now += 0.0001
        for route, msg in sched.flush(now):
            p.encode(msg)  # as the broker's shell does before it sends
            if isinstance(msg, p.Jobs):
                for row in msg.jobs:  # each job answered on its own, as submit()'s jobs are
                    sched.handle(route, results[row[1]], now)
            elif isinstance(msg, p.Result):
                seqs = [row[0] for row in msg.results]
                sched.handle(CLIENT, p.encode(p.Received(seqs)), now)
                received += len(seqs)
                in_flight -= len(seqs)
        now += 0.0001
    return time.process_time() - started


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
    rates = [args.jobs / one_run(args.jobs, args.window) for _ in range(args.repeat)]  # jobs per CPU second
    print(f"broker core: {statistics.median(rates):,.0f} jobs/s (median of {len(rates)}; "
          f"{', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
