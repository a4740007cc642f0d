"""`vgen submit | logs | stop | status --job | plan --cluster` without a cluster: argument parsing,
the runtime_env and entrypoint a submission is built from, and the errors for addresses that are
unreachable, not a Ray dashboard, or need a token. The real round trip is tests/e2e/test_submit.py.
"""

from __future__ import annotations

import http.server
import json
import shlex
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser, main
from pipelines.dag.spec import DagError, load_dag, parse_dag
from pipelines.submit import (DEFAULT_EXCLUDES, LARGE_FILE_BYTES, PACKAGES, ClusterError,
                              build_submission, exit_code_for, project_root, resolve_address,
                              stage_allocations)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "configs" / "demo.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_dag(folder: Path, name: str = "tiny.yaml", storage: str | None = None) -> Path:
    data = {"name": "tiny", "stages": {"images": {"uses": "ingest.images"}}}
    if storage:
        data["storage"] = storage
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(yaml.safe_dump(data))
    return p


def fake_project(tmp: Path) -> Path:
    root = tmp / "proj"
    for pkg in PACKAGES:
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return root


@pytest.fixture
def no_env_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------


def test_submit_arguments_parse(monkeypatch):
    monkeypatch.delenv("VGEN_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = build_parser().parse_args(["submit", "d.yaml", "--address", "http://h:8265", "--wait",
                                   "--storage", "s3://b/p", "--env", "A=1", "--env", "B",
                                   "--code", "modules"])
    assert (a.command, a.dag, a.address, a.wait, a.storage, a.env, a.code) == \
        ("submit", "d.yaml", "http://h:8265", True, "s3://b/p", ["A=1", "B"], "modules")
    assert a.tracking_uri is None and a.runtime_env is None and not a.dry_run
    a = build_parser().parse_args(["logs", "job1", "--address", "http://h:8265", "-f"])
    assert (a.command, a.job, a.follow) == ("logs", "job1", True)
    a = build_parser().parse_args(["stop", "job1", "--wait"])
    assert (a.command, a.job, a.wait, a.address) == ("stop", "job1", True, None)
    a = build_parser().parse_args(["status", "--job", "job1", "--address", "http://h:8265"])
    assert (a.dag, a.job) == (None, "job1")
    a = build_parser().parse_args(["status", "d.yaml", "--json"])  # unchanged form
    assert (a.dag, a.job, a.json) == ("d.yaml", None, True)
    a = build_parser().parse_args(["plan", "d.yaml", "--cluster", "--address", "h:6379"])
    assert a.cluster and a.address == "h:6379"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["submit"])  # no DAG
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["submit", str(DEMO), "--code", "everything"])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["status"]) == 2
    assert "--job ID" in capsys.readouterr().err


def test_help_lists_the_cluster_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("submit", "logs", "stop"):
        assert cmd in out


def test_exit_codes_follow_the_job():
    assert [exit_code_for(s) for s in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")] \
        == [0, 0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------
# what a submission is made of
# ---------------------------------------------------------------------------------------------


def test_project_mode_ships_the_project_root():
    plan = build_submission(DEMO, storage="s3://bucket/vgen", tracking_uri="http://mlflow:5000",
                            submission_id="job-1")
    assert plan.code == "project" and project_root() == ROOT
    env = plan.runtime_env
    assert env["working_dir"] == str(ROOT) and "py_modules" not in env and "pip" not in env
    assert set(DEFAULT_EXCLUDES) <= set(env["excludes"])
    assert {".git", ".venv", "__pycache__", ".vgen-demo", ".cache"} <= set(env["excludes"])
    assert env["env_vars"] == {"VGEN_STORAGE": "s3://bucket/vgen",
                               "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert plan.entrypoint == ("vgen run pipelines/configs/demo.yaml --storage s3://bucket/vgen "
                               "--tracking-uri http://mlflow:5000")
    assert plan.submission_id == "job-1" and plan.metadata["vgen.dag"] == "demo"
    assert plan.staging is None
    # the entrypoint is a valid `vgen run` whose DAG path is relative to the working_dir
    argv = shlex.split(plan.entrypoint)
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and (ROOT / args.dag).resolve() == DEMO.resolve()
    assert args.storage == "s3://bucket/vgen" and args.tracking_uri == "http://mlflow:5000"


def test_large_files_are_left_out_and_excluded_folders_never_walked(tmp_path):
    root = fake_project(tmp_path)
    dag = tiny_dag(root / "dags", storage="s3://b/p")
    (root / "data").mkdir()
    with open(root / "data" / "weights.bin", "wb") as f:
        f.truncate(LARGE_FILE_BYTES)  # sparse: 10 MiB logical, nothing on disk
    (root / "data" / "small.txt").write_text("x")
    (root / ".venv" / "lib").mkdir(parents=True)
    with open(root / ".venv" / "lib" / "huge.so", "wb") as f:
        f.truncate(LARGE_FILE_BYTES * 10)
    plan = build_submission(dag, root=root, tracking_uri="sqlite:////tmp/m.db")
    assert plan.code == "project" and plan.entrypoint == "vgen run dags/tiny.yaml --tracking-uri " \
        "sqlite:////tmp/m.db"
    assert plan.excluded_large == ["data/weights.bin"]
    assert "/data/weights.bin" in plan.runtime_env["excludes"]
    assert any("left out 1 file" in n and "data/weights.bin" in n for n in plan.notes)


def test_dag_outside_the_project_ships_packages_as_py_modules(tmp_path):
    dag = tiny_dag(tmp_path / "elsewhere", "my-dag.yaml")
    plan = build_submission(dag, storage=str(tmp_path / "store"))
    try:
        assert plan.code == "modules"
        env = plan.runtime_env
        assert env["py_modules"] == [str(ROOT / p) for p in PACKAGES]
        staged = Path(env["working_dir"])
        assert [p.name for p in staged.iterdir()] == ["my-dag.yaml"]
        assert (staged / "my-dag.yaml").read_text() == dag.read_text()
        assert plan.entrypoint == f"vgen run my-dag.yaml --storage {tmp_path / 'store'}"
        assert env["env_vars"] == {"VGEN_STORAGE": str(tmp_path / "store")}
        assert any("every node of the cluster must see it" in n for n in plan.notes)
    finally:
        plan.cleanup()
    assert not staged.exists()


def test_image_mode_ships_only_the_dag(tmp_path):
    plan = build_submission(DEMO, code="image", storage="s3://b/p")
    try:
        assert plan.code == "image" and "py_modules" not in plan.runtime_env
        assert [p.name for p in Path(plan.runtime_env["working_dir"]).iterdir()] == ["demo.yaml"]
        assert plan.entrypoint.startswith("vgen run demo.yaml ")
    finally:
        plan.cleanup()


def test_code_mode_that_cannot_work_is_a_usage_error(tmp_path, capsys, monkeypatch):
    dag = tiny_dag(tmp_path)
    with pytest.raises(ValueError, match="outside the project root"):
        build_submission(dag, code="project")
    assert main(["submit", str(dag), "--code", "project", "--address", "http://127.0.0.1:1"]) == 2
    assert "move it under the project or use --code modules" in capsys.readouterr().err
    # an installed (non-editable) vgen has no source tree to ship: only the image's code runs
    monkeypatch.setattr("pipelines.submit.project_root", lambda: None)
    with pytest.raises(ValueError, match="installed without its source tree"):
        build_submission(dag, code="modules")
    plan = build_submission(dag)
    plan.cleanup()
    assert plan.code == "image"


def test_storage_and_tracking_notes(tmp_path):
    rel = tiny_dag(tmp_path / "a", storage="./relative-root")
    plan = build_submission(rel, code="image")
    plan.cleanup()
    assert any("relative local path" in n and "lost" in n for n in plan.notes)
    s3 = build_submission(DEMO, storage="s3://b/p")
    assert any("no --tracking-uri" in n for n in s3.notes)
    tracked = build_submission(DEMO, storage="s3://b/p", tracking_uri="http://m:5000")
    # (the notes name files left out, e.g. tests/unit/test_tracking_secrets.py)
    assert not any("--tracking-uri" in n or "MLflow" in n for n in tracked.notes)


def test_env_vars_from_flags_and_runtime_env_file(tmp_path):
    base = tmp_path / "renv.yaml"
    base.write_text(yaml.safe_dump({"working_dir": "/somewhere", "excludes": ["data/raw"],
                                    "env_vars": {"RAY_DEDUP_LOGS": "1", "A": "base"}}))
    plan = build_submission(DEMO, env=["A=flag", "FROM_HERE", "AWS_SECRET_ACCESS_KEY=x"],
                            runtime_env_file=str(base), environ={"FROM_HERE": "copied"})
    env = plan.runtime_env
    assert env["working_dir"] == str(ROOT)  # vgen's own, not the file's
    assert "data/raw" in env["excludes"] and ".git" in env["excludes"]
    assert env["env_vars"] == {"RAY_DEDUP_LOGS": "1", "A": "flag", "FROM_HERE": "copied",
                               "AWS_SECRET_ACCESS_KEY": "x"}
    assert any("working_dir" in n and "replaced" in n for n in plan.notes)
    assert any("AWS_SECRET_ACCESS_KEY" in n and "dashboard" in n for n in plan.notes)
    with pytest.raises(ValueError, match="not set in this environment"):
        build_submission(DEMO, env=["MISSING_VAR"], environ={})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        build_submission(DEMO, env=["1BAD=x"])
    with pytest.raises(ValueError, match="cannot read"):
        build_submission(DEMO, runtime_env_file=str(tmp_path / "absent.yaml"))


def test_dry_run_prints_the_submission_and_contacts_nothing(capsys, no_env_address):
    assert main(["submit", str(DEMO), "--storage", "s3://b/p", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["entrypoint"] == "vgen run pipelines/configs/demo.yaml --storage s3://b/p"
    assert out["runtime_env"]["env_vars"]["VGEN_STORAGE"] == "s3://b/p"


def test_infra_runtime_env_example_builds(capsys, no_env_address):
    assert main(["submit", str(DEMO), "--runtime-env", str(ROOT / "infra" / "runtime_env.yaml"),
                 "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runtime_env"]["env_vars"]["VGEN_STORAGE"].startswith("s3://")


def test_invalid_dag_is_reported_before_any_cluster_call(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "stages": {"a": {"uses": "nope"}}}))
    t0 = time.monotonic()
    assert main(["submit", str(bad), "--address", "http://192.0.2.1:8265"]) == 2
    err = capsys.readouterr().err
    assert "invalid DAG" in err and "stage 'a'" in err
    assert time.monotonic() - t0 < 10  # the unroutable address was never tried


# ---------------------------------------------------------------------------------------------
# addresses and the errors for them
# ---------------------------------------------------------------------------------------------


def test_resolve_address_prefers_the_flag():
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "gcs:6379"}
    assert resolve_address("http://flag:8265/", env) == "http://flag:8265"
    assert resolve_address(None, env) == "http://api:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "gcs:6379"}) == "gcs:6379"
    with pytest.raises(ClusterError, match="no Ray cluster address: pass --address"):
        resolve_address(None, {})


def test_no_address_anywhere(capsys, no_env_address):
    assert main(["submit", str(DEMO), "--storage", "s3://b/p"]) == 2
    assert "no Ray cluster address" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["submit", str(DEMO), "--storage", "s3://b/p"],
    ["status", "--job", "j1"],
    ["logs", "j1"],
    ["logs", "j1", "--follow"],
    ["stop", "j1"],
    ["plan", str(DEMO), "--cluster"],
], ids=["submit", "status", "logs", "follow", "stop", "plan"])
def test_unreachable_address_fails_fast_naming_it(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # the flag wins over it
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    if argv[0] == "plan":
        argv = argv + ["--storage", str(tmp_path / "s")]
    t0 = time.monotonic()
    assert main(argv + ["--address", address]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray cluster at {address}" in err
    assert "Check that the Ray head is up" in err and "http://HEAD:8265" in err
    assert time.monotonic() - t0 < 15


def test_unreachable_gcs_address(capsys):
    address = f"127.0.0.1:{_free_port()}"
    assert main(["status", "--job", "j1", "--address", address]) == 2
    assert f"cannot reach the Ray cluster at {address}" in capsys.readouterr().err


class _FakeHead(http.server.BaseHTTPRequestHandler):
    """/api/version answers per ``mode``; every job is unknown."""

    mode = "ray"

    def do_GET(self):
        if self.mode == "auth":
            return self._send(401, {"error": "unauthorized"})
        if self.path == "/api/version" and self.mode == "ray":
            return self._send(200, {"version": "4", "ray_version": "2.60.0",
                                    "ray_commit": "x", "session_name": "s"})
        if self.path.startswith("/api/jobs/"):
            job = self.path.split("/")[3]
            return self._send(404, f"Job {job} does not exist.", text=True)
        return self._send(404, "404: Not Found", text=True)

    do_POST = do_GET

    def _send(self, code, body, text=False):
        data = (body if text else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_head():
    servers = []

    def start(mode: str) -> str:
        handler = type("H", (_FakeHead,), {"mode": mode})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_http_server_that_is_not_a_dashboard(fake_head, capsys):
    address = fake_head("plain")
    assert main(["status", "--job", "j1", "--address", address]) == 2
    err = capsys.readouterr().err
    assert f"{address} answers HTTP 404 but is not a Ray dashboard" in err
    assert "GCS (6379)" in err


def test_cluster_that_needs_a_token(fake_head, capsys):
    address = fake_head("auth")
    assert main(["logs", "j1", "--address", address]) == 2
    assert "requires authentication" in capsys.readouterr().err


def test_unknown_job_id(fake_head, capsys):
    address = fake_head("ray")
    for argv in (["status", "--job", "j404"], ["logs", "j404"], ["stop", "j404"]):
        assert main(argv + ["--address", address]) == 2
        err = capsys.readouterr().err
        assert f"no job 'j404' on the Ray cluster at {address}" in err, err
    # HOST:PORT without a scheme, when a dashboard answers there, is the dashboard
    assert main(["status", "--job", "j404", "--address", address.split("://")[1]]) == 2
    assert f"no job 'j404' on the Ray cluster at {address}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# plan --cluster: what each stage gets
# ---------------------------------------------------------------------------------------------


def test_stage_allocations_follow_the_cluster():
    dag = load_dag(DEMO, storage="/tmp/x")
    small = stage_allocations(dag, {"CPU": 2.0, "GPU": 0.0})
    assert small["tokens"]["mode"] == "actor_pool" and small["tokens"]["pool_max"] == 1
    assert small["tokenizer"]["mode"] == "train" and small["tokenizer"]["workers"] == 2
    assert small["tokenizer"]["cpus_per_worker"] == 0.5  # (2 - 1 reserved) / 2 workers
    big = stage_allocations(dag, {"CPU": 64.0, "GPU": 0.0})
    assert big["tokens"]["pool_max"] == 1  # resources.workers (default 1) caps the pool
    assert big["tokenizer"]["cpus_per_worker"] == 1.0

    gpu = parse_dag({"name": "g", "storage": "/tmp/x", "stages": {
        "images": {"uses": "ingest.images", "resources": {"workers": 64, "cpus": 2}},
        "tokens": {"uses": "tokenize.lfq", "needs": ["images"],
                   "resources": {"gpus": 1, "workers": 16}},
        "tok": {"uses": "train.tokenizer", "needs": ["images"],
                "resources": {"workers": 8, "gpus": 1, "cpus": 8}}}})
    on_cpu = stage_allocations(gpu, {"CPU": 33.0, "GPU": 0.0})
    assert on_cpu["images"]["pool_max"] == 16  # (33 - 1) / 2 CPUs per actor
    assert on_cpu["tokens"]["pool_max"] == 1 and not on_cpu["tokens"]["fits"]
    assert not on_cpu["tok"]["fits"] and "autoscaler" in on_cpu["tok"]["text"]
    on_gpu = stage_allocations(gpu, {"CPU": 97.0, "GPU": 8.0})
    assert on_gpu["tokens"]["pool_max"] == 8 and on_gpu["tokens"]["fits"]
    assert on_gpu["tok"]["fits"] and on_gpu["tok"]["cpus_per_worker"] == 8.0
    assert on_gpu["tokens"]["text"] == "actor pool 1..8 x 1 CPU + 1 GPU (workers: 16 capped " \
        "by the cluster)"


def test_dag_error_is_a_value_error_subclass():
    # cmd_submit relies on it to tell DAG errors (reported by main) from argument errors
    assert issubclass(DagError, ValueError)


def test_plan_cluster_annotates_each_stage(tmp_path, capsys, monkeypatch):
    fake = {"address": "http://head:8265", "nodes": 3, "CPU": 65.0, "GPU": 16.0, "per_node": []}
    monkeypatch.setattr("pipelines.submit.cluster_resources", lambda address: fake)
    root = str(tmp_path / "root")
    assert main(["plan", str(DEMO), "--storage", root, "--cluster"]) == 0
    out = capsys.readouterr().out
    assert "cluster http://head:8265: 3 node(s), 65 CPUs, 16 GPUs" in out
    assert "on the cluster: actor pool 1..1 x 1 CPU" in out  # tokens: workers defaults to 1
    assert "on the cluster: train 2 worker(s) x 1 CPU" in out
    assert main(["plan", str(DEMO), "--storage", root, "--cluster", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cluster"] == fake
    assert {s["stage"]: s["cluster"]["mode"] for s in plan["stages"]}["generator"] == "train"
