"""Clusters on this machine: the embedded farm's supervision, LocalCluster's scale/adapt, profiles."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import zfarm
import zfarm.cluster.reporter
from tests import jobs
from tests.helpers import (
    Procs,
    cmdline,
    describe_pid,
    family,
    ipc_endpoint,
    kill_pids,
    require_status,
    wait_for,
    zfarm_env,
)
from zfarm.cluster.base import STATUS_EVERY_S, Cluster
from zfarm.cluster.profile import ProfileError, build_cluster, load_profile
from zfarm.cluster.supervision import Launched
from zfarm.errors import BrokerUnavailable
from zfarm.local import free_tcp_endpoint
from zfarm.security import SecurityError, add_key, init_keys


def worker_pids(address: str, count: int) -> list[int]:
    def listed() -> list[int]:
        pids = [w["pid"] for w in require_status(address)["workers"]]
        return pids if len(pids) == count else []

    return wait_for(listed, 30, interval_s=0.1, message=f"{count} workers registered")


@pytest.mark.slow
def test_embedded_farm_finishes_its_map_when_all_its_workers_are_killed() -> None:
    with zfarm.Client(n_workers=2, heartbeat_interval_s=0.3) as client:
        first = worker_pids(client.address, 2)
        results = client.map(jobs.sleep_then, range(40), [0.1] * 40, timeout=90)
        assert next(results) == 0
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        assert list(results) == list(range(1, 40))
        workers = client._res.cluster.workers  # type: ignore[union-attr]
        assert all(w["launches"] >= 2 for w in workers), workers
        assert "SIGKILL" in workers[0]["last_exit"]


def test_local_cluster_scales_up_and_down_and_client_uses_it() -> None:
    with zfarm.LocalCluster(n_workers=1, heartbeat_interval_s=0.5) as cluster:
        cluster.wait_for_workers(1)
        cluster.scale(3)
        cluster.wait_for_workers(3)
        with zfarm.Client(cluster) as client:
            assert sum(client.map(abs, range(-100, 0))) == 5050
        cluster.scale(1)
        wait_for(lambda: sorted(w["state"] for w in cluster.workers) == ["running", "stopped", "stopped"],
                 30, interval_s=0.2, message="two workers retired")
        wait_for(lambda: len(require_status(cluster.address)["workers"]) == 1, 30, interval_s=0.2)


def test_a_cluster_bound_to_any_free_port_tells_its_workers_the_one_it_took() -> None:
    with zfarm.LocalCluster(n_workers=1, bind="tcp://127.0.0.1:*", heartbeat_interval_s=0.5) as cluster:
        assert cluster.address.rpartition(":")[2].isdigit(), cluster.address
        cluster.wait_for_workers(1)  # (with the * passed on, its worker refused it and never came)
        with zfarm.Client(cluster) as client:
            assert client.submit(pow, 2, 5).result(30) == 32
        assert [w["state"] for w in cluster.workers] == ["running"]


def test_a_worker_that_dies_at_start_backs_off_and_is_given_up() -> None:
    with zfarm.LocalCluster(n_workers=0) as cluster:
        cluster.log_level = "no-such-level"  # the worker exits at once: its command line is wrong
        cluster.restarts.first_backoff_s = 0.05
        cluster.restarts.max_quick_deaths = 3
        cluster.scale(1)
        wait_for(lambda: cluster.workers and cluster.workers[0]["state"] == "failed", 60, interval_s=0.1)
        (worker,) = cluster.workers
        assert worker["launches"] == 3
        assert "exited with code" in worker["last_exit"]
        assert cluster.status()["failed"] == 1


class SlowHandle:
    """A launched worker whose launcher is slow to say whether it ended (ssh joins a thread, Slurm
    reads a file): ``ended`` blocks until ``answer`` is set. It never reaches a broker."""

    def __init__(self, queued: bool = True) -> None:
        self.asked, self.answer, self.retired = threading.Event(), threading.Event(), False
        self.queued = queued

    def ended(self) -> str | None:
        self.asked.set()
        self.answer.wait(60)
        return "left" if self.retired else None

    def pending(self) -> bool:
        return self.queued  # a queued batch job: the cluster asks the broker nothing about it

    def retire(self) -> None:
        self.retired = True

    def kill(self) -> None:
        self.retired = True


class SlowLauncher(Cluster):
    kind = "slow"

    def __init__(self, handle: SlowHandle, address: str, **common: Any) -> None:
        self.handle = handle
        super().__init__(address=address, **common)
        self._begin(1)

    def _place(self, index: int) -> tuple[str, str]:
        return f"slow-{index}", "nowhere"

    def _launch(self, worker: Launched) -> SlowHandle:
        return self.handle


def test_a_launcher_slow_to_answer_ended_does_not_block_the_cluster_s_other_callers() -> None:
    handle = SlowHandle()
    cluster = SlowLauncher(handle, free_tcp_endpoint())  # no broker there: reports wait on their own thread
    try:
        assert handle.asked.wait(30), "the supervisor never asked the handle"
        answered = threading.Event()
        reader = threading.Thread(target=lambda: (cluster.status(), cluster.workers, answered.set()))
        reader.start()
        assert answered.wait(10), "status() waited for the launcher's ended()"
        reader.join(10)
    finally:
        handle.answer.set()
        cluster.close(timeout_s=10)
    assert [w["state"] for w in cluster.workers] == ["stopped"]


class CountedHandle(SlowHandle):
    """A worker that runs: each supervisor round asks it ``ended()`` once, so rounds can be counted."""

    def __init__(self) -> None:
        super().__init__(queued=False)
        self.answer.set()
        self.rounds: list[float] = []

    def ended(self) -> str | None:
        self.rounds.append(time.monotonic())
        return super().ended()


@pytest.mark.slow
def test_a_broker_that_does_not_answer_never_slows_the_supervisor_nor_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a report waits a minute for its answer: one the supervisor or close() waited for would show
    monkeypatch.setattr(zfarm.cluster.reporter, "REPORT_TIMEOUT_S", 60.0)
    handle = CountedHandle()
    cluster = SlowLauncher(handle, free_tcp_endpoint())  # nothing listens: each report waits its deadline
    try:
        # a round every 0.5 s; a report blocking the round would make it one per 5 s
        wait_for(lambda: len(handle.rounds) >= 8, 15, interval_s=0.05, message="8 supervisor rounds")
        assert cluster.status()["broker"] is None
    finally:
        started = time.monotonic()
        cluster.close(timeout_s=10)
        closed_s = time.monotonic() - started
    assert closed_s < 4.0, f"close() waited {closed_s:.1f} s for a broker that is not there"
    assert [w["state"] for w in cluster.workers] == ["stopped"]


class BlockedLauncher(SlowLauncher):
    """A launcher whose launch takes as long as the test says (sbatch or ssh by tens)."""

    def __init__(self, handle: SlowHandle, address: str, **common: Any) -> None:
        self.launching, self.release, self.launched = threading.Event(), threading.Event(), threading.Event()
        super().__init__(handle, address, **common)

    def _launch(self, worker: Launched) -> SlowHandle:
        self.launching.set()
        self.release.wait(60)
        self.launched.set()
        return self.handle


def test_the_broker_hears_from_a_cluster_while_it_is_still_launching(procs: Procs) -> None:
    _, endpoint = procs.broker()
    handle = SlowHandle(queued=False)
    handle.answer.set()
    cluster = BlockedLauncher(handle, endpoint, name="lab")
    try:
        assert cluster.launching.wait(30)

        def reported() -> dict[str, Any] | None:
            rows = require_status(endpoint).get("clusters", [])
            return rows[0] if rows and rows[0]["coming"] == 1 else None

        row = wait_for(reported, 10, interval_s=0.1, message="a report during a launch")
        assert (row["name"], row["launched"]) == ("lab", 0), row  # named from its very first report
        assert not cluster.launched.is_set()  # heard while the launch had not returned
        events = [e for e in require_status(endpoint)["events"] if e["kind"] == "cluster-joined"]
        assert len(events) == 1 and "(lab)" in events[0]["text"], events
    finally:
        cluster.release.set()
        cluster.close(timeout_s=10)


@pytest.mark.slow
def test_waiting_for_workers_asks_the_broker_no_faster_than_the_supervisor_does(
        procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    from zfarm import monitor

    _, endpoint = procs.broker()
    asked: list[float] = []
    report_cluster = monitor.report_cluster

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        asked.append(time.monotonic())
        return report_cluster(*args, **kwargs)

    monkeypatch.setattr(monitor, "report_cluster", counted)
    handle = SlowHandle(queued=False)  # started, and never registers
    handle.answer.set()
    cluster = SlowLauncher(handle, endpoint)
    try:
        wait_for(lambda: asked, 30, interval_s=0.05, message="the supervisor asked the broker")
        waited_s = 3.0
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="fewer than 1 workers"):
            cluster.wait_for_workers(1, timeout_s=waited_s)
        assert time.monotonic() - started >= waited_s
    finally:
        cluster.close(timeout_s=10)
    during = [t for t in asked if started <= t <= started + waited_s]
    assert len(during) <= waited_s / STATUS_EVERY_S + 2, during  # not one monitor connection per 0.2 s


@pytest.mark.slow
def test_adapt_grows_with_the_queue_and_shrinks_when_idle() -> None:
    with zfarm.LocalCluster(n_workers=0, heartbeat_interval_s=0.5) as cluster:
        cluster.adapt(minimum=0, maximum=3, interval_s=0.5, wait_count=2)
        with zfarm.Client(cluster) as client:
            futures = [client.submit(jobs.sleep_then, i, 0.5) for i in range(30)]
            wait_for(lambda: cluster.status()["requested"] == 3, 60, interval_s=0.2)
            assert [f.result(timeout=90) for f in futures] == list(range(30))
        wait_for(lambda: cluster.status()["requested"] == 0 and cluster.status()["launched"] == 0, 60,
                 interval_s=0.2, message="the idle cluster shrank to 0")


def test_profile_errors_name_the_file_the_key_and_the_fix(tmp_path: Path) -> None:
    toml = tmp_path / "zfarm.toml"
    toml.write_text(textwrap.dedent("""
        [profiles.lab]
        launcher = "ssh"
        hosts = ["a", "b"]
        procs_per_worker = "four"
        [profiles.typo]
        launcher = "local"
        n_wrokers = 2
        [profiles.nowhere]
        launcher = "pbs"
        [profiles.upside]
        launcher = "local"
        adapt = { minimum = 5, maximum = 2 }
        [profiles.badbind]
        launcher = "local"
        bind = "tcp://127.0.0.1:99999"
    """))
    with pytest.raises(ProfileError, match=r"zfarm.toml: \[profiles.lab\] procs_per_worker: is 'four'; "):
        load_profile("lab", [toml])
    with pytest.raises(ProfileError, match=r"n_wrokers: is not a setting of the local launcher; .*n_workers"):
        load_profile("typo", [toml])
    with pytest.raises(ProfileError, match=r"launcher: is 'pbs'; write launcher = \"local\""):
        load_profile("nowhere", [toml])
    with pytest.raises(ProfileError, match=r"\[profiles.upside\] adapt: adapt needs 0 <= minimum <= maximum"):
        load_profile("upside", [toml])
    with pytest.raises(ProfileError, match=r"no such profile; known: lab .*typo"):
        load_profile("missing", [toml])
    started = time.monotonic()  # refused before any broker starts, not a broker that never answers
    with pytest.raises((ProfileError, zfarm.ConfigError), match=r"99999.*from 1 to 65535"):
        build_cluster(load_profile("badbind", [toml]))
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_zfarm_up_runs_a_local_profile_until_ctrl_c(procs: Procs, tmp_path: Path) -> None:
    endpoint = ipc_endpoint(tmp_path, "up")
    (tmp_path / "zfarm.toml").write_text(f'[profiles.here]\nlauncher = "local"\nn_workers = 2\n'
                                         f'bind = "{endpoint}"\n')
    up = procs.spawn("up", "here", "--refresh", "0.5", name="up")  # runs in tmp_path
    out = up.wait_for_log("running 2,", 60)
    assert f'zfarm.Client("{endpoint}")' in out, out
    with zfarm.Client(endpoint) as client:
        assert sum(client.map(abs, range(-10, 0))) == 55
    pids = [w["pid"] for w in require_status(endpoint)["workers"]]
    up.signal(signal.SIGINT)
    assert up.wait(60) == 0, up.log_tail()
    for pid in pids:
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 10, message=f"worker {pid} gone")


def test_client_profile_starts_and_stops_the_profile_cluster(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "zfarm.toml").write_text('[profiles.two]\nlauncher = "local"\nn_workers = 1\n')
    monkeypatch.chdir(tmp_path)
    with zfarm.Client(profile="two") as client:
        assert list(client.map(abs, [-1, -2])) == [1, 2]
        cluster = client._res.cluster
        assert cluster is not None and cluster.kind == "local"
    assert cluster.status()["launched"] == 0


def test_an_adaptive_profile_starts_at_its_minimum_not_at_every_core(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "zfarm.toml").write_text('[profiles.grow]\nlauncher = "local"\n'
                                         'adapt = { minimum = 0, maximum = 2 }\n')
    monkeypatch.chdir(tmp_path)
    cluster = build_cluster(load_profile("grow"))
    try:
        status = cluster.status()
        assert (status["requested"], status["launched"]) == (0, 0), status  # nothing queued: nothing started
    finally:
        cluster.close()


def test_a_worker_drains_at_its_drain_time_and_hands_back_its_queue(procs: Procs) -> None:
    """What a Slurm worker does before its walltime (ZFARM_DRAIN_AT), on a plain worker."""
    endpoint, _ = procs.farm(workers=0)
    with zfarm.Client(endpoint) as client:
        futures = [client.submit(jobs.sleep_then, i, 0.5) for i in range(6)]
        worker = procs.spawn("worker", "--connect", endpoint, "--procs", "1", "--prefetch", "3",
                             "--log-level", "info", env=zfarm_env({"ZFARM_DRAIN_AT": str(time.time() + 1.5)}))
        worker.wait_for_log("draining", 30)
        assert worker.wait(30) == 0
        log = worker.log()
        assert "handed back" in log and "stopped: " in log, log
        procs.worker(endpoint)
        assert [f.result(timeout=60) for f in futures] == list(range(6))


def _brokers_of_this_process() -> set[int]:
    return {pid for pid in family([os.getpid()]) if " broker " in cmdline(pid)}


@pytest.mark.parametrize("launcher", ["ssh", "slurm"])
def test_a_cluster_that_fails_after_its_broker_started_leaves_no_broker_and_no_folder(
        launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two worker keys (ssh: which one would the workers use?), a shared_dir that is a file (Slurm)."""
    keys = tmp_path / "keys"
    init_keys(keys)
    add_key(keys, "second", "worker")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the cluster's folder goes
    bin_dir = tmp_path / "bin"  # SlurmCluster looks for sbatch on PATH; this one is never run
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "a-file").write_text("")
    before = _brokers_of_this_process()
    with pytest.raises((SecurityError, OSError)):
        if launcher == "ssh":
            zfarm.SSHCluster(["nohost"], keys=str(keys))
        else:
            zfarm.SlurmCluster(shared_dir=str(tmp_path / "a-file"), bind=ipc_endpoint(tmp_path))
    left = _brokers_of_this_process() - before
    kill_pids(left)
    assert not left, [describe_pid(pid) for pid in left]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_cluster_sweeps_the_folder_a_killed_cluster_left(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from zfarm import scratch

    ended = subprocess.Popen(["true"])
    ended.wait()  # a process that is gone: a cluster SIGKILLed before it could clean up
    stale = tmp_path / f"zfarm-local-{scratch.host_stem()}-{ended.pid}-a1b2"
    stale.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with zfarm.LocalCluster(0) as cluster:
        assert not stale.exists()
        assert cluster._tmpdir.startswith(str(tmp_path / f"zfarm-local-{scratch.host_stem()}-{os.getpid()}-"))
    assert list(tmp_path.iterdir()) == []
