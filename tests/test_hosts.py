"""Several hosts for real: network namespaces on a bridge (tests/netns.py), sshd in them.

A worker's cable is pulled mid-map and put back; an SSHCluster reaches real sshds; ``zfarm up``
of an ssh profile stops everything it started on Ctrl-C. Root only: elsewhere they skip.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import zfarm
from tests import jobs
from tests.helpers import (
    Procs,
    cmdline,
    free_tcp_endpoint,
    process_table,
    require_status,
    wait_for,
    zfarm_env,
)
from tests.netns import Host, Network, keygen, sshd_setup, unavailable

pytestmark = pytest.mark.skipif(bool(unavailable()), reason=unavailable() or "ok")


@pytest.fixture
def network() -> Iterator[Network]:
    try:
        net = Network(2)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot make network namespaces here: {exc}")
    yield net
    net.close()


def port_on(address: str) -> str:
    return f"tcp://{address}:{free_tcp_endpoint().rsplit(':', 1)[1]}"


@pytest.mark.slow
def test_a_cut_link_moves_jobs_elsewhere_once_and_the_worker_rejoins(procs: Procs, network: Network) -> None:
    endpoint = port_on(network.gateway)
    broker = procs.spawn("broker", "--bind", endpoint, "--insecure", "--heartbeat-interval", "0.5",
                         "--log-level", "info")
    broker.wait_for_log("listening on", 30)
    cut, kept = network.hosts
    for host, name in ((cut, "cut"), (kept, "kept")):
        procs.spawn("worker", "--connect", endpoint, "--procs", "2", "--worker-id", name,
                    "--heartbeat-interval", "0.5", "--log-level", "info", name=f"worker-{name}",
                    command=host.command([sys.executable, "-m", "zfarm"]))
    wait_for(lambda: len(require_status(endpoint)["workers"]) == 2, 30, interval_s=0.2)
    with zfarm.Client(endpoint, connect_timeout_s=30) as client:
        results = client.map(jobs.sleep_then, range(60), [0.1] * 60, timeout=120)
        assert next(results) == 0
        cut.cut()
        try:
            wait_for(lambda: [w["id"] for w in require_status(endpoint)["workers"]] == ["kept"], 30,
                     interval_s=0.2, message="the broker lost the cut worker")
            assert list(results) == list(range(1, 60))  # each result once, in order
        finally:
            cut.restore()
        wait_for(lambda: len(require_status(endpoint)["workers"]) == 2, 60, interval_s=0.2,
                 message="the cut worker rejoined")
        before = len(client.stats().records)
        assert list(client.map(jobs.sleep_then, range(20), [0.2] * 20, timeout=120)) == list(range(20))
        workers = {r.worker for r in client.stats().records[before:]}
        assert "cut" in workers, workers
        assert client.duplicates_dropped == 0


@pytest.fixture
def ssh_hosts(procs: Procs, network: Network, tmp_path: Path) -> Iterator[tuple[Network, Path]]:
    """An sshd in each namespace; returns the network and an ssh config naming them zfh0, zfh1."""
    if shutil.which("ssh") is None or not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        pytest.skip("needs openssh-client and openssh-server")
    user_key = tmp_path / "user_key"
    user_public = keygen(user_key)
    known, config = [], []
    for i, host in enumerate(network.hosts):
        argv, known_line = sshd_setup(host, tmp_path / f"sshd{i}", user_public)
        known.append(known_line)
        procs.spawn(name=f"sshd{i}", command=argv).wait_for_log("Server listening", 30)
        config.append(f"Host zfh{i}\n  HostName {host.address}\n  User root\n")
    (tmp_path / "known_hosts").write_text("\n".join(known) + "\n")
    config.append(f"Host *\n  IdentityFile {user_key}\n  IdentitiesOnly yes\n"
                  f"  UserKnownHostsFile {tmp_path}/known_hosts\n  StrictHostKeyChecking yes\n")
    (tmp_path / "ssh_config").write_text("".join(config))
    yield network, tmp_path / "ssh_config"


def left_on(host: Host, procs: Procs) -> set[int]:
    """Processes on ``host`` besides the sshd the test started there."""
    return host.pids() - {p.pid for p in procs.started}


@pytest.mark.slow
def test_ssh_cluster_runs_workers_on_two_hosts_and_leaves_none(
        procs: Procs, ssh_hosts: tuple[Network, Path], caplog: pytest.LogCaptureFixture) -> None:
    network, ssh_config = ssh_hosts
    caplog.set_level("INFO", logger="zfarm.cluster")
    with zfarm.SSHCluster(["zfh0", "zfh1"], procs_per_worker=2, python=sys.executable,
                          ssh_options=["-F", str(ssh_config)], bind=port_on(network.gateway),
                          log_level="info", tags={"far"}) as cluster:
        assert cluster.keys  # made for it: the workers' key went over ssh
        cluster.wait_for_workers(2)
        assert [w["tags"] for w in cluster.status()["broker"]["workers"]] == [["far"], ["far"]]
        with zfarm.Client(cluster) as client:
            assert sum(client.map(abs, range(-1000, 0))) == 500500
        secret = (Path(cluster.keys) / "workers" / "worker.key_secret").read_text()
        secret_z85 = re.search(r'secret-key = "(.+)"', secret)
        assert secret_z85 is not None
        for host in network.hosts:
            cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left_on(host, procs)]
            assert cmdlines and not any(secret_z85.group(1).encode() in c for c in cmdlines)
    for host in network.hosts:
        wait_for(lambda host=host: not left_on(host, procs), 30, interval_s=0.2,
                 message=f"nothing left on {host.name}")
    assert any(re.match(r"zfh[01]: .*worker ssh-zfh[01]-[01]\.1 registered", r.getMessage())
               for r in caplog.records), "remote output is logged with its host"


@pytest.mark.slow
def test_an_unreachable_host_is_retried_and_the_others_work(ssh_hosts: tuple[Network, Path]) -> None:
    network, ssh_config = ssh_hosts
    with ssh_config.open("a") as f:
        f.write(f"Host down\n  HostName {network.gateway.rsplit('.', 1)[0]}.99\n  ConnectTimeout 2\n")
    with zfarm.SSHCluster(["zfh0", "down"], procs_per_worker=1, python=sys.executable,
                          ssh_options=["-F", str(ssh_config)], bind=port_on(network.gateway)) as cluster:
        cluster.wait_for_workers(1)
        with zfarm.Client(cluster) as client:
            assert list(client.map(abs, [-1, -2, -3])) == [1, 2, 3]

        def down_was_retried() -> bool:
            down = next(w for w in cluster.workers if w["where"] == "down")
            return down["launches"] >= 2 and "ssh to down failed" in down["last_exit"]

        wait_for(down_was_retried, 60, interval_s=0.2, message="the unreachable host retried")


@pytest.mark.slow
def test_zfarm_up_of_an_ssh_profile_stops_everything_on_ctrl_c(
        procs: Procs, ssh_hosts: tuple[Network, Path], tmp_path: Path) -> None:
    network, ssh_config = ssh_hosts
    (tmp_path / "zfarm.toml").write_text(
        f'[profiles.lab]\nlauncher = "ssh"\nhosts = ["zfh0", "zfh1"]\nprocs_per_worker = 1\n'
        f'python = "{sys.executable}"\nssh_options = ["-F", "{ssh_config}"]\n'
        f'bind = "{port_on(network.gateway)}"\n')
    up = procs.spawn("up", "lab", "--refresh", "0.5", name="up")
    out = up.wait_for_log("running 2,", 60)
    found = re.search(r"ZFARM_ADDRESS=(\S+) ZFARM_KEYS=(\S+?)\)", out)
    assert found, out
    with zfarm.Client(found.group(1), keys=found.group(2)) as client:
        assert sum(client.map(abs, range(-100, 0))) == 5050
    assert all(left_on(host, procs) for host in network.hosts)
    up.signal(signal.SIGINT)
    assert up.wait(60) == 0, up.log_tail()
    for host in network.hosts:
        assert not left_on(host, procs), f"left on {host.name}"


@pytest.mark.slow
def test_a_killed_launcher_leaves_nothing_on_its_hosts(procs: Procs, ssh_hosts: tuple[Network, Path],
                                                       tmp_path: Path) -> None:
    network, ssh_config = ssh_hosts
    (tmp_path / "zfarm.toml").write_text(
        f'[profiles.lab]\nlauncher = "ssh"\nhosts = ["zfh0", "zfh1"]\nprocs_per_worker = 1\n'
        f'python = "{sys.executable}"\nssh_options = ["-F", "{ssh_config}"]\n'
        f'bind = "{port_on(network.gateway)}"\n')
    # its private folder (keys included), which a killed launcher cannot remove, under tmp_path
    up = procs.spawn("up", "lab", "--refresh", "0.5", name="up", env=zfarm_env({"TMPDIR": str(tmp_path)}))
    up.wait_for_log("running 2,", 60)
    assert all(left_on(host, procs) for host in network.hosts)
    up.signal(signal.SIGKILL)  # no goodbye: the ssh processes' standard input closes with it
    for host in network.hosts:
        wait_for(lambda host=host: not left_on(host, procs), 30, interval_s=0.2,
                 message=f"nothing left on {host.name}")

    def local_ssh() -> set[int]:
        return {p.pid for p in process_table() if p.live and str(ssh_config) in cmdline(p.pid)}

    wait_for(lambda: not local_ssh(), 30, interval_s=0.2, message="its ssh processes gone here too")
