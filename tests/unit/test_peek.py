"""Live output (PEEK, PEEK_REPLY): the messages and their bounds, the broker's relay, the worker's
core, and the follower's arithmetic. No sockets, no processes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import msgpack
import pytest

from tests.unit.test_scheduler import CA, MON, W1, W2, Farm, job_rows, to
from zfarm import output, scratch
from zfarm import protocol as p
from zfarm.config import WorkerSettings
from zfarm.errors import ProtocolError
from zfarm.follow import STARTED_OVER, STDERR, STDOUT, Position
from zfarm.worker.core import WorkerCore

CHUNK = p.PEEK_CHUNK_BYTES


def wire(msg: p.Message) -> p.Message:
    return p.decode(p.encode(msg))


def test_peek_and_its_reply_cross_the_wire() -> None:
    peek = p.Peek("s-array-x", 7, [0, -1], 3, b"\x00route")
    assert wire(peek) == peek
    reply = p.PeekReply("s-array-x", 7, 3, p.PeekStatus.RUNNING, [10, -1], [99, -1], [123, 0], b"",
                        [b"x" * CHUNK, b""])
    back = wire(reply)
    assert isinstance(back, p.PeekReply)
    assert (back.status, back.offsets, back.sizes, back.ids) == (p.PeekStatus.RUNNING, [10, -1], [99, -1],
                                                                 [123, 0])
    assert [bytes(f) for f in back.frames] == [b"x" * CHUNK, b""]
    queued = wire(p.PeekReply("c", 1, 0, p.PeekStatus.QUEUED))
    assert isinstance(queued, p.PeekReply) and queued.status == p.PeekStatus.QUEUED and not queued.frames


def _envelope(msg: p.Message, **changes: object) -> list[bytes]:
    """``msg``'s frames with envelope fields replaced (bypassing the dataclass)."""
    frames = p.encode(msg)
    names = [f.name for f in dataclasses.fields(msg) if f.name != "frames"]
    fields = msgpack.unpackb(frames[2])
    for name, value in changes.items():
        fields[names.index(name)] = value
    return [frames[0], frames[1], msgpack.packb(fields, use_bin_type=True), *frames[3:]]


@pytest.mark.parametrize("changes", [
    {"offsets": [0]},  # one stream
    {"offsets": [0, -2]},  # below "not wanted"
    {"offsets": [0, 2**63]},  # past any file
    {"offsets": [0, True]},
    {"seq": -1},
    {"ask": -1},
    {"reply_to": b"r" * (p.MAX_ROUTE_BYTES + 1)},
    {"client_id": "c" * (p.MAX_ID_CHARS + 1)},
])
def test_a_malformed_peek_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        p.decode(_envelope(p.Peek("c", 1, [0, 0]), **changes))


def test_a_reply_s_chunks_are_bounded_and_come_only_with_running() -> None:
    too_big = p.PeekReply("c", 1, 0, p.PeekStatus.RUNNING, [0, 0], [0, 0], [1, 1], b"",
                          [b"x" * (CHUNK + 1), b""])
    with pytest.raises(ProtocolError, match="at most"):
        wire(too_big)
    with pytest.raises(ProtocolError):  # a status without chunks carries none
        wire(p.PeekReply("c", 1, 0, p.PeekStatus.QUEUED, frames=[b"", b""]))
    with pytest.raises(ProtocolError):  # RUNNING carries both streams' chunks
        wire(p.PeekReply("c", 1, 0, p.PeekStatus.RUNNING, frames=[b"x"]))
    for changes in ({"status": 9}, {"sizes": [0, -2]}, {"ids": [-1, 0]}):
        with pytest.raises(ProtocolError):
            p.decode(_envelope(p.PeekReply("c", 1, 0, p.PeekStatus.FINISHED), **changes))


# ---- the broker: relayed to the job's worker, answered itself for any other job -------------------


def _running_on_w1() -> tuple[Farm, list[object]]:
    """Client ca's jobs 1 (on w1) and 2 (queued: w1 has one credit, w2 none); a monitor connected."""
    farm = Farm()
    farm.client(CA, "ca")
    farm.worker(W1, "w1", credit=1)
    farm.worker(W2, "w2")
    farm.send(MON, p.Hello("monitor", "m1", "laptop", 300, 0, {}), 0.0)
    farm.submit(CA, [1, 2], 0.0)
    (row,) = job_rows(farm.out(0.0), W1)
    return farm, row


def test_the_broker_relays_a_peek_to_the_job_s_worker_and_its_reply_back() -> None:
    farm, row = _running_on_w1()
    assert row[1] == 1
    farm.send(MON, p.Peek("ca", 1, [5, -1], 42), 1.0)
    out = farm.out(1.0)
    (forwarded,) = to(out, W1, p.Peek)
    assert (forwarded.client_id, forwarded.seq, forwarded.offsets, forwarded.ask) == ("ca", 1, [5, -1], 42)
    assert forwarded.reply_to == MON and not to(out, W2) and not to(out, MON)
    reply = p.PeekReply("ca", 1, 42, p.PeekStatus.RUNNING, [5, -1], [9, -1], [77, 0], MON, [b"abcd", b""])
    farm.send(W1, reply, 1.1)
    (relayed,) = to(farm.out(1.1), MON, p.PeekReply)
    assert relayed.reply_to == b"" and [bytes(f) for f in relayed.frames] == [b"abcd", b""]
    assert (relayed.ask, relayed.sizes, relayed.ids) == (42, [9, -1], [77, 0])
    assert farm.counter("malformed") == 0


def test_the_broker_answers_for_jobs_no_worker_runs() -> None:
    farm, row = _running_on_w1()
    farm.send(CA, p.Peek("ca", 2, [0, -1], 1), 1.0)  # queued: a client may ask too
    farm.send(CA, p.Peek("ca", 99, [0, -1], 2), 1.0)
    farm.send(CA, p.Peek("nobody", 1, [0, -1], 3), 1.0)
    out = farm.out(1.0)
    statuses = {m.ask: m.status for m in to(out, CA, p.PeekReply)}
    assert statuses == {1: p.PeekStatus.QUEUED, 2: p.PeekStatus.UNKNOWN, 3: p.PeekStatus.UNKNOWN}
    assert not to(out, W1) and not to(out, W2)
    farm.result(W1, row, 2.0)  # job 1 finished: its result is held for ca
    farm.out(2.0)
    farm.send(MON, p.Peek("ca", 1, [0, -1], 4), 2.1)
    (finished,) = to(farm.out(2.1), MON, p.PeekReply)
    assert finished.status == p.PeekStatus.FINISHED and not finished.frames


def test_a_reply_for_an_asker_that_left_is_dropped_and_a_worker_cannot_ask() -> None:
    farm, _ = _running_on_w1()
    farm.send(W1, p.PeekReply("ca", 1, 1, p.PeekStatus.FINISHED, reply_to=b"\x00gone"), 1.0)
    farm.send(W1, p.PeekReply("ca", 1, 1, p.PeekStatus.FINISHED, reply_to=W2), 1.0)  # to a worker: no
    assert farm.out(1.0) == []
    farm.send(W2, p.Peek("ca", 1, [0, 0]), 1.0)
    assert farm.out(1.0) == [] and farm.counter("malformed") == 1


def test_an_asker_has_a_bounded_number_of_peeks_at_workers_until_they_are_answered_or_forgotten() -> None:
    from zfarm.broker.peek import MAX_PEEKS_IN_FLIGHT, PEEK_FORGET_S

    farm, _ = _running_on_w1()
    for ask in range(MAX_PEEKS_IN_FLIGHT + 5):  # a flood: each would make the worker read 128 KiB
        farm.send(MON, p.Peek("ca", 1, [0, 0], ask), 1.0)
    forwarded = to(farm.out(1.0), W1, p.Peek)
    assert [m.ask for m in forwarded] == list(range(MAX_PEEKS_IN_FLIGHT))
    farm.send(W1, p.PeekReply("ca", 1, 0, p.PeekStatus.FINISHED, reply_to=MON), 1.1)  # one answered
    farm.send(MON, p.Peek("ca", 1, [0, 0], 100), 1.2)
    farm.send(MON, p.Peek("ca", 1, [0, 0], 101), 1.2)
    assert [m.ask for m in to(farm.out(1.2), W1, p.Peek)] == [100]
    farm.send(CA, p.Peek("ca", 1, [0, 0], 7), 1.2)  # another asker has its own bound
    assert [m.ask for m in to(farm.out(1.2), W1, p.Peek)] == [7]
    later = 1.0 + PEEK_FORGET_S + 0.5  # the worker never answered the rest: forgotten, room again
    farm.send(MON, p.Peek("ca", 1, [0, 0], 200), later)
    assert [m.ask for m in to(farm.out(later), W1, p.Peek)] == [200]
    assert farm.counter("malformed") == 0


# ---- the worker's core ------------------------------------------------------------------------------


def test_the_worker_reads_for_a_running_job_and_answers_for_others() -> None:
    core = WorkerCore(WorkerSettings(procs=1, prefetch=1), 0.0, host="h", pid=1)
    core.connect(0.0)
    core.on_message(p.Welcome("b", 1.0, 3, 1 << 20), 0.0)
    rows = [p.JobRow("ca", seq, 1, b"f" * 16, 0, {}).to_wire() for seq in (1, 2)]
    core.on_message(p.Jobs([b"f" * 16], rows, [b"blob"]), 0.1)
    assert [t.key for t in core.take_tasks(1, 0.2)] == [("ca", 1)]
    asked = p.Peek("ca", 1, [0, -1], 5, b"\x00asker")
    assert core.on_message(asked, 0.3).peek == [asked]  # the shell reads the files
    for seq, status in ((2, p.PeekStatus.QUEUED), (3, p.PeekStatus.FINISHED)):
        (reply,) = core.on_message(p.Peek("ca", seq, [0, -1], 6, b"\x00asker"), 0.3).send
        assert isinstance(reply, p.PeekReply)
        assert (reply.status, reply.reply_to, reply.ask) == (status, b"\x00asker", 6)


# ---- the follower's arithmetic ----------------------------------------------------------------------


def running(offset: int, chunk: bytes, size: int, file_id: int, stream: int = STDOUT) -> p.PeekReply:
    offsets, sizes, ids, frames = [-1, -1], [-1, -1], [0, 0], [b"", b""]
    offsets[stream], sizes[stream], ids[stream], frames[stream] = offset, size, file_id, chunk
    return p.PeekReply("c", 1, 1, p.PeekStatus.RUNNING, offsets, sizes, ids, b"", frames)


def test_the_follower_prints_each_byte_once_and_the_rest_from_the_kept_tail() -> None:
    at = Position()
    assert at.take(running(0, b"hello ", 6, 11, STDERR), STDERR) == (b"hello ", "")
    assert at.take(running(0, b"hello ", 6, 11, STDERR), STDERR) == (b"", "")  # a late answer to an old ask
    assert at.take(running(6, b"world", 11, 11, STDERR), STDERR) == (b"world", "")
    assert at.rest(b"hello world!\n", 0) == (b"!\n", "")
    assert at.rest(b"o world!\n", 4) == (b"!\n", "")  # 4 bytes cut before the kept tail: counted
    rest, note = at.rest(b"!!\n", 20)  # more was cut than we printed: said, and the tail printed whole
    assert rest == b"!!\n" and "9 bytes were cut" in note


def test_the_follower_starts_over_with_a_new_run_of_the_job() -> None:
    at = Position()
    assert at.take(running(0, b"first run\n", 10, 5), STDOUT) == (b"first run\n", "")
    assert at.take(running(10, b"", 3, 6), STDOUT) == (b"", STARTED_OVER)  # another file: a new run
    assert at.offset == 0
    assert at.take(running(0, b"new", 3, 6), STDOUT) == (b"new", "")
    assert at.take(running(3, b"", 1, 6), STDOUT) == (b"", STARTED_OVER)  # shorter than printed: a new run


# ---- the live folder --------------------------------------------------------------------------------


def test_the_live_folder_a_killed_worker_left_is_swept_by_the_next_one(tmp_path: Path) -> None:
    host = scratch.host_stem()
    ended = subprocess.Popen(["true"])
    ended.wait()  # a process that is gone: a worker killed with its slots
    stale = tmp_path / f"zfarm-live-{host}-{ended.pid}-a1b2"
    stale.mkdir()
    (stale / "slot-1.out").write_bytes(b"what a killed job printed")
    running = tmp_path / f"zfarm-live-{host}-{os.getpid()}-c3d4"  # a worker that still runs
    running.mkdir()
    elsewhere = tmp_path / f"zfarm-live-another-host-{ended.pid}-e5f6"  # a shared /tmp: not ours to judge
    elsewhere.mkdir()
    assert output.sweep_live_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and running.exists() and elsewhere.exists()
