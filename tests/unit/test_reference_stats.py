"""Reference statistics: the Delta cache, ADM reference batches, the comparability flag, and the
``evaluate.generation`` stage run in-process (no Ray) on top of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vgen_core.data import TableStore
from vgen_core.eval.extractors import Features, TinyConvExtractor
from vgen_core.eval.fid import FeatureStats
from vgen_core.eval.reference import (
    REFERENCE_TABLE,
    FeatureSubset,
    ReferenceKey,
    ReferenceStats,
    ReferenceStatsCache,
    adm_comparable,
    generation_metrics,
    import_adm_npz,
)


def _ref(rng, key, n=40, d=6, s=5, digest="abc") -> ReferenceStats:
    x = rng.normal(size=(n, d))
    sp = rng.normal(size=(n, s))
    subset = FeatureSubset(10)
    subset.add([f"id{i}" for i in range(n)], x)
    return ReferenceStats(key, "delta", FeatureStats.from_features(x, key.extractor),
                          FeatureStats.from_features(sp, key.extractor, "spatial"),
                          subset.result(), digest, False, {"preprocess": {"resolution": 32}})


def test_cache_round_trip_and_keying(tmp_path):
    rng = np.random.default_rng(0)
    cache = ReferenceStatsCache(TableStore(str(tmp_path)))
    key = ReferenceKey("/data/tables/curated", 3, "tiny-conv-seed0-v1", 32)
    assert cache.get(key) is None  # no table yet
    ref = _ref(rng, key)
    cache.put(ref)
    got = cache.get(key, "abc")
    assert got is not None and got.cached and not ref.cached
    assert got.pool.count == 40 and got.pool.extractor == key.extractor
    np.testing.assert_allclose(got.pool.mean, ref.pool.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.pool.cov, ref.pool.cov, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.spatial.cov, ref.spatial.cov, rtol=0, atol=1e-12)
    assert got.spatial.feature == "spatial"
    np.testing.assert_array_equal(got.features_MD, ref.features_MD.astype(np.float32))
    assert got.features_MD.flags.writeable
    assert got.comparable is False and got.details == {"preprocess": {"resolution": 32}}
    # the reloaded stats are exact enough that FID against the original is ~0
    assert abs(got.pool.frechet_distance(ref.pool)) < 1e-6
    # every part of the key counts, and a different source digest is a miss
    for other in (ReferenceKey(key.source_uri, 4, key.extractor, 32),
                  ReferenceKey(key.source_uri, 3, "inception-v3-fid-tf1", 32),
                  ReferenceKey(key.source_uri, 3, key.extractor, 64),
                  ReferenceKey("/data/tables/other", 3, key.extractor, 32)):
        assert cache.get(other) is None
    assert cache.get(key, "another-digest") is None
    # a newer entry for the same key (source re-created, new digest) is served for its digest
    cache.put(_ref(rng, key, digest="def"))
    assert cache.get(key, "def").source_digest == "def"
    assert cache.get(key, "abc").source_digest == "abc"
    assert TableStore(str(tmp_path)).read(REFERENCE_TABLE).num_rows == 2


def test_feature_subset_does_not_depend_on_order_or_batching():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    keys = [f"s{i}" for i in range(50)]
    a = FeatureSubset(7)
    a.add(keys, x)
    b = FeatureSubset(7)
    perm = rng.permutation(50)
    for chunk in np.array_split(perm, 6):
        b.add([keys[i] for i in chunk], x[chunk])
    np.testing.assert_array_equal(a.result(), b.result())
    assert a.result().shape == (7, 4)
    assert FeatureSubset(0).result() is None


class _InceptionStandIn:
    """Stands in for the InceptionV3 port (no weights here): same name, any fixed features."""

    name, dims = "inception-v3-fid-tf1", 64

    def __init__(self):
        self._net = TinyConvExtractor(seed=3)

    def __call__(self, images):
        f = self._net(images)
        return Features(self.name, f.pool_BD, f.logits_BK, f.spatial_BS)


def _write_adm(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_adm_npz_moments_are_used_as_is_and_comparable_with_inception(tmp_path):
    rng = np.random.default_rng(2)
    d = _InceptionStandIn.dims
    a = rng.normal(size=(d, d))
    mu, sigma = rng.normal(size=d), a @ a.T / d + np.eye(d)
    images = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    _write_adm(path, mu=mu, sigma=sigma, mu_s=mu[:5], sigma_s=sigma[:5, :5], arr_0=images)
    ref = import_adm_npz(str(path), _InceptionStandIn(), max_features=8)
    assert ref.comparable and adm_comparable(ref.key.extractor)
    assert ref.key == ReferenceKey(str(path), -1, "inception-v3-fid-tf1", 0)
    np.testing.assert_array_equal(ref.pool.mean, mu)
    np.testing.assert_array_equal(ref.pool.cov, sigma)
    assert ref.pool.count is None  # ADM's moments carry no count: compare-only
    assert ref.spatial.dims == 5
    assert ref.features_MD.shape == (8, d)  # arr_0 gives the precision/recall points
    assert ref.details["images"] == [12, 16, 16, 3]
    # cache round trip keeps the flag and the compare-only moments
    cache = ReferenceStatsCache(TableStore(str(tmp_path / "store")))
    cache.put(ref)
    got = cache.get(ref.key)
    assert got.comparable and got.kind == "adm_npz" and got.pool.count is None
    np.testing.assert_allclose(got.pool.cov, sigma, atol=0)


def test_adm_npz_images_with_another_extractor_are_re_extracted_not_comparable(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(10, 24, 24, 3), dtype=np.uint8)
    d = TinyConvExtractor.dims
    path = tmp_path / "ref.npz"
    # the moments here are in Inception space: tiny-conv must not use them
    _write_adm(path, mu=np.zeros(2048), sigma=np.eye(2048), arr_0=images)
    ext = TinyConvExtractor(seed=0)
    ref = import_adm_npz(str(path), ext, batch_size=4)
    assert not ref.comparable and ref.key.extractor == ext.name
    direct = ext(torch.from_numpy(images).permute(0, 3, 1, 2)).pool_BD.double().numpy()
    assert ref.pool.count == 10 and ref.pool.dims == d
    np.testing.assert_allclose(ref.pool.mean, direct.mean(0), atol=1e-10)
    np.testing.assert_allclose(ref.pool.cov, np.cov(direct, rowvar=False), atol=1e-10)
    assert ref.spatial is not None and ref.features_MD.shape == (10, d)
    # moments alone are refused, saying what would make them usable
    only = tmp_path / "moments.npz"
    _write_adm(only, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="extractor_weights"):
        import_adm_npz(str(only), ext)


def test_generation_metrics_name_skips_and_refuse_other_extractors():
    rng = np.random.default_rng(4)
    key = ReferenceKey("u", 0, "tiny-conv-seed0-v1", 32)
    ref = _ref(rng, key, n=30, d=4, s=3)
    gen = rng.normal(size=(20, 4))
    pool = FeatureStats.from_features(gen, key.extractor)
    spatial = FeatureStats.from_features(rng.normal(size=(20, 3)), key.extractor, "spatial")
    logits = rng.normal(size=(20, 10))
    m, notes = generation_metrics(ref, pool, spatial, gen, logits)
    assert set(m) == {"fid", "sfid", "is", "is_std", "precision", "recall"} and not notes
    assert 0.0 <= m["precision"] <= 1.0 and m["is"] >= 1.0
    m, notes = generation_metrics(ref, pool, None, gen[:3], None)
    assert set(m) == {"fid"} and "k=3" in notes["precision"] and "sfid" in notes
    other = FeatureStats.from_features(gen, "inception-v3-fid-pt")
    with pytest.raises(ValueError, match="not comparable"):
        generation_metrics(ref, other, None, gen, None)


# ---------------------------------------------------------------------------------------------
# evaluate.generation, in-process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """ingest.images -> tokenize.titok (tiny, seeded) through the runner in-process, plus a
    seeded MaskGIT export that fits the tokens (as train.generator would write it)."""
    from pipelines.dag.runner import Runner
    from pipelines.dag.spec import parse_dag
    from pipelines.dag.state import StageState
    from pipelines.stages.base import OutputRef
    from vgen_core.generators.masked import maskgit_config
    from vgen_core.tokenizers.io import save_pretrained, weights_digest
    from vgen_core.tracking import NullTracker

    tmp = tmp_path_factory.mktemp("evalgen")
    store = TableStore(str(tmp / "store"))
    dag = parse_dag({"name": "t", "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": "skimage://", "crops_per_image": 2, "size": 32}},
        "tokens": {"uses": "tokenize.titok", "needs": ["images"],
                   "with": {"size": "tiny", "flip": False}}}})
    assert Runner(dag, store, NullTracker(), "", executor="local").run().ok
    _, done = StageState(store).latest("t")
    tokens = {k: OutputRef.from_json(v) for k, v in done["tokens"]["outputs"].items()}
    torch.manual_seed(0)
    gen = maskgit_config("tiny", codebook_size=64, seq_len=8, num_classes=20).build()
    save_pretrained(gen, tmp / "gen")
    gen_ref = OutputRef("model", "gen", str(tmp / "gen"), digest=weights_digest(gen))
    return store, {"gen": {"generator": gen_ref}, "tokens": tokens}, tmp


class _Recorder:
    """A Tracker that keeps what it was given."""

    run_id = None

    def __init__(self):
        self.tags, self.images, self.dicts = {}, {}, {}

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_image(self, name, image, step=None):
        self.images[name] = image

    def log_dict(self, d, artifact_file):
        self.dicts[artifact_file] = d

    def __getattr__(self, name):
        return lambda *a, **k: None


def _stage(store, inputs, name="eval", **cfg):
    from pipelines.stages.base import StageContext
    from pipelines.stages.evaluate_generation import EvaluateGeneration, EvaluateGenerationConfig

    ctx = StageContext(dag="t", stage=name, store=store, row_fingerprint=f"fp-{name}",
                       inputs=inputs, tracker=_Recorder())
    base = {"num_samples": 16, "shard_size": 6, "sampler": {"steps": 4, "guidance_scale": 1.0},
            "grid_images": 8}
    merged = {k: v for k, v in {**base, **cfg}.items() if v is not None}  # None: default
    return EvaluateGeneration(EvaluateGenerationConfig(**merged), ctx)


def test_stage_in_process_reuses_reference_and_names_extractor(tiny_world):
    store, inputs, _ = tiny_world
    first = _stage(store, inputs, "eval")
    r = first.run()
    assert {"fid", "sfid", "is", "precision", "recall", "codebook_usage"} <= set(r.metrics)
    rows = store.read("t/eval").to_pylist()
    by_metric = {row["metric"]: row for row in rows}
    for m in ("fid", "is", "precision", "recall"):
        assert by_metric[m]["extractor"] == "tiny-conv-seed0-v1"
        assert by_metric[m]["num_samples"] == 16 and by_metric[m]["fingerprint"] == "fp-eval"
    assert by_metric["codebook_usage"]["extractor"] is None
    # the generator's sampling time per image (not a feature metric)
    assert r.metrics["sample_seconds_per_image"] > 0
    assert by_metric["sample_seconds_per_image"]["extractor"] is None
    details = json.loads(by_metric["fid"]["details"])
    assert details["reference"]["cached"] is False
    assert details["reference"]["comparable_to_published"] is False
    # the decoder is the tokens stage's own export of its seeded tokenizer
    tok_ref = inputs["tokens"]["tokenizer"]
    assert details["lineage"]["tokenizer"]["uri"] == tok_ref.uri
    assert details["lineage"]["tokenizer"]["family"] == "titok"
    assert tok_ref.uri.endswith(f"models/t/tokens/{inputs['tokens']['samples'].digest}")
    tags = first.ctx.tracker.tags
    assert tags["vgen.eval.extractor"] == "tiny-conv-seed0-v1"
    assert tags["vgen.lineage.generator.digest"] == inputs["gen"]["generator"].digest
    assert tags["vgen.lineage.curated.version"] == str(inputs["tokens"]["source"].version)
    assert first.ctx.tracker.images["samples_grid"].ndim == 3
    assert store.read(REFERENCE_TABLE).num_rows == 1

    # another seed: new samples, same reference statistics from the cache
    second = _stage(store, inputs, "eval2", seed=7)
    second.run()
    d2 = json.loads(store.read("t/eval2").to_pylist()[0]["details"])
    assert d2["reference"]["cached"] is True and d2["seed"] == 7
    assert store.read(REFERENCE_TABLE).num_rows == 1
    # the row fingerprint covers generator, tokens, reference and extractor
    parts = first.row_fingerprint_parts()
    assert parts["generator"] == inputs["gen"]["generator"].digest
    assert parts["tokens"] == inputs["tokens"]["samples"].digest
    assert parts["extractor"] == {"name": "tiny-conv-seed0-v1"}


def test_stage_with_adm_npz_images_and_bad_sampler(tiny_world, tmp_path):
    from pipelines.stages.base import StageError

    store, inputs, _ = tiny_world
    rng = np.random.default_rng(5)
    npz = tmp_path / "ref.npz"
    _write_adm(npz, arr_0=rng.integers(0, 256, size=(9, 32, 32, 3), dtype=np.uint8))
    st = _stage(store, inputs, "eval_npz", reference_npz=str(npz))
    st.run()
    row = store.read("t/eval_npz").to_pylist()[0]
    ref = json.loads(row["details"])["reference"]
    assert ref["kind"] == "adm_npz" and ref["comparable_to_published"] is False
    assert st.ctx.tracker.tags["vgen.eval.comparable_to_published"] == "false"
    assert st.row_fingerprint_parts()["reference"]["npz"] == str(npz)
    with pytest.raises(StageError, match="does not take"):
        _stage(store, inputs, "eval_bad", sampler={"temperature_typo": 1.0}).run()


def test_stage_without_recorded_tokenizer_says_what_to_rerun(tiny_world):
    from pipelines.stages.base import OutputRef, StageError

    store, inputs, _ = tiny_world
    tok = {k: v for k, v in inputs["tokens"].items() if k != "tokenizer"}  # an older record
    with pytest.raises(StageError, match="re-run 'tokens'"):
        _stage(store, {**inputs, "tokens": tok}, "eval_lost").run()
    # a tokenizer export whose weights changed since the tokens were made
    moved = dict(inputs["tokens"])
    moved["tokenizer"] = OutputRef(**{**moved["tokenizer"].to_json(), "digest": "0" * 64})
    with pytest.raises(StageError, match="no longer the one"):
        _stage(store, {**inputs, "tokens": moved}, "eval_moved").run()


def test_class_balanced_shards_and_per_class(tiny_world):
    from pipelines.stages.base import StageError
    from vgen_core import families

    store, inputs, _ = tiny_world
    side, source = inputs["tokens"]["samples"], inputs["tokens"]["source"]
    fam = families.get("maskgit")
    n, shards = _stage(store, inputs, num_samples=25, shard_size=10)._shards(
        fam, {"num_classes": 4}, side, source)
    labels = [lab for s in shards for lab in s["labels"]]
    assert n == 25 and [s["shard"] for s in shards] == [0, 1, 2]
    assert [s["start"] for s in shards] == [0, 10, 20] and len(shards[-1]["labels"]) == 5
    assert np.bincount(labels).tolist() == [7, 6, 6, 6]  # round-robin: balanced to within one
    n, shards = _stage(store, inputs, per_class=3, num_samples=None)._shards(
        fam, {"num_classes": 4}, side, source)
    assert n == 12 and np.bincount([lab for s in shards for lab in s["labels"]]).tolist() == [3] * 4
    with pytest.raises(StageError, match="per_class"):
        _stage(store, inputs, per_class=3, num_samples=16)._shards(fam, {"num_classes": 4}, side,
                                                                   source)


def test_decoder_from_a_trained_tokenizer_export(tiny_world):
    """Tokens made with an upstream train.tokenizer export: the tokenize stage passes that export
    through as its `tokenizer` output, and the evaluation decodes with exactly it."""
    from pipelines.dag.planner import plan_stage
    from pipelines.dag.spec import parse_dag
    from pipelines.dag.state import StageState
    from pipelines.stages.base import OutputRef
    from pipelines.stages.evaluate_generation import load_model_ref
    from vgen_core.tokenizers.io import save_pretrained, weights_digest
    from vgen_core.tokenizers.titok import titok_config

    store, inputs, tmp = tiny_world
    torch.manual_seed(1)
    tok = titok_config("tiny").build()
    save_pretrained(tok, tmp / "tok")
    export = OutputRef("model", "tok", str(tmp / "tok"), digest=weights_digest(tok))
    state = StageState(store)
    _, done = state.latest("t")
    images = {k: OutputRef.from_json(v) for k, v in done["images"]["outputs"].items()}
    dag = parse_dag({"name": "t", "stages": {
        "images": {"uses": "ingest.images", "with": {"root": "skimage://"}},
        "tok": {"uses": "train.tokenizer", "needs": ["images"], "with": {"model": "titok"}},
        "tokens2": {"uses": "tokenize.titok", "needs": ["images", "tok"],
                    "with": {"flip": False}}}})
    plan, stage = plan_stage(dag, "tokens2", store, {"images": images, "tok": {"tokenizer":
                             export}}, {"images": done["images"]["fingerprint"],
                                        "tok": "fp-tok"}, None, None)
    outs = stage.run().outputs
    assert outs["tokenizer"] == export  # passed through, not re-exported
    assert weights_digest(load_model_ref(outs["tokenizer"], str(tmp / "x"))) == export.digest
    gen = {"gen": inputs["gen"]}
    for extra in ({}, {"tok": {"tokenizer": export}}):  # with or without the train stage
        st = _stage(store, {**gen, "tokens2": outs, **extra}, "eval_trained")
        assert st.row_fingerprint_parts()["tokenizer"] == (export.digest if extra else None)
    st.run()
    lineage = json.loads(store.read("t/eval_trained").to_pylist()[0]["details"])["lineage"]
    assert lineage["tokenizer"]["uri"] == export.uri
