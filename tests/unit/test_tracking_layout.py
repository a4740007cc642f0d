"""The MLflow UI layout of vgen's experiments: the experiment-kind tag (model training) set at
creation and on an existing experiment that lacks it, a kind someone chose kept, and the UI
links that open MLflow 3.17 in its model-training layout (docs/tracking.md)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vgen_core.tracking import MlflowTracker, default_tracking_uri, mlflow_ui_url
from vgen_core.tracking.mlflow_tracker import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its tables takes a couple of seconds)."""
    return default_tracking_uri(str(tmp_path_factory.mktemp("storage")))


def _kind(uri: str, experiment_id: str) -> str | None:
    return MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags.get(
        EXPERIMENT_KIND_TAG)


def _start(uri: str, experiment: str, tmp_path: Path) -> MlflowTracker:
    t = MlflowTracker.start(uri, experiment, "run", fallback_dir=tmp_path / "fallback")
    assert not t.offline, t
    t.finish()
    return t


def test_tag_and_value_are_mlflows() -> None:
    assert EXPERIMENT_KIND_TAG == "mlflow.experimentKind"
    assert MODEL_TRAINING_KIND == "custom_model_development"  # the UI's "Model training"


def test_new_experiment_is_model_training(store: str, tmp_path: Path) -> None:
    t = _start(store, "layout-new", tmp_path)
    assert _kind(store, t.experiment_id) == MODEL_TRAINING_KIND
    # its stage runs live in the same experiment: nothing to tag there
    child = MlflowTracker.start(store, "layout-new", "again", fallback_dir=tmp_path / "fb")
    assert child.experiment_id == t.experiment_id
    child.finish()
    assert _kind(store, t.experiment_id) == MODEL_TRAINING_KIND


def test_existing_experiment_without_kind_gets_it(store: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=store)
    eid = client.create_experiment("layout-old", tags={"team": "vision"})  # an older vgen's
    assert _kind(store, eid) is None
    t = _start(store, "layout-old", tmp_path)
    assert t.experiment_id == eid
    tags = client.get_experiment(eid).tags
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND and tags["team"] == "vision"


def test_empty_kind_counts_as_unset(store: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=store)
    eid = client.create_experiment("layout-empty", tags={EXPERIMENT_KIND_TAG: ""})
    _start(store, "layout-empty", tmp_path)
    assert _kind(store, eid) == MODEL_TRAINING_KIND


@pytest.mark.parametrize("kind", ["genai_development", "finetuning", "no_type"])
def test_a_kind_someone_set_is_kept(store: str, tmp_path: Path, kind: str) -> None:
    client = MlflowClient(tracking_uri=store)
    eid = client.create_experiment(f"layout-user-{kind}")
    client.set_experiment_tag(eid, EXPERIMENT_KIND_TAG, kind)  # e.g. chosen in the UI
    t = _start(store, f"layout-user-{kind}", tmp_path)
    assert t.experiment_id == eid and _kind(store, eid) == kind


def test_deleted_experiment_is_restored_and_tagged(store: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=store)
    eid = client.create_experiment("layout-deleted")
    client.delete_experiment(eid)
    _start(store, "layout-deleted", tmp_path)
    experiment = client.get_experiment(eid)
    assert experiment.lifecycle_stage == "active"
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_a_refused_tag_does_not_stop_the_run(store: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A user who may log runs but not edit the experiment (or a store that fails just then):
    the run is recorded, the kind stays unset, a line goes to the log (no user warning)."""
    client = MlflowClient(tracking_uri=store)
    eid = client.create_experiment("layout-readonly")

    def refuse(self: MlflowClient, *args: object, **kwargs: object) -> None:
        raise PermissionError("experiment is read-only for this user")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    with caplog.at_level(logging.INFO, logger="vgen_core.tracking.mlflow_tracker"):
        t = MlflowTracker.start(store, "layout-readonly", "run", fallback_dir=tmp_path / "fb")
    assert not t.offline and t.experiment_id == eid
    t.log_metrics({"train/loss": 1.0}, step=1)
    t.finish()
    monkeypatch.undo()
    assert _kind(store, eid) is None
    assert client.get_run(t.run_id).data.metrics == {"train/loss": 1.0}
    assert not (tmp_path / "fb").exists() or not list((tmp_path / "fb").iterdir())
    (line,) = [r.getMessage() for r in caplog.records if EXPERIMENT_KIND_TAG in r.getMessage()]
    assert "layout-readonly" in line and "PermissionError" in line
    assert all(r.levelno < logging.WARNING for r in caplog.records
               if EXPERIMENT_KIND_TAG in r.getMessage())


def test_offline_tracking_never_raises(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = MlflowTracker.start(f"http://127.0.0.1:{port}", "layout-offline", "run",
                            fallback_dir=tmp_path / "fb")
    assert t.offline and t.experiment_id is None
    t.log_metrics({"train/loss": 1.0}, step=1)
    t.finish()


def test_sync_creates_model_training_experiments(store: str, tmp_path: Path) -> None:
    """A run recorded offline and replayed by `vgen tracking sync` lands in a model-training
    experiment too (the replay creates experiments through the same code)."""
    from vgen_core.tracking.sync import sync_records

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fb = tmp_path / "fb"
    t = MlflowTracker.start(f"http://127.0.0.1:{port}", "layout-synced", "run", fallback_dir=fb)
    t.log_metrics({"train/loss": 1.0}, step=1)
    t.finish()
    sync_records(store, fb)
    experiment = MlflowClient(tracking_uri=store).get_experiment_by_name("layout-synced")
    assert experiment is not None
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


# ------------------------------------------------------------------------------ UI links


def test_ui_links_carry_the_model_training_layout() -> None:
    base = "http://127.0.0.1:5000/"
    assert mlflow_ui_url(base) == (
        "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")
    assert mlflow_ui_url(base, "3") == (
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")
    assert mlflow_ui_url(base, "3", "abc", "model-metrics") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc/model-metrics"
        "?workflowType=machine_learning")
    assert mlflow_ui_url("http://h", "3", tab="/runs/").endswith(
        "/#/experiments/3/runs?workflowType=machine_learning")
    with pytest.raises(ValueError, match="experiment id"):
        mlflow_ui_url(base, run_id="abc")
