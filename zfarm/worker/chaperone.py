"""Slot processes: each runs one job at a time, so a job cannot silence its worker.

::

    worker loop ──task──► pipe ──► slot process: fn(*args) ──► pipe ──outcome──► worker loop
         │                                 ▲
         └── lifeline pipe (never written) ┘  EOF = the worker died: the slot exits too

A job that holds the GIL, segfaults or calls ``os._exit`` only takes its slot
down: the pool notices the dead pipe, reports :class:`JobCrashed` naming the
exit code or signal, and starts a fresh slot. Slots come from a forkserver, a
clean single-threaded parent, so they inherit no ZeroMQ threads or sockets.
Functions are unpickled once per slot and cached by their id.

Each slot owns its job's whole process tree (see :mod:`zfarm.proctree`): it is a
child subreaper, so whatever the job starts stays below it, is counted against
the job's memory limit, and is killed when the job ends, times out, is cancelled,
or the worker goes. What the job prints goes to scratch files at the
file-descriptor level and travels with its result (see :mod:`zfarm.output`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from zfarm import output, proctree, scatter
from zfarm import protocol as p
from zfarm import serialization as ser
from zfarm.errors import ConfigError, JobCrashed, JobTimeout, MemoryLimitExceeded
from zfarm.output import JOB_ID_VARIABLE, LIVE_DIR_VARIABLE, OUTPUT_DIR_VARIABLE, FdCapture
from zfarm.protocol import Outcome, ResultKind, remember_fn, split_frames
from zfarm.worker import pipe

log = logging.getLogger(__name__)

Key = tuple[str, int]
#: exit status of a slot whose worker died
ORPHANED_EXIT = 70


@dataclass(slots=True)
class SlotTask:
    key: Key
    attempt: int
    fn_id: bytes
    fn_blob: Any
    frames: list[Any]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.key[0]}:{self.key[1]}"


@dataclass(slots=True)
class SlotOutcome:
    key: Key
    attempt: int
    outcome: Outcome
    frames: list[Any]
    info: str = ""
    run_s: float = 0.0
    started_at: float = 0.0  # epoch seconds, as the slot saw them
    finished_at: float = 0.0
    peak_rss: int = 0  # the slot's peak resident memory so far, or this job's largest child's, bytes
    kind: int = 0  # a protocol.ResultKind: LIMIT for a job killed by its time or memory limit

    def stats_row(self) -> list[Any]:
        return [self.started_at, self.finished_at, self.run_s, self.peak_rss]


# ---- inside the slot process -----------------------------------------------------------------------


def _slot_main(conn: Connection, lifeline: Connection, output_dir: str = "",
               worker_fds: tuple[int, ...] = (), live_dir: str = "") -> None:
    # A slot forked from the worker holds copies of the worker's ends of every slot's pipes: close
    # them, or its own lifeline would never reach EOF when the worker dies.
    for fd in worker_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    # Ctrl-C and a SIGTERM sent to the whole process group are the worker's to handle:
    # it lets running jobs finish, and kills slots itself with SIGKILL when it must.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_worker, args=(lifeline,), daemon=True).start()
    proctree.become_subreaper()
    capture = FdCapture(output_dir, live_dir)
    _set_env(OUTPUT_DIR_VARIABLE, output_dir or None)  # where command jobs keep their whole output
    _set_env(LIVE_DIR_VARIABLE, live_dir or None)  # where command jobs' streams are findable while they run
    functions: dict[bytes, Any] = {}
    own_devices = os.environ.get(CUDA_DEVICES)
    while True:
        try:
            (fn_id, with_fn, job_name, devices, upstream), frames = pipe.receive(conn)
        except (EOFError, OSError):
            os._exit(0)  # the worker closed the pipe: a normal end
        if with_fn:
            remember_fn(functions, fn_id, _load(frames.pop(0)))
        os.environ[JOB_ID_VARIABLE] = job_name
        _set_env(CUDA_DEVICES, devices if devices is not None else own_devices)
        children_before = _children_peak_bytes()
        capture.start(job_name)
        started_at, started = time.time(), time.perf_counter()
        try:
            outcome, out, info = _run(functions.get(fn_id), frames, upstream)
        finally:
            ser.upstream_values.clear()
            run_s = time.perf_counter() - started
            proctree.end_own_descendants()  # nothing the job started outlives it
            output = capture.stop()
        if output:
            out = [*out, output]
        header = [int(outcome), info, run_s, started_at, started_at + run_s, _peak_rss_bytes(children_before)]
        try:
            pipe.send(conn, header, out)
        except OSError:
            os._exit(ORPHANED_EXIT)  # the worker died while we reported


#: the variable CUDA reads: a job given GPUs by the broker sees only those
CUDA_DEVICES = "CUDA_VISIBLE_DEVICES"


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _maxrss_bytes(who: str) -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(getattr(resource, who)).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS says bytes, Linux KiB


def _children_peak_bytes() -> int:
    return _maxrss_bytes("RUSAGE_CHILDREN")


def _peak_rss_bytes(children_before: int) -> int:
    """The slot's own peak so far, or the largest process this job started if that is larger.

    ``RUSAGE_CHILDREN`` is the largest child the slot ever reaped, over all its jobs: it counts
    for this job only when it grew during it (so one of this job's processes reached it). A job
    whose processes stay below an earlier job's largest one reports the slot's own peak only.
    """
    children = _children_peak_bytes()
    return max(_maxrss_bytes("RUSAGE_SELF"), children if children > children_before else 0)


def _exit_with_worker(lifeline: Connection) -> None:
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    proctree.kill_descendants(os.getpid())  # the job's processes go with us
    _leave_live_folder(os.environ.get(LIVE_DIR_VARIABLE, ""))
    os._exit(ORPHANED_EXIT)


def _leave_live_folder(live_dir: str) -> None:
    """The worker died (it cannot clean up): remove this slot's streams, those of its job's command,
    and the live folder itself once the last slot has."""
    if not live_dir:
        return
    output.drop_live(live_dir, output.slot_live_name(os.getpid()))
    output.drop_command_runs(live_dir, os.environ.get(JOB_ID_VARIABLE, ""))
    try:
        os.rmdir(live_dir)
    except OSError:
        pass  # another slot's files are still there: the last slot to go removes it


class _Unloadable:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _load(blob: Any) -> Any:
    try:
        return scatter.load(blob)
    except Exception as exc:  # the function's module is missing here, most often
        return _Unloadable(exc)


def _take_upstream(frames: list[Any], counts: list[int]) -> list[Any]:
    """Unpickle the upstream results the broker appended to a job's frames into
    ``ser.upstream_values`` (its ``Upstream`` arguments read them); return the job's own frames."""
    if not counts:
        return frames
    own = len(frames) - sum(counts)
    for result in split_frames(frames[own:], counts):  # (an output frame after a result is unread)
        ser.upstream_values.append(ser.loads(result))
    return frames[:own]


def _run(fn: Any, frames: list[Any], upstream: list[int] | None = None) -> tuple[Outcome, list[Any], str]:
    if fn is None:
        exc: BaseException = RuntimeError("the slot never received this job's function")
        return Outcome.ERROR, ser.dump_exception(exc), ser.error_line(exc)
    if isinstance(fn, _Unloadable):
        exc = fn.exc
        note = ("the job's function could not be unpickled on this worker; make its module importable "
                "here (install it, or set PYTHONPATH) or pass it by value with "
                "cloudpickle.register_pickle_by_value")
        problem = ImportError(f"{ser.error_line(exc)}; {note}")
        return Outcome.ERROR, ser.dump_exception(problem), ser.error_line(problem)
    objects: dict[bytes, Any] = {}
    if isinstance(fn, scatter.Bundled):
        fn, objects = fn.fn, fn.objects
    try:
        with scatter.resolving(objects):  # handles of scattered objects unpickle as the objects
            mode, args, kwargs = ser.loads(_take_upstream(frames, upstream or []))
    except BaseException as exc:
        info = "arguments could not be unpickled: " + ser.error_line(exc)
        return Outcome.ERROR, ser.dump_exception(exc), info
    if mode == ser.CHUNK:
        return _run_chunk(fn, args)
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        return Outcome.ERROR, ser.dump_exception(exc), ser.error_line(exc)
    return _result(value)


def _run_chunk(fn: Any, items: list[tuple[Any, ...]]) -> tuple[Outcome, list[Any], str]:
    values: list[Any] = []
    for item in items:
        try:
            values.append(fn(*item))
        except BaseException as exc:
            info = f"item {len(values)} of the chunk: {ser.error_line(exc)}"
            return Outcome.ERROR, ser.dump_exception(exc, values), info
    return _result(values)


def _result(value: Any) -> tuple[Outcome, list[Any], str]:
    try:
        return Outcome.OK, ser.dumps(value), ""
    except BaseException as exc:
        try:  # raised from the pickling error, so the caller sees where pickling failed (__cause__)
            raise TypeError(f"the job's return value could not be pickled: {exc!r}") from exc
        except TypeError as problem:
            return Outcome.ERROR, ser.dump_exception(problem), ser.error_line(problem)


# ---- in the worker ---------------------------------------------------------------------------------


MEMORY_CHECK_S = 0.1  # how often the memory of slots with a limit is read


def _limit(task: SlotTask, name: str) -> float | None:
    value = task.options.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _rss_bytes(pid: int | None) -> int:
    """Resident memory of a slot and every process its job started (0 where there is no /proc)."""
    return proctree.tree_rss_bytes(pid) if pid is not None else 0


class Slot:
    """One slot process and the task it runs, as seen from the worker."""

    def __init__(self, ctx: Any, index: int, output_dir: str = "",
                 forked_beside: list[Slot] | None = None, live_dir: str = "") -> None:
        """``forked_beside``: the slot is forked from the worker (``ctx`` is "fork"), where these
        slots' worker ends of their pipes are open too."""
        self.index = index
        self.conn, child_conn = ctx.Pipe(duplex=True)
        lifeline_r, self.lifeline = ctx.Pipe(duplex=False)
        worker_fds: tuple[int, ...] = ()
        if forked_beside is not None:
            ends = [end for s in [*forked_beside, self] for end in (s.conn, s.lifeline)]
            worker_fds = tuple(end.fileno() for end in ends)
        args = (child_conn, lifeline_r, output_dir, worker_fds, live_dir)
        self.process = ctx.Process(target=_slot_main, args=args, daemon=True, name=f"zfarm-slot-{index}")
        self.process.start()
        child_conn.close()
        lifeline_r.close()
        self.task: SlotTask | None = None
        self.started_at = 0.0
        self.started_mono = 0.0
        self.timeout_s: float | None = None  # how long its task may run
        self.mem_limit: float | None = None  # resident bytes its task may reach
        self.fns: dict[bytes, None] = {}  # mirrors the slot's function cache

    def send(self, task: SlotTask) -> None:
        with_fn = task.fn_id not in self.fns and task.fn_blob is not None
        gpu_ids = task.options.get("gpu_ids")  # the GPUs the broker gave this job
        devices = ",".join(str(g) for g in gpu_ids) if isinstance(gpu_ids, list) else None
        upstream = task.options.get("upstream") or []  # frames of each upstream result, after the job's
        frames = [task.fn_blob, *task.frames] if with_fn else task.frames
        pipe.send(self.conn, [task.fn_id, with_fn, task.name, devices, upstream], frames)
        if with_fn:
            remember_fn(self.fns, task.fn_id, None)
        self.task = task
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.timeout_s = _limit(task, "timeout_s")
        self.mem_limit = _limit(task, "mem_limit")

    def outcome_without_report(self, task: SlotTask, outcome: Outcome, error: BaseException | None,
                               info: str) -> SlotOutcome:
        """The outcome of a task whose slot died or was killed: timed from our side."""
        now = time.time()
        started = self.started_at or now
        frames = ser.dump_exception(error) if error is not None else []
        return SlotOutcome(task.key, task.attempt, outcome, frames, info, now - started, started, now)

    def receive(self) -> SlotOutcome:
        """Read the finished task's outcome (raises EOFError/OSError if the slot died)."""
        (outcome, info, run_s, started_at, finished_at, rss), frames = pipe.receive(self.conn)
        task, self.task = self.task, None
        assert task is not None  # only busy slots are read
        return SlotOutcome(task.key, task.attempt, Outcome(outcome), frames, info, run_s, started_at,
                           finished_at, rss)

    def kill(self) -> int | None:
        """Stop the process, and every process its job started, for good; return its exit code."""
        if self.process.is_alive() and self.process.pid is not None:
            proctree.kill_descendants(self.process.pid, include_self=True)
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()
        self.lifeline.close()
        code: int | None = self.process.exitcode
        return code


class SlotPool:
    """A fixed number of slots; dead ones are replaced as soon as they are noticed."""

    def __init__(self, size: int, host: str = "", output_dir: str = "") -> None:
        """``output_dir``: keep every job's whole stdout and stderr there (see :class:`FdCapture`).

        Raises:
            ConfigError: ``output_dir`` cannot be created.
        """
        if output_dir:
            try:
                os.makedirs(output_dir, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--output-dir {output_dir}: {exc.strerror or exc}") from None
        self.output_dir = output_dir
        #: the running jobs' streams, by name (see zfarm.output); removed with the pool
        self.live_dir = output.make_live_dir()
        methods = multiprocessing.get_all_start_methods()
        self.ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            self.ctx.set_forkserver_preload(["zfarm.worker.chaperone"])
        self.host = host
        # The first slots fork from the worker itself while it is one thread (no ZeroMQ thread yet):
        # a slot is ready in milliseconds, not after a forkserver's interpreter has started and
        # imported zfarm. Slots started later (replacements) come from the forkserver.
        self.slots: list[Slot] = []
        if _single_threaded():
            fork = multiprocessing.get_context("fork")
            for i in range(size):
                self.slots.append(Slot(fork, i, output_dir, list(self.slots), self.live_dir))
        else:
            self.slots = [Slot(self.ctx, i, output_dir, live_dir=self.live_dir) for i in range(size)]
        self._next_memory_check = 0.0

    @property
    def free(self) -> int:
        return sum(slot.task is None for slot in self.slots)

    def running(self) -> list[Key]:
        return [slot.task.key for slot in self.slots if slot.task is not None]

    def fds(self) -> dict[int, Slot]:
        """File descriptors to poll: readable means a result is ready or the slot died."""
        return {slot.conn.fileno(): slot for slot in self.slots}

    def run(self, task: SlotTask) -> SlotOutcome | None:
        """Start ``task`` on an idle slot; returns an outcome at once only if the slot died."""
        slot = next(s for s in self.slots if s.task is None)
        try:
            slot.send(task)
        except (OSError, ValueError):
            return self._crashed(slot, task)
        return None

    def next_deadline(self) -> float | None:
        """The earliest time limit of a running job (monotonic), if any."""
        busy = [s for s in self.slots if s.task is not None]
        deadlines = [s.started_mono + s.timeout_s for s in busy if s.timeout_s is not None]
        if any(s.mem_limit is not None for s in busy):
            deadlines.append(self._next_memory_check)  # memory limits are checked on time too
        return min(deadlines, default=None)

    def enforce_limits(self, now: float) -> list[SlotOutcome]:
        """Kill jobs past their time limit, or whose slot grew past its memory limit."""
        check_memory = now >= self._next_memory_check
        if check_memory:
            self._next_memory_check = now + MEMORY_CHECK_S
        outcomes = []
        for slot in list(self.slots):
            task = slot.task
            if task is None:
                continue
            error: BaseException | None = None
            ran_s = now - slot.started_mono
            if slot.timeout_s is not None and ran_s > slot.timeout_s:
                error = JobTimeout(task.name, slot.timeout_s, ran_s)
            elif slot.mem_limit and check_memory and (rss := _rss_bytes(slot.process.pid)) > slot.mem_limit:
                error = MemoryLimitExceeded(task.name, int(slot.mem_limit), rss)
            if error is not None:
                log.warning("%s", error)
                self._replace(slot)
                info = ser.error_line(error)
                outcome = slot.outcome_without_report(task, Outcome.ERROR, error, info)
                outcome.kind = ResultKind.LIMIT  # the client does not retry it
                outcomes.append(outcome)
        return outcomes

    def collect(self, slot: Slot) -> SlotOutcome | None:
        """Read what a readable slot has to say: a finished job, or its death."""
        if slot not in self.slots:
            return None  # replaced since the caller polled it (its job was cancelled)
        if slot.task is None:  # an idle slot never writes: it died
            log.warning("slot %d died while idle (%s); replaced it", slot.index, self._replace(slot))
            return None
        try:
            return slot.receive()
        except (EOFError, OSError, ValueError):
            return self._crashed(slot, slot.task)

    def cancel(self, key: Key) -> SlotOutcome | None:
        """Kill the slot running ``key`` (it is replaced); None if no slot runs it."""
        for slot in self.slots:
            if slot.task is not None and slot.task.key == key:
                task = slot.task
                self._replace(slot)
                log.info("slot %d killed for cancelled job %s and replaced", slot.index, task.name)
                return slot.outcome_without_report(task, Outcome.CANCELLED, None, "cancelled")
        return None

    def peek(self, msg: p.Peek) -> p.PeekReply:
        """A running job's output from the asked offsets, at most ``PEEK_CHUNK_BYTES`` of each stream
        (FINISHED: no slot runs it now)."""
        key = (msg.client_id, msg.seq)
        slot = next((s for s in self.slots if s.task is not None and s.task.key == key), None)
        if slot is None or slot.task is None or slot.process.pid is None:
            return p.PeekReply(msg.client_id, msg.seq, msg.ask, p.PeekStatus.FINISHED, reply_to=msg.reply_to)
        paths, run = output.running_streams(self.live_dir, slot.task.name, slot.process.pid)
        chunks = [output.read_chunk(path, offset, p.PEEK_CHUNK_BYTES) if offset >= 0 else output.Chunk()
                  for path, offset in zip(paths, msg.offsets, strict=True)]
        return p.PeekReply(msg.client_id, msg.seq, msg.ask, p.PeekStatus.RUNNING, list(msg.offsets),
                           [c.size for c in chunks], [run, run], msg.reply_to, [c.data for c in chunks])

    def _crashed(self, slot: Slot, task: SlotTask) -> SlotOutcome:
        error = JobCrashed(task.name, self._replace(slot), self.host)
        log.warning("job %s crashed slot %d: %s; replaced it", task.name, slot.index, error)
        return slot.outcome_without_report(task, Outcome.CRASHED, error, ser.error_line(error))

    def _replace(self, slot: Slot) -> int | None:
        """Kill a slot (whatever it runs is over) and start a fresh one; returns the exit code."""
        task, slot.task = slot.task, None
        pid = slot.process.pid
        exitcode = slot.kill()
        if pid is not None:  # what the killed job's streams left in the live folder
            output.drop_live(self.live_dir, output.slot_live_name(pid))
        if task is not None:
            output.drop_command_runs(self.live_dir, task.name)
        fresh = Slot(self.ctx, slot.index, self.output_dir, live_dir=self.live_dir)
        self.slots[self.slots.index(slot)] = fresh
        return exitcode

    def close(self) -> None:
        for slot in self.slots:
            slot.task = None
            slot.kill()
        _stop_forkserver()
        shutil.rmtree(self.live_dir, ignore_errors=True)


def _single_threaded() -> bool:
    """Whether this process has one thread, native ones included (False where that is unknown)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _stop_forkserver() -> None:
    """Stop the slots' forkserver and wait for it, so it does not outlive the worker even briefly."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)
    if stop is not None:
        try:
            stop()
        except (OSError, ChildProcessError):
            pass  # already gone
