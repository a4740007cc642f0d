"""Tokenize / cache stages in-process on real photos and real-format curated tables: rows equal
the model's own encoding of the declared preprocessing, ids are integers, flips are baked,
bad samples are quarantined with the column and reason, config mistakes are clear errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.stages.base import InProcessExecutor, OutputRef, StageContext, StageError
from pipelines.stages.cache_latents import CacheLatents
from pipelines.stages.deltatok import TokenizeDeltaTok, TokenizeDeltaTokConfig
from pipelines.stages.tokenize import (ImageTokenizeConfig, TokenizeFSQ, TokenizeLFQ,
                                       TokenizeTiTok, preprocess)
from vgen_core.data import TableStore, content_digest
from vgen_core.data.sample_images import PHOTOS, encode_png, load_photo, to_rgb
from vgen_core.data.schemas import IMAGE_SAMPLES
from vgen_core.tokenizers.lfq import unpack_bits

NAMES = PHOTOS[:5]


def image_table(store: TableStore, broken: bool = True) -> OutputRef:
    rows = []
    for i, name in enumerate(NAMES):
        png = encode_png(to_rgb(load_photo(name)))
        rows.append({"sample_id": f"img/{name}", "content_digest": content_digest(png),
                     "source": f"skimage://{name}", "image_png": png, "height": 1, "width": 1,
                     "label": i, "caption": f"a photo of {name}"})
    if broken:
        rows.append({"sample_id": "img/broken", "content_digest": content_digest(b"xx"),
                     "source": "/data/broken.png", "image_png": b"\x89PNG not really",
                     "height": 1, "width": 1, "label": 0, "caption": None})
    v = store.append("t/images", pa.Table.from_pylist(rows, schema=IMAGE_SAMPLES))
    return OutputRef("table", "t/images", store.uri("t/images"), version=v)


def run(kind, cfg, store, ref, fp="fp", budget=0.5):
    ctx = StageContext(dag="t", stage="tok", store=store, row_fingerprint=fp,
                       inputs={"images": {"samples": ref}}, error_budget=budget, chunk_size=4)
    stage = kind(cfg, ctx)
    return stage.run(InProcessExecutor(batch_size=3)), stage


def crops(res: int, unit: bool) -> torch.Tensor:
    x = np.stack([preprocess(to_rgb(load_photo(n)), res) for n in NAMES])
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    return t / 255.0 if unit else t / 127.5 - 1.0


def test_fsq_bit_tokens_equal_the_model_and_broken_image_is_quarantined(tmp_path):
    store = TableStore(str(tmp_path))
    ref = image_table(store)
    class SpreadFSQ(TokenizeFSQ):
        """The seeded tiny FSQ maps every patch to one code (its projection is dominated by the
        bias); without the bias and with a larger gain the bits follow the image, so a broken
        flip or a row mix-up cannot pass unnoticed."""

        def load_model(self):
            model = super().load_model()
            with torch.no_grad():
                model.quantize.in_proj.bias.zero_()
                model.quantize.in_proj.weight.mul_(50.0)
            return model

    r, stage = run(SpreadFSQ, ImageTokenizeConfig(size="tiny", flip=True), store, ref)
    assert (r.counts.processed, r.counts.quarantined) == (5, 1)
    (q,) = store.read("t/tok__quarantine").to_pylist()
    assert q["sample_id"] == "img/broken" and q["check"] == "decode"
    assert "column 'image_png'" in q["reason"] and q["source"] == "/data/broken.png"

    rows = {x["sample_id"]: x for x in store.read(r.outputs["samples"].name).to_pylist()}
    assert r.outputs["samples"].name == "t/tok/fp"
    assert store.schema("t/tok/fp").field("indices").type.value_type == pa.int32()
    with torch.no_grad():
        _, bits, idx = stage.model.encode(crops(32, unit=False))
        _, _, idx_flip = stage.model.encode(crops(32, unit=False).flip(-1))
    assert len(torch.unique(idx)) > 4 and not torch.equal(idx, idx_flip)
    for i, name in enumerate(NAMES):
        row = rows[f"img/{name}"]
        assert (row["grid_h"], row["grid_w"], row["token_bits"]) == (4, 4, 8)
        assert row["indices"] == idx[i].tolist()
        assert row["indices_flip"] == idx_flip[i].tolist()
        unpacked = unpack_bits(np.frombuffer(row["bits_packed"], np.uint8).reshape(16, 1), 8)
        assert unpacked.astype(bool).tolist() == bits[i].bool().tolist()
        assert row["label"] == i


def test_lfq_needs_a_resolution_and_titok_ids_match(tmp_path):
    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    with pytest.raises(StageError, match="set with.resolution"):
        run(TokenizeLFQ, ImageTokenizeConfig(size="tiny"), store, ref)
    r, _ = run(TokenizeLFQ, ImageTokenizeConfig(size="tiny", resolution=32), store, ref)
    assert r.counts.processed == 5

    r, stage = run(TokenizeTiTok, ImageTokenizeConfig(size="tiny", flip=False), store, ref,
                   fp="fp2")
    rows = {x["sample_id"]: x for x in store.read(r.outputs["samples"].name).to_pylist()}
    with torch.no_grad():
        _, info = stage.model.encode(crops(32, unit=True))
    ids = info["min_encoding_indices"]
    for i, name in enumerate(NAMES):
        row = rows[f"img/{name}"]
        assert row["indices"] == ids[i].tolist() and row["indices_flip"] is None
        assert (row["num_tokens"], row["codebook_size"]) == (8, stage.model.config.codebook_size)
        assert row["caption"] == f"a photo of {name}"


def test_titok_config_mistakes_are_clear(tmp_path):
    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    with pytest.raises(StageError, match="cache.latents"):
        run(TokenizeTiTok, ImageTokenizeConfig(size="tiny-vae"), store, ref)
    with pytest.raises(StageError, match="resolution: 32"):
        run(TokenizeTiTok, ImageTokenizeConfig(size="tiny", resolution=64), store, ref)
    with pytest.raises(StageError, match="takes model titok | tatitok"):
        run(TokenizeTiTok, ImageTokenizeConfig(model="lfq"), store, ref)


def test_latent_cache_moments_and_non_finite_quarantine(tmp_path):
    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    cfg = ImageTokenizeConfig(model="kl_vae", size="tiny", resolution=16)
    r, stage = run(CacheLatents, cfg, store, ref)
    rows = {x["sample_id"]: x for x in store.read(r.outputs["samples"].name).to_pylist()}
    with torch.no_grad():
        m = stage.model.encode_moments(crops(16, unit=False))
        mf = stage.model.encode_moments(crops(16, unit=False).flip(-1))
    for i, name in enumerate(NAMES):
        row = rows[f"img/{name}"]
        assert row["shape"] == [8, 8, 8] and row["scale_factor"] == 1.0
        got = np.asarray(row["moments"], np.float32).reshape(row["shape"])
        np.testing.assert_allclose(got, m[i].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(row["moments_flip"]).reshape(8, 8, 8),
                                   mf[i].numpy(), rtol=1e-4, atol=1e-5)

    # a NaN moment quarantines that sample only
    class NaNFirst(CacheLatents):
        def encode(self, x):
            out = super().encode(x)
            out["moments"][0, 0, 0, 0] = np.nan
            return out

    r, _ = run(NaNFirst, cfg, store, ref, fp="fp-nan")
    assert (r.counts.processed, r.counts.quarantined) == (5 - 2, 2)  # 2 batches of 3 and 2
    q = store.read("t/tok__quarantine").to_pylist()
    assert {x["check"] for x in q} == {"non_finite"}
    assert all("NaN/Inf" in x["reason"] for x in q)


def test_titok_kl_posteriors_are_cached(tmp_path):
    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    r, stage = run(CacheLatents, ImageTokenizeConfig(model="titok", size="tiny-vae", flip=False),
                   store, ref)
    row = store.read(r.outputs["samples"].name).to_pylist()[0]
    C, K = stage.model.config.token_size, stage.model.config.num_latent_tokens
    assert row["shape"] == [2 * C, 1, K] and row["moments_flip"] is None
    with pytest.raises(StageError, match="tokenize.titok"):
        run(CacheLatents, ImageTokenizeConfig(model="titok", size="tiny"), store, ref, fp="x")


def test_delta_tokens_from_curated_vicas(tmp_path):
    from pipelines.stages.curate import CurateViCaS, CurateViCaSConfig
    from vgen_core.formats.vicas_samples import write_vicas_sample_dataset

    store = TableStore(str(tmp_path / "s"))
    root = tmp_path / "raw"
    write_vicas_sample_dataset(root, n_videos=2, seed=0)
    ctx = StageContext(dag="t", stage="vc", store=store, row_fingerprint="c")
    cur = CurateViCaS(CurateViCaSConfig(root=str(root)), ctx).run(InProcessExecutor(batch_size=2))
    assert cur.counts.processed == 2
    cfg = TokenizeDeltaTokConfig(size="tiny", vfm_size="tiny", resolution=32, max_frames=4,
                                 frame_stride=2)
    ctx = StageContext(dag="t", stage="delta", store=store, row_fingerprint="d",
                       inputs={"vc": {"samples": cur.outputs["samples"]}})
    stage = TokenizeDeltaTok(cfg, ctx)
    r = stage.run(InProcessExecutor(batch_size=1))
    assert r.counts.processed == 2
    curated = {x["sample_id"]: x for x in store.read("t/vc").to_pylist()}
    for row in store.read(r.outputs["samples"].name).to_pylist():
        src = curated[row["sample_id"]]
        assert row["frame_indices"] == [0, 2, 4, 6][: len(row["frame_indices"])]
        assert row["num_steps"] == len(row["frame_indices"]) - 1 and row["dim"] == 64
        assert row["timestamps"] == pytest.approx([i / src["fps"] for i in row["frame_indices"]])
        from vgen_core.data.images import decode_image

        clip = np.stack([preprocess(decode_image(src["frames"][i]), 32)
                         for i in row["frame_indices"]])
        with torch.no_grad():
            feats = stage.vfm(torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0)
            want = stage.model.tokenize_clip(feats[None])[0]
        got = np.asarray(row["delta"], np.float32).reshape(row["num_steps"], row["dim"])
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_prepared_batches_give_the_same_rows_and_quarantine(tmp_path):
    """On Ray, decoding runs as a task ahead of the actor (``prepare_batch``); the actor's rows
    and quarantine records must equal decoding inline, and a resolution mismatch is refused."""
    store = TableStore(str(tmp_path))
    ref = image_table(store)
    ctx = StageContext(dag="t", stage="tok", store=store, row_fingerprint="fp",
                       inputs={"images": {"samples": ref}})
    stage = TokenizeFSQ(ImageTokenizeConfig(size="tiny", flip=True), ctx)
    assert stage.prepare_args() == {"resolution": 32}
    stage.setup()
    batch = store.read("t/images", columns=stage.input_columns())
    prepared = stage.prepare_batch(batch, **stage.prepare_args())
    assert "image_png" not in prepared.column_names
    assert prepared["_error"].null_count == 5  # the broken one has its reason
    inline, ahead = stage.process_batch(batch), stage.process_batch(prepared)
    assert inline.rows.equals(ahead.rows) and inline.rows.num_rows == 5
    assert inline.quarantine == ahead.quarantine and len(ahead.quarantine) == 1
    assert "column 'image_png'" in ahead.quarantine[0]["reason"]
    with pytest.raises(StageError, match="prepared at"):
        stage.process_batch(stage.prepare_batch(batch, resolution=16))
    # the video stage decodes inside its actor
    assert TokenizeDeltaTok(TokenizeDeltaTokConfig(size="tiny"), ctx).prepare_args() is None


def test_in_process_reading_streams_the_todo_rows(tmp_path):
    from pipelines.stages.base import Work, iter_work_batches

    store = TableStore(str(tmp_path))
    for k in range(3):  # 3 files of 7 rows
        store.append("t/x", pa.table({"sample_id": [f"s{k}-{i}" for i in range(7)],
                                      "content_digest": [f"d{i}" for i in range(7)],
                                      "v": list(range(7))}))
    todo = pa.table({"sample_id": [f"s{k}-{i}" for k in range(3) for i in range(0, 7, 2)],
                     "content_digest": [f"d{i}" for k in range(3) for i in range(0, 7, 2)]})
    work = Work(total=21, skipped=9, table_name="t/x", table_version=store.version("t/x"),
                todo=todo, columns=["sample_id", "content_digest"])
    batches = list(iter_work_batches(store, work, 5))
    assert [b.num_rows for b in batches] == [5, 5, 2]
    got = sorted(x for b in batches for x in b["sample_id"].to_pylist())
    assert got == sorted(todo["sample_id"].to_pylist())
    assert batches[0].column_names == ["sample_id", "content_digest"]
    everything = Work(total=21, skipped=0, table_name="t/x", table_version=None,
                      todo=store.read("t/x", columns=["sample_id", "content_digest"]))
    assert sum(b.num_rows for b in iter_work_batches(store, everything, 4)) == 21


def test_decode_tasks_never_share_the_actors_resources():
    from pipelines.dag.ray_exec import PREPARE_CPUS, prepare_cpus

    assert prepare_cpus({"CPU": 2.0}, 1, 1.0) == PREPARE_CPUS  # 1 CPU free: a share of it
    assert prepare_cpus({"CPU": 64.0}, 8, 1.0) == pytest.approx(0.9)  # 1.0 would fuse
    assert prepare_cpus({"CPU": 64.0}, 8, 4.0) == 1.0
    assert prepare_cpus({"CPU": 2.0}, 1, PREPARE_CPUS) == pytest.approx(0.9 * PREPARE_CPUS)
