"""MaskGIT generator: schedule, masked-token loss, sampler, export, tiny training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vgen_core.generators import (
    MASKGIT_SIZES,
    MaskGITConfig,
    arccos_mask_ratio,
    masked_token_loss,
    maskgit_config,
    remask_count,
    sample,
)
from vgen_core.tokenizers import load_pretrained, save_pretrained, weights_digest



def _tiny(**overrides):
    torch.manual_seed(0)
    return maskgit_config("tiny", **overrides).build()


def _capture_inputs(model):
    """Record (tokens, labels) of every forward call."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].clone(), args[1].clone()))
    )
    return calls


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------


def test_arccos_mask_ratio_known_values():
    assert arccos_mask_ratio(0.0) == 1.0
    assert arccos_mask_ratio(1.0) == 0.0
    assert arccos_mask_ratio(0.5) == pytest.approx(2.0 / 3.0)  # arccos(1/2) = pi/3
    assert arccos_mask_ratio(math.sqrt(0.5)) == pytest.approx(0.5)  # arccos(1/sqrt2) = pi/4
    r = torch.tensor([0.0, 0.5, math.sqrt(0.5), 1.0])
    torch.testing.assert_close(arccos_mask_ratio(r), torch.tensor([1.0, 2 / 3, 0.5, 0.0]))


def test_remask_count_schedule():
    # L=64, N=8: step 3 has progress 1/2 -> floor(64 * 2/3) = 42 tokens stay masked.
    assert remask_count(3, 8, 64, 64) == 42
    assert remask_count(7, 8, 64, 2) == 1  # progress 1 -> 0, but at least one stays masked
    assert remask_count(0, 8, 64, 64) == math.floor(64 * math.acos(1 / 8) / (math.pi / 2)) == 58
    assert remask_count(0, 1, 64, 10) == 1
    assert remask_count(0, 8, 64, 20) == 19  # never keeps more masked than before minus one


# --------------------------------------------------------------------------------------------------
# model and loss
# --------------------------------------------------------------------------------------------------


def test_sizes_and_config_validation():
    b = MASKGIT_SIZES["B"]
    assert (b.hidden, b.depth, b.heads, b.mlp_dim, b.dropout) == (768, 24, 16, 3072, 0.1)
    assert maskgit_config("B", codebook_size=1024, seq_len=32).seq_len == 32
    with pytest.raises(ValueError, match="divisible by heads"):
        MaskGITConfig(hidden=100, heads=16)
    with pytest.raises(ValueError, match="known: tiny"):
        maskgit_config("XXL")


def test_forward_shapes_and_vocab():
    model = _tiny(seq_len=10, codebook_size=32, num_classes=3)
    assert model.mask_token_id == 32 and model.null_class_id == 3
    tokens = torch.randint(0, 33, (4, 10))
    logits = model(tokens, torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 10, 32)
    with pytest.raises(ValueError, match=r"\(B, 10\)"):
        model(torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_loss_of_uniform_predictor_is_log_v():
    model = _tiny(seq_len=12, codebook_size=50, num_classes=3)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    tokens = torch.randint(0, 50, (5, 12))
    loss, metrics = masked_token_loss(model, tokens, torch.zeros(5, dtype=torch.long))
    assert loss.item() == pytest.approx(math.log(50), rel=1e-5)  # any weighting, any smoothing
    assert set(metrics) == {"loss", "masked_accuracy", "mask_ratio"}


def test_loss_weighting_and_label_smoothing_match_hand_computation():
    model = _tiny(seq_len=8, codebook_size=16, num_classes=2).eval()
    calls = _capture_inputs(model)
    tokens = torch.randint(0, 16, (6, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    loss, _ = masked_token_loss(
        model, tokens, labels, label_smoothing=0.2, unmasked_weight=0.3, class_drop=0.5,
        generator=torch.Generator().manual_seed(1),
    )
    inputs, used_labels = calls[0]
    mask = inputs == model.mask_token_id
    logits = model(inputs, used_labels).transpose(1, 2)
    ce = F.cross_entropy(logits, tokens, label_smoothing=0.2, reduction="none")
    w = mask.float() + 0.3 * (~mask).float()
    assert loss.item() == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)
    assert torch.equal(inputs[~mask], tokens[~mask])
    assert set(used_labels.tolist()) <= {0, 1, model.null_class_id}


def test_masking_statistics():
    """E[mask ratio] under r ~ U(0,1) is the mean of arccos(r)/(pi/2) = 2/pi; >= 1 per sample."""
    L, B = 16, 4096
    model = _tiny(
        seq_len=L, codebook_size=8, num_classes=2, depth=1, hidden=16, heads=2, mlp_dim=16
    )
    calls = _capture_inputs(model)
    tokens = torch.zeros(B, L, dtype=torch.long)
    labels = torch.zeros(B, dtype=torch.long)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        masked_token_loss(model, tokens, labels, class_drop=0.1, generator=gen)
    inputs, used_labels = calls[0]
    per_sample = (inputs == model.mask_token_id).sum(1)
    assert per_sample.min() >= 1 and per_sample.max() <= L
    assert per_sample.float().mean().item() / L == pytest.approx(2 / math.pi, abs=0.015)
    dropped = (used_labels == model.null_class_id).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.015)
    calls.clear()
    with torch.no_grad():
        masked_token_loss(model, tokens[:64], labels[:64], class_drop=0.0)
        masked_token_loss(model, tokens[:64], labels[:64], class_drop=1.0)
    assert (calls[0][1] == 0).all() and (calls[1][1] == model.null_class_id).all()


def test_loss_is_deterministic_given_generator():
    model = _tiny(seq_len=8, codebook_size=16, num_classes=2).eval()
    tokens = torch.randint(0, 16, (4, 8))
    labels = torch.zeros(4, dtype=torch.long)
    a, _ = masked_token_loss(model, tokens, labels, generator=torch.Generator().manual_seed(3))
    b, _ = masked_token_loss(model, tokens, labels, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


# --------------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------------


def test_sampler_shape_range_and_determinism():
    model = _tiny(seq_len=20, codebook_size=64, num_classes=3).train()
    labels = torch.tensor([0, 1, 2, 3])
    kw = dict(steps=6, guidance_scale=2.0, randomize_temperature=4.5)
    a = sample(model, labels, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(model, labels, generator=torch.Generator().manual_seed(0), **kw)
    c = sample(model, labels, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (4, 20) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # mode restored
    gen = torch.Generator().manual_seed(0)
    one = sample(model, labels, steps=1, guidance_scale=0.0, generator=gen)
    assert (one != model.mask_token_id).all()


def test_sampler_unmasks_on_schedule_and_uses_null_class_for_cfg():
    L, steps = 16, 4
    model = _tiny(seq_len=L, codebook_size=32, num_classes=3)
    calls = _capture_inputs(model)
    labels = torch.tensor([0, 2])
    gen = torch.Generator().manual_seed(0)
    sample(model, labels, steps=steps, guidance_scale=3.0, generator=gen)
    assert len(calls) == steps
    masked_before = [(tok[:2] == model.mask_token_id).sum(1).tolist() for tok, _ in calls]
    expected = [L] + [remask_count(s, steps, L, L) for s in range(steps - 1)]
    assert masked_before == [[n, n] for n in expected]
    for tok, lab in calls:  # cond and uncond halves see the same tokens
        assert torch.equal(tok[:2], tok[2:]) and lab.tolist() == [0, 2, 3, 3]


def test_cfg_combines_conditional_and_unconditional_logits():
    """With zero temperature one step is argmax(c + s(c - u)); compare with a direct computation."""
    model = _tiny(seq_len=6, codebook_size=10, num_classes=2).eval()
    labels = torch.tensor([0, 1])
    ids = torch.full((2, 6), model.mask_token_id)
    with torch.no_grad():
        c = model(ids, labels)
        u = model(ids, torch.full_like(labels, model.null_class_id))
    for s in (0.0, 1.5, 4.0):
        out = sample(model, labels, steps=1, guidance_scale=s, randomize_temperature=0.0)
        assert torch.equal(out, (c + s * (c - u)).argmax(-1))


# --------------------------------------------------------------------------------------------------
# export and training
# --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = _tiny(seq_len=8, codebook_size=16, num_classes=2).eval()
    out = save_pretrained(model, tmp_path / "gen")
    loaded = load_pretrained(out, expected_family="maskgit")
    assert loaded.config == model.config and weights_digest(loaded) == weights_digest(model)
    tokens = torch.randint(0, 17, (3, 8))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels), model(tokens, labels))


def test_tiny_training_fits_class_sequences(one_thread):
    """Golden curve: 4 classes, one fixed 16-token sequence each (V=256), 200 AdamW steps.

    Measured (seed 0, 1 thread): loss 5.53 -> 0.90; the floor with label smoothing 0.1 is
    H(0.9 + 0.1/256, 0.1/256 x 255) = 0.88. Sampling with CFG then returns each class's sequence.
    """
    C, L = 4, 16
    model = _tiny(seq_len=L, num_classes=C)
    tokens = torch.randint(0, 256, (C, L), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.96), weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    idx = torch.arange(16) % C
    first = None
    for _ in range(200):
        loss, _ = masked_token_loss(model, tokens[idx], idx, generator=gen)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final, metrics = masked_token_loss(
            model, tokens.repeat(16, 1), torch.arange(C).repeat(16), class_drop=0.0,
            generator=torch.Generator().manual_seed(2),
        )
    assert first > 5.0
    assert final.item() < 1.0, final.item()
    assert metrics["masked_accuracy"].item() > 0.95
    gen = torch.Generator().manual_seed(0)
    out = sample(model, torch.arange(C), steps=8, guidance_scale=1.0, generator=gen)
    assert (out == tokens).float().mean().item() > 0.9
