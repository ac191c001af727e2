"""Clusters reporting to the broker's core: kept, answered, expired, bounded; hostile reports refused.

Plain data and a fake clock: every message goes through real encode/decode.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from zfarm import protocol as p
from zfarm.broker import clusters
from zfarm.broker.scheduler import Scheduler
from zfarm.broker.state import Auth
from zfarm.config import BrokerSettings
from zfarm.errors import ProtocolError

SETTINGS = BrokerSettings(heartbeat_interval_s=1.0, liveness=3)
MON, MON2, WORKER = b"\x00route-mon", b"\x00route-mon2", b"\x00route-w"


def report(cluster_id: str = "slurm-3f2a1c", *, every_s: float = 2.0, leaving: bool = False,
           **counts: Any) -> p.ClusterReport:
    fields: dict[str, Any] = {"requested": 4, "launched": 3, "running": 2, "coming": 1, "pending": 1,
                              "retiring": 0, "failed": 0, "adapt": [0, 8], **counts}
    return p.ClusterReport(cluster_id, "lab", "slurm", fields["requested"], fields["launched"],
                           fields["running"], fields["coming"], fields["pending"], fields["retiring"],
                           fields["failed"], fields["adapt"], every_s, leaving)


class Broker:
    def __init__(self) -> None:
        self.sched = Scheduler(SETTINGS, 0.0, broker_id="b-test")

    def send(self, route: bytes, msg: p.Message, now: float, auth: Auth | None = None) -> None:
        self.sched.handle(route, p.encode(msg), now, auth)

    def monitor(self, route: bytes, now: float, host: str = "login1", auth: Auth | None = None) -> None:
        self.send(route, p.Hello("monitor", f"m-{route.hex()[-6:]}", host, 300), now, auth)

    def replies(self, route: bytes, now: float) -> list[p.StatusReply]:
        out = [(r, p.decode(p.encode(m))) for r, m in self.sched.flush(now)]
        return [m for r, m in out if r == route and isinstance(m, p.StatusReply)]

    def clusters(self, now: float) -> list[dict[str, Any]]:
        return list(self.sched.snapshot(now)["clusters"])


def test_a_report_is_answered_with_the_snapshot_that_holds_it_and_leaving_forgets_it_at_once() -> None:
    broker = Broker()
    broker.monitor(MON, 0.0)
    broker.send(MON, report(), 1.0)
    (reply,) = broker.replies(MON, 1.0)
    (view,) = reply.snapshot["clusters"]
    assert view["id"] == "slurm-3f2a1c" and view["name"] == "lab" and view["launcher"] == "slurm"
    assert view["host"] == "login1"
    assert (view["requested"], view["running"], view["coming"], view["pending"]) == (4, 2, 1, 1)
    assert view["adapt"] == {"minimum": 0, "maximum": 8}
    broker.send(MON, report(running=3, coming=0, pending=0), 2.0)  # the same cluster: replaced
    assert [(c["id"], c["running"]) for c in broker.clusters(2.0)] == [("slurm-3f2a1c", 3)]
    broker.send(MON, report(leaving=True), 2.5)
    assert broker.clusters(2.5) == []
    assert len(broker.replies(MON, 2.5)) == 2
    kinds = [e["kind"] for e in broker.sched.snapshot(2.5)["events"]]
    assert "cluster-joined" in kinds and "cluster-left" in kinds


def test_a_cluster_that_stops_reporting_is_forgotten_after_a_few_of_its_rounds_and_a_grace() -> None:
    broker = Broker()
    broker.monitor(MON, 0.0)
    broker.send(MON, report("fast", every_s=1.0), 0.0)
    broker.send(MON, report("slow", every_s=10.0), 0.0)
    fast_s = clusters.MISSED_REPORTS * 1.0 + clusters.GRACE_S  # a slow round is not a death
    assert {c["id"] for c in broker.clusters(fast_s)} == {"fast", "slow"}
    assert {c["id"] for c in broker.clusters(fast_s + 0.1)} == {"slow"}
    broker.monitor(MON, 20.0)  # its monitor connection is new each round, the cluster the same
    broker.send(MON, report("slow", every_s=10.0), 20.0)
    slow_s = 20.0 + clusters.MISSED_REPORTS * 10.0 + clusters.GRACE_S
    assert {c["id"] for c in broker.clusters(slow_s)} == {"slow"}
    assert broker.clusters(slow_s + 0.1) == []


def test_a_report_that_says_it_comes_hourly_is_still_forgotten_within_minutes() -> None:
    broker = Broker()
    broker.monitor(MON, 0.0)
    broker.send(MON, report("sleepy", every_s=3600.0), 0.0)
    allowed_s = clusters.MISSED_REPORTS * clusters.EVERY_CAP_S + clusters.GRACE_S
    assert allowed_s <= 300
    assert [c["id"] for c in broker.clusters(allowed_s)] == ["sleepy"]
    assert broker.clusters(allowed_s + 0.1) == []


def test_the_table_is_bounded_by_evicting_the_stalest_and_every_report_is_answered() -> None:
    broker = Broker()
    per, total = clusters.MAX_CLUSTERS_PER_REPORTER, clusters.MAX_CLUSTERS
    reporters = [bytes([0, i]) + b"route" for i in range(total // per)]
    for r, route in enumerate(reporters):
        broker.monitor(route, 0.0, host=f"login{r}")
        for i in range(per):
            broker.send(route, report(f"c-{r}-{i}"), 1.0 + (r * per + i) / 100)  # c-0-0 the stalest
    assert len(broker.clusters(2.0)) == total
    newcomer = b"\x00route-new"
    broker.monitor(newcomer, 2.0, host="login-new")
    broker.send(newcomer, report("newcomer"), 2.0)
    assert len(broker.replies(newcomer, 2.0)) == 1
    ids = {c["id"] for c in broker.clusters(2.0)}
    assert len(ids) == total and "newcomer" in ids and "c-0-0" not in ids and "c-0-1" in ids
    # one reporter that keeps adding clusters pushes out only its own oldest, never the others'
    for i in range(per + 5):
        broker.send(newcomer, report(f"flood-{i}"), 2.0 + i / 100)
    ids = {c["id"] for c in broker.clusters(3.0)}
    assert sum(i.startswith("flood-") or i == "newcomer" for i in ids) == per
    assert {f"c-{r}-{i}" for r in range(1, len(reporters)) for i in range(per)} <= ids


def test_only_the_reporter_that_listed_a_cluster_replaces_or_removes_it() -> None:
    broker = Broker()
    broker.monitor(MON, 0.0, host="login1")
    broker.monitor(MON2, 0.0, host="elsewhere")
    broker.send(MON, report("lab-1", running=2), 1.0)
    broker.send(MON2, report("lab-1", leaving=True), 2.0)  # not its cluster: nothing to remove
    broker.send(MON2, report("lab-1", running=0, coming=0, pending=0), 2.0)  # listed as its own
    rows = sorted((c["host"], c["running"]) for c in broker.clusters(2.0) if c["id"] == "lab-1")
    assert rows == [("elsewhere", 0), ("login1", 2)]
    broker.send(MON2, report("lab-1", leaving=True), 3.0)
    assert [(c["host"], c["running"]) for c in broker.clusters(3.0)] == [("login1", 2)]


def test_with_keys_a_report_belongs_to_its_key_and_a_look_only_key_may_report() -> None:
    broker = Broker()
    looks = Auth(frozenset({"worker", "monitor"}), "worker-key")  # a worker's key: look-only
    other = Auth(frozenset({"client", "monitor"}), "client-key")
    broker.monitor(MON, 0.0, auth=looks)
    broker.monitor(MON2, 0.0, auth=other)  # the same host: the key tells them apart
    broker.send(MON, report("slurm-1"), 1.0, looks)
    assert len(broker.replies(MON, 1.0)) == 1
    broker.send(MON2, report("slurm-1", leaving=True), 2.0, other)
    assert [c["id"] for c in broker.clusters(2.0)] == ["slurm-1"]
    broker.send(MON, report("slurm-1", leaving=True), 3.0, looks)
    assert broker.clusters(3.0) == []


def _raw_cluster(envelope: list[Any]) -> list[bytes]:
    return [p.HEADER, bytes([p.Command.CLUSTER]), msgpack.packb(envelope, use_bin_type=True)]


GOOD = ["slurm-1", "", "slurm", 1, 1, 1, 0, 0, 0, 0, [], 2.0, False]
HOSTILE = {
    "negative count": {3: -1},
    "count past the bound": {5: p.MAX_CLUSTER_WORKERS + 1},
    "huge count": {4: 2**63},
    "bool as a count": {3: True},
    "more pending than coming": {6: 0, 7: 1},
    "empty id": {0: ""},
    "id over its bound": {0: "x" * (p.MAX_ID_CHARS + 1)},
    "launcher over its bound": {2: "l" * 10_000},
    "adapt of three": {10: [0, 1, 2]},
    "adapt upside down": {10: [5, 2]},
    "adapt of texts": {10: ["0", "8"]},
    "every_s zero": {11: 0.0},
    "every_s nan": {11: float("nan")},
    "every_s a day": {11: 86_400.0},
    "a map for a count": {3: {"a": 1}},
    "an escape sequence in the id": {0: "c-1\x1b[2J"},
    "a new line in the name": {1: "lab\nfake line"},
    "a bell in the launcher": {2: "slurm\x07"},
}


@pytest.mark.parametrize("change", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_reports_are_refused_by_decode_and_dropped_by_the_broker(change: dict[int, Any]) -> None:
    envelope = list(GOOD)
    for position, value in change.items():
        envelope[position] = value
    frames = _raw_cluster(envelope)
    with pytest.raises(ProtocolError):
        p.decode(frames)
    broker = Broker()
    broker.monitor(MON, 0.0)
    broker.sched.flush(0.0)
    broker.sched.handle(MON, frames, 1.0)  # logged and dropped; the broker carries on
    assert broker.sched.counters.malformed == 1
    assert broker.clusters(1.0) == [] and broker.replies(MON, 1.0) == []
    broker.send(MON, report(), 2.0)
    assert len(broker.replies(MON, 2.0)) == 1


def test_a_worker_may_not_report_a_cluster() -> None:
    broker = Broker()
    broker.send(WORKER, p.Hello("worker", "w-1", "node", 1, 1, {}), 0.0)
    broker.send(WORKER, report(), 1.0)
    assert broker.sched.counters.malformed == 1
    assert broker.clusters(1.0) == []


def test_a_hello_whose_host_holds_control_characters_is_refused() -> None:
    good = p.Hello("monitor", "m-1", "login1", 300)
    assert p.decode(p.encode(good)) == good
    for host in ("login1\x1b]0;owned\x07", "a\nb", "\x00"):
        with pytest.raises(ProtocolError, match="printable"):
            p.decode(p.encode(p.Hello("worker", "w-1", host, 1, 1, {})))
