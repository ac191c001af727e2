"""A job's whole process tree: find it, measure it, kill all of it.

::

    worker ── slot (a child subreaper) ── job's child ── grandchild (setsid, double fork, ...)
                 ▲                                          │ its parent exits
                 └──────── re-parented here, not to init ◄──┘

Each slot process makes itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``,
Linux 3.4+): a process that loses its parent is re-parented to the nearest subreaper
above it instead of to init, so everything a job starts — children that called
``setsid`` to leave the process group, daemons that double-forked — stays below its
slot, where :func:`descendants` finds it by walking ``/proc``. That is what the
chaperone uses to add up a job's memory and to kill what a job left behind.
Process groups alone miss ``setsid``; cgroups need privileges a worker seldom has, so
they are not used. Where there is no ``/proc`` (macOS) only direct children are seen.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
#: how many freeze rounds :func:`kill_descendants` makes to catch processes forking as it walks
FREEZE_ROUNDS = 20
#: how long a slot waits for the processes it killed to be gone
REAP_DEADLINE_S = 5.0


_subreaper = False


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux). Returns whether it could."""
    global _subreaper
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _subreaper = bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        _subreaper = False
    return _subreaper


def is_subreaper() -> bool:
    """Whether this process adopts its orphans (a slot): then all it finds below it is its jobs'."""
    return _subreaper


def _children_from_task_files(pid: int) -> list[int] | None:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as children:
                found.extend(int(c) for c in children.read().split())
        except FileNotFoundError:
            if tid == str(pid):  # the kernel has no children files (CONFIG_PROC_CHILDREN off)
                return None
        except (OSError, ValueError):
            continue
    return found


def _parent_links() -> dict[int, list[int]]:
    """Every process's children, from each ``/proc/PID/stat`` (the slow, always-there way)."""
    links: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            links.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return links


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), as ``/proc`` shows them now."""
    if not os.path.isdir("/proc"):
        return []
    found: list[int] = []
    links: dict[int, list[int]] | None = None
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = _children_from_task_files(parent)
        if kids is None:
            links = links if links is not None else _parent_links()
            kids = links.get(parent, [])
        for kid in kids:
            if kid not in found and kid != pid:
                found.append(kid)
                todo.append(kid)
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of one process, from ``/proc`` (0 if it is gone or there is no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and every process below it."""
    return rss_bytes(pid) + sum(rss_bytes(kid) for kid in descendants(pid))


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_descendants(pid: int, include_self: bool = False) -> int:
    """SIGKILL every process below ``pid`` (and ``pid`` itself if asked); returns how many.

    Processes are stopped (SIGSTOP) as they are found, so none can fork a new one
    between the walk and the kill; the walk repeats until it finds nothing new.
    """
    frozen: list[int] = []
    if include_self:
        _signal(pid, signal.SIGSTOP)
    for _ in range(FREEZE_ROUNDS):
        new = [kid for kid in descendants(pid) if kid not in frozen]
        if not new:
            break
        for kid in new:
            _signal(kid, signal.SIGSTOP)
        frozen.extend(new)
    for kid in frozen:
        _signal(kid, signal.SIGKILL)
    if include_self:
        _signal(pid, signal.SIGKILL)
    return len(frozen)


def reap_children() -> None:
    """Collect the exit status of every dead child of this process (orphans adopted included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_own_descendants(deadline_s: float = REAP_DEADLINE_S) -> int:
    """Kill everything below this process and reap it, so that nothing is left (not even zombies).

    Killed grandchildren become this (subreaper) process's children as their parents
    die, so the reaping goes on until no descendant is left or ``deadline_s`` passes.
    """
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return 0  # no child at all, so nothing below us: the usual case, found in one system call
    me = os.getpid()
    killed = kill_descendants(me)
    if not killed:
        reap_children()
        return 0
    deadline = time.monotonic() + deadline_s
    while True:
        reap_children()
        if not descendants(me) or time.monotonic() > deadline:
            return killed
        time.sleep(0.002)
