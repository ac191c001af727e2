"""MapRun and ChunkSizer without sockets: chunk sizes, the window, order, input errors."""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from typing import Any

import pytest

from zfarm.client.mapping import MAX_CHUNK, PROBES, TARGET_CHUNK_S, ChunkSizer, MapRun


class FakeJob:
    """Resolves at once, as if a worker squared every item and took ``per_item_s`` for each."""

    def __init__(self, chunk: list[tuple[Any, ...]], per_item_s: float) -> None:
        self.future: Any = Future()
        self.future.partial = None
        self.future.run_s = per_item_s * len(chunk)
        self.future.kill = self.future.cancel
        self.future.set_result([x * x for (x,) in chunk])


class Farm:
    def __init__(self, per_item_s: float = 1e-6) -> None:
        self.per_item_s = per_item_s
        self.chunks: list[list[tuple[Any, ...]]] = []

    def submit(self, fn_id: bytes, blob: Any, chunks: list[list[tuple[Any, ...]]]) -> tuple[list[Any], None]:
        self.chunks.extend(chunks)
        return [FakeJob(chunk, self.per_item_s) for chunk in chunks], None


def run_map(farm: Farm, items: Any, window: int = 100, chunksize: int | None = None) -> list[Any]:
    run = MapRun(farm.submit, abs, zip(items), window, chunksize)
    run.start()
    return list(run.results(None))


def test_fixed_chunks_keep_order() -> None:
    farm = Farm()
    assert run_map(farm, range(10), chunksize=3) == [x * x for x in range(10)]
    assert [len(c) for c in farm.chunks] == [3, 3, 3, 1]


def test_adaptive_chunks_start_with_single_item_probes_then_grow_for_short_jobs() -> None:
    farm = Farm(per_item_s=1e-6)
    assert run_map(farm, range(50_000)) == [x * x for x in range(50_000)]
    sizes = [len(c) for c in farm.chunks]
    assert sizes[:PROBES] == [1] * PROBES
    assert max(sizes) == min(MAX_CHUNK, int(TARGET_CHUNK_S / 1e-6))


def test_adaptive_chunks_stay_single_for_long_jobs() -> None:
    farm = Farm(per_item_s=1.0)
    assert run_map(farm, range(30)) == [x * x for x in range(30)]
    assert {len(c) for c in farm.chunks} == {1}


def test_sizer_follows_the_observed_time_per_item() -> None:
    sizer = ChunkSizer()
    assert sizer.size() == 1 and not sizer.measured
    sizer.observe(10, 0.01)  # 1 ms an item
    assert sizer.size() == int(TARGET_CHUNK_S / 0.001)
    sizer.observe(1, None)  # unknown run time: no change
    assert sizer.size() == int(TARGET_CHUNK_S / 0.001)
    assert ChunkSizer(fixed=7).size() == 7


def test_window_bounds_what_an_endless_input_has_in_flight() -> None:
    farm = Farm(per_item_s=1.0)
    run = MapRun(farm.submit, abs, zip(itertools.count()), 10, 2)
    run.start()
    assert sum(len(c) for c in farm.chunks) == 20  # 10 chunks of 2, nothing more read
    results = run.results(None)
    assert list(itertools.islice(results, 5)) == [0, 1, 4, 9, 16]
    results.close()


def test_an_input_that_raises_yields_what_came_before_then_raises() -> None:
    def items() -> Any:
        yield from range(10)
        raise RuntimeError("input broke")

    farm = Farm()
    run = MapRun(farm.submit, abs, zip(items()), 100, 3)
    run.start()
    got: list[int] = []
    with pytest.raises(RuntimeError, match="input broke"):
        for value in run.results(None):
            got.append(value)
    assert got == [x * x for x in range(10)]
