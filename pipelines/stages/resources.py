"""How many actors / CPUs a stage gets, from its ``resources:`` and the cluster's totals.

Sizing rule: a CPU actor pool gets at most ``floor((cluster CPUs - reserved) / cpus per actor)``
actors, where one CPU stays free for the read tasks that feed the pool (an actor pool holding
every CPU starves its own input and hangs; on a 2-core machine that means one actor). GPU pools
are bounded by GPUs. The DAG's ``resources.workers`` caps both. Ray Train workers share the
cluster's CPUs minus the same reserve. Used by the executors (``pipelines.dag.ray_exec``) and the
train stage alike; no Ray import.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["RESERVED_CPUS", "pool_size", "actor_cpus", "train_worker_cpus"]

#: CPUs left for Ray Data read/filter tasks on any cluster.
RESERVED_CPUS = 1.0


def pool_size(resources: Any, cluster: dict[str, float]) -> int:
    """Largest actor pool the cluster can hold beside its input tasks (at least 1)."""
    want = int(getattr(resources, "workers", 1) or 1)
    gpus = float(getattr(resources, "gpus", 0.0) or 0.0)
    cpus = float(getattr(resources, "cpus", 1.0) or 1.0)
    if gpus > 0:
        fit = math.floor(cluster.get("GPU", 0.0) / gpus)
    else:
        fit = math.floor(max(cluster.get("CPU", 1.0) - RESERVED_CPUS, 0.0) / cpus)
    return max(1, min(want, fit))


def actor_cpus(resources: Any, cluster: dict[str, float]) -> float:
    """CPUs per actor, shrunk on clusters too small to hold one actor beside the read tasks."""
    cpus = float(getattr(resources, "cpus", 1.0) or 1.0)
    free = max(cluster.get("CPU", 1.0) - RESERVED_CPUS, 0.0)
    return cpus if cpus <= free else max(free, 0.25) if free > 0 else 0.5


def train_worker_cpus(resources: Any, cluster: dict[str, float]) -> float:
    """CPUs per Ray Train worker: the declared ``cpus``, shrunk so all workers fit beside the
    reserve (at least 0.25)."""
    workers = int(getattr(resources, "workers", 1) or 1)
    cpus = float(getattr(resources, "cpus", 1.0) or 1.0)
    return min(cpus, max((cluster.get("CPU", 1.0) - RESERVED_CPUS) / workers, 0.25))
