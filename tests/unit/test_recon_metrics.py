"""Reconstruction metrics: PSNR, codebook usage/entropy, bit balance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vgen_core.eval import bit_balance, codebook_usage, psnr
from vgen_core.tokenizers import indices_to_bits


def test_psnr_of_known_mse():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0] += 0.1  # MSE 1e-2 -> 20 dB
    y[1] += 0.01  # MSE 1e-4 -> 40 dB
    expected = torch.tensor([20.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(psnr(x, y, data_range=1.0), expected)
    assert psnr(x, y, data_range=1.0, reduction="mean").item() == pytest.approx(30.0)
    assert psnr(x[:1], y[:1], data_range=2.0).item() == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(x[:1] * 255, y[:1] * 255, data_range=255.0).item() == pytest.approx(20.0)


def test_psnr_range_conventions_agree():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    b = (a + 0.05 * torch.randn(3, 3, 8, 8, generator=g)).clamp(-1, 1)
    unit = psnr((a + 1) / 2, (b + 1) / 2, data_range=1.0)
    torch.testing.assert_close(psnr(a, b, data_range=2.0), unit)


def test_psnr_edge_cases():
    x = torch.rand(2, 1, 3, 3)
    assert torch.isinf(psnr(x, x)).all()
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[:1])
    with pytest.raises(ValueError, match="reduction"):
        psnr(x, x + 1, reduction="sum")


def test_codebook_usage_known_values():
    uniform = codebook_usage(torch.arange(16).repeat(3), 16)
    assert uniform == {"unique": 16, "usage_fraction": 1.0, "entropy_bits": 4.0, "perplexity": 16.0}
    half = codebook_usage(np.arange(8).repeat(5), 16)
    assert half["unique"] == 8 and half["usage_fraction"] == 0.5
    assert half["entropy_bits"] == pytest.approx(3.0) and half["perplexity"] == pytest.approx(8.0)
    single = codebook_usage(np.full((4, 4), 7), 4096)
    expected = {"unique": 1, "usage_fraction": 1 / 4096, "entropy_bits": 0.0, "perplexity": 1.0}
    assert single == expected
    skewed = codebook_usage(torch.tensor([[0, 0], [1, 2]]), 4)  # p = 1/2, 1/4, 1/4
    assert skewed["entropy_bits"] == pytest.approx(1.5)
    assert skewed["perplexity"] == pytest.approx(2**1.5)


def test_codebook_usage_rejects_bad_input():
    with pytest.raises(ValueError, match="codebook_size=4"):
        codebook_usage(np.array([0, 4]), 4)
    with pytest.raises(ValueError):
        codebook_usage(np.array([-1]), 4)
    with pytest.raises(TypeError):
        codebook_usage(np.array([0.5]), 4)
    with pytest.raises(ValueError):
        codebook_usage(np.array([], dtype=np.int64), 4)


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 63), min_size=1, max_size=200))
def test_codebook_usage_bounds(ids):
    u = codebook_usage(np.array(ids), 64)
    assert u["unique"] == len(set(ids))
    assert 0.0 <= u["entropy_bits"] <= math.log2(u["unique"]) + 1e-9
    assert 1.0 - 1e-9 <= u["perplexity"] <= u["unique"] + 1e-9
    assert u == codebook_usage(torch.tensor(ids), 64)


def test_bit_balance():
    bits = np.array([[True, False, True], [True, False, False]])
    np.testing.assert_array_equal(bit_balance(bits), [1.0, 0.0, 0.5])
    all_codes = indices_to_bits(torch.arange(2**10), 10).view(4, 16, 16, 10)
    np.testing.assert_array_equal(bit_balance(all_codes), np.full(10, 0.5))
    with pytest.raises(TypeError):
        bit_balance(np.zeros((2, 3)))
