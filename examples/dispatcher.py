"""A PyOPUS-style dispatcher on zfarm's public API: hooks to generate jobs, to process each result as
it comes and to collect at the end, over a project run by between ``min_workers`` and ``max_workers``.

::

    Dispatcher.run() ── generate() ──► project.submit ──► broker ──► workers (at most max_workers jobs)
                    ◄── process(job, result) as each finishes ── collect() at the end

Run it on an embedded farm (``python examples/dispatcher.py``) or on a running one
(``python examples/dispatcher.py tcp://127.0.0.1:5555``).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import zfarm
from zfarm.monitor import fetch_status


class Dispatcher:
    """Subclass it: ``generate`` yields (function, args) jobs, ``process`` sees each result as it
    arrives (and may return more jobs), ``collect`` returns the outcome once every job is over."""

    def __init__(self, client: zfarm.Client, name: str, *, min_workers: int = 1, max_workers: int = 4,
                 wait_s: float = 60.0) -> None:
        self.client = client
        self.min_workers = min_workers
        self.wait_s = wait_s
        self.project = client.project(name, max_running=max_workers, on_error="continue")

    # ---- hooks -------------------------------------------------------------------------------------

    def generate(self) -> Iterator[tuple[Callable[..., Any], tuple[Any, ...]]]:
        raise NotImplementedError

    def process(self, job: tuple[Any, ...], result: Any) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
        """One finished job; return jobs to add (none by default)."""
        return []

    def failed(self, job: tuple[Any, ...], error: BaseException) -> None:
        print(f"job {job} failed: {error!r}", file=sys.stderr)

    def collect(self) -> Any:
        return None

    # ---- the loop ----------------------------------------------------------------------------------

    def run(self) -> Any:
        self._wait_for_workers()
        pending = {self.project.submit(fn, *args): args for fn, args in self.generate()}
        while pending:
            done = next(zfarm.as_completed(list(pending)))  # the first to finish
            args = pending.pop(done)
            try:
                more = self.process(args, done.result())
            except Exception as error:  # the job's own exception, re-raised here
                self.failed(args, error)
                continue
            pending.update({self.project.submit(fn, *a): a for fn, a in more})
        return self.collect()

    def _wait_for_workers(self) -> None:
        deadline = time.monotonic() + self.wait_s
        keys = self.client.settings.keys
        while len(fetch_status(self.client.address, keys=keys)["workers"]) < self.min_workers:
            if time.monotonic() > deadline:
                raise zfarm.ZfarmError(f"fewer than {self.min_workers} workers joined in {self.wait_s:g} s")
            time.sleep(0.2)


def trapezoid(f_name: str, a: float, b: float, n: int) -> float:
    """One slice of a numerical integral."""
    f = getattr(math, f_name)
    h = (b - a) / n
    return h * (f(a) / 2 + sum(f(a + i * h) for i in range(1, n)) + f(b) / 2)


class Integral(Dispatcher):
    """Integrate sin over [0, pi] in eight slices, summing each as it arrives."""

    def generate(self) -> Iterator[tuple[Callable[..., Any], tuple[Any, ...]]]:
        self.total = 0.0
        edges = [i * math.pi / 8 for i in range(9)]
        for a, b in itertools.pairwise(edges):
            yield trapezoid, ("sin", a, b, 64)

    def process(self, job: tuple[Any, ...], result: Any) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
        self.total += result
        return []

    def collect(self) -> float:
        return self.total


def main() -> int:
    address = sys.argv[1] if len(sys.argv) > 1 else None
    with zfarm.Client(address, n_workers=2 if address is None else None) as client:
        value = Integral(client, "integral", min_workers=1, max_workers=2).run()
    print(f"integral of sin over [0, pi] = {value:.6f} (exact: 2)")
    return 0 if abs(value - 2) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
