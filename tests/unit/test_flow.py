"""Rectified-flow core: path, target, t samplers, time grids, Euler / Euler-Maruyama samplers,
the REPA pieces (projector, loss, target features) and the sampling-time attention options."""

from __future__ import annotations

import math

import pytest
import torch

from vgen_core.generators.flow import (
    TimestepEmbedder,
    cfg_combine,
    euler_maruyama_sample,
    euler_sample,
    flow_path,
    flow_target,
    inference_attention_options,
    latents_from_moments,
    load_repa_decoder,
    load_repa_encoder,
    logit_normal_t,
    lognormal_t,
    ode_time_grid,
    repa_loss,
    repa_projector,
    repa_target_features,
    score_from_velocity,
    sde_time_grid,
    timestep_embedding,
)

# --------------------------------------------------------------------------------------------------
# path, target, t samplers
# --------------------------------------------------------------------------------------------------


def test_flow_path_and_target_on_hand_made_tensors():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    noise = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    t = torch.tensor([0.25, 1.0])
    # row 0: 0.75 * [1, 2] + 0.25 * [0, 0]; row 1 (t = 1) is the noise itself
    torch.testing.assert_close(flow_path(x, noise, t), torch.tensor([[0.75, 1.5], [1.0, -1.0]]))
    torch.testing.assert_close(flow_target(x, noise), torch.tensor([[-1.0, -2.0], [-2.0, -5.0]]))
    torch.testing.assert_close(flow_path(x, noise, torch.zeros(2)), x)
    # 4D: t broadcasts over (C, H, W); d x_t / dt equals the target
    x4, n4 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t3 = torch.tensor([0.1, 0.5, 0.9])
    dt = 1e-3
    deriv = (flow_path(x4, n4, t3 + dt) - flow_path(x4, n4, t3)) / dt
    torch.testing.assert_close(deriv, flow_target(x4, n4), atol=2e-3, rtol=0)


def test_logit_normal_range_and_median():
    t = logit_normal_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0
    assert float(t.median()) == pytest.approx(0.5, abs=0.01)
    shifted = logit_normal_t(20000, mean=1.0, std=0.5, generator=torch.Generator().manual_seed(0))
    assert float(shifted.median()) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)
    # 1 - t is logit-normal(-m, s): the law is symmetric about 1/2 for m = 0
    low, high = float((t < 0.25).float().mean()), float((t > 0.75).float().mean())
    assert low == pytest.approx(high, abs=0.01)


def test_deepflow_lognormal_t_is_logit_normal():
    """sigma / (1 + sigma) with sigma = e^u is sigmoid(u): same numbers from the same generator."""
    a = lognormal_t(1000, generator=torch.Generator().manual_seed(3))
    b = logit_normal_t(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert float(a.min()) > 0.0 and float(a.max()) < 1.0


def test_time_grids():
    torch.testing.assert_close(
        sde_time_grid(3), torch.tensor([1.0, 0.52, 0.04, 0.0], dtype=torch.float64)
    )
    g = sde_time_grid(40)
    assert g.shape == (41,) and g[0] == 1.0 and g[-2] == pytest.approx(0.04) and g[-1] == 0.0
    torch.testing.assert_close(
        ode_time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="num_steps"):
        sde_time_grid(0)


def test_latents_from_moments_samples_and_scales():
    mean = torch.randn(2, 3, 4, 4)
    # logvar -30 (clamp floor): std e^-15, so z == mean up to 3e-7
    z = latents_from_moments(torch.cat([mean, torch.full_like(mean, -30.0)], 1), 0.5)
    torch.testing.assert_close(z, 0.5 * mean, atol=1e-6, rtol=0)
    # logvar log 4 -> std 2, eps drawn from the generator
    moments = torch.cat([mean, torch.full_like(mean, math.log(4.0))], 1)
    z = latents_from_moments(moments, 0.2325, torch.Generator().manual_seed(0))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, 0.2325 * (mean + 2.0 * eps))
    with pytest.raises(ValueError, match="even"):
        latents_from_moments(torch.zeros(1, 3, 2, 2), 1.0)


def test_timestep_embedding_known_values():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 6)
    half_freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(emb[1], torch.cat([half_freqs.cos(), half_freqs.sin()]))
    assert TimestepEmbedder(8)(torch.rand(5)).shape == (5, 8)


# --------------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------------


def test_euler_integrates_constant_velocity_exactly():
    x1 = torch.randn(3, 2, 5)
    c = torch.randn(2, 5)
    calls = []

    def field(x, t):
        calls.append(t.clone())
        return c.expand_as(x)

    grid = torch.tensor([1.0, 0.9, 0.55, 0.2, 0.0])  # uneven steps
    out = euler_sample(field, x1, grid)
    torch.testing.assert_close(out, x1 - c, atol=1e-6, rtol=0)  # x_0 = x_1 - (1 - 0) c
    assert out.dtype == x1.dtype
    assert [float(t[0]) for t in calls] == pytest.approx([1.0, 0.9, 0.55, 0.2])
    assert all(t.shape == (3,) for t in calls)
    with pytest.raises(ValueError, match="decreasing"):
        euler_sample(field, x1, torch.tensor([0.0, 1.0]))


def test_euler_cfg_combines_halves_inside_guidance_interval():
    """Doubled batch [x; x]: first half conditional (c), second unconditional (u)."""
    x = torch.zeros(2, 3)
    c, u = torch.tensor(1.0), torch.tensor(3.0)
    seen = []

    def field(x_N, t_N):
        seen.append(x_N.shape[0])
        if x_N.shape[0] == 4:
            return torch.cat([torch.full((2, 3), c), torch.full((2, 3), u)])
        return torch.full((2, 3), c)

    grid = torch.tensor([1.0, 0.5, 0.0])
    s = 2.5
    out = euler_sample(field, x, grid, cfg_scale=s, guidance_interval=(0.6, 1.0))
    guided = float(cfg_combine(c, u, s))  # u + s (c - u) = 3 + 2.5 * (-2) = -2
    assert guided == -2.0
    torch.testing.assert_close(out, torch.full((2, 3), -0.5 * guided - 0.5 * float(c)))
    assert seen == [4, 2]  # t = 1 guided (batch doubled), t = 0.5 outside the interval
    seen.clear()
    euler_sample(field, x, grid, cfg_scale=1.0)
    assert seen == [2, 2]  # scale 1: no unconditional pass


def test_score_from_velocity_hand_value():
    # x_t = 0.5, v = 1, t = 0.5: -(0.5 + 0.5 * 1) / 0.5 = -2
    s = score_from_velocity(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([0.5]))
    torch.testing.assert_close(s, torch.tensor([[-2.0]]))


def _gaussian_velocity(mu: float, s: float):
    """Exact v(x, t) = E[eps - x0 | x_t] for x0 ~ N(mu, s^2), x_t = (1 - t) x0 + t eps."""

    def v(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        return t / var * r - (mu + (1 - t) * s**2 / var * r)

    return v


@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama"])
def test_samplers_recover_gaussian_data_with_exact_velocity(sampler):
    mu, s, n = 2.0, 0.5, 20000
    x1 = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    v = _gaussian_velocity(mu, s)
    if sampler == "euler":
        out = euler_sample(v, x1, ode_time_grid(100))
    else:
        gen = torch.Generator().manual_seed(1)
        out = euler_maruyama_sample(v, x1, sde_time_grid(100), generator=gen)
    assert float(out.mean()) == pytest.approx(mu, abs=0.02)
    assert float(out.std()) == pytest.approx(s, abs=0.02)


def test_euler_maruyama_determinism_and_noise_free_last_step():
    x1 = torch.randn(4, 3)
    v = _gaussian_velocity(0.0, 1.0)
    grid = sde_time_grid(6)
    a = euler_maruyama_sample(v, x1, grid, generator=torch.Generator().manual_seed(0))
    b = euler_maruyama_sample(v, x1, grid, generator=torch.Generator().manual_seed(0))
    c = euler_maruyama_sample(v, x1, grid, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a one-step grid is the mean step only: x + ((2 - t) v + x) dt, no draw from the generator
    one = torch.tensor([0.5, 0.0])
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    out = euler_maruyama_sample(v, x1, one, generator=gen)
    assert torch.equal(gen.get_state(), state)
    vt = v(x1, torch.full((4,), 0.5))
    torch.testing.assert_close(out, x1 - 0.5 * (1.5 * vt + x1))
    with pytest.raises(ValueError, match="> 0"):
        euler_maruyama_sample(v, x1, torch.tensor([1.0, 0.0, -0.5]))


# --------------------------------------------------------------------------------------------------
# REPA
# --------------------------------------------------------------------------------------------------


def _official_proj_loss(zs, zs_tilde):
    """DeepFlow loss.py proj_loss, transcribed (mean_flat over tokens of -(z . z~), sum, divide)."""
    bsz = zs[0].shape[0]
    if len(zs_tilde) > 1:
        zs = zs * len(zs_tilde)
    total = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = torch.nn.functional.normalize(z_tilde_j, dim=-1)
            z_j = torch.nn.functional.normalize(z_j, dim=-1)
            total += (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    return total / (len(zs) * bsz)


def test_repa_loss_is_mean_negative_cosine_by_hand():
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (B=1, T=2, E=2)
    half = torch.tensor([[[1.0, 1.0], [0.0, -3.0]]])  # cos 1/sqrt(2) and -1
    same = 5.0 * z  # cos 1 and 1
    # per projection: mean over tokens of -cos; then the mean over the two projections
    by_hand = ((-(1 / math.sqrt(2)) + 1.0) / 2 + (-1.0)) / 2
    assert repa_loss([half, same], z).item() == pytest.approx(by_hand, abs=1e-7)
    assert repa_loss([same], z).item() == pytest.approx(-1.0, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    zt, zp = torch.randn(3, 5, 4, generator=g), [torch.randn(3, 5, 4, generator=g) for _ in range(2)]
    torch.testing.assert_close(repa_loss(zp, zt), _official_proj_loss([zt], zp))
    with pytest.raises(ValueError, match="z_dim"):
        repa_loss([torch.randn(3, 5, 3)], zt)


def test_repa_projector_is_the_official_mlp():
    mlp = repa_projector(8, 16, 6)
    shapes = [tuple(m.weight.shape) for m in mlp if isinstance(m, torch.nn.Linear)]
    assert shapes == [(16, 8), (16, 16), (6, 16)]
    assert [type(m).__name__ for m in mlp] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert mlp(torch.randn(2, 3, 8)).shape == (2, 3, 6)


def test_repa_target_features_resize_to_the_model_grid():
    enc = load_repa_encoder("tiny")  # patch 8, 64 wide
    assert load_repa_encoder("tiny") is enc  # cached
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    feats = repa_target_features(enc, images, 4)  # resized to 4 * 8 = 32 px -> 4x4 tokens
    assert feats.shape == (2, 16, 64)
    up = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2).float() / 255, size=(32, 32),
                                         mode="bicubic", align_corners=False)
    torch.testing.assert_close(feats, enc(up))
    with pytest.raises(ValueError, match="4x4 tokens"):
        repa_target_features(lambda x: torch.zeros(2, 9, 64), images, 4)
    vae = load_repa_decoder("tiny")
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


# --------------------------------------------------------------------------------------------------
# sampling-time attention
# --------------------------------------------------------------------------------------------------


def test_inference_attention_options():
    assert inference_attention_options("dense", (4, 4)) == {}
    x = inference_attention_options("grat", (16, 16))  # official (8, 8) groups, GRAT-X
    assert x == {"backend": "grat", "grid": (1, 16, 16), "groups": (1, 8, 8),
                 "variant": "criss_cross", "radius": (0, 1, 1)}
    b = inference_attention_options("grat", (4, 6), groups=(2, 3), variant="grat-b", radius=0)
    assert (b["variant"], b["groups"], b["radius"]) == ("block", (1, 2, 3), (0, 0, 0))
    with pytest.raises(ValueError, match="known: dense, grat"):
        inference_attention_options("sparse", (4, 4))
    with pytest.raises(ValueError, match="does not divide"):
        inference_attention_options("grat", (4, 4))  # 8 does not divide 4
    with pytest.raises(ValueError, match="variant"):
        inference_attention_options("grat", (4, 4), groups=(2, 2), variant="diagonal")
