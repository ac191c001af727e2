"""A client in a process of its own, for tests that SIGKILL or SIGSTOP it.

``python -m tests.map_client --connect ENDPOINT --markers DIR [--session NAME] [--jobs N] [--leave]``
maps ``tests.jobs.record_run`` over ``range(N)`` and prints ``result X VALUE`` lines, then ``done``.
With ``--leave`` it prints ``left`` once the broker holds the jobs, and exits without their results.
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
    args = parser.parse_args()
    client = zfarm.Client(args.connect, session=args.session, broker_timeout_s=120)
    n = args.jobs
    results = client.map(jobs.record_run, [args.markers] * n, range(n), [args.seconds] * n, chunksize=1)
    print("submitted", n, flush=True)
    if args.leave:
        client.shutdown(wait=False)
        print("left", flush=True)
        return 0
    for x, value in enumerate(results):
        print("result", x, value, flush=True)
    client.shutdown()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
