"""What a worker offers jobs: its resources, tags and GPU ids, said in its HELLO.

The broker places a job that asks for resources or tags only on a worker that offers them (see
docs/projects.md); a job without a request takes one slot and asks for nothing.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from zfarm.config import WorkerSettings, parse_resources, parse_tags

#: how long ``nvidia-smi -L`` may take to list the GPUs
GPU_LIST_TIMEOUT_S = 5.0


def announced(settings: WorkerSettings) -> dict[str, Any]:
    """The resources, tags and GPU ids a worker offers: its flags over what the machine has.

    Defaults: cpus = its slots, mem = the machine's memory, gpus = those ``nvidia-smi -L`` lists or
    ``CUDA_VISIBLE_DEVICES`` names.
    """
    gpu_ids = _gpu_ids()
    resources = {"cpus": float(settings.slots), "mem": float(_memory_bytes()), "gpus": float(len(gpu_ids)),
                 **parse_resources(settings.resources)}
    count = int(resources["gpus"])
    gpu_ids = (gpu_ids + [str(i) for i in range(len(gpu_ids), count)])[:count]
    return {"resources": resources, "tags": parse_tags(settings.tags), "gpu_ids": gpu_ids}


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _gpu_ids() -> list[str]:
    """GPU ids from ``CUDA_VISIBLE_DEVICES``, else from ``nvidia-smi -L`` (none if neither answers)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                timeout=GPU_LIST_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]
