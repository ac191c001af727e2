"""The worker a launcher starts far away: ``python -m zfarm.cluster.remote``.

It takes its settings, and its CURVE keys, from the first line of its standard input (ssh) or
from a file only the user can read (Slurm), so no key ever appears on a command line or stays
on the remote disk. Then it runs an ordinary :class:`zfarm.worker.shell.Worker`, plus:

- ssh: its standard input stays the launcher's channel: a line ``retire`` drains it (as
  SIGTERM); end of input (the launcher or its ssh went away) stops it at once, so nothing is
  left running on the host;
- Slurm: it reads the end of its allocation (``SLURM_JOB_END_TIME``, else ``squeue``) and
  drains that long before it that its running jobs finish, or are handed back, before the
  walltime's SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("zfarm.cluster.remote")

#: seconds kept between the drain's end (grace included) and the allocation's end
WALLTIME_MARGIN_S = 15.0


def settings_blob(address: str, keys: str, heartbeat_interval_s: float | None, grace_s: float,
                  log_level: str) -> dict[str, Any]:
    """What a remote worker needs, as plain data (the worker keypair included, if ``keys``)."""
    blob: dict[str, Any] = {"address": address, "grace_s": grace_s, "log_level": log_level,
                            "heartbeat_interval_s": heartbeat_interval_s, "keys": None}
    if keys:
        from zmq.utils import z85

        from zfarm.security import PeerKeys

        peer = PeerKeys.load(keys, "worker")
        blob["keys"] = {k: z85.encode(getattr(peer, k)).decode() for k in ("public", "secret", "server")}
    return blob


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zfarm.cluster.remote")
    parser.add_argument("--settings", help="a JSON settings file (default: the first line of stdin)")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--procs", type=int, default=0)
    parser.add_argument("--resources", default=None, help="as zfarm worker --resources")
    parser.add_argument("--tags", default=None, help="as zfarm worker --tags")
    args = parser.parse_args(argv)
    if args.settings:
        with open(args.settings, encoding="utf-8") as f:
            blob = json.load(f)
    else:
        blob = json.loads(sys.stdin.buffer.readline() or b"{}")
    logging.basicConfig(level=str(blob.get("log_level", "info")).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    margin_s = float(blob.get("walltime_margin_s", WALLTIME_MARGIN_S))
    worker = _worker(blob, args.worker_id, args.procs, drain_at=_drain_at(float(blob["grace_s"]) + margin_s),
                     offer={"resources": args.resources, "tags": args.tags})
    from zfarm.worker.shell import stop_on_signals

    stop_on_signals(worker)
    if args.settings:
        worker.serve()
        return 0
    threading.Thread(target=_watch_stdin, args=(worker,), daemon=True, name="launcher-channel").start()
    worker.serve()
    # the channel's reader may still wait in a read of stdin, which the interpreter's shutdown would
    # wait for: leave at once (the worker has stopped its slots and closed its socket)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(blob: dict[str, Any], worker_id: str, procs: int, drain_at: float,
            offer: dict[str, str | None] | None = None) -> Any:
    from zmq.utils import z85

    from zfarm.config import WorkerSettings, resolve
    from zfarm.security import PeerKeys
    from zfarm.worker.shell import Worker

    # parent_pid: ssh's session process; if it goes without closing our stdin, we go too (no orphan)
    flags = {"address": blob["address"], "worker_id": worker_id, "procs": procs, "grace_s": blob["grace_s"],
             "heartbeat_interval_s": blob.get("heartbeat_interval_s"), "drain_at": drain_at or None,
             "parent_pid": os.getppid(), **(offer or {})}
    keys = blob.get("keys")
    peer_keys = None
    if keys:  # they came over ssh's stdin: never on a command line or the remote disk
        peer_keys = PeerKeys(*(z85.decode(keys[k].encode()) for k in ("public", "secret", "server")))
    worker = Worker(resolve(WorkerSettings, flags), keys=peer_keys)
    return worker


def _watch_stdin(worker: Any) -> None:
    """The launcher's channel: ``retire`` drains; end of input means the launcher is gone: stop now."""
    try:
        for line in sys.stdin.buffer:
            if line.strip() == b"retire":
                log.info("the launcher retires this worker: finishing running jobs, then stopping")
                worker.request_stop()
        log.info("the launcher's channel closed: stopping now")
    except Exception:  # a channel that fails is as gone as one that closed
        log.exception("the launcher's channel failed: stopping now")
    finally:
        worker.request_stop()
        worker.request_stop()


def allocation_end(environ: dict[str, str] | None = None) -> float:
    """Epoch seconds at which this Slurm job's allocation ends; 0 outside Slurm or with no limit."""
    env = os.environ if environ is None else environ
    raw = env.get("SLURM_JOB_END_TIME", "")
    if raw.isdigit():
        return float(raw)
    job = env.get("SLURM_JOB_ID", "")
    if not job or shutil.which("squeue") is None:
        return 0.0
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                             timeout=30, check=False).stdout.strip()
        return time.mktime(time.strptime(out, "%Y-%m-%dT%H:%M:%S"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0.0  # no limit ("NONE", "UNLIMITED") or no answer: nothing to drain before


def _drain_at(before_end_s: float) -> float:
    end = allocation_end()
    if not end:
        return 0.0
    drain_at = max(time.time(), end - before_end_s)
    log.info("allocation ends at %s: draining at %s", time.ctime(end), time.ctime(drain_at))
    return drain_at


if __name__ == "__main__":
    sys.exit(main())
