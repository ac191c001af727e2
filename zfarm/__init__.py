"""zfarm: a task farm for Python on ZeroMQ.

>>> import zfarm
>>> with zfarm.Client() as client:              # an embedded broker and workers
...     print(sum(client.map(abs, range(-10, 0))))
55
"""

import logging

__version__ = "0.1.0"

from zfarm.client import Client, as_completed  # after __version__: the client uses it
from zfarm.errors import (
    BrokerUnavailable,
    ConfigError,
    JobCrashed,
    JobError,
    PayloadTooLarge,
    ProtocolError,
    Refused,
    SecurityError,
    WorkerLost,
    ZfarmError,
)

# A library only logs; the application (or the zfarm command) decides where logs go.
logging.getLogger("zfarm").addHandler(logging.NullHandler())

__all__ = [
    "BrokerUnavailable", "Client", "ConfigError", "JobCrashed", "JobError", "PayloadTooLarge",
    "ProtocolError", "Refused", "SecurityError", "WorkerLost", "ZfarmError", "__version__", "as_completed",
]
