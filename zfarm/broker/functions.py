"""The functions clients send: kept while jobs use them, and a little after (more may come).

A client sends a function once with its first jobs; the broker keeps it (and journals it) while
any of that client's unfinished jobs runs it (``fn_users``, kept by the job moves), then
``FN_KEEP_S`` longer. A job that arrives for a
function let go is bounced with ``ResultKind.FUNCTION_MISSING``, and the client sends it again.
"""

from __future__ import annotations

from typing import Any

from zfarm.broker.farm import Farm
from zfarm.broker.state import ClientRecord

#: how long a client's function outlives its last job at the broker (the client may send more)
FN_KEEP_S = 3.0


class Functions:
    def __init__(self, farm: Farm) -> None:
        self.farm = farm

    def store(self, client: ClientRecord, fn_id: bytes, blob: Any) -> None:
        client.fns[fn_id] = blob
        if self.farm.journal is not None:
            self.farm.journal.function(client.id, fn_id, blob)

    def idle_since(self, client: ClientRecord, fn_id: bytes, now: float) -> None:
        """A function no accepted job uses: let it go in time."""
        if not client.fn_users.get(fn_id):
            client.fn_idle.setdefault(fn_id, now)

    def idle_all(self, now: float) -> None:
        """After a restart: every function no job uses starts its time now."""
        for client in self.farm.clients.values():
            for fn_id in client.fns:
                if not client.fn_users.get(fn_id):
                    client.fn_idle[fn_id] = now

    def drop_idle(self, now: float) -> None:
        for client in self.farm.clients.values():
            for fn_id, since in list(client.fn_idle.items()):
                if now - since > FN_KEEP_S:
                    del client.fn_idle[fn_id]
                    client.fns.pop(fn_id, None)
                    client.fn_users.pop(fn_id, None)
                    if self.farm.journal is not None:
                        self.farm.journal.drop_function(client.id, fn_id)
