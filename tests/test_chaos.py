"""The chaos soak, short: workers SIGKILLed and SIGSTOPped, the broker SIGKILLed and restarted."""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers import Procs


def run_soak(procs: Procs, *args: str) -> str:
    """Run ``python -m zfarm.chaos ARGS`` to its end, which must be exit 0; return its report.

    Through ``procs``: the soak's own broker and workers share its process group, so the fixture
    stops them too if the soak is cut short.
    """
    soak = procs.spawn(*args, "--time-limit", "180", name="chaos",
                       command=(sys.executable, "-m", "zfarm.chaos"))
    assert soak.wait(230) == 0, soak.log()
    return soak.log()


def figure(report: str, label: str) -> int:
    found = re.search(rf"^{label}\s+(\d+)", report, re.MULTILINE)
    assert found, f"no {label!r} in the report:\n{report}"
    return int(found.group(1))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_short_chaos_soak_loses_nothing_and_delivers_once(procs: Procs) -> None:
    report = run_soak(procs, "--jobs", "3000", "--workers", "4", "--work-s", "0.01", "--kill-every", "0.5",
                      "--stop-every", "3", "--broker-restarts", "2", "--seed", "7")
    assert figure(report, "submitted") == 3000
    assert figure(report, "results received") == 3000
    assert figure(report, "lost") == 0
    assert figure(report, "duplicates delivered") == 0
    assert figure(report, "wrong results") == 0
    chaos = re.search(r"^chaos\s+(\d+) worker kills, (\d+) worker stops, (\d+) broker restarts", report,
                      re.MULTILINE)
    assert chaos, report
    kills, _stops, restarts = map(int, chaos.groups())
    assert restarts == 2
    assert kills >= 3  # the farm really was under fire


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_soak_with_a_session_client_killed_and_rerun_loses_nothing(procs: Procs) -> None:
    report = run_soak(procs, "--jobs", "2000", "--workers", "3", "--work-s", "0.005", "--kill-every", "0.7",
                      "--broker-restarts", "1", "--client-kills", "2", "--seed", "11")
    for label, value in (("results received", 2000), ("lost", 0), ("duplicates delivered", 0),
                         ("wrong results", 0)):
        assert figure(report, label) == value
    chaos = re.search(r"(\d+) broker restarts, (\d+) client kills", report)
    assert chaos and chaos.groups() == ("1", "2"), report
