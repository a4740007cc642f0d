"""TiTok MaskGIT guidance schedules and softmax-temperature annealing.

Reference: bytedance/1d-tokenizer `modeling/maskgit.py` `ImageBert.generate` and the released
inference configs `configs/infer/TiTok/titok_{l32,b64,s128}.yaml` (+ sample_imagenet_titok.py).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from vgen_core.generators import masked
from vgen_core.generators.masked import MASKGIT_SAMPLING, maskgit_config, sample
from vgen_core.generators.schedules import maskgit_guidance, softmax_temperature


def _tiny(**overrides):
    torch.manual_seed(0)
    return maskgit_config("tiny", **overrides).build()


# --------------------------------------------------------------------------------------------------
# schedule values (hand-computed from the official formulas)
# --------------------------------------------------------------------------------------------------


def test_constant_guidance_is_flat():
    assert [maskgit_guidance(t, 8, 4.5) for t in range(8)] == [4.5] * 8
    assert maskgit_guidance(3, 8, 0.0, "constant") == 0.0


def test_linear_guidance_official_values():
    # official: cfg_scale = 0 at step 0, then ratio * g with ratio = t / N (set after step t - 1)
    assert [maskgit_guidance(t, 8, 4.5, "linear") for t in range(8)] == [
        0.0, 0.5625, 1.125, 1.6875, 2.25, 2.8125, 3.375, 3.9375
    ]
    assert [maskgit_guidance(t, 8, 3.0, "linear") for t in range(8)] == [
        0.0, 0.375, 0.75, 1.125, 1.5, 1.875, 2.25, 2.625
    ]
    # same operation order as the official (t / N) * g
    for t in range(64):
        assert maskgit_guidance(t, 64, 6.9, "linear") == (1.0 * t / 64) * 6.9


def test_power_cosine_guidance_official_values():
    # s_t = (g - 1) (1 - cos((t / N)^p pi)) / 2 + 1, g = 6.9, p = 3, N = 64 (TiTok-S-128)
    g, p, n = 6.9, 3.0, 64
    assert maskgit_guidance(0, n, g, "power-cosine", p) == 1.0
    # t = 32: (1/2)^3 = 1/8, cos(pi/8) = 0.9238795325 -> ramp 0.0380602337
    assert maskgit_guidance(32, n, g, "power-cosine", p) == pytest.approx(1.2245553791, abs=1e-9)
    # t = 48: (3/4)^3 = 0.421875, cos(0.421875 pi) = 0.2429801799 -> ramp 0.3785099100
    assert maskgit_guidance(48, n, g, "power-cosine", p) == pytest.approx(3.2332084693, abs=1e-9)
    assert maskgit_guidance(63, n, g, "power-cosine", p) == pytest.approx(6.8690538582, abs=1e-9)
    assert maskgit_guidance(n, n, g, "power-cosine", p) == pytest.approx(g, rel=1e-15)
    # p = 1 half way: ramp 1/2
    assert maskgit_guidance(1, 2, 5.0, "power_cosine", 1.0) == pytest.approx(3.0, rel=1e-15)
    for t in range(n):
        ramp = (1 - math.cos(((t / n) ** p) * math.pi)) * 1 / 2
        assert maskgit_guidance(t, n, g, "power-cosine", p) == (g - 1) * ramp + 1


def test_unknown_decay_raises():
    with pytest.raises(ValueError, match="constant, linear, power-cosine"):
        maskgit_guidance(0, 8, 3.0, "cosine")
    with pytest.raises(ValueError, match="decay must be"):
        bad: Any = "cosine"
        sample(_tiny(seq_len=4), torch.tensor([0]), guidance_decay=bad)


def test_softmax_temperature_annealing_values():
    # official: 0.5 + 0.8 * (1 - ratio), ratio = (t + 1) / N
    assert softmax_temperature(1 / 8, 0.5, 0.8) == pytest.approx(1.2, rel=1e-15)
    assert softmax_temperature(4 / 8, 0.5, 0.8) == pytest.approx(0.9, rel=1e-15)
    assert softmax_temperature(1.0, 0.5, 0.8) == 0.5
    assert softmax_temperature(0.0, 0.5, 0.8) == pytest.approx(1.3, rel=1e-15)
    for t in range(8):
        r = 1.0 * (t + 1) / 8
        assert softmax_temperature(r, 0.5, 0.8) == 0.5 + 0.8 * (1 - r)


def test_released_settings():
    assert MASKGIT_SAMPLING["titok_l32"] == {
        "steps": 8, "guidance_scale": 4.5, "guidance_decay": "linear", "guidance_scale_pow": 3.0,
        "randomize_temperature": 9.5, "softmax_temperature_annealing": True,
    }
    assert MASKGIT_SAMPLING["titok_b64"] == {
        "steps": 8, "guidance_scale": 3.0, "guidance_decay": "linear", "guidance_scale_pow": 3.0,
        "randomize_temperature": 11.0, "softmax_temperature_annealing": True,
    }
    assert MASKGIT_SAMPLING["titok_s128"] == {
        "steps": 64, "guidance_scale": 6.9, "guidance_decay": "power-cosine",
        "guidance_scale_pow": 3.0, "randomize_temperature": 2.8,
        "softmax_temperature_annealing": True,
    }
    assert masked.SPEC.sampling["B"] == MASKGIT_SAMPLING["titok_b64"]
    # the sampler's own defaults stay the training config's (constant 4.5, temperature 1.0)
    model = _tiny(seq_len=8)
    for kw in MASKGIT_SAMPLING.values():
        out = sample(model, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0), **kw)
        assert out.shape == (2, 8) and int(out.min()) >= 0 and int(out.max()) < 256


# --------------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------------

# Tokens of the sampler before guidance schedules existed (tiny model, seq_len 16, seed 123).
_BEFORE_DEFAULT = [
    [122, 64, 219, 1, 29, 118, 46, 6, 201, 4, 141, 75, 206, 129, 203, 176],
    [249, 206, 199, 6, 29, 197, 52, 15, 40, 34, 126, 62, 24, 202, 162, 176],
    [129, 47, 242, 6, 153, 92, 52, 62, 124, 6, 144, 146, 206, 17, 224, 176],
]
_BEFORE_4_STEPS = [
    [122, 239, 122, 148, 48, 105, 52, 131, 201, 4, 133, 62, 206, 208, 203, 176],
    [154, 60, 199, 59, 116, 69, 52, 6, 234, 232, 126, 177, 206, 202, 217, 176],
    [154, 29, 99, 6, 153, 69, 193, 62, 50, 92, 165, 62, 206, 17, 224, 20],
]


def test_constant_schedule_reproduces_the_former_sampler_bit_for_bit():
    model, labels = _tiny(seq_len=16), torch.tensor([0, 3, 7])
    for extra in ({}, {"guidance_decay": "constant", "softmax_temperature_annealing": False}):
        out = sample(model, labels, generator=torch.Generator().manual_seed(123), **extra)
        assert out.tolist() == _BEFORE_DEFAULT
        out = sample(model, labels, steps=4, guidance_scale=2.0, randomize_temperature=3.0,
                     generator=torch.Generator().manual_seed(123), **extra)
        assert out.tolist() == _BEFORE_4_STEPS


@pytest.mark.parametrize(
    ("decay", "g", "steps", "expected"),
    [
        ("constant", 4.5, 4, [4.5, 4.5, 4.5, 4.5]),
        ("linear", 4.5, 8, [0.0, 0.5625, 1.125, 1.6875, 2.25, 2.8125, 3.375, 3.9375]),
        ("power-cosine", 5.0, 2, [1.0, 3.0]),
    ],
)
def test_sampler_uses_the_scheduled_scale_per_step(monkeypatch, decay, g, steps, expected):
    seen: list[float] = []

    def record(*args, **kwargs):
        s = maskgit_guidance(*args, **kwargs)
        seen.append(s)
        return s

    monkeypatch.setattr(masked, "maskgit_guidance", record)
    model = _tiny(seq_len=16)
    rows: list[int] = []
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    sample(model, torch.tensor([1, 2]), steps=steps, guidance_scale=g, guidance_decay=decay,
           guidance_scale_pow=1.0, generator=torch.Generator().manual_seed(0))
    assert seen[1:] == pytest.approx(expected, rel=1e-15)  # seen[0]: the argument check
    # s = 0 (linear step 0) runs the conditional pass alone; otherwise cond + null batch
    assert rows == [2 if s == 0.0 else 4 for s in expected]


class _FixedLogits(nn.Module):
    """Stub generator: logits depend only on whether the label is the null class."""

    seq_len, mask_token_id, null_class_id = 1, 3, 9

    def __init__(self, cond: list[float], uncond: list[float]) -> None:
        super().__init__()
        self.cond, self.uncond = torch.tensor(cond), torch.tensor(uncond)

    def forward(self, ids_BL: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        null_B = (labels_B == self.null_class_id)[:, None, None]
        return torch.where(null_B, self.uncond, self.cond).expand(ids_BL.shape[0], 1, 3)


def test_logits_mix_per_schedule():
    # c = [0, 1, .5], u = [0, 3, 0]: argmax c = 1; argmax of c + 1 (c - u) = [0, -1, 1] is 2
    model, labels = _FixedLogits([0.0, 1.0, 0.5], [0.0, 3.0, 0.0]), torch.tensor([0])
    kw = {"steps": 1, "randomize_temperature": 0.0}
    assert sample(model, labels, guidance_scale=1.0, **kw).item() == 2  # c + s (c - u)
    # power-cosine at step 0: s = 1 and u + s (c - u) = c, whatever g
    out = sample(model, labels, guidance_scale=50.0, guidance_decay="power-cosine", **kw)
    assert out.item() == 1
    # linear at step 0: s = 0, the conditional logits alone
    out = sample(model, labels, guidance_scale=50.0, guidance_decay="linear", **kw)
    assert out.item() == 1


def test_softmax_temperature_annealing_divides_logits(monkeypatch):
    seen: list[tuple[float, float]] = []

    def record(r, base, span):
        seen.append((r, softmax_temperature(r, base, span)))
        return seen[-1][1]

    monkeypatch.setattr(masked, "softmax_temperature", record)
    model, labels = _tiny(seq_len=16), torch.tensor([0, 3, 7])
    plain = sample(model, labels, randomize_temperature=3.0,
                   generator=torch.Generator().manual_seed(123))
    assert seen == []
    annealed = sample(model, labels, randomize_temperature=3.0,
                      softmax_temperature_annealing=True,
                      generator=torch.Generator().manual_seed(123))
    assert [r for r, _ in seen] == [(t + 1) / 8 for t in range(8)]
    assert [temp for _, temp in seen] == pytest.approx(
        [1.2, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5], rel=1e-12
    )
    assert not torch.equal(plain, annealed)
