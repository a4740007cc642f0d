"""``ingest.images`` sample identity: ids come from the path relative to the dataset root (escaped,
never refused), so same-named files in different folders are different samples; the scheme
change is versioned, so a table written by the stem-keyed version 2 is re-ingested with no
old-scheme id left behind; and the escape is a reversible, injective map into valid keys."""

from __future__ import annotations

import os

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_source_incremental import Counting, run, write_png

from pipelines.stages.ingest import (IngestImages, IngestImagesConfig, image_sample_id,
                                     parse_image_sample_id)
from vgen_core.data import TableStore
from vgen_core.data.identity import (escape_key, make_sample_id, parse_sample_id,
                                     unescape_key)

CROPS = 2


def rows_by_id(store, name="t/src"):
    return {r["sample_id"]: r for r in store.read(name).to_pylist()}


def ids_for(rel: str, crops: int = CROPS) -> set[str]:
    return {image_sample_id("images", escape_key(rel), k) for k in range(crops)}


# ------------------------------------------------------------------------------------------
# (a) same file name in two folders
# ------------------------------------------------------------------------------------------


def test_same_name_in_two_folders_are_two_samples(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    write_png(root / "a" / "cat.png", seed=1, size=40)
    write_png(root / "b" / "cat.png", seed=1, size=40)  # same bytes, other folder
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(root), crops_per_image=CROPS, size=16)

    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.quarantined) == (2 * CROPS, 0)
    first = rows_by_id(store)
    assert set(first) == ids_for("a/cat.png") | ids_for("b/cat.png")
    assert "images/a%2Fcat.png-c0" in first and "images/b%2Fcat.png-c0" in first
    # the crop box depends on the source identity: same bytes, different crops
    for k in range(CROPS):
        assert (first[f"images/a%2Fcat.png-c{k}"]["image_png"]
                != first[f"images/b%2Fcat.png-c{k}"]["image_png"])
    assert {parse_image_sample_id(s)[1] for s in first} == {"a/cat.png", "b/cat.png"}

    # edit b/cat.png only: b's rows change, a's stay exactly as they were
    loads = Counting(monkeypatch, IngestImages, "_read")
    write_png(root / "b" / "cat.png", seed=99, size=40)
    r = run(store, IngestImages, cfg)
    assert [os.path.relpath(p, root) for p in loads.calls] == [os.path.join("b", "cat.png")]
    assert (r.counts.processed, r.counts.skipped) == (CROPS, CROPS)
    now = rows_by_id(store)
    assert set(now) == set(first)
    for sid in ids_for("a/cat.png"):
        assert now[sid]["content_digest"] == first[sid]["content_digest"]
        assert now[sid]["source"].endswith("/a/cat.png")
    for sid in ids_for("b/cat.png"):
        assert now[sid]["content_digest"] != first[sid]["content_digest"]
        assert now[sid]["source"].endswith("/b/cat.png")


def test_crops_do_not_depend_on_batching(tmp_path):
    """Same ids and pixels whatever the batch size (a stand-in for the number of workers)."""
    from pipelines.stages.base import InProcessExecutor, StageContext

    root = tmp_path / "imgs"
    for i in range(5):
        write_png(root / f"c{i % 2}" / f"x {i}.png", seed=i, size=30)
    cfg = IngestImagesConfig(root=str(root), crops_per_image=3, size=8)
    tables = []
    for bs in (1, 4):
        store = TableStore(str(tmp_path / f"s{bs}"))
        ctx = StageContext(dag="t", stage="src", store=store, row_fingerprint="fp")
        IngestImages(cfg, ctx).run(InProcessExecutor(batch_size=bs))
        tables.append({r["sample_id"]: r["content_digest"] for r in rows_by_id(store).values()})
    assert tables[0] == tables[1] and len(tables[0]) == 15


# ------------------------------------------------------------------------------------------
# (b) any legal file name is ingested
# ------------------------------------------------------------------------------------------

ODD_NAMES = ["my photo.png", "100%.png", "ünïcødé 猫.png", "tab\there.png", "a-c1.png",
             "quote's.png"]


def test_odd_file_names_are_escaped_not_refused(tmp_path):
    root = tmp_path / "odd"
    for i, name in enumerate(ODD_NAMES):
        write_png(root / name, seed=i)
    write_png(root / "sub dir" / "été.png", seed=50)  # a flat+nested mix: labels by index
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(root), crops_per_image=CROPS, size=16)
    r = run(store, IngestImages, cfg)
    rels = [*ODD_NAMES, "sub dir/été.png"]
    assert (r.counts.processed, r.counts.quarantined) == (CROPS * len(rels), 0)
    assert store.read("t/src__quarantine").num_rows == 0
    got = rows_by_id(store)
    assert set(got) == set().union(*(ids_for(rel) for rel in rels))
    assert "images/my%20photo.png-c0" in got and "images/100%25.png-c1" in got
    assert "images/ünïcødé%20猫.png-c0" in got  # printable unicode stays readable
    for sid in got:
        assert parse_sample_id(sid)[0] == "images"  # a valid sample id
        _, rel, k = parse_image_sample_id(sid)
        assert rel in rels and 0 <= k < CROPS
        assert got[sid]["source"].endswith("/" + rel)
    # a re-run reads nothing and deletes nothing (the SQL of quoted ids included)
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.skipped) == (0, CROPS * len(rels))
    (root / "quote's.png").unlink()
    run(store, IngestImages, cfg)
    assert set(rows_by_id(store)) == set(got) - ids_for("quote's.png")


def test_file_name_that_is_not_utf8_is_ingested(tmp_path):
    root = tmp_path / "raw"
    write_png(root / "ok.png", seed=0)
    raw = os.fsencode(str(root)) + b"/bad\x80name.png"
    with open(raw, "wb") as f:
        f.write((root / "ok.png").read_bytes())
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(root), crops_per_image=1, size=16)
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.quarantined) == (2, 0)
    got = rows_by_id(store)
    rels = {parse_image_sample_id(s)[1] for s in got}
    assert rels == {"ok.png", os.fsdecode(b"bad\x80name.png")}
    assert any(row["source"].endswith("/bad\\udc80name.png") for row in got.values())
    r = run(store, IngestImages, cfg)
    assert (r.counts.processed, r.counts.skipped) == (0, 2)


def test_skimage_ids_are_the_photo_names():
    from pipelines.stages.base import StageContext
    from vgen_core.data.sample_images import PHOTOS

    cfg = IngestImagesConfig(root="skimage://", crops_per_image=2)
    stage = IngestImages(cfg, StageContext(dag="t", stage="src", store=None, row_fingerprint=""))
    ids = [i for group in stage.list_items()["sample_ids"].to_pylist() for i in group]
    assert sorted(ids) == sorted(f"images/{n}-c{k}" for n in PHOTOS for k in range(2))
    assert "images/astronaut-c0" in ids


def test_parse_image_sample_id_rejects_other_ids():
    for bad in ["images/cat", "images/cat-c", "images/cat-c01", "images/-c0", "images/a b-c0",
                "images/%2f-c0", "pancap/000000123456"]:
        with pytest.raises(ValueError):
            parse_image_sample_id(bad)
    assert parse_image_sample_id("images/a-c1.png-c12") == ("images", "a-c1.png", 12)


# ------------------------------------------------------------------------------------------
# (c) upgrade from the stem-keyed version 2
# ------------------------------------------------------------------------------------------


def _old_scheme(monkeypatch):
    """Make IngestImages behave as version 2 did: key = the file stem (ids and crop seed)."""
    monkeypatch.setattr(IngestImages, "version", 2)
    orig = IngestImages._list_source

    def stem_keyed(self):
        items = orig(self)
        for i in items:
            i["key"] = i["path"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return items

    monkeypatch.setattr(IngestImages, "_list_source", stem_keyed)


def test_version_2_table_is_reingested_with_no_old_ids_left(tmp_path, monkeypatch):
    from pipelines.dag.runner import Runner
    from pipelines.dag.spec import parse_dag
    from vgen_core.tracking import NullTracker

    root = tmp_path / "imgs"
    rels = ["a/one.png", "a/two.png", "b/three.png", "b/one.jpg"]
    for i, rel in enumerate(rels):
        write_png(root / rel, seed=i)
    store = TableStore(str(tmp_path / "s"))
    dag = parse_dag({"name": "t", "stages": {"src": {
        "uses": "ingest.images",
        "with": {"root": str(root), "crops_per_image": CROPS, "size": 16}}}})

    def go():
        summary = Runner(dag, store, NullTracker(), "", executor="local").run()
        assert summary.ok, summary.outcomes["src"].error
        return summary.outcomes["src"]

    with monkeypatch.context() as m:
        _old_scheme(m)
        assert go().action == "ran"
        old = rows_by_id(store)
        # version 2's bug, reproduced: a/one.png and b/one.jpg share images/one-c*
        assert set(old) == {f"images/{s}-c{k}" for s in ("one", "two", "three")
                            for k in range(CROPS)}
        old_fps = set(store.read("t/src__sources")["fingerprint"].to_pylist())

    # version 3 over the version-2 table: a new row fingerprint, so the stage runs, reads every
    # file, writes the new ids and deletes the old ones as no longer listed
    loads = Counting(monkeypatch, IngestImages, "_read")
    out = go()
    assert out.action == "ran"
    assert loads.take() == len(rels)
    new = rows_by_id(store)
    assert set(new) == set().union(*(ids_for(rel) for rel in rels))
    assert not set(new) & set(old)
    assert {parse_image_sample_id(s)[1] for s in new} == set(rels)
    recs = store.read("t/src__sources").to_pylist()
    new_fp = {r["fingerprint"] for r in recs} - old_fps
    assert len(new_fp) == 1
    assert {tuple(sorted(r["rows"])) for r in recs if r["fingerprint"] in new_fp} == \
        {tuple(sorted(ids_for(rel))) for rel in rels}

    # and the result is stable: a third run is skipped without reading a file
    assert go().action == "skipped" and loads.take() == 0


def test_version_2_stage_rerun_directly_deletes_old_ids(tmp_path, monkeypatch):
    """The same upgrade through the stage alone (row fingerprint given by hand): SourceStage
    deletes every old-scheme id, none is left behind even when a new id set overlaps."""
    root = tmp_path / "flat"
    for i, name in enumerate(["x.png", "y.png"]):
        write_png(root / name, seed=i)
    store = TableStore(str(tmp_path / "s"))
    cfg = IngestImagesConfig(root=str(root), crops_per_image=1, size=16)
    with monkeypatch.context() as m:
        _old_scheme(m)
        run(store, IngestImages, cfg, fp="v2")
    assert set(rows_by_id(store)) == {"images/x-c0", "images/y-c0"}
    r = run(store, IngestImages, cfg, fp="v3")
    assert r.counts.processed == 2
    assert set(rows_by_id(store)) == {"images/x.png-c0", "images/y.png-c0"}


# ------------------------------------------------------------------------------------------
# (d) escape_key / unescape_key properties
# ------------------------------------------------------------------------------------------

# every code point, with extra weight on the ones that need escaping: lone surrogates (file
# names that are not UTF-8 decode to them), controls, format characters, spaces, '%' and '/'
ANY_TEXT = st.text(st.one_of(st.characters(codec=None, exclude_categories=()),
                             st.characters(categories=["Cs", "Cc", "Cf", "Zs", "Zl", "Zp"]),
                             st.sampled_from("%/ -c0")), min_size=1)
PATHLIKE = st.text(st.sampled_from(list("ab/ %-c.\t\n\x00é猫\u200b\udc80%25")), min_size=1)


@given(st.one_of(ANY_TEXT, PATHLIKE))
def test_escape_round_trips_and_is_a_valid_key(text):
    key = escape_key(text)
    assert unescape_key(key) == text
    assert make_sample_id("images", key) == f"images/{key}"
    assert parse_sample_id(f"images/{key}") == ("images", key)
    assert escape_key(unescape_key(key)) == key


@given(st.one_of(ANY_TEXT, PATHLIKE), st.one_of(ANY_TEXT, PATHLIKE))
def test_escape_is_injective(a, b):
    assume(a != b)
    assert escape_key(a) != escape_key(b)


@given(st.one_of(ANY_TEXT, PATHLIKE), st.integers(0, 99))
def test_image_ids_round_trip(rel, k):
    sid = image_sample_id("images", escape_key(rel), k)
    assert parse_image_sample_id(sid) == ("images", rel, k)


@given(st.text(st.characters(codec="ascii", categories=["L", "N", "Pd", "Pc"]), min_size=1))
def test_names_that_need_no_escape_are_their_own_key(text):
    assert escape_key(text) == text


@given(st.text(min_size=1))
def test_unescape_refuses_what_escape_never_gives(key):
    try:
        text = unescape_key(key)
    except ValueError:
        return
    assert escape_key(text) == key  # anything accepted is canonical


def test_escape_examples_and_errors():
    assert escape_key("a/my photo 100%.png") == "a%2Fmy%20photo%20100%25.png"
    assert escape_key("été 猫.jpg") == "été%20猫.jpg"
    assert escape_key("x\udc80") == "x%ED%B2%80"
    for bad in ["%", "%2f", "%41", "a b", "a/b", "%C3", "%ZZ", ""]:
        with pytest.raises(ValueError):
            unescape_key(bad)
    with pytest.raises(ValueError):
        escape_key("")
    with pytest.raises(TypeError):
        escape_key(b"x")  # type: ignore[arg-type]
    # make_sample_id itself is unchanged: unescaped keys are still refused
    with pytest.raises(ValueError, match="whitespace"):
        make_sample_id("images", "my photo-c0")
