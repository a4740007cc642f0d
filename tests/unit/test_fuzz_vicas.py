"""Fuzzing the ViCaS reader with damaged real-format files.

A clean ViCaS layout (``annotations/v1.0/<id>.json``, ``splits/``, ``video_frames/<id>/``; real
pixels from scikit-image, COCO RLE masks, grounded captions) is written once; each example
damages one thing (bytes of an annotation JSON, its structure, one RLE, a caption's text, a frame
JPEG, a split file), reads, and restores the file. Property: each video is either read exactly as
in the clean run, or rejected with :class:`SampleError` (check, reason, sample, file); only the
damaged video may instead give a different row, which must still fit ``VICAS_SAMPLES``. Any other
exception is a reader bug. A giant ``image_size`` must fail at once, whatever the RLEs say.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import pyarrow as pa
import pytest
from fuzz_strategies import (FAST, SLOW, UNPARSEABLE, Quiet, assert_sample_error, dumps,
                             mutated_bytes, mutated_json, mutated_text)
from hypothesis import given
from hypothesis import strategies as st

from vgen_core.data import rle
from vgen_core.formats.errors import SampleError
from vgen_core.formats.vicas import VICAS_SAMPLES, list_vicas, read_vicas_sample
from vgen_core.formats.vicas_samples import write_vicas_sample_dataset

VERSION = "v1.0"
CAPTION_KEYS = ("caption_raw_en_gpt", "caption_raw_en", "caption_raw_cn", "caption_parsed_en_gpt")


def _read(item: dict, decode: bool) -> dict | SampleError:
    try:
        return read_vicas_sample(item, decode_frames=decode)
    except SampleError as e:
        return e
    except Exception as e:
        raise AssertionError(f"{item['sample_id']}: reader raised {type(e).__name__}: {e}") \
            from e


@pytest.fixture(scope="module")
def vicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_vicas") / "vicas"
    write_vicas_sample_dataset(root, n_videos=2, seed=0)
    items = list_vicas(str(root), version=VERSION)
    clean = {d: {it["sample_id"]: _read(it, d) for it in items} for d in (True, False)}
    assert all(isinstance(r, dict) for c in clean.values() for r in c.values())
    return Quiet((root, items, clean))


def _check(got, clean_row: dict, sid: str, what: str, may_change: set[str] | None = None):
    if isinstance(got, SampleError):
        assert_sample_error(got, sid, what)
        return
    if got == clean_row:
        return
    try:
        pa.Table.from_pylist([got], schema=VICAS_SAMPLES)
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
        raise AssertionError(f"{what}: the row does not fit VICAS_SAMPLES: {e}") from e
    if may_change is not None:
        changed = {k for k in got if got[k] != clean_row[k]} - {"content_digest"}
        assert changed <= may_change, f"{what}: {sid} changed {changed - may_change}"


def _damage(vicas, data, item: dict, rel: str, bad: bytes, what: str, *,
            decode: bool | None = None, may_change: set[str] | None = None) -> None:
    """Write ``bad`` over ``rel`` (a file of ``item``'s video), read that video (and, one time
    in four, the other one), restore the file."""
    root, items, clean = vicas
    others = [it for it in items if it is not item]
    decode = data.draw(st.booleans(), label="decode_frames") if decode is None else decode
    check_other = data.draw(st.integers(0, 3), label="read another") == 0
    path = root / rel
    orig = path.read_bytes()
    path.write_bytes(bad)
    try:
        got = _read(item, decode)
        other = _read(others[0], False) if check_other and others else None
    finally:
        path.write_bytes(orig)
    _check(got, clean[decode][item["sample_id"]], item["sample_id"], f"{rel}: {what}",
           may_change)
    if other is not None:
        assert other == clean[False][others[0]["sample_id"]], f"{what}: untouched video changed"


def _ann_rel(item: dict) -> str:
    return f"annotations/{VERSION}/{item['video_id']:06d}.json"


# ---------------------------------------------------------------------------------------------
# annotation bytes and structure
# ---------------------------------------------------------------------------------------------


def _damage_annotation_bytes(vicas, data):
    root, items, _ = vicas
    item = data.draw(st.sampled_from(items), label="video")
    rel = _ann_rel(item)
    what, bad = data.draw(mutated_bytes((root / rel).read_bytes()), label="mutation")
    _damage(vicas, data, item, rel, bad, what)


@FAST
@given(st.data())
def test_damaged_annotation_bytes(vicas, data):
    _damage_annotation_bytes(vicas, data)


def _where(data, doc: dict) -> tuple:
    t = data.draw(st.integers(0, len(doc["segmentations"]) - 1), label="frame")
    seg = doc["segmentations"][t]
    firsts = [(), ("segmentations", t), ("all_track_ids",), ("image_size",),
              ("object_referrals",), ("reworded_en_captions",), ("video_id",),
              ("segmentations",)]
    if seg["mask_rles"]:
        j = data.draw(st.integers(0, len(seg["mask_rles"]) - 1), label="mask")
        firsts += [("segmentations", t, "mask_rles", j)] * 3
    return data.draw(st.sampled_from(firsts), label="where")


def _damage_annotation_structure(vicas, data):
    root, items, _ = vicas
    item = data.draw(st.sampled_from(items), label="video")
    rel = _ann_rel(item)
    doc = json.loads((root / rel).read_bytes())
    what, _, bad = data.draw(mutated_json(doc, first=_where(data, doc)), label="mutation")
    raw = dumps(bad)
    _damage(vicas, data, item, rel, raw, what)
    if any(u in what for u in UNPARSEABLE):
        return
    assert isinstance(json.loads(raw), (dict, list, str, int, float, type(None)))


@FAST
@given(st.data())
def test_damaged_annotation_structure(vicas, data):
    _damage_annotation_structure(vicas, data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_damaged_annotation_slow(vicas, data):
    if data.draw(st.booleans(), label="bytes"):
        _damage_annotation_bytes(vicas, data)
    else:
        _damage_annotation_structure(vicas, data)


# ---------------------------------------------------------------------------------------------
# one RLE, one caption
# ---------------------------------------------------------------------------------------------


def _damage_rle(vicas, data):
    root, items, _ = vicas
    item = data.draw(st.sampled_from(items), label="video")
    rel = _ann_rel(item)
    doc = json.loads((root / rel).read_bytes())
    frames = [s for s in doc["segmentations"] if s["mask_rles"]]
    seg = data.draw(st.sampled_from(frames), label="frame")
    r = data.draw(st.sampled_from(seg["mask_rles"]), label="mask")
    h, w = doc["image_size"]
    kind = data.draw(st.sampled_from(["bytes", "as_list", "size", "swap"]), label="kind")
    if kind == "bytes":
        what, raw = data.draw(mutated_bytes(r["counts"].encode()), label="mutation")
        r["counts"] = raw.decode("latin-1")
    elif kind == "as_list":  # uncompressed counts, then damaged
        counts = rle.counts_from_string(r["counts"])
        op = data.draw(st.sampled_from(["same", "drop", "neg", "huge", "bump", "float"]))
        i = data.draw(st.integers(0, len(counts) - 1))
        if op == "drop":
            counts.pop(i)
        elif op == "neg":
            counts[i] = -counts[i] - 1
        elif op == "huge":
            counts[i] = data.draw(st.sampled_from([2**31, 2**62, 2**64, 10**30, h * w]))
        elif op == "bump":
            counts[i] += 1
        elif op == "float":
            counts[i] = float(counts[i])
        r["counts"] = counts
        what = f"counts as a list, {op} at {i}"
    elif kind == "size":
        r["size"] = data.draw(st.sampled_from([[w, h], [h, w + 1], [h * 1000, w * 1000],
                                               [2**31, 2**31], [h], [h, w, 3], [-h, -w],
                                               [float(h), w]]))
        what = f"size -> {r['size']}"
    else:  # another mask of the same size: valid, different row
        r["counts"] = rle.encode(rle.decode(r)[::-1])["counts"]
        what = "mask flipped upside down"
    _damage(vicas, data, item, rel, dumps(doc), what)


@FAST
@given(st.data())
def test_damaged_rle(vicas, data):
    _damage_rle(vicas, data)


def _damage_caption(vicas, data):
    root, items, _ = vicas
    item = data.draw(st.sampled_from(items), label="video")
    rel = _ann_rel(item)
    doc = json.loads((root / rel).read_bytes())
    key = data.draw(st.sampled_from(CAPTION_KEYS), label="caption")
    what, raw = data.draw(mutated_text(doc[key]), label="mutation")
    doc[key] = raw.decode("utf-8", "surrogateescape")  # non-UTF-8 bytes -> lone surrogates
    _damage(vicas, data, item, rel, dumps(doc), f"{key}: {what}")


@FAST
@given(st.data())
def test_damaged_caption(vicas, data):
    _damage_caption(vicas, data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_damaged_rle_and_caption_slow(vicas, data):
    _damage_rle(vicas, data)
    _damage_caption(vicas, data)


# ---------------------------------------------------------------------------------------------
# frames and split files
# ---------------------------------------------------------------------------------------------


def _damage_frame(vicas, data):
    root, items, clean = vicas
    item = data.draw(st.sampled_from(items), label="video")
    n = clean[True][item["sample_id"]]["num_frames"]
    t = data.draw(st.integers(0, n - 1), label="frame")
    rel = f"video_frames/{item['video_id']:06d}/{t:05d}.jpg"
    what, bad = data.draw(mutated_bytes((root / rel).read_bytes()), label="mutation")
    _damage(vicas, data, item, rel, bad, what, decode=True, may_change={"frames"})


@FAST
@given(st.data())
def test_damaged_frame(vicas, data):
    _damage_frame(vicas, data)


@pytest.mark.slow
@SLOW
@given(st.data())
def test_damaged_frame_slow(vicas, data):
    _damage_frame(vicas, data)


@FAST
@given(st.data())
def test_damaged_split_file(vicas, data):
    root, items, clean = vicas
    name = data.draw(st.sampled_from(["train", "val", "test"]), label="split")
    path = root / "splits" / VERSION / f"{name}.json"
    orig = path.read_bytes()
    if data.draw(st.booleans(), label="structure"):
        what, _, bad = data.draw(mutated_json(json.loads(orig)), label="mutation")
        raw = dumps(bad)
    else:
        what, raw = data.draw(mutated_bytes(orig), label="mutation")
    path.write_bytes(raw)
    try:
        try:
            listed = list_vicas(str(root), version=VERSION, split=name)
        except SampleError as e:
            assert e.check == "split_json" and e.reason.strip(), (what, e)
            assert e.source and e.source.endswith(f"{name}.json"), (what, e)
            return
        for it in listed:
            assert it["split"] == name
            if it["sample_id"] in clean[False]:
                got = _read(it, False)
                want = dict(clean[False][it["sample_id"]], split=name)
                assert got == want, what
            else:  # an id the damage made up: no annotation file
                got = _read(it, False)
                assert isinstance(got, SampleError) and got.check == "annotation_missing", what
    finally:
        path.write_bytes(orig)


# ---------------------------------------------------------------------------------------------
# targeted: a giant image_size with RLEs that agree with it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("h,w", [(100_000, 100_000), (2**31 - 1, 2**31 - 1), (5000, 7000),
                                 (1, 2**40)])
def test_giant_image_size_fails_fast(vicas, h, w, decode):
    root, items, _ = vicas
    item = items[0]
    rel = _ann_rel(item)
    path = root / rel
    orig = path.read_bytes()
    doc = json.loads(orig)
    doc["image_size"] = [h, w]
    for seg in doc["segmentations"]:
        seg["mask_rles"] = [{"size": [h, w], "counts": [0, h * w]} for _ in seg["track_ids"]]
    path.write_bytes(dumps(doc))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        got = _read(item, decode)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        path.write_bytes(orig)
    assert isinstance(got, SampleError) and got.check == "image_size", got
    assert f"{h}x{w}" in got.reason and "MAX_FRAME_PIXELS" in got.reason
    assert time.perf_counter() - t0 < 5 and peak < 64 * 2**20
