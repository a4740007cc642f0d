"""Specification of the ternary (1.58-bit) linear layer, in plain PyTorch.

Shapes: ``N`` output features, ``K`` input features, ``K4 = ceil(K / 4)`` packed bytes per row,
``M`` rows of activations (every leading dimension of ``x`` flattened).

Quantization (BitNet b1.58 absmean, one scale per output channel):

    scale_N = max(mean_k |W_NK|, EPS)              (fp32; EPS = 1e-5 keeps a zero row finite)
    Wq_NK   = clamp(round(W_NK / scale_N), -1, +1) (round half to even, as ``torch.round``)
    W_NK   ~= Wq_NK * scale_N

Packing: four 2-bit codes per byte along the input dimension. Weight ``k`` of row ``n`` lives in
byte ``packed[n, k // 4]`` at bits ``2 * (k % 4)`` and ``2 * (k % 4) + 1`` (the first weight in the
least significant bits). Codes: ``0b00 -> 0``, ``0b01 -> +1``, ``0b10 -> -1``; ``0b11`` is never
written and decodes to 0, so ``value = (code & 1) - (code >> 1)``. The input dimension is padded
with code 0 up to a multiple of 4.
"""

from __future__ import annotations

import torch

EPS = 1e-5
"""Lower bound on the per-channel scale: an all-zero row quantizes to zeros with scale 1e-5."""

def quantize_ternary(weight_NK: torch.Tensor,
                     eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean quantization of a weight ``(N, K)`` (any float dtype), computed in fp32.

    Returns ``(wq_NK int8 in {-1, 0, 1}, scale_N float32)``.
    """
    if weight_NK.dim() != 2:
        raise ValueError(f"quantize_ternary: expected a 2-D weight (out, in), got shape "
                         f"{tuple(weight_NK.shape)}; reshape it or quantize each matrix separately")
    w = weight_NK.detach().float()
    scale_N = w.abs().mean(dim=1).clamp_min(eps)
    wq_NK = torch.round(w / scale_N[:, None]).clamp_(-1, 1).to(torch.int8)
    return wq_NK, scale_N


def pack_ternary(wq_NK: torch.Tensor) -> torch.Tensor:
    """Pack ternary values ``(N, K)`` in {-1, 0, 1} into ``(N, ceil(K / 4))`` uint8 (see above)."""
    if wq_NK.dim() != 2:
        raise ValueError(f"pack_ternary: expected (out, in), got shape {tuple(wq_NK.shape)}")
    N, K = wq_NK.shape
    w = wq_NK.to(torch.int16)
    if bool(((w < -1) | (w > 1)).any()):
        raise ValueError("pack_ternary: values must be in {-1, 0, 1}; quantize with "
                         "quantize_ternary first")
    code = (w == 1).to(torch.uint8) | ((w == -1).to(torch.uint8) << 1)
    pad = (-K) % 4
    if pad:
        code = torch.cat([code, code.new_zeros(N, pad)], dim=1)
    code_NK4_4 = code.view(N, -1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=code.device)
    return (code_NK4_4 << shifts).sum(dim=2, dtype=torch.uint8)


def unpack_ternary(packed_NK4: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``(N, ceil(K / 4))`` uint8 -> ``(N, K)`` int8."""
    _check_packed(packed_NK4, in_features)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed_NK4.device)
    code = (packed_NK4[:, :, None] >> shifts) & 3
    value = (code & 1).to(torch.int8) - (code >> 1).to(torch.int8)
    return value.reshape(packed_NK4.shape[0], -1)[:, :in_features]


def quantize_and_pack(weight_NK: torch.Tensor,
                      eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed_NK4 uint8, scale_N float32)`` for a weight ``(N, K)``."""
    wq_NK, scale_N = quantize_ternary(weight_NK, eps)
    return pack_ternary(wq_NK), scale_N


def dequantize_ternary(packed_NK4: torch.Tensor, scale_N: torch.Tensor,
                       in_features: int) -> torch.Tensor:
    """The effective weight ``unpack * scale`` as ``(N, K)`` fp32."""
    return unpack_ternary(packed_NK4, in_features).float() * scale_N.float()[:, None]


def ternary_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                             in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (unpack(packed) * scale).T (+ bias)`` computed in fp32, returned in ``x.dtype``.

    x ``(..., K)``, packed ``(N, ceil(K / 4))`` uint8, scale ``(N,)``, bias ``(N,)`` or None;
    returns ``(..., N)``. Differentiable with respect to ``x`` and ``bias``.
    """
    check_operands(x, packed, scale, in_features, bias)
    y = x.float() @ dequantize_ternary(packed, scale, in_features).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def packed_bytes_per_row(in_features: int) -> int:
    """Bytes one output row takes in the packed layout (input dim padded to a multiple of 4)."""
    return (in_features + 3) // 4


def _check_packed(packed: torch.Tensor, in_features: int) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed weight must be 2-D uint8 (out, ceil(in/4)), got "
                         f"{packed.dtype} {tuple(packed.shape)}; build it with pack_ternary")
    if packed.shape[1] != packed_bytes_per_row(in_features):
        raise ValueError(f"packed weight has {packed.shape[1]} bytes per row but in_features="
                         f"{in_features} needs {packed_bytes_per_row(in_features)}; pass the "
                         f"in_features the weight was packed with")


def check_operands(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                   bias: torch.Tensor | None = None) -> None:
    """Shared validation for every backend; raises ValueError saying what to fix."""
    _check_packed(packed, in_features)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the ternary weight expects "
                         f"{in_features}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    N = packed.shape[0]
    if scale.shape != (N,) or not scale.is_floating_point():
        raise ValueError(f"scale must be a float tensor of shape ({N},), got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
