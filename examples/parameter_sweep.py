"""A parameter sweep: every combination of a grid, run in chunks, collected into a table.

Run it with::

    python examples/parameter_sweep.py                       # an embedded farm on this machine
    python examples/parameter_sweep.py tcp://HEAD:5555       # or a running broker

Each job simulates a damped oscillator for one (damping, stiffness) pair. ``chunksize``
groups many small jobs into one message and one slot call, which is much cheaper than a
job per point when each point takes only milliseconds.
"""

import itertools
import sys


def simulate(damping: float, stiffness: float) -> tuple[float, float, float]:
    """Integrate x'' = -k x - c x' from x=1, v=0 for 10 s; return (c, k, final amplitude)."""
    x, v, dt = 1.0, 0.0, 0.001
    for _ in range(10_000):
        v += (-stiffness * x - damping * v) * dt
        x += v * dt
    return damping, stiffness, abs(x)


def main() -> None:
    import zfarm

    dampings = [0.0, 0.1, 0.2, 0.5, 1.0, 2.0]
    stiffnesses = [0.5, 1.0, 2.0, 4.0, 8.0]
    grid = list(itertools.product(dampings, stiffnesses))
    address = sys.argv[1] if len(sys.argv) > 1 else None  # None: an embedded farm
    with zfarm.Client(address) as client:
        # map takes one iterable per argument, like the built-in map: unzip the grid.
        cs, ks = zip(*grid, strict=True)
        rows = list(client.map(simulate, cs, ks, chunksize=5, progress=True))

    table = {(c, k): amplitude for c, k, amplitude in rows}
    print("amplitude after 10 s (rows: damping c, columns: stiffness k)")
    print("   c \\ k " + "".join(f"{k:>9g}" for k in stiffnesses))
    for c in dampings:
        print(f"{c:>8g} " + "".join(f"{table[c, k]:>9.4f}" for k in stiffnesses))
    best = min(rows, key=lambda row: row[2])
    print(f"most damped: c={best[0]:g}, k={best[1]:g} (amplitude {best[2]:.2e})")


if __name__ == "__main__":
    main()
