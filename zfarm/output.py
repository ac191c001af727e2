"""A job's printed output: captured at the file-descriptor level in its slot, sent with its result.

::

    slot: fd 1, fd 2 ──dup2──► two scratch files ──job ends──► last 1 MiB of each ──► output frame
                                                                                      │
    client: future.output ◄── JobOutput ◄── the trailing frame of the job's result ◄──┘

Redirecting the descriptors (not ``sys.stdout``) catches everything the job
prints: Python code, C code writing to fd 1, and child processes, which inherit
the descriptors. The scratch files are on disk, so a job printing gigabytes
costs the worker disk space, not memory; only the tail of each stream
(``TAIL_BYTES``) travels, and how much was cut is noted.

The output travels as one extra frame after the result's own frames, marked by
``MAGIC``: pickle ignores buffers it does not ask for, so a peer that does not
look for the frame still reads the result unchanged.

While a job runs, its worker can read its output (``zfarm logs --follow``, PEEK): every stream a
job writes is findable by name in the worker's *live folder* (``LIVE_DIR_VARIABLE`` in a slot)::

    LIVE/slot-PID.out, .err              a slot's capture of fd 1 and 2 (a link to the --output-dir part file)
    LIVE/CLIENT_SEQ.cmd.TOKEN.out, .err  a command job's own streams (run_command), while it runs

The worker reads at most a chunk of each (:func:`read_chunk`); the command's streams, when there,
are the job's output, else the slot's capture.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import msgpack

from zfarm import scratch
from zfarm.protocol import as_bytes, buffer_of
from zfarm.scratch import file_stem, host_stem

#: bytes of each stream kept per job (the end of it)
TAIL_BYTES = 1024 * 1024
#: the variable that names the running job in its slot (and its child processes)
JOB_ID_VARIABLE = "ZFARM_JOB_ID"
#: the variable that names, in a slot, the folder where whole output streams are kept (unset: none)
OUTPUT_DIR_VARIABLE = "ZFARM_OUTPUT_DIR"
#: the variable that names, in a slot, its worker's live folder (see the module's docstring)
LIVE_DIR_VARIABLE = "ZFARM_LIVE_DIR"
#: the first bytes of an output frame
MAGIC = b"\x00zfarm-output-1\x00"


@dataclass(frozen=True, slots=True)
class JobOutput:
    """What a job wrote to its standard output and error (the last ``TAIL_BYTES`` of each).

    Attributes:
        stdout, stderr: the text (UTF-8; undecodable bytes replaced).
        stdout_cut, stderr_cut: bytes dropped from the start of each stream (0: complete).
    """

    stdout: str = ""
    stderr: str = ""
    stdout_cut: int = 0
    stderr_cut: int = 0

    def __bool__(self) -> bool:
        return bool(self.stdout or self.stderr or self.stdout_cut or self.stderr_cut)


def pack(out: bytes, err: bytes, out_cut: int, err_cut: int) -> bytes:
    return MAGIC + bytes(msgpack.packb([out, err, out_cut, err_cut]))


def take(frames: list[Any]) -> JobOutput | None:
    """The output carried by a result's frames, if its last frame is an output frame."""
    if not frames:
        return None
    head = memoryview(buffer_of(frames[-1]))[:len(MAGIC)]  # no copy of a large result buffer
    if head != MAGIC:
        return None
    last = as_bytes(frames[-1])
    try:
        out, err, out_cut, err_cut = msgpack.unpackb(last[len(MAGIC):])
        return JobOutput(_text(out), _text(err), int(out_cut), int(err_cut))
    except (ValueError, TypeError, msgpack.UnpackException):
        return None


def _text(data: Any) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else ""


def read_tail(fd: int, keep: int = TAIL_BYTES) -> tuple[bytes, int]:
    """The last ``keep`` bytes of an open file, and how many bytes came before them."""
    size = os.fstat(fd).st_size
    start = max(0, size - keep)
    return os.pread(fd, size - start, start), start


class FdCapture:
    """Sends this process's fd 1 and 2 to files while a job runs (one per slot).

    By default the files are two scratch files with no name, reused job after job. With
    ``output_dir`` (``zfarm worker --output-dir``) each job gets its own pair, kept whole:
    ``DIR/CLIENT_SEQ.out`` and ``.err``, named as Slurm's ``%A_%a`` (empty ones are removed).
    """

    def __init__(self, output_dir: str = "", live_dir: str = "") -> None:
        """``live_dir``: the worker's live folder, where the streams are findable while a job runs."""
        self.output_dir = output_dir
        self.live_name = slot_live_name(os.getpid())
        self.live_dir = live_dir
        self._files: list[int] = []
        if not output_dir:
            self._files = open_live(live_dir, self.live_name) if live_dir else [
                _scratch_fd("zfarm-out-"), _scratch_fd("zfarm-err-")]
        self._kept: AttemptFiles | None = None
        self._saved = [os.dup(1), os.dup(2)]  # where they pointed before: the worker's own

    def start(self, job: str = "") -> None:
        _flush_python_streams()
        if self.output_dir:
            self._kept = AttemptFiles(self.output_dir, file_stem(job))
            self._files = list(self._kept.fds)
            link_live(self.live_dir, self.live_name, self._kept.parts)
        for fd, held in zip((1, 2), self._files, strict=True):
            os.dup2(held, fd)

    def stop(self) -> bytes:
        """Put the descriptors back; return the output frame (empty bytes: the job printed nothing)."""
        _flush_python_streams()
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
        (out, out_cut), (err, err_cut) = (read_tail(held) for held in self._files)
        if self._kept is not None:
            drop_live(self.live_dir, self.live_name)
            self._kept.finish()
            self._kept, self._files = None, []
        else:  # emptied now, before the result goes: the next job's live view never shows this one's
            for held, printed in zip(self._files, (out, err), strict=True):
                if printed:
                    os.ftruncate(held, 0)
                    os.lseek(held, 0, os.SEEK_SET)
        if not (out or err):
            return b""
        return pack(out, err, out_cut, err_cut)


class AttemptFiles:
    """One attempt's stdout and stderr kept whole in a worker's ``--output-dir``: ``DIR/STEM.out``
    and ``DIR/STEM.err``, open for writing as :attr:`fds`.

    Two copies of one job (requeued, or retried elsewhere) never share a file: each writes its own
    ``PATH.HOST-PID.part``, which :meth:`finish` renames into place when it ends, so the copy that
    finished last wins and a copy killed half-way leaves only its ``.part`` file.

    Raises:
        OSError: a file cannot be created in the folder.
    """

    def __init__(self, folder: str, stem: str) -> None:
        base = os.path.join(folder, stem)
        self.paths = (f"{base}.out", f"{base}.err")
        suffix = _attempt_suffix()
        self.parts = tuple(f"{path}.{suffix}.part" for path in self.paths)
        self.fds: list[int] = []
        try:
            for part in self.parts:
                self.fds.append(os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
        except OSError:
            self.discard()
            raise

    def finish(self) -> None:
        """Close the files and put each in place (an empty stream: no file at all)."""
        printed = [os.fstat(fd).st_size > 0 for fd in self.fds]
        self._close()
        for part, path, kept in zip(self.parts, self.paths, printed, strict=True):
            keep(part, path, kept)

    def discard(self) -> None:
        """Close the files and remove them: the attempt never ran (its program was not found)."""
        self._close()
        for part in self.parts:
            with contextlib.suppress(OSError):
                os.unlink(part)

    def _close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


#: (pid, "HOST-PID") of the process that computed it: a forked slot computes its own once
_suffix: tuple[int, str] = (0, "")


def _attempt_suffix() -> str:
    """What names this process's attempt files (``HOST-PID``), computed once per process."""
    global _suffix
    pid = os.getpid()
    if _suffix[0] != pid:
        _suffix = (pid, f"{host_stem()}-{pid}")
    return _suffix[1]


def keep(part: str, path: str, printed: bool) -> None:
    """Put a finished attempt's file in place (an empty stream: no file at all)."""
    with contextlib.suppress(OSError):
        if printed:
            os.replace(part, path)
        else:
            os.unlink(part)
            os.unlink(path)  # an earlier copy's file is not this run's output


# ---- the live folder: a running job's streams, by name -------------------------------------------

STREAM_SUFFIXES = ("out", "err")


def make_live_dir() -> str:
    """A new live folder for a worker: private, named after this host and process, so that a later
    worker on this host removes it if this one is killed with its slots before they do."""
    return scratch.make_owned_dir("live")


def sweep_live_dirs(folder: str | None = None) -> list[str]:
    """Remove the live folders that killed workers of this host left behind; return them."""
    return scratch.sweep_owned_dirs("live", folder)


def slot_live_name(pid: int) -> str:
    """The name of a slot's capture files in the live folder."""
    return f"slot-{pid}"


def command_live_name(job: str) -> str:
    """What a command job's own stream files in the live folder are named after (``job``:
    ``client:seq``); each run of the command adds a token of its own (:func:`new_command_live_name`)."""
    return f"{file_stem(job)}.cmd"


def new_command_live_name(job: str) -> str:
    """The name of one run of a command job's streams: its job's, and a token no other run has. The
    token tells a follower that the command started over (a retry): a file name, unlike an inode
    number, is never reused at once."""
    return f"{command_live_name(job)}.{secrets.token_hex(7)}"


def live_paths(live_dir: str, name: str) -> tuple[str, str]:
    """The stdout and stderr paths of ``name`` in the live folder."""
    base = os.path.join(live_dir, name)
    return f"{base}.{STREAM_SUFFIXES[0]}", f"{base}.{STREAM_SUFFIXES[1]}"


def open_live(live_dir: str, name: str) -> list[int]:
    """Create (or empty) the two stream files of ``name`` in the live folder; their descriptors."""
    fds: list[int] = []
    try:
        for path in live_paths(live_dir, name):
            fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def link_live(live_dir: str, name: str, targets: tuple[str, ...]) -> None:
    """Make ``name``'s streams in the live folder links to ``targets`` (files kept elsewhere)."""
    if not live_dir:
        return
    for path, target in zip(live_paths(live_dir, name), targets, strict=True):
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):  # a job is never stopped for want of a live view
            os.symlink(os.path.abspath(target), path)


def drop_live(live_dir: str, name: str) -> None:
    """Remove ``name``'s stream files (or links) from the live folder."""
    if not live_dir:
        return
    for path in live_paths(live_dir, name):
        with contextlib.suppress(OSError):
            os.unlink(path)


def command_runs(live_dir: str, job: str) -> list[tuple[str, int]]:
    """The runs of ``job``'s command in the live folder (normally none or one): each one's name and
    its token as a number."""
    prefix, suffix = f"{command_live_name(job)}.", f".{STREAM_SUFFIXES[0]}"
    try:
        names = os.listdir(live_dir)
    except OSError:
        return []
    runs = []
    for name in names:
        token = name[len(prefix):-len(suffix)]
        if name.startswith(prefix) and name.endswith(suffix) and len(token) == 14:
            with contextlib.suppress(ValueError):
                runs.append((name[:-len(suffix)], int(token, 16)))
    return runs


def drop_command_runs(live_dir: str, job: str) -> None:
    """Remove what the runs of ``job``'s command left in the live folder (it was killed)."""
    for name, _token in command_runs(live_dir, job):
        drop_live(live_dir, name)


def running_streams(live_dir: str, job: str, slot_pid: int) -> tuple[tuple[str, str], int]:
    """Where a running job's output is, and which run of it that is: its command's own streams if it
    runs one (the run's token), else its slot's (the slot's pid)."""
    runs = command_runs(live_dir, job)
    if runs:
        name, token = runs[-1]
        return live_paths(live_dir, name), token
    return live_paths(live_dir, slot_live_name(slot_pid)), slot_pid


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes of a stream from an offset: ``size`` is the stream's length when read (-1: no such
    stream)."""

    data: bytes = b""
    size: int = -1


def read_chunk(path: str, offset: int, limit: int) -> Chunk:
    """At most ``limit`` bytes of the file at ``path`` from ``offset`` (-1: none wanted)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return Chunk()
    try:
        stat = os.fstat(fd)
        data = os.pread(fd, min(limit, stat.st_size - offset), offset) if 0 <= offset < stat.st_size else b""
        return Chunk(data, stat.st_size)
    finally:
        os.close(fd)


def _scratch_fd(prefix: str) -> int:
    """An open file on disk with no name: it goes when the slot does."""
    fd, path = tempfile.mkstemp(prefix=prefix)
    os.unlink(path)
    return fd


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
