"""Clusters: a broker and the workers launched for it, kept alive and sized (docs/clusters.md).

``LocalCluster`` (this machine), ``SSHCluster`` (hosts reached with the system ``ssh``),
``SlurmCluster`` (``sbatch``/``squeue``/``scancel``) share one interface: ``.address``,
``.workers``, ``.scale(n)``, ``.adapt(minimum, maximum)``, ``.close()``, a context manager, and
``zfarm.Client(cluster)``. Run profiles (``zfarm.toml``) name one of them with its settings.

The launchers load on first use, so that ``python -m zfarm.cluster.remote`` (the remote worker)
imports none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zfarm.cluster.base import Cluster
    from zfarm.cluster.local import LocalCluster
    from zfarm.cluster.slurm import SlurmCluster
    from zfarm.cluster.ssh import SSHCluster

_HOMES = {"Cluster": "base", "LocalCluster": "local", "SSHCluster": "ssh", "SlurmCluster": "slurm"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"zfarm.cluster.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'zfarm.cluster' has no attribute {name!r}")


__all__ = ["Cluster", "LocalCluster", "SSHCluster", "SlurmCluster"]
