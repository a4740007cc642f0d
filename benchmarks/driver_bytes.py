"""Bytes a per-sample stage's results send to the driver, and commit throughput, with workers
writing the output's data files (``MapStage.worker_writes``, the default) against the old path
where every row streams back to the driver, which writes it (issue #17 item 5).

A synthetic stage emits ``--payload-kb`` KB of incompressible bytes per row (64 KB: a KL-16
latent with its flip), run by the real ``RayDataExecutor`` on an embedded local Ray, committed
chunk by chunk by ``MapStage.run``. Prints, per mode and pool size: rows/s of the whole stage
(compute + writes + commits), bytes received by the driver per committed row, and the ratio
worker-writes / driver-writes measured in the same run.

    python benchmarks/driver_bytes.py --rows 2000 --payload-kb 64 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow as pa

from pipelines.dag.runner import connect_ray
from pipelines.dag.ray_exec import RayDataExecutor, cluster_resources
from pipelines.dag.spec import ResourcesSpec
from pipelines.stages.base import BatchResult, MapStage, OutputRef, StageConfig, StageContext
from vgen_core.data import TableStore, content_digest

OUT = pa.schema([("sample_id", pa.string()), ("content_digest", pa.string()),
                 ("fingerprint", pa.string()), ("payload", pa.binary())])


class PayloadConfig(StageConfig):
    kb: int = 64


class Payload(MapStage):
    kind = "bench.payload"
    Config = PayloadConfig
    output_schema = OUT

    def process_batch(self, batch: pa.Table) -> BatchResult:
        n = batch.num_rows
        return BatchResult(pa.table({
            "sample_id": batch["sample_id"], "content_digest": batch["content_digest"],
            "fingerprint": [self.ctx.row_fingerprint] * n,
            "payload": [os.urandom(self.config.kb * 1024) for _ in range(n)]}, schema=OUT))


class PayloadViaDriver(Payload):
    worker_writes = False


def run_once(kind: type, store: TableStore, ref: OutputRef, fp: str, workers: int, kb: int,
             batch: int, chunk: int, cluster: dict[str, float]) -> tuple[float, float, int]:
    res = ResourcesSpec(cpus=0.5, workers=workers, batch_size=batch)
    ctx = StageContext(dag="bench", stage=f"payload_{fp}", store=store, row_fingerprint=fp,
                       inputs={"src": {"samples": ref}}, resources=res, chunk_size=chunk,
                       cluster=cluster)
    ex = RayDataExecutor(cluster)
    t0 = time.perf_counter()
    r = kind(PayloadConfig(kb=kb), ctx).run(ex)
    dt = time.perf_counter() - t0
    assert r.counts.processed == ref_rows(store, ref), r.counts
    return r.counts.processed / dt, ex.driver_bytes / max(r.counts.processed, 1), \
        r.counts.processed


def ref_rows(store: TableStore, ref: OutputRef) -> int:
    return store.read(ref.name, columns=["sample_id"]).num_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--payload-kb", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    connect_ray()
    cluster = cluster_resources()
    with tempfile.TemporaryDirectory() as tmp:
        store = TableStore(tmp)
        ids = [f"s/{i:07d}" for i in range(args.rows)]
        src = pa.table({"sample_id": ids, "content_digest": [content_digest(i) for i in ids]})
        v = store.append("bench/src", src)
        ref = OutputRef("table", "bench/src", store.uri("bench/src"), version=v)
        print(f"{args.rows} rows x {args.payload_kb} KB, batch {args.batch}, chunk "
              f"{args.chunk}, cluster {cluster}")
        print(f"{'mode':<16}{'pool':>5}{'rows/s':>10}{'driver B/row':>14}")
        table: dict[tuple[str, int], tuple[float, float]] = {}
        for w in args.workers:
            for mode, kind in (("driver-writes", PayloadViaDriver), ("worker-writes", Payload)):
                rate, per_row, _ = run_once(kind, store, ref, f"{mode[0]}{w}", w,
                                            args.payload_kb, args.batch, args.chunk, cluster)
                table[(mode, w)] = (rate, per_row)
                print(f"{mode:<16}{w:>5}{rate:>10.1f}{per_row:>14.0f}")
        for w in args.workers:
            (r0, b0), (r1, b1) = table[("driver-writes", w)], table[("worker-writes", w)]
            print(f"pool {w}: worker/driver rows/s ratio {r1 / r0:.2f}; driver bytes per row "
                  f"{b1:.0f} vs {b0:.0f} ({b0 / max(b1, 1):.0f}x fewer); goal <= 1024 B/row: "
                  f"{'met' if b1 <= 1024 else 'NOT met'}")
        if len(args.workers) > 1:
            lo, hi = min(args.workers), max(args.workers)
            print(f"worker-writes rows/s, pool {hi} / pool {lo}: "
                  f"{table[('worker-writes', hi)][0] / table[('worker-writes', lo)][0]:.2f}")


if __name__ == "__main__":
    main()
