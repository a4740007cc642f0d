"""What `vgen submit` must never send or show: files that look like credentials stay out of the
upload (checked against Ray's own packer), `--env` values never appear in `--dry-run` output or
the messages of a submission, and the token is found exactly as Ray's clients find it (checked
against Ray's own loader). No cluster; the real token round trip is tests/e2e/test_submit_auth.py.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.submit import (DEFAULT_EXCLUDES, PACKAGES, REDACTED, SECRET_EXCLUDES,
                              ClusterError, auth_headers, auth_token, build_submission,
                              upload_files)

ROOT = Path(__file__).resolve().parents[2]

#: files that look like credentials, at several depths (a folder ends with '/')
SECRETS = [
    ".env", ".env.local", ".envrc", "pipelines/.env.production", ".aws/credentials",
    ".aws/config", ".env.example", "deploy/db-secret.yaml", "config/MY_SECRET.txt",
    "config/ApiSecret.json",
    "secrets/anything.txt", "secrets/notes.example.md", "certs/server.pem", "certs/server.key",
    "certs/client.p12", "keys/id_rsa", "keys/id_rsa.pub", "keys/id_ed25519", "keys/id_ecdsa",
    "credentials", "vgen_core/credentials", ".netrc", ".pypirc",
]
#: ordinary files, some with names close to the patterns
NORMAL = [
    "README.md", "pyproject.toml", "pipelines/__init__.py", "pipelines/configs/tiny.yaml",
    "vgen_core/__init__.py", "vgen_core/tokenizers/key_map.py", "kernels/__init__.py",
    "docs/keys.md", "docs/environment.md", "pipelines/credentials_doc.md", "envs/cpu.yaml",
    "infra/k8s/s3-secret.example.yaml", "deploy/db-secret.example.yaml", "tools/monkey.py",
]


def make_project(tmp: Path) -> Path:
    root = tmp / "proj"
    for rel in SECRETS + NORMAL:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("AKIA-not-a-real-key\n" if rel in SECRETS else "x\n")
    (root / "pipelines" / "configs" / "tiny.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "stages": {"images": {"uses": "ingest.images"}}}))
    return root


def ray_package(path: Path, excludes: list[str], out: Path) -> set[str]:
    """The files Ray itself would put in the working_dir / py_modules package."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(path), out, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


# ---------------------------------------------------------------------------------------------
# the upload
# ---------------------------------------------------------------------------------------------


def test_secret_patterns_come_first_in_the_default_excludes():
    assert DEFAULT_EXCLUDES[:len(SECRET_EXCLUDES)] == SECRET_EXCLUDES
    assert "!*.example.*" in SECRET_EXCLUDES


def test_project_upload_leaves_out_credentials(tmp_path):
    root = make_project(tmp_path)
    plan = build_submission(root / "pipelines/configs/tiny.yaml", root=root, code="project")
    assert plan.code == "project"
    excludes = plan.runtime_env["excludes"]
    shipped = set(upload_files(root, excludes))
    assert shipped == set(NORMAL), (shipped ^ set(NORMAL))
    # what vgen reports (names only), folders once with a trailing slash
    assert set(plan.excluded_secrets) >= {".env", ".aws/", "secrets/", "keys/id_rsa",
                                          "pipelines/.env.production", "credentials"}
    assert not any(s.startswith((".aws/", "secrets/")) and not s.endswith("/")
                   for s in plan.excluded_secrets)
    note = next(n for n in plan.notes if "look like credentials" in n)
    assert "never uploaded" in note and "AKIA" not in note
    # and Ray's own packer (gitignore semantics, negation included) agrees file for file
    assert ray_package(root, excludes, tmp_path / "pkg.zip") == set(NORMAL)


def test_py_modules_upload_leaves_out_credentials(tmp_path):
    root = make_project(tmp_path)
    outside = tmp_path / "dags"
    outside.mkdir()
    dag = outside / "tiny.yaml"
    dag.write_text((root / "pipelines/configs/tiny.yaml").read_text())
    plan = build_submission(dag, root=root, code="modules")
    try:
        assert plan.runtime_env["py_modules"] == [str(root / p) for p in PACKAGES]
        assert set(plan.excluded_secrets) == {"pipelines/.env.production",
                                              "vgen_core/credentials"}
        excludes = plan.runtime_env["excludes"]
        got = ray_package(root / "pipelines", excludes, tmp_path / "p.zip")
        assert ".env.production" not in got and "configs/tiny.yaml" in got
        assert got == {p.split("/", 1)[1] for p in upload_files(root, excludes)
                       if p.startswith("pipelines/")}
    finally:
        plan.cleanup()


def test_this_repository_uploads_no_credentials():
    """The real project: the example Secret is a template and travels; nothing else matches."""
    shipped = upload_files(ROOT)
    assert "infra/k8s/s3-secret.example.yaml" in shipped
    assert not [p for p in shipped if Path(p).name in (".env", ".netrc", "credentials")]


# ---------------------------------------------------------------------------------------------
# --env values are never printed
# ---------------------------------------------------------------------------------------------


VALUES = ("s3cr3t-token-value", "hello-plain-value", "copied-from-here", "pw-in-uri",
          "hf_file_value")


def _assert_no_values(*texts: str) -> None:
    for text in texts:
        for v in VALUES:
            assert v not in text, v


def _submit_args(tmp_path: Path, monkeypatch) -> list[str]:
    monkeypatch.setenv("COPIED", "copied-from-here")
    renv = tmp_path / "renv.yaml"
    renv.write_text(yaml.safe_dump({"env_vars": {"HF_TOKEN": "hf_file_value",
                                                 "RAY_DEDUP_LOGS": "1"}}))
    dag = ROOT / "pipelines" / "configs" / "demo.yaml"
    return ["submit", str(dag), "--address", "http://127.0.0.1:9",
            "--env", "API_TOKEN=s3cr3t-token-value", "--env", "PLAIN=hello-plain-value",
            "--env", "COPIED", "--storage", "s3://bucket/vgen",
            "--tracking-uri", "http://alice:pw-in-uri@mlflow:5000", "--runtime-env", str(renv)]


def test_dry_run_prints_names_not_values(tmp_path, capsys, monkeypatch):
    assert main(_submit_args(tmp_path, monkeypatch) + ["--dry-run"]) == 0
    cap = capsys.readouterr()
    _assert_no_values(cap.out, cap.err)
    out = json.loads(cap.out)
    env = out["runtime_env"]["env_vars"]
    for name in ("API_TOKEN", "PLAIN", "COPIED", "HF_TOKEN", "RAY_DEDUP_LOGS"):
        assert env[name] == REDACTED, name
    # vgen's own settings stay readable, minus URI user-info
    assert env["VGEN_STORAGE"] == "s3://bucket/vgen"
    assert env["MLFLOW_TRACKING_URI"] == "http://***@mlflow:5000"
    assert out["entrypoint"].endswith("--tracking-uri http://***@mlflow:5000")


def test_submission_messages_print_no_values(tmp_path, capsys, monkeypatch):
    """The notes and the 'submitted job' lines of a real submission (the cluster faked)."""
    import pipelines.submit as submit

    sent = {}

    class FakeJobs:
        address = "http://127.0.0.1:9"

        def __init__(self, address):
            pass

        def submit(self, plan):
            sent["env_vars"] = dict(plan.runtime_env["env_vars"])
            return plan.submission_id

    monkeypatch.setattr(submit, "Jobs", FakeJobs)
    assert main(_submit_args(tmp_path, monkeypatch) + ["--submission-id", "job-1"]) == 0
    cap = capsys.readouterr()
    _assert_no_values(cap.out, cap.err)
    assert "env_vars API_TOKEN, HF_TOKEN are readable by anyone" in cap.err  # names only
    assert "submitted job job-1" in cap.err
    # the job itself gets the real values
    assert sent["env_vars"]["API_TOKEN"] == "s3cr3t-token-value"
    assert sent["env_vars"]["MLFLOW_TRACKING_URI"] == "http://alice:pw-in-uri@mlflow:5000"


def test_bad_env_argument_does_not_echo_its_value(capsys):
    dag = ROOT / "pipelines" / "configs" / "demo.yaml"
    assert main(["submit", str(dag), "--env", "BAD-NAME=s3cr3t-token-value", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "BAD-NAME" in err and "s3cr3t-token-value" not in err


def test_invalid_runtime_env_yaml_does_not_echo_its_text(tmp_path, capsys):
    bad = tmp_path / "renv.yaml"
    bad.write_text("env_vars:\n  API_TOKEN: s3cr3t-token-value\n  - broken\n")
    dag = ROOT / "pipelines" / "configs" / "demo.yaml"
    assert main(["submit", str(dag), "--runtime-env", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML at line" in err and "s3cr3t-token-value" not in err


# ---------------------------------------------------------------------------------------------
# the token, found as Ray finds it
# ---------------------------------------------------------------------------------------------


def _cases(tmp: Path) -> list[dict[str, str]]:
    home, empty_home = tmp / "home", tmp / "empty-home"
    (home / ".ray").mkdir(parents=True)
    empty_home.mkdir()
    (home / ".ray" / "auth_token").write_text("  home-token \n")
    (tmp / "tok").write_text("path-token\nsecond-line\n")
    (tmp / "blank").write_text("\nlater-line\n")
    h, e = str(home), str(empty_home)
    return [
        {"RAY_AUTH_TOKEN": "env-token", "HOME": h},  # no RAY_AUTH_MODE: nothing is sent
        {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "env-token", "HOME": h},
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": " env-token\n", "HOME": h},
        {"RAY_AUTH_MODE": "TOKEN", "RAY_AUTH_TOKEN": "env-token",
         "RAY_AUTH_TOKEN_PATH": str(tmp / "tok"), "HOME": h},
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "tok"), "HOME": h},
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": "", "HOME": h},
        {"RAY_AUTH_MODE": "token", "HOME": h},
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "missing"), "HOME": h},
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp / "blank"), "HOME": h},
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "   ", "HOME": h},
        {"RAY_AUTH_MODE": "token", "HOME": e},
    ]


_RAY_SIDE = r"""
import json, os, sys
from ray._raylet import AuthenticationTokenLoader, Config
from ray._private.authentication.http_token_authentication import (
    get_auth_headers_if_auth_enabled)
keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "HOME",
        "RAY_ENABLE_K8S_TOKEN_AUTH")
out = []
for case in json.loads(sys.argv[1]):
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(case)
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        out.append({k.lower(): v for k, v in get_auth_headers_if_auth_enabled({}).items()})
    except Exception as e:
        out.append("error: " + type(e).__name__)
print(json.dumps(out))
"""


def test_token_discovery_matches_rays_own_loader(tmp_path):
    cases = _cases(tmp_path)
    ray_side = subprocess.run([sys.executable, "-c", _RAY_SIDE, json.dumps(cases)],
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": os.environ.get("PATH", "")})
    assert ray_side.returncode == 0, ray_side.stderr[-3000:]
    theirs = json.loads(ray_side.stdout.strip().splitlines()[-1])
    ours = []
    for case in cases:
        try:
            ours.append({k.lower(): v for k, v in auth_headers(case).items()})
        except ClusterError:
            ours.append("error: AuthenticationError")
    assert ours == theirs
    # and the cases say what the docstring says
    assert ours[0] == ours[1] == {}
    assert ours[2] == ours[3] == {"authorization": "Bearer env-token"}
    assert ours[4] == {"authorization": "Bearer path-token"}
    assert ours[5] == ours[6] == {"authorization": "Bearer home-token"}
    assert ours[7:] == ["error: AuthenticationError"] * 4


def test_token_errors_say_what_to_do(tmp_path):
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH is .*missing"):
        auth_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    with pytest.raises(ClusterError) as e:
        auth_token({"RAY_AUTH_MODE": "token", "HOME": str(tmp_path)})
    msg = str(e.value)
    for needle in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token",
                   "ray get-auth-token"):
        assert needle in msg
    assert auth_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}) == ("t", "RAY_AUTH_TOKEN")


class _TokenHead(http.server.BaseHTTPRequestHandler):
    """A dashboard with token auth as Ray answers: 401 without a token, 403 with another."""

    seen: list[str | None] = []

    def do_GET(self):
        auth = self.headers.get("Authorization")
        self.seen.append(auth)
        if not auth:
            self.send_response(401)
            body = b"Unauthorized: Missing authentication token"
        elif auth != "Bearer right-token":
            self.send_response(403)
            body = b"Forbidden: Invalid authentication token"
        else:
            self.send_response(200)
            body = json.dumps({"ray_version": "2.60.0"}).encode()
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def token_head():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHead)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _TokenHead.seen = []
    yield server.server_address[1]
    server.shutdown()


def test_missing_and_wrong_tokens_are_explained(token_head, capsys, monkeypatch, tmp_path):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    bare = f"127.0.0.1:{token_head}"  # without http://: still recognised as a dashboard
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert main(["status", "--job", "j1", "--address", bare]) == 2
    err = capsys.readouterr().err
    assert f"http://{bare} requires authentication (HTTP 401)" in err
    assert "RAY_AUTH_MODE=token" in err and "ray get-auth-token" in err

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-token")
    assert main(["stop", "j1", "--address", bare]) == 2
    err = capsys.readouterr().err
    assert "refused the token from RAY_AUTH_TOKEN (HTTP 403)" in err
    assert "wrong-token" not in err
    assert _TokenHead.seen[-1] == "Bearer wrong-token"
