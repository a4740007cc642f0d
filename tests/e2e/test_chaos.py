"""Chaos: the runner is SIGKILLed at a named fault point (:mod:`vgen_core.faults`), then run
again without the fault; the result must be what a clean run gives.

The DAG has two source stages that commit in several chunks and quarantine: ``ingest.images``
over 8 small PNGs and one file that is not a PNG (2 quarantine rows, ``decode``), and
``curate.pancap`` over a 6-image PanCap sample dataset with one truncated JPEG (1 quarantine
row, ``image_decode``). Each case

1. runs the DAG in a subprocess with ``VGEN_FAULT=<point>:<n>``: it must die by SIGKILL (-9),
   at that point (the fault module says so on stderr);
2. checks what a reader sees right then: every table's active files exist, no sample id twice;
3. runs the DAG again without the fault: it must succeed;
4. checks exactly-once (ids unique, the expected ids, quarantine rows once with their check, one
   sources record per item) and that every output table equals a clean run's (a run on a fresh
   storage root, made once per module).

The per-sample cases run the driver without Ray (``executor="local"``: the same commit code,
seconds per run); the ``ray`` cases run ``vgen run`` against the session's Ray cluster, so the
driver dies while its Ray Data job is running and the re-run starts a new job. The default run
keeps four representative cases; the whole grid, a sweep of ``after_table_commit:<n>`` over
every commit of the run, kills while vanished sources are deleted, and kills inside a train
checkpoint save are ``slow``.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, run_output, vgen_cmd
from vgen_core.data import TableStore

DAG_NAME = "chaos"
STAGES = ("images", "pancap")
N_IMAGES, CROPS = 8, 2
N_PANCAP = 6
#: ids and checks the clean run must produce
EXPECTED_IDS = {"images": N_IMAGES * CROPS, "pancap": N_PANCAP - 1}
EXPECTED_QUARANTINE = {"images": {f"images/broken.png-c{k}": "decode" for k in range(CROPS)}}

#: runs the DAG in this process's own driver, without MLflow (argv: dag, storage, executor)
DRIVER = """
import sys
from pipelines.dag.runner import Runner
from pipelines.dag.spec import load_dag
from vgen_core.data import TableStore
from vgen_core.tracking import NullTracker
dag = load_dag(sys.argv[1], storage=sys.argv[2])
summary = Runner(dag, TableStore(sys.argv[2]), NullTracker(), "none", executor=sys.argv[3]).run()
sys.exit(0 if summary.ok else 1)
"""


# -- data and runs ----------------------------------------------------------------------------
def write_images(folder: Path, n: int = N_IMAGES, seed: int = 0, broken: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"img{i:02d}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"this is not a png")


def write_pancap(root: Path) -> str:
    """The sample dataset with one truncated JPEG; returns that sample's id."""
    from vgen_core.data import make_sample_id
    from vgen_core.formats.pancap_samples import write_pancap_sample_dataset

    write_pancap_sample_dataset(root, n_images=N_PANCAP, seed=0)
    jpg = sorted((root / "train2017").glob("*.jpg"))[2]
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])
    return make_sample_id("pancap", int(jpg.stem), width=12)


def make_dag(path: Path, images: Path, pancap: Path | None, chunk: int = 4) -> Path:
    stages: dict[str, Any] = {
        "images": {"uses": "ingest.images",
                   "with": {"root": str(images), "crops_per_image": CROPS, "size": 16},
                   "resources": {"batch_size": 2}},
    }
    if pancap is not None:
        stages["pancap"] = {"uses": "curate.pancap", "with": {"root": str(pancap)},
                            "resources": {"batch_size": 2}}
    path.write_text(yaml.safe_dump({"name": DAG_NAME, "chunk_size": chunk, "error_budget": 0.5,
                                    "stages": stages}))
    return path


def run_inprocess(dag: Path, storage: Path, executor: str = "local") -> None:
    from pipelines.dag.runner import Runner
    from pipelines.dag.spec import load_dag
    from vgen_core.tracking import NullTracker

    d = load_dag(dag, storage=str(storage))
    summary = Runner(d, TableStore(str(storage)), NullTracker(), "none", executor=executor,
                     stream=open(os.devnull, "w")).run()
    assert summary.ok, {n: o.error for n, o in summary.outcomes.items()}


def run_subprocess(dag: Path, storage: Path, executor: str, env: dict[str, str],
                   tracking: str | None = None) -> subprocess.CompletedProcess:
    """``vgen run`` (Ray) or the bare driver (local) in a subprocess."""
    if executor == "ray":
        cmd = vgen_cmd() + ["run", str(dag), "--storage", str(storage)]
        if tracking:
            cmd += ["--tracking-uri", tracking]
    else:
        cmd = [sys.executable, "-c", DRIVER, str(dag), str(storage), executor]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def run_killed(dag: Path, storage: Path, executor: str, env: dict[str, str], fault: str,
               tracking: str | None = None) -> subprocess.CompletedProcess:
    p = run_subprocess(dag, storage, executor, dict(env, VGEN_FAULT=fault), tracking)
    point = fault.split(":")[0]
    assert p.returncode == -signal.SIGKILL, (
        f"{fault}: expected death by SIGKILL, got rc {p.returncode}\n{run_output(p)[-4000:]}")
    assert f"SIGKILL at {point}" in run_output(p), run_output(p)[-4000:]
    return p


# -- what a reader sees -----------------------------------------------------------------------
def table_names(stages: tuple[str, ...] = STAGES) -> list[str]:
    return [f"{DAG_NAME}/{s}{suffix}" for s in stages
            for suffix in ("", "__quarantine", "__sources")]


def check_readable(storage: Path, stages: tuple[str, ...] = STAGES) -> dict[str, int]:
    """Every table as a reader sees it: its active files exist, a scan of exactly those files
    gives the rows the Delta reader gives, no sample id (data), key (quarantine) or item (sources
    record, per stamp) twice. Returns how many Parquet files each table's folder holds that no
    commit references (a killed writer's leftovers: invisible to readers)."""
    import pyarrow.dataset as pds
    from deltalake import DeltaTable

    store = TableStore(str(storage))
    orphans = {}
    for name in table_names(stages):
        if not store.exists(name):
            continue
        dt = DeltaTable(store.uri(name))
        active = [u.removeprefix("file://") for u in dt.file_uris()]
        assert all(os.path.exists(f) for f in active), name
        rows = store.read(name)
        scanned = pds.dataset(active, format="parquet").count_rows() if active else 0
        assert scanned == rows.num_rows, (name, scanned, rows.num_rows)
        if name.endswith("__quarantine"):
            keys = list(zip(rows["sample_id"].to_pylist(), rows["content_digest"].to_pylist(),
                            rows["fingerprint"].to_pylist()))
        elif name.endswith("__sources"):
            keys = list(zip(rows["item_key"].to_pylist(), rows["item_stamp"].to_pylist(),
                            rows["fingerprint"].to_pylist()))
        else:
            keys = rows["sample_id"].to_pylist()
        dups = [k for k, c in collections.Counter(keys).items() if c > 1]
        assert not dups, f"{name}: {len(dups)} keys more than once, e.g. {dups[:3]}"
        referenced = set()
        for log in Path(store.uri(name), "_delta_log").glob("*.json"):
            for line in log.read_text().splitlines():
                action = json.loads(line)
                for kind in ("add", "remove"):
                    if kind in action:
                        referenced.add(action[kind]["path"])
        folder = Path(store.uri(name))
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*.parquet")
                   if "_delta_log" not in p.parts}
        orphans[name] = len(on_disk - referenced)
    return orphans


def snapshot(storage: Path, stages: tuple[str, ...] = STAGES) -> dict[str, list[dict]]:
    """The output tables without their timestamps, in a canonical order; a sources table as its
    latest record per item (what the next run goes by)."""
    store = TableStore(str(storage))
    out: dict[str, list[dict]] = {}
    for name in table_names(stages):
        rows = store.read(name).to_pylist() if store.exists(name) else []
        if name.endswith("__sources"):
            latest: dict[str, dict] = {}
            for r in sorted(rows, key=lambda r: r["recorded_at"]):
                latest[(r["item_key"], r["fingerprint"])] = r
            rows = list(latest.values())
        for r in rows:
            r.pop("created_at", None)
            r.pop("recorded_at", None)
        out[name] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=repr))
    return out


def assert_same(got: dict[str, list[dict]], want: dict[str, list[dict]]) -> None:
    assert set(got) == set(want)
    for name in want:
        g = {json.dumps(r, sort_keys=True, default=repr) for r in got[name]}
        w = {json.dumps(r, sort_keys=True, default=repr) for r in want[name]}
        assert len(got[name]) == len(want[name]) and g == w, (
            f"{name}: {len(got[name])} rows vs {len(want[name])} in a clean run; "
            f"extra {sorted(g - w)[:2]}; missing {sorted(w - g)[:2]}")


def assert_exactly_once(storage: Path, bad_pancap: str) -> None:
    store = TableStore(str(storage))
    for stage, n in EXPECTED_IDS.items():
        ids = store.read(f"{DAG_NAME}/{stage}", columns=["sample_id"])["sample_id"].to_pylist()
        assert len(ids) == n == len(set(ids)), (stage, len(ids), len(set(ids)))
    q = store.read(f"{DAG_NAME}/images__quarantine").to_pylist()
    assert {r["sample_id"]: r["check"] for r in q} == EXPECTED_QUARANTINE["images"]
    assert len(q) == len(EXPECTED_QUARANTINE["images"])
    (row,) = store.read(f"{DAG_NAME}/pancap__quarantine").to_pylist()
    assert (row["sample_id"], row["check"]) == (bad_pancap, "image_decode")
    for stage in STAGES:  # one record per item: a re-run recorded nothing twice
        rec = store.read(f"{DAG_NAME}/{stage}__sources", columns=["item_key"])
        keys = rec["item_key"].to_pylist()
        assert len(keys) == len(set(keys)), (stage, collections.Counter(keys).most_common(2))


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Inputs (never edited by a case), the DAG, and a clean run's snapshot."""
    base = tmp_path_factory.mktemp("chaos")
    write_images(base / "images")
    bad = write_pancap(base / "pancap")
    dag = make_dag(base / "chaos.yaml", base / "images", base / "pancap")
    clean = base / "clean"
    run_inprocess(dag, clean)
    assert_exactly_once(clean, bad)
    return {"base": base, "dag": dag, "bad": bad, "clean": snapshot(clean),
            "tracking": f"sqlite:///{base / 'mlflow.db'}"}


def _env(ray_address: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGEN_FAULT")}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def kill_then_rerun(data: dict, tmp_path: Path, fault: str, executor: str,
                    ray_address: str | None) -> dict[str, int]:
    """``executor``: ``local``, ``ray`` or ``ray>local`` (killed on Ray, re-run in-process)."""
    storage = tmp_path / "store"
    env = _env(ray_address)
    killed_on, _, rerun_on = executor.partition(">")
    run_killed(data["dag"], storage, killed_on, env, fault, data["tracking"])
    check_readable(storage)
    if (rerun_on or killed_on) == "ray":
        p = run_subprocess(data["dag"], storage, executor, env, data["tracking"])
        assert p.returncode == 0, run_output(p)[-4000:]
    else:
        run_inprocess(data["dag"], storage)
    orphans = check_readable(storage)
    assert_exactly_once(storage, data["bad"])
    assert_same(snapshot(storage), data["clean"])
    return orphans


# -- the fault facility itself -----------------------------------------------------------------
def _hit(points: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom vgen_core.faults import fault_point\n"
            "for p in sys.argv[1:]:\n    print('reached', p, flush=True)\n    fault_point(p)\n")
    return subprocess.run([sys.executable, "-c", code, *points], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_fault_point_fires_at_the_nth_hit_only(tmp_path):
    from vgen_core.faults import FaultSpecError, parse_spec

    assert parse_spec("a:2, b") == {"a": 2, "b": 1}
    for bad in ("a:0", "a:x", ":3"):
        with pytest.raises(FaultSpecError):
            parse_spec(bad)
    env = _env(None)
    p = _hit(["x", "a", "x", "a", "a"], dict(env, VGEN_FAULT="a:2"))
    assert p.returncode == -signal.SIGKILL
    assert p.stdout.split("\n")[:4] == ["reached x", "reached a", "reached x", "reached a"]
    assert "reached a" not in p.stdout.split("\n")[4:]
    assert _hit(["a", "a"], env).returncode == 0  # no VGEN_FAULT: nothing happens
    once = tmp_path / "fired"
    faulty = dict(env, VGEN_FAULT="a", VGEN_FAULT_ONCE=str(once))
    assert _hit(["a"], faulty).returncode == -signal.SIGKILL and once.exists()
    assert _hit(["a"], faulty).returncode == 0  # another process: the fault was taken


# -- kill points ------------------------------------------------------------------------------
DEFAULT_CASES = [
    ("after_data_commit:2", "local"),  # a chunk's rows in, its sources record not
    ("after_quarantine_commit:1", "local"),  # rows and quarantine in, record not
    ("before_stage_completed:1", "local"),  # a whole stage in, the runner's record not
    # the driver dies while its Ray Data job runs (re-run in-process: the slow cases re-run
    # with `vgen run` on Ray too)
    ("after_data_commit:2", "ray>local"),
]
#: images: 5 chunks (the first with 2 quarantine rows); pancap: 2 chunks (one quarantine row)
SLOW_CASES = [
    ("before_data_commit:1", "local"), ("before_data_commit:4", "local"),
    ("after_data_commit:1", "local"), ("after_data_commit:5", "local"),
    ("after_data_commit:6", "local"),  # pancap's first chunk
    ("after_quarantine_commit:2", "local"),  # pancap's quarantine row
    ("before_sources_record:1", "local"), ("before_sources_record:7", "local"),
    ("after_sources_record:3", "local"), ("after_sources_record:7", "local"),
    ("after_stage_started:1", "local"), ("after_stage_started:2", "local"),
    ("before_stage_completed:2", "local"), ("after_stage_completed:1", "local"),
    ("after_stage_completed:2", "local"),
    ("before_table_commit:1", "local"), ("before_table_commit:9", "local"),
    ("before_data_commit:3", "ray"), ("after_quarantine_commit:1", "ray"),
    ("before_sources_record:4", "ray"), ("after_quarantine_commit:2", "ray"),
    ("before_stage_completed:1", "ray"), ("after_stage_completed:2", "ray"),
]


def _case_id(c: tuple[str, str]) -> str:
    return f"{c[0].replace(':', '-')}-{c[1].replace('>', '-then-')}"


@pytest.mark.parametrize("fault,executor", DEFAULT_CASES, ids=[_case_id(c) for c in DEFAULT_CASES])
def test_kill_then_rerun_exactly_once(data, tmp_path, request, fault, executor):
    address = request.getfixturevalue("ray_cluster") if executor.startswith("ray") else None
    kill_then_rerun(data, tmp_path, fault, executor, address)


@pytest.mark.slow
@pytest.mark.parametrize("fault,executor", SLOW_CASES, ids=[_case_id(c) for c in SLOW_CASES])
def test_kill_then_rerun_exactly_once_all_points(data, tmp_path, request, fault, executor):
    address = request.getfixturevalue("ray_cluster") if executor.startswith("ray") else None
    kill_then_rerun(data, tmp_path, fault, executor, address)


@pytest.mark.slow
def test_kill_after_every_commit(data, tmp_path):
    """``after_table_commit:<n>`` for every n until a run completes: every commit of the run
    (outputs, quarantine, sources records, the runner's state) is a kill point once."""
    env, n, orphans = _env(None), 0, {}
    while True:
        n += 1
        storage = tmp_path / f"store{n}"
        p = run_subprocess(data["dag"], storage, "local",
                           dict(env, VGEN_FAULT=f"after_table_commit:{n}"))
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, run_output(p)[-4000:]
        check_readable(storage)
        run_inprocess(data["dag"], storage)
        orphans[n] = sum(check_readable(storage).values())
        assert_exactly_once(storage, data["bad"])
        assert_same(snapshot(storage), data["clean"])
    assert n - 1 >= 15, f"only {n - 1} commits in a whole run?"
    print(f"killed after each of {n - 1} commits; unreferenced Parquet files: {orphans}")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["before_source_delete:1", "before_source_delete:2",
                                   "after_table_commit:3"])
def test_kill_while_deleting_vanished_sources(tmp_path, fault):
    """A file deleted between runs: its rows, then its sources record, are deleted (two
    commits); a kill before or between them, then a re-run, leaves what a fresh run gives."""
    images = tmp_path / "images"
    write_images(images)
    dag = make_dag(tmp_path / "chaos.yaml", images, None)
    storage, fresh = tmp_path / "store", tmp_path / "fresh"
    run_inprocess(dag, storage)
    (images / "img03.png").unlink()
    (images / "broken.png").unlink()
    run_killed(dag, storage, "local", _env(None), fault)
    check_readable(storage, ("images",))
    run_inprocess(dag, storage)
    check_readable(storage, ("images",))
    run_inprocess(dag, fresh)
    got, want = snapshot(storage, ("images",)), snapshot(fresh, ("images",))
    assert len(want[f"{DAG_NAME}/images"]) == (N_IMAGES - 1) * CROPS
    # the quarantine rows of the deleted broken file stay (they are history, not data)
    got.pop(f"{DAG_NAME}/images__quarantine"), want.pop(f"{DAG_NAME}/images__quarantine")
    assert_same(got, want)


# -- inside a train checkpoint save (a Ray Train worker) ----------------------------------------
TRAIN_STEPS, TRAIN_EVERY = 30, 10


def make_train_dag(path: Path, images: Path, max_failures: int) -> Path:
    dag = {"name": "chaostrain", "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": str(images), "crops_per_image": 4, "size": 32}},
        "tok": {"uses": "train.tokenizer", "needs": ["images"],
                "with": {"model": "lfq", "size": "tiny",
                         "train": {"steps": TRAIN_STEPS, "micro_batch_size": 4, "lr": 2.0e-3,
                                   "zero_stage": 2, "log_every": 1,
                                   "checkpoint_every": TRAIN_EVERY, "ema_decay": 0.9,
                                   "max_failures": max_failures}},
                "resources": {"workers": 2, "cpus": 1}},
    }}
    path.write_text(yaml.safe_dump(dag))
    return path


def train_outcome(storage: Path, tracking: str) -> tuple[dict, list[int]]:
    """The completed stage's train summary and the steps its MLflow run holds for train/loss."""
    from mlflow.tracking import MlflowClient

    from pipelines.dag.state import StageState

    _, done = StageState(TableStore(str(storage))).latest("chaostrain")
    rec = done["tok"]
    model = rec["outputs"]["tokenizer"]["uri"]
    summary = json.loads(Path(model, "train_summary.json").read_text())
    hist = MlflowClient(tracking).get_metric_history(rec["mlflow_run_id"], "train/loss")
    return summary, sorted(m.step for m in hist)


@pytest.mark.slow
@pytest.mark.parametrize("once", [True, False], ids=["worker-restart", "driver-rerun"])
def test_kill_inside_checkpoint_save(ray_cluster, tmp_path, once):
    """A Ray Train worker dies in the middle of its 2nd checkpoint save (saved locally, not
    reported). ``once``: only that worker dies, Ray Train restarts the group from the 1st
    checkpoint and the run succeeds. Otherwise every restarted worker dies at its own 2nd save
    too, the stage fails past ``max_failures``, and a plain re-run continues from the latest
    checkpoint. Either way: the last step is reached and MLflow holds each step once."""
    images = tmp_path / "images"
    write_images(images, broken=False)
    dag = make_train_dag(tmp_path / "train.yaml", images, max_failures=1)
    storage, tracking = tmp_path / "store", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(_env(ray_cluster), VGEN_FAULT="in_checkpoint_save:2")
    if once:
        env["VGEN_FAULT_ONCE"] = str(tmp_path / "fault-taken")
    p = run_subprocess(dag, storage, "ray", env, tracking)
    if once:
        assert p.returncode == 0, run_output(p)[-6000:]
        assert (tmp_path / "fault-taken").exists()
    else:
        assert p.returncode == 1, run_output(p)[-6000:]
        p = run_subprocess(dag, storage, "ray", _env(ray_cluster), tracking)
        assert p.returncode == 0, run_output(p)[-6000:]
    summary, steps = train_outcome(storage, tracking)
    assert summary["step"] == TRAIN_STEPS
    if once:  # killed saving step 20: the group went on from step 10, in the same run
        assert (summary["restores"], summary["resumed_from"]) == (1, TRAIN_EVERY), summary
    else:  # the re-run restores the latest checkpoint Ray Train recorded for the errored run:
        # step 10, or 20 when it recorded the restarted group's report (measured: 10, 1 restore;
        # Ray 2.60 keeps the errored run's last snapshot)
        assert summary["restores"] >= 1 and summary["resumed_from"] in (
            TRAIN_EVERY, 2 * TRAIN_EVERY), summary
    assert steps == list(range(1, TRAIN_STEPS + 1)), steps
