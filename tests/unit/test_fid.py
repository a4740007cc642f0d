"""Generation metrics: streaming feature stats, Frechet distance, IS, precision/recall, ADM npz,
feature extractors (FID InceptionV3 structure, tiny conv net, comparability)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vgen_core.eval.extractors import (
    FeatureExtractor,
    InceptionV3FID,
    TinyConvExtractor,
    _resize_bilinear_tf1,
    check_comparable,
    load_inception_state_dict,
)
from vgen_core.eval.fid import (
    FeatureStats,
    fid,
    frechet_distance,
    inception_score,
    iter_npz_images,
    npz_array_shape,
    precision_recall,
    sfid,
)

# --- FeatureStats ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 50), d=st.integers(1, 5), data=st.data())
def test_streaming_stats_equal_numpy_of_concatenation(seed, n, d, data):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.uniform(-5, 5, size=d)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5), label="cuts"))
    chunks = np.split(x, cuts)  # may contain empty chunks
    parts = [
        FeatureStats(d, "t").update(torch.from_numpy(c) if i % 2 else c)
        for i, c in enumerate(chunks)
    ]
    while len(parts) > 1:  # merge in a random order / tree shape
        i = data.draw(st.integers(0, len(parts) - 1), label="left")
        a = parts.pop(i)
        j = data.draw(st.integers(0, len(parts) - 1), label="right")
        b = parts.pop(j)
        parts.append(a + b)
    merged = parts[0]
    streamed = FeatureStats(d, "t")
    for c in chunks:
        streamed.update(c)
    for s in (merged, streamed, sum(FeatureStats(d, "t").update(c) for c in chunks)):
        assert s.count == n
        np.testing.assert_allclose(s.mean, np.mean(x, axis=0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(s.cov, np.atleast_2d(np.cov(x, rowvar=False)), rtol=1e-9,
                                   atol=1e-9)


def test_stats_dict_round_trip_and_guards():
    x = np.random.default_rng(0).normal(size=(20, 4))
    s = FeatureStats.from_features(x, "tiny-conv-seed0-v1")
    t = FeatureStats.from_dict(s.to_dict())
    assert (t.extractor, t.feature, t.count) == ("tiny-conv-seed0-v1", "pool", 20)
    np.testing.assert_array_equal(t.cov, s.cov)
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        s.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        s.update(np.full((1, 4), np.nan))
    with pytest.raises(ValueError, match=">= 2 samples"):
        _ = FeatureStats.from_features(x[:1], "t").cov
    with pytest.raises(ValueError, match="'a'.*'b'"):
        FeatureStats.from_features(x, "a").merge(FeatureStats.from_features(x, "b"))


# --- Frechet distance -----------------------------------------------------------------------------


def _random_rotation(d, rng):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(12, 12))
    sigma = a @ a.T + 0.1 * np.eye(12)
    mu = rng.normal(size=12)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.parametrize("rotate", [False, True], ids=["diag", "rotated"])
def test_frechet_closed_form_for_commuting_covariances(rotate):
    rng = np.random.default_rng(2)
    d = 9
    s1, s2 = rng.uniform(0.05, 4.0, d), rng.uniform(0.05, 4.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    q = _random_rotation(d, rng) if rotate else np.eye(d)
    sigma1, sigma2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, abs=1e-6)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's own LinAlgWarning
def test_frechet_singular_product_adds_eps_offset():
    # sqrtm([[0, 1], [0, 0]]) does not exist -> non-finite -> pytorch-fid's eps offset path:
    # sqrtm((s1 + eps I)(I + eps I)) has trace 2 sqrt(eps (1 + eps)).
    s1, s2, mu, eps = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2), 1e-6
    with pytest.warns(RuntimeWarning, match="singular product"):
        value = frechet_distance(mu, s1, mu, s2, eps=eps)
    assert value == pytest.approx(2.0 - 4.0 * math.sqrt(eps * (1 + eps)), abs=1e-9)


def test_frechet_rank_deficient_covariances_stay_finite():
    x = np.random.default_rng(3).normal(size=(5, 16))  # N < D: singular covariance
    s = FeatureStats.from_features(x, "t")
    value = fid(s, s)
    assert math.isfinite(value) and abs(value) < 1e-4


def test_frechet_rejects_large_imaginary_part_and_bad_shapes():
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="differ in length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2))


# --- Inception score ------------------------------------------------------------------------------


def test_inception_score_uniform_is_one_and_confident_diverse_is_num_classes():
    assert inception_score(np.zeros((40, 7)), splits=4).mean == pytest.approx(1.0, abs=1e-12)
    c, splits = 5, 4
    labels = np.tile(np.arange(c), 3 * splits)  # every split holds every class equally often
    for scale in (50.0, 1000.0):  # 1000: non-target probabilities underflow to exactly 0
        logits = scale * np.eye(c)[labels]
        score = inception_score(torch.from_numpy(logits), splits=splits)
        assert score.mean == pytest.approx(c, abs=1e-12) and score.std < 1e-12


def test_inception_score_matches_torch_fidelity_formula_with_shuffle():
    logits = torch.from_numpy(np.random.default_rng(4).normal(size=(103, 11)) * 3)
    perm = np.random.RandomState(2020).permutation(103)
    f = logits[perm].double()
    p, log_p, scores = f.softmax(1), f.log_softmax(1), []
    for i in range(10):
        sl = slice(i * 103 // 10, (i + 1) * 103 // 10)
        q = p[sl].mean(0, keepdim=True)
        scores.append((p[sl] * (log_p[sl] - q.log())).sum(1).mean().exp().item())
    got = inception_score(logits, splits=10, shuffle_seed=2020)
    assert got.mean == pytest.approx(float(np.mean(scores)), rel=1e-12)
    assert got.std == pytest.approx(float(np.std(scores)), rel=1e-9)


# --- precision / recall ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_precision_recall_hand_built_1d(dtype):
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii (squared): all 1
    fake = np.array([[0.5], [0.6], [1.5], [10.0]])  # radii: .01, .01, .81, 72.25
    # precision: 0.5, 0.6, 1.5 lie within 1 of a real point; 10 does not -> 3/4.
    # recall: real 1 and 2 are within .81 of 1.5, real 3 within 72.25 of 10, real 0 is not -> 3/4.
    pr = precision_recall(real, fake, k=1, dtype=dtype)
    assert (pr.precision, pr.recall) == (0.75, 0.75)


def test_precision_recall_identical_and_disjoint_grids():
    grid = np.stack(np.meshgrid(np.arange(3.0), np.arange(3.0)), -1).reshape(-1, 2)
    assert tuple(precision_recall(grid, grid, k=3)) == (1.0, 1.0)
    assert tuple(precision_recall(grid, grid + 100.0, k=3)) == (0.0, 0.0)


def _naive_pr(real, fake, k):
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_real = np.partition(d2(real, real), k, axis=1)[:, k]
    r_fake = np.partition(d2(fake, fake), k, axis=1)[:, k]
    d = d2(real, fake)
    return (d <= r_real[:, None]).any(0).mean(), (d <= r_fake[None, :]).any(1).mean()


@pytest.mark.parametrize("k,rb,cb", [(3, 10000, 10000), (3, 3, 5), (2, 7, 4)])
def test_precision_recall_batched_matches_naive(k, rb, cb):
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(31, 6)), rng.normal(size=(23, 6)) * 1.3 + 0.4
    got = precision_recall(real, fake, k=k, row_batch_size=rb, col_batch_size=cb,
                           dtype=torch.float64)
    assert got == pytest.approx(_naive_pr(real, fake, k), abs=1e-12)


# --- ADM npz --------------------------------------------------------------------------------------


def test_adm_npz_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    pool = FeatureStats.from_features(rng.normal(size=(30, 5)), "inception-v3-fid-tf1")
    spatial = FeatureStats.from_features(rng.normal(size=(30, 3)), "inception-v3-fid-tf1",
                                         feature="spatial")
    images = rng.integers(0, 256, size=(7, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    pool.save_npz(path, spatial=spatial, images_NHWC=images)
    with np.load(path) as f:  # what the ADM evaluator and pytorch-fid read
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(f.files)
        np.testing.assert_array_equal(f["sigma"], pool.cov)
    for feat, ref in (("pool", pool), ("spatial", spatial)):
        got = FeatureStats.load_npz(path, feature=feat)
        assert (got.extractor, got.feature, got.count) == (ref.extractor, feat, 30)
        np.testing.assert_array_equal(got.mean, ref.mean)
        np.testing.assert_array_equal(got.cov, ref.cov)
    assert npz_array_shape(path) == (7, 4, 4, 3)
    batches = list(iter_npz_images(path, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    with pytest.raises(ValueError, match="not comparable"):
        FeatureStats.load_npz(path, extractor="inception-v3-fid-pt")


def test_adm_reference_npz_import(tmp_path):
    rng = np.random.default_rng(7)
    mu, a = rng.normal(size=4), rng.normal(size=(4, 4))
    sigma = a @ a.T
    path = tmp_path / "VIRTUAL_like.npz"
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu[:2],
             sigma_s=sigma[:2, :2])
    with pytest.raises(ValueError, match="pass extractor="):
        FeatureStats.load_npz(path)
    ref = FeatureStats.load_npz(path, extractor="inception-v3-fid-tf1")
    assert ref.count is None  # ADM stats cover the whole dataset, not arr_0
    sample = FeatureStats.from_features(rng.normal(size=(50, 4)), "inception-v3-fid-tf1")
    assert fid(sample, ref) == frechet_distance(sample.mean, sample.cov, mu, sigma)
    ref_s = FeatureStats.load_npz(path, extractor="inception-v3-fid-tf1", feature="spatial")
    assert sfid(ref_s, ref_s) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="not merged"):
        ref.merge(ref)
    images_only = tmp_path / "samples.npz"
    np.savez(images_only, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="iter_npz_images"):
        FeatureStats.load_npz(images_only, extractor="x")


# --- extractors -----------------------------------------------------------------------------------


def test_extractor_name_mismatch_raises_with_both_names():
    a, b = TinyConvExtractor(seed=0), TinyConvExtractor(seed=1)
    assert a.name == "tiny-conv-seed0-v1"
    with pytest.raises(ValueError, match="'tiny-conv-seed0-v1' vs 'tiny-conv-seed1-v1'"):
        check_comparable(a, b)
    x = np.random.default_rng(8).normal(size=(10, 3))
    sa, sb = FeatureStats.from_features(x, a.name), FeatureStats.from_features(x, b.name)
    with pytest.raises(ValueError, match="tiny-conv-seed0-v1.*tiny-conv-seed1-v1"):
        fid(sa, sb)
    with pytest.raises(ValueError, match="'spatial' feature stats"):
        sfid(sa, sa)
    sp = FeatureStats.from_features(x, a.name, feature="spatial")
    with pytest.raises(ValueError, match="'pool' features with 'spatial'"):
        fid(sa, sp)


def test_tiny_conv_extractor_is_deterministic():
    imgs = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    f1, f2 = TinyConvExtractor(0)(imgs), TinyConvExtractor(0)(imgs.float() / 255)
    assert isinstance(TinyConvExtractor(0), FeatureExtractor)
    assert f1.extractor == "tiny-conv-seed0-v1"
    assert f1.pool_BD.shape == (3, 64) and f1.logits_BK.shape == (3, 10)
    assert f1.spatial_BS.shape == (3, 256)
    torch.testing.assert_close(f1.pool_BD, f2.pool_BD)
    assert not torch.equal(f1.pool_BD, TinyConvExtractor(1)(imgs).pool_BD)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        TinyConvExtractor(0)(imgs.float() / 127.5 - 1)


def test_tf1_bilinear_resize_matches_tf_legacy_semantics():
    x = torch.tensor([10.0, 20.0]).view(1, 1, 1, 2)
    up = _resize_bilinear_tf1(x, (1, 4))  # src = 0, .5, 1, 1.5 -> last clamps to the edge
    torch.testing.assert_close(up.flatten(), torch.tensor([10.0, 15.0, 20.0, 20.0]))
    x = torch.tensor([0.0, 30.0, 60.0, 90.0]).view(1, 1, 4, 1)
    down = _resize_bilinear_tf1(x, (3, 1))  # src = 0, 4/3, 8/3
    torch.testing.assert_close(down.flatten(), torch.tensor([0.0, 40.0, 80.0]))


def _official_fid_inception_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid's pt_inception-2015-12-05 state dict: torchvision Inception3 key names with
    aux_logits=False and 1008 classes, written out here independently of vgen's module."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
             ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
             ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for p, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{p}.branch1x1", cin, 64, 1, 1), (f"{p}.branch5x5_1", cin, 48, 1, 1),
                  (f"{p}.branch5x5_2", 48, 64, 5, 5), (f"{p}.branch3x3dbl_1", cin, 64, 1, 1),
                  (f"{p}.branch3x3dbl_2", 64, 96, 3, 3), (f"{p}.branch3x3dbl_3", 96, 96, 3, 3),
                  (f"{p}.branch_pool", cin, pf, 1, 1)]
    convs += [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for p, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{p}.branch1x1", 768, 192, 1, 1), (f"{p}.branch7x7_1", 768, c7, 1, 1),
                  (f"{p}.branch7x7_2", c7, c7, 1, 7), (f"{p}.branch7x7_3", c7, 192, 7, 1),
                  (f"{p}.branch7x7dbl_1", 768, c7, 1, 1), (f"{p}.branch7x7dbl_2", c7, c7, 7, 1),
                  (f"{p}.branch7x7dbl_3", c7, c7, 1, 7), (f"{p}.branch7x7dbl_4", c7, c7, 7, 1),
                  (f"{p}.branch7x7dbl_5", c7, 192, 1, 7), (f"{p}.branch_pool", 768, 192, 1, 1)]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
              ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
              ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for p, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{p}.branch1x1", cin, 320, 1, 1), (f"{p}.branch3x3_1", cin, 384, 1, 1),
                  (f"{p}.branch3x3_2a", 384, 384, 1, 3), (f"{p}.branch3x3_2b", 384, 384, 3, 1),
                  (f"{p}.branch3x3dbl_1", cin, 448, 1, 1),
                  (f"{p}.branch3x3dbl_2", 448, 384, 3, 3),
                  (f"{p}.branch3x3dbl_3a", 384, 384, 1, 3),
                  (f"{p}.branch3x3dbl_3b", 384, 384, 3, 1), (f"{p}.branch_pool", cin, 192, 1, 1)]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, kh, kw in convs:
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{s}"] = (cout,)
    shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
    return shapes


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    shapes = _official_fid_inception_shapes()
    learnable = sum(math.prod(s) for k, s in shapes.items() if "running" not in k)
    # torchvision's inception_v3 has 27,161,264 params; minus AuxLogits (3,326,696), plus 8 classes.
    assert (len(shapes), learnable) == (472, 27_161_264 - 3_326_696 + 8 * 2049)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, s in shapes.items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(s, generator=g) * math.sqrt(2.0 / math.prod(s[1:]))
        elif k.endswith(("bn.weight", "running_var")):
            state[k] = torch.ones(s)
        elif k.startswith("fc."):
            state[k] = torch.randn(s, generator=g) * 0.01
        else:
            state[k] = torch.zeros(s)
    path = tmp_path_factory.mktemp("w") / "pt_inception-2015-12-05-test.pth"
    torch.save(state, path)
    return path, state


class _Probe(torch.nn.Module):
    """Stands in for the network body: records the preprocessed input, returns zeros."""

    def __init__(self, fc):
        super().__init__()
        self.fc, self.seen = fc, None

    def forward(self, x):
        self.seen = x.clone()
        return torch.zeros(x.shape[0], 2048), torch.zeros(x.shape[0], 192, 17, 17)


def test_inception_v3_loads_official_key_names_and_extracts(fid_weights, tmp_path):
    path, state = fid_weights
    net = InceptionV3FID(path)
    assert net.name == "inception-v3-fid-pt"
    imgs = torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8)
    seen = []
    net.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    out = net(imgs)  # the one real forward (~3 s of CPU)
    assert out.extractor == net.name
    assert out.pool_BD.shape == (1, 2048) and out.logits_BK.shape == (1, 1008)
    assert out.spatial_BS.shape == (1, 17 * 17 * 7)
    assert torch.isfinite(out.pool_BD).all() and torch.isfinite(out.spatial_BS).all()
    torch.testing.assert_close(out.logits_BK, out.pool_BD @ state["fc.weight"].T)
    # pytorch-fid: [0, 1] -> bilinear 299 (align_corners=False) -> 2x - 1
    expected = 2 * torch.nn.functional.interpolate(imgs.float() / 255, size=(299, 299),
                                                   mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(seen[0], expected)

    from safetensors.torch import save_file

    st_path = tmp_path / "fid_inception.safetensors"
    save_file(state, str(st_path))
    tf1 = InceptionV3FID(st_path, preprocess="tf1")
    loaded = tf1.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    tf1.module = _Probe(tf1.module.fc)
    out_tf1 = tf1(imgs)
    assert out_tf1.extractor == "inception-v3-fid-tf1" and out_tf1.spatial_BS.shape == (1, 2023)
    # TF graph / ADM: [0, 255] -> TF1 bilinear 299 -> (x - 128) / 128
    expected = (_resize_bilinear_tf1(imgs.float(), (299, 299)) - 128) / 128
    torch.testing.assert_close(tf1.module.seen, expected)
    with pytest.raises(ValueError, match="not comparable"):
        check_comparable(net, tf1)


def test_inception_weights_validation(tmp_path):
    bad = {"fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.weight": torch.zeros(1000, 768)}
    torch.save(bad, tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="torchvision's ImageNet InceptionV3"):
        InceptionV3FID(tmp_path / "tv.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception_state_dict(tmp_path / "missing.pth")
    small = tmp_path / "small.pth"
    torch.save({"a": torch.ones(3)}, small)
    digest = hashlib.sha256(small.read_bytes()).hexdigest()
    good = tmp_path / f"small-{digest[:8]}.pth"
    good.write_bytes(small.read_bytes())
    assert torch.equal(load_inception_state_dict(good)["a"], torch.ones(3))
    wrong = tmp_path / f"small-{'0' * 8 if digest[0] != '0' else '1' * 8}.pth"
    wrong.write_bytes(small.read_bytes())
    with pytest.raises(ValueError, match="hash suffix"):
        load_inception_state_dict(wrong)


def test_fid_on_fewer_samples_than_dims_warns_once_in_words(caplog):
    """16 samples of 32-dim features: singular covariances. scipy's warnings are replaced by one
    record of the ``vgen.eval`` logger (the console shows it); the value is still returned."""
    import logging
    import warnings

    rng = np.random.default_rng(0)
    a, b = FeatureStats(32, "x"), FeatureStats(32, "x")
    a.update(rng.normal(size=(16, 32)))
    b.update(rng.normal(size=(20, 32)) + 0.5)
    with caplog.at_level(logging.WARNING, logger="vgen.eval"), warnings.catch_warnings():
        warnings.simplefilter("error")  # any scipy / numpy warning would fail here
        d = a.frechet_distance(b)
    assert math.isfinite(d) and d > 0
    assert [r.getMessage() for r in caplog.records] == [
        "FID on 16 samples is not meaningful: the covariance of 32-dim features is singular "
        "below 33 samples; compare it only with runs of the same size"]
    caplog.clear()
    big = FeatureStats(4, "x")
    big.update(rng.normal(size=(50, 4)))
    with caplog.at_level(logging.WARNING, logger="vgen.eval"):
        big.frechet_distance(big)
    assert caplog.records == []
