"""The ``zfarm`` command line; the only place that configures logging.

Exit codes: 0 success, 1 failure at run time (broker unreachable, a job failed
in the demo), 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from zfarm import __version__
from zfarm.config import DEFAULT_ADDRESS, JOURNAL_SYNC_MODES, BrokerSettings, WorkerSettings, resolve
from zfarm.errors import ConfigError, ZfarmError

log = logging.getLogger("zfarm")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level, args.log_json)
    try:
        return int(args.run(args) or 0)
    except ConfigError as exc:
        print(f"zfarm: {exc}", file=sys.stderr)
        return 2
    except ZfarmError as exc:
        print(f"zfarm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zfarm", description="A task farm for Python on ZeroMQ.")
    parser.add_argument("--version", action="version", version=f"zfarm {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    broker = _command(sub, "broker", "run a broker: the one endpoint clients and workers connect to",
                      _run_broker)
    broker.add_argument("--bind", help=f"endpoint to listen on (default {DEFAULT_ADDRESS}; env ZFARM_BIND)")
    _liveness_flags(broker)
    broker.add_argument("--max-message-bytes", type=int, help="largest message accepted (default 2 GiB)")
    broker.add_argument("--max-queued", type=int,
                        help="jobs queued at most; past it submitters wait (default 0: no limit)")
    broker.add_argument("--max-losses", type=int,
                        help="workers a job may kill (or lose) before it fails with WorkerLost (default 3)")
    broker.add_argument("--history", type=int, help="finished jobs' records kept for `zfarm history` (50000)")
    broker.add_argument("--journal", metavar="PATH",
                        help="SQLite file keeping accepted jobs and undelivered results, so that a restarted "
                             "broker goes on where it stopped (env ZFARM_JOURNAL; default: none)")
    broker.add_argument("--journal-sync", choices=JOURNAL_SYNC_MODES,
                        help="full (default): every journal commit reaches the disk, surviving a power cut; "
                             "normal: faster, survives the broker's death but not the machine's")
    broker.add_argument("--session-ttl", type=float, dest="session_ttl_s", metavar="SECONDS",
                        help="how long a session's jobs and results wait for its client (default 604800: "
                             "a week)")
    _keys_flag(broker, name=False)
    broker.add_argument("--insecure", action="store_true", default=None,
                        help="allow listening beyond loopback without keys (trusted networks only)")

    worker = _command(sub, "worker", "run a worker: runs jobs from a broker in N slot processes",
                      _run_worker)
    worker.add_argument("--connect", help=f"broker endpoint (default {DEFAULT_ADDRESS}; env ZFARM_ADDRESS)")
    worker.add_argument("--procs", type=int, help="slots, i.e. jobs run at once (default or 0: one per CPU)")
    worker.add_argument("--prefetch", type=int, help="jobs held ready beyond the free slots (default 1)")
    worker.add_argument("--worker-id", help="name shown in status (default: random)")
    worker.add_argument("--grace", type=float, dest="grace_s",
                        help="seconds running jobs may take to finish on SIGTERM (default 30)")
    _liveness_flags(worker)
    _keys_flag(worker)

    status = _command(sub, "status", "show the workers, queue and clients of a broker", _run_status)
    status.add_argument("--connect", default=None, help=f"broker endpoint (default {DEFAULT_ADDRESS})")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    status.add_argument("--timeout", type=_positive, default=5.0, help="seconds to wait for the broker")
    _keys_flag(status, name=False)

    history = _command(sub, "history", "list the broker's records of finished jobs", _run_history)
    history.add_argument("--connect", default=None, help=f"broker endpoint (default {DEFAULT_ADDRESS})")
    out = history.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON array of records")
    out.add_argument("--csv", action="store_true", help="print CSV with a header line")
    history.add_argument("--last", type=int, default=0, help="only the newest N records (default: all kept)")
    history.add_argument("--timeout", type=_positive, default=10.0, help="seconds to wait for the broker")
    _keys_flag(history, name=False)

    dashboard = _command(sub, "dashboard", "a live full-screen view of a broker: workers, queue, clients, "
                         "events (q quits)", _run_dashboard)
    dashboard.add_argument("--connect", default=None, help=f"broker endpoint (default {DEFAULT_ADDRESS})")
    dashboard.add_argument("--refresh", type=float, default=4.0, help="redraws per second (default 4)")
    dashboard.add_argument("--once", action="store_true", help="print one view (not full screen) and exit")
    _keys_flag(dashboard, name=False)

    keys = sub.add_parser("keys", help="create CURVE keys (see docs/security.md)",
                          description="Create the keys that let only key holders into a farm.")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    init = _command(keys_sub, "init", "create a keys folder: the broker's keys, a worker and a client key",
                    _run_keys_init)
    init.add_argument("folder", help="folder to create (mode 0700)")
    add = _command(keys_sub, "add", "add a worker or client keypair to a keys folder", _run_keys_add)
    add.add_argument("folder", help="an existing keys folder")
    add.add_argument("name", help="name of the new key, e.g. the machine it is for")
    add.add_argument("--role", choices=["worker", "client"], default="worker",
                     help="what the key may connect as (default worker)")

    demo = _command(sub, "demo", "run a demo map on an embedded farm, with a progress bar", _run_demo)
    demo.add_argument("--jobs", type=int, default=400, help="number of jobs (default 400)")
    demo.add_argument("--workers", type=int, default=None, help="workers to start (default: CPU count)")
    demo.add_argument("--connect", default=None, help="use this broker instead of an embedded farm")
    _keys_flag(demo)

    from zfarm.up import register as register_up  # `zfarm up PROFILE` (run profiles, docs/clusters.md)

    register_up(sub, _command)
    return parser


def _command(sub: Any, name: str, text: str, run: Any) -> argparse.ArgumentParser:
    cmd: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="how much to log (default info)")
    cmd.add_argument("--log-json", action="store_true", help="log one JSON object per line (for collectors)")
    cmd.set_defaults(run=run)
    return cmd


def _liveness_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--heartbeat-interval", type=float, dest="heartbeat_interval_s",
                     help="seconds between heartbeats (default 1)")
    cmd.add_argument("--liveness", type=int, help="silent intervals before a peer is dead (default 3)")
    cmd.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # embedded use: exit with the parent


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _keys_flag(cmd: argparse.ArgumentParser, name: bool = True) -> None:
    cmd.add_argument("--keys", help="keys folder: CURVE authentication and encryption (env ZFARM_KEYS)")
    if name:
        cmd.add_argument("--key-name", help="which key of the folder's list to use (default: the only one)")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _configure_logging(level: str, as_json: bool = False) -> None:
    handler: logging.Handler
    if as_json:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        # a log file or pipe gets whole lines, not lines wrapped at 80 columns
        console = Console(stderr=True, width=None if sys.stderr.isatty() else 240)
        handler = RichHandler(console=console, show_path=False, log_time_format="%H:%M:%S", markup=False)
    logging.basicConfig(level=level.upper(), format="%(message)s", handlers=[handler], force=True)


def _flags(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in names}


def _run_broker(args: argparse.Namespace) -> int:
    from zfarm.broker import run_broker

    settings = resolve(BrokerSettings, _flags(args, ["bind", "heartbeat_interval_s", "liveness",
                                                     "max_message_bytes", "parent_pid", "keys", "insecure",
                                                     "history", "max_losses", "max_queued", "journal",
                                                     "journal_sync", "session_ttl_s"]))
    run_broker(settings)
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from zfarm.worker import run_worker

    flags = _flags(args, ["procs", "prefetch", "worker_id", "grace_s", "heartbeat_interval_s", "liveness",
                          "parent_pid", "keys", "key_name"])
    settings = resolve(WorkerSettings, {**flags, "address": args.connect})
    run_worker(settings)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from zfarm.monitor import fetch_status

    address = args.connect or os.environ.get("ZFARM_ADDRESS") or DEFAULT_ADDRESS
    snapshot = fetch_status(address, args.timeout, keys=args.keys or os.environ.get("ZFARM_KEYS", ""))
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        _print_status(snapshot)
    return 0


def _run_history(args: argparse.Namespace) -> int:
    import csv

    from zfarm.monitor import fetch_history

    address = args.connect or os.environ.get("ZFARM_ADDRESS") or DEFAULT_ADDRESS
    columns, rows = fetch_history(address, max(0, args.last), args.timeout,
                                  keys=args.keys or os.environ.get("ZFARM_KEYS", ""))
    if args.json:
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], indent=1))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        _print_history(columns, rows)
    return 0


def _run_dashboard(args: argparse.Namespace) -> int:
    from zfarm.dashboard import run_dashboard

    if not 0 < args.refresh <= 100:
        raise ConfigError(f"--refresh must be between 0 and 100 redraws per second, not {args.refresh}")
    address = args.connect or os.environ.get("ZFARM_ADDRESS") or DEFAULT_ADDRESS
    return run_dashboard(address, args.keys or os.environ.get("ZFARM_KEYS", ""), args.refresh, args.once)


def _print_history(columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = ["id", "worker", "host", "run_s", "attempts", "outcome", "peak_rss_bytes", "error"]
    table = Table(*shown, title=f"{len(rows)} finished jobs")
    where = [columns.index(c) for c in shown]
    for row in rows:
        values = [row[i] for i in where]
        values[3] = f"{values[3]:.3f}"
        values[6] = f"{values[6] / 2**20:.0f} MiB"
        table.add_row(*(str(v) for v in values))
    Console().print(table)


def _print_status(snap: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]zfarm broker[/] {snap['address']}  id {snap['broker_id']}  "
                  f"up {snap['uptime_s']:.0f} s  protocol {snap['protocol']}")
    console.print(f"queued {snap['queued']}  in flight {snap['in_flight']}  done {snap['done']}  "
                  f"failed {snap['failed']}  requeued {snap['requeued']}  "
                  f"workers lost {snap['workers_lost']}")
    if snap.get("journal"):
        console.print(f"journal {snap['journal']}  jobs recovered at start {snap['recovered']}")
    workers = Table("worker", "host", "pid", "slots", "busy", "done", "failed", "heartbeat age",
                    title="workers")
    for w in snap["workers"]:
        workers.add_row(w["id"], w["host"], str(w["pid"]), str(w["slots"]), str(w["busy"]), str(w["done"]),
                        str(w["failed"]), f"{w['heartbeat_age_s']:.1f} s")
    console.print(workers)
    clients = Table("client", "host", "pid", "submitted", "queued", "in flight", "done", "failed",
                    "held", title="clients")
    for c in snap["clients"]:
        clients.add_row(c["id"], c["host"] if c["present"] else "(away)", str(c["pid"]), str(c["submitted"]),
                        str(c["queued"]), str(c["in_flight"]), str(c["done"]), str(c["failed"]),
                        str(c["held"]))
    console.print(clients)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    import zfarm

    started = time.perf_counter()
    with zfarm.Client(args.connect, n_workers=args.workers, keys=args.keys, key_name=args.key_name) as client:
        where = client.address if args.connect else f"an embedded farm ({client.address})"
        print(f"zfarm demo: {args.jobs} jobs estimating pi on {where}", file=sys.stderr)
        hits = sum(client.map(_demo_job, range(args.jobs), progress=True))
    samples = args.jobs * _DEMO_SAMPLES
    print(f"pi ≈ {4 * hits / samples:.5f} from {samples:,} samples in {time.perf_counter() - started:.2f} s")
    return 0


def _run_keys_init(args: argparse.Namespace) -> int:
    from zfarm.security import init_keys

    for path in init_keys(args.folder):
        print(path)
    print(f"next: zfarm broker --keys {args.folder}; give each worker machine {args.folder}/broker.key and "
          f"{args.folder}/workers/, each client machine {args.folder}/broker.key and {args.folder}/clients/",
          file=sys.stderr)
    return 0


def _run_keys_add(args: argparse.Namespace) -> int:
    from zfarm.security import add_key

    for path in add_key(args.folder, args.name, args.role):
        print(path)
    print("restart the broker to admit the new key", file=sys.stderr)
    return 0


_DEMO_SAMPLES = 100_000


def _demo_job(seed: int) -> int:
    """Count random points that fall in the unit circle (a stand-in for real work)."""
    import random

    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(_DEMO_SAMPLES))
