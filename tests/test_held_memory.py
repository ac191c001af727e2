"""The broker's memory for held results stays under its bound, with real processes.

::

    zfarm.Client (session: every result held until it ends) ──► zfarm broker (no journal,
    a raw session client that never reads                  ──►  ZFARM_HELD_MEMORY_BYTES small)
                                                 zfarm worker ──►  past the bound: a spill file

A session's results are held by the broker until the session ends, read or not. Past
``held_memory_bytes`` their payloads wait on disk, so the broker's resident memory grows by
their small records only, not by their size.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

import zfarm
from tests import jobs
from tests.helpers import Procs, wait_for_workers, zfarm_env
from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.local import free_tcp_endpoint
from zfarm.monitor import fetch_status

pytestmark = pytest.mark.timeout(120)

MIB = 2**20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the broker's RSS from /proc")
def test_a_session_holding_far_more_than_the_bound_keeps_the_brokers_memory_bounded(
        procs: Procs, ctx: zmq.Context[Any]) -> None:
    endpoint = free_tcp_endpoint()
    broker = procs.spawn("broker", "--bind", endpoint, "--log-level", "info",
                         "--history", "0", env=zfarm_env({"ZFARM_HELD_MEMORY_BYTES": str(2 * MIB)}))
    broker.wait_for_log("listening on", 20)
    procs.worker(endpoint, procs=2)
    wait_for_workers(endpoint, 1)
    count, size = 1500, 32 * 1024  # 48 MiB of results
    with zfarm.Client(endpoint, session="big", broker_timeout_s=60) as client:
        assert len(client.submit(jobs.make_bytes, size).result(30)) == size
        before = rss_bytes(broker.pid)
        assert sum(len(r) for r in client.map(jobs.make_bytes, [size] * count, chunksize=1)) == count * size
        snap = fetch_status(endpoint, 10.0, ctx)
        grown = rss_bytes(broker.pid) - before
        assert [c["held"] for c in snap["clients"]] == [count + 1]  # all held until the session ends
    assert grown < 16 * MIB, f"the broker grew by {grown / MIB:.0f} MiB holding {count * size / MIB:.0f} MiB"
    assert snap["held_memory_bytes"] <= 2 * MIB
    assert snap["held_on_disk"] >= count - 2 * MIB // size
    wait_for_workers(endpoint, 1)  # and it still answers


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the broker's RSS from /proc")
def test_a_session_client_that_never_reads_costs_the_broker_little_more_than_its_results(
        procs: Procs, ctx: zmq.Context[Any]) -> None:
    endpoint = free_tcp_endpoint()
    broker = procs.spawn("broker", "--bind", endpoint, "--log-level", "info", "--history", "0",
                         env=zfarm_env({"ZFARM_HELD_MEMORY_BYTES": str(2 * MIB)}))
    broker.wait_for_log("listening on", 20)
    procs.worker(endpoint, procs=2)
    wait_for_workers(endpoint, 1)
    before = rss_bytes(broker.pid)
    count, size = 8000, 1024
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1)  # it reads nothing: what it is sent waits at the broker
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(p.encode(p.Hello(p.Role.CLIENT.value, "s-never-reads", socket.gethostname(),
                                             os.getpid(), 0, {"session": "never-reads"})))
        fn_id, blob = ser.dump_function(jobs.make_bytes)
        call = ser.dump_call((size,), {})
        for start in range(1, count + 1, 1000):
            rows = [[seq, len(call), {}] for seq in range(start, start + 1000)]
            sock.send_multipart(p.encode(p.Submit(fn_id, start == 1, rows, ([blob] if start == 1 else [])
                                                  + call * 1000)))
        deadline = time.monotonic() + 90
        done = 0
        while done < count and time.monotonic() < deadline:
            sock.send_multipart(p.encode(p.Heartbeat()))  # alive, only never reading
            done = sum(c["done"] for c in fetch_status(endpoint, 10.0, ctx)["clients"])
            time.sleep(0.3)  # the pace of the heartbeats the broker expects (interval 1 s)
        assert done == count, f"{done} of {count} jobs done"
        grown = rss_bytes(broker.pid) - before
    finally:
        sock.close(linger=0)
    payload = count * size
    assert grown < 3 * payload, f"the broker grew by {grown / MIB:.0f} MiB for {payload / MIB:.0f} MiB"
