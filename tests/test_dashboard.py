"""The dashboard: its render checked as text against a real farm, and the real ``zfarm dashboard``
driven in a terminal (tmux: start it, read the screen, quit with ``q``).

    test ──fetch_status──> broker <── 3 workers, a Client.map in a thread
      └──render()──> Console(record=True).export_text() ──> asserts on the words on screen
    tmux (own socket) ──> python -m zfarm dashboard ──> capture-pane ──> asserts; send-keys q
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import zfarm
from tests.helpers import (
    REPO_ROOT,
    ZFARM_COMMAND,
    Proc,
    Procs,
    run_zfarm,
    wait_for,
    wait_for_workers,
    zfarm_env,
)
from tests.jobs import slow_square
from zfarm.dashboard import DashboardState, rate_now, render, sparkline
from zfarm.monitor import fetch_status

HEARTBEAT = ("--heartbeat-interval", "0.2")
LIVENESS_WINDOW_S = 0.6  # 0.2 s heartbeats x liveness 3
WIDTH = 160


def as_text(snapshot: dict[str, Any] | None, address: str, problem: str = "") -> str:
    console = Console(record=True, width=WIDTH, file=io.StringIO())
    console.print(render(snapshot, DashboardState(address, problem)))
    return console.export_text()


def worker_row(text: str, worker_id: str) -> str:
    """The workers-table line of ``worker_id`` (events mention ids too, but never first)."""
    rows = [line for line in text.splitlines() if line.split()[:1] == [worker_id]]
    assert len(rows) == 1, f"expected one row for {worker_id}, found {rows} in:\n{text}"
    return rows[0]


def shown_done(text: str) -> int:
    found = re.findall(r"│ done\s+([\d,]+)\s", text)
    assert len(found) == 1, f"no single 'done' line in the queue panel:\n{text}"
    return int(found[0].replace(",", ""))


def start_farm(procs: Procs, count: int = 3) -> tuple[Proc, str, dict[str, Any]]:
    broker, endpoint = procs.broker(None, *HEARTBEAT)
    tag = uuid.uuid4().hex[:4]
    ids = [f"dash-{tag}-w{i}" for i in range(count)]
    workers = {wid: procs.worker(endpoint, "--worker-id", wid, *HEARTBEAT) for wid in ids}
    wait_for_workers(endpoint, count)
    return broker, endpoint, workers


# ---- pure pieces ---------------------------------------------------------------------------------


def test_sparkline_scales_to_the_largest_value_and_shows_zero_as_blank() -> None:
    assert sparkline([0, 1, 2, 4, 8]) == " ▁▂▄█"
    assert sparkline([0, 0, 0]) == "   "
    assert sparkline([5] * 60) == "█" * 60


def test_rate_now_leaves_out_the_current_partial_second() -> None:
    assert rate_now([0] * 56 + [3, 6, 9, 1000]) == 6.0
    assert rate_now([7]) == 0.0


def test_render_says_when_the_broker_does_not_answer() -> None:
    text = as_text(None, "tcp://127.0.0.1:1", problem="no answer for 3 s")
    assert "broker not answering at tcp://127.0.0.1:1 (retrying)" in text
    assert "no answer for 3 s" in text


def small_terminal_snapshot() -> dict[str, Any]:
    """A farm as a snapshot: three workers with long ids and host names, two clients, events."""
    workers = [{"id": f"gpu-node-{i:03d}-a", "host": f"compute-node-{i}.cluster.example.org", "pid": 4000 + i,
                "slots": 8, "busy": 8 - i, "credit": 1, "done": 12_345 + i, "failed": i, "state": "busy",
                "heartbeat_age_s": 0.4, "uptime_s": 100.0} for i in range(3)]
    clients = [{"id": f"c-{i:012x}", "host": "laptop.example.org", "pid": 42 + i, "submitted": 20_000,
                "queued": 900, "in_flight": 24, "done": 19_000, "failed": 7, "held": 3, "present": True}
               for i in range(2)]
    events = [{"at": 1_800_000_000.0 + i, "kind": "worker-joined",
               "text": f"worker gpu-node-00{i}-a joined from compute-node-{i}.cluster.example.org "
                       "with 8 slots"} for i in range(3)]
    return {"broker_id": "0123456789ab", "version": zfarm.__version__, "protocol": 2,
            "address": "tcp://127.0.0.1:5555", "uptime_s": 100.0, "started_at": 1_800_000_000.0,
            "heartbeat_interval_s": 1.0, "liveness": 3, "queued": 900, "in_flight": 48, "done": 38_000,
            "failed": 14, "requeued": 2, "workers_lost": 0, "workers": workers, "lost_workers": [],
            "clients": clients, "events": events, "throughput": [100] * 60}


def test_render_at_80x24_keeps_every_table_readable() -> None:
    snap = small_terminal_snapshot()
    console = Console(record=True, width=80, height=24, file=io.StringIO())
    console.print(render(snap, DashboardState(snap["address"])))
    text = console.export_text()
    lines = text.rstrip("\n").splitlines()
    assert len(lines) <= 24, text
    assert max(len(line.rstrip()) for line in lines) <= 80
    for heading in ("worker", "busy/slots", "done", "failed", "heartbeat", "state",  # workers
                    "client", "submitted", "in flight", "held",  # clients
                    "queued", "requeued", "throughput now"):  # queue
        assert heading in text, f"{heading!r} missing at 80x24:\n{text}"
    for w in snap["workers"]:
        row = worker_row(text, w["id"])  # whole id, first on its line
        assert f"{w['done']:,}" in row and "busy" in row and f"{w['busy']}/8" in row, row
    for c in snap["clients"]:
        row = next(line for line in lines if line.startswith(c["id"] + " "))
        assert all(n in row for n in ("20,000", "19,000", "24")), row


# ---- against a real farm -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_render_shows_workers_working_counts_moving_and_a_killed_worker_lost(procs: Procs) -> None:
    _, endpoint, workers = start_farm(procs)
    ids = list(workers)
    count = 300
    outcome: dict[str, Any] = {}

    def run_map() -> None:
        try:
            with zfarm.Client(endpoint) as client:
                outcome["results"] = list(client.map(slow_square, range(count), [0.03] * count, chunksize=1))
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    mapper = threading.Thread(target=run_map, name="dashboard-test-map", daemon=True)
    mapper.start()
    try:

        def all_three_busy() -> tuple[dict[str, Any], str] | None:
            snap = fetch_status(endpoint, 5.0)
            text = as_text(snap, endpoint)
            return (snap, text) if all("busy" in worker_row(text, wid) for wid in ids) else None

        first, first_text = wait_for(all_three_busy, 30, interval_s=0.05, message="all three workers busy")
        assert shown_done(first_text) == first["done"]
        assert "workers: 3 connected, 0 recently lost" in first_text
        for w in first["workers"]:
            assert f"{w['pid']}" in worker_row(first_text, w["id"])

        def done_moved() -> tuple[dict[str, Any], str] | None:
            snap = fetch_status(endpoint, 5.0)
            text = as_text(snap, endpoint)
            return (snap, text) if shown_done(text) > shown_done(first_text) else None

        second, second_text = wait_for(done_moved, 20, interval_s=0.05, message="the done count to move")
        assert shown_done(second_text) == second["done"]
        assert second["done"] < count, "the map finished before a worker could be killed: make it longer"

        victim = ids[0]
        workers[victim].kill()
        killed_at = time.monotonic()

        def victim_lost() -> str | None:
            text = as_text(fetch_status(endpoint, 5.0), endpoint)
            return text if "lost" in worker_row(text, victim) else None

        lost_text = wait_for(victim_lost, LIVENESS_WINDOW_S + 2.4, interval_s=0.05,
                             message=f"{victim} shown as lost within the liveness window")
        print(f"{victim} shown lost {time.monotonic() - killed_at:.2f} s after SIGKILL")
        assert "workers: 2 connected, 1 recently lost" in lost_text
        event = re.search(rf"worker-lost\s+worker {victim} on \S+ lost \(.+\); (\d+) jobs requeued",
                          lost_text)
        assert event, f"no worker-lost event for {victim}:\n{lost_text}"
        assert int(event.group(1)) >= 1  # it was busy, with a job in hand and one prefetched
        for survivor in ids[1:]:
            assert "lost" not in worker_row(lost_text, survivor)
    finally:
        mapper.join(60)
    assert not mapper.is_alive(), "the map did not finish within 60 s after the worker was killed"
    assert "error" not in outcome, f"the map failed: {outcome.get('error')!r}"
    assert outcome["results"] == [x * x for x in range(count)]
    final = fetch_status(endpoint, 5.0)
    assert final["done"] == count
    assert final["requeued"] >= int(event.group(1))
    assert final["workers_lost"] == 1


def test_once_prints_one_render_with_the_workers_and_exits_0(procs: Procs) -> None:
    _, endpoint, workers = start_farm(procs)
    result = run_zfarm("dashboard", "--connect", endpoint, "--once", env={"COLUMNS": str(WIDTH)})
    assert result.returncode == 0, result.stderr
    for wid in workers:
        assert "idle" in worker_row(result.stdout, wid)
    assert f"zfarm broker {endpoint}" in result.stdout
    assert "workers: 3 connected, 0 recently lost" in result.stdout
    assert "\x1b[?1049h" not in result.stdout  # not the alternate (full) screen


# ---- the real dashboard in a terminal ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_dashboard_in_tmux_shows_the_workers_survives_a_dead_broker_and_quits_on_q(
    procs: Procs, tmp_path: Path
) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed (.ci/run installs it with apt-get where apt is available)")
    broker, broker_endpoint, workers = start_farm(procs)
    server = [tmux, "-L", f"zfarm-test-{os.getpid()}"]
    session = f"dash-{uuid.uuid4().hex[:8]}"
    rc_file = tmp_path / "dashboard.rc"
    dashboard = shlex.join(["env", f"PYTHONPATH={REPO_ROOT}", *ZFARM_COMMAND, "dashboard",
                            "--connect", broker_endpoint, "--refresh", "4"])
    env = {k: v for k, v in zfarm_env().items() if k != "TMUX"}  # never nest into a user's tmux

    def tmux_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*server, *args], capture_output=True, text=True, timeout=20, env=env,
                              stdin=subprocess.DEVNULL)

    def screen() -> str:
        return tmux_run("capture-pane", "-p", "-t", session).stdout

    try:  # from the start: a tmux server that came up is killed even if new-session timed out
        started = tmux_run("new-session", "-d", "-s", session, "-x", str(WIDTH), "-y", "50",
                           f"{dashboard}; echo $? > {shlex.quote(str(rc_file))}")
        assert started.returncode == 0, started.stderr

        def workers_on_screen() -> str | None:
            text = screen()
            return text if all(wid in text for wid in workers) else None

        shown = wait_for(workers_on_screen, 30, interval_s=0.1,
                         message="the three worker ids on the dashboard screen")
        for wid in workers:
            assert "idle" in worker_row(shown, wid)
        assert "q quits" in shown

        broker.kill()
        wait_for(lambda: f"broker not answering at {broker_endpoint} (retrying)" in screen(), 20,
                 interval_s=0.1, message="the not-answering state on screen")

        assert tmux_run("send-keys", "-t", session, "q").returncode == 0
        wait_for(lambda: tmux_run("has-session", "-t", session).returncode != 0, 20, interval_s=0.1,
                 message="the dashboard to leave on q")
        assert rc_file.read_text().strip() == "0"
    finally:
        tmux_run("kill-server")
