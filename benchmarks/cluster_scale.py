"""How far one broker reaches: many worker connections heartbeating, and a large map through many workers.

    python benchmarks/cluster_scale.py heartbeats --workers 1000 --seconds 300
    python benchmarks/cluster_scale.py map --workers 200 --jobs 100000

A real ``zfarm worker`` with one slot costs about 40 MB (worker, forkserver and slot; PSS), so
1,000 of them do not fit a 24 GiB machine beside anything else. Instead each "shell" process
here runs many real worker cores (``WorkerCore``: the same handshake, credit, heartbeats and
reconnects as ``zfarm worker``), each with its own DEALER socket and connection to the broker,
and runs the jobs it is given in-process with the slot's own code. The broker cannot tell them
from real workers. Prints the figures (and one JSON line) for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._workloads import cpu_s, rss_bytes
from zfarm import protocol as p
from zfarm.config import WorkerSettings
from zfarm.local import free_tcp_endpoint, stop_processes
from zfarm.monitor import fetch_status
from zfarm.worker import chaperone
from zfarm.worker.core import Actions, WorkerCore

# ---- one shell process: many worker cores -------------------------------------------------------


class Shell:
    def __init__(self, address: str, count: int, prefix: str, interval_s: float) -> None:
        self.address = address
        self.ctx: zmq.Context[Any] = zmq.Context()
        now = time.monotonic()
        host = socket.gethostname()
        settings = [WorkerSettings(address=address, procs=1, prefetch=1, worker_id=f"{prefix}-{i}",
                                   heartbeat_interval_s=interval_s) for i in range(count)]
        # no offer: the broker sees one slot's cpus, as a plain `zfarm worker --procs 1` with no flags
        self.cores = [WorkerCore(s, now, host, os.getpid()) for s in settings]
        self.socks: list[zmq.Socket[Any] | None] = [None] * count
        self.index: dict[zmq.Socket[Any], int] = {}
        self.poller = zmq.Poller()
        self.fns: dict[bytes, Any] = {}
        self.reconnects = 0
        self.jobs = 0

    def open(self, i: int, now: float) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.address)
        self.socks[i] = sock
        self.index[sock] = i
        self.poller.register(sock, zmq.POLLIN)
        self.apply(i, self.cores[i].connect(now))

    def close(self, i: int) -> None:
        sock = self.socks[i]
        if sock is not None:
            self.poller.unregister(sock)
            del self.index[sock]
            sock.close(linger=0)
            self.socks[i] = None

    def apply(self, i: int, actions: Actions) -> None:
        sock = self.socks[i]
        if sock is not None:
            for msg in actions.send:
                try:  # never blocking, as zfarm.link.Link: a link with no peer drops what it carries
                    sock.send_multipart(p.encode(msg), zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    pass
        if actions.reconnect:  # the core dropped the link; a new socket opens at core.live.reconnect_at
            self.reconnects += 1
            self.close(i)

    def run_task(self, task: chaperone.SlotTask) -> chaperone.SlotOutcome:
        fn = self.fns.get(task.fn_id)
        if fn is None:
            fn = self.fns[task.fn_id] = chaperone._load(p.as_bytes(task.fn_blob))
        started_at, started = time.time(), time.perf_counter()
        upstream = task.options.get("upstream") or []
        outcome, out, info = chaperone._run(fn, [p.as_bytes(f) for f in task.frames], upstream)
        run_s = time.perf_counter() - started
        return chaperone.SlotOutcome(task.key, task.attempt, outcome, out, info, run_s, started_at,
                                     started_at + run_s)

    def serve(self, stop: list[bool]) -> None:
        while not stop[0]:
            now = time.monotonic()
            for i, core in enumerate(self.cores):
                if self.socks[i] is None and core.live.reconnect_due(now):
                    self.open(i, now)
            for sock, _ in self.poller.poll(50):
                i = self.index.get(sock)
                while i is not None and self.socks[i] is sock:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.apply(i, self.cores[i].on_message(p.decode(frames), time.monotonic()))
            now = time.monotonic()
            for i, core in enumerate(self.cores):
                for task in core.take_tasks(1, now):
                    self.jobs += 1
                    self.apply(i, core.finished([self.run_task(task)], time.monotonic(), from_slots=1))
                self.apply(i, core.tick(now))
        for i, core in enumerate(self.cores):
            self.apply(i, core.goodbye(time.monotonic()))
            self.close(i)
        self.ctx.term()


def shell_main(args: argparse.Namespace) -> None:
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    shell = Shell(args.address, args.count, args.prefix, args.interval)
    shell.serve(stop)
    print(json.dumps({"reconnects": shell.reconnects, "jobs": shell.jobs}), flush=True)


# ---- the measurer ---------------------------------------------------------------------------------


class Farm:
    def __init__(self, workers: int, per_process: int, interval_s: float, real: bool = False) -> None:
        self.address = free_tcp_endpoint()
        self.shells: list[subprocess.Popen[str]] = []
        self.real: list[subprocess.Popen[bytes]] = []
        self.broker = subprocess.Popen([sys.executable, "-m", "zfarm", "broker", "--bind", self.address,
                                        "--heartbeat-interval", str(interval_s), "--log-level", "warning"])
        try:  # a farm that never came up: no broker, worker or shell outlives the run
            self.wait(lambda s: True, 30, "the broker")
            self.idle_rss = rss_bytes(self.broker.pid)
            if real:  # real `zfarm worker --procs 1` processes (each with its forkserver and slot)
                self.real = [subprocess.Popen([sys.executable, "-m", "zfarm", "worker", "--connect",
                                               self.address, "--procs", "1", "--worker-id", f"r{i}",
                                               "--log-level", "warning",
                                               "--heartbeat-interval", str(interval_s)])
                             for i in range(workers)]
            for n, start in enumerate(range(0, 0 if real else workers, per_process)):
                count = min(per_process, workers - start)
                self.shells.append(subprocess.Popen(
                    [sys.executable, __file__, "shell", "--address", self.address, "--count", str(count),
                     "--prefix", f"s{n}", "--interval", str(interval_s)], stdout=subprocess.PIPE, text=True))
            self.wait(lambda s: len(s["workers"]) == workers, 300, f"{workers} workers registered")
        except BaseException:
            stop_processes([*self.real, *self.shells, self.broker], time.monotonic() + 30)  # type: ignore
            raise

    def status(self) -> dict[str, Any]:
        return fetch_status(self.address, timeout_s=30)

    def wait(self, condition: Any, timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                snap = self.status()
                if condition(snap):
                    return snap
            except Exception:
                pass
            time.sleep(1)
        raise SystemExit(f"timed out waiting for {what}")

    def stop(self) -> dict[str, int]:
        for shell in self.shells:
            shell.send_signal(signal.SIGTERM)
        totals = {"reconnects": 0, "jobs": 0}
        stop_processes(self.real, time.monotonic() + 60)
        for shell in self.shells:
            out, _ = shell.communicate(timeout=120)
            for key, value in json.loads(out.strip().splitlines()[-1]).items():
                totals[key] += value
        stop_processes([self.broker], time.monotonic() + 10)
        return totals


def heartbeats(args: argparse.Namespace) -> dict[str, Any]:
    farm = Farm(args.workers, args.per_process, args.interval)
    try:
        rss0, cpu0, t0 = rss_bytes(farm.broker.pid), cpu_s(farm.broker.pid), time.monotonic()
        fewest, lost0 = args.workers, farm.status()["workers_lost"]
        while time.monotonic() - t0 < args.seconds:
            time.sleep(min(15.0, max(0.0, args.seconds - (time.monotonic() - t0))))
            snap = farm.status()
            fewest = min(fewest, len(snap["workers"]))
        elapsed = time.monotonic() - t0
        cpu = cpu_s(farm.broker.pid) - cpu0
        rss1 = rss_bytes(farm.broker.pid)
        lost = snap["workers_lost"] - lost0
    finally:
        totals = farm.stop()
    beats_in = args.workers * elapsed / args.interval
    return {"benchmark": "heartbeats", "workers": args.workers, "seconds": round(elapsed, 1),
            "heartbeat_interval_s": args.interval, "fewest_workers_listed": fewest, "workers_lost": lost,
            "worker_reconnects": totals["reconnects"], "broker_cpu_s": round(cpu, 2),
            "broker_cpu_share": round(cpu / elapsed, 4),
            "broker_cpu_us_per_heartbeat": round(cpu / beats_in * 1e6, 1),
            "broker_rss_idle_mb": round(farm.idle_rss / 2**20, 1), "broker_rss_mb": round(rss1 / 2**20, 1),
            "broker_rss_kb_per_worker": round((rss0 - farm.idle_rss) / args.workers / 1024, 1)}


def big_map(args: argparse.Namespace) -> dict[str, Any]:
    import zfarm

    farm = Farm(args.workers, args.per_process, args.interval, args.real)
    try:
        cpu0 = cpu_s(farm.broker.pid)
        with zfarm.Client(farm.address) as client:
            started = time.perf_counter()
            # chunksize 1: every item its own job (map's adaptive chunks would make ~100 jobs of them)
            total = sum(client.map(abs, range(-args.jobs, 0), timeout=3600, chunksize=args.chunksize))
            elapsed = time.perf_counter() - started
            per_worker = client.stats().summary.jobs_per_worker
        cpu = cpu_s(farm.broker.pid) - cpu0
        rss = rss_bytes(farm.broker.pid)
    finally:
        totals = farm.stop()
    assert total == args.jobs * (args.jobs + 1) // 2, total
    return {"benchmark": "map", "workers": args.workers, "real_workers": args.real, "jobs": args.jobs,
            "chunksize": args.chunksize,
            "seconds": round(elapsed, 1),
            "jobs_per_s": round(args.jobs / elapsed), "workers_used": len(per_worker),
            "fewest_jobs_on_a_worker": min(per_worker.values()),
            "most_jobs_on_a_worker": max(per_worker.values()),
            "broker_cpu_s": round(cpu, 1), "broker_rss_mb": round(rss / 2**20, 1),
            "jobs_run_by_shells": totals["jobs"], "worker_reconnects": totals["reconnects"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True, dest="what")
    for name in ("heartbeats", "map"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--workers", type=int, default=1000 if name == "heartbeats" else 200)
        cmd.add_argument("--per-process", type=int, default=100 if name == "heartbeats" else 25)
        cmd.add_argument("--interval", type=float, default=1.0, help="heartbeat interval (s)")
        cmd.add_argument("--seconds", type=float, default=300.0)
        cmd.add_argument("--jobs", type=int, default=100_000)
        cmd.add_argument("--chunksize", type=int, default=1, help="items per job in the map (default 1)")
        cmd.add_argument("--real", action="store_true", help="map: real zfarm worker processes, not shells")
    shell = sub.add_parser("shell")
    shell.add_argument("--address", required=True)
    shell.add_argument("--count", type=int, required=True)
    shell.add_argument("--prefix", required=True)
    shell.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    if args.what == "shell":
        shell_main(args)
        return
    result = heartbeats(args) if args.what == "heartbeats" else big_map(args)
    for key, value in result.items():
        print(f"{key:32} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
