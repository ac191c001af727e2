"""Fixtures shared by all tests: ``procs`` owns the zfarm processes a test starts.

See tests/helpers.py for the harness itself (``Proc``, ``wait_for``, ``status``...).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.helpers import STARTED_PGIDS, Procs, describe_pid, family, kill_pids

PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """Keep each phase's report on the item so fixtures can tell whether the test failed."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report


def has_failed(item: pytest.Item) -> bool:
    return any(report.failed for report in item.stash.get(PHASE_REPORTS, {}).values())


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Procs]:
    """Start brokers and workers; at teardown stop them all and print their logs if the test failed."""
    registry = Procs(tmp_path)
    yield registry
    problems = registry.shutdown()
    if problems or has_failed(request.node):
        print("\n".join(["", "===== zfarm processes =====", *problems, registry.report()]))


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A ZeroMQ context for a test's own sockets. Its sockets are closed at teardown even when the
    test failed half-way, so a failure is reported instead of hanging in ``term()``."""
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail the session if any process we started, or any child of pytest, is still alive at the end."""
    yield
    leftovers = family([os.getpid()], STARTED_PGIDS)
    if leftovers:
        described = "\n  ".join(describe_pid(pid) for pid in sorted(leftovers))
        kill_pids(leftovers)
        pytest.fail(f"processes outlived the test session (now SIGKILLed):\n  {described}", pytrace=False)
