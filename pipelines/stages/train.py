"""``train.tokenizer`` and ``train.generator``: Ray Train ``TorchTrainer`` + DeepSpeed.

One stage kind family trains any registered model (:data:`vgen_core.training.TASKS`): the DAG
names the family, size and the table. The driver builds a Ray Dataset from the Delta input (at
the exact version the upstream stage produced), each worker reads its shard through
``get_dataset_shard`` and wraps the model with ``deepspeed.initialize`` (ZeRO stage, precision,
accumulation, clipping from ``train:``). Rank 0 alone writes to the stage's MLflow run (opened by
the driver) and exports the weights as safetensors + config under
``<storage>/models/<dag>/<stage>/<fingerprint>/``.

Checkpoints and resume: every ``train.checkpoint_every`` steps (and after the last) each rank
saves its part of a DeepSpeed checkpoint plus its RNG, data position and EMA state
(:mod:`vgen_core.training.checkpoint`, with a SHA-256 manifest) and reports it to Ray Train,
which merges the ranks' files under ``<storage>/ray_train/<dag>-<stage>-<fingerprint[:12]>/``;
a restore verifies the digests and reads DeepSpeed's files weights-only. After a worker failure
``FailureConfig(max_failures)`` restarts the worker group from the latest checkpoint; a re-run of
the same stage fingerprint (the driver was killed) uses the same Ray Train run name, so Ray Train
restores it too, and the runner hands it the same MLflow run. A restored worker runs only the
remaining steps and logs only steps the run does not hold yet. The exported weights (the EMA
when ``train.ema_decay`` > 0) are registered in MLflow's model registry as ``<dag>.<stage>``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
from typing import Any

import numpy as np
from pydantic import Field

from vgen_core.faults import fault_point
from vgen_core.training import TrainConfig
from vgen_core.training.loop import EXECUTION_FIELDS

from .base import Counts, JobStage, OutputRef, StageConfig, StageError, StageResult

SUMMARY_NAME = "train_summary.json"


def _default_family(kind: str):
    def default() -> str:
        from vgen_core import families

        return families.default_for(kind)

    return default


class TrainTokenizerConfig(StageConfig):
    model: str = Field(default_factory=_default_family("train.tokenizer"),
                       description="model family (vgen_core.families; `vgen families`)")
    size: str = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)
    loss: dict[str, Any] = Field(default_factory=dict,
                                 description="keyword options of the family's loss")
    resolution: int | None = Field(None, ge=8, description="crop size of the training images "
                                   "(tokenizers; default: the images as curated)")
    weights: str | None = Field(None, description="fine-tune: start from these weights (a "
                                "released checkpoint, .safetensors or .bin / .pt read "
                                "weights-only, or a `vgen weights convert` / train export "
                                "folder; local or s3://) instead of a random init")
    train: TrainConfig = Field(default_factory=TrainConfig)


class TrainGeneratorConfig(TrainTokenizerConfig):
    model: str = Field(default_factory=_default_family("train.generator"),
                       description="model family (vgen_core.families; `vgen families`)")
    flip: bool = Field(False, description="use the baked flipped copy for half the samples")
    window: int = Field(8, ge=2, description="delta tokens per training sequence (DeltaWorld)")


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: build, restore the latest checkpoint if Ray Train hands one
    over (a restart after a failure, or a re-run of the same stage fingerprint), train the
    remaining steps with periodic checkpoints, export (EMA weights when on) from rank 0."""
    import deepspeed
    import ray.train
    import torch
    from ray.train.torch import get_device

    from vgen_core.tracking import MlflowTracker, NullTracker
    from vgen_core.training import (FiniteGuard, checkpoint_blocks, compile_model,
                                    deepspeed_config, get_task, make_optimizer, train_loop)
    from vgen_core.training.checkpoint import WorkerState, checkpoint_due, log_floor

    tcfg = TrainConfig.model_validate(cfg["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(tcfg.seed + rank)
    device = get_device()
    task = get_task(cfg["model"])
    model = task.build(cfg["size"], cfg["overrides"], cfg["data_info"])
    if cfg.get("weights"):
        model.load_state_dict(_initial_weights(cfg).state_dict())
    if tcfg.activation_checkpointing:
        checkpoint_blocks(model)
    model = model.to(device)
    groups = (task.param_groups(model, tcfg.weight_decay) if task.param_groups is not None
              else model.parameters())
    opt = make_optimizer(groups, tcfg, device)  # fused AdamW on CUDA
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=deepspeed_config(tcfg, device),
                                           dist_init_required=False)
    guard = FiniteGuard(opt, engine.optimizer)  # a step with a NaN / inf gradient is skipped
    if tcfg.compile:
        compile_model(engine)
    ema = _make_ema(engine, tcfg, rank)
    rng = np.random.default_rng(tcfg.seed + 1000 * rank)
    state = WorkerState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _restore(engine, checkpoint, rank, ema, rng, device)
    resumed_from = state.step

    tracker = MlflowTracker.attach(cfg["tracking_uri"], cfg["run_id"]) \
        if rank == 0 and cfg.get("run_id") else NullTracker()
    floor = log_floor(resumed_from, _logged_through(tracker) if rank == 0 else None)

    board = cfg.get("progress") if rank == 0 else None

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if board is not None:  # the driver's console line (fire and forget)
            board.put.remote(step, tcfg.steps, dict(metrics))
        if step > floor:
            tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def on_step(step: int, last: dict[str, float]) -> None:
        state.step = step
        if ema is not None:
            ema.update(_ema_tensors(engine))
        if checkpoint_due(step, tcfg.checkpoint_every, tcfg.steps):
            state.last_metrics = dict(last)
            _save_checkpoint(engine, state, rank, ema, rng, device)

    tokens = getattr(task, "tokens_per_sample", None)
    loss_fn = functools.partial(task.hook("loss"), **cfg.get("loss", {}))
    last = train_loop(engine, _batches(cfg, tcfg, device, rng, state), loss_fn, tcfg,
                      on_log=on_log, on_step=on_step, start_step=resumed_from, world_size=world,
                      tokens_per_sample=tokens(cfg["data_info"]) if callable(tokens)
                      else cfg["data_info"].get("seq_len"), guard=guard)
    _export(engine, ema, cfg, rank, {
        "final": last or state.last_metrics, "world_size": world, "step": state.step,
        "resumed_from": resumed_from, "restores": state.restores})


def _initial_weights(cfg: dict[str, Any]) -> Any:
    """The ``weights:`` model a fine-tune starts from (the family's mapping, strictly; a
    manifest's pixel range must be the family's), for the config this run trains."""
    from vgen_core.data.fsio import fetch_file, fetch_model_dir, filesystem_for
    from vgen_core.training import get_task
    from vgen_core.weights import export_uri, load_weights

    task, uri = get_task(cfg["model"]), export_uri(cfg["weights"])
    config = task.model_config(cfg["size"], cfg["overrides"], cfg["data_info"])
    with tempfile.TemporaryDirectory() as tmp:
        fs, path = filesystem_for(uri)
        local = fetch_model_dir(uri, f"{tmp}/in") if fs.isdir(path) else fetch_file(uri, tmp)
        return load_weights(local, task.name, config, pixel_range=task.pixel_range,
                            what=f"train with.weights {uri}")


class _ProgressBoard:
    """The last training progress rank 0 posted: a zero-CPU actor the driver polls."""

    def __init__(self) -> None:
        self.last: tuple[int, int, dict[str, float]] | None = None

    def put(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.last = (step, total, metrics)

    def get(self) -> tuple[int, int, dict[str, float]] | None:
        return self.last


@contextlib.contextmanager
def _progress_to(callback: Any, loop_cfg: dict[str, Any], every_s: float = 1.0):
    """While training: rank 0 posts ``(step, steps, metrics)`` at each log step to a
    :class:`_ProgressBoard` (``loop_cfg["progress"]``), and a driver thread hands each new post
    to ``callback`` (the console's training line). Nothing when there is no callback."""
    if callback is None:
        yield
        return
    import ray

    board: Any = ray.remote(num_cpus=0)(_ProgressBoard).remote()  # an ActorHandle
    loop_cfg["progress"] = board
    stop = threading.Event()

    def poll() -> None:
        seen = None
        while not stop.wait(every_s):
            try:
                last = ray.get(board.get.remote(), timeout=10)
            except Exception:  # progress is never worth failing the stage
                continue
            if last is not None and last != seen:
                seen = last
                callback(*last)

    t = threading.Thread(target=poll, name="vgen-train-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=15)
        loop_cfg.pop("progress", None)
        with contextlib.suppress(Exception):
            ray.kill(board)


def _make_ema(engine: Any, tcfg: TrainConfig, rank: int):
    """The EMA this rank keeps: all ranks under ZeRO-3 (each its partitions), else rank 0."""
    from vgen_core.training import EMA

    if tcfg.ema_decay <= 0 or (rank != 0 and not engine.zero_optimization_partition_weights()):
        return None
    return EMA(_ema_tensors(engine), tcfg.ema_decay)


def _ema_tensors(engine: Any) -> dict[str, Any]:
    """The weights an EMA averages: parameters, or this rank's ZeRO-3 partitions of them."""
    zero3 = engine.zero_optimization_partition_weights()
    return {n: (p.ds_tensor if zero3 else p) for n, p in engine.module.named_parameters()}


def _batches(cfg: dict[str, Any], tcfg: TrainConfig, device: Any, rng: np.random.Generator,
             pos: Any):
    """Micro-batches from this rank's shard, pass after pass. ``pos`` (a WorkerState) holds the
    data position: passes started and micro-batches consumed in the current one; a resumed
    worker skips what its checkpoint had consumed. (Ray Data does not promise the same order
    in a new execution, so this restores how much of the pass is done, not exactly which rows.)"""
    import ray.train
    import torch

    shard = ray.train.get_dataset_shard("train")
    skip = pos.batch
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=tcfg.micro_batch_size, drop_last=True,
                                          device=device):
            n += 1
            if skip:
                skip -= 1
                continue
            for key in [k for k in b if k.endswith("_flip")]:  # baked flips: pick at random
                base, flipped = key[: -len("_flip")], b.pop(key)
                if cfg.get("flip"):
                    pick = torch.from_numpy(rng.random(len(flipped)) < 0.5).to(device)
                    pick = pick.view(-1, *[1] * (flipped.ndim - 1))
                    b[base] = torch.where(pick, flipped, b[base])
            pos.batch = n
            yield b
        if n == 0:
            raise RuntimeError("a training shard yielded no full batch: the table has fewer "
                               "rows per worker than train.micro_batch_size")
        pos.epoch, pos.batch, skip = pos.epoch + 1, 0, 0


def _save_checkpoint(engine: Any, state: Any, rank: int, ema: Any, rng: np.random.Generator,
                     device: Any) -> None:
    """Collective: every rank saves its part (with its digest manifest) and reports it; Ray Train
    merges the directories."""
    import shutil

    import ray.train

    from vgen_core.training.checkpoint import rng_tensors, save_checkpoint

    tmp = tempfile.mkdtemp(prefix="vgen-ckpt-")
    try:
        state.numpy_rng = rng.bit_generator.state
        tensors = rng_tensors(device)
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        save_checkpoint(engine, tmp, rank, state, tensors)
        fault_point("in_checkpoint_save")
        ray.train.report({"step": state.step, **state.last_metrics},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{state.step:08d}")
        fault_point("after_checkpoint_report")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore(engine: Any, checkpoint: Any, rank: int, ema: Any, rng: np.random.Generator,
             device: Any):
    """Verify the checkpoint's digests, load DeepSpeed's part weights-only and this rank's state;
    returns its WorkerState."""
    from vgen_core.training.checkpoint import restore_checkpoint, restore_rng

    with checkpoint.as_directory() as d:
        state, tensors = restore_checkpoint(engine, d, rank,
                                            where=getattr(checkpoint, "path", None) or d)
    restore_rng(tensors, device)
    if state.numpy_rng is not None:
        rng.bit_generator.state = state.numpy_rng
    if ema is not None:
        ema_state = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        if ema_state:
            ema.load_state_dict(ema_state)
    state.restores += 1
    if rank == 0:
        print(f"[train] resumed from the checkpoint at step {state.step} "
              f"(restore {state.restores})", flush=True)
    return state


def _logged_through(tracker: Any, key: str = "train/loss") -> int | None:
    """The last step of ``key`` the tracking run holds (None: nothing, or not readable)."""
    client = getattr(tracker, "client", None)
    if client is None:
        return None
    try:
        return max((m.step for m in client.get_metric_history(tracker.run_id, key)), default=None)
    except Exception:  # tracking never kills a run: without it, steps may be logged twice
        return None


def _export(engine: Any, ema: Any, cfg: dict[str, Any], rank: int, summary: dict) -> None:
    """Rank 0 writes safetensors + config + the summary to ``output_uri`` (EMA weights when on).
    Under ZeRO-3 every rank takes part in gathering the full weights."""
    from contextlib import nullcontext

    from vgen_core.data.fsio import filesystem_for
    from vgen_core.tokenizers.io import save_pretrained, weights_digest

    if engine.zero_optimization_partition_weights():
        module, swap = _gather_zero3(engine, ema, cfg, rank), nullcontext()
    else:
        module = engine.module if rank == 0 else None
        swap = ema.applied(_ema_tensors(engine)) if ema is not None else nullcontext()
    if module is None:
        return
    with swap, tempfile.TemporaryDirectory() as tmp:
        save_pretrained(module, tmp)
        summary = {**summary, "digest": weights_digest(module), "ema": ema is not None}
        with open(os.path.join(tmp, SUMMARY_NAME), "w") as f:
            json.dump(summary, f)
        fs, path = filesystem_for(cfg["output_uri"])
        fs.makedirs(path, exist_ok=True)
        for name in os.listdir(tmp):
            fs.put(os.path.join(tmp, name), f"{path.rstrip('/')}/{name}")


def _gather_zero3(engine: Any, ema: Any, cfg: dict[str, Any], rank: int):
    """Collective: all-gather each parameter's ZeRO-3 partitions (or this rank's EMA of them)
    into a freshly built fp32 model on rank 0 (None on the other ranks). Gathering the
    partitions ourselves also covers the small parameters DeepSpeed keeps resident."""
    import torch
    import torch.distributed as dist

    from vgen_core.training import get_task

    world = dist.get_world_size()
    full = {}
    for name, p in engine.module.named_parameters():
        part = (ema.shadow[name] if ema is not None else p.ds_tensor).detach().float().contiguous()
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        if rank == 0:
            full[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
    if rank != 0:
        return None
    model = get_task(cfg["model"]).build(cfg["size"], cfg["overrides"], cfg["data_info"])
    buffers = {n: b.detach().cpu() for n, b in engine.module.named_buffers()}
    model.load_state_dict({k: full.get(k, buffers.get(k)) for k in model.state_dict()})
    return model


class TrainTokenizer(JobStage):
    kind = "train.tokenizer"
    version = 1
    Config = TrainTokenizerConfig
    needs_range = (1, 1)
    output_key = "tokenizer"
    #: a re-run after an interrupted attempt continues that attempt's MLflow run (see runner)
    resumes_tracking = True
    needs_ray = True  # a Ray Train job: the runner connects to Ray before planning it
    weights_fields = ("weights",)  # checked before anything runs
    config: TrainTokenizerConfig

    def weights_target(self) -> tuple[str, Any, str | None] | None:
        """Family and pixel range of ``weights:`` (its config is compared when loaded: it
        depends on the data)."""
        from vgen_core.training import get_task

        task = get_task(self.config.model)
        return task.name, None, task.pixel_range

    def row_fingerprint_parts(self) -> dict[str, Any]:
        """The resolved model config (registry defaults included), the training code, and for
        a tokenizer the pixel range it is trained on (the family's; its change retrains)."""
        from vgen_core.training import get_task
        from vgen_core.training.loop import LOOP_VERSION

        task = get_task(self.config.model)
        parts = {"model_config": task.config_json(self.config.size, self.config.overrides),
                 "loop_version": LOOP_VERSION}
        if task.role == "tokenizer":
            parts["pixel_range"] = task.pixel_range
        if self.config.weights:
            from .tokenize import weights_file_digest

            parts["init_weights"] = weights_file_digest(self.config.weights,
                                                        f"stage '{self.ctx.stage}'")
        return parts

    def dataset(self):
        """Curated images (``image_png`` of ingest.images, or curate.pancap's JPEG ``image``)."""
        import ray.data

        from vgen_core.training import get_task

        from vgen_core.data.images import IMAGE_COLUMNS, pick_column

        from .reading import image_batch

        task = get_task(self.config.model)
        if task.data != "images":
            raise StageError(f"stage '{self.ctx.stage}': '{self.config.model}' is a generator "
                             f"(it trains on {task.data}); use `train.generator`")
        (up,) = self.ctx.inputs
        ref = self.ctx.input_ref(up, "samples")
        names = self.ctx.store.schema(ref.name).names
        col = pick_column(names, IMAGE_COLUMNS)
        if col is None:
            raise StageError(f"stage '{self.ctx.stage}': {ref.uri} has no image column "
                             f"({', '.join(IMAGE_COLUMNS)}); train tokenizers on a curated "
                             "image table (ingest.images, curate.pancap)")
        cols = [col] + (["label"] if "label" in names else [])
        ds = ray.data.read_delta(ref.uri, version=ref.version, columns=cols,
                                 storage_options=self.ctx.store.worker_storage_options() or None)
        n = self.ctx.store.read(ref.name, version=ref.version, columns=[col]).num_rows
        info: dict[str, Any] = {"num_rows": n}
        if self.config.resolution:
            info["image_size"] = self.config.resolution
        return ds.map_batches(image_batch, fn_kwargs={"resolution": self.config.resolution},
                              batch_format="pyarrow"), info

    def run(self, executor: Any = None) -> StageResult:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from .resources import train_worker_cpus

        ds, data_info = self.dataset()
        res = self.ctx.resources
        workers = res.workers
        cluster = self.ctx.cluster or {"CPU": float(os.cpu_count() or 2)}
        per_worker = train_worker_cpus(res, cluster)
        use_gpu = res.gpus > 0
        tcfg = self.config.train
        name = f"models/{self.ctx.dag}/{self.ctx.stage}/{self.ctx.row_fingerprint}"
        output_uri = self.ctx.store.path(name)
        loop_cfg = {
            "model": self.config.model, "size": self.config.size,
            "overrides": self.config.overrides, "train": tcfg.dump(),
            "data_info": data_info, "flip": getattr(self.config, "flip", False),
            "loss": self.config.loss, "weights": self.config.weights,
            "tracking_uri": self.ctx.tracking_uri, "run_id": self.ctx.tracker.run_id,
            "output_uri": output_uri,
        }
        resources = {"CPU": per_worker}
        if use_gpu:
            resources["GPU"] = res.gpus
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=loop_cfg,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                storage_path=self.ctx.store.path("ray_train"), name=self.ray_run_name(),
                failure_config=FailureConfig(max_failures=tcfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2)),
            datasets={"train": ds},
        )
        if self.config.weights:  # refuse a file that does not fit before any worker starts
            from vgen_core.weights import WeightsError

            try:
                _initial_weights(loop_cfg)
            except WeightsError as e:
                raise StageError(f"stage '{self.ctx.stage}': {e}") from None
        self._check_resume_checkpoint()
        # execution settings are not in the config MLflow records (nor in the fingerprint)
        self.ctx.tracker.set_tags({f"vgen.train.{k}": str(getattr(tcfg, k)).lower()
                                   for k in EXECUTION_FIELDS})
        with _progress_to(self.ctx.step_progress, loop_cfg):
            trainer.fit()
        from vgen_core.data.fsio import filesystem_for

        fs, path = filesystem_for(output_uri)
        try:
            summary = json.loads(fs.cat_file(f"{path}/{SUMMARY_NAME}"))
        except FileNotFoundError:
            raise StageError(f"stage '{self.ctx.stage}': training finished but rank 0 wrote no "
                             f"model under {output_uri}; see the worker logs above") from None
        metrics = {f"final.{k}": float(v) for k, v in summary["final"].items()}
        metrics.update({"final.step": summary["step"], "resume.restores": summary["restores"],
                        "resume.from_step": summary["resumed_from"]})
        version = self._register(output_uri, summary["digest"])
        if version is not None:
            metrics["registry.version"] = version
        ref = OutputRef("model", name, output_uri, digest=summary["digest"])
        # processed: the rows of the table it trained on
        return StageResult(outputs={self.output_key: ref}, metrics=metrics,
                           counts=Counts(processed=int(data_info.get("num_rows", 0))))

    def _check_resume_checkpoint(self) -> None:
        """The checkpoint Ray Train will restore for this run name (a re-run of an interrupted
        stage), scanned once on the driver (:func:`~vgen_core.training.checkpoint.scan_checkpoint`):
        a refused one fails the stage here, naming the fix, rather than every restarted worker
        group. Local storage roots only (the workers verify every restore anyway)."""
        from vgen_core.data.fsio import filesystem_for
        from vgen_core.training.checkpoint import CheckpointRejected, scan_checkpoint

        run_dir = f"{self.ctx.store.path('ray_train').rstrip('/')}/{self.ray_run_name()}"
        fs, path = filesystem_for(run_dir)
        if "file" not in fs.protocol:
            return
        try:
            snap = json.loads(fs.cat_file(f"{path}/checkpoint_manager_snapshot.json"))
        except (OSError, ValueError):  # none yet (a first run), or Ray Train's to judge
            return
        name = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if not name or not fs.isdir(f"{path}/{name}"):
            return
        try:
            scan_checkpoint(f"{path}/{name}", where=f"{run_dir}/{name}")
        except CheckpointRejected as e:
            raise StageError(f"stage '{self.ctx.stage}': {e}") from None

    def ray_run_name(self) -> str:
        """The Ray Train run (directory under ``<storage>/ray_train``) of this stage fingerprint.

        Ray Train restores a run of the same name from its latest checkpoint, so a re-run of an
        interrupted stage continues it, while any change of config or input data (another
        fingerprint) starts afresh. The runner sets ``stage_fingerprint`` (the planner's, input
        versions included); without it, the row fingerprint and the input references stand in.
        """
        fp = getattr(self, "stage_fingerprint", None)
        if not fp:
            import hashlib

            inputs = {u: {k: r.to_json() for k, r in outs.items()}
                      for u, outs in self.ctx.inputs.items()}
            key = json.dumps([self.ctx.row_fingerprint, inputs], sort_keys=True, default=str)
            fp = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.ctx.dag}-{self.ctx.stage}-{fp[:12]}"

    def _register(self, output_uri: str, digest: str) -> int | None:
        """Register the exported weights as a new version of ``<dag>.<stage>`` in MLflow's model
        registry (the stage's run holds the files); None when not tracked."""
        from vgen_core.data.fsio import filesystem_for
        from vgen_core.tracking import register_model

        tracker = self.ctx.tracker
        if tracker.run_id is None:
            return None
        fs, path = filesystem_for(output_uri)
        with tempfile.TemporaryDirectory() as tmp:
            for remote in fs.ls(path, detail=False):
                fs.get_file(remote, os.path.join(tmp, os.path.basename(remote.rstrip("/"))))
            return register_model(tracker, f"{self.ctx.dag}.{self.ctx.stage}", tmp,
                                  tags={"vgen.digest": digest, "vgen.uri": output_uri,
                                        "vgen.row_fingerprint": self.ctx.row_fingerprint})


class TrainGenerator(TrainTokenizer):
    kind = "train.generator"
    version = 1
    Config = TrainGeneratorConfig
    output_key = "generator"
    config: TrainGeneratorConfig

    def dataset(self):
        """The chosen side table, current for its curated version (reading.training_dataset),
        turned into the batches the model family eats; the data's facts (codebook, sequence
        length, classes, bits, latent shape) go into the model config."""
        from vgen_core.training import get_task

        from .reading import (Transform, data_facts, delta_batch, latent_batch, token_batch,
                              training_dataset)

        (up,) = self.ctx.inputs
        side = self.ctx.input_ref(up, "samples")
        source = self.ctx.input_ref(up, "source")
        where = f"stage '{self.ctx.stage}'"
        task = get_task(self.config.model)
        facts = data_facts(self.ctx.store, side, where)
        kind = facts["kind"]
        if task.data == "images" or not task.accepts(kind):
            raise StageError(f"{where}: '{self.config.model}' trains on {task.data}, but "
                             f"upstream '{up}' produced {kind} ({side.uri}); "
                             + ("use `train.tokenizer` for tokenizers" if task.data == "images"
                                else f"feed it from a stage that writes {task.data}"))
        ds = training_dataset(self.ctx.store, source, side, Transform(hflip=self.config.flip),
                              where=where)
        if kind in ("bit_tokens", "id_tokens"):
            fn, kw = token_batch, {"with_text": task.needs_text}
        elif kind == "latents":
            fn, kw = latent_batch, {"with_text": task.needs_text}
        else:
            if facts["min_steps"] < self.config.window:
                raise StageError(f"{where}: window {self.config.window} is longer than the "
                                 f"shortest video ({facts['min_steps']} delta tokens); lower "
                                 "with.window or tokenize more frames (max_frames)")
            fn, kw = delta_batch, {"window": self.config.window}
        return ds.map_batches(fn, fn_kwargs=kw, batch_format="pyarrow"), facts
