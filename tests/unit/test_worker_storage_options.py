"""Ray Data read tasks get storage options without credentials (docs/scaling.md, "S3 storage"):
workers sign with their own environment or instance role (issue #16, item 5)."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pytest

from vgen_core.data import TableStore

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("AK-DRIVER", "SK-DRIVER", "TOKEN-DRIVER", "EXPLICIT-SK")


@pytest.fixture
def driver_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK-DRIVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK-DRIVER")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "TOKEN-DRIVER")


def test_worker_options_keep_settings_and_drop_credentials(driver_env: None) -> None:
    s = TableStore("s3://bucket/p", storage_options={"timeout": "10s",
                                                     "aws_secret_access_key": "EXPLICIT-SK",
                                                     "AWS_SKIP_SIGNATURE": "false"})
    assert s.storage_options["AWS_SECRET_ACCESS_KEY"] == "EXPLICIT-SK"  # the driver's own I/O
    assert s.storage_options["AWS_SESSION_TOKEN"] == "TOKEN-DRIVER"
    assert s.worker_storage_options() == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_ALLOW_HTTP": "true",
        "AWS_SKIP_SIGNATURE": "false",
        "timeout": "10s",
    }


@pytest.mark.parametrize("key", [
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "aws_token",
    "azure_storage_account_key", "azure_storage_access_key", "azure_storage_sas_token",
    "azure_client_secret", "google_service_account", "google_service_account_key",
])
def test_every_credential_option_is_dropped(tmp_path: Path, key: str) -> None:
    s = TableStore(str(tmp_path), storage_options={key: "SECRET", "timeout": "5s"})
    assert s.worker_storage_options() == {"timeout": "5s"}


def test_local_root_has_no_options(tmp_path: Path) -> None:
    assert TableStore(str(tmp_path)).worker_storage_options() == {}


def _read_delta_calls() -> list[tuple[str, int, str]]:
    """(file, line, source of the storage_options argument) of every read_delta call."""
    calls = []
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "read_delta"):
                opts = [k.value for k in node.keywords if k.arg == "storage_options"]
                calls.append((str(path.relative_to(ROOT)), node.lineno,
                              ast.unparse(opts[0]) if opts else "<none>"))
    return calls


def test_every_read_delta_call_passes_worker_options() -> None:
    calls = _read_delta_calls()
    assert len(calls) >= 5, calls  # ray_exec, reading, train, evaluate, evaluate_generation
    bad = [c for c in calls if "worker_storage_options()" not in c[2]]
    assert bad == []


def test_training_dataset_ships_no_secret(driver_env: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The options a read_delta call site passes (and that Ray pickles into its read tasks)
    contain no secret although the driver's environment holds them."""
    import ray.data

    from pipelines.stages import reading
    from pipelines.stages.base import OutputRef

    seen = {}

    class FakeDataset:
        def map_batches(self, *args, **kwargs):
            return self

    def read_delta(uri, **kwargs):
        seen["uri"], seen["options"] = uri, kwargs.get("storage_options")
        seen["pickled"] = pickle.dumps(kwargs)
        return FakeDataset()

    store = TableStore("s3://bucket/root")
    monkeypatch.setattr(ray.data, "read_delta", read_delta)
    monkeypatch.setattr(reading, "side_table_info", lambda store, side: {"rows": 1})
    monkeypatch.setattr(reading, "check_transform", lambda info, transform, where: None)
    monkeypatch.setattr(store, "read", lambda *a, **k: pa.table(
        {"sample_id": ["a"], "content_digest": ["d"]}))
    samples = OutputRef(kind="table", name="demo/images", uri=store.uri("demo/images"),
                        version=1)
    side = OutputRef(kind="table", name="demo/tokens", uri=store.uri("demo/tokens"), version=2,
                     digest="fp")
    reading.training_dataset(store, samples, side)
    assert seen["uri"] == store.uri("demo/tokens")
    assert seen["options"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                               "AWS_REGION": "eu-west-1", "AWS_ALLOW_HTTP": "true"}
    for secret in SECRETS:
        assert secret.encode() not in seen["pickled"]


# ----------------------------------------------------------------------------- against S3 (moto)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server in a child process (as in test_store.py)."""
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("moto.server", reason="moto[server] not installed")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start (exit code {proc.poll()})")
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1"
                     ).create_bucket(Bucket="bucket")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_reads_with_worker_options_sign_with_the_environment(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ray.data.read_delta does with the options (open the table on the driver, build the
    pyarrow dataset that is pickled into read tasks) works with credentials from the
    environment only, and the pickled dataset holds none."""
    from deltalake import DeltaTable

    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK-DRIVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK-DRIVER")
    store = TableStore("s3://bucket/worker-options")
    store.append("demo/rows", pa.table({"sample_id": ["a", "b"], "x": [1, 2]}))
    opts = store.worker_storage_options()
    assert "AWS_SECRET_ACCESS_KEY" not in opts and opts["AWS_ENDPOINT_URL"] == moto_endpoint
    dataset = DeltaTable(store.uri("demo/rows"), storage_options=opts).to_pyarrow_dataset()
    assert sorted(dataset.to_table()["sample_id"].to_pylist()) == ["a", "b"]
    shipped = pickle.dumps(dataset)
    assert b"SK-DRIVER" not in shipped and b"AK-DRIVER" not in shipped
    # the check can fail: the full options would have shipped the secret
    full = DeltaTable(store.uri("demo/rows"), storage_options=store.storage_options)
    assert b"SK-DRIVER" in pickle.dumps(full.to_pyarrow_dataset())
