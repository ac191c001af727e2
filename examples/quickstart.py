"""Quickstart: an embedded farm on this machine, and a map with a progress bar.

Run it with::

    python examples/quickstart.py

``zfarm.Client()`` with no address starts a broker and one worker per CPU as child
processes of this script; leaving the ``with`` block stops them. The same code runs
on a cluster with ``zfarm.Client("tcp://HEAD:5555")`` (see examples/cluster.py).
"""

import math

import zfarm


def collatz_steps(n: int) -> int:
    """How many steps the Collatz sequence from n takes to reach 1 (a stand-in for real work)."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def main() -> None:
    numbers = range(1, 20_001)
    with zfarm.Client() as client:
        # Results come back in input order; chunksize=200 sends 200 numbers per job.
        steps = list(client.map(collatz_steps, numbers, chunksize=200, progress=True))
        # Lambdas and closures work too: they travel by value (cloudpickle).
        roots = list(client.map(lambda x: math.isqrt(x), [4, 9, 16, 25]))
    longest = max(numbers, key=lambda n: steps[n - 1])
    print(f"{len(steps)} numbers; the longest sequence starts at {longest} ({steps[longest - 1]} steps)")
    print(f"integer square roots: {roots}")


if __name__ == "__main__":
    main()
