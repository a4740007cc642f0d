"""The stage contract in-process: incremental work, per-sample quarantine, chunked commits,
error budget. (The same kinds run inside Ray Data in tests/e2e.)"""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.stages.base import (
    BatchResult, InProcessExecutor, MapStage, OutputRef, StageConfig, StageContext, StageError,
)
from vgen_core.data import TableStore, content_digest

OUT = pa.schema([("sample_id", pa.string()), ("content_digest", pa.string()),
                 ("fingerprint", pa.string()), ("doubled", pa.int64())])


class DoubleConfig(StageConfig):
    fail_on: list[str] = []


class Double(MapStage):
    kind = "test.double"
    Config = DoubleConfig
    output_schema = OUT
    calls = 0

    def process_batch(self, batch: pa.Table) -> BatchResult:
        Double.calls += batch.num_rows
        for sid in batch["sample_id"].to_pylist():
            if sid in self.config.fail_on:
                raise ValueError(f"cannot double {sid}")
        return BatchResult(pa.table({
            "sample_id": batch["sample_id"], "content_digest": batch["content_digest"],
            "fingerprint": [self.ctx.row_fingerprint] * batch.num_rows,
            "doubled": pa.array([2 * v for v in batch["value"].to_pylist()], pa.int64())}))


def make_input(store: TableStore, values: dict[str, int]) -> OutputRef:
    t = pa.table({"sample_id": list(values),
                  "content_digest": [content_digest(v) for v in values.values()],
                  "value": list(values.values())})
    if store.exists("t/src"):
        v = store.upsert("t/src", t, keys=["sample_id"])
    else:
        v = store.append("t/src", t)
    return OutputRef("table", "t/src", store.uri("t/src"), version=v)


def run(store, ref, *, fail_on=(), fp="fp1", budget=0.5, chunk=3):
    ctx = StageContext(dag="t", stage="double", store=store, row_fingerprint=fp,
                       inputs={"src": {"samples": ref}}, error_budget=budget, chunk_size=chunk)
    return Double(DoubleConfig(fail_on=list(fail_on)), ctx).run(InProcessExecutor(batch_size=2))


def test_incremental_quarantine_and_chunks(tmp_path):
    store = TableStore(str(tmp_path))
    ref = make_input(store, {f"s/{i}": i for i in range(10)})
    r = run(store, ref, fail_on=["s/3"])
    assert (r.counts.processed, r.counts.skipped, r.counts.quarantined) == (9, 0, 1)
    out = {row["sample_id"]: row["doubled"] for row in store.read("t/double/fp1").to_pylist()}
    assert out == {f"s/{i}": 2 * i for i in range(10) if i != 3}
    (q,) = store.read("t/double__quarantine").to_pylist()
    assert q["sample_id"] == "s/3" and q["check"] == "exception"
    assert "ValueError: cannot double s/3" in q["reason"]
    # 10 samples, chunk 3: several commits (atomic chunks), not one per sample nor one in all
    ops = [v for v in store.versions("t/double/fp1") if v["operation"] != "CREATE TABLE"]
    assert 2 <= len(ops) <= 4

    # re-run, same fingerprint: nothing recomputed (the quarantined sample is done too)
    Double.calls = 0
    r = run(store, ref, fail_on=["s/3"])
    assert (r.counts.processed, r.counts.skipped, r.counts.quarantined) == (0, 10, 0)
    assert Double.calls == 0

    # one changed sample and one new one: only those two computed
    ref = make_input(store, {"s/4": 400, "s/10": 10})
    ctx = StageContext(dag="t", stage="double", store=store, row_fingerprint="fp1",
                       inputs={"src": {"samples": ref}})
    assert Double(DoubleConfig(), ctx).plan_work().breakdown == {
        "new": 1, "changed": 1, "stale_tokenizer": 0}
    ctx.row_fingerprint = "fp2"
    assert Double(DoubleConfig(), ctx).plan_work().breakdown == {
        # 8 unchanged samples only fp1 made; s/3 (quarantined, never written) and s/10 are new
        "new": 2, "changed": 1, "stale_tokenizer": 8}
    r = run(store, ref, fail_on=["s/3"])
    assert (r.counts.processed, r.counts.skipped) == (2, 9)
    assert Double.calls == 2

    # another fingerprint (e.g. new tokenizer weights): everything again, into a new side table;
    # the old one stays readable as it was
    v1 = store.version("t/double/fp1")
    r = run(store, ref, fp="fp2")
    assert r.counts.processed == 11
    assert store.list_tables("t/double") == ["t/double/fp1", "t/double/fp2"]
    assert store.read("t/double/fp2").num_rows == 11
    assert store.read("t/double/fp1").num_rows == 9 + 2 and store.version("t/double/fp1") == v1

    # gc: only the row of s/4's old digest is unreachable; current rows stay
    from pipelines.dag.gc import gc_side_table

    assert gc_side_table(store, "t/double/fp1", "t/src", dry_run=True).stale == 1
    res = gc_side_table(store, "t/double/fp1", "t/src")
    assert res.stale == 1
    rows = store.read("t/double/fp1").to_pylist()
    assert len(rows) == 9 + 1
    assert {r["doubled"] for r in rows if r["sample_id"] == "s/4"} == {800}
    assert gc_side_table(store, "t/double/fp1", "t/src").stale == 0
    assert gc_side_table(store, "t/double/fp2", "t/src").stale == 0


def test_error_budget(tmp_path):
    store = TableStore(str(tmp_path))
    ref = make_input(store, {f"s/{i}": i for i in range(10)})
    with pytest.raises(StageError, match="over the DAG's error_budget 0.1") as e:
        run(store, ref, fail_on=["s/1", "s/2"], budget=0.1)
    assert "t/double__quarantine" in str(e.value)
