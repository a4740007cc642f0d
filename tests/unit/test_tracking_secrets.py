"""Secrets stay secret: redaction of URIs and configs, and every place vgen prints, logs, sends to
MLflow or writes a fallback record (issue #16, item 5)."""

from __future__ import annotations

import json
import logging
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.dag.spec import parse_dag
from vgen_core.tracking import MlflowTracker, default_tracking_uri
from vgen_core.tracking.redact import is_secret_key, redact_config, redact_text, redact_uri

TRACKING_LOGGER = "vgen_core.tracking.mlflow_tracker"
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the helper


@pytest.mark.parametrize(("uri", "expected"), [
    ("http://user:secret@mlflow.example.com:5000/prefix",
     "http://***@mlflow.example.com:5000/prefix"),
    ("https://token@mlflow.example.com/", "https://***@mlflow.example.com/"),
    ("http://user:p@ss@host:5000", "http://***@host:5000"),  # an unescaped '@' in the password
    ("postgresql://vgen:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=abc%2Fdef&se=x",
     "https://acct.blob.core.windows.net/c?sv=2022&sig=***&se=x"),
    ("https://host/x?token=t0k&page=2", "https://host/x?token=***&page=2"),
    # nothing secret: unchanged
    ("http://mlflow:5000", "http://mlflow:5000"),
    ("sqlite:////tmp/root/mlflow.db", "sqlite:////tmp/root/mlflow.db"),
    ("s3://bucket/vgen", "s3://bucket/vgen"),
    ("https://host/x?page=2&size=10", "https://host/x?page=2&size=10"),
    ("databricks", "databricks"),
    # a DAG's template names variables, holds no value: kept; a default could be a literal
    ("http://${MLF_USER}:${MLF_PASS}@mlflow:5000", "http://${MLF_USER}:${MLF_PASS}@mlflow:5000"),
    ("http://${MLF_USER}:${MLF_PASS:-changeme}@mlflow:5000", "http://***@mlflow:5000"),
])
def test_redact_uri_exact(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_redact_uri_none_and_text() -> None:
    assert redact_uri(None) is None
    msg = ("API request to http://alice:s3cr3t@127.0.0.1:9/api/2.0/mlflow/runs/create failed "
           "(HTTPConnectionPool(host='127.0.0.1', port=9)); mail ops@example.com")
    assert redact_text(msg) == (
        "API request to http://***@127.0.0.1:9/api/2.0/mlflow/runs/create failed "
        "(HTTPConnectionPool(host='127.0.0.1', port=9)); mail ops@example.com")


@pytest.mark.parametrize("key", [
    "password", "db_password", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "hf_token",
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "api_key", "apiKey",
    "client_secret", "credentials", "creds", "Authorization", "private_key",
])
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", [
    # model and stage fields that merely mention tokens or keys
    "keys", "key", "key_map", "key_bias", "token_dim", "token_bits", "token_size", "num_tokens",
    "tokens_per_sample", "num_latent_tokens", "storage", "tracking", "root", "sigma",
])
def test_ordinary_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_config_exact() -> None:
    config = {
        "tracking": "http://alice:s3cr3t@mlflow:5000",
        "storage": "/data/root",
        "stages": {"images": {"with": {
            "root": "/data/imgs",
            "password": "hunter2",
            "credentials": {"user": "u", "port": 22},
            "num_tokens": 256,
            "urls": ["http://a:b@h/x", "s3://b/k"],
        }}},
        "loss_per_token": 0.5,  # a number is never masked
    }
    substituted = {("stages", "images", "with", "root"): "${IMAGES_ROOT}"}
    assert redact_config(config, substituted) == {
        "tracking": "http://***@mlflow:5000",
        "storage": "/data/root",
        "stages": {"images": {"with": {
            "root": "${IMAGES_ROOT}",
            "password": "***",
            "credentials": {"user": "***", "port": 22},
            "num_tokens": 256,
            "urls": ["http://***@h/x", "s3://b/k"],
        }}},
        "loss_per_token": 0.5,
    }
    assert config["tracking"] == "http://alice:s3cr3t@mlflow:5000"  # the input is not modified


# ----------------------------------------------------------------------------- the DAG


def _dag(**overrides):
    data = {"name": "t", "storage": "/tmp/vgen-secrets",
            "tracking": "http://${MLF_USER}:${MLF_PASS}@mlflow:5000",
            "stages": {"images": {"uses": "ingest.images",
                                  "with": {"root": "${MY_IMAGES:-skimage://}"}}}}
    return parse_dag(data, "dag.yaml", **overrides)


def test_resolved_dag_shows_templates_not_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLF_USER", "alice")
    monkeypatch.setenv("MLF_PASS", "s3cr3t")
    monkeypatch.setenv("MY_IMAGES", "/data/imgs")
    dag = _dag()
    assert dag.spec.tracking == "http://alice:s3cr3t@mlflow:5000"  # what the run uses
    assert dag.configs["images"].root == "/data/imgs"
    resolved = dag.resolved()  # what MLflow records
    assert resolved["tracking"] == "http://${MLF_USER}:${MLF_PASS}@mlflow:5000"
    assert resolved["stages"]["images"]["with"]["root"] == "${MY_IMAGES:-skimage://}"
    assert resolved["storage"] == "/tmp/vgen-secrets"
    assert "s3cr3t" not in json.dumps(resolved)
    assert dag.stage_config("images")["root"] == "${MY_IMAGES:-skimage://}"
    assert dag.resolved(redact=False)["tracking"] == "http://alice:s3cr3t@mlflow:5000"


def test_cli_override_is_redacted_as_a_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    dag = _dag(tracking="http://bob:pw@mlflow:5000")  # --tracking-uri: not a ${VAR}
    assert dag.spec.tracking == "http://bob:pw@mlflow:5000"
    assert dag.resolved()["tracking"] == "http://***@mlflow:5000"


# ----------------------------------------------------------------------------- MLflow and records


def test_params_and_tags_in_mlflow_are_redacted(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLF_USER", "alice")
    monkeypatch.setenv("MLF_PASS", "s3cr3t")
    uri = default_tracking_uri(str(tmp_path / "root"))
    t = MlflowTracker.start(uri, "secrets", "run", fallback_dir=tmp_path / "fb",
                            tags={"api_token": "tok123"})
    assert not t.offline
    t.log_params(_dag().resolved())
    t.log_params({"db": {"password": "hunter2"}, "endpoint": "http://a:b@host/x"})
    t.set_tags({"vgen.storage": "http://u:v@host/root", "hf_token": "hf_abc", "plain": "x"})
    t.finish()
    run = t.client.get_run(t.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["tracking"] == "http://${MLF_USER}:${MLF_PASS}@mlflow:5000"
    assert params["stages.images.with.root"] == "${MY_IMAGES:-skimage://}"
    assert params["db.password"] == "***" and params["endpoint"] == "http://***@host/x"
    assert tags["vgen.storage"] == "http://***@host/root" and tags["hf_token"] == "***"
    assert tags["api_token"] == "***" and tags["plain"] == "x"
    everything = json.dumps([params, tags])
    for secret in ("s3cr3t", "hunter2", "tok123", "hf_abc", "u:v@", "a:b@"):
        assert secret not in everything


def test_fallback_records_warnings_and_repr_hold_no_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _closed_port()
    uri = f"http://alice:s3cr3t@127.0.0.1:{port}"
    fb = tmp_path / "fallback"
    with caplog.at_level(logging.DEBUG, logger=TRACKING_LOGGER):
        t = MlflowTracker.start(uri, "secrets", "down", fallback_dir=fb,
                                tags={"MLFLOW_TRACKING_PASSWORD": "pw"})
        t.log_params({"password": "hunter2", "lr": 0.1, "uri": uri})
        t.set_tags({"note": f"see {uri}/x"})
        t.log_metrics({"loss_per_token": 1.5})
        t.finish()
    assert t.offline
    text = t.fallback_path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert records[0]["kind"] == "start"
    assert records[0]["data"]["tracking_uri"] == f"http://***@127.0.0.1:{port}"
    assert records[0]["data"]["tags"] == {"MLFLOW_TRACKING_PASSWORD": "***"}
    assert records[1]["data"] == {"password": "***", "lr": "0.1",
                                  "uri": f"http://***@127.0.0.1:{port}"}
    assert records[2]["data"] == {"note": f"see http://***@127.0.0.1:{port}/x"}
    assert records[3]["data"] == {"metrics": {"loss_per_token": 1.5}, "step": None}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"http://***@127.0.0.1:{port}" in logged
    for where in (text, logged, repr(t)):
        assert "s3cr3t" not in where and "hunter2" not in where and "alice" not in where
    assert repr(t).startswith(f"MlflowTracker(run_id='{t.run_id}', "
                              f"tracking_uri='http://***@127.0.0.1:{port}', offline)")
    # private files: 0600 in a 0700 directory
    assert stat.S_IMODE(t.fallback_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(fb.stat().st_mode) == 0o700


def test_an_older_world_readable_record_is_made_private(tmp_path: Path) -> None:
    fb = tmp_path / "fallback"
    fb.mkdir(mode=0o755)
    fb.chmod(0o755)
    t = MlflowTracker.start(f"http://127.0.0.1:{_closed_port()}", "x", "y", fallback_dir=fb)
    t.fallback_path.chmod(0o644)
    t.log_metrics({"a": 1.0})
    assert stat.S_IMODE(t.fallback_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(fb.stat().st_mode) == 0o700


# ----------------------------------------------------------------------------- what vgen prints


def test_run_summary_prints_no_password(capsys: pytest.CaptureFixture) -> None:
    from pipelines.cli import _print_summary

    outcome = SimpleNamespace(stage="images", action="failed", outputs={}, seconds=1.0, metrics={},
                              counts=SimpleNamespace(processed=0, skipped=0, quarantined=0,
                                                     filtered=0),
                              error="MlflowException: http://bob:pw@mlflow:5000 refused")
    summary = SimpleNamespace(dag="t", seconds=1.0, ok=False, outcomes={"images": outcome},
                              tracking_uri="http://bob:pw@mlflow:5000", run_id="r1")
    _print_summary(summary, SimpleNamespace(root="/tmp/root"))
    out = capsys.readouterr().out
    assert "MLflow: http://***@mlflow:5000  run r1\n" in out
    assert "  error: MlflowException: http://***@mlflow:5000 refused\n" in out
    assert "pw@" not in out and "bob" not in out


def test_stage_params_show_templates_not_env_values(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stage's nested MLflow run records its config as written (``${VAR}`` templates,
    redacted), never a value the environment filled in."""
    import numpy as np
    from PIL import Image

    from pipelines.dag.runner import Runner
    from vgen_core.data import TableStore

    secret_dir = tmp_path / "s3cr3t-tok"
    secret_dir.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(secret_dir / "a.png")
    monkeypatch.setenv("IMG_ROOT", str(secret_dir))
    dag = parse_dag({"name": "sec", "stages": {"images": {
        "uses": "ingest.images",
        "with": {"root": "${IMG_ROOT}", "crops_per_image": 1, "size": 8}}}},
        str(tmp_path / "dag.yaml"), storage=str(tmp_path / "store"))
    assert dag.configs["images"].root == str(secret_dir)  # what the stage reads
    uri = default_tracking_uri(str(tmp_path / "store"))
    tracker = MlflowTracker.start(uri, "sec", "run", fallback_dir=tmp_path / "fb")
    summary = Runner(dag, TableStore(str(tmp_path / "store")), tracker, uri,
                     executor="local").run()
    assert summary.ok and summary.outcomes["images"].counts.processed == 1
    client = tracker.client
    runs = client.search_runs([client.get_run(tracker.run_id).info.experiment_id])
    [child] = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tracker.run_id]
    assert child.data.params["stage.config.root"] == "${IMG_ROOT}"
    assert child.data.params["stage.config.crops_per_image"] == "1"
    for r in runs:
        assert "s3cr3t" not in json.dumps([r.data.params, r.data.tags]), r.info.run_id
