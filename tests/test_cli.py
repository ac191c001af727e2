"""The ``zfarm`` command line as a user meets it: real processes, exit codes, the words on stderr.

    test ──run_zfarm(ARGS)──> python -m zfarm ARGS ──> exit code, stdout, stderr
         ──procs.broker()/worker()──> real farm for history and keys

Exit codes: 0 ok, 1 failure at run time, 2 usage (bad flags or settings); a failure is one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import time
from pathlib import Path

import pytest

import zfarm
from tests.helpers import ZFARM_COMMAND, Procs, run_zfarm, zfarm_env
from tests.jobs import square
from zfarm.cli import _parser
from zfarm.local import free_tcp_endpoint
from zfarm.security import init_keys

#: a usage error is found before any network or process work: well under this, even on a loaded machine
USAGE_ERROR_S = 20.0
#: a usage error is refused before any socket: the time python takes to start and import zfarm
#: (0.3 s measured; this leaves room for a loaded machine)
AT_ONCE_S = 5.0


@pytest.fixture(autouse=True)
def no_farm_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test says which broker and keys it uses; inherited ZFARM_* variables would blur that."""
    for name in ("ZFARM_ADDRESS", "ZFARM_KEYS", "ZFARM_BIND"):
        monkeypatch.delenv(name, raising=False)


def one_line_usage_error(result: subprocess.CompletedProcess[str]) -> str:
    """Check a usage error's shape (exit 2, no traceback) and return its stderr."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


# ---- endpoints ------------------------------------------------------------------------------------


def test_status_with_an_address_without_port_exits_2_naming_the_value_and_an_example() -> None:
    result = run_zfarm("status", "--connect", "tcp://127.0.0.1", timeout_s=USAGE_ERROR_S)
    stderr = one_line_usage_error(result)
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "'tcp://127.0.0.1'" in stderr and "port is missing" in stderr, stderr
    assert "tcp://127.0.0.1:5555" in stderr, stderr  # a correct example


def test_worker_with_port_out_of_range_exits_2_at_once() -> None:
    started = time.monotonic()
    result = run_zfarm("worker", "--connect", "tcp://127.0.0.1:99999", timeout_s=USAGE_ERROR_S)
    stderr = one_line_usage_error(result)
    assert "not '99999'" in stderr and "1 to 65535" in stderr, stderr
    assert time.monotonic() - started < AT_ONCE_S  # it did not try to connect first


@pytest.mark.parametrize(("args", "said"), [
    (["history", "--connect", "tcp://127.0.0.1:abc"], "not 'abc'"),
    (["dashboard", "--once", "--connect", "tcp://localhost"], "port is missing"),
    (["dashboard", "--connect", "tcp://*:5555"], "is for binding"),  # before the full screen opens
    (["broker", "--bind", "tcp://127.0.0.1:70000"], "not '70000'"),
    (["worker", "--connect", "inproc://farm"], "same process"),
    (["demo", "--connect", "tcp://127.0.0.1"], "port is missing"),
])
def test_every_command_refuses_a_bad_endpoint_with_exit_2(args: list[str], said: str) -> None:
    assert said in one_line_usage_error(run_zfarm(*args, timeout_s=USAGE_ERROR_S))


def test_batch_and_project_commands_refuse_a_bad_endpoint_before_anything_is_kept(tmp_path: Path) -> None:
    env = {"ZFARM_STATE_DIR": str(tmp_path)}
    submit = run_zfarm("submit", "--name", "bad", "--connect", "tcp://127.0.0.1", "--", "true",
                       timeout_s=USAGE_ERROR_S, env=env)
    assert "port is missing" in one_line_usage_error(submit)
    assert not list(tmp_path.iterdir())  # no array record for jobs that never went anywhere
    listed = run_zfarm("project", "list", timeout_s=USAGE_ERROR_S, env={"ZFARM_ADDRESS": "tcp://*:5555"})
    assert "is for binding" in one_line_usage_error(listed)


def test_a_bad_endpoint_from_the_environment_is_refused_too() -> None:
    result = run_zfarm("status", timeout_s=USAGE_ERROR_S, env={"ZFARM_ADDRESS": "tcp://127.0.0.1:0"})
    assert "only a broker's --bind" in one_line_usage_error(result)


def test_a_worker_nobody_answers_says_so_at_warning_and_logs_plain_lines(procs: Procs) -> None:
    endpoint = free_tcp_endpoint()  # nothing listens there
    worker = procs.worker(endpoint, "--heartbeat-interval", "0.2", procs=1)
    log = worker.wait_for_log(f"no answer from a broker at {endpoint}", 30)
    warning = next(line for line in log.splitlines() if "no answer from a broker" in line)
    assert "WARNING" in warning, warning
    assert "1 slot," in log, log  # not "1 slots"
    # a log file gets whole, unpadded lines (no rich console 240 columns wide)
    assert all(line == line.rstrip() for line in log.splitlines()), repr(log)
    assert worker.alive()  # it keeps trying: a broker may come


def test_monitors_of_a_broker_that_requires_keys_say_so_at_once(procs: Procs, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    _, endpoint = procs.broker(None, "--keys", str(keys))
    timeout_s = 60.0
    for command in (["status"], ["history"], ["dashboard", "--once"]):
        started = time.monotonic()
        result = run_zfarm(*command, "--connect", endpoint, "--timeout", str(timeout_s),
                           timeout_s=2 * timeout_s)
        elapsed_s = time.monotonic() - started
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert "requires keys" in result.stderr and "--keys" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert elapsed_s < timeout_s / 2, f"{command} took {elapsed_s:.1f} s: its timeout, not the handshake"


# ---- history --------------------------------------------------------------------------------------


def test_history_shows_the_newest_50_by_default_all_on_request_and_whole_ids_when_piped(
    procs: Procs,
) -> None:
    endpoint, _ = procs.farm(workers=1, procs=2)
    jobs = 60
    with zfarm.Client(endpoint) as client:
        assert list(client.map(square, range(jobs), chunksize=1)) == [x * x for x in range(jobs)]
        ids = {record.id for record in client.stats().records}
    assert len(ids) == jobs

    def shown_ids(*args: str) -> list[str]:
        result = run_zfarm("history", "--connect", endpoint, *args)
        assert result.returncode == 0, result.stderr
        return [word for line in result.stdout.splitlines() for word in line.split()[:1] if word in ids]

    newest = shown_ids()
    assert len(newest) == 50
    assert len(shown_ids("--all")) == jobs  # every id whole: piped output cuts nothing
    assert shown_ids("--limit", "5") == newest[-5:]
    listed = list(csv.DictReader(io.StringIO(run_zfarm("history", "--connect", endpoint, "--csv").stdout)))
    assert [row["id"] for row in listed] == newest
    # `zfarm history | head`: a reader that leaves early ends it quietly, with success
    piped = subprocess.Popen([*ZFARM_COMMAND, "history", "--connect", endpoint], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=zfarm_env())
    try:
        assert piped.stdout is not None and piped.stderr is not None
        piped.stdout.close()  # before it writes a line
        stderr = piped.stderr.read().decode()
        assert piped.wait(USAGE_ERROR_S) == 0 and stderr == "", stderr
    finally:
        piped.kill()
        piped.wait()
        if piped.stderr is not None:
            piped.stderr.close()


# ---- flags, help and small things -----------------------------------------------------------------


def test_a_bad_timeout_says_what_it_expected() -> None:
    stderr = one_line_usage_error(run_zfarm("status", "--timeout", "abc", timeout_s=USAGE_ERROR_S))
    assert "argument --timeout: expected a positive number of seconds, got 'abc'" in stderr, stderr


def subcommands(parser: argparse.ArgumentParser, path: str = "zfarm"
                ) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{path} {name}", sub), *subcommands(sub, f"{path} {name}")]
    return found


def test_every_option_says_its_default_and_the_variables_that_set_it() -> None:
    missing = []
    for where, cmd in subcommands(_parser()):
        for action in cmd._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest == "help":
                continue
            text = action.help or ""
            flag = action.option_strings[0]
            if "default" not in text:
                missing.append(f"{where} {flag}: no default in {text!r}")
            if flag == "--connect" and where != "zfarm demo" and "ZFARM_ADDRESS" not in text:
                missing.append(f"{where} --connect does not name ZFARM_ADDRESS")
            if flag == "--keys" and "ZFARM_KEYS" not in text:
                missing.append(f"{where} --keys does not name ZFARM_KEYS")
    assert not missing, "\n".join(missing)


def test_keys_init_prints_normal_paths(tmp_path: Path) -> None:
    folder = f"{tmp_path / 'keys'}/"
    result = run_zfarm("keys", "init", folder)
    assert result.returncode == 0, result.stderr
    assert "//" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert f"{tmp_path / 'keys' / 'broker.key'}\n" in result.stdout


@pytest.mark.parametrize(("args", "code"), [
    ([], 2),
    (["no-such-command"], 2),
    (["status", "--timeout", "-1"], 2),
    (["history", "--limit", "many"], 2),
    (["dashboard", "--refresh", "0"], 2),
    (["demo", "--jobs", "0"], 2),
    (["keys", "add", "{tmp}/keys", ".hidden"], 2),
    (["keys", "init", "{tmp}/keys"], 1),  # holds keys already: never overwritten
    (["keys", "add", "{tmp}/keys", "node-2", "--role", "worker"], 0),
    (["keys", "add", "{tmp}/keys", "node-3", "--role", "admin"], 2),
    (["status", "--connect", "ipc://{tmp}/nobody.sock", "--timeout", "0.5"], 1),
])
def test_exit_codes_0_ok_1_failure_2_usage(args: list[str], code: int, tmp_path: Path) -> None:
    init_keys(tmp_path / "keys")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run_zfarm(*argv, timeout_s=USAGE_ERROR_S)
    assert result.returncode == code, (argv, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    if code:
        assert result.stderr.strip(), "a failure must say why"


def test_the_live_dashboard_refuses_an_output_that_is_not_a_terminal() -> None:
    stderr = one_line_usage_error(run_zfarm("dashboard", "--connect", free_tcp_endpoint(),
                                            timeout_s=USAGE_ERROR_S))
    assert "needs a terminal" in stderr and "--once" in stderr, stderr


def test_options_that_would_be_ignored_are_usage_errors() -> None:
    endpoint = free_tcp_endpoint()  # refused before anything connects
    stderr = one_line_usage_error(run_zfarm("submit", "--connect", endpoint, "--json", "--", "true",
                                            timeout_s=USAGE_ERROR_S))
    assert "--json goes with --wait" in stderr, stderr
    stderr = one_line_usage_error(run_zfarm("history", "--connect", endpoint, "--limit", "0",
                                            timeout_s=USAGE_ERROR_S))
    assert "--limit" in stderr and "1 or more" in stderr, stderr


def test_project_commands_refuse_nothing_to_set_a_bad_share_and_name_a_missing_project(
        procs: Procs) -> None:
    endpoint, _ = procs.farm(workers=1, procs=1)
    nothing = one_line_usage_error(run_zfarm("project", "set", "p", "--connect", endpoint,
                                             timeout_s=USAGE_ERROR_S))
    assert "--priority" in nothing and "--share" in nothing, nothing
    share = one_line_usage_error(run_zfarm("project", "set", "p", "--share", "-1", "--connect", endpoint,
                                           timeout_s=USAGE_ERROR_S))
    assert "--share is a number from 1e-06 to 1e+06" in share, share
    missing = run_zfarm("project", "show", "nosuch", "--connect", endpoint, timeout_s=USAGE_ERROR_S)
    assert missing.returncode == 1 and missing.stdout == "", missing
    assert missing.stderr.startswith("zfarm: no project 'nosuch'"), missing.stderr
