"""Masked-bit autoregressive generation (BAR): RAR-style causal backbone + masked-bit-modeling head.

Spec: methods.md §2.5; reference: amazon-far/BAR (fork undefined443/BAR) `modeling/generator.py`
(BAR), `modeling/mbm_head.py` (MaskBitModelingHead, ResBlock, GaussianFourierEmbedding),
`modeling/modules/blocks.py` (Block with SwiGLU / RMSNorm / adaLN), `modeling/modules/rope.py`
(VisionRotaryEmbeddingFast), `configs/generator/bar_{b,l}.yaml`, README (sampling settings).

The model, its training loss and its sampler are separate: `BAR` maps (token bits, class labels,
order) to one head condition per position and owns the `MBMHead`; `bar_loss` draws orders
(`rar.sample_orders` with `rar_permutation_prob(step)`), class dropout and bit masks
(`mbm_mask_ratio`, `mask_bits`) and weighs the per-bit CE (`weighted_bit_loss`); `sample` runs
raster AR decoding with a KV cache and, per position, `mbm_sample`'s iterative bit unmasking.

Token convention: the public API takes token INDICES (B, L) int64 with K bits each,
bit k = (index >> k) & 1 (LSB first), via `vgen_core.tokenizers.lfq.indices_to_bits` /
`bits_to_indices`. Internally the model sees bits (B, L, K) in {0, 1}; 2 is the [MASK] bit id.

Shape legend: B batch, L tokens (AR steps), N tokens given so far, K bits per token, P prefix
slots (1 cls + R repeated class tokens), S = P + N input slots, D backbone width, W head width,
M = B * L tokens seen by the head, H heads, d head width.

Backbone mechanics copied from the official code: cls token + the class embedding repeated R
times as prefix; per-bit embedding (ceil(D / K) each) concatenated -> Linear to D; SwiGLU MLP
(hidden int(2/3 * 4D)), RMSNorm, QK-norm (RMSNorm), 6-way adaLN-Zero with condition = class
embedding + learned per-slot timestep embedding; learned absolute positions (prefix rows, then
P + orders[i]); target-aware positions: every prefix slot gets the row of orders[0], the token
slot of step i gets orders[i + 1] (the last one repeats orders[L - 1]); target-aware 2D RoPE:
half of the query heads are rotated by the target position, the other half and the keys by the
slot's own position (prefix slots: identity rotation); final RMSNorm -> Linear(D, W).
Not built: `patch_size` > 1 (several tokens per AR step) and random-order sampling.
Official attention dropout is configured but never applied (SDPA without dropout_p); we have only
`dropout` (attention output projection and SwiGLU hidden). Tables are sized to what is used:
official `pos_embed` has L + 128 rows (we keep P + L), `target_aware_pos_embed` L + 128 (we keep
rows P .. P + L - 1, so our row j = target j), `timesteps_embeddings` L + 100 (we keep P + L).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from vgen_core.generators.common import (
    AdaLNFinalLayer,
    CausalAdaLNBlock,
    KVCache,
    RopeFn,
    SwiGLUFFN,
    adaln_modulation,
    apply_rope_interleaved,
    gumbel_noise,
    linear_at,
    modulate,
    rope_2d_angles,
    swiglu_hidden,
    trunc_normal_init,
    zero_adaln,
)
from vgen_core.generators.rar import (
    check_orders,
    rar_permutation_prob,
    raster_orders,
    sample_orders,
    unshuffle,
)
from vgen_core.generators.schedules import gumbel_temperature, linear_guidance
from vgen_core.tokenizers.lfq import bits_to_indices, indices_to_bits

__all__ = [
    "BAR",
    "BARConfig",
    "BAR_SAMPLING",
    "BAR_SIZES",
    "MBMHead",
    "bar_config",
    "bar_guidance",
    "bar_loss",
    "default_tokens_allocation",
    "mask_bits",
    "mbm_mask_ratio",
    "mbm_sample",
    "rope_table",
    "sample",
    "weighted_bit_loss",
]

MASK_BIT = 2  # input id of a masked bit in the head (bits are 0/1)


class BARConfig(BaseModel):
    """BAR generator config; `build()` makes the model. Defaults = BAR-B on BAR-FSQ 16x16x16."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_bits: int = Field(16, ge=1, le=62)
    seq_len: int = Field(256, ge=1)
    num_classes: int = Field(1000, ge=1)
    hidden: int = Field(768, ge=1)
    depth: int = Field(24, ge=1)
    heads: int = Field(12, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    repeat_class: int = Field(32, ge=1)
    head_width: int = Field(2048, ge=1)
    head_layers: int = Field(3, ge=0)
    rope: bool = True
    rope_theta: float = Field(10000.0, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> BARConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        if self.rope:
            side = math.isqrt(self.seq_len)
            if side * side != self.seq_len:
                raise ValueError(
                    f"rope=True needs a square token grid, got seq_len={self.seq_len}; "
                    "use a square seq_len or rope=False."
                )
            if self.heads % 2 or (self.hidden // self.heads) % 4:
                raise ValueError(
                    f"target-aware 2D RoPE needs an even head count and head width divisible by "
                    f"4, got heads={self.heads}, head width={self.hidden // self.heads}."
                )
        return self

    def build(self) -> BAR:
        return BAR(self)


BAR_SIZES: dict[str, BARConfig] = {
    # CPU-test size; pairs with the `tiny` LFQ tokenizer (8x8 tokens, K=8).
    "tiny": BARConfig(
        token_bits=8, seq_len=64, num_classes=10, hidden=64, depth=2, heads=4, repeat_class=4,
        head_width=64, head_layers=2,
    ),
    # configs/generator/bar_b.yaml (415M) and bar_l.yaml (1.1B, dropout 0.2); head 2048 x 3.
    "B": BARConfig(hidden=768, depth=24, heads=12),
    "L": BARConfig(hidden=1280, depth=32, heads=16, dropout=0.2),
}

#: Official sampling settings (README): `sample(model, labels, **BAR_SAMPLING["B"])`.
BAR_SAMPLING: dict[str, dict[str, Any]] = {
    "B": {"guidance_scale": 5.0, "temperature": 2.5, "tokens_allocation": (2, 2, 5, 7)},
    "L": {"guidance_scale": 5.3, "temperature": 3.0, "tokens_allocation": (2, 2, 5, 7)},
}


bar_config = sized_config("BAR", BARConfig, BAR_SIZES)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def rope_table(
    side: int, head_dim: int, prefix: int, theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """cos, sin (prefix + side**2, head_dim) of the official VisionRotaryEmbeddingFast ('lang').

    Row p < prefix is the identity (cos 1, sin 0); row prefix + h * side + w rotates the first
    head_dim / 2 channels by h * f and the last head_dim / 2 by w * f, with the frequencies
    f = theta ** (-2j / (head_dim / 2)), each used for one interleaved channel pair
    (`common.rope_2d_angles`, in float64; rotate with `common.apply_rope_interleaved`).
    """
    if head_dim % 4:
        raise ValueError(f"rope_table: head_dim={head_dim} must be divisible by 4 (2D RoPE).")
    t = torch.arange(side, dtype=torch.float64)
    grid = rope_2d_angles(t.repeat_interleave(side), t.repeat(side), head_dim, theta)
    cos = torch.cat([torch.ones(prefix, head_dim, dtype=torch.float64), grid.cos()])
    sin = torch.cat([torch.zeros(prefix, head_dim, dtype=torch.float64), grid.sin()])
    return cos.float(), sin.float()


class _ResBlock(nn.Module):
    """Head block: x + gate * SwiGLU(modulate(RMSNorm(x), shift, scale)) (3-way adaLN)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.RMSNorm(width, eps=1e-6)
        self.mlp = SwiGLUFFN(width, swiglu_hidden(width))
        self.adaLN_modulation = adaln_modulation(width, 3)

    def forward(self, x_MW: Tensor, s_MW: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(s_MW).chunk(3, dim=-1)
        return x_MW + gate * self.mlp(modulate(self.in_ln(x_MW), shift, scale))


class _FourierEmbedding(nn.Module):
    """GaussianFourierEmbedding: [sin, cos](2 pi t W), W ~ N(0, 1) fixed (256), -> MLP to width."""

    W: Tensor  # buffer

    def __init__(self, width: int, size: int = 256) -> None:
        super().__init__()
        self.register_buffer("W", torch.randn(size))
        self.mlp = nn.Sequential(nn.Linear(2 * size, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t_M: Tensor) -> Tensor:
        arg = t_M[:, None].to(self.W.dtype) * self.W[None, :] * 2 * math.pi
        emb = torch.cat([arg.sin(), arg.cos()], dim=-1)
        return self.mlp(emb.to(linear_at(self.mlp, 0).weight.dtype))


class MBMHead(nn.Module):
    """Masked-bit-modeling head: (bit ids with [MASK] = 2, condition, mask ratio) -> 2-way logits.

    The bit vector is embedded per bit (ceil(W / K) each), concatenated and projected to W; the
    adaLN condition is silu(condition + FourierEmbedding(mask ratio)).
    """

    def __init__(self, token_bits: int, width: int, num_layers: int) -> None:
        super().__init__()
        self.token_bits = token_bits
        e = math.ceil(width / token_bits)
        self.input_embed = nn.Embedding(3, e)
        self.input_proj = nn.Linear(e * token_bits, width)
        self.ln_pre = nn.RMSNorm(width, eps=1e-6)
        self.transformer = nn.ModuleList(_ResBlock(width) for _ in range(num_layers))
        self.output_embed = nn.Linear(width, 2 * token_bits)
        self.t_embedder = _FourierEmbedding(width)
        self.adaln_before_head = AdaLNFinalLayer(width, nn.RMSNorm(width, eps=1e-6))

    def forward(self, ids_MK: Tensor, cond_MW: Tensor, mask_ratio_M: Tensor) -> Tensor:
        """ids_MK (M, K) in {0, 1, 2}, cond_MW (M, W), mask_ratio_M (M,) -> logits (M, K, 2)."""
        x_MW = self.input_proj(self.input_embed(ids_MK).flatten(1))
        s_MW = F.silu(self.t_embedder(mask_ratio_M) + cond_MW)
        x_MW = self.ln_pre(x_MW)
        for block in self.transformer:
            x_MW = block(x_MW, s_MW)
        out = self.output_embed(self.adaln_before_head(x_MW, s_MW))
        return out.view(ids_MK.shape[0], self.token_bits, 2)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class BAR(nn.Module):
    """Causal decoder over [cls, R class tokens, L bit tokens in generation order] + `MBMHead`.

    Labels are in [0, num_classes) or `null_class_id` (= num_classes, unconditional for CFG).
    """

    family: ClassVar[str] = "bar"
    config_class: ClassVar[type[BaseModel]] = BARConfig
    rope_cos: Tensor  # buffers, registered only when config.rope
    rope_sin: Tensor

    def __init__(self, config: BARConfig) -> None:
        super().__init__()
        self.config = config
        D, L, K, C = config.hidden, config.seq_len, config.token_bits, config.num_classes
        P = self.prefix_len
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # condition table, official layout: bit values 0/1, mask, classes, null class
        self.embeddings = nn.Embedding(2 + 1 + C + 1, D)
        self.input_embeddings = nn.Embedding(3, math.ceil(D / K))
        self.input_merge = nn.Linear(math.ceil(D / K) * K, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, P + L, D))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, L, D))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, P + L, D))
        self.blocks = nn.ModuleList(
            CausalAdaLNBlock(D, config.heads, SwiGLUFFN(D, swiglu_hidden(D), config.dropout),
                             partial(nn.RMSNorm, eps=1e-6), 0.0, config.dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.latent_condition_proj = nn.Linear(D, config.head_width)
        self.lm_head = MBMHead(K, config.head_width, config.head_layers)
        if config.rope:
            cos, sin = rope_table(math.isqrt(L), D // config.heads, P, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(lambda m: trunc_normal_init(m, config.init_std))
        for p in (self.cls_token, self.pos_embed, self.target_aware_pos_embed,
                  self.timesteps_embeddings):
            nn.init.trunc_normal_(p, std=config.init_std)
        for m in [*self.blocks, *self.lm_head.transformer, self.lm_head.adaln_before_head]:
            zero_adaln(m)

    @property
    def prefix_len(self) -> int:
        return 1 + self.config.repeat_class

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.depth)

    def slot_inputs(
        self, bits_BNK: Tensor, labels_B: Tensor, orders_BL: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inputs of the S = P + N slots.

        Args:
            bits_BNK: (B, N, K) int64 bits in {0, 1} of the first N tokens in generation order.
            labels_B: (B,) int64 class labels (null class allowed).
            orders_BL: (B, L) int64 generation orders.
        Returns:
            x_BSD (embeddings + absolute + target-aware positions), c_BSD (adaLN conditions),
            pos_BS and target_BS: RoPE table rows of each slot's own and target position.
        """
        B, N, _ = bits_BNK.shape
        P, R, D = self.prefix_len, self.config.repeat_class, self.config.hidden
        cls_B1D = self.embeddings(labels_B + 3)[:, None]
        tok_BND = self.input_merge(self.input_embeddings(bits_BNK).flatten(2))
        x_BSD = torch.cat([self.cls_token.expand(B, -1, -1), cls_B1D.expand(B, R, D), tok_BND], 1)
        pos_BSD = torch.cat(
            [self.pos_embed[:, :P].expand(B, -1, -1), self.pos_embed[0, P:][orders_BL[:, :N]]], 1
        )
        next_BL = torch.cat([orders_BL[:, 1:], orders_BL[:, -1:]], dim=1)  # target of token slot i
        target_tab = self.target_aware_pos_embed[0]
        target_BSD = torch.cat(
            [target_tab[orders_BL[:, :1]].expand(B, P, D), target_tab[next_BL[:, :N]]], dim=1
        )
        c_BSD = cls_B1D + self.timesteps_embeddings[:, : P + N]
        pos_BS = torch.cat(
            [torch.arange(P, device=orders_BL.device).expand(B, P), P + orders_BL[:, :N]], dim=1
        )
        target_BS = torch.cat([(P + orders_BL[:, :1]).expand(B, P), P + next_BL[:, :N]], dim=1)
        return x_BSD + pos_BSD + target_BSD, c_BSD, pos_BS, target_BS

    def _rope(self, pos_BS: Tensor, target_BS: Tensor) -> RopeFn | None:
        if not self.config.rope:
            return None
        cos, sin = self.rope_cos, self.rope_sin
        if cos.dtype not in (torch.float32, torch.float64):  # model cast to bf16/fp16: rebuild
            cfg = self.config
            cos, sin = rope_table(math.isqrt(cfg.seq_len), cfg.hidden // cfg.heads,
                                  self.prefix_len, cfg.rope_theta)
            cos, sin = cos.to(pos_BS.device), sin.to(pos_BS.device)
        cos_p, sin_p = cos[pos_BS][:, None], sin[pos_BS][:, None]
        cos_t, sin_t = cos[target_BS][:, None], sin[target_BS][:, None]

        def apply(q_BHSd: Tensor, k_BHSd: Tensor) -> tuple[Tensor, Tensor]:
            h = q_BHSd.shape[1] // 2
            q_BHSd = torch.cat(
                [apply_rope_interleaved(q_BHSd[:, :h], cos_p, sin_p, upcast=True),
                 apply_rope_interleaved(q_BHSd[:, h:], cos_t, sin_t, upcast=True)], 1
            )
            return q_BHSd, apply_rope_interleaved(k_BHSd, cos_p, sin_p, upcast=True)

        return apply

    def _run(
        self, inputs: tuple[Tensor, Tensor, Tensor, Tensor], start: int, cache: KVCache | None
    ) -> Tensor:
        x_BSD, c_BSD, pos_BS, target_BS = (t[:, start:] for t in inputs)
        rope = self._rope(pos_BS, target_BS)
        for i, block in enumerate(self.blocks):
            x_BSD = block(x_BSD, c_BSD, None if cache is None else cache.layers[i], rope)
        return x_BSD

    def _check(self, bits_BNK: Tensor, labels_B: Tensor, max_len: int) -> None:
        K = self.config.token_bits
        if bits_BNK.ndim != 3 or bits_BNK.shape[1] > max_len or bits_BNK.shape[2] != K:
            raise ValueError(
                f"BAR expects bits (B, N, {K}) with N <= {max_len}, got {tuple(bits_BNK.shape)}; "
                "convert token indices with indices_to_bits(tokens, token_bits)."
            )
        if labels_B.shape != bits_BNK.shape[:1]:
            raise ValueError(
                f"labels must be (B,) = {tuple(bits_BNK.shape[:1])}, got {tuple(labels_B.shape)}."
            )

    def forward(
        self, bits_BLK: Tensor, labels_B: Tensor, orders_BL: Tensor | None = None
    ) -> Tensor:
        """Teacher-forced head conditions for every position, in position order.

        Args:
            bits_BLK: (B, L, K) int64 bits in {0, 1}, position (raster) order.
            labels_B: (B,) int64 class labels (null class allowed).
            orders_BL: (B, L) generation orders; None = raster.
        Returns:
            cond_BLW (B, L, W): row p conditions the head for the token at position p, computed
            from the class and the tokens generated before p in the given order.
        """
        B, L, K = bits_BLK.shape
        if L != self.seq_len:
            raise ValueError(
                f"BAR expects bits (B, {self.seq_len}, K), got {tuple(bits_BLK.shape)}."
            )
        self._check(bits_BLK, labels_B, L)
        orders_BL = raster_orders(B, L, bits_BLK.device) if orders_BL is None else orders_BL
        check_orders(orders_BL, B, L)
        shuffled_BLK = bits_BLK.long().gather(1, orders_BL[..., None].expand(B, L, K))
        h_BSD = self._run(self.slot_inputs(shuffled_BLK, labels_B, orders_BL), 0, None)
        P = self.prefix_len
        cond_BLW = self.latent_condition_proj(self.norm(h_BSD[:, P - 1 : P - 1 + L]))
        return unshuffle(cond_BLW, orders_BL)

    def next_condition(
        self, bits_BNK: Tensor, labels_B: Tensor, cache: KVCache | None = None
    ) -> Tensor:
        """Head condition (B, W) of raster position N given the first N tokens' bits (N < L).

        With a cache only the slots not cached yet are computed and the cache is extended; it
        must have been built from the same prefix.
        """
        B, N, _ = bits_BNK.shape
        self._check(bits_BNK, labels_B, self.seq_len - 1)
        start = 0 if cache is None else cache.length
        if start > self.prefix_len + N - 1:
            raise ValueError(
                f"KV cache holds {start} slots but only {self.prefix_len + N} are given."
            )
        orders_BL = raster_orders(B, self.seq_len, bits_BNK.device)
        inputs = self.slot_inputs(bits_BNK.long(), labels_B, orders_BL)
        h_BSD = self._run(inputs, start, cache)
        return self.latent_condition_proj(self.norm(h_BSD[:, -1]))


# --------------------------------------------------------------------------------------------------
# Masking, loss
# --------------------------------------------------------------------------------------------------


def mbm_mask_ratio(
    n: int, token_bits: int, *, std: float = 0.8, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n,) training mask ratios clamp(1 - sigmoid(N(0, std^2)), 1 / K, 1) (official)."""
    z = torch.randn(n, device=device, generator=generator) * std
    return (1.0 - torch.sigmoid(z)).clamp(1.0 / token_bits, 1.0)


def mask_bits(
    bits_MK: Tensor, ratio_M: Tensor, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Mask max(1, round(K * ratio)) uniformly chosen bits per row.

    Returns:
        ids_MK (bits with [MASK] = 2 at masked places) and mask_MK (bool, True = masked).
    """
    M, K = bits_MK.shape
    count_M = (K * ratio_M).round().clamp(min=1)
    ranks_MK = torch.rand(M, K, device=bits_MK.device, generator=generator).argsort(dim=-1)
    mask_MK = ranks_MK < count_M[:, None]
    return torch.where(mask_MK, MASK_BIT, bits_MK.long()), mask_MK


def weighted_bit_loss(
    logits_MK2: Tensor, bits_MK: Tensor, mask_MK: Tensor, *, masked_weight: float = 1.0,
    unmasked_weight: float = 0.1,
) -> Tensor:
    """Per-bit CE weighted 1.0 (masked) / 0.1 (visible): sum(w * ce) / (sum(w) + 1e-8), in fp32."""
    ce_MK = F.cross_entropy(logits_MK2.float().transpose(1, 2), bits_MK.long(), reduction="none")
    w_MK = torch.where(mask_MK, masked_weight, unmasked_weight).to(ce_MK.dtype)
    return (ce_MK * w_MK).sum() / (w_MK.sum() + 1e-8)


def bar_loss(
    model: BAR,
    tokens_BL: Tensor,
    labels_B: Tensor,
    step: int,
    *,
    anneal_start: int = 125_000,
    anneal_end: int = 187_500,
    class_drop: float = 0.1,
    mask_ratio_std: float = 0.8,
    unmasked_weight: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """BAR training loss for one batch at optimizer step `step`.

    Orders: random w.p. `rar_permutation_prob(step, ...)`, else raster; class -> null w.p.
    `class_drop`; every token's bits are masked at its own ratio `mbm_mask_ratio` and the head
    predicts all K bits from the backbone condition; loss = `weighted_bit_loss` over all tokens.

    Args:
        tokens_BL: (B, L) int64 token indices in [0, 2**K), position (raster) order.
        labels_B: (B,) int64 class labels in [0, num_classes).
        generator: torch.Generator on the tokens' device for orders, class drop and masks.
    Returns:
        loss (scalar) and metrics: 'loss', 'masked_bit_accuracy', 'mask_ratio',
        'permutation_prob' (all detached).
    """
    B, L = tokens_BL.shape
    K, dev = model.config.token_bits, tokens_BL.device
    bits_BLK = indices_to_bits(tokens_BL, K).long()
    prob = rar_permutation_prob(step, anneal_start, anneal_end)
    orders_BL = sample_orders(B, L, prob, device=dev, generator=generator)
    drop_B = torch.rand(B, device=dev, generator=generator) < class_drop
    labels_B = torch.where(drop_B, model.null_class_id, labels_B)
    cond_BLW = model(bits_BLK, labels_B, orders_BL)

    bits_MK = bits_BLK.reshape(B * L, K)
    ratio_M = mbm_mask_ratio(B * L, K, std=mask_ratio_std, device=dev, generator=generator)
    ids_MK, mask_MK = mask_bits(bits_MK, ratio_M, generator=generator)
    logits_MK2 = model.lm_head(ids_MK, cond_BLW.reshape(B * L, -1), ratio_M)
    loss = weighted_bit_loss(logits_MK2, bits_MK, mask_MK, unmasked_weight=unmasked_weight)
    with torch.no_grad():
        correct_MK = (logits_MK2.argmax(-1) == bits_MK) & mask_MK
        metrics = {
            "loss": loss.detach(),
            "masked_bit_accuracy": correct_MK.sum() / mask_MK.sum(),
            "mask_ratio": mask_MK.float().mean(),
            "permutation_prob": torch.tensor(prob, device=dev),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


def bar_guidance(step: int, num_steps: int, guidance_scale: float) -> float:
    """CFG scale at AR step `step`: 1 + (g - 1) * step / N for g > 1, else 1 (linear ramp)."""
    if guidance_scale <= 1.0:
        return 1.0
    return linear_guidance(step, num_steps, guidance_scale)


def default_tokens_allocation(token_bits: int, steps: int = 4) -> tuple[int, ...]:
    """Near-equal non-decreasing split of K bits over min(steps, K) steps ([4,4,4,4] for K=16)."""
    n = min(steps, token_bits)
    base, extra = divmod(token_bits, n)
    return tuple(base + (i >= n - extra) for i in range(n))


@torch.no_grad()
def mbm_sample(
    head: MBMHead,
    cond_MW: Tensor,
    *,
    tokens_allocation: Sequence[int],
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    use_cfg: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Iterative confidence unmasking of one token's K bits (official MaskBitModelingHead.sample).

    Step j of n = len(tokens_allocation) starts with K - sum(alloc[:j]) masked bits at mask ratio
    1 - sum(alloc[:j]) / K; logits = u + g (c - u) when `use_cfg`; Gumbel temperature
    tau_j = temperature * (1 - j / n); sampled bit = argmax(logits + tau_j * Gumbel); confidence =
    its logit + tau_j * fresh Gumbel; the K - sum(alloc[:j+1]) least confident stay masked.

    Args:
        cond_MW: (M, W) head conditions; with `use_cfg`, (2M, W) = [conditional; unconditional].
        tokens_allocation: bits committed per step; sums to K.
    Returns:
        bits_MK: (M, K) int64 in {0, 1}.
    """
    K = head.token_bits
    alloc = [int(a) for a in tokens_allocation]
    if not alloc or any(a <= 0 for a in alloc) or sum(alloc) != K:
        raise ValueError(
            f"tokens_allocation must be positive and sum to token_bits={K}, got {alloc}."
        )
    M = cond_MW.shape[0] // 2 if use_cfg else cond_MW.shape[0]
    dev, n = cond_MW.device, len(alloc)
    ids_MK = torch.full((M, K), MASK_BIT, dtype=torch.long, device=dev)
    done = 0
    for j, a in enumerate(alloc):
        tau = gumbel_temperature(j / n, temperature)
        ratio = torch.full((cond_MW.shape[0],), 1.0 - done / K, dtype=cond_MW.dtype, device=dev)
        inputs = torch.cat([ids_MK, ids_MK]) if use_cfg else ids_MK
        logits_MK2 = head(inputs, cond_MW, ratio).float()
        if use_cfg:
            cond, uncond = logits_MK2.chunk(2)
            logits_MK2 = uncond + guidance_scale * (cond - uncond)
        noise_MK2 = gumbel_noise(logits_MK2.shape, device=dev, generator=generator)
        sampled_MK = (logits_MK2 + tau * noise_MK2).argmax(-1)
        is_mask_MK = ids_MK == MASK_BIT
        sampled_MK = torch.where(is_mask_MK, sampled_MK, ids_MK)
        done += a
        if j == n - 1:
            break
        conf_MK = logits_MK2.gather(-1, sampled_MK[..., None]).squeeze(-1)
        conf_MK = conf_MK + tau * gumbel_noise(conf_MK.shape, device=dev, generator=generator)
        conf_MK = torch.where(is_mask_MK, conf_MK, torch.inf)
        lowest = conf_MK.topk(K - done, dim=-1, largest=False).indices
        remask_MK = torch.zeros_like(is_mask_MK).scatter_(-1, lowest, True)
        ids_MK = torch.where(remask_MK, MASK_BIT, sampled_MK)
    return sampled_MK


@torch.no_grad()
def sample(
    model: BAR,
    labels_B: Tensor,
    *,
    guidance_scale: float = 5.0,
    temperature: float = 2.5,
    tokens_allocation: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
) -> Tensor:
    """Raster AR sampling; each position's bits come from `mbm_sample` (official BAR.generate).

    CFG (g > 1) runs the backbone on [labels; null] and applies `bar_guidance(t, L, g)` to the
    head's bit logits at AR step t. The model runs in eval mode (restored afterwards).

    Args:
        labels_B: (B,) int64 class labels (the null class gives unconditional samples).
        temperature: the head's Gumbel temperature (annealed to 0 over its unmasking steps).
        tokens_allocation: bits unmasked per head step (sum K); None = `default_tokens_allocation`.
        generator: torch.Generator on the labels' device; fixed seed -> identical tokens.
    Returns:
        tokens_BL: (B, L) int64 indices in [0, 2**K), bit k = (index >> k) & 1.
    """
    K, L = model.config.token_bits, model.seq_len
    alloc = default_tokens_allocation(K) if tokens_allocation is None else tuple(tokens_allocation)
    was_training = model.training
    model.eval()
    B, dev = labels_B.shape[0], labels_B.device
    use_cfg = guidance_scale > 1.0
    cond_labels = labels_B
    if use_cfg:
        cond_labels = torch.cat([labels_B, torch.full_like(labels_B, model.null_class_id)])
    cache = model.new_kv_cache() if use_kv_cache else None
    bits_BNK = torch.zeros(B, 0, K, dtype=torch.long, device=dev)
    try:
        for step in range(L):
            inputs = torch.cat([bits_BNK, bits_BNK]) if use_cfg else bits_BNK
            cond_W = model.next_condition(inputs, cond_labels, cache)
            new_BK = mbm_sample(
                model.lm_head, cond_W, tokens_allocation=alloc, use_cfg=use_cfg,
                guidance_scale=bar_guidance(step, L, guidance_scale), temperature=temperature,
                generator=generator,
            )
            bits_BNK = torch.cat([bits_BNK, new_BK[:, None]], dim=1)
    finally:
        model.train(was_training)
    return bits_to_indices(bits_BNK)


def bar_batch_loss(model: BAR, batch: dict[str, Tensor], step: int, **options: Any):
    """Batch-level loss (``tokens`` (B, L) K-bit ids, ``label`` (B,)): :func:`bar_loss`."""
    return bar_loss(model, batch["tokens"].long(), batch["label"].long(), step, **options)


SPEC = FamilySpec(
    name="bar", role="generator", config_class=BARConfig, sizes=BAR_SIZES, model_class=BAR,
    data="bit_tokens", data_fields=("token_bits", "seq_len", "num_classes"),
    loss=bar_batch_loss, conditioning="labels", sampler=sample, output="tokens",
    sampling=BAR_SAMPLING,
    summary="BAR: autoregression over bit tokens with a masked-bit-modeling head",
)
