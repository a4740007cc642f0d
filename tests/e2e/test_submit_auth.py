"""`vgen submit | status --job | logs | stop` against a real Ray head with token authentication
(``RAY_AUTH_MODE=token``, the token in a file named by ``RAY_AUTH_TOKEN_PATH``).

The head is this module's own: `ray start --head --block` on free ports, its own (short) temp
dir and HOME, single-machine (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: everything on 127.0.0.1),
in its own process group. It is stopped by signalling that group and then killing the processes
recorded at start-up that outlived it, so the session cluster of tests/conftest.py and any other
Ray on the machine are left alone. Every `vgen` runs as a subprocess with its own environment: the
token is found the way Ray's clients find it (here: ``~/.ray/auth_token`` of a temporary HOME,
no ``RAY_AUTH_TOKEN`` and no ``RAY_AUTH_TOKEN_PATH``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.conftest import ROOT, _free_port, vgen_cmd

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
              "RAY_API_SERVER_ADDRESS")


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _AUTH_VARS}
    env["HOME"] = str(home)
    # jobs run `vgen` / `python` from this venv, as a cluster image's PATH would
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _stop(proc: subprocess.Popen, started: list[psutil.Process], grace: float = 5.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in started:  # is_running() compares start times: a reused pid is not ours
        try:
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """(dashboard URL, token, folder) of a 1-CPU Ray head with token auth on."""
    tmp = tmp_path_factory.mktemp("ray-auth")
    token = secrets.token_hex(24)
    (tmp / "head-token").write_text(token + "\n")
    (tmp / "head-home").mkdir()
    env = _base_env(tmp / "head-home")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "head-token"),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    dash = _free_port()
    # Ray's own sockets live under --temp-dir and AF_UNIX paths stop at 107 bytes: a short one
    ray_tmp = tempfile.mkdtemp(prefix="vgen-auth-", dir="/tmp")
    cmd = [RAY, "start", "--head", "--block", f"--port={_free_port()}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={ray_tmp}", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    log = tmp / "head.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    started: list[psutil.Process] = []
    try:
        deadline = time.time() + 150
        while True:
            try:
                r = requests.get(f"{url}/api/jobs/", timeout=5,
                                 headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the token-auth Ray head did not start: "
                                   f"{log.read_text()[-3000:]}")
            time.sleep(1)
        started = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        yield url, token, tmp
    finally:
        started += [p for p in _children(proc.pid) if p not in started]
        _stop(proc, started)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def vgen(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(vgen_cmd() + list(args), env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-5000:])
    return p


@pytest.fixture
def client_env(token_head, tmp_path):
    """A machine that has the token in ~/.ray/auth_token and RAY_AUTH_MODE=token, nothing else."""
    _, token, _ = token_head
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text(token + "\n")
    env = _base_env(tmp_path / "home")
    env["RAY_AUTH_MODE"] = "token"
    return env


def test_requests_without_the_token_are_refused_and_explained(token_head, tmp_path):
    url, token, _ = token_head
    assert requests.get(f"{url}/api/jobs/", timeout=10).status_code == 401
    assert requests.get(f"{url}/api/jobs/", timeout=10,
                        headers={"Authorization": "Bearer not-the-token"}).status_code == 403

    env = _base_env(tmp_path)  # no RAY_AUTH_MODE, no token anywhere
    p = vgen(env, "status", "--job", "any", "--address", url)
    assert p.returncode == 2
    assert f"the Ray cluster at {url} requires authentication (HTTP 401)" in p.stderr
    for how in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token",
                "ray get-auth-token"):
        assert how in p.stderr, how

    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
    p = vgen(env, "logs", "any", "--address", url)
    assert p.returncode == 2
    assert "refused the token from RAY_AUTH_TOKEN (HTTP 403)" in p.stderr
    assert "not-the-token" not in p.stderr and token not in p.stderr + p.stdout


_TRIVIAL = r"""
import json, sys
from pipelines.submit import Jobs, SubmitPlan
jobs = Jobs(sys.argv[1])
plan = SubmitPlan("python -c \"print('hello from a token cluster')\"", {}, {"vgen.dag": "none"},
                  sys.argv[2], "image")
job = jobs.submit(plan)
print(json.dumps({"job": job, "status": jobs.wait(job, timeout=90)}))
"""


def test_token_from_the_default_file_reaches_the_jobs_api(token_head, client_env, tmp_path):
    url, token, _ = token_head
    sid = f"auth-{secrets.token_hex(3)}"
    p = subprocess.run([sys.executable, "-c", _TRIVIAL, url, sid], env=client_env, cwd=ROOT,
                       capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"job": sid, "status": "SUCCEEDED"}

    p = vgen(client_env, "status", "--job", sid, "--address", url, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["status"] == "SUCCEEDED"
    p = vgen(client_env, "logs", sid, "--address", url)
    assert p.returncode == 0 and "hello from a token cluster" in p.stdout
    p = vgen(client_env, "stop", sid, "--address", url)
    assert p.returncode == 0 and "already ended: SUCCEEDED" in p.stdout

    # `vgen submit` itself: the DAG travels (a package upload, also authenticated) and the job
    # starts; it is stopped rather than waited for
    dag = tmp_path / "dags" / "tiny.yaml"
    dag.parent.mkdir()
    dag.write_text(yaml.safe_dump({"name": "tiny", "stages": {"images": {
        "uses": "ingest.images", "with": {"root": "skimage://", "size": 32}}}}))
    p = vgen(client_env, "submit", str(dag), "--address", url, "--code", "image",
             "--storage", str(tmp_path / "store"), "--env", "SOME_TOKEN=never-printed")
    assert p.returncode == 0
    job = p.stdout.strip().splitlines()[0]
    assert "never-printed" not in p.stdout + p.stderr and token not in p.stdout + p.stderr
    p = vgen(client_env, "stop", job, "--address", url, "--wait")
    assert p.returncode == 0
    assert f"job {job}: STOPPED" in p.stdout or "already ended" in p.stdout
