"""Rectified-flow core shared by xAR, DeepFlow and FlowTok: path, target, t samplers, samplers,
plus two add-ons for flow transformers: REPA (representation alignment) and GRAT at sampling.

Spec: methods.md §7 ("one rectified-flow trainer"), §2.6, §2.7, §2.9, §6 (GRAT). Reference:
ByteDance-Seed/DeepFlow @be34b20 `loss.py` (DFLoss.interpolant, the "lognormal" t, the REPA
`proj_loss`), `models/deepflow.py` (`build_mlp_projection`), `utils/repa_utils.py`
(`preprocess_raw_image`), `samplers.py` (`deepflow_euler_maruyama_sampler`,
`get_score_from_velocity`), `models/blocks.py` (TimestepEmbedder); OliverRensu/xAR
`models/xar.py` (`sample_logit_normal`, `sample_tokens`); OliverRensu/GRAT @7afc1f9 `main.py`
(group sizes) and `cross_processor.py` (mask; the kernel lives in `kernels.grat`).

Convention (all three methods): t = 0 is data, t = 1 is the source (Gaussian noise; FlowTok's
text latent takes the noise's place):

    x_t = (1 - t) x + t eps,        v = dx_t/dt = eps - x.

Samplers integrate from t = 1 down to t = 0 over a given decreasing t grid.

Velocity-function contract used by both samplers: `velocity_fn(x_N..., t_N) -> v_N...`. Without
guidance N = B. When classifier-free guidance is active the sampler calls it once on the batch
stacked twice, [x; x] with N = 2B, and expects the conditional velocity in the first half and the
unconditional one in the second half (the official samplers' `torch.cat([x] * 2)` with labels
`[y, y_null]`); the sampler then forms v = v_u + s (v_c - v_u).

REPA (`repa_*`): a projector MLP maps the hidden tokens after a chosen block to the width of a
frozen encoder's patch features of the clean image; the loss adds coeff x mean(-cos). GRAT
(`inference_attention_options`): the options that switch a model's self-attention to
`kernels.grat` while sampling; training keeps dense attention. `grat_token_mask` gives the same
pattern as a dense bool mask, for models whose attention already has a mask that the kernel cannot
take (xAR's block-causal one): they intersect the two and run masked SDPA.

Shape legend: B batch, N = B or 2B (guided), Z latent channels, h/w latent grid, F frequency dims,
D hidden width, T model tokens, E encoder feature width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgen_core.generators.common import linear_at
from vgen_core.tokenizers.kl_vae import AutoencoderKL, sample_diag_gaussian, split_moments

__all__ = [
    "ATTENTION_MODES",
    "GRAT_GROUPS",
    "TimestepEmbedder",
    "VelocityFn",
    "cfg_combine",
    "euler_maruyama_sample",
    "euler_sample",
    "expand_t",
    "flow_path",
    "flow_target",
    "grat_token_mask",
    "inference_attention_options",
    "latents_from_moments",
    "load_repa_decoder",
    "load_repa_encoder",
    "logit_normal_t",
    "lognormal_t",
    "ode_time_grid",
    "repa_loss",
    "repa_projector",
    "repa_target_features",
    "score_from_velocity",
    "sde_time_grid",
    "timestep_embedding",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------
# Path, target, time samplers
# --------------------------------------------------------------------------------------------------


def expand_t(t_B: Tensor, like: Tensor) -> Tensor:
    """(B,) times -> (B, 1, ..., 1) broadcastable against `like` (B, ...)."""
    return t_B.reshape(t_B.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def flow_path(x: Tensor, noise: Tensor, t_B: Tensor) -> Tensor:
    """x_t = (1 - t) x + t noise, with t (B,) broadcast over the remaining dims of x (B, ...)."""
    t = expand_t(t_B, x)
    return (1.0 - t) * x + t * noise


def flow_target(x: Tensor, noise: Tensor) -> Tensor:
    """Velocity target v = dx_t/dt = noise - x (independent of t for the linear path)."""
    return noise - x


def logit_normal_t(
    n: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """t = sigmoid(u), u ~ N(mean, std^2): (n,) float32 in (0, 1); median sigmoid(mean).

    xAR `sample_logit_normal(mu=0, sigma=1)` (one t per cell).
    """
    u = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(mean + std * u)


def lognormal_t(
    n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """DeepFlow's "lognormal" weighting: t = sigma / (1 + sigma), sigma = exp(u), u ~ N(0, 1).

    sigma / (1 + sigma) = 1 / (1 + e^-u) = sigmoid(u): the same law as `logit_normal_t(0, 1)`, and
    with the same generator state the same numbers (DeepFlow `loss.py`, path_type "linear").
    """
    sigma = torch.randn(n, generator=generator, device=device).exp()
    return sigma / (1.0 + sigma)


def sde_time_grid(num_steps: int, t_min: float = 0.04) -> Tensor:
    """[linspace(1, t_min, num_steps), 0] in float64: num_steps + 1 points, num_steps model calls.

    The grid of DeepFlow's `deepflow_euler_maruyama_sampler` and xAR's per-cell sampler.
    """
    if num_steps < 1:
        raise ValueError(f"sde_time_grid: num_steps must be >= 1, got {num_steps}.")
    if not 0.0 < t_min <= 1.0:
        raise ValueError(f"sde_time_grid: t_min must be in (0, 1], got {t_min}.")
    grid = torch.linspace(1.0, t_min, num_steps, dtype=torch.float64)
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def ode_time_grid(num_steps: int) -> Tensor:
    """linspace(1, 0, num_steps + 1) in float64 (uniform Euler steps)."""
    if num_steps < 1:
        raise ValueError(f"ode_time_grid: num_steps must be >= 1, got {num_steps}.")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def latents_from_moments(
    moments_B2Zhw: Tensor, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """Cached VAE moments (B, 2Z, h, w) = mean || logvar -> scale * z, z ~ N(mean, exp(logvar)).

    The train-time step of MAR/xAR `main_cache.py` and DeepFlow `sample_posterior` (methods.md
    §1.6, §1.7 (c)); logvar is clamped to [-30, 20] as in LDM. Works for any (B, 2Z, ...) layout.
    """
    if moments_B2Zhw.shape[1] % 2:
        raise ValueError(
            f"latents_from_moments: dim 1 holds mean || logvar and must be even, got "
            f"{tuple(moments_B2Zhw.shape)}."
        )
    mean, logvar = split_moments(moments_B2Zhw)
    return sample_diag_gaussian(mean, logvar, generator) * scale


# --------------------------------------------------------------------------------------------------
# Time embedding
# --------------------------------------------------------------------------------------------------


def timestep_embedding(t_B: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)): (B, dim)."""
    half = dim // 2
    freqs_F = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
    )
    args_BF = t_B[:, None].float() * freqs_F[None]
    emb = torch.cat([torch.cos(args_BF), torch.sin(args_BF)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """DiT/SiT timestep embedder: sinusoid (256 freqs) -> Linear -> SiLU -> Linear -> (B, D).

    Callers choose the input scale: SiT/DeepFlow feed t in [0, 1], xAR feeds floor(1000 t).
    """

    def __init__(self, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, t_B: Tensor) -> Tensor:
        dtype = linear_at(self.mlp, 0).weight.dtype
        emb = timestep_embedding(t_B, self.frequency_dim).to(dtype)
        return self.mlp(emb)


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: v_u + s (v_c - v_u) (s = 1 gives v_c)."""
    return v_uncond + scale * (v_cond - v_uncond)


def score_from_velocity(v: Tensor, x_t: Tensor, t_B: Tensor) -> Tensor:
    """Score of p_t from the velocity for the linear path: -(x_t + (1 - t) v) / t.

    DeepFlow `get_score_from_velocity` (linear): alpha = 1 - t, sigma = t,
    var = sigma^2 - (alpha / alpha') sigma' sigma = t, score = ((alpha / alpha') v - x) / var.
    """
    t = expand_t(t_B, x_t)
    return -(x_t + (1.0 - t) * v) / t


def _check_grid(t_grid: Tensor) -> Tensor:
    t_grid = torch.as_tensor(t_grid, dtype=torch.float64).flatten()
    if t_grid.numel() < 2 or not bool((t_grid[1:] < t_grid[:-1]).all()):
        raise ValueError(
            f"sampler: t_grid must hold >= 2 strictly decreasing times (1 -> 0), got "
            f"{t_grid.tolist()[:8]}."
        )
    return t_grid


def _velocity(
    velocity_fn: VelocityFn,
    x: Tensor,
    t: float,
    dtype: torch.dtype,
    cfg_scale: float,
    guidance_interval: tuple[float, float],
) -> Tensor:
    """v at (x, t) in x's (float64) dtype, guided when cfg_scale != 1 and t is in the interval."""
    lo, hi = guidance_interval
    guided = cfg_scale != 1.0 and lo <= t <= hi
    x_in = torch.cat([x, x]) if guided else x
    t_N = torch.full((x_in.shape[0],), t, dtype=dtype, device=x.device)
    v = velocity_fn(x_in.to(dtype), t_N).to(x.dtype)
    if guided:
        v_cond, v_uncond = v.chunk(2)
        v = cfg_combine(v_cond, v_uncond, cfg_scale)
    return v


def euler_sample(
    velocity_fn: VelocityFn,
    x: Tensor,
    t_grid: Tensor,
    *,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Euler ODE: x <- x + (t_next - t_cur) v(x, t_cur) over consecutive grid points.

    Integrates in float64 and returns x's dtype. Exact for a velocity field constant in x and t.
    An increasing grid is refused; to run a flow backwards (FlowTok image -> text), integrate
    s = 1 - t with velocity -v(x, 1 - s) (see `vgen_core.generators.flowtok.reverse_sample`).

    Args:
        velocity_fn: see the module docstring (called with x in x's dtype and t (N,)).
        x: the state at t_grid[0] (noise, or FlowTok's text latent), any shape (B, ...).
        t_grid: strictly decreasing times, e.g. `ode_time_grid(n)` or `sde_time_grid(n)`.
    """
    t_grid = _check_grid(t_grid)
    dtype, x = x.dtype, x.to(torch.float64)
    for t_cur, t_next in zip(t_grid[:-1].tolist(), t_grid[1:].tolist()):
        v = _velocity(velocity_fn, x, t_cur, dtype, cfg_scale, guidance_interval)
        x = x + (t_next - t_cur) * v
    return x.to(dtype)


def euler_maruyama_sample(
    velocity_fn: VelocityFn,
    x: Tensor,
    t_grid: Tensor,
    *,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler-Maruyama on the reverse SDE with diffusion g^2 = 2t (SiT / REPA / DeepFlow sampler).

    Per step (dt = t_next - t_cur < 0), with guidance applied to v (the same as applying it to the
    drift, which is affine in v with the same x):
        s = -(x + (1 - t) v) / t                       (score_from_velocity)
        d = v - 0.5 g^2 s = (2 - t) v + x
        x <- x + d dt + sqrt(2 t) sqrt(|dt|) xi,  xi ~ N(0, I) from `generator`
    The last step (to t_grid[-1], 0 on `sde_time_grid`) takes the mean only, no noise. Every
    evaluated t must be > 0 (the score divides by t). Float64 state, returned in x's dtype.
    """
    t_grid = _check_grid(t_grid)
    if float(t_grid[-2]) <= 0.0:
        raise ValueError("euler_maruyama_sample: every evaluated t (all but the last) must be > 0.")
    dtype, x = x.dtype, x.to(torch.float64)
    steps = list(zip(t_grid[:-1].tolist(), t_grid[1:].tolist()))
    for i, (t_cur, t_next) in enumerate(steps):
        dt = t_next - t_cur
        v = _velocity(velocity_fn, x, t_cur, dtype, cfg_scale, guidance_interval)
        t_B = torch.full((x.shape[0],), t_cur, dtype=torch.float64, device=x.device)
        drift = v - t_cur * score_from_velocity(v, x, t_B)
        x = x + drift * dt
        if i < len(steps) - 1:
            xi = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)
            x = x + math.sqrt(2.0 * t_cur) * math.sqrt(abs(dt)) * xi.to(torch.float64)
    return x.to(dtype)


# --------------------------------------------------------------------------------------------------
# REPA: align an intermediate hidden state with a frozen encoder's features of the clean image
# --------------------------------------------------------------------------------------------------


def repa_projector(hidden: int, width: int, z_dim: int) -> nn.Sequential:
    """DeepFlow `build_mlp_projection`: Linear(D, P) SiLU Linear(P, P) SiLU Linear(P, E).

    Applied token-wise to (B, T, D) hidden states; E is the encoder's feature width.
    """
    return nn.Sequential(
        nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
        nn.Linear(width, z_dim),
    )  # fmt: skip


def repa_loss(projections: Sequence[Tensor], target_BTE: Tensor) -> Tensor:
    """REPA term: the mean over projections k, samples b and tokens n of -cos(z~_k[b, n], z[b, n]).

    DeepFlow `loss.py` (`proj_loss`): every projection (one per branch split) is compared with
    the same encoder features; per sample the negative cosine is averaged over tokens, then
    summed and divided by (number of projections x batch). In [-1, 1]; -1 = perfectly aligned.
    """
    if not projections:
        raise ValueError("repa_loss: no projections (the model has no REPA projectors).")
    z = F.normalize(target_BTE.float(), dim=-1)
    terms = []
    for z_tilde in projections:
        if z_tilde.shape != target_BTE.shape:
            raise ValueError(
                f"repa_loss: projection {tuple(z_tilde.shape)} does not match the encoder "
                f"features {tuple(target_BTE.shape)}; set the model's z_dim to the encoder's width."
            )
        terms.append(-(F.normalize(z_tilde.float(), dim=-1) * z).sum(-1).mean())
    return torch.stack(terms).mean()


@functools.lru_cache(maxsize=4)
def load_repa_encoder(source: str, size: str = "dinov3-vitb16") -> nn.Module:
    """The frozen encoder REPA aligns to, cached per process (weights read once).

    source: "tiny" (the seeded tiny `vfm_vit`: random but fixed features, for tests and demos) or
    a local `.safetensors` of a DINOv3-style ViT (the `vfm_vit` family, `deltatok.load_vfm`;
    transformers or Meta names) of registered size `size`. Images (B, 3, H, W) in [0, 1] ->
    patch tokens after the final norm (B, N, E), as DINOv2's `x_norm_patchtokens` in the
    official code.
    """
    from vgen_core.tokenizers.deltatok import load_vfm, vfm_config

    if source == "tiny":
        return vfm_config("tiny").build()
    return load_vfm(source, vfm_config(size)).requires_grad_(False).eval()


@functools.lru_cache(maxsize=4)
def load_repa_decoder(source: str, size: str = "sd-vae-f8c4") -> AutoencoderKL:
    """Frozen KL-VAE decoder turning cached latents back into images for REPA, cached per process.

    source: "tiny" (the seeded tiny `kl_vae`, 8x8x4 latents <-> 16x16 images; tests) or a local
    `.safetensors` of the VAE that made the latents (`kl_vae.load_official`, size `size`;
    DeepFlow's is `stabilityai/sd-vae-ft-ema` = "sd-vae-f8c4").
    """
    from vgen_core.tokenizers.kl_vae import kl_vae_config, load_official

    if source == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = kl_vae_config("tiny").build()
    else:
        vae = load_official(source, size)
    return vae.requires_grad_(False).eval()


def repa_target_features(encoder: Callable[[Tensor], Tensor], images: Tensor, grid: int) -> Tensor:
    """Frozen-encoder features of clean images, one per model token: (B, grid * grid, E).

    images: uint8 (B, H, W, 3) (the `images` data kind) or float (B, 3, H, W) in [0, 1]. When the
    encoder has a `config.patch_size` p they are resized (bicubic) to grid * p pixels so its patch
    tokens match the model's (grid x grid) tokens one to one, as the official
    `preprocess_raw_image` resizes 256 px to 224 for DINOv2's 14-pixel patches (16 x 16 tokens).
    Runs without gradients.
    """
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float() / 255.0
    patch = getattr(getattr(encoder, "config", None), "patch_size", None)
    with torch.no_grad():
        if patch is not None and images.shape[-2:] != (grid * patch, grid * patch):
            images = F.interpolate(images.float(), size=(grid * patch, grid * patch),
                                   mode="bicubic", align_corners=False)
        feats = encoder(images.float())
    if feats.ndim != 3 or feats.shape[1] != grid * grid:
        raise ValueError(
            f"REPA encoder gave features {tuple(feats.shape)} but the model has {grid}x{grid} "
            "tokens; it must return patch tokens (B, N, E) with N = the model's token count."
        )
    return feats.float()


# --------------------------------------------------------------------------------------------------
# Attention at sampling time: dense (training's) or GRAT (kernels.grat)
# --------------------------------------------------------------------------------------------------

#: the sampler's `attention` choices; training always runs "dense"
ATTENTION_MODES = ("dense", "grat")
#: GRAT group (gh, gw) in tokens: the spatial groups of the official run (OliverRensu/GRAT
#: `main.py`: group_t, group_h, group_w = 4, 8, 8); images have no time axis (gt = 1)
GRAT_GROUPS = (8, 8)
_GRAT_VARIANTS = {"criss_cross": "criss_cross", "grat-x": "criss_cross", "x": "criss_cross",
                  "block": "block", "grat-b": "block", "b": "block"}


def inference_attention_options(
    attention: str,
    grid_hw: tuple[int, int],
    *,
    groups: Sequence[int] = GRAT_GROUPS,
    variant: str = "criss_cross",
    radius: int = 1,
) -> dict[str, Any]:
    """`common.attention` options for a (H, W) image token grid in raster order: {} for "dense";
    for "grat" the `kernels.grat` backend with groups (gh, gw) tokens and variant "criss_cross"
    (GRAT-X: the group row and column through the query's group, the official pattern) or
    "block" (GRAT-B: groups within `radius` on both axes, from the paper). Errors name the fix.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r} is not an attention mode; known: "
                         f"{', '.join(ATTENTION_MODES)}")
    if attention == "dense":
        return {}
    if variant not in _GRAT_VARIANTS:
        raise ValueError(f"GRAT variant {variant!r} unknown; known: {', '.join(_GRAT_VARIANTS)}")
    if len(groups) != 2:
        raise ValueError(f"GRAT groups={tuple(groups)} must be two ints (gh, gw) in tokens")
    from kernels.grat.reference import make_spec  # validates; says which divisor to pick

    (H, W), (gh, gw) = grid_hw, groups
    spec = make_spec((1, H, W), (1, gh, gw), _GRAT_VARIANTS[variant], 0, None, (0, radius, radius))
    return {"backend": "grat", "grid": spec.grid, "groups": spec.groups,
            "variant": spec.variant, "radius": spec.radius}


def grat_token_mask(
    options: dict[str, Any],
    raster_index: Tensor | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """The GRAT pattern of `inference_attention_options("grat", ...)` as a dense (S, S) bool mask
    (True = query row may attend key column) over S grid tokens in the model's own order.

    raster_index: (S,) int, the raster position (row * W + col on the (H, W) grid of the
    options) of each of the model's tokens; default the raster order itself (S = H * W). Built
    from `kernels.grat.reference.grat_mask` (the specification every GRAT backend is tested
    against; grouped order) mapped back through the group permutation, so it is the pattern the
    kernel computes. For models that must intersect GRAT with a mask of their own (the kernel takes
    none) and run masked SDPA; no FLOPs are saved that way, only the pattern is applied.
    """
    if options.get("backend") != "grat":
        raise ValueError(f"grat_token_mask: options {options!r} are not GRAT options; build them "
                         "with inference_attention_options('grat', grid_hw, ...)")
    from kernels.grat.reference import grat_mask, group_permutation

    (T, H, W), (gt, gh, gw) = options["grid"], options["groups"]
    grouped = grat_mask(T, H, W, gt, gh, gw, options["variant"], radius=options["radius"],
                        device=device)
    _, inv = group_permutation(T, H, W, gt, gh, gw)  # raster position -> grouped position
    index = inv if raster_index is None else inv[raster_index.long().cpu()]
    index = index.to(grouped.device)
    return grouped[index][:, index]
