"""The chaos soak, short: workers SIGKILLed and SIGSTOPped, the broker SIGKILLed and restarted."""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers import Procs


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_short_chaos_soak_loses_nothing_and_delivers_once(procs: Procs) -> None:
    # Through `procs`: the soak's own broker and workers share its process group, so the fixture
    # stops them too if the soak is cut short.
    soak = procs.spawn("--jobs", "3000", "--workers", "4", "--work-s", "0.01", "--kill-every", "0.5",
                       "--stop-every", "3", "--broker-restarts", "2", "--seed", "7", "--time-limit", "180",
                       name="chaos", command=(sys.executable, "-m", "zfarm.chaos"))
    assert soak.wait(230) == 0, soak.log()
    report = soak.log()

    def figure(label: str) -> int:
        found = re.search(rf"^{label}\s+(\d+)", report, re.MULTILINE)
        assert found, f"no {label!r} in the report:\n{report}"
        return int(found.group(1))

    assert figure("submitted") == 3000
    assert figure("results received") == 3000
    assert figure("lost") == 0
    assert figure("duplicates delivered") == 0
    assert figure("wrong results") == 0
    chaos = re.search(r"^chaos\s+(\d+) worker kills, (\d+) worker stops, (\d+) broker restarts", report,
                      re.MULTILINE)
    assert chaos, report
    kills, _stops, restarts = map(int, chaos.groups())
    assert restarts == 2
    assert kills >= 3  # the farm really was under fire


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_soak_with_a_session_client_killed_and_rerun_loses_nothing(procs: Procs) -> None:
    soak = procs.spawn("--jobs", "2000", "--workers", "3", "--work-s", "0.005", "--kill-every", "0.7",
                       "--broker-restarts", "1", "--client-kills", "2", "--seed", "11", "--time-limit", "180",
                       name="chaos", command=(sys.executable, "-m", "zfarm.chaos"))
    assert soak.wait(230) == 0, soak.log()
    report = soak.log()
    for label, value in (("results received", 2000), ("lost", 0), ("duplicates delivered", 0),
                         ("wrong results", 0)):
        found = re.search(rf"^{label}\s+(\d+)", report, re.MULTILINE)
        assert found and int(found.group(1)) == value, report
    chaos = re.search(r"(\d+) broker restarts, (\d+) client kills", report)
    assert chaos and chaos.groups() == ("1", "2"), report
