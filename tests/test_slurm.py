"""SlurmCluster against a real single-node Slurm (started by .ci/services.sh); skips without one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import zfarm
from tests import jobs
from tests.helpers import wait_for
from zfarm.monitor import fetch_status


def slurm_unavailable() -> str:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return "needs Slurm's commands (sbatch, squeue): .ci/services.sh install"
    try:
        subprocess.run(["squeue", "-h"], check=True, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "no Slurm controller answers squeue: .ci/services.sh start"
    return ""


WHY_NOT = slurm_unavailable()  # once: squeue may take its time to say no
pytestmark = [pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "ok"), pytest.mark.slow]


def queue(cluster: zfarm.SlurmCluster) -> list[str]:
    """This cluster's jobs in Slurm's queue (names): another test run may share the queue."""
    done = subprocess.run(["squeue", "-h", "--me", "-o", "%j"], check=True, capture_output=True, text=True,
                          timeout=30)
    prefix = cluster.job_name("")
    return [name for name in done.stdout.split() if name.startswith(prefix)]


def test_slurm_cluster_scales_to_two_runs_a_map_and_leaves_the_queue_empty(tmp_path: Path) -> None:
    with zfarm.SlurmCluster(cpus=1, shared_dir=str(tmp_path), worker_grace_s=5) as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout_s=90)
        with zfarm.Client(cluster) as client:
            assert sum(client.map(abs, range(-1000, 0))) == 500500
        assert len(queue(cluster)) == 2
        cluster.scale(3)  # this node has 2 CPUs: the third job waits in the queue, and counts as coming
        wait_for(lambda: [w["state"] for w in cluster.workers] == ["running", "running", "pending"], 60,
                 interval_s=0.2, message="a pending third job")
        assert cluster.status()["coming"] == 1

        def reported() -> list[dict[str, object]]:  # as `zfarm status` shows it, from any machine
            return [c for c in fetch_status(cluster.address, keys=cluster.keys)["clusters"]
                    if c["id"] == cluster.cluster_id and c["pending"] == 1 and c["running"] == 2]

        wait_for(reported, 30, interval_s=0.5, message="the broker to show the pending job")
        cluster.scale(0)
        wait_for(lambda: cluster.status()["launched"] == 0, 60, interval_s=0.5, message="jobs ended")
        assert [w["state"] for w in cluster.workers] == ["stopped", "stopped", "stopped"]
    assert queue(cluster) == []
    assert list(tmp_path.iterdir()) == []  # the settings file (with the worker key) is gone


def test_a_slurm_worker_drains_before_its_walltime_and_no_job_is_lost(tmp_path: Path) -> None:
    """The worker reads its allocation's end (1 minute) and has drained 45 s before (so the test is
    short); the cluster replaces it, and the map goes on."""
    with zfarm.SlurmCluster(jobs=1, cpus=1, walltime="1", shared_dir=str(tmp_path), worker_grace_s=2,
                            walltime_margin_s=45, log_level="info") as cluster:
        cluster.wait_for_workers(1, timeout_s=90)
        with zfarm.Client(cluster) as client:
            results = list(client.map(jobs.sleep_then, range(40), [0.5] * 40, timeout=240))
            assert results == list(range(40))
        first = cluster.workers[0]
        assert first["launches"] >= 2, cluster.workers
        assert "CANCELLED" not in first["last_exit"] and "TIMEOUT" not in first["last_exit"], first
        logs = "".join(p.read_text() for p in tmp_path.glob("*/slurm-0.1.*.out"))
        assert "allocation ends at" in logs and "draining" in logs, logs


def test_a_job_sbatch_queued_though_it_failed_is_cancelled(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The first sbatch queues its job and then fails (as a timeout would): that job is cancelled by
    its name, and the worker's next launch is the only job left."""
    real = shutil.which("sbatch")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    once = tmp_path / "failed-once"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\n"{real}" "$@" || exit\n'
                                    f'[ -e {once} ] || {{ touch {once}; exit 1; }}\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    shared = tmp_path / "shared"
    with zfarm.SlurmCluster(jobs=1, cpus=1, shared_dir=str(shared), worker_grace_s=5) as cluster:
        cluster.wait_for_workers(1, timeout_s=120)
        assert cluster.workers[0]["launches"] == 2, cluster.workers

        wait_for(lambda: len(queue(cluster)) == 1, 30, interval_s=0.5,
                 message="only the second launch queued")
        assert queue(cluster)[0].endswith("slurm-0.2"), queue(cluster)
    assert queue(cluster) == []
