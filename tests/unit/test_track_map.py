"""ViCaS LG-VIS track mAP on hand-computed cases; the cross-check runs the official scorer when
``vicas.evaluation.seg_eval`` is importable."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from vgen_core.data import rle
from vgen_core.eval.track_map import (
    THRESHOLDS,
    ReferralResult,
    TrackMAP,
    combine_results,
    evaluate_lgvis,
    match_referral,
    pr_to_ap,
    referral_tracks,
    track_ious,
)

H, W = 4, 4  # every frame is 4x4; masks are given as column-major flat pixel indices


def m(*flat):
    """RLE of a 4x4 mask whose foreground pixels are the given column-major flat indices."""
    a = np.zeros(H * W, np.uint8)
    a[list(flat)] = 1
    return rle.encode(a.reshape((H, W), order="F"))


EMPTY = m()


def run(*referrals):
    """mAP dict of referrals given as (pred_tracks, gt_tracks[, scores])."""
    metric = TrackMAP()
    for ref in referrals:
        metric.add_referral(*ref)
    return metric.compute()


def test_thresholds_are_the_official_float64_values():
    assert len(THRESHOLDS) == 10
    assert THRESHOLDS[4] == 0.7000000000000002 and THRESHOLDS[5] == 0.7500000000000002


def test_perfect_prediction_is_100():
    gt = [[m(0, 1), m(1, 2), EMPTY], [m(8, 9), m(9), m(15)]]  # 2 tracks x 3 GT frames
    res = run((gt, gt), ([[m(3)]], [[m(3)]]))
    assert res == {"mAP": 100.0, "AP@50": 100.0, "AP@75": 100.0, "AP@90": 100.0}


def test_track_iou_is_spatio_temporal_and_counts_frames_where_gt_is_absent():
    # frame 0: GT {0..3}, pred {0..3}: inter 4, union 4
    # frame 1: GT absent (empty), pred {4..7}: inter 0, union 4
    # frame 2: GT {8, 9}, pred {8, 9, 10, 11}: inter 2, union 4
    # IoU = (4 + 0 + 2) / (4 + 4 + 4) = 0.5
    # second pair, GT {0} / absent / {8..11} vs pred {0, 1} / empty / {8..11}:
    # (1 + 0 + 4) / (2 + 0 + 4) = 5/6, where the mean of per-frame IoUs would be 3/4
    gt = [[m(0, 1, 2, 3), EMPTY, m(8, 9)], [m(0), EMPTY, m(8, 9, 10, 11)]]
    pred = [[m(0, 1, 2, 3), m(4, 5, 6, 7), m(8, 9, 10, 11)], [m(0, 1), EMPTY, m(8, 9, 10, 11)]]
    ious = track_ious(pred, gt)
    assert ious.dtype == np.float32
    assert ious[0, 0] == 0.5
    assert ious[1, 1] == np.float32(5 / 6)
    # pred 0 vs GT 1: inter 1 + 0 + 4, union 4 + 4 + 4 -> 5/12
    assert ious[0, 1] == np.float32((1 + 0 + 4) / (4 + 4 + 4))


@pytest.mark.parametrize(
    "pred_px, gt_px, expected",
    [
        # IoU 1.0 passes all 10 thresholds
        ((0, 1, 2, 3), (0, 1, 2, 3), (100.0, 100.0, 100.0, 100.0)),
        # IoU 4/8 = 0.5 passes only 0.50 -> mAP = 100 * 1/10
        ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3), (10.0, 100.0, 0.0, 0.0)),
        # IoU 3/4: float32(0.75) = 0.75 < 0.7500000000000002 (arange drift): passes
        # 0.50 0.55 0.60 0.65 0.70 -> 5/10
        ((0, 1, 2), (0, 1, 2, 3), (50.0, 100.0, 0.0, 0.0)),
        # IoU 4/5: float32(0.8) = 0.800000011920929 >= 0.8000000000000003: passes 0.50..0.80 -> 7
        ((0, 1, 2, 3), (0, 1, 2, 3, 4), (70.0, 100.0, 100.0, 0.0)),
    ],
    ids=["iou1", "iou0.5", "iou0.75", "iou0.8"],
)
def test_single_track_counts_exactly_at_the_thresholds_it_passes(pred_px, gt_px, expected):
    res = run(([[m(*pred_px)]], [[m(*gt_px)]]))
    assert (res["mAP"], res["AP@50"], res["AP@75"], res["AP@90"]) == expected


def test_iou_095_on_a_bigger_frame():
    # 5x4 frame: GT 20 px, pred 19 px -> IoU 19/20; float32(0.95) = 0.949999988 is below
    # 0.9500000000000004, so it passes 0.50..0.90 only -> 9/10
    gt = [[{"size": [5, 4], "counts": rle.counts_to_string([0, 20])}]]
    pred = [[{"size": [5, 4], "counts": rle.counts_to_string([0, 19, 1])}]]
    res = run((pred, gt))
    assert (res["mAP"], res["AP@50"], res["AP@75"], res["AP@90"]) == (90.0, 100.0, 100.0, 100.0)


def test_false_positive_order_follows_scores():
    gt = [[m(0, 1, 2, 3)]]
    wrong, right = [m(12, 13)], [m(0, 1, 2, 3)]
    # FP first (score 0.9), TP second (0.8): precision [0, 1/2], recall [0, 1] -> AP = 1 * 1/2
    assert run(([wrong, right], gt, [0.9, 0.8]))["mAP"] == 50.0
    # TP first: precision [1, 1/2], recall [1, 1] -> envelope 1 at recall 1 -> AP = 1
    assert run(([wrong, right], gt, [0.8, 0.9]))["mAP"] == 100.0
    # the official files carry no scores: all 1.0, ties keep the track order here (2 tracks)
    assert run(([wrong, right], gt))["mAP"] == 50.0
    # pooled across referrals: ref A = TP at 0.5, ref B = FP at 0.7 -> FP, TP: 1/2 * 1/2 = 25
    res = run(([right], gt, [0.5]), ([wrong], [[m(8)]], [0.7]))
    assert res["AP@50"] == 25.0


def test_greedy_match_takes_the_last_free_gt_like_the_official_loop():
    # GT0 = {0..3}, GT1 = {0..5}; pred0 = {0..3}: IoU 1 with GT0, 4/6 with GT1;
    # pred1 = {2..7}: IoU 2/8 with GT0, 4/8 with GT1.
    # At 0.5 the official loop (no break) moves pred0 from GT0 to GT1 (the last qualifying free
    # GT), so pred1 finds GT1 taken -> TP, FP with 2 GT: precision [1, 1/2], recall [1/2, 1/2]
    # -> AP = 1/2 * 1 = 0.5. For thresholds 0.55-0.65 (IoU float32(2/3) >= 0.65...) the same;
    # from 0.70 on pred0 -> GT0 and pred1 (IoU 0.5) misses: again TP, FP -> AP 0.5 everywhere.
    gt = [[m(0, 1, 2, 3)], [m(0, 1, 2, 3, 4, 5)]]
    pred = [[m(0, 1, 2, 3)], [m(2, 3, 4, 5, 6, 7)]]
    r = match_referral(pred, gt)
    assert r.match_indices[0].tolist() == [1, -1]  # a best-IoU matcher would give [0, 1]
    assert r.match_indices[4].tolist() == [0, -1]
    assert run((pred, gt)) == {"mAP": 50.0, "AP@50": 50.0, "AP@75": 50.0, "AP@90": 50.0}


def test_all_point_interpolation_on_a_known_curve():
    # order T F T F F T, 4 GT: tp 1 1 2 2 2 3, fp 0 1 1 2 3 3
    # precision 1, 1/2, 2/3, 1/2, 2/5, 1/2; recall 1/4, 1/4, 1/2, 1/2, 1/2, 3/4 (then pad 1 -> 0)
    # envelope at the recall steps: 1/4 -> 1, 1/2 -> 2/3, 3/4 -> 1/2, 1 -> 0
    # AP = 1/4 * (1 + 2/3 + 1/2 + 0) = 13/24 = 0.541666...
    tp = np.cumsum(np.array([[1, 0, 1, 0, 0, 1]], np.float32), 1)
    fp = np.cumsum(np.array([[0, 1, 0, 1, 1, 0]], np.float32), 1)
    ap = pr_to_ap(tp / (tp + fp + 1e-8), tp / 4.0)
    assert ap.dtype == np.float32 and ap[0] == pytest.approx(13 / 24, abs=1e-7)
    # the same curve through pooling: six single-prediction referrals with decreasing scores
    results = []
    for k, hit in enumerate([1, 0, 1, 0, 0, 1]):
        match = np.full((10, 1), 0 if hit else -1, np.int32)
        results.append(ReferralResult(match, np.array([1.0 - 0.1 * k], np.float32), 0))
    results.append(ReferralResult(np.zeros((10, 0), np.int32), np.zeros(0, np.float32), 4))
    res = combine_results(results)
    assert res["mAP"] == res["AP@50"] == res["AP@90"] == pytest.approx(100 * 13 / 24, abs=1e-4)
    assert res["AP@50"] == (np.float32(ap[0]) * np.float32(100.0)).item()  # float32 all the way


def test_no_predictions_is_0_and_no_gt_is_100():
    assert run(([], [[m(0)]]))["mAP"] == 0.0
    assert run(([[m(0)]], []))["mAP"] == 100.0
    assert TrackMAP().compute()["mAP"] == 0.0


def test_more_than_ten_tracks_keeps_the_ten_best_scored():
    gt = [[m(0, 1, 2, 3)]]
    pred = [[m(15)]] * 10 + [[m(0, 1, 2, 3)]]  # the only hit has the lowest score
    scores = [0.9] * 10 + [0.1]
    r = match_referral(pred, gt, scores)
    assert r.match_indices.shape == (10, 10) and (r.match_indices == -1).all()
    assert run((pred, gt, scores))["mAP"] == 0.0


def test_merge_orders_by_video_and_referral():
    gt, hit, miss = [[m(0, 1)]], [m(0, 1)], [m(9)]  # hit / miss: one-frame tracks
    a, b = TrackMAP(), TrackMAP()
    a.add_referral([miss], gt, video_id=2, referral=0)
    b.add_referral([hit], gt, video_id=1, referral=0)
    # official order is video 1 then video 2: TP, FP (equal scores) -> AP 0.5 * 1 = 50
    # (added in the other order the FP would come first: AP 25)
    b_then_a = pickle.loads(pickle.dumps(a))
    b_then_a += b
    assert b_then_a.compute()["mAP"] == 50.0
    unordered = TrackMAP()
    unordered.add_referral([miss], gt)
    unordered.add_referral([hit], gt)
    assert unordered.compute()["mAP"] == 25.0


# ---------------------------------------------------------------------------------------------
# official file format
# ---------------------------------------------------------------------------------------------


def _gt_video(video_id=7):
    # 3 frames, 00000 and 00002 human-annotated; track 1 present on both, track 2 only on 00002
    return {
        "video_id": video_id, "image_size": [H, W], "all_track_ids": [1, 2],
        "object_referrals": [{"prompt": "the dog", "track_ids": [1]},
                             {"prompt": "both animals", "track_ids": [1, 2]}],
        "segmentations": [
            {"filename": "00000.jpg", "is_gt": True, "track_ids": [1], "mask_rles": [m(0, 1)]},
            {"filename": "00001.jpg", "is_gt": False, "track_ids": [1, 2],
             "mask_rles": [m(0), m(5)]},
            {"filename": "00002.jpg", "is_gt": True, "track_ids": [2, 1],
             "mask_rles": [m(8, 9), m(1, 2)]},
        ],
    }


def _pred_video(video_id=7):
    return {
        "video_id": video_id, "pred_caption": "a dog and a cat",
        "pred_lgvis_masks": [
            # referral 0: one track, exact on both GT frames; the non-GT frame is ignored
            [{"filename": "00000.jpg", "mask_rles": [m(0, 1)]},
             {"filename": "00001.jpg", "mask_rles": [m(15)]},
             {"filename": "00002.jpg", "mask_rles": [m(1, 2)]}],
            # referral 1: track A = dog exact; track B = cat {8, 9} on 00002 but also {12, 13}
            # on 00000 where the cat is absent -> IoU 2 / 4 = 0.5
            [{"filename": "00002.jpg", "mask_rles": [m(1, 2), m(8, 9)]},
             {"filename": "00000.jpg", "mask_rles": [m(0, 1), m(12, 13)]}],
        ],
    }


def test_referral_tracks_reads_the_official_layout():
    pairs = referral_tracks(_pred_video(), _gt_video())
    assert len(pairs) == 2
    pred1, gt1 = pairs[1]
    assert len(pred1) == 2 and len(gt1) == 2 and all(len(t) == 2 for t in pred1 + gt1)
    assert gt1[1][0] == rle.encode(np.zeros((H, W), np.uint8))  # cat absent on frame 00000
    assert track_ious(pred1, gt1).tolist() == [[1.0, 0.0], [0.0, 0.5]]


def test_evaluate_lgvis_on_files(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    (gt_dir / "000007_some_clip.json").write_text(json.dumps(_gt_video()))  # glob fallback
    (pred_dir / "000007.json").write_text(json.dumps(_pred_video()))
    res = evaluate_lgvis(str(pred_dir), str(gt_dir), [7])
    # 3 GT tracks; 3 predictions (all score 1, file order): IoUs 1, 1, 0.5.
    # at 0.50 all TP -> AP 100; above 0.50 TP, TP, FP: recall 1/3, 2/3 at precision 1 -> 200/3
    # mAP = (100 + 9 * 200/3) / 10 = 70
    assert res["AP@50"] == 100.0
    assert res["AP@75"] == res["AP@90"] == pytest.approx(200 / 3, abs=1e-4)
    assert res["mAP"] == pytest.approx(70.0, abs=1e-4)


def test_missing_gt_frame_and_ragged_frames_are_refused():
    pred = _pred_video()
    pred["pred_lgvis_masks"][0] = pred["pred_lgvis_masks"][0][:2]  # drops 00002
    with pytest.raises(ValueError, match="all ground-truth frames not found"):
        referral_tracks(pred, _gt_video())
    pred = _pred_video()
    pred["pred_lgvis_masks"][1][0]["mask_rles"].append(m(3))
    with pytest.raises(ValueError, match="different numbers"):
        referral_tracks(pred, _gt_video())
    with pytest.raises(FileNotFoundError):
        evaluate_lgvis("/nonexistent-pred", "/nonexistent-gt", [7])


def test_wrong_mask_size_is_refused():
    gt = [[m(0, 1)]]
    pred = [[{"size": [2, 8], "counts": rle.counts_to_string([0, 2, 14])}]]
    with pytest.raises(rle.RLEError):
        track_ious(pred, gt, image_size=[H, W])


# ---------------------------------------------------------------------------------------------
# cross-check with the official scorer
# ---------------------------------------------------------------------------------------------


def _random_referral(rng):
    n_t, n_g, n_p = int(rng.integers(1, 4)), int(rng.integers(0, 4)), int(rng.integers(0, 6))

    def blob():
        if rng.random() < 0.2:
            return EMPTY
        a = np.zeros((H, W), np.uint8)
        y, x = rng.integers(0, H), rng.integers(0, W)
        a[y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = 1
        return rle.encode(a)

    gt = [[blob() for _ in range(n_t)] for _ in range(n_g)]
    pred = [[blob() for _ in range(n_t)] for _ in range(n_p)]
    if gt and pred and rng.random() < 0.5:  # a near copy of a GT track
        pred[0] = [g if rng.random() < 0.7 else blob() for g in gt[0]]
    scores = None if rng.random() < 0.5 else np.round(rng.random(n_p), 1).astype(np.float32)
    return pred, gt, scores


def test_matches_the_official_scorer_on_random_referrals():
    seg_eval = pytest.importorskip("vicas.evaluation.seg_eval")

    def to_bytes(tracks):
        return [[{"size": r["size"], "counts": r["counts"].encode()} for r in t] for t in tracks]

    rng = np.random.default_rng(0)
    for trial in range(40):
        official, ours = seg_eval.TrackMAP(), TrackMAP()
        per_ref = []
        for _ in range(int(rng.integers(1, 12))):
            pred, gt, scores = _random_referral(rng)
            ref = official.process_video(to_bytes(pred), to_bytes(gt),
                                         None if scores is None else scores.copy())
            mine = ours.add_referral(pred, gt, scores)
            assert np.array_equal(ref["match_indices"], mine.match_indices), trial
            assert np.array_equal(ref["scores"], mine.scores), trial
            per_ref.append(ref)
        assert ours.compute() == official.combine_video_results(per_ref), trial
