"""`vgen submit | status --job | logs | stop` and `vgen plan --cluster` against a real two-node
Ray cluster on 127.0.0.1: a head with the dashboard (the Jobs API) and a second node joined with
``ray start --address``, each in its own process group and temp dir, stopped by signalling the
groups (other Ray instances on the machine are left alone).

The DAG lives in a temporary folder, outside the project, so the job ships the project's packages
as ``py_modules`` and the DAG as its ``working_dir``; its storage is a local folder both nodes see.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, _free_port, vgen_cmd

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"
    # the job's entrypoint is `vgen run ...`: the cluster's PATH must hold this venv's vgen, as a
    # cluster image's does
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each node's process group, then SIGKILL whatever outlived the grace period
    (the GCS and raylets do not always exit with `ray start --block`)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(dashboard URL, GCS address) of a head + one worker node, 1 CPU each."""
    tmp = tmp_path_factory.mktemp("ray2")
    env = _env()
    port, dash = _free_port(), _free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
              "--disable-usage-stats"]
    head = _start([RAY, "start", "--head", f"--port={port}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                   f"--ray-client-server-port={_free_port()}",
                   f"--dashboard-agent-listen-port={_free_port()}",
                   f"--temp-dir={tmp / 'head'}", *common], tmp / "head.log", env)
    procs = [head]
    address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    try:
        _wait(lambda: _status_ok(address, env), head, tmp / "head.log", "head")
        worker = _start([RAY, "start", f"--address={address}",
                         f"--dashboard-agent-listen-port={_free_port()}",
                         f"--temp-dir={tmp / 'worker'}", *common], tmp / "worker.log", env)
        procs.append(worker)
        _wait(lambda: _nodes(url) == 2, worker, tmp / "worker.log", "worker")
        yield url, address
    finally:
        _stop(list(reversed(procs)))


def _status_ok(address: str, env: dict) -> bool:
    return subprocess.run([RAY, "status", f"--address={address}"], capture_output=True,
                          env=env, timeout=120).returncode == 0


def _nodes(url: str) -> int:
    from pipelines.submit import ClusterError, cluster_resources

    try:
        return cluster_resources(url)["nodes"]
    except ClusterError:
        return 0


def _wait(ready, proc, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"ray {what} did not start: {log.read_text()[-3000:]}")
        time.sleep(1)


def vgen(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(vgen_cmd() + list(args), env=_env(), capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if p.returncode:
        print(p.stdout[-5000:], p.stderr[-10000:])
    return p


def make_dag(tmp: Path) -> Path:
    dag = {"name": "sub", "chunk_size": 8, "error_budget": 0.0, "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": "skimage://", "crops_per_image": 1, "size": 32}},
        "tokens": {"uses": "tokenize.fsq", "needs": ["images"],
                   "with": {"size": "tiny", "init_seed": 0, "flip": False},
                   "resources": {"batch_size": 8}},
    }}
    p = tmp / "dags" / "sub.yaml"
    p.parent.mkdir()
    p.write_text(yaml.safe_dump(dag))
    return p


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`vgen ARGS` in this process (the cheap commands; submit runs as a real subprocess)."""
    from pipelines.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_submit_wait_logs_status_stop(two_nodes, tmp_path, capsys, monkeypatch):
    from vgen_core.data import TableStore
    from vgen_core.data.sample_images import PHOTOS

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the conftest cluster's, if any
    url, gcs = two_nodes
    dag, storage = make_dag(tmp_path), tmp_path / "store"

    # the plan, annotated with the cluster: 2 nodes, 2 CPUs; one CPU stays for read tasks
    code, out, _ = cli(capsys, "plan", str(dag), "--storage", str(storage), "--cluster",
                       "--address", url, "--format", "json")
    assert code == 0
    plan = json.loads(out)
    assert (plan["cluster"]["nodes"], plan["cluster"]["CPU"], plan["cluster"]["GPU"]) == (2, 2, 0)
    tokens = next(s for s in plan["stages"] if s["stage"] == "tokens")
    assert tokens["cluster"]["mode"] == "actor_pool" and tokens["cluster"]["pool_max"] == 1

    # submit and wait: the job id on stdout's first line, then the runner's output
    p = vgen("submit", str(dag), "--address", url, "--storage", str(storage), "--wait")
    assert p.returncode == 0, p.stderr[-3000:]
    job_id = p.stdout.splitlines()[0].strip()
    assert re.fullmatch(r"vgen-sub-\d{8}-\d{6}-[0-9a-f]{6}", job_id)
    assert "[tokens] done" in p.stdout and "DAG 'sub' finished" in p.stdout
    assert f"job {job_id}: SUCCEEDED" in p.stderr

    code, out, _ = cli(capsys, "status", "--job", job_id, "--address", url, "--json")
    assert code == 0
    st = json.loads(out)
    assert st["status"] == "SUCCEEDED" and st["metadata"]["vgen.dag"] == "sub"
    assert st["entrypoint"] == f"vgen run sub.yaml --storage {storage}"
    code, out, _ = cli(capsys, "status", "--job", job_id, "--address", url)
    assert code == 0 and f"job {job_id} on {url}: SUCCEEDED" in out

    code, out, _ = cli(capsys, "logs", job_id, "--address", url)
    assert code == 0
    assert "[images] done" in out and "[tokens] done" in out

    # the tables the job wrote, read here
    store = TableStore(str(storage))
    images = store.read("sub/images", columns=["sample_id"])
    assert images.num_rows == len(PHOTOS)
    (side,) = store.list_tables("sub/tokens")
    assert sorted(store.read(side, columns=["sample_id"])["sample_id"].to_pylist()) == \
        sorted(images["sample_id"].to_pylist())

    # a GCS address works too, and stopping a finished job says so
    code, out, _ = cli(capsys, "stop", job_id, "--address", gcs)
    assert code == 0 and "already ended: SUCCEEDED" in out

    # submit without waiting, stop it, and see it STOPPED (status then exits 1)
    p = vgen("submit", str(dag), "--address", url, "--storage", str(tmp_path / "store2"))
    assert p.returncode == 0
    second = p.stdout.strip()
    code, out, _ = cli(capsys, "stop", second, "--address", url, "--wait")
    assert code == 0 and f"job {second}: STOPPED" in out
    code, out, _ = cli(capsys, "status", "--job", second, "--address", url)
    assert code == 1 and "STOPPED" in out

    # an unknown job id is a usage error naming the cluster
    code, _, err = cli(capsys, "logs", "no-such-job", "--address", url)
    assert code == 2 and "no job 'no-such-job'" in err and url in err
