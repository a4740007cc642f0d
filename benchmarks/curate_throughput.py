"""Curation throughput: samples/s of ``curate.pancap`` and ``curate.vicas`` on Ray Data against a
plain single-process loop of the same reader (+ the same per-sample hashing) over the same files.

    .venv/bin/python benchmarks/curate_throughput.py [--pancap 64] [--vicas 4] [--scale 4]

Both are measured in this run, at two sizes; the stage time includes everything a user waits
for after planning (actor start-up, reads, validation, commits). The steady-state rate is the
marginal one between the two sizes, which cancels fixed start-up. Ratio = stage / loop.
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
    ap.add_argument("--pancap", type=int, default=64, help="PanCap images (small run)")
    ap.add_argument("--vicas", type=int, default=4, help="ViCaS videos (small run)")
    ap.add_argument("--scale", type=int, default=4, help="large run = scale x small run")
    args = ap.parse_args()

    from pipelines.stages.curate import (CuratePanCap, CuratePanCapConfig, CurateViCaS,
                                         CurateViCaSConfig)
    from vgen_core.data import TableStore
    from vgen_core.formats.pancap import list_pancap, read_pancap_sample
    from vgen_core.formats.pancap_samples import write_pancap_sample_dataset
    from vgen_core.formats.vicas import list_vicas, read_vicas_sample
    from vgen_core.formats.vicas_samples import write_vicas_sample_dataset

    tmp = tempfile.mkdtemp(prefix="vgen-curate-bench-")
    store = TableStore(os.path.join(tmp, "store"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(f"CPUs: {os.cpu_count()}  (actor pool: CPUs - 1 actors, one CPU kept for reads)")
    print("total = first sample to last commit, start-up included; steady = marginal rate "
          "between the small and the large run, (n_large - n_small) / (t_large - t_small)")
    print(f"{'stage':<14} {'n':>9} {'loop/s':>8} {'stage/s':>8} {'ratio':>6} "
          f"{'steady loop/s':>14} {'steady stage/s':>15} {'ratio':>6}")

    def pancap(n):
        root = str(write_pancap_sample_dataset(os.path.join(tmp, f"pancap{n}"), n_images=n))
        return (CuratePanCap, CuratePanCapConfig(root=root), lambda: list_pancap(root),
                read_pancap_sample, lambda r: r["image"])

    def vicas(n):
        root = os.path.join(tmp, f"vicas{n}")
        write_vicas_sample_dataset(root, n_videos=n)
        return (CurateViCaS, CurateViCaSConfig(root=root, version="v1.0"),
                lambda: list_vicas(root, version="v1.0"), read_vicas_sample,
                lambda r: (r.get("frames") or [None])[0])

    for name, make, small in (("curate.pancap", pancap, args.pancap),
                              ("curate.vicas", vicas, args.vicas)):
        res = {}
        for n in (small, small * args.scale):
            kind, cfg, list_fn, read_fn, first = make(n)
            n_loop, t_loop = _loop(list_fn, read_fn, first)
            n_st, t_st = _stage(kind, cfg, store, f"{name.replace('.', '_')}_{n}")
            res[n] = (n_loop, t_loop, n_st, t_st)
        (a_n, a_tl, _, a_ts), (b_n, b_tl, _, b_ts) = res[small], res[small * args.scale]
        steady_loop = (b_n - a_n) / max(b_tl - a_tl, 1e-9)
        steady_stage = (b_n - a_n) / max(b_ts - a_ts, 1e-9)
        print(f"{name:<14} {a_n:>4}/{b_n:<4} {b_n / b_tl:>8.1f} {b_n / b_ts:>8.1f} "
              f"{(b_n / b_ts) / (b_n / b_tl):>6.2f} {steady_loop:>14.1f} {steady_stage:>15.1f} "
              f"{steady_stage / steady_loop:>6.2f}")


if __name__ == "__main__":
    main()
