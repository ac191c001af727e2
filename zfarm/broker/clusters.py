"""Clusters: the last report of each cluster that launches workers for this broker.

::

    CLUSTER (a cluster's reporter, every every_s) ──► Clusters.report ──► kept by (reporter, cluster_id)
        leaving=True (the cluster closed) ──────────────► forgotten now
        silent for MISSED_REPORTS * min(every_s, EVERY_CAP_S) + GRACE_S ──► forgotten at the next look
    snapshot ──► Clusters.view(now): one row per cluster (``zfarm status``, the dashboard)

The broker launches nothing: a cluster (``LocalCluster``, ``SSHCluster``, ``SlurmCluster``, maybe on
another machine) knows what it asked for and what is still coming, and says so here so that anyone
who asks the broker sees it.

Any admitted monitor may report, a look-only key (a worker's) too: a cluster that launches workers
holds a worker key, and may hold no client key. What a reporter can do to others' rows is bounded:

- a row belongs to its reporter — its CURVE key, or without keys its host — and the cluster id it
  chose; another reporter using the same id gets a row of its own, and cannot replace or remove it;
- a row is forgotten a few rounds after its last report, with the round counted at most
  ``EVERY_CAP_S``: a report claiming to come hourly does not stay for hours;
- the table is bounded (``MAX_CLUSTERS``, ``MAX_CLUSTERS_PER_REPORTER`` each): a new cluster takes the
  place of the stalest row — its reporter's own when that reporter has its share — and every report
  is answered with the STATUS_REPLY, so a full table never stops a cluster from reading the broker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from zfarm import protocol as p
from zfarm.broker.records import Records
from zfarm.broker.state import Peer

log = logging.getLogger("zfarm.broker.scheduler")

#: clusters reported at once at most (each report is small; this bounds what peers can make us keep)
MAX_CLUSTERS = 64
#: of them, from one reporter (a key, or without keys a host)
MAX_CLUSTERS_PER_REPORTER = 16
#: reports a cluster may miss before the broker forgets it
MISSED_REPORTS = 3
#: a report's every_s counts at most this much toward its expiry
EVERY_CAP_S = 60.0
#: silence allowed beyond the missed rounds: a slow round (a busy broker or network) is not a death
GRACE_S = 10.0

Owner = tuple[str, str]  # (the reporter: "key:…" or "host:…", the cluster's id)


@dataclass(slots=True)
class ClusterEntry:
    report: p.ClusterReport
    host: str  # where its supervisor runs (the reporting peer's host)
    reporter: str
    first_seen: float
    last_seen: float

    def expired(self, now: float) -> bool:
        return now - self.last_seen > silence_allowed_s(self.report.every_s)


def silence_allowed_s(every_s: float) -> float:
    """How long the broker keeps a cluster that reports every ``every_s`` without hearing from it."""
    return MISSED_REPORTS * min(every_s, EVERY_CAP_S) + GRACE_S


def reporter_of(peer: Peer) -> str:
    """Who owns the rows a peer reports: its CURVE key; without keys, its host (all anyone has)."""
    return f"key:{peer.key}" if peer.key else f"host:{peer.host}"


class Clusters:
    """The last report of every cluster that is reporting; see the module's docstring."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.entries: dict[Owner, ClusterEntry] = {}
        self._full_logged = False

    def report(self, msg: p.ClusterReport, peer: Peer, now: float) -> None:
        """Keep ``msg`` as its cluster's view (or forget the cluster, if it is leaving)."""
        self.expire(now)
        reporter = reporter_of(peer)
        owner = (reporter, msg.cluster_id)
        entry = self.entries.get(owner)
        if msg.leaving:
            if entry is not None:
                del self.entries[owner]
                self._said(now, "cluster-left", f"cluster {_label(msg)} closed")
            return
        if entry is not None:
            entry.report, entry.host, entry.last_seen = msg, peer.host, now
            return
        self._make_room(reporter, msg, peer.host)
        self.entries[owner] = ClusterEntry(msg, peer.host, reporter, now, now)
        self._said(now, "cluster-joined",
                   f"cluster {_label(msg)} on {peer.host} reports: {msg.launcher} launcher")

    def _make_room(self, reporter: str, msg: p.ClusterReport, host: str) -> None:
        """Forget the stalest row (the reporter's own, if it has its share) when a new one has no room."""
        own = [k for k, e in self.entries.items() if e.reporter == reporter]
        candidates = own if len(own) >= MAX_CLUSTERS_PER_REPORTER else (
            list(self.entries) if len(self.entries) >= MAX_CLUSTERS else [])
        if not candidates:
            self._full_logged = False
            return
        stalest = min(candidates, key=lambda k: self.entries[k].last_seen)
        gone = self.entries.pop(stalest)
        if not self._full_logged:  # once until there is room again: a flood costs no log lines
            log.warning("no room for cluster %s from %s: forgot the stalest, cluster %s from %s",
                        p.clip(msg.cluster_id), p.clip(host), p.clip(gone.report.cluster_id),
                        p.clip(gone.host))
            self._full_logged = True

    def expire(self, now: float) -> None:
        """Forget clusters that stopped reporting (their process died, or lost the broker)."""
        for owner, entry in list(self.entries.items()):
            if entry.expired(now):
                del self.entries[owner]
                self._said(now, "cluster-gone", f"cluster {_label(entry.report)} on {entry.host} stopped "
                           f"reporting {now - entry.last_seen:.0f} s ago: forgotten")

    def view(self, now: float) -> list[dict[str, Any]]:
        """One plain row per cluster reporting, for the snapshot."""
        self.expire(now)
        return [cluster_view(e, now) for e in self.entries.values()]

    def _said(self, now: float, kind: str, text: str) -> None:
        log.info("%s", p.clip(text))
        self.records.event(now, kind, text)


def cluster_view(entry: ClusterEntry, now: float) -> dict[str, Any]:
    r = entry.report
    adapt = {"minimum": r.adapt[0], "maximum": r.adapt[1]} if r.adapt else None
    return {"id": r.cluster_id, "name": r.name, "launcher": r.launcher, "host": entry.host,
            "requested": r.requested, "launched": r.launched, "running": r.running, "coming": r.coming,
            "pending": r.pending, "retiring": r.retiring, "failed": r.failed, "adapt": adapt,
            "report_age_s": round(now - entry.last_seen, 3), "every_s": r.every_s,
            "uptime_s": round(now - entry.first_seen, 3)}


def _label(r: p.ClusterReport) -> str:
    return f"{r.cluster_id}{f' ({r.name})' if r.name else ''}"
