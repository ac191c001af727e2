"""A client in a process of its own, for tests that SIGKILL or SIGSTOP it.

``python -m tests.map_client --connect ENDPOINT --markers DIR [--session NAME] [--jobs N] [--leave]
[--read K]`` maps ``tests.jobs.record_run`` over ``range(N)`` and prints ``result X VALUE`` lines,
then ``done``.
With ``--leave`` it prints ``left`` once the broker holds the jobs, and exits without their results.
With ``--read K`` it fails (exit 3) inside its ``with`` block after reading K results.
"""

from __future__ import annotations

import argparse

import zfarm
from tests import jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connect", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--session")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=0.2)
    parser.add_argument("--leave", action="store_true")
    parser.add_argument("--read", type=int, default=-1)
    args = parser.parse_args()
    n = args.jobs
    with zfarm.Client(args.connect, session=args.session, broker_timeout_s=120) as client:
        results = client.map(jobs.record_run, [args.markers] * n, range(n), [args.seconds] * n, chunksize=1)
        print("submitted", n, flush=True)
        if args.leave:
            client.shutdown(wait=False)
            print("left", flush=True)
            return 0
        for x, value in enumerate(results):
            if x == args.read:
                print("failing", flush=True)
                raise SystemExit(3)
            print("result", x, value, flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
