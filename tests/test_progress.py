"""Progress bars: map and as_completed report done/total (or a count) on stderr, results unchanged."""

from __future__ import annotations

import itertools

import pytest

import zfarm
from tests import jobs
from tests.helpers import Procs

pytestmark = pytest.mark.timeout(60)


def test_map_and_as_completed_show_progress_on_stderr(
    procs: Procs, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint, _ = procs.farm(procs=2)
    with zfarm.Client(endpoint) as client:
        assert list(client.map(jobs.square, range(40), progress=True)) == [x * x for x in range(40)]
        first = capsys.readouterr()
        assert "40/40" in first.err and "100%" in first.err  # a known length: done/total
        assert first.out == ""  # results can be piped: the bar is on stderr

        endless = client.map(jobs.square, itertools.count(), progress=True)
        assert list(itertools.islice(endless, 25)) == [x * x for x in range(25)]
        endless.close()
        assert "25 done" in capsys.readouterr().err  # no length: a count

        futures = [client.submit(jobs.square, x) for x in range(12)]
        assert sorted(f.result() for f in zfarm.as_completed(futures, progress=True)) == sorted(
            x * x for x in range(12))
        assert "12/12" in capsys.readouterr().err
