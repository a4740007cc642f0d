"""Fuzzing the COCONut-PanCap reader with damaged real-format files.

A clean dataset (detectron2 layout, skimage photographs, SLIC masks, grounded captions) is
written once; each example damages one thing (bytes of a caption / JPEG / PNG, the caption text,
the structure of the panoptic JSON, the caption tar), lists and reads every sample, and restores
the file. Property: listing never fails on a per-sample defect; each sample is either curated
exactly as in the clean run, or rejected with :class:`SampleError` (a check name, a reason, the
sample and the file); only the damaged sample may instead give a different row, and then that
row still fits the table schema. Any other exception is a reader bug.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from fuzz_strategies import (FAST, SLOW, UNPARSEABLE, Quiet, assert_sample_error, dumps,
                             mutated_bytes, mutated_json, mutated_text)
from hypothesis import given
from hypothesis import strategies as st

from vgen_core.formats.errors import SampleError
from vgen_core.formats.pancap import PANCAP_SAMPLES, list_pancap, read_pancap_sample
from vgen_core.formats.pancap_samples import write_pancap_sample_dataset

N_IMAGES = 4
JSON_REL = "annotations/panoptic_train2017.json"
#: row fields that come from each file (a damaged file may change only these, and the digest)
FROM_FILE = {"caption": {"caption", "caption_text", "caption_spans", "num_tags",
                         "num_grounded_segments", "grounded_coverage", "caption_words"},
             "image": {"image"}, "panoptic_png": {"panoptic_png"}}


def _read_all(root: Path) -> dict[str, dict | SampleError]:
    out: dict[str, dict | SampleError] = {}
    for item in list_pancap(str(root)):
        try:
            out[item["sample_id"]] = read_pancap_sample(item)
        except SampleError as e:
            out[item["sample_id"]] = e
        except Exception as e:
            raise AssertionError(f"{item['sample_id']}: reader raised {type(e).__name__}: "
                                 f"{e}") from e
    return out


@pytest.fixture(scope="module")
def pancap(tmp_path_factory):
    root = write_pancap_sample_dataset(tmp_path_factory.mktemp("fuzz_pancap") / "coco", N_IMAGES)
    items = list_pancap(str(root))
    clean = _read_all(root)
    assert all(isinstance(r, dict) for r in clean.values()), clean
    return Quiet((root, items, clean))


def _schema_ok(row: dict, what: str) -> None:
    try:
        pa.Table.from_pylist([row], schema=PANCAP_SAMPLES)
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
        raise AssertionError(f"{what}: the row does not fit PANCAP_SAMPLES: {e}") from e


def _check(out: dict, clean: dict, damaged: set[str], what: str,
           may_change: set[str] | None = None) -> None:
    assert set(out) == set(clean), (what, set(out) ^ set(clean))
    for sid, got in out.items():
        if isinstance(got, SampleError):
            assert sid in damaged, f"{what}: untouched sample {sid} rejected: {got}"
            assert_sample_error(got, sid, what)
            continue
        if got == clean[sid]:
            continue
        assert sid in damaged, f"{what}: untouched sample {sid} changed"
        _schema_ok(got, what)
        if may_change is not None:
            changed = {k for k in got if got[k] != clean[sid][k]} - {"content_digest"}
            assert changed <= may_change, f"{what}: {sid} changed {changed - may_change}"


# ---------------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------------


def _damage_file(pancap, data) -> None:
    root, items, clean = pancap
    item = data.draw(st.sampled_from(items), label="sample")
    kind = data.draw(st.sampled_from(["caption", "image", "panoptic_png"]), label="file")
    path = root / item[kind]
    orig = path.read_bytes()
    if kind == "caption" and data.draw(st.booleans(), label="text-level"):
        what, bad = data.draw(mutated_text(orig.decode("utf-8")), label="mutation")
    else:
        what, bad = data.draw(mutated_bytes(orig), label="mutation")
    what = f"{item[kind]}: {what}"
    path.write_bytes(bad)
    try:
        out = _read_all(root)
    finally:
        path.write_bytes(orig)
    _check(out, clean, {item["sample_id"]}, what, FROM_FILE[kind])


@FAST
@given(st.data())
def test_damaged_file(pancap, data):
    _damage_file(pancap, data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_damaged_file_slow(pancap, data):
    _damage_file(pancap, data)


# ---------------------------------------------------------------------------------------------
# damaged panoptic JSON
# ---------------------------------------------------------------------------------------------


def _damage_json(pancap, data) -> None:
    root, items, clean = pancap
    path = root / JSON_REL
    orig = path.read_bytes()
    doc = json.loads(orig)
    k = data.draw(st.integers(0, N_IMAGES - 1), label="record")
    first = data.draw(st.sampled_from([(), ("images", k), ("annotations", k),
                                       ("annotations", k, "segments_info"), ("categories",)]),
                      label="where")
    what, where, bad = data.draw(mutated_json(doc, first=first), label="mutation")
    # a sample is untouched when the mutation stays inside another image's records and does
    # not change an id (a changed id may collide with another image's)
    inside = (len(where) >= 2 and where[0] in ("images", "annotations")
              and not (len(where) == 3 and where[2] in ("id", "image_id")))
    sid_of = {i: items[i]["sample_id"] for i in range(N_IMAGES)}
    damaged = {sid_of[where[1]]} if inside else set(clean)
    path.write_bytes(dumps(bad))
    try:
        try:
            out = _read_all(root)
        except SampleError as e:  # a broken document is one listing-level error
            assert not inside or any(u in what for u in UNPARSEABLE), \
                f"{what}: listing failed on a per-sample defect: {e}"
            assert e.check == "panoptic_json" and JSON_REL in (e.source or ""), (what, e)
            assert e.reason.strip()
            return
    finally:
        path.write_bytes(orig)
    _check(out, clean, damaged, what)


@FAST
@given(st.data())
def test_damaged_panoptic_json(pancap, data):
    _damage_json(pancap, data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_damaged_panoptic_json_slow(pancap, data):
    _damage_json(pancap, data)


@pytest.mark.parametrize("raw,check", [
    ("[" * 100_000, "panoptic_json"),  # nesting deeper than the JSON parser's recursion limit
    ('{"images": [], "annotations": [], "categories": [], "x": ' + "9" * 5000 + "}",
     "panoptic_json"),  # an int past CPython's 4300-digit limit
    ("\ufeff" + '{"images": []}', "panoptic_json"),
])
def test_unparseable_json_is_a_listing_sample_error(pancap, raw, check):
    root = pancap[0]
    path = root / JSON_REL
    orig = path.read_bytes()
    path.write_bytes(raw.encode("utf-8"))
    try:
        with pytest.raises(SampleError) as e:
            list_pancap(str(root))
    finally:
        path.write_bytes(orig)
    assert e.value.check == check and JSON_REL in e.value.source
    assert "fix" in e.value.reason or "re-download" in e.value.reason or "expected" in \
        e.value.reason


# ---------------------------------------------------------------------------------------------
# damaged caption tar (Hugging Face WebDataset shard)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pancap_tar(tmp_path_factory):
    root = write_pancap_sample_dataset(tmp_path_factory.mktemp("fuzz_pancap_tar") / "coco",
                                       N_IMAGES, captions="webdataset")
    clean = _read_all(root)
    assert all(isinstance(r, dict) for r in clean.values())
    return Quiet((root, clean))


@FAST
@given(st.data())
def test_damaged_caption_tar(pancap_tar, data):
    root, clean = pancap_tar
    (path,) = root.glob("*.tar")
    orig = path.read_bytes()
    what, bad = data.draw(mutated_bytes(orig), label="mutation")
    path.write_bytes(bad)
    try:
        try:
            out = _read_all(root)
        except SampleError as e:
            assert e.check == "caption_archive" and path.name in (e.source or ""), (what, e)
            return
        except FileNotFoundError as e:  # the damage left no caption member at all
            assert "no PanCap caption files" in str(e), (what, e)
            return
    finally:
        path.write_bytes(orig)
    assert set(out) <= set(clean), what
    for sid, got in out.items():
        if isinstance(got, SampleError):
            assert_sample_error(got, sid, what)
        elif got != clean[sid]:
            _schema_ok(got, what)
            changed = {k for k in got if got[k] != clean[sid][k]} - {"content_digest"}
            assert changed <= FROM_FILE["caption"], (what, changed)


# ---------------------------------------------------------------------------------------------
# targeted: huge sizes, a PNG / JPEG whose header disagrees with the record
# ---------------------------------------------------------------------------------------------


def _edit_json(root: Path, fn) -> bytes:
    path = root / JSON_REL
    orig = path.read_bytes()
    doc = json.loads(orig)
    fn(doc)
    path.write_bytes(dumps(doc))
    return orig


@pytest.mark.parametrize("h,w,check", [
    (10**9, 10**9, "image_record"), (2**31, 1, "image_record"), (5000, 5000, "image_size"),
    (1, 1, "image_size"),
])
def test_huge_or_wrong_image_record_size(pancap, h, w, check):
    """A record that claims a huge image fails on the record (a limit), not by allocating."""
    root, items, clean = pancap
    sid = items[0]["sample_id"]

    def edit(doc):
        doc["images"][0].update(height=h, width=w)

    orig = _edit_json(root, edit)
    try:
        out = _read_all(root)
    finally:
        (root / JSON_REL).write_bytes(orig)
    assert isinstance(out[sid], SampleError) and out[sid].check == check, out[sid]
    assert f"{w}x{h}" in out[sid].reason or f"{h}" in out[sid].reason


def test_png_header_bigger_than_image_is_refused_before_decoding(pancap):
    import struct
    import zlib

    root, items, _ = pancap
    item = items[1]
    path = root / item["panoptic_png"]
    orig = path.read_bytes()
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 99)) + chunk(b"IEND", b""))
    try:
        with pytest.raises(SampleError) as e:
            read_pancap_sample(item)
    finally:
        path.write_bytes(orig)
    assert e.value.check == "panoptic_size" and "60000x60000" in e.value.reason


# ---------------------------------------------------------------------------------------------
# stage level: the curate stage in-process over a folder with damaged files
# ---------------------------------------------------------------------------------------------


def test_curate_stage_quarantines_damaged_samples(pancap, tmp_path):
    from pipelines.stages.base import InProcessExecutor, StageContext
    from pipelines.stages.curate import CuratePanCap, CuratePanCapConfig
    from vgen_core.data import TableStore

    src, items, clean = pancap
    root = tmp_path / "coco"
    shutil.copytree(src, root)
    by_id = {it["sample_id"]: it for it in items}
    sids = sorted(by_id)
    # sample 0: truncated PNG; 1: caption not UTF-8; 2: NaN area in the JSON; 3: untouched
    png = root / by_id[sids[0]]["panoptic_png"]
    png.write_bytes(png.read_bytes()[:100])
    cap = root / by_id[sids[1]]["caption"]
    cap.write_bytes(cap.read_bytes() + b"\xff\xfe")
    image_id = by_id[sids[2]]["image_id"]

    def nan_area(doc):
        ann = next(a for a in doc["annotations"] if a["image_id"] == image_id)
        ann["segments_info"][0]["area"] = float("nan")

    _edit_json(root, nan_area)

    store = TableStore(str(tmp_path / "store"))
    ctx = StageContext(dag="t", stage="pc", store=store, row_fingerprint="fp", error_budget=1.0)
    CuratePanCap(CuratePanCapConfig(root=str(root), near_duplicate_distance=-1), ctx).run(
        InProcessExecutor(batch_size=2))
    q = {r["sample_id"]: r for r in store.read("t/pc__quarantine").to_pylist()}
    assert {s: q[s]["check"] for s in q} == {sids[0]: "panoptic_png", sids[1]: "caption_read",
                                            sids[2]: "segment_area"}
    assert all(r["reason"] and r["source"] for r in q.values())
    assert "nan" in q[sids[2]]["reason"].lower()
    rows = {r["sample_id"]: r for r in store.read("t/pc").to_pylist()}
    assert set(rows) == {sids[3]}
    got = {k: v for k, v in rows[sids[3]].items() if k != "phash"}
    want = clean[sids[3]]
    assert got["content_digest"] == want["content_digest"]
    assert {k: got[k] for k in want if k not in ("source",)} == \
        {k: want[k] for k in want if k not in ("source",)}
