"""DiMR: multi-resolution diffusion (Transformer stage -> ConvNeXt stage) with TD-LN.

Spec: methods.md §2.10, §1.6 (SD-VAE latents 4x32x32, x0.18215). Reference: qihao067/DiMR @fa141ae

===============================  ===========================================================
part                             official file (what is taken from it)
===============================  ===========================================================
sizes, loss weights, optimizer,  ``configs/DiMR-XL-2R_imagenet256.py``,
sampling settings                ``configs/DiMR-G-2R_imagenet256.py`` (stage_configs, loss_coeffs
                                 [1/4, 1], AdamW 2e-4 b=(0.99, 0.99) wd 0.03, dpm_solver 250
                                 steps, cfg scale 0.4, p_uncond 0.1)
multi-resolution network         ``libs/core/blocks.py`` (MRModel, Stage, TransformerBlock,
                                 ConvNeXtBlock, SelfAttention, MLPBlock, PixelShuffleUpsample,
                                 PositionEmbeddings)
TD-LN                            ``libs/core/sigmoid/module.py`` (TimeDependentParameter,
                                 ``seed_time``: tau = log_snr / 4; LayerNorm; TDRMSNorm) and
                                 ``libs/core/sigmoid/kernel.py`` (``tdp_torch``, the default
                                 ``custom=False`` path)
init, small layers               ``libs/core/common_layers.py`` (Linear / Embedding trunc-normal
                                 0.02, EvenDownInterpolate, ChannelFirst / ChannelLast)
noise schedule, loss             ``train.py`` (stable_diffusion_beta_schedule, Schedule, LSimple),
                                 ``sde.py`` (multi_scale_targets, mos)
sampler                          ``dpm_solver.py`` (NoiseScheduleVP('discrete'), DPM_Solver with
                                 predict_x0=True, ``sample(method='fast', order=3,
                                 skip_type='time_uniform')``), ``eval.py`` (cfg_nnet, model_fn)
null class, class dropout        ``datasets.py`` (CFGDataset, empty token K = 1000)
weight-decay groups              ``utils.py`` (trainable_parameters: ``nodecay_*`` without decay)
===============================  ===========================================================

Network (DiMR-XL/2R; a general list of stages, each one output)::

    x_t (B,4,32,32) --conv 2x2/2 + pos--> 16x16 tokens + class token
        --Transformer stage (39 blocks, U-ViT long skips)--> eps_0 (B,4,16,16)
        every block's output (and the input) concatenated: (B,16,16,960*40)
        --TD-LN, pixel-shuffle x2, TD-LN--> added to the ConvNeXt stage's input
    x_t --conv 1x1 + pos--> (B,32,32,480) --ConvNeXt stage (21 blocks)--> eps_1 (B,4,32,32)

Stage k's output sits at input_size / (image_input_ratio * input_feature_ratio); it regresses the
noise box-downsampled to that size with scale correction (sum / ratio, unit variance kept).
Loss = sum_k loss_coeffs[k] * mean|eps_k - down_k(eps)|^2 (per-sample mean, then batch mean).

Time conditioning is TD-LN only (no timestep embedding): every norm's parameter is
p(tau) = p1 + sigmoid((w + 1) tau + b) (p0 - p1), tau = log_snr / 4, with p0, p1, w, b learned
(w, b start at 0; p0 = p1 at init). What the official code calls ``log_snr`` is the linear time code
8 n / N - 4 in [-4, 4] (n the discrete step, 1..N; sampler: 8 t - 4 with t = n / N), not the
schedule's log-SNR; methods.md's "tau = logSNR/4" is that code / 4 = 2 t - 1.

Noise schedule: SD "scaled linear" betas, sqrt(beta) = linspace(sqrt(0.00085), sqrt(0.012), 1000);
training draws n ~ U{1..N}, x_n = sqrt(abar_n) x + sqrt(1 - abar_n) eps, eps-prediction. Sampling
follows DPM_Solver's discrete VP wrapper: continuous t in [1/N, 1], log alpha_t piecewise linear
between t = n / N knots (0.5 log abar_n).

Differences from the official code (numerics kept unless stated):

* Stateful ``TimeDependentParameter.seed_time`` is replaced by passing tau to each TD module
  (same values, same collapse to one row when every sample shares its time).
* ``max_height`` / ``max_width`` are derived from ``input_size`` (official configs give them per
  stage; they are equal there), so the latent size follows the data's facts.
* ``num_classes`` counts data classes; the embedding has num_classes + 1 rows, the last one the
  null class (official ``num_classes = 1001``).
* Gradient checkpointing is optional (``grad_checkpointing``; always on officially); attention's
  fp32 q/k/v result is cast back to the input dtype before ``dense`` (bf16 without autocast).
* The sampler integrates in float64; intermediate points of a singlestep update are the grid
  points themselves (official: ``inverse_lambda`` of their log-SNR, the same point up to rounding).
  The official ``method='multistep'`` branch reads an undefined ``timesteps``; the multistep
  solver here uses the official update formulas with the time grid computed. The time code uses
  n / N (official hardcodes 1000 = N).
* Only ``norm_type='TDRMSN'``, absolute position embeddings (the configs' defaults) and the even
  box filter for targets are built; the axial-RoPE / ADARMSN / text-conditioning options and the
  CUDA TD kernel are not.
* AdamW ``nodecay_*`` groups: :func:`optimizer_param_groups` (the train stage applies one decay
  to all parameters).

GRAT at sampling time (``sample(attention="grat")``, training-free; not in DiMR, our addition;
training stays dense): every Transformer stage's self-attention runs as GRAT (``kernels.grat``:
the block-sparse Triton kernel on CUDA, its PyTorch reference elsewhere) over that stage's g x g
token grid, groups of ``grat_groups`` (gh, gw) tokens, GRAT-X "criss_cross" (OliverRensu/GRAT
@7afc1f9 ``cross_processor.py``) or GRAT-B "block" (paper). The stage's sequence is [class token,
g*g grid tokens]; the class token keeps full attention as query and as key, as the official code
treats its condition (text) tokens: it is moved behind the grid, where the kernel takes it as a
text token (``n_text=1``), and back. The ConvNeXt stages have no attention and are unchanged.

Shape legend: B batch, C latent channels, H/W sizes, N tokens, D width, T rows of a TD parameter
(1 or B).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vgen_core.families import FamilySpec, sized_config
from vgen_core.generators.common import attention
from vgen_core.generators.flow import GRAT_GROUPS, inference_attention_options, latents_from_moments
from vgen_core.generators.schedules import power_cosine_guidance

__all__ = [
    "DIMR_SIZES",
    "DiMR",
    "DiMRConfig",
    "DiMRStageConfig",
    "DiscreteVPSchedule",
    "EpsFn",
    "TDLayerNorm",
    "TDRMSNorm",
    "TimeDependentParameter",
    "ddim_sample",
    "dimr_config",
    "dimr_loss",
    "dpm_solver_fast_orders",
    "dpm_solver_fast_sample",
    "dpm_solver_multistep_sample",
    "euler_sample",
    "inference_attention",
    "inference_attention_by_stage",
    "multiscale_loss",
    "multiscale_targets",
    "optimizer_param_groups",
    "sample",
    "sd_betas",
    "sd_schedule",
    "time_code",
    "time_grid",
]

# --------------------------------------------------------------------------------------------------
# Noise schedule (train.py stable_diffusion_beta_schedule / Schedule; dpm_solver.py NoiseScheduleVP)
# --------------------------------------------------------------------------------------------------


def sd_betas(num_timesteps: int = 1000, start: float = 0.00085, end: float = 0.012) -> Tensor:
    """linspace(sqrt(start), sqrt(end), N) ** 2 in float64: betas_1..betas_N, (N,)."""
    return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2


def time_code(n_or_t: Tensor, num_timesteps: int | None = None) -> Tensor:
    """The official ``log_snr`` input: 8 n / N - 4 for discrete n (pass N), else 8 t - 4."""
    t = n_or_t.double() / num_timesteps if num_timesteps else n_or_t.double()
    return (t * 8.0 - 4.0).float()


def _interp(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear y(x) through increasing knots (xp, yp), extended by the end segments
    (dpm_solver.py ``interpolate_fn``)."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], yp[i - 1], yp[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVPSchedule:
    """The DDPM schedule of ``betas`` (N,), in discrete steps n = 1..N and continuous t in [1/N, 1].

    ``alphas_cumprod[n - 1]`` = prod_{i<=n} (1 - beta_i) (train.py ``Schedule.cum_alphas[n]``);
    ``log_alpha(t)`` interpolates 0.5 log abar linearly between the knots t = n / N
    (NoiseScheduleVP('discrete')); sigma_t = sqrt(1 - alpha_t^2), lambda_t = log(alpha_t / sigma_t).
    Everything is float64 on the CPU; results follow the input's device.
    """

    def __init__(self, betas: Tensor) -> None:
        self.betas = betas.double().cpu()
        self.num_timesteps = int(self.betas.numel())
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)
        self.log_alpha_knots = 0.5 * torch.log(1.0 - self.betas).cumsum(0)
        self.t_knots = torch.linspace(1.0 / self.num_timesteps, 1.0, self.num_timesteps,
                                      dtype=torch.float64)

    def diffuse(self, x0: Tensor, n_B: Tensor, eps: Tensor) -> Tensor:
        """x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps, n (B,) in 1..N (Schedule.sample)."""
        abar = self.alphas_cumprod[n_B.cpu().long() - 1].to(x0.device)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a, s = abar.sqrt().to(x0.dtype).view(shape), (1.0 - abar).sqrt().to(x0.dtype).view(shape)
        return a * x0 + s * eps

    def log_alpha(self, t: Tensor) -> Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64)
        out = _interp(t64.cpu().reshape(-1), self.t_knots, self.log_alpha_knots)
        return out.reshape(t64.shape).to(t64.device)

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lam(self, t: Tensor) -> Tensor:
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

    def inverse_lambda(self, lam: Tensor) -> Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        out = _interp(la.cpu().reshape(-1), self.log_alpha_knots.flip(0), self.t_knots.flip(0))
        return out.reshape(lam.shape).to(lam.device)


@functools.lru_cache(maxsize=8)
def sd_schedule(num_timesteps: int = 1000, start: float = 0.00085,
                end: float = 0.012) -> DiscreteVPSchedule:
    """The (cached) DiscreteVPSchedule of ``sd_betas``."""
    return DiscreteVPSchedule(sd_betas(num_timesteps, start, end))


# --------------------------------------------------------------------------------------------------
# TD-LN (libs/core/sigmoid/module.py, kernel.py)
# --------------------------------------------------------------------------------------------------


class TimeDependentParameter(nn.Module):
    """p(tau) = param1 + sigmoid((nodecay_weight + 1) tau + nodecay_bias) (param0 - param1).

    param0 = param1 = init at construction, nodecay_weight = nodecay_bias = 0 (so p is constant
    until trained). ``forward(tau_T)`` -> (T, *shape) (``tdp_torch``).
    """

    def __init__(self, shape: tuple[int, ...], init: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.shape = shape
        w = torch.empty(*shape)
        init(w)
        self.param0 = nn.Parameter(w.clone().detach())
        self.param1 = nn.Parameter(w.clone().detach())
        self.nodecay_weight = nn.Parameter(torch.zeros(*shape))
        self.nodecay_bias = nn.Parameter(torch.zeros(*shape))

    def forward(self, tau_T: Tensor) -> Tensor:
        p0, p1 = self.param0.reshape(-1), self.param1.reshape(-1)
        w, b = (self.nodecay_weight + 1).reshape(-1), self.nodecay_bias.reshape(-1)
        a = torch.addcmul(b[None], tau_T.to(p0.dtype)[:, None], w[None])
        out = torch.addcmul(p1[None], torch.sigmoid(a), (p0 - p1)[None])
        return out.reshape(tau_T.shape[0], *self.shape)


def _per_row(p_TD: Tensor, x: Tensor) -> Tensor:
    """(T, D) -> (T, 1, ..., 1, D) against x (B, ..., D); T = 1 broadcasts over the batch."""
    return p_TD.reshape(p_TD.shape[0], *([1] * (x.ndim - 2)), p_TD.shape[-1])


class TDLayerNorm(nn.Module):
    """LayerNorm (eps 1e-5) whose weight (init 1) and bias (init 0) are time-dependent."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = TimeDependentParameter((dim,), nn.init.ones_)
        self.bias = TimeDependentParameter((dim,), nn.init.zeros_)

    def forward(self, x: Tensor, tau_T: Tensor) -> Tensor:
        w, b = self.weight(tau_T), self.bias(tau_T)
        if w.shape[0] == 1:
            return F.layer_norm(x, (self.dim,), weight=w[0], bias=b[0], eps=self.eps)
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        return torch.addcmul(_per_row(b, y), _per_row(w, y), y)


class TDRMSNorm(nn.Module):
    """x / (||x||_2 / sqrt(d) + eps) * scale(tau), eps 1e-8, no bias (official TDRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.d, self.eps = dim, eps
        self.scale = TimeDependentParameter((dim,), nn.init.ones_)

    def forward(self, x: Tensor, tau_T: Tensor) -> Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) * self.d ** (-0.5)
        return _per_row(self.scale(tau_T), x) * (x / (rms + self.eps))


# --------------------------------------------------------------------------------------------------
# Layers and blocks (libs/core/blocks.py, common_layers.py); module names are the official ones
# --------------------------------------------------------------------------------------------------


def _linear(din: int, dout: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(din, dout, bias=bias)
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _embedding(num: int, dim: int) -> nn.Embedding:
    emb = nn.Embedding(num, dim)
    nn.init.trunc_normal_(emb.weight, mean=0.0, std=0.02)
    return emb


class _ChannelLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class _ChannelFirst(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


class _EvenDownInterpolate(nn.Module):
    def __init__(self, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> Tensor:
        if self.ratio == 1:
            return x
        H, W = x.shape[-2:]
        return F.interpolate(x, size=(H // self.ratio, W // self.ratio), mode="area")


class _PositionEmbeddings(nn.Module):
    def __init__(self, max_height: int, max_width: int, dim: int) -> None:
        super().__init__()
        self.max_width = max_width
        self.position_embeddings = _embedding(max_height * max_width, dim)

    def forward(self, x_BHWD: Tensor) -> Tensor:
        _, H, W, _ = x_BHWD.shape
        rows = torch.arange(H, device=x_BHWD.device)[:, None] * self.max_width
        idx = rows + torch.arange(W, device=x_BHWD.device)[None, :]
        return x_BHWD + self.position_embeddings(idx[None])


class _PixelShuffleUpsample(nn.Module):
    """Linear(d_in, r*r*d_out) then (B, H, W, r, r, d_out) -> (B, rH, rW, d_out)."""

    def __init__(self, dim_in: int, dim_out: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.kernel = _linear(dim_in, dim_out * ratio * ratio)

    def forward(self, x_BHWD: Tensor) -> Tensor:
        x = self.kernel(x_BHWD)
        B, H, W, C = x.shape
        r = self.ratio
        x = x.reshape(B, H, W, r, r, C // (r * r)).transpose(2, 3)
        return x.reshape(B, H * r, W * r, C // (r * r))


class _TDSequential(nn.Sequential):
    """nn.Sequential whose TD norms also receive tau (keeps the official numeric key indices)."""

    def forward(self, x: Tensor, tau_T: Tensor) -> Tensor:  # type: ignore[override]
        for m in self:
            x = m(x, tau_T) if isinstance(m, (TDLayerNorm, TDRMSNorm)) else m(x)
        return x


class _MLPBlock(nn.Module):
    """TD-RMSNorm then GEGLU: w2(gelu(w0 x) * w1 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = TDRMSNorm(dim)
        self.act = nn.GELU()
        self.w0 = _linear(dim, hidden)
        self.w1 = _linear(dim, hidden)
        self.w2 = _linear(hidden, dim)

    def forward(self, x: Tensor, tau_T: Tensor) -> Tensor:
        x = self.norm(x, tau_T)
        return self.w2(self.act(self.w0(x)) * self.w1(x))


#: leading non-grid tokens of a Transformer stage's sequence: the class token
_N_COND = 1


def _condition_last(x_BHND: Tensor) -> Tensor:
    """[cond, grid] -> [grid, cond] on dim 2 (the kernel's image-then-text order)."""
    return torch.cat([x_BHND[:, :, _N_COND:], x_BHND[:, :, :_N_COND]], dim=2)


def _condition_first(x_BHND: Tensor) -> Tensor:
    """Inverse of `_condition_last`."""
    return torch.cat([x_BHND[:, :, -_N_COND:], x_BHND[:, :, :-_N_COND]], dim=2)


class _SelfAttention(nn.Module):
    """TD-RMSNorm, qkv (no bias; [q heads | k heads | v heads]), fp32 SDPA, dense.

    ``inference_options`` (set by `inference_attention`) are GRAT options of `common.attention`
    used in eval mode only; the class token then attends and is attended densely (moved to the
    kernel's text slot). Training mode always runs dense SDPA.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.norm = TDRMSNorm(dim)
        self.query_key_value = _linear(dim, 3 * dim, bias=False)
        self.dense = _linear(dim, dim)
        self.inference_options: dict[str, Any] = {}

    def forward(self, x_BND: Tensor, tau_T: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        qkv = self.query_key_value(self.norm(x_BND, tau_T))
        qkv = qkv.reshape(B, N, 3 * self.num_heads, self.head_dim).permute(0, 2, 1, 3).float()
        q, k, v = qkv.chunk(3, dim=1)
        options = {} if self.training else self.inference_options
        if options:
            q, k, v = _condition_last(q), _condition_last(k), _condition_last(v)
            out = _condition_first(attention(q, k, v, n_text=_N_COND, **options))
        else:
            out = attention(q, k, v)
        return self.dense(out.permute(0, 2, 1, 3).reshape(B, N, D).to(x_BND.dtype))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: DiMRStageConfig) -> None:
        super().__init__()
        self.block1 = _SelfAttention(cfg.dim, cfg.num_attention_heads)
        self.block2 = _MLPBlock(cfg.dim, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout_prob)

    def forward(self, x_BND: Tensor, tau_T: Tensor) -> Tensor:
        x_BND = x_BND + self.dropout(self.block1(x_BND, tau_T))
        return x_BND + self.dropout(self.block2(x_BND, tau_T))


class ConvNeXtBlock(nn.Module):
    """x + depthwise conv (k, no norm before it); x + MLPBlock(x), channel-last (B, H, W, D)."""

    def __init__(self, cfg: DiMRStageConfig) -> None:
        super().__init__()
        k, d = cfg.kernel_size, cfg.dim
        self.block1 = nn.Sequential(
            _ChannelFirst(), nn.Conv2d(d, d, kernel_size=k, padding=k // 2, groups=d),
            _ChannelLast(),
        )  # fmt: skip
        self.block2 = _MLPBlock(d, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout_prob)

    def forward(self, x_BHWD: Tensor, tau_T: Tensor) -> Tensor:
        x_BHWD = x_BHWD + self.dropout(self.block1(x_BHWD))
        return x_BHWD + self.dropout(self.block2(x_BHWD, tau_T))


# --------------------------------------------------------------------------------------------------
# Config and sizes
# --------------------------------------------------------------------------------------------------


class DiMRStageConfig(BaseModel):
    """One resolution stage (official ``stage_configs`` entry; max_height/width are derived)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_type: Literal["TransformerBlock", "ConvNeXtBlock"]
    dim: int = Field(ge=1)
    hidden_dim: int = Field(ge=1)
    num_blocks: int = Field(ge=1)  # official count; num_blocks // 2 * 2 + 1 blocks are built
    num_attention_heads: int = Field(1, ge=1)  # TransformerBlock
    kernel_size: int = Field(7, ge=1)  # ConvNeXtBlock depthwise conv
    image_input_ratio: int = Field(1, ge=1)  # area-downsample x_t by this first
    input_feature_ratio: int = Field(1, ge=1)  # then a conv with this kernel and stride
    final_kernel_size: int = Field(3, ge=1)
    dropout_prob: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> DiMRStageConfig:
        if self.block_type == "TransformerBlock" and self.dim % self.num_attention_heads:
            raise ValueError(f"stage dim={self.dim} must be divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")
        if self.kernel_size % 2 == 0 or self.final_kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} and final_kernel_size="
                             f"{self.final_kernel_size} must be odd ('same' padding).")
        return self

    @property
    def depth(self) -> int:
        """Blocks built: in-blocks, a middle block, out-blocks (U-ViT long skips)."""
        return self.num_blocks // 2 * 2 + 1

    @property
    def skip_width(self) -> int:
        """Channels of the concatenated skips handed to the next stage (input + every block)."""
        return self.dim * (self.depth + 1)

    def grid(self, input_size: int) -> int:
        return input_size // self.image_input_ratio // self.input_feature_ratio


class DiMRConfig(BaseModel):
    """DiMR config; ``build()`` makes the model. Defaults = DiMR-XL/2R on SD-VAE 4x32x32 latents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int = Field(32, ge=1)
    in_channels: int = Field(4, ge=1)
    num_classes: int = Field(1000, ge=1)  # data classes; row num_classes is the null class
    stages: tuple[DiMRStageConfig, ...] = ()
    loss_coeffs: tuple[float, ...] = (0.25, 1.0)
    norm_type: Literal["TDRMSN"] = "TDRMSN"
    block_grad_to_lowres: bool = False
    grad_checkpointing: bool = False
    # loss
    class_dropout: float = Field(0.1, ge=0.0, le=1.0)
    scale_factor: float = Field(0.18215, gt=0.0)  # applied when a batch carries `moments`
    num_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.00085, gt=0.0, lt=1.0)
    beta_end: float = Field(0.012, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> DiMRConfig:
        if not self.stages:
            raise ValueError("DiMR needs at least one stage (e.g. dimr_config('XL/2R')).")
        if len(self.loss_coeffs) != len(self.stages):
            raise ValueError(f"loss_coeffs has {len(self.loss_coeffs)} entries for "
                             f"{len(self.stages)} stages; give one weight per stage output.")
        prev = None
        for k, s in enumerate(self.stages):
            step = s.image_input_ratio * s.input_feature_ratio
            if self.input_size % step:
                raise ValueError(f"stage {k}: input_size={self.input_size} is not divisible by "
                                 f"image_input_ratio*input_feature_ratio={step}.")
            g = s.grid(self.input_size)
            if prev is not None and g % prev:
                raise ValueError(f"stage {k}: its {g}x{g} grid must be a multiple of the previous "
                                 f"stage's {prev}x{prev} (pixel-shuffle upsampling).")
            prev = g
        return self

    @property
    def grids(self) -> tuple[int, ...]:
        return tuple(s.grid(self.input_size) for s in self.stages)

    def build(self) -> DiMR:
        return DiMR(self)


def _transformer(dim: int, blocks: int, heads: int) -> DiMRStageConfig:
    return DiMRStageConfig(block_type="TransformerBlock", dim=dim, hidden_dim=2 * dim,
                           num_blocks=blocks, num_attention_heads=heads, input_feature_ratio=2)


def _convnext(dim: int, blocks: int) -> DiMRStageConfig:
    return DiMRStageConfig(block_type="ConvNeXtBlock", dim=dim, hidden_dim=2 * dim,
                           num_blocks=blocks, kernel_size=7)


DIMR_SIZES: dict[str, DiMRConfig] = {
    # CPU-test size: 4x8x8 latents, Transformer stage at 4x4 -> ConvNeXt stage at 8x8.
    "tiny": DiMRConfig(input_size=8, num_classes=10,
                       stages=(_transformer(32, 2, 2), _convnext(16, 2))),
    # configs/DiMR-XL-2R_imagenet256.py (505M parameters, README)
    "XL/2R": DiMRConfig(stages=(_transformer(960, 39, 16), _convnext(480, 20))),
    # configs/DiMR-G-2R_imagenet256.py (1.06B parameters, README)
    "G/2R": DiMRConfig(stages=(_transformer(1152, 57, 16), _convnext(576, 29))),
}

dimr_config = sized_config("DiMR", DiMRConfig, DIMR_SIZES)

#: released inference settings (configs' ``sample``: dpm_solver, 250 steps, U-ViT cfg 0.4)
DIMR_SAMPLING: dict[str, dict[str, Any]] = {
    size: {"num_steps": 250, "method": "dpm_solver", "cfg_scale": 0.4} for size in ("XL/2R", "G/2R")
}


# --------------------------------------------------------------------------------------------------
# Model (MRModel, Stage)
# --------------------------------------------------------------------------------------------------


class _Stage(nn.Module):
    def __init__(self, cfg: DiMRStageConfig, config: DiMRConfig, grid: int,
                 lowres: tuple[int, int] | None) -> None:
        super().__init__()
        self.transformer = cfg.block_type == "TransformerBlock"
        self.checkpointing = config.grad_checkpointing
        C, D = config.in_channels, cfg.dim
        r = cfg.input_feature_ratio
        self.input_layer = nn.Sequential(
            _EvenDownInterpolate(cfg.image_input_ratio), nn.Conv2d(C, D, kernel_size=r, stride=r),
            _ChannelLast(), _PositionEmbeddings(grid, grid, D),
        )  # fmt: skip
        self.class_embeds = _embedding(config.num_classes + 1, D) if self.transformer else None
        self.upsample: _TDSequential | None = None
        if lowres is not None:
            low_dim, low_grid = lowres
            self.upsample = _TDSequential(
                TDLayerNorm(low_dim), _PixelShuffleUpsample(low_dim, D, grid // low_grid),
                TDLayerNorm(D),
            )  # fmt: skip
        block = TransformerBlock if self.transformer else ConvNeXtBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.depth))
        self.skip_denses = nn.ModuleList(_linear(2 * D, D) for _ in range(cfg.num_blocks // 2))
        k = cfg.final_kernel_size
        self.output_layer = _TDSequential(
            TDLayerNorm(D), _ChannelFirst(), nn.Conv2d(D, C, kernel_size=k, padding=k // 2),
        )  # fmt: skip

    def _block(self, block: nn.Module, x: Tensor, tau_T: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            out = checkpoint(block, x, tau_T, use_reentrant=False)
            assert isinstance(out, Tensor)
            return out
        return block(x, tau_T)

    def forward(self, x_BCHW: Tensor, tau_T: Tensor, lowres_BhwL: Tensor | None,
                labels_B: Tensor) -> tuple[Tensor, Tensor]:
        """-> (output (B, C, g, g), every skip concatenated (B, g, g, D * (depth + 1)))."""
        x = self.input_layer(x_BCHW)  # (B, g, g, D)
        if lowres_BhwL is not None:
            assert self.upsample is not None
            x = x + self.upsample(lowres_BhwL, tau_T)
        B, H, W, D = x.shape
        if self.transformer:
            x = x.reshape(B, H * W, D)
            assert self.class_embeds is not None
            x = torch.cat([self.class_embeds(labels_B)[:, None, :], x], dim=1)
        half = len(self.blocks) // 2
        skips, external = [], [x]
        for block in self.blocks[:half]:
            x = self._block(block, x, tau_T)
            skips.append(x)
            external.append(x)
        x = self._block(self.blocks[half], x, tau_T)
        external.append(x)
        for dense, block in zip(self.skip_denses, self.blocks[half + 1:], strict=True):
            x = self._block(block, dense(torch.cat([x, skips.pop()], dim=-1)), tau_T)
            external.append(x)
        if self.transformer:
            x = x[:, 1:].reshape(B, H, W, D)
            external = [e[:, 1:].reshape(B, H, W, D) for e in external]
        return self.output_layer(x, tau_T), torch.cat(external, dim=-1)


class DiMR(nn.Module):
    """Multi-resolution noise predictor: one output per stage, coarse to fine (official MRModel).

    Labels in [0, num_classes) or ``null_class_id`` (= num_classes) for the unconditional branch.
    State-dict keys are the official ones (``stages.{k}.blocks.{i}.block1.norm.scale.param0``...).
    """

    family: ClassVar[str] = "dimr"
    config_class: ClassVar[type[BaseModel]] = DiMRConfig

    def __init__(self, config: DiMRConfig) -> None:
        super().__init__()
        self.config = config
        stages: list[_Stage] = []
        lowres: tuple[int, int] | None = None
        for cfg, grid in zip(config.stages, config.grids, strict=True):
            stages.append(_Stage(cfg, config, grid, lowres))
            lowres = (cfg.skip_width, grid)
        self.stages = nn.ModuleList(stages)

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def schedule(self) -> DiscreteVPSchedule:
        c = self.config
        return sd_schedule(c.num_timesteps, c.beta_start, c.beta_end)

    def forward(self, x_BCHW: Tensor, log_snr_B: Tensor, labels_B: Tensor) -> list[Tensor]:
        """Noise predictions [eps_0 (B, C, g_0, g_0), ..., eps_K (B, C, g_K, g_K)], coarse to fine.

        Args:
            x_BCHW: x_t (B, C, input_size, input_size).
            log_snr_B: the official time code 8 t - 4 (``time_code``), (B,); TD-LN uses tau =
                log_snr / 4, one row for the batch when every sample shares it.
            labels_B: (B,) int64, ``null_class_id`` for unconditional.
        """
        cfg = self.config
        if x_BCHW.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(f"DiMR expects x (B, {cfg.in_channels}, {cfg.input_size}, "
                             f"{cfg.input_size}), got {tuple(x_BCHW.shape)}.")
        if log_snr_B.ndim != 1:
            raise ValueError(f"log_snr must be (B,), got {tuple(log_snr_B.shape)}.")
        # one TD-LN row when every sample shares the time (sampling); not while compiling, where
        # the data-dependent branch would break the graph (the broadcast row gives equal results)
        if not torch.compiler.is_compiling() and bool((log_snr_B == log_snr_B[0]).all()):
            log_snr_B = log_snr_B[:1]
        tau_T = log_snr_B.float() / 4.0
        x_BCHW = x_BCHW.to(next(self.parameters()).dtype)  # bf16 engines feed fp32 latents
        outputs: list[Tensor] = []
        lowres: Tensor | None = None
        for stage in self.stages:
            out, lowres = stage(x_BCHW, tau_T, lowres, labels_B)
            outputs.append(out)
            if cfg.block_grad_to_lowres:
                lowres = lowres.detach()
        return outputs


def inference_attention_by_stage(
    config: DiMRConfig,
    attention: str,
    *,
    groups: Sequence[int] = GRAT_GROUPS,
    variant: str = "criss_cross",
    radius: int = 1,
) -> list[dict[str, Any]]:
    """One `flow.inference_attention_options` dict per stage ({} for dense and for ConvNeXt
    stages), each on its Transformer stage's g x g grid; errors name the stage and the fix."""
    out: list[dict[str, Any]] = []
    for k, (stage, g) in enumerate(zip(config.stages, config.grids, strict=True)):
        if stage.block_type != "TransformerBlock":
            out.append({})
            continue
        try:
            out.append(inference_attention_options(attention, (g, g), groups=groups,
                                                   variant=variant, radius=radius))
        except ValueError as e:
            raise ValueError(f"DiMR sample(attention={attention!r}): stage {k} (Transformer on "
                             f"{g}x{g} tokens): {e}") from None
    return out


@contextlib.contextmanager
def inference_attention(model: DiMR, options: Sequence[dict[str, Any]]) -> Iterator[None]:
    """Within the block, stage k's self-attention in eval mode uses ``options[k]``
    (`inference_attention_by_stage`; {} = dense); the previous settings are restored after."""
    if len(options) != len(model.stages):
        raise ValueError(f"DiMR inference_attention: {len(options)} option dicts for "
                         f"{len(model.stages)} stages; build them with "
                         "inference_attention_by_stage(model.config, ...).")
    mods = [(m, opts) for stage, opts in zip(model.stages, options, strict=True)
            for m in stage.modules() if isinstance(m, _SelfAttention)]
    saved = [m.inference_options for m, _ in mods]
    for m, opts in mods:
        m.inference_options = dict(opts)
    try:
        yield
    finally:
        for (m, _), old in zip(mods, saved, strict=True):
            m.inference_options = old


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: TD-LN ``nodecay_weight`` / ``nodecay_bias`` without decay (utils.py)."""
    decay: list[nn.Parameter] = []
    nodecay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        nd = name.endswith(".nodecay_weight") or name.endswith(".nodecay_bias")
        (nodecay if nd else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": nodecay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------
# Loss (train.py LSimple, sde.py multi_scale_targets)
# --------------------------------------------------------------------------------------------------


def multiscale_targets(eps_BCHW: Tensor, sizes: Sequence[int]) -> dict[int, Tensor]:
    """{size: eps box-downsampled to size x size}, kernel ones(r, r) / r, stride r (r = H / size):
    the block sum / r, which keeps unit variance (sde.py even_multi_scale_targets,
    scale_correction=True)."""
    B, C, H, W = eps_BCHW.shape
    out: dict[int, Tensor] = {}
    for size in sorted(set(sizes)):
        if H % size or W % size:
            raise ValueError(f"target size {size} does not divide the {H}x{W} noise.")
        r = H // size
        if r == 1:
            out[size] = eps_BCHW
            continue
        kernel = torch.ones(C, 1, r, r, device=eps_BCHW.device, dtype=eps_BCHW.dtype) / r
        out[size] = F.conv2d(eps_BCHW, kernel, stride=r, groups=C)
    return out


def multiscale_loss(preds: Sequence[Tensor], eps_BCHW: Tensor,
                    coeffs: Sequence[float]) -> tuple[Tensor, list[Tensor]]:
    """(sum_k coeffs[k] * mse_k, [mse_k]); mse_k = batch mean of the per-sample mean square of
    preds[k] - down(eps) at preds[k]'s size (LSimple + train.py's ``loss.mean()``)."""
    if len(preds) != len(coeffs):
        raise ValueError(f"{len(preds)} stage outputs but {len(coeffs)} loss coefficients.")
    targets = multiscale_targets(eps_BCHW, [p.shape[-1] for p in preds])
    per = [(p.float() - targets[p.shape[-1]].float()).pow(2).flatten(1).mean(1).mean()
           for p in preds]
    loss = per[0] * coeffs[0]
    for c, m in zip(coeffs[1:], per[1:], strict=True):
        loss = loss + c * m
    return loss, per


def _batch_latents(cfg: DiMRConfig, batch: dict[str, Tensor],
                   generator: torch.Generator | None) -> Tensor:
    if "latents" in batch:
        return batch["latents"].float()
    if "moments" in batch:
        return latents_from_moments(batch["moments"].float(), cfg.scale_factor, generator)
    raise KeyError(f"batch needs 'latents' (B, C, H, W) or 'moments' (B, 2C, H, W); "
                   f"got keys {sorted(batch)}.")


def dimr_loss(model: DiMR, batch: dict[str, Tensor], step: int = 0, *,
              generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """DiMR training loss for one batch (train.py LSimple; CFGDataset label dropout).

    Batch keys: ``latents`` (B, C, H, W), already scaled, or ``moments`` (B, 2C, H, W) = mean ||
    logvar (sampled here, times config.scale_factor); ``label`` int64 (B,). ``step`` is unused.
    Draws, in this order from ``generator``: (moments sample), n ~ U{1..N} (B,), eps (B, C, H, W),
    class dropout u (B,) < class_dropout -> null class. x_n = sqrt(abar_n) x + sqrt(1 - abar_n) eps;
    the model gets the time code 8 n / N - 4. Returns (loss, {'loss', 'loss_stage{k}'}).
    """
    cfg = model.config
    x0 = _batch_latents(cfg, batch, generator)
    B, dev = x0.shape[0], x0.device
    N = cfg.num_timesteps
    n_B = torch.randint(1, N + 1, (B,), generator=generator, device=dev)
    eps = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    drop = torch.rand(B, generator=generator, device=dev) < cfg.class_dropout
    labels = torch.where(drop, model.null_class_id, batch["label"].long().to(dev))
    x_n = model.schedule.diffuse(x0, n_B, eps)
    preds = model(x_n, time_code(n_B, N).to(dev), labels)
    loss, per = multiscale_loss(preds, eps, cfg.loss_coeffs)
    metrics = {"loss": loss.detach()}
    metrics.update({f"loss_stage{k}": m.detach() for k, m in enumerate(per)})
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Samplers (dpm_solver.py DPM_Solver, predict_x0=True i.e. DPM-Solver++; DDIM; Euler)
# --------------------------------------------------------------------------------------------------

#: eps_fn(x (B, ...), t (B,) continuous in [1/N, 1]) -> predicted noise (B, ...)
EpsFn = Callable[[Tensor, Tensor], Tensor]


def time_grid(schedule: DiscreteVPSchedule, num_steps: int, *, t_start: float = 1.0,
              t_end: float | None = None, skip_type: str = "time_uniform") -> Tensor:
    """num_steps + 1 decreasing times from t_start to t_end (default 1 / N), float64:
    uniform in t ('time_uniform', the official default) or in lambda ('logSNR')."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    t_end = 1.0 / schedule.num_timesteps if t_end is None else t_end
    if skip_type == "time_uniform":
        return torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)
    if skip_type == "logSNR":
        lam = torch.linspace(float(schedule.lam(torch.tensor(t_start))),
                             float(schedule.lam(torch.tensor(t_end))), num_steps + 1,
                             dtype=torch.float64)
        return schedule.inverse_lambda(lam)
    raise ValueError(f"skip_type {skip_type!r} not known; use 'time_uniform' or 'logSNR'.")


class _Solver:
    """Schedule lookups and the data prediction x0 = (x - sigma eps) / alpha at scalar times."""

    def __init__(self, eps_fn: EpsFn, schedule: DiscreteVPSchedule) -> None:
        self.eps_fn, self.ns = eps_fn, schedule

    def coeffs(self, t: float) -> tuple[float, float, float]:
        tt = torch.tensor([t], dtype=torch.float64)
        return (float(self.ns.alpha(tt)), float(self.ns.sigma(tt)), float(self.ns.lam(tt)))

    def eps(self, x: Tensor, t: float) -> Tensor:
        t_B = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        return self.eps_fn(x, t_B).to(x.dtype)

    def x0(self, x: Tensor, t: float) -> Tensor:
        a, s, _ = self.coeffs(t)
        return (x - s * self.eps(x, t)) / a


def _singlestep(sv: _Solver, x: Tensor, s: float, mids: Sequence[float], t: float) -> Tensor:
    """One DPM-Solver++ singlestep update of order len(mids) + 1 from s to t ('dpm_solver' type,
    dpm_solver_{first,second,third}_update with predict_x0=True)."""
    a_t, sg_t, l_t = sv.coeffs(t)
    _, sg_s, l_s = sv.coeffs(s)
    h = l_t - l_s
    phi_1 = math.expm1(-h)
    m_s = sv.x0(x, s)
    if not mids:
        return (sg_t / sg_s) * x - a_t * phi_1 * m_s
    a_1, sg_1, l_1 = sv.coeffs(mids[0])
    r1 = (l_1 - l_s) / h
    x_1 = (sg_1 / sg_s) * x - a_1 * math.expm1(-r1 * h) * m_s
    m_1 = sv.x0(x_1, mids[0])
    if len(mids) == 1:
        return (sg_t / sg_s) * x - a_t * phi_1 * m_s - (0.5 / r1) * a_t * phi_1 * (m_1 - m_s)
    a_2, sg_2, l_2 = sv.coeffs(mids[1])
    r2 = (l_2 - l_s) / h
    phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
    x_2 = ((sg_2 / sg_s) * x - a_2 * math.expm1(-r2 * h) * m_s
           + (r2 / r1) * a_2 * phi_22 * (m_1 - m_s))
    m_2 = sv.x0(x_2, mids[1])
    phi_2 = phi_1 / h + 1.0
    return (sg_t / sg_s) * x - a_t * phi_1 * m_s + (1.0 / r2) * a_t * phi_2 * (m_2 - m_s)


def dpm_solver_fast_orders(num_steps: int, order: int = 3) -> list[int]:
    """Orders of DPM-Solver-fast's steps, summing to num_steps model calls
    (``get_time_steps_for_dpm_solver_fast``; order 1: all first-order)."""
    if order == 3:
        K = num_steps // 3 + 1
        if num_steps % 3 == 0:
            return [3] * (K - 2) + [2, 1]
        return [3] * (K - 1) + [num_steps % 3]
    if order == 2:
        return [2] * (num_steps // 2) + [1] * (num_steps % 2)
    if order == 1:
        return [1] * num_steps
    raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}.")


def dpm_solver_fast_sample(eps_fn: EpsFn, x: Tensor, schedule: DiscreteVPSchedule,
                           num_steps: int, *, order: int = 3, skip_type: str = "time_uniform",
                           t_start: float = 1.0, t_end: float | None = None) -> Tensor:
    """DiMR's sampler: ``DPM_Solver(predict_x0=True).sample(method='fast', order=3,
    skip_type='time_uniform', eps=1/N, T=1)``.

    The grid has num_steps + 1 points; each singlestep update of order o
    (``dpm_solver_fast_orders``) spans o grid intervals and evaluates the model at the o points
    it starts on, so NFE = num_steps. x (B, ...) is the state at t_start; float64 inside, x's
    dtype out.
    """
    grid = time_grid(schedule, num_steps, t_start=t_start, t_end=t_end,
                     skip_type=skip_type).tolist()
    sv, dtype, x = _Solver(eps_fn, schedule), x.dtype, x.double()
    i = 0
    for o in dpm_solver_fast_orders(num_steps, order):
        x = _singlestep(sv, x, grid[i], grid[i + 1:i + o], grid[i + o])
        i += o
    return x.to(dtype)


def _multistep(sv: _Solver, x: Tensor, ms: list[Tensor], ts: list[float], t: float) -> Tensor:
    """DPM-Solver++ multistep update of order len(ms) from ts[-1] to t (official
    dpm_multistep_{second,third}_update, predict_x0=True, solver_type 'dpm_solver')."""
    a_t, sg_t, l_t = sv.coeffs(t)
    _, sg_0, l_0 = sv.coeffs(ts[-1])
    h = l_t - l_0
    em = math.expm1(-h)  # exp(-h) - 1
    x_t = (sg_t / sg_0) * x - a_t * em * ms[-1]
    if len(ms) == 1:
        return x_t
    l_1 = sv.coeffs(ts[-2])[2]
    r0 = (l_0 - l_1) / h
    d1_0 = (ms[-1] - ms[-2]) / r0
    if len(ms) == 2:
        return x_t - 0.5 * a_t * em * d1_0
    l_2 = sv.coeffs(ts[-3])[2]
    r1 = (l_1 - l_2) / h
    d1_1 = (ms[-2] - ms[-3]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return x_t + a_t * (em / h + 1.0) * d1 - a_t * ((em + h) / h**2 - 0.5) * d2


def dpm_solver_multistep_sample(eps_fn: EpsFn, x: Tensor, schedule: DiscreteVPSchedule,
                                num_steps: int, *, order: int = 2,
                                skip_type: str = "time_uniform", t_start: float = 1.0,
                                t_end: float | None = None) -> Tensor:
    """DPM-Solver++(order M) multistep: one model call per step (the last step none); the first
    order - 1 steps warm up with lower orders (official ``method='multistep'``)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}.")
    grid = time_grid(schedule, num_steps, t_start=t_start, t_end=t_end,
                     skip_type=skip_type).tolist()
    sv, dtype, x = _Solver(eps_fn, schedule), x.dtype, x.double()
    ms, ts = [sv.x0(x, grid[0])], [grid[0]]
    for step in range(1, num_steps + 1):
        o = min(order, step)
        x = _multistep(sv, x, ms[-o:], ts[-o:], grid[step])
        if step < num_steps:
            ms, ts = (ms + [sv.x0(x, grid[step])])[-order:], (ts + [grid[step]])[-order:]
    return x.to(dtype)


def ddim_sample(eps_fn: EpsFn, x: Tensor, schedule: DiscreteVPSchedule, num_steps: int, *,
                skip_type: str = "time_uniform", t_start: float = 1.0,
                t_end: float | None = None) -> Tensor:
    """Deterministic DDIM (eta 0) = DPM-Solver++ order 1:
    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) x0(x_s, s)."""
    return dpm_solver_multistep_sample(eps_fn, x, schedule, num_steps, order=1,
                                       skip_type=skip_type, t_start=t_start, t_end=t_end)


def euler_sample(eps_fn: EpsFn, x: Tensor, schedule: DiscreteVPSchedule, num_steps: int, *,
                 skip_type: str = "time_uniform", t_start: float = 1.0,
                 t_end: float | None = None) -> Tensor:
    """Plain Euler on the probability-flow ODE in lambda: dx/dlambda = sigma^2 x - sigma eps
    (from x_t = alpha x0 + sigma eps, dlog(alpha)/dlambda = sigma^2), over the same time grid."""
    grid = time_grid(schedule, num_steps, t_start=t_start, t_end=t_end,
                     skip_type=skip_type).tolist()
    sv, dtype, x = _Solver(eps_fn, schedule), x.dtype, x.double()
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        _, sg, lam = sv.coeffs(t_cur)
        x = x + (sv.coeffs(t_next)[2] - lam) * (sg * sg * x - sg * sv.eps(x, t_cur))
    return x.to(dtype)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "dpm_solver": dpm_solver_fast_sample,
    "dpm_solver_multistep": dpm_solver_multistep_sample,
    "ddim": ddim_sample,
    "euler": euler_sample,
}


@torch.no_grad()
def sample(model: DiMR, labels_B: Tensor, *, num_steps: int = 250, method: str = "dpm_solver",
           order: int | None = None, skip_type: str = "time_uniform", cfg_scale: float = 0.0,
           cfg_scale_pow: float | None = None, attention: str = "dense",
           grat_groups: Sequence[int] = GRAT_GROUPS, grat_variant: str = "criss_cross",
           grat_radius: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Class-conditional latents from noise (eval.py sample_z / cfg_nnet / model_fn).

    method: 'dpm_solver' (official: DPM-Solver++ fast, order 3, 250 steps), 'dpm_solver_multistep'
    (DPM-Solver++ 2M by default), 'ddim', 'euler'; ``order`` overrides the DPM-Solver order.
    Guidance uses the finest output: U-ViT convention eps = eps_c + s (eps_c - eps_u) (s =
    cfg_scale, 0 = none; the released s = 0.4 is DiT's 1.4); with ``cfg_scale_pow`` the official
    decayed DiT form eps_u + s_n (eps_c - eps_u), s_n = 1 + (s - 1)(1 - cos((1 - n/N)^pow pi)) / 2.
    Cond and null-class halves run as one stacked batch. Eval mode (restored afterwards).

    ``attention="grat"`` (training-free; see the module docstring) runs every Transformer stage's
    self-attention as GRAT on its g x g token grid (groups ``grat_groups`` (gh, gw) tokens, each
    dividing g; ``grat_variant`` "criss_cross" = GRAT-X, official, or "block" = GRAT-B with
    ``grat_radius`` groups); the class token stays dense. "dense" (default) is training's.

    Returns latents (B, C, H, W) in the scaled latent space (divide by scale_factor to decode).
    """
    if method not in SAMPLERS:
        raise ValueError(f"DiMR sampler method {method!r} not known; known: {', '.join(SAMPLERS)}.")
    if cfg_scale_pow is not None and cfg_scale < 1.0:
        raise ValueError(f"cfg_scale_pow (DiT-style decay) needs cfg_scale >= 1, got {cfg_scale}.")
    cfg = model.config
    options = inference_attention_by_stage(cfg, attention, groups=grat_groups,
                                           variant=grat_variant, radius=grat_radius)
    was_training = model.training
    model.eval()
    B, dev = labels_B.shape[0], labels_B.device
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator,
                    device=dev)
    null_B = torch.full_like(labels_B, model.null_class_id)
    guided = cfg_scale != 0.0 or cfg_scale_pow is not None
    labels_in = torch.cat([labels_B, null_B]) if guided else labels_B

    def eps_fn(x_B: Tensor, t_B: Tensor) -> Tensor:
        x_in = torch.cat([x_B, x_B]) if guided else x_B
        code = time_code(t_B.repeat(2) if guided else t_B).to(dev)
        eps = model(x_in.float(), code, labels_in)[-1].double()
        if not guided:
            return eps
        c, u = eps.chunk(2)
        if cfg_scale_pow is None:
            return c + cfg_scale * (c - u)
        s = power_cosine_guidance(1.0 - float(t_B[0]), 1.0, cfg_scale, cfg_scale_pow, start=1.0)
        return u + s * (c - u)

    kwargs: dict[str, Any] = {"skip_type": skip_type}
    if order is not None and method.startswith("dpm_solver"):
        kwargs["order"] = order
    try:
        with inference_attention(model, options):
            return SAMPLERS[method](eps_fn, x, model.schedule, num_steps, **kwargs).float()
    finally:
        model.train(was_training)


SPEC = FamilySpec(
    name="dimr", role="generator", config_class=DiMRConfig, sizes=DIMR_SIZES, model_class=DiMR,
    data="latents", data_fields=("in_channels", "input_size", "num_classes", "scale_factor"),
    loss=dimr_loss, conditioning="labels", sampler=sample, output="latents",
    sampling=DIMR_SAMPLING, param_groups=optimizer_param_groups,
    summary="DiMR: multi-resolution diffusion (Transformer -> ConvNeXt stages) with TD-LN",
)
