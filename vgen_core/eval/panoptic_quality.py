"""Panoptic Quality (PQ / SQ / RQ), per image and mergeable, as cocodataset/panopticapi computes it.

Matches ``panopticapi/evaluation.py`` (``PQStatCat``, ``PQStat``, ``pq_compute_single_core``,
the table printed by ``pq_compute``) step for step, so the numbers agree to the printed digit:

1. Predicted segment areas are the pixel counts of the prediction id map (the JSON ``area`` of a
   prediction is ignored); GT areas are the JSON ``area`` of ``segments_info`` (as in panopticapi;
   here a missing GT ``area`` falls back to the pixel count, where panopticapi raises KeyError).
2. The joint histogram of ``gt_id * 256**3 + pred_id`` gives every intersection.
3. A GT and a predicted segment of the same category match when
   IoU = inter / (area_pred + area_gt - inter - |pred ∩ VOID|) > 0.5. Crowd GT never matches.
4. Unmatched non-crowd GT -> FN. Unmatched prediction -> FP unless more than half of its area lies
   on VOID (id 0) plus the crowd GT region of its own category (one crowd region per category:
   the last one listed in ``segments_info`` wins, as in panopticapi).
5. Per category PQ = ΣIoU / (TP + FP/2 + FN/2), SQ = ΣIoU / TP, RQ = TP / (TP + FP/2 + FN/2);
   categories with TP + FP + FN = 0 are skipped; All / Things / Stuff are means over categories.

One documented difference: panopticapi raises ZeroDivisionError when a group (e.g. Stuff) has no
category with TP + FP + FN > 0; here that group is reported as 0.0 with ``n == 0``.

Id maps are integer arrays of shape (H, W) holding ``R + 256 G + 256² B`` (already decoded).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "OFFSET", "VOID", "PQStat", "PQStatCat", "format_results", "pq_compute", "pq_compute_many",
    "pq_results",
]

OFFSET = 256 * 256 * 256
VOID = 0

Categories = Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]


@dataclass
class PQStatCat:
    """Sums for one category: Σ IoU over matches, and TP / FP / FN counts."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQStatCat) -> PQStatCat:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class PQStat:
    """Per-category PQ sums; merge images or workers with ``+=`` (or ``+``).

    ``stat[category_id]`` gives the :class:`PQStatCat` (created empty on first access).
    Picklable, so a worker can return it.
    """

    def __init__(self) -> None:
        self.pq_per_cat: defaultdict[int, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.pq_per_cat[category_id]

    def __iadd__(self, other: PQStat) -> PQStat:
        for label, cat in other.pq_per_cat.items():
            self.pq_per_cat[label] += cat
        return self

    def __add__(self, other: PQStat) -> PQStat:
        out = PQStat()
        out += self
        out += other
        return out

    def __repr__(self) -> str:
        return f"PQStat({dict(self.pq_per_cat)!r})"

    def pq_average(
        self, categories: Categories, isthing: bool | None = None
    ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Mean PQ/SQ/RQ over the categories of one group, and the per-category values.

        Args:
            categories: list of ``{id, isthing, name, ...}`` dicts or a dict ``{id: info}``.
            isthing: None for All, True for Things (``isthing == 1``), False for Stuff.
        Returns:
            ``({'pq', 'sq', 'rq', 'n'}, {category_id: {'pq', 'sq', 'rq'}})`` as fractions in [0, 1];
            ``n`` counts the categories with TP + FP + FN > 0 (only those enter the mean).
        """
        pq, sq, rq, n = 0.0, 0.0, 0.0, 0
        per_class: dict[int, dict[str, float]] = {}
        for label, info in _category_dict(categories).items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            cat = self.pq_per_cat.get(label, PQStatCat())
            iou, tp, fp, fn = cat.iou, cat.tp, cat.fp, cat.fn
            if tp + fp + fn == 0:
                per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq_class = iou / tp if tp != 0 else 0.0
            rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[label] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        if n == 0:  # panopticapi raises ZeroDivisionError here
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _category_dict(categories: Categories) -> dict[int, Mapping[str, Any]]:
    if isinstance(categories, Mapping):
        return dict(categories)
    return {c["id"]: c for c in categories}


def _image_label(ann: Mapping[str, Any]) -> Any:
    return ann.get("image_id", ann.get("file_name", "?"))


def pq_compute(
    gt_ann: Mapping[str, Any],
    pred_ann: Mapping[str, Any],
    gt_ids: np.ndarray,
    pred_ids: np.ndarray,
    categories: Categories,
    into: PQStat | None = None,
) -> PQStat:
    """PQ sums of one image (panopticapi ``pq_compute_single_core`` for one (gt, pred) pair).

    Args:
        gt_ann, pred_ann: panoptic annotation records, each with ``segments_info`` (list of
            ``{id, category_id, iscrowd, area, ...}``); ``image_id`` is used in error messages.
        gt_ids, pred_ids: (H, W) non-negative integer id maps (0 = VOID).
        categories: list of ``{id, isthing, name}`` dicts or ``{id: info}``.
        into: add this image's sums into an existing stat (returned) instead of a new one. Adding
            image after image into one stat sums the IoUs in panopticapi's single-core order, so
            ΣIoU agrees to the last bit; merging per-image stats with ``+=`` may differ there (in
            panopticapi too, whose per-core split depends on the CPU count).
    Raises:
        KeyError: with panopticapi's messages when a predicted id is in the map but not in the
            JSON (or the reverse), or a prediction has an unknown ``category_id``.
        ValueError: when the two maps differ in shape or hold negative ids.
    """
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"pq_compute: image {_image_label(gt_ann)}: GT id map has shape {gt_ids.shape} but the "
            f"prediction has {pred_ids.shape}; decode both PNGs at the image's size."
        )
    for name, arr in (("GT", gt_ids), ("prediction", pred_ids)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"pq_compute: {name} id map must be an integer array, got "
                             f"{arr.dtype}.")
        if arr.size and arr.min() < 0:
            raise ValueError(f"pq_compute: {name} id map holds negative ids; expected "
                             "R + 256 G + 256² B.")
    cats = _category_dict(categories)
    image_id = gt_ann.get("image_id")
    stat = PQStat() if into is None else into

    gt_segms = {el["id"]: el for el in gt_ann["segments_info"]}
    pred_segms = {el["id"]: el for el in pred_ann["segments_info"]}

    # predicted segment areas from the map + sanity checks (panopticapi's messages)
    pred_area: dict[int, int] = {}
    pred_left = set(pred_segms)
    labels, counts = np.unique(pred_ids, return_counts=True)
    for label, cnt in zip(labels.tolist(), counts.tolist()):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise KeyError(
                f"In the image with ID {image_id} segment with ID {label} is presented in PNG "
                "and not presented in JSON."
            )
        pred_area[label] = cnt
        pred_left.remove(label)
        if pred_segms[label]["category_id"] not in cats:
            raise KeyError(
                f"In the image with ID {image_id} segment with ID {label} has unknown "
                f"category_id {pred_segms[label]['category_id']}."
            )
    if pred_left:
        raise KeyError(
            f"In the image with ID {image_id} the following segment IDs {list(pred_left)} are "
            "presented in JSON and not presented in PNG."
        )

    # joint histogram, iterated in ascending (gt_id, pred_id) order like np.unique in panopticapi
    joint = gt_ids.astype(np.uint64) * np.uint64(OFFSET) + pred_ids.astype(np.uint64)
    labels, counts = np.unique(joint, return_counts=True)
    gt_pred_map: dict[tuple[int, int], int] = {
        (lab // OFFSET, lab % OFFSET): cnt for lab, cnt in zip(labels.tolist(), counts.tolist())
    }
    gt_area: dict[int, int] = {}
    for (g, _p), cnt in gt_pred_map.items():
        gt_area[g] = gt_area.get(g, 0) + cnt

    def area_of_gt(label: int) -> int:
        area = gt_segms[label].get("area")
        return gt_area.get(label, 0) if area is None else area

    def is_crowd(info: Mapping[str, Any]) -> bool:
        return info.get("iscrowd", 0) == 1

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (gt_label, pred_label), inter in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        gt_info = gt_segms[gt_label]
        if is_crowd(gt_info):
            continue
        if gt_info["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (pred_area[pred_label] + area_of_gt(gt_label) - inter
                 - gt_pred_map.get((VOID, pred_label), 0))
        iou = inter / union
        if iou > 0.5:
            cat = stat[gt_info["category_id"]]
            cat.tp += 1
            cat.iou += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    # false negatives; remember one crowd region per category
    crowd_by_cat: dict[int, int] = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if is_crowd(gt_info):
            crowd_by_cat[gt_info["category_id"]] = gt_label
            continue
        stat[gt_info["category_id"]].fn += 1

    # false positives, unless mostly on VOID + same-category crowd
    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        inter = gt_pred_map.get((VOID, pred_label), 0)
        if pred_info["category_id"] in crowd_by_cat:
            inter += gt_pred_map.get((crowd_by_cat[pred_info["category_id"]], pred_label), 0)
        if inter / pred_area[pred_label] > 0.5:
            continue
        stat[pred_info["category_id"]].fp += 1
    return stat


_GROUPS = (("All", None), ("Things", True), ("Stuff", False))


def pq_results(stat: PQStat, categories: Categories) -> dict[str, Any]:
    """``{'All', 'Things', 'Stuff': {pq, sq, rq, n}, 'per_class': {id: {pq, sq, rq}}}`` (fractions),
    the dict panopticapi's ``pq_compute`` returns."""
    results: dict[str, Any] = {}
    for name, isthing in _GROUPS:
        results[name], per_class = stat.pq_average(categories, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def format_results(results: Mapping[str, Any] | PQStat,
                   categories: Categories | None = None) -> str:
    """The table panopticapi prints (values ×100, one decimal), without the timing line.

    Pass either the dict from :func:`pq_results` or a :class:`PQStat` with its categories.
    """
    if isinstance(results, PQStat):
        if categories is None:
            raise ValueError("format_results: pass the categories along with a PQStat.")
        results = pq_results(results, categories)
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"),
             "-" * (10 + 7 * 4)]
    for name, _ in _GROUPS:
        r = results[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
            name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]))
    return "\n".join(lines)


def pq_compute_many(
    items: Iterable[tuple[Mapping[str, Any], Mapping[str, Any], np.ndarray, np.ndarray]],
    categories: Categories,
) -> PQStat:
    """Sum :func:`pq_compute` over ``(gt_ann, pred_ann, gt_ids, pred_ids)`` tuples."""
    stat = PQStat()
    for gt_ann, pred_ann, gt_ids, pred_ids in items:
        pq_compute(gt_ann, pred_ann, gt_ids, pred_ids, categories, into=stat)
    return stat
