"""Reconstruction and codebook metrics for tokenizers: PSNR, codebook usage/entropy, bit balance.

Conventions (methods.md §4, 1d-tokenizer/MaskBit evaluator):
- PSNR = 10 * log10(data_range**2 / MSE) per image; the dataset number is the mean of per-image
  values. Use data_range=1.0 for images in [0, 1] and data_range=2.0 for images in [-1, 1] (or
  map [-1, 1] to [0, 1] first; both give the same value). Clamp reconstructions to the valid range
  before calling, as the official evaluators do.
- Codebook usage = |unique ids| / codebook size; codebook entropy = -sum p log2 p over id counts.

Shape legend: B batch, C channels, H/W image size, K bits per token.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["bit_balance", "codebook_usage", "psnr"]


def psnr(
    x_BCHW: Tensor,
    y_BCHW: Tensor,
    data_range: float = 1.0,
    reduction: Literal["none", "mean"] = "none",
) -> Tensor:
    """Peak signal-to-noise ratio in dB, computed in float64.

    Args:
        x_BCHW, y_BCHW: images of the same shape (B, ...); every non-batch element counts.
        data_range: max - min of the pixel range (1.0 for [0, 1], 2.0 for [-1, 1], 255 for uint8).
        reduction: 'none' -> (B,) per-image PSNR; 'mean' -> scalar mean of the per-image values.
    Identical images give +inf.
    """
    if x_BCHW.shape != y_BCHW.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(x_BCHW.shape)} vs {tuple(y_BCHW.shape)}.")
    if x_BCHW.ndim < 2:
        raise ValueError(f"psnr: expected a batch (B, ...), got shape {tuple(x_BCHW.shape)}.")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}.")
    diff = x_BCHW.detach().double() - y_BCHW.detach().double()
    mse_B = diff.pow(2).flatten(1).mean(1)
    psnr_B = 10.0 * torch.log10(torch.as_tensor(data_range, dtype=torch.float64) ** 2 / mse_B)
    if reduction == "none":
        return psnr_B
    if reduction == "mean":
        return psnr_B.mean()
    raise ValueError(f"psnr: reduction must be 'none' or 'mean', got {reduction!r}.")


def _to_numpy(a: np.ndarray | Tensor) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def codebook_usage(indices: np.ndarray | Tensor, codebook_size: int) -> dict[str, float]:
    """Usage statistics of code ids (any shape, all elements counted).

    Returns:
        unique: number of distinct ids used; usage_fraction: unique / codebook_size;
        entropy_bits: -sum p log2 p of the id histogram (log2(codebook_size) at most);
        perplexity: 2 ** entropy_bits (effective number of equally used codes).
    """
    ids = _to_numpy(indices).reshape(-1)
    if ids.size == 0:
        raise ValueError("codebook_usage: no indices given.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"codebook_usage: expected integer ids, got dtype {ids.dtype}.")
    if ids.min() < 0 or ids.max() >= codebook_size:
        raise ValueError(
            f"codebook_usage: ids span [{ids.min()}, {ids.max()}] but "
            f"codebook_size={codebook_size}."
        )
    counts = np.bincount(ids.astype(np.int64), minlength=codebook_size)
    p = counts[counts > 0] / ids.size
    entropy_bits = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
    unique = int((counts > 0).sum())
    return {
        "unique": unique,
        "usage_fraction": unique / codebook_size,
        "entropy_bits": entropy_bits,
        "perplexity": float(2.0**entropy_bits),
    }


def bit_balance(bits_NK: np.ndarray | Tensor) -> np.ndarray:
    """Per-bit fraction of ones over all tokens: (..., K) bool -> (K,) float64 (0.5 = balanced)."""
    arr = _to_numpy(bits_NK)
    if arr.dtype != np.bool_:
        raise TypeError(f"bit_balance: expected bool bits, got dtype {arr.dtype}.")
    if arr.ndim == 0 or arr.size == 0:
        raise ValueError(
            f"bit_balance: expected a non-empty (..., K) array, got shape {arr.shape}."
        )
    return arr.reshape(-1, arr.shape[-1]).mean(axis=0, dtype=np.float64)
