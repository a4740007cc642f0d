"""``evaluate.tokenizer`` in-process for several tokenizer families (LFQ bit tokens, TiTok VQ ids,
KL-VAE latents, TiTok-KL latents): reconstruction PSNR equals the models' own encode -> decode of
the declared preprocessing, codebook metrics appear only for discrete ids and bit balance only
for bit tokens, label-conditioned generators are sampled and text-conditioned ones skipped."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tokenize_stages import NAMES, crops, image_table

from pipelines.stages.base import InProcessExecutor, OutputRef, StageContext, StageError
from pipelines.stages.cache_latents import CacheLatents
from pipelines.stages.evaluate import EvaluateTokenizer, EvaluateTokenizerConfig, _ReconActor
from pipelines.stages.tokenize import ImageTokenizeConfig, TokenizeLFQ, TokenizeTiTok
from vgen_core import families
from vgen_core.data import TableStore
from vgen_core.eval.recon import psnr
from vgen_core.tokenizers.io import save_pretrained, weights_digest

CODEBOOK = {"codebook/unique", "codebook/usage_fraction", "codebook/entropy_bits",
            "codebook/perplexity"}
BITS = {"bits/balance_min", "bits/balance_max"}


class _Recorder:
    """A Tracker that keeps what it was given."""

    run_id = None

    def __init__(self):
        self.tags, self.images = {}, {}

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_image(self, name, image, step=None):
        self.images[name] = image

    def __getattr__(self, name):
        return lambda *a, **k: None


def tokenize(kind, cfg, store, ref, fp):
    ctx = StageContext(dag="t", stage=f"tok-{fp}", store=store, row_fingerprint=fp,
                       inputs={"images": {"samples": ref}}, chunk_size=4,
                       error_budget=0.5)
    stage = kind(cfg, ctx)
    result = stage.run(InProcessExecutor(batch_size=3))
    assert result.counts.processed == len(NAMES)
    return result.outputs, stage.model


def evaluate(store, inputs, name, **cfg):
    ctx = StageContext(dag="t", stage=name, store=store, row_fingerprint=f"fp-{name}",
                       inputs=inputs, tracker=_Recorder())
    stage = EvaluateTokenizer(EvaluateTokenizerConfig(**{"num_samples": 0, **cfg}), ctx)
    return stage.run(InProcessExecutor()), stage


def export(model, path: Path) -> OutputRef:
    save_pretrained(model, path)
    return OutputRef("model", path.name, str(path), digest=weights_digest(model))


def seeded(family: str, size: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return families.get(family).build(size, overrides).eval()


def per_image_psnr(rec, x, signed: bool):
    if signed:
        rec, x = (rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2
    return psnr(rec.clamp(0, 1), x, data_range=1.0)


def actor_psnr(store, outputs, resolution) -> dict[str, float]:
    """Per-image PSNR straight from the actor the stage runs (one batch of every image)."""
    actor = _ReconActor(outputs["tokenizer"].to_json(), EvaluateTokenizerConfig(), resolution,
                        "image_png")
    src = outputs["source"]
    b = actor(store.read(src.name, version=src.version))
    return dict(zip(b["sample_id"].to_pylist(), b["psnr"].to_pylist()))


def check_psnr(r, store, outputs, resolution, want_B):
    assert r.metrics["recon/psnr"] == pytest.approx(float(want_B.mean()), rel=1e-9)
    got = actor_psnr(store, outputs, resolution)
    for i, name in enumerate(NAMES[:3]):  # the first images, one by one
        assert got[f"img/{name}"] == pytest.approx(float(want_B[i]), rel=1e-9)
    rows = {x["metric"]: x for x in store.read(r.outputs["results"].name).to_pylist()}
    assert rows["recon/psnr"]["num_samples"] == len(NAMES)
    assert rows["recon/psnr"]["extractor"] is None
    assert rows["recon/rfid"]["extractor"] == "tiny-conv-seed0-v1"
    assert r.metrics["recon/rfid"] >= 0.0
    return rows


def test_lfq_bit_tokens_psnr_codebook_bits_and_samples(tmp_path):
    store = TableStore(str(tmp_path / "store"))
    ref = image_table(store)  # with an undecodable image: quarantined, never evaluated
    outputs, model = tokenize(TokenizeLFQ, ImageTokenizeConfig(size="tiny", resolution=32,
                                                               flip=False), store, ref, "lfq")
    assert outputs["tokenizer"].kind == "model"
    x = crops(32, unit=True)  # MaskBit's [0, 1] (the family's)
    with torch.no_grad():
        q, _, idx, _ = model.encode(x)
        want = per_image_psnr(model.decode(q), x, signed=False)
        np.testing.assert_array_equal(want.numpy(), per_image_psnr(
            model.decode_indices(idx), x, signed=False).numpy())

    # a seeded MaskGIT that fits the tokens (8x8 grid of 8-bit tokens), as train.generator writes
    assert tuple(idx.shape[1:]) == (8, 8)
    gen = seeded("maskgit", "tiny", codebook_size=256, seq_len=64, num_classes=3)
    inputs = {"tokens": outputs, "gen": {"generator": export(gen, tmp_path / "gen")}}
    r, stage = evaluate(store, inputs, "eval", num_samples=6, sample_steps=2)
    rows = check_psnr(r, store, outputs, 32, want)
    assert CODEBOOK | BITS <= set(r.metrics)
    ids = idx.reshape(-1).numpy()
    assert r.metrics["codebook/unique"] == len(np.unique(ids))
    assert r.metrics["codebook/usage_fraction"] == len(np.unique(ids)) / 256
    bits = (ids[:, None] >> np.arange(8)) & 1
    assert r.metrics["bits/balance_min"] == pytest.approx(bits.mean(0).min())
    assert r.metrics["bits/balance_max"] == pytest.approx(bits.mean(0).max())
    assert rows["codebook/unique"]["num_samples"] == len(NAMES)

    # samples: the family's sampler with the stage's steps / guidance, decoded on the 8x8 grid
    from vgen_core.generators.masked import sample

    g = torch.Generator().manual_seed(0)
    toks = sample(gen, torch.arange(6) % 3, steps=2, guidance_scale=2.0, generator=g)
    assert r.metrics["samples/codebook_usage"] == len(np.unique(toks.numpy())) / 256
    assert r.metrics["samples/fid"] >= 0.0
    assert rows["samples/fid"]["num_samples"] == 6
    assert rows["samples/fid"]["extractor"] == "tiny-conv-seed0-v1"
    imgs = stage.ctx.tracker.images
    assert imgs["recon_grid"].ndim == 3 and imgs["samples_grid"].ndim == 3

    # the train.tokenizer export, when among needs, is the one evaluated
    other = seeded("lfq", "tiny", seed=5)
    with torch.no_grad():
        want_other = per_image_psnr(other.decode_indices(other.encode(x)[2]), x, signed=False)
    r2, _ = evaluate(store, {**inputs, "tok": {"tokenizer": export(other, tmp_path / "tok")}},
                     "eval_trained")
    assert r2.metrics["recon/psnr"] == pytest.approx(float(want_other.mean()), rel=1e-9)
    assert not {k for k in r2.metrics if k.startswith("samples/")}  # num_samples: 0


def test_titok_vq_ids_codebook_without_bits(tmp_path):
    store = TableStore(str(tmp_path / "store"))
    ref = image_table(store, broken=False)
    outputs, model = tokenize(TokenizeTiTok, ImageTokenizeConfig(size="tiny", flip=False), store,
                              ref, "titok")
    x = crops(32, unit=True)
    with torch.no_grad():
        _, info = model.encode(x)
        ids = info["min_encoding_indices"]
        want = per_image_psnr(model.decode_tokens(ids), x, signed=False)
    V = model.config.codebook_size
    gen = seeded("maskgit", "tiny", codebook_size=V, seq_len=model.config.num_latent_tokens,
                 num_classes=4)
    inputs = {"tokens": outputs, "gen": {"generator": export(gen, tmp_path / "gen")}}
    r, stage = evaluate(store, inputs, "eval", num_samples=4, sample_steps=2, resolution=64)
    check_psnr(r, store, outputs, 32, want)  # the side table's 32, not the config's 64
    assert CODEBOOK <= set(r.metrics) and not BITS & set(r.metrics)
    assert r.metrics["codebook/usage_fraction"] == len(torch.unique(ids)) / V
    assert 0.0 < r.metrics["samples/codebook_usage"] <= 1.0 and "samples/fid" in r.metrics
    assert stage.ctx.tracker.images["samples_grid"].ndim == 3


@pytest.mark.parametrize("family,size,resolution,overrides", [
    ("kl_vae", "tiny", 16, {"scale_factor": 0.18215}),
    ("titok", "tiny-vae", None, {}),
])
def test_latents_posterior_mean_no_codebook(tmp_path, family, size, resolution, overrides):
    store = TableStore(str(tmp_path / "store"))
    ref = image_table(store, broken=False)
    cfg = ImageTokenizeConfig(model=family, size=size, resolution=resolution, flip=False,
                              overrides=overrides)
    outputs, model = tokenize(CacheLatents, cfg, store, ref, family)
    signed = families.get(family).pixel_range == "signed"
    res = resolution or model.config.image_size
    x = crops(res, unit=not signed)
    with torch.no_grad():
        if family == "kl_vae":
            mean, _ = model.encode(x)  # unscaled; decode undoes the scale the stage applies
            rec = model.decode(mean)
        else:
            _, info = model.encode(x, sample_posterior=False)
            rec = model.decode(info["posterior_mean"])
    want = per_image_psnr(rec, x, signed=signed)
    r, stage = evaluate(store, {"tokens": outputs}, "eval")
    assert r.metrics["recon/psnr"] == pytest.approx(float(want.mean()), rel=1e-6)
    got = actor_psnr(store, outputs, res)
    for i, name in enumerate(NAMES[:3]):
        assert got[f"img/{name}"] == pytest.approx(float(want[i]), rel=1e-6)
    assert set(r.metrics) == {"recon/psnr", "recon/rfid"}  # no ids: no codebook, no bits
    assert stage.ctx.tracker.images["recon_grid"].shape[0] > res


def test_text_conditioned_generator_is_skipped_with_a_note(tmp_path):
    store = TableStore(str(tmp_path / "store"))
    ref = image_table(store, broken=False)
    outputs, model = tokenize(TokenizeTiTok, ImageTokenizeConfig(size="tiny", flip=False), store,
                              ref, "titok")
    spec = next(s for s in families.all_specs("generator") if s.conditioning == "text"
                and s.output == "tokens")
    gen = seeded(spec.name, "tiny" if "tiny" in spec.sizes else next(iter(spec.sizes)))
    r, stage = evaluate(store, {"tokens": outputs,
                                "gen": {"generator": export(gen, tmp_path / "gen")}}, "eval",
                        num_samples=4)
    assert not {k for k in r.metrics if k.startswith("samples/")}
    assert "text" in stage.ctx.tracker.tags["vgen.eval.skipped.samples"]
    assert "samples_grid" not in stage.ctx.tracker.images


def test_input_mistakes_are_clear(tmp_path):
    store = TableStore(str(tmp_path / "store"))
    ref = image_table(store, broken=False)
    outputs, _ = tokenize(TokenizeTiTok, ImageTokenizeConfig(size="tiny", flip=False), store, ref,
                          "titok")
    older = {k: v for k, v in outputs.items() if k != "tokenizer"}
    with pytest.raises(StageError, match="re-run 'tokens'"):
        evaluate(store, {"tokens": older}, "eval")
    moved = {**outputs, "tokenizer": OutputRef(**{**outputs["tokenizer"].to_json(),
                                                  "digest": "0" * 64})}
    with pytest.raises(StageError, match="not the one recorded"):
        evaluate(store, {"tokens": moved}, "eval")
    with pytest.raises(StageError, match="exactly one tokenize"):
        evaluate(store, {"gen": {"generator": outputs["tokenizer"]}}, "eval")


def test_no_family_names_in_the_stage():
    import pipelines.stages.evaluate as mod

    text = Path(mod.__file__).read_text()
    for name in families.names():
        assert not re.search(rf"[\"']{re.escape(name)}[\"']", text), name
