"""vgen's scorers against committed outputs of the official ones (panopticapi, ViCaS), which are
not on PyPI and so cannot run in CI. How each fixture was produced is in its "produced_by" field
and in fixtures/make_reference_fixtures.py. The live cross-checks (importorskip) in
test_panoptic_quality.py and test_track_map.py still run wherever those packages are importable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vgen_core.data import rle
from vgen_core.eval.panoptic_quality import PQStat, pq_compute
from vgen_core.eval.track_map import THRESHOLDS, TrackMAP

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _load(name: str) -> dict:
    data = json.loads((FIXTURES / name).read_text())
    assert "make_reference_fixtures.py" in data["produced_by"]
    return data


def test_panoptic_quality_matches_panopticapi_fixture() -> None:
    data = _load("panopticapi_pq.json")
    cats, ref = data["categories"], data["reference"]
    stat = PQStat()
    for i, im in enumerate(data["images"]):
        gt, pred = np.array(im["gt_ids"]), np.array(im["pred_ids"])
        g = {"image_id": i, "file_name": f"{i}.png", "segments_info": [
            {"id": s, "category_id": c, "iscrowd": k, "area": int((gt == s).sum())}
            for s, c, k in im["gt_segments"]]}
        p = {"image_id": i, "file_name": f"{i}.png", "segments_info": [
            {"id": s, "category_id": c, "iscrowd": k} for s, c, k in im["pred_segments"]]}
        pq_compute(g, p, gt, pred, cats, into=stat)
    for cat, want in ref["per_category"].items():
        c = stat[int(cat)]
        assert (c.tp, c.fp, c.fn) == (want["tp"], want["fp"], want["fn"]), cat
        assert c.iou == pytest.approx(want["iou"], abs=1e-12), cat
    for group, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        avg, per_class = stat.pq_average(cats, isthing)
        assert avg["n"] == ref[group]["n"], group
        for k in ("pq", "sq", "rq"):
            assert avg[k] == pytest.approx(ref[group][k], abs=1e-12), (group, k)
        if group == "All":
            assert {str(c): v for c, v in per_class.items()}.keys() == ref["per_class"].keys()
            for c, v in per_class.items():
                for k in ("pq", "sq", "rq"):
                    assert v[k] == pytest.approx(ref["per_class"][str(c)][k], abs=1e-12)


def test_track_map_matches_vicas_fixture() -> None:
    data = _load("vicas_track_map.json")
    h, w = data["size"]
    ref = data["reference"]
    assert np.allclose(ref["thresholds"], THRESHOLDS)

    def encode(flat: list[int]) -> dict:
        a = np.zeros(h * w, np.uint8)
        a[list(flat)] = 1
        return rle.encode(a.reshape((h, w), order="F"))

    ours = TrackMAP()
    for referral, want in zip(data["referrals"], ref["referrals"], strict=True):
        pred = [[encode(f) for f in t] for t in referral["pred"]]
        gt = [[encode(f) for f in t] for t in referral["gt"]]
        scores = (None if referral["scores"] is None
                  else np.array(referral["scores"], np.float32))
        got = ours.add_referral(pred, gt, scores)
        assert got.match_indices.tolist() == want["match_indices"]
        assert [float(s) for s in got.scores] == want["scores"]
        assert got.num_gt == want["num_gt"]
    result = ours.compute()
    assert result.keys() == ref["combined"].keys()
    for k, v in ref["combined"].items():
        assert result[k] == pytest.approx(v, abs=1e-9), k
