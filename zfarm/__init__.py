"""zfarm: a task farm for Python on ZeroMQ.

>>> import zfarm
>>> with zfarm.Client() as client:              # an embedded broker and workers
...     print(sum(client.map(abs, range(-10, 0))))
55
"""

__version__ = "0.1.0"

from zfarm.client import Client, as_completed
from zfarm.errors import (
    BrokerUnavailable,
    ConfigError,
    JobCrashed,
    JobError,
    PayloadTooLarge,
    ProtocolError,
    Refused,
    WorkerLost,
    ZfarmError,
)

__all__ = [
    "BrokerUnavailable", "Client", "ConfigError", "JobCrashed", "JobError", "PayloadTooLarge",
    "ProtocolError", "Refused", "WorkerLost", "ZfarmError", "__version__", "as_completed",
]
