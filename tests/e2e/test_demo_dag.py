"""The demo DAG end to end on a real local Ray cluster, DeepSpeed, Delta and MLflow:
run, no-op re-run, then one changed input image."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, vgen_cmd
from vgen_core.data import TableStore
from vgen_core.data.sample_images import PHOTOS, export_photos

DEMO = ROOT / "pipelines" / "configs" / "demo.yaml"
N = len(PHOTOS) * 4
STAGES = ("pancap", "vicas", "images", "tokenizer", "tokens", "generator", "eval")


def counts(processed: int, skipped: int = 0, quarantined: int = 0, filtered: int = 0) -> dict:
    return {"processed": processed, "skipped": skipped, "quarantined": quarantined,
            "filtered": filtered}


def vgen(*args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(vgen_cmd() + list(args), env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        print(p.stdout[-6000:], p.stderr[-12000:])
    return p


def status(storage: Path, env: dict) -> dict:
    p = vgen("status", str(DEMO), "--storage", str(storage), "--json", env=env)
    assert p.returncode == 0, p.stderr
    return {s["stage"]: s for s in json.loads(p.stdout)["stages"]}


@pytest.fixture(scope="module")
def demo_env(ray_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    images = base / "images"
    export_photos(images)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, VGEN_DEMO_IMAGES=str(images))
    return base, images, env


def test_demo_runs_then_skips_then_recomputes_changed(demo_env):
    base, images, env = demo_env
    storage = base / "store"

    # 1. first run: everything computed
    p = vgen("run", str(DEMO), "--storage", str(storage), env=env)
    assert p.returncode == 0
    assert "MLflow:" in p.stdout and str(storage) in p.stdout
    # the console: vgen's own lines only, every stage's final line; the rest in the log file
    console = (p.stdout + p.stderr).splitlines()
    assert len(console) <= 100, "\n".join(console)
    for s in STAGES:
        assert sum(line.startswith(f"[{s}] done in ") for line in console) == 1, s
    assert not [line for line in console if "RayTrainWorker" in line or "Traceback" in line]
    (log,) = [line.split(None, 1)[1] for line in console if line.startswith("Log: ")]
    assert log.startswith(f"{storage}/_vgen/logs/demo/") and f"vgen: log file {log}" in p.stderr
    assert "RayTrainWorker" in Path(log).read_text()  # the workers' output went there
    st = status(storage, env)
    assert all(s["state"] == "up-to-date" for s in st.values()), st
    assert st["images"]["counts"] == counts(N)
    assert st["tokens"]["counts"] == counts(N)
    assert st["pancap"]["counts"] == counts(6)  # the sample:// datasets, in the real layouts
    assert st["vicas"]["counts"] == counts(3)
    store = TableStore(str(storage))
    (side,) = store.list_tables("demo/tokens")
    tokens = store.read(side)
    assert tokens.num_rows == N and len(set(tokens["sample_id"].to_pylist())) == N
    assert tokens.schema.field("indices").type.value_type.bit_width == 32
    results = {r["metric"]: r["value"] for r in store.read("demo/eval").to_pylist()}
    assert 10.0 < results["recon/psnr"] < 60.0
    assert 0.0 < results["codebook/usage_fraction"] <= 1.0
    assert results["samples/codebook_usage"] > 0.0
    assert results["recon/rfid"] >= 0.0 and results["samples/fid"] > results["recon/rfid"]
    extractors = {r["metric"]: r["extractor"] for r in store.read("demo/eval").to_pylist()}
    assert extractors["recon/rfid"] == extractors["samples/fid"] == "tiny-conv-seed0-v1"
    assert extractors["recon/psnr"] is None

    # MLflow: one DAG run, nested stage runs, rank-0 loss curves, table lineage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.data.tags["vgen.stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == set(STAGES)
    assert children["pancap"].data.metrics["dataset/samples"] == 6
    hist = client.get_metric_history(children["tokenizer"].info.run_id, "train/loss")
    assert [m.step for m in hist] == [10, 20, 30, 40, 50, 60]  # logged once per step: rank 0 only
    assert hist[-1].value < hist[0].value
    ins = children["tokens"].inputs.dataset_inputs
    assert any("demo/images" in d.dataset.source for d in ins)
    assert parents[0].data.params["stages.tokens.uses"] == "tokenize.lfq"

    # 2. no-op re-run: every stage skipped, no new state records
    n_records = store.read("_vgen/stage_runs").num_rows
    p = vgen("run", str(DEMO), "--storage", str(storage), env=env)
    assert p.returncode == 0
    for stage in STAGES:
        assert f"[{stage}] up-to-date: skipped" in p.stderr
    assert store.read("_vgen/stage_runs").num_rows == n_records

    # 3. change one image: its 4 crops re-ingested; the tokenizer retrains on the new data, so
    # every token is recomputed under the new weights; nothing else is re-ingested.
    path = images / "astronaut.png"
    a = np.asarray(Image.open(path))
    Image.fromarray(255 - a).save(path)
    p = vgen("run", str(DEMO), "--storage", str(storage), env=env)
    assert p.returncode == 0
    st = status(storage, env)
    assert st["images"]["counts"] == counts(4, skipped=N - 4)
    assert st["tokens"]["counts"]["processed"] == N
    assert store.read("demo/images").num_rows == N
