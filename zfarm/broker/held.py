"""Results the broker holds for its clients: payloads in memory up to a bound, on disk past it.

::

    a job ends ──keep──► under held_memory_bytes ──► Held.frames in memory (counted in memory_bytes)
                         past it, or a session's   ──► on disk only: the journal (it has the row
                         result with a journal          already) or, without one, the spill file
    a rerun asks again ──read──► memory, or read back from disk and checked against its seal

The bound counts payload bytes. A result on disk leaves in memory only its outcome and digest
(what a rerun is compared with); its payload, message and timings are read back with it. What
cannot be written to disk stays in memory: nothing held is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zfarm.broker.journal import Journal
from zfarm.broker.spill import Spill
from zfarm.broker.state import Held
from zfarm.protocol import buffer_of

#: the timings of a result whose record is on disk (shared: a held result on disk costs little memory)
ON_DISK: list[Any] = []


class HeldResults:
    """Where each held result's payload lives; the records themselves stay in each client's ``held``."""

    def __init__(self, limit_bytes: int, journal: Journal | None, spill: Spill | None) -> None:
        self.limit_bytes = limit_bytes
        self.journal = journal
        self.spill = spill
        self.memory_bytes = 0  # payloads held in memory now
        self.on_disk = 0  # results whose payload is on disk only

    def keep(self, client_id: str, seq: int, held: Held, disk_only: bool = False) -> None:
        """Keep ``held``'s payload in memory if it fits under the bound, else on disk.

        ``disk_only``: the payload is already in the journal and should leave memory (a session's).
        """
        if not disk_only:
            size = 0
            for f in held.frames or ():  # (once per result: bytes, the usual small frame, no memoryview)
                size += len(f) if type(f) is bytes else memoryview(buffer_of(f)).nbytes
            over = size and self.memory_bytes + size > self.limit_bytes
            if not over or not self._to_disk(client_id, seq, held):  # (what cannot go to disk stays)
                held.size = size
                self.memory_bytes += size
                return
        held.frames, held.size, held.info, held.stats = None, 0, "", ON_DISK
        self.on_disk += 1

    def _to_disk(self, client_id: str, seq: int, held: Held) -> bool:
        if self.journal is not None:
            return True  # the journal has the row already (written with the result)
        return self.spill is not None and self.spill.put(client_id, seq, held)

    def read(self, client_id: str, seq: int, held: Held) -> Held | None:
        """A held result whole (payload, message, timings), from memory or from disk (None: it is gone).

        Raises:
            JournalCorrupted: the row on disk no longer matches its seal.
        """
        if held.frames is not None:
            return held
        whole = (self.journal.held_result(client_id, seq) if self.journal is not None
                 else self.spill.get(client_id, seq, held) if self.spill is not None else None)
        if whole is not None:
            whole.kind = held.kind  # (the record in memory knows it; the row on disk does not)
        return whole

    def forget(self, client_id: str, seq: int, held: Held) -> None:
        """A held result is dropped (the caller drops its journal row)."""
        if held.frames is not None:
            self.memory_bytes -= held.size
        else:
            self.on_disk -= 1
            if self.journal is None and self.spill is not None:
                self.spill.drop(client_id, seq)
        held.frames, held.size = None, 0

    def forget_client(self, client_id: str, helds: Iterable[Held]) -> None:
        """Every result held for a client is dropped."""
        spilled = False
        for held in helds:
            if held.frames is not None:
                self.memory_bytes -= held.size
            else:
                self.on_disk -= 1
                spilled = True
        if spilled and self.journal is None and self.spill is not None:
            self.spill.drop_client(client_id)

    def recovered(self, count: int) -> None:
        """Results read back from the journal: on disk only."""
        self.on_disk += count

    @staticmethod
    def on_disk_record(outcome: int, digest: bytes) -> Held:
        """What memory keeps of a result whose record is on disk."""
        return Held(outcome, None, "", ON_DISK, digest)
