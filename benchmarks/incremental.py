"""Incremental re-runs: wall time of `vgen run` on ingest.images -> tokenize.fsq after 1% of the
source images changed and after nothing changed, against the full first run (same invocation).

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/incremental.py [--n 2000] [--size 40]
        [--peer hf] [--embedded-ray]

``--n`` source PNGs in 10 class folders (the ImageFolder layout of
tests/e2e/test_tokenize_incremental.py), one 32 px crop each, tokenized by the tiny binary-FSQ
tokenizer (crop + flip). Every run is the CLI as a user runs it (`python -m pipelines.cli run`,
a fresh process) against a `ray start --head` cluster this script starts and stops, its workers
at this process's niceness (or the one ``RAY_ADDRESS`` / ``--address`` names), with one MLflow
database for all runs (created by an untimed warm-up run, so no timed run pays for its
migrations). Per-stage times are in the logs under ``--workdir``.

Timed: **full** (empty storage), **1%** (1% of the files rewritten with inverted pixels) and
**no-op** (nothing changed). The fixed start-up is measured on the same DAG over a
``--small``-image folder, before and after the big runs (the mean is used; load drifts):
**start-up (compute)** = a re-run there with one changed image (process start, imports,
planning, Ray connection, two actor pools, model load, commits) and **start-up (no-op)** = a
no-op run there; `vgen plan` of the up-to-date big DAG is printed too. Each run's line shows
the DAG time `vgen run` reports and per-stage times; the rest of the wall time is process
start-up (imports) and the wait for the tracking process (MLflow) at the end.

**The peer side by side** (``--peer hf``): Hugging Face ``datasets`` on the same images and the
same tokenizer (binary-FSQ tiny, seed 0, the image and its flip, preprocessed to 32 px as the
tokenize stage does): ``load_dataset("imagefolder")`` + ``.map`` (batched, in one process) with
its cache files, each run a fresh process as the vgen runs are. Timed: its first run (encodes
every image), a re-run with nothing changed (the cache must answer: 0 encoder calls) and a
re-run after the same 1% change as vgen's: ``datasets`` fingerprints local files by mtime, so the
changed files make a new dataset fingerprint, which misses every cached ``.map`` result, and it
re-encodes every image (the encoder calls are counted and printed). Printed beside vgen's 1%
re-run (which tokenizes exactly the changed 1%), with the ratio vgen / peer (the issue's goal:
<= 1 at 2,000 images, <= 0.3 at 10,000). ``datasets`` is an optional benchmark dependency:
``pip install 'vgen[bench]'`` (or ``pip install datasets``). ``--embedded-ray`` runs vgen as a
laptop user does, each run starting its own embedded Ray (``RAY_ADDRESS`` unset), instead of on
the cluster this script starts.

Ratios, raw and with the start-up taken out of both sides:
  1%/full     = t_1% / t_full     and (t_1% - su_compute) / (t_full - su_compute)  goal <= 0.05
  no-op/full  = t_noop / t_full   and (t_noop - su_noop) / (t_full - su_compute)   goal <= 0.02
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10


def write_sources(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` random crops of the skimage photos as ``size``-px PNGs in class folders."""
    from vgen_core.data.sample_images import PHOTOS, load_photo

    photos = [load_photo(p) for p in PHOTOS]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rgb = photos[i % len(photos)]
        h, w = rgb.shape[:2]
        s = int(min(h, w) * 0.5)
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        cls = folder / f"class{i % CLASSES}"
        cls.mkdir(parents=True, exist_ok=True)
        p = cls / f"src{i:06d}.png"
        Image.fromarray(rgb[y:y + s, x:x + s]).resize((size, size)).save(p)
        paths.append(p)
    return paths


def change(paths: list[Path]) -> None:
    """Rewrite each file with inverted pixels (new bytes, size and mtime: a changed sample)."""
    for p in paths:
        Image.fromarray(255 - np.asarray(Image.open(p).convert("RGB"))).save(p)


def make_dag(path: Path, name: str, images: Path, batch_size: int) -> Path:
    dag = {"name": name, "error_budget": 0.0, "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": str(images), "crops_per_image": 1, "size": 32,
                            "min_scale": 0.9, "max_scale": 0.9}},
        "tokens": {"uses": "tokenize.fsq", "needs": ["images"],
                   "with": {"size": "tiny", "init_seed": 0, "flip": True},
                   "resources": {"batch_size": batch_size}},
    }}
    path.write_text(yaml.safe_dump(dag))
    return path


class RayHead:
    """``ray start --head --block`` in its own process group, stopped by signalling that group
    (other Ray instances on the machine are left alone); as tests/conftest.py does."""

    def __init__(self, temp: Path, num_cpus: int, worker_niceness: int):
        self.temp, self.num_cpus, self.niceness = temp, num_cpus, worker_niceness

    def __enter__(self) -> str:
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.temp.mkdir(parents=True, exist_ok=True)
        self.log = open(self.temp / "ray-start.log", "w")
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
             "--include-dashboard=false", f"--temp-dir={self.temp}", "--disable-usage-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, RAY_worker_niceness=str(self.niceness)))
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 180
        while subprocess.run([ray_bin, "status", f"--address={address}"], capture_output=True,
                             timeout=120).returncode:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray start failed: "
                                   + (self.temp / "ray-start.log").read_text()[-3000:])
            time.sleep(1)
        return address

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def vgen(args: list[str], env: dict, log: Path) -> tuple[float, str]:
    """Run the CLI; returns (wall seconds, stdout + stderr). Raises with the log tail on
    failure."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    dt = time.perf_counter() - t0
    log.write_text(f"$ vgen {' '.join(args)}\n{p.stdout}\n--- stderr ---\n{p.stderr}")
    if p.returncode:
        raise RuntimeError(f"vgen {args[0]} failed ({p.returncode}); see {log}:\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return dt, p.stdout + p.stderr


def breakdown(output: str) -> str:
    """'DAG 12.3s; images ran 4.5s processed=.. skipped=..; tokens ..' from a run's output (the
    rest of the wall time is process start-up, imports and MLflow)."""
    dag = re.search(r"^DAG '.*' finished in ([\d.]+)s", output, re.M)
    secs = dict(re.findall(r"^\[(\w+)\] done in ([\d.]+)s", output, re.M))
    parts = [f"DAG {dag[1]}s" if dag else "DAG ?"]
    for m in re.finditer(r"^(images|tokens)\s+(\w+)\s+(\d+)\s+(\d+)", output, re.M):
        t = f" {secs[m[1]]}s" if m[1] in secs else ""
        parts.append(f"{m[1]} {m[2]}{t} processed={m[3]} skipped={m[4]}")
    return "; ".join(parts)


# -- the peer: Hugging Face datasets ---------------------------------------------------------
PEER_INSTALL = ("--peer hf needs Hugging Face datasets, an optional benchmark dependency: "
                "pip install 'vgen[bench]'  (or: .venv/bin/pip install datasets)")
_PEER: dict = {}  # the tokenizer stage of a peer process, built once (peer_run)


def peer_encode(batch: dict, calls_log: str) -> dict:
    """``.map`` body of the peer: the tokenize.fsq stage's preprocessing (32 px, shorter side +
    center crop) and encoder, on the image and its flip; appends the number of images it encoded
    to ``calls_log``. A module-level function: ``datasets`` hashes it by reference (module +
    name), so its fingerprint, and the cache, are stable across runs."""
    import torch

    from vgen_core.data.images import preprocess

    stage = _PEER["stage"]
    pixels = np.stack([preprocess(np.asarray(im.convert("RGB")), 32) for im in batch["image"]])
    with torch.inference_mode():
        outs = [stage.encode(stage.to_model(torch.from_numpy(np.ascontiguousarray(v))))
                for v in (pixels, pixels[:, :, ::-1])]
    with open(calls_log, "a") as f:
        f.write(f"{len(pixels)}\n")
    n = len(pixels)
    return {"indices": [r for r in outs[0]["indices"].reshape(n, -1).astype(np.int32)],
            "indices_flip": [r for r in outs[1]["indices"].reshape(n, -1).astype(np.int32)]}


def peer_run(images: str, cache: str, calls_log: str, batch_size: int) -> None:
    """One run of the peer (in a fresh process: ``python -c``, importing this module):
    ImageFolder -> ``.map(peer_encode)`` with the ``datasets`` cache under ``cache``."""
    from datasets import load_dataset

    from pipelines.stages.base import StageContext
    from pipelines.stages.tokenize import ImageTokenizeConfig, TokenizeFSQ

    cfg = ImageTokenizeConfig(size="tiny", init_seed=0, flip=True, device="cpu")
    stage = TokenizeFSQ(cfg, StageContext(dag="peer", stage="tokens", store=None,
                                          row_fingerprint=""))
    stage.setup()
    _PEER["stage"] = stage
    ds = load_dataset("imagefolder", data_dir=images, cache_dir=cache, split="train")
    out = ds.map(peer_encode, batched=True, batch_size=batch_size, remove_columns=["image"],
                 fn_kwargs={"calls_log": calls_log})
    print(f"peer: {out.num_rows} rows, columns {out.column_names}")


def peer(work: Path, images: Path, tag: str, batch_size: int) -> tuple[float, int]:
    """Run the peer once in a fresh process; returns (wall seconds, encoder calls: images
    encoded)."""
    calls = work / "peer_calls.txt"  # one path: it is a .map argument, part of the cache key
    calls.write_text("")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import incremental; "
            f"incremental.peer_run({str(images)!r}, {str(work / 'hf_cache')!r}, "
            f"{str(calls)!r}, {batch_size})")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=3600)
    dt = time.perf_counter() - t0
    (work / "logs" / f"peer_{tag}.log").write_text(f"{p.stdout}\n--- stderr ---\n{p.stderr}")
    if p.returncode:
        raise RuntimeError(f"peer run '{tag}' failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt, sum(int(x) for x in calls.read_text().split())


def processed(output: str, stage: str) -> int | None:
    """Rows the run's final table says ``stage`` processed."""
    m = re.search(rf"^{stage}\s+\w+\s+(\d+)\s+\d+", output, re.M)
    return int(m[1]) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--n", "--images", dest="n", type=int, default=2000,
                    help="source images of the timed DAG")
    ap.add_argument("--size", type=int, default=40, help="source image side (px)")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of files to change")
    ap.add_argument("--small", type=int, default=20, help="images of the start-up DAG")
    ap.add_argument("--batch-size", type=int, default=32, help="tokenize resources.batch_size")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2,
                    help="CPUs of the Ray head this script starts")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="use this Ray cluster instead of starting one (env RAY_ADDRESS)")
    ap.add_argument("--worker-niceness", type=int, default=os.nice(0),
                    help="niceness of the Ray workers of the cluster this script starts "
                         "(RAY_worker_niceness; Ray's default is 15). Default: this process's, "
                         "so the Ray runs and the no-op runs compete equally with other load")
    ap.add_argument("--workdir", default=None, help="default: a fresh temp dir (removed)")
    ap.add_argument("--peer", choices=["hf"], default=None,
                    help="also run the peer on the same images: hf = Hugging Face datasets "
                         "(load_dataset imagefolder + .map with its cache)")
    ap.add_argument("--peer-batch-size", type=int, default=32, help="the peer's .map batch")
    ap.add_argument("--embedded-ray", action="store_true",
                    help="every vgen run starts its own embedded Ray (as `vgen run` on a laptop) "
                         "instead of connecting to a cluster this script starts")
    args = ap.parse_args()
    if args.peer == "hf":
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            sys.exit(PEER_INSTALL)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vgen-incr-bench-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    big_src = write_sources(work / "images", args.n, args.size)
    small_src = write_sources(work / "images_small", args.small, args.size, seed=1)
    big = make_dag(work / "big.yaml", "incr", work / "images", args.batch_size)
    small = make_dag(work / "small.yaml", "incr_small", work / "images_small", args.batch_size)
    tracking = f"sqlite:///{work}/mlflow.db"

    def run(dag: Path, store: str, tag: str, cmd: str = "run") -> tuple[float, str]:
        a = [cmd, str(dag), "--storage", str(work / store), "--tracking-uri", tracking]
        return vgen(a, env, logs / f"{tag}.log")

    head = (RayHead(work / "ray", args.num_cpus, args.worker_niceness)
            if not (args.address or args.embedded_ray) else None)
    address = head.__enter__() if head else args.address
    env = dict(os.environ)
    if args.embedded_ray:
        env.pop("RAY_ADDRESS", None)
        address = "embedded (a new Ray in every run)"
    else:
        env["RAY_ADDRESS"] = address
    print(f"{args.n} source images ({args.size}px, {CLASSES} class folders) -> ingest.images "
          f"(32px crop) -> tokenize.fsq tiny (+flip); Ray at {address}; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)

    def startup(tag: str, image: int) -> tuple[float, float]:
        """(compute, no-op) start-up on the small DAG: one changed image, then nothing."""
        change(small_src[image:image + 1])  # a new image each time: never a digest seen before
        su_c, out = run(small, "store_small", f"startup_compute_{tag}")
        su_n, _ = run(small, "store_small", f"startup_noop_{tag}")
        print(f"start-up ({tag:<6}): compute {su_c:5.1f} s ({breakdown(out)}); no-op "
              f"{su_n:5.1f} s", flush=True)
        return su_c, su_n

    try:
        run(small, "store_small", "warmup")  # untimed: MLflow DB, caches
        before = startup("before", 0)
        full, out = run(big, "store", "full")
        print(f"full run        : {full:6.1f} s  ({breakdown(out)})", flush=True)
        if args.peer:
            p_full, c_full = peer(work, work / "images", "full", args.peer_batch_size)
            print(f"peer hf, first  : {p_full:6.1f} s  ({c_full} encoder calls)", flush=True)
            p_noop, c_noop = peer(work, work / "images", "noop", args.peer_batch_size)
            print(f"peer hf, no-op  : {p_noop:6.1f} s  ({c_noop} encoder calls: its cache)",
                  flush=True)
        k = max(1, round(args.n * args.changed))
        change(big_src[::max(1, args.n // k)][:k])
        part, out = run(big, "store", "rerun_changed")
        part_tokens = processed(out, "tokens")
        print(f"{k / args.n:<4.0%} changed re-run: {part:6.1f} s  ({breakdown(out)})",
              flush=True)
        if args.peer:
            p_part, c_part = peer(work, work / "images", "changed", args.peer_batch_size)
            print(f"peer hf, {k / args.n:.0%} re-run: {p_part:6.1f} s  ({c_part} encoder calls "
                  f"of {args.n} images)", flush=True)
        noop, out = run(big, "store", "rerun_noop")
        print(f"no-op re-run    : {noop:6.1f} s  ({breakdown(out)})", flush=True)
        plan, _ = run(big, "store", "plan", cmd="plan")
        print(f"vgen plan       : {plan:6.1f} s  (the up-to-date big DAG)", flush=True)
        after = startup("after", 1)
    finally:
        if head:
            head.__exit__(None, None, None)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)

    # start-up: the mean of the measurements before and after the big runs (load drifts)
    su_compute, su_noop = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    net = full - su_compute
    r_part, r_noop = part / full, noop / full
    if net > 0:
        r_part_net, r_noop_net = f"{(part - su_compute) / net:.3f}", f"{(noop - su_noop) / net:.3f}"
    else:  # the start-up is the whole full run: no net figure
        r_part_net = r_noop_net = "n/a"
        print(f"the full run ({full:.1f}s) took no longer than the start-up ({su_compute:.1f}s): "
              "no net ratios; raise --n", flush=True)
    print(f"{k / args.n:.0%}-rerun/full: {r_part:.3f} raw, {r_part_net} without start-up "
          f"(goal <= 0.05)")
    print(f"no-op/full : {r_noop:.3f} raw, {r_noop_net} without start-up (goal <= 0.02)")
    if args.peer:
        import datasets

        print(f"peer side by side ({args.n} images, {k / args.n:.0%} changed; vgen "
              f"{'embedded Ray' if args.embedded_ray else 'on a running Ray'}, datasets "
              f"{datasets.__version__} in one process): vgen re-run {part:.1f} s "
              f"({part_tokens} re-tokenized) vs peer {p_part:.1f} s ({c_part} re-encoded); "
              f"vgen/peer {part / p_part:.2f} (goal <= 1 at 2,000 images, <= 0.3 at 10,000); "
              f"first runs: vgen {full:.1f} s, peer {p_full:.1f} s; no-op: vgen {noop:.1f} s, "
              f"peer {p_noop:.1f} s ({c_noop} encoded); load average now "
              f"{os.getloadavg()[0]:.1f} (single runs: other load moves them)")
    print(f"SUMMARY incremental n={args.n}: full {full:.1f}s, {k / args.n:.0%}-changed "
          f"{part:.1f}s, no-op {noop:.1f}s, start-up {su_compute:.1f}s (compute) / "
          f"{su_noop:.1f}s (no-op) / {plan:.1f}s (plan); rerun/full {r_part:.3f} raw "
          f"{r_part_net} net (goal <= 0.05); noop/full {r_noop:.3f} raw {r_noop_net} net "
          f"(goal <= 0.02)")

if __name__ == "__main__":
    main()
