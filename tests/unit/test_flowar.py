"""FlowAR: latent pyramid, block-causal mask, Spatial-adaLN, per-scale flow target, a tiny
convergence run, the sampler, and the family registration (methods.md §2.8)."""

from __future__ import annotations

import pytest
import torch

from vgen_core import families
from vgen_core.generators.common import modulate
from vgen_core.generators.flowar import (
    FLOWAR_SIZES,
    SPEC,
    FlowAR,
    SpatialAdaLN,
    block_causal_mask,
    default_scales,
    flowar_config,
    latent_pyramid,
    sample,
    scale_block_mask,
    scale_path,
    scale_target,
    upsample,
)


def _tiny(**overrides) -> FlowAR:
    torch.manual_seed(0)
    return SPEC.build_config(SPEC.config("tiny", **overrides))


# --------------------------------------------------------------------------------------------------
# pyramid and masks
# --------------------------------------------------------------------------------------------------


def test_latent_pyramid_is_area_averaging_coarsest_first(one_thread):
    x = torch.arange(16.0).reshape(1, 1, 4, 4)  # rows [0..3], [4..7], [8..11], [12..15]
    s1, s2, s4 = latent_pyramid(x, (1, 2, 4))
    torch.testing.assert_close(s1, torch.tensor([[[[7.5]]]]))  # mean of 0..15
    # 2x2 block means: top-left (0 + 1 + 4 + 5) / 4 = 2.5, top-right 4.5, bottom 10.5, 12.5
    torch.testing.assert_close(s2, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert s4 is x  # the finest scale is the latent itself
    # channels and batch are averaged independently
    y = torch.randn(3, 16, 16, 16)
    pyr = latent_pyramid(y, default_scales(16))
    assert [tuple(p.shape) for p in pyr] == [(3, 16, s, s) for s in (1, 2, 4, 8, 16)]
    torch.testing.assert_close(pyr[0][:, :, 0, 0], y.mean(dim=(2, 3)))
    torch.testing.assert_close(pyr[3], y.unflatten(2, (8, 2)).unflatten(4, (8, 2)).mean((3, 5)))


def test_default_scales_and_config_checks():
    assert default_scales(16) == (1, 2, 4, 8, 16)  # the paper's scales at 256 px
    assert default_scales(8) == (1, 2, 4, 8)
    assert default_scales(24) == (3, 6, 12, 24)
    assert flowar_config("S").scale_sides == (1, 2, 4, 8, 16)
    assert flowar_config("S").seq_len == 1 + 4 + 16 + 64 + 256
    assert flowar_config("tiny", scales=(2, 4, 8)).seq_len == 4 + 16 + 64
    with pytest.raises(ValueError, match="must end at latent_size=8"):
        flowar_config("tiny", scales=(1, 2, 4))
    with pytest.raises(ValueError, match="strictly increasing"):
        flowar_config("tiny", scales=(2, 2, 8))
    with pytest.raises(ValueError, match="FlowAR size 'XL' not found; known: tiny, S, B, L, H"):
        flowar_config("XL")


def test_upsample_of_a_constant_stays_constant():
    x = torch.full((2, 3, 1, 1), 0.7)
    for mode in ("bicubic", "bilinear", "nearest"):
        torch.testing.assert_close(upsample(x, 2, mode), torch.full((2, 3, 2, 2), 0.7))


def test_block_causal_mask_exact_for_tiny_scales():
    T, F = True, False
    # scales (1, 2): slot 0 = scale 1 (the class slot), slots 1..4 = scale 2
    assert torch.equal(block_causal_mask((1, 2)), torch.tensor([
        [T, F, F, F, F],
        [T, T, T, T, T],
        [T, T, T, T, T],
        [T, T, T, T, T],
        [T, T, T, T, T],
    ]))  # fmt: skip
    assert torch.equal(scale_block_mask((1, 2)), torch.tensor([
        [T, F, F, F, F],
        [F, T, T, T, T],
        [F, T, T, T, T],
        [F, T, T, T, T],
        [F, T, T, T, T],
    ]))  # fmt: skip
    m = block_causal_mask((1, 2, 4))  # 1 + 4 + 16 slots
    ids = torch.tensor([0] + [1] * 4 + [2] * 16)
    assert m.shape == (21, 21)
    assert torch.equal(m, ids[:, None] >= ids[None, :])
    assert m[4, :5].all() and not m[4, 5:].any() and m[20].all()


def test_semantics_of_a_scale_depend_on_coarser_scales_only(one_thread):
    model = _tiny().eval()
    with torch.no_grad():  # open the adaLN-Zero gates so every block mixes slots
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 8, 8)
    pyr = latent_pyramid(x, (1, 2, 4, 8))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        full = model.semantics(labels, pyr[:-1])
        changed = model.semantics(labels, [pyr[0], pyr[1] + 1.0, pyr[2]])
        prefix = model.semantics(labels, pyr[:1])
    assert full.shape == (2, 85, 32) and prefix.shape == (2, 5, 32)
    # pyr[1] (side 2) is the input of scale 3 (side 4, slots 5..20): scales 1-2 are untouched
    torch.testing.assert_close(changed[:, :5], full[:, :5])
    assert not torch.allclose(changed[:, 5:], full[:, 5:])
    torch.testing.assert_close(prefix, full[:, :5], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Spatial-adaLN
# --------------------------------------------------------------------------------------------------


def test_spatial_adaln_is_per_position_and_identity_when_zeroed():
    torch.manual_seed(0)
    ada = SpatialAdaLN(8, 6)
    sem, t = torch.randn(2, 5, 8), torch.randn(2, 8)
    mods = ada(sem, t)
    assert len(mods) == 6 and all(m.shape == (2, 5, 8) for m in mods)
    assert not torch.allclose(mods[0][:, 0], mods[0][:, 1])  # position-wise
    # semantics constant over positions: the usual per-sample adaLN (same maps everywhere)
    flat = ada(sem[:, :1].expand(-1, 5, -1), t)
    assert all(torch.allclose(m, m[:, :1].expand_as(m), atol=1e-6) for m in flat)
    # per-token times (B, L, D) are accepted
    assert ada(sem, t[:, None].expand(-1, 5, -1))[0].shape == (2, 5, 8)

    lin = ada.adaLN_modulation[1]
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    shift, scale, gate, *_ = ada(sem, t)
    assert not shift.any() and not scale.any() and not gate.any()
    x = torch.randn(2, 5, 8)
    assert torch.equal(modulate(x, shift, scale), x)


def test_flow_head_blocks_start_as_identity_and_head_outputs_zero():
    """adaLN-Zero: zeroed Spatial-adaLN closes every gate, so each block returns its input."""
    model = _tiny()
    head = model.head
    h, sem, t = torch.randn(2, 16, 32), torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in head.blocks:
        assert torch.equal(block(h, sem, t, None), h)
    v = head(torch.randn(2, 16, 4), torch.rand(2), torch.randn(2, 16, 32))
    assert v.shape == (2, 16, 4) and not v.any()  # zero-initialised output layer


# --------------------------------------------------------------------------------------------------
# flow path and target
# --------------------------------------------------------------------------------------------------


def test_scale_target_is_x1_minus_x0_and_path_is_linear_in_t():
    x1, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(scale_target(x1, x0), x1 - x0)
    torch.testing.assert_close(scale_path(x1, x0, torch.ones(3)), x1)  # t = 1: data
    torch.testing.assert_close(scale_path(x1, x0, torch.zeros(3)), x0)  # t = 0: noise
    t = torch.tensor([0.25, 0.5, 0.9])
    torch.testing.assert_close(scale_path(x1, x0, t), t.view(3, 1, 1, 1) * x1
                               + (1 - t.view(3, 1, 1, 1)) * x0)
    dt = 1e-3
    deriv = (scale_path(x1, x0, t + dt) - scale_path(x1, x0, t)) / dt
    torch.testing.assert_close(deriv, scale_target(x1, x0), atol=3e-3, rtol=0)


def test_loss_regresses_each_scale_on_its_pyramid_level(monkeypatch):
    """The velocity the loss compares with is s_k - eps for the scale's own pyramid level: a model
    returning exactly that (recovered from F_t, t and the clean pyramid) scores zero."""
    model = _tiny(class_dropout=0.0)
    cfg = model.config

    def oracle(xt_BSC, t_BK, labels_B, pyramid):
        out = []
        for k, (x1, xt) in enumerate(zip(pyramid, xt_BSC.split(cfg.tokens_per_scale, dim=1))):
            x1 = x1.flatten(2).transpose(1, 2)
            t = t_BK[:, k].view(-1, 1, 1)
            x0 = (xt - t * x1) / (1 - t)
            out.append(x1 - x0)
        return torch.cat(out, dim=1)

    monkeypatch.setattr(model, "forward", oracle)
    batch = {"latents": torch.randn(4, 4, 8, 8), "label": torch.arange(4)}
    g = torch.Generator().manual_seed(0)
    loss, metrics = SPEC.loss(model, batch, 0, generator=g)
    assert float(loss) < 1e-6
    assert set(metrics) == {"loss", "loss_scale1", "loss_scale2", "loss_scale4", "loss_scale8"}


def test_loss_reads_moments_and_checks_the_latent_shape():
    model = _tiny()
    batch = SPEC.example_batch(model.config, 2, generator=torch.Generator().manual_seed(0))
    assert batch["moments"].shape == (2, 8, 8, 8)
    loss, _ = SPEC.loss(model, batch, 0, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="set in_channels / latent_size"):
        SPEC.loss(model, {"latents": torch.randn(2, 4, 16, 16), "label": torch.zeros(2)}, 0)


# --------------------------------------------------------------------------------------------------
# convergence, sampling
# --------------------------------------------------------------------------------------------------


def _eval_loss(model: FlowAR, batch) -> float:
    """Mean loss over 8 fixed noise draws (the same draws before and after training)."""
    with torch.no_grad():
        return sum(float(SPEC.loss(model, batch, 0, generator=torch.Generator().manual_seed(
            100 + i))[0]) for i in range(8)) / 8


def test_tiny_training_run_lowers_the_loss_below_a_bound(one_thread):
    """Seed 0, AdamW lr 2e-3, 100 steps on one fixed batch of 8 (example moments): the fixed-draw
    loss goes from 1.046 to 0.310 (stated bound 0.4, and at most 40% of the start)."""
    model = _tiny()
    batch = SPEC.example_batch(model.config, 8, generator=torch.Generator().manual_seed(0))
    start = _eval_loss(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(100):
        loss, _ = SPEC.loss(model, batch, step, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = _eval_loss(model, batch)
    assert 0.9 < start < 1.2, start
    assert end < 0.4 and end < 0.4 * start, (start, end)


def test_sampler_returns_finite_latents_of_the_latent_shape(one_thread):
    model = _tiny().train()
    labels = torch.tensor([0, 3, 10])  # 10 = the null class
    with torch.no_grad():  # a non-trivial head, so guidance and semantics matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = sample(model, labels, num_steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = sample(model, labels, num_steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    c = sample(model, labels, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 4, 8, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)  # seeded; guidance changes the result
    assert model.training  # mode restored
    d = sample(model, labels, num_steps=2, cfg_scale=3.0, guidance_schedule="constant",
               generator=torch.Generator().manual_seed(0))
    assert d.shape == (3, 4, 8, 8) and torch.isfinite(d).all()


# --------------------------------------------------------------------------------------------------
# family
# --------------------------------------------------------------------------------------------------


def test_family_is_registered_and_builds_on_meta():
    spec = families.get("flowar", role="generator", can="train")
    assert spec is SPEC and {"train", "sample"} <= set(spec.capabilities)
    assert (spec.data, spec.conditioning, spec.output) == ("latents", "labels", "latents")
    with torch.device("meta"):
        model = SPEC.build_config(SPEC.config("tiny"))
    assert isinstance(model, FlowAR) and model.family == "flowar"
    assert all(p.is_meta for p in model.parameters())
    # data facts from a latent cache set the pyramid: a 16x16x16 cache gives the paper's scales
    cfg = SPEC.model_config("tiny", data={"in_channels": 16, "latent_size": 16, "num_classes": 5,
                                          "scale_factor": 1.0, "shape": [32, 16, 16]})
    assert cfg.scale_sides == (1, 2, 4, 8, 16) and cfg.in_channels == 16


@pytest.mark.parametrize("size,paper", [("S", 170e6), ("B", 300e6), ("L", 589e6), ("H", 1.9e9)])
def test_released_sizes_land_near_the_papers_parameter_totals(size, paper):
    with torch.device("meta"):
        model = SPEC.build_config(FLOWAR_SIZES[size])
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / paper - 1) < 0.03, (size, count)
