"""The train loop run by every worker, around a DeepSpeed engine.

``deepspeed_config`` turns a :class:`TrainConfig` into DeepSpeed's JSON config (ZeRO stage,
precision, accumulation, clipping). Precision: bf16 on CUDA, fp32 on CPU (gloo). The LR schedule
(linear warmup, then cosine or constant) is applied by the loop itself so it is the same function
the tests check (:func:`lr_at`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TrainConfig", "deepspeed_config", "lr_at", "train_loop", "LOOP_VERSION"]

#: Bump when the loop's semantics change (part of every train stage's fingerprint).
LOOP_VERSION = 1


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
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True}
    return ds


def train_loop(engine: Any, batches: Iterator[dict[str, torch.Tensor]],
               loss_fn: Callable[[Any, dict[str, torch.Tensor], int], tuple[torch.Tensor, dict]],
               cfg: TrainConfig, *, on_log: Callable[[int, dict[str, float]], None] | None = None,
               start_step: int = 0) -> dict[str, float]:
    """Run ``cfg.steps`` optimizer steps. ``loss_fn(module, batch, step) -> (loss, metrics)``.

    Returns the last logged metrics (``loss`` averaged over the last ``log_every`` steps).
    """
    step = start_step
    window: list[float] = []
    extra: dict[str, float] = {}
    last: dict[str, float] = {}
    t0 = time.time()
    micro = 0
    for batch in batches:
        lr = lr_at(step, cfg)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        loss, metrics = loss_fn(engine.module, batch, step)
        engine.backward(loss)
        engine.step()
        micro += 1
        window.append(float(loss.detach()))
        for k, v in metrics.items():
            extra[k] = float(v)
        if micro % cfg.grad_accum:
            continue
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            last = {"loss": sum(window) / len(window), "lr": lr, **extra,
                    "steps_per_second": cfg.log_every / max(time.time() - t0, 1e-9)}
            t0 = time.time()
            window.clear()
            if on_log:
                on_log(step, last)
        if step >= cfg.steps:
            break
    return last
