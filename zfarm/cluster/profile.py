"""Run profiles: named clusters in ``zfarm.toml`` (this folder's, then ``~/.config/zfarm/``).

::

    [profiles.lab]
    launcher = "ssh"                      # "local" | "ssh" | "slurm"
    hosts = ["node1", "node2"]            # that launcher's settings ...
    procs_per_worker = 8
    bind = "tcp://*:5555"                 # ... and the broker's
    keys = "~/zfarm-keys"
    journal = "~/lab.journal"
    adapt = { minimum = 0, maximum = 20 } # or n_workers / jobs for a fixed size
    resources = { gpus = 1 }              # what each worker offers jobs (and tags = ["bigmem"])

``start_profile("lab")`` returns the running cluster. Every mistake is a :class:`ProfileError`
naming the file, the profile, the key and what to write instead.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zfarm.cluster.adaptive import Adaptive
from zfarm.cluster.base import Cluster
from zfarm.cluster.offer import resources_text, tags_text
from zfarm.cluster.remote import WALLTIME_MARGIN_S
from zfarm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FILE_NAME = "zfarm.toml"

#: setting -> (type(s) it takes, what to write); shared by every launcher: the broker's and the cluster's
COMMON: dict[str, tuple[Any, str]] = {
    "launcher": (str, '"local", "ssh" or "slurm"'),
    "address": (str, 'a running broker to use instead of starting one, "tcp://host:5555"'),
    "bind": (str, 'where the broker listens, "tcp://*:5555"'),
    "keys": (str, 'a keys folder made by `zfarm keys init`, "~/zfarm-keys"'),
    "insecure": (bool, "true to listen beyond loopback without keys (trusted networks only)"),
    "journal": (str, 'the broker\'s journal file, "~/farm.journal"'),
    "heartbeat_interval_s": ((int, float), "seconds, e.g. 1.0"),
    "worker_grace_s": ((int, float), "seconds a retiring worker's jobs may take, e.g. 30"),
    "log_level": (str, '"debug", "info", "warning" or "error"'),
    "adapt": (dict, "a table, e.g. { minimum = 0, maximum = 10 }"),
    "resources": ((dict, str), 'what each worker offers jobs, { gpus = 1, mem = "32G" } or "gpus=1,mem=32G"'),
    "tags": ((list, str), 'tags each worker offers jobs, ["bigmem", "avx512"] or "bigmem,avx512"'),
}
LAUNCHERS: dict[str, dict[str, tuple[Any, str]]] = {
    "local": {"n_workers": (int, "a number of workers, e.g. 4"),
              "procs_per_worker": (int, "slots per worker, e.g. 1")},
    "ssh": {"hosts": (list, 'a list of ssh destinations, ["node1", "user@node2"]'),
            "n_workers": (int, "a number of workers (default: one per host)"),
            "procs_per_worker": (int, "slots per worker (default: one per remote CPU)"),
            "python": (str, 'the remote python, "/opt/venv/bin/python"'),
            "remote_env": (dict, 'a table, e.g. { OMP_NUM_THREADS = "1" }'),
            "ssh_options": (list, 'a list, e.g. ["-p", "2222"]')},
    "slurm": {"jobs": (int, "a number of jobs (workers), e.g. 4"),
              "cpus": (int, "CPUs per job (and slots per worker), e.g. 8"),
              "mem": (str, 'memory per job, "16G"'),
              "walltime": (str, 'time per job, "2:00:00"'),
              "partition": (str, 'a partition name, "batch"'),
              "account": (str, 'an account name, "proj42"'),
              "job_extra": (list, 'a list of #SBATCH options, ["--qos=short"]'),
              "python": (str, 'the python on the nodes, "/opt/venv/bin/python"'),
              "shared_dir": (str, 'a folder the nodes see, "~/.cache/zfarm/slurm"'),
              "walltime_margin_s": ((int, float), "seconds between a drained worker and its walltime, e.g. "
                                                   f"{WALLTIME_MARGIN_S:g}")},
}
#: adapt's settings: the fields of Adaptive, and the types a TOML value may have for each
ADAPT_KEYS: dict[str, Any] = {f.name: int if f.type in ("int", int) else (int, float)
                              for f in dataclasses.fields(Adaptive) if f.init}
PATH_KEYS = ("keys", "journal", "shared_dir")


class ProfileError(ConfigError):
    """A run profile is missing or wrong; says which file, profile and key, and the fix."""

    def __init__(self, file: str, profile: str, key: str, problem: str) -> None:
        self.file = file
        self.profile = profile
        self.key = key
        where = f"{file}: [profiles.{profile}]" + (f" {key}" if key else "")
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Profile:
    name: str
    file: str
    launcher: str
    settings: dict[str, Any]  # the launcher's and the broker's, checked, paths made absolute
    adapt: dict[str, Any] | None


def profile_files(cwd: str | None = None) -> list[Path]:
    """Where profiles are looked for, in order: this folder's zfarm.toml, then the user's."""
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path(cwd or os.getcwd()) / FILE_NAME, home / "zfarm" / FILE_NAME]


def load_profile(name: str, files: list[Path] | None = None) -> Profile:
    """The profile ``name`` from the first file that has it.

    Raises:
        ProfileError: no file has it, or it is wrong (the message says how to fix it).
    """
    searched = files or profile_files()
    known: list[str] = []
    for path in searched:
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ProfileError(str(path), name, "", f"cannot be read: {exc}") from exc
        profiles = data.get("profiles", {})
        if not isinstance(profiles, dict):
            raise ProfileError(str(path), name, "", "'profiles' must be tables: write [profiles.NAME]")
        if name in profiles:
            return check_profile(name, str(path), profiles[name])
        known += [f"{n} ({path})" for n in profiles]
    where = " or ".join(str(p) for p in searched)
    raise ProfileError(where, name, "", "no such profile; " + (f"known: {', '.join(known)}" if known else
                       f"add a [profiles.{name}] table with launcher = \"local\" (docs/clusters.md)"))


def check_profile(name: str, file: str, table: Any) -> Profile:
    if not isinstance(table, dict):
        raise ProfileError(file, name, "", "must be a table: [profiles.NAME] followed by key = value lines")
    launcher = table.get("launcher")
    if launcher not in LAUNCHERS:
        raise ProfileError(file, name, "launcher", f"is {launcher!r}; write launcher = \"local\", \"ssh\" or "
                           "\"slurm\"")
    allowed = {**COMMON, **LAUNCHERS[launcher]}
    base = Path(file).parent
    settings: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            raise ProfileError(file, name, key, f"is not a setting of the {launcher} launcher; known: "
                               f"{', '.join(sorted(allowed))}")
        kind, example = allowed[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ProfileError(file, name, key, f"is {value!r}; write {example}")
        if key in PATH_KEYS:
            value = str(base / Path(value).expanduser())
        settings[key] = value
    _check_offer(file, name, settings)
    if launcher == "ssh" and not settings.get("hosts"):
        raise ProfileError(file, name, "hosts", 'is missing; write hosts = ["node1", "node2"]')
    adapt = settings.pop("adapt", None)
    if adapt is not None:
        for key, value in adapt.items():
            if key not in ADAPT_KEYS or not isinstance(value, ADAPT_KEYS[key]) or isinstance(value, bool):
                raise ProfileError(file, name, f"adapt.{key}", f"is {value!r}; adapt takes numbers for "
                                   f"{', '.join(ADAPT_KEYS)}")
        try:
            Adaptive(**adapt)
        except ConfigError as exc:
            raise ProfileError(file, name, "adapt", str(exc)) from None
    del settings["launcher"]
    return Profile(name, file, launcher, settings, adapt)


def _check_offer(file: str, name: str, settings: dict[str, Any]) -> None:
    """Resources and tags are checked here, so that the error names the file and the key."""
    for key, check in (("resources", resources_text), ("tags", tags_text)):
        if key in settings:
            try:
                check(settings[key])
            except ConfigError as exc:
                raise ProfileError(file, name, key, f"{exc}; write {COMMON[key][1]}") from None


def with_overrides(profile: Profile, **settings: Any) -> Profile:
    """The profile with ``resources`` or ``tags`` given on the command line (``zfarm up --resources
    ...``) in place of its own; None values are left out.

    Raises:
        ConfigError: a value that is wrong, naming its flag.
    """
    given = {k: v for k, v in settings.items() if v is not None}
    for key, check in (("resources", resources_text), ("tags", tags_text)):
        if key in given:
            try:
                check(given[key])
            except ConfigError as exc:
                raise ConfigError(f"--{key}: {exc}") from None
    return dataclasses.replace(profile, settings={**profile.settings, **given})


def build_cluster(profile: Profile) -> Cluster:
    """Start the profile's broker and workers."""
    from zfarm.cluster import LocalCluster, SlurmCluster, SSHCluster

    settings = dict(profile.settings)
    try:
        cluster: Cluster
        settings["name"] = profile.name  # how `zfarm status` and the dashboard name it, from the first report
        if profile.adapt is not None and profile.launcher in ("local", "ssh"):
            # adapt starts from its minimum (not from every core or host) until the queue asks for more
            settings.setdefault("n_workers", int(profile.adapt.get("minimum", 0)))
        if profile.launcher == "local":
            cluster = LocalCluster(**settings)
        elif profile.launcher == "ssh":
            cluster = SSHCluster(settings.pop("hosts"), **settings)
        else:
            cluster = SlurmCluster(**settings)
    except ConfigError as exc:
        if isinstance(exc, ProfileError):
            raise
        raise ProfileError(profile.file, profile.name, "", str(exc)) from exc
    if profile.adapt is not None:
        cluster.adapt(**profile.adapt)
    return cluster


def start_profile(name: str) -> Cluster:
    """Load the profile ``name`` and start its cluster (the caller closes it)."""
    return build_cluster(load_profile(name))
