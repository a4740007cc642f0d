"""GRAT block-sparse flash attention in Triton: forward, and backward for dQ, dK, dV.

Shape legend: B batch, Hh heads, L tokens (N image in grouped order + n_text text), D head dim.

Each program owns one query tile (forward, dQ) or one key tile (dK/dV) and walks only the tiles
listed by ``_layout.block_layout``: first the *full* tiles (no element mask), then the *partial*
ones, where the mask is recomputed from token indices (group coordinates + text rules, see
reference.py). Online softmax in base 2; the forward saves the per-row log-sum-exp (base 2) for
the backward, which recomputes the probabilities tile by tile (FlashAttention-2 scheme).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._layout import block_layout
from .reference import GratSpec, from_grouped, make_spec, to_grouped

__all__ = ["grat_attention", "grat_attention_grouped"]

_LOG2E = 1.4426950408889634


@triton.jit
def _allowed(offs_q, offs_k, N, NKV, G, NH, NW, RT, RH, RW, VARIANT: tl.constexpr):
    """(BM, BN) bool GRAT mask for query indices offs_q and key indices offs_k (grouped order).
    RT, RH, RW: the radii for "block"; for "criss_cross", 1 on the axes that take part, else 0."""
    qg = offs_q // G
    kg = offs_k // G
    qt = qg // (NH * NW)
    qh = (qg // NW) % NH
    qw = qg % NW
    kt = kg // (NH * NW)
    kh = (kg // NW) % NH
    kw = kg % NW
    if VARIANT == 0:  # criss-cross: same t, h or w plane of the group grid
        img = (qt[:, None] == kt[None, :]) & (RT != 0)
        img = img | ((qh[:, None] == kh[None, :]) & (RH != 0))
        img = img | ((qw[:, None] == kw[None, :]) & (RW != 0))
    else:  # surrounding block: within the radius on every axis
        dt = qt[:, None] - kt[None, :]
        dh = qh[:, None] - kh[None, :]
        dw = qw[:, None] - kw[None, :]
        img = (dt <= RT) & (dt >= -RT) & (dh <= RH) & (dh >= -RH) & (dw <= RW) & (dw >= -RW)
    img = img & (offs_q < N)[:, None] & (offs_k < N)[None, :]
    text = (offs_q >= N)[:, None] | (offs_k >= N)[None, :]
    return (img | text) & (offs_k < NKV)[None, :]


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, IDX, CNT, row, MAX_IDX, offs_m, offs_d,
               stride_kl, stride_kd, stride_vl, stride_vd, L, D, qk_scale,
               N, NKV, G, NH, NW, RT, RH, RW,
               VARIANT: tl.constexpr, IS_FULL: tl.constexpr, BLOCK_N: tl.constexpr,
               PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    n_tiles = tl.load(CNT + row)
    for i in range(n_tiles):
        kb = tl.load(IDX + row * MAX_IDX + i)
        offs_n = kb * BLOCK_N + offs_n0
        n_ok = offs_n < L
        kT = tl.load(K + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        if not IS_FULL:
            ok = _allowed(offs_m, offs_n, N, NKV, G, NH, NW, RT, RH, RW, VARIANT)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                KV_FULL_IDX, KV_FULL_CNT, MAX_FULL, KV_PART_IDX, KV_PART_CNT, MAX_PART,
                stride_qb, stride_qh, stride_ql, stride_qd,
                stride_kb, stride_kh, stride_kl, stride_kd,
                stride_vb, stride_vh, stride_vl, stride_vd,
                stride_ob, stride_oh, stride_ol, stride_od,
                n_heads, L, D, qk_scale, N, NKV, G, NH, NW, RT, RH, RW,
                VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, KV_FULL_IDX, KV_FULL_CNT, qb, MAX_FULL,
                               offs_m, offs_d, stride_kl, stride_kd, stride_vl, stride_vd, L, D,
                               qk_scale, N, NKV, G, NH, NW, RT, RH, RW,
                               VARIANT, True, BLOCK_N, PREC)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, KV_PART_IDX, KV_PART_CNT, qb, MAX_PART,
                               offs_m, offs_d, stride_kl, stride_kd, stride_vl, stride_vd, L, D,
                               qk_scale, N, NKV, G, NH, NW, RT, RH, RW,
                               VARIANT, False, BLOCK_N, PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, m_i + tl.log2(l_safe), mask=m_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ol, stride_od,
                      stride_gb, stride_gh, stride_gl, stride_gd, n_heads, L, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[row] = sum_d O[row, d] * dO[row, d] (fp32)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < L)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol
                + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gl
                 + offs_d[None, :] * stride_gd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, IDX, CNT, row, MAX_IDX, offs_n, offs_d,
                stride_ql, stride_qd, stride_gl, stride_gd, L, D, qk_scale,
                N, NKV, G, NH, NW, RT, RH, RW,
                VARIANT: tl.constexpr, IS_FULL: tl.constexpr, BLOCK_M: tl.constexpr,
                PREC: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    n_tiles = tl.load(CNT + row)
    for i in range(n_tiles):
        qb = tl.load(IDX + row * MAX_IDX + i)
        offs_m = qb * BLOCK_M + offs_m0
        m_ok = offs_m < L
        q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_gl + offs_d[None, :] * stride_gd,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN)
        p = tl.exp2(s - lse[:, None])
        if not IS_FULL:
            ok = _allowed(offs_m, offs_n, N, NKV, G, NH, NW, RT, RH, RW, VARIANT)
            p = tl.where(ok, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     Q_FULL_IDX, Q_FULL_CNT, MAX_FULL, Q_PART_IDX, Q_PART_CNT, MAX_PART,
                     stride_qb, stride_qh, stride_ql, stride_qd,
                     stride_kb, stride_kh, stride_kl, stride_kd,
                     stride_vb, stride_vh, stride_vl, stride_vd,
                     stride_gb, stride_gh, stride_gl, stride_gd,
                     stride_dkb, stride_dkh, stride_dkl, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvl, stride_dvd,
                     n_heads, L, D, sm_scale, qk_scale, N, NKV, G, NH, NW, RT, RH, RW,
                     VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_gb + h * stride_gh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    LSE += bh.to(tl.int64) * L
    DELTA += bh.to(tl.int64) * L
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < L)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, Q_FULL_IDX, Q_FULL_CNT, kb, MAX_FULL,
                         offs_n, offs_d, stride_ql, stride_qd, stride_gl, stride_gd, L, D,
                         qk_scale, N, NKV, G, NH, NW, RT, RH, RW, VARIANT, True, BLOCK_M, PREC)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, Q_PART_IDX, Q_PART_CNT, kb, MAX_PART,
                         offs_n, offs_d, stride_ql, stride_qd, stride_gl, stride_gd, L, D,
                         qk_scale, N, NKV, G, NH, NW, RT, RH, RW, VARIANT, False, BLOCK_M, PREC)
    tl.store(DK + offs_n[:, None] * stride_dkl + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * stride_dvl + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, IDX, CNT, row, MAX_IDX, offs_m, offs_d,
              stride_kl, stride_kd, stride_vl, stride_vd, L, D, qk_scale,
              N, NKV, G, NH, NW, RT, RH, RW,
              VARIANT: tl.constexpr, IS_FULL: tl.constexpr, BLOCK_N: tl.constexpr,
              PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    n_tiles = tl.load(CNT + row)
    for i in range(n_tiles):
        kb = tl.load(IDX + row * MAX_IDX + i)
        offs_n = kb * BLOCK_N + offs_n0
        kv_mask = (offs_n < L)[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not IS_FULL:
            ok = _allowed(offs_m, offs_n, N, NKV, G, NH, NW, RT, RH, RW, VARIANT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   KV_FULL_IDX, KV_FULL_CNT, MAX_FULL, KV_PART_IDX, KV_PART_CNT, MAX_PART,
                   stride_qb, stride_qh, stride_ql, stride_qd,
                   stride_kb, stride_kh, stride_kl, stride_kd,
                   stride_vb, stride_vh, stride_vl, stride_vd,
                   stride_gb, stride_gh, stride_gl, stride_gd,
                   stride_dqb, stride_dqh, stride_dql, stride_dqd,
                   n_heads, L, D, sm_scale, qk_scale, N, NKV, G, NH, NW, RT, RH, RW,
                   VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_gb + h * stride_gh
    DQ += b * stride_dqb + h * stride_dqh
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    q_mask = m_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_gl + offs_d[None, :] * stride_gd,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, KV_FULL_IDX, KV_FULL_CNT, qb, MAX_FULL, offs_m,
                   offs_d, stride_kl, stride_kd, stride_vl, stride_vd, L, D, qk_scale,
                   N, NKV, G, NH, NW, RT, RH, RW, VARIANT, True, BLOCK_N, PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, KV_PART_IDX, KV_PART_CNT, qb, MAX_PART, offs_m,
                   offs_d, stride_kl, stride_kd, stride_vl, stride_vd, L, D, qk_scale,
                   N, NKV, G, NH, NW, RT, RH, RW, VARIANT, False, BLOCK_N, PREC)
    tl.store(DQ + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# host side


def _configs(x: Tensor, block_d: int) -> dict:
    """Tile sizes, warps and stages per device and head dim (fixed, no autotuning)."""
    if not x.is_cuda:  # TRITON_INTERPRET=1 on CPU: small tiles keep the interpreter quick
        return dict(fwd=(16, 16, 1, 1), bwd=(16, 16, 1, 1))
    wide = x.dtype == torch.float32 or block_d > 128
    if block_d <= 64:
        fwd, bwd = (128, 64, 4, 2 if wide else 3), (64, 64, 4, 2)
    elif block_d <= 128:
        fwd, bwd = (128, 64, 8, 2 if wide else 3), (64, 64, 8, 2)
    else:
        fwd, bwd = (64, 32, 4, 2), (32, 32, 4, 1)
    return dict(fwd=fwd, bwd=bwd)


def _geometry(spec: GratSpec) -> tuple:
    _, nh, nw = spec.group_grid
    per_axis = spec.radius if spec.variant == "block" else tuple(map(int, spec.cross_axes))
    return (spec.n_image, spec.n_kv_valid, spec.group_size, nh, nw, *per_axis)


def _strides(x: Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


def _forward(q, k, v, spec: GratSpec, scale: float, blocks: tuple[int, ...]):
    B, Hh, L, D = q.shape
    bm, bn, warps, stages = blocks
    block_d = max(16, triton.next_power_of_2(D))
    lay = block_layout(spec, bm, bn, str(q.device))
    o = torch.empty_like(q)
    lse = torch.empty(B * Hh, L, device=q.device, dtype=torch.float32)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _fwd_kernel[(lay.n_q_blocks, B * Hh)](
        q, k, v, o, lse,
        lay.kv_full_idx, lay.kv_full_cnt, lay.kv_full_idx.shape[1],
        lay.kv_part_idx, lay.kv_part_cnt, lay.kv_part_idx.shape[1],
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        Hh, L, D, scale * _LOG2E, *_geometry(spec),
        VARIANT=spec.variant_id, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, spec: GratSpec, scale: float, blocks: tuple[int, ...]):
    B, Hh, L, D = q.shape
    bm, bn, warps, stages = blocks
    block_d = max(16, triton.next_power_of_2(D))
    lay = block_layout(spec, bm, bn, str(q.device))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    delta = torch.empty_like(lse)
    _bwd_delta_kernel[(triton.cdiv(L, bm), B * Hh)](
        o, do, delta, *_strides(o), *_strides(do), Hh, L, D, BLOCK_M=bm, BLOCK_D=block_d,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(VARIANT=spec.variant_id, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PREC=prec,
                  num_warps=warps, num_stages=stages)
    geometry = (Hh, L, D, scale, scale * _LOG2E, *_geometry(spec))
    _bwd_dkdv_kernel[(lay.n_k_blocks, B * Hh)](
        q, k, v, do, dk, dv, lse, delta,
        lay.q_full_idx, lay.q_full_cnt, lay.q_full_idx.shape[1],
        lay.q_part_idx, lay.q_part_cnt, lay.q_part_idx.shape[1],
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        *geometry, **common,
    )
    _bwd_dq_kernel[(lay.n_q_blocks, B * Hh)](
        q, k, v, do, dq, lse, delta,
        lay.kv_full_idx, lay.kv_full_cnt, lay.kv_full_idx.shape[1],
        lay.kv_part_idx, lay.kv_part_cnt, lay.kv_part_idx.shape[1],
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        *geometry, **common,
    )
    return dq, dk, dv


class _GratAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: GratSpec, scale: float, configs: dict):
        o, lse = _forward(q, k, v, spec, scale, configs["fwd"])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.spec, ctx.scale, ctx.configs = spec, scale, configs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, ctx.spec, ctx.scale,
                               ctx.configs["bwd"])
        return dq, dk, dv, None, None, None


def _check(q: Tensor, k: Tensor, v: Tensor, spec: GratSpec) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one (B, heads, L, D) shape; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != spec.seq_len:
        raise ValueError(
            f"L={q.shape[2]} but grid {spec.grid} plus n_text={spec.n_text} gives {spec.seq_len} "
            "tokens; q, k, v are (B, heads, L, D)"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype {q.dtype} not supported; use float16, bfloat16 or float32")
    if q.shape[3] > 256:
        raise ValueError(f"head dim {q.shape[3]} > 256 is not supported by the Triton kernel")


def grat_attention_grouped(
    q: Tensor, k: Tensor, v: Tensor, spec: GratSpec, scale: float | None = None,
    _blocks: dict | None = None,
) -> Tensor:
    """GRAT attention on (B, Hh, L, D) tensors already in grouped order (see reference.py)."""
    _check(q, k, v, spec)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    block_d = max(16, triton.next_power_of_2(q.shape[3]))
    configs = _blocks or _configs(q, block_d)
    return _GratAttention.apply(q, k, v, spec, scale, configs)


def grat_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int, int],
    groups: tuple[int, int, int],
    variant: str = "criss_cross",
    n_text: int = 0,
    *,
    n_text_valid: int | None = None,
    radius: int | tuple[int, int, int] = 1,
    scale: float | None = None,
    tokens_grouped: bool = False,
    _blocks: dict | None = None,
) -> Tensor:
    """Triton GRAT attention; arguments and result as ``reference.grat_attention_reference``."""
    spec = make_spec(grid, groups, variant, n_text, n_text_valid, radius)
    if not tokens_grouped:
        q, k, v = (to_grouped(x, spec) for x in (q, k, v))
    out = grat_attention_grouped(q, k, v, spec, scale, _blocks)
    return out if tokens_grouped else from_grouped(out, spec)
