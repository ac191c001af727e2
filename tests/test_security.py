"""Security tests with real processes: keys on disk, CURVE, allow-lists per role, hostile peers.

::

    keys/ (init_keys) ──--keys──► zfarm broker (CURVE, ZAP allow-lists) ◄──--keys── zfarm worker
                                     ▲            ▲             ▲
        zfarm.Client(keys=...) ──────┘            │             └──── zfarm status --keys
        raw DEALERs (no CURVE, unlisted keys, hand-built SUBMITs, 10,000 malformed messages)

Peers that must be kept out get keys folders assembled by hand: another folder's keys, or a
client's keypair copied into ``workers/`` (and the reverse), always next to the right or the wrong
``broker.key``. Brokers listen on loopback ports chosen at run time; the one exception, a broker
bound to 0.0.0.0 to test the safe defaults, is stopped as soon as it listens and nothing connects to it.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack
import pytest
import zmq
from zmq.utils import monitor as zmq_monitor

import zfarm
from tests import jobs
from tests.helpers import (
    ZFARM_COMMAND,
    Proc,
    Procs,
    free_tcp_endpoint,
    recv_message,
    run_zfarm,
    wait_for,
    wait_for_worker_pids,
    zfarm_env,
)
from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.monitor import fetch_status
from zfarm.security import PeerKeys, SecurityError, init_keys

HEARTBEAT_S = 0.2
FAST = ("--heartbeat-interval", str(HEARTBEAT_S), "--liveness", "3")
#: how long a peer that must be kept out waits before giving up
REFUSED_CONNECT_S = 1.0
#: slack on top of a deadline for process start-up and a loaded machine
SLACK_S = 8.0
RESULT_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 60.0
#: a process that cannot use its keys must say so and exit within this time
STARTUP_FAILURE_S = 20.0


# ---- helpers --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_keys_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests say which keys each peer uses; an inherited ZFARM_KEYS would blur that."""
    for name in ("ZFARM_KEYS", "ZFARM_KEY_NAME", "ZFARM_ADDRESS", "ZFARM_BIND", "ZFARM_INSECURE"):
        monkeypatch.delenv(name, raising=False)


def flat(text: str) -> str:
    """Text with every run of whitespace made one space: rich wraps log lines to the terminal width."""
    return " ".join(text.split())


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def peer_folder(root: Path, role: str, secret_file: Path, broker_key: Path) -> Path:
    """A keys folder as a worker or client machine holds it: ``broker.key`` and one keypair of ``role``."""
    sub = {"worker": "workers", "client": "clients"}[role]
    (root / sub).mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    shutil.copy(broker_key, root / "broker.key")
    target = root / sub / secret_file.name
    shutil.copy(secret_file, target)
    target.chmod(0o600)
    return root


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A keys folder made by ``init_keys``: the broker's keypair, a worker and a client key."""
    folder = tmp_path / "keys"
    init_keys(folder)
    return folder


def curve_farm(procs: Procs, keys: Path, n_workers: int = 1) -> tuple[Proc, str, list[Proc]]:
    """A CURVE broker on a fresh loopback port and ``n_workers`` workers, registered."""
    broker, endpoint = procs.broker(None, *FAST, "--keys", str(keys))
    workers = [procs.worker(endpoint, "--keys", str(keys)) for _ in range(n_workers)]
    wait_for_worker_pids(lambda: snapshot(endpoint, keys), [w.pid for w in workers])
    return broker, endpoint, workers


def snapshot(endpoint: str, keys: Path | None, timeout_s: float = 5.0) -> dict[str, Any]:
    return fetch_status(endpoint, timeout_s, keys=str(keys) if keys else "")


def curve_dealer(ctx: zmq.Context[Any], endpoint: str, keys: PeerKeys | None) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    return sock


def connect_watched(sock: zmq.Socket[Any], endpoint: str) -> zmq.Socket[Any]:
    """Connect ``sock`` and return a monitor socket that reports its handshake events."""
    wanted = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    monitor = sock.get_monitor_socket(wanted)
    sock.connect(endpoint)
    return monitor


def first_handshake_event(sock: zmq.Socket[Any], monitor: zmq.Socket[Any], timeout_s: float = 10.0) -> int:
    """The first handshake event (succeeded or one of the failures); closes the monitor."""
    try:
        assert monitor.poll(int(timeout_s * 1000)), "no handshake event within the deadline"
        return int(zmq_monitor.recv_monitor_message(monitor)["event"])
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def expect_broker_unavailable(make_client: Callable[[], zfarm.Client]) -> zfarm.BrokerUnavailable:
    """``make_client()`` must raise BrokerUnavailable within its connect timeout (plus slack)."""
    started = time.monotonic()
    with pytest.raises(zfarm.BrokerUnavailable) as info:
        client = make_client()
        client.shutdown()  # only reached if it wrongly connected
    elapsed_s = time.monotonic() - started
    assert elapsed_s < REFUSED_CONNECT_S + SLACK_S, f"gave up after {elapsed_s:.1f} s"
    return info.value


def assert_good_client_runs(endpoint: str, keys: Path, n: int = 20) -> None:
    with zfarm.Client(endpoint, keys=str(keys), connect_timeout_s=20) as client:
        values = list(client.map(jobs.square, range(n), timeout=RESULT_TIMEOUT_S, chunksize=1))
    assert values == [x * x for x in range(n)]


# ---- 1. zfarm keys init / add -------------------------------------------------------------------


def test_keys_init_creates_private_folder_and_refuses_to_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    # A permissive umask must not leak into the modes of the keys.
    result = subprocess.run([*ZFARM_COMMAND, "keys", "init", str(folder)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, env=zfarm_env(), timeout=CLI_TIMEOUT_S, umask=0)
    assert result.returncode == 0, result.stderr
    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
    assert files == ["broker.key", "broker.key_secret", "clients/client.key", "clients/client.key_secret",
                     "workers/worker.key", "workers/worker.key_secret"]
    for directory in (folder, folder / "workers", folder / "clients"):
        assert mode_of(directory) == 0o700, f"{directory}: {oct(mode_of(directory))}"
    for secret in folder.rglob("*.key_secret"):
        assert mode_of(secret) == 0o600, f"{secret}: {oct(mode_of(secret))}"
    broker_secret = (folder / "broker.key_secret").read_bytes()

    again = run_zfarm("keys", "init", str(folder))
    assert again.returncode != 0
    assert "already holds keys" in again.stderr, again.stderr
    assert (folder / "broker.key_secret").read_bytes() == broker_secret, "keys init overwrote the broker key"

    added = run_zfarm("keys", "add", str(folder), "laptop", "--role", "client")
    assert added.returncode == 0, added.stderr
    assert (folder / "clients" / "laptop.key").exists()
    assert mode_of(folder / "clients" / "laptop.key_secret") == 0o600
    assert not (folder / "workers" / "laptop.key").exists()
    assert "restart the broker" in added.stderr, added.stderr
    duplicate = run_zfarm("keys", "add", str(folder), "laptop", "--role", "client")
    assert duplicate.returncode != 0
    assert "exists already" in duplicate.stderr, duplicate.stderr


def test_a_keys_folder_that_does_not_exist_is_named_as_such(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-keys"
    added = run_zfarm("keys", "add", str(missing), "laptop", "--role", "client")
    assert added.returncode == 2 and "does not exist" in added.stderr, added.stderr
    assert not missing.exists()  # no half-made folder holding one key
    status = run_zfarm("status", "--connect", "tcp://127.0.0.1:5999", "--keys", str(missing))
    assert status.returncode == 2 and "keys folder" in status.stderr and "does not exist" in status.stderr, \
        status.stderr


# ---- 2. unsafe secret key files ---------------------------------------------------------------------


def test_readable_worker_secret_key_is_refused(procs: Procs, keys: Path) -> None:
    secret = keys / "workers" / "worker.key_secret"
    secret.chmod(0o644)
    worker = procs.worker(free_tcp_endpoint(), "--keys", str(keys))
    assert worker.wait(STARTUP_FAILURE_S) == 1, worker.log()
    assert str(secret) in worker.log(), worker.log()
    assert f"chmod 600 {secret}" in worker.log(), worker.log()


def test_readable_broker_secret_key_is_refused(procs: Procs, keys: Path) -> None:
    secret = keys / "broker.key_secret"
    secret.chmod(0o640)  # readable by the group is enough to refuse
    broker = procs.spawn("broker", "--bind", free_tcp_endpoint(), "--keys", str(keys))
    assert broker.wait(STARTUP_FAILURE_S) == 1, broker.log()
    assert f"chmod 600 {secret}" in broker.log(), broker.log()


def test_readable_client_secret_key_raises_security_error(keys: Path) -> None:
    secret = keys / "clients" / "client.key_secret"
    secret.chmod(0o604)
    with pytest.raises(SecurityError) as info:
        client = zfarm.Client(free_tcp_endpoint(), keys=str(keys), connect_timeout_s=1)
        client.shutdown()
    assert isinstance(info.value, zfarm.ZfarmError)
    assert str(secret) in str(info.value)
    assert f"chmod 600 {secret}" in str(info.value)
    del info
    gc.collect()  # a context or socket the failed Client left open warns here (warnings are errors)


# ---- 3. who gets in -------------------------------------------------------------------------------


def test_a_worker_the_broker_will_not_let_in_says_why(procs: Procs, tmp_path: Path, keys: Path) -> None:
    other = tmp_path / "other"
    init_keys(other)
    _, endpoint, _ = curve_farm(procs, keys)
    unlisted = peer_folder(tmp_path / "unlisted", "worker", other / "workers" / "worker.key_secret",
                           keys / "broker.key")
    stranger = procs.worker(endpoint, "--keys", str(unlisted))
    stranger.wait_for_log("not on the broker's worker list", 20)
    keyless = procs.worker(endpoint)
    keyless.wait_for_log("this worker has none", 20)
    assert len(snapshot(endpoint, keys)["workers"]) == 1  # neither got in
    assert stranger.alive() and keyless.alive()  # they keep trying: the keys may be added


def test_only_clients_with_listed_keys_and_the_right_broker_key_connect(procs: Procs, tmp_path: Path,
                                                                        keys: Path) -> None:
    other = tmp_path / "other"
    init_keys(other)
    _, endpoint, _ = curve_farm(procs, keys)
    assert_good_client_runs(endpoint, keys)

    error = expect_broker_unavailable(
        lambda: zfarm.Client(endpoint, connect_timeout_s=REFUSED_CONNECT_S))
    assert "requires keys" in error.detail, error
    started = time.monotonic()  # a refused handshake is final: no waiting out a long connect timeout
    with pytest.raises(zfarm.BrokerUnavailable, match="requires keys"):
        zfarm.Client(endpoint, connect_timeout_s=60)
    assert time.monotonic() - started < 20

    unlisted = peer_folder(tmp_path / "unlisted", "client", other / "clients" / "client.key_secret",
                           keys / "broker.key")
    error = expect_broker_unavailable(
        lambda: zfarm.Client(endpoint, keys=str(unlisted), connect_timeout_s=REFUSED_CONNECT_S))
    assert "not on the broker's client list" in error.detail, error

    wrong_server = peer_folder(tmp_path / "wrong-server", "client", keys / "clients" / "client.key_secret",
                               other / "broker.key")
    error = expect_broker_unavailable(
        lambda: zfarm.Client(endpoint, keys=str(wrong_server), connect_timeout_s=REFUSED_CONNECT_S))
    assert "broker.key" in error.detail, error

    assert_good_client_runs(endpoint, keys)
    snap = snapshot(endpoint, keys)
    assert snap["done"] == 40, snap
    assert snap["clients"] == [], "refused clients must never be registered"


# ---- 4. keys are bound to roles ---------------------------------------------------------------------


def test_client_key_cannot_register_a_worker(procs: Procs, tmp_path: Path, keys: Path) -> None:
    broker, endpoint = procs.broker(None, *FAST, "--keys", str(keys))
    impostor_keys = peer_folder(tmp_path / "impostor", "worker", keys / "clients" / "client.key_secret",
                                keys / "broker.key")
    client = zfarm.Client(endpoint, keys=str(keys), connect_timeout_s=20)
    try:
        future = client.submit(jobs.square, 12)
        wait_for(lambda: snapshot(endpoint, keys)["queued"] == 1, 20.0, message="the job queued")

        impostor = procs.worker(endpoint, "--keys", str(impostor_keys), "--worker-id", "impostor")
        assert impostor.wait(CLI_TIMEOUT_S) == 1, impostor.log()
        assert "refused this worker" in flat(impostor.log()), impostor.log()
        assert "may not connect as a worker" in flat(broker.log()), broker.log()
        snap = snapshot(endpoint, keys)
        assert snap["workers"] == [], snap["workers"]
        assert (snap["queued"], snap["in_flight"], snap["done"]) == (1, 0, 0), snap
        assert not future.done()

        real = procs.worker(endpoint, "--keys", str(keys))
        assert future.result(timeout=RESULT_TIMEOUT_S) == 144
    finally:
        client.shutdown(cancel_futures=True)
    snap = snapshot(endpoint, keys)
    assert [w["pid"] for w in snap["workers"]] == [real.pid]
    assert "worker impostor joined" not in flat(broker.log()), broker.log()


def test_worker_key_cannot_submit_jobs(procs: Procs, tmp_path: Path, keys: Path) -> None:
    broker, endpoint, _ = curve_farm(procs, keys)
    impostor_keys = peer_folder(tmp_path / "impostor", "client", keys / "workers" / "worker.key_secret",
                                keys / "broker.key")
    marker = tmp_path / "ran"
    with pytest.raises((zfarm.Refused, zfarm.BrokerUnavailable)) as info:
        client = zfarm.Client(endpoint, keys=str(impostor_keys), connect_timeout_s=REFUSED_CONNECT_S)
        try:
            client.submit(jobs.touch_and_hold, marker, marker, 1).result(timeout=RESULT_TIMEOUT_S)
        finally:
            client.shutdown()
    assert "may not connect as a client" in str(info.value), info.value
    assert "may not connect as a client" in flat(broker.log()), broker.log()
    snap = snapshot(endpoint, keys)
    assert (snap["done"], snap["queued"], snap["in_flight"], snap["clients"]) == (0, 0, 0, []), snap
    assert not marker.exists()


# ---- 5. a hostile pickle from an unauthenticated peer -----------------------------------------------


def planting_submit(marker: Path) -> list[bytes]:
    """HELLO + SUBMIT frames of a client whose one job creates ``marker`` on the worker."""
    path = str(marker)

    def plant() -> None:
        import pathlib

        pathlib.Path(path).touch()

    blob = cloudpickle.dumps(plant)
    fn_id = b"hostile-fn-0001"
    call = ser.dump_call((), {})
    hello = p.Hello(p.Role.CLIENT.value, f"c-attacker-{marker.name}", "attacker", 666, 0, {})
    submit = p.Submit(fn_id, True, [[1, len(call), {}]], [blob, *call])
    return [*p.encode(hello), b"\0SPLIT\0", *p.encode(submit)]


def send_messages(sock: zmq.Socket[Any], frames: list[bytes]) -> None:
    split = frames.index(b"\0SPLIT\0")
    sock.send_multipart(frames[:split])
    sock.send_multipart(frames[split + 1 :])


def test_pickle_from_unauthenticated_peer_never_runs(procs: Procs, ctx: zmq.Context[Any],
                                                     tmp_path: Path, keys: Path) -> None:
    broker, endpoint, _ = curve_farm(procs, keys)
    server_key = PeerKeys.load(str(keys), "client").server

    # No CURVE at all: the handshake fails, nothing reaches the broker.
    plain_marker = tmp_path / "pwned-plain"
    plain = curve_dealer(ctx, endpoint, None)
    # A random keypair that the broker's lists do not hold: refused by ZAP.
    stranger_marker = tmp_path / "pwned-stranger"
    public, secret = zmq.curve_keypair()
    stranger = curve_dealer(ctx, endpoint, PeerKeys(public, secret, server_key))
    try:
        plain_monitor = connect_watched(plain, endpoint)
        stranger_monitor = connect_watched(stranger, endpoint)
        send_messages(plain, planting_submit(plain_marker))  # queued, sent if the handshake succeeds
        send_messages(stranger, planting_submit(stranger_marker))
        assert first_handshake_event(plain, plain_monitor) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert first_handshake_event(stranger, stranger_monitor) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        broker.wait_for_log("allow-list")  # rich may wrap the line before it

        assert_good_client_runs(endpoint, keys, n=10)  # the farm works: its one slot ran these
    finally:
        plain.close()
        stranger.close()
    snap = snapshot(endpoint, keys)
    assert (snap["done"], snap["queued"], snap["in_flight"]) == (10, 0, 0), snap
    assert not plain_marker.exists(), "a peer without keys ran code on a worker"
    assert not stranger_marker.exists(), "a peer with an unlisted key ran code on a worker"

    # Control: the very same frames from a listed client key do run, so the messages above were good.
    control_marker = tmp_path / "planted-by-listed-client"
    listed = curve_dealer(ctx, endpoint, PeerKeys.load(str(keys), "client"))
    try:
        listed_monitor = connect_watched(listed, endpoint)
        send_messages(listed, planting_submit(control_marker))
        assert first_handshake_event(listed, listed_monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        wait_for(control_marker.exists, RESULT_TIMEOUT_S, message="the listed client's job ran")
        listed.send_multipart(p.encode(p.Disconnect("done")))
    finally:
        listed.close()
    assert not plain_marker.exists() and not stranger_marker.exists()


# ---- 6. hostile input at volume ---------------------------------------------------------------------

FLOOD_SIZE = 10_000
FLOOD_JOB_DEADLINE_S = 1.0
RSS_GROWTH_LIMIT_KB = 5 * 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def packb(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def cmd(command: p.Command) -> bytes:
    return bytes([command])


class Flood:
    """Builds malformed and hostile messages and knows how many the broker must count as malformed."""

    def __init__(self, rng: random.Random, client_id: str) -> None:
        self.rng = rng
        self.client_id = client_id
        self.malformed = 0
        self.forged = 0

    def random_bytes(self) -> list[bytes]:
        frames = [self.rng.randbytes(self.rng.randrange(0, 64)) for _ in range(self.rng.randrange(1, 6))]
        if frames[0][:2] == p.MAGIC:
            frames[0] = b"XX" + frames[0][2:]
        self.malformed += 1
        return frames

    def structured(self) -> list[bytes]:
        """A message with a zfarm header that fails validation (counted malformed by whoever sends it)."""
        rng = self.rng
        good = packb(b"fn", False, [[1, 0, {}]])
        choices: list[list[bytes]] = [
            [p.HEADER, bytes([rng.choice([0, 16, 99, 255])]), packb()],
            [p.HEADER, b"\x0b\x0b", good],
            [p.HEADER, cmd(p.Command.SUBMIT), good[: rng.randrange(1, len(good))]],
            [p.HEADER, cmd(p.Command.CANCEL), msgpack.packb({"seqs": [1]})],
            [p.HEADER, cmd(p.Command.CANCEL), packb("not a list")],
            [p.HEADER, cmd(p.Command.SUBMIT), packb(b"fn", True, [[1, 5, {}]]), b"fn"],
            [p.HEADER, cmd(p.Command.SUBMIT), packb(b"fn", False, [[1, -1, {}]])],
            [p.HEADER, cmd(p.Command.RESULTS), packb(1, [["c", 1, 1, 0, 2**40, ""]])],
            [p.HEADER, cmd(p.Command.READY), packb(True)],
            [p.HEADER, cmd(p.Command.HEARTBEAT), packb(), b"payload"],
            [p.HEADER, cmd(p.Command.HELLO), b"\xdd\xff\xff\xff\xff"],  # array of 4 G elements, no data
            [p.HEADER, cmd(p.Command.HELLO), b"\x91" * 2000 + b"\xc0"],  # nested 2000 deep
            [p.HEADER, cmd(p.Command.HELLO), packb("worker", "w", "h", 1, 1, {1: 2})],  # int map key
            [p.HEADER, cmd(p.Command.STATUS), b"\xc1" + rng.randbytes(rng.randrange(0, 40))],  # never msgpack
        ]
        self.malformed += 1
        return rng.choice(choices)

    def bad_hello(self) -> list[bytes]:
        """A well-formed HELLO the broker must refuse (answered with REFUSED, not counted malformed)."""
        role, peer_id, slots = self.rng.choice([
            ("admin", "a-1", 0), ("worker", "", 1), ("worker", "w-zero", 0), ("worker", "w-neg", -5),
            ("client", "c-" + "x" * 500, 0), ("worker", "w-huge", 10**9),
        ])
        return p.encode(p.Hello(role, peer_id, "attacker", 1, slots, {}))

    def forged_results(self) -> list[bytes]:
        """RESULTS from a worker for jobs it was never given: the good client's past and future seqs."""
        seq = self.rng.randrange(1, 60)
        forged = ser.dumps("forged result")
        row = [self.client_id, seq, 1, int(p.Outcome.OK), len(forged), ""]
        self.forged += 1
        return p.encode(p.Results(0, [row], forged))


def hello_frames(role: p.Role, peer_id: str, slots: int = 0) -> list[bytes]:
    return p.encode(p.Hello(role.value, peer_id, "attacker", 4242, slots, {}))


def build_flood(rng: random.Random, client_id: str,
                size: int = FLOOD_SIZE) -> tuple[list[tuple[str, list[bytes]]], Flood]:
    """(sender, frames) pairs; senders: anon (never says HELLO), worker, client, monitor (registered)."""
    flood = Flood(rng, client_id)
    out: list[tuple[str, list[bytes]]] = []
    for i in range(size):
        kind = i % 10
        if kind in (0, 1):
            out.append((rng.choice(["anon", "worker", "client", "monitor"]), flood.random_bytes()))
        elif kind in (2, 3):
            out.append((rng.choice(["anon", "worker", "client", "monitor"]), flood.structured()))
        elif kind == 4:
            out.append(("anon", flood.bad_hello()))
        elif kind == 5:  # heartbeats and READY from a peer the broker does not know: told to reconnect
            out.append(("anon", p.encode(rng.choice([p.Heartbeat(), p.Ready(1000)]))))
        elif kind == 6:  # READY again and again from a registered worker
            out.append(("worker", p.encode(p.Ready(1))))
        elif kind == 7:
            out.append(("worker", flood.forged_results()))
        elif kind == 8:  # commands the sender's role may not send
            sender, msg = rng.choice([
                ("client", p.Ready(1)), ("client", p.Results(0, [], [])), ("worker", p.Cancel([1])),
                ("worker", p.Submit(b"fn", False, [], [])), ("monitor", p.Submit(b"fn", False, [], [])),
                ("monitor", p.Ready(3)),
            ])
            flood.malformed += 1
            out.append((sender, p.encode(msg)))
        else:  # harmless but pointless: cancel jobs that do not exist
            out.append(("client", p.encode(p.Cancel([rng.randrange(10**6) for _ in range(20)]))))
    return out, flood


def open_senders(ctx: zmq.Context[Any], endpoint: str, tag: str) -> dict[str, zmq.Socket[Any]]:
    """Raw DEALERs: "anon" never says HELLO; "worker", "client" and "monitor" are registered."""
    senders = {name: curve_dealer(ctx, endpoint, None) for name in ("anon", "worker", "client", "monitor")}
    for sock in senders.values():
        sock.connect(endpoint)
    for name, role, slots in (("worker", p.Role.WORKER, 1), ("client", p.Role.CLIENT, 0),
                              ("monitor", p.Role.MONITOR, 0)):
        senders[name].send_multipart(hello_frames(role, f"hostile-{tag}-{name}", slots))
        assert isinstance(recv_message(senders[name]), p.Welcome)
    return senders


def send_flood(senders: dict[str, zmq.Socket[Any]], flood: list[tuple[str, list[bytes]]]) -> None:
    for name, frames in flood:
        senders[name].send_multipart(frames)
    for name in ("worker", "client", "monitor"):  # leave, so that no job waits on the hostile worker
        senders[name].send_multipart(p.encode(p.Disconnect("flood over")))


def wait_counted(ctx: zmq.Context[Any], endpoint: str, before: dict[str, Any],
                 counts: Flood) -> dict[str, Any]:
    """Wait until the broker has counted every malformed message of a flood; return that snapshot."""

    def flood_processed() -> dict[str, Any] | None:
        snap = fetch_status(endpoint, 10.0, ctx)
        return snap if snap["malformed"] - before["malformed"] >= counts.malformed else None

    return wait_for(flood_processed, 30.0, interval_s=0.1, message="the broker counted the flood")


def close_all(senders: dict[str, zmq.Socket[Any]]) -> None:
    for sock in senders.values():
        sock.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_hostile_flood_leaves_broker_fast_and_small(procs: Procs, ctx: zmq.Context[Any]) -> None:
    # Default liveness (3 s): the registered hostile peers must outlive the flood's backlog.
    broker, endpoint = procs.broker(None)
    worker = procs.worker(endpoint)
    wait_for_worker_pids(lambda: snapshot(endpoint, None), [worker.pid])
    with zfarm.Client(endpoint, connect_timeout_s=20) as client:
        warm_up = list(client.map(jobs.square, range(20), timeout=RESULT_TIMEOUT_S, chunksize=1))
        assert warm_up == [x * x for x in range(20)]
        # A first burst of the same mix and size: how far the broker's queues back up during a burst
        # depends on the machine's load, and the allocator keeps that high-water mark; what must
        # not grow from one burst to the next is state kept per message.
        first, first_counts = build_flood(random.Random(1), client.id)
        senders = open_senders(ctx, endpoint, "warm-up")
        try:
            before_first = fetch_status(endpoint, 10.0, ctx)
            send_flood(senders, first)
            wait_counted(ctx, endpoint, before_first, first_counts)
        finally:
            close_all(senders)

        flood, counts = build_flood(random.Random(20240611), client.id)
        senders = open_senders(ctx, endpoint, "flood")
        try:
            before = fetch_status(endpoint, 10.0, ctx)
            rss_before_kb = rss_kb(broker.pid)
            send_flood(senders, flood)
            last_sent = time.monotonic()
            assert client.submit(jobs.square, 9).result(timeout=RESULT_TIMEOUT_S) == 81
            job_s = time.monotonic() - last_sent
            after = wait_counted(ctx, endpoint, before, counts)
            rss_after_kb = rss_kb(broker.pid)
        finally:
            close_all(senders)
    print(f"flood of {len(flood)}: good job done {job_s:.3f} s after the last message; "
          f"broker RSS {rss_before_kb} → {rss_after_kb} kB")
    assert job_s < FLOOD_JOB_DEADLINE_S, f"a good job took {job_s:.2f} s after the flood"
    assert after["malformed"] - before["malformed"] == counts.malformed
    assert after["late_results"] - before["late_results"] == counts.forged
    assert after["done"] - before["done"] == 1, "forged RESULTS must not count as done jobs"
    assert [w["pid"] for w in after["workers"]] == [worker.pid], after["workers"]
    assert [c["id"] for c in after["clients"]] == [client.id], after["clients"]
    growth_kb = rss_after_kb - rss_before_kb
    assert growth_kb < RSS_GROWTH_LIMIT_KB, f"RSS grew {growth_kb} kB: {rss_before_kb} → {rss_after_kb}"
    assert broker.alive()


# ---- 7. safe defaults ---------------------------------------------------------------------------------


def free_port_on_all_interfaces() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


def test_broker_refuses_to_listen_beyond_loopback_without_keys(procs: Procs) -> None:
    everywhere = f"tcp://0.0.0.0:{free_port_on_all_interfaces()}"
    refused = procs.spawn("broker", "--bind", everywhere, name="refused-broker")
    assert refused.wait(STARTUP_FAILURE_S) == 2, refused.log()
    for needed in ("keys", "docs/security.md", "--insecure", everywhere):
        assert needed in refused.log(), refused.log()

    insecure, _ = procs.broker(everywhere, "--insecure")  # waits for "listening on"
    assert "WITHOUT keys" in flat(insecure.log()), insecure.log()
    assert insecure.terminate(10.0) == 0

    loopback, endpoint = procs.broker(None)
    assert snapshot(endpoint, None)["workers"] == []
    assert loopback.terminate(10.0) == 0


# ---- 8. zfarm status with keys ----------------------------------------------------------------------


def test_status_needs_keys_against_a_curve_broker(procs: Procs, keys: Path) -> None:
    _, endpoint, workers = curve_farm(procs, keys)

    ok = run_zfarm("status", "--connect", endpoint, "--keys", str(keys), "--json")
    assert ok.returncode == 0, ok.stderr
    assert [w["pid"] for w in json.loads(ok.stdout)["workers"]] == [workers[0].pid]

    from_env = run_zfarm("status", "--connect", endpoint, "--json", env={"ZFARM_KEYS": str(keys)})
    assert from_env.returncode == 0, from_env.stderr
    assert [w["pid"] for w in json.loads(from_env.stdout)["workers"]] == [workers[0].pid]

    timeout_s = 1.0
    started = time.monotonic()
    without = run_zfarm("status", "--connect", endpoint, "--json", "--timeout", str(timeout_s))
    elapsed_s = time.monotonic() - started
    assert without.returncode == 1, (without.stdout, without.stderr)
    assert without.stdout == ""
    assert endpoint in without.stderr, without.stderr
    assert elapsed_s < timeout_s + SLACK_S, f"zfarm status took {elapsed_s:.1f} s"


def test_monitors_use_a_folder_that_holds_several_client_keys(procs: Procs, keys: Path) -> None:
    _, endpoint, _ = curve_farm(procs, keys)
    added = run_zfarm("keys", "add", str(keys), "laptop", "--role", "client")
    assert added.returncode == 0, added.stderr
    status = run_zfarm("status", "--connect", endpoint, "--keys", str(keys), "--json")
    assert status.returncode == 0, status.stderr
