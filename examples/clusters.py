"""One script, three places to run it: this machine, ssh hosts, or Slurm (docs/clusters.md).

    python examples/clusters.py                       # a LocalCluster of 2 workers
    python examples/clusters.py ssh node1 node2       # one worker per host, over your ssh
    python examples/clusters.py slurm                 # Slurm jobs of 1 CPU, sized by adapt()

The workers are supervised (one that dies is started again) and stop with the cluster.
"""

import logging
import sys

import zfarm
from zfarm.cluster import Cluster


def simulate(seed: int) -> float:
    import random

    rng = random.Random(seed)
    return sum(rng.random() for _ in range(100_000)) / 100_000


def make_cluster(argv: list[str]) -> Cluster:
    if argv[:1] == ["ssh"]:
        return zfarm.SSHCluster(argv[1:], procs_per_worker=1)
    if argv[:1] == ["slurm"]:
        cluster = zfarm.SlurmCluster(cpus=1, walltime="0:30:00")
        cluster.adapt(minimum=0, maximum=8)
        return cluster
    return zfarm.LocalCluster(n_workers=2)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with make_cluster(sys.argv[1:]) as cluster, zfarm.Client(cluster) as client:
        means = list(client.map(simulate, range(200), progress=True))
        print(f"mean of means: {sum(means) / len(means):.4f} from {len(means)} jobs")
        for worker in cluster.workers:
            print(worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
