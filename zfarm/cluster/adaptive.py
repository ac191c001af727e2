"""How many workers a cluster under ``adapt()`` wants: a pure policy fed the broker's snapshot.

Demand is the queue plus the jobs running. With a measured run time (Little's law: jobs in
flight divided by jobs finished per second over the last seconds) it wants enough slots to
clear that work in ``target_duration_s``, never more slots than jobs; before any job finished,
one slot per job. It grows at once, by at most ``max_step`` workers per decision; it shrinks
only after ``wait_count`` decisions in a row wanted fewer (hysteresis: a short lull between two
maps does not send workers away), and then by at most ``max_step`` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from zfarm.errors import ConfigError
from zfarm.monitor import rate_now

#: seconds of the broker's per-second throughput used to measure run times
RATE_WINDOW_S = 10


@dataclass
class Adaptive:
    minimum: int = 0
    maximum: int = 8
    target_duration_s: float = 10.0
    interval_s: float = 2.0
    wait_count: int = 3
    max_step: int = 16
    _fewer: int = field(default=0, repr=False, init=False)  # decisions in a row that wanted fewer workers

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.maximum:
            raise ConfigError(f"adapt needs 0 <= minimum <= maximum, got minimum={self.minimum} "
                              f"maximum={self.maximum}")
        if self.target_duration_s <= 0 or self.interval_s <= 0 or self.wait_count < 1 or self.max_step < 1:
            raise ConfigError("adapt needs target_duration_s > 0, interval_s > 0, wait_count >= 1 and "
                              "max_step >= 1")

    def wanted(self, snapshot: dict[str, Any], slots_per_worker: int) -> int:
        """Workers the demand in ``snapshot`` calls for, within [minimum, maximum]."""
        # jobs set aside as unschedulable are no demand: a worker like those connected cannot hold them
        queued = max(0, int(snapshot.get("queued", 0)) - int(snapshot.get("unschedulable", 0)))
        in_flight = int(snapshot.get("in_flight", 0))
        jobs = queued + in_flight
        rate = rate_now(list(snapshot.get("throughput", [])), RATE_WINDOW_S)
        if rate > 0 and in_flight > 0:
            run_s = in_flight / rate
            slots = min(jobs, math.ceil(jobs * run_s / self.target_duration_s))
        else:
            slots = jobs
        workers = math.ceil(slots / max(1, slots_per_worker))
        return max(self.minimum, min(self.maximum, workers))

    def decide(self, snapshot: dict[str, Any], slots_per_worker: int, current: int) -> int:
        """The new target, from the current one (which counts workers still coming)."""
        wanted = self.wanted(snapshot, slots_per_worker)
        if wanted > current:
            self._fewer = 0
            return min(wanted, current + self.max_step)
        if wanted < current:
            self._fewer += 1
            if self._fewer >= self.wait_count:
                self._fewer = 0
                return max(wanted, current - self.max_step)
            return current
        self._fewer = 0
        return current
