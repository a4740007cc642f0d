"""COCO RLE: hand-derived strings, properties against dense numpy, strict validation, and a
cross-check against pycocotools when it is installed (it is not a dependency)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vgen_core.data import rle
from vgen_core.data.rle import RLEError

# ---------------------------------------------------------------------------------------------
# strategies and dense references
# ---------------------------------------------------------------------------------------------


@st.composite
def masks(draw, max_side: int = 24, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Binary masks: random pixels, rectangles, empty/full, and odd shapes (0-sized, 1xN)."""
    if shape is None:
        shape = (draw(st.integers(0, max_side)), draw(st.integers(0, max_side)))
    kind = draw(st.sampled_from(["pixels", "rect", "empty", "full"]))
    h, w = shape
    if kind == "pixels":
        return draw(hnp.arrays(np.bool_, shape))
    if kind == "empty":
        return np.zeros(shape, bool)
    if kind == "full":
        return np.ones(shape, bool)
    m = np.zeros(shape, bool)
    if h and w:
        y0, y1 = sorted(draw(st.integers(0, h)) for _ in range(2))
        x0, x1 = sorted(draw(st.integers(0, w)) for _ in range(2))
        m[y0:y1, x0:x1] = True
    return m


@st.composite
def mask_sets(draw, n_min: int = 1, n_max: int = 4) -> list[np.ndarray]:
    shape = (draw(st.integers(0, 16)), draw(st.integers(0, 16)))
    return draw(st.lists(masks(shape=shape), min_size=n_min, max_size=n_max))


def dense_bbox(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def dense_runs(m: np.ndarray) -> list[int]:
    """Run lengths by a plain per-pixel walk, as rleEncode does it."""
    runs, prev, c = [], 0, 0
    for v in m.ravel(order="F").astype(int).tolist():
        if v != prev:
            runs.append(c)
            c, prev = 0, v
        c += 1
    runs.append(c)
    return runs


def reference_to_string(counts: list[int]) -> str:
    """rleToString, transcribed line by line (Python ints shift arithmetically like C long)."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# known strings, derived by hand from rleToString
# ---------------------------------------------------------------------------------------------

# 3x3 mask; column-major flattening reads column 0 (0,0,1), column 1 (1,1,0), column 2 (0,1,0):
#   0 0 1 1 1 0 0 1 0  -> runs [2, 3, 2, 1, 1]
# values written: 2, 3, 2 (i <= 2: as is), 1-3 = -2, 1-2 = -1 (i > 2: delta from i-2)
#   2 -> '2';  3 -> '3';  2 -> '2'
#   -2: c = -2 & 31 = 30, x >>= 5 -> -1, c has 0x10 and x == -1 -> last group; 30+48 = 'N'
#   -1: c = 31, x -> -1, last group; 31+48 = 'O'
MASK_3x3 = np.array([[0, 1, 0],
                     [0, 1, 1],
                     [1, 0, 0]], dtype=np.uint8)

KNOWN = [
    # (counts, string, derivation)
    ([2, 3, 2, 1, 1], "232NO", "the 3x3 above"),
    ([4], "4", "2x2 all zero"),
    ([0, 4], "04", "2x2 all one: an empty zero-run first"),
    ([0], "0", "0x0 mask"),
    ([64], "P2", "64 = 2*32 + 0: groups 0 (+0x20 -> 'P'), 2 -> '2'"),
    ([1, 40, 1, 2], "1X11jN", "40 = 32+8 -> 'X','1'; 2-40 = -38 -> 26|0x20 'j', then -2&31=30 'N'"),
    ([5, 5, 5, 5, 5, 5], "555000", "equal runs: every delta from i=3 on is 0"),
]


@pytest.mark.parametrize("counts,string,why", KNOWN, ids=[k[2][:20] for k in KNOWN])
def test_known_strings(counts, string, why):
    assert rle.counts_to_string(counts) == string
    assert reference_to_string(counts) == string
    assert rle.counts_from_string(string) == counts
    assert rle.counts_from_string(string.encode()) == counts


def test_known_3x3_mask():
    r = rle.encode(MASK_3x3)
    assert r == {"size": [3, 3], "counts": "232NO"}
    assert rle.validate(r) == [2, 3, 2, 1, 1]
    np.testing.assert_array_equal(rle.decode(r), MASK_3x3)
    assert rle.area(r) == 4
    assert rle.to_bbox(r) == [0.0, 0.0, 3.0, 3.0]
    # first pixel set -> a zero-length first run
    assert rle.encode(np.array([[1, 0], [0, 0]], bool)) == {"size": [2, 2], "counts": "013"}
    # nonzero counts as foreground, so a 0/255 mask encodes like its bool twin
    assert rle.encode(MASK_3x3 * 255) == rle.encode(MASK_3x3.astype(bool))


def test_decode_accepts_str_bytes_and_lists():
    forms = ["232NO", b"232NO", [2, 3, 2, 1, 1], (2, 3, 2, 1, 1),
             [np.int32(2), np.int64(3), 2, 1, 1], np.array([2, 3, 2, 1, 1], np.uint32)]
    for counts in forms:
        m = rle.decode({"size": [3, 3], "counts": counts})
        assert m.dtype == np.uint8 and m.shape == (3, 3)
        np.testing.assert_array_equal(m, MASK_3x3)
    np.testing.assert_array_equal(rle.decode({"size": (3, 3), "counts": "232NO"}), MASK_3x3)


def test_bbox_wrapping_run_covers_all_rows():
    m = np.zeros((4, 3), bool)
    m[3, 0] = m[0, 1] = True  # one run, from the bottom of column 0 into the top of column 1
    assert rle.validate(rle.encode(m)) == [3, 2, 7]
    assert rle.to_bbox(rle.encode(m)) == [0.0, 0.0, 2.0, 4.0] == dense_bbox(m)


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(masks())
def test_roundtrip_and_measures(m):
    r = rle.encode(m)
    assert r["size"] == list(m.shape) and isinstance(r["counts"], str)
    counts = rle.validate(r, expected_size=m.shape)
    assert counts == dense_runs(m)
    assert r["counts"] == reference_to_string(counts)
    np.testing.assert_array_equal(rle.decode(r), m.astype(np.uint8))
    np.testing.assert_array_equal(rle.decode({"size": r["size"], "counts": counts}), m)
    assert rle.area(r) == int(m.sum())
    assert rle.to_bbox(r) == dense_bbox(m)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), max_size=40))
def test_counts_string_roundtrip_any_ints(counts):
    s = rle.counts_to_string(counts)
    assert s == reference_to_string(counts)
    assert all("0" <= ch <= "o" for ch in s)
    assert rle.counts_from_string(s) == counts


@settings(max_examples=150, deadline=None)
@given(mask_sets(n_min=1, n_max=4), st.booleans())
def test_merge_is_or_and(ms, intersect):
    out = rle.merge([rle.encode(m) for m in ms], intersect=intersect)
    dense = np.logical_and.reduce(ms) if intersect else np.logical_or.reduce(ms)
    assert out["size"] == list(ms[0].shape)
    np.testing.assert_array_equal(rle.decode(out), dense)
    if len(ms) > 1:
        assert out == rle.encode(dense)  # canonical runs, as rleMerge produces


@settings(max_examples=150, deadline=None)
@given(mask_sets(n_min=0, n_max=4), mask_sets(n_min=0, n_max=4), st.data())
def test_iou_matches_dense(dts, gts, data):
    if dts and gts and dts[0].shape != gts[0].shape:
        gts = [np.resize(g, dts[0].shape) for g in gts]
    crowd = data.draw(st.lists(st.booleans(), min_size=len(gts), max_size=len(gts)))
    got = rle.iou([rle.encode(d) for d in dts], [rle.encode(g) for g in gts], crowd)
    assert got.shape == (len(dts), len(gts)) and got.dtype == np.float64
    for i, d in enumerate(dts):
        for j, g in enumerate(gts):
            inter = int((d & g).sum())
            union = int(d.sum()) if crowd[j] else int((d | g).sum())
            assert got[i, j] == (inter / union if inter else 0.0)


def test_iou_crowd_and_default():
    d = np.zeros((4, 4), bool)
    d[:2, :2] = True
    g = np.zeros((4, 4), bool)
    g[:, :2] = True
    dt, gt = [rle.encode(d)], [rle.encode(g)]
    assert rle.iou(dt, gt).tolist() == [[0.5]]
    assert rle.iou(dt, gt, [True]).tolist() == [[1.0]]
    assert rle.iou([], gt, [False]).shape == (0, 1)


def test_merge_single_keeps_runs():
    # One RLE comes back with its own run lengths, even non-canonical ones (as rleMerge).
    r = {"size": [2, 2], "counts": [1, 0, 0, 3]}
    assert rle.merge([r]) == {"size": [2, 2], "counts": rle.counts_to_string([1, 0, 0, 3])}


def test_large_mask_is_fast_enough():
    yy, xx = np.mgrid[:720, :1280]
    m = (yy - 300) ** 2 + (xx - 600) ** 2 < 200**2
    r = rle.encode(m)
    np.testing.assert_array_equal(rle.decode(r), m)
    assert rle.area(r) == int(m.sum())
    assert rle.iou([r], [r]).tolist() == [[1.0]]


# ---------------------------------------------------------------------------------------------
# validation: every failure names its field
# ---------------------------------------------------------------------------------------------

GOOD = {"size": [3, 3], "counts": "232NO"}

BAD = [
    # (rle, field, words the message must contain)
    ({"size": [3, 3], "counts": [2, 3, 2, 1]}, "counts", ["sum to 8", "9", "short by 1"]),
    ({"size": [3, 3], "counts": [2, 3, 2, 1, 2]}, "counts", ["sum to 10", "9", "long by 1"]),
    ({"size": [3, 3], "counts": [2, 3, -1, 4, 1]}, "counts", [">= 0", "-1", "index 2"]),
    ({"size": [3, 3], "counts": [2, 2**62, 1]}, "counts", ["run 1", "more than the whole mask"]),
    ({"size": [3, 3], "counts": [2, 2**64]}, "counts", ["64 bits"]),
    ({"size": [3, 3], "counts": "232NO0"}, "counts", ["sum to 10"]),  # 6th run = 1 + 0
    ({"size": [3, 3], "counts": "23 2NO"}, "counts", ["' '", "position 2"]),
    ({"size": [3, 3], "counts": "232NO~"}, "counts", ["'~'", "position 5"]),
    ({"size": [3, 3], "counts": "232NOP"}, "counts", ["ends inside a value", "'P'"]),
    ({"size": [3, 3], "counts": "2é"}, "counts", ["non-ASCII"]),
    ({"size": [3, 3], "counts": "P" * 13 + "0"}, "counts", ["at most 12"]),
    ({"size": [3, 3], "counts": 9}, "counts", ["found int"]),
    ({"size": [3, 3], "counts": [2, 3.0, 4]}, "counts", ["list of ints", "3.0"]),
    ({"size": [3, 3]}, "counts", ["missing key 'counts'"]),
    ({"counts": "9"}, "size", ["missing key 'size'"]),
    ({"size": [3, 3, 1], "counts": "9"}, "size", ["two ints"]),
    ({"size": [3.0, 3], "counts": "9"}, "size", ["two ints"]),
    ({"size": [True, 3], "counts": "9"}, "size", ["two ints"]),
    ({"size": [-3, -3], "counts": "9"}, "size", ["non-negative", "[-3, -3]"]),
    ("232NO", "size", ["expected a dict", "str"]),
]


@pytest.mark.parametrize("bad,field,words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_validation_errors(bad, field, words):
    for fn in (rle.validate, rle.decode, rle.area, rle.to_bbox):
        with pytest.raises(RLEError) as e:
            fn(bad, source="vid 7 frame 3")
        assert isinstance(e.value, ValueError) and e.value.field == field
        msg = str(e.value)
        assert msg.startswith(f"vid 7 frame 3: RLE {field}:"), msg
        for w in words:
            assert w in msg, (w, msg)


def test_expected_size_mismatch():
    assert rle.validate(GOOD, expected_size=(3, 3)) == [2, 3, 2, 1, 1]
    with pytest.raises(RLEError, match=r"RLE size: expected \[H, W\] = \[720, 1280\], "
                                       r"found \[3, 3\]") as e:
        rle.decode(GOOD, expected_size=[720, 1280])
    assert e.value.field == "size"


def test_mixed_sizes_refused():
    other = rle.encode(np.ones((2, 2), bool))
    with pytest.raises(RLEError, match=r"gt\[0\]: RLE size: expected \[H, W\] = \[3, 3\]"):
        rle.iou([GOOD], [other], [False])
    with pytest.raises(RLEError, match=r"rles\[1\]: RLE size"):
        rle.merge([GOOD, other])
    with pytest.raises(RLEError, match="at least one"):
        rle.merge([])
    with pytest.raises(RLEError, match="one flag per gt"):
        rle.iou([GOOD], [GOOD], [False, True])


def test_bad_masks_and_overflow():
    with pytest.raises(RLEError, match=r"RLE mask: expected a 2-D"):
        rle.encode(np.zeros((2, 2, 1), bool))
    with pytest.raises(RLEError, match="dtype float"):
        rle.encode(np.zeros((2, 2), np.float32))
    with pytest.raises(RLEError, match="more than 12"):
        rle.counts_to_string([2**62])


# ---------------------------------------------------------------------------------------------
# cross-check against pycocotools (optional; not a dependency)
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
@settings(max_examples=150, deadline=None)
@given(mask_sets(n_min=1, n_max=4), st.data())
def test_matches_pycocotools(ms, data):
    mask_api = pytest.importorskip("pycocotools.mask")
    ours = [rle.encode(m) for m in ms]
    theirs = [mask_api.encode(np.asfortranarray(m.astype(np.uint8))) for m in ms]
    for o, t in zip(ours, theirs):
        assert o["counts"].encode() == t["counts"] and o["size"] == list(t["size"])
        assert rle.area(o) == int(mask_api.area(t))
        assert rle.to_bbox(o) == mask_api.toBbox(t).tolist()
        np.testing.assert_array_equal(rle.decode(o), mask_api.decode(t))
    for intersect in (False, True):
        assert (rle.merge(ours, intersect)["counts"].encode()
                == mask_api.merge(theirs, intersect=intersect)["counts"])
    if ms[0].size:  # pycocotools' iou mis-sizes its output for 0-pixel masks
        crowd = data.draw(st.lists(st.booleans(), min_size=len(ms), max_size=len(ms)))
        np.testing.assert_array_equal(rle.iou(ours, ours, crowd),
                                      np.asarray(mask_api.iou(theirs, theirs, crowd)))
