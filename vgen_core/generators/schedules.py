"""Schedules of the generator samplers and losses, each written once and tested alone.

Mask ratio (fraction of tokens masked at progress r in [0, 1]; 1 at r = 0, 0 at r = 1):
    arccos  arccos(r) / (pi/2)     MaskGIT / MaskGen / MaskBit training and re-masking
    cosine  cos(r pi/2)            MaskGIT's `mask_schedule` option
    linear  1 - r
`remask_count` turns the arccos schedule into the number of tokens left masked after a step.

Classifier-free guidance scale s at `step` of `steps` (progress step / steps), all starting at
`start` (1 for logits = u + s (c - u); 0 for MaskBit's logits = c + s (c - u)) and ending at
`scale`:
    constant      scale
    linear        start + (scale - start) step / steps           BAR, xAR, MaskGen "linear"
    power_cosine  start + (scale - start) (1 - cos((step / steps)^p pi)) / 2
                                                                 RAR, MaskBit, MaskGen "cosine"
`maskgit_guidance` is the TiTok MaskGIT sampler's choice among the three (official
`ImageBert.generate`: "constant", "linear" with start 0, "power-cosine" with start 1).

Temperatures at progress r (MaskGIT-style confidence samplers):
    gumbel_temperature    t (1 - r)         Gumbel noise on samples and confidences
    softmax_temperature   a + b (1 - r)     MaskGen's logits / (0.5 + 0.8 (1 - r))

The formulas are evaluated in the operation order the families always used, so every family's
samples are bit-identical to its pre-refactor ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import overload

import torch
from torch import Tensor

__all__ = [
    "GUIDANCE_SCHEDULES",
    "MASKGIT_GUIDANCE_DECAYS",
    "MASK_SCHEDULES",
    "arccos_mask_ratio",
    "constant_guidance",
    "cosine_mask_ratio",
    "guidance",
    "gumbel_temperature",
    "linear_guidance",
    "linear_mask_ratio",
    "mask_ratio",
    "maskgit_guidance",
    "power_cosine_guidance",
    "remask_count",
    "softmax_temperature",
]

# --------------------------------------------------------------------------------------------------
# Mask ratio
# --------------------------------------------------------------------------------------------------


def _clamp01(r: float) -> float:
    return min(max(float(r), 0.0), 1.0)


@overload
def arccos_mask_ratio(r: float) -> float: ...
@overload
def arccos_mask_ratio(r: Tensor) -> Tensor: ...
@overload
def arccos_mask_ratio(r: float | Tensor) -> float | Tensor: ...
def arccos_mask_ratio(r: float | Tensor) -> float | Tensor:
    """Arccos mask schedule: fraction of tokens masked at progress r in [0, 1], arccos(r) / (pi/2).

    1 at r = 0 (all masked), 0 at r = 1. Accepts a float or a tensor (returns the same kind).
    """
    if isinstance(r, Tensor):
        return torch.arccos(r.clamp(0.0, 1.0)) / (math.pi / 2)
    return math.acos(_clamp01(r)) / (math.pi / 2)


@overload
def cosine_mask_ratio(r: float) -> float: ...
@overload
def cosine_mask_ratio(r: Tensor) -> Tensor: ...
@overload
def cosine_mask_ratio(r: float | Tensor) -> float | Tensor: ...
def cosine_mask_ratio(r: float | Tensor) -> float | Tensor:
    """Cosine mask schedule cos(r pi/2) (r clamped to [0, 1]); float or tensor in, same out."""
    if isinstance(r, Tensor):
        return torch.cos(r.clamp(0.0, 1.0) * (math.pi / 2))
    return math.cos(_clamp01(r) * (math.pi / 2))


@overload
def linear_mask_ratio(r: float) -> float: ...
@overload
def linear_mask_ratio(r: Tensor) -> Tensor: ...
@overload
def linear_mask_ratio(r: float | Tensor) -> float | Tensor: ...
def linear_mask_ratio(r: float | Tensor) -> float | Tensor:
    """Linear mask schedule 1 - r (r clamped to [0, 1]); float or tensor in, same out."""
    if isinstance(r, Tensor):
        return 1.0 - r.clamp(0.0, 1.0)
    return 1.0 - _clamp01(r)


MASK_SCHEDULES: dict[str, Callable[[float | Tensor], float | Tensor]] = {
    "arccos": arccos_mask_ratio,
    "cosine": cosine_mask_ratio,
    "linear": linear_mask_ratio,
}


def mask_ratio(name: str, r: float | Tensor) -> float | Tensor:
    """The `name` mask schedule ("arccos", "cosine", "linear") at progress r."""
    if name not in MASK_SCHEDULES:
        raise ValueError(f"mask schedule '{name}' not found; known: {', '.join(MASK_SCHEDULES)}.")
    return MASK_SCHEDULES[name](r)


def remask_count(step: int, steps: int, seq_len: int, num_masked: int) -> int:
    """Tokens left masked after sampling step `step` (0-based).

    floor(L * arccos((step + 1) / N) / (pi/2)), clamped to [1, num_masked - 1] so every step
    commits at least one token (official ImageBert).
    """
    target = math.floor(seq_len * arccos_mask_ratio((step + 1) / steps))
    return max(1, min(num_masked - 1, target))


# --------------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------------


def constant_guidance(step: float, steps: float, scale: float) -> float:
    """scale at every step."""
    return float(scale)


def linear_guidance(step: float, steps: float, scale: float, *, start: float = 1.0) -> float:
    """start + (scale - start) * step / steps: `start` at step 0, `scale` at step = steps.

    Evaluated as (scale - start) * step / steps + start; pass (r, 1.0) to ramp on a precomputed
    progress r (MaskGen).
    """
    return (scale - start) * step / steps + start


def power_cosine_guidance(
    step: float, steps: float, scale: float, power: float = 1.0, *, start: float = 1.0
) -> float:
    """start + (scale - start) * (1 - cos((step / steps)^power * pi)) / 2.

    `start` at step 0, `scale` at step = steps (MDT schedule: RAR with start 1 and
    logits = u + s (c - u); MaskBit with start 0 and logits = c + s (c - u)).
    """
    ramp = (1.0 - math.cos(((step / steps) ** power) * math.pi)) / 2.0
    return (scale - start) * ramp + start


GUIDANCE_SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant_guidance,
    "linear": linear_guidance,
    "power_cosine": power_cosine_guidance,
}


def guidance(name: str, step: float, steps: float, scale: float, **options: float) -> float:
    """The `name` guidance schedule ("constant", "linear", "power_cosine") at step of steps."""
    if name not in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"guidance schedule '{name}' not found; known: {', '.join(GUIDANCE_SCHEDULES)}."
        )
    return GUIDANCE_SCHEDULES[name](step, steps, scale, **options)


MASKGIT_GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")


def maskgit_guidance(
    step: int, steps: int, scale: float, decay: str = "constant", power: float = 3.0
) -> float:
    """Guidance scale s_t of TiTok's MaskGIT sampler at step t (0-based) of N.

    Source: bytedance/1d-tokenizer `modeling/maskgit.py`, `ImageBert.generate` (guidance_decay,
    guidance_scale_pow):
      constant      s_t = g                                      logits = c + s_t (c - u)
      linear        s_0 = 0, then s_t = (t / N) * g                  logits = c + s_t (c - u)
                    (`cfg_scale = ratio * guidance_scale` after step t - 1, ratio = t / N;
                    s_0 = 0 runs the conditional pass alone)
      power-cosine  s_t = (g - 1) * (1 - cos((t / N)^p pi)) / 2 + 1  logits = u + s_t (c - u)
                    (MDT schedule; 1 at t = 0, below g at the last step t = N - 1)
    `decay` also takes "power_cosine". The official code evaluates the power-cosine ramp in
    float32 tensors; this is the float64 value of the same expression.
    """
    if decay == "constant":
        return constant_guidance(step, steps, scale)
    if decay == "linear":
        # (scale - 0) * (t / N) / 1 + 0 == (t / N) * scale exactly, the official operation order.
        return linear_guidance(step / steps, 1.0, scale, start=0.0)
    if decay in ("power-cosine", "power_cosine"):
        return power_cosine_guidance(step, steps, scale, power, start=1.0)
    raise ValueError(
        f"maskgit_guidance: decay must be one of {', '.join(MASKGIT_GUIDANCE_DECAYS)}, "
        f"got {decay!r}."
    )


# --------------------------------------------------------------------------------------------------
# Temperature annealing
# --------------------------------------------------------------------------------------------------


def gumbel_temperature(r: float, temperature: float) -> float:
    """Gumbel-noise temperature temperature * (1 - r) at progress r (annealed to 0 at r = 1)."""
    return temperature * (1.0 - r)


def softmax_temperature(r: float, base: float = 0.5, span: float = 0.8) -> float:
    """Softmax temperature base + span * (1 - r) at progress r (MaskGen: 1.3 -> 0.5).

    MaskGen and TiTok MaskGIT (`softmax_temperature_annealing`, official `modeling/maskgit.py`
    `ImageBert.generate`: logits / (0.5 + 0.8 * (1 - ratio)), ratio = (t + 1) / N).
    """
    return base + span * (1.0 - r)
