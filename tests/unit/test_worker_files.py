"""Payload bytes never pass through the driver: workers write a per-sample stage's data files
(``TableStore.write_data_file``), the driver commits their metadata (``commit_data_files``).
The Ray actor's side is emulated in process (the same ``write_file`` + envelope round trip);
tests/e2e runs it inside Ray Data."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from pipelines.dag.ray_exec import _envelope, _open_envelope
from pipelines.stages.base import InProcessExecutor, StageContext
from vgen_core.data import TableStore
from vgen_core.data.store import StorageError

from test_stage_contract import Double, DoubleConfig, make_input

SCHEMA = pa.schema([pa.field("sample_id", pa.string(), nullable=False),
                    pa.field("payload", pa.binary()), pa.field("n", pa.int32())])


def _rows(ids, size=10):
    return pa.table({"sample_id": ids, "payload": [os.urandom(size) for _ in ids],
                     "n": pa.array(range(len(ids)), pa.int32())}, schema=SCHEMA)


def test_written_file_is_invisible_until_committed(tmp_path):
    store = TableStore(str(tmp_path))
    store.create("d/t", SCHEMA)
    f1 = store.write_data_file("d/t", _rows(["a", "b"]), file_id="file0001")
    f2 = store.write_data_file("d/t", _rows(["c"]), file_id="file0002")
    assert store.read("d/t").num_rows == 0  # written, not committed: no reader sees it
    assert f1["path"] == "vgen-file0001.snappy.parquet" and f1["num_rows"] == 2
    assert json.loads(f1["stats"]) == {"numRecords": 2, "minValues": {"sample_id": "a", "n": 0},
                                       "maxValues": {"sample_id": "b", "n": 1},
                                       "nullCount": {"sample_id": 0, "payload": 0, "n": 0}}
    v = store.commit_data_files("d/t", [f1, f2, f1], commit_metadata={"vgen.stage": "x"})
    assert v == 1 and store.versions("d/t")[-1]["metadata"] == {"vgen.stage": "x"}
    assert sorted(store.read("d/t")["sample_id"].to_pylist()) == ["a", "b", "c"]  # f1 once
    assert store.read("d/t", filter=[("sample_id", "=", "c")]).num_rows == 1
    assert store.commit_data_files("d/t", []) == 1  # nothing to add: no commit
    # a retried batch (same file_id) rewrites its file in place: one file, not two
    again = store.write_data_file("d/t", _rows(["d"]), file_id="file0003")
    again = store.write_data_file("d/t", _rows(["d"]), file_id="file0003")
    store.commit_data_files("d/t", [again])
    assert store.read("d/t").num_rows == 4
    names = sorted(n for n in os.listdir(store.uri("d/t")) if n.endswith(".parquet"))
    assert names == [f"vgen-file000{i}.snappy.parquet" for i in (1, 2, 3)]
    assert store.read_data_files("d/t", [f2])["sample_id"].to_pylist() == ["c"]


def test_write_data_file_errors_name_the_table(tmp_path):
    store = TableStore(str(tmp_path))
    store.create("d/t", SCHEMA)
    with pytest.raises(ValueError, match="file_id"):
        store.write_data_file("d/t", _rows(["a"]), file_id="../x")
    with pytest.raises(StorageError, match=r"table 'd/t'.*extra columns \['zz'\]"):
        store.write_data_file("d/t", _rows(["a"]).append_column("zz", pa.array([1])),
                              file_id="file0001")


class WorkerWrites(InProcessExecutor):
    """The Ray actor's side in this process: every result written as a file by the stage, sent
    through the same envelope the actors return; records bytes the 'driver' receives."""

    def __init__(self, batch_size: int):
        super().__init__(batch_size)
        self.driver_bytes = 0

    def execute(self, stage, work):
        for result in super().execute(stage, work):
            env = _envelope(stage.write_file(result))
            self.driver_bytes += env.nbytes
            yield _open_envelope(env.to_pylist()[0])


def test_map_stage_commits_worker_files_exactly_once(tmp_path):
    store = TableStore(str(tmp_path))
    ref = make_input(store, {f"s/{i}": i for i in range(10)})
    ctx = StageContext(dag="t", stage="double", store=store, row_fingerprint="fp1",
                       inputs={"src": {"samples": ref}}, error_budget=0.5, chunk_size=4)
    ex = WorkerWrites(batch_size=3)
    r = Double(DoubleConfig(fail_on=["s/3"]), ctx).run(ex)
    assert (r.counts.processed, r.counts.skipped, r.counts.quarantined) == (9, 0, 1)
    out = {row["sample_id"]: row["doubled"] for row in store.read("t/double/fp1").to_pylist()}
    assert out == {f"s/{i}": 2 * i for i in range(10) if i != 3}
    # 4 batches of 3 / 3 / 3 / 1 rows (one row quarantined): 4 files, committed in 2 chunks
    files = [n for n in os.listdir(store.uri("t/double/fp1")) if n.startswith("vgen-")]
    assert len(files) == 4
    ops = [v for v in store.versions("t/double/fp1") if v["operation"] != "CREATE TABLE"]
    assert len(ops) == 2
    # a re-run computes nothing and commits nothing
    r = Double(DoubleConfig(fail_on=["s/3"]), ctx).run(WorkerWrites(batch_size=3))
    assert (r.counts.processed, r.counts.skipped) == (0, 10)
    assert store.read("t/double/fp1").num_rows == 9


def test_driver_receives_keys_not_payload(tmp_path):
    """64 KB rows: the driver receives about the keys and the file record per row; the same
    rows sent back whole (the driver-writes path) cost over 64 KB a row."""
    from pipelines.stages.base import BatchResult, MapStage

    schema = pa.schema([("sample_id", pa.string()), ("content_digest", pa.string()),
                        ("fingerprint", pa.string()), ("payload", pa.binary())])

    class Big(MapStage):
        kind = "test.big"
        Config = DoubleConfig
        output_schema = schema

        def process_batch(self, batch):
            n = batch.num_rows
            return BatchResult(pa.table({
                "sample_id": batch["sample_id"], "content_digest": batch["content_digest"],
                "fingerprint": [self.ctx.row_fingerprint] * n,
                "payload": [os.urandom(64 * 1024) for _ in range(n)]}, schema=schema))

    class DriverWrites(WorkerWrites):
        def execute(self, stage, work):
            for result in InProcessExecutor.execute(self, stage, work):
                env = _envelope(result)
                self.driver_bytes += env.nbytes
                yield _open_envelope(env.to_pylist()[0])

    store = TableStore(str(tmp_path))
    ref = make_input(store, {f"s/{i}": i for i in range(12)})
    per_row = {}
    for fp, ex in (("fp1", WorkerWrites(batch_size=6)), ("fp2", DriverWrites(batch_size=6))):
        ctx = StageContext(dag="t", stage="big", store=store, row_fingerprint=fp,
                           inputs={"src": {"samples": ref}}, chunk_size=6)
        Big(DoubleConfig(), ctx).run(ex)
        rows = store.read(f"t/big/{fp}")
        assert rows.num_rows == 12 and {len(p) for p in rows["payload"].to_pylist()} == {65536}
        per_row[fp] = ex.driver_bytes / 12
    assert per_row["fp1"] < 1024 < 64 * 1024 < per_row["fp2"]
