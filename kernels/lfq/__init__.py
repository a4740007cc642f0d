"""Fused LFQ (lookup-free quantization) kernel: sign bits, code indices, packed bytes, bit probs.

Shape legend: B batch, N tokens per sample, K bits per token (1..32), P = ceil(K / 8) bytes.

    signs_BNK, indices_BN, packed_BNP, bit_probs_BNK = lfq_quantize(z_BNK, temperature=0.01)
    signs_BNK = unpack_to_signs(packed_BNP, K, dtype=torch.float32)

- ``signs_BNK``: (B, N, K) +-1 in z's dtype (sign(0) = -1); gradient straight through to z.
- ``indices_BN``: (B, N) int64, sum_k [z_k > 0] 2**k (LSB first).
- ``packed_BNP``: (B, N, P) uint8, bit k in byte k // 8 at position k % 8 (LSB first).
- ``bit_probs_BNK``: (B, N, K) float32 sigmoid(4 z / T) = P(bit_k = 1) under the LFQ entropy
  softmax(2 z.c / T) over the 2**K implicit codes; differentiable.

Backend: Triton (``triton.py``) when the tensor is on CUDA and Triton imports, the PyTorch
reference (``reference.py``) otherwise. ``VGEN_KERNELS=reference`` forces the reference;
``VGEN_KERNELS=triton`` forces Triton (e.g. on CPU tensors under ``TRITON_INTERPRET=1``).
Maths, memory layout and bytes moved: README.md in this folder.

The index convention as standalone helpers, plain PyTorch on every device (not dispatched):
``bits_to_indices(bits_NK) -> indices_N`` and ``indices_to_bits(indices_N, K) -> bits_NK`` (bool),
K <= 62; ``lfq_quantize(z).indices == bits_to_indices(z)``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from . import reference
from .._dispatch import choose_backend
from .reference import MAX_TOKEN_BITS, LFQQuantized, bits_to_indices, indices_to_bits

__all__ = [
    "MAX_TOKEN_BITS",
    "LFQQuantized",
    "bits_to_indices",
    "indices_to_bits",
    "lfq_quantize",
    "unpack_to_signs",
]


def _triton_module() -> ModuleType | None:
    try:
        from . import triton as triton_impl
    except ImportError:
        return None
    return triton_impl


def _backend(x: Tensor) -> ModuleType:
    """The module (reference or triton) that handles tensor x under VGEN_KERNELS."""
    if choose_backend(x, _triton_module) == "triton":
        impl = _triton_module()
        if impl is None:  # choose_backend picks triton only when it imports
            raise ImportError("lfq: triton backend chosen but triton does not import.")
        return impl
    return reference


def lfq_quantize(z_BNK: Tensor, temperature: float = 0.01) -> LFQQuantized:
    """Quantize (B, N, K) features to sign bits (K <= 32; float16/bfloat16/float32/float64).

    Returns ``LFQQuantized(signs_BNK, indices_BN, packed_BNP, bit_probs_BNK)``, see the module
    docstring. z may have any strides: encoder output (B, K, h, w) can be passed as
    ``z.flatten(2).transpose(1, 2)`` without a copy, and signs / bit_probs come back in that layout.
    """
    return _backend(z_BNK).lfq_quantize(z_BNK, temperature)


def unpack_to_signs(
    packed_BNP: Tensor, token_bits: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(B, N, ceil(K/8)) uint8 packed bits -> (B, N, K) +-1 signs in ``dtype``."""
    return _backend(packed_BNP).unpack_to_signs(packed_BNP, token_bits, dtype)
