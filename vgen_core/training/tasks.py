"""Trainable model families: how to build each one, its training loss, and what data it eats.

A :class:`Task` ties a family name (the DAG's ``model:``) to its config registry, a builder that
takes the data's facts (codebook size, sequence length, classes, bits, latent shape) and a
batch-level loss ``loss(model, batch, step, **options) -> (loss, metrics)``; ``options`` come
from the train stage's ``loss:`` mapping (e.g. RAR's ``anneal_start``/``anneal_end``).

``data`` names the batch the train stage feeds (dicts of tensors):

=============  ===========================================================================
images         ``image`` uint8 (B, H, W, 3), ``label`` int64 (B,) (curated image tables)
bit_tokens     ``tokens`` int64 (B, L) indices of K-bit tokens, ``label`` (B,)
id_tokens      ``tokens`` int64 (B, L), ``label`` (B,), ``text_ids`` int64 (B, 77) if captions
latents        ``moments`` float32 (B, 2C, ...) = mean || logvar, ``label`` (B,); sampled and
               scaled by the model's loss (one cache serves every noise draw)
delta_tokens   ``delta`` float32 (B, T, D), ``timestamps`` float32 (B, T)
=============  ===========================================================================

Tokenizer losses are the reconstruction and quantizer terms of methods.md §1 (L2 / L1 plus the
VQ commitment+codebook, LFQ commitment+entropy, or KL terms); the perceptual (LPIPS, ConvNeXt),
CLIP-alignment, Gram and GAN terms need pretrained networks that cannot be downloaded here and
are not part of these losses (docs/design.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Task", "TASKS", "get_task", "images_to_model"]


def images_to_model(image_BHWC: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [-1, 1]."""
    return image_BHWC.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def images_to_unit(image_BHWC: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    return image_BHWC.permute(0, 3, 1, 2).float().div(255.0).contiguous()


@dataclass(frozen=True)
class Task:
    family: str
    #: "module.path:config_function" -- (size, **overrides) -> pydantic config with build()
    config_fn: str
    loss: Callable[..., tuple[torch.Tensor, dict]]
    data: str
    #: data facts (from the side table) copied into the model config when it has the field
    data_fields: tuple[str, ...] = ()
    kind: str = "generator"  # or "tokenizer"
    extra: dict[str, Any] = field(default_factory=dict)

    def _config_function(self) -> Callable[..., Any]:
        module, _, name = self.config_fn.partition(":")
        return getattr(importlib.import_module(module), name)

    def model_config(self, size: str, overrides: dict[str, Any],
                     data: dict[str, Any] | None = None) -> Any:
        fn = self._config_function()
        base = fn(size)
        fields = {k: (data or {})[k] for k in self.data_fields
                  if k in (data or {}) and k in type(base).model_fields}
        return fn(size, **{**fields, **overrides})

    def build(self, size: str, overrides: dict[str, Any], data: dict[str, Any]) -> nn.Module:
        return self.model_config(size, overrides, data).build()

    def config(self, size: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """The resolved model config as JSON (for fingerprints: a registry default change
        retrains, as a change of the DAG's config does)."""
        return self.model_config(size, overrides).model_dump(mode="json")


# -- tokenizers ---------------------------------------------------------------------------------


def _loss_lfq(model: nn.Module, batch: dict[str, torch.Tensor], step: int, **_: Any):
    images = images_to_model(batch["image"])
    recon, losses = model(images, step=step)
    mse = F.mse_loss(recon, images)
    total = mse + losses["total_quant"]
    return total, {"mse": mse.detach(), "commitment": losses["commitment"].detach(),
                   "entropy": losses["entropy"].detach()}


def _loss_titok(model: nn.Module, batch: dict[str, torch.Tensor], step: int, **_: Any):
    """Single-stage TiTok (RGB head): L2 in [0, 1] pixels + the quantizer (VQ) or KL term."""
    images = images_to_unit(batch["image"])
    recon, info = model(images)
    if recon.shape != images.shape:
        raise ValueError("TiTok training here needs the RGB head (is_legacy: false); the legacy "
                         "head predicts MaskGIT-VQGAN proxy codes (two-stage recipe)")
    mse = F.mse_loss(recon, images)
    return mse + info["quantizer_loss"], {"mse": mse.detach(),
                                         "quantizer": info["quantizer_loss"].detach()}


def _loss_bar_fsq(model: nn.Module, batch: dict[str, torch.Tensor], step: int, **_: Any):
    """BAR-FSQ: L1 x 0.1 + L2 x 1.0 in [-1, 1] pixels (official weights)."""
    images = images_to_model(batch["image"])
    recon, _ = model(images)
    l1, mse = F.l1_loss(recon, images), F.mse_loss(recon, images)
    return 0.1 * l1 + mse, {"mse": mse.detach(), "l1": l1.detach()}


def _loss_kl_vae(model: nn.Module, batch: dict[str, torch.Tensor], step: int, *,
                 kl_weight: float = 1e-6, **_: Any):
    """LDM autoencoder: L1 reconstruction + kl_weight x KL (per sample, summed over latents)."""
    images = images_to_model(batch["image"])
    recon, d = model(images)
    l1 = F.l1_loss(recon, images)
    kl = d["kl"].mean()
    return l1 + kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach(),
                                 "mse": F.mse_loss(recon, images).detach()}


# -- generators ---------------------------------------------------------------------------------


def _loss_maskgit(model: nn.Module, batch: dict[str, torch.Tensor], step: int, **opts: Any):
    from vgen_core.generators.masked import masked_token_loss

    loss, metrics = masked_token_loss(model, batch["tokens"].long(), batch["label"].long(), **opts)
    return loss, metrics


def _loss_rar(model: nn.Module, batch: dict[str, torch.Tensor], step: int, **opts: Any):
    from vgen_core.generators.rar import rar_loss

    return rar_loss(model, batch["tokens"].long(), batch["label"].long(), step, **opts)


def _loss_bar(model: nn.Module, batch: dict[str, torch.Tensor], step: int, **opts: Any):
    from vgen_core.generators.bar import bar_loss

    return bar_loss(model, batch["tokens"].long(), batch["label"].long(), step, **opts)


def _batch_loss(path: str) -> Callable[..., tuple[torch.Tensor, dict]]:
    module, _, name = path.partition(":")

    def loss(model: nn.Module, batch: dict[str, torch.Tensor], step: int, **opts: Any):
        return getattr(importlib.import_module(module), name)(model, batch, step, **opts)

    loss.__name__ = f"loss_{name}"
    return loss


_G = "vgen_core.generators"
_T = "vgen_core.tokenizers"
TASKS: dict[str, Task] = {
    # tokenizers (trained on curated image tables)
    "lfq": Task("lfq", f"{_T}.lfq:lfq_config", _loss_lfq, "images", kind="tokenizer"),
    "titok": Task("titok", f"{_T}.titok:titok_config", _loss_titok, "images", ("image_size",),
                  kind="tokenizer"),
    "bar_fsq": Task("bar_fsq", f"{_T}.fsq:bar_fsq_config", _loss_bar_fsq, "images",
                    ("image_size",), kind="tokenizer"),
    "kl_vae": Task("kl_vae", f"{_T}.kl_vae:kl_vae_config", _loss_kl_vae, "images",
                   kind="tokenizer"),
    # masked-token family
    "maskgit": Task("maskgit", f"{_G}.masked:maskgit_config", _loss_maskgit, "id_tokens",
                    ("codebook_size", "seq_len", "num_classes")),
    "maskgen": Task("maskgen", f"{_G}.maskgen:maskgen_config",
                    _batch_loss(f"{_G}.maskgen:maskgen_loss"), "id_tokens",
                    ("codebook_size", "seq_len")),
    "maskbit": Task("maskbit", f"{_G}.maskbit:maskbit_config",
                    _batch_loss(f"{_G}.maskbit:maskbit_loss"), "bit_tokens",
                    ("token_bits", "seq_len", "num_classes")),
    # autoregressive family
    "rar": Task("rar", f"{_G}.rar:rar_config", _loss_rar, "id_tokens",
                ("codebook_size", "seq_len", "num_classes")),
    "bar": Task("bar", f"{_G}.bar:bar_config", _loss_bar, "bit_tokens",
                ("token_bits", "seq_len", "num_classes")),
    # flow family (continuous latents)
    "deepflow": Task("deepflow", f"{_G}.deepflow:deepflow_config",
                     _batch_loss(f"{_G}.deepflow:deepflow_loss"), "latents",
                     ("in_channels", "input_size", "num_classes", "scale_factor")),
    "xar": Task("xar", f"{_G}.xar:xar_config", _batch_loss(f"{_G}.xar:xar_loss"), "latents",
                ("in_channels", "latent_size", "num_classes", "scale_factor")),
    # world model on delta tokens
    "deltaworld": Task("deltaworld", f"{_G}.deltaworld:deltaworld_config",
                       _batch_loss(f"{_G}.deltaworld:deltaworld_loss"), "delta_tokens",
                       ("token_dim",)),
}


def get_task(family: str) -> Task:
    if family not in TASKS:
        raise ValueError(f"model family {family!r} not found; known: {', '.join(TASKS)}")
    return TASKS[family]
