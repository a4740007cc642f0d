"""Tokenizer training entry points (vgen_core.training.tasks): each tokenizer trains for real on
CPU at tiny size with its methods.md reconstruction + quantizer/KL losses, and its reconstruction
error on the training photos falls (the same loss the train stage runs under DeepSpeed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vgen_core.data.images import preprocess
from vgen_core.data.sample_images import PHOTOS, load_photo, to_rgb
from vgen_core.training.tasks import get_task, images_to_model, images_to_unit


def photos(res: int, n: int = 8) -> torch.Tensor:
    return torch.from_numpy(np.stack([preprocess(to_rgb(load_photo(p)), res)
                                      for p in PHOTOS[:n]]))


def recon_mse(family: str, model, images) -> float:
    model.eval()
    with torch.no_grad():
        if family == "titok":
            x = images_to_unit(images)
            r, _ = model(x)
        elif family == "kl_vae":
            x = images_to_model(images, family)
            r, _ = model(x, sample_posterior=False)
        else:
            x = images_to_model(images, family)
            r, _ = model(x)
    model.train()
    return float(F.mse_loss(r, x))


@pytest.mark.parametrize("family,size,res,steps,lr,ratio", [
    ("titok", "tiny", 32, 80, 3e-3, 0.6),
    ("bar_fsq", "tiny", 32, 80, 3e-3, 0.6),
    ("kl_vae", "tiny", 16, 80, 3e-3, 0.6),
    ("lfq", "tiny", 32, 80, 3e-3, 0.8),
])
def test_tokenizer_trains_and_reconstructions_improve(one_thread, family, size, res, steps, lr,
                                                      ratio):
    torch.manual_seed(0)
    task = get_task(family)
    assert task.kind == "tokenizer" and task.data == "images"
    model = task.build(size, {}, {})
    images = photos(res)
    batch = {"image": images, "label": torch.arange(len(images))}
    before = recon_mse(family, model, images)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        loss, metrics = task.loss(model, batch, step)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recon_mse(family, model, images)
    assert after < ratio * before, (family, before, after)


def test_titok_legacy_head_is_refused():
    task = get_task("titok")
    model = task.build("tiny-legacy", {}, {})
    with pytest.raises(ValueError, match="RGB head"):
        task.loss(model, {"image": photos(32, 2)}, 0)
