"""Ray side of the stage contract: the executor that runs a per-sample stage in a Ray Data actor
pool, and the actor pools job stages (train, evaluate) ask for. Pools are sized by
:mod:`pipelines.stages.resources` from the cluster's resources.

Work too small for an actor pool runs in the driver instead (:class:`InProcessExecutor`, under
:func:`~pipelines.stages.base.cpu_only`): a job stage's one batch, and, with ``in_process_rows``
(the runner passes the DAG's), a per-sample stage's to-do of at most that many rows. Ray is
reached only past that rule (``connect``: the runner's lazy connection), so a 1% re-run of a small
dataset never pays Ray's start-up and the actor pools' model loads.
"""

from __future__ import annotations

import json
from typing import Any
from collections.abc import Callable, Iterator

import pyarrow as pa

from pipelines.stages.base import (BatchResult, InProcessExecutor, MapStage, Work, cpu_only,
                                   filter_to_key_set, row_keys)
from pipelines.stages.resources import RESERVED_CPUS, actor_cpus, pool_size

__all__ = ["cluster_resources", "pool_size", "actor_cpus", "RESERVED_CPUS", "RayDataExecutor"]

#: CPUs of one filter/prepare (decode) task ahead of an actor pool on a small cluster (under 4
#: CPUs beside the pool): several decode tasks share the free CPU; on larger ones a task gets 1
PREPARE_CPUS = 0.25


def cluster_resources() -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}


def _gpus(resources: Any) -> float:
    return float(getattr(resources, "gpus", 0.0) or 0.0)


def prepare_cpus(cluster: dict[str, float], pool: int, per_actor: float) -> float:
    """num_cpus of a filter/prepare task: 1 where the pool leaves 4+ CPUs, else PREPARE_CPUS;
    never the actors' own value (Ray Data fuses a task map into an actor map with equal
    resources, which would put decoding back in series with the model)."""
    free = cluster.get("CPU", 1.0) - pool * per_actor
    want = 1.0 if free >= 4 else PREPARE_CPUS
    return want * 0.9 if abs(want - per_actor) < 1e-9 else want


def _prepare(batch: pa.Table, kind_cls: type, config: Any, ctx: Any,
             prepare: dict[str, Any]) -> pa.Table:
    """Task body ahead of the actors: the stage's prepare step (decode, resize)."""
    if not batch.num_rows:
        return batch
    return kind_cls(config, ctx).prepare_batch(batch, **prepare)


class _StageActor:
    """Callable-class UDF: builds the stage once per actor (``setup`` loads models)."""

    def __init__(self, kind_cls: type, config: Any, ctx: Any, write_files: bool = False):
        self.stage = kind_cls(config, ctx)
        self.write_files = write_files
        self.stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        result = self.stage.safe_process(batch)
        if self.write_files:  # the payload goes to storage; keys + file record to the driver
            result = self.stage.write_file(result)
        return _envelope(result)


def _envelope(result: BatchResult) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, result.rows.schema) as w:
        w.write_table(result.rows)
    return pa.table({"rows": pa.array([sink.getvalue().to_pybytes()], pa.binary()),
                     "quarantine": pa.array([json.dumps(result.quarantine, default=str)]),
                     "items": pa.array([json.dumps(result.items)]),
                     "files": pa.array([json.dumps(result.files)])})


def _open_envelope(row: dict[str, Any]) -> BatchResult:
    rows = pa.ipc.open_stream(pa.py_buffer(row["rows"])).read_all()
    return BatchResult(rows, json.loads(row["quarantine"]), json.loads(row["items"]),
                       json.loads(row.get("files") or "[]"))



class RayDataExecutor:
    """Runs a :class:`MapStage` over Ray Data (workers write the output's data files; keys and
    file records stream back to the driver, which commits them chunk by chunk),
    and gives job stages actor pools (:meth:`map_actors`) sized by the same rule.

    Work that asks for no GPU and is small runs in this process instead, as its CPU actor would
    (:func:`~pipelines.stages.base.cpu_only`): a job stage's work of one batch (its batches are
    not rows: a shard of generated images), and a per-sample stage whose to-do is at most
    ``in_process_rows`` work items (rows, or files for a source stage; default 0: none). The
    cluster is ``cluster``, else ``connect()`` (called only when work goes to Ray: the runner's
    lazy connection), else the connected Ray's. ``ran`` records where each per-sample stage's
    work went (``stage -> "in-process" | "ray"``)."""

    def __init__(self, cluster: dict[str, float] | None = None, *,
                 connect: Callable[[], dict[str, float]] | None = None,
                 in_process_rows: int = 0):
        self.cluster, self.connect = cluster, connect
        self.in_process_rows = int(in_process_rows)
        self.ran: dict[str, str] = {}
        #: bytes of per-sample results received by this process (``benchmarks/driver_bytes.py``)
        self.driver_bytes = 0

    def _cluster(self) -> dict[str, float]:
        if self.cluster is None:
            self.cluster = self.connect() if self.connect is not None else cluster_resources()
        return self.cluster

    def map_actors(self, actor_cls: type, args: tuple, *, make_ds: Callable[[], Any],
                   local_batches: Callable[[], Iterator[pa.Table]], batch_size: int,
                   resources: Any = None, num_batches: int | None = None
                   ) -> Iterator[pa.Table]:
        """``actor_cls(*args)`` called on every batch of ``make_ds()`` (a Ray Dataset), on an
        actor pool sized from ``resources`` and the cluster (GPU actors when
        ``resources.gpus``); yields the actors' output tables. Work the caller knows is one
        batch (``num_batches=1``) and that asks for no GPU runs in this process instead: an
        actor pool's start-up (a worker process importing the models) costs more than it."""
        gpus = _gpus(resources)
        if num_batches == 1 and not gpus:
            with cpu_only():
                yield from InProcessExecutor().map_actors(
                    actor_cls, args, make_ds=make_ds, local_batches=local_batches,
                    batch_size=batch_size, resources=resources)
            return
        import ray.data

        cluster = self._cluster()
        ds = make_ds().map_batches(
            actor_cls, fn_constructor_args=args, batch_format="pyarrow", batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool_size(resources, cluster)),
            num_cpus=actor_cpus(resources, cluster), num_gpus=gpus or None)
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)

    def execute(self, stage: MapStage, work: Work) -> Iterator[BatchResult]:
        res = stage.ctx.resources
        if not _gpus(res) and work.todo_count <= self.in_process_rows:
            self.ran[stage.ctx.stage] = "in-process"
            with cpu_only():
                yield from InProcessExecutor().execute(stage, work)
            return
        self.ran[stage.ctx.stage] = "ray"
        import ray

        cluster = self._cluster()
        batch_size = int(getattr(res, "batch_size", 16) or 16)
        pool = pool_size(res, cluster)
        ctx = stage.ctx.for_worker()
        per_actor = actor_cpus(res, cluster)
        prepare = stage.prepare_args()
        # the key filter, and the stage's prepare step (decode, resize), run as CPU tasks ahead
        # of the actor pool; their num_cpus differs from the actors' so Ray Data does not fuse
        # them into the actors (which would put decoding in series with the model again)
        task_cpus = prepare_cpus(cluster, pool, per_actor)
        if work.items is not None:
            n_blocks = max(1, min(work.items.num_rows, pool * 4))
            ds = ray.data.from_arrow(work.items).repartition(n_blocks)
        else:
            if work.table_uri is None:
                raise ValueError(f"stage {stage.ctx.stage!r}: its work names neither items nor "
                                 "a table to read")
            # every candidate is to do (a first run): nothing to filter
            keys = work.todo if work.todo_count < work.total else None
            read_args: dict[str, Any] = {}
            if keys is not None:
                # a re-run keeps a few rows of every file: a few read tasks (not Ray Data's 200+
                # blocks, each a task with its own start-up), each filtering what it read
                # before anything leaves it (the filter fuses into the read: same num_cpus)
                read_args = {"num_cpus": task_cpus,
                             "override_num_blocks": max(2, int(cluster.get("CPU", 2)) * 2)}
            ds = ray.data.read_delta(
                work.table_uri, version=work.table_version, columns=work.columns,
                storage_options=stage.ctx.store.worker_storage_options() or None, **read_args)
            if keys is not None:  # whole blocks: one set lookup per block, not per batch
                ds = ds.map_batches(filter_to_key_set, fn_args=(row_keys(keys),),
                                    batch_size=None, batch_format="pyarrow", num_cpus=task_cpus)
            if prepare is not None:
                ds = ds.map_batches(
                    _prepare, fn_args=(type(stage), stage.config, ctx, prepare),
                    batch_size=batch_size, batch_format="pyarrow", num_cpus=task_cpus)
        ds = ds.map_batches(
            _StageActor,
            fn_constructor_args=(type(stage), stage.config, ctx, stage.worker_writes),
            batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
            num_cpus=per_actor,
            num_gpus=_gpus(res) or None,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            assert isinstance(batch, pa.Table)  # batch_format="pyarrow"
            self.driver_bytes += batch.nbytes
            for row in batch.to_pylist():
                yield _open_envelope(row)

