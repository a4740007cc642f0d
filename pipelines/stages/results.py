"""Results tables of evaluate stages (:data:`~vgen_core.data.schemas.EVAL_RESULTS`, one row per
metric, ``<dag>/<stage>``): writing one run's rows in one commit, and reading back the final
metrics of the run that wrote a recorded table version (``vgen status --json``)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vgen_core.data.schemas import EVAL_RESULTS

__all__ = ["write_results", "final_metrics"]

log = logging.getLogger("vgen.results")


def write_results(store: Any, name: str, *, stage: str, fingerprint: str,
                  metrics: Mapping[str, float], num_samples: int,
                  details: Mapping[str, Any] | None = None,
                  row_details: Mapping[str, Mapping[str, Any]] | None = None,
                  extractor: str | None = None) -> int:
    """Append one row per metric to the results table ``name`` in one commit; returns the
    table version. ``details`` (JSON) goes on every row, merged with ``row_details[metric]``.
    No metrics is an error (StageError naming the stage): an empty append commits nothing, so
    the version returned would be the previous run's, whose metrics would pass for this run's."""
    from .base import StageError

    if not metrics:
        raise StageError(f"stage '{stage}': the evaluation produced no metrics (nothing to "
                         "score: no prediction or ground-truth segment counted); check that the "
                         "predictions refer to the curated images / videos")
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for k, v in metrics.items():
        d = {**(details or {}), **((row_details or {}).get(k) or {})}
        rows.append({"stage": stage, "fingerprint": fingerprint, "metric": k, "value": float(v),
                     "num_samples": int(num_samples), "extractor": extractor,
                     "details": json.dumps(d, sort_keys=True, default=str) if d else None,
                     "recorded_at": now})
    return store.append(name, pa.Table.from_pylist(rows, schema=EVAL_RESULTS),
                        commit_metadata={"vgen.stage": stage, "vgen.fingerprint": fingerprint})


def final_metrics(store: Any, outputs: Mapping[str, Any], output: str = "results"
                  ) -> dict[str, float]:
    """``{metric: value}`` of the run that wrote ``outputs[output]`` (a recorded
    :class:`~pipelines.stages.base.OutputRef` or its JSON): the rows of that table version with
    the latest ``recorded_at`` (every evaluate stage appends a run's rows in one commit).
    ``{}`` when there is no such output or it cannot be read (a status line never fails)."""
    ref = outputs.get(output) if outputs else None
    if ref is None:
        return {}
    get = ref.get if isinstance(ref, Mapping) else (lambda k: getattr(ref, k, None))
    if get("kind") != "table" or not get("name"):
        return {}
    try:
        t = store.read(get("name"), version=get("version"),
                       columns=["metric", "value", "recorded_at"])
    except Exception as e:  # gone, vacuumed, another schema: no metrics, no failure
        log.debug("final_metrics: cannot read %s: %s", get("uri"), e)
        return {}
    if not t.num_rows:
        return {}
    t = t.filter(pc.equal(t["recorded_at"], pc.max(t["recorded_at"])))
    return {m: float(v) for m, v in zip(t["metric"].to_pylist(), t["value"].to_pylist())}
