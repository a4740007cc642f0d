"""Feature-extraction throughput of the evaluate stage: steady images/s of the reference-feature
pass of ``evaluate.generation`` on Ray Data against a plain PyTorch loop, measured in this run.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/eval_features.py \\
        [--extractor inception|tiny] [--n 192] [--source-size 96] [--resolution 64] \\
        [--batch-size 16] [--cpus N] [--repeats 2]

A curated IMAGE_SAMPLES Delta table of ``--n`` random crops of the scikit-image photos is written
to a temp dir. Then, per repeat:

* **stage**: ``EvaluateGeneration._extract_reference`` as the stage runs it on a cache miss:
  ``ray.data.read_delta`` -> actor pool of ``_ReferenceActor`` (decode, center crop, extractor
  forward; sized by ``ray_exec.pool_size``) -> streaming merge into float64 ``FeatureStats`` on
  the driver. Steady rate = rows between the first and the last batch the driver merged / the
  time between them (actor start-up and weight loading excluded).
* **loop**: one process reads the same table (deltalake batches of ``--batch-size``), decodes,
  crops, runs the same extractor and merges into ``FeatureStats``, serially.

``--extractor inception`` is the standard FID InceptionV3 (pytorch-fid key names, 299 px
resize inside) with random weights written to a temp file: the throughput of the real network,
not meaningful features. ``tiny`` is the built-in tiny conv extractor. The loop gets
``torch.set_num_threads(pool x threads per actor)``, the compute threads the stage's actors have.
Prints stage/loop (goal >= 0.9 at steady state).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenize_throughput import actor_threads, steady_rate, write_curated


def random_inception_weights(path: str) -> str:
    """A pytorch-fid-format state dict of the FID InceptionV3 with seeded random weights."""
    import torch

    from vgen_core.eval.extractors import _FIDInceptionV3

    torch.manual_seed(0)
    torch.save(_FIDInceptionV3().state_dict(), path)
    return path


def make_stage(store: Any, ref: Any, weights: str | None, resources: Any,
               cluster: dict[str, float]) -> Any:
    from pipelines.stages.base import StageContext
    from pipelines.stages.evaluate_generation import EvaluateGeneration

    cfg = EvaluateGeneration.Config(extractor_weights=weights, device="cpu")
    ctx = StageContext(dag="bench", stage="eval", store=store, row_fingerprint="bench",
                       inputs={"images": {"samples": ref}}, resources=resources,
                       cluster=cluster)
    return EvaluateGeneration(cfg, ctx)


def run_stage(stage: Any, ref: Any, resolution: int) -> tuple[float, float, int]:
    """(steady images/s, images/s incl. start-up, images) of one reference-feature pass."""
    from vgen_core.eval.reference import ReferenceKey, keys_digest

    marks: list[tuple[float, int]] = []
    inner = stage._map

    def timed(*args: Any, **kw: Any):
        n = 0
        for b in inner(*args, **kw):
            n += b.num_rows
            yield b
            marks.append((time.perf_counter(), n))

    stage._map = timed
    store = stage.ctx.store
    keys = store.read(ref.name, version=ref.version, columns=["sample_id", "content_digest"])
    key = ReferenceKey(ref.uri, int(ref.version), stage.extractor_name(), resolution)
    t0 = time.perf_counter()
    stats = stage._extract_reference(key, stage.extractor_spec(), ref, keys_digest(keys))
    total = time.perf_counter() - t0
    return steady_rate(marks), stats.pool.count / total, stats.pool.count


def plain_loop(extractor: Any, name: str, store: Any, ref: Any, resolution: int,
               batch_size: int) -> float:
    import torch
    from deltalake import DeltaTable

    from vgen_core.data.images import decode_image, preprocess
    from vgen_core.eval.fid import FeatureStats

    ds = DeltaTable(ref.uri, version=ref.version).to_pyarrow_dataset()
    stats, marks, n = None, [], 0
    with torch.inference_mode():
        for rb in ds.to_batches(columns=["sample_id", "image_png"], batch_size=batch_size):
            imgs = np.stack([preprocess(decode_image(b), resolution)
                             for b in rb.column("image_png").to_pylist()])
            f = extractor(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
            x = f.pool_BD.double().numpy()
            stats = stats or FeatureStats(x.shape[1], name)
            stats.update(x)
            n += rb.num_rows
            marks.append((time.perf_counter(), n))
    return steady_rate(marks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--extractor", default="inception", choices=["inception", "tiny"])
    ap.add_argument("--n", type=int, default=192, help="images per measurement")
    ap.add_argument("--source-size", type=int, default=96, help="side of the curated PNGs")
    ap.add_argument("--resolution", type=int, default=64, help="center-crop size")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many per method")
    args = ap.parse_args()

    import ray
    import torch

    from pipelines.dag.ray_exec import actor_cpus, pool_size
    from pipelines.dag.spec import ResourcesSpec
    from pipelines.stages.evaluate_generation import build_extractor
    from vgen_core.data import TableStore

    tmp = tempfile.mkdtemp(prefix="vgen-eval-bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    weights = (random_inception_weights(os.path.join(tmp, "pt_inception-random.pth"))
               if args.extractor == "inception" else None)
    store = TableStore(os.path.join(tmp, "store"))
    ref = write_curated(store, "bench/images", args.n, args.source_size)

    os.environ["RAY_worker_niceness"] = str(os.nice(0))
    ray.init(address="local", num_cpus=args.cpus, num_gpus=0, include_dashboard=False,
             log_to_driver=False)
    cluster = {"CPU": float(args.cpus), "GPU": 0.0}
    resources = ResourcesSpec(cpus=1.0, workers=max(1, args.cpus - 1),
                              batch_size=args.batch_size)
    pool, per_actor = pool_size(resources, cluster), actor_cpus(resources, cluster)
    per_thread, _ = actor_threads(per_actor, None)
    torch.set_num_threads(pool * per_thread)
    stage = make_stage(store, ref, weights, resources, cluster)
    extractor = build_extractor(stage.extractor_spec(), tmp, torch.device("cpu"))
    print(f"extractor {stage.extractor_name()} ({args.extractor}), n={args.n}, "
          f"{args.source_size}px PNGs cropped to {args.resolution}, batch {args.batch_size}; "
          f"Ray {args.cpus} CPUs, actor pool {pool} x {per_actor:g} CPU, loop threads "
          f"{pool * per_thread}; load average {os.getloadavg()[0]:.1f}", flush=True)
    best = {"stage": 0.0, "loop": 0.0}
    for r in range(args.repeats):
        st, st_total, n = run_stage(make_stage(store, ref, weights, resources, cluster), ref,
                                    args.resolution)
        assert n == args.n, (n, args.n)
        lp = plain_loop(extractor, stage.extractor_name(), store, ref, args.resolution,
                        args.batch_size)
        print(f"repeat {r}: stage {st:7.2f} img/s (steady; {st_total:.2f} incl. start-up)  "
              f"loop {lp:7.2f}  load {os.getloadavg()[0]:.1f}", flush=True)
        best["stage"], best["loop"] = max(best["stage"], st), max(best["loop"], lp)
    ray.shutdown()
    s, lp = best["stage"], best["loop"]
    print(f"SUMMARY eval_features {stage.extractor_name()} n={args.n}: stage {s:.2f} img/s, "
          f"loop {lp:.2f} img/s; stage/loop {s / lp:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
