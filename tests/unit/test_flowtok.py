"""FlowTok: KL and CLIP alignment losses, text inputs, loss, CFG (indicator dropout, guided
sampler), samplers, export, training."""

from __future__ import annotations

import math

import pytest
import torch

from vgen_core.generators import flowtok
from vgen_core.generators.flow import euler_sample, flow_path, ode_time_grid
from vgen_core.generators.flowtok import (
    FLOWTOK_SIZES,
    FlowTok,
    FlowTokConfig,
    cfg_null_mask,
    clip_contrastive_loss,
    encode_text_bytes,
    flowtok_config,
    flowtok_loss,
    gaussian_kl,
    reverse_sample,
    rotate_null_targets,
)
from vgen_core.tokenizers.io import (
    load_pretrained,
    register_family,
    save_pretrained,
    weights_digest,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [
    "a red cat", "blue dog", "green tree", "yellow sun", "white boat", "black car", "pink rose",
    "grey owl",
]  # fmt: skip


def _tiny(**overrides) -> FlowTok:
    torch.manual_seed(0)
    return flowtok_config("tiny", **overrides).build()


# --------------------------------------------------------------------------------------------------
# config, text input
# --------------------------------------------------------------------------------------------------


def test_sizes_follow_paper_table_1():
    b, xl, h = FLOWTOK_SIZES["B"], FLOWTOK_SIZES["XL"], FLOWTOK_SIZES["H"]
    assert (b.depth, b.hidden, b.heads, int(b.hidden * b.mlp_ratio)) == (12, 768, 12, 3072)
    assert (xl.depth, xl.hidden, xl.heads, int(xl.hidden * xl.mlp_ratio)) == (28, 1152, 16, 4608)
    assert (h.depth, h.hidden, h.heads, int(h.hidden * h.mlp_ratio)) == (36, 1280, 20, 5120)
    assert (xl.num_tokens, xl.token_dim, xl.projector_depth) == (77, 16, 6)
    assert (xl.kl_weight, xl.align_weight) == (1e-4, 1.0)
    with pytest.raises(ValueError, match="must divide"):
        FlowTokConfig(hidden=100, heads=16)
    with pytest.raises(ValueError, match="known: tiny"):
        flowtok_config("L")


def test_encode_text_bytes():
    ids = encode_text_bytes(["ab", "é", "abcdef"], 4)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[98, 99, 0, 0], [196, 170, 0, 0], [98, 99, 100, 101]]


def test_text_input_modes_and_shape_errors():
    model = _tiny()
    mean, logvar, feats = model.encode_text(encode_text_bytes(CAPTIONS[:3], 8))
    assert mean.shape == logvar.shape == (3, 8, 4) and feats.shape == (3, 8, 32)
    with pytest.raises(ValueError, match="byte ids"):
        model.encode_text(torch.zeros(3, 8, 32))
    feat_model = _tiny(text_input="features", text_dim=24)
    assert feat_model.byte_encoder is None
    mean, _, _ = feat_model.encode_text(torch.randn(2, 8, 24))
    assert mean.shape == (2, 8, 4)
    with pytest.raises(ValueError, match=r"features \(B, 8, 24\)"):
        feat_model.encode_text(torch.randn(2, 7, 24))
    with pytest.raises(KeyError, match="text_features"):
        flowtok_loss(feat_model, {"image_tokens": torch.randn(2, 8, 4)})


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def test_gaussian_kl_hand_made():
    mean = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 * [(1 + 1 - 1 - 0) + (0 + 2 - 1 - log 2)] = 1 - log(2) / 2
    torch.testing.assert_close(gaussian_kl(mean, logvar), torch.tensor([1 - math.log(2) / 2]))
    assert float(gaussian_kl(torch.zeros(3, 5, 2), torch.zeros(3, 5, 2)).abs().max()) == 0.0


def test_clip_contrastive_loss_hand_made():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # rows are normalised first
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # logits = 2 I: each row CE = log(1 + e^-2), both directions equal
    loss = clip_contrastive_loss(a, b, math.log(2.0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    # swapped pairs: the positive has logit 0, the negative 2
    swapped = clip_contrastive_loss(a, b.flip(0), math.log(2.0))
    assert swapped.item() == pytest.approx(math.log(1 + math.exp(2.0)), rel=1e-6)
    # exp(scale) is capped at 100: swapped pairs cost log(1 + e^100) ~ 100, not ~1000
    capped = clip_contrastive_loss(a, b.flip(0), math.log(1000.0))
    assert capped.item() == pytest.approx(100.0, rel=1e-5)
    # (B, N, C) inputs are flattened per sample
    x = torch.randn(4, 3, 2)
    assert clip_contrastive_loss(x, x, 0.0).item() == pytest.approx(
        clip_contrastive_loss(x.flatten(1), x.flatten(1), 0.0).item()
    )


@pytest.mark.parametrize("align_with", ["text_features", "image_tokens"])
def test_loss_is_fm_plus_weighted_kl_and_align(align_with):
    model = _tiny(kl_weight=0.3, align_weight=0.7, align_with=align_with)
    captured = {}
    model.register_forward_hook(lambda m, args, out: captured.update(args=args, out=out))
    img = torch.randn(4, 8, 4)
    text = encode_text_bytes(CAPTIONS[:4], 8)
    loss, metrics = flowtok_loss(
        model, {"image_tokens": img, "text_bytes": text}, 0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    expected = metrics["fm_loss"] + 0.3 * metrics["kl_loss"] + 0.7 * metrics["align_loss"]
    torch.testing.assert_close(loss.detach(), expected)
    # the flow runs from z_text (t = 1) to the image (t = 0): x_t = (1 - t) img + t z_text
    x_t, t = captured["args"]
    mean, logvar, feats = model.encode_text(text)
    z = (x_t - (1 - t).view(-1, 1, 1) * img) / t.view(-1, 1, 1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, mean + (0.5 * logvar).exp() * eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flow_path(img, z, t), x_t)
    fm = ((captured["out"] - (z - img)) ** 2).mean()
    torch.testing.assert_close(metrics["fm_loss"], fm.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(metrics["kl_loss"], gaussian_kl(mean, logvar).mean().detach())
    anchor = model.align_mlp(feats) if align_with == "text_features" else img
    align = clip_contrastive_loss(anchor, z, model.logit_scale)
    torch.testing.assert_close(metrics["align_loss"], align.detach(), atol=1e-4, rtol=1e-4)
    assert metrics["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))


# --------------------------------------------------------------------------------------------------
# samplers, export, training
# --------------------------------------------------------------------------------------------------


def test_sampler_shapes_and_determinism():
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():  # non-zero velocity heads
            if p.abs().sum() == 0:
                p.add_(0.1)
    text = encode_text_bytes(CAPTIONS[:3], 8)
    a = flowtok.sample(model, text, num_steps=4, generator=torch.Generator().manual_seed(0))
    b = flowtok.sample(model, text, num_steps=4, generator=torch.Generator().manual_seed(0))
    c = flowtok.sample(model, text, num_steps=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 8, 4) and torch.equal(a, b) and not torch.equal(a, c)
    m1 = flowtok.sample(model, text, num_steps=4, sample_text=False)
    m2 = flowtok.sample(model, text, num_steps=4, sample_text=False)
    assert torch.equal(m1, m2)
    assert model.training
    assert reverse_sample(model, a, num_steps=4).shape == (3, 8, 4)


def test_reverse_sample_inverts_a_constant_flow():
    """v = c everywhere: text -> image subtracts c, image -> text adds it back."""
    model = _tiny()
    with torch.no_grad():
        model.final_linear.bias.fill_(0.5)  # adaLN/linear weights are zero: v == 0.5
    img = torch.randn(2, 8, 4)
    torch.testing.assert_close(reverse_sample(model, img, num_steps=3), img + 0.5)


def test_save_load_round_trip(tmp_path):
    register_family("flowtok", FlowTok)
    model = _tiny().eval()
    out = save_pretrained(model, tmp_path / "flowtok")
    loaded = load_pretrained(out, expected_family="flowtok")
    assert loaded.config == model.config and weights_digest(loaded) == weights_digest(model)
    text = encode_text_bytes(CAPTIONS[:2], 8)
    with torch.no_grad():
        pairs = zip(loaded.encode_text(text), model.encode_text(text))
        assert all(torch.equal(p, q) for p, q in pairs)
        x, t = torch.randn(2, 8, 4), torch.rand(2)
        assert torch.equal(loaded(x, t), model(x, t))


def test_tiny_training_maps_each_caption_to_its_image_tokens():
    """Golden curve: 8 distinct (caption, 8x4 image tokens) pairs, 150 AdamW steps (lr 3e-3).

    Measured (seed 0, 1 thread): loss 8.20 -> 0.034 (FM 3.46 -> 0.024, align 4.74 -> 0.0003);
    10-step Euler samples land at MSE 0.12 from their own image tokens (data power 0.88) and
    every sample's nearest image is its own. Bounds leave >= 3x margin.
    """
    model = _tiny()
    text = encode_text_bytes(CAPTIONS, 8)
    img = torch.randn(8, 8, 4, generator=torch.Generator().manual_seed(0))
    batch = {"image_tokens": img, "text_bytes": text}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    first = None
    for step in range(150):
        loss, _ = flowtok_loss(model, batch, step, generator=gen)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final, metrics = flowtok_loss(model, batch, 0, generator=torch.Generator().manual_seed(9))
    assert first > 6.0
    assert final.item() < 0.15, metrics
    assert metrics["fm_loss"].item() < 0.1 and metrics["align_loss"].item() < 0.05, metrics
    out = flowtok.sample(model, text, num_steps=10, generator=torch.Generator().manual_seed(0))
    assert ((out - img) ** 2).mean().item() < 0.4
    nearest = torch.cdist(out.flatten(1), img.flatten(1)).argmin(1)
    assert nearest.tolist() == list(range(8))


# --------------------------------------------------------------------------------------------------
# classifier-free guidance (CrossFlow's indicator)
# --------------------------------------------------------------------------------------------------


def _randomized(model: FlowTok) -> FlowTok:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():  # non-zero velocity heads and indicator rows
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_cfg_defaults():
    assert FLOWTOK_SIZES["XL"].cfg_dropout == 0.1  # CrossFlow cfg_indicator [I]
    assert FLOWTOK_SIZES["tiny"].cfg_dropout == 0.0 and _tiny().cfg_embed is None
    assert _tiny(cfg_dropout=0.1).cfg_embed.weight.shape == (2, 32)


def test_cfg_null_mask_drops_at_the_configured_rate_exactly():
    n, p = 1000, 0.1
    null = cfg_null_mask(n, p, generator=torch.Generator().manual_seed(0))
    draws = torch.rand(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(null, draws < p)  # one uniform per sample, null below p
    assert int(null.sum()) == int((draws < p).sum()) == 100  # seed 0: 100 of 1000
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert not cfg_null_mask(8, 0.0, generator=gen).any()
    assert torch.equal(gen.get_state(), state)  # p = 0 draws nothing
    # fewer than two nulls cannot be rotated: none (CrossFlow); seed 4, p 0.2, n 4 -> one draw
    one = torch.rand(4, generator=torch.Generator().manual_seed(4)) < 0.2
    assert int(one.sum()) == 1
    assert not cfg_null_mask(4, 0.2, generator=torch.Generator().manual_seed(4)).any()


def test_rotate_null_targets():
    x = torch.arange(6.0).view(6, 1)
    null = torch.tensor([True, False, True, True, False, False])
    assert rotate_null_targets(x, null).flatten().tolist() == [2.0, 1.0, 3.0, 0.0, 4.0, 5.0]
    assert rotate_null_targets(x, torch.zeros(6, dtype=torch.bool)) is x


def test_loss_trains_null_samples_on_rotated_targets_with_the_indicator():
    model = _randomized(_tiny(cfg_dropout=0.5))
    captured = {}
    model.register_forward_hook(
        lambda m, args, kwargs, out: captured.update(args=args, kwargs=kwargs, out=out),
        with_kwargs=True,
    )
    B = 8
    img = torch.randn(B, 8, 4)
    text = encode_text_bytes(CAPTIONS[:B], 8)
    gen = torch.Generator().manual_seed(0)
    loss, metrics = flowtok_loss(model, {"image_tokens": img, "text_bytes": text}, 0,
                                 generator=gen)
    # replay the draws: text eps, t, then one uniform per sample for the indicator
    replay = torch.Generator().manual_seed(0)
    torch.randn(B, 8, 4, generator=replay)
    torch.randn(B, generator=replay)
    want_null = torch.rand(B, generator=replay) < 0.5
    null = captured["kwargs"]["null"]
    assert torch.equal(null, want_null) and int(null.sum()) == 5  # seed 0: 5 of 8
    assert metrics["null_frac"].item() == 5 / 8
    x_t, t = captured["args"]
    mean, logvar, _ = model.encode_text(text)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    z = mean + (0.5 * logvar).exp() * eps
    target_img = rotate_null_targets(img, null)
    assert not torch.equal(target_img[null], img[null])
    assert torch.equal(target_img[~null], img[~null])
    torch.testing.assert_close(x_t, flow_path(target_img, z, t), atol=1e-5, rtol=1e-5)
    fm = ((captured["out"] - (z - target_img)) ** 2).mean()
    torch.testing.assert_close(metrics["fm_loss"], fm.detach(), atol=1e-4, rtol=1e-4)
    # the indicator changes the velocity
    with torch.no_grad():
        cond, uncond = model(x_t, t), model(x_t, t, null=torch.ones(B, dtype=torch.bool))
    assert not torch.allclose(cond, uncond)
    with pytest.raises(ValueError, match="cfg_dropout > 0"):
        _tiny()(x_t, t, null=torch.ones(B, dtype=torch.bool))


def test_guided_velocity_is_u_plus_s_times_c_minus_u():
    """One Euler step from z_T (t = 1 -> 0): x_0 = z - v, v = u + s (c - u) exactly."""
    model = _randomized(_tiny(cfg_dropout=0.1))
    seen = []
    model.register_forward_hook(lambda m, a, kw, out: seen.append(kw.get("null")),
                                with_kwargs=True)
    text = encode_text_bytes(CAPTIONS[:3], 8)
    s = 3.5
    out = flowtok.sample(model, text, num_steps=1, sample_text=False, guidance_scale=s)
    null = seen[-1]
    assert null.tolist() == [False] * 3 + [True] * 3  # one batched call: [cond; null]
    with torch.no_grad():
        z = model.encode_text(text)[0]
        v = model(torch.cat([z, z]), torch.ones(6), null=null).double()
    c, u = v.chunk(2)
    assert torch.equal(out, (z.double() - (u + s * (c - u))).float())
    assert not torch.equal(out, (z.double() - c).float())  # guidance did something


def test_guidance_scale_one_is_the_unguided_sampler_bit_for_bit():
    model = _randomized(_tiny(cfg_dropout=0.1))
    text = encode_text_bytes(CAPTIONS[:3], 8)
    gen = torch.Generator
    one = flowtok.sample(model, text, num_steps=5, guidance_scale=1.0, generator=gen().manual_seed(0))
    default = flowtok.sample(model, text, num_steps=5, generator=gen().manual_seed(0))
    with torch.no_grad():  # the sampler without any guidance code: conditional flow only
        mean, logvar, _ = model.eval().encode_text(text)
        eps = torch.randn(mean.shape, generator=gen().manual_seed(0))
        z = mean + (0.5 * logvar).exp() * eps
        plain = euler_sample(lambda x, t: model(x, t), z, ode_time_grid(5))
    assert torch.equal(one, plain) and torch.equal(default, plain)
    with pytest.raises(ValueError, match="cfg_dropout > 0"):
        flowtok.sample(_tiny(), text, num_steps=2, guidance_scale=2.0)
