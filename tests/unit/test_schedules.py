"""Shared schedules (vgen_core.generators.schedules): mask ratio, guidance, temperature.

Expected values are worked out by hand from the formulas (methods.md §2.1-2.7); the last tests
check that each family's public schedule is the shared one (or a thin wrapper giving the same
floats), so the families cannot drift apart again.
"""

from __future__ import annotations

import math

import pytest
import torch

from vgen_core.generators import bar, maskbit, maskgen, masked, rar, xar
from vgen_core.generators.schedules import (
    GUIDANCE_SCHEDULES,
    MASK_SCHEDULES,
    arccos_mask_ratio,
    constant_guidance,
    cosine_mask_ratio,
    guidance,
    gumbel_temperature,
    linear_guidance,
    linear_mask_ratio,
    mask_ratio,
    power_cosine_guidance,
    remask_count,
    softmax_temperature,
)

# --------------------------------------------------------------------------------------------------
# mask ratio
# --------------------------------------------------------------------------------------------------


def test_arccos_mask_ratio():
    # arccos(r) / (pi/2): arccos(1/2) = pi/3 -> 2/3, arccos(1/sqrt2) = pi/4 -> 1/2
    assert arccos_mask_ratio(0.0) == 1.0 and arccos_mask_ratio(1.0) == 0.0
    assert arccos_mask_ratio(0.5) == pytest.approx(2 / 3, rel=1e-15)
    assert arccos_mask_ratio(-0.5) == 1.0 and arccos_mask_ratio(1.5) == 0.0  # clamped
    r = torch.tensor([0.0, 0.5, math.sqrt(0.5), 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        arccos_mask_ratio(r), torch.tensor([1.0, 2 / 3, 0.5, 0.0], dtype=torch.float64)
    )


def test_cosine_mask_ratio():
    # cos(r pi/2): cos(pi/4) = sqrt2/2, cos(pi/6) = sqrt3/2
    assert cosine_mask_ratio(0.0) == 1.0
    assert cosine_mask_ratio(0.5) == pytest.approx(math.sqrt(2) / 2, rel=1e-15)
    assert cosine_mask_ratio(1 / 3) == pytest.approx(math.sqrt(3) / 2, rel=1e-15)
    assert cosine_mask_ratio(1.0) == pytest.approx(0.0, abs=1e-16)
    assert cosine_mask_ratio(2.0) == cosine_mask_ratio(1.0)  # clamped
    r = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        cosine_mask_ratio(r), torch.tensor([1.0, math.sqrt(0.5), 0.0], dtype=torch.float64)
    )


def test_linear_mask_ratio():
    assert linear_mask_ratio(0.0) == 1.0
    assert linear_mask_ratio(0.25) == 0.75
    assert linear_mask_ratio(1.0) == 0.0 and linear_mask_ratio(-1.0) == 1.0
    assert torch.equal(linear_mask_ratio(torch.tensor([0.25, 2.0])), torch.tensor([0.75, 0.0]))


def test_mask_ratio_dispatches_by_name():
    assert set(MASK_SCHEDULES) == {"arccos", "cosine", "linear"}
    assert mask_ratio("linear", 0.25) == 0.75
    assert mask_ratio("arccos", 0.5) == arccos_mask_ratio(0.5)
    with pytest.raises(ValueError, match="known: arccos, cosine, linear"):
        mask_ratio("square", 0.5)


def test_remask_count():
    # floor(64 * arccos(4/8) / (pi/2)) = floor(64 * 2/3) = 42; clamped to [1, num_masked - 1]
    assert remask_count(3, 8, 64, 64) == 42
    assert remask_count(7, 8, 64, 2) == 1
    assert remask_count(0, 8, 64, 20) == 19


# --------------------------------------------------------------------------------------------------
# guidance
# --------------------------------------------------------------------------------------------------


def test_constant_guidance():
    assert constant_guidance(0, 8, 4.5) == 4.5 and constant_guidance(7, 8, 4) == 4.0


def test_linear_guidance():
    # start + (g - start) step / N
    assert linear_guidance(0, 16, 5.0) == 1.0
    assert linear_guidance(8, 16, 5.0) == 3.0
    assert linear_guidance(16, 16, 5.0) == 5.0
    assert linear_guidance(1, 4, 2.0, start=0.0) == 0.5
    assert linear_guidance(0.25, 1.0, 3.0) == 1.5  # precomputed progress


def test_power_cosine_guidance():
    # start + (g - start) (1 - cos((step/N)^p pi)) / 2
    assert power_cosine_guidance(0, 256, 16.0, 2.75) == 1.0
    assert power_cosine_guidance(256, 256, 16.0, 2.75) == 16.0
    assert power_cosine_guidance(128, 256, 3.0, 1.0) == 2.0  # ramp (1 - cos(pi/2)) / 2 = 1/2
    # (8/16)^2 = 1/4: ramp = (1 - cos(pi/4)) / 2 = (1 - sqrt2/2) / 2
    assert power_cosine_guidance(8, 16, 5.0, 2.0) == pytest.approx(
        1 + 4 * (1 - math.sqrt(0.5)) / 2, rel=1e-15
    )
    assert power_cosine_guidance(0, 64, 7.1, 3.0, start=0.0) == 0.0
    assert power_cosine_guidance(32, 64, 7.1, 1.0, start=0.0) == pytest.approx(3.55, rel=1e-15)
    assert power_cosine_guidance(5, 9, 1.0, 2.75) == 1.0  # g = start: flat


def test_guidance_dispatches_by_name():
    assert set(GUIDANCE_SCHEDULES) == {"constant", "linear", "power_cosine"}
    assert guidance("power_cosine", 128, 256, 3.0, power=1.0) == 2.0
    assert guidance("linear", 8, 16, 5.0) == 3.0
    with pytest.raises(ValueError, match="known: constant, linear, power_cosine"):
        guidance("exp", 0, 4, 3.0)


# --------------------------------------------------------------------------------------------------
# temperature
# --------------------------------------------------------------------------------------------------


def test_gumbel_temperature():
    # t (1 - r): MaskGIT tau = randomize_temperature * (1 - r)
    assert gumbel_temperature(0.0, 4.5) == 4.5
    assert gumbel_temperature(0.25, 2.0) == 1.5
    assert gumbel_temperature(1.0, 8.2) == 0.0


def test_softmax_temperature():
    # MaskGen: 0.5 + 0.8 (1 - r), from 1.3 at r = 0 down to 0.5 at r = 1
    assert softmax_temperature(1.0) == 0.5
    assert softmax_temperature(0.0) == pytest.approx(1.3, rel=1e-15)
    assert softmax_temperature(0.5) == pytest.approx(0.9, rel=1e-15)
    assert softmax_temperature(0.5, base=1.0, span=2.0) == 2.0


# --------------------------------------------------------------------------------------------------
# the families use these (bit-exact)
# --------------------------------------------------------------------------------------------------


def test_families_reexport_the_shared_schedules():
    assert masked.arccos_mask_ratio is arccos_mask_ratio
    assert masked.remask_count is remask_count
    assert rar.power_cosine_guidance is power_cosine_guidance


@pytest.mark.parametrize("steps", [1, 7, 16, 64, 100])
def test_family_guidance_wrappers_give_the_shared_values(steps):
    for step in range(steps + 1):
        for g in (0.5, 1.0, 2.7, 7.1, 12.0):
            assert maskbit.cfg_scale_schedule(step, steps, g, 3.0) == power_cosine_guidance(
                step, steps, g, 3.0, start=0.0
            )
            assert bar.bar_guidance(step, steps, g) == (
                linear_guidance(step, steps, g) if g > 1.0 else 1.0
            )
            if step < steps:  # MaskGen's progress is (step + 1) / N
                r = (step + 1) / steps
                assert maskgen.cfg_scale_schedule(step, steps, g, "cosine", 1.5) == (
                    power_cosine_guidance(step + 1, steps, g, 1.5)
                )
                assert maskgen.cfg_scale_schedule(step, steps, g, "linear") == (
                    linear_guidance(r, 1.0, g)
                )
                assert maskgen.cfg_scale_schedule(step, steps, g, "none") == g
    assert [xar.cell_cfg_scale(k, 4, 2.5) for k in range(4)] == [
        linear_guidance(k, 3.0, 2.5) for k in range(4)
    ]


def test_shared_schedules_reproduce_the_families_former_formulas_bit_for_bit():
    """The pre-refactor expressions, verbatim: the shared functions must give the same floats."""
    for steps in (1, 3, 7, 10, 16, 64, 250, 256):
        for step in range(steps + 1):
            r = (step + 1) / steps
            for g in (0.5, 1.0, 2.7, 4.5, 7.1, 12.0, 16.0):
                for p in (1.0, 1.2, 2.75, 3.0):
                    ramp = (1.0 - math.cos(((step / steps) ** p) * math.pi)) / 2.0
                    assert power_cosine_guidance(step, steps, g, p) == (g - 1.0) * ramp + 1.0
                    assert power_cosine_guidance(step, steps, g, p, start=0.0) == (
                        g * (1.0 - math.cos(((step / steps) ** p) * math.pi)) / 2.0
                    )
                    assert power_cosine_guidance(step + 1, steps, g, p) == (
                        (g - 1.0) * (1.0 - math.cos((r**p) * math.pi)) / 2.0 + 1.0
                    )
                assert linear_guidance(step, steps, g) == 1.0 + (g - 1.0) * step / steps
                assert linear_guidance(r, 1.0, g) == r * (g - 1.0) + 1.0
                assert gumbel_temperature(r, g) == g * (1.0 - r)
            assert softmax_temperature(r) == 0.5 + 0.8 * (1.0 - r)
