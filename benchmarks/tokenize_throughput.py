"""Tokenize throughput: steady-state images/s of a tokenize stage on Ray Data against a plain
PyTorch loop and against the model's forward pass alone, all measured in this run.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/tokenize_throughput.py \\
        [--kind tokenize.fsq] [--size tiny] [--overrides JSON] [--resolution 64] \\
        [--batch-size 16] [--n 2048] [--device cpu] [--repeats 2]

A curated IMAGE_SAMPLES Delta table of ``--n`` random crops of the scikit-image photos
(``--source-size`` px PNGs) is written to a temp dir; then, per repeat:

* **stage**: the real kind (``pipelines.stages``) run by ``MapStage.run`` with
  ``RayDataExecutor`` on a local ``ray.init(num_cpus=--cpus)``: Delta scan, key filter, actor
  pool (decode + preprocess + encode, flip view included), envelopes, chunked Delta commits.
  Steady rate = rows committed between the first and the last chunk commit / time between them,
  so actor start-up and model loading are excluded (rows Ray Data buffered before the first
  commit count in the window: keep ``--n`` >= ~30 chunks). Every repeat uses a new row
  fingerprint (its own side table), so nothing is skipped.
* **loop**: one process reads the same Delta table (``deltalake`` dataset, same columns and
  batch size), decodes the PNGs, preprocesses and encodes with the same model
  (``stage.setup()`` + ``stage.encode``, flip view included) serially; results are not written.
* **forward**: the same encodes on pre-decoded, pre-converted tensors (the limit).

The loop and forward get ``torch.set_num_threads(pool x threads per actor)``, the compute
threads the stage's actors have (probed with a Ray task of the actor's CPU count); the stage
also uses the one CPU ``ray_exec`` keeps free for reads and the driver's commits, which is part
of what is measured. Ray workers run at this process's niceness (``--worker-niceness``; Ray's
own default, 15, starves the actor next to the nice-0 loop on a loaded machine). Best of
``--repeats`` per method (load on a shared machine varies). Also printed: CPU ms per image by
process in the stage's steady window (the actor against the loop's own CPU per image).

Ratios: stage/loop (goal >= 1.0: the pipeline costs nothing over a hand-written loop) and
stage/forward (goal >= 0.9: decode, I/O and commits hide behind the model's compute).

**On a GPU** (``--device cuda``)::

    RAY_AUTH_MODE=disabled python benchmarks/tokenize_throughput.py --device cuda \
        [--tokenizers tokenize.lfq:maskbit-k12:256 ...] [--compile] [--encode-batch auto] \
        [--n 4096] [--json PATH]

one Ray session with one GPU; per tokenizer (default: MaskBit-12bit LFQ, TiTok-BL64 VQ, SD-VAE
f8c4 latents, all at 256 px, the models of issue #17's table) the stage runs with its real
executor on a GPU actor (``resources.gpus: 1``, so ``precision: auto`` is bf16; the actor's
``DeviceEncoder``: pinned non-blocking uploads on a side stream, GPU flip, channels-last, optional
compile). **forward** is then the same ``DeviceEncoder`` (same precision, layout, compile and
micro-batch) on uint8 images already on the GPU, synchronised once at the end: encode alone. The
summary gives stage / encode-alone (goal >= 0.9) and images/s per GPU (rows/s; each row encodes the
crop and its flip). Without Ray (``import ray`` fails) the stage runs with the in-process executor,
which decodes in series with the encode, and the output says so: its ratio is then a lower bound of
what the Ray executor gets. ``--no-loop`` skips the serial loop (on a GPU it measures one CPU's
decoding, not the model). ``--json PATH`` writes every figure for benchmarks/gpu_suite.py.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import numpy as np

#: per kind: a tiny registry size widened so compute matters on CPU, and its crop size
DEFAULTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "tokenize.fsq": ("tiny", {"image_size": 64, "enc_pos_grid": 8, "enc_width": 128,
                              "enc_heads": 2, "enc_layers": 4, "enc_mlp_dim": 512}, 64),
    "tokenize.titok": ("tiny", {"image_size": 64, "enc_width": 128, "enc_heads": 2,
                                "enc_layers": 4}, 64),
    "tokenize.lfq": ("tiny", {}, 64),
    "cache.latents": ("tiny", {}, 64),
}
#: the tokenizers of issue #17's GPU table: kind:size:resolution (each kind's default family)
GPU_TOKENIZERS = ["tokenize.lfq:maskbit-k12:256", "tokenize.titok:titok-bl64-vq:256",
                  "cache.latents:sd-vae-f8c4:256"]


def write_curated(store: Any, name: str, n: int, size: int, *, seed: int = 0,
                  rows_per_file: int = 256) -> Any:
    """An IMAGE_SAMPLES table of ``n`` random ``size``-px crops of the skimage photos, written in
    commits of ``rows_per_file`` rows (several files, as ingest.images writes chunks)."""
    import pyarrow as pa
    from PIL import Image

    from pipelines.stages.base import OutputRef
    from vgen_core.data import content_digest, make_sample_id
    from vgen_core.data.sample_images import PHOTOS, encode_png, load_photo
    from vgen_core.data.schemas import IMAGE_SAMPLES

    photos = [load_photo(p) for p in PHOTOS]
    rng = np.random.default_rng(seed)
    store.create(name, IMAGE_SAMPLES)
    for start in range(0, n, rows_per_file):
        rows = []
        for i in range(start, min(n, start + rows_per_file)):
            rgb = photos[i % len(photos)]
            h, w = rgb.shape[:2]
            s = max(8, int(min(h, w) * rng.uniform(0.3, 0.9)))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            crop = np.asarray(Image.fromarray(rgb[y:y + s, x:x + s])
                              .resize((size, size), Image.BICUBIC))
            label = i % len(photos)
            rows.append({"sample_id": make_sample_id("bench", f"{i:07d}"),
                         "content_digest": content_digest(crop, label, None),
                         "source": f"skimage://{PHOTOS[label]}", "image_png": encode_png(crop),
                         "height": size, "width": size, "label": label, "caption": None})
        store.append(name, pa.Table.from_pylist(rows, schema=IMAGE_SAMPLES))
    return OutputRef("table", name, store.uri(name), version=store.version(name))


def make_stage(kind: str, cfg: Any, store: Any, ref: Any, resources: Any,
               cluster: dict[str, float], *, chunk_size: int, progress=None) -> Any:
    """The stage as the runner builds it, with a fresh row fingerprint (its own side table)."""
    from pipelines.stages import get_kind
    from pipelines.stages.base import StageContext

    ctx = StageContext(dag="bench", stage="tok", store=store, row_fingerprint=uuid.uuid4().hex,
                       inputs={"images": {"samples": ref}}, resources=resources,
                       error_budget=0.0, chunk_size=chunk_size, cluster=cluster,
                       progress=progress)
    return get_kind(kind)(cfg, ctx)


class TreeSampler:
    """Samples the process tree of this driver (Ray's raylet, GCS and workers started by
    ``ray.init`` are its descendants) every ``interval`` s in a thread: peak summed memory
    (``rss``, or ``pss``/``uss`` which do not count shared pages twice), the peak per process
    name and per group (driver / Ray workers / Ray daemons), and each process's last seen CPU
    time, so CPU used by workers that exit before the end
    is still counted."""

    def __init__(self, interval: float = 0.2, metric: str = "rss"):
        import psutil

        self.root, self.interval, self.metric = psutil.Process(), interval, metric
        self.peak, self.samples, self.cpu = 0, 0, {}
        self.names: dict[int, str] = {}
        self.peak_by_name: dict[str, int] = {}
        #: driver / ray workers (actors, tasks, idle workers, agents) / ray daemons (raylet, GCS)
        self.peak_by_group: dict[str, int] = {}
        self.history: list[tuple[float, dict[int, float]]] = []
        self._stop = None

    def _sample(self) -> int:
        import psutil

        total, by_name = 0, {}
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                with p.oneshot():
                    if self.metric == "rss":
                        mem = p.memory_info().rss
                    else:
                        mem = getattr(p.memory_full_info(), self.metric)
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    self.names[p.pid] = _short_name(p)  # a Ray worker renames itself
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += mem
            name = self.names[p.pid]
            by_name[name] = by_name.get(name, 0) + mem
        for name, mem in by_name.items():
            self.peak_by_name[name] = max(self.peak_by_name.get(name, 0), mem)
        groups: dict[str, int] = {}
        for name, mem in by_name.items():
            g = name if name == "driver" else \
                "ray workers" if name.startswith(("ray::", "ray workers")) else "ray daemons"
            groups[g] = groups.get(g, 0) + mem
        for g, mem in groups.items():
            self.peak_by_group[g] = max(self.peak_by_group.get(g, 0), mem)
        self.history.append((time.perf_counter(), dict(self.cpu)))
        return total

    def __enter__(self) -> TreeSampler:
        import threading

        self.base = self._sample()
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self._sample())
                self.samples += 1

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())

    def cpu_by_process(self, t0: float | None = None, t1: float | None = None) -> dict[str, float]:
        """CPU s per process name between the samples nearest ``t0`` and ``t1`` (default: the
        whole sampled span)."""
        hist = self.history
        a = next((h for h in hist if t0 is None or h[0] >= t0), hist[-1])[1]
        b = next((h for h in reversed(hist) if t1 is None or h[0] <= t1), hist[0])[1]
        out: dict[str, float] = {}
        for pid, t in b.items():
            name = self.names.get(pid, "?")
            out[name] = out.get(name, 0.0) + max(0.0, t - a.get(pid, 0.0))
        return out


def _short_name(p: Any) -> str:
    """driver / ray workers / ray::<Actor> / raylet / gcs_server / <script> of a process."""
    if p.pid == os.getpid():
        return "driver"
    cmd = p.cmdline()
    exe = os.path.basename(cmd[0]) if cmd else p.name()
    if exe.startswith("ray::"):
        return exe.split("(")[0].split(".")[0]  # ray::MapWorker, ray::IDLE, ray::ReadParquet..
    script = next((os.path.basename(a)[:-3] for a in cmd[1:] if a.endswith(".py")), None)
    if "python" in exe and script:
        return "ray workers" if script == "default_worker" else script
    return exe


def steady_rate(marks: list[tuple[float, int]]) -> float:
    """(time, rows done) marks -> rows/s between the first and the last mark with rows."""
    marks = [m for m in marks if m[1] > 0]
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return float("nan")
    return (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])


def run_stage(make: Any, cluster: dict[str, float] | None) -> tuple[float, float, int, dict]:
    """(steady images/s, total images/s incl. start-up, processed, {process: CPU s per image in
    the steady window}) of one stage run: with ``RayDataExecutor``, or in this process
    (``InProcessExecutor``) when ``cluster`` is None (Ray missing)."""
    marks: list[tuple[float, int]] = []
    stage = make(lambda c, total: marks.append((time.perf_counter(), c.processed)))
    if cluster is None:
        from pipelines.stages.base import InProcessExecutor

        executor: Any = InProcessExecutor()
    else:
        from pipelines.dag.ray_exec import RayDataExecutor

        executor = RayDataExecutor(cluster)
    t0 = time.perf_counter()
    with TreeSampler(0.25) as tree:
        result = stage.run(executor)
    total = time.perf_counter() - t0
    n = result.counts.processed
    if result.counts.quarantined:
        raise RuntimeError(f"{result.counts.quarantined} samples quarantined; see "
                           f"{stage.ctx.store.uri(stage.table_name('__quarantine'))}")
    busy = [m for m in marks if m[1] > 0]
    if len(busy) < 20:
        print(f"warning: only {len(busy)} commits; rows Ray Data buffered before the first one "
              "inflate the steady rate: raise --n or lower --chunk-size", flush=True)
    window = busy[-1][1] - busy[0][1] if len(busy) > 1 else n
    cpu = {k: v / max(window, 1) for k, v in
           tree.cpu_by_process(busy[0][0] if busy else None, busy[-1][0] if busy else None).items()
           if v > 0.005}
    return steady_rate(marks), n / total, n, cpu


def _encode_views(stage: Any, images_BHWC: np.ndarray, flip: bool) -> None:
    import torch

    views = [images_BHWC] + ([images_BHWC[:, :, ::-1].copy()] if flip else [])
    with torch.inference_mode():
        for v in views:
            stage.encode(stage.to_model(torch.from_numpy(v).to(stage.device)))


def plain_loop(stage: Any, ref: Any, batch_size: int, flip: bool) -> float:
    """Steady images/s of a serial read -> decode -> preprocess -> encode loop (after batch 1)."""
    from deltalake import DeltaTable

    from vgen_core.data.images import IMAGE_COLUMNS, decode_image, preprocess

    cols = stage.input_columns()
    col = next(c for c in IMAGE_COLUMNS if c in cols)
    store = stage.ctx.store
    ds = DeltaTable(ref.uri, version=ref.version,
                    storage_options=store.storage_options or None).to_pyarrow_dataset()
    marks, n = [], 0
    for rb in ds.to_batches(columns=cols, batch_size=batch_size):
        images = np.stack([preprocess(decode_image(b), stage.resolution)
                           for b in rb.column(col).to_pylist()])
        _encode_views(stage, images, flip)
        n += rb.num_rows
        marks.append((time.perf_counter(), n))
    return steady_rate(marks)


def forward_only(stage: Any, images: np.ndarray, batch_size: int, flip: bool) -> float:
    """Steady images/s of ``stage.encode`` alone on pre-decoded, pre-converted tensors (on a GPU:
    :func:`forward_only_cuda`)."""
    import torch

    if stage.device.type == "cuda":
        return forward_only_cuda(stage, images, batch_size, flip)
    batches = []
    for i in range(0, len(images), batch_size):
        v = images[i:i + batch_size]
        views = [v] + ([v[:, :, ::-1].copy()] if flip else [])
        batches.append([stage.to_model(torch.from_numpy(x).to(stage.device)) for x in views])
    marks, n = [], 0
    with torch.inference_mode():
        for xs in batches:
            for x in xs:
                stage.encode(x)  # ends in .cpu().numpy(): synchronises a GPU
            n += len(xs[0])
            marks.append((time.perf_counter(), n))
    return steady_rate(marks)


def forward_only_cuda(stage: Any, images: np.ndarray, batch_size: int, flip: bool,
                      repeats: int = 2, max_rows: int = 1024) -> float:
    """Rows/s of the stage's own ``DeviceEncoder`` compute alone: the images (the first
    ``max_rows``, whole batches) already on the GPU as uint8, per batch of ``batch_size`` rows
    the on-GPU conversion, flip and the encode in the stage's micro-batches (same precision,
    layout, compile); one synchronisation per pass; a first pass of one batch warms up (compile,
    cudnn autotuning), the best of ``repeats`` timed passes counts."""
    import torch

    enc = stage.device_encoder()
    step = enc.resolve_micro_batch(images.shape[1])
    V = 2 if flip else 1
    per_chunk = max(1, (step or batch_size * V) // V)
    rows_n = max(batch_size, min(len(images), max_rows) // batch_size * batch_size)
    dev = torch.from_numpy(images[:rows_n]).to(stage.device)
    best = 0.0
    with torch.inference_mode():
        for r in range(repeats + 1):
            part = dev[:batch_size] if r == 0 else dev
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, len(part), batch_size):
                rows = part[i:i + batch_size]
                for j in range(0, len(rows), per_chunk):
                    enc.forward(enc.to_device_inputs(rows[j:j + per_chunk], flip),
                                pad_to=per_chunk * V)
            torch.cuda.synchronize()
            if r:
                best = max(best, len(part) / (time.perf_counter() - t0))
    return best


def actor_threads(num_cpus: float, num_gpus: float | None) -> tuple[int, int]:
    """(torch intra-op threads, niceness) of a Ray worker with the actor's resources."""
    import ray

    @ray.remote
    def probe() -> tuple[int, int]:
        import torch

        return torch.get_num_threads(), os.nice(0)

    return ray.get(probe.options(num_cpus=num_cpus, num_gpus=num_gpus).remote())


def parse_tokenizer(text: str) -> tuple[str, str, dict[str, Any], int | None]:
    """``kind:size:resolution`` (resolution optional) -> (kind, size, overrides {}, resolution)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in DEFAULTS:
        raise SystemExit(f"--tokenizers {text!r}: expected kind:size[:resolution] with kind in "
                         f"{', '.join(sorted(DEFAULTS))}")
    return parts[0], parts[1], {}, int(parts[2]) if len(parts) == 3 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--kind", default="tokenize.fsq", choices=sorted(DEFAULTS))
    ap.add_argument("--size", default=None, help="registry size (default: the kind's tiny)")
    ap.add_argument("--overrides", default=None,
                    help="model config overrides as JSON (default: a widened tiny, see DEFAULTS)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="crop size (default: the model's image_size; 64 for tokenize.lfq)")
    ap.add_argument("--tokenizers", nargs="+", default=None, metavar="KIND:SIZE[:RES]",
                    help="several tokenizers in one run (default on cuda: "
                         f"{' '.join(GPU_TOKENIZERS)}); replaces --kind/--size/--resolution")
    ap.add_argument("--source-size", type=int, default=None,
                    help="side of the curated PNGs (default: resolution + 16, so the stage "
                         "resizes and crops)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per batch (resources.batch_size; default 16, 256 on cuda)")
    ap.add_argument("--n", type=int, default=None, help="images per measurement (default 2048, "
                    "4096 on cuda)")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="rows per Delta commit (default 64, 128 on cuda)")
    ap.add_argument("--no-flip", action="store_true", help="encode only the crop (default: "
                    "crop + its horizontal flip, the stage's default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="the stage's compile: true (CUDA)")
    ap.add_argument("--encode-batch", default=None,
                    help="the stage's encode_batch: an int or auto (default: whole batches)")
    ap.add_argument("--no-loop", action="store_true", help="skip the serial read/decode/encode "
                    "loop (default on cuda: it measures one CPU's decoding)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                    help="CPUs of the local Ray cluster (default: this machine's)")
    ap.add_argument("--actor-cpus", type=float, default=None,
                    help="resources.cpus per actor (default 1; 4 on cuda)")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many per method")
    ap.add_argument("--decode", default="ahead", choices=["ahead", "actor"],
                    help="ahead: decode as Ray tasks before the actor pool (the stage's "
                         "design); actor: decode inside the actor, in series with encode")
    ap.add_argument("--prepare-cpus", type=float, default=0.25,
                    help="num_cpus of one decode task (ray_exec.PREPARE_CPUS)")
    ap.add_argument("--worker-niceness", type=int, default=os.nice(0),
                    help="niceness of Ray workers (RAY_worker_niceness; Ray's default is 15). "
                         "Default: this process's, so actors and the loop compete equally with "
                         "other load on a shared machine")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args()

    import torch

    from pipelines.dag.spec import ResourcesSpec
    from pipelines.stages import get_kind
    from pipelines.stages.resources import actor_cpus, pool_size
    from vgen_core import families
    from vgen_core.data import TableStore

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    batch_size = args.batch_size or (256 if cuda else 16)
    n_images = args.n or (4096 if cuda else 2048)
    chunk_size = args.chunk_size or (128 if cuda else 64)
    cpus_per_actor = args.actor_cpus or (4.0 if cuda else 1.0)
    no_loop = args.no_loop or cuda
    encode_batch: int | str | None = args.encode_batch
    if encode_batch not in (None, "auto"):
        encode_batch = int(encode_batch)
    flip = not args.no_flip
    if args.tokenizers or (cuda and args.kind == "tokenize.fsq" and args.size is None):
        jobs = [parse_tokenizer(t) for t in (args.tokenizers or GPU_TOKENIZERS)]
    else:
        size, overrides, _ = DEFAULTS[args.kind]
        overrides = json.loads(args.overrides) if args.overrides is not None else overrides
        jobs = [(args.kind, args.size or size, overrides, args.resolution)]

    try:
        import ray
    except ImportError:
        ray = None
        print("NOTE: Ray does not import here: the stage runs with the in-process executor "
              "(decode in series with the encode, one process), not its real Ray Data actor "
              "pool; stage/forward is then a lower bound of the Ray executor's.", flush=True)
    cluster: dict[str, float] | None = None
    gpus = 1.0 if cuda else 0.0
    resources = ResourcesSpec(cpus=cpus_per_actor, gpus=gpus, workers=max(1, args.cpus - 1),
                              batch_size=batch_size)
    if ray is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
        ray.init(address="local", num_cpus=args.cpus, num_gpus=1 if cuda else 0,
                 include_dashboard=False, log_to_driver=False)
        cluster = {"CPU": float(args.cpus), "GPU": gpus}
        import pipelines.dag.ray_exec as ray_exec

        ray_exec.PREPARE_CPUS = args.prepare_cpus
        pool, per_actor = pool_size(resources, cluster), actor_cpus(resources, cluster)
        per_thread, nice = actor_threads(per_actor, gpus or None)
    else:
        pool, per_actor, per_thread, nice = 1, cpus_per_actor, torch.get_num_threads(), os.nice(0)
    threads = pool * per_thread
    torch.set_num_threads(threads)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU x {os.cpu_count()}"

    tmp = tempfile.mkdtemp(prefix="vgen-tok-bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    store = TableStore(os.path.join(tmp, "store"))
    curated: dict[int, Any] = {}
    decoded: dict[tuple[int, int], np.ndarray] = {}
    results: list[dict[str, Any]] = []

    def save() -> None:  # after every tokenizer: a time cap keeps what was measured
        if args.json:
            from pathlib import Path

            Path(args.json).write_text(json.dumps(
                {"benchmark": "tokenize_throughput", "device": args.device,
                 "device_name": device_name, "results": results}, indent=1))

    from vgen_core.data.images import decode_image, preprocess

    for kind, size, overrides, res_arg in jobs:
        spec = families.get(families.default_for(kind))
        native = spec.native_resolution(spec.config(size, **overrides))
        resolution = res_arg or native or DEFAULTS[kind][2]
        source_size = args.source_size or resolution + 16
        if source_size not in curated:
            curated[source_size] = write_curated(store, f"bench/images{source_size}", n_images,
                                                 source_size)
        ref = curated[source_size]
        extra: dict[str, Any] = {"compile": args.compile, "encode_batch": encode_batch}
        cfg = get_kind(kind).Config(size=size, overrides=overrides, resolution=resolution,
                                    flip=flip, device=args.device, **extra)

        def make(progress=None, kind=kind, cfg=cfg, ref=ref):
            stage = make_stage(kind, cfg, store, ref, resources, cluster or {"CPU": 1.0},
                               chunk_size=chunk_size, progress=progress)
            if args.decode == "actor":  # the other design: decode inside the actor, in series
                stage.prepare_args = lambda: None
            return stage

        local = make()
        local.setup()  # the same seeded model the actors build
        if (source_size, local.resolution) not in decoded:
            table = store.read(ref.name, columns=["image_png"])
            decoded[source_size, local.resolution] = np.stack(
                [preprocess(decode_image(b), local.resolution)
                 for b in table["image_png"].to_pylist()])
        images = decoded[source_size, local.resolution]
        n_params = sum(p.numel() for p in local.model.parameters())
        precision = local.encode_precision()
        print(f"{kind} size={size} overrides={json.dumps(overrides)} params={n_params:,} "
              f"resolution={resolution} (from {source_size}px PNGs) flip={flip} "
              f"batch={batch_size} n={n_images} device={args.device} ({device_name}) "
              f"precision={precision} compile={args.compile} encode_batch={encode_batch}")
        print(f"executor: {'Ray Data, ' + str(args.cpus) + ' CPUs' if ray else 'in-process'}, "
              f"actor pool {pool} x {per_actor:g} CPU{' + 1 GPU' if cuda else ''}; torch "
              f"threads: {per_thread} per actor, {threads} for the loop and the forward pass; "
              f"niceness {nice} (workers) / {os.nice(0)} (loop); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        best = {"stage": 0.0, "loop": float("nan") if no_loop else 0.0, "forward": 0.0}
        for r in range(args.repeats):
            st, st_total, n, cpu = run_stage(make, cluster)
            c0 = time.process_time()
            lp = float("nan") if no_loop else plain_loop(local, ref, batch_size, flip)
            cpu_loop = time.process_time() - c0
            fw = forward_only(local, images, batch_size, flip)
            print(f"repeat {r}: stage {st:7.1f} img/s (steady; {st_total:.1f} incl. start-up)  "
                  f"loop {lp:7.1f}  forward {fw:7.1f}  load {os.getloadavg()[0]:.1f}",
                  flush=True)
            by_proc = sorted(cpu.items(), key=lambda kv: -kv[1])
            print(f"  CPU ms/img in the steady window: stage {1e3 * sum(cpu.values()):.2f} = "
                  + " + ".join(f"{name} {1e3 * v:.2f}" for name, v in by_proc)
                  + ("" if no_loop else f"; loop {1e3 * cpu_loop / n_images:.2f}"), flush=True)
            for k, v in (("stage", st), ("loop", lp), ("forward", fw)):
                best[k] = max(best[k], v)
        s, lp, fw = best["stage"], best["loop"], best["forward"]
        views = 2 if flip else 1
        print(f"best of {args.repeats}: stage {s:.1f} img/s, loop {lp:.1f} img/s, "
              f"forward {fw:.1f} img/s")
        loop_part = "" if no_loop else f"stage/loop {s / lp:.2f} (goal >= 1.0), "
        print(f"SUMMARY tokenize_throughput {kind} {size} n={n_images} {args.device} "
              f"source={source_size}px decode={args.decode} "
              f"executor={'ray' if ray else 'in-process'}: "
              f"stage {s:.1f} img/s, loop {lp:.1f}, forward {fw:.1f}; "
              f"{loop_part}stage/forward {s / fw:.2f} (goal >= 0.9); "
              f"{s:.1f} images/s per {'GPU' if cuda else 'CPU pool'} "
              f"({s * views:.1f} encodes/s with the flips)", flush=True)
        results.append({"kind": kind, "size": size, "family": spec.name,
                        "resolution": resolution, "precision": precision,
                        "compile": args.compile, "encode_batch": encode_batch,
                        "views": views, "n": n_images, "batch_size": batch_size,
                        "executor": "ray" if ray else "in-process",
                        "stage_rows_s": s, "forward_rows_s": fw,
                        "loop_rows_s": None if no_loop else lp,
                        "stage_over_forward": s / fw if fw else None})
        save()
        del local
        if cuda:
            torch.cuda.empty_cache()
    if ray is not None:
        ray.shutdown()


if __name__ == "__main__":
    main()
