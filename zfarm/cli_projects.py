"""``zfarm project list|show|suspend|resume|cancel|set``: the broker's projects, from the shell.

Registered from ``cli.py``. Each command asks the broker once (a monitor connection) and prints
what it answers; acting on a project needs a client's key when the broker uses CURVE.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from zfarm import protocol as p
from zfarm.cli_args import (
    broker_address,
    command,
    connect_flag,
    keys_flag,
    keys_folder,
    print_columns,
    timeout_flag,
)
from zfarm.errors import ConfigError, ZfarmError

COLUMNS = ["name", "state", "priority", "share", "submitted", "queued", "running", "done", "failed",
           "cancelled", "slot_s", "jobs_per_s", "eta_s"]


def add_project_commands(sub: Any) -> None:
    """Add ``zfarm project ACTION`` to the ``zfarm`` parser."""
    project = sub.add_parser("project", help="list projects; suspend, resume, cancel or reprioritise one",
                             description="The broker's projects (see docs/projects.md).")
    actions = project.add_subparsers(required=True, metavar="ACTION")
    for name, text in (("list", "list the broker's projects with their state and progress"),
                       ("show", "one project's state, counts, throughput and ETA"),
                       ("suspend", "stop dispatching a project's queued jobs (running ones finish)"),
                       ("resume", "dispatch a suspended project's jobs again"),
                       ("cancel", "drop a project's queued jobs and kill its running ones"),
                       ("set", "change a project's priority or share, for its queued jobs too")):
        cmd = command(actions, name, text, _run)
        cmd.set_defaults(action=name)
        if name != "list":
            cmd.add_argument("name", help="the project's name")
        if name == "set":
            cmd.add_argument("--priority", type=int, help="higher goes first (default: unchanged)")
            cmd.add_argument("--share", type=float,
                             help="its part among equal priorities (default: unchanged)")
        cmd.add_argument("--json", action="store_true", help="print JSON (default: a table)")
        connect_flag(cmd)
        timeout_flag(cmd, 10.0)
        keys_flag(cmd, name=False)


def _run(args: argparse.Namespace) -> int:
    from zfarm.projects import act

    action = p.ProjectAction.LIST if args.action == "show" else p.ProjectAction(args.action)
    settings = {k: v for k in ("priority", "share") if (v := getattr(args, k, None)) is not None}
    if args.action == "set" and not settings:
        raise ConfigError("zfarm project set needs --priority N or --share X (or both)")
    if "share" in settings:
        from zfarm.projects import check_share
        check_share(settings["share"], "--share")
    address = broker_address(args, listening=True)  # (after the usage checks: they need no broker)
    name = getattr(args, "name", "")
    views = act(address, action, name, settings, args.timeout, keys_folder(args))
    if args.action != "list":
        views = [v for v in views if v.get("name") == name]
        if not views:
            raise ZfarmError(f"no project {name!r} at {address}: `zfarm project list` shows those it has")
    if args.json:
        print(json.dumps(views[0] if args.action != "list" else views, indent=2))
    elif args.action == "list" or args.action == "show":
        _print(views)
    else:
        view = views[0]
        counts = ", ".join(f"{view[k]} {k}" for k in ("done", "failed", "cancelled", "queued", "running")
                           if view[k] or k in ("done", "queued", "running"))  # (failed, cancelled: if any)
        print(f"project {name}: {view['state']} ({counts})")
    return 0


def _print(views: list[dict[str, Any]]) -> None:
    if not views:
        print("no projects")
        return
    print_columns(COLUMNS, [[_cell(v.get(c)) for c in COLUMNS] for v in views])
    for v in views:
        if v.get("why_suspended"):
            print(f"{v['name']}: {v['why_suspended']}")
        if v.get("unschedulable"):
            print(f"{v['name']}: unschedulable: {v['unschedulable']}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
