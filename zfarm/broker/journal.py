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

Nothing read back is trusted: every row carries a seal (a hash of its columns) checked
when the journal is opened and whenever a payload is read again. A row that fails it is
reported as :class:`Damaged`, never run or delivered. The write-ahead log is checked
before SQLite writes to it (:mod:`zfarm.broker.wal`), against its frames' checksums and against the
mark of where it ended at the last commit; a marker in the main file tells a broker that
stopped cleanly from one whose log is gone.

When a write fails (a full disk), the changes stay in memory and are written again
later, one try a second: :attr:`Journal.problem` says why until then.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from typing import Any

import msgpack

from zfarm.broker.journal_rows import (
    Damaged,
    JournalJob,
    JournalProject,
    Recovered,
    losses_of,
    pack,
    pack_frames,
    seal,
    sound,
    unpack,
)
from zfarm.broker.state import Held, Job
from zfarm.broker.wal import WalMark, inspect_wal, wal_exists, wal_path
from zfarm.errors import JournalCorrupted, ZfarmError
from zfarm.protocol import as_bytes

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: every row sealed (1 had no seals: its rows are read unchecked)
_TABLES = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients(id TEXT PRIMARY KEY, session TEXT NOT NULL, key TEXT NOT NULL,
    seal BLOB NOT NULL DEFAULT x'');
CREATE TABLE IF NOT EXISTS functions(client TEXT, fn BLOB, blob BLOB NOT NULL, seal BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY(client, fn));
CREATE TABLE IF NOT EXISTS jobs(client TEXT, seq INTEGER, fn BLOB NOT NULL, frames BLOB NOT NULL,
    options BLOB NOT NULL, queued_at REAL NOT NULL, digest BLOB NOT NULL, losses BLOB NOT NULL,
    attempts_before INTEGER NOT NULL, seal BLOB NOT NULL DEFAULT x'', PRIMARY KEY(client, seq));
CREATE TABLE IF NOT EXISTS results(client TEXT, seq INTEGER, outcome INTEGER NOT NULL,
    frames BLOB NOT NULL, info TEXT NOT NULL, stats BLOB NOT NULL, digest BLOB NOT NULL,
    seal BLOB NOT NULL DEFAULT x'', PRIMARY KEY(client, seq));
CREATE TABLE IF NOT EXISTS projects(name TEXT PRIMARY KEY, state BLOB NOT NULL, seal BLOB NOT NULL);
"""
#: the tables of schema 1, which had no seals (``projects`` came later, sealed from the start)
_SEALED = ("clients", "functions", "jobs", "results")
_RESULT_COLUMNS = "client, seq, outcome, frames, info, stats, digest, seal"
#: a journal that cannot be written is tried again this often (each try writes every waiting change)
RETRY_S = 1.0


class Journal:
    """Record changes as they happen; :meth:`commit` makes them durable."""

    def __init__(self, path: str, sync: str = "full") -> None:
        """``sync``: one of config.JOURNAL_SYNC_MODES (BrokerSettings checks it)."""
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ZfarmError(f"cannot open the journal {path}: the folder {folder} does not exist")
        self.path = path
        #: why the journal cannot be written now ("" when it can); the changes wait in memory meanwhile
        self.problem = ""
        self._pending: list[tuple[str, tuple[Any, ...]]] = []  # this turn's changes, or all unwritten ones
        self._retry_at = 0.0
        self._mark = WalMark(path)
        had_wal = wal_exists(path)  # before SQLite makes an empty one
        try:
            self._db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")  # a second broker on this file fails
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute(f"PRAGMA synchronous={sync.upper()}")
            # A log that starts a new pass is cut to nothing, so its size is always the end of the
            # current pass: the mark (wal.py) then tells a lost tail also after a checkpoint.
            self._db.execute("PRAGMA journal_size_limit=0")
            self._db.execute("BEGIN IMMEDIATE")  # takes the lock now, not at the first job
            # Ours alone now, and SQLite has only read the log: what it will drop is still there.
            lost = (self._check_wal() or self._mark.check()) if had_wal else ""
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:  # another program's database: not ours to change
                raise sqlite3.DatabaseError(f"it holds other tables ({', '.join(sorted(tables)[:5])})")
            for statement in _TABLES.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._check_schema()
            if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed")
            lost = lost or ("" if had_wal else self._missing_wal())
            self._db.execute("COMMIT")
            self._saved = self._load()
        except (sqlite3.Error, OSError) as exc:
            if hasattr(self, "_db"):
                self._db.close()  # and its lock with it
            raise ZfarmError(f"cannot open the journal {path}: {exc} (is another broker using it? "
                             "is it a zfarm journal? a damaged one can be moved aside to start afresh)"
                             ) from None
        self._saved.lost = lost
        self._mark_open()
        if mode.lower() == "wal":
            self._mark.start()
        else:
            log.warning("journal %s: SQLite refused WAL mode (%s); it still works, more slowly", path, mode)

    def _check_wal(self) -> str:
        """What the write-ahead log lost, checked before SQLite drops it ("" if nothing); a damaged log
        is copied aside first, for whoever wants to look at it."""
        damage = inspect_wal(wal_path(self.path))
        if not damage.problem:
            return ""
        aside = f"{wal_path(self.path)}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            shutil.copyfile(wal_path(self.path), aside)
            kept = f"A copy is kept as {aside}"
        except OSError as exc:  # a full disk, most likely: say so and go on
            kept = f"No copy could be kept ({exc})"
        lost = damage.transactions_lost
        count = ("an unknown number of transactions" if lost < 0 else
                 f"{lost} whole transaction{'' if lost == 1 else 's'} after the damaged one")
        return (f"its write-ahead log {wal_path(self.path)} is damaged: {damage.problem}. SQLite drops the "
                f"last {damage.bytes_lost} bytes ({count}): jobs and results written there are lost (or, "
                f"if it ends mid-transaction, the broker died while writing one it had not yet promised). "
                f"{kept}")

    def _missing_wal(self) -> str:
        """Whether the last broker stopped without closing while its write-ahead log is now gone."""
        row = self._db.execute("SELECT value FROM meta WHERE key='open'").fetchone()
        if row is None or row[0] != "1":
            return ""
        return (f"its write-ahead log {wal_path(self.path)} is missing, but the broker that used it last did "
                "not stop cleanly: everything it wrote since its last checkpoint (jobs, results) is lost. "
                "If the file was copied without it, stop this broker and put the -wal file back")

    def _mark_open(self) -> None:
        """Note in the main file (not only in the log) that a broker has it open; a clean close clears it."""
        self._write("INSERT OR REPLACE INTO meta VALUES('open', '1')", ())
        if self.commit():
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("journal %s: checkpoint failed: %s", self.path, exc)

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] == "1":  # written before seals: add the column; its rows are read unchecked
            for table in _SEALED:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN seal BLOB NOT NULL DEFAULT x''")
            self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"journal schema {row[0]}, this zfarm reads {SCHEMA_VERSION}")

    def load(self) -> Recovered:
        """What the journal held when it was opened (read and checked once, at open), handed over once:
        the journal keeps no copy of it (a second call returns nothing)."""
        saved, self._saved = self._saved, Recovered()
        return saved

    def _load(self) -> Recovered:
        db = self._db
        out = Recovered()
        for cid, session, key, stored in db.execute("SELECT id, session, key, seal FROM clients"):
            if sound("clients", stored, cid, session, key):
                out.clients.append((cid, session, key))
            else:
                out.damaged.append(Damaged("clients", cid, -1))
        for cid, fn, blob, stored in db.execute("SELECT client, fn, blob, seal FROM functions"):
            if sound("functions", stored, cid, fn, blob):
                out.functions.append((cid, fn, blob))
            else:
                out.damaged.append(Damaged("functions", cid, -1, fn))
        for c, seq, fn, frames, options, queued_at, digest, losses, before, stored in db.execute(
                "SELECT client, seq, fn, frames, options, queued_at, digest, losses, attempts_before, seal "
                "FROM jobs ORDER BY queued_at, client, seq"):
            try:
                if not sound("jobs", stored, c, seq, fn, frames, options, queued_at, digest, before):
                    raise ValueError("seal")
                out.jobs.append(JournalJob(c, seq, fn, unpack(frames), unpack(options), queued_at, digest,
                                           losses_of(losses), before))
            except (ValueError, TypeError, msgpack.UnpackException):
                out.damaged.append(Damaged("jobs", c, seq))
        for c, seq, outcome, frames, info, stats, digest, stored in db.execute(
                f"SELECT {_RESULT_COLUMNS} FROM results ORDER BY client, seq"):
            try:
                if not sound("results", stored, c, seq, outcome, frames, info, stats, digest):
                    raise ValueError("seal")
                # the payload is read again (and checked again) when it is sent
                out.results.append((c, seq, Held(outcome, None, info, unpack(stats), digest)))
            except (ValueError, TypeError, msgpack.UnpackException):
                out.damaged.append(Damaged("results", c, seq))
        self._load_projects(out)
        return out

    def _load_projects(self, out: Recovered) -> None:
        for rowid, name, state, stored in self._db.execute(
                "SELECT rowid, name, state, seal FROM projects ORDER BY name"):
            try:
                if not stored or not sound("projects", stored, name, state):  # (sealed from the start)
                    raise ValueError("seal")
                out.projects.append(JournalProject.from_row(name, unpack(state)))
            except (ValueError, TypeError, msgpack.UnpackException):
                out.damaged.append(Damaged("projects", str(name), -1, rowid=rowid))  # (name: maybe not text)

    # ---- changes (one transaction per turn of the broker's loop) ----------------------------------

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        self._pending.append((sql, args))
        if self.problem:
            return  # written with the others once the journal can be written again
        try:
            if not self._db.in_transaction:
                self._db.execute("BEGIN")
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            self._failed(exc)

    def client(self, client_id: str, session: str, key: str) -> None:
        self._write("INSERT OR REPLACE INTO clients VALUES(?, ?, ?, ?)",
                    (client_id, session, key, seal("clients", client_id, session, key)))

    def drop_client(self, client_id: str) -> None:
        for table, column in (("clients", "id"), ("functions", "client"), ("jobs", "client"),
                              ("results", "client")):
            self._write(f"DELETE FROM {table} WHERE {column}=?", (client_id,))

    def function(self, client_id: str, fn_id: bytes, blob: Any) -> None:
        raw = as_bytes(blob)
        self._write("INSERT OR REPLACE INTO functions VALUES(?, ?, ?, ?)",
                    (client_id, fn_id, raw, seal("functions", client_id, fn_id, raw)))

    def drop_function(self, client_id: str, fn_id: bytes) -> None:
        self._write("DELETE FROM functions WHERE client=? AND fn=?", (client_id, fn_id))

    def job(self, job: Job, queued_at: float) -> None:
        row = (job.client_id, job.seq, job.fn_id, pack_frames(job.frames), pack(job.options), queued_at,
               job.digest, pack(list(job.losses)), len(job.history))
        sealed = seal("jobs", *row[:7], row[8])
        self._write("INSERT OR REPLACE INTO jobs VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, sealed))

    def losses(self, job: Job) -> None:
        self._write("UPDATE jobs SET losses=? WHERE client=? AND seq=?",
                    (pack(list(job.losses)), job.client_id, job.seq))

    def drop_job(self, client_id: str, seq: int) -> None:
        self._write("DELETE FROM jobs WHERE client=? AND seq=?", (client_id, seq))

    def result(self, client_id: str, seq: int, held: Held) -> None:
        """The job ended: its result replaces it until the client has it."""
        self.drop_job(client_id, seq)
        row = (client_id, seq, held.outcome, pack_frames(held.frames or ()), held.info, pack(held.stats),
               held.digest)
        self._write("INSERT OR REPLACE INTO results VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                    (*row, seal("results", *row)))

    def held_result(self, client_id: str, seq: int) -> Held | None:
        """A held result, payload included, read back to send it again (None if the journal has none).

        Raises:
            JournalCorrupted: the row no longer matches its seal.
        """
        query = f"SELECT {_RESULT_COLUMNS} FROM results WHERE client=? AND seq=?"
        try:
            row = self._db.execute(query, (client_id, seq)).fetchone()
        except sqlite3.Error as exc:
            raise JournalCorrupted(f"{client_id}:{seq}", self.path, f"reading it failed: {exc}") from None
        if row is None:
            row = self._unwritten_result(client_id, seq)
            if row is None:
                return None
        elif not sound("results", row[7], *row[:7]):
            raise JournalCorrupted(f"{client_id}:{seq}", self.path, "its held result fails its seal")
        try:
            return Held(row[2], list(unpack(row[3])), row[4], unpack(row[5]), row[6])
        except (ValueError, TypeError, msgpack.UnpackException):
            detail = "its held result cannot be read"
            raise JournalCorrupted(f"{client_id}:{seq}", self.path, detail) from None

    def _unwritten_result(self, client_id: str, seq: int) -> tuple[Any, ...] | None:
        """A result row that waits to be written (the journal cannot be written now)."""
        for sql, args in reversed(self._pending):
            if args[:2] == (client_id, seq) and "results" in sql:
                return args if sql.startswith("INSERT") else None
        return None

    def project(self, row: JournalProject) -> None:
        """A project's state, settings and counts as they are now (they replace the ones written before)."""
        state = pack(row.to_state())
        self._write("INSERT OR REPLACE INTO projects VALUES(?, ?, ?)",
                    (row.name, state, seal("projects", row.name, state)))

    def drop_project(self, name: str) -> None:
        self._write("DELETE FROM projects WHERE name=?", (name,))

    def drop_project_row(self, rowid: int) -> None:
        """Delete a damaged project row by its rowid (its name may be no text, or not what was written)."""
        self._write("DELETE FROM projects WHERE rowid=?", (rowid,))

    def drop_result(self, client_id: str, seq: int) -> None:
        self._write("DELETE FROM results WHERE client=? AND seq=?", (client_id, seq))

    def commit(self) -> bool:
        """Make every change since the last commit durable (a no-op when there was none).

        Returns whether everything is on disk. When it is not (the disk is full…), the changes
        wait in memory and are written with the next ones; :attr:`problem` says why.
        """
        if not self._pending:
            return True
        if self.problem:
            if time.monotonic() < self._retry_at:
                return False
            try:
                self._db.execute("BEGIN")
                for sql, args in self._pending:
                    self._db.execute(sql, args)
            except sqlite3.Error as exc:
                self._failed(exc)
                return False
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc)
            return False
        self._mark.note()
        if self.problem:
            log.warning("journal %s can be written again: %d waiting changes written", self.path,
                        len(self._pending))
            self.problem = ""
        self._pending.clear()
        return True

    def _failed(self, exc: sqlite3.Error) -> None:
        """A write failed: undo the open transaction (SQLite may have already) and keep the changes."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # nothing more to undo
        name = getattr(exc, "sqlite_errorname", "")  # SQLITE_FULL, SQLITE_IOERR_WRITE …
        problem = f"{exc} ({name})" if name else str(exc)
        if not self.problem:
            log.error("cannot write the journal %s: %s; refusing new jobs until it can be written (free "
                      "space, or stop the broker and move the journal); trying again every %g s", self.path,
                      problem, RETRY_S)
        self.problem = problem
        self._retry_at = time.monotonic() + RETRY_S

    def close(self) -> None:
        try:
            self._write("INSERT OR REPLACE INTO meta VALUES('open', '0')", ())  # a clean stop
            self._retry_at = 0.0
            if not self.commit():
                log.error("journal %s closed with %d changes that could not be written: %s", self.path,
                          len(self._pending), self.problem)
        finally:
            self._db.close()
            self._mark.close(clean=True)

    def abandon(self) -> None:
        """Close without writing the changes made since the last commit (the turn did not finish)."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        finally:
            self._db.close()
            self._mark.close(clean=False)
