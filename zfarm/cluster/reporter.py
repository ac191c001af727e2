"""``Reporter``: a cluster's reports to its broker, on a thread of their own.

::

    reporter thread: every STATUS_EVERY_S, or at once when asked (wait_for_workers)
        read() ─ what we launched (the cluster's counts, under its lock)
        CLUSTER ──► broker ──► STATUS_REPLY: its snapshot ──► heard(snapshot): which workers
            registered, which are idle, the demand (adapt)
        no answer within REPORT_TIMEOUT_S ──► heard(None); the next try after a back-off
            (STATUS_EVERY_S doubling up to MAX_BACKOFF_S), so a dead broker costs little
    close(): the thread stops at once (a report in flight is given up), then a last
        CLUSTER (leaving) so the broker forgets us now; only if it answered the last report

The supervisor never waits for the broker: a dead or slow broker delays no restart, retirement or
close, and launches that take long (``sbatch`` or ``ssh`` per worker, by tens) delay no report, so
the broker never forgets a cluster that is busy launching.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from zfarm import protocol as p
from zfarm.errors import Refused, SecurityError, ZfarmError

log = logging.getLogger("zfarm.cluster")

#: how often a cluster reports to the broker (and reads its snapshot back)
STATUS_EVERY_S = 2.0
#: how long one report waits for the broker's answer
REPORT_TIMEOUT_S = 5.0
#: the longest pause between reports while the broker does not answer
MAX_BACKOFF_S = 30.0
#: how long the report a closing cluster says goodbye with may wait for the broker
GOODBYE_TIMEOUT_S = 2.0

Snapshot = dict[str, Any]


def cluster_report(cluster_id: str, name: str, launcher: str, counts: dict[str, int], adapt: list[int],
                   leaving: bool = False) -> p.ClusterReport:
    """The CLUSTER message for a cluster's ``counts`` (``supervision.count_workers``)."""
    return p.ClusterReport(cluster_id[:p.MAX_ID_CHARS], name[:p.MAX_ID_CHARS], launcher[:p.MAX_ID_CHARS],
                           counts["requested"], counts["launched"], counts["running"], counts["coming"],
                           counts["pending"], counts["retiring"], counts["failed"], adapt, STATUS_EVERY_S,
                           leaving)


class Reporter:
    """Reports what a cluster launched to its broker and hands back the broker's snapshot.

    Args:
        address: the broker's endpoint.
        keys: the cluster's keys folder ("" for none).
        label: names the thread and the log lines (the cluster's kind).
        read: the report to send now (``leaving``: the goodbye); called on the reporter's thread.
        heard: the broker's snapshot, or None when it did not answer; called on the reporter's thread.
    """

    def __init__(self, address: str, keys: str, label: str, read: Callable[[bool], p.ClusterReport],
                 heard: Callable[[Snapshot | None], None]) -> None:
        self.address, self.keys, self.label = address, keys, label
        self._read, self._heard = read, heard
        self._stop = threading.Event()
        self._soon = threading.Event()
        self._answered = False  # the last report was answered: worth a goodbye
        self._failures = 0  # reports in a row the broker did not answer
        self._warned = False  # that it refused us (said once until it answers)
        self._thread = threading.Thread(target=self._run, name=f"zfarm-{label}-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def soon(self) -> None:
        """Report now rather than at the next round (once: then at the usual pace)."""
        self._soon.set()

    def close(self) -> None:
        """Stop reporting, and tell the broker we leave (if it answered the last report). Returns
        within about GOODBYE_TIMEOUT_S whatever the broker does."""
        self._stop.set()
        self._soon.set()
        if self._thread.is_alive():
            self._thread.join(REPORT_TIMEOUT_S + 1.0)  # a report in flight notices the stop within 0.1 s
        if not self._answered:
            return
        from zfarm import monitor

        try:
            monitor.report_cluster(self.address, self._read(True), GOODBYE_TIMEOUT_S, keys=self.keys)
        except ZfarmError as exc:
            log.debug("%s cluster: goodbye to %s unanswered: %s", self.label, self.address, exc)

    def _run(self) -> None:
        from zfarm import monitor

        pause_s = 0.0
        while True:
            self._soon.wait(pause_s)
            self._soon.clear()
            if self._stop.is_set():
                return
            try:
                report = self._read(False)
                snapshot = monitor.report_cluster(self.address, report, REPORT_TIMEOUT_S, keys=self.keys,
                                                  stop=self._stop)
            except ZfarmError as exc:
                if self._stop.is_set():
                    return
                pause_s = self._unanswered(exc)
                continue
            except Exception:  # the reporter must outlive any surprise (a bug in read)
                log.exception("%s cluster: reporting failed", self.label)
                pause_s = STATUS_EVERY_S
                continue
            self._failures, self._warned, self._answered = 0, False, True
            pause_s = STATUS_EVERY_S
            self._heard_safely(snapshot)

    def _unanswered(self, exc: ZfarmError) -> float:
        """A report the broker did not answer: say so (a refusal once, as a warning), back off."""
        self._failures += 1
        pause_s: float = min(STATUS_EVERY_S * 2.0 ** (self._failures - 1), MAX_BACKOFF_S)
        refused = isinstance(exc, (Refused, SecurityError))  # another version, keys: the user must act
        log.log(logging.WARNING if refused and not self._warned else logging.DEBUG,
                "%s cluster: no report to %s (next try in %.0f s): %s", self.label, self.address, pause_s,
                exc)
        self._warned = self._warned or refused
        self._answered = False
        self._heard_safely(None)
        return pause_s

    def _heard_safely(self, snapshot: Snapshot | None) -> None:
        try:
            self._heard(snapshot)
        except Exception:
            log.exception("%s cluster: reading the broker's answer failed", self.label)
