"""MaskGen-KL: diffusion-head loss by hand, masking schedule, shapes, sampler, tiny training run,
registration and meta builds of every size."""

from __future__ import annotations

import math

import pytest
import torch

from vgen_core import families
from vgen_core.generators.maskgen_kl import (
    MASKGEN_KL_SIZES,
    SPEC,
    DiffusionHead,
    DiffusionSchedule,
    MaskGenKL,
    cosine_betas,
    diffusion_loss,
    head_sample,
    kl_aesthetic_embedding,
    kl_masked_after_step,
    maskgen_kl_config,
    maskgen_kl_loss,
    random_order_mask,
    sample,
    spaced_timesteps,
)
from vgen_core.generators.text import encode_text

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red cube", "two small cats", "blue sky at noon", "an old bicycle"]


def _tiny(**overrides) -> MaskGenKL:
    torch.manual_seed(0)
    return maskgen_kl_config("tiny", **overrides).build()


def _batch(model: MaskGenKL, B: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = SPEC.example_batch(model.config, B, generator=torch.Generator().manual_seed(seed))
    batch["text_ids"] = encode_text([CAPTIONS[i % 4] for i in range(B)])
    return batch


# --------------------------------------------------------------------------------------------------
# diffusion: schedule, loss by hand, head sampler
# --------------------------------------------------------------------------------------------------


def _hand_betas(T: int) -> list[float]:
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]


def _hand_loss_row(x0, xt, t, out, noise, betas) -> float:
    """IDDPM hybrid loss of one row (float64 lists), written out from the formulas."""
    C = len(x0)
    eps, v = out[:C], out[C:]
    ab = math.prod(1 - b for b in betas[: t + 1])
    ab_prev = math.prod(1 - b for b in betas[:t])
    b = betas[t]
    mse = sum((n - e) ** 2 for n, e in zip(noise, eps)) / C

    def post_var(s):
        abs_, abp = math.prod(1 - x for x in betas[: s + 1]), math.prod(1 - x for x in betas[:s])
        return betas[s] * (1 - abp) / (1 - abs_)

    lv_q = math.log(post_var(1) if t == 0 else post_var(t))
    c1, c2 = b * math.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * math.sqrt(1 - b) / (1 - ab)
    terms = []
    for j in range(C):
        x0_hat = math.sqrt(1 / ab) * xt[j] - math.sqrt(1 / ab - 1) * eps[j]
        m_p = c1 * x0_hat + c2 * xt[j]
        frac = (v[j] + 1) / 2
        lv_p = frac * math.log(b) + (1 - frac) * lv_q
        if t == 0:
            def cdf(y):
                return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
            inv = math.exp(-0.5 * lv_p)
            d = x0[j] - m_p
            p = max(cdf(inv * (d + 1 / 255)) - cdf(inv * (d - 1 / 255)), 1e-12)
            terms.append(-math.log(p))
        else:
            m_q = c1 * x0[j] + c2 * xt[j]
            terms.append(0.5 * (-1 + lv_p - lv_q + math.exp(lv_q - lv_p)
                                + (m_q - m_p) ** 2 * math.exp(-lv_p)))
    return mse + sum(terms) / C / math.log(2)


def test_cosine_betas_and_respacing():
    T = 1000
    betas = cosine_betas(T)
    assert torch.allclose(betas, torch.tensor(_hand_betas(T), dtype=torch.float64), rtol=0,
                          atol=1e-15)
    kept = spaced_timesteps(T, 100)
    assert len(kept) == 100 and kept[:7] == [0, 10, 20, 30, 40, 50, 61] and kept[-1] == 999
    assert spaced_timesteps(T, 1) == [0] and spaced_timesteps(T, T) == list(range(T))
    full = DiffusionSchedule.cosine(T)
    sub = full.respaced(100)
    # respacing keeps abar at the kept steps and maps each step to its model timestep
    assert torch.allclose(sub.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)
    assert sub.timestep_map.tolist() == kept and sub.num_steps == 100
    with pytest.raises(ValueError, match="count must be in"):
        spaced_timesteps(T, 1001)


def test_diffusion_loss_equals_hand_computation():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=3, cond_dim=5, width=8, depth=2)
    for p in head.parameters():  # non-zero everywhere, so every term matters
        torch.nn.init.normal_(p, std=0.3)
    sched = DiffusionSchedule.cosine(1000)
    betas = _hand_betas(1000)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 3, generator=g)
    z = torch.randn(6, 5, generator=g)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    t = torch.tensor([0, 1, 7, 500, 998, 999])
    noise = torch.randn(6, 3, generator=g)
    loss, terms = diffusion_loss(head, sched, x0, z, mask, t_R=t, noise_RC=noise)

    rows = []
    for i in range(6):
        ab = math.prod(1 - b for b in betas[: int(t[i]) + 1])
        xt = (math.sqrt(ab) * x0[i].double() + math.sqrt(1 - ab) * noise[i].double()).float()
        out = head(xt[None], t[i : i + 1], z[i : i + 1])[0].double().tolist()
        rows.append(_hand_loss_row(x0[i].double().tolist(), xt.double().tolist(), int(t[i]),
                                   out, noise[i].double().tolist(), betas))
    want = sum(r * m for r, m in zip(rows, mask.tolist())) / mask.sum().item()
    torch.testing.assert_close(terms["mse"] + terms["vb"], torch.tensor(rows).float(),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float32), rtol=1e-4,
                               atol=1e-5)

    # seeded draws: t first, then the noise, from the generator
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    drawn, _ = diffusion_loss(head, sched, x0, z, mask, generator=g1)
    t2 = torch.randint(0, 1000, (6,), generator=g2)
    again, _ = diffusion_loss(head, sched, x0, z, mask, t_R=t2,
                              noise_RC=torch.randn(6, 3, generator=g2))
    assert torch.equal(drawn, again)

    # fixed variance: the loss is the plain eps MSE
    head_fixed = DiffusionHead(3, 5, 8, 1, learn_sigma=False)
    loss_f, terms_f = diffusion_loss(head_fixed, sched, x0, z, None, t_R=t, noise_RC=noise)
    xt = sched.q_sample(x0, t, noise)
    mse = ((noise - head_fixed(xt, t, z)) ** 2).mean(-1)
    torch.testing.assert_close(loss_f, mse.mean())
    assert torch.equal(terms_f["vb"], torch.zeros(6))


def test_head_sample_one_step_is_the_guided_x0_prediction():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=3, cond_dim=5, width=8, depth=1)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sched = DiffusionSchedule.cosine(1000).respaced(1)  # one step, model timestep 0
    zc, zu = torch.randn(4, 5), torch.randn(4, 5)
    got = head_sample(head, sched, zc, zu, cfg=2.5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    t = torch.zeros(4, dtype=torch.long)
    c, u = head(x, t, zc)[:, :3], head(x, t, zu)[:, :3]
    eps = u + 2.5 * (c - u)
    ab = 1 - cosine_betas(1000)[0].item()
    torch.testing.assert_close(got, math.sqrt(1 / ab) * x - math.sqrt(1 / ab - 1) * eps)
    # DDPM over 100 steps, temperature 0 and DDIM: deterministic given the initial noise
    sched100 = DiffusionSchedule.cosine(1000).respaced(100)
    for kw in ({"temperature": 0.0}, {"eta": 0.0}):
        a = head_sample(head, sched100, zc, zu, cfg=2.0, generator=torch.Generator().manual_seed(2),
                        **kw)
        assert a.shape == (4, 3) and torch.isfinite(a).all()


# --------------------------------------------------------------------------------------------------
# masking, model
# --------------------------------------------------------------------------------------------------


def test_masking_uses_the_arccos_schedule_with_ceil_and_random_orders():
    N = 16
    # ceil(16 arccos(r) / (pi/2)): r = 0.5 -> 16 * 2/3 = 10.7 -> 11; r = 1 -> ratio 1e-6 -> 1
    for r, want in {0.0: 16, 0.1: 15, 0.5: 11, 0.9: 5, 1.0: 1}.items():
        m = random_order_mask(64, N, r, generator=torch.Generator().manual_seed(0))
        assert m.sum(-1).tolist() == [want] * 64
    m = random_order_mask(64, N, 0.5, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row) for row in m.tolist()}) > 32  # orders differ per sample
    # the loss draws one r per batch after the posterior sample: ratio = ceil(N arccos(r)) / N
    model = _tiny()
    batch = _batch(model)
    g = torch.Generator().manual_seed(5)
    _, metrics = maskgen_kl_loss(model, batch, generator=g)
    g = torch.Generator().manual_seed(5)
    torch.randn(batch["moments"][:, :4].shape, generator=g)
    r = torch.rand(1, generator=g)
    n = int(torch.ceil(model.config.num_tokens * torch.arccos(r) / (math.pi / 2)))
    assert metrics["mask_ratio"].item() == pytest.approx(n / model.config.num_tokens)


def test_aesthetic_embedding_is_interleaved_sin_cos():
    e = kl_aesthetic_embedding(torch.tensor([0.01, 0.0]), dim=4)  # 100 * 0.01 = 1
    want = torch.tensor([[math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)],
                         [0.0, 1.0, 0.0, 1.0]])
    torch.testing.assert_close(e, want)


def test_forward_shapes_and_masked_values_are_ignored():
    model = _tiny()
    B, N, C, D = 3, 8, 4, 32
    text, pooled = model.encode_text(encode_text(CAPTIONS[:B]))
    x = torch.randn(B, N, C)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, ::2] = True
    z = model(x, mask, text, pooled)
    assert z.shape == (B, N, D) and not text.requires_grad
    x2 = torch.where(mask[..., None], torch.randn(B, N, C), x)
    assert torch.equal(model(x2, mask, text, pooled), z)
    assert model.head(x.reshape(-1, C), torch.zeros(B * N, dtype=torch.long),
                      z.reshape(-1, D)).shape == (B * N, 2 * C)
    with pytest.raises(ValueError, match="expects tokens"):
        model(torch.randn(B, N, C + 1), mask, text, pooled)


def test_loss_metrics_and_text_drop_uses_the_empty_caption():
    model = _tiny()
    batch = _batch(model)
    loss, metrics = maskgen_kl_loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(metrics) == {"loss", "mse", "vb", "mask_ratio", "text_drop"}
    dropped, _ = maskgen_kl_loss(model, batch, text_drop=1.0,
                                 generator=torch.Generator().manual_seed(0))
    empty = {**batch, "text_ids": encode_text([""] * 4)}
    plain, _ = maskgen_kl_loss(model, empty, text_drop=0.0,
                               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dropped, plain)
    with pytest.raises(ValueError, match="expects latents"):
        maskgen_kl_loss(model, {**batch, "moments": torch.randn(4, 8, 1, 9)})


# --------------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------------


def _left(N: int, S: int) -> list[int]:
    left, masked = [], N
    for k in range(S):
        masked = kl_masked_after_step(k, S, N, masked)
        left.append(masked)
    return left


def test_reveal_schedule_is_the_official_cosine():
    # floor(32 cos(pi/2 (k+1)/8)) = 31.4, 29.6, 26.6, 22.6, 17.8, 12.3, 6.2, 0 (-> 1)
    assert _left(32, 8) == [31, 29, 26, 22, 17, 12, 6, 1]
    # the released setting (32 tokens, 32 steps): "at least one per step" binds throughout, so
    # one token is revealed per step, in the random order (the last step takes what is left)
    assert _left(32, 32)[:31] == list(range(31, 0, -1))
    assert kl_masked_after_step(0, 2, 8, 8) == 5 and kl_masked_after_step(1, 2, 8, 5) == 1


def test_sampler_shape_determinism_and_every_token_drawn():
    model = _tiny()
    ids = encode_text(CAPTIONS[:2])
    kw = {"steps": 3, "num_sampling_steps": 10}
    a = sample(model, ids, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(model, ids, generator=torch.Generator().manual_seed(0), **kw)
    c = sample(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 4, 1, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a, c) and bool((a != 0).all())
    for extra in ({"cfg": 1.0}, {"cfg_schedule": "constant"}, {"eta": 0.0}):
        out = sample(model, ids, generator=torch.Generator().manual_seed(0), **kw, **extra)
        assert out.shape == (2, 4, 1, 8) and torch.isfinite(out).all()
    assert model.training
    with pytest.raises(ValueError, match="cfg_schedule"):
        sample(model, ids, cfg_schedule="cosine", **kw)


# --------------------------------------------------------------------------------------------------
# training run, registry, sizes
# --------------------------------------------------------------------------------------------------


def test_tiny_training_loss_falls(one_thread):
    """Golden curve: SPEC.example_batch(tiny) (B=4, seed 0; moments ~ N(0, 1), so every step
    draws fresh posterior samples), model seed 0, AdamW lr 1e-3, betas (0.9, 0.95), no weight
    decay, 200 steps, loss generator seed 1; evaluated as the mean of 8 loss draws (seed 2, no
    text drop).

    Measured (1 thread): 2.59 -> 0.516 (train-step loss 2.40 at step 0).
    """
    torch.manual_seed(0)
    cfg = SPEC.config("tiny")
    model = SPEC.build_config(cfg)
    batch = SPEC.example_batch(cfg, 4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            betas=(0.9, 0.95), weight_decay=0.0)

    def evaluate() -> float:
        model.eval()
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            vals = [maskgen_kl_loss(model, batch, text_drop=0.0, generator=g)[0].item()
                    for _ in range(8)]
        model.train()
        return sum(vals) / len(vals)

    start = evaluate()
    g = torch.Generator().manual_seed(1)
    for step in range(200):
        loss, _ = maskgen_kl_loss(model, batch, step, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = evaluate()
    assert start > 2.0, start
    assert end < 0.6, end


def test_registered_with_train_and_sample():
    spec = families.get("maskgen_kl", role="generator")
    assert spec is SPEC and {"train", "sample"} <= set(spec.capabilities)
    assert (spec.data, spec.conditioning, spec.output, spec.needs_text) == (
        "latents", "text", "latents", True)
    assert set(spec.data_fields) == {"num_tokens", "token_dim", "scale_factor"}
    model = spec.build("tiny", {}, {"num_tokens": 6, "token_dim": 3, "scale_factor": 0.5})
    assert (model.config.num_tokens, model.config.token_dim, model.config.scale_factor) == (
        6, 3, 0.5)
    batch = spec.example_batch(model.config, 2, generator=torch.Generator().manual_seed(0))
    assert batch["moments"].shape == (2, 6, 1, 6) and batch["text_ids"].shape == (2, 77)
    loss, _ = spec.loss(model, batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    import inspect

    takes = inspect.signature(spec.sampler).parameters
    assert all(set(opts) <= set(takes) for opts in spec.sampling.values())


@pytest.mark.parametrize("size", list(MASKGEN_KL_SIZES))
def test_every_size_builds_on_meta(size):
    with torch.device("meta"):
        model = SPEC.build(size, {}, {})
    assert all(p.is_meta for p in model.parameters())
    c = model.config
    if size != "tiny":
        want = {"L": (1024, 16, 1024), "XL": (1280, 20, 1280)}[size]
        assert (c.hidden, c.depth, c.head_width) == want
        assert (c.heads, c.head_depth, c.num_tokens, c.token_dim, c.scale_factor) == (
            16, 8, 32, 16, 0.7525)
        assert (c.diffusion_batch_mul, c.diffusion_steps, c.sampling_steps) == (4, 1000, 100)
        assert len(model.blocks) == c.depth and len(model.head.res_blocks) == 8
