"""Trainable model families: how to build each one and its training loss.

Batches are dicts of tensors as the train stage feeds them:
``lfq``: ``image`` uint8 (B, H, W, 3); ``maskgit``: ``tokens`` int64 (B, L), ``label`` int64 (B,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Task", "TASKS", "get_task", "images_to_model"]


def images_to_model(image_BHWC: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [-1, 1]."""
    return image_BHWC.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


@dataclass(frozen=True)
class Task:
    family: str
    build: Callable[[str, dict[str, Any], dict[str, Any]], nn.Module]
    loss: Callable[[nn.Module, dict[str, torch.Tensor], int], tuple[torch.Tensor, dict]]
    #: (size, overrides) -> the resolved model config as JSON (for fingerprints: a change of a
    #: registry default retrains, as a change of the DAG's config does)
    config: Callable[[str, dict[str, Any]], dict[str, Any]]


def _build_lfq(size: str, overrides: dict[str, Any], data: dict[str, Any]) -> nn.Module:
    from vgen_core.tokenizers.lfq import lfq_config

    return lfq_config(size, **overrides).build()


def _config_lfq(size: str, overrides: dict[str, Any]) -> dict[str, Any]:
    from vgen_core.tokenizers.lfq import lfq_config

    return lfq_config(size, **overrides).model_dump(mode="json")


def _loss_lfq(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
    images = images_to_model(batch["image"])
    recon, losses = model(images, step=step)
    mse = F.mse_loss(recon, images)
    total = mse + losses["total_quant"]
    return total, {"mse": mse.detach(), "commitment": losses["commitment"].detach(),
                   "entropy": losses["entropy"].detach()}


def _build_maskgit(size: str, overrides: dict[str, Any], data: dict[str, Any]) -> nn.Module:
    from vgen_core.generators.masked import maskgit_config

    fields = {k: data[k] for k in ("codebook_size", "seq_len", "num_classes") if k in data}
    return maskgit_config(size, **{**fields, **overrides}).build()


def _config_maskgit(size: str, overrides: dict[str, Any]) -> dict[str, Any]:
    from vgen_core.generators.masked import maskgit_config

    return maskgit_config(size, **overrides).model_dump(mode="json")


def _loss_maskgit(model: nn.Module, batch: dict[str, torch.Tensor], step: int):
    from vgen_core.generators.masked import masked_token_loss

    loss, metrics = masked_token_loss(model, batch["tokens"].long(), batch["label"].long())
    return loss, {k: v.detach() for k, v in metrics.items() if torch.is_tensor(v)}


TASKS: dict[str, Task] = {
    "lfq": Task("lfq", _build_lfq, _loss_lfq, _config_lfq),
    "maskgit": Task("maskgit", _build_maskgit, _loss_maskgit, _config_maskgit),
}


def get_task(family: str) -> Task:
    if family not in TASKS:
        raise ValueError(f"model family {family!r} not found; known: {', '.join(TASKS)}")
    return TASKS[family]
