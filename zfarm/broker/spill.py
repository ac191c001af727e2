"""Where a broker without a journal puts held results past its memory bound: a temporary SQLite file.

The file is made on first use in the temporary folder and unlinked at once (SQLite keeps
it open), so it takes disk space only while the broker runs and nothing is left behind
by a crash. Nothing is synced: it is memory that happens to live on disk. Every row is
sealed like the journal's and checked when read back.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
from typing import Any

import msgpack

from zfarm.broker.journal_rows import seal
from zfarm.broker.state import Held
from zfarm.errors import JournalCorrupted
from zfarm.protocol import as_bytes

log = logging.getLogger(__name__)


class Spill:
    """Held result payloads on disk, by client and job number."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self.problem = ""  # why the last write failed ("" if it did not): results then stay in memory
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            fd, path = tempfile.mkstemp(prefix="zfarm-held-", suffix=".db", dir=self.folder)
            os.close(fd)
            try:
                db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=OFF")
                db.execute("PRAGMA synchronous=OFF")
                db.execute("CREATE TABLE results(client TEXT, seq INTEGER, frames BLOB NOT NULL, "
                           "seal BLOB NOT NULL, PRIMARY KEY(client, seq))")
            finally:
                os.unlink(path)  # SQLite keeps it open; the space is freed when the broker exits
            log.info("held results past the memory bound go to a temporary file in %s",
                     self.folder or tempfile.gettempdir())
            self._db = db
        return self._db

    def put(self, client_id: str, seq: int, held: Held) -> bool:
        """Write a result's payload, message and timings; False if it cannot be written (it stays in
        memory then)."""
        payload = [as_bytes(f) for f in held.frames or ()]
        blob = msgpack.packb([payload, held.info, held.stats], use_bin_type=True)
        try:
            self._open().execute("INSERT OR REPLACE INTO results VALUES(?, ?, ?, ?)",
                                 (client_id, seq, blob, seal("spill", client_id, seq, blob)))
        except (sqlite3.Error, OSError) as exc:
            if not self.problem:
                log.error("cannot write held results to a temporary file in %s: %s; they stay in memory",
                          self.folder or tempfile.gettempdir(), exc)
            self.problem = str(exc)
            return False
        self.problem = ""
        return True

    def get(self, client_id: str, seq: int, held: Held) -> Held | None:
        """A result whole, ``held`` filled in from disk (None if none was written).

        Raises:
            JournalCorrupted: the row no longer matches its seal.
        """
        if self._db is None:
            return None
        where = f"the broker's spill file in {self.folder or tempfile.gettempdir()}"
        try:
            row = self._db.execute("SELECT frames, seal FROM results WHERE client=? AND seq=?",
                                   (client_id, seq)).fetchone()
        except sqlite3.Error as exc:
            raise JournalCorrupted(f"{client_id}:{seq}", where, f"reading it failed: {exc}") from None
        if row is None:
            return None
        if row[1] != seal("spill", client_id, seq, row[0]):
            raise JournalCorrupted(f"{client_id}:{seq}", where, "its held result fails its seal")
        frames, info, stats = msgpack.unpackb(row[0], raw=False)
        return Held(held.outcome, frames, info, stats, held.digest)

    def drop(self, client_id: str, seq: int) -> None:
        self._execute("DELETE FROM results WHERE client=? AND seq=?", (client_id, seq))

    def drop_client(self, client_id: str) -> None:
        self._execute("DELETE FROM results WHERE client=?", (client_id,))

    def _execute(self, sql: str, args: tuple[Any, ...]) -> None:
        if self._db is None:
            return
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            log.warning("spill file: %s", exc)  # a row left behind costs disk only until the broker exits

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
