"""Rectified-flow core shared by xAR, DeepFlow and FlowTok: path, target, t samplers, samplers.

Spec: methods.md §7 ("one rectified-flow trainer"), §2.6, §2.7, §2.9. Reference:
ByteDance-Seed/DeepFlow `loss.py` (DFLoss.interpolant, the "lognormal" t), `samplers.py`
(`deepflow_euler_maruyama_sampler`, `get_score_from_velocity`), `models/blocks.py`
(TimestepEmbedder); OliverRensu/xAR `models/xar.py` (`sample_logit_normal`, `sample_tokens`).

Convention (all three methods): t = 0 is data, t = 1 is the source (Gaussian noise; FlowTok's
text latent takes the noise's place):

    x_t = (1 - t) x + t eps,        v = dx_t/dt = eps - x.

Samplers integrate from t = 1 down to t = 0 over a given decreasing t grid.

Velocity-function contract used by both samplers: `velocity_fn(x_N..., t_N) -> v_N...`. Without
guidance N = B. When classifier-free guidance is active the sampler calls it once on the batch
stacked twice, [x; x] with N = 2B, and expects the conditional velocity in the first half and the
unconditional one in the second half (the official samplers' `torch.cat([x] * 2)` with labels
`[y, y_null]`); the sampler then forms v = v_u + s (v_c - v_u).

Shape legend: B batch, N = B or 2B (guided), Z latent channels, h/w latent grid, F frequency dims,
D hidden width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vgen_core.generators.common import linear_at
from vgen_core.tokenizers.kl_vae import sample_diag_gaussian, split_moments

__all__ = [
    "TimestepEmbedder",
    "VelocityFn",
    "cfg_combine",
    "euler_maruyama_sample",
    "euler_sample",
    "expand_t",
    "flow_path",
    "flow_target",
    "latents_from_moments",
    "logit_normal_t",
    "lognormal_t",
    "ode_time_grid",
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
