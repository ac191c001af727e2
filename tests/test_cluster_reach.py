"""Clusters seen from anywhere: a cluster's report in `zfarm status` and the dashboard; its workers'
resources and tags; a broker on an IPv6 address.

    LocalCluster(address=broker) ──CLUSTER every 2 s──► broker ◄── zfarm status --json (a subprocess)
          └── workers (--resources, --tags) ───────────────┘   ◄── zfarm.Client (a job asking gpus=1)
"""

from __future__ import annotations

import io
import socket

import pytest
from rich.console import Console

import zfarm
from tests import jobs
from tests.helpers import Procs, require_status, run_zfarm, wait_for
from tests.test_cluster import SlowHandle, SlowLauncher
from zfarm.dashboard import DashboardState, render


def test_a_cluster_shows_in_zfarm_status_and_the_dashboard_and_goes_when_it_closes(procs: Procs) -> None:
    _, endpoint = procs.broker()
    cluster = zfarm.LocalCluster(n_workers=1, address=endpoint)
    try:
        def reported() -> dict[str, object] | None:
            snap = require_status(endpoint)  # `zfarm status --json`, as from another machine
            rows = [c for c in snap.get("clusters", []) if c["id"] == cluster.cluster_id]
            return rows[0] if rows and rows[0]["running"] == 1 else None

        row = wait_for(reported, 60, interval_s=0.2, message="the cluster's report with its worker running")
        assert (row["launcher"], row["requested"], row["launched"], row["coming"], row["adapt"]) == (
            "local", 1, 1, 0, None)
        line = f"cluster {cluster.cluster_id} (local): 1 running, 0 coming, wants 1"
        shown = run_zfarm("status", "--connect", endpoint)
        assert shown.returncode == 0 and line in shown.stdout, shown.stdout + shown.stderr
        console = Console(record=True, width=160, file=io.StringIO())
        console.print(render(require_status(endpoint), DashboardState(endpoint)))
        assert line in console.export_text()
    finally:
        cluster.close()
    assert require_status(endpoint)["clusters"] == [], "a closed cluster must go at once"


def test_a_batch_job_still_queued_shows_as_pending_at_the_broker(procs: Procs) -> None:
    _, endpoint = procs.broker()
    handle = SlowHandle(queued=True)  # a launcher whose job waits in a batch queue (as Slurm's do)
    handle.answer.set()
    cluster = SlowLauncher(handle, endpoint)
    try:
        def pending() -> dict[str, object] | None:
            rows = require_status(endpoint).get("clusters", [])
            return rows[0] if rows and rows[0]["pending"] == 1 else None

        row = wait_for(pending, 30, interval_s=0.2, message="the cluster's pending worker")
        assert (row["launcher"], row["requested"], row["launched"], row["running"], row["coming"]) == (
            "slow", 1, 1, 0, 1)
    finally:
        cluster.close(timeout_s=10)


def test_cluster_workers_offer_the_resources_and_tags_the_cluster_was_given() -> None:
    with zfarm.LocalCluster(n_workers=1, resources={"gpus": 1}, tags={"bigmem"}) as cluster:
        with zfarm.Client(cluster) as client:
            future = client.with_options(resources={"gpus": 1}, tags={"bigmem"}).submit(jobs.square, 7)
            assert future.result(timeout=60) == 49
        (worker,) = require_status(cluster.address)["workers"]
        assert worker["tags"] == ["bigmem"] and worker["resources"]["gpus"] == 1


def test_a_broker_on_an_ipv6_address_serves_a_worker_a_client_and_status(procs: Procs) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError as exc:
        pytest.skip(f"this machine has no IPv6 loopback (::1): {exc}")
    endpoint = f"tcp://[::1]:{port}"
    procs.broker(endpoint)
    procs.worker(endpoint)
    with zfarm.Client(endpoint) as client:
        assert client.submit(jobs.square, 7).result(timeout=60) == 49
    assert len(require_status(endpoint)["workers"]) == 1
