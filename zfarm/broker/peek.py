"""Live output of a running job: PEEK relayed to the job's worker, PEEK_REPLY relayed back.

::

    asker (zfarm logs --follow) ──PEEK(job, offsets)──► broker ──PEEK(…, reply_to=asker)──► worker
          ▲                                               │ not running: answers itself    │ reads ≤ 64 KiB
          └───────────────PEEK_REPLY (chunks)─────────────┴◄──PEEK_REPLY(…, reply_to)─────┘ a stream

The broker keeps little between a request and its reply: the asker's route travels with the
request to the worker and comes back in the reply, and the chunks are payload frames it routes
untouched. A job that is not running is answered by the broker at once (queued, finished or
unknown), so an asker never waits on silence; a worker that does not answer (it died in between)
costs the asker one deadline, after which it asks again.

Each PEEK sent on to a worker makes it read up to 64 KiB of each stream, so an asker may have at
most ``MAX_PEEKS_IN_FLIGHT`` of them unanswered (one unanswered for ``PEEK_FORGET_S`` no longer
counts); a PEEK over the bound is dropped, and costs its asker one deadline, as a lost one would.
A follower asks one at a time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

from zfarm import protocol as p
from zfarm.broker.farm import Farm
from zfarm.broker.state import JobState, Peer, Route, WorkerRecord

log = logging.getLogger(__name__)

#: PEEKs one asker may have at workers, unanswered, at once
MAX_PEEKS_IN_FLIGHT = 8
#: after this, an unanswered PEEK no longer counts (its worker died, or dropped it)
PEEK_FORGET_S = 10.0

#: where a job in each state stands for an asker (ASSIGNED goes to its worker instead)
_STATUS = {
    JobState.SUBMITTED: p.PeekStatus.QUEUED,
    JobState.WAITING: p.PeekStatus.QUEUED,
    JobState.QUEUED: p.PeekStatus.QUEUED,
    JobState.FINISHED: p.PeekStatus.FINISHED,
    JobState.CANCELLED: p.PeekStatus.FINISHED,
}


class Peeks:
    """Routes PEEK to the worker running the job and its PEEK_REPLY back to the asker."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        #: per asker, when each of its PEEKs went to a worker (oldest first), until answered or forgotten
        self._in_flight: dict[Route, deque[float]] = {}

    def ask(self, asker: Peer, msg: p.Peek, now: float) -> None:
        """A client or monitor asks for a job's output: forward it to the job's worker, or answer."""
        farm = self.farm
        client = farm.clients.get(msg.client_id)
        job = client.jobs.get(msg.seq) if client is not None else None
        if job is not None and job.state is JobState.ASSIGNED and job.worker is not None:
            worker = farm.workers.get(job.worker)
            if worker is not None:
                if self._room(asker, now):
                    farm.send(worker, dataclasses.replace(msg, reply_to=asker.route), now)
                return
        if job is not None:
            status = _STATUS.get(job.state, p.PeekStatus.QUEUED)  # ASSIGNED to a worker gone: requeued next
        elif client is not None and msg.seq in client.held:
            status = p.PeekStatus.FINISHED
        else:
            status = p.PeekStatus.UNKNOWN
        farm.send(asker, p.PeekReply(msg.client_id, msg.seq, msg.ask, status), now)

    def relay(self, worker: WorkerRecord, msg: p.PeekReply, now: float) -> None:
        """A worker's answer goes to the asker named in it, if that asker is still connected."""
        sent = self._in_flight.get(msg.reply_to)
        if sent:
            sent.popleft()  # answers come about in the order asked; any one frees a place
        asker = self.farm.peers.get(msg.reply_to)
        if asker is None or isinstance(asker, WorkerRecord):
            log.debug("dropped a PEEK_REPLY from worker %s: its asker is gone", worker.id)
            return
        self.farm.send(asker, dataclasses.replace(msg, reply_to=b""), now)


    def _room(self, asker: Peer, now: float) -> bool:
        """Whether ``asker`` may have one more PEEK at a worker (if so, it is counted)."""
        if len(self._in_flight) > 2 * len(self.farm.peers) + 16:  # askers that left: forget them
            self._in_flight = {r: d for r, d in self._in_flight.items() if r in self.farm.peers}
        sent = self._in_flight.setdefault(asker.route, deque())
        while sent and now - sent[0] > PEEK_FORGET_S:
            sent.popleft()
        if len(sent) >= MAX_PEEKS_IN_FLIGHT:
            log.debug("dropped a PEEK from %s: %d of its PEEKs are at workers already", asker.id, len(sent))
            return False
        sent.append(now)
        return True
