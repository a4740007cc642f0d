"""The tracking sidecar: `vgen run`'s MLflow runs logged from a child process, with the same
records as an in-process `MlflowTracker`, errors raised in the caller, warnings re-logged in the
driver, a takeover when the child dies, and KILLED runs when the driver dies."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from vgen_core.tracking import default_tracking_uri, register_model
from vgen_core.tracking.sidecar import SidecarTracker, TrackingSidecar, sidecar_enabled

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return default_tracking_uri(str(tmp_path_factory.mktemp("sidecar-storage")))


def _start(sidecar: TrackingSidecar, store: str, name: str, tmp_path: Path) -> SidecarTracker:
    return sidecar.start(store, "sidecar", name, tags={"suite": "unit"},
                         fallback_dir=tmp_path / "fallback")


def test_records_land_in_mlflow_as_logged(store: str, tmp_path: Path) -> None:
    sidecar = TrackingSidecar.spawn()
    t = _start(sidecar, store, "records", tmp_path)
    assert t.known_run_id is None  # the child is still importing mlflow: nothing waited for
    before_ms = int(time.time() * 1000)
    t.log_params({"model": {"depth": 12, "api_key": "hunter2"}, "lr": 1e-4})
    t.log_metrics({"loss": 0.5}, step=3)
    t.log_metrics({"loss": 0.25}, step=4)
    t.set_tags({"vgen.stage": "demo", "n": 7})
    child = t.child("stage-a")
    child.log_metrics({"processed": 20})
    child.log_table_input("images.table", "/data/images", 4, 100, "d" * 16, "output")
    child.log_dict({"a": [1, 2]}, "info/a.json")
    child.log_text("hello", "info/hello.txt")
    child.log_image("grid", np.full((4, 6, 3), 0.5, np.float32))
    child.finish("FINISHED")
    t.finish("FAILED")
    run_id, child_id = t.run_id, child.run_id  # these wait for the child process
    assert t.known_run_id == run_id
    sidecar.close()

    c = MlflowClient(store)
    run = c.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params == {"model.depth": "12", "model.api_key": "***", "lr": "0.0001"}
    assert run.data.tags["vgen.stage"] == "demo" and run.data.tags["n"] == "7"
    assert run.data.tags["suite"] == "unit"
    hist = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "loss"))
    assert hist == [(3, 0.5), (4, 0.25)]
    # timestamps are the driver's call times, not when the child got to them
    assert all(before_ms <= m.timestamp <= before_ms + 5000
               for m in c.get_metric_history(run_id, "loss"))
    kid = c.get_run(child_id)
    assert kid.info.status == "FINISHED"
    assert kid.data.tags["mlflow.parentRunId"] == run_id
    assert kid.data.metrics == {"processed": 20.0}
    (ds,) = kid.inputs.dataset_inputs
    assert ds.dataset.name == "images.table" and ds.tags[0].value == "output"
    arts = {a.path for a in c.list_artifacts(child_id)} | {
        a.path for a in c.list_artifacts(child_id, "info")}
    assert {"grid.png", "info/a.json", "info/hello.txt"} <= arts


def test_bad_arguments_raise_in_the_caller(store: str, tmp_path: Path) -> None:
    sidecar = TrackingSidecar.spawn()
    t = _start(sidecar, store, "bad-args", tmp_path)
    with pytest.raises(ValueError, match="metric 'loss'.*not a number"):
        t.log_metrics({"loss": "abc"})
    with pytest.raises(ValueError, match="status must be one of"):
        t.finish("DONE")
    with pytest.raises(ValueError):
        t.log_image("x", np.zeros((2, 2, 2, 2)))
    t.finish()
    sidecar.close()
    assert MlflowClient(store).get_run(t.run_id).info.status == "FINISHED"


def test_child_warnings_are_logged_in_the_driver(store: str, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    sidecar = TrackingSidecar.spawn()
    # the experiment exists with the store's own artifact location: asking for another one is
    # refused with a warning, logged in the child and re-logged here under its logger's name
    sidecar.start(store, "sidecar", "warn", artifact_location=str(tmp_path / "elsewhere"),
                  fallback_dir=tmp_path / "fallback").finish()
    with caplog.at_level(logging.WARNING, logger="vgen_core.tracking.mlflow_tracker"):
        sidecar.close()
    msgs = [r.getMessage() for r in caplog.records
            if r.name == "vgen_core.tracking.mlflow_tracker"]
    assert any("keeps the artifact location it was created with" in m for m in msgs), msgs


def test_a_killed_child_is_taken_over_without_losing_records(
        store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sidecar = TrackingSidecar.spawn()
    t = _start(sidecar, store, "takeover", tmp_path)
    t.log_params({"before": 1})
    run_id = t.run_id  # the run exists in the child
    child = t.child("stage")
    child_id = child.run_id
    done = t.child("finished-before")
    done.finish()
    sidecar.request("run_id", 1, None, wait=True)  # in order: the finish above is applied
    with caplog.at_level(logging.WARNING, logger="vgen_core.tracking.sidecar"):
        sidecar._proc.kill()
        sidecar._proc.wait()
        t.log_metrics({"after": 2.0}, step=1)  # queued to a dead child, or applied here
        child.log_metrics({"child_after": 3.0})
        child.finish()
        t.finish()
        assert t.run_id == run_id and child.run_id == child_id
        sidecar.close()
    assert any("tracking process exited" in r.getMessage() for r in caplog.records)
    c = MlflowClient(store)
    run = c.get_run(run_id)
    assert run.data.params == {"before": "1"}
    assert run.data.metrics == {"after": 2.0}
    assert run.info.status == "FINISHED"
    kid = c.get_run(child_id)
    assert kid.data.metrics == {"child_after": 3.0} and kid.info.status == "FINISHED"
    assert c.get_run(done.run_id).info.status == "FINISHED"  # not reopened as RUNNING


def test_a_driver_that_dies_leaves_its_runs_killed(store: str, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os
        from vgen_core.tracking.sidecar import TrackingSidecar
        s = TrackingSidecar.spawn()
        t = s.start({store!r}, "sidecar", "dies", fallback_dir={str(tmp_path / "fb")!r})
        t.log_params({{"x": 1}})
        print(t.run_id, t.child("stage").run_id, flush=True)
        os._exit(3)  # no close, no finish: a SIGKILLed driver
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 3, out.stderr
    run_id, child_id = out.stdout.split()
    c = MlflowClient(store)
    deadline = time.time() + 60
    while time.time() < deadline and c.get_run(child_id).info.status == "RUNNING":
        time.sleep(0.2)
    assert c.get_run(run_id).info.status == "KILLED"
    assert c.get_run(child_id).info.status == "KILLED"
    assert c.get_run(run_id).data.params == {"x": "1"}


def test_register_model_through_the_child(store: str, tmp_path: Path) -> None:
    weights = tmp_path / "export"
    weights.mkdir()
    (weights / "config.json").write_text('{"family": "demo"}')
    sidecar = TrackingSidecar.spawn()
    t = _start(sidecar, store, "registry", tmp_path)
    assert register_model(t, "sidecar.demo", weights, tags={"vgen.digest": "abc"}) == 1
    assert register_model(t, "sidecar.demo", weights) == 2  # the files go to model-2
    t.finish()
    sidecar.close()
    c = MlflowClient(store)
    v1 = c.get_model_version("sidecar.demo", "1")
    assert v1.run_id == t.run_id and v1.tags["vgen.digest"] == "abc"
    assert {a.path for a in c.list_artifacts(t.run_id)} >= {"model", "model-2"}


def test_reattach_and_unknown_runs(store: str, tmp_path: Path) -> None:
    sidecar = TrackingSidecar.spawn()
    t = _start(sidecar, store, "reattach", tmp_path)
    first = t.child("attempt-1")
    first_id = first.run_id
    again = t.reattach(first_id)
    assert again is not None and again.run_id == first_id
    again.log_metrics({"resumed": 1.0})
    again.finish()
    assert t.reattach("0" * 32) is None  # not a run of this store
    t.finish()
    sidecar.close()
    run = MlflowClient(store).get_run(first_id)
    assert run.data.metrics == {"resumed": 1.0} and run.info.status == "FINISHED"


def test_close_without_a_run_does_not_wait_for_mlflow(tmp_path: Path) -> None:
    sidecar = TrackingSidecar.spawn()
    t0 = time.perf_counter()
    sidecar.close()  # an invalid DAG: nothing was started
    assert sidecar._proc.poll() is not None
    assert time.perf_counter() - t0 < 1.0


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VGEN_TRACKING_SIDECAR", raising=False)
    assert sidecar_enabled()
    for off in ("0", "false", "No", "off"):
        monkeypatch.setenv("VGEN_TRACKING_SIDECAR", off)
        assert not sidecar_enabled()


def test_vgen_run_never_imports_mlflow_in_the_driver(tmp_path: Path) -> None:
    """The whole point: the driver of `vgen run` leaves mlflow to the child, and the run is in
    MLflow when the command returns."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_source_incremental import write_png

    for i in range(3):
        write_png(tmp_path / "imgs" / f"a{i}.png", seed=i)
    dag = tmp_path / "dag.yaml"
    dag.write_text(textwrap.dedent(f"""
        name: side
        storage: {tmp_path / "store"}
        stages:
          images:
            uses: ingest.images
            with: {{root: {tmp_path / "imgs"}, size: 16, crops_per_image: 1}}
    """))
    code = ("import sys; from pipelines.cli import main; rc = main(['run', sys.argv[1]]); "
            "print('RC', rc, 'mlflow' in sys.modules)")
    env = {**os.environ, "VGEN_IN_PROCESS_ROWS": "512", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    out = subprocess.run([sys.executable, "-c", code, str(dag)], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert "RC 0 False" in out.stdout, out.stdout + out.stderr
    c = MlflowClient(default_tracking_uri(str(tmp_path / "store")))
    exp = c.get_experiment_by_name("side")
    runs = {r.info.run_name: r for r in c.search_runs([exp.experiment_id])}
    assert set(runs) == {"side", "images"}
    assert runs["images"].data.metrics["processed"] == 3.0
    assert all(r.info.status == "FINISHED" for r in runs.values())


def test_close_on_an_error_ends_unfinished_runs_and_refuses_more(store: str,
                                                                 tmp_path: Path) -> None:
    sidecar = TrackingSidecar.spawn()
    t = _start(sidecar, store, "interrupted", tmp_path)
    done, open_ = t.child("done"), t.child("open")
    done.finish()
    sidecar.close(unfinished="KILLED")  # `vgen run` interrupted mid-stage
    c = MlflowClient(store)
    assert c.get_run(t.run_id).info.status == "KILLED"
    assert c.get_run(open_.run_id).info.status == "KILLED"
    assert c.get_run(done.run_id).info.status == "FINISHED"
    with pytest.raises(RuntimeError, match="after the tracking process was closed"):
        t.log_metrics({"late": 1.0})


def test_a_takeover_that_fails_leaves_the_run_untracked_not_hung(
        store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from vgen_core.tracking import sidecar as sidecar_mod

    sidecar = TrackingSidecar.spawn()
    t = _start(sidecar, store, "no-takeover", tmp_path)

    def broken() -> None:
        raise ImportError("mlflow is broken here too")

    monkeypatch.setattr(sidecar_mod, "_Server", broken)
    with caplog.at_level(logging.WARNING, logger="vgen_core.tracking.sidecar"):
        sidecar._proc.kill()
        sidecar._proc.wait()
        child = t.child("later")  # queued, then dropped: no exception, no hang
        assert child.run_id is None  # never created: untracked, not an error
        t.log_metrics({"x": 1.0})
        t.finish()
        sidecar.close(timeout=30)
    assert any("not tracked from here on" in r.getMessage() for r in caplog.records)
