"""Tracking: NullTracker, helpers, and MlflowTracker against a real SQLite MLflow store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgen_core.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    default_artifact_location,
    default_tracking_uri,
    flatten_params,
    image_grid,
    register_model,
    tag_model_versions,
    to_uint8_image,
)

TRACKING_LOGGER = "vgen_core.tracking.mlflow_tracker"

# MLflow's SQLAlchemy store uses a deprecated SQLAlchemy loader; mlflow_tracker silences it at
# import, but pytest resets warning filters around each test.
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating its tables takes a couple of seconds."""
    return default_tracking_uri(str(tmp_path_factory.mktemp("storage")))


@pytest.fixture
def tracker(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> MlflowTracker:
    t = MlflowTracker.start(
        store, "unit", request.node.name, tags={"suite": "unit"}, fallback_dir=tmp_path / "fallback"
    )
    assert not t.offline, t
    yield t
    t.finish()


def _fallback_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- pure helpers


def test_flatten_params_exact() -> None:
    params = {
        "model": {
            "name": "titok",
            "depth": 12,
            "dims": [64, 128],
            "opt": {"lr": 1e-4, "betas": (0.9, 0.95)},
        },
        "seed": 0,
        "flip": True,
        "none": None,
        "empty": {},
        "long": "x" * 7000,
    }
    flat = flatten_params(params)
    assert flat.pop("long") == "x" * (6000 - len("...[truncated]")) + "...[truncated]"
    assert flat == {
        "model.name": "titok",
        "model.depth": "12",
        "model.dims": "[64, 128]",
        "model.opt.lr": "0.0001",
        "model.opt.betas": "[0.9, 0.95]",
        "seed": "0",
        "flip": "True",
        "none": "None",
        "empty": "{}",
    }


def test_image_grid_layout() -> None:
    images = np.stack([np.full((2, 3, 1), i + 1, dtype=np.uint8) for i in range(5)])
    grid = image_grid(images, nrow=2, padding=1)
    # 3 rows x 2 cols of 2x3 images with 1-pixel padding: (3*3+1) x (2*4+1)
    assert grid.shape == (10, 9, 1) and grid.dtype == np.uint8
    assert (grid[1:3, 1:4] == 1).all() and (grid[1:3, 5:8] == 2).all()
    assert (grid[4:6, 1:4] == 3).all() and (grid[7:9, 1:4] == 5).all()
    assert (grid[7:9, 5:8] == 0).all()  # empty last cell is padding
    assert grid[0].sum() == 0 and grid[:, 0].sum() == 0
    with pytest.raises(ValueError, match="N x H x W x C"):
        image_grid(np.zeros((2, 3, 4)), nrow=2)


def test_to_uint8_image() -> None:
    floats = np.array([[[0.0, 0.5, 1.0]], [[-1.0, 2.0, np.nan]]], dtype=np.float32)  # 2x1x3
    assert to_uint8_image(floats).tolist() == [[[0, 128, 255]], [[0, 255, 0]]]
    assert to_uint8_image(np.ones((2, 2), dtype=bool)).shape == (2, 2, 1)
    with pytest.raises(ValueError, match="CxHxW"):
        to_uint8_image(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        to_uint8_image(np.full((2, 2, 3), 300, dtype=np.int32))


def test_null_tracker_is_a_tracker() -> None:
    t = NullTracker()
    assert isinstance(t, Tracker) and t.run_id is None
    t.log_params({"a": {"b": 1}})
    t.log_metrics({"loss": 1.0}, step=1)
    t.log_image("x", np.zeros((2, 2, 3)))
    t.log_table_input("d", "/tmp/d", 3, 10, "abc", "input")
    child = t.child("c")
    assert isinstance(child, NullTracker)
    child.finish("FAILED")
    assert register_model(t, "m") is None


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_tracking_uri(f"file://{tmp_path}") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default_artifact_location(str(tmp_path)) == f"{tmp_path.resolve()}/mlartifacts"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert (
        default_tracking_uri("s3://bucket/vgen")
        == f"sqlite:///{tmp_path.resolve()}/cache/vgen/mlflow.db"
    )
    assert default_artifact_location("s3://bucket/vgen/") == "s3://bucket/vgen/mlartifacts"


# ----------------------------------------------------------------------------- MLflow store


def test_experiment_artifact_location_beside_database(tracker: MlflowTracker, store: str) -> None:
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    db_dir = Path(store[len("sqlite:///") :]).parent
    assert experiment.artifact_location == str(db_dir / "mlartifacts")
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith(str(db_dir / "mlartifacts"))
    assert run.data.tags["suite"] == "unit" and run.info.status == "RUNNING"
    assert isinstance(tracker, Tracker)


def test_params_flattened_in_store(tracker: MlflowTracker) -> None:
    tracker.log_params({"model": {"depth": 12, "dims": [64, 128]}, "lr": 1e-4, "bad:key[0]": 1})
    params = tracker.client.get_run(tracker.run_id).data.params
    assert params == {
        "model.depth": "12",
        "model.dims": "[64, 128]",
        "lr": "0.0001",
        "bad:key_0_": "1",
    }


def test_many_params_are_batched(tracker: MlflowTracker) -> None:
    tracker.log_params({"layers": {f"l{i:03d}": {"dim": i} for i in range(250)}})  # > 100/batch
    params = tracker.client.get_run(tracker.run_id).data.params
    assert params == {f"layers.l{i:03d}.dim": str(i) for i in range(250)}


def test_context_manager_marks_failure(store: str, tmp_path: Path) -> None:
    t = MlflowTracker.start(store, "unit", "ctx", fallback_dir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"), t:
        raise RuntimeError("boom")
    assert t.client.get_run(t.run_id).info.status == "FAILED"
    assert not t.fallback_path.exists()


def test_metrics_history_by_step(tracker: MlflowTracker) -> None:
    losses = [2.5, 1.75, 1.125, 0.5]
    for step, loss in enumerate(losses):
        tracker.log_metrics({"train/loss": loss, "lr": 1e-3 * (step + 1)}, step=step)
    tracker.log_metrics({"eval/fid": 12.25})  # no step: MLflow's step 0
    history = tracker.client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(losses))
    assert [m.value for m in tracker.client.get_metric_history(tracker.run_id, "eval/fid")] == [
        12.25
    ]
    assert [m.step for m in tracker.client.get_metric_history(tracker.run_id, "eval/fid")] == [0]


def test_images_are_artifacts(tracker: MlflowTracker, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grid = image_grid(rng.random((4, 8, 8, 3)), nrow=2)
    tracker.log_image("samples/grid", grid, step=7)
    static = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    tracker.log_image("recon", static)

    client = tracker.client
    stepped = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    assert any(
        p.startswith("images/samples~grid+step+7+") and p.endswith(".png") for p in stepped
    ), stepped
    local = client.download_artifacts(tracker.run_id, "recon.png", str(tmp_path))
    assert np.array_equal(np.asarray(Image.open(local)), static)


def test_child_run_is_nested(tracker: MlflowTracker) -> None:
    child = tracker.child("stage:tokenize")
    child.log_metrics({"rows": 10.0})
    child.finish("FAILED")
    run = tracker.client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == tracker.run_id
    assert run.info.experiment_id == tracker.experiment_id
    assert run.info.status == "FAILED" and run.data.metrics == {"rows": 10.0}


def test_table_input_records_uri_and_version(tracker: MlflowTracker) -> None:
    tracker.log_table_input("pancap", "s3://bucket/vgen/pancap", 0, 1234, "b2:abc", "input")
    tracker.log_table_input("pancap", "s3://bucket/vgen/pancap", 3, 1300, "b2:def", "input")
    tracker.log_table_input("titok_tokens", "/data/tokens", 5, None, None, "output")
    inputs = tracker.client.get_run(tracker.run_id).inputs.dataset_inputs
    seen = {}
    for dataset_input in inputs:
        ds = dataset_input.dataset
        source = json.loads(ds.source)
        context = {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"]
        seen[(ds.name, source["delta_table_version"])] = (
            ds.source_type,
            source["path"],
            context,
            json.loads(ds.profile),
        )
    assert seen == {
        ("pancap", 0): (
            "delta_table",
            "s3://bucket/vgen/pancap",
            "input",
            {"num_rows": 1234, "delta_table_version": 0, "content_digest": "b2:abc"},
        ),
        ("pancap", 3): (
            "delta_table",
            "s3://bucket/vgen/pancap",
            "input",
            {"num_rows": 1300, "delta_table_version": 3, "content_digest": "b2:def"},
        ),
        ("titok_tokens", 5): (
            "delta_table",
            "/data/tokens",
            "output",
            {"num_rows": None, "delta_table_version": 5, "content_digest": None},
        ),
    }


def test_attach_writes_into_the_same_run(
    tracker: MlflowTracker, store: str, tmp_path: Path
) -> None:
    tracker.log_metrics({"loss": 3.0}, step=0)
    worker = MlflowTracker.attach(store, tracker.run_id, fallback_dir=tmp_path / "fallback")
    worker.log_metrics({"loss": 2.0}, step=1)
    worker.log_text("rank 0 says hi", "logs/rank0.txt")
    worker.finish()  # not the owner: the run stays open
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING"
    history = tracker.client.get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0)]
    assert [a.path for a in tracker.client.list_artifacts(tracker.run_id, "logs")] == [
        "logs/rank0.txt"
    ]

    tracker.finish()
    resumed = MlflowTracker.attach(store, tracker.run_id, owner=True)  # a restarted driver
    assert tracker.client.get_run(tracker.run_id).info.status == "RUNNING"
    resumed.finish()
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"


def test_rejected_call_degrades_to_fallback(
    tracker: MlflowTracker, caplog: pytest.LogCaptureFixture
) -> None:
    tracker.log_params({"lr": 1})
    with caplog.at_level(logging.WARNING, logger=TRACKING_LOGGER):
        tracker.log_params({"lr": 2})  # MLflow params are immutable: the store rejects this
        tracker.log_params({"lr": 3})
    warnings = [r for r in caplog.records if r.name == TRACKING_LOGGER]
    assert len(warnings) == 1 and tracker.run_id in warnings[0].getMessage()
    records = _fallback_records(tracker.fallback_path)
    assert [(r["kind"], r["data"]) for r in records] == [
        ("params", {"lr": "2"}),
        ("params", {"lr": "3"}),
    ]
    assert all("MlflowException" in r["error"] for r in records)
    assert tracker.client.get_run(tracker.run_id).data.params == {"lr": "1"}


def test_unreachable_backend_degrades(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = "http://127.0.0.1:9"
    with caplog.at_level(logging.WARNING, logger=TRACKING_LOGGER):
        t = MlflowTracker.start(uri, "unit", "down", fallback_dir=tmp_path)
        assert t.offline and t.run_id.startswith("offline-")
        t.log_params({"a": {"b": 1}})
        t.log_metrics({"loss": 0.5}, step=3)
        t.log_image("grid", np.zeros((4, 4, 3)), step=3)
        t.log_table_input("pancap", "/data/pancap", 2, 10, None, "input")
        child = t.child("stage")
        child.log_metrics({"x": 1.0})
        child.finish()
        t.finish("FAILED")

        worker = MlflowTracker.attach(uri, "0123abcd", fallback_dir=tmp_path)
        worker.log_metrics({"loss": 0.25}, step=4)

    ours = [r.getMessage() for r in caplog.records if r.name == TRACKING_LOGGER]
    assert len(ours) == 2  # one warning per run family (offline run + child) and one for the worker
    assert "127.0.0.1:9" in ours[0] and "start" in ours[0] and "attach" in ours[1]

    records = _fallback_records(t.fallback_path)
    assert [r["kind"] for r in records] == [
        "start",
        "params",
        "metrics",
        "image",
        "dataset_input",
        "finish",
    ]
    assert records[1]["data"] == {"a.b": "1"}
    assert records[2]["data"] == {"metrics": {"loss": 0.5}, "step": 3}
    assert Path(records[3]["data"]["path"]).is_file()
    assert records[4]["data"]["version"] == 2 and records[5]["data"] == {"status": "FAILED"}
    assert [r["kind"] for r in _fallback_records(child.fallback_path)] == [
        "start",
        "metrics",
        "finish",
    ]

    worker_records = _fallback_records(worker.fallback_path)
    assert [r["kind"] for r in worker_records] == ["attach", "metrics"]
    assert worker_records[1]["data"] == {"metrics": {"loss": 0.25}, "step": 4}
    assert register_model(t, "m", tmp_path) is None


def test_register_model_versions(tracker: MlflowTracker, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"\x00" * 16)
    (export / "config.json").write_text(json.dumps({"model": "titok-s128"}))

    assert register_model(tracker, "titok-unit", export) == 1
    (export / "config.json").write_text(json.dumps({"model": "titok-s128", "ema": True}))
    assert register_model(tracker, "titok-unit", export, tags={"stage": "tok"}) == 2

    client = tracker.client
    versions = {int(v.version): v for v in client.search_model_versions("name='titok-unit'")}
    assert sorted(versions) == [1, 2]
    assert versions[1].run_id == versions[2].run_id == tracker.run_id
    assert versions[1].source.endswith("/artifacts/model") and versions[2].source.endswith(
        "/artifacts/model-2"
    )
    assert versions[2].tags == {"stage": "tok"}
    first = Path(versions[1].source) / "config.json"  # version 1 keeps its own files
    assert json.loads(first.read_text()) == {"model": "titok-s128"}
    with pytest.raises(ValueError, match="not a directory"):
        register_model(tracker, "titok-unit", tmp_path / "missing")


def test_tag_model_versions_by_weights_digest(tracker: MlflowTracker, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"\x00" * 16)
    assert register_model(tracker, "gen-a", export, tags={"vgen.digest": "d1"}) == 1
    assert register_model(tracker, "gen-a", export, tags={"vgen.digest": "d2"}) == 2
    assert register_model(tracker, "gen-b", export, tags={"vgen.digest": "d1"}) == 1
    done = tag_model_versions(tracker, "d1", {"eval.e.fid": "12.5"})
    assert sorted(done) == ["gen-a/1", "gen-b/1"]
    client = tracker.client
    tags = {(v.name, int(v.version)): v.tags for v in client.search_model_versions("")}
    assert tags[("gen-a", 1)]["eval.e.fid"] == "12.5"
    assert tags[("gen-b", 1)]["eval.e.fid"] == "12.5"
    assert "eval.e.fid" not in tags[("gen-a", 2)]
    assert tag_model_versions(tracker, "nothing-has-this", {"x": 1}) == []
    assert tag_model_versions(NullTracker(), "d1", {"x": 1}) == []
