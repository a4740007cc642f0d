"""Perceptual hashes for near-duplicate detection.

``dhash`` is the 64-bit difference hash: grayscale, resize to 9×8 (box filter), one bit per
horizontally adjacent pair (left > right), row-major, bit 0 = first pair. Two images whose hashes
differ in at most ``max_distance`` bits (default 6 of 64) are reported as near-duplicates.
:func:`near_duplicates` compares all pairs in blocks with numpy (fine up to ~10^5 images; beyond
that, bucket by hash bands first).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["dhash", "hamming", "near_duplicates"]

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def dhash(rgb: np.ndarray) -> int:
    """64-bit difference hash of an image (H, W[, C]) uint8, as a signed int64-compatible int."""
    im = Image.fromarray(np.asarray(rgb)).convert("L").resize((9, 8), Image.Resampling.BOX)
    px = np.asarray(im, dtype=np.int16)
    bits = (px[:, :-1] > px[:, 1:]).reshape(-1)
    value = int(np.sum(bits.astype(np.uint64) << np.arange(64, dtype=np.uint64)))
    return value - (1 << 64) if value >= (1 << 63) else value


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & ((1 << 64) - 1)).count("1")


def near_duplicates(ids: list[str], hashes: list[int], max_distance: int = 6,
                    block: int = 2048) -> list[tuple[str, str, int]]:
    """All pairs (id_a, id_b, distance) with distance <= max_distance, id_a < id_b by position."""
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    hb = h.view(np.uint8).reshape(-1, 8)
    out: list[tuple[str, str, int]] = []
    for i0 in range(0, len(h), block):
        a = hb[i0:i0 + block]
        for j0 in range(i0, len(h), block):
            b = hb[j0:j0 + block]
            d = _POPCOUNT8[a[:, None, :] ^ b[None, :, :]].sum(axis=2)
            ii, jj = np.nonzero(d <= max_distance)
            for i, j in zip(ii, jj):
                gi, gj = i0 + i, j0 + j
                if gi < gj:
                    out.append((ids[gi], ids[gj], int(d[i, j])))
    return out
