"""The broker's journal: what it holds for clients, in SQLite, so that a restarted broker goes on.

::

    Scheduler ──job / result / forget …──► Journal (one open transaction)
    Broker loop: drain → tick → flush ──► journal.commit() ──► send

Every change one turn of the broker's loop makes is written in one transaction,
committed before anything that turn produced is sent: a client told a job was
accepted, or a worker given it, can count on it surviving a crash of the broker.
The journal holds only what is owed: accepted jobs until they end, results until
their client says it received them (a session's, until the session ends), and the
functions those jobs need.
It stays small however long the broker runs.

SQLite in WAL mode. With ``sync="full"`` (the default) a commit is on disk when it
returns, so a power cut loses nothing either; ``sync="normal"`` leaves the flush to
the operating system: the journal survives the broker's death, not the machine's.
One broker at a time: the file is locked.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from zfarm.errors import ZfarmError
from zfarm.protocol import as_bytes
from zfarm.state import Held, Job

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_TABLES = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients(id TEXT PRIMARY KEY, session TEXT NOT NULL, key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS functions(client TEXT, fn BLOB, blob BLOB NOT NULL, PRIMARY KEY(client, fn));
CREATE TABLE IF NOT EXISTS jobs(client TEXT, seq INTEGER, fn BLOB NOT NULL, frames BLOB NOT NULL,
    options BLOB NOT NULL, queued_at REAL NOT NULL, digest BLOB NOT NULL, losses BLOB NOT NULL,
    attempts_before INTEGER NOT NULL, PRIMARY KEY(client, seq));
CREATE TABLE IF NOT EXISTS results(client TEXT, seq INTEGER, outcome INTEGER NOT NULL,
    frames BLOB NOT NULL, info TEXT NOT NULL, stats BLOB NOT NULL, digest BLOB NOT NULL,
    PRIMARY KEY(client, seq));
"""


@dataclass(frozen=True, slots=True)
class JournalJob:
    client: str
    seq: int
    fn_id: bytes
    frames: list[bytes]
    options: dict[str, Any]
    queued_at: float  # epoch seconds
    digest: bytes
    losses: tuple[str, ...]
    attempts_before: int  # attempts of jobs it replaced under the same number (their results are void)


@dataclass(slots=True)
class Recovered:
    """What a journal held when it was opened, oldest first."""

    clients: list[tuple[str, str, str]] = field(default_factory=list)  # id, session, CURVE key
    functions: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # client, fn_id, blob
    jobs: list[JournalJob] = field(default_factory=list)
    results: list[tuple[str, int, Held]] = field(default_factory=list)  # client, seq, result


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


def _frames(frames: Iterable[Any]) -> bytes:
    return _pack([as_bytes(f) for f in frames])


class Journal:
    """Record changes as they happen; :meth:`commit` makes them durable."""

    def __init__(self, path: str, sync: str = "full") -> None:
        """``sync``: one of config.JOURNAL_SYNC_MODES (BrokerSettings checks it)."""
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ZfarmError(f"cannot open the journal {path}: the folder {folder} does not exist")
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")  # a second broker on this file fails
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute(f"PRAGMA synchronous={sync.upper()}")
            self._db.execute("BEGIN IMMEDIATE")  # takes the lock now, not at the first job
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:  # another program's database: not ours to change
                raise sqlite3.DatabaseError(f"it holds other tables ({', '.join(sorted(tables)[:5])})")
            for statement in _TABLES.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._check_schema()
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if hasattr(self, "_db"):
                self._db.close()  # and its lock with it
            raise ZfarmError(f"cannot open the journal {path}: {exc} (is another broker using it? "
                             "is it a zfarm journal?)") from None
        if mode.lower() != "wal":
            log.warning("journal %s: SQLite refused WAL mode (%s); it still works, more slowly", path, mode)
        self._dirty = False

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"journal schema {row[0]}, this zfarm reads {SCHEMA_VERSION}")

    def load(self) -> Recovered:
        db = self._db
        out = Recovered()
        out.clients = [tuple(row) for row in db.execute("SELECT id, session, key FROM clients")]
        out.functions = [tuple(row) for row in db.execute("SELECT client, fn, blob FROM functions")]
        for c, seq, fn, frames, options, queued_at, digest, losses, before in db.execute(
                "SELECT client, seq, fn, frames, options, queued_at, digest, losses, attempts_before "
                "FROM jobs ORDER BY queued_at, client, seq"):
            out.jobs.append(JournalJob(c, seq, fn, _unpack(frames), _unpack(options), queued_at, digest,
                                       tuple(_unpack(losses)), before))
        for c, seq, outcome, info, stats, digest in db.execute(
                "SELECT client, seq, outcome, info, stats, digest FROM results ORDER BY client, seq"):
            out.results.append((c, seq, Held(outcome, None, info, _unpack(stats), digest)))  # frames: lazily
        return out

    # ---- changes (one transaction per turn of the broker's loop) ----------------------------------

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        if not self._dirty:
            self._db.execute("BEGIN")
            self._dirty = True
        self._db.execute(sql, args)

    def client(self, client_id: str, session: str, key: str) -> None:
        self._write("INSERT OR REPLACE INTO clients VALUES(?, ?, ?)", (client_id, session, key))

    def drop_client(self, client_id: str) -> None:
        for table, column in (("clients", "id"), ("functions", "client"), ("jobs", "client"),
                              ("results", "client")):
            self._write(f"DELETE FROM {table} WHERE {column}=?", (client_id,))

    def function(self, client_id: str, fn_id: bytes, blob: Any) -> None:
        self._write("INSERT OR REPLACE INTO functions VALUES(?, ?, ?)",
                    (client_id, fn_id, as_bytes(blob)))

    def drop_function(self, client_id: str, fn_id: bytes) -> None:
        self._write("DELETE FROM functions WHERE client=? AND fn=?", (client_id, fn_id))

    def job(self, job: Job, queued_at: float) -> None:
        self._write("INSERT OR REPLACE INTO jobs VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.client_id, job.seq, job.fn_id, _frames(job.frames), _pack(job.options), queued_at,
                     job.digest, _pack(list(job.losses)), len(job.history)))

    def losses(self, job: Job) -> None:
        self._write("UPDATE jobs SET losses=? WHERE client=? AND seq=?",
                    (_pack(list(job.losses)), job.client_id, job.seq))

    def drop_job(self, client_id: str, seq: int) -> None:
        self._write("DELETE FROM jobs WHERE client=? AND seq=?", (client_id, seq))

    def result(self, client_id: str, seq: int, held: Held) -> None:
        """The job ended: its result replaces it until the client has it."""
        self.drop_job(client_id, seq)
        self._write("INSERT OR REPLACE INTO results VALUES(?, ?, ?, ?, ?, ?, ?)",
                    (client_id, seq, held.outcome, _frames(held.frames or ()), held.info, _pack(held.stats),
                     held.digest))

    def result_frames(self, client_id: str, seq: int) -> list[bytes] | None:
        """A held result's payload, read back to send it again (None if the journal has none)."""
        query = "SELECT frames FROM results WHERE client=? AND seq=?"
        row = self._db.execute(query, (client_id, seq)).fetchone()
        return None if row is None else list(_unpack(row[0]))

    def drop_result(self, client_id: str, seq: int) -> None:
        self._write("DELETE FROM results WHERE client=? AND seq=?", (client_id, seq))

    def commit(self) -> None:
        """Make every change since the last commit durable (a no-op when there was none)."""
        if self._dirty:
            self._db.execute("COMMIT")
            self._dirty = False

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()

    def abandon(self) -> None:
        """Close without writing the changes made since the last commit (the turn did not finish)."""
        try:
            if self._dirty:
                self._db.execute("ROLLBACK")
        finally:
            self._db.close()
