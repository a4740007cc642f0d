"""Ray side of the stage contract: run a per-sample stage in a Ray Data actor pool, and size
pools from the cluster's resources.

Sizing rule: a CPU actor pool gets at most ``floor((cluster CPUs - reserved) / cpus per actor)``
actors, where one CPU stays free for the read tasks that feed the pool (an actor pool holding
every CPU starves its own input and hangs; on a 2-core machine that means one actor). GPU pools
are bounded by GPUs. The DAG's ``resources.workers`` caps both.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import pyarrow as pa

from pipelines.stages.base import BatchResult, MapStage, Work, filter_to_keys

__all__ = ["cluster_resources", "pool_size", "RayDataExecutor"]

#: CPUs left for Ray Data read/filter tasks on any cluster.
RESERVED_CPUS = 1.0


def cluster_resources() -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}


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


class _StageActor:
    """Callable-class UDF: builds the stage once per actor (``setup`` loads models)."""

    def __init__(self, kind_cls: type, config: Any, ctx: Any):
        self.stage = kind_cls(config, ctx)
        self.stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        result = self.stage.safe_process(batch)
        return _envelope(result)


def _envelope(result: BatchResult) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, result.rows.schema) as w:
        w.write_table(result.rows)
    return pa.table({"rows": pa.array([sink.getvalue().to_pybytes()], pa.binary()),
                     "quarantine": pa.array([json.dumps(result.quarantine, default=str)])})


def _open_envelope(row: dict[str, Any]) -> BatchResult:
    rows = pa.ipc.open_stream(pa.py_buffer(row["rows"])).read_all()
    return BatchResult(rows, json.loads(row["quarantine"]))



class RayDataExecutor:
    """Runs a :class:`MapStage` over Ray Data; results stream back to the driver for commits."""

    def __init__(self, cluster: dict[str, float] | None = None):
        self.cluster = cluster

    def execute(self, stage: MapStage, work: Work) -> Iterator[BatchResult]:
        import ray

        cluster = self.cluster or cluster_resources()
        res = stage.ctx.resources
        batch_size = int(getattr(res, "batch_size", 16) or 16)
        pool = pool_size(res, cluster)
        if work.items is not None:
            n_blocks = max(1, min(work.items.num_rows, pool * 4))
            ds = ray.data.from_arrow(work.items).repartition(n_blocks)
        else:
            ds = ray.data.read_delta(work.table_uri, version=work.table_version,
                                     columns=work.columns,
                                     storage_options=stage.ctx.store.storage_options or None)
            # Ray Data fuses this task map into the actor stage below, so the filter runs on the
            # actors' CPUs (cheap next to encoding; it only drops rows already done)
            ds = ds.map_batches(filter_to_keys, fn_args=(work.todo,), batch_format="pyarrow")
        ds = ds.map_batches(
            _StageActor,
            fn_constructor_args=(type(stage), stage.config, stage.ctx.for_worker()),
            batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
            num_cpus=actor_cpus(res, cluster),
            num_gpus=float(getattr(res, "gpus", 0.0) or 0.0) or None,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                yield _open_envelope(row)
