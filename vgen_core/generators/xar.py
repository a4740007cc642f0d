"""xAR: next-cell autoregression with per-cell flow matching and noisy context learning.

Spec: methods.md §2.7, §1.6 (MAR KL-16 latents 16x16x16, x0.2325), §3. Reference:
OliverRensu/xAR `models/xar.py` (xAR, Block, Attention, clusterify/unclusterify, forward,
sample_tokens, xar_base/large/huge) and `models/sampler.py` (euler_maruyama_sampler).

    latent (B, C, 16, 16) --split_cells (clusters=4)--> 4 cells of 8x8 = 64 tokens, cell-major
    every cell k gets its own t_k ~ logit-normal(0, 1):  x_k <- (1 - t_k) x_k + t_k eps_k
    Linear(C -> D) + learned pos -> RMSNorm -> encoder blocks -> RMSNorm
        -> Linear + learned pos -> decoder blocks -> RMSNorm -> Linear(D -> C) = v
    loss = MSE(v, eps - x) over all cells (noisy context: no cell is clean in training).

Blocks: RMSNorm (no weight) -> adaLN (scale, shift, gate from class + time of the token's own cell,
Linear not zero-initialised, as in the official code) -> attention with 2D RoPE and the
block-causal mask (a token of cell i attends to all tokens of cells <= i) -> SwiGLU (hidden
int(4 D * 2/3)). The time embedding sees floor(1000 t), as in the official forward.

RoPE (config `rope`, default on): each token rotates by its (row, col) on the latent grid (EVA-02
VisionRotaryEmbeddingFast layout: half the head dims for the row, half for the column). The
official `models/rope.py` was not readable from here; its positions may differ, so official
checkpoints are not claimed to load.

Sampling (`sample`): cells in order; every cell runs Euler-Maruyama over sde_time_grid(num_steps)
with the same num_steps, as the official `sample_tokens` passes its one `num_steps` to
`euler_maruyama_sampler` for each cell; finished cells enter a KV cache clean, at t = 0; the
guidance scale rises linearly from 1 (first cell) to cfg (last cell). Optional, not official:
`min_steps` anneals the count linearly from num_steps (first cell) to min_steps (last cell).

GRAT at sampling time (`sample(attention="grat")`, training-free, training stays dense): the
pattern of OliverRensu/GRAT @7afc1f9 (`cross_processor.py`, GRAT-X criss-cross; GRAT-B from the
paper) over the (H, W) latent token grid, `grat_groups` (gh, gw) tokens per group (default the
official 8 x 8, which for xAR-B's 16 x 16 latents are exactly its four cells). Every query attends
the keys allowed by GRAT AND by the block-causal mask. `kernels.grat` takes no extra mask, so
(our choice) the GRAT reference mask (`kernels.grat.reference.grat_mask`, mapped to the
cell-major order by `flow.grat_token_mask`) is intersected with the block-causal one and run
through masked SDPA (with the KV cache: the rows of the current cell, the columns of the cells
<= it). This applies the pattern but saves no FLOPs. The sequence holds grid tokens only: class
and time enter through adaLN, not as tokens, so no token stays dense; every query keeps at least
its own group (itself), so no row is empty.

Shape legend: B batch, C latent channels, H = W latent size, K cells, L tokens per cell,
S = K * L tokens, D hidden width, Hh heads, d head dim.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from vgen_core.generators.common import (
    RMSNorm,
    SwiGLU,
    adaln_modulation,
    apply_rope_interleaved,
    attention,
    modulate,
    rms_norm,
    rope_2d_angles,
)
from vgen_core.generators.flow import (
    GRAT_GROUPS,
    TimestepEmbedder,
    euler_maruyama_sample,
    flow_path,
    flow_target,
    grat_token_mask,
    inference_attention_options,
    latents_from_moments,
    logit_normal_t,
    sde_time_grid,
)
from vgen_core.generators.schedules import linear_guidance

__all__ = [
    "XAR",
    "XARConfig",
    "XAR_SIZES",
    "block_causal_mask",
    "cell_cfg_scale",
    "cell_num_steps",
    "grat_sequence_mask",
    "inference_attention",
    "merge_cells",
    "sample",
    "split_cells",
    "xar_config",
    "xar_loss",
]


class XARConfig(BaseModel):
    """xAR config; `build()` makes the model. Defaults = xAR-B on MAR KL-16 latents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latent_size: int = Field(16, ge=1)
    in_channels: int = Field(16, ge=1)
    clusters: int = Field(4, ge=1)  # a perfect square: cells per side = sqrt(clusters)
    hidden: int = Field(768, ge=1)
    encoder_depth: int = Field(8, ge=1)
    decoder_depth: int = Field(8, ge=1)
    heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    num_classes: int = Field(1000, ge=1)
    rope: bool = True
    rope_theta: float = Field(10000.0, gt=0.0)
    # loss
    class_dropout: float = Field(0.1, ge=0.0, le=1.0)
    t_mean: float = 0.0
    t_std: float = Field(1.0, gt=0.0)
    scale_factor: float = Field(0.2325, gt=0.0)  # applied when a batch carries `moments`

    @model_validator(mode="after")
    def _check(self) -> XARConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        g = math.isqrt(self.clusters)
        if g * g != self.clusters or self.latent_size % g:
            raise ValueError(
                f"clusters={self.clusters} must be a square g*g with latent_size="
                f"{self.latent_size} divisible by g (e.g. 4 -> 2x2 cells)."
            )
        if self.rope and (self.hidden // self.heads) % 4:
            raise ValueError(
                f"2D RoPE needs head dim {self.hidden // self.heads} divisible by 4; change "
                "hidden/heads or set rope=False."
            )
        return self

    @property
    def cells_per_side(self) -> int:
        return math.isqrt(self.clusters)

    @property
    def cell_len(self) -> int:
        return (self.latent_size // self.cells_per_side) ** 2

    @property
    def seq_len(self) -> int:
        return self.latent_size**2

    def build(self) -> XAR:
        return XAR(self)


_TINY = dict(
    latent_size=8, in_channels=4, hidden=32, encoder_depth=1, decoder_depth=1, heads=2,
    num_classes=10,
)  # fmt: skip

XAR_SIZES: dict[str, XARConfig] = {
    # CPU-test size: 4x8x8 latents, 4 cells of 4x4 tokens.
    "tiny": XARConfig(**_TINY),
    # xar_base: 768, 8 + 8 blocks, 12 heads (~172M).
    "B": XARConfig(hidden=768, encoder_depth=8, decoder_depth=8, heads=12),
    # xar_large: 1024, 16 + 16 blocks, 16 heads.
    "L": XARConfig(hidden=1024, encoder_depth=16, decoder_depth=16, heads=16),
    # xar_huge: 1280, 20 + 20 blocks, 16 heads.
    "H": XARConfig(hidden=1280, encoder_depth=20, decoder_depth=20, heads=16),
}


xar_config = sized_config("xAR", XARConfig, XAR_SIZES)


# --------------------------------------------------------------------------------------------------
# Cells and masks
# --------------------------------------------------------------------------------------------------


def split_cells(x_BCHW: Tensor, clusters: int) -> Tensor:
    """(B, C, H, W) -> (B, K, L, C): K = clusters cells (g x g grid, raster order), each cell's
    p x p tokens in raster order (official `clusterify`, einsum nchpwq->nhwpqc)."""
    B, C, H, W = x_BCHW.shape
    g = math.isqrt(clusters)
    if g * g != clusters or H != W or H % g:
        raise ValueError(f"split_cells: {tuple(x_BCHW.shape)} cannot be cut into {clusters} cells.")
    p = H // g
    x = x_BCHW.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, clusters, p * p, C)


def merge_cells(x_BKLC: Tensor) -> Tensor:
    """Inverse of `split_cells`: (B, K, L, C) -> (B, C, H, W) (official `unclusterify`)."""
    B, K, L, C = x_BKLC.shape
    g, p = math.isqrt(K), math.isqrt(L)
    x = x_BKLC.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, g * p, g * p)


def block_causal_mask(clusters: int, cell_len: int, device: torch.device | None = None) -> Tensor:
    """(S, S) bool, True = may attend: token of cell i sees every token of cells <= i."""
    cell_S = torch.arange(clusters * cell_len, device=device) // cell_len
    return cell_S[:, None] >= cell_S[None, :]


def _cell_coords(latent_size: int, clusters: int) -> Tensor:
    """(S, 2) (row, col) of each token in cell-major order."""
    rows, cols = torch.meshgrid(
        torch.arange(latent_size), torch.arange(latent_size), indexing="ij"
    )
    grid = torch.stack([rows, cols]).float()[None]  # (1, 2, H, W)
    return split_cells(grid, clusters)[0, :, :, :].reshape(-1, 2)


def grat_sequence_mask(config: XARConfig, options: dict[str, Any]) -> Tensor | None:
    """(S, S) bool GRAT mask over the cell-major sequence (None for dense `options`); options
    from `flow.inference_attention_options` on the (latent_size, latent_size) token grid."""
    if not options:
        return None
    coords_S2 = _cell_coords(config.latent_size, config.clusters).long()
    raster_S = coords_S2[:, 0] * config.latent_size + coords_S2[:, 1]
    return grat_token_mask(options, raster_S)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


KV = tuple[Tensor, Tensor]


class _Block(nn.Module):
    """RMSNorm / adaLN / RoPE attention / SwiGLU block; attention may prepend cached K/V."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio * 2 / 3))
        self.ada_lin = adaln_modulation(dim, 6)

    def forward(
        self,
        x_BSD: Tensor,
        c_BSD: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        mask_SS: Tensor | None,
        past: KV | None = None,
    ) -> tuple[Tensor, KV]:
        """Returns the block output and this call's (k, v) (B, Hh, S, d), RoPE applied."""
        B, S, D = x_BSD.shape
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(c_BSD).chunk(6, dim=-1)
        h = modulate(rms_norm(x_BSD), shift1, scale1)
        q, k, v = self.qkv(h).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos, sin = rope
            q = apply_rope_interleaved(q, cos, sin)
            k = apply_rope_interleaved(k, cos, sin)
        new_kv = (k, v)
        if past is not None:
            k = torch.cat([past[0][:B], k], dim=2)
            v = torch.cat([past[1][:B], v], dim=2)
        a = attention(q, k, v, mask=mask_SS)
        x_BSD = x_BSD + self.proj(a.transpose(1, 2).reshape(B, S, D)) * gamma1
        x_BSD = x_BSD + self.mlp(modulate(rms_norm(x_BSD), shift2, scale2)) * gamma2
        return x_BSD, new_kv


class XAR(nn.Module):
    """Encoder-decoder transformer over cell-major latent tokens with block-causal attention.

    Labels in [0, num_classes) or `null_class_id` (= num_classes) for the unconditional branch.
    """

    family: ClassVar[str] = "xar"
    config_class: ClassVar[type[BaseModel]] = XARConfig
    mask: Tensor  # buffers
    rope_cos: Tensor
    rope_sin: Tensor
    #: (S, S) cell-major GRAT mask ANDed with the block-causal one in eval mode (sampling);
    #: set by `inference_attention`, None = dense
    inference_mask: Tensor | None

    def __init__(self, config: XARConfig) -> None:
        super().__init__()
        self.config = config
        D, S, C = config.hidden, config.seq_len, config.in_channels
        self.class_emb = nn.Embedding(config.num_classes + 1, D)
        self.time_embed = TimestepEmbedder(D)
        self.z_proj = nn.Linear(C, D)
        self.z_proj_ln = RMSNorm(D)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S, D))
        self.encoder_blocks = nn.ModuleList(
            [_Block(D, config.heads, config.mlp_ratio) for _ in range(config.encoder_depth)]
        )
        self.encoder_norm = RMSNorm(D)
        self.decoder_embed = nn.Linear(D, D)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S, D))
        self.decoder_blocks = nn.ModuleList(
            [_Block(D, config.heads, config.mlp_ratio) for _ in range(config.decoder_depth)]
        )
        self.decoder_norm = RMSNorm(D)
        self.pred = nn.Linear(D, C)
        self.register_buffer(
            "mask", block_causal_mask(config.clusters, config.cell_len), persistent=False
        )
        coords_S2 = _cell_coords(config.latent_size, config.clusters)
        angles_Sd = rope_2d_angles(
            coords_S2[:, 0], coords_S2[:, 1], D // config.heads, config.rope_theta
        )
        self.register_buffer("rope_cos", angles_Sd.cos(), persistent=False)
        self.register_buffer("rope_sin", angles_Sd.sin(), persistent=False)
        self.inference_mask = None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.encoder_pos_embed_learned, std=0.02)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def _grat_mask(self) -> Tensor | None:
        """The GRAT mask in force: set by `inference_attention`, and only in eval mode."""
        return None if self.training else self.inference_mask

    def _condition(self, labels_B: Tensor, t_BK: Tensor, cells: slice) -> Tensor:
        """(B, S', D): class + time embedding of each token's own cell, for the cells in `cells`."""
        B, K = t_BK.shape
        t_emb = self.time_embed((t_BK * 1000).long().flatten()).view(B, K, -1)
        c_BKD = t_emb + self.class_emb(labels_B)[:, None]
        L = self.config.cell_len
        return c_BKD.repeat_interleave(L, dim=1)[:, cells.start * L : cells.stop * L]

    def _run(
        self,
        x_BSC: Tensor,
        c_BSD: Tensor,
        tokens: slice,
        mask: Tensor | None,
        cache: list[KV] | None,
    ) -> tuple[Tensor, list[KV]]:
        """Encoder + decoder over the token positions `tokens`; returns v and each layer's K/V."""
        rope = (self.rope_cos[tokens], self.rope_sin[tokens]) if self.config.rope else None
        new_cache: list[KV] = []
        layers = [*self.encoder_blocks, *self.decoder_blocks]
        past: Sequence[KV | None] = cache or [None] * len(layers)
        x = self.z_proj_ln(self.z_proj(x_BSC) + self.encoder_pos_embed_learned[:, tokens])
        for i, blk in enumerate(layers):
            if i == len(self.encoder_blocks):
                x = self.decoder_embed(self.encoder_norm(x))
                x = x + self.decoder_pos_embed_learned[:, tokens]
            x, kv = blk(x, c_BSD, rope, mask, past[i])
            new_cache.append(kv)
        return self.pred(self.decoder_norm(x)), new_cache

    def forward(self, x_BSC: Tensor, t_BK: Tensor, labels_B: Tensor) -> Tensor:
        """Velocity for every token of the full cell-major sequence.

        Args:
            x_BSC: (B, S, C) noisy tokens in cell-major order (`split_cells(...).flatten(1, 2)`).
            t_BK: (B, K) time of each cell (0 = clean context).
            labels_B: (B,) int64.
        Returns:
            v (B, S, C); under the block-causal mask, cell i's output depends on cells <= i only.
        """
        cfg = self.config
        if x_BSC.shape[1:] != (cfg.seq_len, cfg.in_channels):
            raise ValueError(
                f"xAR expects tokens (B, {cfg.seq_len}, {cfg.in_channels}), got "
                f"{tuple(x_BSC.shape)}."
            )
        if t_BK.shape != (x_BSC.shape[0], cfg.clusters):
            raise ValueError(f"t must be (B, {cfg.clusters}), got {tuple(t_BK.shape)}.")
        c = self._condition(labels_B, t_BK, slice(0, cfg.clusters))
        grat = self._grat_mask()
        mask = self.mask if grat is None else self.mask & grat
        v, _ = self._run(x_BSC, c, slice(0, cfg.seq_len), mask, None)
        return v

    def forward_cell(
        self,
        x_BLC: Tensor,
        t_B: Tensor,
        labels_B: Tensor,
        cell: int,
        cache: list[KV] | None,
    ) -> tuple[Tensor, list[KV]]:
        """One cell given the cached K/V of cells < `cell` (None for cell 0).

        Equal to `forward` on [clean cached cells at t = 0, this cell at t] restricted to this
        cell. The cache may hold more rows than x (the CFG-doubled batch); the first B rows are
        used. Returns (v (B, L, C), cache extended by this cell's K/V) — extend the cache only
        with a cell that is final (clean, t = 0).
        """
        L = self.config.cell_len
        t_BK = t_B[:, None]
        c = self._condition(labels_B, t_BK, slice(0, 1))
        mask, grat = None, self._grat_mask()
        if grat is not None:  # this cell's query rows, the keys of the cached cells and its own
            past = 0 if cache is None else int(cache[0][0].shape[2])
            mask = grat[cell * L : (cell + 1) * L, (cell + 1) * L - past - L : (cell + 1) * L]
        v, kv = self._run(x_BLC, c, slice(cell * L, (cell + 1) * L), mask, cache)
        if cache is None:
            return v, kv
        B = x_BLC.shape[0]
        merged = [
            (torch.cat([pk[:B], k], dim=2), torch.cat([pv[:B], vv], dim=2))
            for (pk, pv), (k, vv) in zip(cache, kv)
        ]
        return v, merged


@contextlib.contextmanager
def inference_attention(model: XAR, options: dict[str, Any]) -> Iterator[None]:
    """Within the block, `model` in eval mode attends with the GRAT pattern of `options`
    (`flow.inference_attention_options` on the latent grid; {} = dense) AND its block-causal
    mask, in `forward` and `forward_cell`; the previous setting is restored afterwards."""
    saved = model.inference_mask
    mask = grat_sequence_mask(model.config, options)
    model.inference_mask = None if mask is None else mask.to(model.mask.device)
    try:
        yield
    finally:
        model.inference_mask = saved


# --------------------------------------------------------------------------------------------------
# Loss, sampler
# --------------------------------------------------------------------------------------------------


def xar_loss(
    model: XAR,
    batch: dict[str, Tensor],
    step: int = 0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """xAR training loss (official `xAR.forward`): per-cell logit-normal t, MSE on eps - x.

    Batch keys: `latents` float (B, C, H, W), already sampled and scaled, or `moments`
    (B, 2C, H, W) = mean || logvar (sampled here, times config.scale_factor); `label` int64 (B,).
    `step` is unused (the trainer's loss signature). Labels -> null with probability
    class_dropout. Returns the loss and detached metrics 'loss', 'loss_cell{k}'.
    """
    cfg = model.config
    if "latents" in batch:
        x = batch["latents"].float()
    elif "moments" in batch:
        x = latents_from_moments(batch["moments"].float(), cfg.scale_factor, generator)
    else:
        raise KeyError(f"batch needs 'latents' or 'moments'; got keys {sorted(batch)}.")
    B, K, dev = x.shape[0], cfg.clusters, x.device
    x_BKLC = split_cells(x, K)
    t_BK = logit_normal_t(B * K, mean=cfg.t_mean, std=cfg.t_std, generator=generator, device=dev)
    t_BK = t_BK.view(B, K)
    noise = torch.randn(x_BKLC.shape, generator=generator, device=dev, dtype=x.dtype)
    drop = torch.rand(B, generator=generator, device=dev) < cfg.class_dropout
    labels = torch.where(drop, model.null_class_id, batch["label"].long())
    xt_BKLC = flow_path(x_BKLC.flatten(0, 1), noise.flatten(0, 1), t_BK.flatten()).view_as(x_BKLC)
    v = model(xt_BKLC.flatten(1, 2), t_BK, labels).view_as(x_BKLC)
    err_BK = ((v.float() - flow_target(x_BKLC, noise)) ** 2).mean(dim=(2, 3))
    loss = err_BK.mean()
    metrics = {"loss": loss.detach()}
    metrics.update({f"loss_cell{k}": err_BK[:, k].mean().detach() for k in range(K)})
    return loss, metrics


def cell_num_steps(cell: int, clusters: int, num_steps: int, min_steps: int | None = None) -> int:
    """Sampling steps for `cell`.

    Default (`min_steps=None`): num_steps for every cell, as in the official `sample_tokens`
    (one `num_steps` passed to `euler_maruyama_sampler` for each cell). With `min_steps` (an
    option, not in the official code): int((K-1-k)/(K-1) * (num_steps - min_steps) + min_steps),
    num_steps on the first cell falling to min_steps on the last. A single cell gets num_steps.
    """
    if min_steps is None or clusters == 1:
        return num_steps
    upper = clusters - 1
    return int((upper - cell) / upper * (num_steps - min_steps) + min_steps)


def cell_cfg_scale(cell: int, clusters: int, cfg: float) -> float:
    """Guidance for `cell`: (cfg - 1) * k / (K - 1) + 1 (1 on the first cell, cfg on the last)."""
    if clusters == 1:
        return cfg
    return linear_guidance(cell, clusters - 1.0, cfg)


@torch.no_grad()
def sample(
    model: XAR,
    labels_B: Tensor,
    *,
    num_steps: int = 40,
    min_steps: int | None = None,
    cfg: float = 2.7,
    t_min: float = 0.04,
    attention: str = "dense",
    grat_groups: Sequence[int] = GRAT_GROUPS,
    grat_variant: str = "criss_cross",
    grat_radius: int = 1,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Generate latents cell by cell (official `sample_tokens`).

    Cell k: noise (B, L, C) -> Euler-Maruyama over sde_time_grid(cell_num_steps(k), t_min) with
    guidance cell_cfg_scale(k) (null class in the second half); earlier cells are context at t = 0.
    With `use_cache` (default) their K/V come from a cache filled once per finished cell; with
    `use_cache=False` the clean prefix is recomputed through `forward` at every step (slower, same
    result up to float rounding). Defaults: xAR-B (README `--num_steps 40 --cfg 2.7`; L/H use 50
    and 2.3/2.2): every cell runs num_steps steps, as in the official `sample_tokens`.
    `min_steps` (default None = off, not official) anneals the per-cell count from num_steps on
    the first cell to min_steps on the last (`cell_num_steps`).

    `attention="grat"` (training-free; see the module docstring) attends with the GRAT pattern
    on the (H, W) latent token grid AND the block-causal mask: groups of `grat_groups` (gh, gw)
    tokens, each dividing H, `grat_variant` "criss_cross" (GRAT-X, official) or "block" (GRAT-B,
    `grat_radius` groups). "dense" (default) is the training attention.

    Args:
        labels_B: (B,) int64 labels (null_class_id for unconditional samples).
        generator: on the labels' device; draws the initial and SDE noise.
    Returns:
        latents (B, C, H, W) in the scaled latent space (divide by scale_factor to decode).
    """
    conf = model.config
    K, L, C = conf.clusters, conf.cell_len, conf.in_channels
    H = conf.latent_size
    try:
        options = inference_attention_options(attention, (H, H), groups=grat_groups,
                                              variant=grat_variant, radius=grat_radius)
    except ValueError as e:
        raise ValueError(f"xAR sample(attention={attention!r}) on the {H}x{H} latent token grid: "
                         f"{e}") from None
    was_training = model.training
    model.eval()
    B, dev = labels_B.shape[0], labels_B.device
    guided = cfg != 1.0
    null_B = torch.full_like(labels_B, model.null_class_id)
    all_labels = torch.cat([labels_B, null_B]) if guided else labels_B
    cells: list[Tensor] = []
    cache: list[KV] | None = None
    try:
        with inference_attention(model, options):
            for k in range(K):
                # reads `cache` / `cells` as they stand while cell k is sampled (filled after
                # each cell)
                def velocity(x_NLC: Tensor, t_N: Tensor, k: int = k) -> Tensor:
                    N = x_NLC.shape[0]
                    labels = labels_B if N == B else all_labels
                    if use_cache:
                        return model.forward_cell(x_NLC, t_N, labels, k, cache)[0]  # noqa: B023
                    prefix = [c.repeat(N // B, 1, 1) for c in cells]
                    pad = x_NLC.new_zeros(N, (K - k - 1) * L, C)
                    seq = torch.cat([*prefix, x_NLC, pad], dim=1)
                    t_NK = torch.zeros(N, K, device=dev, dtype=t_N.dtype)
                    t_NK[:, k] = t_N
                    t_NK[:, k + 1 :] = 1.0
                    return model(seq, t_NK, labels)[:, k * L : (k + 1) * L]

                noise = torch.randn(B, L, C, generator=generator, device=dev)
                grid = sde_time_grid(cell_num_steps(k, K, num_steps, min_steps), t_min)
                z = euler_maruyama_sample(
                    velocity, noise, grid, cfg_scale=cell_cfg_scale(k, K, cfg), generator=generator
                )
                cells.append(z)
                if use_cache and k < K - 1:
                    z_all = z.repeat(all_labels.shape[0] // B, 1, 1)
                    zeros = torch.zeros(z_all.shape[0], device=dev)
                    _, cache = model.forward_cell(z_all, zeros, all_labels, k, cache)
    finally:
        model.train(was_training)
    return merge_cells(torch.stack(cells, dim=1))


SPEC = FamilySpec(
    name="xar", role="generator", config_class=XARConfig, sizes=XAR_SIZES, model_class=XAR,
    data="latents", data_fields=("in_channels", "latent_size", "num_classes", "scale_factor"),
    loss=xar_loss, conditioning="labels", sampler=sample, output="latents",
    summary="xAR: next-cell autoregression with flow matching on noisy context",
)
