"""zfarm against its peers, on the same workloads in the same run.

::

    python benchmarks/run.py [--repeat N] [--quick] [--only NAME,...] [--json PATH]

Workloads (``--only`` names): throughput, submit, latency, efficiency, long, uneven, payloads,
scatter, start, memory, endless, growth, journal. Every system gets 2 worker processes (3 in
long). zfarm's headline set-up is a real ``zfarm broker`` and two ``zfarm worker --procs 1`` on
loopback TCP, started by this script; the embedded ``zfarm.Client(n_workers=2)`` (ipc) is
measured too where cheap. Peers: ProcessPoolExecutor, loky and Dask distributed (``pip install
-e .[bench]``); a peer that is not installed is skipped with a note.

Each figure is the median of ``--repeat`` runs (default 5, 3 with ``--quick``) with its
min-max, printed as one table per workload with the ratio zfarm / peer, and written to JSON.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import importlib.util
import itertools
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# the workers of every system (zfarm's, the pools', dask's) import the job functions from here
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.pop("ZFARM_ADDRESS", None)  # Client() must start its embedded farm
# dask warns that 50 x 1 MiB of arguments make a "large graph": that is the workload
warnings.filterwarnings("ignore", message="Sending large graph")

import msgpack  # noqa: E402
import zmq  # noqa: E402

import zfarm  # noqa: E402
from benchmarks import _workloads as wl  # noqa: E402
from benchmarks._workloads import cpu_s, rss_bytes  # noqa: E402
from benchmarks.bare import BareClient  # noqa: E402
from zfarm import protocol as p  # noqa: E402
from zfarm import serialization as ser  # noqa: E402
from zfarm.errors import BrokerUnavailable  # noqa: E402
from zfarm.local import free_tcp_endpoint  # noqa: E402
from zfarm.monitor import fetch_status  # noqa: E402

MiB = 1024 * 1024
#: the reference row: what pyzmq and pickle alone cost (benchmarks/bare.py)
BARE = "bare pyzmq broker (reference: 1 job a message)"
RESULT_TIMEOUT_S = 120.0  # a run taking longer is reported as a hang, not waited for
WORKLOADS = ("throughput", "submit", "latency", "efficiency", "long", "uneven", "payloads", "scatter",
             "start", "memory", "endless", "growth", "journal")
TITLES = {
    "throughput": "1. no-op map throughput",
    "submit": "2. submit(): one future per job",
    "latency": "3. one job's round trip (sequential submit(noop).result())",
    "efficiency": "4. efficiency: 400 x 10 ms jobs on 2 slots (ideal 2.0 s / measured)",
    "long": "4b. efficiency: 100 x 1 s jobs on 3 slots (ideal: 34 rounds of 1 s / measured)",
    "uneven": "4c. efficiency: jobs of 2, 0.5, 0.5, 0.5 s on 2 slots (ideal 2.0 s / measured)",
    "payloads": "5. payloads: 50 x 1 MiB in and out (in+out MiB / s)",
    "scatter": "5b. one 20 MiB input shared by 100 jobs: seconds for all (scattered once vs sent with each)",
    "start": "6. start to first result, from no process started",
    "memory": "7. broker memory per queued job (no workers; VmRSS after - before)",
    "endless": "8. map over an endless generator (default chunking): RSS growth",
    "growth": "9. growth: broker throughput and CPU per job vs queue depth and connected workers",
    "journal": "10. the cost of a durable broker: the same farm with and without --journal",
}
#: workloads whose rows compare with their base row (case/base) rather than zfarm with its peers
AGAINST_BASE = ("growth", "journal")
#: (workload, metric, comparison, threshold) checked against the workload's headline zfarm row
GOALS = [
    ("throughput", "jobs/s", ">=", 1_000_000),
    ("submit", "jobs/s", ">=", 25_000),
    ("latency", "p50 us", "<=", 250),
    ("latency", "p99 us", "<=", 500),
    ("efficiency", "efficiency", ">=", 0.97),
    ("long", "efficiency", ">=", 0.97),
    ("uneven", "efficiency", ">=", 0.97),
    ("submit", "CPU us/job", "<=", 150),
    ("payloads", "MiB/s", ">=", 600),
    ("start", "s", "<=", 0.3),
    ("memory", "bytes/job", "<=", 200),
    ("endless", "client MB", "<", 100),
    ("endless", "broker MB", "<", 100),
]
#: (workload, metric, zfarm row, peer row, comparison, factor): zfarm's median / the peer's, same run
RATIO_GOALS = [
    ("throughput", "jobs/s", "zfarm: broker + 2 workers, chunksize=64", "ProcessPoolExecutor, chunksize=64",
     ">=", 1.0),
    ("submit", "jobs/s", "zfarm: broker + 2 workers, submit()", "ProcessPoolExecutor, submit()", ">=", 1.8),
    ("latency", "p50 us", "zfarm: broker + 2 workers (tcp)", "ProcessPoolExecutor (no broker hop)",
     "<=", 1.6),
    ("payloads", "MiB/s", "zfarm: broker + 2 workers, default chunking", "ProcessPoolExecutor, chunksize=1",
     ">=", 1.0),
]
#: growth: each case's jobs/s and broker CPU per job within this factor of the base case counts as flat
FLAT_WITHIN = 1.25


# ---- figures ---------------------------------------------------------------------------------------


@dataclass
class Figure:
    workload: str
    system: str
    metric: str
    unit: str
    higher_is_better: bool
    values: list[float] = field(default_factory=list)
    zfarm: bool = False
    headline: bool = False  # the zfarm row the other rows are compared with
    note: str = ""
    error: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(median=self.median, min=min(self.values, default=None), max=max(self.values, default=None))
        return out


Metric = tuple[str, str, bool]  # name, unit, higher is better


@dataclass
class Ctx:
    reps: int
    quick: bool
    procs: Procs
    figures: list[Figure] = field(default_factory=list)


def say(text: str = "") -> None:
    print(text, flush=True)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def measure(ctx: Ctx, workload: str, system: str, metrics: list[Metric],
            setup: Callable[[], contextlib.AbstractContextManager[Any]],
            once: Callable[[Any, Any], dict[str, float]], warm: Callable[[Any], Any] | None = None,
            reps: int | None = None, zfarm_row: bool = False, headline: bool = False, note: str = "",
            needs: str = "") -> list[Figure]:
    """Set ``system`` up, warm it up, run ``once`` ``reps`` times, tear it down; record the figures."""
    figs = {m: Figure(workload, system, m, unit, hib, zfarm=zfarm_row, headline=headline, note=note)
            for m, unit, hib in metrics}
    ctx.figures.extend(figs.values())
    if needs and not have(needs):
        for fig in figs.values():
            fig.error = f"skipped: {needs} is not installed (pip install -e .[bench])"
        say(f"  {system:<44} skipped: {needs} not installed")
        return list(figs.values())
    started = time.monotonic()
    try:
        with setup() as res:
            state = warm(res) if warm else None
            for _ in range(reps or ctx.reps):
                for metric, value in once(res, state).items():
                    figs[metric].values.append(value)
    except Exception as exc:  # one system's failure must not stop the others' figures
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        for fig in figs.values():
            fig.error = error
        say(f"  {system:<44} FAILED: {error}")
        traceback.print_exc(file=ctx.procs.errlog)
        ctx.procs.errlog.flush()
        return list(figs.values())
    shown = ", ".join(f"{fmt(f.median)} {f.metric}" for f in figs.values())
    say(f"  {system:<44} {shown}   [{time.monotonic() - started:.1f} s]")
    return list(figs.values())


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def consume(results: Iterable[Any]) -> int:
    return sum(1 for _ in results)


def calibrate(run_n: Callable[[int], float], target_s: float, n0: int, n_max: int) -> int:
    """Grow n until one run takes about ``target_s`` (these runs are the warm-up)."""
    n = n0
    for _ in range(6):
        elapsed = run_n(n)
        if elapsed >= 0.8 * target_s or n >= n_max:
            break
        n = min(n_max, max(2 * n, int(n * 1.15 * target_s / max(elapsed, 1e-4))))
    return n


def check_count(got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(f"expected {want} results, got {got}")


# ---- processes -------------------------------------------------------------------------------------


class Procs:
    """Every process this script starts, with its log; all stopped at the end whatever happens."""

    def __init__(self) -> None:
        self.logdir = Path(tempfile.mkdtemp(prefix="zfarm-bench-"))
        self.errlog = (self.logdir / "errors.log").open("w")
        self.live: list[subprocess.Popen[bytes]] = []
        self._count = itertools.count(1)

    def zfarm(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"{args[0]}-{next(self._count)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "zfarm", *args, "--log-level", "warning"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.live.append(proc)
        return proc

    def module(self, module: str, *args: str) -> subprocess.Popen[bytes]:
        """``python -m module args`` (the bare pyzmq reference's broker and workers)."""
        log = (self.logdir / f"{module}-{next(self._count)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        log.close()
        self.live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                say(f"  (pid {proc.pid} ignored SIGTERM for {timeout_s:.0f} s: killed)")
                proc.kill()
                proc.wait(10)
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.live)):
            self.stop(proc, 5.0)


def wait_status(address: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                what: str, broker: subprocess.Popen[bytes] | None = None,
                idle: Callable[[], None] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        if broker is not None and broker.poll() is not None:
            raise RuntimeError(f"the broker exited with {broker.returncode} while waiting for {what}")
        try:
            snap = fetch_status(address, 2.0)
            if predicate(snap):
                return snap
        except BrokerUnavailable:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        if idle is not None:
            idle()
        else:
            time.sleep(0.02)


@dataclass
class Farm:
    address: str
    broker: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]


@contextlib.contextmanager
def real_farm(procs: Procs, workers: int = 2, *broker_args: str) -> Iterator[Farm]:
    """``zfarm broker`` on loopback TCP and ``workers`` x ``zfarm worker --procs 1``."""
    address = free_tcp_endpoint()
    broker = procs.zfarm("broker", "--bind", address, *broker_args)
    farm = Farm(address, broker, [])
    try:
        wait_status(address, lambda s: True, 30, "the broker to answer", broker)
        farm.workers = [procs.zfarm("worker", "--connect", address, "--procs", "1") for _ in range(workers)]
        wait_status(address, lambda s: len(s["workers"]) >= workers, 60, f"{workers} workers to register",
                    broker)
        yield farm
    finally:
        for proc in farm.workers:
            procs.stop(proc)
        procs.stop(broker)


@contextlib.contextmanager
def farm_client(procs: Procs, **client_args: Any) -> Iterator[zfarm.Client]:
    with real_farm(procs) as farm, zfarm.Client(farm.address, **client_args) as client:
        yield client


@contextlib.contextmanager
def farm_client_and_broker(procs: Procs) -> Iterator[tuple[zfarm.Client, int]]:
    """:func:`farm_client` and the broker's pid (its own CPU time is measured too)."""
    with real_farm(procs) as farm, zfarm.Client(farm.address) as client:
        yield client, farm.broker.pid


@contextlib.contextmanager
def embedded_client(**client_args: Any) -> Iterator[zfarm.Client]:
    with zfarm.Client(n_workers=2, **client_args) as client:
        client.submit(wl.noop).result(60)  # up and answering
        yield client


@contextlib.contextmanager
def ppe() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        yield pool


@contextlib.contextmanager
def loky_pool() -> Iterator[Any]:
    import loky

    pool = loky.ProcessPoolExecutor(max_workers=2)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)


@contextlib.contextmanager
def dask_client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            yield client
    finally:
        cluster.close()


# ---- 1. throughput ---------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc; empty where there is none)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def cpu_all_s() -> float:
    """CPU seconds used so far by this process and every process below it: the whole system under test."""
    total = 0.0
    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            total += cpu_s(pid)
        except (OSError, IndexError, ValueError):
            pass  # ended meanwhile
    return total


@contextlib.contextmanager
def bare_farm(procs: Procs, workers: int = 2) -> Iterator[BareClient]:
    """The bare pyzmq reference: its broker and ``workers`` workers as processes, and a client."""
    address = free_tcp_endpoint()
    started = [procs.module("benchmarks.bare", "broker", address)]
    context: zmq.Context[Any] = zmq.Context()
    client = BareClient(context, address)
    try:
        started += [procs.module("benchmarks.bare", "worker", address) for _ in range(workers)]
        client.submit(wl.noop, 0)
        client.result(60)
        yield client
    finally:
        client.close()
        context.term()
        for proc in reversed(started):
            procs.stop(proc)


def map_rate(mapper: Callable[[int], int], target_s: float, n0: int, n_max: int) -> tuple[Callable, Callable]:
    """warm and once for a map of ``n`` no-op items: jobs/s."""
    def run_n(n: int) -> float:
        started = time.perf_counter()
        check_count(mapper(n), n)
        return time.perf_counter() - started

    def warm(_res: Any) -> int:
        return calibrate(run_n, target_s, n0, n_max)

    def once(_res: Any, n: int) -> dict[str, float]:
        return {"jobs/s": n / run_n(n)}

    return warm, once


def bench_throughput(ctx: Ctx) -> None:
    target = 0.5 if ctx.quick else 0.6
    rate: list[Metric] = [("jobs/s", "jobs/s", True)]
    holder: dict[str, Any] = {}

    def keep(cm: Callable[[], contextlib.AbstractContextManager[Any]]) -> Callable[[], Any]:
        @contextlib.contextmanager
        def setup() -> Iterator[Any]:
            with cm() as res:
                holder["res"] = res
                yield res
        return setup

    def zf(chunksize: int | None) -> Callable[[int], int]:
        def run(n: int) -> int:
            client = holder["res"]
            it = (client.map(wl.noop, range(n), timeout=RESULT_TIMEOUT_S) if chunksize is None
                  else client.map(wl.noop, range(n), timeout=RESULT_TIMEOUT_S, chunksize=chunksize))
            return consume(it)
        return run

    def pool(chunksize: int) -> Callable[[int], int]:
        return lambda n: consume(holder["res"].map(wl.noop, range(n), chunksize=chunksize,
                                                   timeout=RESULT_TIMEOUT_S))

    def dask(n: int) -> int:
        client = holder["res"]
        return len(client.gather(client.map(wl.noop, range(n), pure=False)))

    real = keep(lambda: farm_client(ctx.procs))
    cases: list[tuple[str, Callable[[], Any], Callable[[int], int], int, int, dict[str, Any]]] = [
        ("zfarm: broker + 2 workers, default chunking", real, zf(None), 2000, 5_000_000,
         {"headline": True, "zfarm_row": True}),
        ("zfarm: broker + 2 workers, chunksize=64", real, zf(64), 2000, 5_000_000, {"zfarm_row": True}),
        ("zfarm: broker + 2 workers, chunksize=1", real, zf(1), 500, 200_000, {"zfarm_row": True}),
        ("zfarm: embedded Client(), default chunking", keep(embedded_client), zf(None), 2000, 5_000_000,
         {"zfarm_row": True}),
        ("ProcessPoolExecutor, chunksize=1", keep(ppe), pool(1), 500, 200_000, {}),
        ("ProcessPoolExecutor, chunksize=64", keep(ppe), pool(64), 2000, 5_000_000, {}),
        ("loky, chunksize=64", keep(loky_pool), pool(64), 2000, 5_000_000, {"needs": "loky"}),
        ("Dask distributed, client.map", keep(dask_client), dask, 100, 20_000, {"needs": "distributed"}),
    ]
    for system, setup, mapper, n0, n_max, extra in cases:
        warm, once = map_rate(mapper, target, n0, n_max)
        measure(ctx, "throughput", system, rate, setup, once, warm, **extra)


# ---- 2. submit -------------------------------------------------------------------------------------


def bare_submit(res: BareClient, n: int) -> list[Any]:
    for i in range(n):
        res.submit(wl.noop, i)
    return list(range(n))


def bare_wait(res: BareClient, jobs: list[Any]) -> int:
    return consume(res.result(RESULT_TIMEOUT_S) for _ in jobs)


def bench_submit(ctx: Ctx) -> None:
    target = 0.5 if ctx.quick else 0.6
    rate: list[Metric] = [("jobs/s", "jobs/s", True), ("CPU us/job", "us", False)]

    def futures_rate(submit_all: Callable[[Any, int], list[Any]], wait: Callable[[Any, list[Any]], int],
                     n0: int, n_max: int) -> tuple[Callable, Callable]:
        def run_n(res: Any, n: int) -> float:
            started = time.perf_counter()
            check_count(wait(res, submit_all(res, n)), n)
            return time.perf_counter() - started

        def warm(res: Any) -> int:
            return calibrate(lambda n: run_n(res, n), target, n0, n_max)

        def once(res: Any, n: int) -> dict[str, float]:
            cpu = cpu_all_s()
            elapsed = run_n(res, n)
            return {"jobs/s": n / elapsed, "CPU us/job": (cpu_all_s() - cpu) / n * 1e6}

        return warm, once

    def with_broker_cpu(warm_once: tuple[Callable, Callable]) -> tuple[Callable, Callable]:
        """The same on ``(client, broker pid)``, with the broker's own CPU time per job as well."""
        warm, once = warm_once

        def once_with_broker(res: Any, n: int) -> dict[str, float]:
            client, pid = res
            cpu = cpu_s(pid)
            figures = once(client, n)
            return {**figures, "broker CPU us/job": (cpu_s(pid) - cpu) / n * 1e6}

        return (lambda res: warm(res[0])), once_with_broker

    def executor_submit(res: Any, n: int) -> list[Any]:
        return [res.submit(wl.noop, i) for i in range(n)]

    def executor_wait(_res: Any, futures: list[Any]) -> int:
        return consume(f.result(RESULT_TIMEOUT_S) for f in futures)

    def dask_submit(res: Any, n: int) -> list[Any]:
        return [res.submit(wl.noop, i, pure=False) for i in range(n)]

    def dask_wait(res: Any, futures: list[Any]) -> int:
        return len(res.gather(futures))

    cases: list[tuple[str, Callable[[], Any], tuple[Callable, Callable], dict[str, Any]]] = [
        ("zfarm: broker + 2 workers, submit()", lambda: farm_client_and_broker(ctx.procs),
         with_broker_cpu(futures_rate(executor_submit, executor_wait, 500, 500_000)),
         {"headline": True, "zfarm_row": True}),
        ("zfarm: embedded Client(), submit()", embedded_client,
         futures_rate(executor_submit, executor_wait, 500, 500_000), {"zfarm_row": True}),
        (BARE, lambda: bare_farm(ctx.procs), futures_rate(bare_submit, bare_wait, 500, 500_000),
         {"zfarm_row": True}),
        ("ProcessPoolExecutor, submit()", ppe, futures_rate(executor_submit, executor_wait, 500, 500_000),
         {}),
        ("loky, submit()", loky_pool, futures_rate(executor_submit, executor_wait, 500, 500_000),
         {"needs": "loky"}),
        ("Dask distributed, client.submit()", dask_client, futures_rate(dask_submit, dask_wait, 100, 20_000),
         {"needs": "distributed"}),
    ]
    for system, setup, (warm, once), extra in cases:
        broker_cpu: list[Metric] = [("broker CPU us/job", "us", False)] if extra.get("headline") else []
        measure(ctx, "submit", system, rate + broker_cpu, setup, once, warm, **extra)


# ---- 3. latency ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_latency(ctx: Ctx) -> None:
    metrics: list[Metric] = [("p50 us", "us", False), ("p99 us", "us", False)]

    def round_trips(samples: int, warmup: int, one: Callable[[Any], Any]) -> tuple[Callable, Callable]:
        def warm(res: Any) -> None:
            for _ in range(warmup):
                one(res)

        def once(res: Any, _state: Any) -> dict[str, float]:
            times = []
            for _ in range(samples):
                started = time.perf_counter()
                one(res)
                times.append((time.perf_counter() - started) * 1e6)
            return {"p50 us": percentile(times, 0.5), "p99 us": percentile(times, 0.99)}

        return warm, once

    def executor_one(res: Any) -> Any:
        return res.submit(wl.noop, 0).result(RESULT_TIMEOUT_S)

    def dask_one(res: Any) -> Any:
        return res.submit(wl.noop, 0, pure=False).result(RESULT_TIMEOUT_S)

    def bare_one(res: BareClient) -> Any:
        res.submit(wl.noop, 0)
        return res.result(RESULT_TIMEOUT_S)

    n = 300 if ctx.quick else 500
    cases: list[tuple[str, Callable[[], Any], tuple[Callable, Callable], dict[str, Any]]] = [
        ("zfarm: broker + 2 workers (tcp)", lambda: farm_client(ctx.procs), round_trips(n, 50, executor_one),
         {"headline": True, "zfarm_row": True}),
        ("zfarm: embedded Client() (ipc)", embedded_client, round_trips(n, 50, executor_one),
         {"zfarm_row": True}),
        ("ProcessPoolExecutor (no broker hop)", ppe, round_trips(n, 50, executor_one), {}),
        ("loky", loky_pool, round_trips(n, 50, executor_one), {"needs": "loky"}),
        ("Dask distributed", dask_client, round_trips(100 if ctx.quick else 200, 10, dask_one),
         {"needs": "distributed", "note": "fewer samples a run"}),
        (BARE, lambda: bare_farm(ctx.procs), round_trips(n, 50, bare_one), {"zfarm_row": True}),
    ]
    for system, setup, (warm, once), extra in cases:
        measure(ctx, "latency", system, metrics, setup, once, warm, **extra)


# ---- 4. efficiency and 5. payloads -----------------------------------------------------------------


def bench_efficiency(ctx: Ctx) -> None:
    jobs, ideal_s = 400, 400 * 0.01 / 2
    metric: list[Metric] = [("efficiency", "ideal/measured", True)]

    def runner(run: Callable[[Any], int]) -> tuple[Callable, Callable]:
        def warm(res: Any) -> None:
            run(res)

        def once(res: Any, _state: Any) -> dict[str, float]:
            started = time.perf_counter()
            check_count(run(res), jobs)
            return {"efficiency": ideal_s / (time.perf_counter() - started)}

        return warm, once

    def zf(chunksize: int | None) -> Callable[[Any], int]:
        if chunksize is None:
            return lambda c: consume(c.map(wl.sleep_10ms, range(jobs), timeout=RESULT_TIMEOUT_S))
        return lambda c: consume(c.map(wl.sleep_10ms, range(jobs), timeout=RESULT_TIMEOUT_S,
                                       chunksize=chunksize))

    def pool(chunksize: int) -> Callable[[Any], int]:
        return lambda e: consume(e.map(wl.sleep_10ms, range(jobs), chunksize=chunksize,
                                       timeout=RESULT_TIMEOUT_S))

    def dask(client: Any) -> int:
        return len(client.gather(client.map(wl.sleep_10ms, range(jobs), pure=False)))

    cases: list[tuple[str, Callable[[], Any], Callable[[Any], int], dict[str, Any]]] = [
        ("zfarm: broker + 2 workers, default chunking", lambda: farm_client(ctx.procs), zf(None),
         {"headline": True, "zfarm_row": True}),
        ("zfarm: broker + 2 workers, chunksize=1", lambda: farm_client(ctx.procs), zf(1),
         {"zfarm_row": True}),
        ("ProcessPoolExecutor, chunksize=1", ppe, pool(1), {}),
        ("ProcessPoolExecutor, chunksize=64", ppe, pool(64), {}),
        ("loky, chunksize=1", loky_pool, pool(1), {"needs": "loky"}),
        ("Dask distributed", dask_client, dask, {"needs": "distributed"}),
    ]
    for system, setup, run, extra in cases:
        warm, once = runner(run)
        measure(ctx, "efficiency", system, metric, setup, once, warm, **extra)


def bench_long(ctx: Ctx) -> None:
    jobs, slots = (30, 3) if ctx.quick else (100, 3)
    ideal_s = -(-jobs // slots) * 1.0  # whole rounds of 1 s on each slot: the best any scheduler can do
    metric: list[Metric] = [("efficiency", "ideal/measured", True)]

    def runner(run: Callable[[Any], int]) -> Callable[[Any, Any], dict[str, float]]:
        def once(res: Any, _state: Any) -> dict[str, float]:
            started = time.perf_counter()
            check_count(run(res), jobs)
            return {"efficiency": ideal_s / (time.perf_counter() - started)}
        return once

    @contextlib.contextmanager
    def farm3() -> Iterator[zfarm.Client]:
        with real_farm(ctx.procs, slots) as farm, zfarm.Client(farm.address) as client:
            yield client

    @contextlib.contextmanager
    def ppe3() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
        with concurrent.futures.ProcessPoolExecutor(slots) as pool:
            yield pool

    cases: list[tuple[str, Callable[[], Any], Callable[[Any], int], dict[str, Any]]] = [
        ("zfarm: broker + 3 workers, default chunking", farm3,
         lambda c: consume(c.map(wl.sleep_1s, range(jobs), timeout=RESULT_TIMEOUT_S)),
         {"headline": True, "zfarm_row": True}),
        ("ProcessPoolExecutor(3), chunksize=1", ppe3,
         lambda e: consume(e.map(wl.sleep_1s, range(jobs), timeout=RESULT_TIMEOUT_S)), {}),
    ]
    for system, setup, run, extra in cases:
        measure(ctx, "long", system, metric, setup, runner(run), None, **extra)


def bench_uneven(ctx: Ctx) -> None:
    """A long job and short ones on 2 one-slot workers: a short job prefetched behind the long one must
    move to the other slot when that one frees (no idle slot while work waits)."""
    lengths_s = [2.0, 0.5, 0.5, 0.5]
    ideal_s = max(max(lengths_s), sum(lengths_s) / 2)
    metric: list[Metric] = [("efficiency", "ideal/measured", True)]

    def runner(run: Callable[[Any], int]) -> Callable[[Any, Any], dict[str, float]]:
        def once(res: Any, _state: Any) -> dict[str, float]:
            started = time.perf_counter()
            check_count(run(res), len(lengths_s))
            return {"efficiency": ideal_s / (time.perf_counter() - started)}
        return once

    cases: list[tuple[str, Callable[[], Any], Callable[[Any], int], dict[str, Any]]] = [
        ("zfarm: broker + 2 workers, default chunking", lambda: farm_client(ctx.procs),
         lambda c: consume(c.map(wl.sleep_s, lengths_s, timeout=RESULT_TIMEOUT_S)),
         {"headline": True, "zfarm_row": True}),
        ("ProcessPoolExecutor, chunksize=1", ppe,
         lambda e: consume(e.map(wl.sleep_s, lengths_s, timeout=RESULT_TIMEOUT_S)), {}),
    ]
    for system, setup, run, extra in cases:
        measure(ctx, "uneven", system, metric, setup, runner(run), None, **extra)


def bench_payloads(ctx: Ctx) -> None:
    blobs = [bytes([i]) * MiB for i in range(50)]
    total_mib = 2 * len(blobs)  # in and out
    metric: list[Metric] = [("MiB/s", "MiB/s", True)]

    def check(results: Iterable[Any]) -> None:
        got = list(results)
        intact = all(bytes(g[:1]) == b[:1] and len(g) == MiB for g, b in zip(got, blobs, strict=False))
        if len(got) != len(blobs) or not intact:
            raise RuntimeError("the payloads did not come back intact")

    def runner(run: Callable[[Any], Iterable[Any]]) -> tuple[Callable, Callable]:
        def once(res: Any, _state: Any) -> dict[str, float]:
            started = time.perf_counter()
            check(run(res))
            return {"MiB/s": total_mib / (time.perf_counter() - started)}

        return (lambda res: check(run(res))), once

    def zf(chunksize: int | None) -> Callable[[Any], Iterable[Any]]:
        if chunksize is None:
            return lambda c: c.map(wl.echo, blobs, timeout=RESULT_TIMEOUT_S)
        return lambda c: c.map(wl.echo, blobs, timeout=RESULT_TIMEOUT_S, chunksize=chunksize)

    def pool(e: Any) -> Iterable[Any]:
        return e.map(wl.echo, blobs, timeout=RESULT_TIMEOUT_S)

    def dask(client: Any) -> Iterable[Any]:
        return client.gather(client.map(wl.echo, blobs, pure=False))

    def bare(client: BareClient) -> Iterable[Any]:  # results come in any order: put them back in order
        return sorted(client.map(wl.echo, blobs, RESULT_TIMEOUT_S), key=lambda blob: blob[:1])

    cases: list[tuple[str, Callable[[], Any], Callable[[Any], Iterable[Any]], dict[str, Any]]] = [
        ("zfarm: broker + 2 workers, default chunking", lambda: farm_client(ctx.procs), zf(None),
         {"headline": True, "zfarm_row": True}),
        ("zfarm: broker + 2 workers, chunksize=1", lambda: farm_client(ctx.procs), zf(1),
         {"zfarm_row": True}),
        ("zfarm: embedded Client() (ipc)", embedded_client, zf(None), {"zfarm_row": True}),
        ("ProcessPoolExecutor, chunksize=1", ppe, pool, {}),
        ("loky, chunksize=1", loky_pool, pool, {"needs": "loky"}),
        ("Dask distributed", dask_client, dask, {"needs": "distributed"}),
        (BARE, lambda: bare_farm(ctx.procs), bare, {"zfarm_row": True}),
    ]
    for system, setup, run, extra in cases:
        warm, once = runner(run)
        measure(ctx, "payloads", system, metric, setup, once, warm, **extra)


def bench_scatter(ctx: Ctx) -> None:
    size, jobs = (10 * MiB, 50) if ctx.quick else (20 * MiB, 100)
    template = bytes(range(256)) * (size // 256)
    runs = itertools.count()
    metric: list[Metric] = [("s", "s", False)]

    def runner(run: Callable[[Any, bytes], list[int]]) -> tuple[Callable, Callable]:
        def once(res: Any, _state: Any) -> dict[str, float]:
            data = next(runs).to_bytes(8, "little") + template[8:]  # new content: no cache helps
            started = time.perf_counter()
            if run(res, data) != [len(data)] * jobs:
                raise RuntimeError("the jobs did not see the whole input")
            return {"s": time.perf_counter() - started}
        return (lambda res: run(res, template)), once

    def zf_scattered(client: zfarm.Client, data: bytes) -> list[int]:
        handle = client.scatter(data)
        return [f.result(RESULT_TIMEOUT_S) for f in [client.submit(wl.length, handle) for _ in range(jobs)]]

    def with_each(pool: Any, data: bytes) -> list[int]:
        return [f.result(RESULT_TIMEOUT_S) for f in [pool.submit(wl.length, data) for _ in range(jobs)]]

    def dask_scattered(client: Any, data: bytes) -> list[int]:
        [handle] = client.scatter([data], broadcast=True)
        return list(client.gather([client.submit(wl.length, handle, pure=False) for _ in range(jobs)]))

    cases: list[tuple[str, Callable[[], Any], Callable[[Any, bytes], list[int]], dict[str, Any]]] = [
        ("zfarm: broker + 2 workers, client.scatter()", lambda: farm_client(ctx.procs), zf_scattered,
         {"headline": True, "zfarm_row": True}),
        ("zfarm: broker + 2 workers, sent with each job", lambda: farm_client(ctx.procs), with_each,
         {"zfarm_row": True}),
        ("ProcessPoolExecutor, sent with each job", ppe, with_each, {}),
        ("Dask distributed, client.scatter()", dask_client, dask_scattered, {"needs": "distributed"}),
    ]
    for system, setup, run, extra in cases:
        warm, once = runner(run)
        measure(ctx, "scatter", system, metric, setup, once, warm, **extra)


# ---- 6. start --------------------------------------------------------------------------------------


def bench_start(ctx: Ctx) -> None:
    metric: list[Metric] = [("s", "s", False)]

    def start_embedded() -> float:
        started = time.perf_counter()
        client = zfarm.Client(n_workers=2)
        try:
            client.submit(wl.noop).result(RESULT_TIMEOUT_S)
            return time.perf_counter() - started
        finally:
            client.shutdown()

    def start_processes() -> float:
        started = time.perf_counter()
        address = free_tcp_endpoint()
        procs = [ctx.procs.zfarm("broker", "--bind", address)]
        try:
            procs += [ctx.procs.zfarm("worker", "--connect", address, "--procs", "1") for _ in range(2)]
            with zfarm.Client(address) as client:
                client.submit(wl.noop).result(RESULT_TIMEOUT_S)
                return time.perf_counter() - started
        finally:
            for proc in reversed(procs):
                ctx.procs.stop(proc)

    def start_pool(make: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            pool = make()
            try:
                pool.submit(wl.noop).result(RESULT_TIMEOUT_S)
                return time.perf_counter() - started
            finally:
                pool.shutdown(wait=True)
        return run

    def make_loky() -> Any:
        import loky

        return loky.ProcessPoolExecutor(max_workers=2)

    def start_dask() -> float:
        from distributed import Client, LocalCluster

        started = time.perf_counter()
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        try:
            with Client(cluster) as client:
                client.submit(wl.noop, pure=False).result(RESULT_TIMEOUT_S)
                return time.perf_counter() - started
        finally:
            cluster.close()

    def start_bare() -> float:
        started = time.perf_counter()
        with bare_farm(ctx.procs):
            return time.perf_counter() - started

    cases: list[tuple[str, Callable[[], float], dict[str, Any]]] = [
        ("zfarm: embedded Client(n_workers=2)", start_embedded, {"headline": True, "zfarm_row": True}),
        (BARE, start_bare, {"zfarm_row": True}),
        ("zfarm: broker + 2 worker processes + Client", start_processes, {"zfarm_row": True}),
        ("ProcessPoolExecutor (fork)", start_pool(lambda: concurrent.futures.ProcessPoolExecutor(2)), {}),
        ("loky", start_pool(make_loky), {"needs": "loky"}),
        ("Dask distributed LocalCluster", start_dask, {"needs": "distributed"}),
    ]
    for system, run, extra in cases:
        measure(ctx, "start", system, metric, contextlib.nullcontext, lambda _r, _s, run=run: {"s": run()},
                **extra)


# ---- raw protocol peers (7. memory, 9. growth) -----------------------------------------------------


class RawClient:
    """A client speaking zfarm.protocol directly: submits no-op jobs in batches, counts results.

    It sends exactly what ``zfarm.Client`` sends (the same SUBMIT rows and pickled frames) without
    a future per job, so the figures are the broker's.
    """

    def __init__(self, context: zmq.Context[Any], address: str, batch: int = 2000) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)
        self.id = f"c-bench-{uuid.uuid4().hex[:8]}"
        self.batch = batch
        self.fn_id, self.fn_blob = ser.dump_function(wl.noop)
        self.payload = [bytes(memoryview(f)) for f in ser.dump_call((0,), {})]
        self.payload_bytes = sum(len(f) for f in self.payload)
        self.fn_sent = False
        self.seq = 0
        self.done = 0
        self.last_sent = time.monotonic()
        self.send(p.Hello(p.Role.CLIENT.value, self.id, socket.gethostname(), os.getpid(), 0, {}))
        if not self.sock.poll(30_000):
            raise TimeoutError("no WELCOME for the raw client")
        welcome = p.decode(self.sock.recv_multipart())
        if not isinstance(welcome, p.Welcome):
            raise RuntimeError(f"expected WELCOME, got {welcome}")
        self.interval_s = welcome.heartbeat_interval_s

    def send(self, msg: p.Message) -> None:
        self.sock.send_multipart(p.encode(msg))
        self.last_sent = time.monotonic()

    def submit(self, n: int) -> None:
        nframes = len(self.payload)
        while n > 0:
            k = min(n, self.batch)
            rows = [[seq, nframes, {}] for seq in range(self.seq + 1, self.seq + k + 1)]
            self.seq += k
            frames = ([self.fn_blob] if not self.fn_sent else []) + self.payload * k
            self.send(p.Submit(self.fn_id, not self.fn_sent, rows, frames))
            self.fn_sent = True
            n -= k

    def receive(self) -> int:
        """Read what has arrived; return how many jobs finished."""
        finished = 0
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self.done += finished
                return finished
            if frames[1][0] == p.Command.RESULT:
                rows = msgpack.unpackb(frames[2])[0]
                bad = [row for row in rows if row[1] != p.Outcome.OK]
                if bad:
                    raise RuntimeError(f"{len(bad)} jobs did not succeed: {bad[0]}")
                finished += len(rows)
            elif frames[1][0] in (p.Command.REFUSED, p.Command.DISCONNECT, p.Command.RECONNECT):
                raise RuntimeError(f"the broker dropped the raw client: {p.decode(frames)}")

    def heartbeat(self, now: float) -> None:
        if now - self.last_sent >= self.interval_s / 2:
            self.send(p.Heartbeat())

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.send(p.Disconnect("benchmark done"))
        self.sock.close(linger=0)


class SimWorkers:
    """Many lightweight workers in this process: each answers JOBS at once with an OK echo."""

    def __init__(self, context: zmq.Context[Any], address: str, n: int, credit: int) -> None:
        self.credit = credit
        self.socks: list[zmq.Socket[Any]] = []
        self.ids: dict[zmq.Socket[Any], str] = {}
        self.last_sent: dict[zmq.Socket[Any], float] = {}
        self.welcomed: set[zmq.Socket[Any]] = set()
        self.interval_s = 1.0
        for i in range(n):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(address)
            self.socks.append(sock)
            self.ids[sock] = f"w-sim-{i}-{uuid.uuid4().hex[:6]}"
            self.hello(sock)

    def hello(self, sock: zmq.Socket[Any]) -> None:
        self.send(sock, p.Hello(p.Role.WORKER.value, self.ids[sock], socket.gethostname(), os.getpid(), 1,
                                {"prefetch": self.credit - 1}))

    def send(self, sock: zmq.Socket[Any], msg: p.Message) -> None:
        sock.send_multipart(p.encode(msg))
        self.last_sent[sock] = time.monotonic()

    def handle(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            command = frames[1][0]
            if command == p.Command.JOBS:
                fns, jobs = msgpack.unpackb(frames[2])
                payload = frames[3 + len(fns):]
                rows = [[job[0], job[1], job[2], int(p.Outcome.OK), job[4], ""] for job in jobs]
                self.send(sock, p.Results(len(rows), rows, payload))
            elif command == p.Command.WELCOME:
                welcome = p.decode(frames)
                assert isinstance(welcome, p.Welcome)
                self.interval_s = welcome.heartbeat_interval_s
                self.welcomed.add(sock)
                self.send(sock, p.Ready(self.credit))
            elif command == p.Command.RECONNECT:
                self.hello(sock)
            elif command in (p.Command.REFUSED, p.Command.DISCONNECT):
                raise RuntimeError(f"the broker dropped simulated worker {self.ids[sock]}: "
                                   f"{p.decode(frames)}")

    def heartbeat(self, now: float) -> None:
        for sock in self.welcomed:
            if now - self.last_sent[sock] >= self.interval_s / 2:
                self.send(sock, p.Heartbeat())

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(zmq.ZMQError):
                if sock in self.welcomed:
                    self.send(sock, p.Disconnect("benchmark done"))
            sock.close(linger=0)


class Rig:
    """A bare broker process with a raw client and, once added, simulated workers, in one poll loop."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.context: zmq.Context[Any] = zmq.Context()
        self.address = free_tcp_endpoint()
        self.broker = procs.zfarm("broker", "--bind", self.address)
        self.workers: SimWorkers | None = None
        self.client: RawClient | None = None
        self.poller = zmq.Poller()
        self._next_beat = 0.0

    def __enter__(self) -> Rig:
        try:
            wait_status(self.address, lambda s: True, 30, "the broker to answer", self.broker)
            self.client = RawClient(self.context, self.address)
            self.poller.register(self.client.sock, zmq.POLLIN)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.workers is not None:
            self.workers.close()
        if self.client is not None:
            self.client.close()
        self.procs.stop(self.broker)
        self.context.term()

    def add_workers(self, n: int, credit: int) -> None:
        self.workers = SimWorkers(self.context, self.address, n, credit)
        for sock in self.workers.socks:
            self.poller.register(sock, zmq.POLLIN)

    def pump(self, timeout_ms: int = 50, refill: bool = True) -> None:
        """One round: answer whatever arrived; resubmit as many jobs as finished (``refill``)."""
        assert self.client is not None
        client = self.client
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is client.sock:
                finished = client.receive()
                if refill and finished:
                    client.submit(finished)
            elif self.workers is not None:
                self.workers.handle(sock)
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + 0.1
            client.heartbeat(now)
            if self.workers is not None:
                self.workers.heartbeat(now)
            if self.broker.poll() is not None:
                raise RuntimeError(f"the broker exited with {self.broker.returncode}")

    def run_until_done(self, done: int, timeout_s: float) -> None:
        assert self.client is not None
        deadline = time.monotonic() + timeout_s
        while self.client.done < done:
            self.pump()
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.client.done} of {done} jobs done within {timeout_s:.0f} s")

    def wait_queued(self, n: int, timeout_s: float) -> None:
        """Until the broker holds ``n`` queued jobs, heartbeating meanwhile."""

        def idle() -> None:
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                self.pump(20, refill=False)

        wait_status(self.address, lambda s: s["queued"] >= n, timeout_s, f"{n:,} jobs to be queued",
                    self.broker, idle)


# ---- 7. memory -------------------------------------------------------------------------------------


def bench_memory(ctx: Ctx) -> None:
    n = 100_000 if ctx.quick else 1_000_000
    metrics: list[Metric] = [("bytes/job", "bytes", False)]
    payload = [0]

    def once(_res: Any, _state: Any) -> dict[str, float]:
        with Rig(ctx.procs) as rig:
            assert rig.client is not None
            payload[0] = rig.client.payload_bytes
            wait_status(rig.address, lambda s: len(s["clients"]) == 1, 30, "the client to register",
                        rig.broker)
            before = rss_bytes(rig.broker.pid)
            rig.client.submit(n)
            rig.wait_queued(n, 300)
            after = rss_bytes(rig.broker.pid)
            return {"bytes/job": (after - before) / n}

    measure(ctx, "memory", f"zfarm broker, {n:,} queued no-op jobs", metrics, contextlib.nullcontext, once,
            zfarm_row=True, headline=True)
    for fig in ctx.figures:
        if fig.workload == "memory":
            fig.note = (f"each job's pickled arguments are {payload[0]} bytes of that; jobs submitted by a "
                        "raw protocol client (the same SUBMIT messages as zfarm.Client)")


# ---- 8. endless ------------------------------------------------------------------------------------


class RssSampler:
    """The peak VmRSS of some processes, sampled every 50 ms in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: rss_bytes(pid) for name, pid in pids.items()}
        self.start = dict(self.peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_bytes(pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_endless(ctx: Ctx) -> None:
    items = 1_000_000 if ctx.quick else 10_000_000
    cap_s = 10.0 if ctx.quick else 40.0
    metrics: list[Metric] = [("client MB", "MB", False), ("broker MB", "MB", False), ("items", "items", True),
                             ("items/s", "items/s", True)]
    farm_box: dict[str, Farm] = {}

    @contextlib.contextmanager
    def setup() -> Iterator[zfarm.Client]:
        with real_farm(ctx.procs) as farm, zfarm.Client(farm.address) as client:
            farm_box["farm"] = farm
            yield client

    def once(client: zfarm.Client, _state: Any) -> dict[str, float]:
        broker = farm_box["farm"].broker
        done = 0
        with RssSampler({"client": os.getpid(), "broker": broker.pid}) as rss:
            results = client.map(wl.noop, itertools.count(), timeout=RESULT_TIMEOUT_S)
            started = time.perf_counter()
            deadline = time.monotonic() + cap_s
            try:
                for _ in results:
                    done += 1
                    if done >= items or (done % 1024 == 0 and time.monotonic() > deadline):
                        break
            finally:
                elapsed = time.perf_counter() - started
                close = getattr(results, "close", None)
                if close is not None:
                    close()
        return {"client MB": (rss.peak["client"] - rss.start["client"]) / 1e6,
                "broker MB": (rss.peak["broker"] - rss.start["broker"]) / 1e6,
                "items": float(done), "items/s": done / elapsed}

    measure(ctx, "endless", "zfarm: broker + 2 workers, map(noop, count())", metrics, setup, once,
            reps=min(ctx.reps, 3), zfarm_row=True, headline=True,
            note=f"peak RSS - RSS at the start of the map; each run stops at {items:,} items or after "
                 f"{cap_s:.0f} s; at most 3 runs")


# ---- 9. growth -------------------------------------------------------------------------------------


def bench_growth(ctx: Ctx) -> None:
    big = 100_000 if ctx.quick else 1_000_000
    per_rep = 10_000 if ctx.quick else 30_000
    credit = 8
    metrics: list[Metric] = [("jobs/s", "jobs/s", True), ("broker us/job", "us CPU", False)]
    cases = [(2, 1_000), (2, big), (200, 1_000), (500, 1_000)]
    for index, (workers, queued) in enumerate(cases):
        @contextlib.contextmanager
        def setup(workers: int = workers, queued: int = queued) -> Iterator[Rig]:
            with Rig(ctx.procs) as rig:
                assert rig.client is not None
                outstanding = queued + workers * credit  # the queue stays at `queued` in steady state
                rig.client.submit(outstanding)
                rig.wait_queued(outstanding, 300)
                rig.add_workers(workers, credit)
                rig.run_until_done(per_rep // 2, 120)  # warm-up: registration, first batches
                yield rig

        def once(rig: Rig, _state: Any) -> dict[str, float]:
            assert rig.client is not None
            target = rig.client.done + per_rep
            cpu0, started = cpu_s(rig.broker.pid), time.perf_counter()
            rig.run_until_done(target, 120)
            elapsed = time.perf_counter() - started
            cpu_us = (cpu_s(rig.broker.pid) - cpu0) / per_rep * 1e6
            return {"jobs/s": per_rep / elapsed, "broker us/job": cpu_us}

        measure(ctx, "growth", f"{workers} simulated workers, {queued:,} queued", metrics, setup, once,
                zfarm_row=True, headline=index == 0,
                note=f"credit {credit} a worker; {per_rep:,} jobs a run; a raw protocol client and the "
                     "simulated workers share one Python loop, which bounds jobs/s (more so with many "
                     "sockets): broker us/job (its CPU time per job) is the broker's cost")


def bench_journal(ctx: Ctx) -> None:
    metrics: list[Metric] = [("map jobs/s", "jobs/s", True), ("map c=1 jobs/s", "jobs/s", True),
                             ("submit jobs/s", "jobs/s", True)]
    n_map, n_single, n_submit = (100_000, 3_000, 1_000) if ctx.quick else (300_000, 10_000, 3_000)

    def once(client: zfarm.Client, _state: Any) -> dict[str, float]:
        out = {}
        for metric, run, n in (
                ("map jobs/s", lambda n: consume(client.map(wl.noop, range(n))), n_map),
                ("map c=1 jobs/s", lambda n: consume(client.map(wl.noop, range(n), chunksize=1)), n_single),
                ("submit jobs/s", lambda n: consume(f.result(RESULT_TIMEOUT_S)
                                                    for f in [client.submit(wl.noop, i) for i in range(n)]),
                 n_submit)):
            started = time.perf_counter()
            check_count(run(n), n)
            out[metric] = n / (time.perf_counter() - started)
        return out

    folder = tempfile.mkdtemp(prefix="zfarm-bench-journal-")
    journal = ("--journal", os.path.join(folder, "journal.db"))
    for index, (system, broker_args) in enumerate([
            ("zfarm: broker + 2 workers, in memory", ()),
            ("zfarm: broker + 2 workers, --journal", journal),
            ("zfarm: broker + 2 workers, --journal-sync normal", (*journal, "--journal-sync", "normal"))]):
        @contextlib.contextmanager
        def setup(broker_args: tuple[str, ...] = broker_args) -> Iterator[zfarm.Client]:
            with real_farm(ctx.procs, 2, *broker_args) as farm, zfarm.Client(farm.address) as client:
                yield client

        measure(ctx, "journal", system, metrics, setup, once, warm=lambda c: once(c, None), zfarm_row=True,
                headline=index == 0, note="journal: SQLite WAL, in a temporary folder on this machine's disk")
    shutil.rmtree(folder, ignore_errors=True)


# ---- report ----------------------------------------------------------------------------------------


def ratio_of(zf: float | None, other: float | None) -> str:
    if zf is None or other is None or other == 0:
        return "-"
    return f"{zf / other:.2f}"


def print_tables(figures: list[Figure], workloads: Iterable[str]) -> list[dict[str, Any]]:
    goals_out: list[dict[str, Any]] = []
    for workload in workloads:
        figs = [f for f in figures if f.workload == workload]
        if not figs:
            continue
        say()
        say(f"== {TITLES[workload]} ==")
        growth = workload in AGAINST_BASE
        ratio_head = "case/base" if growth else "zfarm/peer"
        say(f"{'system':<52} {'metric':<14} {'median':>12} {'min - max':>25} {ratio_head:>10}")
        for fig in figs:
            head = next((h for h in figs if h.headline and h.metric == fig.metric), None)
            if fig.error and not fig.values:
                say(f"{fig.system:<52} {fig.metric:<14} {fig.error}")
                continue
            spread = f"{fmt(min(fig.values))} - {fmt(max(fig.values))}"
            if fig is head:
                ratio = "(base)" if growth else "(zfarm)"
            elif growth:
                ratio = ratio_of(fig.median, head.median if head else None)
            elif fig.zfarm:
                ratio = ""
            else:
                ratio = ratio_of(head.median if head else None, fig.median)
            say(f"{fig.system:<52} {fig.metric:<14} {fmt(fig.median):>12} {spread:>25} {ratio:>10}")
        notes = sorted({f.note for f in figs if f.note})
        notes += sorted({f"{f.system}: {f.error} (after {len(f.values)} runs)" for f in figs
                         if f.error and f.values})
        for note in notes:
            say(f"  note: {note}")
        directions = sorted({f"{f.metric}: {'higher' if f.higher_is_better else 'lower'} is better"
                             for f in figs if f.metric not in ("items",)})
        say(f"  ({'; '.join(directions)})")
        goals_out += report_goals(workload, figs)
    return goals_out


def report_goals(workload: str, figs: list[Figure]) -> list[dict[str, Any]]:
    out = []
    if workload == "growth":  # the broker's CPU per job; jobs/s is bounded by the simulator's own loop too
        cost = [f for f in figs if f.metric == "broker us/job" and f.median]
        base = next((f.median for f in cost if f.headline), None)
        worst = max((f.median / base for f in cost if base), default=0.0)
        met = base is not None and worst <= FLAT_WITHIN
        say(f"  goal: broker CPU per job flat from 1,000 to many queued jobs and from 2 to 500 workers "
            f"(within x{FLAT_WITHIN}): {'met' if met else 'NOT met'} (worst case x{worst:.2f} of the base)")
        return [{"workload": workload, "goal": f"flat within x{FLAT_WITHIN}", "value": worst, "met": met}]
    for goal_workload, metric, op, threshold in GOALS:
        if goal_workload != workload:
            continue
        head = next((f for f in figs if f.headline and f.metric == metric), None)
        value = head.median if head else None
        met = value is not None and {"<=": value <= threshold, ">=": value >= threshold,
                                     "<": value < threshold}[op]
        say(f"  goal: {metric} {op} {threshold:,}: {'met' if met else 'NOT met'} ({fmt(value)})")
        out.append({"workload": workload, "goal": f"{metric} {op} {threshold}", "value": value, "met": met})
    for goal_workload, metric, ours, peer, op, factor in RATIO_GOALS:
        if goal_workload != workload:
            continue
        mine = next((f.median for f in figs if f.system == ours and f.metric == metric), None)
        theirs = next((f.median for f in figs if f.system == peer and f.metric == metric), None)
        ratio = mine / theirs if mine is not None and theirs else None
        met = ratio is not None and (ratio >= factor if op == ">=" else ratio <= factor)
        say(f"  goal: {metric} {op} {factor} x {peer}: {'met' if met else 'NOT met'} "
            f"({'-' if ratio is None else f'x{ratio:.2f}'})")
        out.append({"workload": workload, "goal": f"{metric} {op} {factor} x {peer}", "value": ratio,
                    "met": met})
    return out


def merged(path: Path, payload: dict[str, Any], chosen: list[str]) -> dict[str, Any]:
    """A run of some workloads replaces theirs in an existing results file and keeps the others'.

    Each figure keeps the time of the run that measured it (``when``).
    """
    for figure in payload["figures"]:
        figure["when"] = payload["when"]
    if set(chosen) == set(WORKLOADS) or not path.exists():
        return payload
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return payload
    keep = [f for f in old.get("figures", []) if f.get("workload") not in chosen]
    for figure in keep:
        figure.setdefault("when", old.get("when"))
    goals = [g for g in old.get("goals", []) if g.get("workload") not in chosen]
    return {**payload, "figures": keep + payload["figures"], "goals": goals + payload["goals"]}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "zfarm": zfarm.__version__, "pyzmq": zmq.__version__,
           "libzmq": zmq.zmq_version()}
    for module in ("loky", "distributed"):
        if have(module):
            out[module] = __import__(module).__version__
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, help="runs per figure (default 5; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller sizes (about 3 minutes)")
    parser.add_argument("--only", help=f"comma-separated workloads of: {', '.join(WORKLOADS)}")
    parser.add_argument("--json", default=str(REPO_ROOT / "benchmarks" / "results.json"),
                        help="where the figures go (default: benchmarks/results.json; a run of some "
                             "workloads keeps the others' figures there)")
    args = parser.parse_args()
    chosen = [w.strip() for w in args.only.split(",")] if args.only else list(WORKLOADS)
    unknown = set(chosen) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    reps = args.repeat or (3 if args.quick else 5)
    procs = Procs()
    ctx = Ctx(reps=reps, quick=args.quick, procs=procs)
    say(f"zfarm benchmarks: {reps} runs a figure{' (quick)' if args.quick else ''}, {os.cpu_count()} CPUs, "
        f"{', '.join(f'{k} {v}' for k, v in versions().items())}")
    started = time.monotonic()
    try:
        for workload in WORKLOADS:
            if workload in chosen:
                say(f"\n{TITLES[workload]}")
                globals()[f"bench_{workload}"](ctx)
    except KeyboardInterrupt:
        say("\ninterrupted: reporting what was measured")
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - started
    goals = print_tables(ctx.figures, [w for w in WORKLOADS if w in chosen])
    say(f"\nwhole run: {elapsed:.0f} s")
    payload = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine()},
        "versions": versions(), "repeat": reps, "quick": args.quick, "seconds": round(elapsed, 1),
        "figures": [f.as_json() for f in ctx.figures], "goals": goals,
    }
    Path(args.json).write_text(json.dumps(merged(Path(args.json), payload, chosen), indent=2) + "\n")
    say(f"written to {args.json}")
    failed = [f for f in ctx.figures if f.error and not f.error.startswith("skipped")]
    procs.errlog.close()
    if failed:
        say(f"{len(failed)} figures failed; tracebacks and process logs in {procs.logdir}")
        return 1
    shutil.rmtree(procs.logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
