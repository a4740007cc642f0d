"""``quantize.ternary``: a trained generator made 1.58-bit by self-supervised distillation.

Needs one stage with a ``generator`` output (``train.generator`` or ``import.weights``)::

    q: {uses: quantize.ternary, needs: [maskgit], with: {steps: 200}}
    eval_fp: {uses: evaluate.generation, needs: [maskgit, tokens]}
    eval_q:  {uses: evaluate.generation, needs: [q, tokens]}

What it does (the method and vgen's choices: :mod:`vgen_core.training.ternary`): the
full-precision generator samples ``pool_size`` outputs of its own (class-balanced labels, no
data read); a copy whose linear layers are ternary (quantization-aware, straight-through) is
trained for ``steps`` to match the full-precision forward on those samples; the result is
exported twice under ``models/<dag>/<stage>/<fingerprint>``: ``model.safetensors`` +
``config.json`` (the family's layout, linears holding code x scale: the ``generator`` output that
``evaluate.generation`` scores like any generator, so the two evaluations above give the
generation metrics of both models) and ``ternary.safetensors`` (the deployable packed weights:
2 bits per weight + one fp32 scale per row, for ``kernels.ternary.TernaryLinear``).

Metrics (MLflow, the stage's run): ``ternary.converted_layers``, ``ternary.weight_bytes_fp32`` /
``ternary.weight_bytes_bf16`` / ``ternary.weight_bytes_packed`` of the converted layers and
``ternary.ratio_to_bf16``; ``model_bytes.fp`` / ``model_bytes.ternary`` (all parameters and
buffers); ``distill.loss_first`` / ``distill.loss_last`` (means of the first and last tenth of
the steps) and the per-step ``distill/loss`` curve; ``sample.per_s_fp`` / ``sample.per_s_ternary``
(samples per second, same labels and seed); on a GPU ``peak_memory.fp`` / ``peak_memory.ternary``
(``torch.cuda.max_memory_allocated`` while sampling). On CPU no allocator statistic exists, so
peak memory is not reported there; the model bytes are.

Runs on one Ray actor with the stage's resources (``resources: {gpus: 1}`` for a GPU), in the
driver when no GPU is asked for (one batch of work: see the executor).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from vgen_core import families

from .base import (Counts, InProcessExecutor, JobStage, OutputRef, StageConfig, StageError,
                   StageResult, resolve_device)

__all__ = ["QuantizeTernary", "QuantizeTernaryConfig"]


class QuantizeTernaryConfig(StageConfig):
    steps: int = Field(200, ge=1, description="distillation steps")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    pool_size: int = Field(64, ge=1, description="samples the full-precision model generates "
                           "as the distillation data")
    sampler: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the "
                                    "family's sampler for the pool and the speed measurement, "
                                    "over the released settings of the generator's size")
    keep: list[str] | None = Field(None, description="fnmatch patterns of linears kept in full "
                                   "precision (default: vgen_core.training.ternary.DEFAULT_KEEP)")
    speed_samples: int = Field(8, ge=1, description="samples timed per model")
    seed: int = 0
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")


class _QuantizeActor:
    """Loads the generator, distills, measures, exports; returns the metrics as one row."""

    def __init__(self, plan: dict[str, Any]):
        self.plan = plan

    def __call__(self, batch: pa.Table) -> pa.Table:
        metrics, curve = run_quantization(self.plan)
        return pa.table({"metrics": [json.dumps(metrics)], "curve": [json.dumps(curve)]})


def _timed_sample(spec: Any, model: Any, labels: Any, seed: int, options: dict[str, Any],
                  device: Any) -> tuple[float, float | None]:
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        spec.hook("sampler")(model, labels, generator=g, **options)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = float(torch.cuda.max_memory_allocated(device)) if cuda else None
    return len(labels) / max(elapsed, 1e-9), peak


def run_quantization(plan: dict[str, Any]) -> tuple[dict[str, float], list[float]]:
    """The stage's work (see the module docstring); ``plan``: the generator reference, the
    config, the output uri. Returns (metrics, distillation loss per step)."""
    import torch
    from safetensors.torch import save_file

    from vgen_core.data.fsio import filesystem_for
    from vgen_core.tokenizers.io import save_pretrained
    from vgen_core.training.ternary import (DEFAULT_KEEP, dequantized_student, model_bytes,
                                            pack_student, samples_as_batch, self_distill, to_qat)

    from .evaluate_generation import load_model_ref

    cfg = QuantizeTernaryConfig.model_validate(plan["config"])
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_model_ref(plan["generator"], f"{tmp}/in").to(device)
    spec = families.get(teacher.family)
    if spec.conditioning != "labels" or spec.output not in ("tokens", "latents"):
        raise ValueError(f"quantize.ternary distills class-conditional generators of tokens or "
                         f"latents; '{spec.name}' is conditioned on {spec.conditioning} and "
                         f"samples {spec.output}")
    # the pool and the speed runs sample as evaluate.generation does: the family's released
    # settings for the generator's size, with.sampler on top
    from .evaluate_generation import released_size

    size = released_size(spec, {"family": spec.name, **teacher.config.model_dump(mode="json")})
    options = {**(dict(spec.sampling.get(size, {})) if size else {}), **cfg.sampler}
    classes = max(int(getattr(teacher.config, "num_classes", 1) or 1), 1)
    torch.manual_seed(cfg.seed)
    labels = torch.arange(cfg.pool_size, device=device) % classes
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    sample = spec.hook("sampler")
    with torch.inference_mode():
        out = sample(teacher, labels, generator=g, **options)
    pool = {k: v.clone() for k, v in samples_as_batch(spec, out, labels).items()}

    import copy

    student = copy.deepcopy(teacher)
    converted, kept = to_qat(student, cfg.keep if cfg.keep is not None else DEFAULT_KEEP)
    if not converted:
        raise ValueError(f"no linear layer of the {spec.name} model is left to quantize (all "
                         f"matched with.keep: {sorted(kept)[:5]})")
    curve = self_distill(teacher, student, spec, pool, steps=cfg.steps,
                         batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    packed, report = pack_student(student)
    export = dequantized_student(student)

    speed_labels = labels[: cfg.speed_samples]
    fp_rate, fp_peak = _timed_sample(spec, teacher, speed_labels, cfg.seed, options, device)
    q_rate, q_peak = _timed_sample(spec, packed, speed_labels, cfg.seed, options, device)
    tenth = max(1, len(curve) // 10)
    metrics: dict[str, float] = {
        "ternary.converted_layers": float(len(report.converted)),
        "ternary.kept_layers": float(len(kept)),
        "ternary.weight_bytes_fp32": float(report.bytes_before),
        "ternary.weight_bytes_bf16": float(report.bf16_bytes),
        "ternary.weight_bytes_packed": float(report.bytes_after),
        "ternary.ratio_to_bf16": float(report.ratio_to_bf16),
        "model_bytes.fp": float(model_bytes(teacher)),
        "model_bytes.ternary": float(model_bytes(packed)),
        "distill.loss_first": float(np.mean(curve[:tenth])),
        "distill.loss_last": float(np.mean(curve[-tenth:])),
        "sample.per_s_fp": fp_rate, "sample.per_s_ternary": q_rate,
    }
    if fp_peak is not None and q_peak is not None:
        metrics.update({"peak_memory.fp": fp_peak, "peak_memory.ternary": q_peak})

    fs, path = filesystem_for(plan["output_uri"])
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(export.cpu(), tmp)
        state = {k: v.detach().cpu().contiguous() for k, v in packed.state_dict().items()}
        save_file(state, os.path.join(tmp, "ternary.safetensors"),
                  metadata={"family": spec.name, "format": "vgen-ternary/1",
                            "converted": json.dumps(report.converted)})
        with open(os.path.join(tmp, "ternary.json"), "w") as f:
            json.dump({"converted": report.converted, "kept": kept, "metrics": metrics}, f,
                      indent=2, sort_keys=True)
        fs.makedirs(path, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            fs.put(os.path.join(tmp, name), f"{path.rstrip('/')}/{name}")
    return metrics, curve


class QuantizeTernary(JobStage):
    kind = "quantize.ternary"
    version = 1
    Config = QuantizeTernaryConfig
    needs_range = (1, 1)
    config: QuantizeTernaryConfig

    def _where(self) -> str:
        return f"stage '{self.ctx.stage}'"

    def generator_ref(self) -> OutputRef:
        refs = [outs["generator"] for outs in self.ctx.inputs.values() if "generator" in outs]
        if len(refs) != 1:
            raise StageError(f"{self._where()}: needs one stage with a generator output "
                             "(train.generator or import.weights)")
        return refs[0]

    def row_fingerprint_parts(self) -> dict[str, Any]:
        """The generator's digest and the quantization code's version (config: by the runner)."""
        from vgen_core.training.ternary import TERNARY_VERSION

        refs = [outs["generator"] for outs in self.ctx.inputs.values() if "generator" in outs]
        return {"generator": refs[0].digest if refs else None, "ternary": TERNARY_VERSION}

    def run(self, executor: Any = None) -> StageResult:
        from vgen_core.tokenizers.io import weights_digest

        from .evaluate_generation import load_model_ref

        executor = executor or InProcessExecutor()
        gen = self.generator_ref()
        name = f"models/{self.ctx.dag}/{self.ctx.stage}/{self.ctx.row_fingerprint}"
        output_uri = self.ctx.store.path(name)
        plan = {"generator": gen.to_json(), "config": self.config.model_dump(),
                "output_uri": output_uri}

        def items():
            import ray.data

            return ray.data.from_items([{"job": 0}])

        try:
            (row,) = [r for b in executor.map_actors(
                _QuantizeActor, (plan,), make_ds=items,
                local_batches=lambda: iter([pa.table({"job": [0]})]), batch_size=1,
                resources=self.ctx.resources, num_batches=1) for r in b.to_pylist()]
        except ValueError as e:
            raise StageError(f"{self._where()}: {e}") from None
        metrics = json.loads(row["metrics"])
        for step, loss in enumerate(json.loads(row["curve"])):
            self.ctx.tracker.log_metrics({"distill/loss": loss}, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            digest = weights_digest(load_model_ref(OutputRef("model", name, output_uri), tmp))
        return StageResult(outputs={"generator": OutputRef("model", name, output_uri,
                                                           digest=digest)},
                           metrics=metrics, counts=Counts(processed=1))
