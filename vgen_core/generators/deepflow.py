"""DeepFlow: SiT with deep supervision and VeRA blocks between velocity branches.

Spec: methods.md §2.9, §1.6 (SD-VAE latents 4x32x32, x0.18215), §3. Reference:
ByteDance-Seed/DeepFlow `models/deepflow.py` (DeepFlow, DF_models), `models/blocks.py`
(FlowAttnBlock, DynLayer, velocity_modulation, CrossAttentionBlock, DeepFlowBlock), `loss.py`
(DFLoss), `samplers.py` (deepflow_euler_maruyama_sampler), `script/{base,xlarge}/train.sh`.

    x_t --patchify(p=2)+sincos pos--> tokens --blocks 1..d1--> h --final_layer[0]--> v_1
        VeRA: a = ACC_MLP(h); r = velocity_modulation([h || a] | emb(t_2 - t_1));
              h = CrossAttn(query = the x_t tokens, kv = r);   final_acc_layer(a) -> a_1
        --blocks d1+1..d2 (conditioned on t_2)--> ... --final_layer[1]--> v_K (last branch)

K = len(df_idxs) + 1 branches. Branch k is conditioned on its own time t_k (class + t adaLN-Zero);
in training t_{k+1} = clamp(t_k +- U(0, 1) * beta) with one sign per batch (DFLoss). The official
model has two velocity heads: `final_layer[0]` shared by every intermediate branch and
`final_layer[1]` for the last one, and one shared acceleration head; that is kept here.
Module names follow the official ones, so a converted official state dict loads by name.

Loss (DFLoss + train.py): sum_k w_k |v_k - (eps - x)|^2 (per-sample mean, then batch mean) +
acc_coeff * sum_{k<K} |x_{t_k} + sg(v_k) dt_k + a_k dt_k^2 / 2 - x|^2, dt_k = -t_k
+ proj_coeff * REPA when `ssl_align`.

REPA (official `--ssl-align`, off by default; `--proj-coeff` 0.5; `z_dims=[768]`): one projector
MLP per split (`projectors[k]`, width `acc_hidden` = the official `projector_dim`) reads the tokens
the VeRA block hands to the next branch, i.e. after blocks df_idxs[k] (6 for B/2, 8 and 16 for
XL/2), and is aligned by mean negative cosine with a frozen encoder's patch features of the clean
image (`flow.repa_loss`). The official run feeds raw images next to the cached VAE latents
(dataset.py loads `images/` when ssl_align); our latent tables carry `moments` only, so the loss
takes, in order: precomputed `repa_features` (B, T, E) in the batch; the batch's `image` uint8
(B, H, W, 3) (the official path); else the clean latents decoded by the frozen VAE given as the
loss option `repa_decoder` (our choice: it needs no image column; the decode is a VAE
reconstruction of the image and costs one decoder pass per step). The encoder is the loss option
`repa_encoder`: a local DINOv3-style ViT safetensors (`vfm_vit`, size `repa_encoder_size`) or
"tiny" (tests). See `deepflow_loss`. script/xlarge/train.sh pairs `--ssl-align` with
`--legacy-scaling` (our `legacy_scaling`); that stays a separate field, as there.

Sampling may swap the blocks' self-attention for GRAT (`sample(attention="grat")`, kernels.grat);
training always uses dense attention.

Shape legend: B batch, C latent channels, H/W latent size, T = (H/p)(W/p) tokens, D hidden width,
P = p*p*C values per token, K branches, E encoder feature width.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from vgen_core.generators.common import Mlp, adaln_modulation, attention, linear_at, modulate
from vgen_core.generators.flow import (
    GRAT_GROUPS,
    TimestepEmbedder,
    euler_maruyama_sample,
    flow_path,
    flow_target,
    inference_attention_options,
    latents_from_moments,
    load_repa_decoder,
    load_repa_encoder,
    lognormal_t,
    repa_loss,
    repa_projector,
    repa_target_features,
    sde_time_grid,
)
from vgen_core.tokenizers.kl_vae import AutoencoderKL

__all__ = [
    "DEEPFLOW_SIZES",
    "DeepFlow",
    "DeepFlowConfig",
    "DiTBlock",
    "acceleration_loss",
    "branch_times",
    "deepflow_config",
    "deepflow_loss",
    "default_branch_weights",
    "inference_attention",
    "sample",
]


def default_branch_weights(num_branches: int) -> tuple[float, ...]:
    """(0.2, ..., 0.2, 1.0): 0.2 on every intermediate branch, 1.0 on the last.

    The official `--scale-weight` is "0.2 1.0" for B/2-2T and "0.2 0.2 1.0" for XL/2-3T
    (`script/{base,xlarge}/train.sh`; DFLoss asserts one weight per branch).
    """
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}.")
    return (0.2,) * (num_branches - 1) + (1.0,)


class DeepFlowConfig(BaseModel):
    """DeepFlow config; `build()` makes the model. Defaults = DeepFlow-XL/2-3T on SD-VAE latents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int = Field(32, ge=1)
    in_channels: int = Field(4, ge=1)
    patch_size: int = Field(2, ge=1)
    hidden: int = Field(1152, ge=1)
    depth: int = Field(24, ge=1)
    heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    num_classes: int = Field(1000, ge=1)
    df_idxs: tuple[int, ...] = (8, 16)
    acc_hidden: int = Field(2048, ge=1)  # official `projector_dim`, the ACC_MLP width
    qk_norm: bool = False
    legacy_scaling: bool = False  # clamp the velocity-modulation scale to [-5, 5]
    # loss
    class_dropout: float = Field(0.1, ge=0.0, le=1.0)
    t_sampling: Literal["lognormal", "uniform"] = "lognormal"
    tg_upper_bound: float = Field(0.01, ge=0.0)  # beta: bound of the time gap between branches
    branch_weights: tuple[float, ...] | None = None  # None -> default_branch_weights(K)
    acc_coeff: float = Field(1.0, ge=0.0)
    scale_factor: float = Field(0.18215, gt=0.0)  # applied when a batch carries `moments`
    # REPA (official --ssl-align / --proj-coeff / z_dims): projectors after each split
    ssl_align: bool = False
    proj_coeff: float = Field(0.5, ge=0.0)
    z_dim: int = Field(768, ge=1)  # the encoder's feature width (DINOv2/v3 ViT-B: 768)

    @model_validator(mode="after")
    def _check(self) -> DeepFlowConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} must be divisible by patch_size={self.patch_size}."
            )
        idx = self.df_idxs
        if list(idx) != sorted(set(idx)) or any(not 1 <= i < self.depth for i in idx):
            raise ValueError(
                f"df_idxs={idx} must be strictly increasing block counts in [1, depth-1] "
                f"(depth={self.depth}); e.g. (6,) for B/2 or (8, 16) for XL/2."
            )
        if self.branch_weights is not None and len(self.branch_weights) != len(idx) + 1:
            raise ValueError(
                f"branch_weights has {len(self.branch_weights)} entries but df_idxs={idx} makes "
                f"{len(idx) + 1} branches; give one weight per branch or None for the default."
            )
        return self

    @property
    def num_branches(self) -> int:
        return len(self.df_idxs) + 1

    @property
    def weights(self) -> tuple[float, ...]:
        return self.branch_weights or default_branch_weights(self.num_branches)

    def build(self) -> DeepFlow:
        return DeepFlow(self)


_TINY = dict(input_size=8, hidden=32, depth=4, heads=2, df_idxs=(2,), acc_hidden=32, num_classes=10)

DEEPFLOW_SIZES: dict[str, DeepFlowConfig] = {
    # CPU-test size: 4x8x8 latents, 16 tokens, 2 branches.
    "tiny": DeepFlowConfig(**_TINY),
    # DeepFlow-B/2-2T (DF_models 'DeepFlow-B/2', script/base/train.sh: depth 12, df_idxs [6]).
    "B/2": DeepFlowConfig(hidden=768, depth=12, heads=12, df_idxs=(6,)),
    # DeepFlow-XL/2-3T (script/xlarge/train.sh: depth 24, df_idxs [8, 16]).
    "XL/2": DeepFlowConfig(hidden=1152, depth=24, heads=16, df_idxs=(8, 16)),
}


deepflow_config = sized_config("DeepFlow", DeepFlowConfig, DEEPFLOW_SIZES)


# --------------------------------------------------------------------------------------------------
# Blocks (models/blocks.py)
# --------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """timm Attention (qkv bias, optional per-head LayerNorm on q and k) with SDPA.

    `inference_options` (set by `inference_attention`) are `common.attention` options used in
    eval mode only, e.g. the GRAT backend while sampling; training mode always runs dense SDPA.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.inference_options: dict[str, Any] = {}

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        options = {} if self.training else self.inference_options
        a = attention(self.q_norm(q), self.k_norm(k), v, **options)
        return self.proj(a.transpose(1, 2).reshape(B, T, D))


@contextlib.contextmanager
def inference_attention(model: nn.Module, options: dict[str, Any]) -> Iterator[None]:
    """Within the block, every DiT self-attention of `model` in eval mode uses `options`
    (`flow.inference_attention_options`: {} = dense, or GRAT); restored afterwards."""
    mods = [m for m in model.modules() if isinstance(m, _Attention)]
    saved = [m.inference_options for m in mods]
    for m in mods:
        m.inference_options = dict(options)
    try:
        yield
    finally:
        for m, old in zip(mods, saved):
            m.inference_options = old


class DiTBlock(nn.Module):
    """DiT/SiT block with adaLN-Zero (official FlowAttnBlock): c -> 6 (shift, scale, gate)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = adaln_modulation(dim, 6)

    def forward(self, x_BTD: Tensor, c_BD: Tensor) -> Tensor:
        """x_BTD (B, T, D), condition c_BD (B, D) -> (B, T, D)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c_BD)[:, None].chunk(6, dim=-1)
        x_BTD = x_BTD + g1 * self.attn(modulate(self.norm1(x_BTD), sh1, sc1))
        return x_BTD + g2 * self.mlp(modulate(self.norm2(x_BTD), sh2, sc2))


class _DynLayer(nn.Module):
    """Final velocity/acceleration head (DynLayer): LN -> adaLN shift/scale -> Linear to P."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = adaln_modulation(dim, 2)

    def forward(self, x_BTD: Tensor, c_BD: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c_BD)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x_BTD), shift, scale))


class _VelocityModulation(nn.Module):
    """[v || a] (2D) -> LN -> adaLN from the time-gap embedding (2D) -> MLP(2D -> 2D -> D)."""

    def __init__(self, dim2: int, legacy_scaling: bool) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim2, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim2, dim2, dim2 // 2, approximate="tanh")
        self.adaLN_modulation = adaln_modulation(dim2, 2)
        self.legacy_scaling = legacy_scaling

    def forward(self, va_BT2D: Tensor, dt_B2D: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(dt_B2D)[:, None].chunk(2, dim=-1)
        if self.legacy_scaling:
            scale = scale.clamp(-5.0, 5.0)
        return self.mlp(modulate(self.norm_final(va_BT2D), shift, scale))


class _CrossAttention(nn.Module):
    """Cross-space attention (CrossAttentionBlock): LN(q) + MHA(LN(q), LN(kv), LN(kv))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, query_BTD: Tensor, kv_BTD: Tensor) -> Tensor:
        q, kv = self.layer_norm(query_BTD), self.layer_norm(kv_BTD)
        return q + self.multihead_attn(q, kv, kv, need_weights=False)[0]


class _VeRABlock(nn.Module):
    """VeRA block (official DeepFlowBlock): ACC_MLP, velocity modulation, cross-space attention.

    Returns (acceleration features a, next-branch tokens = CrossAttn(x_t tokens, refined v)).
    """

    def __init__(self, dim: int, acc_hidden: int, heads: int, legacy_scaling: bool) -> None:
        super().__init__()
        P = acc_hidden
        self.acc_mlp = nn.Sequential(
            nn.Linear(dim, P), nn.SiLU(), nn.Linear(P, 2 * P), nn.SiLU(),
            nn.Linear(2 * P, P), nn.SiLU(), nn.Linear(P, dim),
        )  # fmt: skip
        self.acc_norm = _VelocityModulation(2 * dim, legacy_scaling)
        self.cross_attention = _CrossAttention(dim, heads)

    def forward(self, v_BTD: Tensor, xt_BTD: Tensor, dt_B2D: Tensor) -> tuple[Tensor, Tensor]:
        acc_BTD = self.acc_mlp(v_BTD)
        refined_BTD = self.acc_norm(torch.cat([v_BTD, acc_BTD], dim=-1), dt_B2D)
        return acc_BTD, self.cross_attention(xt_BTD, refined_BTD)


def _sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """MAE/DiT `get_2d_sincos_pos_embed(dim, grid)`: (grid*grid, dim), first half from w coords."""

    def one_d(d: int, pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gh, gw = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )  # fmt: skip
    # numpy meshgrid(w, h) stacks (w, h): grid[0] = column index, grid[1] = row index
    return torch.cat([one_d(dim // 2, gw), one_d(dim // 2, gh)], dim=1).float()


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class DeepFlow(nn.Module):
    """SiT backbone with K velocity branches and a VeRA block at each split (`df_idxs`).

    Labels in [0, num_classes) or `null_class_id` (= num_classes) for the unconditional branch.
    """

    family: ClassVar[str] = "deepflow"
    config_class: ClassVar[type[BaseModel]] = DeepFlowConfig

    def __init__(self, config: DeepFlowConfig) -> None:
        super().__init__()
        self.config = config
        D, p, C = config.hidden, config.patch_size, config.in_channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(config.num_classes + 1, D)
        grid = config.input_size // p
        self.register_buffer("pos_embed", _sincos_pos_embed_2d(D, grid)[None], persistent=True)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        self.dt_embedder = TimestepEmbedder(2 * D)
        self.df_blocks = nn.ModuleList(
            [
                _VeRABlock(D, config.acc_hidden, config.heads, config.legacy_scaling)
                for _ in config.df_idxs
            ]
        )
        self.final_layer = nn.ModuleList([_DynLayer(D, p * p * C) for _ in range(2)])
        self.final_acc_layer = _DynLayer(D, p * p * C)
        # REPA: one projector per split. Built without advancing the RNG (their values are drawn
        # last in _init_weights), so every other weight equals a model without ssl_align.
        with torch.random.fork_rng(devices=[]):
            self.projectors = nn.ModuleList(
                [repa_projector(D, config.acc_hidden, config.z_dim) for _ in config.df_idxs]
                if config.ssl_align else []
            )  # fmt: skip
        self._init_weights()

    def _init_weights(self) -> None:
        # official: xavier-uniform on every Linear; the REPA projectors are drawn last so that a
        # model with ssl_align starts from the same weights as one without (same seed)
        projector_ids = {id(m) for m in self.projectors.modules()}
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        for m in [m for m in linears if id(m) not in projector_ids]:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        proj = self._x_proj
        w = proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        assert proj.bias is not None  # built with bias (nn.Conv2d default)
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self._y_table.weight, std=0.02)
        for emb in (self.t_embedder, self.dt_embedder):
            nn.init.normal_(linear_at(emb.mlp, 0).weight, std=0.02)
            nn.init.normal_(linear_at(emb.mlp, 2).weight, std=0.02)
        zero = [linear_at(b.adaLN_modulation, -1) for b in self.blocks]
        for head in (*self.final_layer, self.final_acc_layer):
            assert isinstance(head, _DynLayer)  # final_layer holds only these
            zero += [linear_at(head.adaLN_modulation, -1), head.linear]
        for vb in self.df_blocks:
            assert isinstance(vb, _VeRABlock)  # df_blocks holds only these
            zero.append(linear_at(vb.acc_norm.adaLN_modulation, -1))
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        for m in [m for m in linears if id(m) in projector_ids]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def _x_proj(self) -> nn.Conv2d:
        """`x_embedder.proj`, the patchify conv (official PatchEmbed layout)."""
        proj = self.x_embedder.proj
        if not isinstance(proj, nn.Conv2d):
            raise TypeError(f"DeepFlow.x_embedder.proj is {type(proj).__name__}, not nn.Conv2d.")
        return proj

    @property
    def _y_table(self) -> nn.Embedding:
        """`y_embedder.embedding_table`, the class embedding (official LabelEmbedder layout)."""
        table = self.y_embedder.embedding_table
        if not isinstance(table, nn.Embedding):
            raise TypeError(
                f"DeepFlow.y_embedder.embedding_table is {type(table).__name__}, not nn.Embedding."
            )
        return table

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def num_branches(self) -> int:
        return self.config.num_branches

    def unpatchify(self, x_BTP: Tensor) -> Tensor:
        """(B, T, p*p*C) -> (B, C, H, W) (official `unpatchify`, einsum nhwpqc->nchpwq)."""
        B, T, _ = x_BTP.shape
        p, C = self.config.patch_size, self.config.in_channels
        h = w = int(math.isqrt(T))
        x = x_BTP.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, h * p, w * p)

    def forward(
        self,
        x_BCHW: Tensor,
        t: Tensor | Sequence[Tensor],
        labels_B: Tensor,
        *,
        return_zs: bool = False,
    ) -> tuple[list[Tensor], ...]:
        """Velocities of every branch and the K-1 accelerations (and the REPA projections).

        Args:
            x_BCHW: x_{t_1} (B, C, H, W).
            t: K tensors (B,) (branch times t_1..t_K), or one (B,) tensor used for every branch
                (the sampler's "identical timesteps" mode, time gap 0).
            labels_B: (B,) int64, null_class_id for unconditional.
            return_zs: also return the REPA projections (needs `ssl_align`).
        Returns:
            ([v_1..v_K] each (B, C, H, W), [a_1..a_{K-1}] each (B, C, H, W)), plus with
            `return_zs` [z~_1..z~_{K-1}] each (B, T, z_dim): projector k applied to the tokens
            the k-th VeRA block passes on (official `zs`).
        """
        cfg = self.config
        K = cfg.num_branches
        if x_BCHW.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(
                f"DeepFlow expects x (B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}), "
                f"got {tuple(x_BCHW.shape)}."
            )
        t_list = [t] * K if isinstance(t, Tensor) else list(t)
        if len(t_list) != K:
            raise ValueError(
                f"DeepFlow with df_idxs={cfg.df_idxs} needs {K} times, got {len(t_list)}."
            )
        y_BD = self._y_table(labels_B)
        xt_BTD = self._x_proj(x_BCHW).flatten(2).transpose(1, 2) + self.pos_embed
        t_emb = [self.t_embedder(tk) for tk in t_list]
        dt_emb = [self.dt_embedder(t_list[k + 1] - t_list[k]) for k in range(K - 1)]
        c_BD = t_emb[0] + y_BD
        h_BTD = xt_BTD
        if return_zs and not cfg.ssl_align:
            raise ValueError("DeepFlow: return_zs needs a model built with ssl_align=True.")
        velocities, accelerations, zs = [], [], []
        branch = 0
        for i, block in enumerate(self.blocks):
            h_BTD = block(h_BTD, c_BD)
            if i + 1 in cfg.df_idxs:
                velocities.append(self.unpatchify(self.final_layer[0](h_BTD, c_BD)))
                acc_BTD, h_BTD = self.df_blocks[branch](h_BTD, xt_BTD, dt_emb[branch])
                accelerations.append(self.unpatchify(self.final_acc_layer(acc_BTD, c_BD)))
                if return_zs:
                    zs.append(self.projectors[branch](h_BTD))
                branch += 1
                c_BD = t_emb[branch] + y_BD
        velocities.append(self.unpatchify(self.final_layer[1](h_BTD, c_BD)))
        return (velocities, accelerations, zs) if return_zs else (velocities, accelerations)


# --------------------------------------------------------------------------------------------------
# Loss, sampler
# --------------------------------------------------------------------------------------------------


def _mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def branch_times(
    t_B: Tensor,
    num_branches: int,
    *,
    beta: float,
    sign: float,
    u_KB: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """[t_1 = t, t_{k+1} = clamp(t_k + sign * U_k * beta, 0, 1)], U_k ~ U(0, 1) per sample.

    DFLoss: one sign for the whole batch (+1 or -1 with probability 1/2 each), fresh U per branch.
    `u_KB` (num_branches - 1, B) overrides the uniform draws (for tests).
    """
    if sign not in (1.0, -1.0):
        raise ValueError(f"branch_times: sign must be +1 or -1, got {sign}.")
    if u_KB is None:
        u_KB = torch.rand(num_branches - 1, t_B.shape[0], generator=generator, device=t_B.device)
    times = [t_B]
    for k in range(num_branches - 1):
        times.append((times[-1] + sign * u_KB[k].to(t_B.dtype) * beta).clamp(0.0, 1.0))
    return times


def acceleration_loss(
    x_t: Tensor, v: Tensor, a: Tensor, t_B: Tensor, x0: Tensor
) -> Tensor:
    """Per-sample |x_t + sg(v) dt + a dt^2 / 2 - x0|^2 (mean over non-batch dims), dt = -t: (B,).

    The second-order step from x_t to t = 0 with the branch's (detached) velocity and predicted
    acceleration must land on the clean latent (DFLoss `pred_a2s`).
    """
    dt = -t_B.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    x_pred = x_t + v.detach() * dt + 0.5 * a * dt**2
    return _mean_flat((x_pred - x0) ** 2)


def _batch_latents(cfg: Any, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor:
    if "latents" in batch:
        return batch["latents"].float()
    if "moments" in batch:
        return latents_from_moments(batch["moments"].float(), cfg.scale_factor, generator)
    raise KeyError(
        f"batch needs 'latents' (B, C, H, W) or 'moments' (B, 2C, H, W); got keys {sorted(batch)}."
    )


_REPA_SOURCES = (
    "a batch key 'repa_features' (B, T, E); or the loss option repa_encoder (a local vfm_vit "
    ".safetensors, or 'tiny') with either a batch 'image' uint8 (B, H, W, 3) or the loss option "
    "repa_decoder (the .safetensors of the VAE that made the latents, or 'tiny')"
)


def _repa_target(
    model: DeepFlow,
    batch: dict[str, Tensor],
    x: Tensor,
    encoder: str | nn.Module | None,
    encoder_size: str,
    decoder: str | AutoencoderKL | None,
    decoder_size: str,
) -> Tensor:
    """Frozen-encoder features (B, T, E) of the batch's clean images (see the module docstring)."""
    cfg = model.config
    if "repa_features" in batch:
        return batch["repa_features"].float()
    if encoder is None:
        raise ValueError(f"DeepFlow(ssl_align=True) needs the REPA target: {_REPA_SOURCES}.")
    enc = load_repa_encoder(encoder, encoder_size) if isinstance(encoder, str) else encoder
    enc = enc.to(x.device)
    if "image" in batch:
        images = batch["image"].to(x.device)
    elif decoder is not None:
        vae = load_repa_decoder(decoder, decoder_size) if isinstance(decoder, str) else decoder
        with torch.no_grad():  # generator-space latents -> the VAE's -> pixels in [0, 1]
            pixels = vae.to(x.device).decode(x / cfg.scale_factor).float()
        images = ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)
    else:
        raise ValueError(f"DeepFlow REPA: no clean image for the encoder; give {_REPA_SOURCES}.")
    return repa_target_features(enc, images, cfg.input_size // cfg.patch_size)


def deepflow_loss(
    model: DeepFlow,
    batch: dict[str, Tensor],
    step: int = 0,
    *,
    generator: torch.Generator | None = None,
    repa_encoder: str | nn.Module | None = None,
    repa_encoder_size: str = "dinov3-vitb16",
    repa_decoder: str | AutoencoderKL | None = None,
    repa_decoder_size: str = "sd-vae-f8c4",
) -> tuple[Tensor, dict[str, Tensor]]:
    """DeepFlow training loss for one batch (DFLoss + train.py).

    Batch keys: `latents` float (B, C, H, W), already sampled and scaled, or `moments`
    (B, 2C, H, W) = mean || logvar (sampled here and multiplied by config.scale_factor);
    `label` int64 (B,). `step` is unused (the trainer's loss signature).

    t ~ lognormal (sigma/(1+sigma)) or U(0,1); eps ~ N(0, I); labels -> null with probability
    class_dropout; branch times from `branch_times`; every branch regresses eps - x.
    Returns loss = sum_k w_k fm_k + acc_coeff * acc (+ proj_coeff * proj with ssl_align), and
    detached metrics 'loss', 'fm_loss', 'acc_loss', 'fm_loss_branch{k}' (+ 'proj_loss').

    REPA (model built with ssl_align; the keyword options are the DAG's `loss:` options): the
    target features come from the batch's `repa_features` (B, T, E), else from `repa_encoder`
    ("tiny" or a vfm_vit .safetensors of size `repa_encoder_size`) on the batch's `image`
    uint8 (B, H, W, 3), else on the clean latents decoded by `repa_decoder` ("tiny" or the
    latents' KL-VAE .safetensors of size `repa_decoder_size`). proj = `flow.repa_loss`. No
    random draws: the other terms are the same with or without REPA.
    """
    cfg = model.config
    if not cfg.ssl_align and (repa_encoder is not None or repa_decoder is not None):
        raise ValueError("DeepFlow: loss options repa_encoder/repa_decoder are set but the model "
                         "has ssl_align=False; add `ssl_align: true` to the model overrides.")
    x = _batch_latents(cfg, batch, generator)
    labels = batch["label"].long()
    B, dev, K = x.shape[0], x.device, cfg.num_branches
    if cfg.t_sampling == "lognormal":
        t_B = lognormal_t(B, generator=generator, device=dev)
    else:
        t_B = torch.rand(B, generator=generator, device=dev)
    noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    drop = torch.rand(B, generator=generator, device=dev) < cfg.class_dropout
    labels = torch.where(drop, model.null_class_id, labels)
    sign = 1.0 if float(torch.rand(1, generator=generator, device=dev)) < 0.5 else -1.0
    times = branch_times(t_B, K, beta=cfg.tg_upper_bound, sign=sign, generator=generator)
    target = flow_target(x, noise)

    x_t = flow_path(x, noise, times[0])
    if cfg.ssl_align:
        features = _repa_target(model, batch, x, repa_encoder, repa_encoder_size, repa_decoder,
                                repa_decoder_size)
        velocities, accelerations, zs = model(x_t, times, labels, return_zs=True)
    else:
        velocities, accelerations = model(x_t, times, labels)
    fm_k = [_mean_flat((v.float() - target) ** 2).mean() for v in velocities]
    fm = sum(w * f for w, f in zip(cfg.weights, fm_k))
    assert isinstance(fm, Tensor)  # K >= 1 branches, so the sum has terms
    acc = x.new_zeros(())
    for k, a in enumerate(accelerations):
        acc = acc + acceleration_loss(
            flow_path(x, noise, times[k]), velocities[k].float(), a.float(), times[k], x
        ).mean()
    loss = fm + cfg.acc_coeff * acc
    metrics = {"fm_loss": fm.detach(), "acc_loss": acc.detach()}
    if cfg.ssl_align:
        proj = repa_loss(zs, features)
        loss = loss + cfg.proj_coeff * proj
        metrics["proj_loss"] = proj.detach()
    metrics["loss"] = loss.detach()
    metrics.update({f"fm_loss_branch{k}": f.detach() for k, f in enumerate(fm_k)})
    return loss, metrics


@torch.no_grad()
def sample(
    model: DeepFlow,
    labels_B: Tensor,
    *,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    t_min: float = 0.04,
    attention: str = "dense",
    grat_groups: Sequence[int] = GRAT_GROUPS,
    grat_variant: str = "criss_cross",
    grat_radius: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler-Maruyama sampling (official `deepflow_euler_maruyama_sampler`, mode sde, 250 steps).

    Every branch gets the same t (time gap 0); the last branch's velocity drives the SDE over
    `sde_time_grid(num_steps, t_min)`. Guidance (null class in the second half) applies where
    t is inside `guidance_interval`. Runs in eval mode (restored afterwards).

    `attention="grat"` runs the DiT blocks' self-attention as GRAT (`kernels.grat`, training-free)
    on the (H/p, W/p) token grid: groups of `grat_groups` (gh, gw) tokens, `grat_variant`
    "criss_cross" (GRAT-X, the official pattern) or "block" (GRAT-B, `grat_radius` groups). The
    VeRA cross-attention stays dense. "dense" (default) is the training attention.

    Args:
        labels_B: (B,) int64 class labels (null_class_id for unconditional samples).
        generator: on the labels' device; draws the initial noise and the SDE noise.
    Returns:
        latents (B, C, H, W) in the scaled latent space (divide by scale_factor to decode).
    """
    cfg = model.config
    grid = cfg.input_size // cfg.patch_size
    options = inference_attention_options(attention, (grid, grid), groups=grat_groups,
                                          variant=grat_variant, radius=grat_radius)
    was_training = model.training
    model.eval()
    B, dev = labels_B.shape[0], labels_B.device
    shape = (B, cfg.in_channels, cfg.input_size, cfg.input_size)
    x = torch.randn(shape, generator=generator, device=dev)
    null_B = torch.full_like(labels_B, model.null_class_id)

    def velocity(x_N: Tensor, t_N: Tensor) -> Tensor:
        labels = labels_B if x_N.shape[0] == B else torch.cat([labels_B, null_B])
        return model(x_N, t_N, labels)[0][-1]

    try:
        with inference_attention(model, options):
            return euler_maruyama_sample(
                velocity, x, sde_time_grid(num_steps, t_min), cfg_scale=cfg_scale,
                guidance_interval=guidance_interval, generator=generator,
            )  # fmt: skip
    finally:
        model.train(was_training)


SPEC = FamilySpec(
    name="deepflow", role="generator", config_class=DeepFlowConfig, sizes=DEEPFLOW_SIZES,
    model_class=DeepFlow, data="latents",
    data_fields=("in_channels", "input_size", "num_classes", "scale_factor"),
    loss=deepflow_loss, conditioning="labels", sampler=sample, output="latents",
    summary="DeepFlow: flow matching with deep supervision between branches (VeRA blocks)",
)
