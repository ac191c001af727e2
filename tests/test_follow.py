"""``zfarm logs NAME INDEX --follow``: a running job's output while it runs, then the rest; and the
batch commands' one-line failure when no broker listens. Real brokers, workers and followers.

Each job waits on a file the test creates, so "printed before the job ended" is a fact, not a race.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import zfarm
from tests import jobs
from tests.helpers import REPO_ROOT, ZFARM_COMMAND, Proc, Procs, run_zfarm, wait_for, zfarm_env
from zfarm import batch
from zfarm.follow import live_output
from zfarm.local import free_tcp_endpoint

pytestmark = pytest.mark.timeout(120)
FAST = ("--heartbeat-interval", "0.2")
#: generous: the machine running the tests is shared and loaded
SEEN_S = 60.0


@pytest.fixture
def state(tmp_path: Path) -> dict[str, str]:
    """Each test keeps its array records in its own folder."""
    return {"ZFARM_STATE_DIR": str(tmp_path / "state")}


def zf(state: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_zfarm(*args, env=state, timeout_s=90)


def follower(procs: Procs, state: dict[str, str], out: Path, *args: str) -> Proc:
    """``zfarm logs ARGS --follow`` owned by ``procs``: its stdout in ``out``, its stderr in its log."""
    redirect = ("sh", "-c", 'out=$1; shift; exec "$@" > "$out"', "sh", str(out))
    return procs.spawn(*args, "--follow", name="follow", command=(*redirect, *ZFARM_COMMAND),
                       env=zfarm_env(state))


def waiting_job(go: Path, before: str, after: str) -> str:
    """A shell line that runs ``before``, waits until ``go`` exists, then runs ``after``."""
    return f"{before}; while [ ! -e {go} ]; do sleep 0.05; done; {after}"


def submit(state: dict[str, str], endpoint: str, name: str, line: str) -> None:
    done = zf(state, "submit", "--connect", endpoint, "--name", name, "--", "sh", "-c", line)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_follow_shows_a_running_job_s_output_before_it_ends_then_the_rest(procs: Procs, state: dict[str, str],
                                                                         tmp_path: Path, stream: str) -> None:
    endpoint, _ = procs.farm(*FAST)
    go, out = tmp_path / "go", tmp_path / "followed"
    to = " >&2" if stream == "stderr" else ""
    other = "" if stream == "stderr" else " >&2"  # the other stream is not printed
    submit(state, endpoint, "live", waiting_job(go, f"echo first{to}; echo noise{other}", f"echo second{to}"))
    extra = ("--stderr",) if stream == "stderr" else ()
    proc = follower(procs, state, out, "logs", "live", "1", *extra)
    wait_for(lambda: out.read_bytes() == b"first\n", SEEN_S, message="the first line while the job runs")
    assert proc.alive() and not go.exists()
    listed = zf(state, "jobs", "live", "--json")  # another watcher meanwhile: the follower goes on
    assert json.loads(listed.stdout)["counts"] == {"running": 1}, listed.stderr
    go.touch()
    assert proc.wait(SEEN_S) == 0, proc.log()
    assert out.read_bytes() == b"first\nsecond\n"


def test_follow_with_keys_from_a_worker_keeping_whole_streams(procs: Procs, state: dict[str, str],
                                                              tmp_path: Path) -> None:
    from zfarm.security import init_keys

    keys, kept = tmp_path / "keys", tmp_path / "kept"
    init_keys(keys)
    _, endpoint = procs.broker(None, *FAST, "--keys", str(keys))
    procs.worker(endpoint, "--keys", str(keys), "--output-dir", str(kept))  # streams in kept/*.part
    go, out = tmp_path / "go", tmp_path / "followed"
    line = waiting_job(go, "echo secret", "echo done")
    done = zf(state, "submit", "--connect", endpoint, "--keys", str(keys), "--name", "locked", "--",
              "sh", "-c", line)
    assert done.returncode == 0, done.stderr
    proc = follower(procs, state, out, "logs", "locked", "1")  # the record keeps the keys folder
    wait_for(lambda: out.read_bytes() == b"secret\n", SEEN_S, message="the first line while the job runs")
    go.touch()
    assert proc.wait(SEEN_S) == 0, proc.log()
    assert out.read_bytes() == b"secret\ndone\n"
    assert (kept / "locked_1.out").read_bytes() == b"secret\ndone\n"


def test_follow_prints_a_command_s_new_run_from_its_start(procs: Procs, state: dict[str, str],
                                                          tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST)
    ran, first, second, out = tmp_path / "ran", tmp_path / "first", tmp_path / "second", tmp_path / "followed"
    line = (f"if [ -e {ran} ]; then {waiting_job(second, 'echo the second run, longer', 'exit 0')}; "
            f"else touch {ran}; {waiting_job(first, 'echo first run', 'exit 1')}; fi")
    done = zf(state, "submit", "--connect", endpoint, "--name", "again", "--retries", "1", "--",
              "sh", "-c", line)
    assert done.returncode == 0, done.stderr
    proc = follower(procs, state, out, "logs", "again", "1")
    wait_for(lambda: out.read_bytes() == b"first run\n", SEEN_S, message="the first run's line")
    first.touch()  # it fails: its retry starts over in a new pair of files
    wait_for(lambda: out.read_bytes() == b"first run\nthe second run, longer\n", SEEN_S,
             message="the second run's line, from its start")
    second.touch()
    assert proc.wait(SEEN_S) == 0, proc.log()
    assert out.read_bytes() == b"first run\nthe second run, longer\n"
    assert "started over" in proc.log()


def test_a_slot_pool_reads_a_running_job_s_output_and_empties_its_files_after_it(tmp_path: Path) -> None:
    """The worker's side alone: real slot processes, no broker. In a process of its own, so that what
    multiprocessing starts for the slots (a forkserver, its resource tracker) goes with it."""
    code = "import sys; from tests.test_follow import check_slot_pool; check_slot_pool(sys.argv[1])"
    checked = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             env=zfarm_env(), cwd=REPO_ROOT, timeout=SEEN_S * 2)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == "checked\n"


def check_slot_pool(folder: str) -> None:
    """A slot pool answers PEEK from a running job's live files, and empties them when it ends."""
    from zfarm import output
    from zfarm import protocol as p
    from zfarm import serialization as ser
    from zfarm.worker.chaperone import SlotPool, SlotTask

    go = Path(folder) / "go"
    pool = SlotPool(1)
    try:
        (slot,) = pool.slots
        fn_id, blob = ser.dump_function(jobs.print_until)
        assert pool.run(SlotTask(("c", 1), 1, fn_id, blob, ser.dump_call((str(go),), {}))) is None
        ask = p.Peek("c", 1, [0, 0])

        def first_line() -> bool:
            reply = pool.peek(ask)
            chunks = [bytes(f) for f in reply.frames]
            return reply.status == p.PeekStatus.RUNNING and chunks == [b"before\n", b""]

        wait_for(first_line, SEEN_S, message="the running job's first line")
        assert pool.peek(p.Peek("c", 1, [3, -1])).frames[0] == b"ore\n"  # from an offset; stderr not asked
        go.touch()
        wait_for(lambda: select.select([slot.conn], [], [], 0)[0], SEEN_S, message="the job's result")
        outcome = pool.collect(slot)
        assert outcome is not None and outcome.outcome == p.Outcome.OK
        kept = output.take(outcome.frames)
        assert kept is not None and kept.stdout == "before\nafter\n"
        assert pool.peek(ask).status == p.PeekStatus.FINISHED
        assert slot.process.pid is not None
        files = output.live_paths(pool.live_dir, output.slot_live_name(slot.process.pid))
        assert [os.path.getsize(f) for f in files] == [0, 0]  # the next job's live view starts empty
    finally:
        pool.close()
    assert not os.path.exists(pool.live_dir)
    print("checked")


def test_follow_passes_on_output_larger_than_a_chunk_byte_for_byte(procs: Procs, state: dict[str, str],
                                                                   tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST)
    go, out, numbers = tmp_path / "go", tmp_path / "followed", tmp_path / "print_lines.py"
    numbers.write_text("import sys\n"
                       "sys.stdout.write(''.join('%07d\\n' % i for i in range(*map(int, sys.argv[1:]))))\n")
    lines = 40_000  # 8 bytes each: 320 KB, five chunks, before the job waits and as much after
    write = f"{sys.executable} {numbers}"
    submit(state, endpoint, "big", waiting_job(go, f"{write} 0 {lines}", f"{write} {lines} {2 * lines}"))
    proc = follower(procs, state, out, "logs", "big", "1")
    wait_for(lambda: out.stat().st_size == 8 * lines, SEEN_S, message="the first half while the job runs")
    go.touch()
    assert proc.wait(SEEN_S) == 0, proc.log()
    assert out.read_bytes() == b"".join(b"%07d\n" % i for i in range(2 * lines))  # nothing lost or doubled


def test_follow_waits_for_a_queued_job_to_start(procs: Procs, state: dict[str, str], tmp_path: Path) -> None:
    _, endpoint = procs.broker(None, *FAST)  # no worker yet: the job stays queued
    go, out = tmp_path / "go", tmp_path / "followed"
    submit(state, endpoint, "later", waiting_job(go, "echo hello", "echo bye"))
    proc = follower(procs, state, out, "logs", "later", "1")
    proc.wait_for_log("waiting for the job to start", SEEN_S)
    procs.worker(endpoint)
    wait_for(lambda: out.read_bytes() == b"hello\n", SEEN_S, message="the job's first line once it runs")
    go.touch()
    assert proc.wait(SEEN_S) == 0, proc.log()
    assert out.read_bytes() == b"hello\nbye\n"
    assert proc.log().count("waiting for the job to start") == 1


def test_live_output_from_python_yields_a_running_function_job_s_prints(procs: Procs, tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST)
    go = tmp_path / "go"
    got: list[bytes] = []
    with zfarm.Client(endpoint) as client:
        future = client.submit(jobs.print_until, str(go))
        reader = threading.Thread(target=lambda: got.extend(live_output(client, future)), daemon=True)
        reader.start()
        wait_for(lambda: b"".join(got) == b"before\n", SEEN_S, message="the first line while the job runs")
        assert not future.done()
        go.touch()
        reader.join(SEEN_S)
        assert not reader.is_alive()
        assert future.result(SEEN_S) == "done"
    assert b"".join(got) == b"before\nafter\n"


def test_ctrl_c_ends_a_follower_quietly(procs: Procs, state: dict[str, str], tmp_path: Path) -> None:
    _, endpoint = procs.broker(None, *FAST)
    submit(state, endpoint, "idle", "true")  # no worker: it stays queued
    proc = follower(procs, state, tmp_path / "followed", "logs", "idle", "1")
    proc.wait_for_log("waiting for the job to start", SEEN_S)
    proc.signal(signal.SIGINT)
    assert proc.wait(SEEN_S) == 130
    assert "Traceback" not in proc.log() and "Exception" not in proc.log(), proc.log()


def test_follow_of_a_finished_job_prints_it_and_exits_with_its_outcome(procs: Procs,
                                                                      state: dict[str, str]) -> None:
    endpoint, _ = procs.farm(*FAST)
    done = zf(state, "submit", "--connect", endpoint, "--name", "done", "--array", "1-2", "--wait", "--",
              "sh", "-c", "echo out {}; exit $(( {} - 1 ))")
    assert done.returncode == 1, done.stderr  # job 2 failed
    ok = zf(state, "logs", "done", "1", "--follow")
    assert (ok.returncode, ok.stdout) == (0, "out 1\n"), ok.stderr
    failed = zf(state, "logs", "done", "2", "--follow")
    assert (failed.returncode, failed.stdout) == (1, "out 2\n"), failed.stderr
    assert failed.stderr == "zfarm: job 2 of done did not succeed: exit 1\n"  # why it says 1
    no_job = zf(state, "logs", "done", "9", "--follow")
    assert no_job.returncode == 2 and "has no job 9" in no_job.stderr
    no_array = zf(state, "logs", "nothing", "1", "--follow")
    assert no_array.returncode == 2 and "no array named nothing" in no_array.stderr


def test_commands_fail_in_a_moment_with_one_line_when_no_broker_listens(
        state: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = free_tcp_endpoint()
    monkeypatch.setenv("ZFARM_STATE_DIR", state["ZFARM_STATE_DIR"])
    batch.save(batch.ArrayRecord("lonely", endpoint, ["true"], [1], ["1"]), new=True)
    for args in (("wait", "lonely", "--connect", endpoint), ("logs", "lonely", "1", "--follow"),
                 ("submit", "--connect", endpoint, "--name", "other", "--", "true"),
                 ("status", "--connect", endpoint), ("history", "--connect", endpoint),
                 ("project", "list", "--connect", endpoint), ("dashboard", "--once", "--connect", endpoint)):
        started = time.monotonic()
        failed = zf(state, *args)
        took_s = time.monotonic() - started
        assert failed.returncode == 1, failed.stderr
        assert took_s < 3, f"{args[0]} took {took_s:.1f} s"
        (line,) = failed.stderr.splitlines()
        assert "nothing listens there" in line and endpoint in line and "zfarm broker" in line
    arrays = zf(state, "jobs").stdout.splitlines()[1:]  # under the header
    assert [line.split()[0] for line in arrays] == ["lonely"]  # the failed submit left no array behind
