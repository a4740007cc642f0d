"""``evaluate.panoptic`` / ``evaluate.vicas`` in-process: ground truth curated from sample-builder
datasets, predictions written in the official formats, hand-checked scores, and the errors for
predictions that name unknown ids or do not parse."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.stages.base import InProcessExecutor, OutputRef, StageContext, StageError
from pipelines.stages.curate import (CuratePanCap, CuratePanCapConfig, CurateViCaS,
                                     CurateViCaSConfig)
from pipelines.stages.evaluate_segmentation import (EvaluatePanoptic, EvaluatePanopticConfig,
                                                    EvaluateViCaS, EvaluateViCaSConfig)
from pipelines.stages.results import final_metrics
from vgen_core.data import TableStore
from vgen_core.data import rle as rle_codec
from vgen_core.data.panoptic import write_id_png
from vgen_core.formats.pancap_samples import (PancapImage, make_pancap_images,
                                              write_pancap_layout)
from vgen_core.formats.vicas_samples import write_vicas_sample_dataset

SKY, ROAD, PERSON, CAR = 187, 149, 1, 3  # COCO-panoptic ids: two stuff, two things


# ---------------------------------------------------------------------------------------------
# PanCap
# ---------------------------------------------------------------------------------------------


def hand_images() -> list[PancapImage]:
    """Image 9 (10x10): sky id 1 = rows 0-3 (40 px), road id 2 = rows 4-9 x cols 0-2 (18 px),
    person id 3 = rows 4-9 x cols 3-5 (18 px), car id 4 = rows 4-7 x cols 6-9 (16 px), void =
    rows 8-9 x cols 6-9 (8 px). Image 25 (8x8): sky id 1 = rows 0-3, person id 2 = rows 4-7."""
    a = np.zeros((10, 10), np.int64)
    a[0:4] = 1
    a[4:10, 0:3] = 2
    a[4:10, 3:6] = 3
    a[4:8, 6:10] = 4
    b = np.zeros((8, 8), np.int64)
    b[0:4] = 1
    b[4:8] = 2
    rng = np.random.default_rng(0)

    def seg(ids, sid, cid, thing):
        return {"id": sid, "category_id": cid, "iscrowd": 0, "isthing": int(thing),
                "area": int((ids == sid).sum())}

    return [
        PancapImage(9, rng.integers(0, 255, (10, 10, 3), dtype=np.uint8), a,
                    [seg(a, 1, SKY, 0), seg(a, 2, ROAD, 0), seg(a, 3, PERSON, 1),
                     seg(a, 4, CAR, 1)],
                    "A <3: person> stands by <4: a small car> under <1: the sky> on "
                    "<2: the road>."),
        PancapImage(25, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), b,
                    [seg(b, 1, SKY, 0), seg(b, 2, PERSON, 1)],
                    "<2: A person> under <1: a pale sky>."),
    ]


def curate(tmp: Path, kind, cfg, name: str) -> tuple[TableStore, OutputRef]:
    store = TableStore(str(tmp / "store"))
    ctx = StageContext(dag="t", stage=name, store=store, row_fingerprint="fp", error_budget=0.0)
    r = kind(cfg, ctx).run(InProcessExecutor(batch_size=8))
    assert r.counts.quarantined == 0
    return store, r.outputs["samples"]


def evaluate(kind, cfg, store: TableStore, ref: OutputRef, up: str, name: str = "ev",
             tracker=None):
    ctx = StageContext(dag="t", stage=name, store=store, row_fingerprint="fp-ev",
                       inputs={up: {"samples": ref}})
    if tracker is not None:
        ctx.tracker = tracker
    return kind(cfg, ctx).run(InProcessExecutor())


def write_panoptic_predictions(folder: Path, images: list[PancapImage], *, name="predictions",
                               edit=None) -> Path:
    """The COCO-panoptic prediction JSON + ``<name>/`` PNG folder, predicting every segment
    exactly, under new ids (``10 * id + 7``); ``edit(image_id, ids, segments_info)`` may alter
    one image's map / records in place."""
    png_dir = folder / name
    png_dir.mkdir(parents=True, exist_ok=True)
    anns = []
    for img in images:
        ids = np.where(img.ids > 0, img.ids * 10 + 7, 0)
        infos = [{"id": s["id"] * 10 + 7, "category_id": s["category_id"], "iscrowd": 0,
                  "isthing": s.get("isthing", 0)} for s in img.segments]
        if edit is not None:
            edit(img.image_id, ids, infos)
        (png_dir / f"{img.file_stem}.png").write_bytes(write_id_png(ids))
        anns.append({"image_id": img.image_id, "file_name": f"{img.file_stem}.png",
                     "segments_info": infos})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"annotations": anns}))
    return path


@pytest.fixture(scope="module")
def hand_gt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pq")
    images = hand_images()
    root = write_pancap_layout(tmp / "raw", images)
    store, ref = curate(tmp, CuratePanCap, CuratePanCapConfig(root=str(root)), "pancap")
    return tmp, images, store, ref


def run_pq(hand_gt, preds: Path, **cfg):
    _, _, store, ref = hand_gt
    return evaluate(EvaluatePanoptic, EvaluatePanopticConfig(predictions=str(preds), **cfg),
                    store, ref, "pancap")


def test_pq_perfect_predictions_are_100_and_results_are_recorded(hand_gt, tmp_path):
    _, images, store, ref = hand_gt
    preds = write_panoptic_predictions(tmp_path, images)
    tracker = RecordingTracker()
    r = evaluate(EvaluatePanoptic, EvaluatePanopticConfig(predictions=str(preds)), store, ref,
                 "pancap", tracker=tracker)
    assert r.metrics == {k: 100.0 for k in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th",
                                            "PQ_st", "SQ_st", "RQ_st")}
    assert r.counts.processed == 2
    # the results table holds the run's metrics; status reads them back from the recorded ref
    assert final_metrics(store, {k: v.to_json() for k, v in r.outputs.items()}) == r.metrics
    per_class = {row["metric"]: row for row in store.read(r.outputs["per_class"].name).to_pylist()}
    assert set(per_class) == {f"{m}/{c}" for m in ("PQ", "SQ", "RQ")
                              for c in (SKY, ROAD, PERSON, CAR)}
    assert json.loads(per_class[f"PQ/{PERSON}"]["details"])["tp"] == 2
    # lineage: the curated table version the ground truth came from
    assert tracker.tags["vgen.lineage.curated.uri"] == ref.uri
    assert tracker.tags["vgen.lineage.curated.version"] == str(ref.version)
    assert tracker.tags["vgen.lineage.predictions.uri"] == str(preds)
    assert "PQ" in tracker.texts["pq_table.txt"] and "100.0" in tracker.texts["pq_table.txt"]


def test_pq_one_segment_shrunk_by_hand(hand_gt, tmp_path):
    def shrink_car(image_id, ids, infos):
        if image_id == 9:
            ids[7, 6:10] = 0  # the car (16 px) loses its bottom row (4 px) to void

    preds = write_panoptic_predictions(tmp_path, hand_gt[1], edit=shrink_car)
    r = run_pq(hand_gt, preds)
    # car: 12 predicted px, all inside the 16 GT px; nothing of it on void ->
    #   IoU = 12 / (12 + 16 - 12) = 0.75 > 0.5: TP, so car PQ = SQ = 0.75, RQ = 1.
    # person (2 TPs), sky (2 TPs), road (1 TP): IoU 1 -> PQ = SQ = RQ = 1.
    # All = mean over {person, car, sky, road}: PQ = SQ = (1 + 0.75 + 1 + 1) / 4 = 0.9375, RQ = 1
    # Things = mean over {person, car}: PQ = SQ = (1 + 0.75) / 2 = 0.875, RQ = 1; Stuff all 1.
    assert r.metrics == {"PQ": 93.75, "SQ": 93.75, "RQ": 100.0,
                         "PQ_th": 87.5, "SQ_th": 87.5, "RQ_th": 100.0,
                         "PQ_st": 100.0, "SQ_st": 100.0, "RQ_st": 100.0}


def test_pq_one_segment_relabelled_by_hand(hand_gt, tmp_path):
    def car_as_person(image_id, ids, infos):
        if image_id == 9:
            next(s for s in infos if s["category_id"] == CAR)["category_id"] = PERSON

    preds = write_panoptic_predictions(tmp_path, hand_gt[1], edit=car_as_person)
    r = run_pq(hand_gt, preds)
    # car: its GT segment finds no car prediction -> FN 1, TP 0: PQ = SQ = RQ = 0.
    # person: both GT persons matched (IoU 1, TP 2) + the car-shaped "person" matches no GT
    #   person and lies on no void / crowd -> FP 1: PQ = 2 / (2 + 1/2) = 0.8, SQ = 1, RQ = 0.8.
    # All over {person, car, sky, road}: PQ = (0.8 + 0 + 1 + 1) / 4 = 0.7, SQ = 3 / 4 = 0.75,
    #   RQ = 0.7; Things over {person, car}: PQ = 0.4, SQ = 0.5, RQ = 0.4; Stuff all 1.
    expected = {"PQ": 70.0, "SQ": 75.0, "RQ": 70.0, "PQ_th": 40.0, "SQ_th": 50.0,
                "RQ_th": 40.0, "PQ_st": 100.0, "SQ_st": 100.0, "RQ_st": 100.0}
    assert r.metrics == pytest.approx(expected, abs=1e-9)


def test_pq_sample_dataset_perfect_predictions(tmp_path):
    """The sample builder's variants (colour-derived ids over all three channels, crowd
    segments, void, float areas) scored against themselves: 100 everywhere."""
    images = make_pancap_images(4, seed=0)
    root = write_pancap_layout(tmp_path / "raw", images)
    store, ref = curate(tmp_path, CuratePanCap, CuratePanCapConfig(root=str(root)), "pancap")
    preds = tmp_path / "p" / "panoptic_pred.json"
    preds.parent.mkdir()
    anns = []
    (tmp_path / "p" / "panoptic_pred").mkdir()
    for img in images:  # same ids and PNGs as the ground truth, JSON without areas
        (tmp_path / "p" / "panoptic_pred" / f"{img.file_stem}.png").write_bytes(
            write_id_png(img.ids))
        anns.append({"image_id": img.image_id, "file_name": f"{img.file_stem}.png",
                     "segments_info": [{"id": s["id"], "category_id": s["category_id"]}
                                       for s in img.segments]})
    preds.write_text(json.dumps({"annotations": anns, "categories": []}))
    r = evaluate(EvaluatePanoptic, EvaluatePanopticConfig(predictions=str(preds)), store, ref,
                 "pancap")
    assert r.metrics["PQ"] == r.metrics["SQ"] == r.metrics["RQ"] == 100.0


def test_pq_categories_file_counts_categories_only_the_predictions_use(hand_gt, tmp_path):
    from vgen_core.formats.pancap_samples import CATEGORIES

    def add_grass(image_id, ids, infos):
        if image_id == 25:  # a grass segment the ground truth does not have (over the sky)
            ids[0, 0:4] = 99
            infos.append({"id": 99, "category_id": 193})

    preds = write_panoptic_predictions(tmp_path, hand_gt[1], edit=add_grass)
    with pytest.raises(StageError, match=r"category_id 193: not a category of the curated"):
        run_pq(hand_gt, preds)
    cats = tmp_path / "panoptic_val2017.json"
    cats.write_text(json.dumps({"categories": CATEGORIES}))
    r = run_pq(hand_gt, preds, categories=str(cats))
    # grass: FP 1 -> PQ 0, counted among stuff as panopticapi does; sky in image 25 keeps
    # 28 of 32 px -> IoU 28 / 32 = 0.875 (TP). Stuff over {sky, road, grass}:
    # PQ = ((1 + 0.875) / 2 + 1 + 0) / 3 = 1.9375 / 3
    assert r.metrics["PQ_st"] == pytest.approx(100 * 1.9375 / 3, abs=1e-9)


def test_pq_unknown_ids_and_unparseable_files_are_clear_errors(hand_gt, tmp_path):
    def bad_image(image_id, ids, infos):
        pass

    preds = write_panoptic_predictions(tmp_path, hand_gt[1], edit=bad_image)
    doc = json.loads(preds.read_text())

    def check(mutate, *needles, path=preds):
        d = copy.deepcopy(doc)
        mutate(d)
        path.write_text(json.dumps(d))
        with pytest.raises(StageError) as e:
            run_pq(hand_gt, path)
        msg = str(e.value)
        for n in ("stage 'ev'", "field 'with.predictions'", str(path), *needles):
            assert n in msg, (n, msg)

    check(lambda d: d["annotations"][0].update(image_id=999), "image_id 999",
          "ground truth does not hold")
    check(lambda d: d["annotations"][1]["segments_info"][0].update(category_id=777),
          "category_id 777", "image_id 25")
    check(lambda d: d["annotations"].pop(), "no annotation for image_id 25")
    check(lambda d: d["annotations"][0]["segments_info"].append({"id": 5, "category_id": SKY}),
          "segment IDs [5]", "not presented in PNG")
    check(lambda d: d["annotations"][0].update(file_name="nope.png"), "nope.png",
          "does not exist")
    preds.write_text('{"annotations": [')
    with pytest.raises(StageError, match="does not parse as JSON") as e:
        run_pq(hand_gt, preds)
    assert str(preds) in str(e.value) and "with.predictions" in str(e.value)


def test_pq_plan_checks_name_the_field(tmp_path):
    ctx = StageContext(dag="t", stage="pq", store=TableStore(str(tmp_path / "s")),
                       row_fingerprint="")
    missing = EvaluatePanoptic(EvaluatePanopticConfig(predictions=str(tmp_path / "p.json")), ctx)
    [(field, why)] = missing.check_config()
    assert field == "with.predictions" and "does not exist" in why
    (tmp_path / "p.json").write_text("{}")
    [(field, why)] = missing.check_config()  # the JSON is there, its PNG folder is not
    assert field == "with.predictions" and str(tmp_path / "p") in why and "PNG" in why
    (tmp_path / "p").mkdir()
    assert missing.check_config() == []
    odd = EvaluatePanoptic(EvaluatePanopticConfig(predictions=str(tmp_path / "p.json"),
                                                  categories=str(tmp_path / "c.json")), ctx)
    assert [f for f, _ in odd.check_config()] == ["with.categories"]


# ---------------------------------------------------------------------------------------------
# ViCaS
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vicas_gt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vicas")
    write_vicas_sample_dataset(tmp / "raw", n_videos=1, seed=0)
    store, ref = curate(tmp, CurateViCaS, CurateViCaSConfig(root=str(tmp / "raw")), "vicas")
    (row,) = store.read(ref.name, columns=["video_id", "height", "width", "segmentations",
                                           "referrals"]).to_pylist()
    return tmp, row, store, ref


def perfect_lgvis(row: dict) -> dict:
    """The official prediction file of a curated video: for every referral, its GT tracks (an
    empty RLE where a track is absent) on every GT frame."""
    empty = rle_codec.encode(np.zeros((row["height"], row["width"]), np.uint8))
    refs = []
    for ref in row["referrals"]:
        frames = []
        for seg in row["segmentations"]:
            if not seg["is_gt"]:
                continue
            by_id = dict(zip(seg["track_ids"], seg["mask_rles"]))
            frames.append({"filename": seg["filename"],
                           "mask_rles": [dict(by_id.get(t, empty)) for t in ref["track_ids"]]})
        refs.append(frames)
    return {"video_id": row["video_id"], "pred_caption": "a video", "pred_lgvis_masks": refs}


def write_lgvis(folder: Path, row: dict, pred: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{row['video_id']:06d}.json").write_text(json.dumps(pred))
    return folder


def run_lgvis(vicas_gt, folder: Path):
    _, _, store, ref = vicas_gt
    return evaluate(EvaluateViCaS, EvaluateViCaSConfig(predictions=str(folder)), store, ref,
                    "vicas")


def test_lgvis_perfect_predictions_are_100(vicas_gt, tmp_path):
    _, row, store, _ = vicas_gt
    r = run_lgvis(vicas_gt, write_lgvis(tmp_path / "pred", row, perfect_lgvis(row)))
    assert r.metrics == {"track_mAP": 100.0, "track_AP50": 100.0, "track_AP75": 100.0,
                         "track_AP90": 100.0}
    assert final_metrics(store, {"results": r.outputs["results"].to_json()}) == r.metrics


def test_lgvis_one_track_emptied_by_hand(vicas_gt, tmp_path):
    _, row, _, _ = vicas_gt
    # the sample video has 3 tracks; referral 0 -> track [1], referral 1 -> tracks [2, 3]
    assert [r["track_ids"] for r in row["referrals"]] == [[1], [2, 3]]
    pred = perfect_lgvis(row)
    empty = rle_codec.encode(np.zeros((row["height"], row["width"]), np.uint8))
    for frame in pred["pred_lgvis_masks"][0]:
        frame["mask_rles"] = [empty]  # referral 0 predicts an empty track
    r = run_lgvis(vicas_gt, write_lgvis(tmp_path / "pred", row, pred))
    # Pooled predictions, all scored 1.0, in (video, referral) order: [FP, TP, TP] at every IoU
    # threshold (the empty track has IoU 0), 3 GT tracks. Precision 0, 1/2, 2/3 at recall
    # 0, 1/3, 2/3; the monotone envelope is 2/3 up to recall 2/3 and 0 after, so
    # AP = 1/3 * 2/3 + 1/3 * 2/3 = 4/9 at every threshold: mAP = AP50 = AP75 = AP90 = 44.44
    # (float32 arithmetic, as the official scorer).
    for k in ("track_mAP", "track_AP50", "track_AP75", "track_AP90"):
        assert r.metrics[k] == pytest.approx(400 / 9, abs=1e-4)


def test_lgvis_unknown_ids_and_unparseable_files_are_clear_errors(vicas_gt, tmp_path):
    _, row, _, _ = vicas_gt
    vid = row["video_id"]
    good = perfect_lgvis(row)

    def check(folder, *needles):
        with pytest.raises(StageError) as e:
            run_lgvis(vicas_gt, folder)
        msg = str(e.value)
        for n in ("stage 'ev'", "field 'with.predictions'", *needles):
            assert n in msg, (n, msg)

    folder = write_lgvis(tmp_path / "a", row, good)
    (folder / "000001.json").write_text(json.dumps(good))
    check(folder, str(folder / "000001.json"), "video id 1", "ground truth does not hold")

    folder = write_lgvis(tmp_path / "b", row, good)
    (folder / f"{vid:06d}.json").write_text("{not json")
    check(folder, str(folder / f"{vid:06d}.json"), "does not parse as JSON")

    check(write_lgvis(tmp_path / "c", row, {**good, "video_id": 5}), "video_id 5",
          f"video {vid}")
    check(write_lgvis(tmp_path / "d", row, {**good, "pred_lgvis_masks": good[
        "pred_lgvis_masks"][:1]}), "1 entries", "2 object_referrals")
    (tmp_path / "e").mkdir()
    check(tmp_path / "e", f"no prediction file for video {vid}")
    bad_rle = copy.deepcopy(good)
    bad_rle["pred_lgvis_masks"][1][0]["mask_rles"][0]["size"] = [3, 3]
    check(write_lgvis(tmp_path / "f", row, bad_rle), f"{vid:06d}.json", "pred_lgvis_masks[1]",
          "RLE")


def test_lgvis_plan_checks_name_the_field(tmp_path):
    ctx = StageContext(dag="t", stage="lg", store=TableStore(str(tmp_path / "s")),
                       row_fingerprint="")
    stage = EvaluateViCaS(EvaluateViCaSConfig(predictions=str(tmp_path / "preds")), ctx)
    [(field, why)] = stage.check_config()
    assert field == "with.predictions" and "does not exist" in why
    (tmp_path / "preds").write_text("")
    [(field, why)] = stage.check_config()
    assert field == "with.predictions" and "is a file" in why


def test_report_has_a_segmentation_table():
    from pipelines.report import _Run, render

    def run(i, metrics):
        return _Run(f"run{i}", f"r{i}", "exp", "FINISHED", None, None, {}, metrics,
                    {"vgen.lineage.curated.uri": f"/s/t/pancap{i}",
                     "vgen.lineage.curated.version": "3"})

    page = render([run(0, {"PQ": 93.75, "PQ_th": 87.5, "SQ": 93.75}),
                   run(1, {"track_mAP": 400 / 9, "track_AP50": 44.44444})], "sqlite:///x")
    table = page[page.index("<h2>Segmentation</h2>"):page.index("<h2>Final metrics</h2>")]
    assert "<th>PQ All</th><td class='num'>93.8</td><td>&mdash;</td>" in table
    assert "<th>PQ Things</th><td class='num'>87.5</td>" in table
    assert "<th>track mAP</th><td>&mdash;</td><td class='num'>44.44</td>" in table
    assert "PQ Stuff" not in table and "/s/t/pancap0@v3" in table
    assert "<h2>Segmentation</h2>" not in render([run(0, {"fid": 1.0})], "sqlite:///x")


# ---------------------------------------------------------------------------------------------


class RecordingTracker:
    """Keeps what a stage logs (tags, dicts, texts) for assertions."""

    run_id = "rec"

    def __init__(self):
        self.tags, self.dicts, self.texts = {}, {}, {}

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_dict(self, d, name):
        self.dicts[name] = d

    def log_text(self, text, name):
        self.texts[name] = text

    def __getattr__(self, name):  # every other Tracker method: recorded nowhere
        return lambda *a, **k: None
