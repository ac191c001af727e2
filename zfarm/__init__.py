"""zfarm: a task farm for Python on ZeroMQ.

>>> import zfarm
>>> with zfarm.Client() as client:              # an embedded broker and workers
...     print(sum(client.map(abs, range(-10, 0))))
55
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from zfarm.errors import (
    BrokerUnavailable,
    CommandFailed,
    CommandNotFound,
    ConfigError,
    DependencyFailed,
    JobCrashed,
    JobError,
    JobTimeout,
    JournalCorrupted,
    JournalFull,
    MemoryLimitExceeded,
    PayloadTooLarge,
    ProtocolError,
    Refused,
    RemoteTraceback,
    SecurityError,
    WorkerLost,
    ZfarmError,
)

__version__ = "0.4.1"

if TYPE_CHECKING:
    from zfarm.client import Client, as_completed
    from zfarm.cluster import LocalCluster, SlurmCluster, SSHCluster
    from zfarm.commands import CommandResult
    from zfarm.output import JobOutput
    from zfarm.projects import Project, ProjectStatus


def __getattr__(name: str) -> Any:
    # The client (and rich, pyzmq's monitor, ...) load on first use, so that brokers, workers
    # and slot processes, which import zfarm too, start fast.
    if name in ("Client", "as_completed"):
        from zfarm import client

        return getattr(client, name)
    if name == "CommandResult":
        from zfarm.commands import CommandResult

        return CommandResult
    if name in ("Project", "ProjectStatus"):
        from zfarm import projects

        return getattr(projects, name)
    if name == "JobOutput":
        from zfarm.output import JobOutput

        return JobOutput
    if name in ("LocalCluster", "SSHCluster", "SlurmCluster"):
        from zfarm import cluster

        return getattr(cluster, name)
    raise AttributeError(f"module 'zfarm' has no attribute {name!r}")


# A library only logs; the application (or the zfarm command) decides where logs go.
logging.getLogger("zfarm").addHandler(logging.NullHandler())

__all__ = [
    "BrokerUnavailable", "Client", "CommandFailed", "CommandNotFound", "CommandResult", "ConfigError",
    "DependencyFailed", "JobCrashed", "JobError", "JobOutput", "JobTimeout", "JournalCorrupted",
    "JournalFull", "LocalCluster", "MemoryLimitExceeded", "PayloadTooLarge", "Project", "ProjectStatus",
    "ProtocolError", "Refused", "RemoteTraceback", "SSHCluster", "SecurityError", "SlurmCluster",
    "WorkerLost", "ZfarmError", "__version__", "as_completed",
]
