"""Curation throughput: samples/s of ``curate.pancap`` and ``curate.vicas`` on Ray Data against a
plain single-process loop of the same reader (+ the same per-sample hashing) over the same files.

    .venv/bin/python benchmarks/curate_throughput.py [--pancap 48] [--vicas 8]

Both are measured in this run; the stage time includes everything a user waits for after
planning (actor start-up, reads, validation, commits). A second stage run on a fresh table with
the actor code already imported gives the warm figure. Ratio = stage samples/s / loop samples/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray


def _loop(list_fn, read_fn, first_image) -> tuple[int, float]:
    from vgen_core.data.phash import dhash
    from pipelines.stages.curate import _decode_rgb

    t0 = time.perf_counter()
    items = list_fn()
    n = 0
    for it in items:
        row = read_fn(it)
        img = first_image(row)
        if img is not None:
            dhash(_decode_rgb(img))
        n += 1
    return n, time.perf_counter() - t0


def _stage(kind_cls, cfg, store, name: str) -> tuple[int, float]:
    from pipelines.dag.ray_exec import RayDataExecutor, cluster_resources
    from pipelines.dag.spec import ResourcesSpec
    from pipelines.stages.base import StageContext

    cluster = cluster_resources()
    ctx = StageContext(dag="bench", stage=name, store=store, row_fingerprint="bench",
                       resources=ResourcesSpec(workers=max(1, int(cluster["CPU"]) - 1),
                                               batch_size=4),
                       error_budget=1.0, chunk_size=64, cluster=cluster)
    stage = kind_cls(cfg, ctx)
    t0 = time.perf_counter()
    result = stage.run(RayDataExecutor(cluster))
    return result.counts.processed, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pancap", type=int, default=48, help="PanCap images to generate")
    ap.add_argument("--vicas", type=int, default=8, help="ViCaS videos to generate")
    args = ap.parse_args()

    from pipelines.stages.curate import (CuratePanCap, CuratePanCapConfig, CurateViCaS,
                                         CurateViCaSConfig)
    from vgen_core.data import TableStore
    from vgen_core.formats.pancap import list_pancap, read_pancap_sample
    from vgen_core.formats.pancap_samples import write_pancap_sample_dataset
    from vgen_core.formats.vicas import list_vicas, read_vicas_sample
    from vgen_core.formats.vicas_samples import write_vicas_sample_dataset

    tmp = tempfile.mkdtemp(prefix="vgen-curate-bench-")
    pancap_root = write_pancap_sample_dataset(os.path.join(tmp, "pancap"), n_images=args.pancap)
    vicas_root = os.path.join(tmp, "vicas")
    write_vicas_sample_dataset(vicas_root, n_videos=args.vicas)
    store = TableStore(os.path.join(tmp, "store"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(f"CPUs: {os.cpu_count()}  (Ray actor pool: CPUs - 1 actors, one CPU kept for reads)")
    cases = [
        ("curate.pancap", CuratePanCap, CuratePanCapConfig(root=str(pancap_root)),
         lambda: list_pancap(str(pancap_root)), read_pancap_sample, lambda r: r["image"]),
        ("curate.vicas", CurateViCaS, CurateViCaSConfig(root=vicas_root, version="v1.0"),
         lambda: list_vicas(vicas_root, version="v1.0"), read_vicas_sample,
         lambda r: (r.get("frames") or [None])[0]),
    ]
    print(f"{'stage':<14} {'n':>4} {'loop/s':>8} {'cold/s':>8} {'warm/s':>8} "
          f"{'cold/loop':>9} {'warm/loop':>9}")
    for name, kind, cfg, list_fn, read_fn, first in cases:
        n_loop, t_loop = _loop(list_fn, read_fn, first)
        n_cold, t_cold = _stage(kind, cfg, store, name.replace(".", "_") + "_cold")
        n_warm, t_warm = _stage(kind, cfg, store, name.replace(".", "_") + "_warm")
        loop, cold, warm = n_loop / t_loop, n_cold / t_cold, n_warm / t_warm
        print(f"{name:<14} {n_loop:>4} {loop:>8.2f} {cold:>8.2f} {warm:>8.2f} "
              f"{cold / loop:>9.2f} {warm / loop:>9.2f}")


if __name__ == "__main__":
    main()
