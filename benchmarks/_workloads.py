"""Job functions for ``benchmarks/run.py``: importable by every system's worker processes.

The runner puts the repository root on ``PYTHONPATH``, so workers import these as
``benchmarks._workloads`` and pickle them by reference, as they would a user's module.
"""

from __future__ import annotations

import time
from typing import Any


def noop(x: Any = None) -> None:
    return None


def sleep_10ms(x: Any = None) -> None:
    time.sleep(0.01)


def sleep_1s(x: Any = None) -> None:
    time.sleep(1.0)


def length(x: Any) -> int:
    return len(x)


def echo(x: Any) -> Any:
    return x
