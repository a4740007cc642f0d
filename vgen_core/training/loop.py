"""The train loop run by every worker, around a DeepSpeed engine.

``deepspeed_config`` turns a :class:`TrainConfig` into DeepSpeed's JSON config (ZeRO stage,
precision, accumulation, clipping). Precision: bf16 on CUDA, fp32 on CPU (gloo). The LR schedule
(linear warmup, then cosine or constant) is applied by the loop itself so it is the same function
the tests check (:func:`lr_at`). The loop starts at any optimizer step (a resume) and calls
``on_step`` after each one (EMA update, checkpoint); checkpoints themselves are
:mod:`vgen_core.training.checkpoint`'s business. What makes a step fast without changing its
maths (fused AdamW, the non-finite-gradient guard, ``compile``, activation checkpointing,
flash-first attention) is :mod:`vgen_core.training.step`.

``compile`` and ``activation_checkpointing`` are execution settings: they change how fast a step
runs and how much memory it takes, not what it computes, so ``model_dump`` leaves them out and the
stage fingerprint (and MLflow's params) never see them; a stage trained eagerly is not retrained
because compile was switched on, and a resume may switch either. :meth:`TrainConfig.dump` has
every field, for the workers; the train stage records them as MLflow tags.
"""

from __future__ import annotations

import math
import time
from typing import Any
from collections.abc import Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from .step import attention_backends

__all__ = ["TrainConfig", "deepspeed_config", "lr_at", "train_loop", "LOOP_VERSION",
           "EXECUTION_FIELDS"]

#: Bump when the loop's semantics change (part of every train stage's fingerprint).
#: 2: resume from checkpoints (RNG and data position restored), EMA export, throughput metrics,
#:    bf16 without DeepSpeed's per-parameter overflow scan.
#: 3: steps with a non-finite gradient are skipped in every precision (FiniteGuard; bf16 applied
#:    them), fused AdamW on CUDA.
LOOP_VERSION = 3

#: TrainConfig fields that change how a step runs, not its result (not fingerprinted)
EXECUTION_FIELDS = ("compile", "activation_checkpointing")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1, description="per worker, per micro-step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = Field(0, ge=0)
    schedule: str = Field("cosine", pattern="^(cosine|constant)$")
    grad_clip: float = Field(1.0, ge=0)
    zero_stage: int = Field(2, ge=0, le=3)
    precision: str = Field("auto", pattern="^(auto|fp32|bf16|fp16)$")
    log_every: int = Field(5, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(100, ge=0, description="optimizer steps between checkpoints "
                                  "(one also after the last step); 0: none, so no resume")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the weights, exported instead "
                             "of the raw weights; 0: off")
    max_failures: int = Field(2, ge=-1, description="restarts of the worker group from the last "
                              "checkpoint after a worker failure (Ray Train); -1: unlimited")
    # execution settings (EXECUTION_FIELDS): excluded from model_dump, hence from fingerprints
    compile: bool = Field(False, exclude=True, description="torch.compile the model (static "
                          "shapes); same maths, not part of the stage fingerprint")
    activation_checkpointing: bool = Field(False, exclude=True, description="recompute each "
                                           "transformer block's activations in the backward "
                                           "(less memory, ~1/3 more compute); same gradients, "
                                           "not part of the stage fingerprint")

    def dump(self) -> dict[str, Any]:
        """Every field, the execution settings included (``model_dump`` leaves them out):
        what a worker gets to rebuild this config with ``model_validate``."""
        return {**self.model_dump(), **{k: getattr(self, k) for k in EXECUTION_FIELDS}}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine to
    ``lr * min_lr_ratio`` at ``steps`` (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def deepspeed_config(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """DeepSpeed JSON config for ``cfg`` on ``device``."""
    precision = resolve_precision(cfg, device)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    if precision == "bf16":
        # bf16 needs no loss scaling; DeepSpeed's per-parameter inf/nan scan before each step
        # is host work that cost 35% of the step of a MaskGIT-B on an H100 (see
        # benchmarks/train_overhead.py). The gradient norm for clipping is still computed, and
        # step.FiniteGuard skips a step on it when it is not finite.
        ds["bf16"] = {"enabled": True, "check_grad_overflow": False}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True}
    return ds


@torch.enable_grad()  # whatever grad mode the caller's thread was left in
def train_loop(engine: Any, batches: Iterator[dict[str, torch.Tensor]],
               loss_fn: Callable[[Any, dict[str, torch.Tensor], int], tuple[torch.Tensor, dict]],
               cfg: TrainConfig, *, on_log: Callable[[int, dict[str, float]], None] | None = None,
               on_step: Callable[[int, dict[str, float]], None] | None = None,
               start_step: int = 0, world_size: int = 1,
               tokens_per_sample: int | None = None, guard: Any = None) -> dict[str, float]:
    """Run optimizer steps ``start_step + 1 .. cfg.steps``.

    ``loss_fn(module, batch, step) -> (loss, metrics)``. Every ``log_every`` steps (and at the
    last) ``on_log(step, metrics)`` gets ``loss`` (mean over the window), ``lr``, the task's
    metrics, ``steps_per_second``, ``samples_per_second`` (all ranks), ``tokens_per_second``
    (when ``tokens_per_sample`` is known), ``gpu_mem_max_gb`` on CUDA and, with a ``guard``
    (:class:`~vgen_core.training.step.FiniteGuard`), ``skipped_steps`` (optimizer steps
    skipped so far for a non-finite gradient, by the guard or by DeepSpeed's own checks).
    After every optimizer step ``on_step(step, last_logged_metrics)`` runs (EMA update,
    checkpoint). Nothing is read back from the device between log steps. On CUDA attention
    tries FlashAttention first (:func:`~vgen_core.training.step.attention_backends`).

    Returns the last logged metrics ({} when no step was left to run).
    """
    if start_step >= cfg.steps:
        return {}
    first = next(iter(engine.module.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    with attention_backends(device):
        return _steps(engine, batches, loss_fn, cfg, on_log, on_step, start_step, world_size,
                      tokens_per_sample, guard)


def _steps(engine: Any, batches: Iterator[dict[str, torch.Tensor]], loss_fn: Callable[..., Any],
           cfg: TrainConfig, on_log: Callable[[int, dict[str, float]], None] | None,
           on_step: Callable[[int, dict[str, float]], None] | None, start_step: int,
           world_size: int, tokens_per_sample: int | None, guard: Any) -> dict[str, float]:
    step = start_step
    window_loss: torch.Tensor | float = 0.0
    window_micro = 0
    extra: dict[str, torch.Tensor | float] = {}
    last: dict[str, float] = {}
    samples_per_step = cfg.micro_batch_size * cfg.grad_accum * world_size
    t0, t0_step = time.perf_counter(), step
    micro = 0
    lr = lr_at(step, cfg)
    for batch in batches:
        if micro % cfg.grad_accum == 0:
            lr = lr_at(step, cfg)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
        loss, metrics = loss_fn(engine.module, batch, step)
        engine.backward(loss)
        engine.step()
        micro += 1
        window_loss = window_loss + loss.detach()  # stays on device: no sync per step
        window_micro += 1
        extra.update({k: (v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()})
        if micro % cfg.grad_accum:
            continue
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = max(time.perf_counter() - t0, 1e-9)
            steps_per_s = (step - t0_step) / elapsed
            last = {"loss": float(window_loss) / window_micro, "lr": lr,
                    **{k: float(v) for k, v in extra.items()},
                    "steps_per_second": steps_per_s,
                    "samples_per_second": steps_per_s * samples_per_step}
            if tokens_per_sample:
                last["tokens_per_second"] = last["samples_per_second"] * tokens_per_sample
            device = loss.device
            if device.type == "cuda":
                last["gpu_mem_max_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if guard is not None:  # skipped by the guard, or by DeepSpeed itself (no overlap)
                last["skipped_steps"] = float(guard.skipped_steps()
                                              + int(getattr(engine, "skipped_steps", 0)))
            window_loss, window_micro = 0.0, 0
            t0, t0_step = time.perf_counter(), step  # logging and checkpoints count as time
            if on_log:
                on_log(step, last)
        if on_step:
            on_step(step, last)
        if step >= cfg.steps:
            break
    return last
