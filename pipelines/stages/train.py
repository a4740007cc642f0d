"""``train.tokenizer`` and ``train.generator``: Ray Train ``TorchTrainer`` + DeepSpeed.

One stage kind family trains any registered model (:data:`vgen_core.training.TASKS`): the DAG
names the family, size and the table. The driver builds a Ray Dataset from the Delta input (at
the exact version the upstream stage produced), each worker reads its shard through
``get_dataset_shard`` and wraps the model with ``deepspeed.initialize`` (ZeRO stage, precision,
accumulation, clipping from ``train:``). Rank 0 alone writes to the stage's MLflow run (opened by
the driver) and exports the weights as safetensors + config under
``<storage>/models/<dag>/<stage>/<fingerprint>/``.

Not yet here (training issue): periodic DeepSpeed checkpoints, resume, FailureConfig, EMA.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from vgen_core.training import TrainConfig

from .base import JobStage, OutputRef, StageConfig, StageError, StageResult

SUMMARY_NAME = "train_summary.json"


class TrainTokenizerConfig(StageConfig):
    model: str = Field("lfq", description="model family (vgen_core.training.TASKS)")
    size: str = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)


class TrainGeneratorConfig(TrainTokenizerConfig):
    model: str = "maskgit"
    flip: bool = Field(False, description="use the baked flipped tokens for half the samples")


def _decode_images(batch: pa.Table) -> dict[str, np.ndarray]:
    from vgen_core.data.sample_images import decode_png

    images = [decode_png(b) for b in batch["image_png"].to_pylist()]
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}


def _token_arrays(batch: pa.Table) -> dict[str, np.ndarray]:
    out = {"tokens": np.asarray(batch["indices"].to_pylist(), dtype=np.int64),
           "label": np.asarray(batch["label"], dtype=np.int64)}
    flips = batch["indices_flip"].to_pylist()
    out["tokens_flip"] = np.asarray([f if f is not None else t for f, t in
                                     zip(flips, out["tokens"].tolist())], dtype=np.int64)
    return out


def _current_rows(batch: pa.Table, keys: pa.Table, fingerprint: str) -> pa.Table:
    """Rows of this tokenizer fingerprint whose digest matches the current curated version."""
    from .base import filter_to_keys

    return filter_to_keys(batch.filter(pc.equal(batch["fingerprint"], fingerprint)), keys)


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import deepspeed
    import ray.train
    import torch
    from ray.train.torch import get_device

    from vgen_core.tokenizers.io import save_pretrained, weights_digest
    from vgen_core.tracking import MlflowTracker, NullTracker
    from vgen_core.training import deepspeed_config, get_task, train_loop

    tcfg = TrainConfig.model_validate(cfg["train"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(tcfg.seed + rank)
    device = get_device()
    task = get_task(cfg["model"])
    model = task.build(cfg["size"], cfg["overrides"], cfg["data_info"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tcfg.betas,
                            weight_decay=tcfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=deepspeed_config(tcfg, device),
                                           dist_init_required=False)
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng(tcfg.seed + 1000 * rank)

    def batches():
        while True:
            n = 0
            for b in shard.iter_torch_batches(batch_size=tcfg.micro_batch_size, drop_last=True,
                                              device=device):
                if cfg.get("flip") and "tokens_flip" in b:
                    pick = torch.from_numpy(rng.random(len(b["tokens"])) < 0.5).to(device)
                    b["tokens"] = torch.where(pick[:, None], b["tokens_flip"], b["tokens"])
                n += 1
                yield b
            if n == 0:
                raise RuntimeError("a training shard yielded no full batch: the table has fewer "
                                   "rows per worker than train.micro_batch_size")

    tracker = MlflowTracker.attach(cfg["tracking_uri"], cfg["run_id"]) \
        if rank == 0 and cfg.get("run_id") else NullTracker()
    last = train_loop(engine, batches(), task.loss, tcfg,
                      on_log=lambda step, m: tracker.log_metrics(
                          {f"train/{k}": v for k, v in m.items()}, step=step))
    if rank == 0:
        from vgen_core.data.fsio import filesystem_for

        module = engine.module
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(module, tmp)
            with open(os.path.join(tmp, SUMMARY_NAME), "w") as f:
                json.dump({"final": last, "digest": weights_digest(module),
                           "world_size": ray.train.get_context().get_world_size()}, f)
            fs, path = filesystem_for(cfg["output_uri"])
            fs.makedirs(path, exist_ok=True)
            for name in os.listdir(tmp):
                fs.put(os.path.join(tmp, name), f"{path.rstrip('/')}/{name}")


class TrainTokenizer(JobStage):
    kind = "train.tokenizer"
    version = 1
    Config = TrainTokenizerConfig
    needs_range = (1, 1)
    output_key = "tokenizer"
    config: TrainTokenizerConfig

    def row_fingerprint_parts(self) -> dict[str, Any]:
        """The resolved model config (registry defaults included) and the training code."""
        from vgen_core.training import get_task
        from vgen_core.training.loop import LOOP_VERSION

        task = get_task(self.config.model)
        return {"model_config": task.config(self.config.size, self.config.overrides),
                "loop_version": LOOP_VERSION}

    def dataset(self):
        import ray.data

        (up,) = self.ctx.inputs
        ref = self.ctx.input_ref(up, "samples")
        ds = ray.data.read_delta(ref.uri, version=ref.version, columns=["image_png", "label"],
                                 storage_options=self.ctx.store.storage_options or None)
        n = self.ctx.store.read(ref.name, version=ref.version, columns=["label"]).num_rows
        return ds.map_batches(_decode_images, batch_format="pyarrow"), {"num_rows": n}

    def run(self, executor: Any = None) -> StageResult:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from pipelines.dag.ray_exec import RESERVED_CPUS

        ds, data_info = self.dataset()
        res = self.ctx.resources
        workers = res.workers
        cluster_cpu = self.ctx.cluster.get("CPU", float(os.cpu_count() or 2))
        per_worker = min(res.cpus, max((cluster_cpu - RESERVED_CPUS) / workers, 0.25))
        use_gpu = res.gpus > 0
        fp = self.ctx.row_fingerprint
        name = f"models/{self.ctx.dag}/{self.ctx.stage}/{fp}"
        output_uri = self.ctx.store.path(name)
        loop_cfg = {
            "model": self.config.model, "size": self.config.size,
            "overrides": self.config.overrides, "train": self.config.train.model_dump(),
            "data_info": data_info, "flip": getattr(self.config, "flip", False),
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
            run_config=RunConfig(storage_path=self.ctx.store.path("ray_train"),
                                 name=f"{self.ctx.dag}-{self.ctx.stage}-{fp[:12]}"),
            datasets={"train": ds},
        )
        trainer.fit()
        from vgen_core.data.fsio import filesystem_for

        fs, path = filesystem_for(output_uri)
        try:
            summary = json.loads(fs.cat_file(f"{path}/{SUMMARY_NAME}"))
        except FileNotFoundError:
            raise StageError(f"stage '{self.ctx.stage}': training finished but rank 0 wrote no "
                             f"model under {output_uri}; see the worker logs above") from None
        metrics = {f"final/{k}": float(v) for k, v in summary["final"].items()}
        ref = OutputRef("model", name, output_uri, digest=summary["digest"])
        return StageResult(outputs={self.output_key: ref}, metrics=metrics)


class TrainGenerator(TrainTokenizer):
    kind = "train.generator"
    version = 1
    Config = TrainGeneratorConfig
    output_key = "generator"
    config: TrainGeneratorConfig

    def dataset(self):
        import ray.data

        (up,) = self.ctx.inputs
        tokens = self.ctx.input_ref(up, "samples")
        source = self.ctx.input_ref(up, "source")
        store = self.ctx.store
        keys = store.read(source.name, version=source.version,
                          columns=["sample_id", "content_digest"])
        meta = store.read(tokens.name, version=tokens.version,
                          columns=["fingerprint", "token_bits", "grid_h", "grid_w", "label",
                                   "indices_flip"])
        meta = meta.filter(pc.equal(meta["fingerprint"], tokens.digest))
        if meta.num_rows == 0:
            raise StageError(f"stage '{self.ctx.stage}': token table {tokens.uri}@v{tokens.version}"
                             f" has no rows of tokenizer fingerprint {tokens.digest}")
        if self.config.flip and meta["indices_flip"].null_count == meta.num_rows:
            raise StageError(f"stage '{self.ctx.stage}': with.flip is true but the token table "
                             f"{tokens.uri} has no baked flipped tokens; set `flip: true` on the "
                             "tokenize stage or `flip: false` here")
        bits = pc.unique(meta["token_bits"]).to_pylist()
        if len(bits) != 1:
            raise StageError(f"stage '{self.ctx.stage}': mixed token_bits {bits} in {tokens.uri}")
        data_info = {"codebook_size": 1 << int(bits[0]),
                     "seq_len": int(meta["grid_h"][0].as_py()) * int(meta["grid_w"][0].as_py()),
                     "num_classes": int(pc.max(meta["label"]).as_py()) + 1,
                     "num_rows": meta.num_rows}
        ds = ray.data.read_delta(tokens.uri, version=tokens.version,
                                 storage_options=store.storage_options or None)
        ds = ds.map_batches(_current_rows, fn_args=(keys, tokens.digest), batch_format="pyarrow")
        return ds.map_batches(_token_arrays, batch_format="pyarrow"), data_info
