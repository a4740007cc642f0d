"""COCO-panoptic id PNGs: id <-> RGB, PNG round trip, refusal of every non-RGB flavour and of
truncated files, segment areas and boxes against a panopticapi-style dense computation."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vgen_core.data import panoptic
from vgen_core.data.panoptic import MAX_ID, PanopticPNGError


def id_maps(max_id: int = MAX_ID, max_side: int = 12):
    shapes = st.tuples(st.integers(1, max_side), st.integers(1, max_side))
    return shapes.flatmap(lambda s: hnp.arrays(np.int64, s, elements=st.integers(0, max_id)))


def png_bytes(mode: str, size=(5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, pixels: bytes) -> bytes:
    """A PNG written by hand (for flavours Pillow will not write, such as 16-bit RGB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    stride = len(pixels) // height
    scan = b"".join(b"\x00" + pixels[r * stride:(r + 1) * stride] for r in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(scan))
            + chunk(b"IEND", b""))


def panopticapi_bbox(mask: np.ndarray) -> list[int]:
    """The bbox computation of the panopticapi-style converters (cityscapes converter)."""
    hor_idx = np.nonzero(np.sum(mask, axis=0))[0]
    x = hor_idx[0]
    width = hor_idx[-1] - x + 1
    vert_idx = np.nonzero(np.sum(mask, axis=1))[0]
    y = vert_idx[0]
    height = vert_idx[-1] - y + 1
    return [int(x), int(y), int(width), int(height)]


# ---------------------------------------------------------------------------------------------
# id <-> rgb
# ---------------------------------------------------------------------------------------------


def test_known_ids():
    rgb = np.array([[[1, 2, 3], [0, 0, 0]], [[29, 0, 0], [255, 255, 255]]], np.uint8)
    ids = panoptic.rgb_to_id(rgb)
    assert ids.dtype == np.int64
    assert ids.tolist() == [[1 + 2 * 256 + 3 * 65536, 0], [29, MAX_ID]]
    np.testing.assert_array_equal(panoptic.id_to_rgb(ids), rgb)
    # COCONut: small sequential ids give black-looking PNGs (G = B = 0)
    assert panoptic.id_to_rgb(np.arange(30))[:, 1:].max() == 0


@settings(max_examples=100, deadline=None)
@given(id_maps())
def test_id_rgb_roundtrip(ids):
    rgb = panoptic.id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == ids.shape + (3,)
    np.testing.assert_array_equal(panoptic.rgb_to_id(rgb), ids)


def test_id_rgb_errors():
    with pytest.raises(ValueError, match=r"\[0, 16777215\].*found \[-1, 16777216\]"):
        panoptic.id_to_rgb(np.array([-1, MAX_ID + 1]))
    with pytest.raises(ValueError, match="integer id map"):
        panoptic.id_to_rgb(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8.*int64"):
        panoptic.rgb_to_id(np.zeros((2, 2, 3), np.int64))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8.*\(2, 2, 4\)"):
        panoptic.rgb_to_id(np.zeros((2, 2, 4), np.uint8))


# ---------------------------------------------------------------------------------------------
# PNG round trip and refusals
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(id_maps())
def test_png_roundtrip(ids):
    data = panoptic.write_id_png(ids)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == ids.shape[::-1]
    out = panoptic.read_id_png(data, source="x.png")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, ids)


def test_reads_pillow_rgb_png():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    np.testing.assert_array_equal(panoptic.read_id_png(buf.getvalue()), panoptic.rgb_to_id(rgb))


@pytest.mark.parametrize("mode,found", [
    ("L", "mode 'L' (8-bit single-channel greyscale)"),
    ("I;16", "mode 'I;16' (16-bit single-channel greyscale)"),
    ("1", "mode '1' (1-bit single-channel greyscale)"),
    ("P", "palette-indexed"),
    ("LA", "mode 'LA'"),
    ("RGBA", "mode 'RGBA' (8-bit RGB with an alpha channel)"),
])
def test_non_rgb_refused(mode, found):
    with pytest.raises(PanopticPNGError) as e:
        panoptic.read_id_png(png_bytes(mode), source="coconut_xl/panseg/objects365_v2_1.png")
    msg = str(e.value)
    assert msg.startswith("coconut_xl/panseg/objects365_v2_1.png: ")
    assert "must be 3-channel RGB" in msg and found in msg and "fix:" in msg
    assert e.value.source == "coconut_xl/panseg/objects365_v2_1.png"


def test_single_channel_message_points_at_the_known_issue():
    with pytest.raises(PanopticPNGError, match="re-download the Sep 2025 re-upload"):
        panoptic.read_id_png(png_bytes("L"), source="a.png")


def test_16bit_rgb_refused():
    data = raw_png(2, 1, 16, 2, bytes(range(12)))
    with Image.open(io.BytesIO(data)) as img:  # Pillow would quietly give mode RGB
        assert img.mode == "RGB"
    with pytest.raises(PanopticPNGError, match="8 bits per channel, found 16-bit RGB"):
        panoptic.read_id_png(data, source="a.png")


def test_hand_written_8bit_rgb_accepted():
    data = raw_png(2, 1, 8, 2, bytes([1, 0, 0, 0, 1, 0]))
    assert panoptic.read_id_png(data).tolist() == [[1, 256]]


def test_truncated_and_corrupt_refused():
    ids = np.random.default_rng(1).integers(0, 40, (30, 40))
    data = panoptic.write_id_png(ids)
    for cut in (0, 8, 20, 33, 60, len(data) // 2, len(data) - 12, len(data) - 1):
        with pytest.raises(PanopticPNGError, match=r"^cut\.png: (truncated|expected a PNG)"):
            panoptic.read_id_png(data[:cut], source="cut.png")
    bad = bytearray(data)
    idat = bad.index(b"IDAT") + 8
    bad[idat:idat + 40] = b"\xff" * 40
    with pytest.raises(PanopticPNGError, match=r"^bad\.png: truncated or corrupt PNG"):
        panoptic.read_id_png(bytes(bad), source="bad.png")


def test_not_png_refused():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="JPEG")
    with pytest.raises(PanopticPNGError, match="found JPEG data.*lossless RGB PNG"):
        panoptic.read_id_png(buf.getvalue(), source="000000000139.jpg")
    with pytest.raises(PanopticPNGError, match="<bytes>: expected a PNG"):
        panoptic.read_id_png(b"hello")
    with pytest.raises(TypeError, match="expected the PNG file's bytes, found str"):
        panoptic.read_id_png("panoptic/000000000139.png")


# ---------------------------------------------------------------------------------------------
# areas and boxes
# ---------------------------------------------------------------------------------------------


def test_known_areas_and_boxes():
    ids = np.array([[0, 5, 5, 0],
                    [7, 5, 0, 0],
                    [7, 7, 0, 300]])
    assert panoptic.segment_areas(ids) == {5: 3, 7: 3, 300: 1}
    assert panoptic.segment_areas(ids, include_void=True) == {0: 5, 5: 3, 7: 3, 300: 1}
    assert panoptic.segment_bboxes(ids) == {5: [1, 0, 2, 2], 7: [0, 1, 2, 2], 300: [3, 2, 1, 1]}
    assert panoptic.segment_bboxes(ids, include_void=True)[0] == [0, 0, 4, 3]
    assert panoptic.segment_bboxes(np.zeros((0, 3), np.int64)) == {}


@settings(max_examples=100, deadline=None)
@given(st.one_of(id_maps(max_id=6, max_side=15), id_maps(max_side=6)))
def test_areas_and_boxes_match_dense(ids):
    areas = panoptic.segment_areas(ids)
    boxes = panoptic.segment_bboxes(ids)
    present = sorted(int(i) for i in np.unique(ids) if i != 0)
    assert list(areas) == present == list(boxes)
    for i in present:
        mask = ids == i
        assert areas[i] == int(mask.sum())
        assert boxes[i] == panopticapi_bbox(mask)
        assert all(type(v) is int for v in boxes[i])
