"""The chaos soak, short: workers SIGKILLed and SIGSTOPped, the broker SIGKILLed and restarted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import zfarm_env


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_short_chaos_soak_loses_nothing_and_delivers_once() -> None:
    args = ["--jobs", "3000", "--workers", "4", "--work-s", "0.01", "--kill-every", "0.5",
            "--stop-every", "3", "--broker-restarts", "2", "--seed", "7", "--time-limit", "180"]
    result = subprocess.run([sys.executable, "-m", "zfarm.chaos", *args], capture_output=True, text=True,
                            timeout=230, env=zfarm_env(), check=False)
    report = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["submitted"].strip() == "3000"
    assert report["results"].split()[-1] == "3000"
    assert report["lost"].strip() == "0"
    assert report["wrong"].split()[-1] == "0"
    assert "duplicates delivered 0" in result.stdout
    assert "2 broker restarts" in result.stdout
    kills = int(report["chaos"].split()[0])
    assert kills >= 3  # the farm really was under fire
