"""The client: ``Client`` (a ``concurrent.futures.Executor``), its I/O thread and its pure core.

::

    executor.py   Client, as_completed, JobLimits        (user threads: pickle, make futures)
    mapping.py    MapRun, ChunkJobs: map's window, chunk sizes, chunks as jobs
    futures.py    JobFuture, settling a future from a RESULT
    shell.py      IOThread: the socket, the inbox, the clock    ──► core.py  ClientCore (sans-IO)
    resources.py  what a client owns; closing at exit                       receipts.py (RECEIVED)

The client imports nothing from the worker or the broker.
"""

from zfarm.client.executor import Client, JobLimits, as_completed, job_options

__all__ = ["Client", "JobLimits", "as_completed", "job_options"]
