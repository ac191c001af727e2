"""Live output of a running job: PEEK relayed to the job's worker, PEEK_REPLY relayed back.

::

    asker (zfarm logs --follow) ──PEEK(job, offsets)──► broker ──PEEK(…, reply_to=asker)──► worker
          ▲                                               │ not running: answers itself    │ reads ≤ 64 KiB
          └───────────────PEEK_REPLY (chunks)─────────────┴◄──PEEK_REPLY(…, reply_to)─────┘ a stream

The broker keeps nothing between a request and its reply: the asker's route travels with the
request to the worker and comes back in the reply, and the chunks are payload frames it routes
untouched. A job that is not running is answered by the broker at once (queued, finished or
unknown), so an asker never waits on silence; a worker that does not answer (it died in between)
costs the asker one deadline, after which it asks again.
"""

from __future__ import annotations

import dataclasses
import logging

from zfarm import protocol as p
from zfarm.broker.farm import Farm
from zfarm.broker.state import JobState, Peer, WorkerRecord

log = logging.getLogger(__name__)

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

    def ask(self, asker: Peer, msg: p.Peek, now: float) -> None:
        """A client or monitor asks for a job's output: forward it to the job's worker, or answer."""
        farm = self.farm
        client = farm.clients.get(msg.client_id)
        job = client.jobs.get(msg.seq) if client is not None else None
        if job is not None and job.state is JobState.ASSIGNED and job.worker is not None:
            worker = farm.workers.get(job.worker)
            if worker is not None:
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
        asker = self.farm.peers.get(msg.reply_to)
        if asker is None or isinstance(asker, WorkerRecord):
            log.debug("dropped a PEEK_REPLY from worker %s: its asker is gone", worker.id)
            return
        self.farm.send(asker, dataclasses.replace(msg, reply_to=b""), now)

