"""COCONut-PanCap reader: caption tag parser, layout listing, per-sample checks and statistics."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vgen_core.data.identity import content_digest
from vgen_core.data.panoptic import write_id_png
from vgen_core.formats.errors import SampleError
from vgen_core.formats.pancap import (
    PANCAP_SAMPLES,
    CaptionSpan,
    list_pancap,
    parse_grounded_caption,
    read_pancap_sample,
)
from vgen_core.formats.pancap_samples import (
    CORRUPT_CASES,
    CORRUPT_VALID_IDS,
    PancapImage,
    make_pancap_images,
    write_pancap_corrupt_corpus,
    write_pancap_layout,
    write_pancap_sample_dataset,
)

N_IMAGES = 8


def _read_all(root, **kw) -> dict[str, dict]:
    return {it["sample_id"]: read_pancap_sample(it) for it in list_pancap(str(root), **kw)}


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("source", "split")}


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    return write_pancap_sample_dataset(tmp_path_factory.mktemp("pancap") / "coco", N_IMAGES)


@pytest.fixture(scope="module")
def sample_rows(sample_root) -> dict[str, dict]:
    return _read_all(sample_root)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("pancap_corrupt")
    return root, write_pancap_corrupt_corpus(root)


# --------------------------------------------------------------------------------------------
# caption parser
# --------------------------------------------------------------------------------------------

_plain = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)),
                 max_size=20)
_phrase = _plain.map(str.strip).filter(bool)
_ids = st.lists(st.integers(0, 10**7), min_size=1, max_size=4)
_ws = st.sampled_from(["", " ", "  ", "\t", "\n", " \u00a0"])


@st.composite
def _tag(draw):
    ids, phrase = draw(_ids), draw(_phrase)
    sep = ","
    joined = ""
    for k, i in enumerate(ids):
        joined += (draw(_ws) + sep + draw(_ws) if k else "") + str(i)
    body = f"{draw(_ws)}{joined}{draw(_ws)}:{draw(_ws)}{phrase}{draw(_ws)}"
    return f"<{body}>", tuple(ids), phrase


@given(st.lists(st.tuples(_plain, _tag()), max_size=6), _plain)
@settings(max_examples=300, deadline=None)
def test_rendered_tags_parse_back_exactly(pieces, tail):
    raw, text, spans = "", "", []
    for before, (tag, ids, phrase) in pieces:
        raw += before + tag
        text += before
        spans.append(CaptionSpan(len(text), len(text) + len(phrase), phrase, ids))
        text += phrase
    raw += tail
    text += tail
    parsed = parse_grounded_caption(raw)
    assert parsed.text == text
    assert parsed.spans == tuple(spans)
    assert parsed.errors == ()
    assert all(parsed.text[s.start:s.end] == s.phrase for s in parsed.spans)


@given(st.text(st.sampled_from("<>:, 0123abc\n"), max_size=30))
@settings(max_examples=300, deadline=None)
def test_lenient_parse_never_raises_and_agrees_with_strict(raw):
    lenient = parse_grounded_caption(raw, strict=False)
    assert all(lenient.text[s.start:s.end] == s.phrase for s in lenient.spans)
    if lenient.errors:
        with pytest.raises(SampleError) as e:
            parse_grounded_caption(raw)
        assert e.value.check == "caption_tags"
        assert f"at char {lenient.errors[0].position}" in e.value.reason
    else:
        assert parse_grounded_caption(raw) == lenient


@pytest.mark.parametrize("raw, text, spans", [
    ("On <2:a vivid green grassland> stand <6,7: two man who are dressed in blue>.",
     "On a vivid green grassland stand two man who are dressed in blue.",
     [(3, 26, "a vivid green grassland", (2,)), (33, 64, "two man who are dressed in blue",
                                                  (6, 7))]),
    ("<9:A black horse> by <3: a fence>", "A black horse by a fence",
     [(0, 13, "A black horse", (9,)), (17, 24, "a fence", (3,))]),
    ("< 12 , 3 ,4 :\tthree cups\n>!", "three cups!", [(0, 10, "three cups", (12, 3, 4))]),
    ("<007: a sign: STOP>", "a sign: STOP", [(0, 12, "a sign: STOP", (7,))]),
    ("<1: a dog> and <1: it>", "a dog and it", [(0, 5, "a dog", (1,)), (10, 12, "it", (1,))]),
    # a figure's slip: syntactically a valid tag, so it parses (the ids are still checked)
    ("<9:11skateboard>", "11skateboard", [(0, 12, "11skateboard", (9,))]),
    ("no tags at all", "no tags at all", []),
    ("", "", []),
])
def test_known_captions(raw, text, spans):
    parsed = parse_grounded_caption(raw)
    assert parsed.text == text
    assert [(s.start, s.end, s.phrase, s.ids) for s in parsed.spans] == spans
    assert parsed.ids == frozenset(i for *_, ids in spans for i in ids)


@pytest.mark.parametrize("raw, pos, words", [
    ("a <> b", 2, "malformed"),
    ("<: x>", 0, "malformed"),
    ("x <a: cat>", 2, "malformed"),
    ("<9 skateboard>", 0, "malformed"),
    ("<1 2: x>", 0, "malformed"),  # ids are comma-separated
    ("<1,: x>", 0, "malformed"),
    ("<,1: x>", 0, "malformed"),
    ("<1;2: x>", 0, "malformed"),
    ("ok <1: >", 3, "empty phrase"),
    ("<1:>", 0, "empty phrase"),
    ("a > b", 2, "no opening"),
    ("<1: a dog", 0, "never closed"),
    ("<1: a <2: b>>", 0, "another '<'"),
    ("x <1: a> y <", 11, "never closed"),
])
def test_malformed_and_unbalanced_tags(raw, pos, words):
    with pytest.raises(SampleError) as e:
        parse_grounded_caption(raw, sample_id="pancap/000000000009", source="c.txt")
    assert e.value.check == "caption_tags"
    assert f"at char {pos}:" in e.value.reason and words in e.value.reason
    assert e.value.sample_id == "pancap/000000000009" and e.value.source == "c.txt"
    lenient = parse_grounded_caption(raw, strict=False)
    assert lenient.errors[0].position == pos


def test_lenient_keeps_bad_blocks_verbatim():
    parsed = parse_grounded_caption("A <1: dog> near <9 bike> and >", strict=False)
    assert parsed.text == "A dog near <9 bike> and >"
    assert [e.position for e in parsed.errors] == [16, 29]
    assert parsed.spans == (CaptionSpan(2, 5, "dog", (1,)),)


# --------------------------------------------------------------------------------------------
# the sample dataset
# --------------------------------------------------------------------------------------------


def test_sample_dataset_reads_without_errors(sample_root, sample_rows):
    assert len(sample_rows) == N_IMAGES
    table = pa.Table.from_pylist(list(sample_rows.values()), schema=PANCAP_SAMPLES)
    assert table.num_rows == N_IMAGES
    for sid, row in sample_rows.items():
        assert sid == f"pancap/{row['image_id']:012d}" and row["file_name"] == sid[7:] + ".jpg"
        assert row["num_segments"] == row["num_things"] + row["num_stuff"] >= 1
        assert 0 < row["grounded_coverage"] <= 1 and 0 <= row["void_fraction"] < 1
        assert row["num_tags"] >= 1 and row["caption_words"] == len(row["caption_text"].split())
        h, w = row["height"], row["width"]
        assert sum(s["area"] for s in row["segments"]) + round(row["void_fraction"] * h * w) \
            == h * w
        with Image.open(io.BytesIO(row["image"])) as im:
            assert im.format == "JPEG" and im.size == (w, h)
    assert len({r["content_digest"] for r in sample_rows.values()}) == N_IMAGES


def test_sample_dataset_covers_the_format_variants(sample_root, sample_rows):
    doc = json.loads((sample_root / "annotations/panoptic_train2017.json").read_text())
    keys = [set(s) for a in doc["annotations"] for s in a["segments_info"]]
    assert {"id", "category_id", "iscrowd", "isthing", "area"} in keys  # COCONut
    assert {"id", "category_id", "iscrowd", "bbox", "area"} in keys  # COCO 2017, no isthing
    assert any(isinstance(s["area"], float) for a in doc["annotations"]
               for s in a["segments_info"])
    assert max(s["id"] for r in sample_rows.values() for s in r["segments"]) > 65535
    assert any(s["iscrowd"] for r in sample_rows.values() for s in r["segments"])
    assert any(r["void_fraction"] > 0 for r in sample_rows.values())
    thing = {c["id"]: bool(c["isthing"]) for c in doc["categories"]}
    for r in sample_rows.values():
        assert all(s["isthing"] == thing[s["category_id"]] for s in r["segments"])
    with Image.open(sample_root / "panoptic_train2017/000000000009.png") as im:
        assert im.mode == "RGB"


def _tiny() -> PancapImage:
    ids = np.array([[1, 1, 1, 2, 2, 2],
                    [1, 1, 1, 2, 2, 2],
                    [3, 3, 0, 0, 2, 2],
                    [3, 3, 0, 0, 4, 4]])
    segs = [{"id": 1, "category_id": 187, "iscrowd": 0, "isthing": 0, "area": 6},
            {"id": 2, "category_id": 199, "iscrowd": 0, "area": 8.0},  # isthing from categories
            {"id": 3, "category_id": 17, "isthing": 1, "area": 4, "iscrowd": 0},
            {"id": 4, "category_id": 47, "isthing": 1, "area": 2, "iscrowd": 1}]
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    caption = "A <3: cat> under < 1 , 2 :the sky and a wall>;\n<3:it> naps.\n"
    return PancapImage(139, rgb, ids, segs, caption)


def test_hand_checkable_sample(tmp_path):
    img = _tiny()
    write_pancap_layout(tmp_path, [img])
    (item,) = list_pancap(str(tmp_path))
    assert item["sample_id"] == "pancap/000000000139" and item["split"] == "train2017"
    assert [c["id"] for c in item["categories"]] == [17, 47, 187, 199]
    row = read_pancap_sample(item)
    assert row["caption"] == img.caption.strip()
    assert row["caption_text"] == "A cat under the sky and a wall;\nit naps."
    assert row["caption_spans"] == [
        {"start": 2, "end": 5, "phrase": "cat", "ids": [3]},
        {"start": 12, "end": 30, "phrase": "the sky and a wall", "ids": [1, 2]},
        {"start": 32, "end": 34, "phrase": "it", "ids": [3]}]
    assert row["segments"] == [
        {"id": 1, "category_id": 187, "iscrowd": False, "isthing": False, "area": 6,
         "bbox": [0, 0, 3, 2]},
        {"id": 2, "category_id": 199, "iscrowd": False, "isthing": False, "area": 8,
         "bbox": [3, 0, 3, 3]},
        {"id": 3, "category_id": 17, "iscrowd": False, "isthing": True, "area": 4,
         "bbox": [0, 2, 2, 2]},
        {"id": 4, "category_id": 47, "iscrowd": True, "isthing": True, "area": 2,
         "bbox": [4, 3, 2, 1]}]
    stats = {k: row[k] for k in ("num_segments", "num_things", "num_stuff", "thing_ratio",
                                 "num_tags", "num_grounded_segments", "grounded_coverage",
                                 "void_fraction", "caption_words", "height", "width")}
    assert stats == {"num_segments": 4, "num_things": 2, "num_stuff": 2, "thing_ratio": 0.5,
                     "num_tags": 3, "num_grounded_segments": 3, "grounded_coverage": 18 / 24,
                     "void_fraction": 4 / 24, "caption_words": 10, "height": 4, "width": 6}
    jpeg = (tmp_path / "train2017/000000000139.jpg").read_bytes()
    png = (tmp_path / "panoptic_train2017/000000000139.png").read_bytes()
    assert row["image"] == jpeg and row["panoptic_png"] == png
    rec = {"id": 139, "file_name": "000000000139.jpg", "height": 4, "width": 6}
    ann = {"segments_info": img.segments, "file_name": "000000000139.png", "image_id": 139}
    assert row["content_digest"] == content_digest(
        "pancap", jpeg, png, row["caption"],
        {"image": rec, "annotation": ann, "categories": item["categories"]})
    assert row["source"] == f"{tmp_path}/caption_train2017/000000000139.txt"
    pa.Table.from_pylist([row], schema=PANCAP_SAMPLES)


def _edit_segments(item: dict, k: int, **changes) -> dict:
    segs = [dict(s) for s in item["annotation"]["segments_info"]]
    segs[k].update(changes)
    for key, v in changes.items():
        if v is None:
            del segs[k][key]
    return {**item, "annotation": {**item["annotation"], "segments_info": segs}}


def test_segment_record_variants(tmp_path):
    write_pancap_layout(tmp_path, [_tiny()])
    (item,) = list_pancap(str(tmp_path))
    want = read_pancap_sample(item)
    # accepted: no area (the pixel count is used), no iscrowd, no isthing, a bbox that is ignored
    lenient = _edit_segments(item, 2, area=None, iscrowd=None, isthing=None, bbox=[9, 9, 9, 9])
    assert read_pancap_sample(lenient)["segments"] == want["segments"]
    # the Hugging Face parquet shape: the segments_info column holds the whole record
    nested = {**item, "annotation": {**item["annotation"], "segments_info": item["annotation"]}}
    assert read_pancap_sample(nested)["segments"] == want["segments"]
    for changes, check, words in [
            ({"id": 0}, "segments_info", "'id' must be an int >= 1, found 0"),
            ({"isthing": 0}, "segment_category", "category 17 (cat) has isthing=1"),
            ({"iscrowd": 2}, "segments_info", "iscrowd must be 0 or 1"),
            ({"area": 4.5}, "segment_area", "area is 4.5 but the PNG has 4 pixels")]:
        with pytest.raises(SampleError) as e:
            read_pancap_sample(_edit_segments(item, 2, **changes))
        assert e.value.check == check and words in e.value.reason, str(e.value)


@pytest.mark.parametrize("layout, captions", [
    ("kaggle", "folder"), ("download_script", "folder"), ("detectron2", "tar_50k"),
    ("detectron2", "webdataset")])
def test_real_layouts_give_the_same_rows(tmp_path, sample_rows, layout, captions):
    write_pancap_sample_dataset(tmp_path, N_IMAGES, layout=layout, captions=captions)
    rows = _read_all(tmp_path)
    assert {k: _strip(v) for k, v in rows.items()} == {k: _strip(v)
                                                      for k, v in sample_rows.items()}
    split = "train2017" if layout == "detectron2" else "coconut_s"
    assert {r["split"] for r in rows.values()} == {split}
    if captions != "folder":
        assert all(".tar" in r["source"] for r in rows.values())


def test_memory_filesystem_root(sample_root, sample_rows):
    fs = fsspec.filesystem("memory")
    for p in sample_root.rglob("*"):
        if p.is_file():
            fs.pipe(f"/pancap-test/{p.relative_to(sample_root).as_posix()}", p.read_bytes())
    try:
        items = list_pancap("memory://pancap-test")
        rows = {it["sample_id"]: read_pancap_sample(it, fs=fs) for it in items}
        assert {k: _strip(v) for k, v in rows.items()} == {k: _strip(v)
                                                          for k, v in sample_rows.items()}
        assert next(iter(rows.values()))["source"].startswith("memory://pancap-test/")
    finally:
        fs.rm("/pancap-test", recursive=True)


def test_split_selection_and_caption_folders(tmp_path):
    imgs = make_pancap_images(2)
    write_pancap_layout(tmp_path, imgs)
    # a second COCO split and extra caption folders that must not win over caption_train2017
    val = tmp_path / "val"
    write_pancap_layout(val, [_tiny()])
    shutil.copy(val / "annotations/panoptic_train2017.json",
                tmp_path / "annotations/panoptic_val2017.json")
    shutil.copytree(val / "panoptic_train2017", tmp_path / "panoptic_val2017")
    shutil.copytree(val / "train2017", tmp_path / "val2017")
    shutil.copytree(val / "caption_train2017", tmp_path / "caption_val2017")
    shutil.rmtree(val)
    (tmp_path / "coconut_pancap_50k").mkdir()
    for image_id in (9, 1234):  # a second copy, and a caption of an image nobody annotates
        (tmp_path / f"coconut_pancap_50k/{image_id:012d}.txt").write_text("<1: stale copy>")
    every = list_pancap(str(tmp_path))
    assert [it["image_id"] for it in every] == [9, 25, 139, 1234]
    assert every[0]["caption"] == "caption_train2017/000000000009.txt"
    with pytest.raises(SampleError) as e:
        read_pancap_sample(every[-1])
    assert e.value.check == "annotation_missing"
    train = list_pancap(str(tmp_path), split="train")
    assert [it["image_id"] for it in train] == [9, 25]
    assert train[0]["caption"] == "caption_train2017/000000000009.txt"
    (val_item,) = list_pancap(str(tmp_path), split="val2017")
    assert val_item["image"] == "val2017/000000000139.jpg" and val_item["split"] == "val2017"
    assert read_pancap_sample(val_item)["num_segments"] == 4
    with pytest.raises(ValueError, match="split 'test' not found.*train2017.*val2017"):
        list_pancap(str(tmp_path), split="test")


def test_same_image_in_two_splits_needs_a_split(tmp_path):
    imgs = make_pancap_images(1)
    write_pancap_layout(tmp_path, imgs)
    write_pancap_layout(tmp_path, imgs, layout="download_script")
    with pytest.raises(ValueError, match="pass split="):
        list_pancap(str(tmp_path))
    assert len(list_pancap(str(tmp_path), split="train2017")) == 1


def test_listing_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no COCONut panoptic JSON"):
        list_pancap(str(tmp_path / "nothing"))
    write_pancap_layout(tmp_path, make_pancap_images(1))
    shutil.rmtree(tmp_path / "caption_train2017")
    with pytest.raises(FileNotFoundError, match="no PanCap caption files"):
        list_pancap(str(tmp_path))
    shutil.rmtree(tmp_path / "panoptic_train2017")
    with pytest.raises(FileNotFoundError, match="panoptic_train2017.json but no folder of PNGs"):
        list_pancap(str(tmp_path))


# --------------------------------------------------------------------------------------------
# corrupt corpus
# --------------------------------------------------------------------------------------------

_SAYS = {  # case -> words the error must contain
    "truncated_png": "truncated PNG",
    "png_id_not_in_segments_info": "in the PNG but not in segments_info",
    "segments_info_id_not_in_png": "in segments_info but not in the PNG: 250",
    "area_mismatch": "area is",
    "png_size_mismatch": "(WxH) but the image record says",
    "single_channel_png": "found mode 'L'",
    "malformed_tag": "'<9 skateboard>'",
    "unbalanced_tag": "never closed",
    "tag_unknown_id": "ids not in segments_info: 240",
    "tag_void_id": "id 0 (void)",
    "unknown_category": "category_id 7777",
    "image_not_decodable": "does not decode",
    "file_name_id_mismatch": "names image",
    "missing_image": "is not under",
    "missing_png": "panoptic PNG not found",
    "caption_without_annotation": "no images[] and annotations[] record",
    "truncated_json": "does not parse",
}


def test_corrupt_corpus_cases_are_all_known(corrupt):
    _, expected = corrupt
    assert set(expected) == set(CORRUPT_CASES) == set(_SAYS)


@pytest.mark.parametrize("case", sorted(_SAYS))
def test_corrupt_case_raises_its_check(corrupt, case):
    root, expected = corrupt
    folder, image_id = CORRUPT_CASES[case]
    with pytest.raises(SampleError) as e:
        items = {it["image_id"]: it for it in list_pancap(str(root / folder))}
        read_pancap_sample(items[image_id])
    err = e.value
    assert err.check == expected[case], str(err)
    assert _SAYS[case] in err.reason, str(err)
    if image_id is not None:
        assert err.sample_id == f"pancap/{image_id:012d}"
        assert f"{image_id:012d}" in str(err) or str(image_id) in err.reason
    assert err.source and err.source.startswith(str(root / folder))


def test_valid_samples_next_to_corrupt_ones_read_unchanged(corrupt, sample_rows):
    root, _ = corrupt
    items = {it["image_id"]: it for it in list_pancap(str(root / "samples"))}
    assert set(items) >= set(CORRUPT_VALID_IDS) | {i for _, i in CORRUPT_CASES.values() if i}
    for image_id in CORRUPT_VALID_IDS:
        row = read_pancap_sample(items[image_id])
        assert _strip(row) == _strip(sample_rows[f"pancap/{image_id:012d}"])


def test_tag_edits_change_the_digest(tmp_path, sample_rows):
    img = make_pancap_images(1)[0]
    img.caption = img.caption.replace("Everything", "All")
    write_pancap_layout(tmp_path, [img])
    (row,) = _read_all(tmp_path).values()
    before = sample_rows[row["sample_id"]]
    assert row["content_digest"] != before["content_digest"]
    assert row["segments"] == before["segments"] and row["image"] == before["image"]


def test_single_channel_jpeg_is_fine_and_record_size_is_checked(tmp_path):
    img = _tiny()
    buf = io.BytesIO()
    Image.fromarray(img.rgb[..., 0]).save(buf, format="JPEG")
    img.image_bytes = buf.getvalue()
    write_pancap_layout(tmp_path, [img])
    (item,) = list_pancap(str(tmp_path))
    assert read_pancap_sample(item)["width"] == 6
    item = {**item, "image_record": {**item["image_record"], "width": 7}}
    with pytest.raises(SampleError) as e:
        read_pancap_sample(item)
    assert e.value.check == "image_size" and "6x4" in e.value.reason


def test_png_written_by_helper_matches(tmp_path):
    # sanity: the layout writer stores exactly write_id_png(ids)
    img = _tiny()
    write_pancap_layout(tmp_path, [img])
    assert (tmp_path / "panoptic_train2017/000000000139.png").read_bytes() == write_id_png(img.ids)
