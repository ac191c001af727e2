"""Hosts for the tests: Linux network namespaces on a private bridge, each with its own address.

::

    root namespace: bridge zfbNNNN 10.R.S.1/24 (the broker listens here)
        ├── veth ── namespace zfNNNNh0: eth0 10.R.S.10   (a "host": workers, an sshd)
        └── veth ── namespace zfNNNNh1: eth0 10.R.S.11

Nothing routes beyond the bridge: traffic stays on this machine. ``cut``/``restore`` take a
host's link down and up (``ip link set ... down``), as a pulled cable would. Needs root.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def unavailable() -> str:
    """Why namespaces cannot be made here ('' if they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return ""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    name: str  # the namespace
    address: str  # its eth0 address
    link: str  # the veth end in the root namespace (cut it to pull the cable)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        ip("link", "set", self.link, "down")

    def restore(self) -> None:
        ip("link", "set", self.link, "up")

    def pids(self) -> set[int]:
        """Processes whose network namespace is this host's."""
        try:
            inode = os.stat(f"/run/netns/{self.name}").st_ino
        except OSError:
            return set()
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.stat(entry / "ns" / "net").st_ino == inode:
                        found.add(int(entry.name))
                except OSError:
                    continue
        return found


class Network:
    """A bridge and ``count`` namespaces on it; :meth:`close` removes them all."""

    def __init__(self, count: int) -> None:
        tag = f"{os.getpid() % 10000:04d}{random.randrange(100):02d}"
        self.bridge = f"zfb{tag}"
        subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.gateway = f"{subnet}.1"
        self.hosts: list[Host] = []
        ip("link", "add", self.bridge, "type", "bridge")
        try:
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i in range(count):
                self._add_host(f"zf{tag}h{i}", f"{subnet}.{10 + i}", f"zv{tag}{i}")
        except BaseException:
            self.close()
            raise

    def _add_host(self, name: str, address: str, link: str) -> None:
        ip("netns", "add", name)
        self.hosts.append(Host(name, address, link))
        ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
        ip("link", "set", f"{link}p", "netns", name)
        ip("-n", name, "link", "set", f"{link}p", "name", "eth0")
        ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("link", "set", link, "master", self.bridge)
        ip("link", "set", link, "up")

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.link], capture_output=True, timeout=30, check=False)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30, check=False)


SSHD_CONFIG = """\
ListenAddress {address}
Port 22
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""


def keygen(path: Path) -> str:
    """An ed25519 keypair at ``path``; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   capture_output=True, timeout=30)
    return path.with_suffix(".pub").read_text().strip()


def sshd_setup(host: Host, folder: Path, user_public_key: str) -> tuple[list[str], str]:
    """Files for an sshd on ``host``: returns its command line and its known_hosts line."""
    folder.mkdir(parents=True, exist_ok=True)
    host_public = keygen(folder / "host_key")
    (folder / "authorized_keys").write_text(user_public_key + "\n")
    (folder / "sshd_config").write_text(SSHD_CONFIG.format(address=host.address, folder=folder))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    argv = host.command([sshd, "-D", "-e", "-f", str(folder / "sshd_config")])
    return argv, f"{host.address} {' '.join(host_public.split()[:2])}"
