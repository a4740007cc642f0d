"""dHash near-duplicate detection on real photographs."""

import io

import numpy as np
from PIL import Image

from vgen_core.data.phash import dhash, hamming, near_duplicates
from vgen_core.data.sample_images import load_photo


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_known_hash_of_a_gradient():
    # brightness falls left to right: every left > right comparison is true -> all 64 bits set
    ramp = np.tile(np.linspace(255, 0, 90).astype(np.uint8), (80, 1))
    assert dhash(ramp) == -1  # 0xFFFF_FFFF_FFFF_FFFF as signed int64
    assert dhash(ramp[:, ::-1]) == 0


def test_near_duplicates_found_distinct_photos_not():
    a = load_photo("astronaut")
    b = jpeg_roundtrip(a, 40)
    c = np.asarray(Image.fromarray(a).resize((256, 256)))
    d = load_photo("coffee")
    hashes = [dhash(x) for x in (a, b, c, d)]
    assert hamming(hashes[0], hashes[1]) <= 6 and hamming(hashes[0], hashes[2]) <= 6
    assert hamming(hashes[0], hashes[3]) > 12
    pairs = near_duplicates(["a", "b", "c", "d"], hashes, max_distance=6)
    assert {(p[0], p[1]) for p in pairs} == {("a", "b"), ("a", "c"), ("b", "c")}
