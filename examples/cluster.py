"""Use a running farm: submit jobs, collect them as they finish, handle a failing one.

Start a broker and at least one worker, then run this script with the broker's address::

    zfarm broker --bind tcp://127.0.0.1:5555 &
    zfarm worker --connect tcp://127.0.0.1:5555 &
    python examples/cluster.py tcp://127.0.0.1:5555

Without an argument the address comes from the ZFARM_ADDRESS environment variable, and
then defaults to tcp://127.0.0.1:5555. Stop the broker and worker afterwards (Ctrl-C, or
``kill %1 %2``). Exits 1 if the broker does not answer.
"""

import math
import os
import sys

import zfarm


def hypotenuse(a: float, b: float) -> float:
    if a < 0 or b < 0:
        raise ValueError(f"sides must not be negative, got {a} and {b}")
    return math.hypot(a, b)


def main() -> int:
    address = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ZFARM_ADDRESS", "tcp://127.0.0.1:5555")
    try:
        client = zfarm.Client(address, connect_timeout_s=5)
    except zfarm.BrokerUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    with client:
        sides = [(3, 4), (5, 12), (8, 15), (-1, 2), (7, 24), (20, 21)]
        futures = {client.submit(hypotenuse, a, b): (a, b) for a, b in sides}
        for future in zfarm.as_completed(futures, timeout=60, progress=True):
            a, b = futures[future]
            try:
                print(f"hypotenuse({a}, {b}) = {future.result():g}")
            except ValueError as exc:  # the job's own exception, with its original type
                print(f"hypotenuse({a}, {b}) failed on the worker: {exc}")
                print(f"  remote traceback:{exc.__cause__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
