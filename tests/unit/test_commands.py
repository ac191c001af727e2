"""Command specs, results and errors, the output frame and array templating: plain data, no farm."""

from __future__ import annotations

import os
import pickle
import tempfile

import pytest

from zfarm.batch import ArrayRecord, expand
from zfarm.commands import CommandResult, CommandSpec
from zfarm.errors import CommandFailed, CommandNotFound, ConfigError
from zfarm.output import MAGIC, pack, read_tail, take


def test_a_spec_is_the_same_bytes_for_the_same_command() -> None:
    one = CommandSpec.of(["echo", "hi"], env={"B": "2", "A": "1"}, cwd="/tmp", input="x")
    two = CommandSpec.of(("echo", "hi"), env={"A": "1", "B": "2"}, cwd="/tmp", input=b"x")
    assert pickle.dumps(one) == pickle.dumps(two)  # sessions match jobs by these bytes
    assert one.env == (("A", "1"), ("B", "2")) and one.input == b"x"
    assert CommandSpec.of(["echo", "a b"], shell=True).args == "echo 'a b'"
    with pytest.raises(ConfigError):
        CommandSpec.of("echo hi")  # one string needs shell=True
    with pytest.raises(ConfigError):
        CommandSpec.of([])


def test_a_failed_command_names_its_status_signal_and_stderr_and_pickles() -> None:
    stderr = "".join(f"line {i}\n" for i in range(30))
    result = CommandResult(("sh", "-c", "x"), -9, "", stderr, 1.0, "w", "h")
    assert result.signal == "SIGKILL" and not result.ok
    with pytest.raises(CommandFailed) as info:
        result.check_returncode()
    error = info.value
    assert error.returncode == -9 and error.signal == "SIGKILL" and error.host == "h"
    assert "killed by signal 9 (SIGKILL) on h" in str(error)
    assert "line 29" in str(error) and "line 19" not in str(error)  # the last 10 lines
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.result == result
    missing = pickle.loads(pickle.dumps(CommandNotFound("frob --x", "node7", "No such file or directory")))
    assert "frob --x" in str(missing) and "node7" in str(missing) and isinstance(missing, FileNotFoundError)


def test_the_output_frame_round_trips_and_is_recognised_only_by_its_mark() -> None:
    out = take([b"result pickle", pack(b"out\n", b"\xffbad", 10, 0)])
    assert out is not None and (out.stdout, out.stderr, out.stdout_cut) == ("out\n", "\ufffdbad", 10)
    assert take([b"result pickle"]) is None and take([]) is None
    assert take([MAGIC + b"\xc1 not msgpack"]) is None


def test_read_tail_keeps_the_end_and_counts_the_cut() -> None:
    with tempfile.TemporaryFile() as scratch:
        scratch.write(b"0123456789")
        scratch.flush()
        assert read_tail(scratch.fileno(), 4) == (b"6789", 6)
        assert read_tail(scratch.fileno(), 100) == (b"0123456789", 0)
        os.ftruncate(scratch.fileno(), 0)
        assert read_tail(scratch.fileno(), 4) == (b"", 0)


def test_array_templating_and_job_environment() -> None:
    expanded = expand(["run", "--seed", "{}", "out-{i}.txt"], "42", 42, False)
    assert expanded == ["run", "--seed", "42", "out-42.txt"]
    assert expand(["echo"], "a line", 3, True) == ["echo", "a line"]
    record = ArrayRecord("demo", "tcp://h:1", ["echo", "{}"], [5, 7], ["5", "7"], env={"X": "1"})
    spec = record.job(1)
    assert spec.args == ("echo", "7") and spec.check
    assert dict(spec.env) == {"X": "1", "ZFARM_ARRAY_NAME": "demo", "ZFARM_ARRAY_INDEX": "7",
                              "ZFARM_ARRAY_COUNT": "2"}
    assert pickle.dumps(record.job(1)) == pickle.dumps(record.job(1))
