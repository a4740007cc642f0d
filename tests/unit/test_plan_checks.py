"""Plan-phase config checks: a data root or weights file that is not there is refused before
anything starts. ``vgen run`` exits 2 naming the DAG file, the stage and the field, with no Ray,
no MLflow store and no tables; ``vgen plan`` / ``vgen status`` report the same problem as one
clean line per bad stage (exit 2) and still show the other stages."""

from __future__ import annotations

import json
import sys
import time

import pytest
import yaml

from pipelines.cli import main
from pipelines.dag.planner import ConfigErrors, check_dag, require_valid_config
from pipelines.dag.spec import load_dag
from pipelines.stages.base import file_problem, root_problem
from vgen_core.data import TableStore


def write_dag(tmp_path, stages, name="checks"):
    p = tmp_path / "dag.yaml"
    p.write_text(yaml.safe_dump({"name": name, "stages": stages}))
    return p


def missing_root_dag(tmp_path):
    return write_dag(tmp_path, {
        "pancap": {"uses": "curate.pancap", "with": {"root": str(tmp_path / "nowhere")}},
        "images": {"uses": "ingest.images", "with": {"root": "skimage://", "crops_per_image": 1}},
    })


def ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def start_clock(dag, monkeypatch) -> float:
    """Now, after importing the DAG's stage kinds (torch, ...), which is not what is timed; and
    starting Ray or an MLflow run from here on fails the test."""
    import pipelines.dag.runner as runner
    from vgen_core.tracking import MlflowTracker

    def must_not(*a, **k):
        raise AssertionError("started before the config was checked")

    monkeypatch.setattr(runner, "connect_ray", must_not)
    monkeypatch.setattr(MlflowTracker, "start", must_not)
    load_dag(dag)
    return time.time()


def assert_nothing_started(storage, t0):
    assert time.time() - t0 < 10, "refused only after something slow started"
    assert not ray_started()
    assert not storage.exists(), sorted(p.name for p in storage.rglob("*"))  # no db, no tables


def test_run_refuses_a_missing_root_before_anything_starts(tmp_path, capsys, monkeypatch):
    dag, storage = missing_root_dag(tmp_path), tmp_path / "s"
    t0 = start_clock(dag, monkeypatch)
    assert main(["run", str(dag), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert_nothing_started(storage, t0)
    lines = [ln for ln in err.splitlines() if ln.startswith("vgen:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("vgen: invalid DAG: ")
    assert str(dag) in line and "stage 'pancap'" in line and "field 'with.root'" in line
    assert "nowhere" in line and "does not exist" in line
    assert "Traceback" not in err


def test_run_refuses_a_missing_weights_file(tmp_path, capsys, monkeypatch):
    dag = write_dag(tmp_path, {
        "images": {"uses": "ingest.images", "with": {"root": "skimage://", "crops_per_image": 1}},
        "tokens": {"uses": "tokenize.lfq", "needs": ["images"],
                   "with": {"weights": str(tmp_path / "gone.safetensors")}},
    })
    storage = tmp_path / "s"
    t0 = start_clock(dag, monkeypatch)
    assert main(["run", str(dag), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert_nothing_started(storage, t0)
    assert "stage 'tokens'" in err and "field 'with.weights'" in err and "gone.safetensors" in err
    assert "Traceback" not in err


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    dag = write_dag(tmp_path, {
        "pancap": {"uses": "curate.pancap", "with": {"root": str(tmp_path / "nowhere")}},
        "vicas": {"uses": "curate.vicas", "with": {"root": str(tmp_path / "nor-here")}},
        "images": {"uses": "ingest.images", "with": {"root": str(tmp_path / "no-images")}},
    })
    assert main(["run", str(dag), "--storage", str(tmp_path / "s")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("vgen:")]
    assert len(err) == 3 and all("field 'with.root'" in line for line in err)
    assert {line.split("stage '")[1].split("'")[0] for line in err} == {"pancap", "vicas",
                                                                          "images"}


@pytest.mark.parametrize("fmt", ["text", "json", "mermaid"])
def test_plan_reports_the_bad_stage_and_plans_the_others(tmp_path, capsys, fmt):
    dag = missing_root_dag(tmp_path)
    assert main(["plan", str(dag), "--storage", str(tmp_path / "s"), "--format", fmt]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    bad = [ln for ln in err.splitlines() if ln.startswith("vgen:")]
    assert len(bad) == 1 and "stage 'pancap'" in bad[0] and "field 'with.root'" in bad[0]
    if fmt == "json":
        states = {s["stage"]: s for s in json.loads(out)["stages"]}
        assert states["pancap"]["state"] == "invalid"
        assert "with.root" in states["pancap"]["reason"]
        assert states["images"]["state"] == "to-run"
        assert states["images"]["reason"].startswith("never ran")
    elif fmt == "text":
        assert "invalid" in out and "images" in out and "never ran" in out
    else:
        assert "class pancap invalid;" in out and "class images torun;" in out


def test_status_reports_the_bad_stage_cleanly(tmp_path, capsys):
    dag = missing_root_dag(tmp_path)
    assert main(["status", str(dag), "--storage", str(tmp_path / "s")]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "pancap" in out and "invalid" in out and "images" in out
    bad = [ln for ln in err.splitlines() if ln.startswith("vgen:")]
    assert len(bad) == 1 and "field 'with.root'" in bad[0]
    assert main(["status", str(dag), "--storage", str(tmp_path / "s"), "--json"]) == 2
    st = json.loads(capsys.readouterr().out)
    assert {s["stage"]: s["state"] for s in st["stages"]} == {"pancap": "invalid",
                                                              "images": "to-run"}


def test_downstream_of_an_invalid_stage_is_blocked(tmp_path, capsys):
    dag = write_dag(tmp_path, {
        "images": {"uses": "ingest.images", "with": {"root": str(tmp_path / "nowhere")}},
        "tokens": {"uses": "tokenize.lfq", "needs": ["images"]},
    })
    assert main(["plan", str(dag), "--storage", str(tmp_path / "s"), "--format", "json"]) == 2
    states = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert states["images"]["state"] == "invalid"
    assert states["tokens"]["state"] == "to-run"
    assert "upstream 'images' has an invalid config" in states["tokens"]["reason"]


def test_valid_roots_and_files_pass(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "annotations").mkdir()
    (tmp_path / "data" / "annotations" / "panoptic_train2017.json").write_text("{}")
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"x")
    assert root_problem("skimage://") is None and root_problem("sample://") is None
    assert root_problem(str(tmp_path / "data")) is None
    assert file_problem(str(w)) is None
    assert "does not exist" in root_problem(str(tmp_path / "nope"))
    assert "does not exist" in file_problem(str(tmp_path / "nope.safetensors"))
    assert "is a folder" in file_problem(str(tmp_path / "data"))
    assert root_problem("nosuchproto://x/y").startswith("cannot open")

    dag = write_dag(tmp_path, {
        "pancap": {"uses": "curate.pancap", "with": {"root": str(tmp_path / "data")}},
        "images": {"uses": "ingest.images", "with": {"root": "skimage://"}},
        "tokens": {"uses": "tokenize.lfq", "needs": ["images"], "with": {"weights": str(w)}},
    })
    loaded = load_dag(dag, storage=str(tmp_path / "s"))
    store = TableStore(str(tmp_path / "s"))
    assert check_dag(loaded, store) == {}
    require_valid_config(loaded, store)


def test_config_errors_carry_each_problem(tmp_path):
    dag = missing_root_dag(tmp_path)
    loaded = load_dag(dag, storage=str(tmp_path / "s"))
    with pytest.raises(ConfigErrors) as e:
        require_valid_config(loaded, TableStore(str(tmp_path / "s")))
    [p] = e.value.problems
    assert (p.file, p.stage, p.field) == (str(dag), "pancap", "with.root")
    assert (e.value.file, e.value.stage, e.value.field) == (str(dag), "pancap", "with.root")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_unlistable_root_is_refused(tmp_path):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0)
    try:
        if os.access(locked, os.R_OK):  # root ignores permissions
            pytest.skip("running as root")
        assert "not readable" in root_problem(str(locked))
    finally:
        os.chmod(locked, 0o755)


# ----------------------------------------------------------------------------- empty roots

EMPTY_ROOT_KINDS = ["ingest.images", "curate.pancap", "curate.vicas"]


def empty_root_dag(tmp_path, kind):
    (tmp_path / "empty").mkdir()
    return write_dag(tmp_path, {"src": {"uses": kind, "with": {"root": str(tmp_path / "empty")}}})


@pytest.mark.parametrize("kind", EMPTY_ROOT_KINDS)
def test_run_refuses_an_empty_root_before_anything_starts(tmp_path, capsys, monkeypatch, kind):
    """A root that exists but holds nothing is a config error (a wrong path, a download not
    unpacked yet), not an empty dataset: exit 2 naming file, stage and field, with how to fix."""
    dag, storage = empty_root_dag(tmp_path, kind), tmp_path / "s"
    t0 = start_clock(dag, monkeypatch)
    assert main(["run", str(dag), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert_nothing_started(storage, t0)
    [line] = [ln for ln in err.splitlines() if ln.startswith("vgen:")]
    assert line.startswith(f"vgen: invalid DAG: {dag}: stage 'src': field 'with.root': ")
    assert str(tmp_path / "empty") in line and "expected" in line
    assert ("skimage://" if kind == "ingest.images" else "sample://") in line  # how to fix
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", EMPTY_ROOT_KINDS)
@pytest.mark.parametrize("command", [["plan"], ["plan", "--format", "json"], ["status"],
                                     ["status", "--json"]])
def test_plan_and_status_report_an_empty_root_cleanly(tmp_path, capsys, kind, command):
    dag = empty_root_dag(tmp_path, kind)
    assert main([command[0], str(dag), "--storage", str(tmp_path / "s"), *command[1:]]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    [line] = [ln for ln in err.splitlines() if ln.startswith("vgen:")]
    assert "stage 'src'" in line and "field 'with.root'" in line
    if "--json" in command or "json" in command:
        [st] = json.loads(out)["stages"]
        assert st["state"] == "invalid" and "with.root" in st["reason"]
    else:
        assert "invalid" in out


def test_ingest_root_needs_an_image_at_any_depth(tmp_path):
    from pipelines.stages.base import first_file

    root = tmp_path / "imgs"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "README.txt").write_text("no pictures here")
    (root / ".DS_Store").write_bytes(b"x")
    dag = write_dag(tmp_path, {"src": {"uses": "ingest.images", "with": {"root": str(root)}}})
    store = TableStore(str(tmp_path / "s"))
    [p] = check_dag(load_dag(dag), store)["src"]
    assert p.field == "with.root" and "holds no image files" in p.detail
    assert first_file(str(root)) == f"{root}/notes/README.txt"  # dot-files are not files here

    deep = root / "a" / "b" / "cat.JPG"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"not decoded by the check")
    assert check_dag(load_dag(dag), store) == {}
    assert first_file(str(root), (".jpg",)) == str(deep)
    assert first_file(str(deep), (".jpg",)) == str(deep)  # a root that is the file itself
