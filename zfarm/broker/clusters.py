"""Clusters: the last report of each cluster that launches workers for this broker.

::

    CLUSTER (from a cluster's supervisor, every every_s) ──► Clusters.report ──► kept by cluster_id
        leaving=True (the cluster closed) ───────────────────► forgotten now
        silent for MISSED_REPORTS times its every_s ───────► forgotten at the next look
    snapshot ──► Clusters.view(now): one row per cluster (``zfarm status``, the dashboard)

The broker launches nothing: a cluster (``LocalCluster``, ``SSHCluster``, ``SlurmCluster``, maybe on
another machine) knows what it asked for and what is still coming, and says so here so that anyone
who asks the broker sees it. The table is bounded (``MAX_CLUSTERS``); a report the table has no
room for is not kept, but its sender still gets its STATUS_REPLY, so a full table never stops a
cluster from reading the broker (and adapting).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from zfarm import protocol as p
from zfarm.broker.records import Records

log = logging.getLogger("zfarm.broker.scheduler")

#: clusters reported at once at most (each report is small; this bounds what a peer can make us keep)
MAX_CLUSTERS = 64
#: reports a cluster may miss before the broker forgets it
MISSED_REPORTS = 3


@dataclass(slots=True)
class ClusterEntry:
    report: p.ClusterReport
    host: str  # where its supervisor runs (the reporting peer's host)
    first_seen: float
    last_seen: float

    def expired(self, now: float) -> bool:
        return now - self.last_seen > MISSED_REPORTS * self.report.every_s


class Clusters:
    """The last report of every cluster that is reporting; see the module's docstring."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.entries: dict[str, ClusterEntry] = {}
        self._full_logged = False

    def report(self, msg: p.ClusterReport, host: str, now: float) -> None:
        """Keep ``msg`` as its cluster's view (or forget the cluster, if it is leaving)."""
        self.expire(now)
        entry = self.entries.get(msg.cluster_id)
        if msg.leaving:
            if entry is not None:
                del self.entries[msg.cluster_id]
                self._said(now, "cluster-left", f"cluster {_label(msg)} closed")
            return
        if entry is not None:
            entry.report, entry.host, entry.last_seen = msg, host, now
            return
        if len(self.entries) >= MAX_CLUSTERS:
            if not self._full_logged:  # once until there is room again: a flood costs no log lines
                log.warning("not keeping the report of cluster %s from %s: %d clusters report already",
                            p.clip(msg.cluster_id), p.clip(host), MAX_CLUSTERS)
                self._full_logged = True
            return
        self._full_logged = False
        self.entries[msg.cluster_id] = ClusterEntry(msg, host, now, now)
        self._said(now, "cluster-joined", f"cluster {_label(msg)} on {host} reports: {msg.launcher} launcher")

    def expire(self, now: float) -> None:
        """Forget clusters that stopped reporting (their process died, or lost the broker)."""
        for cluster_id, entry in list(self.entries.items()):
            if entry.expired(now):
                del self.entries[cluster_id]
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
