"""``SlurmCluster``: one Slurm batch job per worker, through ``sbatch``, ``squeue`` and ``scancel``.

::

    scale(n) ─► sbatch job.sh (#SBATCH lines from the arguments + job_extra) ─► job id
    every 3 s: one ``squeue --me`` ─► PENDING (coming) / RUNNING / gone (ended)
    retire: ``scancel --batch --signal=TERM`` (the worker drains) · pending or close: ``scancel``
    sbatch failed (it may have queued the job all the same): ``scancel --name`` at once and at close

The job runs ``python -m zfarm.cluster.remote --settings FILE``: the broker's address and the
worker's key are in FILE, mode 0600 in a 0700 folder under ``~/.cache/zfarm/slurm`` (a shared
home on most clusters; ``shared_dir`` otherwise), removed when the cluster closes. The worker
reads its allocation's end and drains before it, so the walltime kills no job.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from zfarm.cluster.base import Cluster
from zfarm.cluster.offer import offer_args, with_slurm_mem
from zfarm.cluster.remote import WALLTIME_MARGIN_S, settings_blob
from zfarm.cluster.supervision import Launched
from zfarm.errors import ConfigError, ZfarmError
from zfarm.local import free_tcp_endpoint

log = logging.getLogger("zfarm.cluster.slurm")

COMMAND_TIMEOUT_S = 60.0
PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"}
#: squeue runs that must miss a job before it counts as ended (squeue may lag just after sbatch)
MISSES_BEFORE_ENDED = 2
#: how often squeue runs (controllers on shared clusters do not like being polled faster)
SQUEUE_EVERY_S = 3.0


class SlurmError(ZfarmError):
    """A Slurm command failed; carries the command and what it said."""

    def __init__(self, argv: Sequence[str], said: str) -> None:
        self.argv = list(argv)
        self.said = said
        super().__init__(f"{' '.join(argv)} failed: {said.strip() or 'no output'} (is Slurm reachable "
                         "from this machine? try the command by hand)")


def run_slurm(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(argv, str(exc)) from exc
    if done.returncode != 0:
        raise SlurmError(argv, done.stderr or done.stdout)
    return done.stdout


class SlurmJob:
    """One batch job; its state comes from the cluster's last ``squeue``."""

    def __init__(self, job_id: str, output: Path) -> None:
        self.job_id = job_id
        self.output = output
        self.state = "PENDING"
        self.misses = 0

    def ended(self) -> str | None:
        if self.misses < MISSES_BEFORE_ENDED:
            return None
        tail = ""
        try:
            lines = self.output.read_text(errors="replace").strip().splitlines()
            tail = f"; its output ends: {lines[-1]}" if lines else ""
        except OSError:
            pass
        return f"Slurm job {self.job_id} ended (last state {self.state}; output in {self.output}{tail})"

    def pending(self) -> bool:
        return self.state in PENDING_STATES

    def retire(self) -> None:
        if self.pending():
            run_slurm(["scancel", self.job_id])
        else:  # the worker drains and leaves; the job ends with it
            run_slurm(["scancel", "--batch", "--signal=TERM", self.job_id])

    def kill(self) -> None:
        run_slurm(["scancel", self.job_id])


class SlurmCluster(Cluster):
    """Workers as Slurm jobs, ``cpus`` slots each.

    Args:
        jobs: workers to start now (then ``scale`` or ``adapt``).
        cpus: ``--cpus-per-task`` of each job, and its worker's slots.
        mem: ``--mem`` of each job (``"4G"``).
        walltime: ``--time`` of each job (``"1:00:00"``); the worker drains before it ends.
        partition, account: ``--partition``, ``--account``.
        job_extra: more ``#SBATCH`` options, e.g. ``("--qos=short", "--constraint=avx2")``.
        python: the python with zfarm installed on the nodes (default: this one).
        shared_dir: a folder the nodes see too (default ``~/.cache/zfarm/slurm``).
        walltime_margin_s: a worker has drained (``worker_grace_s`` included) this long before
            its allocation ends.
        bind: where the broker listens (default ``tcp://*:PORT``, a free port, with keys: the given
            folder or a fresh one). Other arguments as :class:`Cluster`.
    """

    kind = "slurm"
    networked = True

    def __init__(self, jobs: int = 0, cpus: int = 1, mem: str | None = None, walltime: str | None = None,
                 partition: str | None = None, account: str | None = None, job_extra: Sequence[str] = (),
                 python: str | None = None, *, shared_dir: str | None = None,
                 walltime_margin_s: float = WALLTIME_MARGIN_S,
                 **common: object) -> None:
        if cpus < 1 or jobs < 0:
            raise ConfigError(f"SlurmCluster needs cpus >= 1 and jobs >= 0, got cpus={cpus} jobs={jobs}")
        if isinstance(job_extra, str):
            raise ConfigError(f"job_extra must be a list of options, not the string {job_extra!r}")
        if shutil.which("sbatch") is None:
            raise ConfigError("sbatch is not on PATH: SlurmCluster runs where Slurm's commands do "
                              "(a login node)")
        self.cpus = cpus
        self.mem = mem
        self.directives = [f"--cpus-per-task={cpus}"]
        for flag, value in (("--mem", mem), ("--time", walltime), ("--partition", partition),
                            ("--account", account)):
            if value:
                self.directives.append(f"{flag}={value}")
        self.directives += [str(x) for x in job_extra]
        self.python = python or sys.executable
        super().__init__(**common)  # type: ignore[arg-type]
        self.slots_per_worker = cpus
        self._jobs: dict[str, SlurmJob] = {}
        self._unsure: set[str] = set()  # names of jobs sbatch may have queued though it failed
        self._next_squeue = 0.0
        folder: Path | None = None
        try:  # a folder that cannot be made or written: the broker started must not outlive us
            base = Path(shared_dir or Path.home() / ".cache" / "zfarm" / "slurm")
            base.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.folder = folder = Path(tempfile.mkdtemp(prefix="cluster-", dir=base))  # 0700
            self.settings_file = self.folder / "worker.json"
            fd = os.open(self.settings_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                blob = settings_blob(self.address, self.keys, self.heartbeat_interval_s, self.worker_grace_s,
                                     self.log_level)
                json.dump({**blob, "walltime_margin_s": walltime_margin_s}, f)
            self._begin(jobs)
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            self._abandon()
            raise

    def _default_bind(self) -> str:
        return free_tcp_endpoint("*")

    def _place(self, index: int) -> tuple[str, str]:
        return f"slurm-{index}", "slurm"

    def job_name(self, worker_id: str) -> str:
        """Unique to this cluster and launch (its folder's random name): ``scancel --name`` finds it."""
        return f"zfarm-{self.folder.name}-{worker_id}"

    def batch_script(self, worker_id: str) -> str:
        lines = ["#!/bin/sh", f"#SBATCH --job-name={self.job_name(worker_id)}",
                 f"#SBATCH --output={self.folder}/{worker_id}.%j.out"]
        lines += [f"#SBATCH {d}" for d in self.directives]
        offer = " ".join(shlex.quote(a) for a in offer_args(with_slurm_mem(self.worker_resources, self.mem),
                                                             self.worker_tags))
        lines += ["", f"exec {self.python} -m zfarm.cluster.remote --settings {self.settings_file} "
                      f"--worker-id {worker_id} --procs {self.cpus}{f' {offer}' if offer else ''}", ""]
        return "\n".join(lines)

    def _launch(self, worker: Launched) -> SlurmJob:
        script = self.folder / f"{worker.worker_id}.sh"
        script.write_text(self.batch_script(worker.worker_id))
        try:
            job_id = run_slurm(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
            if not job_id.isdigit():
                raise SlurmError(["sbatch", "--parsable", str(script)], f"unexpected answer {job_id!r}")
        except SlurmError:  # sbatch may have queued it all the same (a timeout, a lost answer)
            self._unsure.add(self.job_name(worker.worker_id))
            self._cancel_unsure()
            raise
        worker.where = f"slurm job {job_id}"
        job = SlurmJob(job_id, self.folder / f"{worker.worker_id}.{job_id}.out")
        self._jobs[job_id] = job
        return job

    def _refresh(self) -> None:
        """One ``squeue`` for all our jobs; a job it no longer lists has ended."""
        live = [j for j in self._jobs.values() if j.misses < MISSES_BEFORE_ENDED]
        now = time.monotonic()
        if not live or now < self._next_squeue:
            return
        self._next_squeue = now + SQUEUE_EVERY_S
        try:  # all of this user's jobs: asking for ours by id fails once none of them is left
            out = run_slurm(["squeue", "--me", "--noheader", "--format=%i %T"])
        except SlurmError as exc:
            log.warning("%s", exc)
            return
        states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
        for job in live:
            if job.job_id in states:
                job.state, job.misses = states[job.job_id], 0
            else:
                job.misses += 1

    def _cancel_unsure(self) -> None:
        """``scancel`` by name the jobs whose ``sbatch`` failed (forgotten once Slurm says yes)."""
        for name in sorted(self._unsure):
            try:
                run_slurm(["scancel", f"--name={name}", f"--user={os.getuid()}"])
            except SlurmError as exc:
                log.warning("%s; trying again when the cluster closes", exc)
            else:
                self._unsure.discard(name)

    def _cleanup(self) -> None:
        left = [j.job_id for j in self._jobs.values() if j.misses < MISSES_BEFORE_ENDED]
        if left:
            try:
                run_slurm(["scancel", *left])
            except SlurmError as exc:
                log.warning("%s", exc)
        self._cancel_unsure()
        shutil.rmtree(self.folder, ignore_errors=True)

