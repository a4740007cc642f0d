"""TableStore: Delta tables and raw files on a local root (and on S3 through moto's server)."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from vgen_core.data.store import StorageError, TableStore

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_digest", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("tokens", pa.list_(pa.int32())),
        pa.field("caption", pa.string()),
    ],
    metadata={"vgen.schema": "test_rows", "vgen.schema_version": "1"},
)


def rows(ids, digest="d0", label=0, caption="c"):
    ids = list(ids)
    return pa.table(
        {
            "sample_id": [f"demo/{i}" for i in ids],
            "content_digest": [digest] * len(ids),
            "label": pa.array([label] * len(ids), pa.int32()),
            "tokens": pa.array([[len(str(i)), 1] for i in ids], pa.list_(pa.int32())),
            "caption": [caption] * len(ids),
        },
        schema=SCHEMA,
    )


def by_id(table: pa.Table) -> dict[str, dict]:
    return {r["sample_id"]: r for r in table.to_pylist()}


@pytest.fixture
def store(tmp_path) -> TableStore:
    return TableStore(str(tmp_path / "root"))


# ---------------------------------------------------------------------------------------------
# names, roots, raw files
# ---------------------------------------------------------------------------------------------


def test_root_is_made_absolute_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = TableStore("rel/root")
    assert s.root == str(tmp_path / "rel" / "root")
    assert s.uri("demo/tokens") == f"{tmp_path}/rel/root/tables/demo/tokens"
    assert s.path("raw", "a/b.png") == f"{tmp_path}/rel/root/raw/a/b.png"
    assert s.path() == s.root
    assert TableStore("s3://bucket/pre/fix/").uri("t") == "s3://bucket/pre/fix/tables/t"
    assert TableStore("s3://bucket").path("x") == "s3://bucket/x"


@pytest.mark.parametrize("bad", ["", "a b", "../x", "a/../b", "/abs", "a//b", "a/", ".", "a/./b", "x;y"])
def test_bad_table_names(store, bad):
    with pytest.raises(ValueError):
        store.uri(bad)


def test_bad_roots():
    with pytest.raises(StorageError, match="unsupported storage root"):
        TableStore("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        TableStore("s3://")
    with pytest.raises(ValueError):
        TableStore("/tmp/x").path("..", "etc")


def test_raw_files_through_fs(store):
    p = store.path("raw", "hello.txt")
    store.fs.makedirs(store.path("raw"), exist_ok=True)
    store.fs.pipe_file(p, b"hi")
    assert store.fs.cat_file(p) == b"hi"
    assert Path(p).read_bytes() == b"hi"


def test_pickle_round_trip_keeps_only_root_and_explicit_options(tmp_path):
    s = TableStore(str(tmp_path), storage_options={"timeout": "30s"})
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.root == s.root and s2.storage_options == {"timeout": "30s"}
    assert pickle.loads(pickle.dumps(s)).__getstate__() == {"root": s.root, "storage_options": {"timeout": "30s"}}


def test_s3_options_from_environment(monkeypatch):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    s = TableStore("s3://b/p", storage_options={"aws_region": "us-west-2", "timeout": "10s"})
    assert s.storage_options == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",  # the S3-specific variable wins
        "AWS_REGION": "us-west-2",  # explicit options win over the environment
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_ALLOW_HTTP": "true",  # http endpoint
        "timeout": "10s",
    }
    assert "AK" not in repr(s) and pickle.loads(pickle.dumps(s)).__getstate__()["storage_options"] == {
        "aws_region": "us-west-2",
        "timeout": "10s",
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.com")
    assert "AWS_ALLOW_HTTP" not in TableStore("s3://b").storage_options


# ---------------------------------------------------------------------------------------------
# create / append / read
# ---------------------------------------------------------------------------------------------


def test_create_is_idempotent_and_checks_the_schema(store):
    assert not store.exists("demo/rows") and store.version("demo/rows") is None
    assert store.create("demo/rows", SCHEMA, description="test rows") == 0
    assert store.exists("demo/rows") and store.version("demo/rows") == 0
    # same schema again (metadata and large_string vs string do not matter)
    relaxed = pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f for f in SCHEMA])
    assert store.create("demo/rows", relaxed) == 0
    assert store.read("demo/rows").num_rows == 0
    assert store.schema("demo/rows") == pa.schema(list(SCHEMA))

    other = pa.schema([pa.field("sample_id", pa.string(), nullable=False), pa.field("label", pa.int64()), pa.field("x", pa.float32())])
    with pytest.raises(StorageError) as e:
        store.create("demo/rows", other)
    msg = str(e.value)
    assert "'demo/rows'" in msg and store.uri("demo/rows") in msg
    assert "lacks column 'x'" in msg
    assert "unexpected column 'tokens'" in msg
    assert "column 'label' is label: int32 not null, expected label: int64" in msg
    assert "Expected fields: [" in msg and "found fields: [" in msg

    with pytest.raises(StorageError, match="partitioned by"):
        store.create("demo/rows", SCHEMA, partition_by=["label"])


def test_partitioned_table_and_description(store):
    from deltalake import DeltaTable

    assert store.create("p", SCHEMA, partition_by=["label"], description="partitioned rows") == 0
    assert store.create("p", SCHEMA, partition_by=["label"]) == 0
    assert store.create("p", SCHEMA) == 0  # partition_by not given: not checked
    store.append("p", pa.concat_tables([rows(range(3), label=0), rows(range(3, 5), label=1)]))
    meta = DeltaTable(store.uri("p")).metadata()
    assert meta.description == "partitioned rows" and list(meta.partition_columns) == ["label"]
    assert len(store.file_uris("p")) == 2 and all("/label=" in f for f in store.file_uris("p"))
    got = store.read("p", filter=[("label", "=", 1)])
    assert got.schema == pa.schema(list(SCHEMA))
    assert sorted(got["sample_id"].to_pylist()) == ["demo/3", "demo/4"]


def test_append_versions_and_time_travel(store):
    store.create("t", SCHEMA)
    v1 = store.append("t", rows(range(3)), commit_metadata={"vgen.stage": "curate", "vgen.chunk": "0"})
    v2 = store.append("t", rows(range(3, 5)), commit_metadata={"vgen.chunk": "1"})
    assert (v1, v2) == (1, 2)
    assert store.read("t").num_rows == 5
    assert sorted(by_id(store.read("t", version=1))) == [f"demo/{i}" for i in range(3)]
    assert store.read("t", version=0).num_rows == 0
    with pytest.raises(StorageError, match="no version 7"):
        store.read("t", version=7)

    hist = store.versions("t")
    assert [h["version"] for h in hist] == [0, 1, 2]
    assert [h["operation"] for h in hist] == ["CREATE TABLE", "WRITE", "WRITE"]
    assert hist[1]["metadata"] == {
        "vgen.stage": "curate",
        "vgen.chunk": "0",
        "vgen.schema": "test_rows",  # from the input's Arrow schema metadata
        "vgen.schema_version": "1",
    }
    assert hist[2]["metadata"]["vgen.chunk"] == "1"
    assert hist[0]["metadata"] == {"vgen.schema": "test_rows", "vgen.schema_version": "1"}
    now = dt.datetime.now(dt.timezone.utc)
    assert all(abs((now - h["timestamp"]).total_seconds()) < 120 for h in hist)
    assert hist[1]["metrics"]["num_added_rows"] == 3


def test_append_creates_a_missing_table_in_one_commit(store):
    assert store.append("new/table", rows(range(4)), commit_metadata={"vgen.x": "y"}) == 0
    hist = store.versions("new/table")
    assert len(hist) == 1 and hist[0]["metadata"]["vgen.x"] == "y"
    assert store.read("new/table").num_rows == 4
    assert store.schema("new/table") == pa.schema(list(SCHEMA))


def test_append_of_nothing_makes_no_commit(store):
    store.create("t", SCHEMA)
    assert store.append("t", rows([])) == 0
    assert store.version("t") == 0


def test_append_casts_to_the_table_schema(store):
    store.create("t", SCHEMA)
    t = rows(range(2))
    loose = pa.table(
        {  # other column order, wider / large types
            "caption": pa.array(["a", None], pa.large_string()),
            "tokens": pa.array([[1], [2, 3]], pa.large_list(pa.int64())),
            "label": pa.array([1, 2], pa.int64()),
            "content_digest": t["content_digest"],
            "sample_id": t["sample_id"],
        }
    )
    assert store.append("t", loose) == 1
    got = store.read("t")
    assert got.schema == pa.schema(list(SCHEMA))
    assert by_id(got)["demo/1"] == {"sample_id": "demo/1", "content_digest": "d0", "label": 2, "tokens": [2, 3], "caption": None}


def test_append_schema_mismatch_errors(store):
    store.create("t", SCHEMA)
    bad = rows(range(2)).drop_columns(["caption"]).append_column("extra", pa.array([1, 2]))
    with pytest.raises(StorageError) as e:
        store.append("t", bad)
    msg = str(e.value)
    assert "missing columns ['caption']" in msg and "extra columns ['extra']" in msg and store.uri("t") in msg

    overflow = rows(range(1)).set_column(2, "label", pa.array([2**40], pa.int64()))
    with pytest.raises(StorageError, match="column 'label' of type int64 cannot be stored as int32"):
        store.append("t", overflow)

    nulls = rows(range(1)).set_column(1, pa.field("content_digest", pa.string()), pa.array([None], pa.string()))
    with pytest.raises(StorageError, match="'content_digest' is not nullable but has 1 null"):
        store.append("t", nulls)

    with pytest.raises(TypeError):
        store.append("t", {"sample_id": ["x"]})
    assert store.version("t") == 0  # nothing was committed


def test_unsigned_types_are_stored_signed_without_wrapping(store):
    ok = pa.table({"k": ["a"], "v": pa.array([100], pa.uint8())})
    assert store.append("u", ok) == 0
    assert store.schema("u").field("v").type == pa.int8()
    with pytest.raises(StorageError, match="column 'v'"):
        store.append("u", pa.table({"k": ["b"], "v": pa.array([200], pa.uint8())}))
    with pytest.raises(StorageError, match="column 'v'"):
        store.append("u2", pa.table({"k": ["b"], "v": pa.array([200], pa.uint8())}))
    assert store.read("u")["v"].to_pylist() == [100]


def test_commit_metadata_validation(store):
    with pytest.raises(ValueError, match="reserved"):
        store.append("t", rows([1]), commit_metadata={"operation": "x"})
    with pytest.raises(TypeError, match="str to str"):
        store.append("t", rows([1]), commit_metadata={"vgen.n": 3})
    assert not store.exists("t")


def test_read_columns_and_filters(store):
    store.append("t", rows(range(6), caption="x"))
    store.append("t", rows(range(6, 9), label=1, caption=None))
    store.append("t", pa.table({"sample_id": ["demo/it's"], "content_digest": ["q"], "label": pa.array([2], pa.int32()), "tokens": [[0]], "caption": ["o'k"]}))

    def ids(**kw):
        return sorted(r["sample_id"] for r in store.read("t", columns=["sample_id"], **kw).to_pylist())

    assert store.read("t", columns=["label", "sample_id"]).column_names == ["label", "sample_id"]
    assert ids(filter=[("label", "=", 1)]) == ["demo/6", "demo/7", "demo/8"]
    assert ids(filter=[("label", ">=", 1), ("sample_id", "!=", "demo/7")]) == ["demo/6", "demo/8", "demo/it's"]
    assert ids(filter=[("sample_id", "in", ["demo/1", "demo/it's", "nope"])]) == ["demo/1", "demo/it's"]
    assert len(ids(filter=[("sample_id", "not in", ["demo/1"])])) == 9
    assert ids(filter=[("caption", "=", None)]) == ["demo/6", "demo/7", "demo/8"]
    assert len(ids(filter=[("caption", "!=", None)])) == 7
    assert ids(filter=[("caption", "=", "o'k")]) == ["demo/it's"]
    assert ids(filter=[[("label", "=", 2)], [("sample_id", "=", "demo/0")]]) == ["demo/0", "demo/it's"]  # OR
    assert ids(filter=[("label", "in", [])]) == []
    assert store.read("t", columns=[]).num_rows == 10
    assert store.read("t", columns=[], filter=[("label", "=", 1)]).num_rows == 3
    with pytest.raises(StorageError, match=r"no column\(s\) \['nope'\]"):
        store.read("t", columns=["nope"])
    with pytest.raises(ValueError, match="unknown column"):
        store.read("t", filter=[("nope", "=", 1)])
    with pytest.raises(ValueError, match="unsupported filter op"):
        store.read("t", filter=[("label", "~", 1)])


def test_missing_table_errors(store):
    for call in (
        lambda: store.read("absent/t"),
        lambda: store.versions("absent/t"),
        lambda: store.file_uris("absent/t"),
        lambda: store.delete("absent/t", "label = 1"),
        lambda: store.schema("absent/t"),
    ):
        with pytest.raises(StorageError) as e:
            call()
        assert str(e.value) == f"table 'absent/t' not found at {store.uri('absent/t')}"


# ---------------------------------------------------------------------------------------------
# upsert / delete / files
# ---------------------------------------------------------------------------------------------


def test_upsert_replaces_matches_and_inserts_the_rest(store):
    assert store.upsert("t", rows(range(3)), keys=["sample_id"]) == 0  # creates
    v = store.upsert(
        "t", rows([1, 2, 3], digest="d1", label=5), keys=["sample_id"], commit_metadata={"vgen.op": "up"}
    )
    assert v == 1
    got = by_id(store.read("t"))
    assert sorted(got) == ["demo/0", "demo/1", "demo/2", "demo/3"]
    assert got["demo/0"]["content_digest"] == "d0"
    assert [got[f"demo/{i}"]["content_digest"] for i in (1, 2, 3)] == ["d1"] * 3
    assert got["demo/3"]["label"] == 5
    h = store.versions("t")[-1]
    assert h["operation"] == "MERGE" and h["metadata"]["vgen.op"] == "up"
    assert h["metrics"]["num_target_rows_updated"] == 2 and h["metrics"]["num_target_rows_inserted"] == 1
    assert store.read("t", version=0).num_rows == 3

    # composite keys: same sample, new digest -> a new row beside the old one
    store.upsert("t", rows([0], digest="d9"), keys=["sample_id", "content_digest"])
    assert sorted(r["content_digest"] for r in store.read("t", filter=[("sample_id", "=", "demo/0")]).to_pylist()) == ["d0", "d9"]


def test_upsert_input_checks(store):
    store.create("t", SCHEMA)
    with pytest.raises(StorageError, match="appear more than once"):
        store.upsert("t", pa.concat_tables([rows([1]), rows([1])]), keys=["sample_id"])
    with pytest.raises(StorageError, match="not in the input"):
        store.upsert("t", rows([1]), keys=["nope"])
    with pytest.raises(ValueError):
        store.upsert("t", rows([1]), keys=[])
    nullable = pa.schema([pa.field("k", pa.string()), pa.field("v", pa.int64())])
    store.create("n", nullable)
    with pytest.raises(StorageError, match="key column 'k' has 1 null"):
        store.upsert("n", pa.table({"k": [None, "a"], "v": [1, 2]}, schema=nullable), keys=["k"])
    assert store.version("t") == 0 and store.version("n") == 0


def test_delete(store):
    store.append("t", rows(range(5)))
    v = store.delete("t", "sample_id IN ('demo/1', 'demo/3')", commit_metadata={"vgen.why": "gc"})
    assert v == 1
    assert sorted(by_id(store.read("t"))) == ["demo/0", "demo/2", "demo/4"]
    assert store.versions("t")[-1]["operation"] == "DELETE"
    assert store.versions("t")[-1]["metadata"] == {"vgen.why": "gc"}
    assert store.delete("t", "label = 99") == 1  # nothing matched: no commit
    with pytest.raises(StorageError, match="nope"):
        store.delete("t", "nope = 1")
    with pytest.raises(ValueError):
        store.delete("t", "  ")


def test_file_uris(store):
    store.create("t", SCHEMA)
    store.append("t", rows(range(2)))
    store.append("t", rows(range(2, 4)))
    assert store.file_uris("t", version=0) == []
    files = store.file_uris("t")
    assert len(files) == 2 and all(f.startswith(store.uri("t") + "/") and f.endswith(".parquet") for f in files)
    assert all(os.path.exists(f) for f in files)
    assert len(store.file_uris("t", version=1)) == 1


# ---------------------------------------------------------------------------------------------
# writability
# ---------------------------------------------------------------------------------------------


def test_check_writable_ok(store):
    store.check_writable()
    assert os.listdir(store.path("_vgen")) == []  # the probe is gone


def test_check_writable_file_in_the_way(tmp_path):
    (tmp_path / "blocker").write_text("not a directory")
    s = TableStore(str(tmp_path / "blocker" / "root"))
    with pytest.raises(StorageError) as e:
        s.check_writable()
    msg = str(e.value)
    assert msg.startswith(f"storage root {s.root} is not writable: ")
    assert "Check the path/bucket and credentials, or pass --storage" in msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_check_writable_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StorageError, match="is not writable"):
            TableStore(str(ro / "root")).check_writable()
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------------------------


def _run_concurrently(n_threads, fn):
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    results: dict[int, list] = {w: [] for w in range(n_threads)}

    def worker(w):
        try:
            barrier.wait()
            fn(w, results[w])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _check_concurrent_appends(store, n_threads=2, per_thread=5):
    store.create("c", SCHEMA)

    def fn(w, out):
        for i in range(per_thread):
            ids = [f"{w}-{i}-{j}" for j in range(3)]
            out.append((i, store.append("c", rows(ids), commit_metadata={"vgen.writer": str(w), "vgen.i": str(i)})))

    results = _run_concurrently(n_threads, fn)
    got = store.read("c")["sample_id"].to_pylist()
    expected = [f"demo/{w}-{i}-{j}" for w in range(n_threads) for i in range(per_thread) for j in range(3)]
    assert sorted(got) == sorted(expected)  # every row exactly once
    versions = [v for out in results.values() for _, v in out]
    assert sorted(versions) == list(range(1, n_threads * per_thread + 1))
    meta = {h["version"]: h["metadata"] for h in store.versions("c")}
    for w, out in results.items():  # each writer got the version of its own commit
        for i, v in out:
            assert (meta[v]["vgen.writer"], meta[v]["vgen.i"]) == (str(w), str(i))


def test_concurrent_appends(store):
    _check_concurrent_appends(store, n_threads=2, per_thread=5)


def test_concurrent_upserts_retry_on_conflicts(store):
    store.append("u", rows(range(4)))

    def fn(w, out):
        for i in range(3):
            out.append(store.upsert("u", rows([w * 100 + i + 10, w], digest=f"w{w}-{i}"), keys=["sample_id"]))

    results = _run_concurrently(2, fn)
    got = by_id(store.read("u"))
    assert sorted(got) == sorted({f"demo/{i}" for i in range(4)} | {f"demo/{w * 100 + i + 10}" for w in (0, 1) for i in range(3)})
    assert got["demo/0"]["content_digest"] == "w0-2"  # each writer's last upsert of its own row
    assert got["demo/1"]["content_digest"] == "w1-2"
    assert got["demo/2"]["content_digest"] == "d0"
    assert store.version("u") == 6  # one commit per upsert, none lost
    assert sorted(v for out in results.values() for v in out) == [1, 2, 3, 4, 5, 6]


def test_threaded_writes_then_read_exit_cleanly(tmp_path):
    """deltalake's default pyarrow reader aborts the interpreter at exit after threaded writes;
    the store's reader must not."""
    script = textwrap.dedent(
        """
        import sys, threading, pyarrow as pa
        from vgen_core.data.store import TableStore
        s = TableStore(sys.argv[1])
        s.create("t", pa.schema([("w", pa.int64()), ("i", pa.int64())]))
        def work(w):
            for i in range(10):
                s.append("t", pa.table({"w": [w], "i": [i]}))
        ts = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(s.read("t").num_rows)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")])))
    for k in range(2):
        root = str(tmp_path / f"root{k}")
        p = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "40"


# ---------------------------------------------------------------------------------------------
# S3, through moto's standalone server on 127.0.0.1
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's standalone S3 server in a child process on 127.0.0.1.

    Not in-process (``ThreadedMotoServer``): some deltalake 1.6 calls (``history``,
    ``is_deltatable``) keep the GIL while they wait on S3, which would starve a server thread
    living in the same interpreter until the request times out.
    """
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start (exit code {proc.poll()})")
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        client.create_bucket(Bucket="bucket")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_store(moto_endpoint, request):
    opts = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        # fail in seconds, not after object_store's default 3 minutes of retries
        "timeout": "20s",
        "retry_timeout": "30s",
    }
    return TableStore(f"s3://bucket/{request.node.name}", storage_options=opts)


def test_s3_round_trip(s3_store):
    s = s3_store
    assert s.storage_options["AWS_ALLOW_HTTP"] == "true"
    s.check_writable()
    assert not s.exists("demo/rows")
    assert s.create("demo/rows", SCHEMA) == 0
    assert s.create("demo/rows", SCHEMA) == 0
    assert s.append("demo/rows", rows(range(3)), commit_metadata={"vgen.stage": "s3"}) == 1
    assert s.upsert("demo/rows", rows([2, 3], digest="d1"), keys=["sample_id"]) == 2
    assert s.delete("demo/rows", "sample_id = 'demo/0'") == 3
    got = by_id(s.read("demo/rows"))
    assert sorted(got) == ["demo/1", "demo/2", "demo/3"] and got["demo/2"]["content_digest"] == "d1"
    assert s.read("demo/rows", version=1).num_rows == 3
    assert s.read("demo/rows", columns=["sample_id"], filter=[("content_digest", "=", "d1")]).num_rows == 2
    hist = s.versions("demo/rows")
    assert [h["operation"] for h in hist] == ["CREATE TABLE", "WRITE", "MERGE", "DELETE"]
    assert hist[1]["metadata"]["vgen.stage"] == "s3"
    files = s.file_uris("demo/rows")
    assert files and all(f.startswith(s.uri("demo/rows") + "/") for f in files)
    assert all(s.fs.exists(f) for f in files)
    with pytest.raises(StorageError, match="not found at s3://bucket/"):
        s.read("absent")
    # raw files
    s.fs.pipe_file(s.path("raw", "x.bin"), b"\x00\x01")
    assert s.fs.cat_file(s.path("raw", "x.bin")) == b"\x00\x01"
    # a pickled store (as sent to Ray workers) reaches the same tables
    assert pickle.loads(pickle.dumps(s)).version("demo/rows") == 3


def test_s3_concurrent_appends(s3_store):
    _check_concurrent_appends(s3_store, n_threads=2, per_thread=3)


def test_s3_unwritable_roots_fail_fast(moto_endpoint):
    opts = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    no_bucket = TableStore("s3://no-such-bucket/x", storage_options={**opts, "AWS_ENDPOINT_URL": moto_endpoint})
    with pytest.raises(StorageError, match="storage root s3://no-such-bucket/x is not writable"):
        no_bucket.check_writable()
    dead = TableStore("s3://bucket/x", storage_options={**opts, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"})
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="is not writable"):
        dead.check_writable()
    assert time.monotonic() - t0 < 15


def test_compact_keeps_rows_and_history_in_fewer_files(store):
    """The stage records grow one small file a commit; compaction rewrites them into one and
    changes no row, and older versions still read as they were."""
    from deltalake import DeltaTable

    for i in range(5):
        store.append("recs", pa.table({"i": pa.array([i, 10 + i], pa.int64())}))
    assert store.compact("recs", min_files=6) is False  # 5 files: below the threshold
    v_before = store.version("recs")
    assert store.compact("recs", min_files=5) is True
    assert len(DeltaTable(store.uri("recs")).file_uris()) == 1
    assert store.version("recs") == v_before + 1
    got = sorted(store.read("recs").column("i").to_pylist())
    assert got == sorted([*range(5), *range(10, 15)])
    assert sorted(store.read("recs", version=2).column("i").to_pylist()) == [0, 1, 2, 10, 11, 12]
    assert store.compact("recs", min_files=2) is False  # one file now


def test_stage_records_are_compacted_by_a_run(tmp_path):
    """StageState.compact rewrites `_vgen/stage_runs` into one file once it has 64 (Runner.run
    calls it after a run that ran something: tests/unit/test_lazy_ray.py); latest() is
    unchanged."""
    from deltalake import DeltaTable

    from pipelines.dag.state import STATE_TABLE, StageState

    st = StageState(TableStore(str(tmp_path)))
    for n in range(64):
        st.record(dag="d", stage=f"s{n % 3}", kind="k", fingerprint="f", parts={"n": n},
                  status="completed", run_id=f"r{n}")
    before = st.latest("d")
    assert st.compact() is True
    assert len(DeltaTable(st.store.uri(STATE_TABLE)).file_uris()) == 1
    assert st.latest("d") == before
