"""The runner's memory: one Delta table (``_vgen/stage_runs``) of stage state changes.

A row is appended when a stage starts, completes or fails, with its fingerprint (and the parts
it was made of), its outputs (table URIs + versions, model digests), counts and MLflow run id.
Being a Delta table on the storage root, it lives wherever the data lives (local or S3), and the
history of every DAG run can be queried like any other table.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vgen_core.data.schemas import STAGE_RUNS

from .fingerprint import canonical_json

STATE_TABLE = "_vgen/stage_runs"


class StageState:
    def __init__(self, store: Any):
        self.store = store

    def records(self, dag: str) -> list[dict[str, Any]]:
        """Every record of ``dag``, oldest first, with JSON fields decoded."""
        if not self.store.exists(STATE_TABLE):
            return []
        t = self.store.read(STATE_TABLE)
        t = t.filter(pc.equal(t["dag"], dag))
        recs = t.to_pylist()
        recs.sort(key=lambda r: r["recorded_at"])
        for r in recs:
            for k in ("fingerprint_parts", "outputs", "counts"):
                r[k] = json.loads(r[k]) if r[k] else {}
        return recs

    def compact(self, min_files: int = 64) -> bool:
        """Compact the records table once it has ``min_files`` data files (every record is one
        small file; reading them is part of every plan). See `TableStore.compact`."""
        return self.store.compact(STATE_TABLE, min_files=min_files)

    def latest(self, dag: str) -> tuple[dict[str, dict], dict[str, dict]]:
        """(latest record per stage, latest *completed* record per stage)."""
        last: dict[str, dict] = {}
        done: dict[str, dict] = {}
        for r in self.records(dag):
            last[r["stage"]] = r
            if r["status"] == "completed":
                done[r["stage"]] = r
        return last, done

    def record(self, *, dag: str, stage: str, kind: str, fingerprint: str,
               parts: dict[str, Any], status: str, run_id: str | None = None,
               outputs: dict[str, Any] | None = None, counts: dict[str, int] | None = None,
               error: str | None = None) -> None:
        row = {
            "dag": dag, "stage": stage, "kind": kind, "fingerprint": fingerprint,
            "fingerprint_parts": canonical_json(parts), "status": status,
            "mlflow_run_id": run_id, "outputs": canonical_json(outputs or {}),
            "counts": canonical_json(counts or {}), "error": error,
            "recorded_at": dt.datetime.now(dt.timezone.utc),
        }
        self.store.append(STATE_TABLE, pa.Table.from_pylist([row], schema=STAGE_RUNS),
                          commit_metadata={"vgen.stage": stage, "vgen.status": status})
