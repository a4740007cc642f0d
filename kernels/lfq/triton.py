"""Fused Triton kernels for LFQ quantization (spec: ``reference.py``; maths and layout: README.md).

Shape legend: B batch, N tokens per sample, K bits per token (1..32), P = ceil(K / 8) bytes.
Each program handles one sample b and BLOCK_N consecutive tokens n x BLOCK_K (= max(8,
next_pow2(K))) bits; K and P are compile-time constants (one compiled variant per K), so the
compiler can vectorise the accesses along whichever of n or k has stride 1.

- ``_lfq_fwd_kernel`` reads z once and writes signs, the int64 index, the packed bytes and the
  fp32 bit probabilities.
- ``_lfq_bwd_kernel`` writes dz = d_signs + d_probs * (4 / T) p (1 - p), recomputing p from z;
  either upstream gradient may be absent (a constexpr flag skips its read).
- ``_unpack_kernel`` turns packed bytes back into +-1 signs.

z, signs, bit_probs and the gradients may have any strides (signs / bit_probs / dz are allocated
with z's layout), so encoder output (B, K, h, w) seen as (B, h*w, K) is read without a copy.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import LFQQuantized, check_packed, check_z

__all__ = ["lfq_quantize", "unpack_to_signs"]

_ELEMS_PER_PROGRAM = 4096


def _blocks(K: int) -> tuple[int, int]:
    block_k = max(8, triton.next_power_of_2(K))
    return _ELEMS_PER_PROGRAM // block_k, block_k


def _grid(B: int, N: int, block_n: int) -> tuple[int]:
    return (B * triton.cdiv(N, block_n),)


def _merge_bn(*ts: Tensor) -> tuple[Tensor, ...]:
    """View every (B, N, ...) tensor as (1, B*N, ...) when all their strides allow it (no copy).

    Contiguous inputs then form one long row axis, so only the very last block is partial.
    """
    B, N = ts[0].shape[:2]
    if B > 1 and all(t.stride(0) == N * t.stride(1) for t in ts):
        return tuple(t.view(1, B * N, *t.shape[2:]) for t in ts)
    return ts


def _strides(t: Tensor) -> tuple[int, int, int]:
    """t's strides, with 0 for a batch axis of size 1: the JIT then knows b * stride(0) is a
    multiple of 16, which the vectoriser needs."""
    return (0 if t.shape[0] == 1 else t.stride(0), t.stride(1), t.stride(2))


def _dense(*ts: Tensor) -> bool:
    """True when every (B, N, K) tensor has rows of K contiguous elements."""
    return all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in ts)


def _acc(dtype: torch.dtype) -> tl.dtype:
    """In-kernel dtype for comparisons and gradient sums: fp32, or fp64 for fp64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _sigmoid(x):
    """fp32 sigmoid through exp(-|x|), which never overflows (|x| reaches 4 |z| / T ~ 1e3)."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tile(N, BLOCK_N: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's sample b (int64), tokens n (BLOCK_N,), bits k (BLOCK_K,) and 2D mask."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    b = (pid // n_blocks).to(tl.int64)
    n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    return b, n, k, (n < N)[:, None] & (k < K)[None, :]


@triton.jit
def _offsets(b, n, k, sb, sn, sk, DENSE: tl.constexpr, K: tl.constexpr):
    """Element offsets of the (BLOCK_N, BLOCK_K) tile. DENSE: rows are K contiguous elements
    (sn == K, sk == 1), said at compile time so that the accesses can be vectorised."""
    if DENSE:
        return b * sb + n.to(tl.int64)[:, None] * K + k.to(tl.int64)[None, :]
    else:
        return b * sb + n.to(tl.int64)[:, None] * sn + k.to(tl.int64)[None, :] * sk


@triton.jit
def _lfq_fwd_kernel(
    z_ptr, signs_ptr, probs_ptr, idx_ptr, packed_ptr,
    N, scale,
    szb, szn, szk, ssb, ssn, ssk, spb, spn, spk,
    K: tl.constexpr, P: tl.constexpr, ACC: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, n, k, mask = _tile(N, BLOCK_N, K, BLOCK_K)
    z = tl.load(z_ptr + _offsets(b, n, k, szb, szn, szk, DENSE, K), mask=mask, other=0.0)
    # compare in ACC (fp32, fp64 for fp64 z): exact, and the interpreter mis-compares raw bf16
    bit = z.to(ACC) > 0  # masked lanes load 0 -> bit 0, so they add nothing below
    sign = tl.where(bit, 1.0, -1.0).to(signs_ptr.dtype.element_ty)
    tl.store(signs_ptr + _offsets(b, n, k, ssb, ssn, ssk, DENSE, K), sign, mask=mask)
    p = _sigmoid(z.to(tl.float32) * scale)
    tl.store(probs_ptr + _offsets(b, n, k, spb, spn, spk, DENSE, K), p, mask=mask)

    row = b * N + n.to(tl.int64)  # indices (B, N) and packed (B, N, P) are contiguous
    index = tl.sum(bit.to(tl.int64) << k.to(tl.int64)[None, :], axis=1)
    tl.store(idx_ptr + row, index, mask=n < N)
    in_byte = bit.to(tl.int32) << (k % 8)[None, :]
    for j in tl.static_range(P):
        byte = tl.sum(tl.where((k // 8 == j)[None, :], in_byte, 0), axis=1)
        tl.store(packed_ptr + row * P + j, byte.to(tl.uint8), mask=n < N)


@triton.jit
def _lfq_bwd_kernel(
    z_ptr, gs_ptr, gp_ptr, dz_ptr,
    N, scale,
    szb, szn, szk, sgsb, sgsn, sgsk, sgpb, sgpn, sgpk, sdb, sdn, sdk,
    K: tl.constexpr, HAS_GS: tl.constexpr, HAS_GP: tl.constexpr, ACC: tl.constexpr,
    DENSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, n, k, mask = _tile(N, BLOCK_N, K, BLOCK_K)
    dz = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    if HAS_GS:
        gs = tl.load(gs_ptr + _offsets(b, n, k, sgsb, sgsn, sgsk, DENSE, K), mask=mask, other=0.0)
        dz += gs.to(ACC)
    if HAS_GP:
        z = tl.load(z_ptr + _offsets(b, n, k, szb, szn, szk, DENSE, K), mask=mask, other=0.0)
        gp = tl.load(gp_ptr + _offsets(b, n, k, sgpb, sgpn, sgpk, DENSE, K), mask=mask, other=0.0)
        p = _sigmoid(z.to(tl.float32) * scale)
        dz += (gp.to(tl.float32) * (scale * p * (1.0 - p))).to(ACC)
    dz_off = _offsets(b, n, k, sdb, sdn, sdk, DENSE, K)
    tl.store(dz_ptr + dz_off, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpack_kernel(
    packed_ptr, out_ptr, N,
    K: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b, n, k, mask = _tile(N, BLOCK_N, K, BLOCK_K)  # called with B = 1, N = all rows
    row = n.to(tl.int64)[:, None]
    byte = tl.load(packed_ptr + row * P + (k // 8)[None, :], mask=mask, other=0)
    bit = (byte.to(tl.int32) >> (k % 8)[None, :]) & 1
    sign = tl.where(bit != 0, 1.0, -1.0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * K + k[None, :], sign, mask=mask)


class _LFQQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z_BNK: Tensor, temperature: float):
        B, N, K = z_BNK.shape
        P = (K + 7) // 8
        signs_BNK = torch.empty_like(z_BNK)  # preserve_format: z's strides when z is dense
        probs_BNK = torch.empty_like(z_BNK, dtype=torch.float32)
        indices_BN = torch.empty(B, N, dtype=torch.int64, device=z_BNK.device)
        packed_BNP = torch.empty(B, N, P, dtype=torch.uint8, device=z_BNK.device)
        scale = 4.0 / temperature
        if B * N > 0:
            z, signs, probs, idx, packed = _merge_bn(
                z_BNK, signs_BNK, probs_BNK, indices_BN, packed_BNP)
            block_n, block_k = _blocks(K)
            _lfq_fwd_kernel[_grid(z.shape[0], z.shape[1], block_n)](
                z, signs, probs, idx, packed,
                z.shape[1], scale,
                *_strides(z), *_strides(signs), *_strides(probs),
                K=K, P=P, ACC=_acc(z.dtype), DENSE=_dense(z, signs, probs),
                BLOCK_N=block_n, BLOCK_K=block_k,
            )
        ctx.save_for_backward(z_BNK)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(indices_BN, packed_BNP)
        return signs_BNK, indices_BN, packed_BNP, probs_BNK

    @staticmethod
    def backward(ctx: Any, g_signs, g_indices, g_packed, g_probs):
        (z_BNK,) = ctx.saved_tensors
        if g_signs is None and g_probs is None:
            return None, None
        B, N, K = z_BNK.shape
        dz_BNK = torch.empty_like(z_BNK)
        if dz_BNK.numel() > 0:
            gs = g_signs if g_signs is not None else z_BNK  # dummy pointer when absent
            gp = g_probs if g_probs is not None else z_BNK
            z, gs, gp, dz = _merge_bn(z_BNK, gs, gp, dz_BNK)
            block_n, block_k = _blocks(K)
            _lfq_bwd_kernel[_grid(z.shape[0], z.shape[1], block_n)](
                z, gs, gp, dz,
                z.shape[1], ctx.scale,
                *_strides(z), *_strides(gs), *_strides(gp), *_strides(dz),
                K=K, HAS_GS=g_signs is not None, HAS_GP=g_probs is not None, ACC=_acc(z.dtype),
                DENSE=_dense(z, gs, gp, dz), BLOCK_N=block_n, BLOCK_K=block_k,
            )
        return dz_BNK, None


def lfq_quantize(z_BNK: Tensor, temperature: float = 0.01) -> LFQQuantized:
    """Triton version of ``reference.lfq_quantize`` (same arguments, outputs and gradients)."""
    check_z(z_BNK, temperature)
    return LFQQuantized(*_LFQQuantize.apply(z_BNK, float(temperature)))


def unpack_to_signs(
    packed_BNP: Tensor, token_bits: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Triton version of ``reference.unpack_to_signs``: (B, N, P) uint8 -> (B, N, K) +-1."""
    check_packed(packed_BNP, token_bits, dtype)
    B, N, P = packed_BNP.shape
    packed_BNP = packed_BNP.contiguous()
    out_BNK = torch.empty(B, N, token_bits, dtype=dtype, device=packed_BNP.device)
    if B * N > 0:
        block_n, block_k = _blocks(token_bits)
        _unpack_kernel[_grid(1, B * N, block_n)](
            packed_BNP, out_BNK, B * N, K=token_bits, P=P, BLOCK_N=block_n, BLOCK_K=block_k
        )
    return out_BNK
