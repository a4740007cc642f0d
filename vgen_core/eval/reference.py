"""Reference statistics for generation metrics, their cache, and ADM reference batches.

A *reference* is what generated images are scored against: the pool-feature moments (FID), the
spatial-feature moments (sFID) and a bounded, deterministic subset of pool features
(precision/recall needs points, not moments) of a set of real images under ONE extractor.

Sources:

- a curated Delta table *version*, images center-cropped to the evaluated resolution (made by
  the caller, e.g. ``evaluate.generation``, and cached here);
- an ADM reference batch ``.npz`` (``VIRTUAL_imagenet256_labeled.npz``): ``mu``/``sigma`` (and
  ``mu_s``/``sigma_s``) are used as they are; ``arr_0`` images, when present, give the
  precision/recall points, or the whole reference when the file has no moments.

Comparability. ADM's moments come from the TF InceptionV3 graph; numbers against them are
comparable with published ones only when the generated side goes through the InceptionV3 port
(:class:`~vgen_core.eval.extractors.InceptionV3FID`; its ``tf1`` preprocessing is the exact twin,
``pytorch-fid`` differs in the resize only). With any other extractor an ADM file's moments are
refused (they are not in that extractor's feature space) and its images are re-extracted, and
the reference says ``comparable=False``. A curated-table reference is never "comparable with
published numbers": it is another dataset.

Cache: one Delta table (default ``_vgen/reference_stats``, schema
:data:`~vgen_core.data.schemas.REFERENCE_STATS`) keyed by (source uri, source version, extractor
name, resolution). Each row also records ``source_digest`` (for a Delta source: a digest of its
``(sample_id, content_digest)`` pairs at that version; for a file: its size and modification
time or ETag); a hit must match it, so a table re-created at the same URI, or a replaced file,
is never served stale statistics.

Shape legend: N samples, D pool dims, S spatial dims, M kept reference features, K logit classes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vgen_core.eval.extractors import check_comparable
from vgen_core.eval.fid import (
    FeatureStats,
    inception_score,
    iter_npz_images,
    precision_recall,
)

__all__ = [
    "REFERENCE_TABLE",
    "FeatureSubset",
    "ReferenceKey",
    "ReferenceStats",
    "ReferenceStatsCache",
    "adm_comparable",
    "generation_metrics",
    "import_adm_npz",
    "keys_digest",
]

REFERENCE_TABLE = "_vgen/reference_stats"
#: extractor names of the InceptionV3 port (``InceptionV3FID``), the only ones ADM moments fit
_INCEPTION_PREFIX = "inception-v3-fid"


def adm_comparable(extractor: str) -> bool:
    """Whether numbers from ``extractor`` can stand beside published ADM-suite numbers."""
    return extractor.startswith(_INCEPTION_PREFIX)


@dataclass(frozen=True)
class ReferenceKey:
    """Cache key. ``source_version``: Delta version (-1: a file); ``resolution``: the crop size
    the images were preprocessed to (0: images as stored)."""

    source_uri: str
    source_version: int
    extractor: str
    resolution: int


@dataclass
class ReferenceStats:
    key: ReferenceKey
    kind: str  # "delta" | "adm_npz"
    pool: FeatureStats
    spatial: FeatureStats | None = None
    features_MD: np.ndarray | None = None  # float32, for precision/recall
    source_digest: str | None = None
    comparable: bool = False  # with published (ADM-suite) numbers
    details: dict[str, Any] = field(default_factory=dict)
    cached: bool = False  # read back from the cache (not computed by this call)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for results tables and MLflow."""
        return {"source_uri": self.key.source_uri, "source_version": self.key.source_version,
                "extractor": self.key.extractor, "resolution": self.key.resolution,
                "kind": self.kind, "count": self.pool.count, "num_features":
                0 if self.features_MD is None else int(self.features_MD.shape[0]),
                "comparable_to_published": self.comparable, "cached": self.cached,
                **self.details}


# ---------------------------------------------------------------------------------------------
# A bounded, order-independent subset of features
# ---------------------------------------------------------------------------------------------


class FeatureSubset:
    """Keeps the ``max_size`` rows whose key hashes lowest: the same subset whatever the order
    or batching the rows arrive in (Ray Data gives no order), memory bounded by ``max_size``."""

    def __init__(self, max_size: int):
        self.max_size = int(max_size)
        self._h = np.zeros(0, dtype=np.uint64)
        self._x: np.ndarray | None = None

    @staticmethod
    def _hash(keys: Iterable[str]) -> np.ndarray:
        return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(),
                                        "little") for k in keys], dtype=np.uint64)

    def add(self, keys: list[str], features_ND: np.ndarray) -> None:
        if self.max_size <= 0 or not len(keys):
            return
        x = np.asarray(features_ND, dtype=np.float32)
        h = np.concatenate([self._h, self._hash(keys)])
        x = x if self._x is None else np.concatenate([self._x, x])
        if len(h) > self.max_size:
            keep = np.argsort(h, kind="stable")[: self.max_size]
            h, x = h[keep], x[keep]
        self._h, self._x = h, x

    def result(self) -> np.ndarray | None:
        if self._x is None:
            return None
        return self._x[np.argsort(self._h, kind="stable")]


def keys_digest(table: pa.Table) -> str:
    """Digest of a table's (sample_id, content_digest) pairs, independent of row order."""
    pairs = pc.binary_join_element_wise(table["sample_id"].cast(pa.string()),
                                        table["content_digest"].cast(pa.string()), "\x1f")
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(pairs.to_pylist()):
        h.update(p.encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def generation_metrics(ref: ReferenceStats, pool: FeatureStats, spatial: FeatureStats | None,
                       pool_ND: np.ndarray | None, logits_NK: np.ndarray | None, *,
                       k: int = 3, is_splits: int = 10) -> tuple[dict[str, float], dict[str, str]]:
    """ADM's five numbers for generated features against ``ref``.

    Returns (metrics, notes): ``fid``, ``sfid``, ``is`` / ``is_std``, ``precision`` / ``recall``;
    a metric that cannot be computed (too few samples, no spatial stats, no reference points, a
    degenerate covariance) is left out and ``notes`` says why. IS uses ``is_splits`` consecutive
    splits (ADM: 10 of 5000), fewer when there are under 2 samples per split. Precision/recall
    compare ``pool_ND`` (N, D) with the reference's kept points, ``k``-NN radii as ADM.
    """
    check_comparable(ref.pool, pool, "generation_metrics")
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    metrics["fid"] = pool.frechet_distance(ref.pool)
    if spatial is not None and ref.spatial is not None:
        try:
            metrics["sfid"] = spatial.frechet_distance(ref.spatial)
        except ValueError as e:  # rank-deficient covariances of tiny sample sets
            notes["sfid"] = f"skipped: {e}"
    else:
        notes["sfid"] = "skipped: the reference has no spatial statistics"
    if logits_NK is not None and len(logits_NK):
        # at least 2 samples a split (a one-sample split scores exactly 1)
        splits = max(1, min(is_splits, len(logits_NK) // 2))
        score = inception_score(logits_NK, splits=splits)
        metrics["is"], metrics["is_std"] = score.mean, score.std
    n_ref = 0 if ref.features_MD is None else len(ref.features_MD)
    n_gen = 0 if pool_ND is None else len(pool_ND)
    if ref.features_MD is not None and pool_ND is not None and n_ref > k and n_gen > k:
        pr = precision_recall(ref.features_MD, pool_ND, k=k)
        metrics["precision"], metrics["recall"] = pr.precision, pr.recall
    else:
        notes["precision"] = notes["recall"] = (
            f"skipped: needs more than k={k} points on both sides (reference {n_ref}, "
            f"samples {n_gen})")
    return metrics, notes


# ---------------------------------------------------------------------------------------------
# ADM reference batches
# ---------------------------------------------------------------------------------------------


def _stats_of_images(
    batches: Iterable[np.ndarray], extractor: Callable, name: str, dims: int, max_features: int
) -> tuple[FeatureStats, FeatureStats | None, np.ndarray | None]:
    import torch

    pool, spatial = FeatureStats(dims, name), None
    subset, i = FeatureSubset(max_features), 0
    for imgs in batches:
        f = extractor(torch.from_numpy(np.array(imgs, copy=True)).permute(0, 3, 1, 2))
        x = f.pool_BD.double().cpu().numpy()
        pool.update(x)
        if f.spatial_BS is not None:
            if spatial is None:
                spatial = FeatureStats(f.spatial_BS.shape[1], name, "spatial")
            spatial.update(f.spatial_BS.double().cpu().numpy())
        subset.add([str(j) for j in range(i, i + len(x))], x)
        i += len(x)
    return pool, spatial, subset.result()


def import_adm_npz(path: str, extractor: Any, *, source_uri: str | None = None,
                   source_digest: str | None = None, batch_size: int = 100,
                   max_features: int = 10000) -> ReferenceStats:
    """Reference statistics from an ADM reference batch (a local ``.npz``).

    ``extractor`` is the one the generated images go through (its ``name``, ``dims``; it is
    called only on ``arr_0`` images). ``mu``/``sigma`` (+ ``mu_s``/``sigma_s``) are taken as
    they are when the extractor is the InceptionV3 port (then ``comparable=True``); the file's
    ``arr_0`` images, if any, give the precision/recall points (ADM uses them the same way). For
    any other extractor the moments are refused and the reference is computed from ``arr_0``
    (``comparable=False``); a file with neither usable moments nor images raises ValueError.
    """
    name, dims = str(extractor.name), int(extractor.dims)
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        image_shape = f["arr_0"].shape if "arr_0" in keys else None
    has_moments = {"mu", "sigma"} <= keys
    uri = source_uri or str(path)
    details: dict[str, Any] = {"file_keys": sorted(keys)}
    if image_shape is not None:
        details["images"] = list(image_shape)

    def images() -> Iterable[np.ndarray]:
        return iter_npz_images(path, batch_size)

    if has_moments and adm_comparable(name):
        pool = FeatureStats.load_npz(path, extractor=name)
        if pool.dims != dims:
            raise ValueError(f"{path}: mu has {pool.dims} dims but {name} makes {dims}-d features")
        spatial = (FeatureStats.load_npz(path, feature="spatial", extractor=name)
                   if {"mu_s", "sigma_s"} <= keys else None)
        feats = None
        if image_shape is not None:
            _, _, feats = _stats_of_images(images(), extractor, name, dims, max_features)
        details["moments"] = "file (mu/sigma)"
        return ReferenceStats(ReferenceKey(uri, -1, name, 0), "adm_npz", pool, spatial,
                              feats, source_digest, True, details)
    if image_shape is None:
        why = (f"its mu/sigma come from the ADM InceptionV3 and cannot be compared with "
               f"{name!r} features" if has_moments else f"it holds {sorted(keys)}")
        raise ValueError(f"{path}: no usable reference: {why}, and it has no arr_0 images to "
                         "extract. Give the InceptionV3 weights (extractor_weights) to use its "
                         "moments.")
    pool, spatial, feats = _stats_of_images(images(), extractor, name, dims, max_features)
    details["moments"] = f"extracted from arr_0 ({image_shape[0]} images) with {name}"
    return ReferenceStats(ReferenceKey(uri, -1, name, 0), "adm_npz", pool, spatial,
                          feats, source_digest, adm_comparable(name), details)


# ---------------------------------------------------------------------------------------------
# The cache table
# ---------------------------------------------------------------------------------------------


def _f64(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def _from_f64(b: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(b, dtype="<f8").reshape(shape).astype(np.float64)


class ReferenceStatsCache:
    """``get``/``put`` :class:`ReferenceStats` in a Delta table of a
    :class:`~vgen_core.data.TableStore` (one atomic append per entry; see the module docstring)."""

    def __init__(self, store: Any, table: str = REFERENCE_TABLE):
        self.store, self.table = store, table

    def get(self, key: ReferenceKey, source_digest: str | None = None) -> ReferenceStats | None:
        """The newest entry for ``key`` whose recorded source digest equals ``source_digest``
        (when given); None on a miss."""
        if not self.store.exists(self.table):
            return None
        t = self.store.read(self.table, filter=[
            ("source_uri", "=", key.source_uri), ("source_version", "=", key.source_version),
            ("extractor", "=", key.extractor), ("resolution", "=", key.resolution)])
        rows = sorted(t.to_pylist(), key=lambda r: r["created_at"], reverse=True)
        for r in rows:
            if source_digest is None or r["source_digest"] == source_digest:
                return self._decode(key, r)
        return None

    def put(self, ref: ReferenceStats) -> int:
        """Append ``ref``; returns the table version."""
        from vgen_core.data.schemas import REFERENCE_STATS

        sp = ref.spatial
        feats = ref.features_MD
        row = {
            "source_uri": ref.key.source_uri, "source_version": ref.key.source_version,
            "extractor": ref.key.extractor, "resolution": ref.key.resolution, "kind": ref.kind,
            "source_digest": ref.source_digest, "count": ref.pool.count, "dims": ref.pool.dims,
            "mu": _f64(ref.pool.mean), "sigma": _f64(ref.pool.cov),
            "spatial_dims": sp.dims if sp is not None else None,
            "mu_s": _f64(sp.mean) if sp is not None else None,
            "sigma_s": _f64(sp.cov) if sp is not None else None,
            "num_features": 0 if feats is None else int(feats.shape[0]),
            "features": (np.ascontiguousarray(feats, dtype="<f4").tobytes()
                         if feats is not None else None),
            "details": json.dumps({"comparable": ref.comparable, **ref.details}, sort_keys=True,
                                  default=str),
            "created_at": dt.datetime.now(dt.timezone.utc),
        }
        return self.store.append(self.table, pa.Table.from_pylist([row], schema=REFERENCE_STATS),
                                 commit_metadata={"vgen.reference": json.dumps(
                                     {"uri": ref.key.source_uri, "version":
                                      ref.key.source_version, "extractor": ref.key.extractor})})

    @staticmethod
    def _decode(key: ReferenceKey, r: dict[str, Any]) -> ReferenceStats:
        d = int(r["dims"])
        count = r["count"]
        count = int(count) if count is not None and count >= 2 else None
        pool = FeatureStats.from_moments(_from_f64(r["mu"], (d,)), _from_f64(r["sigma"], (d, d)),
                                         count, key.extractor)
        spatial = None
        if r["mu_s"] is not None:
            s = int(r["spatial_dims"])
            spatial = FeatureStats.from_moments(_from_f64(r["mu_s"], (s,)),
                                                _from_f64(r["sigma_s"], (s, s)), count,
                                                key.extractor, "spatial")
        feats = None
        if r["features"] is not None and r["num_features"]:
            feats = np.frombuffer(r["features"], dtype="<f4").reshape(
                int(r["num_features"]), d).copy()
        details = json.loads(r["details"]) if r["details"] else {}
        comparable = bool(details.pop("comparable", False))
        return ReferenceStats(key, r["kind"], pool, spatial, feats, r["source_digest"], comparable,
                              details, cached=True)
