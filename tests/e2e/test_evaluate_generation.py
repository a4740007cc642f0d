"""``evaluate.generation`` through `vgen run` on the session's local Ray cluster.

ingest.images (skimage://, 2 crops of 32 px) -> tokenize.titok (tiny, seeded) -> train.generator
(MaskGIT tiny, 20 steps, 1 worker) -> evaluate.generation (16 samples). Asserts the results rows
(FID, IS, precision, recall, each naming its extractor), the MLflow record (metrics, sample grid,
lineage tags), that an unchanged re-run skips the evaluation, and that an evaluation with another
sampling seed reuses the cached reference statistics (one row in ``_vgen/reference_stats``)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, vgen_cmd
from vgen_core.data import TableStore

EXTRACTOR = "tiny-conv-seed0-v1"


def make_dag(tmp: Path, seed: int) -> Path:
    dag = {"name": "evalgen", "error_budget": 0.0, "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": "skimage://", "crops_per_image": 2, "size": 32}},
        "tokens": {"uses": "tokenize.titok", "needs": ["images"],
                   "with": {"size": "tiny", "init_seed": 0, "flip": False},
                   "resources": {"batch_size": 20}},
        "maskgit": {"uses": "train.generator", "needs": ["tokens"],
                    "with": {"model": "maskgit", "size": "tiny",
                             "train": {"steps": 20, "micro_batch_size": 8, "lr": 2.0e-3,
                                       "log_every": 5, "checkpoint_every": 0}},
                    "resources": {"workers": 1, "cpus": 1}},
        "eval": {"uses": "evaluate.generation", "needs": ["maskgit", "tokens"],
                 "with": {"num_samples": 16, "shard_size": 8, "seed": seed,
                          "sampler": {"steps": 4, "guidance_scale": 1.0}, "grid_images": 16}},
    }}
    p = tmp / "evalgen.yaml"
    p.write_text(yaml.safe_dump(dag))
    return p


def vgen(*args: str, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(vgen_cmd() + list(args), env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    if p.returncode:
        print(p.stdout[-5000:], p.stderr[-10000:])
    return p


def results(store: TableStore) -> list[dict]:
    return store.read("evalgen/eval").to_pylist()


def test_evaluate_generation_dag(ray_cluster, tmp_path):
    from mlflow import MlflowClient

    from pipelines.report import write_report
    from vgen_core.tracking import default_tracking_uri

    storage = tmp_path / "store"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    dag = make_dag(tmp_path, seed=42)
    assert vgen("run", str(dag), "--storage", str(storage), env=env).returncode == 0
    store = TableStore(str(storage))
    rows = results(store)
    by_metric = {r["metric"]: r for r in rows}
    for m in ("fid", "is", "precision", "recall"):
        assert m in by_metric, sorted(by_metric)
        assert by_metric[m]["extractor"] == EXTRACTOR and by_metric[m]["num_samples"] == 16
    assert by_metric["fid"]["value"] >= 0.0 and 0.0 <= by_metric["precision"]["value"] <= 1.0
    first = json.loads(by_metric["fid"]["details"])
    assert first["reference"]["cached"] is False
    assert first["reference"]["comparable_to_published"] is False
    # the decoder is the tokens stage's export of its seeded tokenizer (its `tokenizer` output)
    tok = first["lineage"]["tokenizer"]
    assert tok["family"] == "titok" and tok["stage"] == "tokens"
    assert tok["uri"] == store.path(f"models/evalgen/tokens/{tok['fingerprint']}")
    assert store.read("_vgen/reference_stats").num_rows == 1

    # MLflow: metrics on the stage run, the sample grid, lineage tags
    client = MlflowClient(tracking_uri=default_tracking_uri(store.root))
    experiment = client.get_experiment_by_name("evalgen").experiment_id  # the DAG's name
    (run,) = client.search_runs([experiment], "tags.`vgen.stage` = 'eval'")
    assert run.data.metrics["fid"] == pytest.approx(by_metric["fid"]["value"])
    assert run.data.tags["vgen.eval.extractor"] == EXTRACTOR
    assert run.data.tags["vgen.lineage.generator.digest"] == first["lineage"]["generator"]["digest"]
    assert "vgen.lineage.curated.version" in run.data.tags
    assert "samples_grid.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # the registered generator version carries the evaluation's scores
    (mv,) = client.search_model_versions("name = 'evalgen.maskgit'")
    assert mv.tags["vgen.digest"] == first["lineage"]["generator"]["digest"]
    assert float(mv.tags["eval.eval.fid"]) == pytest.approx(by_metric["fid"]["value"], rel=1e-5)
    assert mv.tags["eval.eval.extractor"] == EXTRACTOR
    assert mv.tags["eval.eval.run_id"] == run.info.run_id

    # unchanged: the evaluation is skipped, nothing is appended
    p = vgen("run", str(dag), "--storage", str(storage), env=env)
    assert p.returncode == 0 and "[eval] up-to-date: skipped" in p.stderr
    assert len(results(store)) == len(rows)

    # another sampling seed: a new evaluation, same reference statistics (from the cache)
    dag = make_dag(tmp_path, seed=7)
    p = vgen("run", str(dag), "--storage", str(storage), env=env)
    assert p.returncode == 0 and "[maskgit] up-to-date: skipped" in p.stderr
    new = [r for r in results(store) if r["fingerprint"] != rows[0]["fingerprint"]]
    assert {r["metric"] for r in new} >= {"fid", "is", "precision", "recall"}
    second = json.loads(new[0]["details"])
    assert second["seed"] == 7 and second["reference"]["cached"] is True
    assert store.read("_vgen/reference_stats").num_rows == 1

    # the two evaluations side by side in one report
    runs = client.search_runs([experiment], "tags.`vgen.stage` = 'eval'")
    assert len(runs) == 2
    page = write_report([r.info.run_id for r in runs], default_tracking_uri(store.root),
                        tmp_path / "report.html").read_text()
    assert all(r.info.run_id in page for r in runs) and "data:image/png;base64," in page

    # a released generator (import.weights, no training) evaluated on the same tokens: only
    # the import and its evaluation run; the lineage names the imported weights
    import torch

    from vgen_core import families

    over = {"codebook_size": 64, "seq_len": 8}
    torch.manual_seed(3)
    gen = families.get("maskgit").build("tiny", over)
    torch.save({"state_dict": gen.state_dict()}, tmp_path / "maskgit_released.pt")
    spec = yaml.safe_load(make_dag(tmp_path, seed=42).read_text())
    stages = spec["stages"]
    del stages["maskgit"], stages["eval"]
    stages["released"] = {"uses": "import.weights", "with": {
        "model": "maskgit", "size": "tiny", "overrides": over,
        "weights": str(tmp_path / "maskgit_released.pt")}}
    stages["eval_released"] = {"uses": "evaluate.generation", "needs": ["released", "tokens"],
                               "with": {**stages_eval_with(), "seed": 42}}
    # ... and its 1.58-bit version (quantize.ternary), scored by the same evaluation
    stages["ternary"] = {"uses": "quantize.ternary", "needs": ["released"],
                         "with": {"steps": 20, "batch_size": 8, "pool_size": 16, "lr": 3.0e-3,
                                  "speed_samples": 4, "sampler": {"steps": 4}}}
    stages["eval_ternary"] = {"uses": "evaluate.generation", "needs": ["ternary", "tokens"],
                              "with": {**stages_eval_with(), "seed": 42}}
    (tmp_path / "released.yaml").write_text(yaml.safe_dump(spec))
    p = vgen("run", str(tmp_path / "released.yaml"), "--storage", str(storage), env=env)
    assert p.returncode == 0
    assert "[tokens] up-to-date: skipped" in p.stderr
    rows = store.read("evalgen/eval_released").to_pylist()
    assert {r["metric"] for r in rows} >= {"fid", "is", "precision", "recall"}
    lineage = json.loads(rows[0]["details"])["lineage"]
    from vgen_core.tokenizers.io import weights_digest

    assert lineage["generator"]["digest"] == weights_digest(gen)
    assert lineage["generator"]["stage"] == "released"
    ternary = {r["metric"] for r in store.read("evalgen/eval_ternary").to_pylist()}
    assert ternary >= {"fid", "is", "precision", "recall"}
    (run,) = client.search_runs([experiment], "tags.`vgen.stage` = 'ternary'")
    m = run.data.metrics
    assert m["ternary.weight_bytes_packed"] < m["ternary.weight_bytes_bf16"] / 4
    assert m["distill.loss_last"] < m["distill.loss_first"]
    assert len(client.get_metric_history(run.info.run_id, "distill/loss")) == 20


def stages_eval_with() -> dict:
    return {"num_samples": 16, "shard_size": 8, "sampler": {"steps": 4, "guidance_scale": 1.0},
            "grid_images": 0}
