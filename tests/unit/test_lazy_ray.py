"""Small work without Ray's fixed cost (#17 item 7): the runner connects to Ray only when a stage
needs it, and a stage whose to-do is at most the DAG's ``in_process_rows`` (asking for no GPU)
runs in the driver, with the same rows as the executor that runs everything in-process.

The Ray side is replaced by a ``connect`` that fails: a run that must not start Ray proves it by
finishing. (The e2e suite runs with ``VGEN_IN_PROCESS_ROWS=0``: every stage on its Ray cluster.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest
from test_source_incremental import write_png

from pipelines.dag import runner as runner_mod
from pipelines.dag.ray_exec import RayDataExecutor
from pipelines.dag.runner import Runner, in_process_rows
from pipelines.stages.base import cpu_only, resolve_device
from vgen_core.data import TableStore
from vgen_core.tracking import NullTracker


class RayWanted(Exception):
    pass


def _no_ray(*_a, **_k):
    raise RayWanted("connect_ray was called")


def _dag(root: Path, **top):
    from pipelines.dag.spec import parse_dag

    return parse_dag({"name": "t", "chunk_size": 4, **top, "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": str(root), "crops_per_image": 2, "size": 32}},
        "tokens": {"uses": "tokenize.fsq", "needs": ["images"],
                   "with": {"size": "tiny", "init_seed": 0, "flip": True}}}})


def _images(root: Path, n: int) -> None:
    for i in range(n):
        write_png(root / f"c{i % 2}" / f"img{i}.png", seed=i)


def _rows(store: TableStore, summary) -> dict[str, list[dict]]:
    out = {}
    for stage in ("images", "tokens"):
        ref = summary.outcomes[stage].outputs["samples"]
        t = store.read(ref.name, version=ref.version)
        drop = [c for c in ("created_at",) if c in t.column_names]
        out[stage] = t.drop_columns(drop).sort_by("sample_id").to_pylist()
    return out


@pytest.fixture
def no_ray_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("VGEN_IN_PROCESS_ROWS", raising=False)
    monkeypatch.setattr(runner_mod, "connect_ray", _no_ray)


def test_small_first_run_and_small_rerun_start_no_ray_and_match_in_process(tmp_path, no_ray_env):
    root = tmp_path / "imgs"
    _images(root, 5)
    dag = _dag(root)  # default in_process_rows (512) > 10 rows
    store = TableStore(str(tmp_path / "store"))
    lines: list[str] = []

    class Console:
        def print(self, s):
            lines.append(s)

        def __getattr__(self, _):
            return lambda *a, **k: None

    r = Runner(dag, store, NullTracker(), "", executor="ray", console=Console())
    summary = r.run()
    assert summary.ok, {n: o.error for n, o in summary.outcomes.items()}
    assert not r.ray.connected
    assert [o.counts.processed for o in summary.outcomes.values()] == [10, 10]
    assert any("[tokens] ran in this process" in x for x in lines)

    # the run compacted its stage records only if there were 64 files: 4 records, 4 files
    from deltalake import DeltaTable

    from pipelines.dag.state import STATE_TABLE

    assert len(DeltaTable(store.uri(STATE_TABLE)).file_uris()) == 4
    ref_store = TableStore(str(tmp_path / "ref"))
    ref = Runner(dag, ref_store, NullTracker(), "", executor="local").run()
    assert _rows(store, summary) == _rows(ref_store, ref)

    # a 1-file change: exactly its 2 crops in each stage, still without Ray
    write_png(root / "c0" / "img0.png", seed=99)
    r2 = Runner(dag, store, NullTracker(), "", executor="ray", console=Console())
    for _ in range(60):  # 4 + 60 = 64 record files before this run: it compacts after it
        r2.state.record(dag="other", stage="s", kind="k", fingerprint="f", parts={},
                        status="completed")
    s2 = r2.run()
    assert s2.ok and not r2.ray.connected
    assert [o.counts.processed for o in s2.outcomes.values()] == [2, 2]
    # compacted at the end (after the completed records): one file, every record still there
    assert len(DeltaTable(store.uri(STATE_TABLE)).file_uris()) == 1
    assert len(r2.state.records("other")) == 60 and len(r2.state.records("t")) == 8


def test_work_over_in_process_rows_connects_to_ray(tmp_path, no_ray_env):
    root = tmp_path / "imgs"
    _images(root, 3)
    store = TableStore(str(tmp_path / "store"))
    summary = Runner(_dag(root, in_process_rows=2), store, NullTracker(), "",
                     executor="ray").run()
    # 3 files > 2: the source stage asks for Ray (here: fails, as its connect raises)
    assert summary.outcomes["images"].action == "failed"
    assert "connect_ray was called" in summary.outcomes["images"].error
    assert summary.outcomes["tokens"].action == "blocked"


def test_env_overrides_the_dag_and_zero_sends_everything_to_ray(tmp_path, no_ray_env,
                                                                monkeypatch):
    root = tmp_path / "imgs"
    _images(root, 1)
    dag = _dag(root)
    assert in_process_rows(dag) == 512
    monkeypatch.setenv("VGEN_IN_PROCESS_ROWS", "0")
    assert in_process_rows(dag) == 0
    summary = Runner(dag, TableStore(str(tmp_path / "s")), NullTracker(), "",
                     executor="ray").run()
    assert summary.outcomes["images"].action == "failed"  # 1 file > 0: Ray
    for bad in ("lots", "-1"):
        monkeypatch.setenv("VGEN_IN_PROCESS_ROWS", bad)
        with pytest.raises(ValueError, match="VGEN_IN_PROCESS_ROWS"):
            in_process_rows(dag)


def test_a_dag_with_a_gpu_stage_or_a_cluster_address_connects_at_once(tmp_path, no_ray_env,
                                                                     monkeypatch):
    from pipelines.dag.spec import parse_dag

    root = tmp_path / "imgs"
    _images(root, 1)
    gpu = parse_dag({"name": "t", "stages": {
        "images": {"uses": "ingest.images", "with": {"root": str(root), "size": 32},
                   "resources": {"gpus": 1}}}})
    with pytest.raises(RayWanted):
        Runner(gpu, TableStore(str(tmp_path / "a")), NullTracker(), "", executor="ray").run()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(RayWanted):
        Runner(_dag(root), TableStore(str(tmp_path / "b")), NullTracker(), "",
               executor="ray").run()


def test_the_executor_keeps_gpu_work_and_big_work_on_ray():
    from pipelines.stages.base import StageContext, Work

    calls = []

    def connect():
        calls.append(1)
        raise RayWanted

    class Res:
        gpus = 0.0
        batch_size = 4

    class FakeStage:
        def __init__(self, gpus):
            r = Res()
            r.gpus = gpus
            self.ctx = StageContext(dag="t", stage="s", store=None, row_fingerprint="",
                                    resources=r)

    small = Work(total=3, skipped=0, items=pa.table({"a": [1, 2, 3]}))
    ex = RayDataExecutor(connect=connect, in_process_rows=3)
    with pytest.raises(RayWanted):  # asks for a GPU: never in the driver
        next(iter(ex.execute(FakeStage(1.0), small)))
    ex = RayDataExecutor(connect=connect, in_process_rows=2)
    with pytest.raises(RayWanted):  # 3 items > 2
        next(iter(ex.execute(FakeStage(0.0), small)))
    assert len(calls) == 2 and ex.ran == {"s": "ray"}
    # a job stage's one-batch actor work runs here; several batches go to Ray
    got = list(ex.map_actors(lambda: (lambda b: b), (), make_ds=_no_ray,
                             local_batches=lambda: iter([pa.table({"x": [1]})]),
                             batch_size=1, num_batches=1))
    assert got[0].to_pylist() == [{"x": 1}]
    with pytest.raises(RayWanted):
        next(iter(ex.map_actors(lambda: None, (), make_ds=_no_ray, local_batches=iter,
                                batch_size=1, num_batches=2)))


def test_cpu_only_hides_the_gpu_from_device_auto(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    with cpu_only():
        assert resolve_device("auto").type == "cpu"
        assert resolve_device("cuda").type == "cuda"  # asked for by name: as before
    assert resolve_device("auto").type == "cuda"


def _fate_sharing_child():
    """``sleep 60`` started as Ray starts its head processes: SIGKILLed when the *thread* that
    started it exits (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    import subprocess

    libc = ctypes.CDLL(None, use_errno=True)

    def pdeathsig() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG

    return subprocess.Popen(["sleep", "60"], preexec_fn=pdeathsig)


def test_ray_is_started_on_a_thread_that_outlives_the_stage_pool() -> None:
    """Started from a stage thread that then ends, Ray's head processes would be killed with it
    (``ray.shutdown()`` then waited ~20 s on a dead GCS). `_on_lasting_thread` runs the start
    on a thread that lives until the process exits."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.dag.runner import _on_lasting_thread

    with ThreadPoolExecutor(1) as pool:  # the mechanism: a pool thread's child dies with it
        bare = pool.submit(_fate_sharing_child).result()
    assert bare.wait(timeout=10) == -9

    with ThreadPoolExecutor(1) as pool:
        kept = pool.submit(_on_lasting_thread, _fate_sharing_child).result()
        name = pool.submit(_on_lasting_thread, lambda: threading.current_thread().name).result()
    try:
        assert name == "vgen-ray-owner"
        time.sleep(0.5)
        assert kept.poll() is None  # alive after the pool's threads ended
    finally:
        kept.kill()
        kept.wait()
    with ThreadPoolExecutor(1) as pool, pytest.raises(ZeroDivisionError):
        pool.submit(_on_lasting_thread, lambda: 1 / 0).result()
    assert _on_lasting_thread(threading.current_thread) is threading.main_thread()


def test_the_imports_of_stages_to_run_are_warmed_in_the_background(tmp_path, monkeypatch):
    """`Stage.warm_imports` of every stage to run are imported on a daemon thread when the run
    starts (torch's import overlaps the stages before the first that needs it); up-to-date
    stages' are not."""
    import sys
    import threading
    from types import SimpleNamespace

    from pipelines.dag.planner import UP_TO_DATE
    from pipelines.dag.runner import _warm_imports
    from pipelines.stages.ingest import IngestImages
    from pipelines.stages.tokenize import TokenizeFSQ

    dag = _dag(tmp_path)
    monkeypatch.setattr(IngestImages, "warm_imports", ("colorsys",))
    monkeypatch.setattr(TokenizeFSQ, "warm_imports", ("this_module_does_not_exist", "netrc"))
    for m in ("colorsys", "netrc"):
        monkeypatch.delitem(sys.modules, m, raising=False)

    def settle():
        for t in threading.enumerate():
            if t.name == "vgen-warm-imports":
                t.join(timeout=30)

    plans = [SimpleNamespace(stage="images", state=UP_TO_DATE),
             SimpleNamespace(stage="tokens", state="to-run")]
    _warm_imports(dag, plans)
    settle()
    assert "netrc" in sys.modules  # after a module that fails to import: each on its own
    assert "colorsys" not in sys.modules  # images is up to date
    _warm_imports(dag, None)  # planning failed: every stage may run
    settle()
    assert "colorsys" in sys.modules
