"""Cluster operations: run a DAG on a Ray cluster as a Ray job, and watch, inspect or stop it.

``vgen submit DAG.yaml --address http://HEAD:8265`` validates the DAG here, then submits the job
``vgen run DAG.yaml [--storage ROOT] [--tracking-uri URI]`` through the Ray Jobs API
(:class:`ray.job_submission.JobSubmissionClient`), with a runtime_env built from this project:

========== ==================================================================================
code mode  what travels with the job (chosen by ``--code``; ``auto`` picks the first that fits)
========== ==================================================================================
project    ``working_dir`` = the project root (the DAG lives inside it), minus
           :data:`DEFAULT_EXCLUDES` and files over :data:`LARGE_FILE_BYTES`; the job runs there
modules    ``py_modules`` = the project's packages (:data:`PACKAGES`) and ``working_dir`` = a
           folder holding only the DAG file (the DAG lives outside the project)
image      only the DAG file: the cluster image's installed vgen runs it (no source tree here)
========== ==================================================================================

Ray puts ``working_dir`` and ``py_modules`` first on every worker's PYTHONPATH, so the code
that runs is the code submitted, even on an image with another vgen installed. Python
dependencies are *not* shipped (no ``pip:`` field): they are expected in the cluster image
(``infra/Dockerfile``), because installing torch/DeepSpeed per job takes minutes per node.

Secrets never travel by accident: files that look like credentials (:data:`SECRET_EXCLUDES`:
``.env*``, ``.aws/``, ``*secret*`` but not ``*.example.*``, keys and certificates, ``.netrc``,
``.pypirc``, ``credentials``) are left out of every upload and listed (names only) in the notes.

Environment: ``VGEN_STORAGE`` and ``MLFLOW_TRACKING_URI`` are set in the job's ``env_vars`` when
given; ``--env KEY=VALUE`` (or ``--env KEY`` to copy this machine's value) adds more. Credentials
belong to the cluster (instance profile, IRSA, a Kubernetes Secret), not to ``env_vars``, which
anyone with dashboard access can read. vgen itself never prints an ``env_vars`` value: ``--dry-run``
shows ``NAME: <redacted>`` (:meth:`SubmitPlan.to_json`), and URIs it prints lose their user-info.

Authentication: a cluster with token auth (``RAY_AUTH_MODE=token`` on its nodes) answers 401
without a token. vgen finds the token as Ray's own clients do (:func:`auth_token`): only when
``RAY_AUTH_MODE=token`` here, from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` names,
else ``~/.ray/auth_token``; it sends ``Authorization: Bearer <token>`` with every Jobs API call of
``submit``, ``logs``, ``status --job``, ``stop`` and ``plan --cluster``.

Addresses: the head's dashboard URL ``http://HEAD:8265`` (it serves the Jobs API), or anything
Ray accepts (``ray://HEAD:10001``, ``HEAD:6379``). ``--address`` wins over the environment
(``RAY_API_SERVER_ADDRESS``, then ``RAY_ADDRESS``), unlike Ray's own client where the
environment wins. An address that does not answer fails in seconds with :class:`ClusterError`,
which names the address and what to check.

Exit codes (as the rest of the CLI): 0 ok, or the job is pending/running/succeeded; 1 the job
failed or was stopped; 2 nothing could be done (invalid DAG, bad arguments, unreachable
cluster, unknown job id).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from collections.abc import Iterator, Mapping
from urllib.parse import urlparse

__all__ = [
    "ClusterError", "JobNotFound", "DEFAULT_EXCLUDES", "PACKAGES", "LARGE_FILE_BYTES",
    "SECRET_EXCLUDES", "REDACTED", "SubmitPlan", "project_root", "resolve_address",
    "build_submission", "upload_files", "auth_token", "auth_headers", "Jobs", "cluster_resources",
    "stage_allocations", "exit_code_for",
]

#: The importable packages of this project (pyproject's ``packages.find``), shipped as
#: ``py_modules`` in ``modules`` mode.
PACKAGES = ("pipelines", "vgen_core", "kernels")

#: Files that look like credentials, never uploaded (gitignore patterns, matched at any depth;
#: the last pattern that matches decides, so ``!*.example.*`` keeps templates such as
#: ``infra/k8s/s3-secret.example.yaml``). Ray's matching is case-sensitive, hence the spellings.
SECRET_EXCLUDES = [
    "*secret*", "*Secret*", "*SECRET*", "!*.example.*",
    ".env", ".env.*", ".envrc", ".aws", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_dsa*",
    "id_ecdsa*", "id_ed25519*", "credentials", ".netrc", ".pypirc",
]

#: Never uploaded (gitignore patterns, matched at any depth): credentials (first, so the
#: negation in :data:`SECRET_EXCLUDES` re-includes nothing the others exclude), environments, VCS
#: data, caches, local storage roots and MLflow stores, build outputs, weights and archives.
DEFAULT_EXCLUDES = [
    *SECRET_EXCLUDES,
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".cache", ".pytest_cache", ".hypothesis",
    ".ruff_cache", ".mypy_cache", ".ipynb_checkpoints", ".vgen-demo", ".vgen", "*.egg-info",
    "build", "dist", "mlruns", "mlartifacts", "*.db", "*.log", "*.safetensors", "*.ckpt", "*.pt",
    "*.pth", "*.tar", "*.tar.gz", "*.zip",
]

#: Files at least this large are left out of ``working_dir`` (Ray warns at the same size; the
#: whole package must stay under its 512 MiB limit). Put weights and data on the storage root.
LARGE_FILE_BYTES = 10 * 1024 * 1024

#: Jobs API statuses after which a job never changes again.
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

_PROBE_TIMEOUT = (5.0, 15.0)  # connect, read (seconds)
_SECRET_RE = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|PRIVATE", re.I)

#: What vgen prints in place of an ``env_vars`` value.
REDACTED = "<redacted>"
#: env_vars whose values vgen prints (URI user-info masked) unless they came from ``--env``:
#: the storage root and tracking URI, which the entrypoint shows anyway
_SHOWN_ENV = ("VGEN_STORAGE", "MLFLOW_TRACKING_URI")


class ClusterError(RuntimeError):
    """The cluster could not be reached or refused a request; the message names the address and
    what to check. The CLI maps it to exit code 2 (nothing was done)."""


class JobNotFound(ClusterError):
    """No job with this id on the cluster."""


def exit_code_for(status: str) -> int:
    """0 for a job that is pending, running or succeeded; 1 for one that failed or was stopped."""
    return 1 if str(status) in ("FAILED", "STOPPED") else 0


# ---------------------------------------------------------------------------------------------
# building the submission (no cluster needed)
# ---------------------------------------------------------------------------------------------


def project_root() -> Path | None:
    """The source tree this vgen runs from (where ``pyproject.toml`` sits beside the packages),
    or None for an installed (non-editable) vgen."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and all((root / p).is_dir() for p in PACKAGES):
        return root
    return None


@dataclass
class SubmitPlan:
    """What ``vgen submit`` sends: the entrypoint, the runtime_env and job metadata.
    ``staging`` is a temporary folder (``modules``/``image`` modes) removed by :meth:`cleanup`."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    code: str
    excluded_large: list[str] = field(default_factory=list)
    #: paths left out because they look like credentials (names only, never contents)
    excluded_secrets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    staging: str | None = None
    #: env_vars whose values vgen may print (URI user-info masked): VGEN_STORAGE and
    #: MLFLOW_TRACKING_URI from --storage / --tracking-uri or a --runtime-env file, never --env
    shown_env: set[str] = field(default_factory=set)

    def cleanup(self) -> None:
        if self.staging:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def shown_entrypoint(self) -> str:
        """The entrypoint as vgen prints it (URI user-info masked)."""
        from vgen_core.tracking.redact import redact_text

        return redact_text(self.entrypoint)

    def to_json(self) -> dict[str, Any]:
        """What ``--dry-run`` prints: the submission with every ``env_vars`` value replaced by
        :data:`REDACTED` (except the URIs vgen set, masked), and secret-looking fields and URI
        user-info masked elsewhere in the runtime_env and metadata."""
        from vgen_core.tracking.redact import redact_config, redact_text

        renv = {k: v for k, v in self.runtime_env.items() if k != "env_vars"}
        renv = redact_config(renv)
        if "env_vars" in self.runtime_env:
            renv["env_vars"] = {
                k: redact_text(v) if k in self.shown_env else REDACTED
                for k, v in self.runtime_env["env_vars"].items()}
        return {"submission_id": self.submission_id, "entrypoint": self.shown_entrypoint(),
                "runtime_env": renv, "metadata": redact_config(self.metadata), "code": self.code,
                "excluded_large_files": self.excluded_large,
                "excluded_secret_files": self.excluded_secrets, "notes": self.notes}


def _excluded(rel_parts: tuple[str, ...], patterns: list[str]) -> bool:
    """gitignore semantics (as Ray's upload applies them) for slash-free patterns: a pattern
    matches a path when it matches any of its components (case-sensitively); the last matching
    pattern decides, and ``!pattern`` re-includes. Patterns with a slash are not modelled here."""
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        body = pat[1:] if negate else pat
        if "/" in body or not body:
            continue
        if any(fnmatch.fnmatchcase(part, body) for part in rel_parts):
            excluded = not negate
    return excluded


def _walk_files(root: Path, excludes: list[str],
                secrets: list[str] | None = None) -> Iterator[tuple[Path, int]]:
    """Files under ``root`` that the excludes keep, with their sizes (pruning excluded folders,
    as Ray does, so a multi-GB .venv is never walked). Excluded paths that look like
    credentials are appended to ``secrets`` (relative, a folder with a trailing ``/``)."""
    def drop(parts: tuple[str, ...], is_dir: bool) -> bool:
        if not _excluded(parts, excludes):
            return False
        if secrets is not None and _excluded(parts, SECRET_EXCLUDES):
            secrets.append("/".join(parts) + ("/" if is_dir else ""))
        return True

    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        dirnames[:] = sorted(d for d in dirnames if not drop(rel + (d,), True))
        for f in sorted(filenames):
            if drop(rel + (f,), False):
                continue
            p = Path(dirpath, f)
            try:
                if p.is_symlink() or not p.is_file():
                    continue
                yield p, p.stat().st_size
            except OSError:
                continue


def upload_files(root: Path, excludes: list[str] | None = None) -> list[str]:
    """The files (relative POSIX paths) a ``working_dir``/``py_modules`` upload of ``root`` holds
    under these excludes (default :data:`DEFAULT_EXCLUDES`), before Ray's own ``.gitignore`` /
    ``.rayignore`` handling, which can only remove more."""
    excludes = DEFAULT_EXCLUDES if excludes is None else excludes
    return [p.relative_to(root).as_posix() for p, _ in _walk_files(Path(root), excludes)]


def _parse_env(items: list[str], environ: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):  # the value is never echoed
            raise ValueError(f"--env {key!r}{'=...' if sep else ''}: expected KEY=VALUE or KEY "
                             "(a variable name)")
        if not sep:
            if key not in environ:
                raise ValueError(f"--env {key}: not set in this environment; give KEY=VALUE")
            value = environ[key]
        out[key] = value
    return out


def _load_runtime_env(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--runtime-env {path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:  # only where: the text around it could hold a secret
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"--runtime-env {path}: invalid YAML{where}: "
                         f"{getattr(e, 'problem', None) or type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--runtime-env {path}: expected a mapping (runtime_env fields)")
    return data


def _choose_code(code: str, dag_file: Path, root: Path | None) -> str:
    if code not in ("auto", "project", "modules", "image"):
        raise ValueError(f"--code {code!r}: expected auto, project, modules or image")
    if code == "auto":
        if root is None:
            return "image"
        return "project" if dag_file.is_relative_to(root) else "modules"
    if code in ("project", "modules") and root is None:
        raise ValueError(f"--code {code}: this vgen is installed without its source tree; "
                         "use --code image (the cluster image's vgen runs the DAG)")
    if code == "project" and root is not None and not dag_file.is_relative_to(root):
        raise ValueError(f"--code project: the DAG {dag_file} is outside the project root "
                         f"{root}; move it under the project or use --code modules")
    return code


def _note_secrets(plan: SubmitPlan, secrets: list[str]) -> None:
    plan.excluded_secrets = secrets
    if secrets:
        plan.notes.append(f"left out {len(secrets)} path(s) that look like credentials (never "
                          f"uploaded): {', '.join(secrets[:8])}"
                          + (" ..." if len(secrets) > 8 else ""))


def _ship_code(plan: SubmitPlan, dag_file: Path, root: Path | None,
               excludes: list[str]) -> str:
    """Set working_dir / py_modules / excludes for ``plan.code``; the DAG path for the
    entrypoint (relative to the job's working directory)."""
    renv = plan.runtime_env
    secrets: list[str] = []
    if plan.code in ("project", "modules"):
        assert root is not None  # _choose_code refuses these modes without a source tree
    if plan.code == "project" and root is not None:
        total = 0
        for p, size in _walk_files(root, excludes, secrets):
            if size >= LARGE_FILE_BYTES:
                plan.excluded_large.append(p.relative_to(root).as_posix())
            else:
                total += size
        _note_secrets(plan, secrets)
        large = plan.excluded_large
        if large:
            plan.notes.append(f"left out {len(large)} file(s) of {LARGE_FILE_BYTES >> 20} MiB or "
                              f"more (put weights and data on the storage root): "
                              f"{', '.join(large[:5])}" + (" ..." if len(large) > 5 else ""))
        renv["working_dir"] = str(root)
        renv["excludes"] = excludes + ["/" + p for p in large]
        plan.notes.append(f"working_dir {root}: about {total / 2**20:.1f} MiB before compression")
        return dag_file.relative_to(root).as_posix()
    plan.staging = tempfile.mkdtemp(prefix="vgen-submit-")
    shutil.copy2(dag_file, Path(plan.staging) / dag_file.name)
    renv["working_dir"] = plan.staging
    if plan.code == "modules" and root is not None:
        for pkg in PACKAGES:  # Ray packs each one with the same excludes
            found: list[str] = []
            for _ in _walk_files(root / pkg, excludes, found):
                pass
            secrets += [f"{pkg}/{s}" for s in found]
        _note_secrets(plan, secrets)
        renv["py_modules"] = [str(root / p) for p in PACKAGES]
        renv["excludes"] = excludes
    return dag_file.name


def _storage_notes(effective: str, explicit: bool, tracked: bool) -> list[str]:
    if "://" not in effective:
        if not explicit and not Path(effective).is_absolute():
            return [f"storage {effective!r} is a relative local path: on the cluster it resolves "
                    "inside the job's temporary working directory and is lost; pass "
                    "--storage s3://bucket/prefix"]
        return [f"storage {effective} is a local path: every node of the cluster must see it "
                "(a shared filesystem); otherwise use --storage s3://..."]
    if not tracked:
        return ["no --tracking-uri: MLflow runs go to a SQLite file on the head node "
                "(~/.cache/vgen/mlflow.db) and disappear with the cluster; pass "
                "--tracking-uri http://MLFLOW:5000"]
    return []


def build_submission(dag_path: str | os.PathLike, *, storage: str | None = None,
                     tracking_uri: str | None = None, code: str = "auto",
                     env: list[str] | None = None, runtime_env_file: str | None = None,
                     submission_id: str | None = None, root: Path | None = None,
                     environ: dict[str, str] | None = None) -> SubmitPlan:
    """Validate the DAG and build the job: entrypoint ``vgen run ...`` and its runtime_env.

    Raises :class:`pipelines.dag.spec.DagError` for an invalid DAG and ``ValueError`` for
    arguments that cannot work (e.g. ``--code project`` for a DAG outside the project).
    """
    from pipelines.dag.spec import load_dag

    environ = dict(os.environ if environ is None else environ)
    dag_file = Path(dag_path).resolve()
    dag = load_dag(dag_file, storage=storage, tracking=tracking_uri)
    root = project_root() if root is None else root
    code = _choose_code(code, dag_file, root)
    extra_env = _parse_env(env or [], environ)
    if storage and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    effective = storage or dag.spec.storage
    sid = submission_id or (f"vgen-{dag.name}-{time.strftime('%Y%m%d-%H%M%S')}-"
                            f"{uuid.uuid4().hex[:6]}")
    metadata = {"vgen.dag": dag.name, "vgen.dag_file": str(dag_file), "vgen.code": code,
                "vgen.storage": effective}
    plan = SubmitPlan("", _load_runtime_env(runtime_env_file), metadata, sid, code)
    renv = plan.runtime_env
    for key in ("working_dir", "py_modules"):
        if renv.pop(key, None) is not None:
            plan.notes.append(f"--runtime-env: '{key}' is replaced by vgen's own (--code {code})")
    if any(k in renv for k in ("pip", "uv", "conda")):
        plan.notes.append("--runtime-env installs packages per job; the cluster image should "
                          "already hold vgen's dependencies (infra/Dockerfile)")
    excludes = list(dict.fromkeys([*DEFAULT_EXCLUDES, *renv.pop("excludes", [])]))
    dag_arg = _ship_code(plan, dag_file, root, excludes)
    plan.notes += _storage_notes(effective, bool(storage), bool(tracking_uri or dag.spec.tracking))

    env_vars = {str(k): str(v) for k, v in (renv.get("env_vars") or {}).items()}
    env_vars.update(extra_env)
    # vgen's own settings are shown (URI user-info masked); any --env value never is
    plan.shown_env = {k for k in _SHOWN_ENV if k in env_vars and k not in extra_env}
    if storage:
        env_vars["VGEN_STORAGE"] = storage
        plan.shown_env.add("VGEN_STORAGE")
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
        plan.shown_env.add("MLFLOW_TRACKING_URI")
    secret = sorted(k for k in env_vars if _SECRET_RE.search(k))
    if secret:
        plan.notes.append(f"env_vars {', '.join(secret)} are readable by anyone with dashboard "
                          "access; prefer credentials held by the cluster (instance profile, "
                          "IRSA, a Kubernetes Secret)")
    if env_vars:
        renv["env_vars"] = env_vars

    argv = ["vgen", "run", dag_arg]
    argv += ["--storage", storage] if storage else []
    argv += ["--tracking-uri", tracking_uri] if tracking_uri else []
    plan.entrypoint = shlex.join(argv)
    return plan


# ---------------------------------------------------------------------------------------------
# reaching the cluster
# ---------------------------------------------------------------------------------------------


def resolve_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``; else ClusterError."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    address = (address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS")
               or "").strip()
    if not address:
        raise ClusterError("no Ray cluster address: pass --address http://HEAD:8265 (the head "
                           "node's dashboard, which serves the Jobs API) or set "
                           "RAY_API_SERVER_ADDRESS")
    return address.rstrip("/")


#: where a Kubernetes pod's service-account token lives (Ray reads it with
#: RAY_ENABLE_K8S_TOKEN_AUTH=true)
K8S_SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"

_HOW_TO_AUTH = ("set RAY_AUTH_MODE=token and give the cluster's token as RAY_AUTH_TOKEN, in a file "
                "named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (on the head: `ray "
                "get-auth-token`; on KubeRay: the Secret the manifests read, infra/README.md)")


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


def auth_token(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(token, where it came from)`` as Ray 2.60's clients find it, or None when this machine
    does not use token auth.

    Mirrors Ray's ``AuthenticationTokenLoader`` (src/ray/rpc/authentication/
    authentication_token_loader.cc) behind ``get_auth_headers_if_auth_enabled``, which
    ``ray job submit`` and the Jobs SDK use: nothing unless ``RAY_AUTH_MODE`` is ``token``
    (case-insensitive); then ``RAY_AUTH_TOKEN`` if set and non-empty; else the first line of the
    file ``RAY_AUTH_TOKEN_PATH`` names (a missing or empty file is an error, not a fall-through);
    else, with ``RAY_ENABLE_K8S_TOKEN_AUTH=true``, the pod's service-account token; else
    ``$HOME/.ray/auth_token``. Surrounding whitespace is trimmed.

    Raises:
        ClusterError: token auth is on here but no token is found (the message says where to
            put one).
    """
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if env.get("RAY_AUTH_TOKEN", ""):  # set: used, even if only whitespace (then an error)
        token = env["RAY_AUTH_TOKEN"].strip()
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN holds only whitespace: {_HOW_TO_AUTH}")
        return token, "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH", "")
    if path:
        token = _first_line(path)
        if not token:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH is {path}, which cannot be read or is empty;"
                               " point it at the file holding the cluster's token")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    if env.get("RAY_ENABLE_K8S_TOKEN_AUTH", "").strip().lower() in ("true", "1"):
        token = _first_line(K8S_SA_TOKEN_PATH)
        if token:
            return token, K8S_SA_TOKEN_PATH
    default = os.path.join(env.get("HOME") or ".", ".ray", "auth_token")
    token = _first_line(default)
    if token:
        return token, default
    raise ClusterError(f"RAY_AUTH_MODE=token but no token was found (RAY_AUTH_TOKEN, "
                       f"RAY_AUTH_TOKEN_PATH and {default} are all empty): {_HOW_TO_AUTH}")


def auth_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` (the header Ray's clients send) when
    :func:`auth_token` finds a token, else ``{}``."""
    found = auth_token(environ)
    return {"Authorization": f"Bearer {found[0]}"} if found else {}


def _auth_source(environ: Mapping[str, str] | None = None) -> str | None:
    try:
        found = auth_token(environ)
    except ClusterError:
        return None
    return found[1] if found else None


def _what_to_check(address: str) -> str:
    return (f"Check that the Ray head is up, that its dashboard runs (ray[default] installed, "
            f"`ray start --head --include-dashboard=true`) and listens on an interface this "
            f"machine reaches (--dashboard-host), and that {address} names it: "
            "http://HEAD:8265 by default; through `ray dashboard infra/aws/cluster.yaml` or "
            "`kubectl port-forward svc/vgen-head-svc 8265:8265` it is http://127.0.0.1:8265")


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """Ray's clients let RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address they are
    given; hide them so the address vgen resolved is the one used."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
             if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _normalize(address: str, headers: dict[str, str] | None = None) -> str:
    """``HOST:PORT`` without a scheme is Ray's bootstrap (GCS) form, but people often mean the
    dashboard (``HEAD:8265``): use ``http://HOST:PORT`` when a Ray dashboard answers there (or
    refuses with 401/403: a dashboard with token auth, which :func:`_probe` then explains)."""
    import requests

    if "://" in address or address == "auto":
        return address
    try:
        r = requests.get(f"http://{address}/api/version", timeout=(2.0, 5.0),
                         headers=headers or {})
        if r.status_code in (401, 403) and "authentication token" in r.text:
            return f"http://{address}"
        if r.ok and r.json().get("ray_version"):
            return f"http://{address}"
    except (requests.exceptions.RequestException, ValueError, AttributeError):
        pass
    return address


def _auth_error(address: str, status: int) -> ClusterError:
    source = _auth_source()
    if status == 401 or source is None:
        return ClusterError(f"the Ray cluster at {address} requires authentication (HTTP "
                            f"{status}) and vgen sent no token: {_HOW_TO_AUTH}")
    return ClusterError(f"the Ray cluster at {address} refused the token from {source} (HTTP "
                        f"{status}): it is not this cluster's token; use the one the head has "
                        "(`ray get-auth-token` there, or its RAY_AUTH_TOKEN Secret)")


def _probe(address: str, headers: dict[str, str] | None = None) -> None:
    """Fail in seconds, with a useful message, when ``address`` is not a reachable Jobs API."""
    import requests

    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme in ("http", "https"):
        url = f"{address}/api/version"
        try:
            r = requests.get(url, timeout=_PROBE_TIMEOUT, headers=headers or {})
        except requests.exceptions.Timeout:
            raise ClusterError(f"the Ray cluster at {address} did not answer within "
                               f"{_PROBE_TIMEOUT[1]:.0f}s. {_what_to_check(address)}") from None
        except requests.exceptions.RequestException as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address} "
                               f"({type(e).__name__}). {_what_to_check(address)}") from None
        if r.status_code in (401, 403):
            raise _auth_error(address, r.status_code)
        try:
            version = r.json().get("ray_version") if r.ok else None
        except ValueError:
            version = None
        if not version:
            raise ClusterError(f"{address} answers HTTP {r.status_code} but is not a Ray "
                               "dashboard (no ray_version at /api/version): is the port the "
                               "dashboard's (8265 by default), not the GCS (6379) or Ray Client "
                               f"(10001) port? {_what_to_check(address)}")
        return
    host, port = parsed.hostname, parsed.port
    if parsed.scheme in ("tcp", "ray") and host and port:
        try:
            socket.create_connection((host, port), timeout=_PROBE_TIMEOUT[0]).close()
        except OSError as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}). "
                               f"{_what_to_check(address)}") from None


def _call(address: str, what: str, fn, *args, job_id: str | None = None):
    """Run a Jobs API call, turning its failures into ClusterError / JobNotFound."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args)
    except requests.exceptions.RequestException as e:
        raise ClusterError(f"{what}: lost the Ray cluster at {address} ({type(e).__name__}). "
                           f"{_what_to_check(address)}") from None
    except AuthenticationError as e:  # Ray's 401/403 (format_authentication_http_error)
        status = 401 if str(e).startswith("Authentication required") else 403
        raise _auth_error(address, status) from None
    except RuntimeError as e:
        msg = str(e)
        if job_id is not None and ("404" in msg or "does not exist" in msg):
            raise JobNotFound(f"no job {job_id!r} on the Ray cluster at {address}; "
                              f"list them with `ray job list --address {address}`") from None
        raise ClusterError(f"{what} at {address} failed: {msg}") from None
    except ConnectionError as e:
        raise ClusterError(f"{what}: {e} {_what_to_check(address)}") from None


class Jobs:
    """The Ray Jobs API of one cluster; every failure is a :class:`ClusterError`."""

    def __init__(self, address: str | None):
        headers = auth_headers()  # before any request: a token-mode error names what to fix
        self.address = _normalize(resolve_address(address), headers)
        _probe(self.address, headers)
        from ray.job_submission import JobSubmissionClient

        with _explicit_address():
            self.client = _call(self.address, "connecting", lambda: JobSubmissionClient(
                self.address, headers=dict(headers)))

    def submit(self, plan: SubmitPlan) -> str:
        return _call(self.address, "submitting the job", lambda: self.client.submit_job(
            entrypoint=plan.entrypoint, runtime_env=plan.runtime_env, metadata=plan.metadata,
            submission_id=plan.submission_id))

    def info(self, job_id: str) -> Any:
        return _call(self.address, f"reading job {job_id!r}", self.client.get_job_info, job_id,
                     job_id=job_id)

    def status(self, job_id: str) -> str:
        return str(_call(self.address, f"reading job {job_id!r}", self.client.get_job_status,
                         job_id, job_id=job_id))

    def logs(self, job_id: str) -> str:
        return _call(self.address, f"reading the logs of job {job_id!r}",
                     self.client.get_job_logs, job_id, job_id=job_id)

    def stop(self, job_id: str) -> bool:
        return _call(self.address, f"stopping job {job_id!r}", self.client.stop_job, job_id,
                     job_id=job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> str:
        """Poll until the job reaches a terminal status (or ``timeout``); the last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(poll)

    def follow(self, job_id: str, out: TextIO = sys.stdout) -> str:
        """Stream the job's logs to ``out`` until it ends; its final status. Falls back to
        polling ``get_job_logs`` when the log websocket is not available (e.g. a proxy)."""
        written = 0

        async def tail() -> None:
            nonlocal written
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()
                written += len(chunk)

        self.status(job_id)  # unknown ids fail here, with the JobNotFound message
        try:
            asyncio.run(tail())
        except Exception:
            while True:
                logs = self.logs(job_id)
                if len(logs) > written:
                    out.write(logs[written:])
                    out.flush()
                    written = len(logs)
                if self.status(job_id) in TERMINAL:
                    break
                time.sleep(2.0)
        return self.wait(job_id)


def describe_job(info: Any) -> dict[str, Any]:
    """A JSON-able summary of a JobDetails."""
    def ts(ms: int | None) -> str | None:
        return (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))
                if ms else None)

    from vgen_core.tracking.redact import redact_config, redact_text

    start, end = getattr(info, "start_time", None), getattr(info, "end_time", None)
    message = getattr(info, "message", None)
    return {
        "submission_id": getattr(info, "submission_id", None),
        "job_id": getattr(info, "job_id", None),
        "status": str(info.status),
        "message": redact_text(message) if message is not None else None,
        "entrypoint": redact_text(info.entrypoint),
        "start_time": ts(start), "end_time": ts(end),
        "seconds": round((end - start) / 1000, 1) if start and end else None,
        "metadata": redact_config(dict(getattr(info, "metadata", None) or {})),
    }


# ---------------------------------------------------------------------------------------------
# cluster resources (vgen plan --cluster)
# ---------------------------------------------------------------------------------------------


def cluster_resources(address: str | None) -> dict[str, Any]:
    """CPUs, GPUs and nodes of the live nodes of the cluster at ``address`` (through the Ray
    state API, so a dashboard URL works as well as a GCS address)."""
    headers = auth_headers()
    address = _normalize(resolve_address(address), headers)
    _probe(address, headers)
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    def list_alive():  # list_nodes() with vgen's token header
        client = StateApiClient(address=address,
                                headers={"Content-Type": "application/json", **headers})
        return client.list(StateResource.NODES, ListApiOptions(
            timeout=30, filters=[("state", "=", "ALIVE")]), raise_on_missing_output=True)

    with _explicit_address():
        nodes = _call(address, "listing the nodes", list_alive)
    per_node = []
    for n in nodes:
        res = dict(getattr(n, "resources_total", None) or {})
        per_node.append({"node_id": n.node_id, "ip": getattr(n, "node_ip", None),
                         "head": bool(getattr(n, "is_head_node", False)),
                         "CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))})
    return {"address": address, "nodes": len(per_node),
            "CPU": sum(n["CPU"] for n in per_node), "GPU": sum(n["GPU"] for n in per_node),
            "per_node": per_node}


def stage_allocations(dag: Any, cluster: dict[str, float]) -> dict[str, dict[str, Any]]:
    """What each stage would get on a cluster of these resources, by the same rules the runner
    uses (:func:`pipelines.dag.ray_exec.pool_size` / ``actor_cpus``; Ray Train stages take
    ``resources.workers`` workers with their CPUs shrunk to fit)."""
    from pipelines.dag.ray_exec import RESERVED_CPUS, actor_cpus, pool_size
    from pipelines.stages import get_kind

    out: dict[str, dict[str, Any]] = {}
    for name in dag.order:
        st = dag.stage(name)
        res = st.resources
        kind = get_kind(st.uses)
        if hasattr(kind, "ray_run_name"):  # a Ray Train stage (pipelines/stages/train.py)
            workers = res.workers
            cpus = min(res.cpus, max((cluster.get("CPU", 0.0) - RESERVED_CPUS) / workers, 0.25))
            fits = workers * res.gpus <= cluster.get("GPU", 0.0)
            entry = {"mode": "train", "workers": workers, "cpus_per_worker": round(cpus, 3),
                     "gpus_per_worker": res.gpus, "fits": fits}
            text = f"train {workers} worker(s) x {cpus:g} CPU" + (
                f" + {res.gpus:g} GPU" if res.gpus else "")
            if not fits:
                text += f" (needs {workers * res.gpus:g} GPUs; the cluster has " \
                        f"{cluster.get('GPU', 0.0):g}: it waits for the autoscaler)"
        else:
            n = pool_size(res, cluster)
            cpus = actor_cpus(res, cluster)
            fits = res.gpus <= 0 or cluster.get("GPU", 0.0) >= res.gpus
            entry = {"mode": "actor_pool", "pool_max": n, "cpus_per_actor": cpus,
                     "gpus_per_actor": res.gpus, "fits": fits}
            text = f"actor pool 1..{n} x {cpus:g} CPU" + (
                f" + {res.gpus:g} GPU" if res.gpus else "")
            if res.workers > n:
                text += f" (workers: {res.workers} capped by the cluster)"
            if not fits:
                text += " (no GPU in the cluster: it waits for the autoscaler)"
        entry["text"] = text
        out[name] = entry
    return out
