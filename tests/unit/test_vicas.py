"""ViCaS reader: the caption grounding parser, the real-pixel sample dataset, a hand-checkable
video with exact statistics, and the corrupt corpus (one defect -> one named check)."""

from __future__ import annotations

import io
import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vgen_core.data import rle
from vgen_core.data.sample_images import load_photo
from vgen_core.formats.errors import SampleError
from vgen_core.formats.vicas import (
    CROWD_ID,
    REQUIRED_KEYS,
    VICAS_SAMPLES,
    _CfrResampler,
    list_vicas,
    parse_vicas_caption,
    read_vicas_sample,
    vicas_sample_id,
)
from vgen_core.formats.vicas_samples import (
    CORRUPT_CASE_IDS,
    CORRUPT_CASES,
    write_vicas_corrupt_corpus,
    write_vicas_sample_dataset,
    write_vicas_video,
)

# ---------------------------------------------------------------------------------------------
# caption parser: exact cases
# ---------------------------------------------------------------------------------------------


def test_caption_basic_spans_and_plain():
    cap = parse_vicas_caption("A [dog]<mask_1> chases [two cats]<mask_2,3>.")
    assert cap.plain == "A dog chases two cats."
    assert [(s.phrase, s.track_ids, s.start, s.end) for s in cap.spans] == [
        ("dog", (1,), 2, 5), ("two cats", (2, 3), 13, 21)]
    assert [cap.raw[s.raw_start:s.raw_end] for s in cap.spans] == [
        "[dog]<mask_1>", "[two cats]<mask_2,3>"]
    assert cap.track_ids() == [1, 2, 3]
    assert not cap.multi_digit_ids and cap.warnings == ()


@pytest.mark.parametrize("tag,ids", [
    ("<mask_1>", (1,)), ("<mask1>", (1,)), ("<mask_1,2>", (1, 2)), ("<mask_1, 2>", (1, 2)),
    ("<mask_1 2>", (1, 2)), ("<mask1,2>", (1, 2)), ("<mask_ 3 ,4>", (3, 4)),
    ("<mask_?>", (CROWD_ID,)), ("<mask?>", (CROWD_ID,)), ("<mask_2,?>", (2, CROWD_ID)),
])
def test_caption_id_block_forms(tag, ids):
    cap = parse_vicas_caption(f"see [it]{tag} now")
    assert cap.plain == "see it now"
    assert cap.spans[0].track_ids == ids
    assert cap.spans[0].official_track_ids == ids
    assert cap.track_ids() == sorted(i for i in set(ids) if i != CROWD_ID)
    assert cap.track_ids(exclude_crowd=False) == sorted(set(ids))


def test_caption_fullwidth_marks_are_normalised():
    cap = parse_vicas_caption("镜头里，[一只猫]<mask_1，2>和[人群]<mask_？>。")
    assert cap.plain == "镜头里,一只猫和人群。"  # like the official parser, the plain text too
    assert [s.track_ids for s in cap.spans] == [(1, 2), (CROWD_ID,)]
    assert cap.raw == "镜头里，[一只猫]<mask_1，2>和[人群]<mask_？>。"


def test_caption_multi_digit_ids_are_read_whole_and_flagged():
    cap = parse_vicas_caption("[a bus]<mask_12> and [a car]<mask_10, 3> and [me]<mask_4>")
    assert [s.track_ids for s in cap.spans] == [(12,), (10, 3), (4,)]
    assert [s.official_track_ids for s in cap.spans] == [(1, 2), (1, 0, 3), (4,)]
    assert [s.multi_digit for s in cap.spans] == [True, True, False]
    assert cap.multi_digit_ids
    assert len(cap.warnings) == 2 and "[1, 2]" in cap.warnings[0]
    assert all(w.startswith("multi_digit_ids") for w in cap.warnings)


def test_caption_grounded_coverage_excludes_crowd():
    cap = parse_vicas_caption("[A cat]<mask_1> watches [two toys]<mask_2,3> and [people]<mask_?>.")
    assert cap.plain == "A cat watches two toys and people."
    assert cap.grounded_coverage == pytest.approx(13 / 34)
    assert parse_vicas_caption("").grounded_coverage == 0.0


@pytest.mark.parametrize("text", [
    "a ]b", "a <b>", "a > b", "[a [b]<mask_1>", "[a]b<mask_1>", "[a] <mask_1>", "[a]<1>",
    "[a]<mask_>", "[a]<mask_1", "[a", "[a]", "[a]<mask_x>", "[a]<masks_1>", "[a]<mask_1>>",
    "[a]<mask_1;2>", "[a<mask_1>]", "[a]<mask_1<2>", "[a]<mask_-1>",
])
def test_caption_malformed_raises_caption_tags(text):
    with pytest.raises(SampleError) as e:
        parse_vicas_caption(text, sample_id="vicas/000001", source="x.json")
    assert e.value.check == "caption_tags"
    assert e.value.sample_id == "vicas/000001" and e.value.source == "x.json"
    assert e.value.reason


def test_caption_rejects_non_str():
    with pytest.raises(SampleError) as e:
        parse_vicas_caption(None)  # type: ignore[arg-type]
    assert e.value.check == "caption_tags"


# ---------------------------------------------------------------------------------------------
# caption parser: properties
# ---------------------------------------------------------------------------------------------

_TEXT = st.text(alphabet=st.characters(blacklist_characters="[]<>？，",
                                       blacklist_categories=("Cs",)), max_size=12)
_ID = st.one_of(st.integers(0, 150), st.just(CROWD_ID))
_TAG = st.tuples(_TEXT, st.lists(_ID, min_size=1, max_size=4),
                 st.sampled_from(["mask_", "mask"]), st.sampled_from([",", ", ", " ", " , "]))


@settings(max_examples=300, deadline=None)
@given(first=_TEXT, parts=st.lists(st.tuples(_TAG, _TEXT), max_size=5))
def test_caption_roundtrip_property(first, parts):
    raw, plain, expected = first, first, []
    for (phrase, ids, prefix, sep), after in parts:
        body = sep.join("?" if i == CROWD_ID else str(i) for i in ids)
        expected.append((phrase, tuple(ids), len(plain)))
        raw += f"[{phrase}]<{prefix}{body}>" + after
        plain += phrase + after
    cap = parse_vicas_caption(raw)
    assert cap.plain == plain
    assert len(cap.spans) == len(expected)
    for span, (phrase, ids, start) in zip(cap.spans, expected):
        assert (span.phrase, span.track_ids, span.start, span.end) == (
            phrase, ids, start, start + len(phrase))
        assert cap.plain[span.start:span.end] == phrase
        assert raw[span.raw_start] == "[" and raw[span.raw_end - 1] == ">"
        official = tuple(CROWD_ID if i == CROWD_ID else int(d) for i in ids
                         for d in ("?" if i == CROWD_ID else str(i)))
        assert span.official_track_ids == official
        assert span.multi_digit == any(i >= 10 for i in ids)
    assert cap.multi_digit_ids == any(s.multi_digit for s in cap.spans)


# Oracle: the grammar as one regex (ASCII input; full-width marks are excluded).
_GRAMMAR = re.compile(r"(?:[^\[\]<>]|\[[^\[\]<>]*\]<mask_?[0-9?, ]*[0-9?][0-9?, ]*>)*",
                      re.DOTALL)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["[", "]", "<", ">", "mask_", "mask", "m", "_", "?", ",", " ",
                                  "0", "12", "a", "b c", "\n"]), max_size=16).map("".join))
def test_caption_accepts_exactly_the_grammar(text):
    ok = _GRAMMAR.fullmatch(text) is not None
    try:
        cap = parse_vicas_caption(text)
    except SampleError as e:
        assert e.check == "caption_tags"
        assert not ok, f"parser rejected a valid caption: {e}"
        return
    assert ok, "parser accepted a caption outside the grammar"
    assert not set(cap.plain) & set("[]<>")
    tags = sum(s.raw_end - s.raw_start - len(s.phrase) for s in cap.spans)
    assert len(cap.plain) + tags == len(text)


# ---------------------------------------------------------------------------------------------
# the sample dataset
# ---------------------------------------------------------------------------------------------

_IGNORE = {"source", "frame_paths"}  # paths depend on where the dataset was written


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("vicas_sample")
    return root, write_vicas_sample_dataset(root, n_videos=3, seed=0)


def test_sample_dataset_layout(sample_root):
    root, info = sample_root
    ids = sorted(info)
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["v0.1", "v1.0"]
    assert sorted(p.name for p in (root / "annotations" / "v1.0").iterdir()) == [
        f"{v:06d}.json" for v in ids]
    for v in ("v0.1", "v1.0"):
        assert sorted(p.name for p in (root / "splits" / v).iterdir()) == [
            "test.json", "train.json", "val.json"]
    v10 = {s: json.loads((root / "splits" / "v1.0" / f"{s}.json").read_text())
           for s in ("train", "val", "test")}
    v01 = {s: json.loads((root / "splits" / "v0.1" / f"{s}.json").read_text())
           for s in ("train", "val", "test")}
    assert sorted(sum(v10.values(), [])) == ids  # disjoint, complete
    assert all(set(v01[s]) <= set(v10[s]) for s in v01)  # v0.1 splits are subsets
    for vid, meta in info.items():
        ann = json.loads((root / "annotations" / "v1.0" / f"{vid:06d}.json").read_text())
        assert set(REQUIRED_KEYS) <= set(ann) and ann["video_id"] == vid
        assert ann["filename"].startswith(f"{vid:06d}_") and ann["filename"].endswith(".mp4")
        frames = sorted((root / "video_frames" / f"{vid:06d}").iterdir())
        assert [f.name for f in frames] == [f"{t:05d}.jpg" for t in range(meta["num_frames"])]
        assert [s["filename"] for s in ann["segmentations"]] == [f.name for f in frames]
        assert max(ann["all_track_ids"]) <= 9  # single digits, as the official parser needs


def test_sample_dataset_reads_with_zero_errors(sample_root):
    root, info = sample_root
    items = list_vicas(str(root), version="v1.0")
    assert [it["video_id"] for it in items] == sorted(info)
    rows = [read_vicas_sample(it) for it in items]
    table = pa.Table.from_pylist(rows, schema=VICAS_SAMPLES)
    assert table.num_rows == len(info)
    assert VICAS_SAMPLES.metadata[b"vgen.schema"] == b"vicas_samples"
    for row in rows:
        meta = info[row["video_id"]]
        assert row["sample_id"] == vicas_sample_id(row["video_id"])
        assert row["split"] == meta["split"] and row["version"] == "v1.0"
        assert row["num_frames"] == meta["num_frames"] == len(row["frames"])
        assert row["stats"]["num_tracks"] == meta["num_tracks"]
        assert row["fps"] == 30.0 and row["frames_source"] == "frames_dir"
        with Image.open(io.BytesIO(row["frames"][0])) as im:
            assert (im.height, im.width) == (row["height"], row["width"])
        for seg in row["segmentations"]:
            for r in seg["mask_rles"]:
                assert rle.decode(r).shape == (row["height"], row["width"])
        assert parse_vicas_caption(row["caption_raw"]).plain == row["caption"]
        assert row["stats"]["num_caption_spans"] == len(row["caption_spans"]) >= 2
        assert 0 < row["stats"]["grounded_coverage"] < 1
        assert row["stats"]["tracks_in_caption_fraction"] == 1.0
        assert row["stats"]["num_gt_frames"] == -(-row["num_frames"] // 30)
        assert not any(f["name"] in ("multi_digit_caption_ids", "caption_cn_unparseable",
                                     "caption_parsed_mismatch") for f in row["flags"])
    assert len({r["content_digest"] for r in rows}) == len(rows)
    assert [read_vicas_sample(it)["content_digest"] for it in items] == [
        r["content_digest"] for r in rows]


def test_sample_dataset_versions_and_splits(sample_root):
    root, info = sample_root
    oops = sorted(v for v, m in info.items() if m["src_dataset"] == "oops")
    assert [it["video_id"] for it in list_vicas(str(root), version="0.1")] == oops
    for split in ("train", "val", "test"):
        want = sorted(v for v, m in info.items() if m["split"] == split)
        items = list_vicas(str(root), version="v1.0", split=split)
        assert [it["video_id"] for it in items] == want
        assert all(it["split"] == split for it in items)
    by_path = list_vicas(str(root), version="v1.0",
                         split=str(root / "splits" / "v1.0" / "val.json"))
    assert [it["video_id"] for it in by_path] == sorted(
        v for v, m in info.items() if m["split"] == "val")
    with pytest.raises(FileNotFoundError, match="v9.9"):
        list_vicas(str(root), version="v9.9")
    with pytest.raises(FileNotFoundError, match="holdout"):
        list_vicas(str(root), version="v1.0", split="holdout")


def test_decode_frames_false_lists_paths(sample_root):
    root, _ = sample_root
    item = list_vicas(str(root), version="v1.0")[0]
    full, light = read_vicas_sample(item), read_vicas_sample(item, decode_frames=False)
    assert light["frames"] is None and len(light["frame_paths"]) == light["num_frames"]
    assert all(Path(p).is_file() for p in light["frame_paths"])
    assert light["segmentations"] == full["segmentations"]
    assert light["stats"] == full["stats"]
    pa.Table.from_pylist([light], schema=VICAS_SAMPLES)


def test_real_layout_variants(sample_root, tmp_path):
    """Legacy ``<id>_*.json`` names, unpadded frame folders and URLs are accepted."""
    src, info = sample_root
    root = tmp_path / "vicas"
    shutil.copytree(src, root)
    vid = sorted(info)[0]
    ref = read_vicas_sample(list_vicas(str(src), version="v1.0")[0])
    ann_dir = root / "annotations" / "v1.0"
    (ann_dir / f"{vid:06d}.json").rename(ann_dir / f"{vid:06d}_legacy_name.json")
    (root / "video_frames" / f"{vid:06d}").rename(root / "video_frames" / str(vid))
    item = list_vicas(f"file://{root}", version="v1.0")[0]
    assert item["video_id"] == vid and item["frames_dir"].endswith(f"/{vid}")
    row = read_vicas_sample(item)
    assert row["content_digest"] == ref["content_digest"]
    assert {f["name"] for f in row["flags"]} == {f["name"] for f in ref["flags"]} | {
        "legacy_annotation_name"}
    # a canonical file next to a legacy one wins, as in the official evaluation code
    shutil.copy(ann_dir / f"{vid:06d}_legacy_name.json", ann_dir / f"{vid:06d}.json")
    item = list_vicas(str(root), version="v1.0")[0]
    assert item["annotation"].endswith(f"{vid:06d}.json")
    # two legacy files and no canonical one are ambiguous
    (ann_dir / f"{vid:06d}.json").rename(ann_dir / f"{vid:06d}_other.json")
    with pytest.raises(SampleError) as e:
        read_vicas_sample(list_vicas(str(root), version="v1.0")[0])
    assert e.value.check == "annotation_duplicate"


def test_video_without_decoder_or_frames(sample_root, tmp_path):
    src, info = sample_root
    root = tmp_path / "vicas"
    shutil.copytree(src, root)
    vid = sorted(info)[0]
    ann = json.loads((root / "annotations" / "v1.0" / f"{vid:06d}.json").read_text())
    shutil.rmtree(root / "video_frames" / f"{vid:06d}")
    item = list_vicas(str(root), version="v1.0")[0]
    with pytest.raises(SampleError) as e:
        read_vicas_sample(item)
    assert e.value.check == "frames_missing" and "videos" in e.value.reason
    (root / "videos" / "part_3").mkdir(parents=True)  # re-uploads split videos into folders
    (root / "videos" / "part_3" / ann["filename"]).write_bytes(b"not a video")
    item = list_vicas(str(root), version="v1.0")[0]
    assert item["video"].endswith(ann["filename"])
    try:
        import av  # noqa: F401
        has_decoder = True
    except ImportError:
        try:
            import imageio_ffmpeg  # noqa: F401
            has_decoder = True
        except ImportError:
            has_decoder = False
    with pytest.raises(SampleError) as e:
        read_vicas_sample(item)
    if has_decoder:
        assert e.value.check == "video_decode"
    else:
        assert e.value.check == "video_decoder_missing"
        assert "pip install av" in e.value.reason and "imageio-ffmpeg" in e.value.reason
    light = read_vicas_sample(item, decode_frames=False)
    assert light["frames_source"] == "video" and light["frames"] is None
    assert "frames_not_verified" in {f["name"] for f in light["flags"]}


def test_video_file_decodes_to_30fps_frames(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "vicas"
    info = write_vicas_sample_dataset(root, n_videos=2, seed=0, write_videos=True)
    shutil.rmtree(root / "video_frames")
    ref_root = tmp_path / "ref"
    write_vicas_sample_dataset(ref_root, n_videos=2, seed=0)
    for item, ref_item in zip(list_vicas(str(root), version="v1.0"),
                              list_vicas(str(ref_root), version="v1.0")):
        row, ref = read_vicas_sample(item), read_vicas_sample(ref_item)
        assert row["frames_source"] == "video" and row["frame_format"] == "jpeg"
        assert row["num_frames"] == info[item["video_id"]]["num_frames"] == len(row["frames"])
        assert row["segmentations"] == ref["segmentations"]
        a = np.asarray(Image.open(io.BytesIO(row["frames"][5])), dtype=float)
        b = np.asarray(Image.open(io.BytesIO(ref["frames"][5])), dtype=float)
        assert a.shape == b.shape and np.abs(a - b).mean() < 12  # lossy, but the same frame


@pytest.mark.parametrize("rate,n,expected", [
    (Fraction(24), 10, [0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9]),
    (Fraction(24000, 1001), 10, [0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9]),
    (Fraction(60), 12, [0, 1, 2, 3, 5, 7, 9, 11]),
    (Fraction(12), 5, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]),
    (Fraction(30), 4, [0, 1, 2, 3]),
], ids=["24fps", "23.976fps", "60fps", "12fps", "30fps"])
def test_cfr_resampling_matches_ffmpeg(rate, n, expected):
    """Source frame per output frame, as ``ffmpeg -i X -r 30`` (ffmpeg 9.0) picked them for
    MP4s with these rates; the PyAV path must pick the same frames as the official script."""
    cfr, out = _CfrResampler(), []
    for k in range(n):
        out += cfr.push(k, k / rate, 1 / rate)
    assert out + cfr.flush() == expected


# ---------------------------------------------------------------------------------------------
# a hand-checkable video: exact statistics and flags
# ---------------------------------------------------------------------------------------------


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return rle.encode(m)


def test_hand_checked_video_exact_stats(tmp_path):
    h, w = 8, 10
    photo = load_photo("chelsea")
    frames = [np.ascontiguousarray(photo[100 + t:100 + t + h, 200:200 + w]) for t in range(4)]
    cat = _box(h, w, 1, 4, 1, 5)  # 12 px, every frame: IoU 1 between frames
    toy = _box(h, w, 5, 7, 6, 9)  # 6 px, frames 0 and 3: a 2-frame gap
    ball0, ball1 = _box(h, w, 0, 2, 7, 10), _box(h, w, 6, 8, 0, 3)  # 6 px each, IoU 0
    per_frame = [([1, 2, 3], [cat, toy, ball0]), ([1, 3], [cat, ball1]), ([1], [cat]),
                 ([1, 2], [cat, toy])]
    raw_gpt = "[A cat]<mask_1> watches [two toys]<mask_2,3> and [people]<mask_?>."
    ann = {
        "video_id": 4242, "src_dataset": "oops", "filename": "004242_Cat_Fails.mp4",
        "image_size": [h, w],
        "caption_raw_en": "[A cat]<mask1> watches [a toy]<mask_2>.",
        "caption_parsed_en": "A cat watches a toy.",
        "caption_raw_en_gpt": raw_gpt,
        "caption_parsed_en_gpt": "A cat watches two toys and people.",
        "caption_raw_cn": "[一只猫]<mask_1>看着[玩具]<mask_2，3>。",
        "reworded_en_captions": ["A cat looks at toys."],
        "object_referrals": [{"prompt": "the cat", "track_ids": [1]},
                             {"prompt": "the toys", "track_ids": [2, 3]}],
        "all_track_ids": [1, 2, 3, 4],
        "segmentations": [{"filename": f"{t:05d}.jpg", "is_gt": t in (0, 3), "track_ids": ids,
                           "mask_rles": rles} for t, (ids, rles) in enumerate(per_frame)],
    }
    write_vicas_video(tmp_path, ann, frames)
    (item,) = list_vicas(str(tmp_path), version="v1.0")
    row = read_vicas_sample(item)
    assert row["sample_id"] == "vicas/004242" and row["split"] is None
    assert (row["num_frames"], row["height"], row["width"]) == (4, 8, 10)
    assert row["stats"] == {
        "num_frames": 4, "num_gt_frames": 2, "num_tracks": 4,
        "track_lengths": [4, 2, 2, 0], "track_gap_frames": [0, 2, 0, 0], "num_masks": 8,
        "mean_mask_area_fraction": pytest.approx(72 / 8 / 80),
        "min_consecutive_iou": 0.0, "num_referrals": 2, "caption_words": 7,
        "caption_chars": 34, "num_caption_spans": 3,
        "grounded_coverage": pytest.approx(13 / 34), "tracks_in_caption_fraction": 0.75,
        # tracks 1-3 are grounded; per-frame unions 24 + 18 + 12 + 18 = 72 px of 4 * 80
        "mask_grounded_coverage": pytest.approx(72 / 320),
    }
    assert sorted(f["name"] for f in row["flags"]) == [
        "mask_jump", "track_gap", "track_never_present"]
    assert row["caption_spans"] == [
        {"phrase": "A cat", "track_ids": [1], "start": 0, "end": 5, "multi_digit": False},
        {"phrase": "two toys", "track_ids": [2, 3], "start": 14, "end": 22,
         "multi_digit": False},
        {"phrase": "people", "track_ids": [-1], "start": 27, "end": 33, "multi_digit": False},
    ]
    assert row["segmentations"][1]["track_ids"] == [1, 3]
    assert row["segmentations"][1]["mask_rles"][1] == ball1
    assert row["referrals"] == ann["object_referrals"]
    # multi-digit track ids: read whole, flagged, not rejected
    ann2 = dict(ann, video_id=4243, filename="004243_x.mp4", all_track_ids=[1, 2, 3, 4, 12],
                caption_raw_en_gpt=raw_gpt.replace("<mask_?>", "<mask_12>"))
    write_vicas_video(tmp_path, ann2, frames)
    row2 = read_vicas_sample(list_vicas(str(tmp_path), version="v1.0")[1])
    names = {f["name"] for f in row2["flags"]}
    assert {"multi_digit_caption_ids", "track_ids_multi_digit"} <= names
    assert row2["caption_spans"][2] == {"phrase": "people", "track_ids": [12], "start": 27,
                                        "end": 33, "multi_digit": True}


# ---------------------------------------------------------------------------------------------
# the corrupt corpus
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, dict]]:
    root = tmp_path_factory.mktemp("vicas_corrupt")
    expected = write_vicas_corrupt_corpus(root, n_valid=2, seed=0)
    items = {it["sample_id"]: it for it in list_vicas(str(root), version="v1.0", split="train")}
    items.update({it["sample_id"]: it for it in list_vicas(str(root), version="v1.0")})
    return root, expected, items


def test_corrupt_corpus_covers_every_case(corpus):
    _, expected, items = corpus
    assert expected == CORRUPT_CASES
    assert {c for c in expected.values()} >= {
        "rle_size", "rle_counts", "track_mask_length", "referral_track_ids",
        "caption_track_ids", "caption_tags", "missing_keys", "file_stem", "frames_missing",
        "annotation_json"}
    assert all(vicas_sample_id(v) in items for v in CORRUPT_CASE_IDS.values())


@pytest.mark.parametrize("case", list(CORRUPT_CASES))
def test_corrupt_case_raises_expected_check(corpus, case):
    _, expected, items = corpus
    item = items[vicas_sample_id(CORRUPT_CASE_IDS[case])]
    with pytest.raises(SampleError) as e:
        read_vicas_sample(item)
    assert e.value.check == expected[case], e.value
    assert e.value.sample_id == item["sample_id"]
    assert e.value.source and e.value.reason


def test_valid_samples_next_to_corrupt_ones_read_unchanged(corpus, tmp_path):
    root, _, items = corpus
    clean = tmp_path / "clean"
    info = write_vicas_sample_dataset(clean, n_videos=2, seed=0)
    for ref_item in list_vicas(str(clean), version="v1.0"):
        ref = read_vicas_sample(ref_item)
        row = read_vicas_sample(items[ref_item["sample_id"]])
        assert {k: v for k, v in row.items() if k not in _IGNORE} == {
            k: v for k, v in ref.items() if k not in _IGNORE}
    assert len(info) == 2
