"""The ``zfarm`` command line; the only place that configures logging.

Exit codes: 0 success, 1 failure at run time (broker unreachable or refusing us,
a file that cannot be written), 2 bad usage or settings (argparse's own errors
too), 130 interrupted with Ctrl-C. Every failure is one line on stderr, no
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zfarm import __version__
from zfarm.cli_args import (
    broker_address,
    command,
    connect_flag,
    keys_flag,
    keys_folder,
    print_columns,
    some,
    timeout_flag,
)
from zfarm.config import (
    DEFAULT_ADDRESS,
    JOURNAL_SYNC_MODES,
    BrokerSettings,
    WorkerSettings,
    check_endpoint,
    resolve,
)
from zfarm.errors import ConfigError, ZfarmError
from zfarm.stats import plural

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
    except BrokenPipeError:  # `zfarm history | head`: the reader has what it wanted
        _quiet_stdout()
        return 0
    except OSError as exc:  # a folder that cannot be created, a file that cannot be read
        print(f"zfarm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


B, W = BrokerSettings(), WorkerSettings()  # the defaults the help texts show
HISTORY_SHOWN = 50  # `zfarm history` without --limit or --all


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zfarm", description="A task farm for Python on ZeroMQ.")
    parser.add_argument("--version", action="version", version=f"zfarm {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    broker = command(sub, "broker", "run a broker: the one endpoint clients and workers connect to",
                      _run_broker)
    broker.add_argument("--bind", metavar="ENDPOINT",
                        help=f"endpoint to listen on; tcp://HOST:* picks a free port (env ZFARM_BIND; "
                             f"default {DEFAULT_ADDRESS})")
    _liveness_flags(broker)
    broker.add_argument("--max-message-bytes", type=int, metavar="BYTES",
                        help=f"largest message accepted (default {B.max_message_bytes}: 2 GiB)")
    broker.add_argument("--max-queued", type=int, metavar="N",
                        help="jobs queued at most; past it submitters wait (default 0: no limit)")
    broker.add_argument("--max-losses", type=int, metavar="N",
                        help=f"workers a job may kill (or lose) before it fails with WorkerLost (default "
                             f"{B.max_losses})")
    broker.add_argument("--history", type=int, metavar="N",
                        help=f"finished jobs' records kept for `zfarm history` (default {B.history})")
    broker.add_argument("--journal", metavar="PATH",
                        help="SQLite file keeping accepted jobs and undelivered results, so that a restarted "
                             "broker goes on where it stopped (env ZFARM_JOURNAL; default: none)")
    broker.add_argument("--journal-sync", choices=JOURNAL_SYNC_MODES,
                        help="full: every journal commit reaches the disk, surviving a power cut; normal: "
                             "faster, survives the broker's death but not the machine's (default full)")
    broker.add_argument("--held-memory-bytes", type=int, metavar="BYTES",
                        help="result payloads held in memory at most; past it they wait on disk "
                             "(env ZFARM_HELD_MEMORY_BYTES; default 256 MiB)")
    broker.add_argument("--session-ttl", type=float, dest="session_ttl_s", metavar="SECONDS",
                        help="how long a session's jobs and results wait for its client (default "
                             f"{B.session_ttl_s:.0f}: a week)")
    keys_flag(broker, name=False)
    broker.add_argument("--insecure", action="store_true", default=None,
                        help="allow listening beyond loopback without keys (trusted networks only; "
                             "default off)")

    worker = command(sub, "worker", "run a worker: runs jobs from a broker in N slot processes",
                      _run_worker)
    connect_flag(worker)
    worker.add_argument("--procs", type=int, metavar="N",
                        help="slots, i.e. jobs run at once (default 0: one per CPU)")
    worker.add_argument("--prefetch", type=int, metavar="N",
                        help=f"jobs held ready beyond the free slots (default {W.prefetch})")
    worker.add_argument("--worker-id", help="name shown in status (default: w- and random hex digits)")
    worker.add_argument("--grace", type=float, dest="grace_s", metavar="SECONDS",
                        help=f"seconds running jobs may take to finish on SIGTERM (default {W.grace_s:g})")
    worker.add_argument("--output-dir", metavar="DIR",
                        help="keep each job's whole stdout and stderr as files in DIR, named like Slurm's "
                             "%%A_%%a (env ZFARM_OUTPUT_DIR; default: none, only the last MiB of each "
                             "stream goes back with the result)")
    worker.add_argument("--resources", metavar="LIST",
                        help="what jobs may ask of it: cpus=8,mem=32G,gpus=2,NAME=N (env ZFARM_RESOURCES; "
                             "default: its slots, the machine's memory, the GPUs nvidia-smi -L lists)")
    worker.add_argument("--tags", metavar="LIST",
                        help="tags jobs may ask for: bigmem,avx512 (env ZFARM_TAGS; default: none)")
    _liveness_flags(worker)
    keys_flag(worker)

    status = command(sub, "status", "show the workers, queue and clients of a broker", _run_status)
    connect_flag(status)
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON (default: tables)")
    timeout_flag(status, 5.0)
    keys_flag(status, name=False)

    history = command(sub, "history", "list the broker's records of finished jobs, oldest first",
                       _run_history)
    connect_flag(history)
    out = history.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON array of records (default: a table)")
    out.add_argument("--csv", action="store_true", help="print CSV with a header line (default: a table)")
    shown = history.add_mutually_exclusive_group()
    shown.add_argument("--limit", "--last", type=some, default=HISTORY_SHOWN, metavar="N",
                       help=f"only the newest N records (default {HISTORY_SHOWN})")
    shown.add_argument("--all", action="store_const", const=0, dest="limit",
                       help="every record the broker keeps (default: the newest 50)")
    timeout_flag(history, 10.0)
    keys_flag(history, name=False)

    dashboard = command(sub, "dashboard", "a live full-screen view of a broker: workers, queue, clients, "
                         "events (q quits)", _run_dashboard)
    connect_flag(dashboard)
    dashboard.add_argument("--refresh", type=float, default=4.0, metavar="HZ",
                           help="redraws per second (default 4)")
    dashboard.add_argument("--once", action="store_true",
                           help="print one view (not full screen) and exit (default: live until q)")
    timeout_flag(dashboard, 5.0, "seconds --once waits for the broker")
    keys_flag(dashboard, name=False)

    keys = sub.add_parser("keys", help="create CURVE keys (see docs/security.md)",
                          description="Create the keys that let only key holders into a farm.")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    init = command(keys_sub, "init", "create a keys folder: the broker's keys, a worker and a client key",
                    _run_keys_init)
    init.add_argument("folder", help="folder to create (mode 0700)")
    add = command(keys_sub, "add", "add a worker or client keypair to a keys folder", _run_keys_add)
    add.add_argument("folder", help="an existing keys folder")
    add.add_argument("name", help="name of the new key, e.g. the machine it is for")
    add.add_argument("--role", choices=["worker", "client"], default="worker",
                     help="what the key may connect as (default worker)")

    demo = command(sub, "demo", "run a demo map on an embedded farm, with a progress bar", _run_demo)
    demo.add_argument("--jobs", type=some, default=400, help="number of jobs (default 400)")
    demo.add_argument("--workers", type=some, default=None, help="workers to start (default: CPU count)")
    demo.add_argument("--connect", default=None, metavar="ENDPOINT",
                      help="use the broker at this endpoint instead of an embedded farm (env ZFARM_ADDRESS; "
                           "default: an embedded farm)")
    keys_flag(demo)
    from zfarm.cli_batch import add_batch_commands  # submit, jobs, wait, logs, cancel, forget
    from zfarm.cli_projects import add_project_commands  # project list|show|suspend|resume|cancel|set

    add_project_commands(sub)

    add_batch_commands(sub)

    from zfarm.up import register as register_up  # `zfarm up PROFILE` (run profiles, docs/clusters.md)

    register_up(sub, command)
    return parser


def _liveness_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--heartbeat-interval", type=float, dest="heartbeat_interval_s", metavar="SECONDS",
                     help=f"seconds between heartbeats (default {B.heartbeat_interval_s:g})")
    cmd.add_argument("--liveness", type=int, metavar="N",
                     help=f"silent intervals before a peer is dead (default {B.liveness})")
    cmd.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # embedded use: exit with the parent


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _configure_logging(level: str, as_json: bool = False) -> None:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, log_time_format="%H:%M:%S",
                              markup=False)
    else:  # a log file or a pipe: whole lines with their date, no colours, no padding
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    logging.basicConfig(level=level.upper(), format="%(message)s", handlers=[handler], force=True)


def _flags(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in names}


def _run_broker(args: argparse.Namespace) -> int:
    from zfarm.broker.broker import run_broker

    settings = resolve(BrokerSettings, _flags(args, ["bind", "heartbeat_interval_s", "liveness",
                                                     "max_message_bytes", "parent_pid", "keys", "insecure",
                                                     "history", "max_losses", "max_queued", "journal",
                                                     "journal_sync", "session_ttl_s", "held_memory_bytes"]))
    check_endpoint(settings.bind, bind=True)  # inproc: only code in this process could reach it
    run_broker(settings)
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from zfarm.worker.shell import run_worker

    flags = _flags(args, ["procs", "prefetch", "worker_id", "grace_s", "heartbeat_interval_s", "liveness",
                          "parent_pid", "keys", "key_name", "output_dir", "resources", "tags"])
    settings = resolve(WorkerSettings, {**flags, "address": args.connect})
    check_endpoint(settings.address)  # inproc: no broker in this process
    run_worker(settings)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from zfarm.monitor import fetch_status

    snapshot = fetch_status(broker_address(args, listening=True), args.timeout, keys=keys_folder(args))
    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        _print_status(snapshot)
    return 0


def _run_history(args: argparse.Namespace) -> int:
    import csv

    from zfarm.monitor import fetch_history

    address = broker_address(args, listening=True)
    columns, rows = fetch_history(address, args.limit, args.timeout, keys=keys_folder(args))
    if args.json:
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], indent=1))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        _print_history(columns, rows, args.limit)
    return 0


def _run_dashboard(args: argparse.Namespace) -> int:
    from zfarm.dashboard import run_dashboard

    if not 0 < args.refresh <= 100:
        raise ConfigError(f"--refresh must be more than 0 and at most 100 redraws per second, "
                          f"not {args.refresh:g}")
    address = broker_address(args)  # a bad endpoint is named first
    if not args.once and not sys.stdout.isatty():  # a full-screen view nobody could see
        raise ConfigError("the live dashboard needs a terminal (its output is not one): use --once to print "
                          "one view, or zfarm status --json for a program")
    broker_address(args, listening=True)
    return run_dashboard(address, keys_folder(args), args.refresh, args.once, args.timeout)


HISTORY_COLUMNS = ["id", "worker", "host", "run_s", "attempts", "outcome", "peak_rss_bytes", "error"]
HISTORY_LABELS = ["id", "worker", "host", "run s", "tries", "outcome", "peak RSS", "error"]  # in a terminal
HISTORY_HEADER = ["id", "worker", "host", "run_s", "attempts", "outcome", "peak_rss", "error"]  # piped


def _print_history(columns: list[str], rows: list[list[Any]], limit: int) -> None:
    """A table of the records; plain aligned text, nothing cut, when stdout is not a terminal."""
    where = [columns.index(c) for c in HISTORY_COLUMNS]
    cells = []
    for row in rows:
        values = [row[i] for i in where]
        values[3] = f"{values[3]:.3f}"
        values[6] = f"{values[6] / 2**20:.0f} MiB"
        cells.append([str(v) for v in values])
    title = f"{plural(len(rows), 'finished job')}"
    if limit and len(rows) >= limit:
        title = f"the newest {title} (--limit N or --all for more)"
    if not sys.stdout.isatty():
        print(title)
        print_columns(HISTORY_HEADER, cells)
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for name, label in zip(HISTORY_COLUMNS, HISTORY_LABELS, strict=True):
        table.add_column(label, no_wrap=name != "error", overflow="fold", min_width=len(label))
    for line in cells:
        table.add_row(*line)
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
        console.print(f"journal {snap['journal']}  jobs recovered at start {snap['recovered']}  damaged rows "
                      f"{snap.get('corrupted', 0)}  {snap.get('journal_problem') or ''}")
    if snap.get("clusters"):
        from rich.markup import escape

        from zfarm.monitor import cluster_line

        for cluster in snap["clusters"]:  # what each cluster launched: also its workers still coming
            console.print(escape(cluster_line(cluster)))
    workers = Table("worker", "host", "pid", "slots", "busy", "done", "failed", "heartbeat age",
                    title="workers")
    for w in snap["workers"]:
        workers.add_row(w["id"], w["host"], str(w["pid"]), str(w["slots"]), str(w["busy"]), str(w["done"]),
                        str(w["failed"]), f"{w['heartbeat_age_s']:.1f} s")
    workers.columns[0].overflow = "fold"  # ids are what people copy: never cut them
    console.print(workers)
    clients = Table("client", "host", "pid", "submitted", "queued", "in flight", "done", "failed",
                    "held", title="clients")
    clients.columns[0].overflow = "fold"
    for c in snap["clients"]:
        clients.add_row(c["id"], c["host"] if c["present"] else "(away)", str(c["pid"]), str(c["submitted"]),
                        str(c["queued"]), str(c["in_flight"]), str(c["done"]), str(c["failed"]),
                        str(c["held"]))
    console.print(clients)
    if snap.get("projects"):
        projects = Table("project", "state", "priority", "share", "done", "queued", "running", "failed",
                         "jobs/s", "ETA", title="projects")
        projects.columns[0].overflow = "fold"
        for pr in snap["projects"]:
            eta = "-" if pr.get("eta_s") is None else f"{pr['eta_s']:.0f} s"
            projects.add_row(pr["name"], pr["state"], str(pr["priority"]), f"{pr['share']:g}",
                             f"{pr['done']}/{pr['submitted']}", str(pr["queued"]), str(pr["running"]),
                             str(pr["failed"]), f"{pr['jobs_per_s']:g}", eta)
        console.print(projects)
        for pr in snap["projects"]:
            if pr.get("unschedulable"):
                console.print(f"[red]project {pr['name']}: unschedulable: {pr['unschedulable']}[/]")
    for c in snap["clients"]:
        if c.get("unschedulable"):
            console.print(f"[red]client {c['id']}: unschedulable: {c['unschedulable']}[/]")


def _run_demo(args: argparse.Namespace) -> int:
    import time

    import zfarm

    started = time.perf_counter()
    if args.connect or os.environ.get("ZFARM_ADDRESS"):  # not the embedded farm: is anything there?
        broker_address(args, listening=True)
    with zfarm.Client(args.connect, n_workers=args.workers, keys=args.keys, key_name=args.key_name) as client:
        where = client.address if args.connect else f"an embedded farm ({client.address})"
        print(f"zfarm demo: {args.jobs} jobs estimating pi on {where}", file=sys.stderr)
        hits = sum(client.map(_demo_job, range(args.jobs), progress=True))
    samples = args.jobs * _DEMO_SAMPLES
    print(f"pi ≈ {4 * hits / samples:.5f} from {samples:,} samples in {time.perf_counter() - started:.2f} s")
    return 0


def _run_keys_init(args: argparse.Namespace) -> int:
    from zfarm.security import init_keys

    folder = Path(os.path.normpath(args.folder))
    for path in init_keys(folder):
        print(path)
    print(f"next: zfarm broker --keys {folder}; give each worker machine {folder / 'broker.key'} and "
          f"{folder / 'workers'}/, each client machine {folder / 'broker.key'} and {folder / 'clients'}/",
          file=sys.stderr)
    return 0


def _run_keys_add(args: argparse.Namespace) -> int:
    from zfarm.security import add_key

    for path in add_key(os.path.normpath(args.folder), args.name, args.role):
        print(path)
    print("restart the broker to admit the new key", file=sys.stderr)
    return 0


_DEMO_SAMPLES = 100_000


def _demo_job(seed: int) -> int:
    """Count random points that fall in the unit circle (a stand-in for real work)."""
    import random

    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(_DEMO_SAMPLES))
