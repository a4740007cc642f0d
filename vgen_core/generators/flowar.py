"""FlowAR: scale-wise autoregression over a VAE latent pyramid, each scale drawn by flow matching.

Spec: methods.md §2.8 [P]. OliverRensu/FlowAR @b41bd49 holds a README only ("under internal
review"), so this follows the paper (Ren et al., "FlowAR: Scale-wise Autoregressive Image
Generation Meets Flow Matching", arXiv 2412.15205). What the paper fixes is marked [P]; everything
else is a choice made here, marked [I].

    latent F (B, C, H, W) --area downsample--> pyramid s_1 .. s_K, sides (1, 2, 4, 8, 16)     [P]
    AR transformer, block-causal over scales, input [class, Up(s_1), ..., Up(s_{K-1})]        [P]
        -> semantics ŝ_k (B, s_k^2, D) for every scale (one pass, teacher forcing)
    flow head per scale k: F_t = t s_k + (1 - t) eps, predict v = s_k - eps                    [P]
        conditioned by Spatial-adaLN: (shift, scale, gate) per position = MLP(ŝ_k + emb(t))   [P]

[P] from the paper: scales that double, made by downsampling the finest latent of any
off-the-shelf VAE (MAR's KL-16 at 256 px: 16x16x16, so (1, 2, 4, 8, 16)); the AR transformer's
input is the class token followed by the upsampled previous scales, and its output at scale k is
the semantics ŝ_k; a flow-matching model maps noise to s_k on the linear path t s_k + (1 - t) eps
with velocity s_k - eps, conditioned position-wise on ŝ_k and t by Spatial-adaLN; sampling runs
scale by scale, each scale integrated by the flow model and fed (upsampled) to the AR transformer
for the next. Sizes S / B / L / H and their parameter totals
170M / 300M / 589M / 1.9B (L and H also in the README); FlowAR-H gFID 1.65 (methods.md §5).

[I] choices made here (the paper does not fix them, or its text was not available here):
  - One flow head (shared weights) serves every scale; it sees the scale only through ŝ_k.
  - Downsampling is area averaging (`F.interpolate(mode="area")`: exact block means when the
    side divides H); upsampling of the previous scale is bicubic (config `upsample`).
  - Default scales: halve `latent_size` while it is even (16 -> (1, 2, 4, 8, 16), 8 -> (1, 2, 4,
    8), 24 -> (3, 6, 12, 24)); config `scales` overrides. The first scale's slots all hold the
    class embedding (one slot when s_1 = 1).
  - Blocks (AR and flow head): pre-RMSNorm, SDPA attention, SwiGLU (hidden 2/3 * 4 D), adaLN-Zero
    gates (DiT init). AR blocks are modulated by the class embedding; learned positions over all
    S = sum s_k^2 slots. The flow head has no positional input of its own: positions reach it
    through the semantics. In training all scales go through the head in one pass with a
    block-diagonal mask (a token attends to its own scale only), which equals one call per scale.
  - One t per (sample, scale), uniform in (0, 1) (config `t_sampling`, or logit-normal); the time
    embedding sees 1000 t. Loss: per-scale MSE, averaged over scales (every scale weighs the
    same). Class dropout 0.1 to a null class for guidance (family convention).
  - Sampling: Euler over uniform steps (default 25) through `flow.euler_sample` (the paper's time
    t runs 0 -> 1; the shared sampler's runs 1 -> 0, so it is called with -v(x, 1 - t)); guidance
    u + s (c - u) with the null class, the scale rising linearly from 1 on the first scale to
    `cfg_scale` on the last (`schedules.guidance`, as xAR's per-cell ramp; other schedules by
    name). The AR transformer runs once per scale over the whole prefix (no KV cache: it is
    evaluated K times, the flow head K * num_steps times).
  - Widths / depths of S / B / L / H: chosen here so that the parameter count lands within 3% of
    the paper's totals (see FLOWAR_SIZES); the paper's own table was not readable from here, so
    official checkpoints are not claimed to load.

Time convention: as the paper, t = 0 is noise and t = 1 is data (the reverse of `flow.py`).

Shape legend: B batch, C latent channels, H = W latent side, K scales, s_k side of scale k,
L_k = s_k^2 tokens of scale k, S = sum L_k, D AR width, E flow-head width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config
from vgen_core.generators.common import (
    RMSNorm,
    SwiGLU,
    adaln_modulation,
    attention,
    linear_at,
    modulate,
    rms_norm,
)
from vgen_core.generators.flow import (
    TimestepEmbedder,
    euler_sample,
    flow_path,
    latents_from_moments,
    logit_normal_t,
    ode_time_grid,
)
from vgen_core.generators.schedules import guidance

__all__ = [
    "FLOWAR_SIZES",
    "FlowAR",
    "FlowARConfig",
    "FlowHead",
    "SpatialAdaLN",
    "block_causal_mask",
    "default_scales",
    "flowar_config",
    "flowar_loss",
    "latent_pyramid",
    "sample",
    "scale_block_mask",
    "scale_path",
    "scale_target",
    "upsample",
]

Upsample = Literal["bicubic", "bilinear", "nearest"]


def default_scales(latent_size: int) -> tuple[int, ...]:
    """Sides of the pyramid: `latent_size` halved while even, coarsest first ((1, 2, 4, 8, 16) for
    16; (3, 6, 12, 24) for 24)."""
    sides = [latent_size]
    while sides[-1] % 2 == 0:
        sides.append(sides[-1] // 2)
    return tuple(reversed(sides))


class FlowARConfig(BaseModel):
    """FlowAR config; `build()` makes the model. Defaults = FlowAR-S on MAR KL-16 latents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latent_size: int = Field(16, ge=1)
    in_channels: int = Field(16, ge=1)
    scales: tuple[int, ...] | None = None  # None -> default_scales(latent_size)
    # AR transformer
    hidden: int = Field(768, ge=1)
    depth: int = Field(12, ge=1)
    heads: int = Field(12, ge=1)
    # flow-matching head
    head_hidden: int = Field(768, ge=1)
    head_depth: int = Field(4, ge=1)
    head_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    num_classes: int = Field(1000, ge=1)
    upsample: Upsample = "bicubic"
    # loss
    class_dropout: float = Field(0.1, ge=0.0, le=1.0)
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"
    scale_factor: float = Field(0.2325, gt=0.0)  # MAR KL-16; applied when a batch has `moments`

    @model_validator(mode="after")
    def _check(self) -> FlowARConfig:
        for width, heads, what in ((self.hidden, self.heads, ""),
                                   (self.head_hidden, self.head_heads, "head_")):
            if width % heads:
                raise ValueError(f"{what}hidden={width} must be divisible by {what}heads={heads}.")
        sides = self.scale_sides
        if any(s < 1 for s in sides) or any(b <= a for a, b in zip(sides, sides[1:])):
            raise ValueError(f"scales={sides} must be strictly increasing positive sides.")
        if sides[-1] != self.latent_size:
            raise ValueError(
                f"scales={sides} must end at latent_size={self.latent_size} (the finest scale is "
                f"the latent itself); set scales=None for {default_scales(self.latent_size)}."
            )
        return self

    @property
    def scale_sides(self) -> tuple[int, ...]:
        return self.scales if self.scales is not None else default_scales(self.latent_size)

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        return tuple(s * s for s in self.scale_sides)

    @property
    def seq_len(self) -> int:
        return sum(self.tokens_per_scale)

    def build(self) -> FlowAR:
        return FlowAR(self)


def _size(hidden: int, depth: int, heads: int, head_depth: int) -> FlowARConfig:
    return FlowARConfig(hidden=hidden, depth=depth, heads=heads, head_hidden=hidden,
                        head_depth=head_depth, head_heads=heads)


FLOWAR_SIZES: dict[str, FlowARConfig] = {
    # CPU-test size: 4x8x8 latents, scales (1, 2, 4, 8) = 85 slots.
    "tiny": FlowARConfig(latent_size=8, in_channels=4, hidden=32, depth=2, heads=2, head_hidden=32,
                         head_depth=1, head_heads=2, num_classes=10),
    # Parameter totals are the paper's (170M / 300M / 589M / 1.9B); widths and depths are [I],
    # chosen to land within 3% of them (tests/unit/test_flowar.py checks the counts).
    "S": _size(768, 12, 12, 4),
    "B": _size(768, 24, 12, 4),
    "L": _size(1024, 24, 16, 7),
    "H": _size(1536, 30, 16, 14),
}


flowar_config = sized_config("FlowAR", FlowARConfig, FLOWAR_SIZES)


# --------------------------------------------------------------------------------------------------
# Pyramid, masks, path
# --------------------------------------------------------------------------------------------------


def latent_pyramid(x_BCHW: Tensor, sides: Sequence[int]) -> list[Tensor]:
    """[s_1 .. s_K]: the latent area-averaged to each side (B, C, s_k, s_k), coarsest first.

    `F.interpolate(mode="area")` is adaptive average pooling: when s_k divides H each value is the
    mean of an (H / s_k)^2 block; the side equal to H returns the latent unchanged.
    """
    return [x_BCHW if s == x_BCHW.shape[-1] else F.interpolate(x_BCHW, size=(s, s), mode="area")
            for s in sides]


def upsample(x_BCss: Tensor, side: int, mode: str = "bicubic") -> Tensor:
    """Up(s_k): (B, C, s, s) -> (B, C, side, side) by `mode` interpolation (the AR input)."""
    if mode == "nearest":
        return F.interpolate(x_BCss, size=(side, side), mode="nearest")
    return F.interpolate(x_BCss, size=(side, side), mode=mode, align_corners=False)


def _scale_ids(sides: Sequence[int], device: torch.device | None = None) -> Tensor:
    """(S,) index of the scale each slot belongs to."""
    return torch.tensor([k for k, s in enumerate(sides) for _ in range(s * s)], device=device)


def block_causal_mask(sides: Sequence[int], device: torch.device | None = None) -> Tensor:
    """(S, S) bool, True = may attend: a slot of scale k sees every slot of scales <= k."""
    ids_S = _scale_ids(sides, device)
    return ids_S[:, None] >= ids_S[None, :]


def scale_block_mask(sides: Sequence[int], device: torch.device | None = None) -> Tensor:
    """(S, S) bool block-diagonal mask: a slot sees the slots of its own scale only."""
    ids_S = _scale_ids(sides, device)
    return ids_S[:, None] == ids_S[None, :]


def scale_path(x1: Tensor, x0: Tensor, t_B: Tensor) -> Tensor:
    """F_t = t x1 + (1 - t) x0 (paper: x1 = data s_k, x0 = noise), t (B,) broadcast over x1's
    remaining dims; `flow.flow_path` with data and noise in its roles and time 1 - t."""
    return flow_path(x1, x0, 1.0 - t_B)


def scale_target(x1: Tensor, x0: Tensor) -> Tensor:
    """Velocity dF_t/dt = x1 - x0 (independent of t on the linear path)."""
    return x1 - x0


def _tokens(x_BCss: Tensor) -> Tensor:
    return x_BCss.flatten(2).transpose(1, 2)  # (B, C, s, s) -> (B, s^2, C)


def _grid(x_BLC: Tensor) -> Tensor:
    B, L, C = x_BLC.shape
    side = int(round(L**0.5))
    return x_BLC.transpose(1, 2).reshape(B, C, side, side)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class SpatialAdaLN(nn.Module):
    """Spatial-adaLN: `chunks` modulation maps per position, Linear(SiLU(sem + t)).

    sem (B, L, D) varies over positions, t (B, D) (one time per sample, broadcast) or (B, L, D);
    returns `chunks` tensors (B, L, D). With semantics constant over positions it is the usual
    per-sample adaLN; with the Linear zeroed every map is 0 (identity modulation, closed gates).
    """

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.adaLN_modulation = adaln_modulation(dim, chunks)

    def forward(self, sem_BLD: Tensor, t_emb: Tensor) -> tuple[Tensor, ...]:
        t = t_emb[:, None] if t_emb.ndim == 2 else t_emb
        return self.adaLN_modulation(sem_BLD + t).chunk(self.chunks, dim=-1)


class _Block(nn.Module):
    """Pre-RMSNorm block; modulation (shift1, scale1, gate1, shift2, scale2, gate2) from outside."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio * 2 / 3))

    def run(self, x_BLD: Tensor, mods: Sequence[Tensor], mask: Tensor | None) -> Tensor:
        B, L, D = x_BLD.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = modulate(rms_norm(x_BLD), shift1, scale1)
        q, k, v = self.qkv(h).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, mask=mask).transpose(1, 2).reshape(B, L, D)
        x_BLD = x_BLD + gate1 * self.proj(a)
        return x_BLD + gate2 * self.mlp(modulate(rms_norm(x_BLD), shift2, scale2))


class _ARBlock(_Block):
    """AR transformer block: adaLN from the class embedding (one condition per sample)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__(dim, heads, mlp_ratio)
        self.adaLN_modulation = adaln_modulation(dim, 6)

    def forward(self, x_BLD: Tensor, c_BD: Tensor, mask: Tensor | None) -> Tensor:
        return self.run(x_BLD, self.adaLN_modulation(c_BD)[:, None].chunk(6, dim=-1), mask)


class _FlowBlock(_Block):
    """Flow-head block: Spatial-adaLN from the semantics and the time embedding."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__(dim, heads, mlp_ratio)
        self.spatial_adaln = SpatialAdaLN(dim, 6)

    def forward(self, x_BLE: Tensor, sem_BLE: Tensor, t_emb: Tensor,
                mask: Tensor | None) -> Tensor:
        return self.run(x_BLE, self.spatial_adaln(sem_BLE, t_emb), mask)


class FlowHead(nn.Module):
    """The flow-matching model shared by every scale: noisy tokens + t + semantics -> velocity."""

    def __init__(self, in_channels: int, sem_dim: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.input_proj = nn.Linear(in_channels, dim)
        self.sem_proj = nn.Linear(sem_dim, dim)
        self.time_embed = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(_FlowBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.final_adaln = SpatialAdaLN(dim, 2)
        self.linear = nn.Linear(dim, in_channels)

    def forward(self, x_BLC: Tensor, t: Tensor, sem_BLD: Tensor,
                mask: Tensor | None = None) -> Tensor:
        """Velocity (B, L, C) at x_t (B, L, C), paper time t (B,) or per token (B, L) in [0, 1]
        (1 = data), semantics (B, L, D); `mask` (L, L) keeps attention inside each scale."""
        t_emb = self.time_embed(1000.0 * t.flatten()).view(*t.shape, -1)
        sem = self.sem_proj(sem_BLD)
        h = self.input_proj(x_BLC)
        for block in self.blocks:
            h = block(h, sem, t_emb, mask)
        shift, scale = self.final_adaln(sem, t_emb)
        return self.linear(modulate(rms_norm(h), shift, scale))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class FlowAR(nn.Module):
    """Block-causal AR transformer over the scale pyramid + a Spatial-adaLN flow head.

    Labels in [0, num_classes) or `null_class_id` (= num_classes) for the unconditional branch.
    """

    family: ClassVar[str] = "flowar"
    config_class: ClassVar[type[BaseModel]] = FlowARConfig
    ar_mask: Tensor  # buffers
    head_mask: Tensor

    def __init__(self, config: FlowARConfig) -> None:
        super().__init__()
        self.config = config
        D, C, S = config.hidden, config.in_channels, config.seq_len
        self.class_emb = nn.Embedding(config.num_classes + 1, D)
        self.z_proj = nn.Linear(C, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, S, D))
        self.blocks = nn.ModuleList(
            _ARBlock(D, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = RMSNorm(D)
        self.head = FlowHead(C, D, config.head_hidden, config.head_depth, config.head_heads,
                             config.mlp_ratio)
        sides = config.scale_sides
        self.register_buffer("ar_mask", block_causal_mask(sides), persistent=False)
        self.register_buffer("head_mask", scale_block_mask(sides), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        temb = self.head.time_embed.mlp
        nn.init.normal_(linear_at(temb, 0).weight, std=0.02)
        nn.init.normal_(linear_at(temb, 2).weight, std=0.02)
        # adaLN-Zero (DiT): every modulation (AR blocks, Spatial-adaLN) and the output layer
        zero = [linear_at(b.adaLN_modulation, -1) for b in self.blocks]
        zero += [linear_at(m.adaLN_modulation, -1) for m in self.modules()
                 if isinstance(m, SpatialAdaLN)]
        zero.append(self.head.linear)
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def semantics(self, labels_B: Tensor, prev: Sequence[Tensor]) -> Tensor:
        """ŝ of scales 1 .. n+1 given the n = len(prev) coarser latents (B, C, s_k, s_k).

        Input slots: the class embedding on the first scale's L_1 slots, then Up(prev[k-1]) on
        scale k's slots; block-causal attention, so ŝ_k depends on scales < k only and a prefix
        gives the same ŝ as the full sequence. Returns (B, L_1 + ... + L_{n+1}, D).
        """
        cfg = self.config
        sides = cfg.scale_sides
        if len(prev) >= len(sides):
            raise ValueError(f"FlowAR.semantics: {len(prev)} previous scales given, at most "
                             f"{len(sides) - 1} for scales {sides}.")
        n = len(prev) + 1
        c_BD = self.class_emb(labels_B)
        slots = [c_BD[:, None].expand(-1, sides[0] ** 2, -1)]
        for k in range(1, n):
            up = upsample(prev[k - 1].to(c_BD.dtype), sides[k], cfg.upsample)
            slots.append(self.z_proj(_tokens(up)))
        L = sum(s * s for s in sides[:n])
        x = torch.cat(slots, dim=1) + self.pos_embed[:, :L]
        mask = self.ar_mask[:L, :L]
        for block in self.blocks:
            x = block(x, c_BD, mask)
        return self.norm(x)

    def forward(self, xt_BSC: Tensor, t_BK: Tensor, labels_B: Tensor,
                pyramid: Sequence[Tensor]) -> Tensor:
        """Velocity for the noisy tokens of every scale (training: teacher forcing).

        Args:
            xt_BSC: (B, S, C) noisy tokens F_t of every scale, coarsest first, raster order.
            t_BK: (B, K) paper time of each scale (1 = data).
            labels_B: (B,) int64, null_class_id for unconditional.
            pyramid: the K clean scales (B, C, s_k, s_k) (`latent_pyramid`); the AR input uses
                the first K - 1.
        Returns:
            v (B, S, C); scale k's slice depends on scales < k of the pyramid and its own noise.
        """
        cfg = self.config
        if xt_BSC.shape[1:] != (cfg.seq_len, cfg.in_channels):
            raise ValueError(f"FlowAR expects tokens (B, {cfg.seq_len}, {cfg.in_channels}), got "
                             f"{tuple(xt_BSC.shape)}.")
        sem = self.semantics(labels_B, pyramid[:-1])
        counts = torch.tensor(cfg.tokens_per_scale, device=t_BK.device)
        t_BS = torch.repeat_interleave(t_BK, counts, dim=1, output_size=cfg.seq_len)
        return self.head(xt_BSC, t_BS, sem, self.head_mask)


# --------------------------------------------------------------------------------------------------
# Loss, sampler
# --------------------------------------------------------------------------------------------------


def _batch_latents(model: FlowAR, batch: dict[str, Tensor],
                   generator: torch.Generator | None) -> Tensor:
    cfg = model.config
    if "latents" in batch:
        x = batch["latents"].float()
    elif "moments" in batch:
        x = latents_from_moments(batch["moments"].float(), cfg.scale_factor, generator)
    else:
        raise KeyError(f"batch needs 'latents' (B, C, H, W) or 'moments' (B, 2C, H, W); got keys "
                       f"{sorted(batch)}.")
    want = (cfg.in_channels, cfg.latent_size, cfg.latent_size)
    if x.shape[1:] != want:
        raise ValueError(f"FlowAR expects latents (B, {', '.join(map(str, want))}), got "
                         f"{tuple(x.shape)}; set in_channels / latent_size to the cache's.")
    return x


def flowar_loss(
    model: FlowAR,
    batch: dict[str, Tensor],
    step: int = 0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """FlowAR training loss: flow matching on every scale of the pyramid, averaged over scales.

    Batch keys: `latents` float (B, C, H, W), already sampled and scaled, or `moments`
    (B, 2C, H, W) = mean || logvar (sampled here, times config.scale_factor); `label` int64 (B,).
    `step` is unused (the trainer's loss signature). Per scale k: t ~ U(0, 1) (or logit-normal)
    per sample, eps ~ N(0, I), F_t = t s_k + (1 - t) eps, target s_k - eps; labels -> null with
    probability class_dropout. Returns the loss and detached metrics 'loss', 'loss_scale{s_k}'.
    """
    cfg = model.config
    x = _batch_latents(model, batch, generator)
    B, K, dev = x.shape[0], len(cfg.scale_sides), x.device
    pyramid = latent_pyramid(x, cfg.scale_sides)
    if cfg.t_sampling == "uniform":
        t_BK = torch.rand(B, K, generator=generator, device=dev)
    else:
        t_BK = logit_normal_t(B * K, generator=generator, device=dev).view(B, K)
    xt, targets = [], []
    for k, s_k in enumerate(pyramid):
        x1 = _tokens(s_k)
        x0 = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype)
        xt.append(scale_path(x1, x0, t_BK[:, k]))
        targets.append(scale_target(x1, x0))
    drop = torch.rand(B, generator=generator, device=dev) < cfg.class_dropout
    labels = torch.where(drop, model.null_class_id, batch["label"].long())
    v = model(torch.cat(xt, dim=1), t_BK, labels, pyramid).float()
    per_scale = [((v_k - tgt) ** 2).mean()
                 for v_k, tgt in zip(v.split(cfg.tokens_per_scale, dim=1), targets)]
    loss = torch.stack(per_scale).mean()
    metrics = {"loss": loss.detach()}
    metrics.update({f"loss_scale{s}": e.detach() for s, e in zip(cfg.scale_sides, per_scale)})
    return loss, metrics


@torch.no_grad()
def sample(
    model: FlowAR,
    labels_B: Tensor,
    *,
    num_steps: int = 25,
    cfg_scale: float = 1.0,
    guidance_schedule: str = "linear",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate latents scale by scale.

    Scale k: the AR transformer reads [class, Up(z_1), ..., Up(z_{k-1})] of the scales sampled so
    far and gives ŝ_k; noise (B, L_k, C) is integrated by Euler over `num_steps` uniform steps of
    the flow head conditioned on ŝ_k. Guidance v = u + s_k (c - u) with the null class (its
    semantics from the same prefix), s_k = `guidance(guidance_schedule, k, K - 1, cfg_scale)`:
    "linear" rises from 1 on the first scale to cfg_scale on the last; "constant" uses cfg_scale
    everywhere. Runs in eval mode (restored afterwards).

    Args:
        labels_B: (B,) int64 class labels (null_class_id for unconditional samples).
        generator: on the labels' device; draws the noise of every scale.
    Returns:
        latents (B, C, H, W) in the scaled latent space (divide by scale_factor to decode).
    """
    conf = model.config
    sides, C = conf.scale_sides, conf.in_channels
    K = len(sides)
    was_training = model.training
    model.eval()
    B, dev = labels_B.shape[0], labels_B.device
    guided = cfg_scale != 1.0
    if guided:
        labels_N = torch.cat([labels_B, torch.full_like(labels_B, model.null_class_id)])
    else:
        labels_N = labels_B
    copies = labels_N.shape[0] // B
    done: list[Tensor] = []  # the sampled scales, each repeated `copies` times
    try:
        for k, side in enumerate(sides):
            sem_N = model.semantics(labels_N, done)[:, -side * side :]

            def velocity(x_N: Tensor, t_N: Tensor, sem_N: Tensor = sem_N) -> Tensor:
                sem = sem_N if x_N.shape[0] == sem_N.shape[0] else sem_N[: x_N.shape[0]]
                return -model.head(x_N, 1.0 - t_N, sem)  # shared sampler's time is 1 - t

            scale = cfg_scale if K == 1 else guidance(guidance_schedule, k, K - 1, cfg_scale)
            noise = torch.randn(B, side * side, C, generator=generator, device=dev)
            z = euler_sample(velocity, noise, ode_time_grid(num_steps), cfg_scale=scale)
            done.append(_grid(z).repeat(copies, 1, 1, 1))
    finally:
        model.train(was_training)
    return done[-1][:B]


SPEC = FamilySpec(
    name="flowar", role="generator", config_class=FlowARConfig, sizes=FLOWAR_SIZES,
    model_class=FlowAR, data="latents",
    data_fields=("in_channels", "latent_size", "num_classes", "scale_factor"),
    loss=flowar_loss, conditioning="labels", sampler=sample, output="latents",
    summary="FlowAR: scale-wise autoregression with a per-scale flow-matching head (Spatial-adaLN)",
)
