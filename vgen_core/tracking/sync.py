"""Replay fallback records into a tracking store (what `vgen tracking sync` does).

While MLflow is unreachable an `MlflowTracker` appends what it would have logged to
`<fallback_dir>/<run_id>.jsonl` (`mlflow_tracker._Fallback`). `sync_records` reads every such
file of a directory and replays it:

* a run that never reached MLflow (`offline-<hex>`) becomes a new run, in the experiment its
  "start" record names (a child run: in its parent's experiment, nested under the parent's new
  run), tagged `vgen.synced_from=<offline id>`;
* a run that exists in the target store (the outage began mid-run) gets its records back; a
  real run id the target does not know (records replayed into another store) becomes a new run
  too;
* params, metrics (at their original time and step), tags, images (from the PNG files beside
  the records), text and dict artifacts and table inputs are replayed; a "finish" record ends
  the run with its status and time. Model registrations are not replayed (register again from
  the run's artifacts); they are listed as skipped.

A replayed file is renamed `<run_id>.jsonl.synced` and the id mapping is kept in
`synced.json`, so a second sync replays nothing twice and a child synced later still finds its
parent. A record the store rejects (an MLflow param logged twice with different values) is
reported and the sync goes on; a store that stops answering aborts it, leaving the files of the
runs not finished for the next sync. Records were redacted when written: a secret is never
replayed, it was never stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from vgen_core.tracking.mlflow_tracker import (
    _METRICS_PER_BATCH,
    _PARAMS_PER_BATCH,
    TrackingServerUnavailable,
    _artifact_location_for,
    _chunks,
    _ensure_sqlite_dir,
    _get_or_create_experiment,
    _key,
    _probe,
    _table_dataset,
    default_fallback_dir,
)
from vgen_core.tracking.redact import redact_text, redact_uri

__all__ = ["SyncResult", "sync_records"]

MAP_FILE = "synced.json"
SYNCED_SUFFIX = ".synced"
#: record kinds that describe a run rather than log something into it
_META_KINDS = frozenset({"start", "attach", "child"})
_NOT_REPLAYED = frozenset({"register_model", "tag_model_versions"})


@dataclass
class SyncResult:
    """What one sync did. ``runs`` maps each replayed source run id to its run in the target."""

    tracking_uri: str
    files: int = 0
    records: int = 0
    runs: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {"tracking_uri": redact_uri(self.tracking_uri), "files": self.files,
                "records": self.records, "runs": self.runs, "created": self.created,
                "skipped": self.skipped, "failed": self.failed}


def _read(path: Path, result: SyncResult) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            result.failed.append(f"{path.name}:{n}: not a JSON record ({e})")
    return records


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


class _Replayer:
    def __init__(self, client: MlflowClient, tracking_uri: str, files: dict[str, list[dict]],
                 mapping: dict[str, str], experiment: str, artifact_location: str | None,
                 result: SyncResult) -> None:
        self.client, self.uri, self.files = client, tracking_uri, files
        self.mapping, self.experiment = mapping, experiment
        self.artifact_location = artifact_location or _artifact_location_for(tracking_uri)
        self.result = result
        self._resolving: set[str] = set()

    def _exists(self, run_id: str) -> bool:
        if run_id.startswith("offline-"):
            return False
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            self._check_server()
            return False

    def _check_server(self) -> None:
        reason = _probe(self.uri)
        if reason is not None:
            raise TrackingServerUnavailable(
                f"tracking server {redact_uri(self.uri)} stopped answering ({reason})")

    def target(self, source: str) -> str | None:
        """The target store's run for ``source`` (created when needed); None when unknown."""
        if source in self.mapping:
            return self.mapping[source]
        if source not in self.files:
            return source if self._exists(source) else None
        if self._exists(source):
            self.mapping[source] = source
            return source
        if source in self._resolving:  # a parent cycle in corrupt records: stop here
            return None
        self._resolving.add(source)
        records = self.files[source]
        start = next((r.get("data") or {} for r in records if r.get("kind") == "start"), {})
        parent = start.get("parent_run_id")
        parent_target = self.target(parent) if parent else None
        if start.get("experiment"):
            location = start.get("artifact_location") or self.artifact_location
            experiment_id = _get_or_create_experiment(self.client, start["experiment"], location)
        elif parent_target:
            experiment_id = self.client.get_run(parent_target).info.experiment_id
        else:
            experiment_id = _get_or_create_experiment(self.client, self.experiment,
                                                      self.artifact_location)
        tags = {str(k): str(v) for k, v in (start.get("tags") or {}).items()}
        tags["vgen.synced_from"] = source
        if parent_target:
            tags[MLFLOW_PARENT_RUN_ID] = parent_target
        times = [t for r in records if (t := r.get("time")) is not None]
        first = min(times, default=None)
        run = self.client.create_run(
            experiment_id, run_name=start.get("run_name") or source, tags=tags,
            start_time=int(first * 1000) if first is not None else None)
        target = run.info.run_id
        self.mapping[source] = target
        self.result.created.append(target)
        self._resolving.discard(source)
        return target

    def replay(self, source: str, name: str) -> bool:
        """Replay one file's records; False when there was no run to replay them into."""
        run_id = self.target(source)
        if run_id is None:
            self.result.failed.append(f"{name}: no run to replay into")
            return False
        finish: dict[str, Any] | None = None
        for n, rec in enumerate(self.files[source], 1):
            kind, data = rec.get("kind"), rec.get("data") or {}
            if kind in _META_KINDS:
                continue
            if kind in _NOT_REPLAYED:
                self.result.skipped.append(f"{name}:{n}: {kind} is not replayed "
                                           "(register again from the run's artifacts)")
                continue
            if kind == "finish":
                finish = rec
                continue
            try:
                self._apply(run_id, kind, data, rec.get("time"))
                self.result.records += 1
            except Exception as e:  # a rejected record: report it, go on (unless the store left)
                self._check_server()
                self.result.failed.append(
                    f"{name}:{n}: {kind}: {redact_text(f'{type(e).__name__}: {e}')[:300]}")
        if finish is not None:
            t = finish.get("time")
            self.client.set_terminated(run_id, status=(finish.get("data") or {}).get(
                "status", "FINISHED"), end_time=int(t * 1000) if t is not None else None)
            self.result.records += 1
        return True

    def _apply(self, run_id: str, kind: str | None, data: Mapping[str, Any],
               t: float | None) -> None:
        c = self.client
        if kind == "params":
            params = [Param(_key(k), str(v)) for k, v in data.items()]
            for chunk in _chunks(params, _PARAMS_PER_BATCH):
                c.log_batch(run_id, params=chunk, synchronous=True)
        elif kind == "metrics":
            ts = int((t or 0) * 1000)
            step = int(data.get("step") or 0)
            batch = [Metric(_key(k), float(v), ts, step)
                     for k, v in (data.get("metrics") or {}).items()]
            for metric_chunk in _chunks(batch, _METRICS_PER_BATCH):
                c.log_batch(run_id, metrics=metric_chunk, synchronous=True)
        elif kind == "tags":
            tags = [RunTag(_key(k), str(v)) for k, v in data.items()]
            for tag_chunk in _chunks(tags, _PARAMS_PER_BATCH):
                c.log_batch(run_id, tags=tag_chunk, synchronous=True)
        elif kind == "image":
            import numpy as np
            from PIL import Image

            path = Path(str(data.get("path", "")))
            if not path.is_file():
                raise FileNotFoundError(f"image file {path} is missing")
            image = np.asarray(Image.open(path))
            image_step = data.get("step")
            if image_step is None:
                c.log_image(run_id, image, artifact_file=f"{data['name']}.png")
            else:
                c.log_image(run_id, image, key=data["name"], step=int(image_step),
                            synchronous=True)
        elif kind == "text":
            c.log_text(run_id, str(data["text"]), data["artifact_file"])
        elif kind == "dict":
            c.log_dict(run_id, dict(data["dict"]), data["artifact_file"])
        elif kind == "dataset_input":
            dataset = _table_dataset(data["name"], data["uri"], data["version"],
                                     data.get("num_rows"), data.get("digest"))
            context = data.get("context") or "input"
            c.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag(
                MLFLOW_DATASET_CONTEXT, context)])])
        else:
            raise ValueError(f"unknown record kind {kind!r}")


def sync_records(tracking_uri: str, records_dir: str | Path | None = None, *,
                 experiment: str = "vgen-offline",
                 artifact_location: str | None = None) -> SyncResult:
    """Replay every `<run_id>.jsonl` under ``records_dir`` (default `$TMPDIR/vgen-tracking`)
    into ``tracking_uri`` (see the module docstring).

    Args:
        experiment: for runs whose records name no experiment (a worker's records of a run
            whose driver records are gone).
        artifact_location: for experiments this sync creates (default: beside a SQLite store,
            the server's choice otherwise).

    Raises:
        TrackingServerUnavailable: the target does not answer (before or during the sync).
    """
    directory = Path(records_dir) if records_dir else default_fallback_dir()
    result = SyncResult(tracking_uri)
    reason = _probe(tracking_uri)
    if reason is not None:
        raise TrackingServerUnavailable(
            f"tracking server {redact_uri(tracking_uri)} is unreachable ({reason})")
    paths = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    map_path = directory / MAP_FILE
    mapping: dict[str, str] = {}
    if map_path.is_file():
        try:
            mapping = {str(k): str(v) for k, v in json.loads(map_path.read_text()).items()}
        except (OSError, ValueError):
            mapping = {}
    files = {p.stem: _read(p, result) for p in paths}
    if not files:
        return result
    _ensure_sqlite_dir(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    replayer = _Replayer(client, tracking_uri, files, mapping, experiment, artifact_location,
                         result)
    try:
        for p in paths:
            if not replayer.replay(p.stem, p.name):
                continue  # kept for a later sync
            result.files += 1
            result.runs[p.stem] = mapping[p.stem]
            p.rename(p.with_name(p.name + SYNCED_SUFFIX))
    finally:
        if mapping:
            _write_private(map_path, json.dumps(mapping, indent=1, sort_keys=True))
    return result
