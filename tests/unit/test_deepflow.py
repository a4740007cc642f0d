"""DeepFlow: sizes, branch weights and times, acceleration loss, REPA, sampler, export,
training."""

from __future__ import annotations

import pytest
import torch

from vgen_core.generators import deepflow
from vgen_core.generators.deepflow import (
    DEEPFLOW_SIZES,
    DeepFlow,
    DeepFlowConfig,
    acceleration_loss,
    branch_times,
    deepflow_config,
    deepflow_loss,
    default_branch_weights,
)
from vgen_core.generators.flow import (
    flow_path,
    load_repa_decoder,
    load_repa_encoder,
    repa_loss,
    repa_target_features,
)
from vgen_core.tokenizers.io import (
    load_pretrained,
    register_family,
    save_pretrained,
    weights_digest,
)

pytestmark = pytest.mark.usefixtures("one_thread")

def _tiny(**overrides) -> DeepFlow:
    torch.manual_seed(0)
    return deepflow_config("tiny", **overrides).build()


def _randomize_heads(model: DeepFlow) -> None:
    """The zero-initialised heads make every output 0; give them weights for shape/value tests."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------------
# config, branches, weights
# --------------------------------------------------------------------------------------------------


def test_sizes_branch_count_and_weights():
    b, xl = DEEPFLOW_SIZES["B/2"], DEEPFLOW_SIZES["XL/2"]
    assert (b.hidden, b.depth, b.heads, b.patch_size, b.df_idxs) == (768, 12, 12, 2, (6,))
    assert (xl.hidden, xl.depth, xl.heads, xl.patch_size, xl.df_idxs) == (1152, 24, 16, 2, (8, 16))
    assert b.num_branches == 2 and b.weights == (0.2, 1.0)  # script/base: --scale-weight 0.2 1.0
    assert xl.num_branches == 3 and xl.weights == (0.2, 0.2, 1.0)  # script/xlarge
    assert (xl.input_size, xl.in_channels, xl.tg_upper_bound, xl.scale_factor) == (
        32, 4, 0.01, 0.18215,
    )  # fmt: skip
    assert default_branch_weights(1) == (1.0,) and default_branch_weights(4) == (0.2, 0.2, 0.2, 1.0)
    assert deepflow_config("XL/2", branch_weights=(0.5, 0.3, 1.0)).weights == (0.5, 0.3, 1.0)
    with pytest.raises(ValueError, match="one weight per branch"):
        deepflow_config("B/2", branch_weights=(0.2, 0.2, 1.0))
    with pytest.raises(ValueError, match="df_idxs"):
        DeepFlowConfig(depth=12, df_idxs=(12,))
    with pytest.raises(ValueError, match="df_idxs"):
        DeepFlowConfig(depth=12, df_idxs=(8, 4))
    with pytest.raises(ValueError, match="known: tiny"):
        deepflow_config("L/2")


def test_forward_returns_one_velocity_per_branch_and_accelerations_between():
    model = _tiny(df_idxs=(1, 3), depth=4)
    x = torch.randn(3, 4, 8, 8)
    labels = torch.tensor([0, 1, model.null_class_id])
    t = torch.rand(3)
    with torch.no_grad():
        vs, accs = model(x, [t, t + 0.01, t + 0.02], labels)
    assert len(vs) == 3 and len(accs) == 2
    assert all(v.shape == x.shape for v in vs + accs)
    assert all(float(v.abs().max()) == 0.0 for v in vs + accs)  # adaLN-Zero / zero heads
    _randomize_heads(model)
    with torch.no_grad():
        vs, accs = model(x, t, labels)  # one t for every branch (sampler mode)
    assert float(vs[-1].abs().max()) > 0 and float(accs[0].abs().max()) > 0
    with pytest.raises(ValueError, match="needs 3 times"):
        model(x, [t, t], labels)
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model(torch.randn(3, 4, 6, 6), t, labels)


def test_unpatchify_inverts_patch_order():
    model = _tiny()
    p, C = 2, 4
    x = torch.arange(2 * C * 8 * 8, dtype=torch.float32).view(2, C, 8, 8)
    # patchify as (B, T, p*p*C) with the (p, q, c) order the official unpatchify expects
    tokens = x.view(2, C, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * C)
    assert torch.equal(model.unpatchify(tokens), x)


def test_branch_times_hand_made():
    t = torch.tensor([0.5, 0.999, 0.004])
    u = torch.tensor([[1.0, 0.5, 0.2], [0.2, 1.0, 1.0]])
    up = branch_times(t, 3, beta=0.01, sign=1.0, u_KB=u)
    torch.testing.assert_close(up[0], t)
    torch.testing.assert_close(up[1], torch.tensor([0.51, 1.0, 0.006]))  # 1.004 clamped to 1
    torch.testing.assert_close(up[2], torch.tensor([0.512, 1.0, 0.016]))
    down = branch_times(t, 3, beta=0.01, sign=-1.0, u_KB=u)
    torch.testing.assert_close(down[2], torch.tensor([0.488, 0.984, 0.0]))  # 0.004 - 0.012 -> 0
    assert len(branch_times(t, 1, beta=0.01, sign=1.0)) == 1


def test_acceleration_loss_hand_made_and_detaches_velocity():
    # x_t = 1, v = 2, a = 4, t = 0.5: dt = -0.5, 1 + 2 (-0.5) + 0.5 * 4 * 0.25 = 0.5; x0 = 0
    x_t = torch.ones(2, 1, 2, 2)
    v = torch.full((2, 1, 2, 2), 2.0, requires_grad=True)
    a = torch.full((2, 1, 2, 2), 4.0, requires_grad=True)
    x0 = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([0.5, 1.0])  # second sample: 1 - 2 + 2 = 1 -> loss 1
    loss = acceleration_loss(x_t, v, a, t, x0)
    torch.testing.assert_close(loss, torch.tensor([0.25, 1.0]))
    loss.sum().backward()
    assert v.grad is None and a.grad is not None
    # d/da mean((x + 0.5 a dt^2 ...)^2) = 2 * 0.5 * 0.25 / 4 elements per sample for sample 0
    torch.testing.assert_close(a.grad[0], torch.full((1, 2, 2), 2 * 0.5 * 0.125 / 4))


def test_loss_is_weighted_sum_of_branch_losses_plus_acceleration():
    """Recompute the loss from the captured model inputs and outputs (tiny, 3 branches)."""
    model = _tiny(df_idxs=(1, 2), depth=3, branch_weights=(0.3, 0.5, 1.0), acc_coeff=0.7)
    _randomize_heads(model)
    captured = {}

    def hook(mod, args, out):
        captured["args"], captured["out"] = args, out

    model.register_forward_hook(hook)
    x = torch.randn(4, 4, 8, 8)
    batch = {"latents": x, "label": torch.tensor([0, 1, 2, 3])}
    loss, metrics = deepflow_loss(model, batch, 0, generator=torch.Generator().manual_seed(0))
    x_t, times, labels = captured["args"]
    vs, accs = captured["out"]
    noise = (x_t - (1 - times[0]).view(-1, 1, 1, 1) * x) / times[0].view(-1, 1, 1, 1)
    torch.testing.assert_close(flow_path(x, noise, times[0]), x_t)
    target = noise - x
    fm = [((v - target) ** 2).mean() for v in vs]
    acc = sum(
        acceleration_loss(flow_path(x, noise, times[k]), vs[k], accs[k], times[k], x).mean()
        for k in range(2)
    )
    expected = 0.3 * fm[0] + 0.5 * fm[1] + 1.0 * fm[2] + 0.7 * acc
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["acc_loss"], acc.detach(), rtol=1e-4, atol=1e-5)
    assert set(metrics) == {
        "loss", "fm_loss", "acc_loss", "fm_loss_branch0", "fm_loss_branch1", "fm_loss_branch2",
    }  # fmt: skip
    # branch times step by at most beta, all in the same direction
    d1, d2 = times[1] - times[0], times[2] - times[1]
    assert float(torch.cat([d1, d2]).abs().max()) <= 0.01 + 1e-6
    assert bool((d1 >= 0).all() and (d2 >= 0).all()) or bool((d1 <= 0).all() and (d2 <= 0).all())
    assert set(labels.tolist()) <= {0, 1, 2, 3, model.null_class_id}


def test_loss_accepts_moments_and_is_deterministic():
    model = _tiny()
    moments = torch.randn(3, 8, 8, 8)
    batch = {"moments": moments, "label": torch.tensor([0, 1, 2])}
    a, _ = deepflow_loss(model, batch, 0, generator=torch.Generator().manual_seed(2))
    b, _ = deepflow_loss(model, batch, 0, generator=torch.Generator().manual_seed(2))
    assert a.item() == b.item()
    with pytest.raises(KeyError, match="latents"):
        deepflow_loss(model, {"label": torch.tensor([0])})


# --------------------------------------------------------------------------------------------------
# sampler, export, training
# --------------------------------------------------------------------------------------------------


def test_sampler_shapes_determinism_and_cfg_labels():
    model = _tiny().train()
    _randomize_heads(model)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))
    labels = torch.tensor([1, 3])
    kw = dict(num_steps=4, cfg_scale=2.0, guidance_interval=(0.0, 0.7))
    a = deepflow.sample(model, labels, generator=torch.Generator().manual_seed(0), **kw)
    b = deepflow.sample(model, labels, generator=torch.Generator().manual_seed(0), **kw)
    c = deepflow.sample(model, labels, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training
    # grid [1, 0.68, 0.36, 0.04, 0]: t = 1 is outside the interval, the other three are guided
    guided = [1, 3, 10, 10]
    assert [s.tolist() for s in seen[:4]] == [[1, 3], guided, guided, guided]


def test_save_load_round_trip(tmp_path):
    register_family("deepflow", DeepFlow)
    model = _tiny().eval()
    _randomize_heads(model)
    out = save_pretrained(model, tmp_path / "deepflow")
    loaded = load_pretrained(out, expected_family="deepflow")
    assert loaded.config == model.config and weights_digest(loaded) == weights_digest(model)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(loaded(x, t, y)[0], model(x, t, y)[0]))


def test_tiny_training_overfits_four_latents():
    """Golden curve: 4 classes, one fixed 4x8x8 latent each, batch 8, 200 AdamW steps (lr 5e-3).

    Measured (seed 0, 1 thread): loss 3.01 at step 0 -> 1.05 on the fresh-noise evaluation below
    (last-branch FM 0.61, acceleration 0.26). The label fixes the latent, so the floor is ~0 up
    to the 10% class dropout; the bounds leave ~30% margin.
    """
    model = _tiny()
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = {"latents": x.repeat(2, 1, 1, 1), "label": torch.arange(4).repeat(2)}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    first = None
    for step in range(200):
        loss, _ = deepflow_loss(model, batch, step, generator=gen)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    big = {"latents": x.repeat(16, 1, 1, 1), "label": torch.arange(4).repeat(16)}
    with torch.no_grad():
        final, metrics = deepflow_loss(model, big, 0, generator=torch.Generator().manual_seed(9))
    assert first > 2.5
    assert final.item() < 1.4, final.item()
    assert metrics["fm_loss_branch1"].item() < 0.85, metrics


# --------------------------------------------------------------------------------------------------
# REPA (official --ssl-align)
# --------------------------------------------------------------------------------------------------


def _repa(**overrides) -> DeepFlow:
    return _tiny(ssl_align=True, z_dim=64, **overrides)  # 64 = the tiny vfm_vit's width


def test_repa_config_defaults_and_projectors():
    xl = DEEPFLOW_SIZES["XL/2"]
    assert (xl.ssl_align, xl.proj_coeff, xl.z_dim) == (False, 0.5, 768)  # train.py / DeepFlow()
    model = _repa(df_idxs=(1, 3))
    names = {k for k in model.state_dict() if k.startswith("projectors.")}
    assert names == {f"projectors.{k}.{i}.{w}" for k in (0, 1) for i in (0, 2, 4)
                     for w in ("weight", "bias")}  # official build_mlp_projection names
    assert model.projectors[0][0].weight.shape == (32, 32)  # (projector_dim = acc_hidden, D)
    assert model.projectors[0][4].weight.shape == (64, 32)
    # every other weight equals the model without REPA (same seed)
    plain = _tiny(df_idxs=(1, 3)).state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.items())
    assert len(_tiny().projectors) == 0


def test_repa_projections_read_the_tokens_after_each_vera_block():
    model = _repa(df_idxs=(1, 3))
    _randomize_heads(model)
    handed = []
    for blk in model.df_blocks:
        blk.register_forward_hook(lambda m, a, out: handed.append(out[1]))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        vs, accs, zs = model(x, t, y, return_zs=True)
        plain_vs, _ = model(x, t, y)
    assert len(zs) == 2 and all(z.shape == (2, 16, 64) for z in zs)
    for k in range(2):
        torch.testing.assert_close(zs[k], model.projectors[k](handed[k]))
    assert all(torch.equal(a, b) for a, b in zip(vs, plain_vs))
    with pytest.raises(ValueError, match="ssl_align"):
        _tiny()(x, t, y, return_zs=True)


def test_repa_coefficient_zero_gives_the_old_loss_exactly():
    batch = {"moments": torch.randn(4, 8, 8, 8), "label": torch.tensor([0, 1, 2, 3])}
    opts = dict(repa_encoder="tiny", repa_decoder="tiny")

    def run(model, **kw):
        return deepflow_loss(model, batch, 0, generator=torch.Generator().manual_seed(3), **kw)

    old, old_m = run(_tiny())
    zero, zero_m = run(_repa(proj_coeff=0.0), **opts)
    assert zero.item() == old.item() and zero_m["fm_loss"].item() == old_m["fm_loss"].item()
    assert set(zero_m) == set(old_m) | {"proj_loss"}
    half, half_m = run(_repa(), **opts)  # default proj_coeff 0.5 (official --proj-coeff)
    torch.testing.assert_close(half, old + 0.5 * half_m["proj_loss"])
    assert -1.0 <= half_m["proj_loss"].item() <= 1.0


def test_repa_target_comes_from_features_image_or_decoded_latents():
    model = _repa()
    _randomize_heads(model)
    captured = {}
    model.register_forward_hook(lambda m, a, out: captured.update(zs=out[2]))
    latents = torch.randn(2, 4, 8, 8)
    feats = torch.randn(2, 16, 64)
    gen = torch.Generator
    _, m1 = deepflow_loss(model, {"latents": latents, "label": torch.tensor([0, 1]),
                                  "repa_features": feats}, generator=gen().manual_seed(0))
    assert m1["proj_loss"].item() == pytest.approx(repa_loss(captured["zs"], feats).item())
    # the batch's images (the official path), through the encoder at the model's token grid
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    _, m2 = deepflow_loss(model, {"latents": latents, "label": torch.tensor([0, 1]),
                                  "image": images}, generator=gen().manual_seed(0),
                          repa_encoder="tiny")
    want = repa_target_features(load_repa_encoder("tiny"), images, 4)
    assert m2["proj_loss"].item() == pytest.approx(repa_loss(captured["zs"], want).item())
    # no image column: the clean latents decoded by the frozen VAE (x / scale_factor)
    _, m3 = deepflow_loss(model, {"latents": latents, "label": torch.tensor([0, 1])},
                          generator=gen().manual_seed(0), repa_encoder="tiny",
                          repa_decoder="tiny")
    with torch.no_grad():
        pixels = load_repa_decoder("tiny").decode(latents / model.config.scale_factor)
    want = repa_target_features(load_repa_encoder("tiny"), ((pixels + 1) / 2).clamp(0, 1), 4)
    assert m3["proj_loss"].item() == pytest.approx(repa_loss(captured["zs"], want).item())
    with pytest.raises(ValueError, match="repa_features"):
        deepflow_loss(model, {"latents": latents, "label": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="no clean image"):
        deepflow_loss(model, {"latents": latents, "label": torch.tensor([0, 1])},
                      repa_encoder="tiny")
    with pytest.raises(ValueError, match="ssl_align: true"):
        deepflow_loss(_tiny(), {"latents": latents, "label": torch.tensor([0, 1])},
                      repa_encoder="tiny")


def test_tiny_training_with_repa_aligns():
    """40 AdamW steps (lr 5e-3) on four 4x8x8 moments, REPA targets = the tiny vfm_vit on the
    tiny VAE's decodes of the clean latents. Measured (seed 0, 1 thread) on a fixed-noise
    evaluation: proj_loss (mean -cos) 0.042 -> -0.319, loss 1.53 -> 0.61. The bounds ask for a
    cosine gain of 0.2 (measured 0.36) and a lower loss."""
    model = _repa()
    moments = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = {"moments": moments.repeat(2, 1, 1, 1), "label": torch.arange(4).repeat(2)}
    opts = dict(repa_encoder="tiny", repa_decoder="tiny")

    def evaluate() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return deepflow_loss(model, batch, 0, generator=torch.Generator().manual_seed(9),
                                 **opts)[1]

    before = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        loss, _ = deepflow_loss(model, batch, step, generator=gen, **opts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after["proj_loss"].item() < before["proj_loss"].item() - 0.2, (before, after)
    assert after["loss"].item() < before["loss"].item(), (before, after)
