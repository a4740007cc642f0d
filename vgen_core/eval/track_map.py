"""ViCaS LG-VIS track mAP, computed as the official scorer (``Ali2500/ViCaS``,
``vicas/evaluation/seg_eval.py::TrackMAP``, ``utils.py::compute_track_ious``, ``main.py``).

Protocol, step for step (the dtypes are the official ones, so the numbers agree to the digit):

* Frames: every ``is_gt`` frame of the video, by sorted file name. A GT track absent from a GT
  frame is an empty mask there, so a prediction on that frame adds to the union. Predicted
  frames that are not GT frames are ignored; every GT frame must be predicted.
* Track IoU = Σ_t |P_t ∩ G_t| / Σ_t |P_t ∪ G_t| over those frames (float64, stored as float32;
  0 when the union is empty).
* Thresholds ``np.arange(0.5, 0.95 + 1e-4, 0.05)`` (float64, so 0.7000000000000002, ...). Since
  the IoU is float32, an IoU of exactly 0.75 fails the 0.75 threshold and 0.95 fails 0.95.
* Per referral and threshold, predictions in score order (``np.argsort(-scores)``, at most 10)
  are matched greedily: prediction i takes the *last* still-unmatched GT j (in GT order) with
  IoU >= threshold (the official loop has no ``break``).
* All referrals of all videos are pooled, sorted by score; cumulative TP / FP give
  precision = TP / (TP + FP + 1e-8) and recall = TP / #GT tracks (float32); AP is the area under
  the monotone precision envelope at every recall change (VOC-2010 all-point, not COCO's 101
  points). mAP = mean AP over the thresholds; AP@50 / AP@75 / AP@90; all ×100.
* No predicted track at all -> every AP 0; predictions but no GT track -> every AP 100.

The official prediction files carry no scores: every track scores 1.0, and the pooled order of
equal scores is whatever ``np.argsort`` (quicksort) makes of them. This module calls it the same
way on the same arrays, so keep referrals in the official order (videos by ascending id, then
referral order): :class:`TrackMAP` sorts by ``(video_id, referral)`` when every result has them.

Differences from the official code, all on inputs it mishandles:

* More than 10 predicted tracks for a referral with GT: the official code truncates the scores
  but not its match table and then raises IndexError (or misaligns later referrals); here the
  tracks past the 10th (by score) are dropped. With no GT track it keeps them all, as here.
* RLEs are checked by :mod:`vgen_core.data.rle` (sizes must equal ``image_size``, counts must
  sum to H*W); pycocotools would score a wrong-sized mask as area 0.
* A video without any ``is_gt`` frame raises ValueError (the official code fails an assert).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vgen_core.data import rle as rle_codec

__all__ = [
    "MAX_TRACKS_PER_REFERRAL",
    "REPORTED_THRESHOLDS",
    "THRESHOLDS",
    "ReferralResult",
    "TrackMAP",
    "combine_results",
    "evaluate_lgvis",
    "match_referral",
    "pr_to_ap",
    "referral_tracks",
    "track_ious",
]

THRESHOLDS = np.arange(0.5, 0.95 + 1e-4, 0.05)  # exactly the official float64 values
REPORTED_THRESHOLDS = (0.5, 0.75, 0.9)
MAX_TRACKS_PER_REFERRAL = 10

Track = Sequence[Mapping[str, Any]]  # one RLE per GT frame


# ---------------------------------------------------------------------------------------------
# per referral
# ---------------------------------------------------------------------------------------------


def track_ious(pred_tracks: Sequence[Track], gt_tracks: Sequence[Track],
               image_size: Sequence[int] | None = None) -> np.ndarray:
    """Spatio-temporal IoU matrix ``(P, G)``, float32, as ``compute_track_ious``.

    Args:
        pred_tracks, gt_tracks: outer list over tracks, inner list over frames (same frames, same
            order, for every track); each entry a COCO RLE ``{"size": [H, W], "counts": ...}``.
        image_size: ``[H, W]`` every RLE must have (default: the size of the first RLE of a frame).
    """
    num_p, num_g = len(pred_tracks), len(gt_tracks)
    ious = np.zeros((num_p, num_g), np.float32)
    if num_p == 0 or num_g == 0:
        return ious
    num_t = len(gt_tracks[0])
    for name, tracks in (("predicted", pred_tracks), ("ground-truth", gt_tracks)):
        for k, tr in enumerate(tracks):
            if len(tr) != num_t:
                raise ValueError(f"track_ious: {name} track {k} has {len(tr)} frames, expected "
                                 f"{num_t} (one RLE per GT frame for every track).")
    inter = np.zeros((num_p, num_g), np.int64)
    union = np.zeros((num_p, num_g), np.int64)
    for t in range(num_t):
        size = image_size if image_size is not None else gt_tracks[0][t]["size"]
        p_masks = [_decode_nonempty(tr[t], size, f"pred track {k} frame {t}")
                   for k, tr in enumerate(pred_tracks)]
        g_masks = [_decode_nonempty(tr[t], size, f"gt track {k} frame {t}")
                   for k, tr in enumerate(gt_tracks)]
        for i, (pa, pm) in enumerate(p_masks):
            for j, (ga, gm) in enumerate(g_masks):
                # a mask is None exactly when its area is 0
                both = int(np.count_nonzero(pm & gm)) if pm is not None and gm is not None else 0
                inter[i, j] += both
                union[i, j] += pa + ga - both
    for i in range(num_p):
        for j in range(num_g):
            # float64 quotient stored in float32, as the official ``ious[i, j] = inter / union``
            ious[i, j] = float(inter[i, j]) / float(union[i, j]) if union[i, j] > 0 else 0.0
    return ious


def _decode_nonempty(rle: Mapping[str, Any], size: Sequence[int],
                     source: str) -> tuple[int, np.ndarray | None]:
    a = rle_codec.area(rle, source=source)
    if a == 0:
        rle_codec.validate(rle, size, source=source)
        return 0, None
    return a, rle_codec.decode(rle, expected_size=size, source=source).astype(bool)


@dataclass
class ReferralResult:
    """Matches of one referral: ``match_indices[k, i]`` = GT index matched by prediction i at
    threshold k, or -1 (shape ``(K, P)``, int32); ``scores`` ``(P,)`` float32 in the same
    order; ``num_gt`` GT tracks. ``video_id`` / ``referral`` fix the pooled order."""

    match_indices: np.ndarray
    scores: np.ndarray
    num_gt: int
    video_id: int | None = None
    referral: int | None = None


def match_referral(
    pred_tracks: Sequence[Track],
    gt_tracks: Sequence[Track],
    scores: Sequence[float] | np.ndarray | None = None,
    *,
    thresholds: np.ndarray = THRESHOLDS,
    max_tracks: int = MAX_TRACKS_PER_REFERRAL,
    image_size: Sequence[int] | None = None,
    video_id: int | None = None,
    referral: int | None = None,
) -> ReferralResult:
    """Greedy matching of one referral at every threshold, as ``TrackMAP.process_video``.

    ``scores`` default to 1.0 (the official files carry none); they are cast to float32.
    """
    num_pred, num_gt = len(pred_tracks), len(gt_tracks)
    scores_P = (np.ones(num_pred, np.float32) if scores is None
                else np.asarray(scores, dtype=np.float32).reshape(-1))
    if scores_P.shape != (num_pred,):
        raise ValueError(f"match_referral: {scores_P.size} scores for {num_pred} predicted tracks.")
    num_thresh = len(thresholds)
    if num_pred == 0:
        match = np.zeros((num_thresh, 0), np.int32)
    elif num_gt == 0:  # official: no sorting, no cap; all false positives
        match = np.full((num_thresh, num_pred), -1, np.int32)
    else:
        sort_idx = np.argsort(-1.0 * scores_P)[:max_tracks]
        pred_tracks = [pred_tracks[i] for i in sort_idx.tolist()]
        scores_P = scores_P[sort_idx]
        num_pred = len(pred_tracks)
        ious = track_ious(pred_tracks, gt_tracks, image_size)
        match = np.full((num_thresh, num_pred), -1, np.int32)
        for lvl, thresh in enumerate(thresholds):
            for i in range(num_pred):
                for j in range(num_gt):
                    if j in match[lvl]:
                        continue
                    if ious[i, j] >= thresh:  # no break: the last free qualifying GT wins
                        match[lvl, i] = j
    return ReferralResult(match, scores_P, num_gt, video_id, referral)


# ---------------------------------------------------------------------------------------------
# pooled AP
# ---------------------------------------------------------------------------------------------


def pr_to_ap(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """All-point interpolated AP per row of float32 ``(K, N)`` precision / recall arrays, as
    ``TrackMAP._pr_to_ap``: pad with recall 0 / precision 0 in front and recall 1 / precision 0
    at the end, take the running max of precision from the right, and sum
    ``Δrecall * precision`` where recall changes. Returns float32 ``(K,)`` in [0, 1]."""
    if precision.shape != recall.shape:
        raise ValueError(f"pr_to_ap: shape mismatch {precision.shape} vs {recall.shape}.")
    zero = np.zeros_like(precision[:, :1])
    prec = np.concatenate([zero, precision, zero], 1)
    rec = np.concatenate([zero, recall, np.ones_like(zero)], 1)
    aps = np.zeros(len(prec), np.float32)
    for k, (p, r) in enumerate(zip(prec, rec)):
        p = np.maximum.accumulate(p[::-1])[::-1]  # same values as the official backward loop
        idx = np.where(r[1:] != r[:-1])[0]
        aps[k] = np.sum((r[idx + 1] - r[idx]) * p[idx + 1])
    return aps


def combine_results(results: Sequence[ReferralResult],
                    thresholds: np.ndarray = THRESHOLDS) -> dict[str, float]:
    """Pooled ``{"mAP", "AP@50", "AP@75", "AP@90"}`` (×100), as
    ``TrackMAP.combine_video_results``; ``results`` in the official order."""
    report_idx = []
    for t in REPORTED_THRESHOLDS:
        hit = np.flatnonzero(np.abs(thresholds - t) < 1e-4)
        if hit.size != 1:
            raise ValueError(f"combine_results: threshold {t} must be among the thresholds.")
        report_idx.append(int(hit[0]))
    num_thresh = len(thresholds)
    if results:
        match = np.concatenate([r.match_indices for r in results], 1)
        scores = np.concatenate([r.scores for r in results])
    else:
        match, scores = np.zeros((num_thresh, 0), np.int32), np.zeros(0, np.float32)
    num_gt = float(sum(r.num_gt for r in results))
    if match.size == 0:
        aps = np.zeros(num_thresh, np.float32)
    elif num_gt == 0:
        aps = np.ones(num_thresh, np.float32)
    else:
        sort_idx = np.argsort(-1.0 * scores)
        match = np.stack([m[sort_idx] for m in match])
        tp_sum = np.cumsum((match != -1).astype(np.float32), 1)
        fp_sum = np.cumsum((match == -1).astype(np.float32), 1)
        precision = tp_sum / (tp_sum + fp_sum + 1e-8)
        recall = tp_sum / num_gt
        aps = pr_to_ap(precision, recall)
    aps = aps * 100.0
    out = {"mAP": np.mean(aps).item()}
    for t, k in zip(REPORTED_THRESHOLDS, report_idx):
        out[f"AP@{int(t * 100)}"] = aps[k].item()
    return out


class TrackMAP:
    """Accumulates referral results (from one process or many: merge with ``+=``) and pools
    them into track mAP. Results are ordered by ``(video_id, referral)`` when all carry them,
    else kept in the order added."""

    def __init__(self, thresholds: np.ndarray | None = None,
                 max_tracks: int = MAX_TRACKS_PER_REFERRAL) -> None:
        self.thresholds = THRESHOLDS if thresholds is None else np.asarray(thresholds)
        self.max_tracks = max_tracks
        self.results: list[ReferralResult] = []

    def add_referral(self, pred_tracks: Sequence[Track], gt_tracks: Sequence[Track],
                     scores: Sequence[float] | np.ndarray | None = None,
                     **kw: Any) -> ReferralResult:
        """Match one referral (see :func:`match_referral`) and keep the result."""
        res = match_referral(pred_tracks, gt_tracks, scores, thresholds=self.thresholds,
                             max_tracks=self.max_tracks, **kw)
        self.results.append(res)
        return res

    def add_video(self, pred_content: Mapping[str, Any], gt_content: Mapping[str, Any]) -> None:
        """Score every referral of one video from its parsed prediction and GT JSON."""
        video_id = gt_content.get("video_id")
        size = gt_content["image_size"]
        for k, (pred, gt) in enumerate(referral_tracks(pred_content, gt_content)):
            self.add_referral(pred, gt, image_size=size, video_id=video_id, referral=k)

    def __iadd__(self, other: TrackMAP) -> TrackMAP:
        if not np.array_equal(self.thresholds, other.thresholds):
            raise ValueError("TrackMAP: cannot merge accumulators with different thresholds.")
        self.results.extend(other.results)
        return self

    def ordered_results(self) -> list[ReferralResult]:
        if self.results and all(r.video_id is not None and r.referral is not None
                                for r in self.results):
            return sorted(self.results, key=lambda r: (r.video_id, r.referral))
        return list(self.results)

    def compute(self) -> dict[str, float]:
        return combine_results(self.ordered_results(), self.thresholds)


# ---------------------------------------------------------------------------------------------
# official files
# ---------------------------------------------------------------------------------------------


def referral_tracks(pred_content: Mapping[str, Any], gt_content: Mapping[str, Any]
                    ) -> list[tuple[list[list[dict]], list[list[dict]]]]:
    """``[(pred_tracks, gt_tracks)]``, one pair per ``object_referrals`` entry, as
    ``parse_pred_and_gt_jsons``: tracks are lists of RLEs over the sorted ``is_gt`` frames.

    Raises ValueError when a GT frame is missing from a referral's prediction, when a
    referral's frames carry different numbers of RLEs, or when the video has no GT frame.
    """
    video_id = gt_content.get("video_id")
    gt_files = sorted(s["filename"] for s in gt_content["segmentations"] if s["is_gt"])
    if not gt_files:
        raise ValueError(f"Video {video_id}: no segmentation entry has is_gt=true; nothing to "
                         "score.")
    gt_file_set = set(gt_files)
    by_name = {s["filename"]: s for s in gt_content["segmentations"]}
    height, width = gt_content["image_size"]
    empty = rle_codec.encode(np.zeros((height, width), np.uint8))
    preds = pred_content["pred_lgvis_masks"]
    referrals = gt_content["object_referrals"]
    if len(preds) < len(referrals):
        raise ValueError(f"Video {video_id}: {len(referrals)} object_referrals but only "
                         f"{len(preds)} entries in pred_lgvis_masks (one per referral, same "
                         "order).")
    out = []
    for i, referral in enumerate(referrals):
        per_frame = {s["filename"]: s["mask_rles"] for s in preds[i]
                     if s["filename"] in gt_file_set}
        if set(per_frame) != gt_file_set:
            raise ValueError(f"Video {video_id}: all ground-truth frames not found in predictions "
                             f"(referral {i}):\nPred: {sorted(per_frame)}\nGT: {gt_files}")
        counts = {len(v) for v in per_frame.values()}
        if len(counts) != 1:
            raise ValueError(f"Video {video_id}, referral {i}: GT frames carry different numbers "
                             f"of predicted RLEs {sorted(counts)}; give every frame one RLE per "
                             "predicted track (an empty mask where the track is absent).")
        pred_tracks = [list(track) for track in zip(*(per_frame[f] for f in gt_files))]
        gt_tracks = []
        for tid in referral["track_ids"]:
            track = []
            for f in gt_files:
                seg = by_name[f]
                ids = seg["track_ids"]
                track.append(seg["mask_rles"][ids.index(tid)] if tid in ids else empty)
            gt_tracks.append(track)
        out.append((pred_tracks, gt_tracks))
    return out


def _gt_path(gt_dir: str, video_id: int) -> str:
    path = os.path.join(gt_dir, f"{video_id:06d}.json")
    if os.path.exists(path):
        return path
    hits = glob.glob(os.path.join(gt_dir, f"{video_id:06d}_*.json"))
    if len(hits) != 1:
        raise FileNotFoundError(f"GT annotation for video {video_id}: expected {path} or exactly "
                                f"one {video_id:06d}_*.json in {gt_dir}, found {len(hits)}.")
    return hits[0]


def evaluate_lgvis(pred_dir: str, gt_dir: str, video_ids: Iterable[int]) -> dict[str, float]:
    """LG-VIS metrics of a split, as ``vicas/evaluation/main.py`` (``--skip_captions``).

    Args:
        pred_dir: one ``<video_id:06d>.json`` per video (``pred_lgvis_masks`` as documented).
        gt_dir: ViCaS per-video annotation JSONs (``<id:06d>.json`` or ``<id:06d>_*.json``).
        video_ids: the split's ids (the contents of ``splits/<version>/<split>.json``).
    Returns:
        ``{"mAP", "AP@50", "AP@75", "AP@90"}`` on a 0-100 scale.
    """
    metric = TrackMAP()
    for video_id in sorted(video_ids):
        pred_path = os.path.join(pred_dir, f"{video_id:06d}.json")
        if not os.path.exists(pred_path):
            raise FileNotFoundError(f"No prediction file found at: {pred_path}")
        with open(pred_path) as fh:
            pred_content = json.load(fh)
        with open(_gt_path(gt_dir, video_id)) as fh:
            gt_content = json.load(fh)
        metric.add_video(pred_content, {**gt_content, "video_id": video_id})
    return metric.compute()
