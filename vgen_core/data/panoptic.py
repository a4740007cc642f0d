"""COCO-panoptic id maps: the RGB PNG encoding of segment ids (``../shared/datasets.md`` A.4).

A panoptic PNG is an 8-bit **RGB** PNG the size of its image; the segment id of a pixel is
``R + 256*G + 256**2*B`` (panopticapi's ``rgb2id``) and id 0 is void. COCONut ids are small
(1..N, so the PNGs look black); COCO 2017 ids are colour-derived and large, which is why all
three channels are always decoded.

:func:`read_id_png` refuses every other PNG flavour (grey, palette, grey+alpha, RGBA, 16-bit)
and any non-PNG or truncated file with :class:`PanopticPNGError`, whose message names the file,
what was found and how to fix it. A header claiming more than ``max_pixels`` pixels (default
:data:`MAX_PIXELS`) is refused before anything is decoded, so a damaged or hostile header cannot
make it allocate gigabytes; :func:`png_size` reads the size from the header alone.

Areas and boxes follow the panopticapi-style converters: ``area`` is the pixel count,
``bbox = [x, y, w, h]`` integer, inclusive extent (``w = x_last - x_first + 1``).

Shapes: ``ids_HW`` int64, ``rgb_HW3`` uint8.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

__all__ = [
    "MAX_ID",
    "MAX_PIXELS",
    "PanopticPNGError",
    "rgb_to_id",
    "id_to_rgb",
    "png_size",
    "read_id_png",
    "write_id_png",
    "segment_areas",
    "segment_bboxes",
]

MAX_ID = 256**3 - 1  # the largest id three 8-bit channels can hold
#: :func:`read_id_png` refuses larger PNGs (2**25 pixels, e.g. 8K UHD 7680x4320; COCO images are
#: at most 640 on a side). Decoding costs ~11 bytes per pixel (RGB + int64 ids).
MAX_PIXELS = 2**25

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"IEND\xaeB`\x82"  # chunk type + its (fixed) CRC
# PNG colour type -> (what it is, how to fix it)
_COLOUR_TYPES = {
    0: ("single-channel greyscale",
        "a single-channel id map is not COCO-panoptic (COCONut-XL's early upload had these, "
        "issues #43/#45: re-download the Sep 2025 re-upload); if its values really are segment "
        "ids, re-save them with write_id_png(ids)"),
    3: ("palette-indexed",
        "palette indices are not segment ids; re-export the map as RGB with write_id_png(ids)"),
    4: ("greyscale with alpha", "re-export the map as 3-channel RGB with write_id_png(ids)"),
    6: ("RGB with an alpha channel",
        "drop the alpha channel (Image.convert('RGB')) after checking it is constant, or "
        "re-export with write_id_png(ids)"),
}


def _pillow_mode(colour_type: int, bit_depth: int) -> str:
    """The mode Pillow reports for a PNG header, to name what was found in its terms."""
    if colour_type == 0:
        return {1: "1", 16: "I;16"}.get(bit_depth, "L")
    return {2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}.get(colour_type, f"colour type {colour_type}")


class PanopticPNGError(ValueError):
    """A panoptic PNG could not be read as an id map. ``source`` names the file."""

    def __init__(self, reason: str, *, source: str | None = None):
        self.reason, self.source = reason, source
        super().__init__(f"{source or '<bytes>'}: {reason}")


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 colours -> int64 ids ``R + 256*G + 256**2*B``."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_id: expected a (H, W, 3) uint8 array, found shape "
                         f"{rgb.shape} dtype {rgb.dtype}")
    ids = rgb[..., 2].astype(np.int64)  # one int64 map, built in place (not three)
    ids <<= 8
    ids |= rgb[..., 1]
    ids <<= 8
    ids |= rgb[..., 0]
    return ids


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Integer ids ``(...)`` in ``[0, 256**3)`` -> ``(..., 3)`` uint8 colours (inverse of
    :func:`rgb_to_id`)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"id_to_rgb: expected an integer id map, found dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > MAX_ID):
        raise ValueError(f"id_to_rgb: ids must lie in [0, {MAX_ID}] to fit three 8-bit "
                         f"channels, found [{int(ids.min())}, {int(ids.max())}]")
    ids = ids.astype(np.int64)
    return np.stack([ids & 255, (ids >> 8) & 255, ids >> 16], axis=-1).astype(np.uint8)


def _check_png_header(data: bytes, source: str | None) -> None:
    if not data.startswith(_PNG_SIGNATURE):
        kind = "JPEG" if data[:3] == b"\xff\xd8\xff" else "empty" if not data else "not a PNG"
        raise PanopticPNGError(f"expected a PNG (signature 89 50 4E 47), found {kind} data; "
                               f"panoptic id maps must be lossless RGB PNGs", source=source)
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise PanopticPNGError(f"truncated or corrupt PNG ({len(data)} bytes): no complete "
                               f"IHDR header; re-download the file", source=source)
    bit_depth, colour_type = data[24], data[25]
    if colour_type != 2:
        what, fix = _COLOUR_TYPES.get(colour_type, ("invalid PNG colour type", "re-export it "
                                                    "with write_id_png(ids)"))
        raise PanopticPNGError(f"panoptic PNG must be 3-channel RGB (ids = R + 256*G + "
                               f"65536*B), found mode {_pillow_mode(colour_type, bit_depth)!r} "
                               f"({bit_depth}-bit {what}); fix: {fix}", source=source)
    if bit_depth != 8:
        raise PanopticPNGError(f"panoptic PNG must have 8 bits per channel, found "
                               f"{bit_depth}-bit RGB; fix: re-export with write_id_png(ids)",
                               source=source)
    if data.rfind(_IEND) == -1:
        raise PanopticPNGError(f"truncated PNG ({len(data)} bytes): no IEND chunk at the end; "
                               f"re-download the file", source=source)


def png_size(data: bytes, *, source: str | None = None) -> tuple[int, int]:
    """``(height, width)`` from a PNG's IHDR header, without decoding anything.
    :class:`PanopticPNGError` if ``data`` is not a PNG with a complete header."""
    data = bytes(data[:33])
    if not data.startswith(_PNG_SIGNATURE):
        raise PanopticPNGError("expected a PNG (signature 89 50 4E 47)", source=source)
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise PanopticPNGError("truncated or corrupt PNG: no complete IHDR header; "
                               "re-download the file", source=source)
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _check_png_pixels(data: bytes, max_pixels: int | None, source: str | None) -> None:
    h, w = png_size(data, source=source)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if h * w > limit:
        raise PanopticPNGError(f"PNG header says {w}x{h} (WxH) = {w * h} pixels, more than "
                               f"max_pixels={limit} (panoptic.MAX_PIXELS): a corrupt header or not "
                               f"a panoptic map of a real image; re-download the file (or pass "
                               f"max_pixels= for a map this big)", source=source)


def read_id_png(data: bytes, *, source: str | None = None,
                max_pixels: int | None = None) -> np.ndarray:
    """Bytes of a COCO-panoptic PNG -> int64 ids ``(H, W)``.

    Refuses, with :class:`PanopticPNGError` naming ``source``, the mode found and the fix:
    anything not a PNG, any PNG that is not 8-bit 3-channel RGB, truncated or corrupt files, and
    (from the header, before decoding) one of more than ``max_pixels`` pixels (default
    :data:`MAX_PIXELS`)."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"read_id_png: expected the PNG file's bytes, found "
                        f"{type(data).__name__}; read the file first (source={source!r})")
    data = bytes(data)
    _check_png_header(data, source)
    _check_png_pixels(data, max_pixels, source)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            img.load()
            if img.mode != "RGB":  # the header check should make this unreachable
                raise PanopticPNGError(f"panoptic PNG must be 3-channel RGB, Pillow decoded "
                                       f"mode {img.mode!r}", source=source)
            rgb = np.asarray(img, dtype=np.uint8)
    except PanopticPNGError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error,
            MemoryError, Image.DecompressionBombError) as e:
        raise PanopticPNGError(f"truncated or corrupt PNG ({len(data)} bytes): "
                               f"{type(e).__name__}: {e}; re-download the file",
                               source=source) from e
    return rgb_to_id(rgb)


def write_id_png(ids: np.ndarray) -> bytes:
    """int ids ``(H, W)`` in ``[0, 256**3)`` -> bytes of an 8-bit RGB PNG
    (:func:`read_id_png` gives ``ids`` back)."""
    from PIL import Image

    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"write_id_png: expected a (H, W) id map, found shape {ids.shape}")
    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(ids)).save(buf, format="PNG")
    return buf.getvalue()


def _check_ids(ids: np.ndarray, fn: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{fn}: expected a (H, W) integer id map, found shape {ids.shape} "
                         f"dtype {ids.dtype}")
    return ids


def segment_areas(ids: np.ndarray, *, include_void: bool = False) -> dict[int, int]:
    """``{segment id: pixel count}`` in increasing id order; void (id 0) only with
    ``include_void`` (it has no ``segments_info`` entry)."""
    ids = _check_ids(ids, "segment_areas")
    u, n = np.unique(ids, return_counts=True)
    return {int(i): int(c) for i, c in zip(u, n) if include_void or i != 0}


def segment_bboxes(ids: np.ndarray, *, include_void: bool = False) -> dict[int, list[int]]:
    """``{segment id: [x, y, w, h]}`` (ints, inclusive extent: ``w = x_last - x_first + 1``),
    as the panopticapi-style converters compute ``bbox``; void only with ``include_void``."""
    ids = _check_ids(ids, "segment_bboxes")
    h, w = ids.shape
    if ids.size == 0:
        return {}
    u, inv = np.unique(ids, return_inverse=True)
    flat = inv.reshape(-1)  # pixel -> index into u, row-major
    rows = np.repeat(np.arange(h), w)
    cols = np.tile(np.arange(w), h)
    y0 = np.full(u.size, h, dtype=np.int64)
    y1 = np.full(u.size, -1, dtype=np.int64)
    x0 = np.full(u.size, w, dtype=np.int64)
    x1 = np.full(u.size, -1, dtype=np.int64)
    np.minimum.at(y0, flat, rows)
    np.maximum.at(y1, flat, rows)
    np.minimum.at(x0, flat, cols)
    np.maximum.at(x1, flat, cols)
    return {int(i): [int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1)]
            for k, i in enumerate(u) if include_void or i != 0}
