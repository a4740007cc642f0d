"""Tokenize memory: peak memory of a tokenize stage run over N and over 10 x N samples; a
streaming stage's peak does not grow with the input.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/tokenize_memory.py \\
        [--n 400] [--scale 10] [--source-size 128] [--executor ray|inprocess] [--metric rss]

Two curated IMAGE_SAMPLES tables (N and scale x N random ``--source-size`` px crops of the
skimage photos, PNG) are written first; then each size runs in a fresh child process (same
start state): ``ray.init(num_cpus=--cpus)`` (or no Ray with ``--executor inprocess``, the
unit-test executor, on one torch thread as a 1-CPU actor has), the idle process tree is sampled,
and the stage (``--kind``, tiny model at
``--resolution``, crop + flip) runs through ``MapStage.run`` while a thread sums the memory of
the driver and every descendant (raylet, GCS, Ray workers) every ``--interval`` s with psutil.
``--metric pss`` counts pages shared between processes (Ray's object store) once instead of
once per process that touched them.

Printed per size: peak of the tree, its increase over the idle tree, and the peaks of the
driver and of the Ray workers (every ``ray::*`` / default_worker process: actors, read tasks,
idle workers, agents). Ratio = peak(scale x N) / peak(N), goal <= 1.3 (streaming: the
input is never materialised in one place); the ratio of the increases is printed too (the
stricter number: it leaves out the fixed ~1 GB of Ray and torch).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenize_throughput import TreeSampler, make_stage, write_curated

MB = 1 << 20


def child(args: argparse.Namespace) -> None:
    """One measurement; prints ``RESULT {json}``."""
    from pipelines.dag.spec import ResourcesSpec
    from pipelines.stages import get_kind
    from pipelines.stages.base import InProcessExecutor, OutputRef
    from vgen_core.data import TableStore

    store = TableStore(args.store)
    ref = OutputRef("table", args.table, store.uri(args.table), version=store.version(args.table))
    cfg = get_kind(args.kind).Config(size="tiny", resolution=args.resolution, device="cpu")
    cluster = {"CPU": float(args.cpus), "GPU": 0.0}
    resources = ResourcesSpec(workers=max(1, args.cpus - 1), batch_size=args.batch_size)
    if args.executor == "ray":
        import ray

        from pipelines.dag.ray_exec import RayDataExecutor

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                 log_to_driver=False)
        executor = RayDataExecutor(cluster)
        time.sleep(2.0)  # let the prestarted idle workers settle before the idle sample
    else:  # one intra-op thread, as a 1-CPU actor gets (OMP_NUM_THREADS=1)
        import torch

        torch.set_num_threads(max(1, int(resources.cpus)))
        executor = InProcessExecutor()
    stage = make_stage(args.kind, cfg, store, ref, resources, cluster,
                       chunk_size=args.chunk_size)
    t0 = time.perf_counter()
    with TreeSampler(args.interval, args.metric) as tree:
        result = stage.run(executor)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "n": result.counts.processed, "seconds": seconds, "base": tree.base, "peak": tree.peak,
        "driver": tree.peak_by_group.get("driver", 0),
        "workers": tree.peak_by_group.get("ray workers", 0),
        "samples": tree.samples}), flush=True)


def measure(args: argparse.Namespace, store: str, table: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--store", store, "--table", table]
    for k in ("kind", "resolution", "batch_size", "chunk_size", "cpus", "executor", "metric",
              "interval"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"measurement of {table} failed ({p.returncode}):\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--n", type=int, default=400, help="samples of the small run")
    ap.add_argument("--scale", type=int, default=10, help="large run = scale x n")
    ap.add_argument("--source-size", type=int, default=128, help="side of the curated PNGs")
    ap.add_argument("--kind", default="tokenize.fsq",
                    choices=["tokenize.fsq", "tokenize.titok"], help="tiny size")
    ap.add_argument("--resolution", type=int, default=32, help="crop size (tiny models: 32)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=256, help="rows per Delta commit")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--executor", default="ray", choices=["ray", "inprocess"])
    ap.add_argument("--metric", default="rss", choices=["rss", "pss", "uss"])
    ap.add_argument("--interval", type=float, default=0.2, help="sampling period (s)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--table", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from vgen_core.data import TableStore

    tmp = tempfile.mkdtemp(prefix="vgen-tok-mem-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    root = os.path.join(tmp, "store")
    store = TableStore(root)
    sizes = (args.n, args.n * args.scale)
    for n in sizes:
        write_curated(store, f"bench/images{n}", n, args.source_size)
    mb_in = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                os.walk(store.path("tables", "bench", f"images{sizes[1]}")) for f in fs) / MB
    print(f"{args.kind} tiny @ {args.resolution}px (+flip) from {args.source_size}px PNGs; "
          f"executor {args.executor}; {args.cpus} CPUs; metric {args.metric} of driver + "
          f"descendants every {args.interval}s; input of the large run {mb_in:.0f} MB; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    res = {}
    for n in sizes:
        r = res[n] = measure(args, root, f"bench/images{n}")
        print(f"n={n:>6}: peak {r['peak'] / MB:7.0f} MB  (idle {r['base'] / MB:5.0f}, "
              f"+{(r['peak'] - r['base']) / MB:5.0f})  driver {r['driver'] / MB:5.0f} MB  "
              f"ray workers {r['workers'] / MB:5.0f} MB  {r['n']} rows in {r['seconds']:.1f}s "
              f"({r['samples']} samples)", flush=True)
    a, b = res[sizes[0]], res[sizes[1]]
    ratio = b["peak"] / a["peak"]
    inc = (b["peak"] - b["base"]) / max(a["peak"] - a["base"], 1)
    drv = b["driver"] / max(a["driver"], 1)
    print(f"SUMMARY tokenize_memory {args.executor} n={sizes[0]}/{sizes[1]}: peak "
          f"{a['peak'] / MB:.0f} -> {b['peak'] / MB:.0f} MB, ratio {ratio:.2f} (goal <= 1.3); "
          f"increase over idle ratio {inc:.2f}; driver ratio {drv:.2f}")


if __name__ == "__main__":
    main()
