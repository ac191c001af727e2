"""Job functions for ``benchmarks/run.py``, importable by every system's worker processes, and
what the benchmarks read of a process (its resident memory, its CPU time).

The runner puts the repository root on ``PYTHONPATH``, so workers import these as
``benchmarks._workloads`` and pickle them by reference, as they would a user's module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` now (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def noop(x: Any = None) -> None:
    return None


def sleep_10ms(x: Any = None) -> None:
    time.sleep(0.01)


def sleep_1s(x: Any = None) -> None:
    time.sleep(1.0)


def sleep_s(seconds: float) -> None:
    time.sleep(seconds)


def length(x: Any) -> int:
    return len(x)


def echo(x: Any) -> Any:
    return x
