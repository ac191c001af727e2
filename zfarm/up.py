"""``zfarm up PROFILE``: start a run profile's broker and workers, show them, stop all on Ctrl-C.

::

    zfarm.toml [profiles.NAME] ─► cluster (broker + launched workers)
        prints the address and the line a client uses, then one status line whenever it changes:
        the cluster's view (requested, running, coming, retiring, failed) + the broker's (queue),
        as the cluster's reporter last read it (every 2 s, when it reports to the broker: no second
        monitor connection)
    Ctrl-C / SIGTERM ─► cluster.close(): workers retire (jobs handed back), the broker stops (unless
        the profile named a broker's address: that broker stays)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from zfarm.cli_args import seconds


def register(sub: Any, command: Any) -> None:
    """Add ``zfarm up`` to the CLI's subcommands (``command`` makes a subparser with common flags)."""
    up = command(sub, "up", "start a run profile's broker and workers (zfarm.toml), show them, stop all "
                 "on Ctrl-C", run_up)
    up.add_argument("profile", help="a [profiles.NAME] of ./zfarm.toml or ~/.config/zfarm/zfarm.toml")
    up.add_argument("--resources", metavar="LIST",
                    help="what each worker offers jobs, cpus=8,mem=32G,gpus=1 (default: the profile's "
                         "resources, else each worker's slots, memory and GPUs)")
    up.add_argument("--tags", metavar="LIST",
                    help="tags each worker offers jobs, bigmem,avx512 (default: the profile's tags, else "
                         "none)")
    up.add_argument("--refresh", type=seconds, default=2.0, metavar="SECONDS",
                    help="seconds between looks at the status (default 2; the broker's part is read every "
                         "2 s)")


def client_line(cluster: Any) -> str:
    keys = f", keys={cluster.keys!r}" if cluster.keys else ""
    return f'zfarm.Client("{cluster.address}"{keys})'


def status_line(view: dict[str, Any]) -> str:
    """One line: the cluster's workers (what it asked for and what came) and the broker's queue."""
    snapshot = view["broker"]
    line = (f"workers: requested {view['requested']}{' (adaptive)' if view['adaptive'] else ''}, "
            f"running {view['running']}, coming {view['coming']}, retiring {view['retiring']}, "
            f"failed {view['failed']}")
    if snapshot is None:
        return line + (" | broker: no answer" if view["broker_asked"] else " | broker: not asked yet")
    return (line + f" | broker: {len(snapshot['workers'])} connected, queued {snapshot['queued']}, in flight "
            f"{snapshot['in_flight']}, done {snapshot['done']}, failed {snapshot['failed']}")


def run_up(args: argparse.Namespace) -> int:
    from zfarm.cluster.profile import build_cluster, load_profile, with_overrides

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    profile = with_overrides(load_profile(args.profile), resources=args.resources, tags=args.tags)
    cluster = build_cluster(profile)
    try:
        print(f"zfarm up {args.profile}: {cluster.kind} cluster, broker at {cluster.address}", flush=True)
        env = f"ZFARM_ADDRESS={cluster.address}" + (f" ZFARM_KEYS={cluster.keys}" if cluster.keys else "")
        print(f"clients: {client_line(cluster)}  (or {env}); Ctrl-C stops everything", flush=True)
        shown = ""
        while not stop.is_set():
            line = status_line(cluster.status())
            if line != shown:
                print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
                shown = line
            stop.wait(max(0.1, args.refresh))
    finally:
        then = (", then the broker stops" if cluster.broker is not None
                else " (the broker was already running: it stays)")
        print(f"stopping: workers finish their jobs and leave{then}", file=sys.stderr, flush=True)
        cluster.close()
    left = [w for w in cluster.workers if w["state"] not in ("stopped", "failed")]
    if left:
        print(f"zfarm up: some workers may still run: {left}", file=sys.stderr)
        return 1
    return 0
