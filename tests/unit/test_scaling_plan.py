"""What the scale work changed on the plan path behaves as before: ``ingest.images`` builds its
sample ids in Arrow (one key validation per file, not per id) and escapes listed paths with a
``str.replace`` where that is all they need, and gets the same ids and keys;
``plan_dag(count_work=False)`` plans the same states and fingerprints without the to-do counts;
and the synthetic state ``benchmarks/scaling.py`` measures against is the state a real run
leaves (same fingerprints, every stage up-to-date)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_source_incremental import write_png

from pipelines.stages.base import StageContext
from pipelines.stages.ingest import (IngestImages, IngestImagesConfig, crop_sample_ids,
                                     escape_path, image_sample_id)
from vgen_core.data import TableStore
from vgen_core.data.identity import escape_key

ROOT = Path(__file__).resolve().parents[2]
PATHLIKE = st.text(st.sampled_from(list("ab/ %-c.\t\n\x00é猫\u200b\udc80%25")), min_size=1)


def _old_ids(dataset: str, keys: list[str], crops: int) -> list[list[str]]:
    """The ids as list_items built them before (one make_sample_id per id)."""
    return [[image_sample_id(dataset, key, k) for k in range(crops)] for key in keys]


@given(st.lists(PATHLIKE, max_size=6), st.integers(1, 12))
def test_crop_ids_are_the_per_id_formula(rels, crops):
    keys = [escape_key(r) for r in rels]
    got = crop_sample_ids("images", keys, crops)
    assert got.type == pa.list_(pa.string())
    assert got.to_pylist() == _old_ids("images", keys, crops)


def test_crop_ids_of_no_files_and_of_one_crop():
    assert crop_sample_ids("images", [], 4).to_pylist() == []
    assert crop_sample_ids("ds_1", ["a.png", "b%20c.png"], 1).to_pylist() == [
        ["ds_1/a.png-c0"], ["ds_1/b%20c.png-c0"]]


def test_crop_ids_refuse_what_make_sample_id_refuses():
    with pytest.raises(ValueError, match="must not contain"):
        crop_sample_ids("images", ["a b.png"], 2)  # an unescaped key


def test_list_items_ids_are_unchanged(tmp_path):
    root = tmp_path / "imgs"
    for i, rel in enumerate(["cls a/one.png", "cls a/100%.png", "b/été 猫.jpg", "b/two.png"]):
        write_png(root / rel, seed=i)
    cfg = IngestImagesConfig(root=str(root), crops_per_image=3, size=16)
    stage = IngestImages(cfg, StageContext(dag="t", stage="src", store=None, row_fingerprint=""))
    items = stage.list_items()
    assert items.schema.field("sample_ids").type == pa.list_(pa.string())
    assert items["sample_ids"].to_pylist() == _old_ids("images", items["key"].to_pylist(), 3)


def _dag(root: Path):
    from pipelines.dag.spec import parse_dag

    return parse_dag({"name": "t", "chunk_size": 4, "stages": {
        "images": {"uses": "ingest.images",
                   "with": {"root": str(root), "crops_per_image": 2, "size": 32}},
        "tokens": {"uses": "tokenize.fsq", "needs": ["images"],
                   "with": {"size": "tiny", "init_seed": 0, "flip": True}}}})


def _run(dag, store):
    from pipelines.dag.runner import Runner
    from vgen_core.tracking import NullTracker

    summary = Runner(dag, store, NullTracker(), "", executor="local").run()
    assert summary.ok, {n: o.error for n, o in summary.outcomes.items()}
    return summary


def test_plan_without_counts_has_the_same_states_and_fingerprints(tmp_path):
    from pipelines.dag.planner import plan_dag
    from pipelines.dag.state import StageState

    root = tmp_path / "imgs"
    for i in range(5):
        write_png(root / f"c{i % 2}" / f"img{i}.png", seed=i)
    store = TableStore(str(tmp_path / "store"))
    dag = _dag(root)
    state = StageState(store)

    def both():
        counted = plan_dag(dag, store, state)
        bare = plan_dag(dag, store, state, count_work=False)
        assert [(p.stage, p.state, p.fingerprint) for p in counted] == [
            (p.stage, p.state, p.fingerprint) for p in bare]
        for c, b in zip(counted, bare):
            assert c.reason.startswith(b.reason)
            assert (b.todo, b.total, b.breakdown) == (None, None, {})
        return counted, bare

    counted, bare = both()  # never ran: images counted (10 samples), tokens waits for it
    assert (counted[0].state, counted[0].total) == ("to-run", 10)
    _run(dag, store)
    counted, bare = both()
    assert {p.state for p in bare} == {"up-to-date"}
    assert [p.outputs for p in counted] == [p.outputs for p in bare]
    write_png(root / "c0" / "img0.png", seed=99)  # one changed file: 2 samples
    counted, bare = both()
    assert (counted[0].state, counted[0].total, bare[0].state) == ("to-run", 10, "to-run")
    assert "2 of 10" in counted[0].reason and "2 of 10" not in bare[0].reason


def _scaling():
    spec = importlib.util.spec_from_file_location("scaling_bench",
                                                  ROOT / "benchmarks" / "scaling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_benchmark_seeds_the_state_a_real_run_leaves(tmp_path):
    from pipelines.dag.planner import plan_dag
    from pipelines.dag.spec import load_dag
    from pipelines.dag.state import StageState

    bench = _scaling()
    folder = tmp_path / "imgs"
    bench.write_folder(folder, 6)
    path = bench.make_dag(tmp_path / "dag.yaml", folder, crops=2, chunk_size=4)
    seeded = bench.seed(path, tmp_path / "seeded")
    assert (seeded["rows"], seeded["files"]) == (12, 6)

    def plans(storage: Path):
        dag = load_dag(path, storage=str(storage))
        store = TableStore(dag.spec.storage)
        return dag, store, plan_dag(dag, store, StageState(store))

    dag, store, fake = plans(tmp_path / "seeded")
    assert {p.stage: p.state for p in fake} == {"images": "up-to-date", "tokens": "up-to-date"}
    assert {p.stage: p.fingerprint for p in fake} == {k: seeded[k] for k in ("images", "tokens")}
    # a real run over the same folder: the same fingerprints, tables and row counts
    real_dag, real_store, _ = plans(tmp_path / "real")
    _run(real_dag, real_store)
    _, _, real = plans(tmp_path / "real")
    assert [(p.stage, p.state, p.fingerprint) for p in real] == [
        (p.stage, p.state, p.fingerprint) for p in fake]
    for p, q in zip(fake, real):
        assert {k: (r.name, r.version, r.digest) for k, r in p.outputs.items()} == {
            k: (r.name, r.version, r.digest) for k, r in q.outputs.items()}
        name = p.outputs["samples"].name
        assert store.schema(name) == real_store.schema(name)
        assert store.read(name).num_rows == real_store.read(name).num_rows == 12


ANY_TEXT = st.text(st.one_of(st.characters(codec=None, exclude_categories=()),
                             st.characters(categories=["Cs", "Cc", "Cf", "Zs", "Zl", "Zp"]),
                             st.sampled_from("%/ -c0")), min_size=1)


@given(st.one_of(ANY_TEXT, PATHLIKE, st.from_regex(r"/[a-z0-9_./-]{1,40}", fullmatch=True)))
def test_escape_path_is_escape_key(text):
    assert escape_path(text) == escape_key(text)


def test_escape_path_examples():
    assert escape_path("/data/cats/a.png") == "%2Fdata%2Fcats%2Fa.png"
    assert escape_path("cats/my photo.png") == "cats%2Fmy%20photo.png"
    assert escape_path("a/100%.png") == "a%2F100%25.png"
    assert escape_path("a/b\tc.png") == "a%2Fb%09c.png"


def _tree(root: Path) -> None:
    for i, rel in enumerate(["c1/a.png", "c1/deep/b.jpg", "c2/c d.png", "top.PNG",
                             "c3/100%.webp"]):
        write_png(root / rel, seed=i)
    (root / "c2" / "notes.txt").write_text("not an image")


def test_iter_files_lists_what_find_lists(tmp_path):
    from pipelines.stages.ingest import _iter_files
    from vgen_core.data.fsio import filesystem_for

    _tree(tmp_path / "r")
    for where in [tmp_path / "r", tmp_path / "r" / "c1", tmp_path / "r" / "top.PNG",
                  tmp_path / "missing"]:
        fs, base = filesystem_for(str(where))
        try:
            want = fs.find(base, detail=True)
        except FileNotFoundError:
            want = {}
        assert dict(_iter_files(fs, base)) == want


def test_source_fingerprint_and_items_are_unchanged(tmp_path):
    """The listing digest is the one the fsspec-find listing gave (so no DAG re-reads its
    files after the upgrade), and the work items are the same."""
    from vgen_core.data import content_digest
    from vgen_core.data.fsio import filesystem_for

    root = tmp_path / "r"
    _tree(root)
    cfg = IngestImagesConfig(root=str(root), crops_per_image=2, size=16)
    stage = IngestImages(cfg, StageContext(dag="t", stage="src", store=None, row_fingerprint=""))
    fs, base = filesystem_for(str(root))
    listed = [(p, f"{i.get('size')}-{i.get('mtime')}") for p, i in
              sorted(fs.find(base, detail=True).items())
              if p.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"))]
    assert stage.source_fingerprint() == {"listing": content_digest(listed)}
    items = stage.list_items()
    assert items["item_key"].to_pylist() == [p for p, _ in listed]
    assert items["key"].to_pylist() == [escape_key(p[len(base) + 1:]) for p, _ in listed]
    assert items["label"].to_pylist() == list(range(len(listed)))  # top.PNG: flat, by index
    fresh = IngestImages(cfg, StageContext(dag="t", stage="src", store=None,
                                           row_fingerprint=""))
    assert fresh.list_items().equals(items)
