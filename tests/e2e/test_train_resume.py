"""Train-stage fault tolerance on a real local Ray cluster (ingest -> train.tokenizer, 2 workers,
DeepSpeed ZeRO-2 on gloo):

1. a Ray Train worker (rank 0, the one writing to MLflow) is SIGKILLed after a checkpoint: Ray
   Train restarts the worker group from that checkpoint (FailureConfig);
2. later the driver itself is SIGKILLed; `vgen run` again continues the same Ray Train run from
   its latest checkpoint and the same MLflow run;
3. the stage ends at `steps` with two restores, and the MLflow run holds exactly one entry per
   step under the one run id the stage records name, registered in the model registry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import yaml

from tests.conftest import ROOT, vgen_cmd
from vgen_core.data import TableStore
from vgen_core.data.sample_images import export_photos

STEPS, EVERY = 120, 20


def make_dag(tmp: Path, images: Path) -> Path:
    dag = {
        "name": "resume",
        "stages": {
            "images": {"uses": "ingest.images",
                       "with": {"root": str(images), "crops_per_image": 4, "size": 32}},
            "tokenizer": {
                "uses": "train.tokenizer", "needs": ["images"],
                "with": {"model": "lfq", "size": "tiny",
                         "train": {"steps": STEPS, "micro_batch_size": 4, "lr": 2.0e-3,
                                   "zero_stage": 2, "log_every": 1, "checkpoint_every": EVERY,
                                   "ema_decay": 0.9, "max_failures": 2}},
                "resources": {"workers": 2, "cpus": 1},
            },
        },
    }
    p = tmp / "resume.yaml"
    p.write_text(yaml.safe_dump(dag))
    return p


def latest_checkpoint_step(storage: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered (0: none yet)."""
    best = 0
    for snap in (storage / "ray_train").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being rewritten
            continue
        best = max(best, int((latest.get("metrics") or {}).get("step", 0)))
    return best


def rank0_pids(log: Path) -> list[int]:
    """Rank-0 worker pids in the order Ray Train started worker groups (from the driver log)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(p) for p in re.findall(r"pid=(\d+)\) world_rank=0,", text)]


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kill_worker(pid: int) -> None:
    import psutil

    cmd = " ".join(psutil.Process(pid).cmdline())
    assert "RayTrainWorker" in cmd, f"pid {pid} is not a Ray Train worker: {cmd!r}"
    os.kill(pid, signal.SIGKILL)


def test_worker_and_driver_kills_resume_from_checkpoints(ray_cluster, tmp_path):
    images = tmp_path / "images"
    export_photos(images)
    dag, storage = make_dag(tmp_path, images), tmp_path / "store"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    log = tmp_path / "run1.err"
    with open(log, "w") as err:
        # --verbose: the workers' lines (pids, restores) stream to stderr, not only the run log
        proc = subprocess.Popen(vgen_cmd() + ["run", str(dag), "--storage", str(storage),
                                              "--verbose"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        # 1. a checkpoint exists: SIGKILL rank 0 mid-run
        first = wait_for(lambda: latest_checkpoint_step(storage), proc, "a first checkpoint")
        kill_worker(rank0_pids(log)[0])
        # Ray Train starts a new worker group, which restores and checkpoints further
        restored = int(wait_for(lambda: re.search(r"resumed from the checkpoint at step (\d+)",
                                                  log.read_text(errors="replace")),
                                proc, "the restarted worker group's restore").group(1))
        assert restored >= first
        second = wait_for(lambda: (s := latest_checkpoint_step(storage)) > restored and s,
                          proc, "a checkpoint of the restarted group")
        assert second < STEPS, "training finished before the driver could be killed"
        # 2. SIGKILL the driver (its whole process group); Ray ends the job's actors
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    p = subprocess.run(vgen_cmd() + ["run", str(dag), "--storage", str(storage)], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-8000:]
    assert "[images] up-to-date: skipped" in p.stderr
    assert "[tokenizer] partial" in p.stderr

    # 3. one stage, one MLflow run, one entry per step, two restores
    store = TableStore(str(storage))
    recs = [r for r in store.read("_vgen/stage_runs").to_pylist() if r["stage"] == "tokenizer"]
    assert [r["status"] for r in sorted(recs, key=lambda r: r["recorded_at"])] == \
        ["started", "started", "completed"]
    run_ids = {r["mlflow_run_id"] for r in recs}
    assert len(run_ids) == 1, run_ids
    (run_id,) = run_ids
    assert f"continues MLflow run {run_id}" in p.stderr

    outputs = json.loads(next(r["outputs"] for r in recs if r["status"] == "completed"))
    summary_path = Path(outputs["tokenizer"]["uri"]) / "train_summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary["step"] == STEPS and summary["restores"] == 2, summary
    assert summary["resumed_from"] >= second and summary["resumed_from"] % EVERY == 0, summary
    assert summary["ema"] is True

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("resume")
    stage_runs = [r for r in client.search_runs([exp.experiment_id])
                  if r.data.tags.get("vgen.stage") == "tokenizer"]
    assert [r.info.run_id for r in stage_runs] == [run_id]
    assert stage_runs[0].info.status == "FINISHED"
    assert stage_runs[0].data.metrics["resume.restores"] == 2
    for key in ("train/loss", "train/lr", "train/samples_per_second"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, STEPS + 1)), (key, steps)
    versions = client.search_model_versions("name = 'resume.tokenizer'")
    assert [v.run_id for v in versions] == [run_id]
