"""``zfarm dashboard``: a live view of one broker, redrawn several times a second.

::

    broker ──STATUS_REPLY──> _Link (one DEALER, kept open) ──snapshot──> render() ──> rich Live
       ^                                                                                │
       └────────────── STATUS, once a refresh, at most one outstanding ─────────────────┘
    stdin (cbreak) ──'q'──> leave

:func:`render` is pure: a snapshot (plain data from ``Scheduler.snapshot``) and a small
:class:`DashboardState` in, a rich renderable out, so tests render to text. :func:`run_dashboard`
owns the socket, the terminal and the ``Live`` screen.
"""

from __future__ import annotations

import os
import sys
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from zfarm import protocol as p
from zfarm.broker.records import THROUGHPUT_WINDOW_S
from zfarm.errors import Refused
from zfarm.monitor import cluster_line, fetch_status, monitor_hello, open_monitor, rate_now

SPARK = "▁▂▃▄▅▆▇█"
MAX_EVENTS = 12
MAX_LOST_SHOWN = 5
LOST_SHOWN_FOR_S = 300.0
STATE_STYLE = {"idle": "dim green", "busy": "bold yellow", "lost": "bold red"}
EVENT_STYLE = {"worker-joined": "green", "worker-left": "cyan", "worker-lost": "bold red",
               "client-joined": "blue", "client-left": "magenta", "job-failed": "red"}


@dataclass
class DashboardState:
    """What the dashboard knows beyond the latest snapshot: where it looks and whether it is answered."""

    address: str
    problem: str = ""  # non-empty while the broker does not answer
    #: why its handshake fails (it needs keys, or refused ours), when ZeroMQ told us
    refused_because: str = ""


def sparkline(values: list[int]) -> str:
    """One block character per value, scaled to the largest; zero is a space."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    return "".join(" " if v <= 0 else SPARK[min(len(SPARK) - 1, (v * len(SPARK) - 1) // top)] for v in values)


#: below this width the queue panel and the clients table are stacked, not side by side
SIDE_BY_SIDE_MIN_WIDTH = 140
QUEUE_COUNTS = [("queued", "queued"), ("in flight", "in_flight"), ("done", "done"), ("failed", "failed"),
                ("requeued", "requeued"), ("workers lost", "workers_lost")]


def render(snapshot: dict[str, Any] | None, state: DashboardState) -> RenderableType:
    """The whole dashboard for one snapshot (None: the broker has not answered yet)."""
    return _Screen(snapshot, state)


class _Screen:
    """The dashboard laid out for the width it is drawn at (a terminal may be resized any time).

    Wide: the queue panel beside the clients table. Narrow (an 80x24 terminal): the queue in two
    lines above the clients, so every table keeps its columns readable.
    """

    def __init__(self, snapshot: dict[str, Any] | None, state: DashboardState) -> None:
        self.snapshot, self.state = snapshot, state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        snap = self.snapshot
        yield _header(snap, self.state)
        if snap is None:
            return
        width = options.max_width
        if snap.get("clusters"):
            yield _clusters(snap)
        yield _workers(snap, width)
        if options.max_width >= SIDE_BY_SIDE_MIN_WIDTH:
            row = Table.grid(padding=(0, 1))
            row.add_column(width=THROUGHPUT_WINDOW_S + 4)  # the sparkline and the panel's border
            row.add_column()
            row.add_row(_queue(snap), _clients(snap))
            yield row
        else:
            yield _queue_lines(snap, width)
            yield _clients(snap, width)
        yield _events(snap, width)


def _header(snap: dict[str, Any] | None, state: DashboardState) -> RenderableType:
    text = Text()
    if state.problem:
        text.append(f"broker not answering at {state.address} (retrying)", "bold red")
        text.append(f"  {state.problem}{'; its last answer below' if snap else ''}", "red")
        if state.refused_because:
            text.append(f"\n{state.refused_because}", "bold red")
    if snap is None:
        if not state.problem:
            text.append(f"connecting to {state.address} …", "yellow")
        return Panel(text, title="zfarm dashboard", box=box.ROUNDED)
    if state.problem:
        text.append("\n")
    text.append("zfarm broker ", "bold")
    text.append(str(snap.get("address") or state.address), "bold cyan")
    text.append(f"  id {snap['broker_id']}  up {_duration(snap['uptime_s'])}  "
                f"protocol {snap['protocol']}  zfarm {snap['version']}  "
                f"heartbeat {snap['heartbeat_interval_s']:g} s, liveness {snap['liveness']}")
    return Panel(text, title="zfarm dashboard", subtitle="q quits", box=box.ROUNDED)


def _workers(snap: dict[str, Any], width: int | None = None) -> RenderableType:
    alive = snap["workers"]
    lost = _recent_lost(snap)
    with_pid = width is None or width >= SIDE_BY_SIDE_MIN_WIDTH  # a narrow terminal keeps what matters more
    columns = ["worker", "host", "pid", "busy/slots", "done", "failed", "heartbeat", "state"]
    table = _table(f"workers: {len(alive)} connected, {len(lost)} recently lost",
                   *(c for c in columns if with_pid or c != "pid"))
    rows: list[tuple[list[RenderableType], str]] = []
    for w in alive:
        state = w.get("state", "busy" if w["busy"] else "idle")
        held = f" +{w['busy'] - w['slots']} held" if w["busy"] > w["slots"] else ""
        rows.append(([w["id"], w["host"], str(w["pid"]), f"{min(w['busy'], w['slots'])}/{w['slots']}{held}",
                      f"{w['done']:,}", f"{w['failed']:,}", f"{w['heartbeat_age_s']:.1f} s",
                      Text(state, STATE_STYLE.get(state, ""))], ""))
    for w in lost:
        age = _broker_now(snap) - w["lost_at"]
        rows.append(([w["id"], w["host"], str(w["pid"]), f"-/{w['slots']}", f"{w['done']:,}",
                      f"{w['failed']:,}", f"{w['heartbeat_age_s']:.1f} s",
                      Text(f"lost {_duration(age)} ago", STATE_STYLE["lost"])], "red"))
    for cells, style in rows:
        table.add_row(*(cells if with_pid else cells[:2] + cells[3:]), style=style)
    return _whole(table, width)


def _clusters(snap: dict[str, Any]) -> RenderableType:
    """A line per cluster reporting to the broker: its workers running, coming (pending), wanted."""
    lines = Text()
    for cluster in snap["clusters"]:
        if lines:
            lines.append("\n")
        style = "red" if cluster.get("failed") else "yellow" if cluster.get("coming") else ""
        lines.append(cluster_line(cluster), style)
    return Panel(lines, title="clusters", box=box.ROUNDED, title_align="left")


def _recent_lost(snap: dict[str, Any]) -> list[dict[str, Any]]:
    """Workers lost lately and not back under the same id, newest first."""
    back = {w["id"] for w in snap["workers"]}
    now = _broker_now(snap)
    lost = [w for w in reversed(snap.get("lost_workers", []))
            if w["id"] not in back and now - w["lost_at"] <= LOST_SHOWN_FOR_S]
    return lost[:MAX_LOST_SHOWN]


def _count_style(snap: dict[str, Any], key: str) -> str:
    return "red" if key in ("failed", "workers_lost") and snap[key] else ""


def _queue(snap: dict[str, Any]) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column(justify="right")
    for label, key in QUEUE_COUNTS:
        grid.add_row(label, Text(f"{snap[key]:,}", _count_style(snap, key)))
    throughput = list(snap.get("throughput", []))
    grid.add_row("throughput now", Text(f"{rate_now(throughput):,.1f} jobs/s", "bold cyan"))
    return Panel(Group(grid, Text("last 60 s", "dim"), Text(sparkline(throughput), "cyan")),
                 title="queue", box=box.ROUNDED)


def _queue_lines(snap: dict[str, Any], width: int) -> RenderableType:
    """The queue panel's facts in two lines, for narrow terminals (the sparkline as wide as fits)."""
    counts = Text()
    for label, key in QUEUE_COUNTS:
        counts.append(f"{label} ")
        counts.append(f"{snap[key]:,}", _count_style(snap, key) or "bold")
        counts.append("  ")
    throughput = list(snap.get("throughput", []))
    rate = Text(f"throughput now {rate_now(throughput):,.1f} jobs/s", "bold cyan")
    seconds = min(len(throughput), width - rate.cell_len - 12)
    if seconds > 0:
        rate.append(f"  last {seconds} s ", "dim")
        rate.append(sparkline(throughput[-seconds:]), "cyan")
    return Group(counts, rate)


def _clients(snap: dict[str, Any], width: int | None = None) -> RenderableType:
    table = _table("clients", "client", "host", "submitted", "done", "in flight", "failed", "held")
    for c in snap["clients"]:
        host = c["host"] if c.get("present", True) else Text("(away)", "dim")
        table.add_row(c["id"], host, f"{c['submitted']:,}", f"{c['done']:,}", f"{c['in_flight']:,}",
                      Text(f"{c['failed']:,}", "red" if c["failed"] else ""), f"{c.get('held', 0):,}")
    if not snap["clients"]:
        table.add_row(Text("(no clients)", "dim"), "", "", "", "", "", "")
    for pr in snap.get("projects", []):  # a project: its state where a client has its host
        state = pr["state"] + (" (unschedulable)" if pr.get("unschedulable") else "")
        style = "yellow" if pr["state"] == "suspended" else "cyan"
        table.add_row(f"project {pr['name']}", Text(state, style),
                      f"{pr['submitted']:,}", f"{pr['done']:,}", f"{pr['running']:,}",
                      Text(f"{pr['failed']:,}", "red" if pr["failed"] else ""), "")
    return _whole(table, width)


def _events(snap: dict[str, Any], width: int | None = None) -> RenderableType:
    table = _table("latest events (newest first)", "time", "event", "what")
    for e in list(reversed(snap.get("events", [])))[:MAX_EVENTS]:
        style = EVENT_STYLE.get(e["kind"], "")
        table.add_row(time.strftime("%H:%M:%S", time.localtime(e["at"])), Text(e["kind"], style),
                      Text(e["text"], style))
    return _whole(table, width)


#: columns that give up width in a narrow terminal (cut with …); all others are shown whole
FLEXIBLE_COLUMNS = {"host", "what"}
COLUMN_GAP = 2  # a space of padding (collapsed) and the blank divider


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, pad_edge=False,
                  collapse_padding=True)
    for name in columns:
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    return table


def _whole(table: Table, width: int | None) -> Table:
    """Keep ids, counts and times whole: only the host and free-text columns give up width (cut with
    …) when the terminal is narrow, sharing what the others leave."""
    flexible = [c for c in table.columns if str(c.header) in FLEXIBLE_COLUMNS]
    fixed = 0
    for column in table.columns:
        cells = [c.cell_len if isinstance(c, Text) else len(str(c)) for c in column.cells]
        column.min_width = max([len(str(column.header)), *cells])
        if column not in flexible:
            fixed += column.min_width
    if width is not None and flexible:
        left = width - fixed - COLUMN_GAP * (len(table.columns) - 1)
        for column in flexible:
            column.min_width = None
            column.max_width = max(4, left // len(flexible))
    return table


def _broker_now(snap: dict[str, Any]) -> float:
    return float(snap.get("started_at", 0.0)) + float(snap["uptime_s"])


def _duration(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60:02d} s"


class _Link:
    """One monitor link kept open across refreshes; replaced when the broker stops answering."""

    def __init__(self, address: str, keys: str = "") -> None:
        self.address, self.keys = address, keys
        self.hello = monitor_hello("dash")
        self.link = open_monitor(address, self.hello, keys)
        self.asked_at: float | None = None  # monotonic time of the outstanding STATUS

    def ask(self, now: float) -> None:
        """Send STATUS unless one is outstanding."""
        if self.asked_at is None:
            self.link.send(p.Status())
            self.asked_at = now

    def reset(self) -> None:
        """Lazy pirate: drop the socket (and whatever is queued on it) and start over. The Link stays:
        what it learnt of the handshake (``link.problem``) holds until a new handshake says otherwise."""
        self.link.open()
        self.link.send(self.hello)
        self.asked_at = None

    def wait(self, keyboard: int | None, timeout_s: float) -> tuple[bool, dict[str, Any] | None]:
        """Wait for the broker or a key: whether the key was ``q``, and the newest snapshot, if any."""
        extra = () if keyboard is None else (keyboard,)
        ready = dict(self.link.poller(*extra).poll(int(max(0.0, timeout_s) * 1000)))
        if keyboard is not None and ready.get(keyboard) and b"q" in os.read(keyboard, 64).lower():
            return True, None
        return False, self.receive() if self.link.readable(ready) else None

    def receive(self) -> dict[str, Any] | None:
        """Read what has arrived; return the newest snapshot, if any."""
        snapshot = None
        for msg in self.link.receive():
            if isinstance(msg, p.StatusReply):
                snapshot, self.asked_at = msg.snapshot, None
            elif isinstance(msg, p.Reconnect):  # the broker forgot us (restart, or we were too quiet)
                self.link.send_all([self.hello, p.Status()])
            elif isinstance(msg, p.Refused):
                raise Refused(f"the broker at {self.address} refused us: {msg.reason}")
        return snapshot

    def close(self) -> None:
        self.link.goodbye("dashboard closed", linger_ms=200)


@contextmanager
def _cbreak_stdin() -> Iterator[int | None]:
    """stdin in cbreak mode (keys arrive one by one, Ctrl-C still interrupts); None if not a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_dashboard(address: str, keys: str = "", refresh_hz: float = 4.0, once: bool = False,
                  timeout_s: float = 5.0) -> int:
    """Show the dashboard until ``q`` (returns 0) or Ctrl-C (KeyboardInterrupt propagates: exit 130).

    ``once``: print one render, not full screen, and return (raises BrokerUnavailable if no answer
    within ``timeout_s``).
    """
    if once:
        Console().print(render(fetch_status(address, timeout_s, keys=keys), DashboardState(address)))
        return 0
    period_s = 1.0 / refresh_hz
    patience_s = max(1.0, 2 * period_s)  # no answer for this long: the broker is not answering
    state = DashboardState(address)
    snapshot: dict[str, Any] | None = None
    answered_at = time.monotonic()  # or started to ask
    link = _Link(address, keys)
    try:
        with _cbreak_stdin() as keyboard, Live(render(None, state), screen=True, auto_refresh=False) as live:
            next_draw = time.monotonic()
            while True:
                now = time.monotonic()
                if now >= next_draw:
                    if link.asked_at is not None and now - link.asked_at > patience_s:
                        link.reset()
                        state.problem = "lost"
                    link.ask(now)
                    if state.problem:
                        state.refused_because = link.link.problem
                        state.problem = f"no answer for {now - answered_at:.0f} s"
                        live.update(render(snapshot, state), refresh=True)
                    next_draw = max(next_draw + period_s, now)
                quit_key, fresh = link.wait(keyboard, next_draw - time.monotonic())
                if quit_key:
                    return 0
                if fresh is not None:
                    snapshot, answered_at = fresh, time.monotonic()
                    state.problem = state.refused_because = ""
                    live.update(render(snapshot, state), refresh=True)
    finally:
        link.close()

