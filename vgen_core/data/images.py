"""Images as stages and training read them: decode bytes, resize + center-crop, pick columns.

Shared by the tokenize / cache stages (encoding), the train stage (tokenizer batches) and the
evaluate stages (reference statistics, reconstructions), so every one of them sees the same
pixels for the same sample.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

__all__ = ["IMAGE_COLUMNS", "CAPTION_COLUMNS", "decode_image", "preprocess", "pick_column"]

#: columns holding encoded image bytes: ingest.images' PNG, curate.pancap's original JPEG
IMAGE_COLUMNS = ("image_png", "image")
#: columns holding a caption: side tables' ``caption``, curate.pancap's ``caption_text``
CAPTION_COLUMNS = ("caption", "caption_text")


def pick_column(names: Sequence[str], options: Sequence[str]) -> str | None:
    """The first of ``options`` present in ``names`` (None when none is)."""
    return next((c for c in options if c in names), None)


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/... bytes -> RGB uint8 (H, W, 3). Raises ValueError saying what was found."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        head = bytes(data[:8]) if data else b""
        why = ("no image format recognises these bytes" if isinstance(e, UnidentifiedImageError)
               else str(e))  # PIL's own message names an in-memory object's address
        raise ValueError(
            f"cannot decode image ({len(data or b'')} bytes, starts {head!r}): {why}") from e


def preprocess(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (bicubic) and center-crop to a square."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if (h, w) != (resolution, resolution):
        s = resolution / min(h, w)
        im = Image.fromarray(rgb).resize((max(resolution, round(w * s)),
                                          max(resolution, round(h * s))),
                                         Image.Resampling.BICUBIC)
        rgb = np.asarray(im)
        h, w = rgb.shape[:2]
        y0, x0 = (h - resolution) // 2, (w - resolution) // 2
        rgb = rgb[y0:y0 + resolution, x0:x0 + resolution]
    return rgb
