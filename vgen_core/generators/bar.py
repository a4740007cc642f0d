"""Masked-bit autoregressive generation (BAR): RAR-style causal backbone + masked-bit-modeling head.

Spec: methods.md §2.5; reference: amazon-far/BAR (fork undefined443/BAR) `modeling/generator.py`
(BAR), `modeling/mbm_head.py` (MaskBitModelingHead, ResBlock, GaussianFourierEmbedding),
`modeling/modules/blocks.py` (Block with SwiGLU / RMSNorm / adaLN), `modeling/modules/rope.py`
(VisionRotaryEmbeddingFast), `configs/generator/bar_{b,b_patch2,b_patch4,l,l_res512}.yaml`,
README (model zoo, sampling settings); all read at commit faf903f.

The model, its training loss and its sampler are separate: `BAR` maps (token bits, class labels,
order) to one head condition per position and owns the `MBMHead`; `bar_loss` draws orders
(`rar.sample_orders` with `rar_permutation_prob(step)`), class dropout and bit masks
(`mbm_mask_ratio`, `mask_bits`) and weighs the per-bit CE (`weighted_bit_loss`); `sample` runs
raster AR decoding with a KV cache and, per position, `mbm_sample`'s iterative bit unmasking.

Token convention: the public API takes token INDICES (B, L) int64 with K bits each,
bit k = (index >> k) & 1 (LSB first), via `vgen_core.tokenizers.lfq.indices_to_bits` /
`bits_to_indices`. Internally the model sees bits in step layout (B, T, J) in {0, 1}
(`BAR.to_steps`; for patch_size 1 just (B, L, K)); 2 is the [MASK] bit id.

Shape legend: B batch, L tokens, K bits per token, T AR steps (= L / patch_size**2), J bits per
step (= K patch_size**2), N steps given so far, P prefix slots (1 cls + R repeated class tokens),
S = P + N input slots, D backbone width, W head width, M = B * T steps seen by the head, H heads,
d head width.

Backbone mechanics copied from the official code: cls token + the class embedding repeated R
times as prefix; per-bit embedding (ceil(D / K) each) concatenated -> Linear to D; SwiGLU MLP
(hidden int(2/3 * 4D)), RMSNorm, QK-norm (RMSNorm), 6-way adaLN-Zero with condition = class
embedding + learned per-slot timestep embedding; learned absolute positions (prefix rows, then
P + orders[i]); target-aware positions: every prefix slot gets the row of orders[0], the token
slot of step i gets orders[i + 1] (the last one repeats orders[L - 1]); target-aware 2D RoPE:
half of the query heads are rotated by the target position, the other half and the keys by the
slot's own position (prefix slots: identity rotation); final RMSNorm -> Linear(D, W).

`patch_size` p > 1 (official BAR-B/2, BAR-B/4): each AR step predicts a p x p patch of tokens,
T = L / p**2 steps of J = K p**2 bits, bits ordered (row in patch, column in patch, bit) as the
official `_downsample_tokens` ('b (h sh w sw) n -> b (h w) (sh sw n)'); the backbone, its RoPE
grid (sqrt(T) per side) and the head all work on steps (`BAR.to_steps` / `BAR.from_steps`).
The public API (`bar_loss`, `sample`) keeps token indices (B, L) of K bits.
Not built: random-order sampling (official `sample_with_random_order`, off in every release).
Official attention dropout is configured but never applied (SDPA without dropout_p); we have only
`dropout` (attention output projection and SwiGLU hidden). Tables are sized to what is used:
official `pos_embed` has T + 128 rows (we keep P + T), `target_aware_pos_embed` T + 128 (we keep
rows P .. P + T - 1, so our row j = target j), `timesteps_embeddings` T + 100 (we keep P + T).

Released weights: `load_official(path_or_state_dict, "B")` (or a release name "bar_b",
"bar_b_patch2", "bar_b_patch4", "bar_l", "bar_l_res512"); the key table and the dropped rows are
in `bar_keys.py`. A release has exactly the official module's state dict (strict
`load_state_dict` in sample_imagenet.py) and gives the same head conditions / bit logits here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config
from vgen_core.generators.bar_keys import (
    OFFICIAL_DROPPED,
    official_key_map,
    released_prefix_len,
    released_shape,
    released_steps,
    rope_buffer_keys,
)
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
from vgen_core.tokenizers.io import load_mapped_state_dict, read_state_dict
from vgen_core.tokenizers.lfq import bits_to_indices, indices_to_bits

__all__ = [
    "BAR",
    "BARConfig",
    "BAR_RELEASES",
    "BAR_SAMPLING",
    "BAR_SIZES",
    "MBMHead",
    "OFFICIAL_DROPPED",
    "bar_config",
    "bar_guidance",
    "bar_loss",
    "default_tokens_allocation",
    "load_official",
    "mask_bits",
    "mbm_mask_ratio",
    "mbm_sample",
    "official_key_map",
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
    #: tokens per AR step along each side (official `patch_size`: 1, or 2 / 4 for BAR-B/2, B/4)
    patch_size: int = Field(1, ge=1)
    rope: bool = True
    rope_theta: float = Field(10000.0, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> BARConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        side = math.isqrt(self.seq_len)
        if self.patch_size > 1 and (side * side != self.seq_len or side % self.patch_size):
            raise ValueError(
                f"patch_size={self.patch_size} needs a square token grid whose side is divisible "
                f"by it, got seq_len={self.seq_len}."
            )
        if self.rope:
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

    @property
    def steps(self) -> int:
        """T = seq_len / patch_size**2 AR steps."""
        return self.seq_len // self.patch_size**2

    @property
    def step_bits(self) -> int:
        """J = token_bits * patch_size**2 bits predicted per AR step (the head's bit count)."""
        return self.token_bits * self.patch_size**2

    def build(self) -> BAR:
        return BAR(self)


BAR_SIZES: dict[str, BARConfig] = {
    # CPU-test size; pairs with the `tiny` LFQ tokenizer (8x8 tokens, K=8).
    "tiny": BARConfig(
        token_bits=8, seq_len=64, num_classes=10, hidden=64, depth=2, heads=4, repeat_class=4,
        head_width=64, head_layers=2,
    ),
    # The released generators (README "Model Zoo"; configs/generator/*.yaml @faf903f), all on
    # BAR-FSQ tokens (16 bits, 16 x 16; res512: 10 bits, 32 x 32), 1000 classes, 32 repeated
    # class slots, MBM head 2048 x 3. Parameters (official module): 415.3M / 415.1M / 415.8M /
    # 1107.8M / 1110.7M (README 415M / 415M / 416M / 1.1B / 1.1B).
    "B": BARConfig(hidden=768, depth=24, heads=12),  # bar_b.yaml
    "B-patch2": BARConfig(hidden=768, depth=24, heads=12, patch_size=2),  # bar_b_patch2.yaml
    "B-patch4": BARConfig(hidden=768, depth=24, heads=12, patch_size=4),  # bar_b_patch4.yaml
    "L": BARConfig(hidden=1280, depth=32, heads=16, dropout=0.2),  # bar_l.yaml
    "L-res512": BARConfig(  # bar_l_res512.yaml
        token_bits=10, seq_len=1024, hidden=1280, depth=32, heads=16, dropout=0.2,
    ),
}

#: release (checkpoint file stem under assets/generator/) -> size
BAR_RELEASES: dict[str, str] = {
    "bar_b": "B", "bar_b_patch2": "B-patch2", "bar_b_patch4": "B-patch4", "bar_l": "L",
    "bar_l_res512": "L-res512",
}

#: Released inference settings (README "Generate and Evaluate" commands: guidance_scale,
#: mbm_head.randomize_temperature, mbm_head.tokens_allocation; raster order, KV cache):
#: `sample(model, labels, **BAR_SAMPLING["B"])`. The yaml defaults differ (guidance 5.0,
#: temperature 1.0 / 2.0, allocation [4]*4): the README overrides them for every release.
BAR_SAMPLING: dict[str, dict[str, Any]] = {
    "B": {"guidance_scale": 5.0, "temperature": 2.5, "tokens_allocation": (2, 2, 5, 7)},
    "B-patch2": {"guidance_scale": 5.5, "temperature": 2.0,
                 "tokens_allocation": (16, 16, 16, 16)},
    "B-patch4": {"guidance_scale": 9.6, "temperature": 1.4,
                 "tokens_allocation": (64, 64, 64, 64)},
    "L": {"guidance_scale": 5.3, "temperature": 3.0, "tokens_allocation": (2, 2, 5, 7)},
    "L-res512": {"guidance_scale": 4.2, "temperature": 2.8, "tokens_allocation": (2, 2, 2, 4)},
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
    """Causal decoder over [cls, R class tokens, T bit steps in generation order] + `MBMHead`.

    One AR step carries J = K p**2 bits (p = patch_size; p = 1: one token, J = K, T = L).
    `forward` / `next_condition` take bits in step layout (B, T, J): `to_steps` makes it from
    position-order token bits (B, L, K), `from_steps` undoes it.
    Labels are in [0, num_classes) or `null_class_id` (= num_classes, unconditional for CFG).
    """

    family: ClassVar[str] = "bar"
    config_class: ClassVar[type[BaseModel]] = BARConfig
    rope_cos: Tensor  # buffers, registered only when config.rope
    rope_sin: Tensor

    def __init__(self, config: BARConfig) -> None:
        super().__init__()
        self.config = config
        D, T, J, C = config.hidden, config.steps, config.step_bits, config.num_classes
        P = self.prefix_len
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # condition table, official layout: bit values 0/1, mask, classes, null class
        self.embeddings = nn.Embedding(2 + 1 + C + 1, D)
        self.input_embeddings = nn.Embedding(3, math.ceil(D / J))
        self.input_merge = nn.Linear(math.ceil(D / J) * J, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, P + T, D))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, T, D))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, P + T, D))
        self.blocks = nn.ModuleList(
            CausalAdaLNBlock(D, config.heads, SwiGLUFFN(D, swiglu_hidden(D), config.dropout),
                             partial(nn.RMSNorm, eps=1e-6), 0.0, config.dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.latent_condition_proj = nn.Linear(D, config.head_width)
        self.lm_head = MBMHead(J, config.head_width, config.head_layers)
        if config.rope:
            cos, sin = rope_table(math.isqrt(T), D // config.heads, P, config.rope_theta)
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
        """L tokens of the tokenizer grid (the public token layout)."""
        return self.config.seq_len

    @property
    def steps(self) -> int:
        """T = L / patch_size**2 AR steps."""
        return self.config.steps

    @property
    def step_bits(self) -> int:
        """J = K * patch_size**2 bits per AR step."""
        return self.config.step_bits

    def to_steps(self, bits_BLK: Tensor) -> Tensor:
        """Position-order token bits (B, L, K) -> step layout (B, T, J) (official
        `_downsample_tokens`: 'b (h sh w sw) n -> b (h w) (sh sw n)'; identity for p = 1)."""
        p, K = self.config.patch_size, self.config.token_bits
        if bits_BLK.ndim != 3 or bits_BLK.shape[1:] != (self.seq_len, K):
            raise ValueError(f"BAR.to_steps expects bits (B, {self.seq_len}, {K}), got "
                             f"{tuple(bits_BLK.shape)}.")
        if p == 1:
            return bits_BLK
        B, h = bits_BLK.shape[0], math.isqrt(self.seq_len) // p
        return (bits_BLK.reshape(B, h, p, h, p, K).permute(0, 1, 3, 2, 4, 5)
                .reshape(B, h * h, p * p * K))

    def from_steps(self, bits_BTJ: Tensor) -> Tensor:
        """Step layout (B, T, J) -> position-order token bits (B, L, K) (official
        `_upsample_tokens`; identity for p = 1)."""
        p, K = self.config.patch_size, self.config.token_bits
        if bits_BTJ.ndim != 3 or bits_BTJ.shape[1:] != (self.steps, self.step_bits):
            raise ValueError(f"BAR.from_steps expects bits (B, {self.steps}, {self.step_bits}), "
                             f"got {tuple(bits_BTJ.shape)}.")
        if p == 1:
            return bits_BTJ
        B, h = bits_BTJ.shape[0], math.isqrt(self.seq_len) // p
        return (bits_BTJ.reshape(B, h, h, p, p, K).permute(0, 1, 3, 2, 4, 5)
                .reshape(B, self.seq_len, K))

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.depth)

    def slot_inputs(
        self, bits_BNJ: Tensor, labels_B: Tensor, orders_BT: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inputs of the S = P + N slots.

        Args:
            bits_BNJ: (B, N, J) int64 bits in {0, 1} of the first N steps in generation order.
            labels_B: (B,) int64 class labels (null class allowed).
            orders_BT: (B, T) int64 generation orders of the steps.
        Returns:
            x_BSD (embeddings + absolute + target-aware positions), c_BSD (adaLN conditions),
            pos_BS and target_BS: RoPE table rows of each slot's own and target position.
        """
        B, N, _ = bits_BNJ.shape
        P, R, D = self.prefix_len, self.config.repeat_class, self.config.hidden
        cls_B1D = self.embeddings(labels_B + 3)[:, None]
        tok_BND = self.input_merge(self.input_embeddings(bits_BNJ).flatten(2))
        x_BSD = torch.cat([self.cls_token.expand(B, -1, -1), cls_B1D.expand(B, R, D), tok_BND], 1)
        pos_BSD = torch.cat(
            [self.pos_embed[:, :P].expand(B, -1, -1), self.pos_embed[0, P:][orders_BT[:, :N]]], 1
        )
        next_BT = torch.cat([orders_BT[:, 1:], orders_BT[:, -1:]], dim=1)  # target of step slot i
        target_tab = self.target_aware_pos_embed[0]
        target_BSD = torch.cat(
            [target_tab[orders_BT[:, :1]].expand(B, P, D), target_tab[next_BT[:, :N]]], dim=1
        )
        c_BSD = cls_B1D + self.timesteps_embeddings[:, : P + N]
        pos_BS = torch.cat(
            [torch.arange(P, device=orders_BT.device).expand(B, P), P + orders_BT[:, :N]], dim=1
        )
        target_BS = torch.cat([(P + orders_BT[:, :1]).expand(B, P), P + next_BT[:, :N]], dim=1)
        return x_BSD + pos_BSD + target_BSD, c_BSD, pos_BS, target_BS

    def _rope(self, pos_BS: Tensor, target_BS: Tensor) -> RopeFn | None:
        if not self.config.rope:
            return None
        cos, sin = self.rope_cos, self.rope_sin
        if cos.dtype not in (torch.float32, torch.float64):  # model cast to bf16/fp16: rebuild
            cfg = self.config
            cos, sin = rope_table(math.isqrt(cfg.steps), cfg.hidden // cfg.heads,
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

    def _check(self, bits_BNJ: Tensor, labels_B: Tensor, max_len: int) -> None:
        J = self.step_bits
        if bits_BNJ.ndim != 3 or bits_BNJ.shape[1] > max_len or bits_BNJ.shape[2] != J:
            raise ValueError(
                f"BAR expects bits (B, N, {J}) with N <= {max_len}, got {tuple(bits_BNJ.shape)}; "
                "convert token indices with indices_to_bits(tokens, token_bits), then "
                "model.to_steps (patch_size > 1 groups p x p tokens per step)."
            )
        if labels_B.shape != bits_BNJ.shape[:1]:
            raise ValueError(
                f"labels must be (B,) = {tuple(bits_BNJ.shape[:1])}, got {tuple(labels_B.shape)}."
            )

    def forward(
        self, bits_BTJ: Tensor, labels_B: Tensor, orders_BT: Tensor | None = None
    ) -> Tensor:
        """Teacher-forced head conditions for every step, in step position order.

        Args:
            bits_BTJ: (B, T, J) int64 bits in {0, 1}, step (raster) order: `to_steps(bits)`
                (for patch_size 1 simply the token bits (B, L, K)).
            labels_B: (B,) int64 class labels (null class allowed).
            orders_BT: (B, T) generation orders of the steps; None = raster.
        Returns:
            cond_BTW (B, T, W): row t conditions the head for the step at position t, computed
            from the class and the steps generated before t in the given order.
        """
        B, T, _ = bits_BTJ.shape
        if T != self.steps:
            raise ValueError(
                f"BAR expects bits (B, {self.steps}, {self.step_bits}), got "
                f"{tuple(bits_BTJ.shape)}."
            )
        self._check(bits_BTJ, labels_B, T)
        J = bits_BTJ.shape[2]
        orders_BT = raster_orders(B, T, bits_BTJ.device) if orders_BT is None else orders_BT
        check_orders(orders_BT, B, T)
        shuffled_BTJ = bits_BTJ.long().gather(1, orders_BT[..., None].expand(B, T, J))
        h_BSD = self._run(self.slot_inputs(shuffled_BTJ, labels_B, orders_BT), 0, None)
        P = self.prefix_len
        cond_BTW = self.latent_condition_proj(self.norm(h_BSD[:, P - 1 : P - 1 + T]))
        return unshuffle(cond_BTW, orders_BT)

    def next_condition(
        self, bits_BNJ: Tensor, labels_B: Tensor, cache: KVCache | None = None
    ) -> Tensor:
        """Head condition (B, W) of raster step N given the first N steps' bits (N < T).

        With a cache only the slots not cached yet are computed and the cache is extended; it
        must have been built from the same prefix.
        """
        B, N, _ = bits_BNJ.shape
        self._check(bits_BNJ, labels_B, self.steps - 1)
        start = 0 if cache is None else cache.length
        if start > self.prefix_len + N - 1:
            raise ValueError(
                f"KV cache holds {start} slots but only {self.prefix_len + N} are given."
            )
        orders_BT = raster_orders(B, self.steps, bits_BNJ.device)
        inputs = self.slot_inputs(bits_BNJ.long(), labels_B, orders_BT)
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

    Orders: random w.p. `rar_permutation_prob(step, ...)`, else raster (over the T AR steps);
    class -> null w.p. `class_drop`; every step's J bits (J = K for patch_size 1) are masked at its
    own ratio `mbm_mask_ratio` and the head predicts all J bits from the backbone condition;
    loss = `weighted_bit_loss` over all steps.

    Args:
        tokens_BL: (B, L) int64 token indices in [0, 2**K), position (raster) order.
        labels_B: (B,) int64 class labels in [0, num_classes).
        generator: torch.Generator on the tokens' device for orders, class drop and masks.
    Returns:
        loss (scalar) and metrics: 'loss', 'masked_bit_accuracy', 'mask_ratio',
        'permutation_prob' (all detached).
    """
    B = tokens_BL.shape[0]
    K, T, J, dev = model.config.token_bits, model.steps, model.step_bits, tokens_BL.device
    bits_BTJ = model.to_steps(indices_to_bits(tokens_BL, K).long())
    prob = rar_permutation_prob(step, anneal_start, anneal_end)
    orders_BT = sample_orders(B, T, prob, device=dev, generator=generator)
    drop_B = torch.rand(B, device=dev, generator=generator) < class_drop
    labels_B = torch.where(drop_B, model.null_class_id, labels_B)
    cond_BTW = model(bits_BTJ, labels_B, orders_BT)

    bits_MK = bits_BTJ.reshape(B * T, J)
    ratio_M = mbm_mask_ratio(B * T, J, std=mask_ratio_std, device=dev, generator=generator)
    ids_MK, mask_MK = mask_bits(bits_MK, ratio_M, generator=generator)
    logits_MK2 = model.lm_head(ids_MK, cond_BTW.reshape(B * T, -1), ratio_M)
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
    """Raster AR sampling; each step's bits come from `mbm_sample` (official BAR.generate).

    CFG (g > 1) runs the backbone on [labels; null] and applies `bar_guidance(t, T, g)` to the
    head's bit logits at AR step t. The model runs in eval mode (restored afterwards).

    Args:
        labels_B: (B,) int64 class labels (the null class gives unconditional samples).
        temperature: the head's Gumbel temperature (annealed to 0 over its unmasking steps).
        tokens_allocation: bits unmasked per head step (sum J = K * patch_size**2); None =
            `default_tokens_allocation(J)`.
        generator: torch.Generator on the labels' device; fixed seed -> identical tokens
            (None: the global generator, as the official sampler).
    Returns:
        tokens_BL: (B, L) int64 indices in [0, 2**K), bit k = (index >> k) & 1.
    """
    T, J = model.steps, model.step_bits
    alloc = default_tokens_allocation(J) if tokens_allocation is None else tuple(tokens_allocation)
    was_training = model.training
    model.eval()
    B, dev = labels_B.shape[0], labels_B.device
    use_cfg = guidance_scale > 1.0
    cond_labels = labels_B
    if use_cfg:
        cond_labels = torch.cat([labels_B, torch.full_like(labels_B, model.null_class_id)])
    cache = model.new_kv_cache() if use_kv_cache else None
    bits_BNJ = torch.zeros(B, 0, J, dtype=torch.long, device=dev)
    try:
        for step in range(T):
            inputs = torch.cat([bits_BNJ, bits_BNJ]) if use_cfg else bits_BNJ
            cond_W = model.next_condition(inputs, cond_labels, cache)
            new_BJ = mbm_sample(
                model.lm_head, cond_W, tokens_allocation=alloc, use_cfg=use_cfg,
                guidance_scale=bar_guidance(step, T, guidance_scale), temperature=temperature,
                generator=generator,
            )
            bits_BNJ = torch.cat([bits_BNJ, new_BJ[:, None]], dim=1)
    finally:
        model.train(was_training)
    return bits_to_indices(model.from_steps(bits_BNJ))


def bar_batch_loss(model: BAR, batch: dict[str, Tensor], step: int, **options: Any):
    """Batch-level loss (``tokens`` (B, L) K-bit ids, ``label`` (B,)): :func:`bar_loss`."""
    return bar_loss(model, batch["tokens"].long(), batch["label"].long(), step, **options)


# --------------------------------------------------------------------------------------------------
# Released weights
# --------------------------------------------------------------------------------------------------


def _resolve_config(config_or_size: BARConfig | str) -> tuple[BARConfig, str]:
    if isinstance(config_or_size, BARConfig):
        return config_or_size, "custom config"
    name = config_or_size.replace("-", "_").lower().removesuffix(".bin")
    size = BAR_RELEASES.get(name, config_or_size)
    return bar_config(size), config_or_size


def _check_rope_buffers(
    released: Mapping[str, Tensor], model: BAR, what: str, steps: int, prefix: int
) -> None:
    """The released per-block RoPE tables must be this config's (P + T rows, head width d, the
    official 'lang' frequencies; values compared unless on meta)."""
    cfg = model.config
    if not cfg.rope:
        raise ValueError(f"{what}: released BAR generators always use target-aware 2D RoPE "
                         "(the checkpoint holds its tables); use a config with rope=True.")
    d = cfg.hidden // cfg.heads
    want = (model.prefix_len + model.steps, d)
    for key in rope_buffer_keys(released):
        t = released[key]
        if tuple(t.shape) != want:
            raise ValueError(
                f"{what}: '{key}' has shape {tuple(t.shape)} (P + T = {prefix} + {steps} rows) "
                f"but this config expects {want} (repeat_class={cfg.repeat_class}, "
                f"steps={model.steps}, head width {d})."
            )
        if t.is_meta:
            continue
        ours = model.rope_cos if key.endswith("cos") else model.rope_sin
        if not torch.allclose(t.detach().float().cpu(), ours.float().cpu(), atol=1e-4, rtol=0):
            raise ValueError(f"{what}: '{key}' differs from the RoPE table of this config "
                             f"(rope_theta={cfg.rope_theta}); the checkpoint is not a release of "
                             "the official model.")


def load_official(
    source: str | Path | Mapping[str, Tensor], config_or_size: BARConfig | str
) -> BAR:
    """Build `config_or_size` and load a released BAR generator checkpoint into it, strictly.

    Args:
        source: a `.safetensors` file or a state dict with the released names (official
            undefined443/BAR@faf903f `modeling/generator.py` BAR; the releases are `.bin`
            pickles, refused here: convert once, see `read_state_dict`, or use
            `vgen weights convert --family bar`). Meta tensors work when built on meta.
        config_or_size: a `BAR_SIZES` name ("B", "B-patch2", "B-patch4", "L", "L-res512"), a
            release name ("bar_b", "bar_l_res512", ...) or a config.
    Every model tensor must come from the checkpoint and every released tensor is used
    (`official_key_map`; the per-block RoPE buffers and the table rows it drops are listed in
    `OFFICIAL_DROPPED`). Returns the model in eval mode. Raises ValueError naming the first
    released key that is foreign, missing or of the wrong shape (with the shape this config
    expects).
    """
    config, label = _resolve_config(config_or_size)
    what = f"bar.load_official({label})"
    released = read_state_dict(source, what=what)
    try:
        state = official_key_map(released)
        steps = released_steps(released)
        prefix = released_prefix_len(released, steps)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    model = BAR(config)
    if prefix != model.prefix_len:
        key = rope_buffer_keys(released)[0]
        raise ValueError(
            f"{what}: '{key}' has {tuple(released[key].shape)[0]} rows, i.e. {prefix} prefix "
            f"slots for {steps} steps, but this config has {model.prefix_len} (1 cls + "
            f"repeat_class={config.repeat_class})."
        )
    expected = model.state_dict()
    for key, want in expected.items():
        shape = released_shape(key, tuple(want.shape), config.steps)
        if key not in state:
            raise ValueError(f"{what}: the checkpoint has no '{key}' (expected shape {shape}); "
                             "it does not match this size (check depth / head_layers).")
        got = tuple(state[key].shape)
        if got != tuple(want.shape):
            raise ValueError(
                f"{what}: '{key}' has shape {released_shape(key, got, steps)} in the "
                f"checkpoint but this config expects {shape} (hidden={config.hidden}, "
                f"heads={config.heads}, token_bits={config.token_bits}, seq_len={config.seq_len}, "
                f"patch_size={config.patch_size}, repeat_class={config.repeat_class}, "
                f"head_width={config.head_width}, num_classes={config.num_classes})."
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{what}: checkpoint key '{extra[0]}' has no place in this config "
                         f"({len(extra)} such keys; check depth / head_layers).")
    _check_rope_buffers(released, model, what, steps, prefix)
    load_mapped_state_dict(model, state, {k: k for k in state}, what=what)
    return model.eval()


SPEC = FamilySpec(
    name="bar", role="generator", config_class=BARConfig, sizes=BAR_SIZES, model_class=BAR,
    data="bit_tokens", data_fields=("token_bits", "seq_len", "num_classes"),
    loss=bar_batch_loss, conditioning="labels", sampler=sample, output="tokens",
    sampling=BAR_SAMPLING, load_official=load_official,
    summary="BAR: autoregression over bit tokens with a masked-bit-modeling head",
)
