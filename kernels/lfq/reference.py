"""Plain-PyTorch specification of the fused LFQ quantize kernel (the Triton kernel must match it).

Shape legend: B batch, N tokens per sample, K bits per token (1..32), P = ceil(K / 8) packed bytes.

This module is where the LFQ bit conventions are defined (``vgen_core/tokenizers/lfq.py`` imports
them from here, through ``kernels.lfq``): bit k of a token is set iff z_k > 0 (so z == 0 gives bit 0
and sign -1); index = sum_k bit_k * 2**k (LSB first, ``bits_to_indices`` / ``indices_to_bits``);
packed byte j holds bits 8j..8j+7 with bit k at position k % 8 (LSB first), so for K <= 8 the byte
equals the index.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MAX_INDEX_BITS",
    "MAX_TOKEN_BITS",
    "LFQQuantized",
    "bits_to_indices",
    "check_packed",
    "check_z",
    "indices_to_bits",
    "lfq_quantize",
    "unpack_to_signs",
]

MAX_TOKEN_BITS = 32  # lfq_quantize / unpack_to_signs (the Triton kernels' BLOCK_K)
MAX_INDEX_BITS = 62  # bits_to_indices / indices_to_bits: the index must fit an int64
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LFQQuantized(NamedTuple):
    """Outputs of ``lfq_quantize`` (a plain tuple, so it unpacks as four tensors)."""

    signs: Tensor  # (B, N, K) +-1 in z's dtype; straight-through gradient to z
    indices: Tensor  # (B, N) int64 code index, LSB first
    packed: Tensor  # (B, N, P) uint8, bit k in byte k // 8 at position k % 8
    bit_probs: Tensor  # (B, N, K) float32 P(bit_k = 1) = sigmoid(4 z_k / T); differentiable


def check_z(z_BNK: Tensor, temperature: float) -> None:
    """Raise a helpful error unless z is a (B, N, K) float tensor with 1 <= K <= 32 and T > 0."""
    if z_BNK.ndim != 3:
        raise ValueError(
            f"lfq_quantize: expected z of shape (B, N, K), got {tuple(z_BNK.shape)}; for encoder "
            "output (B, K, h, w) pass z.flatten(2).transpose(1, 2) (a view, no copy)."
        )
    K = z_BNK.shape[-1]
    if not 1 <= K <= MAX_TOKEN_BITS:
        raise ValueError(f"lfq_quantize: K must be in [1, {MAX_TOKEN_BITS}], got K={K}.")
    if z_BNK.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"lfq_quantize: z must be float16, bfloat16, float32 or float64, got {z_BNK.dtype}."
        )
    if not temperature > 0.0:
        raise ValueError(f"lfq_quantize: temperature must be > 0, got {temperature}.")


def check_packed(packed_BNP: Tensor, token_bits: int, dtype: torch.dtype) -> None:
    """Raise a helpful error unless packed is (B, N, ceil(K/8)) uint8 and K, dtype are valid."""
    if not 1 <= token_bits <= MAX_TOKEN_BITS:
        raise ValueError(
            f"unpack_to_signs: token_bits must be in [1, {MAX_TOKEN_BITS}], got {token_bits}."
        )
    n_bytes = (token_bits + 7) // 8
    if packed_BNP.dtype != torch.uint8 or packed_BNP.ndim != 3 or packed_BNP.shape[-1] != n_bytes:
        raise ValueError(
            f"unpack_to_signs: {token_bits} bits need uint8 of shape (B, N, {n_bytes}), got "
            f"{packed_BNP.dtype} {tuple(packed_BNP.shape)}; pass the K used when packing."
        )
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"unpack_to_signs: dtype must be a float dtype, got {dtype}.")


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = -1; backward is the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        return torch.where(z > 0, 1.0, -1.0).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def _bit_weights(n: int, device: torch.device) -> Tensor:
    return torch.ones(n, dtype=torch.int64, device=device) << torch.arange(n, device=device)


def bits_to_indices(bits_NK: Tensor) -> Tensor:
    """Token bits -> code index, LSB first: index = sum_k [bit_k] * 2**k.

    Plain PyTorch on every device (integer shifts and one sum; nothing for a kernel to fuse).

    Args:
        bits_NK: (..., K) bool, or real-valued where a bit is set iff the value is > 0 (so both
            {0,1} and {-1,+1} encodings work, and z itself gives the bits of ``lfq_quantize(z)``).
    Returns:
        (...,) int64 indices in [0, 2**K).
    """
    K = bits_NK.shape[-1]
    if K > MAX_INDEX_BITS:
        raise ValueError(
            f"bits_to_indices: K={K} bits do not fit an int64 index; use K <= {MAX_INDEX_BITS}."
        )
    set_NK = bits_NK if bits_NK.dtype == torch.bool else bits_NK > 0
    return (set_NK.to(torch.int64) * _bit_weights(K, bits_NK.device)).sum(-1)


def indices_to_bits(indices_N: Tensor, token_bits: int) -> Tensor:
    """Code index -> token bits (inverse of ``bits_to_indices``); plain PyTorch on every device.

    Args:
        indices_N: (...,) integer tensor with values in [0, 2**token_bits).
        token_bits: K.
    Returns:
        (..., K) bool; element k is bit k of the index (LSB first).
    """
    if not 1 <= token_bits <= MAX_INDEX_BITS:
        raise ValueError(
            f"indices_to_bits: token_bits must be in [1, {MAX_INDEX_BITS}], got {token_bits}."
        )
    if indices_N.dtype.is_floating_point or indices_N.dtype == torch.bool:
        raise TypeError(f"indices_to_bits: expected an integer tensor, got {indices_N.dtype}.")
    idx_N = indices_N.to(torch.int64)
    if idx_N.numel() and (int(idx_N.min()) < 0 or int(idx_N.max()) >= (1 << token_bits)):
        raise ValueError(
            f"indices_to_bits: indices must lie in [0, 2**{token_bits}) = [0, {1 << token_bits}), "
            f"got range [{int(idx_N.min())}, {int(idx_N.max())}]; check token_bits matches the "
            "tokenizer that produced them."
        )
    shifts_K = torch.arange(token_bits, device=idx_N.device)
    return ((idx_N.unsqueeze(-1) >> shifts_K) & 1).bool()


def lfq_quantize(z_BNK: Tensor, temperature: float = 0.01) -> LFQQuantized:
    """Quantize z to sign bits; also return code indices, packed bytes and bit probabilities.

    Args:
        z_BNK: (B, N, K) float16/bfloat16/float32/float64, any strides; 1 <= K <= 32.
        temperature: T of the LFQ entropy softmax(2 z.c / T) over the 2**K codes c in {-1,+1}^K.
    Returns:
        ``LFQQuantized(signs_BNK, indices_BN, packed_BNP, bit_probs_BNK)``; see the class.
        Gradients: d signs / d z = identity (straight-through); d bit_probs / d z = (4/T) p (1-p).
    """
    check_z(z_BNK, temperature)
    B, N, K = z_BNK.shape
    bits_BNK = z_BNK.detach() > 0
    signs_BNK = _SignSTE.apply(z_BNK)
    indices_BN = bits_to_indices(bits_BNK)

    P = (K + 7) // 8
    bits_BNQ = torch.zeros(B, N, 8 * P, dtype=torch.int64, device=z_BNK.device)
    bits_BNQ[..., :K] = bits_BNK.to(torch.int64)
    packed_BNP = (bits_BNQ.view(B, N, P, 8) * _bit_weights(8, z_BNK.device)).sum(-1)

    bit_probs_BNK = torch.sigmoid(z_BNK.float() * (4.0 / temperature))
    return LFQQuantized(signs_BNK, indices_BN, packed_BNP.to(torch.uint8), bit_probs_BNK)


def unpack_to_signs(
    packed_BNP: Tensor, token_bits: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Packed bytes -> (B, N, K) +-1 signs in ``dtype`` (inverse of the packing above).

    Bits of the last byte beyond K are ignored.
    """
    check_packed(packed_BNP, token_bits, dtype)
    k_K = torch.arange(token_bits, device=packed_BNP.device)
    bytes_BNK = packed_BNP.to(torch.int32)[..., k_K // 8]
    bits_BNK = ((bytes_BNK >> (k_K % 8)) & 1).bool()
    return torch.where(bits_BNK, 1.0, -1.0).to(dtype)
