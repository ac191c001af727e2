"""Job arrays from the command line: ``zfarm submit``, ``wait``, ``jobs``, ``logs``, ``cancel``, ``forget``.

Each test keeps its array records in its own state folder (``ZFARM_STATE_DIR``).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import zfarm
from tests import jobs
from tests.helpers import (
    ZFARM_COMMAND,
    Procs,
    cmdline,
    kill_pids,
    live_pids,
    require_status,
    run_zfarm,
    wait_for,
    wait_for_workers,
    zfarm_env,
)
from zfarm.batch import parse_array
from zfarm.errors import ConfigError

pytestmark = pytest.mark.timeout(120)
FAST = ("--heartbeat-interval", "0.2")
MIXED = "echo out {}; echo err {} >&2; exit $(( {} % 50 == 0 ))"


@pytest.fixture
def state(tmp_path: Path) -> dict[str, str]:
    """Each test keeps its array records in its own folder."""
    return {"ZFARM_STATE_DIR": str(tmp_path / "state")}


def zf(state: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if stdin is None:
        return run_zfarm(*args, env=state, timeout_s=90)
    return subprocess.run([*ZFARM_COMMAND, *args], input=stdin, capture_output=True, text=True,
                          env=zfarm_env(state), timeout=90)


def test_array_specs() -> None:
    assert parse_array("1-5") == [1, 2, 3, 4, 5]
    assert parse_array("1-9:4") == [1, 5, 9]
    assert parse_array("1,5,7") == [1, 5, 7]
    assert parse_array("3,1-3") == [3, 1, 2]
    for bad in ("", "5-1", "1-5:0", "a", "1-", "-3"):
        with pytest.raises(ConfigError):
            parse_array(bad)
    assert len(parse_array("1-500000")) == 500_000
    with pytest.raises(ConfigError, match="split it into several arrays"):
        parse_array("1-500001")  # a watcher holds every job in memory: about 3 KB each



def test_short_errors_for_the_jobs_table() -> None:
    from zfarm.batch import JobState, State
    from zfarm.cli_batch import short_error

    assert short_error(JobState(1, State.FAILED, 3, error="command x exited with status 3")) == "exit 3"
    assert short_error(JobState(1, State.FAILED, -9, error="command x was killed by signal 9")) == "signal 9"
    assert short_error(JobState(1, State.TIMEOUT, -9), 3.0) == "timeout 3 s"
    assert short_error(JobState(1, State.ERROR, error="CommandNotFound: command not found: x")) == "not found"
    assert short_error(JobState(1, State.ERROR, error="MemoryLimitExceeded: job used 2 GiB")) == \
        "MemoryLimitExceeded"
    assert short_error(JobState(1, State.OK, 0)) == short_error(JobState(1, State.CANCELLED)) == ""


def test_an_array_with_mixed_exit_codes(procs: Procs, state: dict[str, str]) -> None:
    endpoint, _ = procs.farm(*FAST, procs=2)
    submitted = zf(state, "submit", "--connect", endpoint, "--array", "1-150", "--name", "demo",
                   "--", "sh", "-c", MIXED)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout == "demo\n"
    waited = zf(state, "wait", "demo")
    assert waited.returncode == 1, waited.stderr
    assert "147 succeeded, 3 failed" in waited.stdout and "failed: 50,100,150" in waited.stdout
    shown = zf(state, "project", "show", "demo", "--connect", endpoint, "--json")  # an array is a project
    assert shown.returncode == 0, shown.stderr
    project = json.loads(shown.stdout)
    assert (project["done"], project["failed"], project["state"]) == (147, 3, "done")
    listed = json.loads(zf(state, "jobs", "demo", "--json").stdout)
    assert listed["counts"] == {"ok": 147, "failed": 3}
    failed = [(job["index"], job["exit_code"]) for job in listed["jobs"] if job["state"] == "failed"]
    assert failed == [(50, 1), (100, 1), (150, 1)]
    for index in (7, 50, 149):
        assert zf(state, "logs", "demo", str(index)).stdout == f"out {index}\n"
        assert zf(state, "logs", "demo", str(index), "--stderr").stdout == f"err {index}\n"
    again = zf(state, "wait", "demo", "--json")
    assert json.loads(again.stdout)["failed"] == [50, 100, 150] and again.returncode == 1
    snap = require_status(endpoint)
    (array,) = [c for c in snap["clients"] if c["id"] == "s-array-demo"]
    assert array["submitted"] == 151  # the 150 jobs ran once each (and one barrier of `jobs`)
    assert zf(state, "forget", "demo").returncode == 0
    wait_for(lambda: not require_status(endpoint)["clients"], 20, message="the forgotten array gone")
    assert zf(state, "wait", "demo").returncode == 2  # unknown now: a usage error


def test_args_from_stdin_environment_and_a_missing_command(procs: Procs, state: dict[str, str]) -> None:
    endpoint, _ = procs.farm(*FAST, procs=2)
    lines = "alpha beta\n\ngamma\n"
    script = 'echo "[$1] {i} $ZFARM_ARRAY_NAME $ZFARM_ARRAY_INDEX/$ZFARM_ARRAY_COUNT $ZFARM_JOB_ID"'
    done = zf(state, "submit", "--connect", endpoint, "--name", "lines", "--args-file", "-", "--wait",
              "--env", "X=1", "--", "sh", "-c", script, "sh", "{}", stdin=lines)
    assert done.returncode == 0, done.stderr
    assert zf(state, "logs", "lines", "1").stdout == "[alpha beta] 1 lines 1/2 s-array-lines:1\n"
    assert zf(state, "logs", "lines", "2").stdout == "[gamma] 2 lines 2/2 s-array-lines:2\n"
    missing = zf(state, "submit", "--connect", endpoint, "--name", "nothing", "--wait", "--",
                 "no-such-program-zfarm", "{}")
    assert missing.returncode == 1
    (job,) = json.loads(zf(state, "jobs", "nothing", "--json").stdout)["jobs"]
    assert job["state"] == "error" and "CommandNotFound" in job["error"]
    assert "no-such-program-zfarm" in job["error"]
    assert job["worker"] and job["host"] and job["attempts"] == 1, job  # where it failed to start
    assert "not found" in zf(state, "jobs", "nothing").stdout.splitlines()[2]  # the table's short error
    assert zf(state, "submit", "--connect", endpoint, "--array", "5-1", "--", "true").returncode == 2
    taken = zf(state, "submit", "--connect", endpoint, "--name", "lines", "--", "true")
    assert taken.returncode == 2 and "exists already" in taken.stderr



def on_a_terminal(state: dict[str, str], *args: str, columns: int = 80) -> str:
    """What ``zfarm ARGS`` prints on a terminal ``columns`` wide (a pseudo-terminal as its stdout)."""
    import os

    reader, writer = os.openpty()
    try:
        done = subprocess.run([*ZFARM_COMMAND, *args], stdin=subprocess.DEVNULL, stdout=writer,
                              stderr=subprocess.PIPE, env=zfarm_env({**state, "COLUMNS": str(columns)}),
                              timeout=90)
        assert done.returncode == 0, done.stderr
        os.close(writer)
        writer = -1
        out = b""
        while True:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # EIO: the terminal's other end closed, all read
                break
            if not chunk:
                break
            out += chunk
        return out.decode()
    finally:
        os.close(reader)
        if writer != -1:
            os.close(writer)


def test_the_tables_show_short_errors_and_the_arrays_in_submission_order(
        procs: Procs, state: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from zfarm import batch

    monkeypatch.setenv("ZFARM_STATE_DIR", state["ZFARM_STATE_DIR"])
    batch.save(batch.ArrayRecord("zz-old", "tcp://127.0.0.1:1", ["true"], [1], ["1"]), new=True)  # no time
    endpoint, _ = procs.farm(*FAST, procs=2)
    script = "for i in $(seq 1 3); do echo line $i; done; exit $(( {} % 2 ))"
    for name in ("b-first", "a-second"):
        submitted = zf(state, "submit", "--connect", endpoint, "--name", name, "--array", "1-2", "--wait",
                       "--", "sh", "-c", script)
        assert submitted.returncode == 1, submitted.stderr  # job 1 exits 1
    piped = zf(state, "jobs", "b-first")  # a pipe: plain columns
    assert piped.returncode == 0, piped.stderr
    rows = {line.split()[0]: line.split() for line in piped.stdout.splitlines()[2:-1]}
    assert rows["1"][1:3] == ["failed", "1"] and rows["1"][-2:] == ["exit", "1"], piped.stdout
    assert rows["2"][1:3] == ["ok", "0"], piped.stdout
    assert "seq" not in piped.stdout and "status 1" not in piped.stdout  # the command is in --json
    in_json = json.loads(zf(state, "jobs", "b-first", "--json").stdout)["jobs"]
    (failed,) = [job for job in in_json if job["index"] == 1]
    assert "seq 1 3" in failed["error"] and "exited with status 1" in failed["error"]
    shown = on_a_terminal(state, "jobs", "b-first")  # rich, 80 columns: one line a job, ids whole
    (line,) = [line for line in shown.splitlines() if line.split()[:2] == ["1", "failed"]]
    assert failed["worker"] in line and line.rstrip().endswith("exit 1"), shown
    listed = zf(state, "jobs").stdout.splitlines()
    assert listed[0].split() == ["name", "jobs", "submitted", "address", "command"], listed
    assert [line.split()[0] for line in listed[1:]] == ["zz-old", "b-first", "a-second"], listed
    assert listed[1].endswith(" true") and listed[2].endswith(" sh -c " + shlex.quote(script)), listed
    arrays = json.loads(zf(state, "jobs", "--json").stdout)
    assert [a["name"] for a in arrays] == ["zz-old", "b-first", "a-second"]
    assert arrays[0]["created_at"] == 0 and arrays[0]["submitted_at"] > 0  # the record file's time
    assert arrays[2]["command"] == ["sh", "-c", script] and arrays[2]["jobs"] == 2


@pytest.mark.slow  # leaving waits 10 s for the jobs the broker did not take
def test_submit_fails_naming_the_jobs_the_broker_did_not_accept(procs: Procs, state: dict[str, str]) -> None:
    _, endpoint = procs.broker(None, *FAST, "--max-queued", "5")  # no worker: 5 queued, then BUSY
    taken = zf(state, "submit", "--connect", endpoint, "--name", "full", "--array", "1-20",
               "--accept-timeout", "3", "--", "true")
    assert taken.returncode == 1, taken.stderr
    assert "did not accept 15 of the 20 jobs" in taken.stderr and "zfarm wait full" in taken.stderr
    assert "submitted" not in taken.stderr


def test_cancel_and_wait_timeout(procs: Procs, state: dict[str, str], tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST, procs=1)
    assert zf(state, "submit", "--connect", endpoint, "--name", "slow", "--array", "1-3", "--",
              "sh", "-c", "touch " + str(tmp_path / "ran-{}") + "; sleep 60").returncode == 0
    wait_for(lambda: (tmp_path / "ran-1").exists(), 30, message="job 1 running")
    timed = zf(state, "wait", "slow", "--timeout", "5")  # (time for the broker to say job 1 runs)
    assert timed.returncode == 2 and "1 running, 2 pending" in timed.stdout, timed.stdout
    cancelled = zf(state, "cancel", "slow")
    assert "cancelled 3 unfinished jobs: 1-3" in cancelled.stdout, cancelled.stderr
    again = zf(state, "cancel", "slow")  # cancelled already: not cancelled twice
    assert "cancelled 0 unfinished jobs" in again.stdout, again.stdout + again.stderr
    waited = zf(state, "wait", "slow", "--timeout", "60")
    assert waited.returncode == 0 and "3 cancelled" in waited.stdout, waited.stdout + waited.stderr
    assert not (tmp_path / "ran-2").exists()  # never started: the single slot was freed and job 2 dropped

    def counts() -> dict[str, int]:
        shown = json.loads(zf(state, "project", "show", "slow", "--connect", endpoint, "--json").stdout)
        view = shown[0] if isinstance(shown, list) else shown
        return {k: view[k] for k in ("submitted", "done", "cancelled")}

    before = counts()
    for _ in range(2):  # rejoining the array submits nothing for its cancelled jobs
        assert zf(state, "jobs", "slow").returncode == 0
    assert before == {"submitted": 3, "done": 0, "cancelled": 3}, before  # no stand-in jobs
    assert counts() == before


def test_a_timed_out_job_is_killed_with_its_tree_and_keeps_its_output(procs: Procs, state: dict[str, str],
                                                                       tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST, procs=2)
    pid_file = tmp_path / "pid-{}"
    command = f"echo started {{}}; (setsid sleep 1000 & echo $! > {pid_file}); sleep 60"

    def sleepers() -> list[int]:
        """The setsid'd sleeps the jobs started (they left the jobs' process groups)."""
        files = [tmp_path / f"pid-{i}" for i in (1, 2)]
        return [int(text) for f in files if f.exists() and (text := f.read_text().strip())]

    try:
        waited = zf(state, "submit", "--connect", endpoint, "--name", "slow", "--array", "1-2", "--timeout",
                    "3", "--wait", "--", "sh", "-c", command)
        assert waited.returncode == 1 and "2 timed out" in waited.stdout, waited.stdout + waited.stderr
        assert zf(state, "logs", "slow", "2").stdout == "started 2\n"
        jobs = json.loads(zf(state, "jobs", "slow", "--json").stdout)["jobs"]
        assert [(j["state"], j["exit_code"]) for j in jobs] == [("timeout", -9)] * 2
        assert zf(state, "jobs", "slow").stdout.splitlines()[2].endswith("timeout 3 s")
        assert len(sleepers()) == 2 and not live_pids(sleepers())
    finally:  # a failed check must not leave them running for 1000 s (only ours: a pid may be reused)
        kill_pids(pid for pid in sleepers() if cmdline(pid).startswith("sleep 1000"))


def test_max_running_caps_the_jobs_of_an_array_running_at_once(procs: Procs, state: dict[str, str],
                                                                tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST, procs=3)
    running = tmp_path / "running"
    running.mkdir()
    count = f"touch {running}/{{}}; sleep 0.3; ls {running} | wc -l; rm {running}/{{}}"
    done = zf(state, "submit", "--connect", endpoint, "--name", "one", "--array", "1-5", "--max-running", "1",
              "--wait", "--", "sh", "-c", count)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [zf(state, "logs", "one", str(i)).stdout.strip() for i in range(1, 6)] == ["1"] * 5


@pytest.mark.slow
def test_an_array_survives_its_submitter_and_a_broker_sigkill_on_its_journal(
        procs: Procs, state: dict[str, str], tmp_path: Path) -> None:
    journal = str(tmp_path / "journal.db")
    marks = tmp_path / "marks"
    marks.mkdir()
    broker, endpoint = procs.broker(None, *FAST, "--journal", journal)
    procs.worker(endpoint, procs=2)
    wait_for_workers(endpoint, 1)
    command = f"touch {marks}/{{}}.$$; sleep 0.1; echo {{}}"
    assert zf(state, "submit", "--connect", endpoint, "--name", "durable", "--array", "1-40", "--",
              "sh", "-c", command).returncode == 0
    wait_for(lambda: len(list(marks.iterdir())) >= 10, 30, message="some jobs run")
    broker.kill()
    broker.wait(10)
    procs.broker(endpoint, *FAST, "--journal", journal)
    waited = zf(state, "wait", "durable", "--json")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert json.loads(waited.stdout)["counts"] == {"ok": 40}
    runs = Counter(int(p.name.split(".")[0]) for p in marks.iterdir())
    assert set(runs) == set(range(1, 41))
    assert sum(n - 1 for n in runs.values()) <= 3, runs  # only jobs in flight at the kill may run twice
    assert zf(state, "logs", "durable", "33").stdout == "33\n"
    assert zf(state, "wait", "durable").returncode == 0


def test_arrays_on_a_curve_farm_use_the_keys_they_were_submitted_with(procs: Procs, state: dict[str, str],
                                                                     tmp_path: Path) -> None:
    from zfarm.security import init_keys

    keys = tmp_path / "keys"
    init_keys(keys)
    _, endpoint = procs.broker(None, *FAST, "--keys", str(keys))
    procs.worker(endpoint, "--keys", str(keys))
    submitted = zf(state, "submit", "--connect", endpoint, "--keys", str(keys), "--name", "secret", "--array",
                   "1-3", "--wait", "--", "echo", "{}")
    assert submitted.returncode == 0, submitted.stderr
    assert zf(state, "wait", "secret").returncode == 0  # the record keeps the keys folder
    assert zf(state, "logs", "secret", "2").stdout == "2\n"
    assert zf(state, "forget", "secret").returncode == 0


def test_a_worker_output_dir_keeps_whole_streams_named_like_slurm(procs: Procs, state: dict[str, str],
                                                                  tmp_path: Path) -> None:
    _, endpoint = procs.broker(None, *FAST)
    out = tmp_path / "out"
    procs.worker(endpoint, "--output-dir", str(out), procs=2)
    wait_for_workers(endpoint, 1)
    big = "head -c 3145728 /dev/zero | tr '\\0' x; echo; echo err {} >&2"
    assert zf(state, "submit", "--connect", endpoint, "--name", "kept", "--array", "1-3", "--wait", "--",
              "sh", "-c", big).returncode == 0
    assert (out / "kept_2.out").stat().st_size == 3 * 2**20 + 1  # whole, where logs keeps the last MiB
    assert (out / "kept_2.err").read_text() == "err 2\n"
    assert len(zf(state, "logs", "kept", "2").stdout) == 2**20
    with zfarm.Client(endpoint) as client:
        future = client.submit(jobs.print_everywhere)
        future.result(30)
        quiet = client.submit(jobs.square, 2)
        quiet.result(30)
    assert (out / f"{client.id}_1.out").read_text() == "from python\nfrom fd 1\nfrom a child\n"
    assert not (out / f"{client.id}_2.out").exists()  # a job that printed nothing leaves no file



def test_a_project_s_jobs_with_options_run_commands_in_the_project_s_current_phase(
        procs: Procs, tmp_path: Path) -> None:
    endpoint, _ = procs.farm(*FAST, workers=1, procs=2)  # two slots: only the phase keeps them apart
    mark = tmp_path / "first-done"
    with zfarm.Client(endpoint) as client:
        project = client.project("commands")
        one_cpu = project.with_options(resources={"cpus": 1})
        first = one_cpu.run(f"sleep 1; echo done > {mark}", shell=True)
        project.barrier()  # read when a job is submitted, not when with_options was called
        second = one_cpu.run(["cat", str(mark)])
        assert second.result(30).stdout == "done\n"
        assert first.done()
        status = project.status()
    assert (status.done, status.submitted) == (2, 2)
