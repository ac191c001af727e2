"""The ``concurrent.futures.Executor`` contract, kept by ``zfarm.Client`` against real processes.

Where zfarm differs on purpose (docs/guide.md, "Differences from concurrent.futures"), the test says
so. Scripts that must exit (at-exit waiting, Ctrl-C) run as their own interpreter, started by the
``procs`` fixture in a process group of their own, so nothing they start outlives the test.
"""

from __future__ import annotations

import concurrent.futures
import gc
import signal
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zfarm
from tests import jobs
from tests.helpers import Proc, Procs, process_table, wait_for

RESULT_TIMEOUT_S = 30.0
#: a script's whole run: an embedded farm's start, its jobs and its exit, on a loaded machine
SCRIPT_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker and two one-slot workers shared by this module's tests."""
    registry = Procs(tmp_path_factory.mktemp("executor-farm"))
    try:
        endpoint, _ = registry.farm(workers=2, procs=1)
        yield endpoint
    finally:
        registry.shutdown()


def run_script(procs: Procs, tmp_path: Path, body: str, name: str) -> Proc:
    """Start ``body`` as a Python script (it may use ``TMP``, this test's folder, and ``tests.jobs``)."""
    script = tmp_path / f"{name}.py"
    script.write_text(f"TMP = {str(tmp_path)!r}\n" + textwrap.dedent(body))
    return procs.spawn(str(script), command=(sys.executable,), name=name)


def finished(proc: Proc, timeout_s: float = SCRIPT_TIMEOUT_S) -> str:
    """Wait for a script to exit 0 and return its output."""
    returncode = proc.wait(timeout_s)
    output = proc.log()
    assert returncode == 0, output
    return output


def group_left(proc: Proc) -> list[int]:
    return [p.pid for p in process_table() if p.pgid == proc.pgid and p.live]


# --- addresses that used to hang ----------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "tcp://127.0.0.1:abc", "tcp://127.0.0.1:99999",
                                     "tcp://:5555", "ipc://"])
def test_a_bad_address_raises_config_error_at_once(address: str) -> None:
    started = time.monotonic()
    with pytest.raises(zfarm.ConfigError) as info:
        zfarm.Client(address, connect_timeout_s=20)
    assert time.monotonic() - started < 10  # not the connect timeout: the address itself is wrong
    assert address in str(info.value) and "tcp://127.0.0.1:5555" in str(info.value)


# --- submit and shutdown ------------------------------------------------------------------------------


def test_submit_after_the_exit_hook_closed_the_client_raises(procs: Procs, tmp_path: Path) -> None:
    # atexit runs its hooks last-registered first: this one runs after zfarm's has closed the client.
    proc = run_script(procs, tmp_path, """
        import atexit

        def after_zfarm_closed_it():
            try:
                client.submit(abs, -1)
            except RuntimeError as exc:
                print("refused:", exc)
            client.shutdown()
            print("shutdown returned")

        atexit.register(after_zfarm_closed_it)
        import zfarm
        client = zfarm.Client(n_workers=1)
        print("result", client.submit(abs, -7).result(60))
    """, "late-submit")
    output = finished(proc)
    assert "result 7" in output and "refused: cannot submit jobs" in output, output
    assert "shutdown returned" in output, output
    assert group_left(proc) == []


def test_a_map_over_an_unpicklable_item_raises_in_its_place_and_leaves_nothing_pending(farm: str) -> None:
    lock = threading.Lock()  # cannot be pickled
    client = zfarm.Client(farm)
    try:
        got: list[Any] = []
        # ``info`` keeps the error with its frames (the map's among them), as a REPL or a logger would
        with pytest.raises(TypeError, match="pickle") as info:
            for value in client.map(jobs.echo, [1, 2, lock, 4], chunksize=1):
                got.append(value)
        assert got == [1, 2]
        started = time.monotonic()
        client.shutdown()  # must not wait for a job that was never sent
        assert time.monotonic() - started < 10
        assert "lock" in str(info.value), "the error names what could not be pickled"
    finally:
        client.shutdown()  # at once if it was shut down above; after a failed assertion, closes it


def test_with_an_unpicklable_item_the_first_window_of_a_map_still_raises_in_order(farm: str) -> None:
    with zfarm.Client(farm) as client:
        results = client.map(jobs.echo, [1, threading.Lock(), 3])  # adaptive: probes, one item each
        assert next(results) == 1
        with pytest.raises(TypeError):
            next(results)


def test_a_cancelled_future_wakes_wait_and_as_completed(farm: str, tmp_path: Path) -> None:
    never = tmp_path / "never-created"
    with zfarm.Client(farm) as client:
        blockers = [client.submit(jobs.hold, str(never), i) for i in range(2)]  # both slots busy
        queued = client.submit(jobs.square, 3)
        assert queued.cancel() is True
        done, _ = concurrent.futures.wait([queued], timeout=5)
        assert done == {queued}
        assert list(zfarm.as_completed([queued], timeout=5)) == [queued]
        client.cancel(blockers, force=True)


def test_a_true_cancel_never_delivers_a_result(farm: str) -> None:
    """Cancel jobs as they are being dispatched: whatever ran, a cancelled future stays cancelled."""
    with zfarm.Client(farm) as client:
        futures = [client.submit(jobs.slow_square, i, 0.002) for i in range(300)]
        cancelled = [f for f in futures[::3] if f.cancel()]
        concurrent.futures.wait(futures, timeout=RESULT_TIMEOUT_S)
        assert cancelled
        for future in cancelled:
            assert future.cancelled()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(0)
        assert all(f.result(0) == i * i for i, f in enumerate(futures) if f not in cancelled)


# --- exit ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shutdown", ["", "client.shutdown(wait=False)"])
def test_jobs_submitted_before_exit_all_run(procs: Procs, tmp_path: Path, shutdown: str) -> None:
    proc = run_script(procs, tmp_path, f"""
        import zfarm
        from tests import jobs
        client = zfarm.Client(n_workers=1)
        for i in range(5):
            client.submit(jobs.mark_then_sleep, TMP, i, 0.2)
        {shutdown}
        print("leaving")
    """, "fire-and-forget")
    finished(proc)
    assert sorted(p.name for p in tmp_path.glob("started-*")) == [f"started-{i}" for i in range(5)]
    assert group_left(proc) == []


def test_a_map_runs_its_first_window_even_if_never_read(procs: Procs, tmp_path: Path) -> None:
    proc = run_script(procs, tmp_path, """
        import zfarm
        from tests import jobs
        with zfarm.Client(n_workers=1) as client:
            client.map(jobs.mark_then_sleep, [TMP] * 10, range(10), [0.01] * 10)
    """, "unread-map")
    finished(proc)
    assert len(list(tmp_path.glob("started-*"))) == 10


def test_a_map_created_before_shutdown_without_wait_yields_every_result(farm: str) -> None:
    client = zfarm.Client(farm, window=4)
    results = client.map(jobs.square, range(40), chunksize=1)
    client.shutdown(wait=False)
    assert list(results) == [x * x for x in range(40)]
    with pytest.raises(RuntimeError):
        client.map(jobs.square, range(3))
    with pytest.raises(RuntimeError):
        client.submit(jobs.square, 3)


def test_a_map_still_unread_at_shutdown_with_wait_can_be_read_after(farm: str) -> None:
    with zfarm.Client(farm, window=4) as client:
        results = client.map(jobs.square, range(40), chunksize=1)
    assert list(results) == [x * x for x in range(40)]


# --- Ctrl-C -------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ctrl_c_in_a_with_block_says_what_it_waits_for_and_a_second_one_cancels(
        procs: Procs, tmp_path: Path) -> None:
    proc = run_script(procs, tmp_path, """
        import sys, zfarm
        from tests import jobs
        with zfarm.Client(n_workers=1) as client:
            futures = [client.submit(jobs.mark_then_sleep, TMP, i, 60) for i in range(3)]
            print("submitted", flush=True)
    """, "ctrl-c")
    proc.wait_for_log("submitted", SCRIPT_TIMEOUT_S)
    wait_for(lambda: any(tmp_path.glob("started-*")), SCRIPT_TIMEOUT_S, message="a job to start")
    proc.signal(signal.SIGINT)
    proc.wait_for_log("Ctrl-C again", 20)
    assert "waiting for 3 unfinished jobs" in proc.log(), proc.log()
    proc.signal(signal.SIGINT)
    started = time.monotonic()
    returncode = proc.wait(30)
    output = proc.log()
    assert time.monotonic() - started < 20, output
    assert returncode != 0, output
    assert output.count("Traceback") == 1 and "KeyboardInterrupt" in output, output
    assert "During handling" not in output, output
    wait_for(lambda: group_left(proc) == [], 20, message="every process of the script to exit")


# --- futures ------------------------------------------------------------------------------------------


def test_running_says_that_a_worker_started_the_job(farm: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    with zfarm.Client(farm) as client:
        future = client.submit(jobs.hold, str(release), 5)
        wait_for(future.running, 20, message="running() to become True")
        assert not future.done() and future.cancel() is False
        release.touch()
        assert future.result(RESULT_TIMEOUT_S) == 5
        assert not future.running()


def test_chunksize_below_one_raises_value_error(farm: str) -> None:
    with zfarm.Client(farm) as client:
        for bad in (0, -1):
            with pytest.raises(ValueError, match="chunksize"):
                client.map(jobs.square, range(3), chunksize=bad)


class Dummy:
    """A result object whose lifetime the test watches."""


def make_dummy(_: int) -> Dummy:
    return Dummy()


def test_map_does_not_keep_a_yielded_result_alive(farm: str) -> None:
    with zfarm.Client(farm) as client:
        for chunksize in (1, 3):
            for obj in client.map(make_dummy, range(6), chunksize=chunksize):
                ref = weakref.ref(obj)
                del obj
                gc.collect()
                assert ref() is None


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def make_unpicklable(_: object = None) -> Unpicklable:
    return Unpicklable()


def test_an_unpicklable_return_value_carries_the_remote_traceback(farm: str) -> None:
    with zfarm.Client(farm) as client, pytest.raises(TypeError, match="could not be pickled") as info:
        client.submit(make_unpicklable).result(RESULT_TIMEOUT_S)
    cause = info.value.__cause__
    assert isinstance(cause, zfarm.RemoteTraceback)
    assert "this object refuses to be pickled" in str(cause) and "__reduce__" in str(cause)


def test_a_remote_traceback_names_the_script_and_its_lines_not_zfarm(procs: Procs, tmp_path: Path) -> None:
    proc = run_script(procs, tmp_path, """
        import zfarm

        def helper(x):
            return 1 / x

        def job(x):
            return helper(x)

        with zfarm.Client(n_workers=1) as client:
            try:
                client.submit(job, 0).result(60)
            except ZeroDivisionError as exc:
                print(exc.__cause__)
    """, "remote_tb")
    output = finished(proc)
    script = str(tmp_path / "remote_tb.py")
    assert f'File "{script}", line 6, in helper\n    return 1 / x' in output, output
    assert f'File "{script}", line 9, in job\n    return helper(x)' in output, output
    assert "<dynamic-code>" not in output and "chaperone" not in output, output


# --- maps and closing, from a review -----------------------------------------------------------------


def counting(n: int, pulled: list[int]) -> Iterator[int]:
    for i in range(n):
        pulled[0] += 1
        yield i


def test_a_map_dropped_unread_runs_only_its_first_window_at_shutdown(farm: str) -> None:
    pulled = [0]
    client = zfarm.Client(farm, window=8)
    client.map(jobs.square, counting(3000, pulled))  # for its side effects; the results are dropped
    client.shutdown()
    assert pulled[0] <= 8


def test_shutdown_cancelling_reads_no_more_of_a_map(farm: str) -> None:
    pulled = [0]
    client = zfarm.Client(farm, window=8)
    results = client.map(jobs.square, counting(2000, pulled), chunksize=1)
    assert next(results) == 0
    started = time.monotonic()
    client.shutdown(cancel_futures=True)
    assert time.monotonic() - started < 20
    assert pulled[0] <= 8 + 1, pulled
    results.close()


def test_a_done_callback_may_shut_the_client_down(farm: str) -> None:
    client = zfarm.Client(farm)
    called = threading.Event()
    took: list[float] = []

    def leave(_: concurrent.futures.Future[Any]) -> None:
        started = time.monotonic()
        client.shutdown(wait=False)
        took.append(time.monotonic() - started)
        called.set()

    client.submit(jobs.square, 2).add_done_callback(leave)
    assert called.wait(RESULT_TIMEOUT_S)
    assert took[0] < 1.0  # it did not wait for its own thread to stop
    name = f"zfarm-client-{client.id}"
    wait_for(lambda: all(t.name != name for t in threading.enumerate()), 20,
             message="this client's I/O thread to end")
