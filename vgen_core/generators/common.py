"""Building blocks shared by the generator families, written once.

Attention (`attention`, SDPA by default, kernel backends opt-in), rotary embeddings (tables and the
two rotation conventions), RMSNorm, SwiGLU, the GELU MLP, adaLN modulation, the post-norm BERT
block (MaskGIT, MaskBit), the causal adaLN-Zero decoder block with its KV cache (RAR, BAR) and
Gumbel noise. Model modules import these instead of each other's private helpers; schedules (mask
ratio, guidance, temperature) live in `schedules.py`.

Every block keeps the numerics and the parameter names of the model code it came from, so
state dicts and outputs are unchanged; blocks that differ numerically (e.g. `nn.RMSNorm` vs the
fp32 `RMSNorm` here, fused `SwiGLUFFN` vs split `SwiGLU`) are separate, named classes.

Shape legend: B batch, H heads, S query slots, K key slots, d head width, D model width,
F rotary frequencies.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTENTION_BACKENDS",
    "AdaLNFinalLayer",
    "BertBlock",
    "CausalAdaLNBlock",
    "CausalSelfAttention",
    "KVCache",
    "LayerKV",
    "Mlp",
    "RMSNorm",
    "RopeFn",
    "SwiGLU",
    "SwiGLUFFN",
    "adaln_modulation",
    "apply_rope_half",
    "apply_rope_interleaved",
    "attention",
    "gumbel_noise",
    "linear_at",
    "modulate",
    "register_attention_backend",
    "rms_norm",
    "rope_1d_angles",
    "rope_2d_angles",
    "rope_frequencies",
    "rotate_half",
    "rotate_interleaved",
    "swiglu_hidden",
    "trunc_normal_init",
    "zero_adaln",
]

# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

AttentionFn = Callable[..., Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, causal: bool,
          dropout_p: float, scale: float | None) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale
    )


def _grat(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, causal: bool,
          dropout_p: float, scale: float | None, grid: tuple[int, int, int],
          groups: tuple[int, int, int], **options: Any) -> Tensor:
    """`kernels.grat.grat_attention` (Triton on CUDA, its PyTorch reference elsewhere)."""
    if mask is not None or causal or dropout_p:
        raise ValueError(
            "attention backend 'grat' builds its own sparse pattern from grid/groups; mask, "
            "causal and dropout_p are not supported (use backend='sdpa' for those)."
        )
    from kernels.grat import grat_attention

    return grat_attention(q, k, v, grid, groups, scale=scale, **options)


#: name -> fn(q, k, v, *, mask, causal, dropout_p, scale, **options); "sdpa" is the default.
ATTENTION_BACKENDS: dict[str, AttentionFn] = {"sdpa": _sdpa, "grat": _grat}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make `fn(q, k, v, *, mask, causal, dropout_p, scale, **options)` usable as backend=name."""
    ATTENTION_BACKENDS[name] = fn


def attention(
    q_BHSd: Tensor,
    k_BHKd: Tensor,
    v_BHKd: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | AttentionFn = "sdpa",
    **options: Any,
) -> Tensor:
    """Multi-head attention (B, H, S, d) x (B, H, K, d) -> (B, H, S, d).

    mask: bool (True = may attend) or additive float, broadcastable to (B, H, S, K); causal: the
    top-left-aligned causal mask; scale: softmax scale (None = 1/sqrt(d)).
    backend: "sdpa" (default, `F.scaled_dot_product_attention`), "grat" (GRAT sparse attention
    of `kernels.grat`; `options` = grid, groups, variant, n_text, ...), another registered name
    (`register_attention_backend`) or a callable with the backend signature.
    """
    if backend == "sdpa":
        return _sdpa(q_BHSd, k_BHKd, v_BHKd, mask=mask, causal=causal, dropout_p=dropout_p,
                     scale=scale)
    fn = backend if callable(backend) else ATTENTION_BACKENDS.get(backend)
    if fn is None:
        raise ValueError(
            f"attention backend '{backend}' not found; known: {', '.join(ATTENTION_BACKENDS)} "
            "(or register one with register_attention_backend)."
        )
    return fn(q_BHSd, k_BHKd, v_BHKd, mask=mask, causal=causal, dropout_p=dropout_p,
              scale=scale, **options)


# --------------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------------


def rope_frequencies(
    dim: int, theta: float = 10000.0, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """(ceil(dim / 2),) inverse frequencies theta ** (-2j / dim), computed in `dtype`."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)


def rope_1d_angles(pos: Tensor, inv_freq_F: Tensor) -> Tensor:
    """Angles pos * f: (...,) positions x (F,) frequencies -> (..., F)."""
    return pos[..., None] * inv_freq_F


def rope_2d_angles(
    rows_S: Tensor, cols_S: Tensor, head_dim: int, theta: float = 10000.0
) -> Tensor:
    """(S, head_dim) angles of 2D RoPE in the EVA-02 VisionRotaryEmbeddingFast layout.

    Channels [0, d/2) rotate with the row, [d/2, d) with the column; frequency j =
    theta ** (-2j / (d/2)) is repeated for one interleaved channel pair (use with
    `apply_rope_interleaved`). Computed in the dtype of `rows_S` (BAR: float64, xAR: float32).
    """
    freqs_F = rope_frequencies(head_dim // 2, theta, dtype=rows_S.dtype, device=rows_S.device)
    row_SF = rope_1d_angles(rows_S, freqs_F).repeat_interleave(2, dim=-1)
    col_SF = rope_1d_angles(cols_S, freqs_F).repeat_interleave(2, dim=-1)
    return torch.cat([row_SF, col_SF], dim=-1)


def rotate_interleaved(x: Tensor) -> Tensor:
    """Interleaved pairs (x0, x1) -> (-x1, x0) on the last dim (EVA-02 / BAR / xAR)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def rotate_half(x: Tensor) -> Tensor:
    """Halves (a, b) -> (-b, a) on the last dim (GPT-NeoX / DINOv3 / DeltaWorld)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _apply(rotate: Callable[[Tensor], Tensor], x: Tensor, cos: Tensor, sin: Tensor,
           upcast: bool) -> Tensor:
    if not upcast:
        return x * cos + rotate(x) * sin
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    return (xf * cos.to(dtype) + rotate(xf) * sin.to(dtype)).to(x.dtype)


def apply_rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor, *, upcast: bool = False) -> Tensor:
    """x * cos + rotate_interleaved(x) * sin; cos/sin broadcast to x (e.g. (B, 1, S, d)).

    upcast: compute in >= fp32 and cast back to x's dtype (BAR); else in the promoted dtype of
    the operands (xAR).
    """
    return _apply(rotate_interleaved, x, cos, sin, upcast)


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor, *, upcast: bool = False) -> Tensor:
    """x * cos + rotate_half(x) * sin (half-split layout); `upcast` as in apply_rope_interleaved."""
    return _apply(rotate_half, x, cos, sin, upcast)


# --------------------------------------------------------------------------------------------------
# Norms, MLPs, adaLN
# --------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / rms(x) over the last dim, computed in fp32 and cast back (no weight)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """`rms_norm(x) * weight` (normalise in fp32, cast back, then scale; xAR).

    Not bit-identical to `nn.RMSNorm`, which BAR uses (`nn.RMSNorm(dim, eps=1e-6)`).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps) * self.weight


class Mlp(nn.Module):
    """timm Mlp: fc1 -> GELU (exact or tanh) -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, *, drop: float = 0.0,
                 approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate=self.approximate))))


class SwiGLUFFN(nn.Module):
    """Fused SwiGLU (DINOv2 SwiGLUFFN, BAR): w12 -> silu(x1) * x2 -> dropout -> w3."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(x1) * x2))


class SwiGLU(nn.Module):
    """Split SwiGLU (timm SwiGLU, xAR): fc2(silu(fc1_g(x)) * fc1_x(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLUFFN hidden width int(2/3 * int(dim * mlp_ratio)) (BAR blocks and head)."""
    return int(2 / 3 * int(dim * mlp_ratio))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, broadcast (per-sample (B, D) conditions: pass [:, None])."""
    return x * (1 + scale) + shift


def adaln_modulation(dim: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(dim, chunks * dim): the adaLN projection (state keys `.1.weight/bias`)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))


def linear_at(seq: nn.Module | Tensor, idx: int) -> nn.Linear:
    """`seq[idx]` of an nn.Sequential/nn.ModuleList, checked to be an nn.Linear (typed access
    to e.g. `adaLN_modulation[-1]` or `mlp[0]`)."""
    if not isinstance(seq, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"linear_at: expected nn.Sequential or nn.ModuleList, got "
                        f"{type(seq).__name__}.")
    layer = seq[idx]
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"linear_at: [{idx}] is {type(layer).__name__}, not nn.Linear.")
    return layer


def zero_adaln(module: nn.Module) -> None:
    """adaLN-Zero: zero the last Linear of `module.adaLN_modulation`."""
    last = linear_at(module.adaLN_modulation, -1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def trunc_normal_init(module: nn.Module, std: float) -> None:
    """Trunc-normal Linear/Embedding weights, zero biases, unit norms (RAR/BAR init_weights)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        bias = getattr(module, "bias", None)  # RMSNorm has none
        if bias is not None:
            nn.init.zeros_(bias)


# --------------------------------------------------------------------------------------------------
# Post-norm BERT block (MaskGIT, MaskBit)
# --------------------------------------------------------------------------------------------------


class BertBlock(nn.Module):
    """Post-norm transformer block (HF BERT): x = LN(x + Attn(x)); x = LN(x + MLP(x)), GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, eps: float = 1e-12,
                 dropout: float = 0.0, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BSD: Tensor) -> Tensor:
        """x_BSD (B, S, D) -> (B, S, D), bidirectional attention."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a_BHSd = attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        a_BSD = a_BHSd.transpose(1, 2).reshape(B, S, D)
        x_BSD = self.norm1(x_BSD + self.drop(self.proj(a_BSD)))
        return self.norm2(x_BSD + self.drop(self.fc2(F.gelu(self.fc1(x_BSD)))))


# --------------------------------------------------------------------------------------------------
# Causal adaLN-Zero decoder block with KV cache (RAR, BAR)
# --------------------------------------------------------------------------------------------------

#: (q_BHSd, k_BHSd) -> rotated (q, k); a model-built closure over its position tables
RopeFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class LayerKV:
    """Cached keys and values (B, H, K, d) of one block."""

    __slots__ = ("k", "v")

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None


class KVCache:
    """Keys and values of the slots already processed, one entry per block (incremental decoding).

    Made by `model.new_kv_cache()`; `length` is the number of cached slots.
    """

    def __init__(self, depth: int) -> None:
        self.layers = [LayerKV() for _ in range(depth)]

    @property
    def length(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else int(k.shape[2])


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with QK-norm, optional RoPE hook and optional KV cache."""

    def __init__(
        self, dim: int, heads: int, qk_norm: Callable[[int], nn.Module], attn_drop: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = qk_norm(dim // heads)
        self.k_norm = qk_norm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x_BSD: Tensor, kv: LayerKV | None = None, rope: RopeFn | None = None
    ) -> Tensor:
        """x_BSD (B, S, D): S new slots after the cached ones (`kv` is extended) -> (B, S, D)."""
        B, S, D = x_BSD.shape
        qkv = self.qkv(x_BSD).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q_BHSd, k_BHSd, v_BHSd = qkv.unbind(0)
        q_BHSd, k_BHSd = self.q_norm(q_BHSd), self.k_norm(k_BHSd)
        if rope is not None:
            q_BHSd, k_BHSd = rope(q_BHSd, k_BHSd)
        past = 0
        if kv is not None:
            if kv.k is not None:
                if kv.v is None:
                    raise ValueError("LayerKV holds keys but no values; set k and v together.")
                past = kv.k.shape[2]
                k_BHSd = torch.cat([kv.k, k_BHSd], dim=2)
                v_BHSd = torch.cat([kv.v, v_BHSd], dim=2)
            kv.k, kv.v = k_BHSd, v_BHSd
        mask, causal = None, False
        if S > 1 and past == 0:
            causal = True
        elif S > 1:  # several new slots after cached ones: slot i sees keys <= past + i
            mask = torch.ones(S, past + S, dtype=torch.bool, device=x_BSD.device).tril(past)
        a_BHSd = attention(
            q_BHSd, k_BHSd, v_BHSd, mask=mask, causal=causal,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(a_BHSd.transpose(1, 2).reshape(B, S, D)))


class CausalAdaLNBlock(nn.Module):
    """Pre-norm block with 6-way adaLN-Zero modulation from a per-slot condition (DiT style)."""

    def __init__(
        self, dim: int, heads: int, mlp: nn.Module, norm: Callable[[int], nn.Module],
        attn_drop: float, proj_drop: float,
    ) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = CausalSelfAttention(dim, heads, norm, attn_drop, proj_drop)
        self.norm2 = norm(dim)
        self.mlp = mlp
        self.adaLN_modulation = adaln_modulation(dim, 6)

    def forward(
        self, x_BSD: Tensor, c_BSD: Tensor, kv: LayerKV | None = None, rope: RopeFn | None = None
    ) -> Tensor:
        """x_BSD (B, S, D), per-slot conditions c_BSD (B, S, D) -> (B, S, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c_BSD).chunk(6, -1)
        x_BSD = x_BSD + gate1 * self.attn(modulate(self.norm1(x_BSD), shift1, scale1), kv, rope)
        return x_BSD + gate2 * self.mlp(modulate(self.norm2(x_BSD), shift2, scale2))


class AdaLNFinalLayer(nn.Module):
    """norm -> adaLN from the condition (RAR FinalLayer; chunk order scale, shift)."""

    def __init__(self, dim: int, norm: nn.Module) -> None:
        super().__init__()
        self.norm_final = norm
        self.adaLN_modulation = adaln_modulation(dim, 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


# --------------------------------------------------------------------------------------------------
# Sampling noise
# --------------------------------------------------------------------------------------------------


def gumbel_noise(
    shape: Sequence[int], *, device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Standard Gumbel noise -log(-log(u)), u ~ U(0, 1), both logs clamped at 1e-20 (fp32)."""
    u = torch.rand(shape, device=device, generator=generator)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
