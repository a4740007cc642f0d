"""`MlflowTracker`: the `Tracker` protocol over an explicit `MlflowClient`.

Design decisions (read these before changing anything here):

* No global MLflow state. Every call goes through this tracker's own `MlflowClient` with an
  explicit run id; `mlflow.start_run` / `mlflow.set_tracking_uri` are never used. Several
  trackers (a DAG run and its stage runs, two DAGs in one process) coexist, and a worker
  process can write into a run that the driver opened (`MlflowTracker.attach`).
* Runs are opened by the driver (`MlflowTracker.start`). Workers attach; on a Ray Train job only
  rank 0 attaches. An attached tracker does not end the run on `finish()` unless `owner=True`
  (a restarted driver resuming its run).
* The tracking backend never kills a run. Each call catches any exception, logs one warning per
  run family (a run and its children) naming the cause, and appends what it would have recorded
  as a JSON line to `<fallback_dir>/<run_id>.jsonl`; images go beside it as PNG files. The
  default `fallback_dir` is `$TMPDIR/vgen-tracking` (`tempfile.gettempdir()`), so nothing is
  written next to the data; pass a directory on persistent storage in long jobs. If the run
  itself cannot be created, the tracker is offline: its `run_id` is `offline-<hex>`, and every
  record goes straight to the fallback file without contacting the backend again. Fallback
  files are created with mode 0600 (their directory 0700); `vgen tracking sync` replays them
  into a tracking store later (`vgen_core.tracking.sync`).
* Outages are noticed once, not per call. For an `http(s)://` server the tracker first probes
  it (`_probe`: one `GET /health` bounded by PROBE_TIMEOUT_S = 2 s; a connection error, a
  timeout or a 5xx answer means down). While it is down every call goes straight to the fallback
  file without touching the network; it is probed again only after a back-off (RETRY_AFTER_S,
  doubling up to RETRY_AFTER_MAX_S), and calls go to MLflow again once it answers. The state is
  shared by every tracker of the process that talks to the same server. Only the call that
  runs into an outage mid-run still pays MLflow's HTTP policy (MLFLOW_HTTP_REQUEST_TIMEOUT and
  MLFLOW_HTTP_REQUEST_MAX_RETRIES, defaults 120 s and 7 retries); the probe that follows its
  failure marks the server down for the calls after it.
* Secrets are redacted (`vgen_core.tracking.redact`) in params, tags, warnings, `repr` and
  fallback records: a tracking URI `http://user:pw@host` shows as `http://***@host`, values of
  credential-like keys as `***`.
* Stores. The default store is SQLite (`default_tracking_uri`). MLflow 3 refuses the old file
  store (`./mlruns`, `file://`) unless MLFLOW_ALLOW_FILE_STORE=true, so it is not used.
  For a local storage root, the database is `<root>/mlflow.db` and artifacts `<root>/mlartifacts`.
  For an `s3://` (or other remote) root, SQLite cannot live in the bucket (it needs file locks),
  so the database is `~/.cache/vgen/mlflow.db` (`$XDG_CACHE_HOME` respected) on the driver's
  machine, while artifacts go to `<root>/mlartifacts` in the bucket (`default_artifact_location`)
  so checkpoints and images are shared. On a multi-node cluster give an MLflow server
  (`http://...`) instead: a SQLite file is visible to one machine only.
* Experiments are created with an explicit artifact location (MLflow's own default is relative
  to the working directory). An existing experiment keeps the location it was created with; a
  mismatch is reported once as a warning.
* Experiments are model training: tag `mlflow.experimentKind` = `custom_model_development` at
  creation, and on an existing experiment that has no kind (a kind someone set is kept). MLflow
  3.17's UI lays a page out by its `workflowType` URL parameter rather than by this tag, so
  links into the UI come from `mlflow_ui_url` (docs/tracking.md).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from vgen_core.tracking.base import (
    FinishOnExit,
    check_status,
    MAX_KEY_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    Tracker,
    _truncate,
    flatten_params,
    metric_value,
    to_uint8_image,
)
from vgen_core.tracking.locations import default_artifact_location, default_tracking_uri
from vgen_core.tracking.redact import redact_config, redact_text, redact_uri

# MLflow's SQLAlchemy store triggers a SQLAlchemy deprecation warning (`noload`) when it is first
# built; it is MLflow's to fix and says nothing to our users, so it is silenced for mlflow only.
warnings.filterwarnings(
    "ignore", message=r".*noload.*", category=DeprecationWarning, module=r"mlflow\."
)

__all__ = [
    "MlflowTracker",
    "TrackingServerUnavailable",
    "default_artifact_location",
    "default_fallback_dir",
    "default_tracking_uri",
    "mlflow_ui_url",
    "register_model",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
_BAD_NAME_CHARS = re.compile(r"[^\w./\- :]")  # MLflow accepts alphanumerics, _ . / - space colon


# --------------------------------------------------------------------------- storage defaults


# default_tracking_uri, default_artifact_location: vgen_core.tracking.locations (no mlflow)


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _artifact_location_for(tracking_uri: str) -> str | None:
    """Artifacts beside a SQLite database; None (the server's choice) for other stores."""
    db = _sqlite_path(tracking_uri)
    return str(db.resolve().parent / "mlartifacts") if db is not None else None


# --------------------------------------------------------------------------- server health

#: seconds one probe of an http(s) tracking server may take (connect + answer)
PROBE_TIMEOUT_S = 2.0
#: seconds after a failed probe before the server is probed again (doubles per failure)
RETRY_AFTER_S = 30.0
RETRY_AFTER_MAX_S = 300.0


class TrackingServerUnavailable(ConnectionError):
    """The tracking server did not answer its probe; records go to the fallback file."""


def _is_http(tracking_uri: str) -> bool:
    return urlparse(tracking_uri).scheme in ("http", "https")


def _probe(tracking_uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the http(s) tracking server answers within ``timeout`` seconds (any status
    below 500: an auth error still means it is there), else why not. Other URIs: None.

    One `GET <uri>/health` (MLflow's health endpoint); through the scheme's proxy (env
    HTTP(S)_PROXY, unless NO_PROXY covers the host), a TCP connect to the proxy instead."""
    u = urlparse(tracking_uri)
    if u.scheme not in ("http", "https"):
        return None
    try:
        host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:  # a port that is not a number
        return f"invalid tracking URI: {e}"
    if not host:
        return "invalid tracking URI: no host"
    deadline = time.monotonic() + timeout
    proxy = getproxies().get(u.scheme)
    if proxy and not proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        try:
            socket.create_connection((p.hostname, p.port or 80), timeout=timeout).close()
            return None
        except OSError as e:
            return f"proxy {redact_uri(proxy)} unreachable: {type(e).__name__}: {e}"
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(max(0.05, deadline - time.monotonic()))
        conn.request("GET", u.path.rstrip("/") + "/health", headers={"Connection": "close"})
        status = conn.getresponse().status
        return None if status < 500 else f"HTTP {status} from {host}:{port}/health"
    except ssl.SSLError:
        return None  # something speaks TLS there; MLflow's own call says what is wrong with it
    except (OSError, http.client.HTTPException) as e:
        return f"{type(e).__name__}: {str(e) or 'no answer'} ({host}:{port})"
    finally:
        conn.close()


class _Health:
    """Whether one tracking server is up, probed at most once per back-off period.

    Shared by every tracker of the process that talks to that server (`_health_for`), so a DAG
    run, its stage runs and attached trackers notice an outage once."""

    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri
        self.http = _is_http(tracking_uri)
        self.down: str | None = None  # why, while the server is down
        self.checked = False
        self.next_probe = 0.0
        self.backoff = RETRY_AFTER_S
        self._lock = threading.Lock()

    def available(self) -> bool:
        """True when calls may go to the server: probes it on first use and, while it is down,
        again once the back-off has passed (one thread probes, the others wait for it)."""
        if not self.http or (self.checked and self.down is None):
            return True
        with self._lock:
            if self.checked and self.down is None:
                return True
            if self.down is not None and time.monotonic() < self.next_probe:
                return False
            self._probe_now()
            return self.down is None

    def after_failure(self) -> None:
        """A call failed: probe once; if the server does not answer, it is down."""
        if not self.http:
            return
        with self._lock:
            if self.down is None:
                self._probe_now()

    def _probe_now(self) -> None:
        reason = _probe(self.uri)
        self.checked = True
        if reason is None:
            if self.down is not None:
                logger.warning("MLflow tracking server %s answers again; logging to it resumes",
                               redact_uri(self.uri))
            self.down, self.backoff = None, RETRY_AFTER_S
            return
        if self.down is not None:
            self.backoff = min(self.backoff * 2, RETRY_AFTER_MAX_S)
        self.down = redact_text(reason)
        self.next_probe = time.monotonic() + self.backoff

    def error(self) -> TrackingServerUnavailable:
        wait = max(0.0, self.next_probe - time.monotonic())
        return TrackingServerUnavailable(
            f"tracking server {redact_uri(self.uri)} is unreachable ({self.down}); "
            f"next check in {wait:.0f}s"
        )


_HEALTH: dict[str, _Health] = {}
_HEALTH_LOCK = threading.Lock()


def _health_for(tracking_uri: str) -> _Health:
    u = urlparse(tracking_uri)
    key = f"{u.scheme}://{u.netloc}{u.path}" if _is_http(tracking_uri) else "local"
    with _HEALTH_LOCK:
        if key not in _HEALTH:
            _HEALTH[key] = _Health(tracking_uri)
        return _HEALTH[key]


# --------------------------------------------------------------------------- fallback records


def default_fallback_dir() -> Path:
    """`$TMPDIR/vgen-tracking`: where trackers record what the backend did not take, unless
    given a `fallback_dir` (and where `vgen tracking sync` looks by default)."""
    return Path(tempfile.gettempdir()) / "vgen-tracking"


def _private_dir(path: Path) -> None:
    """mkdir -p, the last level 0700; an existing directory of ours is narrowed to 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError:
        pass


class _Fallback:
    """Local JSON-lines record of what the backend did not take. Shared by a run and its
    children, so an outage is announced once per run family. Records are redacted
    (`redact_config`) and files are private (0600 in a 0700 directory)."""

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory else default_fallback_dir()
        self._warned = False
        self._lock = threading.Lock()

    def path(self, run_id: str) -> Path:
        return self.directory / f"{run_id}.jsonl"

    def failed(self, run_id: str, kind: str, data: Mapping[str, Any], error: BaseException) -> None:
        cause = redact_text(f"{type(error).__name__}: {str(error).strip()[:500]}")
        with self._lock:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "MLflow tracking failed for run %s (%s) while logging %s. The run continues; "
                    "records that MLflow does not take are appended to %s (replay them with "
                    "`vgen tracking sync`)",
                    run_id,
                    cause,
                    kind,
                    self.path(run_id),
                )
            else:
                logger.debug("MLflow %s failed for run %s: %s", kind, run_id, cause)
        self.write(run_id, kind, data, cause)

    def write(self, run_id: str, kind: str, data: Mapping[str, Any], error: str) -> None:
        record = {"time": time.time(), "run_id": run_id, "kind": kind,
                  "data": redact_config(dict(data)), "error": redact_text(error)}
        line = json.dumps(record, default=str, sort_keys=True) + "\n"
        try:
            with self._lock:
                _private_dir(self.directory)
                fd = os.open(self.path(run_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    if os.fstat(fd).st_mode & 0o077:  # a file from before files were private
                        os.fchmod(fd, 0o600)
                    f.write(line)
        except OSError as e:  # the last resort failed too: say so, never raise
            logger.warning(
                "could not write tracking fallback record to %s: %s", self.path(run_id), e
            )

    def save_image(self, run_id: str, name: str, image_HWC: np.ndarray, step: int | None) -> str:
        from PIL import Image

        safe = _BAD_NAME_CHARS.sub("_", name).replace("/", "~")
        path = (
            self.directory
            / run_id
            / "images"
            / f"{safe}_step{step if step is not None else 'none'}.png"
        )
        try:
            _private_dir(self.directory)
            _private_dir(path.parent)
            Image.fromarray(image_HWC.squeeze(-1) if image_HWC.shape[-1] == 1 else image_HWC).save(
                path
            )
            os.chmod(path, 0o600)
        except OSError as e:
            return f"<not saved: {e}>"
        return str(path)


# --------------------------------------------------------------------------- names and values


def _key(name: str) -> str:
    """A name MLflow accepts: invalid characters become '_', long names keep a hash suffix."""
    key = _BAD_NAME_CHARS.sub("_", str(name))
    if len(key) > MAX_KEY_LENGTH:
        suffix = "~" + hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
        key = key[: MAX_KEY_LENGTH - len(suffix)] + suffix
    return key


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ensure_sqlite_dir(tracking_uri: str) -> None:
    db = _sqlite_path(tracking_uri)
    if db is not None:
        db.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- the tracker


class MlflowTracker(FinishOnExit):
    """A `Tracker` writing to one MLflow run. Build it with `start` (driver) or `attach`
    (worker); see the module docstring for the failure and storage policy."""

    def __init__(
        self,
        client: MlflowClient | None,
        tracking_uri: str,
        run_id: str,
        experiment_id: str | None,
        *,
        owner: bool,
        fallback: _Fallback,
        offline_reason: str | None = None,
    ) -> None:
        self._client = client
        self._tracking_uri = tracking_uri
        self._run_id = run_id
        self._experiment_id = experiment_id
        self._owner = owner
        self._fallback = fallback
        self._offline_reason = redact_text(offline_reason) if offline_reason else None
        self._finished = False
        self._health = _health_for(tracking_uri)

    # ----------------------------------------------------------------- constructors

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        *,
        artifact_location: str | None = None,
        fallback_dir: str | Path | None = None,
    ) -> MlflowTracker:
        """Open a new run in `experiment` (created if missing) and return its tracker.

        Args:
            tracking_uri: e.g. `default_tracking_uri(storage_root)` or `http://host:5000`.
            experiment: experiment name; created with `artifact_location` when missing.
            run_name: the run's display name.
            tags: run tags; MLflow's context tags (user, source, git commit) are added.
            parent_run_id: makes this a nested run of that run.
            artifact_location: for a new experiment. Default: `<db dir>/mlartifacts` for a
                SQLite store, the server's default otherwise. For an `s3://` storage root pass
                `default_artifact_location(root)`.
            fallback_dir: where records go when MLflow fails (default `$TMPDIR/vgen-tracking`).

        Never raises because of the backend: if the run cannot be created (an http(s) server
        that does not answer its probe within PROBE_TIMEOUT_S is not even asked) the tracker is
        offline (run id `offline-<hex>`) and records only to the fallback file.
        """
        fallback = _Fallback(fallback_dir)
        health = _health_for(tracking_uri)
        try:
            if not health.available():
                raise health.error()
            _ensure_sqlite_dir(tracking_uri)
            client = MlflowClient(tracking_uri=tracking_uri)
            location = artifact_location or _artifact_location_for(tracking_uri)
            experiment_id = _get_or_create_experiment(client, experiment, location)
            all_tags = _context_tags(tags)
            if parent_run_id:
                all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        except Exception as e:  # any backend failure degrades, by design
            run_id = f"offline-{uuid.uuid4().hex}"
            fallback.failed(
                run_id,
                "start",
                {
                    "tracking_uri": redact_uri(tracking_uri),
                    "experiment": experiment,
                    "run_name": run_name,
                    "tags": dict(tags or {}),
                    "parent_run_id": parent_run_id,
                    "artifact_location": artifact_location,
                },
                e,
            )
            if not isinstance(e, TrackingServerUnavailable):
                health.after_failure()
            return cls(
                None,
                tracking_uri,
                run_id,
                None,
                owner=True,
                fallback=fallback,
                offline_reason=f"{type(e).__name__}: {e}",
            )
        return cls(
            client, tracking_uri, run.info.run_id, experiment_id, owner=True, fallback=fallback
        )

    @classmethod
    def attach(
        cls,
        tracking_uri: str,
        run_id: str,
        *,
        owner: bool = False,
        fallback_dir: str | Path | None = None,
    ) -> MlflowTracker:
        """Write into an existing run, e.g. from training rank 0 into the driver's run.

        `finish()` ends the run only when `owner=True` (a restarted driver resuming its own run;
        the run is then marked RUNNING again). A run id that cannot be looked up degrades like
        any other backend failure: a warning, then records go to the fallback file too (calls
        resume once the server answers). A run id `offline-...` (the driver's run was never
        created) makes an offline tracker that writes to that run's fallback file.
        """
        fallback = _Fallback(fallback_dir)
        data = {"tracking_uri": redact_uri(tracking_uri), "owner": owner}
        if run_id.startswith("offline-"):
            fallback.failed(run_id, "attach", data,
                            TrackingServerUnavailable(f"run {run_id} was never created in MLflow"))
            return cls(None, tracking_uri, run_id, None, owner=owner, fallback=fallback,
                       offline_reason="the run is offline")
        health = _health_for(tracking_uri)
        client = None
        experiment_id = None
        try:
            if not health.available():
                client = MlflowClient(tracking_uri=tracking_uri)  # no network: for later calls
                raise health.error()
            client = MlflowClient(tracking_uri=tracking_uri)
            run = client.get_run(run_id)
            experiment_id = run.info.experiment_id
            if owner and run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        except Exception as e:
            if not isinstance(e, TrackingServerUnavailable):
                health.after_failure()
            fallback.failed(run_id, "attach", data, e)
        return cls(client, tracking_uri, run_id, experiment_id, owner=owner, fallback=fallback)

    # ----------------------------------------------------------------- properties

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def client(self) -> MlflowClient | None:
        """The underlying client (None when offline), for reading runs back."""
        return self._client

    @property
    def offline(self) -> bool:
        """True when the run could not be created: everything goes to the fallback file."""
        return self._offline_reason is not None

    @property
    def fallback_path(self) -> Path:
        """The JSON-lines file that receives records MLflow did not take (may not exist yet)."""
        return self._fallback.path(self._run_id)

    # ----------------------------------------------------------------- guarded calls

    def _guard(
        self,
        kind: str,
        data: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
        call: Callable[[MlflowClient], T],
    ) -> T | None:
        """Run `call` on the client; on any failure (or offline, or while the server is known
        to be down) record `data` in the fallback file instead. `data` may be a callable,
        evaluated only when it is needed."""
        if self._client is None or self._offline_reason is not None:
            # The cause is in this file's first record ("start"); no need to repeat it per line.
            self._fallback.write(self._run_id, kind, data() if callable(data) else data, "offline")
            return None
        if not self._health.available():  # no network until the back-off has passed
            self._fallback.failed(self._run_id, kind, data() if callable(data) else data,
                                  self._health.error())
            return None
        try:
            return call(self._client)
        except Exception as e:  # tracking never kills a run
            self._health.after_failure()
            self._fallback.failed(self._run_id, kind, data() if callable(data) else data, e)
            return None

    # ----------------------------------------------------------------- Tracker protocol

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {_key(k): v for k, v in flatten_params(redact_config(dict(params))).items()}

        def call(client: MlflowClient) -> None:
            for chunk in _chunks([Param(k, v) for k, v in flat.items()], _PARAMS_PER_BATCH):
                client.log_batch(self._run_id, params=chunk, synchronous=True)

        self._guard("params", flat, call)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *,
                    timestamp_ms: int | None = None) -> None:
        """As `Tracker.log_metrics`; ``timestamp_ms`` (default now) is when they were taken (a
        `SidecarTracker` passes the driver's time)."""
        values = {_key(k): metric_value(k, v) for k, v in metrics.items()}
        timestamp = _now_ms() if timestamp_ms is None else int(timestamp_ms)

        def call(client: MlflowClient) -> None:
            batch = [Metric(k, v, timestamp, int(step or 0)) for k, v in values.items()]
            for chunk in _chunks(batch, _METRICS_PER_BATCH):
                client.log_batch(self._run_id, metrics=chunk, synchronous=True)

        self._guard("metrics", {"step": step, "metrics": values}, call)

    def log_image(self, name: str, image: np.ndarray, step: int | None = None) -> None:
        image_HWC = to_uint8_image(image)
        key = _key(name)

        def call(client: MlflowClient) -> None:
            if step is None:
                client.log_image(self._run_id, image_HWC, artifact_file=f"{key}.png")
            else:
                client.log_image(self._run_id, image_HWC, key=key, step=int(step), synchronous=True)

        def record() -> dict[str, Any]:
            path = self._fallback.save_image(self._run_id, key, image_HWC, step)
            return {"name": key, "step": step, "path": path}

        self._guard("image", record, call)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard(
            "text",
            {"artifact_file": artifact_file, "text": text},
            lambda c: c.log_text(self._run_id, text, artifact_file),
        )

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self._guard(
            "dict",
            {"artifact_file": artifact_file, "dict": d},
            lambda c: c.log_dict(self._run_id, dict(d), artifact_file),
        )

    def log_table_input(
        self,
        name: str,
        uri: str,
        version: int,
        num_rows: int | None = None,
        digest: str | None = None,
        context: str = "input",
    ) -> None:
        """Record a Delta table as an MLflow dataset input.

        The dataset has source_type "delta_table" and source `{"path": uri,
        "delta_table_version": version}` (the JSON `mlflow.data.get_source` resolves to a
        DeltaDatasetSource); its profile holds num_rows, the version and the content digest.
        MLflow's digest field is a 16-hex hash of (uri, version, digest): MLflow deduplicates
        datasets by name and digest, so each table version must get its own. MLflow has no
        dataset outputs; a table a run writes is logged with context "output".
        """
        uri = redact_uri(uri)
        dataset = _table_dataset(name, uri, version, num_rows, digest)
        data = {
            "name": name,
            "uri": uri,
            "version": version,
            "num_rows": num_rows,
            "digest": digest,
            "context": context,
        }
        self._guard(
            "dataset_input",
            data,
            lambda c: c.log_inputs(
                self._run_id,
                datasets=[DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])],
            ),
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {_key(k): _truncate(str(v), MAX_TAG_VALUE_LENGTH)
                  for k, v in redact_config(dict(tags)).items()}

        def call(client: MlflowClient) -> None:
            for chunk in _chunks([RunTag(k, v) for k, v in values.items()], _PARAMS_PER_BATCH):
                client.log_batch(self._run_id, tags=chunk, synchronous=True)

        self._guard("tags", values, call)

    def child(self, name: str) -> MlflowTracker:
        """A nested run (tag mlflow.parentRunId) in the same experiment, sharing this tracker's
        client and fallback; an offline parent gives an offline child."""
        if self._client is None or self._experiment_id is None or self.offline:
            child_id = f"offline-{uuid.uuid4().hex}"
            self._fallback.write(
                child_id,
                "start",
                {"run_name": name, "parent_run_id": self._run_id},
                f"offline: parent {self._run_id} is not tracked",
            )
            return MlflowTracker(
                None,
                self._tracking_uri,
                child_id,
                None,
                owner=True,
                fallback=self._fallback,
                offline_reason=self._offline_reason or "parent not tracked",
            )
        tags = {MLFLOW_PARENT_RUN_ID: self._run_id}
        experiment_id = self._experiment_id  # not None here (the offline case returned above)
        run = self._guard(
            "child",
            {"run_name": name},
            lambda c: c.create_run(experiment_id, run_name=name, tags=_context_tags(tags)),
        )
        if run is None:
            child_id = f"offline-{uuid.uuid4().hex}"
            self._fallback.write(
                child_id,
                "start",
                {"run_name": name, "parent_run_id": self._run_id},
                "offline: the child run could not be created",
            )
            return MlflowTracker(
                None,
                self._tracking_uri,
                child_id,
                None,
                owner=True,
                fallback=self._fallback,
                offline_reason="child run could not be created",
            )
        return MlflowTracker(
            self._client,
            self._tracking_uri,
            run.info.run_id,
            self._experiment_id,
            owner=True,
            fallback=self._fallback,
        )

    def reattach(self, run_id: str) -> MlflowTracker | None:
        """An earlier run of this tracking store reopened as its owner (a stage that resumes
        the run of its interrupted attempt), or None when it cannot be: this tracker or that
        run is offline, or the run cannot be read."""
        if self.offline or self._client is None or run_id.startswith("offline-"):
            return None
        try:
            self._client.get_run(run_id)
        except Exception:
            return None
        return MlflowTracker.attach(self._tracking_uri, run_id, owner=True)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (a no-op for a non-owner attached tracker, and after the first call)."""
        check_status(status)
        if self._finished or not self._owner:
            return
        self._finished = True
        self._guard(
            "finish", {"status": status}, lambda c: c.set_terminated(self._run_id, status=status)
        )

    def __repr__(self) -> str:
        state = "offline" if self.offline else ("owner" if self._owner else "attached")
        return (
            f"MlflowTracker(run_id={self._run_id!r}, "
            f"tracking_uri={redact_uri(self._tracking_uri)!r}, {state})"
        )


def _context_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """User tags plus MLflow's context tags (mlflow.user, mlflow.source.*, git commit)."""
    user = {_key(k): _truncate(str(v), MAX_TAG_VALUE_LENGTH)
            for k, v in redact_config(dict(tags or {})).items()}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        # context tags may hold a URI with a token (mlflow.source.git.repoURL): redacted too
        return {str(k): redact_text(str(v)) for k, v in resolve_tags(user).items()}
    except Exception:  # context tags are a nicety
        return user


def _table_dataset(name: str, uri: str, version: int, num_rows: int | None,
                   digest: str | None) -> Dataset:
    """The MLflow dataset entity `log_table_input` records (see there)."""
    source = json.dumps({"path": uri, "delta_table_version": int(version)}, sort_keys=True)
    profile = json.dumps(
        {"num_rows": num_rows, "delta_table_version": int(version), "content_digest": digest},
        sort_keys=True,
    )
    key = f"{uri}@{int(version)}:{digest or ''}"
    return Dataset(
        name=name[:500],
        digest=hashlib.blake2b(key.encode(), digest_size=8).hexdigest(),
        source_type="delta_table",
        source=source,
        profile=profile,
    )


#: MLflow 3's experiment-type tag (MLflow has no Python constant for it; its UI's ExperimentKind)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: the ExperimentKind of classic ML / deep-learning training ("Model training" in the UI)
MODEL_TRAINING_KIND = "custom_model_development"
#: MLflow 3.17's UI takes its layout from a `workflowType` URL parameter (else the browser's
#: last choice, else GenAI), not from the tag: vgen's links carry it (`mlflow_ui_url`)
_UI_WORKFLOW = "workflowType=machine_learning"


def mlflow_ui_url(base_url: str, experiment_id: str | None = None, run_id: str | None = None,
                  tab: str | None = None) -> str:
    """A link into the MLflow UI at `base_url` that opens in its model-training layout.

    `tab`: a run page tab (``model-metrics``: the charts, ``artifacts``, ...) or an experiment
    page tab (``runs``, ``models``). docs/tracking.md says why the link carries the layout."""
    path = "/experiments"
    if experiment_id is not None:
        path += f"/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
        path += f"/{tab.strip('/')}" if tab else ""
    elif run_id or tab:
        raise ValueError("a run or tab link needs the experiment id")
    return f"{base_url.rstrip('/')}/#{path}?{_UI_WORKFLOW}"


def _mark_model_training(client: MlflowClient, experiment_id: str, name: str) -> None:
    """Give an existing experiment without a kind (made by an older vgen, or by hand) the
    model-training kind. Best effort: the tag picks a UI layout and never stops a run (a user
    who may log runs but not edit the experiment, a store going away, ...)."""
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    except Exception as e:
        logger.info("MLflow experiment %r: could not set %s (%s)", name, EXPERIMENT_KIND_TAG,
                    redact_text(f"{type(e).__name__}: {e}"))


def _get_or_create_experiment(
    client: MlflowClient, name: str, artifact_location: str | None
) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            # a model-training experiment: MLflow UIs that read the kind open it on its runs
            # table, not the GenAI overview (3.17 also needs the link's `workflowType`)
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # lost a creation race: use theirs
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        logger.warning("MLflow experiment %r was deleted; restoring it to log a new run", name)
        client.restore_experiment(experiment.experiment_id)
    if not (experiment.tags or {}).get(EXPERIMENT_KIND_TAG):  # a kind someone chose is kept
        _mark_model_training(client, experiment.experiment_id, name)
    if artifact_location and experiment.artifact_location.rstrip("/") not in (
        artifact_location.rstrip("/"),
        f"file://{artifact_location}".rstrip("/"),
    ):
        logger.warning(
            "MLflow experiment %r keeps the artifact location it was created with (%s), not %s; "
            "use another experiment name to store artifacts at the new location",
            name,
            experiment.artifact_location,
            artifact_location,
        )
    return experiment.experiment_id


# --------------------------------------------------------------------------- model registry


def register_model(
    tracker: Tracker,
    name: str,
    local_dir: str | Path | None = None,
    *,
    artifact_path: str = "model",
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> int | None:
    """Log exported weights as run artifacts and register them as a new model version.

    Args:
        tracker: the run that produced the model. Anything but an `MlflowTracker` (e.g. a
            `NullTracker`) registers nothing and returns None.
        name: registered model name (created on first use).
        local_dir: directory to upload (safetensors weights + config). When None,
            `artifact_path` must already hold the model in the run.
        artifact_path: run-relative directory for the files. If it is already taken in this run
            a suffix is added ("model-2", ...) so earlier versions keep their files.
        tags, description: set on the model version.

    Returns:
        The new version number (1, 2, ...), or None if nothing was registered (backend failure,
        recorded in the fallback file like every other tracking failure).
    """
    if local_dir is not None and not Path(local_dir).is_dir():
        raise ValueError(
            f"register_model({name!r}): local_dir {str(local_dir)!r} is not a directory"
        )
    remote = getattr(tracker, "remote_call", None)
    if remote is not None:  # a SidecarTracker: the tracking process registers
        return remote("register_model", name, str(local_dir) if local_dir else None,
                      artifact_path=artifact_path, tags=dict(tags or {}),
                      description=description)
    if not isinstance(tracker, MlflowTracker):
        return None
    run_id = tracker.run_id
    data = {
        "name": name,
        "local_dir": str(local_dir) if local_dir else None,
        "artifact_path": artifact_path,
    }

    def call(client: MlflowClient) -> int:
        path = artifact_path.strip("/")
        if local_dir is not None:
            base, k = path, 1
            while client.list_artifacts(run_id, path):
                k += 1
                path = f"{base}-{k}"
            client.log_artifacts(run_id, str(local_dir), path)
        data["artifact_path"] = path
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={str(key): str(value) for key, value in (tags or {}).items()},
            description=description,
            await_creation_for=0,
        )
        return int(version.version)

    return tracker._guard("register_model", data, call)


def tag_model_versions(tracker: Tracker, digest: str, tags: Mapping[str, Any]) -> list[str]:
    """Set ``tags`` (e.g. an evaluation's metrics) on every registered model version whose
    ``vgen.digest`` tag is ``digest`` (the weights an evaluation scored), so the registry shows
    each version with its scores. Returns the ``name/version`` it tagged (empty when untracked,
    when no version holds those weights, or on a backend failure, which is recorded in the
    fallback file)."""
    remote = getattr(tracker, "remote_call", None)
    if remote is not None:  # a SidecarTracker: the tracking process tags
        return remote("tag_model_versions", digest, dict(tags)) or []
    if not isinstance(tracker, MlflowTracker):
        return []

    def call(client: MlflowClient) -> list[str]:
        done = []
        for mv in client.search_model_versions(f"tags.`vgen.digest` = '{digest}'"):
            if mv.tags.get("vgen.digest") != digest:
                continue
            for key, value in tags.items():
                client.set_model_version_tag(mv.name, mv.version, str(key), str(value))
            done.append(f"{mv.name}/{mv.version}")
        return done

    return tracker._guard("tag_model_versions", {"digest": digest, "tags": dict(tags)},
                          call) or []
