"""``inspect_wal`` on write-ahead logs written by SQLite itself, whole and damaged (no broker)."""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
from pathlib import Path

from zfarm.broker.journal import Journal
from zfarm.broker.state import Job, Queue
from zfarm.broker.wal import WalMark, inspect_wal


def crashed_log(tmp_path: Path, transactions: int = 6, restart: bool = False) -> Path:
    """A WAL as a crashed writer leaves it: copied while the database is still open."""
    db = sqlite3.connect(tmp_path / "db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t(x BLOB)")
    for _ in range(transactions):
        db.execute("INSERT INTO t VALUES(?)", (os.urandom(3000),))
    if restart:  # everything checkpointed: the next transaction writes the log again from its start
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        db.execute("INSERT INTO t VALUES(?)", (b"after",))
    copy = tmp_path / "copy-wal"
    shutil.copyfile(tmp_path / "db-wal", copy)
    db.close()
    return copy


def test_a_log_left_by_a_crash_is_whole(tmp_path: Path) -> None:
    assert inspect_wal(str(crashed_log(tmp_path))).problem == ""
    assert inspect_wal(str(tmp_path / "missing")).problem == ""


def test_a_log_written_again_from_its_start_is_whole_despite_the_old_frames_after_it(tmp_path: Path) -> None:
    log = crashed_log(tmp_path, restart=True)
    assert log.stat().st_size > 6 * 4096  # the old pass's frames are still in the file
    assert inspect_wal(str(log)).problem == ""


def test_a_flipped_byte_is_found_with_the_transactions_after_it(tmp_path: Path) -> None:
    log = crashed_log(tmp_path, transactions=6)
    data = bytearray(log.read_bytes())
    data[32 + 24 + 100] ^= 1  # in the first frame's page
    log.write_bytes(bytes(data))
    damage = inspect_wal(str(log))
    assert "fails its checksum" in damage.problem and damage.transactions_lost >= 5
    assert damage.bytes_lost == len(data) - 32


def test_a_cut_log_is_found(tmp_path: Path) -> None:
    log = crashed_log(tmp_path)
    os.truncate(log, log.stat().st_size - 1000)
    damage = inspect_wal(str(log))
    assert "middle of a frame" in damage.problem and damage.bytes_lost > 0
    os.truncate(log, 20)
    assert "header is cut short" in inspect_wal(str(log)).problem


def test_the_mark_tells_a_log_cut_at_a_transactions_end_and_goes_with_a_clean_stop(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(str(path))
    for seq in range(1, 4):  # three transactions
        journal.job(Job("c", seq, b"fn", (os.urandom(3000),), {}, 0.0, Queue("", "c")), 0.0)
        assert journal.commit()
    wal = Path(str(path) + "-wal")
    mark = WalMark(str(path))
    assert Path(mark.path).exists() and mark.check() == ""  # whole
    shutil.copyfile(wal, tmp_path / "saved-wal")
    journal.close()
    assert not wal.exists() and not Path(mark.path).exists()  # a clean stop: log and mark gone

    shutil.copyfile(tmp_path / "saved-wal", wal)  # as after a crash, then cut by a whole frame
    Path(mark.path).write_bytes(wal.read_bytes()[16:24] + wal.stat().st_size.to_bytes(8, "big"))
    os.truncate(wal, wal.stat().st_size - 4120)
    assert "bytes shorter than when the broker last committed" in mark.check()


def test_the_mark_tells_a_cut_log_also_after_a_checkpoint_started_a_new_pass(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(str(path))
    wal = Path(str(path) + "-wal")
    sizes = []
    for seq in range(1, 700):  # past SQLite's automatic checkpoint: the log starts from its beginning
        journal.job(Job("c", seq, b"fn", (os.urandom(8000),), {}, 0.0, Queue("", "c")), 0.0)
        assert journal.commit()
        sizes.append(wal.stat().st_size)
    assert any(b < a for a, b in itertools.pairwise(sizes)), "no new pass: the test proves nothing"
    mark = WalMark(str(path))
    assert mark.check() == ""
    os.truncate(wal, wal.stat().st_size - 8232)  # the last transaction's frames, as a power cut loses them
    assert "bytes shorter than when the broker last committed" in mark.check()
    journal.close()
