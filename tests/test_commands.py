"""Command jobs (``Client.run``), output capture, and the slot owning its job's whole process tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import zfarm
from tests import jobs
from tests.helpers import Procs, live_pids, wait_for

pytestmark = pytest.mark.timeout(90)
FAST = ("--heartbeat-interval", "0.2")
LINUX = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process tree is read from /proc")


@pytest.fixture
def endpoint(procs: Procs) -> str:
    address, _ = procs.farm(*FAST, procs=2)
    return address


def test_run_mirrors_subprocess_run(endpoint: str, tmp_path: Path) -> None:
    with zfarm.Client(endpoint) as client:
        result = client.run(["sh", "-c", "echo hi"]).result(30)
        assert isinstance(result, zfarm.CommandResult)
        assert (result.stdout, result.stderr, result.returncode) == ("hi\n", "", 0)
        assert result.host and result.worker and result.run_s >= 0
        script = ('echo "$GREETING $(pwd) $(cat)"; echo "$ZFARM_JOB_ID"; '
                  'test -d "$ZFARM_JOB_TMPDIR" && echo "$ZFARM_JOB_TMPDIR"')
        seen = client.run(script, shell=True, cwd=tmp_path, env={"GREETING": "hello"}, input="in").result(30)
        greeting, job_id, scratch = seen.stdout.splitlines()
        assert greeting == f"hello {tmp_path} in"
        assert job_id.startswith(client.id + ":")
        assert not Path(scratch).exists()  # the private scratch folder is removed afterwards


def test_a_failing_command_raises_with_its_status_signal_and_stderr(endpoint: str) -> None:
    with zfarm.Client(endpoint) as client:
        with pytest.raises(zfarm.CommandFailed) as failed:
            client.run(["sh", "-c", "echo first >&2; echo last words >&2; exit 3"]).result(30)
        assert failed.value.returncode == 3 and failed.value.signal == ""
        assert "exited with status 3" in str(failed.value) and "last words" in str(failed.value)
        assert isinstance(failed.value, zfarm.JobError)
        assert failed.value.result.stderr == "first\nlast words\n"
        with pytest.raises(zfarm.CommandFailed) as killed:
            client.run(["sh", "-c", "kill -9 $$"]).result(30)
        assert killed.value.returncode == -9 and killed.value.signal == "SIGKILL"
        unchecked = client.run(["sh", "-c", "exit 4"], check=False).result(30)
        assert unchecked.returncode == 4 and not unchecked.ok


def test_a_missing_command_names_itself_and_the_host(endpoint: str) -> None:
    with zfarm.Client(endpoint) as client:
        with pytest.raises(zfarm.CommandNotFound) as missing:
            client.run(["no-such-program-zfarm", "--flag"]).result(30)
        assert "no-such-program-zfarm" in str(missing.value)
        assert missing.value.host and missing.value.host in str(missing.value)
        with pytest.raises(zfarm.ConfigError):
            client.run("echo needs shell=True")


def test_run_many_reads_commands_lazily_in_order(endpoint: str) -> None:
    read = []

    def commands() -> object:
        for i in range(150):
            read.append(i)
            yield ["sh", "-c", f"echo {i}"]

    with zfarm.Client(endpoint, window=32) as client:
        results = client.run_many(commands())  # type: ignore[arg-type]
        first = next(results)
        assert first.stdout == "0\n"
        assert len(read) < 150  # a window ahead, not the whole input
        rest = list(results)
    assert [int(r.stdout) for r in rest] == list(range(1, 150))


def test_output_of_python_c_level_writes_and_child_processes_is_captured(
        endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    with zfarm.Client(endpoint, echo_output=True) as client:
        future = client.submit(jobs.print_everywhere)
        assert future.result(30) == "done"
        output = future.output
        assert output is not None
        assert output.stdout == "from python\nfrom fd 1\nfrom a child\n"
        assert output.stderr == "to stderr\nchild err\n"
        assert (output.stdout_cut, output.stderr_cut) == (0, 0)
        assert client.submit(jobs.square, 3).result(30) == 9  # a quiet job carries no output
        with pytest.raises(zfarm.CommandFailed):
            client.run(["sh", "-c", "echo said; echo why >&2; exit 1"]).result(30)
    echoed = capsys.readouterr()
    assert f"[{client.id}:1] from fd 1" in echoed.out and f"[{client.id}:1] child err" in echoed.err
    assert f"[{client.id}:3] said" in echoed.out and f"[{client.id}:3] why" in echoed.err


def test_large_output_keeps_the_last_mebibyte_and_the_worker_memory_flat(endpoint: str) -> None:
    with zfarm.Client(endpoint) as client:
        big = client.run(["sh", "-c", "head -c 10485760 /dev/zero | tr '\\0' x; echo; echo end"]).result(60)
        assert big.stdout.endswith("x\nend\n") and len(big.stdout) == 2**20
        assert big.stdout_cut == 10 * 2**20 + 5 - 2**20
        future = client.submit(jobs.print_everywhere, 10 * 2**20)
        future.result(60)
        assert future.output is not None and len(future.output.stdout) == 2**20
        assert future.output.stdout_cut > 9 * 2**20
        huge = client.run(["sh", "-c", "head -c 104857600 /dev/zero"]).result(60)
        assert huge.stdout_cut == 99 * 2**20
        peaks = [record.peak_rss_bytes for record in client.stats().records]
        assert max(peaks) < 64 * 2**20, peaks  # 100 MiB printed, and the slot stayed small: on disk


def _pids(pid_file: Path) -> list[int]:
    return [int(p) for p in pid_file.read_text().split()]


@LINUX
def test_setsid_and_double_forked_processes_end_with_their_job(endpoint: str, tmp_path: Path) -> None:
    with zfarm.Client(endpoint) as client:
        pids = client.submit(jobs.leave_orphans, tmp_path / "pids", 0.0).result(30)
        assert not live_pids(pids)  # gone before the result was sent
        escaped = client.run(["sh", "-c", "setsid sleep 1000 & echo $!"]).result(30)
        assert not live_pids([int(escaped.stdout)])


@LINUX
def test_a_timed_out_or_cancelled_job_takes_its_whole_tree(endpoint: str, tmp_path: Path) -> None:
    with zfarm.Client(endpoint) as client:
        timed = client.with_options(job_timeout_s=3.0).submit(jobs.leave_orphans, tmp_path / "a", 60.0)
        with pytest.raises(zfarm.JobTimeout):
            timed.result(30)
        assert not live_pids(_pids(tmp_path / "a"))
        cancelled = client.submit(jobs.leave_orphans, tmp_path / "b", 60.0)
        wait_for(lambda: (tmp_path / "b").exists(), 30, message="the job's processes started")
        assert live_pids(_pids(tmp_path / "b"))
        assert cancelled.kill()  # it runs: cancel() would leave it be, as concurrent.futures does
        wait_for(lambda: not live_pids(_pids(tmp_path / "b")), 20, message="the cancelled job's tree gone")


@LINUX
def test_a_killed_worker_takes_its_jobs_trees(procs: Procs, tmp_path: Path) -> None:
    endpoint, (worker,) = procs.farm(*FAST)
    client = zfarm.Client(endpoint)
    try:
        client.submit(jobs.leave_orphans, tmp_path / "pids", 60.0)
        wait_for(lambda: (tmp_path / "pids").exists(), 30, message="the job's processes started")
        worker.kill()
        wait_for(lambda: not live_pids(_pids(tmp_path / "pids")), 20, message="the job's processes gone")
    finally:
        client.cancel(force=True)  # its job went back to the queue, with no worker left to run it
        client.shutdown(wait=False)


@LINUX
def test_memory_limit_counts_child_processes(endpoint: str) -> None:
    hog = "b = bytearray(400 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(30)"
    with zfarm.Client(endpoint) as client:
        limited = client.with_options(mem_limit=150 * 2**20, job_timeout_s=60)
        with pytest.raises(zfarm.MemoryLimitExceeded) as info:
            limited.run([sys.executable, "-c", hog]).result(60)
        assert info.value.reached > 150 * 2**20
        assert client.run(["true"]).result(30).returncode == 0  # the client and the worker live on


def test_a_copy_of_a_job_killed_half_way_leaves_the_finished_copys_output_files(procs: Procs,
                                                                                tmp_path: Path) -> None:
    """Two runs that write the same files (as two copies of one job do): the second, killed half-way,
    must not have truncated the first one's complete output."""
    _, address = procs.broker(None, *FAST)
    out = tmp_path / "out"
    procs.worker(address, "--output-dir", str(out))
    same = {"ZFARM_ARRAY_NAME": "twice", "ZFARM_ARRAY_INDEX": "1"}  # both write twice_1.out
    with zfarm.Client(address) as client:
        client.run(["sh", "-c", "echo complete"], env=same).result(30)
        assert (out / "twice_1.out").read_text() == "complete\n"
        second = client.run(["sh", "-c", "echo partial; sleep 60"], env=same)
        wait_for(lambda: any("partial" in p.read_text() for p in out.iterdir()), 30,
                 message="the second copy printed")
        assert second.kill()
        assert client.run(["true"]).result(30).returncode == 0  # the slot was replaced
        missing = {"ZFARM_ARRAY_NAME": "missing", "ZFARM_ARRAY_INDEX": "1"}
        with pytest.raises(zfarm.CommandNotFound):
            client.run(["zfarm-no-such-program"], env=missing).result(30)
    assert (out / "twice_1.out").read_text() == "complete\n"
    assert not list(out.glob("missing*")), "a command that never ran leaves no file of its own"


def test_function_jobs_output_files_are_put_in_place_when_the_job_ends(tmp_path: Path) -> None:
    """FdCapture in a real process: a second copy of job c:1 that never ends keeps off c_1.out."""
    script = (
        "import os, sys\n"
        "from zfarm.output import FdCapture\n"
        f"first, second = FdCapture({str(tmp_path)!r}), FdCapture({str(tmp_path)!r})\n"
        "first.start('c:1'); print('complete'); first.stop()\n"
        "second.start('c:1'); print('partial'); sys.stdout.flush(); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert (tmp_path / "c_1.out").read_text() == "complete\n"
    assert [p.read_text() for p in tmp_path.glob("c_1.out.*.part")] == ["partial\n"]


@LINUX
def test_a_jobs_peak_memory_is_not_an_earlier_jobs_child(procs: Procs) -> None:
    address, _ = procs.farm(*FAST)  # one slot: both jobs run in it, one after the other
    hog = "b = bytearray(200 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
    with zfarm.Client(address) as client:
        client.run([sys.executable, "-c", hog]).result(60)
        client.run(["true"]).result(30)
        big, small = sorted(client.stats().records, key=lambda r: r.started_at)
    assert big.peak_rss_bytes > 200 * 2**20, big
    assert small.peak_rss_bytes < 100 * 2**20, small
