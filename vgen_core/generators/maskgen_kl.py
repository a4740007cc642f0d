"""MaskGen-KL: text-conditioned masked generation of continuous 1D tokens with a diffusion head.

Spec: methods.md §2.2 (KL); reference: bytedance/1d-tokenizer @942a96f `modeling/maskgen.py`
(`MaskGen_KL`: `forward`, `random_masking`, `forward_mae_decoder`, `forward_loss`,
`sample_tokens`, `mask_by_order`, `get_sinusoidal_encoding`), `modeling/modules/losses.py`
(`DiffLoss`), `modeling/modules/blocks.py` (`SimpleMLPAdaLN`, `ResBlock`, `FinalLayer`,
`TimestepEmbedder`), `modeling/diffusion/{gaussian_diffusion,respace,diffusion_utils}.py`
(IDDPM as in DiT / MAR), `configs/training/MaskGen/maskgen_kl_{l,xl}_stage1.yaml`,
`configs/infer/MaskGen/maskgen_kl_{l,xl}.yaml`, README_MaskGen.md.

    moments (B, 2C, 1, N) -> z ~ N(mean, exp(logvar)) * scale_factor -> x (B, N, C)
    random order per sample; one r ~ U(0, 1) per batch; ceil(N arccos(r) / (pi/2)) masked
    x -> Linear(C, D) -> LayerNorm; masked positions <- mask_token; + learned positions
    text ids -> TextEncoder -> context stream / pooled ‖ sinusoid(aesthetic * 100) -> c
    depth x MaskGen joint block (image, context, c) -> AdaLN-continuous(c) + learned positions
        = z (B, N, D): one condition per token
    DiffLoss on every token, repeated diffusion_batch_mul times with fresh (t, noise),
        averaged over the masked ones:
        x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, t ~ U{0..999}, cosine abar
        head(x_t, t, z) = (eps_hat, v) ; loss = mean_C (eps - eps_hat)^2 + vb(v)   (IDDPM hybrid)

Sampling (`sample`): `steps` iterations over a random order; after step k,
floor(N cos(pi/2 (k+1)/steps)) tokens stay masked (at least one is revealed per step); the
tokens revealed at step k are drawn by the diffusion head from their z (DDPM over 100 respaced
steps, noise times `temperature`; eps = u + s (c - u) with s = 1 + (cfg - 1)(N - n)/N, n the
count left masked after the step ("linear"), or cfg ("constant"); the learned variance is the
conditional one). With the released 32 tokens and 32 steps the at-least-one rule binds at every
step: one token per step, in the random order.

Reuse: the text encoder, the two text projections, the joint blocks and the final AdaLN are
those of a `maskgen.MaskGen` built from `MaskGenKLConfig.trunk_config()` (its 3-row embedding,
position table and tied head are dropped): the block classes are private to `maskgen.py`.

Follows the official code: the transformer (MaskGen's joint blocks and text conditioning, shared
with `maskgen.py`), `z_proj` + `z_proj_ln`, the mask token, both learned position tables; the
micro-condition sinusoid of `MaskGen_KL.get_sinusoidal_encoding` (interleaved sin / cos,
10000^(-2i/d); not MaskGen-VQ's); one mask ratio per batch, ceil, random orders; DiffLoss =
SimpleMLPAdaLN (width `head_width` = diffloss_w, `head_depth` = diffloss_d res blocks, output 2C
for the learned-range variance), cosine schedule over 1000 steps, eps prediction, loss
MSE + VB (frozen mean), masked mean; batch_mul 4 tiles the rows (`repeat`); DDPM sampling with
`clip_denoised=False`, temperature on the noise, CFG on eps only (`forward_with_cfg`); the init
(every Linear xavier-uniform with zero bias, including the head's adaLN / output layers, whose
zero init `MaskGen_KL.initialize_weights` overrides; mask token and positions N(0, 0.02)); the
sampler's cosine reveal schedule and linear CFG on the count still masked; the posterior sample
of the cached moments (logvar clamped to [-30, 20]) times 0.7525.

Choices here: the text encoder is vgen's byte-level one (`generators.text`, as `maskgen_vq`; the
official uses OpenAI CLIP-L/14 features, which cannot be computed here); text drop is drawn in the
loss (official: `preprocess_condition` in the train loop). The sampler returns latents in the
generator's (scaled) space, (B, C, 1, N), as every vgen latent generator; the tokenizer's decode
divides by scale_factor (official `sample_tokens` divides itself). Random draws come from a
`torch.Generator` (official: numpy / global torch RNG), and the CFG branch draws one noise per
token instead of the official two-then-discard, which is the same distribution. DDIM (`eta`) is
offered besides the official DDPM, temperature scaling its noise. The official `forward_loss`
passes `text_condition=` to `DiffLoss.forward`, which takes no such argument (a TypeError as
released); the head here is conditioned on z alone, as `DiffLoss` is. A one-step respacing
works here (the official tables are empty for it). No released-weight loader (official key names
are kept for `z_proj`, `z_proj_ln`, `mask_token` and the head's `SimpleMLPAdaLN` layout).

Shape legend: B batch, N tokens (32), C token dim (16), D transformer width, W head width,
T text tokens (77), E text width, R = B * N * batch_mul head rows, S diffusion steps.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config
from vgen_core.generators.common import adaln_modulation, modulate
from vgen_core.generators.flow import TimestepEmbedder, latents_from_moments
from vgen_core.generators.maskgen import MaskGen, MaskGenConfig
from vgen_core.generators.schedules import arccos_mask_ratio, linear_guidance
from vgen_core.generators.text import (
    TextEncoder,
    TextEncoderConfig,
    encode_text,
    text_encoder_config,
)

__all__ = [
    "DiffusionHead",
    "DiffusionSchedule",
    "MASKGEN_KL_SAMPLING",
    "MASKGEN_KL_SIZES",
    "MaskGenKL",
    "MaskGenKLConfig",
    "cosine_betas",
    "diffusion_loss",
    "head_sample",
    "kl_aesthetic_embedding",
    "kl_masked_after_step",
    "maskgen_kl_config",
    "maskgen_kl_loss",
    "random_order_mask",
    "sample",
    "sample_from_features",
    "spaced_timesteps",
]


class MaskGenKLConfig(BaseModel):
    """MaskGen-KL config; `build()` makes the model. Defaults = MaskGen-KL-L on TA-TiTok-KL 32."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_tokens: int = Field(32, ge=1)  # N (num_latent_tokens)
    token_dim: int = Field(16, ge=1)  # C (token_size)
    scale_factor: float = Field(0.7525, gt=0.0)
    hidden: int = Field(1024, ge=1)
    depth: int = Field(16, ge=1)
    heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    #: None: no text encoder inside; the caller passes CLIP ViT-L/14 features (E = 768)
    text_encoder: TextEncoderConfig | None = TextEncoderConfig()
    train_text_encoder: bool = False
    micro_condition: bool = True
    micro_condition_dim: int = Field(256, ge=2)
    text_drop: float = Field(0.1, ge=0.0, le=1.0)
    default_aesthetic: float = 6.0
    # diffusion head (DiffLoss)
    head_width: int = Field(1024, ge=1)  # losses.diffloss_w
    head_depth: int = Field(8, ge=1)  # losses.diffloss_d
    learn_sigma: bool = True  # output 2C, loss MSE + VB (official create_diffusion default)
    diffusion_steps: int = Field(1000, ge=2)
    sampling_steps: int = Field(100, ge=1)  # losses.num_sampling_steps
    diffusion_batch_mul: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> MaskGenKLConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        if self.micro_condition_dim % 2:
            raise ValueError(f"micro_condition_dim={self.micro_condition_dim} must be even.")
        if self.text_encoder is None and self.train_text_encoder:
            raise ValueError("train_text_encoder=True needs a text_encoder config.")
        if self.sampling_steps > self.diffusion_steps:
            raise ValueError(f"sampling_steps={self.sampling_steps} exceeds "
                             f"diffusion_steps={self.diffusion_steps}.")
        return self

    def trunk_config(self) -> MaskGenConfig:
        """The MaskGen-VQ config whose text conditioning and joint blocks this model reuses."""
        return MaskGenConfig(
            codebook_size=2, seq_len=1, legacy_class_rows=0, hidden=self.hidden,
            depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
            text_encoder=self.text_encoder, train_text_encoder=self.train_text_encoder,
            micro_condition=self.micro_condition, micro_condition_dim=self.micro_condition_dim,
            text_drop=self.text_drop, default_aesthetic=self.default_aesthetic,
        )

    def build(self) -> MaskGenKL:
        return MaskGenKL(self)


MASKGEN_KL_SIZES: dict[str, MaskGenKLConfig] = {
    # CPU-test size: 8 tokens x 4 dims, tiny text encoder.
    "tiny": MaskGenKLConfig(
        num_tokens=8, token_dim=4, hidden=32, depth=2, heads=2, micro_condition_dim=16,
        text_encoder=text_encoder_config("tiny"), head_width=32, head_depth=2,
    ),
    # maskgen_kl_l_stage1.yaml: 1024 x 16, 16 heads; DiffLoss 8 x 1024; TA-TiTok-KL 32 x 16.
    "L": MaskGenKLConfig(hidden=1024, depth=16, heads=16, head_width=1024, head_depth=8),
    # maskgen_kl_xl_stage1.yaml: 1280 x 20, 16 heads; DiffLoss 8 x 1280.
    "XL": MaskGenKLConfig(hidden=1280, depth=20, heads=16, head_width=1280, head_depth=8),
}

#: configs/infer/MaskGen/maskgen_kl_{l,xl}.yaml and README_MaskGen.md (`sample_tokens(num_iter=32,
#: cfg=3.0, aes_scores=6.5)`, cfg_schedule "linear", temperature 1.0). `sample`'s own defaults
#: are the stage-1 training configs' (the same with aesthetic 6.0).
MASKGEN_KL_SAMPLING: dict[str, dict[str, Any]] = {
    size: {"steps": 32, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 1.0,
           "aesthetic": 6.5}
    for size in ("L", "XL")
}

maskgen_kl_config = sized_config("MaskGen-KL", MaskGenKLConfig, MASKGEN_KL_SIZES)


# --------------------------------------------------------------------------------------------------
# Gaussian diffusion (IDDPM tables, cosine schedule, respacing)
# --------------------------------------------------------------------------------------------------


def cosine_betas(steps: int, max_beta: float = 0.999) -> Tensor:
    """beta_i = min(1 - abar((i+1)/S) / abar(i/S), max_beta), abar(t) = cos((t + 0.008) / 1.008
    pi/2)^2: float64 (S,) (official `get_named_beta_schedule("cosine")`)."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta)
                         for i in range(steps)], dtype=torch.float64)


def spaced_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The `count` kept steps of `num_timesteps`, evenly strided with rounding (official
    `space_timesteps(num_timesteps, str(count))`, one section)."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"spaced_timesteps: count must be in [1, {num_timesteps}], got {count}.")
    stride = 1.0 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, kept = 0.0, []
    for _ in range(count):
        kept.append(round(cur))
        cur += stride
    return sorted(set(kept))


class DiffusionSchedule:
    """IDDPM tables for betas (S,) (float64), and the model timestep of each step.

    Tables are indexed by step and read in float32 (official `_extract_into_tensor`).
    """

    def __init__(self, betas: Tensor, timestep_map: Tensor | None = None) -> None:
        b = betas.double()
        self.betas = b
        self.num_steps = int(b.shape[0])
        self.timestep_map = (torch.arange(self.num_steps) if timestep_map is None
                             else timestep_map.long())
        ac = torch.cumprod(1.0 - b, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, ac_prev
        self.sqrt_ac, self.sqrt_1m_ac = ac.sqrt(), (1.0 - ac).sqrt()
        self.sqrt_recip_ac, self.sqrt_recipm1_ac = (1.0 / ac).sqrt(), (1.0 / ac - 1).sqrt()
        var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_variance = var
        # log var~ with var~_0 = 0 replaced by var~_1 (one step: log beta_0, never used: the last
        # step adds no noise)
        self.posterior_logvar_clipped = (torch.cat([var[1:2], var[1:]]).log()
                                         if self.num_steps > 1 else b.log())
        self.posterior_coef1 = b * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_coef2 = (1.0 - ac_prev) * (1.0 - b).sqrt() / (1.0 - ac)
        self.log_betas = b.log()

    @classmethod
    def cosine(cls, steps: int = 1000) -> DiffusionSchedule:
        return cls(cosine_betas(steps))

    def respaced(self, count: int) -> DiffusionSchedule:
        """The schedule over `spaced_timesteps(S, count)` (official `SpacedDiffusion`)."""
        if count == self.num_steps:
            return self
        kept = spaced_timesteps(self.num_steps, count)
        ac = self.alphas_cumprod[kept]
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return DiffusionSchedule(1.0 - ac / prev, self.timestep_map[kept])

    def to(self, device: torch.device | str) -> DiffusionSchedule:
        """A copy with every table on `device`."""
        out = object.__new__(DiffusionSchedule)
        out.__dict__.update({k: v.to(device) if isinstance(v, Tensor) else v
                             for k, v in self.__dict__.items()})
        return out

    @staticmethod
    def take(table: Tensor, t_R: Tensor) -> Tensor:
        """table[t] as float32 (R, 1) on t's device."""
        return table.to(t_R.device)[t_R].float()[:, None]

    def q_sample(self, x0_RC: Tensor, t_R: Tensor, noise_RC: Tensor) -> Tensor:
        return self.take(self.sqrt_ac, t_R) * x0_RC + self.take(self.sqrt_1m_ac, t_R) * noise_RC

    def q_posterior_mean(self, x0_RC: Tensor, xt_RC: Tensor, t_R: Tensor) -> Tensor:
        return (self.take(self.posterior_coef1, t_R) * x0_RC
                + self.take(self.posterior_coef2, t_R) * xt_RC)

    def predict_x0(self, xt_RC: Tensor, t_R: Tensor, eps_RC: Tensor) -> Tensor:
        return (self.take(self.sqrt_recip_ac, t_R) * xt_RC
                - self.take(self.sqrt_recipm1_ac, t_R) * eps_RC)

    def model_logvar(self, v_RC: Tensor | None, t_R: Tensor) -> Tensor:
        """Learned range: frac log beta_t + (1 - frac) log var~_t, frac = (v + 1) / 2; without
        v the official FIXED_LARGE variance [var~_1, beta_1, ...]."""
        lo = self.take(self.posterior_logvar_clipped, t_R)
        if v_RC is None:
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]]).log()
            return self.take(large, t_R)
        frac = (v_RC + 1) / 2
        return frac * self.take(self.log_betas, t_R) + (1 - frac) * lo


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Official `discretized_gaussian_log_likelihood` (bins of 2/255 over [-1, 1])."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# --------------------------------------------------------------------------------------------------
# Diffusion head (SimpleMLPAdaLN) and its loss / sampler
# --------------------------------------------------------------------------------------------------


class _ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), (shift, scale, gate) from y."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = adaln_modulation(width, 3)

    def forward(self, x_RW: Tensor, y_RW: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y_RW).chunk(3, dim=-1)
        return x_RW + gate * self.mlp(modulate(self.in_ln(x_RW), shift, scale))


class _FinalLayer(nn.Module):
    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = adaln_modulation(width, 2)

    def forward(self, x_RW: Tensor, y_RW: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y_RW).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x_RW), shift, scale))


class DiffusionHead(nn.Module):
    """MAR/MaskGen `SimpleMLPAdaLN`: (x_t (R, C), t (R,), z (R, D)) -> (R, 2C) [eps ‖ v] or (R, C).

    y = TimestepEmbedder(t) + Linear(z); Linear(C, W) -> depth adaLN res blocks -> final adaLN
    layer.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int,
                 learn_sigma: bool = True) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([_ResBlock(width) for _ in range(depth)])
        self.final_layer = _FinalLayer(width, token_dim * (2 if learn_sigma else 1))

    def forward(self, x_RC: Tensor, t_R: Tensor, z_RD: Tensor) -> Tensor:
        x = self.input_proj(x_RC)
        y = self.time_embed(t_R) + self.cond_embed(z_RD)
        for blk in self.res_blocks:
            x = blk(x, y)
        return self.final_layer(x, y)


def diffusion_loss(
    head: DiffusionHead,
    schedule: DiffusionSchedule,
    x0_RC: Tensor,
    z_RD: Tensor,
    mask_R: Tensor | None = None,
    *,
    t_R: Tensor | None = None,
    noise_RC: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffLoss (official `DiffLoss.forward` -> `training_losses`, loss type MSE).

    t ~ U{0..S-1} then noise ~ N(0, I) (drawn in that order from `generator` unless given);
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; head(x_t, t, z) = eps_hat [‖ v].
    Per row: mse = mean_C (noise - eps_hat)^2; with a learned variance also
    vb = mean_C KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) / ln 2, with p's mean from
    sg(eps_hat) and log-variance from v (at t = 0: the discretized Gaussian NLL of x0, bits).
    loss = sum(mask * (mse + vb)) / sum(mask) (the mean without a mask).
    Returns (loss, per-row terms 'mse', 'vb' (zeros without a learned variance), 't').
    """
    R, C, dev = x0_RC.shape[0], x0_RC.shape[1], x0_RC.device
    if t_R is None:
        t_R = torch.randint(0, schedule.num_steps, (R,), device=dev, generator=generator)
    if noise_RC is None:
        noise_RC = torch.randn(x0_RC.shape, device=dev, generator=generator, dtype=x0_RC.dtype)
    xt_RC = schedule.q_sample(x0_RC, t_R, noise_RC)
    out = head(xt_RC, schedule.timestep_map.to(dev)[t_R], z_RD).float()
    eps_RC = out[:, :C]
    mse_R = ((noise_RC - eps_RC) ** 2).mean(-1)
    vb_R = torch.zeros_like(mse_R)
    if out.shape[1] == 2 * C:
        logvar_RC = schedule.model_logvar(out[:, C:], t_R)
        mean_RC = schedule.q_posterior_mean(schedule.predict_x0(xt_RC, t_R, eps_RC.detach()),
                                            xt_RC, t_R)
        true_mean = schedule.q_posterior_mean(x0_RC, xt_RC, t_R)
        true_logvar = schedule.take(schedule.posterior_logvar_clipped, t_R)
        kl_R = _normal_kl(true_mean, true_logvar, mean_RC, logvar_RC).mean(-1) / math.log(2.0)
        nll_R = -_discretized_gaussian_log_likelihood(
            x0_RC, mean_RC, 0.5 * logvar_RC).mean(-1) / math.log(2.0)
        vb_R = torch.where(t_R == 0, nll_R, kl_R)
    loss_R = mse_R + vb_R
    loss = loss_R.mean() if mask_R is None else (loss_R * mask_R).sum() / mask_R.sum()
    return loss, {"mse": mse_R, "vb": vb_R, "t": t_R}


@torch.no_grad()
def head_sample(
    head: DiffusionHead,
    schedule: DiffusionSchedule,
    z_RD: Tensor,
    z_uncond_RD: Tensor | None = None,
    *,
    cfg: float = 1.0,
    temperature: float = 1.0,
    eta: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row of z: x (R, C) from N(0, I) down the (respaced) schedule.

    Per step t (from S-1 to 0): eps = head(x, t, z), or u + cfg (c - u) with u from
    `z_uncond_RD` (official `forward_with_cfg`; the variance values stay the conditional ones);
    x0 = predict_x0 (no clipping). DDPM (`eta` None, official `p_sample`): x <- posterior mean +
    [t > 0] exp(logvar / 2) * noise * temperature, logvar the learned-range variance. DDIM
    (`eta` given): x <- x0 sqrt(abar_prev) + sqrt(1 - abar_prev - sigma^2) eps + [t > 0] sigma
    noise temperature, sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev).
    """
    R, C, dev = z_RD.shape[0], head.token_dim, z_RD.device
    x = torch.randn(R, C, device=dev, generator=generator)
    guided = z_uncond_RD is not None and cfg != 1.0
    z_all = torch.cat([z_RD, z_uncond_RD]) if guided and z_uncond_RD is not None else z_RD
    tmap = schedule.timestep_map.to(dev)
    for i in reversed(range(schedule.num_steps)):
        t = torch.full((R,), i, device=dev, dtype=torch.long)
        x_in = torch.cat([x, x]) if guided else x
        out = head(x_in, tmap[t].repeat(x_in.shape[0] // R), z_all).float()
        eps = out[:R, :C]
        if guided:
            u = out[R:, :C]
            eps = u + cfg * (eps - u)
        v = out[:R, C:] if out.shape[1] == 2 * C else None
        x0 = schedule.predict_x0(x, t, eps)
        noise = torch.randn(x.shape, device=dev, generator=generator)
        if eta is None:
            mean = schedule.q_posterior_mean(x0, x, t)
            std = torch.exp(0.5 * schedule.model_logvar(v, t))
        else:
            ab, ab_prev = (schedule.take(schedule.alphas_cumprod, t),
                           schedule.take(schedule.alphas_cumprod_prev, t))
            std = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            eps = (schedule.take(schedule.sqrt_recip_ac, t) * x - x0) / schedule.take(
                schedule.sqrt_recipm1_ac, t)
            mean = x0 * ab_prev.sqrt() + torch.sqrt(1 - ab_prev - std**2) * eps
        x = mean + std * noise * temperature if i > 0 else mean
    return x


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def kl_aesthetic_embedding(score_B: Tensor, dim: int = 256) -> Tensor:
    """MaskGen-KL micro-condition (official `MaskGen_KL.get_sinusoidal_encoding(aes * 100)`):
    e[2i] = sin(100 s w_i), e[2i+1] = cos(100 s w_i), w_i = 10000^(-2i/dim): (B, dim)."""
    x = score_B.float() * 100.0
    w = torch.pow(10000, -torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim)
    arg = x[:, None] * w
    return torch.stack([torch.sin(arg), torch.cos(arg)], dim=-1).flatten(1)


class MaskGenKL(nn.Module):
    """MaskGen-KL: (tokens (B, N, C), mask (B, N), text features, aesthetic) -> z (B, N, D);
    `head` turns z into tokens (see `diffusion_loss`, `head_sample`)."""

    family: ClassVar[str] = "maskgen_kl"
    config_class: ClassVar[type[BaseModel]] = MaskGenKLConfig

    def __init__(self, config: MaskGenKLConfig) -> None:
        super().__init__()
        self.config = config
        D, N = config.hidden, config.num_tokens
        # MaskGen-VQ's text conditioning and joint blocks, built by MaskGen itself; its token
        # embedding, position table and tied head are left behind.
        trunk = MaskGen(config.trunk_config())
        self.text_encoder: TextEncoder | None = trunk.text_encoder
        self.text_embed_proj = trunk.text_embed_proj
        self.cond_pooled_proj = trunk.cond_pooled_proj
        self.blocks = trunk.blocks
        self.norm = trunk.norm
        self.z_proj = nn.Linear(config.token_dim, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N, D))
        self.diffusion_pos_embed = nn.Parameter(torch.zeros(1, N, D))
        self.head = DiffusionHead(config.token_dim, D, config.head_width, config.head_depth,
                                  config.learn_sigma)
        self._schedules: dict[tuple[int, str], DiffusionSchedule] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        """Official `MaskGen_KL.initialize_weights` (the text encoder keeps its own init)."""
        for name, m in self.named_modules():
            if name.startswith("text_encoder"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.mask_token, self.pos_embed, self.diffusion_pos_embed):
            nn.init.normal_(p, std=0.02)

    def train(self, mode: bool = True) -> MaskGenKL:
        super().train(mode)
        if self.text_encoder is not None and not self.config.train_text_encoder:
            self.text_encoder.eval()
        return self

    @property
    def seq_len(self) -> int:
        return self.config.num_tokens

    def schedule(self, steps: int | None = None,
                 device: torch.device | str | None = None) -> DiffusionSchedule:
        """The cosine schedule over `diffusion_steps` respaced to `steps` (default: all), with
        its tables on `device` (cached)."""
        T = self.config.diffusion_steps
        steps = T if steps is None else steps
        dev = torch.device("cpu" if device is None else device)
        key = (steps, str(dev))
        if key not in self._schedules:
            self._schedules[key] = DiffusionSchedule.cosine(T).respaced(steps).to(dev)
        return self._schedules[key]

    def _own_text_encoder(self) -> TextEncoder:
        if self.text_encoder is None:
            raise ValueError("MaskGenKL: this model has no text encoder (config.text_encoder is "
                             "None); pass text features to forward / sample_from_features.")
        return self.text_encoder

    def encode_text(self, text_ids_BT: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 77) byte ids -> (penultimate tokens (B, 77, E), pooled (B, E)); no grad if frozen."""
        encoder = self._own_text_encoder()
        with torch.set_grad_enabled(self.config.train_text_encoder and torch.is_grad_enabled()):
            return encoder(text_ids_BT)

    def null_text(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Features of the empty caption, repeated `batch` times (CFG / text-drop condition)."""
        ids = encode_text([""], self._own_text_encoder().config.context_len).to(device)
        tokens, pooled = self.encode_text(ids)
        return tokens.expand(batch, -1, -1), pooled.expand(batch, -1)

    def forward(self, x_BNC: Tensor, mask_BN: Tensor, text_BTE: Tensor, pooled_BE: Tensor,
                aesthetic_B: Tensor | None = None) -> Tensor:
        """Scaled tokens x (B, N, C) (values at masked positions are ignored), mask (B, N) bool
        (True = masked), text features -> per-token conditions z (B, N, D) for the head.

        aesthetic_B: (B,) scores; None -> `default_aesthetic`."""
        B, N = mask_BN.shape
        if x_BNC.shape != (B, N, self.config.token_dim) or N != self.config.num_tokens:
            raise ValueError(f"MaskGenKL expects tokens (B, {self.config.num_tokens}, "
                             f"{self.config.token_dim}) and mask (B, {self.config.num_tokens}), "
                             f"got {tuple(x_BNC.shape)} and {tuple(mask_BN.shape)}.")
        ctx_BTD = self.text_embed_proj(text_BTE)
        cond = pooled_BE
        if self.config.micro_condition:
            if aesthetic_B is None:
                aesthetic_B = torch.full((B,), self.config.default_aesthetic, device=x_BNC.device)
            emb = kl_aesthetic_embedding(aesthetic_B, self.config.micro_condition_dim)
            cond = torch.cat([pooled_BE, emb.to(pooled_BE.dtype)], dim=-1)
        c_BD = self.cond_pooled_proj(cond)
        h = self.z_proj_ln(self.z_proj(x_BNC))
        h = torch.where(mask_BN[..., None], self.mask_token.to(h.dtype), h) + self.pos_embed
        for blk in self.blocks:
            h, ctx_BTD = blk(h, ctx_BTD, c_BD)
        return self.norm(h, c_BD) + self.diffusion_pos_embed


# --------------------------------------------------------------------------------------------------
# Masking, loss
# --------------------------------------------------------------------------------------------------


def random_order_mask(batch: int, seq_len: int, r: float | Tensor, *,
                      device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool: the first ceil(N * clamp(arccos(r) / (pi/2), 1e-6, 1)) positions of a random
    order per sample are masked (official `random_masking`, float32; one r for the batch)."""
    r_t = torch.as_tensor(r, dtype=torch.float32).reshape(())
    ratio = arccos_mask_ratio(r_t).clamp(1e-6, 1.0)
    num = int(torch.ceil(seq_len * ratio))
    ranks = torch.rand(batch, seq_len, device=device, generator=generator).argsort(-1).argsort(-1)
    return ranks < num


def _tokens_from_batch(model: MaskGenKL, batch: dict[str, Tensor],
                       generator: torch.Generator | None) -> Tensor:
    """`latents` (B, C, 1, N) already scaled, or `moments` (B, 2C, 1, N) sampled and scaled ->
    (B, N, C) (official patchify with patch size 1)."""
    cfg = model.config
    if "latents" in batch:
        z = batch["latents"].float()
    elif "moments" in batch:
        z = latents_from_moments(batch["moments"].float(), cfg.scale_factor, generator)
    else:
        raise KeyError(f"batch needs 'moments' or 'latents'; got keys {sorted(batch)}.")
    B, C = z.shape[:2]
    x = z.reshape(B, C, -1).transpose(1, 2)
    if tuple(x.shape[1:]) != (cfg.num_tokens, cfg.token_dim):
        raise ValueError(f"MaskGen-KL expects latents (B, {cfg.token_dim}, 1, {cfg.num_tokens}),"
                         f" got {tuple(z.shape)}; set num_tokens / token_dim to the tokenizer's.")
    return x


def maskgen_kl_loss(
    model: MaskGenKL,
    batch: dict[str, Tensor],
    step: int = 0,
    *,
    text_drop: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MaskGen-KL training loss (official `MaskGen_KL.forward` + `preprocess_condition`).

    Batch keys: `moments` float (B, 2C, 1, N) (or `latents` (B, C, 1, N), already scaled),
    `text_ids` int64 (B, 77) from `encode_text`, optional `aesthetic` (B,). Draws, in order: the
    posterior sample, r ~ U(0, 1) and the random orders (`random_order_mask`), the text drop
    (prob `config.text_drop`), then the head's t and noise for B * N * diffusion_batch_mul rows
    (`diffusion_loss`, masked mean). `step` is unused. Returns the loss and detached metrics
    'loss', 'mse', 'vb' (over masked rows), 'mask_ratio', 'text_drop'.
    """
    cfg = model.config
    x_BNC = _tokens_from_batch(model, batch, generator)
    B, N, C = x_BNC.shape
    dev = x_BNC.device
    r = torch.rand(1, device=dev, generator=generator)
    mask_BN = random_order_mask(B, N, r, device=dev, generator=generator)

    text_ids = batch["text_ids"].long().to(dev)
    null_ids = encode_text([""], text_ids.shape[1]).to(dev)
    text_BTE, pooled_BE = model.encode_text(torch.cat([text_ids, null_ids]))
    p_drop = cfg.text_drop if text_drop is None else text_drop
    drop_B = torch.rand(B, device=dev, generator=generator) < p_drop
    text_BTE = torch.where(drop_B[:, None, None], text_BTE[-1:], text_BTE[:-1])
    pooled_BE = torch.where(drop_B[:, None], pooled_BE[-1:], pooled_BE[:-1])
    aesthetic = batch.get("aesthetic")
    aesthetic_B = None if aesthetic is None else aesthetic.float().to(dev)

    z_BND = model(x_BNC, mask_BN, text_BTE, pooled_BE, aesthetic_B)
    k = cfg.diffusion_batch_mul
    target_R = x_BNC.reshape(B * N, C).repeat(k, 1)
    z_R = z_BND.reshape(B * N, -1).repeat(k, 1)
    mask_R = mask_BN.reshape(B * N).repeat(k).float()
    loss, terms = diffusion_loss(model.head, model.schedule(device=dev), target_R, z_R, mask_R,
                                 generator=generator)
    with torch.no_grad():
        denom = mask_R.sum()
        metrics = {"loss": loss.detach(), "mse": (terms["mse"] * mask_R).sum() / denom,
                   "vb": (terms["vb"] * mask_R).sum() / denom,
                   "mask_ratio": mask_BN.float().mean(), "text_drop": drop_B.float().mean()}
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def kl_masked_after_step(step: int, steps: int, seq_len: int, num_masked: int) -> int:
    """Tokens still masked after step `step` (0-based) of `steps` (official `sample_tokens`):
    floor(N cos(pi/2 (step + 1) / steps)), clamped to [1, num_masked - 1]. The last step reveals
    every token left regardless."""
    target = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / steps))
    return max(1, min(num_masked - 1, target))


@torch.no_grad()
def sample(
    model: MaskGenKL,
    text_ids_BT: Tensor,
    *,
    steps: int = 32,
    cfg: float = 3.0,
    cfg_schedule: Literal["linear", "constant"] = "linear",
    temperature: float = 1.0,
    aesthetic: float | None = 6.0,
    num_sampling_steps: int | None = None,
    eta: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Text-to-latent sampling (official `MaskGen_KL.sample_tokens`) from byte ids (B, 77).

    Encodes the captions and the empty caption with the model's text encoder, then runs
    `sample_from_features`. Returns latents (B, C, 1, N) in the scaled (generator) space.
    """
    was_training = model.training
    model.eval()
    try:
        text, pooled = model.encode_text(text_ids_BT)
        null_text, null_pooled = model.null_text(text_ids_BT.shape[0], text_ids_BT.device)
        return sample_from_features(
            model, text, pooled, null_text, null_pooled, steps=steps, cfg=cfg,
            cfg_schedule=cfg_schedule, temperature=temperature, aesthetic=aesthetic,
            num_sampling_steps=num_sampling_steps, eta=eta, generator=generator)
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_from_features(
    model: MaskGenKL,
    text_BTE: Tensor,
    pooled_BE: Tensor,
    null_text_BTE: Tensor,
    null_pooled_BE: Tensor,
    *,
    steps: int = 32,
    cfg: float = 3.0,
    cfg_schedule: Literal["linear", "constant"] = "linear",
    temperature: float = 1.0,
    aesthetic: float | None = 6.0,
    num_sampling_steps: int | None = None,
    eta: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Iterative unmasking over a random order per sample, tokens drawn by the diffusion head.

    Step k: z = model(tokens, mask, text) (and with the null caption when cfg != 1); n =
    `kl_masked_after_step` stay masked (the first n of the order); the other masked positions
    (all of them at the last step) are drawn by `head_sample` with guidance 1 + (cfg - 1)(N - n)/N
    ("linear") or cfg ("constant"), `temperature`, over `num_sampling_steps` (default
    config.sampling_steps) respaced DDPM steps (DDIM with `eta`).

    Args:
        text_BTE, pooled_BE: (B, T, E), (B, E) caption features; null_*: the empty caption's
            (1 or B rows).
        generator: draws the orders and the head's noise; a fixed seed repeats the latents.
    Returns:
        latents (B, C, 1, N), scaled (divide by scale_factor for the tokenizer's decode).
    """
    if steps < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}.")
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"sample: cfg_schedule must be linear or constant, got {cfg_schedule!r}.")
    conf = model.config
    B, N, C, dev = text_BTE.shape[0], conf.num_tokens, conf.token_dim, text_BTE.device
    schedule = model.schedule(num_sampling_steps or conf.sampling_steps, dev)
    guided = cfg != 1.0
    score = conf.default_aesthetic if aesthetic is None else aesthetic
    aes_B = torch.full((B,), float(score), device=dev)
    if guided:
        text_BTE = torch.cat([text_BTE, null_text_BTE.expand(B, -1, -1)])
        pooled_BE = torch.cat([pooled_BE, null_pooled_BE.expand(B, -1)])
        aes_B = torch.cat([aes_B, aes_B])
    order_BN = torch.rand(B, N, device=dev, generator=generator).argsort(-1)
    ranks_BN = order_BN.argsort(-1)
    tokens = torch.zeros(B, N, C, device=dev)
    mask = torch.ones(B, N, dtype=torch.bool, device=dev)
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            reps = 2 if guided else 1
            z = model(tokens.repeat(reps, 1, 1), mask.repeat(reps, 1), text_BTE, pooled_BE, aes_B)
            n_left = kl_masked_after_step(step, steps, N, int(mask.sum(-1).min()))
            mask_next = ranks_BN < n_left
            pred = mask if step == steps - 1 else mask & ~mask_next
            s = (linear_guidance(N - n_left, N, cfg) if cfg_schedule == "linear" else cfg)
            z_c = z[:B][pred]
            z_u = z[B:][pred] if guided else None
            new = head_sample(model.head, schedule, z_c, z_u, cfg=s, temperature=temperature,
                              eta=eta, generator=generator)
            tokens = tokens.clone()
            tokens[pred] = new.to(tokens.dtype)
            mask = mask_next
    finally:
        model.train(was_training)
    return tokens.transpose(1, 2).reshape(B, C, 1, N)


SPEC = FamilySpec(
    name="maskgen_kl", role="generator", config_class=MaskGenKLConfig, sizes=MASKGEN_KL_SIZES,
    model_class=MaskGenKL, data="latents", data_fields=("num_tokens", "token_dim", "scale_factor"),
    loss=maskgen_kl_loss, conditioning="text", sampler=sample, output="latents",
    needs_text=True, sampling=MASKGEN_KL_SAMPLING,
    summary="MaskGen (KL): text-to-image masked generation of continuous 1D tokens, "
            "MM-DiT blocks + per-token diffusion head",
)
