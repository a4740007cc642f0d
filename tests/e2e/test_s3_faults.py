"""S3 fault tolerance: TableStore and `vgen run` against moto's S3 server behind a proxy that
injects faults (HTTP 500/503 answers and stalled responses), as flaky object stores do.

moto and the proxy each run in a child process on 127.0.0.1: deltalake keeps the GIL during
some S3 calls, which would starve a server thread living in the test's interpreter. The proxy
is this file run as a script (``python test_s3_faults.py proxy PORT UPSTREAM``); the test sets
its rules and reads its counters over HTTP (``/__faults__/rules``, ``/__faults__/stats``).

A rule matches requests by method and a regex on the path, answers the first ``count`` of them
(-1: all) with ``status`` and an S3 error body, without forwarding them, or, with ``stall``,
forwards them and holds the response back that many seconds. Faulted requests never reach
moto, so a retry after a 5xx is always safe.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade"}
_S3_CODES = {500: "InternalError", 503: "SlowDown"}


# ---------------------------------------------------------------------------------------------
# the fault-injecting proxy (runs in its own process)
# ---------------------------------------------------------------------------------------------


class _Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.rules: list[dict] = []
        self.requests = 0
        self.log: list[str] = []

    def set(self, rules: list[dict]) -> None:
        with self.lock:
            self.rules = [{"method": None, "path": ".*", "status": 503, "count": 1, "stall": 0.0,
                           **r, "hits": 0} for r in rules]
            self.requests, self.log = 0, []

    def match(self, method: str, path: str) -> dict | None:
        with self.lock:
            self.requests += 1
            for r in self.rules:
                if (r["method"] in (None, method) and re.search(r["path"], path)
                        and (r["count"] < 0 or r["hits"] < r["count"])):
                    r["hits"] += 1
                    self.log.append(f"{method} {path} -> {'stall' if r['stall'] else r['status']}")
                    return dict(r)
            return None

    def stats(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "injected": sum(r["hits"] for r in self.rules),
                    "rules": [{k: r[k] for k in ("method", "path", "hits")} for r in self.rules],
                    "log": self.log[-200:]}


def _proxy_handler(upstream: str, faults: _Faults):
    host, port = upstream.split("://", 1)[1].split(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes,
                   head: bool = False) -> None:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _control(self, body: bytes) -> None:
            if self.path == "/__faults__/rules":
                faults.set(json.loads(body or b"[]"))
            data = json.dumps(faults.stats()).encode()
            self._reply(200, [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))], data)

        def _handle(self) -> None:
            body = self._body()
            if self.path.startswith("/__faults__/"):
                return self._control(body)
            path = self.path.split("?", 1)[0]
            rule = faults.match(self.command, self.path)
            if rule and not rule["stall"]:
                code = _S3_CODES.get(rule["status"], "InternalError")
                data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected by the test proxy</Message><Resource>{path}"
                        "</Resource><RequestId>fault</RequestId></Error>").encode()
                return self._reply(rule["status"], [("Content-Type", "application/xml"),
                                                    ("Content-Length", str(len(data)))],
                                   data, head=self.command == "HEAD")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            if rule:
                time.sleep(rule["stall"])
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP
                   and k.lower() != "content-length"]
            length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
            out.append(("Content-Length", str(length if length is not None else 0)))
            try:
                self._reply(resp.status, out, data, head=self.command == "HEAD")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on a stalled response

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        def log_message(self, *args) -> None:
            pass

    return Handler


def serve_proxy(port: int, upstream: str) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                          _proxy_handler(upstream, _Faults()))
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "proxy":
    serve_proxy(int(sys.argv[2]), sys.argv[3])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CREDS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start (exit code {proc.poll()})")
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Proxy:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def _post(self, path: str, payload=None) -> dict:
        req = urllib.request.Request(f"{self.endpoint}{path}", method="POST",
                                     data=json.dumps(payload).encode() if payload is not None
                                     else b"")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def rules(self, *rules: dict) -> None:
        self._post("/__faults__/rules", list(rules))

    def stats(self) -> dict:
        return self._post("/__faults__/stats")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(moto endpoint, proxy) with a bucket named ``bucket``."""
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    boto3 = pytest.importorskip("boto3")
    moto_port, proxy_port = _free_port(), _free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [moto]
    try:
        _wait_port(moto_port, moto, "moto server")
        upstream = f"http://127.0.0.1:{moto_port}"
        proxy = subprocess.Popen([sys.executable, __file__, "proxy", str(proxy_port), upstream])
        procs.append(proxy)
        _wait_port(proxy_port, proxy, "fault proxy")
        boto3.client("s3", endpoint_url=upstream, aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1"
                     ).create_bucket(Bucket="bucket")
        yield upstream, Proxy(f"http://127.0.0.1:{proxy_port}")
    finally:
        for p in reversed(procs):
            _stop(p)


def _store(proxy: Proxy, prefix: str, **options):
    from vgen_core.data import TableStore

    opts = {**CREDS, "AWS_ENDPOINT_URL": proxy.endpoint, "timeout": "3s",
            "retry_timeout": "60s", **options}
    return TableStore(f"s3://bucket/{prefix}", storage_options=opts)


def rows(ids) -> pa.Table:
    ids = list(ids)
    return pa.table({"sample_id": [f"s/{i}" for i in ids], "value": [float(i) for i in ids]})


def test_table_store_rides_out_transient_faults(s3):
    _, proxy = s3
    proxy.rules()
    store = _store(proxy, "transient")
    store.check_writable()
    proxy.rules(
        {"method": "PUT", "path": r"/_delta_log/", "status": 503, "count": 2},   # commits
        {"method": "PUT", "path": r"\.parquet", "status": 500, "count": 2},      # data files
        {"method": "GET", "path": r"/_delta_log/", "status": 500, "count": 3},   # log reads
        {"method": "GET", "path": r"list-type=2", "status": 503, "count": 2},    # listings
        {"method": "GET", "path": r"\.parquet", "stall": 5.0, "count": 1},      # > timeout 3s
    )
    versions = [store.append("demo/rows", rows(range(i * 4, i * 4 + 4))) for i in range(3)]
    assert versions == [0, 1, 2]
    got = store.read("demo/rows")
    assert sorted(got["sample_id"].to_pylist()) == sorted(f"s/{i}" for i in range(12))
    assert [h["operation"] for h in store.versions("demo/rows")] == ["WRITE"] * 3
    # raw files through s3fs (botocore's own retries)
    store.fs.pipe_file(store.path("raw", "x.bin"), b"\x00\x01")
    assert store.fs.cat_file(store.path("raw", "x.bin")) == b"\x00\x01"
    stats = proxy.stats()
    # every fault was met and ridden out
    assert [r["hits"] for r in stats["rules"]] == [2, 2, 3, 2, 1], stats["log"]


def test_table_store_fails_clearly_when_faults_persist(s3):
    from vgen_core.data import StorageError

    _, proxy = s3
    proxy.rules()
    store = _store(proxy, "persistent", retry_timeout="4s", max_retries="2")
    store.append("demo/rows", rows(range(3)))

    proxy.rules({"method": "PUT", "status": 503, "count": -1})
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        store.append("demo/rows", rows(range(3, 6)))
    msg = str(e.value)
    assert "append to table 'demo/rows' at s3://bucket/persistent/tables/demo/rows" in msg
    assert "503" in msg or "SlowDown" in msg, msg
    assert time.monotonic() - t0 < 60

    proxy.rules({"method": "GET", "status": 500, "count": -1})
    with pytest.raises(StorageError, match="demo/rows") as e:
        store.read("demo/rows")
    assert "500" in str(e.value) or "InternalError" in str(e.value), str(e.value)

    with pytest.raises(StorageError, match="storage root s3://bucket/persistent is not writable"):
        proxy.rules({"status": 503, "count": -1})
        store.check_writable()

    proxy.rules()  # faults gone: the table is intact, the failed append left no rows behind
    assert store.read("demo/rows").num_rows == 3
    assert store.version("demo/rows") == 0


def test_lost_commit_response_never_duplicates_rows(s3):
    """The commit PUT reaches the store but its answer comes after the client's timeout: the
    outcome is unknown to the writer. Observed with deltalake 1.6: object_store does not retry
    the conditional PUT and append raises StorageError although the commit landed. What must
    hold either way: the rows are in the table exactly once, and the next append continues from
    the committed version (a re-run of the stage sees them and does not write them again)."""
    from vgen_core.data import StorageError

    _, proxy = s3
    proxy.rules()
    store = _store(proxy, "lost-answer", timeout="2s")
    store.append("demo/rows", rows(range(3)))
    proxy.rules({"method": "PUT", "path": r"/_delta_log/", "stall": 4.0, "count": 1})
    try:
        store.append("demo/rows", rows(range(3, 6)))
        raised = None
    except StorageError as e:
        raised = str(e)
    assert proxy.stats()["rules"][0]["hits"] == 1
    proxy.rules()
    if raised is not None:
        assert "append to table 'demo/rows'" in raised and "timed out" in raised, raised
    ids = store.read("demo/rows")["sample_id"].to_pylist()
    assert sorted(ids) == sorted(f"s/{i}" for i in range(6))  # once each, no duplicates
    assert store.version("demo/rows") == 1
    assert store.append("demo/rows", rows(range(6, 8))) == 2


def _vgen(args: list[str], proxy: Proxy, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **CREDS, "AWS_ENDPOINT_URL": proxy.endpoint,
           "XDG_CACHE_HOME": str(tmp / "cache")}
    for k in ("VGEN_STORAGE", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if p.returncode:
        print(p.stdout[-4000:], p.stderr[-8000:])
    return p


def test_vgen_run_through_faults_and_on_a_dead_store(s3, tmp_path):
    import yaml

    from vgen_core.data import TableStore
    from vgen_core.data.sample_images import PHOTOS

    _, proxy = s3
    dag = tmp_path / "faults.yaml"
    dag.write_text(yaml.safe_dump({"name": "faults", "chunk_size": 4, "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": "skimage://", "crops_per_image": 1, "size": 16}}}}))
    args = ["run", str(dag), "--storage", "s3://bucket/run", "--local",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    table = r"/bucket/run/tables/faults/images/"
    proxy.rules(
        {"method": "PUT", "path": table + r"_delta_log/", "status": 503, "count": 2},  # commits
        {"method": "PUT", "path": table + r".*\.parquet", "status": 500, "count": 2},  # data
        {"method": "GET", "path": r"/_vgen/stage_runs/_delta_log/", "status": 503, "count": 3},
        {"method": "GET", "path": r"list-type=2", "status": 500, "count": 2},          # listings
        {"method": "GET", "path": table, "stall": 2.0, "count": 1},                     # slow
    )
    p = _vgen(args, proxy, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    stats = proxy.stats()
    assert all(r["hits"] for r in stats["rules"]), json.dumps(stats, indent=1)
    proxy.rules()
    store = TableStore("s3://bucket/run", storage_options={**CREDS,
                                                             "AWS_ENDPOINT_URL": proxy.endpoint})
    assert sorted(store.read("faults/images", columns=["sample_id"])["sample_id"].to_pylist()) \
        == sorted(f"images/{n}-c0" for n in PHOTOS)
    # the state is consistent: a second run skips the stage
    p = _vgen(args, proxy, tmp_path)
    assert p.returncode == 0 and "[images] up-to-date" in p.stderr

    # a store that answers 503 to everything: refused before any compute, in seconds
    proxy.rules({"status": 503, "count": -1})
    t0 = time.monotonic()
    p = _vgen(["run", str(dag), "--storage", "s3://bucket/dead", "--local"], proxy, tmp_path)
    assert p.returncode == 2
    assert "storage root s3://bucket/dead is not writable" in p.stderr
    assert "injected by the test proxy" in p.stderr  # the server's own message is passed on
    assert time.monotonic() - t0 < 60
    proxy.rules()
