"""PQ against hand-computed cases; the cross-check runs panopticapi when it is importable."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from vgen_core.eval.panoptic_quality import (
    PQStat,
    format_results,
    pq_compute,
    pq_compute_many,
    pq_results,
)

# 1, 2 things; 3, 4 stuff
CATS = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "grass", "isthing": 0},
]


def ann(segments, image_id=1, ids=None):
    """Annotation record; ``segments`` = [(id, category_id, iscrowd)], areas from ``ids``."""
    out = []
    for sid, cat, crowd in segments:
        seg = {"id": sid, "category_id": cat, "iscrowd": crowd}
        if ids is not None:
            seg["area"] = int((np.asarray(ids) == sid).sum())
        out.append(seg)
    return {"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": out}


def row(*ids):
    return np.array([ids], dtype=np.int64)


def cat_stats(stat, cat_id):
    c = stat[cat_id]
    return c.tp, c.fp, c.fn, c.iou


def test_perfect_prediction_is_one():
    gt = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    pred = gt * 10  # same segments, other ids
    g = ann([(1, 3, 0), (2, 1, 0), (3, 2, 0)], ids=gt)
    p = ann([(10, 3, 0), (20, 1, 0), (30, 2, 0)])
    stat = pq_compute(g, p, gt, pred, CATS)
    res = pq_results(stat, CATS)
    # every IoU = 1: pq = sq = rq = 1 per category; grass (4) has no segment -> not counted
    assert res["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}
    assert res["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert res["Stuff"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert res["per_class"][4] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_split_segment_one_tp_one_fp():
    gt = row(1, 1, 1, 1, 1, 1, 1, 1)  # person, area 8
    pred = row(5, 5, 5, 5, 5, 6, 6, 6)  # two person pieces, areas 5 and 3
    stat = pq_compute(ann([(1, 1, 0)], ids=gt), ann([(5, 1, 0), (6, 1, 0)]), gt, pred, CATS)
    # (1,5): IoU = 5 / (5 + 8 - 5) = 0.625 > 0.5 -> TP; (1,6): 3/8 = 0.375 -> piece 6 is a FP
    assert cat_stats(stat, 1) == (1, 1, 0, 0.625)
    _, per = stat.pq_average(CATS, isthing=True)
    # PQ = 0.625 / (1 + 0.5) ; SQ = 0.625 ; RQ = 1 / 1.5
    assert per[1] == pytest.approx({"pq": 0.625 / 1.5, "sq": 0.625, "rq": 1 / 1.5}, abs=1e-15)


def test_even_split_matches_nothing_because_iou_must_exceed_half():
    gt = row(1, 1, 1, 1, 1, 1, 1, 1)
    pred = row(5, 5, 5, 5, 6, 6, 6, 6)
    stat = pq_compute(ann([(1, 1, 0)], ids=gt), ann([(5, 1, 0), (6, 1, 0)]), gt, pred, CATS)
    # both IoUs are 4/8 = 0.5, not > 0.5: GT -> FN, both pieces -> FP
    assert cat_stats(stat, 1) == (0, 2, 1, 0.0)
    avg, _ = stat.pq_average(CATS, isthing=None)
    assert avg == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def test_void_is_removed_from_the_union_and_void_predictions_are_ignored():
    gt = row(0, 0, 0, 0, 1, 1, 1, 1, 1, 1)  # person area 6, four void pixels
    pred = row(8, 8, 7, 7, 7, 7, 7, 7, 7, 7)  # 7 person (area 8), 8 car (area 2, all void)
    stat = pq_compute(ann([(1, 1, 0)], ids=gt), ann([(7, 1, 0), (8, 2, 0)]), gt, pred, CATS)
    # (1,7): inter 6, |7 ∩ void| = 2, union = 8 + 6 - 6 - 2 = 6 -> IoU 1.0
    assert cat_stats(stat, 1) == (1, 0, 0, 1.0)
    # car 8 lies 2/2 on void (> 0.5) -> ignored, the car category stays empty
    assert cat_stats(stat, 2) == (0, 0, 0, 0.0)
    assert pq_results(stat, CATS)["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}


def test_prediction_exactly_half_on_void_is_a_false_positive():
    gt = row(0, 0, 2, 2)  # grass id 2, area 2
    pred = row(9, 9, 9, 9)  # car, 2 of 4 pixels on void: 0.5 is not > 0.5
    stat = pq_compute(ann([(2, 4, 0)], ids=gt), ann([(9, 2, 0)]), gt, pred, CATS)
    assert cat_stats(stat, 2) == (0, 1, 0, 0.0)  # car FP
    assert cat_stats(stat, 4) == (0, 0, 1, 0.0)  # grass FN (category mismatch)


def test_crowd_regions():
    # GT: 1 = crowd person (px 0-3), 2 = person (px 4-7), 3 = grass (px 8-9)
    gt = row(1, 1, 1, 1, 2, 2, 2, 2, 3, 3)
    # pred: 5 person on the crowd, 6 car on the crowd, 7 person (px 4-8), 8 grass (px 9)
    pred = row(5, 5, 6, 6, 7, 7, 7, 7, 7, 8)
    g = ann([(1, 1, 1), (2, 1, 0), (3, 4, 0)], ids=gt)
    p = ann([(5, 1, 0), (6, 2, 0), (7, 1, 0), (8, 4, 0)])
    stat = pq_compute(g, p, gt, pred, CATS)
    # (2,7): IoU = 4 / (5 + 4 - 4) = 0.8 -> TP; the crowd GT is never a FN
    assert cat_stats(stat, 1) == (1, 0, 0, 0.8)  # 5: 2/2 on same-category crowd -> ignored
    assert cat_stats(stat, 2) == (0, 1, 0, 0.0)  # 6: crowd is person, not car -> FP
    # (3,8): IoU = 1 / (1 + 2 - 1) = 0.5 -> no match: grass FN + FP
    assert cat_stats(stat, 4) == (0, 1, 1, 0.0)
    res = pq_results(stat, CATS)
    # All over person (0.8, 0.8, 1), car (0, 0, 0), grass (0, 0, 0)
    assert res["All"] == pytest.approx({"pq": 0.8 / 3, "sq": 0.8 / 3, "rq": 1 / 3, "n": 3},
                                       abs=1e-15)
    assert res["Things"] == pytest.approx({"pq": 0.4, "sq": 0.4, "rq": 0.5, "n": 2}, abs=1e-15)
    assert res["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def test_crowd_gt_never_matches_even_at_iou_one():
    gt = row(1, 1, 1, 1)
    pred = row(5, 5, 5, 5)
    stat = pq_compute(ann([(1, 1, 1)], ids=gt), ann([(5, 1, 0)]), gt, pred, CATS)
    assert cat_stats(stat, 1) == (0, 0, 0, 0.0)  # not TP, not FN, prediction ignored


def test_category_mismatch_is_fn_plus_fp():
    gt = row(1, 1, 1, 1)
    pred = row(2, 2, 2, 2)
    stat = pq_compute(ann([(1, 1, 0)], ids=gt), ann([(2, 2, 0)]), gt, pred, CATS)
    assert cat_stats(stat, 1) == (0, 0, 1, 0.0)
    assert cat_stats(stat, 2) == (0, 1, 0, 0.0)
    assert pq_results(stat, CATS)["Things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def _two_images():
    # image 1: the split person -> person tp 1, fp 1, ΣIoU 0.625
    gt1, pred1 = row(1, 1, 1, 1, 1, 1, 1, 1), row(5, 5, 5, 5, 5, 6, 6, 6)
    a = (ann([(1, 1, 0)], 1, gt1), ann([(5, 1, 0), (6, 1, 0)], 1), gt1, pred1)
    # image 2: sky perfect (IoU 1); grass predicted on 3 of 4 pixels, last one void in the
    # prediction -> IoU = 3 / (3 + 4 - 3) = 0.75
    gt2, pred2 = row(1, 1, 1, 1, 2, 2, 2, 2), row(5, 5, 5, 5, 6, 6, 6, 0)
    b = (ann([(1, 3, 0), (2, 4, 0)], 2, gt2), ann([(5, 3, 0), (6, 4, 0)], 2), gt2, pred2)
    return [a, b]


def test_things_stuff_all_averages_and_table():
    stat = pq_compute_many(_two_images(), CATS)
    res = pq_results(stat, CATS)
    # person: pq 0.625/1.5 = 0.41667, sq 0.625, rq 1/1.5 = 0.66667
    # sky: 1, 1, 1      grass: 0.75, 0.75, 1      car: no segments (not counted)
    assert res["Things"] == pytest.approx({"pq": 0.625 / 1.5, "sq": 0.625, "rq": 2 / 3, "n": 1})
    assert res["Stuff"] == pytest.approx({"pq": 0.875, "sq": 0.875, "rq": 1.0, "n": 2})
    # All: pq (0.41667 + 1 + 0.75)/3 = 0.72222; sq (0.625 + 1 + 0.75)/3 = 0.79167;
    #      rq (2/3 + 1 + 1)/3 = 8/9
    assert res["All"] == pytest.approx({"pq": (0.625 / 1.5 + 1.75) / 3, "sq": 2.375 / 3,
                                        "rq": 8 / 9, "n": 3})
    assert format_results(res) == "\n".join([
        "          |    PQ     SQ     RQ     N",
        "--------------------------------------",
        "All       |  72.2   79.2   88.9     3",
        "Things    |  41.7   62.5   66.7     1",
        "Stuff     |  87.5   87.5  100.0     2",
    ])
    assert format_results(stat, CATS) == format_results(res)


def test_merge_is_order_free_and_picklable():
    a, b = (pq_compute(*args, CATS) for args in _two_images())
    merged = PQStat()
    merged += b
    merged += a
    again = pickle.loads(pickle.dumps(a + b))
    for s in (merged, again):
        assert {k: cat_stats(s, k) for k in (1, 3, 4)} == {
            1: (1, 1, 0, 0.625), 3: (1, 0, 0, 1.0), 4: (1, 0, 0, 0.75)}


def test_empty_group_reports_zero_instead_of_dividing_by_zero():
    gt = row(1, 1)
    stat = pq_compute(ann([(1, 1, 0)], ids=gt), ann([(3, 1, 0)]), gt, row(3, 3), CATS)
    assert stat.pq_average(CATS, isthing=False)[0] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


def test_gt_area_comes_from_json_and_falls_back_to_pixels():
    gt = row(1, 1, 1, 1)
    pred = row(5, 5, 5, 0)
    g = ann([(1, 1, 0)], ids=gt)
    assert cat_stats(pq_compute(g, ann([(5, 1, 0)]), gt, pred, CATS), 1) == (1, 0, 0, 0.75)
    g["segments_info"][0]["area"] = 5  # panopticapi trusts the JSON: IoU = 3 / (3 + 5 - 3)
    assert cat_stats(pq_compute(g, ann([(5, 1, 0)]), gt, pred, CATS), 1) == (1, 0, 0, 0.6)
    del g["segments_info"][0]["area"]
    assert cat_stats(pq_compute(g, ann([(5, 1, 0)]), gt, pred, CATS), 1) == (1, 0, 0, 0.75)


def test_prediction_consistency_errors():
    gt = row(1, 1)
    g = ann([(1, 1, 0)], ids=gt)
    with pytest.raises(KeyError, match="presented in PNG and not presented in JSON"):
        pq_compute(g, ann([]), gt, row(3, 3), CATS)
    with pytest.raises(KeyError, match="presented in JSON and not presented in PNG"):
        pq_compute(g, ann([(3, 1, 0), (4, 1, 0)]), gt, row(3, 3), CATS)
    with pytest.raises(KeyError, match="unknown category_id 99"):
        pq_compute(g, ann([(3, 99, 0)]), gt, row(3, 3), CATS)
    with pytest.raises(ValueError, match="shape"):
        pq_compute(g, ann([(3, 1, 0)]), gt, np.array([[3], [3]]), CATS)


def _random_case(rng, h=24, w=32):
    """Rectangles of random ids / categories, VOID, crowd; prediction = perturbed GT."""
    gt = np.zeros((h, w), np.int64)
    segs = []
    for sid in range(1, rng.integers(2, 9)):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        gt[y:y + rng.integers(2, h), x:x + rng.integers(2, w)] = sid * 1000 + 7  # large ids
    ids = [i for i in np.unique(gt) if i != 0]
    for sid in ids:
        segs.append((int(sid), int(rng.integers(1, 5)), int(rng.random() < 0.2)))
    pred = np.where(gt > 0, gt + 70000, 0)
    for _ in range(rng.integers(0, 6)):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        pred[y:y + rng.integers(1, 10), x:x + rng.integers(1, 10)] = rng.choice([0, 5, 6, 7])
    pred_segs = [(int(sid), int(rng.integers(1, 5)) if rng.random() < 0.3 else
                  dict((s, c) for s, c, _ in segs).get(int(sid) - 70000, 1), 0)
                 for sid in np.unique(pred) if sid != 0]
    return ann(segs, ids=gt), ann(pred_segs), gt, pred


def test_matches_panopticapi_on_random_images(tmp_path):
    ev = pytest.importorskip("panopticapi.evaluation")
    from PIL import Image

    def id2rgb(a):
        return np.stack([a % 256, a // 256 % 256, a // 65536], -1).astype(np.uint8)

    rng = np.random.default_rng(0)
    cats = {c["id"]: c for c in CATS}
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    ours, pairs = PQStat(), []
    for i in range(60):
        g, p, gt, pred = _random_case(rng)
        g["image_id"] = p["image_id"] = i
        g["file_name"] = p["file_name"] = f"{i}.png"
        Image.fromarray(id2rgb(gt)).save(tmp_path / "gt" / g["file_name"])
        Image.fromarray(id2rgb(pred)).save(tmp_path / "pred" / p["file_name"])
        pq_compute(g, p, gt, pred, CATS, into=ours)  # single-core summation order
        pairs.append((g, copy.deepcopy(p)))
    ref = ev.pq_compute_single_core(0, pairs, str(tmp_path / "gt"), str(tmp_path / "pred"), cats)
    for c in cats:
        assert (ours[c].tp, ours[c].fp, ours[c].fn) == (ref[c].tp, ref[c].fp, ref[c].fn)
        assert ours[c].iou == ref[c].iou
    for isthing in (None, True, False):
        assert ours.pq_average(CATS, isthing) == ref.pq_average(cats, isthing)
