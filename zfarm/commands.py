"""Command jobs: a program run on a worker, as ``subprocess.run`` would run it there.

::

    Client.run(args) ──► a function job: run_command(CommandSpec) ──► slot ──► Popen(args)
                                                                          │ stdout, stderr → scratch files
    future.result() ◄── CommandResult(returncode, stdout, stderr, ...) ◄───┘ (the last 1 MiB of each)

A command job *is* a function job whose function is :func:`run_command`, which
zfarm ships (it pickles by reference). So everything a function job has, a
command has too, with no second path through the farm: time and memory limits
(the chaperone counts and kills the command's whole process tree), retries,
cancel, sessions, the journal, exactly-once delivery, CURVE.

The command's own output goes to scratch files on disk, not pipes, so a
command printing gigabytes costs the worker no memory; the last ``TAIL_BYTES``
of each stream come back and ``stdout_cut``/``stderr_cut`` say how much was cut.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TextIO

from zfarm import proctree
from zfarm.errors import CommandFailed, CommandNotFound, ConfigError
from zfarm.output import (
    JOB_ID_VARIABLE,
    LIVE_DIR_VARIABLE,
    OUTPUT_DIR_VARIABLE,
    TAIL_BYTES,
    AttemptFiles,
    JobOutput,
    drop_live,
    link_live,
    new_command_live_name,
    open_live,
    read_tail,
)
from zfarm.scratch import file_stem

#: lines of stderr quoted in a CommandFailed message
STDERR_LINES_QUOTED = 10


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A finished command, as ``subprocess.CompletedProcess`` with where and how long it ran.

    Attributes:
        args: the command as given (a list of arguments, or a shell line).
        returncode: exit status; negative ``-N`` when signal N killed it.
        stdout, stderr: what it printed (text; the last 1 MiB of each).
        run_s: how long it ran, seconds.
        worker, host: the worker and machine that ran it.
        stdout_cut, stderr_cut: bytes dropped from the start of each stream (0: complete).
        attempts: how many times it ran (more than 1 with ``retries``).
        timed_out: it ran past its own time limit (``CommandSpec.timeout_s``) and was killed.
    """

    args: tuple[str, ...] | str
    returncode: int
    stdout: str
    stderr: str
    run_s: float
    worker: str
    host: str
    stdout_cut: int = 0
    stderr_cut: int = 0
    attempts: int = 1
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def signal(self) -> str:
        """The name of the signal that killed the command, or ""."""
        if self.returncode >= 0:
            return ""
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def check_returncode(self) -> None:
        """Raise :class:`zfarm.CommandFailed` if the command did not exit with status 0."""
        if self.returncode != 0:
            tail = "\n".join(self.stderr.rstrip("\n").splitlines()[-STDERR_LINES_QUOTED:])
            limit = self.run_s if self.timed_out else None
            raise CommandFailed(command_text(self.args), self.returncode, tail, self.host, self, limit)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What to run: the arguments of :meth:`zfarm.Client.run`, made plain and picklable.

    ``env`` holds only the variables to add to the worker's environment, sorted, so
    that the same command pickles to the same bytes (sessions match jobs by content).
    """

    args: tuple[str, ...] | str
    shell: bool = False
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    check: bool = True
    input: bytes | None = None
    retries: int = 0  # runs again while it exits non-zero (job arrays)
    timeout_s: float | None = None  # killed past it, keeping its output (job arrays)
    scratch: bool = True  # a private ZFARM_JOB_TMPDIR, removed afterwards

    @classmethod
    def of(cls, args: str | Sequence[str | os.PathLike[str]], *, shell: bool = False,
           cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
           check: bool = True, input: str | bytes | None = None, retries: int = 0,
           timeout_s: float | None = None) -> CommandSpec:
        """Check and normalise ``Client.run``'s arguments.

        Raises:
            ConfigError: no arguments, or one string without ``shell=True``.
        """
        command: tuple[str, ...] | str
        if isinstance(args, str):
            if not shell:
                raise ConfigError(f"a command given as one string needs shell=True, or give a list: {args!r}")
            command = args
        else:
            command = tuple(os.fspath(a) for a in args)
            if not command:
                raise ConfigError("a command needs at least one argument, the program to run")
            if shell:
                command = " ".join(shlex.quote(a) for a in command)
        data = input.encode() if isinstance(input, str) else input
        pairs = tuple(sorted((str(k), str(v)) for k, v in (env or {}).items()))
        folder = os.fspath(cwd) if cwd is not None else None
        return cls(command, shell, folder, pairs, check, data, retries, timeout_s)


def command_text(args: tuple[str, ...] | str) -> str:
    return args if isinstance(args, str) else shlex.join(args)


def run_command(spec: CommandSpec) -> CommandResult:
    """Run a command in this process's slot and return what it did (the job function).

    Raises:
        CommandNotFound: the program or the working directory does not exist here.
        CommandFailed: ``spec.check`` and the command exited non-zero.
    """
    host = socket.gethostname()
    folder = os.environ.get(OUTPUT_DIR_VARIABLE, "")  # the slot's --output-dir (see zfarm.output)
    if spec.cwd is not None and not os.path.isdir(spec.cwd):
        raise CommandNotFound(command_text(spec.args), host, f"no folder {spec.cwd} to run it in")
    attempts = 0
    while True:
        attempts += 1
        result = _run_once(spec, host, attempts, folder)
        if result.returncode == 0 or result.timed_out or attempts > spec.retries:
            break
    if spec.check:
        result.check_returncode()
    return result


@contextlib.contextmanager
def _stream_files(spec: CommandSpec, folder: str) -> Iterator[tuple[int, int]]:
    """Where the command's stdout and stderr go (open descriptors): scratch files, or whole files
    kept in the worker's ``--output-dir`` ``folder`` (``ARRAY_INDEX.out`` for a job of an array,
    as Slurm's ``%A_%a``). In a slot they are findable while the command runs, by the job's name in
    the worker's live folder (``zfarm logs --follow``; see zfarm.output)."""
    live = os.environ.get(LIVE_DIR_VARIABLE, "")
    live_name = new_command_live_name(os.environ.get(JOB_ID_VARIABLE, "command"))  # this run's
    if not folder and live:
        fds = open_live(live, live_name)
        try:
            yield fds[0], fds[1]
        finally:
            drop_live(live, live_name)
            for fd in fds:
                os.close(fd)
        return
    if not folder:
        with tempfile.TemporaryFile(prefix="zfarm-out-") as out, \
                tempfile.TemporaryFile(prefix="zfarm-err-") as err:
            yield out.fileno(), err.fileno()
        return
    env = dict(spec.env)
    if "ZFARM_ARRAY_NAME" in env:
        stem = file_stem(f"{env['ZFARM_ARRAY_NAME']}_{env.get('ZFARM_ARRAY_INDEX', '')}")
    else:
        stem = file_stem(os.environ.get(JOB_ID_VARIABLE, "command")) + ".cmd"
    files = AttemptFiles(folder, stem)  # another copy of this job may write the same names
    link_live(live, live_name, files.parts)
    try:
        yield files.fds[0], files.fds[1]
    except BaseException:  # it never ran (not found): no output of its own
        drop_live(live, live_name)
        files.discard()
        raise
    drop_live(live, live_name)
    files.finish()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _end_leftovers(pgid: int) -> None:
    """Kill what the command left running: its process group, and in a slot everything below it."""
    _kill_group(pgid)
    if proctree.is_subreaper():  # setsid'd and double-forked ones were adopted by this slot
        proctree.end_own_descendants()


def _run_once(spec: CommandSpec, host: str, attempts: int, folder: str) -> CommandResult:
    env = dict(os.environ)
    env.update(spec.env)
    scratch = tempfile.mkdtemp(prefix="zfarm-job-") if spec.scratch else None
    if scratch is not None:
        env["ZFARM_JOB_TMPDIR"] = scratch
    started = time.perf_counter()
    try:
        stdin = subprocess.PIPE if spec.input is not None else subprocess.DEVNULL
        with _stream_files(spec, folder) as (out, err):
            try:
                proc = subprocess.Popen(spec.args, shell=spec.shell, cwd=spec.cwd, env=env, stdin=stdin,
                                        stdout=out, stderr=err, start_new_session=True)
            except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
                raise CommandNotFound(command_text(spec.args), host, exc.strerror or str(exc)) from None
            timed_out = False
            try:
                proc.communicate(spec.input, timeout=spec.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()  # before any reaping below, which would lose its status
            finally:
                _end_leftovers(proc.pid)
            run_s = time.perf_counter() - started
            stdout, stdout_cut = read_tail(out, TAIL_BYTES)
            stderr, stderr_cut = read_tail(err, TAIL_BYTES)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    worker = os.environ.get("ZFARM_WORKER_ID", "")
    return CommandResult(spec.args, proc.returncode, stdout.decode("utf-8", "replace"),
                         stderr.decode("utf-8", "replace"), run_s, worker, host, stdout_cut, stderr_cut,
                         attempts, timed_out)


def echo_output(job: str, future: Future[Any]) -> None:
    """Print what a finished job printed, each line prefixed with the job (``Client(echo_output=True)``).

    A command's own output (in its :class:`CommandResult`) is printed too. Lines go to this
    process's stdout or stderr as they went on the worker; the cut of a long stream is noted.
    """
    if future.cancelled():
        return
    printed = [getattr(future, "output", None)]
    # the plain Future's methods: echoing a result is not the program reading it (sessions)
    error = Future.exception(future, 0)
    printed.append(error.result if isinstance(error, CommandFailed) else
                   Future.result(future, 0) if error is None else None)
    streams: list[tuple[str, int, TextIO]] = []
    for out in printed:
        if isinstance(out, (CommandResult, JobOutput)):
            streams += [(out.stdout, out.stdout_cut, sys.stdout), (out.stderr, out.stderr_cut, sys.stderr)]
    for text, cut, stream in streams:
        if cut:
            print(f"[{job}] ... ({cut} bytes cut)", file=stream)
        for line in text.splitlines():
            print(f"[{job}] {line}", file=stream)
        stream.flush()
