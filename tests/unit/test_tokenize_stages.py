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


# --------------------------------------------------------------------------------------------------
# how the actor encodes (ImageEncodeConfig: precision, encode_batch, compile; device_encode)
# --------------------------------------------------------------------------------------------------


def _stage(kind, cfg, store, ref, resources=None):
    ctx = StageContext(dag="t", stage="tok", store=store, row_fingerprint="fp",
                       inputs={"images": {"samples": ref}}, resources=resources)
    return kind(cfg, ctx)


def test_encode_settings_leave_the_cpu_fingerprint_as_before_and_bf16_enters_it(tmp_path):
    from pipelines.dag.spec import ResourcesSpec
    from pipelines.stages.tokenize import ImageEncodeConfig

    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    # the hashed config is the one image kinds always had: the new settings are excluded
    assert ImageEncodeConfig(compile=True, encode_batch="auto", precision="bf16").model_dump() \
        == ImageTokenizeConfig().model_dump()
    cpu = _stage(TokenizeLFQ, ImageEncodeConfig(resolution=32), store, ref)
    assert set(cpu.row_fingerprint_parts()) == {"weights", "pixel_range"}
    assert cpu.encode_precision() == "fp32"
    assert "precision" not in cpu.commit_metadata()["vgen.preprocess"]
    gpu = ResourcesSpec(gpus=1)
    cases = [  # (config, resources) -> precision
        (ImageEncodeConfig(resolution=32), gpu, "bf16"),
        (ImageEncodeConfig(resolution=32, device="cuda"), None, "bf16"),
        (ImageEncodeConfig(resolution=32, device="cpu"), gpu, "fp32"),
        (ImageEncodeConfig(resolution=32, precision="fp32"), gpu, "fp32"),
        (ImageEncodeConfig(resolution=32, precision="bf16"), None, "bf16"),
        (ImageTokenizeConfig(resolution=32), gpu, "fp32"),  # a config without the field
    ]
    for cfg, res, want in cases:
        stage = _stage(TokenizeLFQ, cfg, store, ref, res)
        parts = stage.row_fingerprint_parts()
        assert stage.encode_precision() == want, (cfg, res)
        assert parts.get("precision") == ("bf16" if want == "bf16" else None)
        assert {k: v for k, v in parts.items() if k != "precision"} \
            == cpu.row_fingerprint_parts()
        assert ('"precision": "bf16"' in stage.commit_metadata()["vgen.preprocess"]) \
            == (want == "bf16")
    # the video kind encodes features, not images: no precision setting, fp32
    dt = _stage(TokenizeDeltaTok, TokenizeDeltaTokConfig(size="tiny"), store, ref, gpu)
    assert dt.encode_precision() == "fp32"
    with pytest.raises(ValueError):
        ImageEncodeConfig(encode_batch=0)


def test_micro_batches_and_auto_on_cpu_give_the_rows_of_whole_batches(tmp_path):
    from pipelines.stages.tokenize import ImageEncodeConfig

    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    rows = {}
    for name, kind, batch in (("whole", TokenizeLFQ, None), ("two", TokenizeLFQ, 2),
                              ("auto", TokenizeLFQ, "auto"), ("latents", CacheLatents, None),
                              ("latents-1", CacheLatents, 1)):
        model = {"model": "kl_vae", "resolution": 16} if kind is CacheLatents else \
            {"resolution": 32}
        r, stage = run(kind, ImageEncodeConfig(size="tiny", encode_batch=batch, **model),
                       store, ref, fp=name)
        assert r.counts.processed == 5
        rows[name] = store.read(r.outputs["samples"].name).sort_by("sample_id")
        if batch == "auto":  # no GPU memory to size it from: the whole batch
            assert stage.device_encoder().micro_batch is None
    cols = ["sample_id", "indices", "indices_flip", "bits_packed"]
    assert rows["two"].select(cols).equals(rows["whole"].select(cols))
    assert rows["auto"].select(cols).equals(rows["whole"].select(cols))
    for col in ("moments", "moments_flip"):  # conv sums may reassociate with the batch size
        a = np.stack(rows["latents"][col].to_numpy(zero_copy_only=False))
        b = np.stack(rows["latents-1"][col].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_bf16_rows_are_the_models_autocast_encode_and_differ_from_fp32(tmp_path):
    from pipelines.stages.tokenize import ImageEncodeConfig

    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    r16, stage = run(TokenizeLFQ, ImageEncodeConfig(resolution=32, precision="bf16"), store, ref,
                     fp="bf16")
    r32, _ = run(TokenizeLFQ, ImageEncodeConfig(resolution=32), store, ref, fp="fp32")
    bf16 = {x["sample_id"]: x for x in store.read(r16.outputs["samples"].name).to_pylist()}
    fp32 = {x["sample_id"]: x for x in store.read(r32.outputs["samples"].name).to_pylist()}
    x = crops(32, unit=True).contiguous()  # the stage's layout: bf16 CPU convolutions depend
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        # on it and on the batch shape, so the executor's batches of 3 and 2 too
        idx = torch.cat([stage.model.encode(x[i:i + 3])[2] for i in (0, 3)])
        idx_flip = torch.cat([stage.model.encode(x[i:i + 3].flip(-1).contiguous())[2]
                              for i in (0, 3)])
    differ = 0
    for i, name in enumerate(NAMES):
        row = bf16[f"img/{name}"]
        assert row["indices"] == idx[i].flatten().tolist()
        assert row["indices_flip"] == idx_flip[i].flatten().tolist()
        differ += sum(a != b for a, b in zip(row["indices"], fp32[f"img/{name}"]["indices"]))
    # measured: 13 of the 320 token ids change (an id changes when any of its 8 bits flips)
    assert 0 < differ < 0.1 * 5 * 64


def test_auto_micro_batch_rule():
    from vgen_core.tokenizers.device_encode import AUTO_CAP, auto_micro_batch

    MiB, GiB = 2**20, 2**30
    # (0.7 * 80 GiB - 1 GiB) / 100 MiB = 563.2 -> 560 (a multiple of 8)
    assert auto_micro_batch(80 * GiB, 1 * GiB, 100 * MiB) == 560
    # two actors on one GPU: half the budget -> (28 GiB - 1 GiB) / 100 MiB = 276.5 -> 272
    assert auto_micro_batch(80 * GiB, 1 * GiB, 100 * MiB, share=0.5) == 272
    assert auto_micro_batch(80 * GiB, 0, 1 * MiB) == AUTO_CAP == 1024
    assert auto_micro_batch(10 * MiB, 1 * GiB, 100 * MiB) == 1  # never below one
    assert auto_micro_batch(1 * GiB, 0, 100 * MiB) == 7  # under 8: not rounded


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [
    pytest.param({"precision": "fp32"}, id="fp32-whole"),
    pytest.param({"precision": "fp32", "encode_batch": 3}, id="fp32-chunks"),
    pytest.param({"precision": "fp32", "encode_batch": "auto"}, id="fp32-auto"),
    pytest.param({"precision": "bf16", "encode_batch": 4}, id="bf16"),
    pytest.param({"precision": "bf16", "encode_batch": 4, "compile": True}, id="bf16-compiled"),
])
def test_cuda_actor_encodes_like_the_cpu_reference(tmp_path, settings):
    """The GPU path (pinned uploads on a side stream, GPU flip, channels-last, chunks, one sync)
    gives the rows of the CPU path in the same precision (CPU autocast for bf16), up to the ids
    whose bits the two devices' sums (TF32 / bf16 convolutions on the GPU) put on the other side
    of 0: a row or view mix-up would change nearly every id (1 in 256 match by chance)."""
    from pipelines.stages.tokenize import ImageEncodeConfig

    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    cpu_cfg = ImageEncodeConfig(resolution=32, device="cpu", precision=settings["precision"])
    r_cpu, _ = run(TokenizeLFQ, cpu_cfg, store, ref, fp="cpu")
    r_gpu, stage = run(TokenizeLFQ, ImageEncodeConfig(resolution=32, device="cuda", **settings),
                       store, ref, fp="gpu")
    assert stage.device.type == "cuda" and stage.device_encoder().cuda
    if settings.get("encode_batch") == "auto":
        assert isinstance(stage.device_encoder().micro_batch, int)
    a = store.read(r_cpu.outputs["samples"].name).sort_by("sample_id")
    b = store.read(r_gpu.outputs["samples"].name).sort_by("sample_id")
    for col in ("indices", "indices_flip"):
        x = np.stack(a[col].to_numpy(zero_copy_only=False))
        y = np.stack(b[col].to_numpy(zero_copy_only=False))
        assert x.shape == y.shape == (5, 64)
        assert (x != y).mean() < 0.25, (col, (x != y).mean())
    gpu = store.read(r_gpu.outputs["samples"].name)
    assert gpu["indices"].to_pylist() != gpu["indices_flip"].to_pylist()


@pytest.mark.parametrize("family,size,res", [("lfq", "tiny", 32), ("kl_vae", "tiny", 16),
                                             ("titok", "tiny", 32)])
def test_cuda_path_bookkeeping_on_cpu_with_streams_faked(monkeypatch, family, size, res):
    """``DeviceEncoder``'s GPU path (chunks of crops + on-device flips in one forward, uploads
    one chunk ahead, outputs split back into views) run on CPU with the stream, event and
    pinned-memory calls as no-ops: every micro-batch gives the CPU path's outputs (measured: ids
    and bits equal, KL moments within 9e-7: the fused forward batches crops and flips)."""
    import contextlib

    from vgen_core import families
    from vgen_core.tokenizers.device_encode import DeviceEncoder

    class FakeStream:
        def wait_event(self, event):
            pass

    class FakeEvent:
        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None, raising=False)
    spec = families.get(family)
    torch.manual_seed(0)
    model = spec.build(size).eval()
    images = np.random.default_rng(0).integers(0, 256, (7, res, res, 3), dtype=np.uint8)
    args = (model, spec.hook("encode"), families.pixel_range_of(spec), "cpu")
    want = DeviceEncoder(*args).encode_views(images, flip=True)
    for micro_batch in (None, 4, 3, 2):  # 2: one image (crop + flip) per forward
        enc = DeviceEncoder(*args, micro_batch=micro_batch)
        enc.cuda, enc._copy_stream = True, FakeStream()
        monkeypatch.setattr(enc, "_pinned_buffer",
                            lambda shape: torch.empty(shape, dtype=torch.uint8))
        got = enc._encode_cuda(images, flip=True)
        assert len(got) == 2
        for view in range(2):
            assert got[view].keys() == want[view].keys()
            for k, a in want[view].items():
                b = got[view][k]
                assert (a.shape, a.dtype) == (b.shape, b.dtype) and a.shape[0] == 7
                if a.dtype.kind == "f":
                    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
                else:
                    np.testing.assert_array_equal(b, a)


def test_pixels_of_a_clean_prepared_batch_are_a_view_of_the_column(tmp_path):
    """A prepared batch where every image decoded gives its pixels as one view of the Arrow
    column's data buffer (no per-row copies), equal to the per-row path, and the same rows."""
    store = TableStore(str(tmp_path))
    ref = image_table(store, broken=False)
    ctx = StageContext(dag="t", stage="tok", store=store, row_fingerprint="fp",
                       inputs={"images": {"samples": ref}})
    stage = TokenizeFSQ(ImageTokenizeConfig(size="tiny", flip=True), ctx)
    stage.setup()
    batch = store.read("t/images", columns=stage.input_columns())
    prepared = stage.prepare_batch(batch, **stage.prepare_args())
    keep, images, quarantine = stage.decode_batch(prepared)
    assert keep == [0, 1, 2, 3, 4] and quarantine == [] and images.shape == (5, 32, 32, 3)
    column = prepared["_pixels"].chunk(0)
    assert np.shares_memory(images, np.frombuffer(column.buffers()[2], np.uint8))
    per_row = np.stack([np.frombuffer(b, np.uint8).reshape(32, 32, 3)
                        for b in prepared["_pixels"].to_pylist()])
    np.testing.assert_array_equal(images, per_row)
    # the column may come back from Ray's transport as large_binary (64-bit offsets)
    large = prepared.cast(prepared.schema.set(prepared.schema.get_field_index("_pixels"),
                                              pa.field("_pixels", pa.large_binary())))
    np.testing.assert_array_equal(stage.decode_batch(large)[1], per_row)
    sliced = pa.concat_tables([prepared.slice(0, 2), prepared.slice(2)])  # two chunks
    np.testing.assert_array_equal(stage.decode_batch(sliced)[1], per_row)
    assert stage.process_batch(prepared).rows.equals(stage.process_batch(batch).rows)
