"""Clusters: a broker and the workers launched for it, kept alive and sized (docs/clusters.md).

``LocalCluster`` (this machine), ``SSHCluster`` (hosts reached with the system ``ssh``),
``SlurmCluster`` (``sbatch``/``squeue``/``scancel``) share one interface: ``.address``,
``.workers``, ``.scale(n)``, ``.adapt(minimum, maximum)``, ``.close()``, a context manager, and
``zfarm.Client(cluster)``. Run profiles (``zfarm.toml``) name one of them with its settings.
"""

from __future__ import annotations

from zfarm.cluster.base import Cluster
from zfarm.cluster.local import LocalCluster
from zfarm.cluster.slurm import SlurmCluster
from zfarm.cluster.ssh import SSHCluster

__all__ = ["Cluster", "LocalCluster", "SSHCluster", "SlurmCluster"]
