"""The batch subcommands of ``zfarm``: ``submit``, ``jobs``, ``wait``, ``logs``, ``cancel``, ``forget``.

::

    zfarm submit --array 1-200 --name demo -- CMD {}   ──► ArrayRecord saved, jobs at the broker, exit
    zfarm wait demo      ──► rejoin the session, collect; exit 0 all ok, 1 any failed, 2 timeout
    zfarm jobs demo      ──► rejoin, settle, print each job     zfarm logs demo 7 [--stderr]
    zfarm cancel demo 7  ──► kill job 7, skip it from then on  zfarm forget demo ──► end the session
    zfarm logs demo 7 --follow ──► its output while it runs (PEEK through the broker: zfarm.follow),
                                   then the rest from its result; exit 0 it succeeded, 1 it failed

How arrays live at the broker is in :mod:`zfarm.batch`. Registered from ``cli.py``
by :func:`add_batch_commands`; exit codes as the rest of the CLI (2: bad usage).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import sys
import time
from collections import Counter
from typing import Any

from zfarm import batch, follow, monitor
from zfarm.batch import ArrayRecord, Attached, JobState, State
from zfarm.cli_args import (
    broker_address,
    command,
    connect_flag,
    count,
    keys_flag,
    keys_folder,
    print_columns,
    seconds,
    size_bytes,
    some,
)
from zfarm.commands import CommandResult
from zfarm.errors import ConfigError
from zfarm.stats import plural

#: exit status of ``wait`` when jobs failed, and when it timed out
EXIT_FAILED, EXIT_TIMEOUT = 1, 2
#: exit status of ``submit`` when the broker did not accept every job in time
EXIT_NOT_ACCEPTED = 1


def add_batch_commands(sub: Any) -> None:
    """Add the batch subcommands to the ``zfarm`` parser."""
    submit = command(sub, "submit", "submit a command, or an array of commands, as jobs of the farm",
                     _run_submit)
    connect_flag(submit)
    submit.add_argument("--name", help="the array's name (default: the program's name and a random suffix)")
    source = submit.add_mutually_exclusive_group()
    source.add_argument("--array", metavar="SPEC",
                        help="job indexes: 1-5000, 1-99:2, 1,5,7 ({} and {i}: the index) (default: one job)")
    source.add_argument("--args-file", metavar="FILE",
                        help="one job per line, '-' for stdin ({}: the line, {i}: its number; without {} the "
                             "line is added as the last argument) (default: none)")
    submit.add_argument("--timeout", type=seconds, dest="timeout_s", metavar="SECONDS",
                        help="seconds each job may run before it is killed (default: no limit)")
    submit.add_argument("--mem", type=size_bytes, dest="mem_limit", metavar="BYTES",
                        help="resident memory each job (with its child processes) may reach, and needs "
                             "free on its worker: 500M, 2G ... (default: no limit)")
    submit.add_argument("--cpus", type=some, metavar="N",
                        help="CPUs each job needs free on its worker (default: one slot)")
    submit.add_argument("--gpus", type=count, metavar="N",
                        help="GPUs each job needs; it sees them in CUDA_VISIBLE_DEVICES (default 0)")
    submit.add_argument("--tag", action="append", default=[], metavar="TAG",
                        help="run only on workers with this tag, repeatable (default: any worker)")
    submit.add_argument("--priority", type=int, default=0, metavar="N",
                        help="the array's priority as a project: higher goes first (default 0)")
    submit.add_argument("--max-running", type=some, metavar="K",
                        help="run at most K of the array's jobs at once, the broker holds the others back "
                             "(default: no limit)")
    submit.add_argument("--retries", type=count, default=0, metavar="N",
                        help="run a job again, up to N times, while it exits non-zero (default 0)")
    submit.add_argument("--cwd", metavar="DIR",
                        help="folder the jobs run in, on the workers (default: the worker's)")
    submit.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="set a variable, repeatable (default: the worker's environment)")
    submit.add_argument("--wait", action="store_true",
                        help="then wait for the jobs, and exit as `zfarm wait` (default: return at once)")
    submit.add_argument("--json", action="store_true",
                        help="with --wait: the summary as JSON (default: text)")
    submit.add_argument("--accept-timeout", type=seconds, dest="accept_timeout_s", metavar="SECONDS",
                        help="how long to wait for the broker to accept every job, else exit 1 (default: "
                             f"{batch.SUBMIT_ACCEPT_BASE_S:g} s plus {batch.ACCEPT_PER_JOB_S * 1000:g} s per "
                             "1000 jobs)")
    keys_flag(submit)
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")

    wait = command(sub, "wait", "wait for an array's jobs: exit 0 if all succeeded, 1 if any failed, 2 on "
                   "timeout", _run_wait)
    _named(wait)
    wait.add_argument("--timeout", type=seconds, dest="timeout_s", metavar="SECONDS",
                      help="give up after this many seconds (default: wait as long as it takes)")
    wait.add_argument("--json", action="store_true", help="print the summary as JSON (default: text)")

    jobs = command(sub, "jobs", "list an array's jobs (without NAME: the arrays submitted from here)",
                   _run_jobs)
    _named(jobs, optional=True)
    jobs.add_argument("--json", action="store_true",
                      help="print the jobs and counts as JSON (default: a table)")

    logs = command(sub, "logs", "print what one job of an array printed (its stdout, or --stderr)", _run_logs)
    _named(logs)
    logs.add_argument("index", type=int, help="the job's index in the array")
    logs.add_argument("--stderr", action="store_true", help="its standard error instead (default: stdout)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="print a running job's output as it comes until it ends, then exit with its "
                           "outcome (default: a finished job's output only)")

    cancel = command(sub, "cancel", "cancel an array's unfinished jobs (all, or the given indexes)",
                     _run_cancel)
    _named(cancel)
    cancel.add_argument("indexes", type=int, nargs="*", metavar="INDEX", help="only these jobs")

    forget = command(sub, "forget", "drop an array: its unfinished jobs and every result kept for it",
                     _run_forget)
    _named(forget)


def _named(cmd: argparse.ArgumentParser, optional: bool = False) -> None:
    cmd.add_argument("name", nargs="?" if optional else None,
                     help="the array's name, as `zfarm submit` printed it")
    cmd.add_argument("--connect", metavar="ENDPOINT", default=None,
                     help="the broker's endpoint (env ZFARM_ADDRESS; default: the one the array was "
                          "submitted to)")
    keys_flag(cmd)


def _load(args: argparse.Namespace) -> ArrayRecord:
    record = batch.load(args.name)
    record.address = broker_address(args, record.address)
    record.keys = keys_folder(args, record.keys)
    record.key_name = args.key_name or record.key_name
    return record


# ---- submit ----------------------------------------------------------------------------------------


def _run_submit(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("zfarm submit needs a command: zfarm submit [OPTIONS] -- COMMAND [ARG...]")
    if args.json and not args.wait:
        raise ConfigError("--json goes with --wait (submit alone prints the array's name); "
                          "or run `zfarm wait NAME --json` later")
    append = False
    if args.array:
        indexes = batch.parse_array(args.array)
        items = [str(i) for i in indexes]
    elif args.args_file:
        items = _read_args_file(args.args_file)
        indexes = list(range(1, len(items) + 1))
        append = not any("{}" in arg for arg in command)
    else:
        indexes, items = [1], ["1"]
    if not indexes:
        raise ConfigError(f"{args.args_file}: no jobs (the file has no lines)")
    record = ArrayRecord(
        name=args.name or batch.new_name(command),
        address=broker_address(args),
        command=command,
        indexes=indexes,
        items=items,
        append_item=append,
        keys=keys_folder(args),
        key_name=args.key_name or "",
        timeout_s=args.timeout_s,
        mem_limit=args.mem_limit,
        retries=args.retries,
        max_running=args.max_running,
        priority=args.priority,
        resources={k: float(v) for k, v in (("cpus", args.cpus), ("gpus", args.gpus), ("mem", args.mem_limit))
                   if v},
        tags=sorted(set(args.tag)),
        cwd=args.cwd,
        env=_env(args.env),
        created_at=time.time(),
    )
    batch.save(record, new=True)
    try:
        attached = Attached(record)
    except BaseException:
        batch.remove(record.name)  # nothing reached the broker
        raise
    print(record.name, flush=True)
    if not args.wait:
        try:
            timeout_s = args.accept_timeout_s
            if timeout_s is None:
                timeout_s = batch.SUBMIT_ACCEPT_BASE_S + batch.ACCEPT_PER_JOB_S * len(indexes)
            missing = attached.wait_accepted(timeout_s)
        finally:
            attached.leave()
        if missing:
            print(
                f"zfarm: the broker at {record.address} did not accept {missing} of the {len(indexes)} jobs "
                f"of array {record.name} within {timeout_s:g} s (a full queue, --max-queued? an "
                f"overloaded broker?); the {len(indexes) - missing} accepted go on, and "
                f"`zfarm wait {record.name}` submits the others again",
                file=sys.stderr,
            )
            return EXIT_NOT_ACCEPTED
    print(
        f"zfarm: submitted {plural(len(indexes), 'job')} to {record.address} as array {record.name}; "
        f"`zfarm wait {record.name}` collects them",
        file=sys.stderr,
    )
    if not args.wait:
        return 0
    return _wait_and_report(attached, None, args.json)


def _read_args_file(name: str) -> list[str]:
    if name == "-":
        return batch.read_args_file(iter(sys.stdin))
    try:
        with open(name, encoding="utf-8") as lines:
            return batch.read_args_file(iter(lines))
    except OSError as exc:
        raise ConfigError(f"--args-file {name}: {exc.strerror or exc}") from None


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r}: write it as NAME=VALUE")
        env[key] = value
    return env


# ---- wait, jobs, logs --------------------------------------------------------------------------------


def _run_wait(args: argparse.Namespace) -> int:
    return _wait_and_report(Attached(_load(args)), args.timeout_s, args.json)


def _wait_and_report(attached: Attached, timeout_s: float | None, as_json: bool) -> int:
    try:
        finished = attached.wait(timeout_s, progress=not as_json and sys.stderr.isatty())
        states = attached.states()
    finally:
        attached.leave()
    counts = Counter(s.state.value for s in states)
    failed = [s.index for s in states if s.failed]
    name = attached.record.name
    if as_json:
        print(
            json.dumps(
                {
                    "name": name,
                    "total": len(states),
                    "counts": dict(counts),
                    "failed": failed,
                    "timed_out": not finished,
                }
            )
        )
    else:
        print(f"{name}: {_summary(states)}")
        if failed:
            print(f"failed: {_ranges(failed)}")
    if not finished:
        if not as_json:
            print(f"zfarm: stopped waiting after {timeout_s:g} s; the jobs go on", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_FAILED if failed else 0


def _summary(states: list[JobState]) -> str:
    counts = Counter(s.state for s in states)
    parts = [
        f"{counts[k]} {label}"
        for k, label in (
            (State.OK, "succeeded"),
            (State.FAILED, "failed"),
            (State.TIMEOUT, "timed out"),
            (State.ERROR, "did not run to an exit"),
            (State.CANCELLED, "cancelled"),
            (State.RUNNING, "running"),
            (State.PENDING, "pending"),
        )
        if counts[k]
    ]
    return f"{len(states)} job{'s' if len(states) != 1 else ''}: " + ", ".join(parts)


def _ranges(indexes: list[int]) -> str:
    """Indexes as an --array spec would write them: ``1-3,7,9-12``."""
    parts: list[str] = []
    run: list[int] = []
    for i in sorted(indexes):
        if run and i != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def _run_jobs(args: argparse.Namespace) -> int:
    if args.name is None:
        return _list_arrays(args.json)
    attached = Attached(_load(args))
    try:
        attached.settle()
        states = attached.states()
    finally:
        attached.leave()
    if args.json:
        counts = Counter(s.state.value for s in states)
        rows = [
            {
                "index": s.index,
                "state": s.state.value,
                "exit_code": s.exit_code,
                "worker": s.worker,
                "host": s.host,
                "run_s": s.run_s,
                "attempts": s.attempts,
                "error": s.error,
            }
            for s in states
        ]
        print(json.dumps({"name": args.name, "total": len(states), "counts": dict(counts), "jobs": rows}))
        return 0
    title = f"array {args.name}"
    cells = [
        [
            str(s.index),
            s.state.value,
            "" if s.exit_code is None else str(s.exit_code),
            s.worker,
            s.host,
            "" if s.run_s is None else f"{s.run_s:.2f}",
            str(s.attempts or ""),
            short_error(s, attached.record.timeout_s),
        ]
        for s in states
    ]
    if not sys.stdout.isatty():  # a pipe: plain columns, nothing cut or wrapped
        print(title)
        print_columns(JOB_COLUMNS, cells)
        print(_summary(states))
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for label in JOB_COLUMNS:  # ids whole; only the host may fold, and the error (short already)
        table.add_column(label, no_wrap=label not in ("host", "error"), overflow="fold", min_width=len(label))
    for row in cells:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(_summary(states), markup=False)
    return 0


#: the columns of ``zfarm jobs NAME``
JOB_COLUMNS = ("index", "state", "exit", "worker", "host", "run s", "attempts", "error")


def short_error(state: JobState, timeout_s: float | None = None) -> str:
    """Why a job did not succeed, in a few words for a table cell: ``exit 1``, ``signal 9``,
    ``timeout 3 s``, ``not found``, else the error's type (the whole text is in ``jobs --json``)."""
    if state.state is State.TIMEOUT:
        return f"timeout {timeout_s:g} s" if timeout_s else "timeout"
    if state.state is State.FAILED and state.exit_code is not None:
        return f"signal {-state.exit_code}" if state.exit_code < 0 else f"exit {state.exit_code}"
    if not state.error:
        return ""
    type_name = state.error.partition(":")[0]  # "X: text" -> "X" (describe writes the type's name)
    if type_name == "CommandNotFound":
        return "not found"
    return type_name if type_name.isidentifier() else state.error.splitlines()[0][:40]


#: the columns of ``zfarm jobs`` (the arrays)
ARRAY_COLUMNS = ("name", "jobs", "submitted", "address", "command")


def _list_arrays(as_json: bool) -> int:
    folder = batch.state_dir() / "arrays"
    files = list(folder.glob("*.json")) if folder.is_dir() else []
    # an older record has no creation time: its file's last change stands in (a cancel rewrites it)
    records = [(batch.load(path.stem), path) for path in files]
    listed = [(r, r.created_at or path.stat().st_mtime) for r, path in records]
    listed.sort(key=lambda pair: (pair[1], pair[0].name))  # in submission order: the newest last
    if as_json:
        print(
            json.dumps(
                [
                    {"name": r.name, "jobs": len(r.indexes), "address": r.address, "created_at": r.created_at,
                     "submitted_at": at, "command": r.command}
                    for r, at in listed
                ]
            )
        )
        return 0
    print_columns(
        ARRAY_COLUMNS,
        [
            [r.name, str(len(r.indexes)), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)), r.address,
             shlex.join(r.command)]
            for r, at in listed
        ],
    )
    return 0


def _run_logs(args: argparse.Namespace) -> int:
    record = _load(args)
    if args.index not in record.indexes:
        raise ConfigError(f"array {record.name} has no job {args.index}")
    at = record.indexes.index(args.index)
    stream = follow.STDERR if args.stderr else follow.STDOUT
    printed = follow.Position() if args.follow else None
    peeker: follow.Peeker | None = None
    try:
        state, result, key = _look(record, at, 0.0)
        # Followed through a monitor link: the array's session is held only to look, so that other
        # watchers (`zfarm jobs`, `wait`) may come and go meanwhile.
        while key is not None and printed is not None:
            if peeker is None:
                peeker = follow.Peeker(record.address, record.keys, *key)
            follow.follow(peeker, stream, printed, _write, _say)
            state, result, key = _look(record, at, FINISH_WAIT_S)  # over for the broker: its result
    finally:
        if peeker is not None:
            peeker.close()
    if result is None:
        detail = f": {state.error}" if state.error else ""
        print(
            f"zfarm: job {args.index} of {record.name} is {state.state.value}{detail}; no output kept",
            file=sys.stderr,
        )
        return 1
    text, cut = (result.stderr, result.stderr_cut) if args.stderr else (result.stdout, result.stdout_cut)
    if printed is None:
        if cut:
            _say(f"the first {cut} bytes were cut; the last {len(text.encode())} follow")
        sys.stdout.write(text)
        return 0
    rest, note = printed.rest(text.encode(), cut)  # what the job wrote after the last chunk printed
    if note:
        _say(note)
    _write(rest)
    if state.succeeded:
        return 0
    _say(f"job {args.index} of {record.name} did not succeed: {short_error(state, record.timeout_s)}")
    return EXIT_FAILED


#: how long ``logs --follow`` waits for a job's result once the broker says the job is over
FINISH_WAIT_S = 5.0


def _look(record: ArrayRecord, at: int, wait_s: float) -> tuple[JobState, CommandResult | None,
                                                                 tuple[str, int] | None]:
    """Rejoin the array's session for a moment: job ``at``'s state and result (waiting up to
    ``wait_s`` for it), and while it is not over, its key at the broker (client id, number)."""
    attached = Attached(record)
    try:
        attached.settle()
        future = attached.futures[at]
        if wait_s:
            concurrent.futures.wait([future], wait_s)
        state = attached.state(at)
        key = None if future.done() else (attached.client.id, future.seq)  # type: ignore[attr-defined]
        return state, batch.result_of(future), key
    finally:
        attached.leave()


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _say(note: str) -> None:
    print(f"zfarm: {note}", file=sys.stderr, flush=True)


# ---- cancel, forget ----------------------------------------------------------------------------------


def _run_cancel(args: argparse.Namespace) -> int:
    record = _load(args)
    wanted = set(args.indexes or record.indexes)
    if unknown := sorted(wanted - set(record.indexes)):
        raise ConfigError(f"array {record.name} has no job {_ranges(unknown)}")
    wanted -= set(record.cancelled)  # cancelled already: not cancelled (and counted) twice
    attached = Attached(record)
    try:
        attached.settle()
        pending = [s.index for s in attached.states() if s.index in wanted and not s.finished]
        if pending:  # right before killing them: one more round trip takes in what finished since
            attached.settle()
            at = {index: position for position, index in enumerate(record.indexes)}
            pending = [s.index for s in attached.states() if s.index in wanted and not s.finished]
            for index in pending:
                attached.futures[at[index]].kill()  # type: ignore[attr-defined]
            # A job that finishes between that check and its CANCEL reaching the broker counts as
            # cancelled all the same: its result is dropped (docs/batch.md).
            record.cancelled = sorted(set(record.cancelled) | set(pending))
            batch.save(record)  # every later rejoin skips their numbers
    finally:
        attached.leave()  # (the CANCELs go before the goodbye)
    print(
        f"{record.name}: cancelled {plural(len(pending), 'unfinished job')}"
        + (f": {_ranges(pending)}" if pending else "")
    )
    return 0


def _run_forget(args: argparse.Namespace) -> int:
    from zfarm.client.executor import Client

    record = _load(args)
    monitor.check_listening(record.address)
    client = Client(
        record.address, session=record.session, keys=record.keys or None, key_name=record.key_name or None
    )
    client.shutdown(wait=False, cancel_futures=True)
    batch.remove(record.name)
    print(f"{record.name}: forgotten (its jobs and kept results dropped at {record.address})")
    return 0
