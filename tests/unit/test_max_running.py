"""The ``max_running`` job option (``zfarm submit --max-running``): the scheduler's cap on a client's jobs."""

from __future__ import annotations

from tests.unit.test_scheduler import CA, CB, W1, Farm, job_rows, job_seqs
from zfarm import protocol as p


def submit_capped(farm: Farm, route: bytes, seqs: list[int], cap: int | None, now: float = 0.0) -> None:
    farm.submit(route, seqs, now, options={"max_running": cap} if cap is not None else {})


def test_a_capped_client_runs_at_most_its_cap_and_others_are_not_held_back() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.client(CB, "cb")
    farm.worker(W1, "w1", credit=10, slots=10)
    submit_capped(farm, CA, [1, 2, 3, 4, 5], cap=2)
    submit_capped(farm, CB, [1, 2, 3], cap=None)
    rows = [p.JobRow.from_wire(row) for row in job_rows(farm.out(0.0), W1)]
    assert sorted((row.client_id, row.seq) for row in rows) == [("ca", 1), ("ca", 2), ("cb", 1), ("cb", 2),
                                                               ("cb", 3)]
    first = next(row for row in rows if row.client_id == "ca")
    farm.result(W1, first, 1.0)
    assert job_seqs(farm.out(1.0), W1) == [3]  # one over, one more
    assert farm.snap(1.0)["clients"][0]["in_flight"] == 2


def test_a_cancelled_job_frees_its_place_under_the_cap() -> None:
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=10, slots=10)
    submit_capped(farm, CA, [1, 2, 3], cap=1)
    assert job_seqs(farm.out(0.0), W1) == [1]
    farm.send(CA, p.Cancel([1]), 0.5)
    assert job_seqs(farm.out(0.5), W1) == [2]
