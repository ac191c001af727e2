"""Private scratch folders named after the process that owns them, so that whoever makes the next
one removes those whose owner was killed before it could (SIGKILL, the OOM killer, a node's reboot).

::

    /tmp/zfarm-live-HOST-PID-xxxx     a worker's live folder (zfarm/output.py)
    /tmp/zfarm-KIND-HOST-PID-xxxx     a cluster's broker socket and scratch, KIND local, ssh or slurm
                                      (zfarm/cluster/base.py)

The host is in the name because the temporary folder may be shared (NFS): a process of another
host is not ours to judge. Only this user's folders are touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile


def file_stem(name: str) -> str:
    """A name as a file name may hold it: a job's ``client:seq`` becomes ``client_seq``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "job"


def host_stem() -> str:
    """This host's name, as a file name may hold it."""
    return file_stem(socket.gethostname())


def make_owned_dir(kind: str) -> str:
    """A new private (0700) folder ``zfarm-KIND-HOST-PID-…`` in the temporary folder; those of
    ``kind`` that dead processes of this host left behind are removed first."""
    sweep_owned_dirs(kind)
    return tempfile.mkdtemp(prefix=f"zfarm-{kind}-{host_stem()}-{os.getpid()}-")


def sweep_owned_dirs(kind: str, folder: str | None = None) -> list[str]:
    """Remove the ``kind`` folders of this host whose owner process is gone; return them."""
    folder = folder or tempfile.gettempdir()
    prefix = f"zfarm-{kind}-{host_stem()}-"
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return []
    swept = []
    for name in names:
        pid, _, _rest = name[len(prefix):].partition("-")
        path = os.path.join(folder, name)
        try:
            mine = os.lstat(path).st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's: alive
    return True
