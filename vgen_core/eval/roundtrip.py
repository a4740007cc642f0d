"""Tokenizer round trips through a family's spec: images -> ``encode`` -> ``decode`` -> images.

What a reconstruction is, for every tokenizer family (:mod:`vgen_core.families`), without
branching on the family's name, only on what its ``encode`` returned:

* discrete tokens (``indices``: bit tokens (B, h, w) on a conv grid, or ids (B, L)): the ids are
  decoded as a generator's tokens would be, (B, L) with ``grid_hw = (h, w)`` for a grid;
* latents (``moments`` (B, 2C, ...) = posterior mean || logvar, raw): the posterior mean,
  multiplied by the model config's ``scale_factor`` (1.0 when it has none) into generator space,
  is decoded (the family's ``decode`` divides it out again).

Images are in the family's ``pixel_range`` both ways; :func:`to_unit` maps them to [0, 1] (PSNR,
feature extractors).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["reconstruct", "posterior_mean", "scale_factor", "to_unit"]


def scale_factor(model: Any) -> float:
    """The model config's latent ``scale_factor`` (1.0 when it has none)."""
    return float(getattr(getattr(model, "config", None), "scale_factor", None) or 1.0)


def posterior_mean(moments: Tensor) -> Tensor:
    """Raw moments (B, 2C, ...) = mean || logvar -> the mean (B, C, ...)."""
    if moments.ndim < 2 or moments.shape[1] % 2:
        raise ValueError(f"moments must be (B, 2C, ...) = mean || logvar, got "
                         f"{tuple(moments.shape)}")
    return moments[:, : moments.shape[1] // 2]


def reconstruct(spec: Any, model: Any, x_BCHW: Tensor) -> Tensor:
    """``x_BCHW`` (in ``spec.pixel_range``) encoded and decoded by ``model`` through its family
    ``spec``; returns the decoder output (B, C, H, W), unclamped, in the same pixel range."""
    if spec.encode is None or spec.decode is None:
        raise ValueError(f"the {spec.name} family cannot both encode and decode images here")
    out = spec.encode(model, x_BCHW)
    B = x_BCHW.shape[0]
    if "moments" in out:
        z = posterior_mean(out["moments"]) * scale_factor(model)
        return spec.decode(model, z, None)
    if "indices" in out:
        idx = out["indices"]
        grid_hw = tuple(int(s) for s in idx.shape[1:]) if idx.ndim == 3 else None
        return spec.decode(model, idx.reshape(B, -1), grid_hw)
    raise ValueError(f"the {spec.name} family's encode returned {sorted(out)}; a round trip needs "
                     "'indices' (tokens) or 'moments' (latents)")


def to_unit(x_BCHW: Tensor, pixel_range: str) -> Tensor:
    """Images in ``pixel_range`` (signed [-1, 1] / unit [0, 1]) -> float [0, 1], clamped."""
    if pixel_range == "signed":
        return (x_BCHW.float().clamp(-1, 1) + 1) / 2
    if pixel_range == "unit":
        return x_BCHW.float().clamp(0, 1)
    raise ValueError(f"pixel range {pixel_range!r} not known; use signed or unit")
