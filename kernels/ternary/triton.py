"""Triton ternary matmul: ``y = x @ (unpack(packed) * scale).T (+ bias)``, 2-bit weights decoded
on the fly (layout in ``reference.py``).

Two kernels:

- ``_ternary_gemv_kernel`` for ``M <= GEMV_MAX_M`` (batch-1 decoding, memory bound): one program
  per (row, block of BLOCK_N outputs); it reads contiguous packed bytes ``[BLOCK_N, BLOCK_K4]``
  (up to 256 bytes = 1024 weights per row per step), splits each byte into its 4 codes and
  multiplies them with the 4 matching stride-4 slices of ``x``; fp32 accumulation, no tensor
  cores.
- ``_ternary_matmul_kernel`` otherwise: a grouped-order tiled matmul; the weight tile
  ``[BLOCK_K, BLOCK_N]`` is decoded to ``x.dtype`` (ternary values are exact in every float
  format) and fed to ``tl.dot`` with an fp32 accumulator (an exact fp32 ``"ieee"`` dot for fp32
  activations).

The per-channel scale (and bias) is applied once, in the epilogue. On CPU tensors this module
runs only when ``TRITON_INTERPRET=1`` was set before it was imported (tests use a subprocess).
Block sizes are fixed heuristics, not autotuned.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import check_operands, dequantize_ternary

GEMV_MAX_M = 4
"""Rows up to which ``path="auto"`` uses the GEMV kernel."""


@triton.jit
def _ternary_gemv_kernel(x_ptr, p_ptr, s_ptr, b_ptr, y_ptr, N, K, K4,
                         stride_xm, stride_xk, stride_pn, stride_ym,
                         HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K4: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K4)
    mask_n = offs_n < N
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    p_rows = p_ptr + offs_n.to(tl.int64)[:, None] * stride_pn
    acc = tl.zeros((BLOCK_N, BLOCK_K4), dtype=tl.float32)
    for j0 in range(0, K4, BLOCK_K4):
        j = j0 + offs_j
        byte = tl.load(p_rows + j[None, :], mask=mask_n[:, None] & (j < K4)[None, :],
                       other=0).to(tl.int32)
        k = 4 * j
        x0 = tl.load(x_row + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + (k + 1) * stride_xk, mask=(k + 1) < K, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (k + 2) * stride_xk, mask=(k + 2) < K, other=0.0).to(tl.float32)
        x3 = tl.load(x_row + (k + 3) * stride_xk, mask=(k + 3) < K, other=0.0).to(tl.float32)
        # code -> value: (code & 1) - (code >> 1), for the 2-bit field at bits 2i, 2i + 1.
        w0 = ((byte & 1) - ((byte >> 1) & 1)).to(tl.float32)
        w1 = (((byte >> 2) & 1) - ((byte >> 3) & 1)).to(tl.float32)
        w2 = (((byte >> 4) & 1) - ((byte >> 5) & 1)).to(tl.float32)
        w3 = (((byte >> 6) & 1) - ((byte >> 7) & 1)).to(tl.float32)
        acc += w0 * x0[None, :] + w1 * x1[None, :] + w2 * x2[None, :] + w3 * x3[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y_row = y_ptr + pid_m.to(tl.int64) * stride_ym
    tl.store(y_row + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _ternary_matmul_kernel(x_ptr, p_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                           stride_xm, stride_xk, stride_pn, stride_ym,
                           HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-blocks share each column-block's weights while they sit in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Weight tile [BLOCK_K, BLOCK_N]: element (k, n) is field k % 4 of byte packed[n, k // 4].
    p_ptrs = p_ptr + offs_n.to(tl.int64)[None, :] * stride_pn + (offs_k // 4)[:, None]
    shift = ((offs_k % 4) * 2)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        byte = tl.load(p_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0).to(tl.int32)
        code = (byte >> shift) & 3
        w = ((code & 1) - (code >> 1)).to(tl.float32)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc)
        x_ptrs += BLOCK_K * stride_xk
        p_ptrs += BLOCK_K // 4
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


INTERPRETED = not isinstance(_ternary_gemv_kernel, triton.runtime.JITFunction)
"""True when TRITON_INTERPRET=1 was set before this module was imported (CPU tensors allowed)."""


def _fp32_dot(dtype: torch.dtype) -> bool:
    """fp32 activations take an exact fp32 dot; so does bf16 under the CPU interpreter, whose
    ``tl.dot`` multiplies bf16 operands as their raw uint16 bits (triton 3.x numpy backend)."""
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # CPU interpreter: pretend to be an H100 so block choices match
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(x_MK: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None, path: str) -> torch.Tensor:
    M, K = x_MK.shape
    N, K4 = packed.shape
    y_MN = torch.empty((M, N), dtype=x_MK.dtype, device=x_MK.device)
    if M == 0 or N == 0:
        return y_MN
    if K == 0:
        return y_MN.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y_MN))
    b = bias if bias is not None else scale  # dummy pointer, never read when HAS_BIAS is False
    if path == "auto":
        path = "gemv" if M <= GEMV_MAX_M else "tiled"
    if path == "gemv":
        # Memory bound: big byte tiles keep many loads in flight; shrink BLOCK_N (down to 8)
        # until there are about two programs per SM.
        block_n, block_k4 = 32, min(256, max(16, triton.next_power_of_2(K4)))
        while block_n > 8 and M * triton.cdiv(N, block_n) < 2 * _num_sms(x_MK.device):
            block_n //= 2
        grid: tuple[int, ...] = (M, triton.cdiv(N, block_n))
        _ternary_gemv_kernel[grid](
            x_MK, packed, scale, b, y_MN, N, K, K4,
            x_MK.stride(0), x_MK.stride(1), packed.stride(0), y_MN.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K4=block_k4,
            num_warps=8 if block_n * block_k4 >= 32 * 256 else 4)
    elif path == "tiled":
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
        block_n = 64 if N <= 64 or M <= 64 else 128
        block_k = 64 if x_MK.dtype != torch.float32 else 32
        num_warps = 8 if block_m * block_n >= 128 * 128 else 4
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        _ternary_matmul_kernel[grid](
            x_MK, packed, scale, b, y_MN, M, N, K,
            x_MK.stride(0), x_MK.stride(1), packed.stride(0), y_MN.stride(0),
            HAS_BIAS=bias is not None, FP32_DOT=_fp32_dot(x_MK.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
            num_warps=num_warps, num_stages=3)
    else:
        raise ValueError(f"path must be 'auto', 'gemv' or 'tiled', got {path!r}")
    return y_MN


def _forward(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None, path: str) -> torch.Tensor:
    if not x.is_cuda and not INTERPRETED:
        raise ValueError(f"ternary_matmul_triton: x is on {x.device}; the Triton kernel needs CUDA "
                         f"tensors, or TRITON_INTERPRET=1 set before triton is imported (CPU "
                         f"interpreter); use kernels.ternary.ternary_matmul to dispatch")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"ternary_matmul_triton: x must be fp16, bf16 or fp32, got {x.dtype}")
    lead = x.shape[:-1]
    x_MK = x.reshape(-1, x.shape[-1])
    packed = packed.contiguous()
    scale = scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            y_MN = _launch(x_MK, packed, scale, bias, path)
    else:
        y_MN = _launch(x_MK, packed, scale, bias, path)
    return y_MN.reshape(*lead, packed.shape[0])


class _TernaryMatmul(torch.autograd.Function):
    """Forward in Triton; backward ``dx = dy @ (unpack * scale)`` densely in fp32 (training through
    a ternary layer is rare, so the backward trades memory for simplicity)."""

    @staticmethod
    def forward(ctx, x, packed, scale, bias, in_features, path):
        ctx.save_for_backward(packed, scale)
        ctx.in_features = in_features
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _forward(x, packed, scale, bias, path)

    @staticmethod
    def backward(ctx, grad_y):
        packed, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w_NK = dequantize_ternary(packed, scale, ctx.in_features)
            grad_x = (grad_y.float() @ w_NK).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None, None


def ternary_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                          in_features: int, bias: torch.Tensor | None = None, *,
                          path: str = "auto") -> torch.Tensor:
    """Triton ``x @ (unpack(packed) * scale).T (+ bias)`` in ``x.dtype``.

    x ``(..., K)`` fp16/bf16/fp32 on CUDA (or CPU under TRITON_INTERPRET=1), packed
    ``(N, ceil(K / 4))`` uint8, scale ``(N,)``, bias ``(N,)`` or None; returns ``(..., N)``.
    ``path``: ``"auto"`` (GEMV for at most GEMV_MAX_M rows, tiled otherwise), ``"gemv"``,
    ``"tiled"``. Differentiable with respect to ``x`` and ``bias``.
    """
    check_operands(x, packed, scale, in_features, bias)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        return _TernaryMatmul.apply(x, packed, scale, bias, in_features, path)
    return _forward(x, packed, scale, bias, path)
