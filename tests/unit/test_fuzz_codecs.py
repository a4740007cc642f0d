"""Fuzzing the RLE and panoptic-PNG codecs with damaged inputs.

Property: for every damaged input a codec either returns a result consistent with its input
(decoding gives an (H, W) mask whose runs are the validated counts; a PNG gives ids of the
header's size) or raises its documented error (:class:`RLEError` naming ``size``/``counts``,
:class:`PanopticPNGError` naming the file) with a non-empty reason; any other exception is a bug.
Giant sizes must fail fast, before anything of size H*W is allocated.
"""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from fuzz_strategies import FAST, SLOW, dumps, mutated_bytes, mutated_json
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vgen_core.data import panoptic, rle
from vgen_core.data.panoptic import MAX_ID, PanopticPNGError
from vgen_core.data.rle import RLEError

# ---------------------------------------------------------------------------------------------
# RLE
# ---------------------------------------------------------------------------------------------


@st.composite
def small_masks(draw) -> np.ndarray:
    h, w = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    return draw(hnp.arrays(np.bool_, (h, w)))


def _check_rle_outcome(r, what: str) -> None:
    """Every RLE entry point on ``r``: consistent results or RLEError (nothing else)."""
    try:
        counts = rle.validate(r, source="fuzz.json")
    except RLEError as e:
        assert e.field in ("size", "counts") and e.reason.strip(), (what, e)
        assert str(e).startswith("fuzz.json: RLE "), (what, str(e))
        for fn in (rle.decode, rle.area, rle.to_bbox):  # all refuse what validate refuses
            with pytest.raises(RLEError):
                fn(r)
        return
    h, w = (int(v) for v in r["size"])
    assert all(c >= 0 for c in counts) and sum(counts) == h * w, (what, counts)
    m = rle.decode(r)
    assert m.shape == (h, w) and m.dtype == np.uint8
    assert rle.area(r) == int(m.sum())
    np.testing.assert_array_equal(rle.decode(rle.encode(m)), m)
    x, y, bw, bh = rle.to_bbox(r)
    assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
    if m.any():
        assert rle.iou([r], [r]).tolist() == [[1.0]]
    np.testing.assert_array_equal(rle.decode(rle.merge([r, r])), m)


def _mask_rle(m: np.ndarray, as_list: bool) -> dict:
    r = rle.encode(m)
    if as_list:
        r["counts"] = rle.validate(r)
    return r


@FAST
@given(small_masks(), st.data())
def test_rle_damaged_counts_string(m, data):
    r = rle.encode(m)
    what, raw = data.draw(mutated_bytes(r["counts"].encode("ascii")), label="mutation")
    as_str = data.draw(st.booleans(), label="as str")
    r["counts"] = raw.decode("latin-1") if as_str else raw
    _check_rle_outcome(r, what)


def _json_roundtrip(doc):
    """What a JSON reader would hand over for ``doc`` (NaN, 1e400, huge ints, ...)."""
    try:
        return json.loads(dumps(doc))
    except (RecursionError, ValueError):  # deep nesting / >4300-digit ints: not an RLE case
        assume(False)


@FAST
@given(small_masks(), st.booleans(), st.data())
def test_rle_damaged_structure(m, as_list, data):
    r = _mask_rle(m, as_list)
    what, _, bad = data.draw(mutated_json(r), label="mutation")
    _check_rle_outcome(_json_roundtrip(bad), what)


@pytest.mark.slow
@SLOW
@given(small_masks(), st.booleans(), st.data())
def test_rle_damaged_structure_slow(m, as_list, data):
    r = _mask_rle(m, as_list)
    what, _, bad = data.draw(mutated_json(r), label="mutation")
    _check_rle_outcome(_json_roundtrip(bad), what)
    what, raw = data.draw(mutated_bytes(rle.encode(m)["counts"].encode()), label="bytes")
    _check_rle_outcome({"size": list(m.shape), "counts": raw}, what)


@FAST
@given(st.integers(0, 2**40), st.integers(0, 2**40), st.lists(st.integers(-3, 2**60),
                                                               max_size=6), st.booleans())
def test_rle_arbitrary_counts_and_sizes(h, w, counts, as_str):
    """Any sizes (up to 2**80 pixels) and run lengths: consistent or RLEError, never an
    allocation of H*W (decoding is refused past MAX_DECODE_PIXELS)."""
    if as_str:
        try:
            c = rle.counts_to_string(counts)
        except RLEError:
            return
    else:
        c = counts
    r = {"size": [h, w], "counts": c}
    if h * w > rle.MAX_DECODE_PIXELS:
        try:
            rle.validate(r)
        except RLEError:
            return
        with pytest.raises(RLEError, match="MAX_DECODE_PIXELS|max_pixels"):
            rle.decode(r)
        return
    _check_rle_outcome(r, f"{[h, w]} {counts}")


def _giant_rles():
    # all far past what malloc can give (so a regression fails at once instead of paging),
    # plus one just past the limit
    sizes = [(10**6, 10**6), (2**31, 2**31), (1, 2**40), (2**20, 2**20), (10**9, 10**9),
             (3, 10**18), (2**14, 2**13 + 1)]
    out = []
    for h, w in sizes:
        n = h * w
        out.append((f"{h}x{w} one zero run", {"size": [h, w], "counts": [n]}))
        out.append((f"{h}x{w} all ones", {"size": [h, w], "counts": [0, n]}))
        if n < 2**59:
            out.append((f"{h}x{w} string", {"size": [h, w],
                                            "counts": rle.counts_to_string([0, n // 2, n - n // 2])}))
    return out


@pytest.mark.parametrize("what,r", _giant_rles(), ids=[w for w, _ in _giant_rles()])
def test_rle_giant_size_fails_fast(what, r):
    """A valid RLE of a giant mask: measures and merges work on run lengths; decoding refuses
    (RLEError naming the limit) instead of allocating H*W bytes."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        h, w = r["size"]
        assert sum(rle.validate(r)) == h * w
        assert rle.area(r) >= 0
        rle.to_bbox(r)
        rle.iou([r], [r])
        with pytest.raises(RLEError) as e:
            rle.decode(r)
        assert e.value.field == "size" and "max_pixels" in e.value.reason, e.value
        assert f"{h}*{w} = {h * w}" in e.value.reason
        for intersect in (False, True):  # merging works on the runs: no decoding needed
            if h * w < 2**59:
                m = rle.merge([r, r], intersect=intersect)
                assert m["size"] == [h, w] and rle.area(m) == rle.area(r)
            else:  # the merged runs cannot be written as a COCO string (12 groups of 5 bits)
                with pytest.raises(RLEError, match="more than 12 5-bit groups"):
                    rle.merge([r, r], intersect=intersect)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"{what}: peak {peak / 2**20:.0f} MiB"
    assert time.perf_counter() - t0 < 5


def test_rle_decode_limit_is_a_parameter():
    r = {"size": [10, 11], "counts": [110]}
    with pytest.raises(RLEError, match=r"10\*11 = 110 pixels.*max_pixels=100"):
        rle.decode(r, max_pixels=100)
    assert rle.decode(r, max_pixels=110).shape == (10, 11)


def _encode_groups(values: list[int]) -> str:
    """COCO string of raw (already delta-coded) values, with Python ints (no 64-bit limit)."""
    out = []
    for x in values:
        more = True
        while more:
            c = x & 31
            x >>= 5
            more = x != -1 if c & 16 else x != 0
            out.append(chr((c | (32 if more else 0)) + 48))
    return "".join(out)


def test_rle_string_whose_runs_overflow_int64():
    """Deltas that each fit 60 bits but whose running sums pass 2**63 must be refused, not wrap
    around into plausible (or negative) run lengths."""
    big = 2**58
    s = _encode_groups([0, big, 0] + [big] * 40)
    for size in ([2**31, 2**31], [3, 3], [2**40, 2**22]):
        with pytest.raises(RLEError) as e:
            rle.validate({"size": size, "counts": s})
        assert e.value.field == "counts"
        assert "64 bits" in e.value.reason or "more than the whole mask" in e.value.reason


def test_rle_sum_cannot_wrap_to_hw():
    """Five runs of 2**62 sum to 2**64 + 2**62, which wraps to 2**62 = H*W in int64."""
    h = w = 2**31
    counts = [2**62] * 5
    with pytest.raises(RLEError, match="sum to|64 bits"):
        rle.validate({"size": [h, w], "counts": counts})
    with pytest.raises(RLEError, match="sum to|64 bits"):
        rle.validate({"size": [h, w], "counts": np.array(counts, np.int64)})


# ---------------------------------------------------------------------------------------------
# panoptic PNG
# ---------------------------------------------------------------------------------------------


@st.composite
def id_maps(draw) -> np.ndarray:
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    big = draw(st.booleans())
    hi = MAX_ID if big else 40
    return draw(hnp.arrays(np.int64, (h, w), elements=st.integers(0, hi)))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 8
    while i + 8 <= len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        out.append((data[i + 4:i + 8], data[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(k, p) for k, p in chunks)


def _check_png_outcome(data: bytes, what: str, clean: np.ndarray | None = None) -> None:
    try:
        ids = panoptic.read_id_png(data, source="fuzz/000000000009.png")
    except PanopticPNGError as e:
        assert e.reason.strip() and e.source == "fuzz/000000000009.png", (what, e)
        assert "fuzz/000000000009.png" in str(e)
        return
    assert ids.dtype == np.int64 and ids.ndim == 2, what
    w, h = struct.unpack(">II", data[16:24])
    assert ids.shape == (h, w), (what, ids.shape, (h, w))
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() <= MAX_ID), what
    if clean is not None and data == panoptic.write_id_png(clean):
        np.testing.assert_array_equal(ids, clean)


@FAST
@given(id_maps(), st.data())
def test_png_damaged_bytes(ids, data):
    png = panoptic.write_id_png(ids)
    what, bad = data.draw(mutated_bytes(png), label="mutation")
    _check_png_outcome(bad, what, ids)


PNG_CHUNK_OPS = ("ihdr_field", "drop_chunk", "dup_chunk", "swap_chunks", "split_idat",
                 "ancillary", "bad_crc", "recompress", "idat_garbage")


@st.composite
def damaged_png_chunks(draw, png: bytes) -> tuple[str, bytes]:
    """Damage at the chunk level with valid CRCs (so the decoder, not the CRC check, sees it)."""
    chunks = _chunks(png)
    op = draw(st.sampled_from(PNG_CHUNK_OPS))
    if op == "ihdr_field":
        w, h, depth, colour, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
        field = draw(st.sampled_from(["w", "h", "depth", "colour", "comp", "filt", "inter",
                                      "wh"]))
        val = draw(st.one_of(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 65535, 100_000]),
                             st.integers(0, 2**32 - 1))) if field in ("w", "h", "wh") else \
            draw(st.integers(0, 255))
        fields = dict(w=w, h=h, depth=depth, colour=colour, comp=comp, filt=filt, inter=inter)
        if field == "wh":
            fields["w"] = fields["h"] = val
        else:
            fields[field] = val
        chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", *fields.values()))
        return f"IHDR {field}={val}", _png(chunks)
    if op == "drop_chunk":
        i = draw(st.integers(0, len(chunks) - 1))
        return f"drop {chunks[i][0]!r}", _png(chunks[:i] + chunks[i + 1:])
    if op == "dup_chunk":
        i = draw(st.integers(0, len(chunks) - 1))
        return f"duplicate {chunks[i][0]!r}", _png(chunks[:i + 1] + chunks[i:])
    if op == "swap_chunks":
        i, j = draw(st.integers(0, len(chunks) - 1)), draw(st.integers(0, len(chunks) - 1))
        chunks[i], chunks[j] = chunks[j], chunks[i]
        return f"swap chunks {i}, {j}", _png(chunks)
    if op == "split_idat":
        idat = b"".join(p for k, p in chunks if k == b"IDAT")
        n = draw(st.integers(1, 7))
        parts = [idat[k * len(idat) // n:(k + 1) * len(idat) // n] for k in range(n)]
        return f"IDAT in {n} chunks", _png([chunks[0]] + [(b"IDAT", p) for p in parts]
                                          + [(b"IEND", b"")])
    if op == "ancillary":
        kind = draw(st.sampled_from([b"tEXt", b"gAMA", b"pHYs", b"zTXt", b"iCCP", b"sRGB",
                                     b"PLTE", b"tRNS", b"acTL"]))
        payload = draw(st.binary(max_size=40))
        return f"add {kind!r}", _png(chunks[:1] + [(kind, payload)] + chunks[1:])
    if op == "bad_crc":
        i = draw(st.integers(0, len(png) - 1))
        b = bytearray(png)
        b[i] ^= 0x55
        return f"xor byte {i}", bytes(b)
    idat = b"".join(p for k, p in chunks if k == b"IDAT")
    raw = zlib.decompress(idat)
    if op == "recompress":  # raw scanlines cut or extended, recompressed (valid zlib)
        n = draw(st.integers(-len(raw), 64))
        raw = raw[:n] if n < 0 else raw + bytes(n)
        return f"scanlines {n:+d} bytes", _png([chunks[0], (b"IDAT", zlib.compress(raw)),
                                                (b"IEND", b"")])
    junk = draw(st.binary(min_size=1, max_size=64))
    return "IDAT is garbage", _png([chunks[0], (b"IDAT", junk), (b"IEND", b"")])


@FAST
@given(id_maps(), st.data())
def test_png_damaged_chunks(ids, data):
    what, bad = data.draw(damaged_png_chunks(panoptic.write_id_png(ids)), label="mutation")
    _check_png_outcome(bad, what, ids)


@pytest.mark.slow
@SLOW
@given(id_maps(), st.data())
def test_png_damaged_slow(ids, data):
    png = panoptic.write_id_png(ids)
    what, bad = data.draw(damaged_png_chunks(png), label="chunks")
    _check_png_outcome(bad, what, ids)
    what, bad = data.draw(mutated_bytes(png), label="bytes")
    _check_png_outcome(bad, what, ids)


@pytest.mark.parametrize("w,h", [(100_000, 100_000), (12_000, 12_000), (2**31 - 1, 1),
                                 (1, 2**31 - 1), (9000, 9000), (65535, 65535)])
def test_png_giant_header_fails_fast(w, h):
    """A PNG whose header claims a giant image (valid CRC, tiny data) is refused from its
    header, before Pillow allocates the image (and Pillow's DecompressionBombError, which is
    not an OSError, never leaks out)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = _png([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")])
    t0 = time.perf_counter()
    with pytest.raises(PanopticPNGError, match=r"max_pixels") as e:
        panoptic.read_id_png(data, source="x.png")
    assert f"{w}x{h}" in e.value.reason
    assert time.perf_counter() - t0 < 1
    assert panoptic.png_size(data) == (h, w)


def test_png_size_limit_is_a_parameter():
    ids = np.arange(12).reshape(3, 4)
    data = panoptic.write_id_png(ids)
    with pytest.raises(PanopticPNGError, match="max_pixels=11"):
        panoptic.read_id_png(data, max_pixels=11)
    np.testing.assert_array_equal(panoptic.read_id_png(data, max_pixels=12), ids)


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGBA", "I;16", "I", "F"])
def test_png_wrong_modes_refused(mode):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    im = Image.fromarray(rgb).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        im = im.convert("I").point(lambda v: v * 200)
        if mode == "I;16":
            im = im.convert("I;16")
    buf = io.BytesIO()
    try:
        im.save(buf, format="PNG")
    except OSError:
        pytest.skip(f"Pillow cannot write mode {mode} as PNG")
    with pytest.raises(PanopticPNGError, match="must be 3-channel RGB|8 bits per channel"):
        panoptic.read_id_png(buf.getvalue(), source="m.png")
