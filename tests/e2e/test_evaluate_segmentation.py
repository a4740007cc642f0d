"""``evaluate.panoptic`` and ``evaluate.vicas`` through `vgen run` on the session's local Ray
cluster: curate.pancap (2 sample images) + evaluate.panoptic, curate.vicas (1 sample video) +
evaluate.vicas, with predictions in the official formats. Asserts the scores in `vgen status
--json`, the MLflow record (metrics, curated lineage) and the `vgen report` page, and that
rewritten predictions at the same path make the stage run again (`vgen plan`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import yaml

from tests.conftest import ROOT, vgen_cmd
from vgen_core.data import TableStore
from vgen_core.data import rle as rle_codec

PQ_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
TRACK_KEYS = ("track_mAP", "track_AP50", "track_AP75", "track_AP90")


def vgen(*args: str, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(vgen_cmd() + list(args), env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    if p.returncode:
        print(p.stdout[-5000:], p.stderr[-10000:])
    return p


def write_panoptic(folder: Path, images, drop_row: bool = False) -> Path:
    """Perfect predictions under other ids (``drop_row``: image 0's first segment loses its
    first pixel row to void)."""
    from vgen_core.data.panoptic import write_id_png

    (folder / "predictions").mkdir(parents=True, exist_ok=True)
    anns = []
    for k, img in enumerate(images):
        ids = np.where(img.ids > 0, img.ids + 1000, 0)
        if drop_row and k == 0:
            first = img.segments[0]["id"] + 1000
            rows = np.nonzero((ids == first).any(1))[0]
            ids[rows[0]][ids[rows[0]] == first] = 0
        (folder / "predictions" / f"{img.file_stem}.png").write_bytes(write_id_png(ids))
        anns.append({"image_id": img.image_id, "file_name": f"{img.file_stem}.png",
                     "segments_info": [{"id": s["id"] + 1000, "category_id": s["category_id"]}
                                       for s in img.segments]})
    (folder / "predictions.json").write_text(json.dumps({"annotations": anns}))
    return folder / "predictions.json"


def write_lgvis(folder: Path, vicas_root: Path) -> Path:
    """Perfect official prediction files from the ViCaS annotation JSONs."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((vicas_root / "annotations" / "v1.0").glob("*.json")):
        ann = json.loads(path.read_text())
        h, w = ann["image_size"]
        empty = rle_codec.encode(np.zeros((h, w), np.uint8))
        refs = []
        for ref in ann["object_referrals"]:
            refs.append([{"filename": s["filename"], "mask_rles": [
                dict(zip(s["track_ids"], s["mask_rles"])).get(t, empty)
                for t in ref["track_ids"]]} for s in ann["segmentations"] if s["is_gt"]])
        pred = {"video_id": ann["video_id"], "pred_caption": "", "pred_lgvis_masks": refs}
        (folder / f"{ann['video_id']:06d}.json").write_text(json.dumps(pred))
    return folder


def make_dag(tmp: Path, pancap: Path, vicas: Path, panoptic_preds: Path, lgvis: Path) -> Path:
    dag = {"name": "segeval", "error_budget": 0.0, "stages": {
        "pancap": {"uses": "curate.pancap", "with": {"root": str(pancap)}},
        # one image per actor call: 2 batches, so the work goes through the Ray actor pool
        "pq": {"uses": "evaluate.panoptic", "needs": ["pancap"],
               "with": {"predictions": str(panoptic_preds)}, "resources": {"batch_size": 1}},
        "vicas": {"uses": "curate.vicas", "with": {"root": str(vicas), "version": "v1.0"}},
        "lgvis": {"uses": "evaluate.vicas", "needs": ["vicas"],
                  "with": {"predictions": str(lgvis)}},
    }}
    p = tmp / "segeval.yaml"
    p.write_text(yaml.safe_dump(dag))
    return p


def status(dag: Path, storage: Path, env: dict) -> dict:
    p = vgen("status", str(dag), "--storage", str(storage), "--json", env=env)
    assert p.returncode == 0, p.stderr
    return {s["stage"]: s for s in json.loads(p.stdout)["stages"]}


def test_segmentation_eval_dag(ray_cluster, tmp_path):
    from mlflow import MlflowClient

    from pipelines.report import write_report
    from vgen_core.formats.pancap_samples import make_pancap_images, write_pancap_layout
    from vgen_core.formats.vicas_samples import write_vicas_sample_dataset

    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    images = make_pancap_images(2, seed=0)
    pancap = write_pancap_layout(tmp_path / "pancap", images)
    vicas = tmp_path / "vicas"
    write_vicas_sample_dataset(vicas, n_videos=1, seed=0)
    storage = tmp_path / "store"

    preds = write_panoptic(tmp_path / "pred", images)
    dag = make_dag(tmp_path, pancap, vicas, preds, write_lgvis(tmp_path / "lgvis", vicas))
    assert vgen("run", str(dag), "--storage", str(storage), env=env).returncode == 0

    st = status(dag, storage, env)
    assert st["pq"]["metrics"] == {k: 100.0 for k in PQ_KEYS}
    assert st["lgvis"]["metrics"] == {k: 100.0 for k in TRACK_KEYS}
    assert st["pancap"]["metrics"] == {}
    store = TableStore(str(storage))
    rows = {r["metric"]: r for r in store.read("segeval/pq").to_pylist()}
    assert set(rows) == set(PQ_KEYS) and all(r["num_samples"] == 2 for r in rows.values())

    # MLflow: metrics on the stage run, lineage to the curated table version
    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    run = client.get_run(st["pq"]["mlflow_run_id"])
    assert run.data.metrics["PQ"] == 100.0
    curated = st["pancap"]["outputs"]["samples"]
    assert run.data.tags["vgen.lineage.curated.uri"] == curated["uri"]
    assert run.data.tags["vgen.lineage.curated.version"] == str(curated["version"])
    lg = client.get_run(st["lgvis"]["mlflow_run_id"])
    assert lg.data.metrics["track_mAP"] == 100.0
    page = write_report([st["pq"]["mlflow_run_id"], st["lgvis"]["mlflow_run_id"]],
                        f"sqlite:///{storage}/mlflow.db", tmp_path / "report.html").read_text()
    assert "<h2>Segmentation</h2>" in page and ">100.0</td>" in page and ">100.00</td>" in page

    # new predictions at the same path: the panoptic stage must run again, the rest not
    write_panoptic(tmp_path / "pred", images, drop_row=True)
    p = vgen("plan", str(dag), "--storage", str(storage), "--format", "json", env=env)
    assert p.returncode == 0, p.stderr
    plan = {s["stage"]: s for s in json.loads(p.stdout)["stages"]}
    assert plan["pq"]["state"] == "to-run" and "pngs" in plan["pq"]["reason"]  # the PNGs changed
    assert {plan[s]["state"] for s in ("pancap", "vicas", "lgvis")} == {"up-to-date"}
