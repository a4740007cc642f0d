"""Generation metrics on extractor features: FID, sFID, Inception Score, precision/recall.

Numerics follow the references (methods.md §4):
- ``frechet_distance``: pytorch-fid ``calculate_frechet_distance`` (= ADM ``FIDStatistics``):
  ``scipy.linalg.sqrtm`` of sigma1 @ sigma2; if that is not finite, retry with ``eps`` added to
  both diagonals; a complex result is accepted only if its diagonal's imaginary part is within
  1e-3 of zero, and its real part is used.
- ``FeatureStats``: streaming, mergeable (count, sum, sum of outer products) in float64, as the
  1d-tokenizer/MaskBit evaluators accumulate rFID; ``mean``/``cov`` equal np.mean / np.cov
  (unbiased) of the concatenated features. ADM reference ``.npz`` files (``mu``/``sigma``,
  ``mu_s``/``sigma_s``, images in ``arr_0``) are read and written.
- ``inception_score``: ADM's split-wise exp(E[KL(p(y|x) || p(y))]) over consecutive splits
  (ADM: 5000-image splits, i.e. 10 splits of 50k), computed in float64 from logits.
- ``precision_recall``: improved precision/recall (Kynkaenniemi et al. 2019) as ADM's
  ``ManifoldEstimator``: squared Euclidean distances in row/column batches, each point's radius
  is the squared distance to its k-th nearest neighbour (k=3, self excluded), membership is
  ``dist <= radius`` for any reference point.

Shape legend: N, M sample counts, D feature dims, K logit classes.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from scipy import linalg
from scipy.special import logsumexp
from torch import Tensor

from vgen_core.eval.extractors import check_comparable

log = logging.getLogger("vgen.eval")

__all__ = [
    "FeatureStats",
    "InceptionScore",
    "PrecisionRecall",
    "fid",
    "frechet_distance",
    "inception_score",
    "iter_npz_images",
    "npz_array_shape",
    "precision_recall",
    "sfid",
]

_ADM_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


def _as_numpy_f64(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


class FeatureStats:
    """Running first and second moments of features from one extractor, in float64.

    ``extractor`` names the network (see ``extractors.check_comparable``); ``feature`` is the kind
    (``"pool"`` for FID, ``"spatial"`` for sFID). Stats read from a file without a sample count
    (e.g. ADM reference batches) compare fine but cannot be merged or updated.
    """

    def __init__(self, dims: int, extractor: str, feature: str = "pool"):
        if dims < 1:
            raise ValueError(f"FeatureStats: dims must be >= 1, got {dims}.")
        if not extractor:
            raise ValueError("FeatureStats: extractor name must be non-empty.")
        self.dims, self.extractor, self.feature = int(dims), str(extractor), str(feature)
        self.count: int | None = 0
        self.sum_D: np.ndarray | None = np.zeros(self.dims)
        self.sum_outer_DD: np.ndarray | None = np.zeros((self.dims, self.dims))
        self._moments: tuple[np.ndarray, np.ndarray] | None = None  # exact mu/sigma as read

    def __repr__(self) -> str:
        return (f"FeatureStats(extractor={self.extractor!r}, feature={self.feature!r}, "
                f"dims={self.dims}, count={self.count})")

    def _require_sums(self, op: str) -> tuple[int, np.ndarray, np.ndarray]:
        """``(count, sum_D, sum_outer_DD)``; raises for compare-only stats, which lack them."""
        count, sum_D, sum_outer_DD = self.count, self.sum_D, self.sum_outer_DD
        if count is None or sum_D is None or sum_outer_DD is None:
            raise ValueError(
                f"FeatureStats.{op}: these {self.extractor!r} stats were read without a sample "
                f"count (reference mu/sigma only); they can be compared, not merged or updated."
            )
        return count, sum_D, sum_outer_DD

    def update(self, features_ND: np.ndarray | Tensor) -> FeatureStats:
        """Add a batch of features (N, D); torch tensors are reduced on their own device."""
        count, sum_D, sum_outer_DD = self._require_sums("update")
        if not isinstance(features_ND, Tensor):
            features_ND = np.asarray(features_ND, dtype=np.float64)
        if features_ND.ndim != 2 or features_ND.shape[1] != self.dims:
            raise ValueError(f"FeatureStats.update: expected (N, {self.dims}) features, got "
                             f"{tuple(features_ND.shape)}.")
        if isinstance(features_ND, Tensor):
            xt = features_ND.detach().to(torch.float64)
            finite = bool(torch.isfinite(xt).all())
            s, so = xt.sum(0).cpu().numpy(), (xt.T @ xt).cpu().numpy()
        else:
            xn = features_ND
            finite = bool(np.isfinite(xn).all())
            s, so = xn.sum(0), xn.T @ xn
        if not finite:
            raise ValueError(f"FeatureStats.update: non-finite {self.extractor!r} features; "
                             f"check the images and the extractor's dtype.")
        self.count = count + int(features_ND.shape[0])
        sum_D += s  # in place: these are self.sum_D / self.sum_outer_DD
        sum_outer_DD += so
        self._moments = None
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """New stats over both sample sets (e.g. per-worker partials)."""
        check_comparable(self, other, "FeatureStats.merge")
        if other.dims != self.dims:
            raise ValueError(f"FeatureStats.merge: dims differ: {self.dims} vs {other.dims}.")
        count, sum_D, sum_outer_DD = self._require_sums("merge")
        o_count, o_sum_D, o_sum_outer_DD = other._require_sums("merge")
        out = FeatureStats(self.dims, self.extractor, self.feature)
        out.count = count + o_count
        out.sum_D = sum_D + o_sum_D
        out.sum_outer_DD = sum_outer_DD + o_sum_outer_DD
        return out

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return self.merge(other)

    def __radd__(self, other: Any) -> FeatureStats:
        if isinstance(other, int) and other == 0:  # sum(list_of_stats)
            return self.merge(FeatureStats(self.dims, self.extractor, self.feature))
        return NotImplemented

    @property
    def mean(self) -> np.ndarray:
        """(D,) sample mean."""
        if self._moments is not None:
            return self._moments[0].copy()
        count, sum_D, _ = self._require_sums("mean")
        if count < 1:
            raise ValueError(f"FeatureStats.mean: no samples in {self!r}.")
        return sum_D / count

    @property
    def cov(self) -> np.ndarray:
        """(D, D) unbiased covariance, as ``np.cov(features, rowvar=False)``."""
        if self._moments is not None:
            return self._moments[1].copy()
        n, sum_D, sum_outer_DD = self._require_sums("cov")
        if n < 2:
            raise ValueError(f"FeatureStats.cov: need >= 2 samples, have {n}.")
        return (sum_outer_DD - np.outer(sum_D, sum_D) / n) / (n - 1)

    @classmethod
    def from_features(cls, features_ND: np.ndarray | Tensor, extractor: str,
                      feature: str = "pool") -> FeatureStats:
        if not isinstance(features_ND, Tensor):
            features_ND = np.asarray(features_ND, dtype=np.float64)
        if features_ND.ndim != 2:
            raise ValueError(f"FeatureStats.from_features: expected (N, D), got "
                             f"{tuple(features_ND.shape)}.")
        return cls(features_ND.shape[1], extractor, feature).update(features_ND)

    @classmethod
    def from_moments(cls, mu_D: np.ndarray, sigma_DD: np.ndarray, count: int | None,
                     extractor: str, feature: str = "pool") -> FeatureStats:
        """Stats from a mean and unbiased covariance; ``count=None`` gives compare-only stats."""
        mu, sigma = np.atleast_1d(_as_numpy_f64(mu_D)), np.atleast_2d(_as_numpy_f64(sigma_DD))
        d = mu.shape[0]
        if mu.ndim != 1 or sigma.shape != (d, d):
            raise ValueError(f"FeatureStats.from_moments: mu {mu.shape} and sigma {sigma.shape} "
                             f"do not match.")
        out = cls(d, extractor, feature)
        if count is None:
            out.count, out.sum_D, out.sum_outer_DD = None, None, None
        else:
            if count < 2:
                raise ValueError(f"FeatureStats.from_moments: count must be >= 2, got {count}.")
            out.count = int(count)
            out.sum_D = count * mu
            out.sum_outer_DD = (count - 1) * sigma + count * np.outer(mu, mu)
        out._moments = (mu.copy(), sigma.copy())
        return out

    def frechet_distance(self, other: FeatureStats, eps: float = 1e-6) -> float:
        check_comparable(self, other, "frechet_distance")
        return _stats_distance(self, other, eps)

    # --- persistence ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Row for a table: names, count, ``sum`` (D,) and row-major ``sum_outer`` (D*D,)."""
        count, sum_D, sum_outer_DD = self._require_sums("to_dict")
        return {
            "extractor": self.extractor,
            "feature": self.feature,
            "dims": self.dims,
            "count": count,
            "sum": sum_D.copy(),
            "sum_outer": sum_outer_DD.reshape(-1).copy(),
        }

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> FeatureStats:
        out = cls(int(row["dims"]), row["extractor"], row["feature"])
        s = np.asarray(row["sum"], dtype=np.float64)
        so = np.asarray(row["sum_outer"], dtype=np.float64)
        if s.shape != (out.dims,) or so.size != out.dims * out.dims:
            raise ValueError(f"FeatureStats.from_dict: sum {s.shape} / sum_outer {so.shape} do "
                             f"not fit dims={out.dims}.")
        out.count, out.sum_D, out.sum_outer_DD = int(row["count"]), s, so.reshape(out.dims, -1)
        return out

    def save_npz(self, path: str | Path, *, spatial: FeatureStats | None = None,
                 images_NHWC: np.ndarray | None = None) -> None:
        """Write an ADM-format reference file: ``mu``/``sigma`` from these pool stats, optional
        ``mu_s``/``sigma_s`` (the ADM evaluator requires them when it finds ``mu``) and
        ``arr_0`` (uint8 images; the ADM evaluator needs them for precision/recall). Extra
        ``vgen_*`` keys record extractor and counts; other readers ignore them."""
        if self.feature != "pool":
            raise ValueError(f"save_npz: call it on the pool stats, not {self.feature!r}.")
        arrays: dict[str, np.ndarray] = {"mu": self.mean, "sigma": self.cov,
                                         "vgen_extractor": np.array(self.extractor),
                                         "vgen_count": np.array(_count_or_neg(self))}
        if spatial is not None:
            check_comparable(self.extractor, spatial.extractor, "save_npz")
            if spatial.feature != "spatial":
                raise ValueError(f"save_npz: spatial= must hold 'spatial' stats, got "
                                 f"{spatial.feature!r}.")
            arrays.update(mu_s=spatial.mean, sigma_s=spatial.cov,
                          vgen_count_s=np.array(_count_or_neg(spatial)))
        if images_NHWC is not None:
            imgs = np.asarray(images_NHWC)
            if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
                raise ValueError(f"save_npz: images must be uint8 (N, H, W, 3), got {imgs.dtype} "
                                 f"{imgs.shape}.")
            arrays["arr_0"] = imgs
        with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
            # mypy matches **arrays against savez's `allow_pickle: bool`; no key here is that
            np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load_npz(cls, path: str | Path, *, feature: str = "pool", extractor: str | None = None,
                 count: int | None = None) -> FeatureStats:
        """Read ``mu``/``sigma`` (``feature="pool"``) or ``mu_s``/``sigma_s`` (``"spatial"``)
        the way the ADM evaluator and pytorch-fid do.

        Files not written by vgen do not say which network made them: pass ``extractor``
        (ADM's ``VIRTUAL_*.npz`` come from the TF InceptionV3 graph, whose torch twin here is
        ``InceptionV3FID(..., preprocess="tf1")``, name ``"inception-v3-fid-tf1"``). ``count``
        (only needed to merge) is read from vgen files; ADM's stats are over the whole dataset,
        not ``arr_0``, so theirs is unknown unless given.
        """
        if feature not in _ADM_KEYS:
            raise ValueError(f"load_npz: feature must be 'pool' or 'spatial', got {feature!r}.")
        mu_key, sigma_key = _ADM_KEYS[feature]
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if mu_key not in keys or sigma_key not in keys:
                what = ("only images (arr_0): compute stats with an extractor over "
                        "iter_npz_images(path)" if "arr_0" in keys else f"keys {sorted(keys)}")
                raise ValueError(f"load_npz: {path} has no {mu_key}/{sigma_key}; it holds {what}.")
            stored = str(f["vgen_extractor"]) if "vgen_extractor" in keys else None
            count_key = "vgen_count" if feature == "pool" else "vgen_count_s"
            stored_count = int(f[count_key]) if count_key in keys else -1
            mu, sigma = f[mu_key], f[sigma_key]
        if stored is not None and extractor is not None:
            check_comparable(stored, extractor, f"load_npz({path})")
        name = extractor or stored
        if name is None:
            raise ValueError(
                f"load_npz: {path} does not record which extractor made it; pass extractor=... "
                f"(ADM reference batches: 'inception-v3-fid-tf1'; pytorch-fid stats: "
                f"'inception-v3-fid-pt')."
            )
        if count is None and stored_count >= 0:
            count = stored_count
        return cls.from_moments(mu, sigma, count, name, feature)


def _count_or_neg(s: FeatureStats) -> int:
    return -1 if s.count is None else s.count


# --- distances and scores -----------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), pytorch-fid's algorithm.

    Args: means (D,) and covariances (D, D) in any float dtype (computed in float64).
    Raises ValueError on mismatched shapes or a significantly complex matrix square root.
    """
    mu1, mu2 = np.atleast_1d(_as_numpy_f64(mu1)), np.atleast_1d(_as_numpy_f64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_numpy_f64(sigma1)), np.atleast_2d(_as_numpy_f64(sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: mean vectors differ in length: {mu1.shape} vs "
                         f"{mu2.shape}.")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: covariances differ in shape: {sigma1.shape} vs "
                         f"{sigma2.shape}.")
    diff = mu1 - mu2
    # Product might be almost singular. (scipy >= 1.16 deprecates disp=; the matrix is the same.)
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of "
                      f"cov estimates", RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # Numerical error might give a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component "
                             f"{np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2).")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _stats_distance(a: FeatureStats, b: FeatureStats, eps: float) -> float:
    """The Frechet distance of two stats. With no more samples than feature dims the
    covariances are singular: scipy's warnings about it are replaced by one warning of the
    ``vgen.eval`` logger that says what it means (the console shows it as one line)."""
    what = "sFID" if a.feature == "spatial" else "FID"
    few = [int(s.count) for s in (a, b) if s.count is not None and s.count <= a.dims]
    with warnings.catch_warnings():
        if few:
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
        d = frechet_distance(a.mean, a.cov, b.mean, b.cov, eps=eps)
    if few:
        log.warning("%s on %d samples is not meaningful: the covariance of %d-dim features is "
                    "singular below %d samples; compare it only with runs of the same size",
                    what, min(few), a.dims, a.dims + 1)
    return d


def fid(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """FID between two pool-feature stats from the same extractor."""
    check_comparable(a, b, "fid")
    return _stats_distance(a, b, eps)


def sfid(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """sFID: the same Frechet distance on spatial-feature stats (ADM: mixed_6/conv[:7])."""
    check_comparable(a, b, "sfid")
    if a.feature != "spatial":
        raise ValueError(f"sfid: needs 'spatial' feature stats, got {a.feature!r}; accumulate "
                         f"Features.spatial_BS into FeatureStats(..., feature='spatial').")
    return _stats_distance(a, b, eps)


class InceptionScore(NamedTuple):
    mean: float
    std: float


def inception_score(logits_NK: np.ndarray | Tensor, splits: int = 10,
                    shuffle_seed: int | None = None) -> InceptionScore:
    """Inception Score from classifier logits (N, K), in float64.

    Splits are consecutive blocks [i*N//splits, (i+1)*N//splits) as in ADM (shuffle_seed=None;
    ADM's 5000-image splits of 50k samples) and torch-fidelity; torch-fidelity first permutes
    with ``np.random.RandomState(2020)`` -- pass ``shuffle_seed=2020`` to match it. Terms with
    p(y|x) == 0 contribute 0 (the limit of p log p).
    """
    x = _as_numpy_f64(logits_NK)
    if x.ndim != 2:
        raise ValueError(f"inception_score: expected logits (N, K), got {x.shape}.")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: need 1 <= splits <= N, got splits={splits}, N={n}.")
    if not np.isfinite(x).all():
        raise ValueError("inception_score: logits contain non-finite values.")
    if shuffle_seed is not None:
        x = x[np.random.RandomState(shuffle_seed).permutation(n)]
    log_p = x - logsumexp(x, axis=1, keepdims=True)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_q = np.log(p[sl].mean(axis=0, keepdims=True))
            kl = np.where(p[sl] > 0, p[sl] * (log_p[sl] - log_q), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)))


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _sq_dists(u: Tensor, v: Tensor) -> Tensor:
    # ADM _batch_pairwise_distances: max(|u|^2 - 2 u.v + |v|^2, 0)
    nu = (u * u).sum(1, keepdim=True)
    nv = (v * v).sum(1).unsqueeze(0)
    return (nu - 2 * u @ v.T + nv).clamp_min_(0)


def _knn_radii(x: Tensor, k: int, row_bs: int, col_bs: int) -> Tensor:
    radii = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for r0 in range(0, x.shape[0], row_bs):
        rows = x[r0:r0 + row_bs]
        d = torch.cat([_sq_dists(rows, x[c0:c0 + col_bs]) for c0 in range(0, x.shape[0], col_bs)],
                      dim=1)
        radii[r0:r0 + row_bs] = d.kthvalue(k + 1, dim=1).values  # index 0 is the point itself
    return radii


def precision_recall(
    real_NF: np.ndarray | Tensor,
    fake_MF: np.ndarray | Tensor,
    k: int = 3,
    *,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> PrecisionRecall:
    """Improved precision (share of fake points inside the real k-NN manifold) and recall (share
    of real points inside the fake manifold), as ADM's ``compute_prec_recall(ref, sample)``.

    ``dtype`` float32 is ADM's fallback precision (ADM first tries float16 distances, so its
    borderline memberships can differ slightly). Memory: one (row_batch_size, N) block.
    """
    dev = torch.device(device) if device is not None else None

    def prep(a: np.ndarray | Tensor, what: str) -> Tensor:
        t = a.detach() if isinstance(a, Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        if t.ndim != 2:
            raise ValueError(f"precision_recall: {what} must be (N, F), got {tuple(t.shape)}.")
        if t.shape[0] <= k:
            raise ValueError(f"precision_recall: {what} needs more than k={k} points, has "
                             f"{t.shape[0]}.")
        return t.to(device=dev if dev is not None else t.device, dtype=dtype)

    real, fake = prep(real_NF, "real"), prep(fake_MF, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: feature dims differ: {real.shape[1]} vs "
                         f"{fake.shape[1]}.")
    fake = fake.to(real.device)
    radii_real = _knn_radii(real, k, row_batch_size, col_batch_size)
    radii_fake = _knn_radii(fake, k, row_batch_size, col_batch_size)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    for r0 in range(0, real.shape[0], row_batch_size):
        r1 = r0 + row_batch_size
        for c0 in range(0, fake.shape[0], col_batch_size):
            c1 = c0 + col_batch_size
            d = _sq_dists(real[r0:r1], fake[c0:c1])
            real_in[r0:r1] |= (d <= radii_fake[c0:c1].unsqueeze(0)).any(1)
            fake_in[c0:c1] |= (d <= radii_real[r0:r1].unsqueeze(1)).any(0)
    return PrecisionRecall(fake_in.double().mean().item(), real_in.double().mean().item())


# --- ADM .npz image batches ---------------------------------------------------------------------


@contextmanager
def _npy_member(path: str | Path, key: str) -> Iterator[IO[bytes]]:
    with zipfile.ZipFile(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            raise ValueError(f"{path}: no {key!r} array; arrays: "
                             f"{sorted(n[:-4] for n in zf.namelist())}.")
        with zf.open(f"{key}.npy") as f:
            yield f


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def npz_array_shape(path: str | Path, key: str = "arr_0") -> tuple[int, ...]:
    """Shape of one array in an ``.npz`` without loading it (e.g. the number of images)."""
    with _npy_member(path, key) as f:
        header = _read_header(f)
    if header is None:
        with np.load(path, allow_pickle=False) as z:
            return tuple(z[key].shape)
    return tuple(header[0])


def iter_npz_images(path: str | Path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream an ADM sample/reference batch: uint8 (b, H, W, 3) chunks of ``arr_0`` in order,
    without loading the whole array (as the ADM evaluator's streaming reader). For extractors,
    convert with ``torch.from_numpy(batch).permute(0, 3, 1, 2)``."""
    if batch_size < 1:
        raise ValueError(f"iter_npz_images: batch_size must be >= 1, got {batch_size}.")
    with _npy_member(path, key) as f:
        header = _read_header(f)
        if header is None or header[1] or header[2].hasobject:
            with np.load(path, allow_pickle=False) as z:
                arr = z[key]
            for i in range(0, arr.shape[0], batch_size):
                yield arr[i:i + batch_size]
            return
        shape, _, dtype = header
        per_item = int(np.prod(shape[1:])) * dtype.itemsize
        for i in range(0, shape[0], batch_size):
            b = min(batch_size, shape[0] - i)
            buf = bytearray()
            while len(buf) < b * per_item:
                chunk = f.read(b * per_item - len(buf))
                if not chunk:
                    raise ValueError(f"{path}: {key} ends early at item {i}.")
                buf += chunk
            yield np.frombuffer(bytes(buf), dtype=dtype).reshape(b, *shape[1:])
