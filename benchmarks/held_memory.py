"""Broker memory per held result: a session holds every result until it ends.

``python benchmarks/held_memory.py [--jobs 20000] [--size 1024] [--held-memory-bytes N] [--journal]``

Starts a ``zfarm broker`` (``--history 0``, so finished-job records do not count) and one
``zfarm worker --procs 2``, runs a session's ``map`` of jobs that each return ``--size`` bytes, and
prints the broker's resident memory growth per held result (VmRSS after minus before, over the jobs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zfarm
from benchmarks._workloads import rss_bytes
from zfarm.local import free_tcp_endpoint, stop_processes
from zfarm.monitor import fetch_status

WARM_UP_JOBS = 500


def payload(size: int) -> bytes:
    return os.urandom(size)


def held_by_broker(endpoint: str, count: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """The broker's snapshot once it holds ``count`` results (it holds a session's until it ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = fetch_status(endpoint, 10.0)
        held = sum(c["held"] for c in snap["clients"])
        if held >= count:
            return snap
        if time.monotonic() >= deadline:
            raise SystemExit(f"the broker held {held} results, not {count}, after {timeout_s:.0f} s")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--held-memory-bytes", type=int, default=0, help="the broker setting (0: default)")
    parser.add_argument("--journal", action="store_true", help="run the broker with a journal")
    args = parser.parse_args()
    endpoint = free_tcp_endpoint()
    env = dict(os.environ)
    if args.held_memory_bytes:
        env["ZFARM_HELD_MEMORY_BYTES"] = str(args.held_memory_bytes)
    folder = tempfile.mkdtemp(prefix="zfarm-held-bench-")
    extra = ["--journal", os.path.join(folder, "journal.db")] if args.journal else []
    zfarm_cmd = [sys.executable, "-m", "zfarm"]
    broker = subprocess.Popen([*zfarm_cmd, "broker", "--bind", endpoint, "--history", "0", *extra], env=env,
                              stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([*zfarm_cmd, "worker", "--connect", endpoint, "--procs", "2"],
                              stderr=subprocess.DEVNULL)
    try:
        with zfarm.Client(endpoint, session="held-bench", broker_timeout_s=60) as client:
            # warm up: pools, caches, sockets
            list(client.map(payload, [args.size] * WARM_UP_JOBS, chunksize=1))
            held_by_broker(endpoint, WARM_UP_JOBS)
            before = rss_bytes(broker.pid)
            started = time.perf_counter()
            got = sum(len(r) for r in client.map(payload, [args.size] * args.jobs, chunksize=1))
            took = time.perf_counter() - started
            snap = held_by_broker(endpoint, WARM_UP_JOBS + args.jobs)  # its last turn is over
            after = rss_bytes(broker.pid)
            held = sum(c["held"] for c in snap["clients"])
        print(f"{args.jobs} results of {args.size} bytes ({got} bytes) in {took:.1f} s; {held} held; "
              f"broker RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB: "
              f"{(after - before) / args.jobs:.0f} bytes per held result; "
              f"in memory {snap.get('held_memory_bytes', '?')} bytes, "
              f"on disk {snap.get('held_on_disk', '?')}")
    finally:
        stop_processes([worker, broker], time.monotonic() + 10)  # SIGKILL what is left then
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
