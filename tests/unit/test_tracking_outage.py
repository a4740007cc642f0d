"""An unreachable tracking server is noticed once (a bounded probe), not on every call, and
`vgen tracking sync` replays what was recorded locally meanwhile (issue #16, item 7)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import vgen_core.tracking.mlflow_tracker as mt
from pipelines.cli import main
from vgen_core.tracking import MlflowTracker
from vgen_core.tracking.sync import sync_records

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")

N = 200  # logging calls per tracker while the server is down


def _closed_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts probes and every TCP connect this process makes to 127.0.0.1 (urllib3's included:
    MLflow's requests all go through socket.connect)."""
    counts = {"probe": 0, "connect": 0}
    real_probe, real_connect = mt._probe, socket.socket.connect

    def probe(uri: str, timeout: float = mt.PROBE_TIMEOUT_S) -> str | None:
        counts["probe"] += 1
        assert timeout <= 2.0
        return real_probe(uri, timeout)

    def connect(self: socket.socket, address: object) -> None:
        if isinstance(address, tuple) and address[0] == "127.0.0.1":
            counts["connect"] += 1
        return real_connect(self, address)

    monkeypatch.setattr(mt, "_probe", probe)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return counts


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log_many(t: MlflowTracker) -> None:
    for i in range(N):
        t.log_metrics({"loss": 1.0 / (i + 1), "lr": 0.1}, step=i)
    t.log_params({"model": {"depth": 12}, "seed": 0})
    t.set_tags({"phase": "outage"})
    t.log_image("grid", np.full((4, 4, 3), 0.5), step=3)
    t.log_text("hello", "notes/hello.txt")
    t.log_dict({"a": 1}, "cfg/a.json")
    t.log_table_input("images", "/data/images", 2, 10, "d1", "input")


def test_outage_is_probed_once_and_calls_go_local(tmp_path: Path,
                                                  counted: dict[str, int]) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    fb = tmp_path / "fallback"
    t = MlflowTracker.start(uri, "outage", "driver", fallback_dir=fb)
    assert t.offline and counted == {"probe": 1, "connect": 1}
    _log_many(t)
    child = t.child("stage")
    child.log_metrics({"x": 2.0}, step=1)
    child.finish()
    t.finish("FINISHED")
    # a worker attaching to a real run id on the same server: the outage is already known
    worker = MlflowTracker.attach(uri, "0123abcd" * 4, fallback_dir=fb)
    assert worker.client is not None  # it would log again once the server answers
    _log_many(worker)
    assert counted == {"probe": 1, "connect": 1}  # no call but the first probe touched the net
    kinds = [r["kind"] for r in _records(t.fallback_path)]
    assert kinds[0] == "start" and kinds.count("metrics") == N and kinds[-1] == "finish"
    worker_kinds = [r["kind"] for r in _records(worker.fallback_path)]
    assert worker_kinds[0] == "attach" and worker_kinds.count("metrics") == N


class _Health(BaseHTTPRequestHandler):
    """Answers 200 to everything (enough for a probe and a log-batch call)."""

    def _ok(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _ok

    def log_message(self, *args: object) -> None:
        pass


def test_probed_again_only_after_the_back_off(tmp_path: Path,
                                              counted: dict[str, int]) -> None:
    port = _closed_port()
    uri = f"http://127.0.0.1:{port}"
    worker = MlflowTracker.attach(uri, "feedbeef" * 4, fallback_dir=tmp_path)
    health = mt._health_for(uri)
    assert counted["probe"] == 1 and health.down is not None
    assert health.next_probe - time.monotonic() == pytest.approx(mt.RETRY_AFTER_S, abs=1)
    worker.log_metrics({"a": 1.0})
    assert counted["probe"] == 1  # within the back-off: no probe

    health.next_probe = time.monotonic() - 1  # the back-off has passed; still down
    worker.log_metrics({"a": 2.0})
    worker.log_metrics({"a": 3.0})
    assert counted["probe"] == 2 and health.backoff == 2 * mt.RETRY_AFTER_S

    server = ThreadingHTTPServer(("127.0.0.1", port), _Health)  # the server comes back
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        health.next_probe = time.monotonic() - 1
        worker.log_metrics({"a": 4.0})  # probe succeeds, the call goes to the server
        assert counted["probe"] == 3 and health.down is None
        worker.log_metrics({"a": 5.0})
        assert counted["probe"] == 3
    finally:
        server.shutdown()
        server.server_close()
    values = [r["data"]["metrics"]["a"] for r in _records(worker.fallback_path)
              if r["kind"] == "metrics"]
    assert values == [1.0, 2.0, 3.0]  # 4 and 5 went to the server


def test_sync_replays_the_records_into_a_store(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    fb = tmp_path / "fallback"
    t = MlflowTracker.start(uri, "outage-sync", "driver", fallback_dir=fb,
                            tags={"vgen.dag": "demo"})
    _log_many(t)
    child = t.child("stage")
    child.log_metrics({"x": 2.0}, step=1)
    child.finish()
    t.finish("FINISHED")
    worker = MlflowTracker.attach(uri, "0123abcd" * 4, fallback_dir=fb)
    worker.log_metrics({"loss": 0.25}, step=7)

    target = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = sync_records(target, fb)
    assert result.ok, result.failed
    assert result.files == 3 and len(result.created) == 3
    assert result.skipped == []
    client = MlflowClient(tracking_uri=target)
    run = client.get_run(result.runs[t.run_id])
    assert run.info.run_name == "driver" and run.info.status == "FINISHED"
    assert run.data.tags["vgen.synced_from"] == t.run_id and run.data.tags["vgen.dag"] == "demo"
    assert run.data.params == {"model.depth": "12", "seed": "0"}
    assert run.data.tags["phase"] == "outage"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(i, 1.0 / (i + 1)) for i in range(N)]
    assert len(client.get_metric_history(run.info.run_id, "lr")) == N
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "outage-sync"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"notes", "cfg", "images"} <= artifacts  # the stepped image went to images/
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "cfg/a.json",
                                                     str(tmp_path / "dl"))).read_text()) == {"a": 1}
    (ds,) = run.inputs.dataset_inputs
    assert json.loads(ds.dataset.source) == {"path": "/data/images", "delta_table_version": 2}

    child_run = client.get_run(result.runs[child.run_id])
    assert child_run.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert child_run.info.experiment_id == run.info.experiment_id
    assert [(m.step, m.value) for m in client.get_metric_history(child_run.info.run_id, "x")] \
        == [(1, 2.0)]
    worker_run = client.get_run(result.runs[worker.run_id])  # unknown there: a new run
    assert worker_run.info.experiment_id != run.info.experiment_id  # vgen-offline
    assert [(m.step, m.value) for m in client.get_metric_history(worker_run.info.run_id, "loss")] \
        == [(7, 0.25)]

    # replayed files are renamed: a second sync replays nothing twice
    assert sorted(p.name for p in fb.glob("*.jsonl")) == []
    again = sync_records(target, fb)
    assert again.files == 0 and again.records == 0
    assert len(client.get_metric_history(run.info.run_id, "loss")) == N


def test_sync_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fb = tmp_path / "fallback"
    t = MlflowTracker.start(f"http://127.0.0.1:{_closed_port()}", "cli", "r", fallback_dir=fb)
    t.log_metrics({"m": 1.0}, step=2)
    t.finish()
    dead = f"http://u:pw@127.0.0.1:{_closed_port()}"
    assert main(["tracking", "sync", "--tracking-uri", dead, "--records", str(fb)]) == 2
    err = capsys.readouterr().err
    assert "is unreachable" in err and "pw" not in err and "***@127.0.0.1" in err
    assert len(list(fb.glob("*.jsonl"))) == 1  # nothing replayed, nothing renamed

    root = tmp_path / "root"
    assert main(["tracking", "sync", "--storage", str(root), "--records", str(fb),
                 "--tracking-uri", ""]) == 0
    out = capsys.readouterr().out
    assert f"replayed 2 record(s) from 1 file(s) in {fb} into sqlite:///{root}/mlflow.db" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.data.metrics == {"m": 1.0} and run.info.status == "FINISHED"
