"""The photographs scikit-image ships, as a tiny image dataset for tests and the demo.

``skimage://`` names this source in a DAG. :func:`export_photos` writes them as PNG files so a
folder of "real" images can be used (and edited) like a user's own download.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: Photographs (and a few scans) that load offline from skimage.data, in a fixed order.
PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon",
    "page", "retina", "rocket", "text",
)


def load_photo(name: str) -> np.ndarray:
    """One photograph as RGB uint8 (H, W, 3)."""
    import skimage.data

    if name not in PHOTOS:
        raise KeyError(f"unknown skimage photo {name!r}; known: {', '.join(PHOTOS)}")
    return to_rgb(getattr(skimage.data, name)())


def to_rgb(a: np.ndarray) -> np.ndarray:
    """Gray, RGB or RGBA (any int/bool dtype) -> RGB uint8."""
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected (H, W), (H, W, 3) or (H, W, 4) pixels, got {a.shape}")
    return np.ascontiguousarray(a[:, :, :3])


def export_photos(directory: str | Path, names: tuple[str, ...] = PHOTOS) -> list[Path]:
    """Write the photographs as ``<directory>/<name>.png``; returns the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in names:
        p = out / f"{n}.png"
        Image.fromarray(load_photo(n)).save(p)
        paths.append(p)
    return paths


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return to_rgb(np.asarray(im.convert("RGB")))
