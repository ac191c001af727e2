"""A job's function counts against the broker's message limit at submit, with a real broker.

::

    zfarm.Client ──submit(fn capturing 2 MiB)──► raises PayloadTooLarge, nothing sent
                                                  zfarm broker --max-message-bytes 1 MiB
"""

from __future__ import annotations

import functools

import pytest

import zfarm
from tests import jobs
from tests.helpers import Procs

pytestmark = pytest.mark.timeout(60)


def test_a_function_over_the_message_limit_is_refused_at_submit(procs: Procs) -> None:
    endpoint, _ = procs.farm("--max-message-bytes", str(2**20), workers=1)
    big_function = functools.partial(jobs.length, b"x" * (2 * 2**20))  # small arguments, a big function
    with zfarm.Client(endpoint) as client:
        with pytest.raises(zfarm.PayloadTooLarge) as caught:
            client.submit(big_function)
        assert "function" in caught.value.what and caught.value.size > 2 * 2**20
        assert client.submit(jobs.length, b"x" * 1000).result(30) == 1000  # the client goes on
