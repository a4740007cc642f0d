"""COCO run-length encoding (RLE) of binary masks, bit-compatible with pycocotools' ``maskApi.c``.

An RLE is ``{"size": [H, W], "counts": ...}``. The mask is flattened in **column-major**
(Fortran) order and cut into runs that alternate 0, 1, 0, ... starting with a run of zeros
(of length 0 when the first pixel is 1). ``counts`` is either that list of run lengths
(uncompressed form) or the compressed string that ``rleToString`` writes:

1. from the 4th run on (index ``i > 2``), write ``x = counts[i] - counts[i - 2]`` (else ``x``
   is the run length itself);
2. write ``x`` in 5-bit groups, low first: ``c = x & 31; x >>= 5`` (arithmetic shift); another
   group follows while ``x != -1`` (if bit ``0x10`` of ``c`` is set) or ``x != 0`` (if not);
   every group but the last gets bit ``0x20``; emit ``chr(c + 48)``.

Stricter than pycocotools, on purpose (``../shared/datasets.md`` B.4): :func:`validate` refuses
counts that sum to less than ``H*W`` (pycocotools pads with zeros), negative runs (pycocotools
wraps them to huge ``uint``), malformed strings (characters outside ``'0'..'o'``, a final group
with its continuation bit set) and, in :func:`iou` / :func:`merge`, RLEs of different sizes
(pycocotools returns -1 / an empty 0x0 mask). Every failure raises :class:`RLEError`, which
names the field and says what was expected and what was found.

Resource limits (damaged or hostile files must fail fast, not allocate gigabytes):
:func:`validate`, :func:`area`, :func:`to_bbox`, :func:`iou` and :func:`merge` work on the run
lengths and never allocate anything of size ``H*W``; only :func:`decode` builds the dense mask,
and it refuses masks of more than ``max_pixels`` (default :data:`MAX_DECODE_PIXELS`) pixels.
``H*W`` must stay below ``2**63`` and run lengths (and their running sums) must fit 64 bits.

Everything is vectorised with numpy (string coding included); nothing here loops per pixel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MAX_DECODE_PIXELS",
    "RLEError",
    "encode",
    "decode",
    "counts_from_string",
    "counts_to_string",
    "validate",
    "area",
    "to_bbox",
    "iou",
    "merge",
]

_MAX_GROUPS = 12  # 5-bit groups per value: 12 * 5 = 60 bits, well inside int64
_INT64_MAX = 2**63 - 1
#: :func:`decode` refuses larger masks (2**27 pixels = 128 MiB of uint8, e.g. 16384 x 8192;
#: an 8K video frame is 7680 x 4320 = 33 M). Pass ``max_pixels`` to go beyond.
MAX_DECODE_PIXELS = 2**27


class RLEError(ValueError):
    """An RLE is malformed or does not fit its mask. ``field`` is ``"size"``, ``"counts"`` or
    ``"mask"``; ``source`` (optional) says where the RLE came from."""

    def __init__(self, field: str, reason: str, *, source: str | None = None):
        self.field, self.reason, self.source = field, reason, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}RLE {field}: {reason}")


# ---------------------------------------------------------------------------------------------
# string <-> run lengths
# ---------------------------------------------------------------------------------------------


def counts_to_string(counts: Sequence[int] | np.ndarray) -> str:
    """Run lengths -> compressed COCO string, exactly as ``rleToString``."""
    cnts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if cnts.size == 0:
        return ""
    x = cnts.copy()
    if x.size > 3:
        x[3:] -= cnts[1:-2]
    # groups_NK[n, k]: the k-th 5-bit group of value n; ngroups[n]: how many groups it needs.
    # A value of bit length b (plus a sign bit) needs ceil((b + 1) / 5) groups; one spare column
    # lets the overflow check below see a value that would need more than _MAX_GROUPS.
    bits = int(max(int(x.max()), -int(x.min()) - 1)).bit_length() + 1
    n_k = min(_MAX_GROUPS, -(-bits // 5) + 1)
    shifts_K = 5 * np.arange(n_k, dtype=np.int64)
    groups_NK = (x[:, None] >> shifts_K) & 31
    rest_NK = x[:, None] >> (shifts_K + 5)
    more_NK = np.where(groups_NK & 16, rest_NK != -1, rest_NK != 0)
    if n_k == _MAX_GROUPS and more_NK[:, -1].any():
        raise RLEError("counts", f"a run length needs more than {_MAX_GROUPS} 5-bit groups "
                                 f"(|value| >= 2**{5 * _MAX_GROUPS - 1})")
    ngroups = np.argmin(more_NK, axis=1) + 1  # first group with no successor
    k_K = np.arange(n_k)
    keep_NK = k_K < ngroups[:, None]
    chars_NK = groups_NK | np.where(k_K < (ngroups[:, None] - 1), 32, 0)
    return (chars_NK[keep_NK] + 48).astype(np.uint8).tobytes().decode("ascii")


def counts_from_string(s: str | bytes, *, source: str | None = None) -> list[int]:
    """Compressed COCO string -> run lengths, exactly as ``rleFrString`` (without its ``uint``
    wrap-around: a negative run stays negative here and :func:`validate` refuses it).

    Raises :class:`RLEError` (field ``counts``) for characters outside ``'0'`` (48) .. ``'o'``
    (111), for a string that ends inside a value (last group has the continuation bit), and for
    a value longer than 12 groups."""
    return _counts_from_string(s, source).tolist()


def _counts_from_string(s: Any, source: str | None) -> np.ndarray:
    if isinstance(s, str):
        try:
            raw = s.encode("ascii")
        except UnicodeEncodeError as e:
            raise RLEError("counts", f"expected ASCII characters '0'..'o', found non-ASCII "
                                     f"{s[e.start]!r} at position {e.start}",
                           source=source) from None
    elif isinstance(s, (bytes, bytearray, memoryview)):
        raw = bytes(s)
    else:
        raise RLEError("counts", f"expected str or bytes, found {type(s).__name__}",
                       source=source)
    if not raw:
        return np.zeros(0, dtype=np.int64)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    bad = np.flatnonzero((c < 0) | (c > 63))
    if bad.size:
        i = int(bad[0])
        raise RLEError("counts", f"expected characters '0'..'o' (ASCII 48..111), found "
                                 f"{chr(raw[i])!r} (ASCII {raw[i]}) at position {i}",
                       source=source)
    last = (c & 32) == 0  # a group without the continuation bit ends its value
    if not last[-1]:
        raise RLEError("counts", f"string ends inside a value: its last character "
                                 f"{chr(raw[-1])!r} has the continuation bit 0x20 set "
                                 f"(truncated string?)", source=source)
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_GROUPS:
        i = int(np.argmax(lengths > _MAX_GROUPS))
        raise RLEError("counts", f"value {i} spans {int(lengths[i])} characters; expected at "
                                 f"most {_MAX_GROUPS}", source=source)
    k = np.arange(c.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 31) << (5 * k), starts)
    neg = (c[ends] & 16) != 0  # sign-extend from the last group
    x[neg] |= -1 << (5 * lengths[neg])
    # undo the delta: counts[i] = x[i] + counts[i - 2] for i > 2, i.e. a cumsum along each parity.
    # Each |x| < 2**60, so the running sums can only leave int64 when the |x| add up past it;
    # then redo them exactly and refuse the string (numpy would wrap around silently).
    if float(np.abs(x).sum(dtype=np.float64)) >= 2.0**62:
        _check_running_sums(x.tolist(), source)
    cnts = x.copy()
    cnts[3::2] = np.cumsum(x[1::2])[1:]
    if cnts.size > 4:
        cnts[4::2] = x[2] + np.cumsum(x[4::2])
    return cnts


def _check_running_sums(x: list[int], source: str | None) -> None:
    """Exact (Python int) delta decoding of ``x``; RLEError if a run length leaves int64."""
    cnts = list(x)
    for i in range(3, len(cnts)):
        cnts[i] += cnts[i - 2]
        if not -_INT64_MAX - 1 <= cnts[i] <= _INT64_MAX:
            raise RLEError("counts", f"run {i} decodes to {cnts[i]}, which does not fit in 64 "
                                     f"bits (a corrupt or hostile counts string); re-encode "
                                     f"the mask", source=source)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _size(rle: Any, source: str | None) -> tuple[int, int]:
    if not isinstance(rle, Mapping):
        raise RLEError("size", f"expected a dict {{'size': [H, W], 'counts': ...}}, found "
                               f"{type(rle).__name__}", source=source)
    if "size" not in rle:
        raise RLEError("size", f"missing key 'size'; found keys {sorted(map(str, rle))}",
                       source=source)
    size = rle["size"]
    if (isinstance(size, (str, bytes)) or not isinstance(size, (Sequence, np.ndarray))
            or len(size) != 2 or not all(_is_int(v) for v in size)):
        raise RLEError("size", f"expected two ints [H, W], found {size!r}", source=source)
    h, w = int(size[0]), int(size[1])
    if h < 0 or w < 0:
        raise RLEError("size", f"expected non-negative [H, W], found [{h}, {w}]", source=source)
    if h * w > _INT64_MAX:
        raise RLEError("size", f"H*W = {h}*{w} = {h * w} pixels does not fit in 64 bits; "
                               f"expected the [height, width] of a real image", source=source)
    return h, w


def _counts(rle: Mapping, source: str | None) -> np.ndarray:
    if "counts" not in rle:
        raise RLEError("counts", f"missing key 'counts'; found keys {sorted(map(str, rle))}",
                       source=source)
    counts = rle["counts"]
    if isinstance(counts, (str, bytes, bytearray, memoryview)):
        return _counts_from_string(counts, source)
    if isinstance(counts, np.ndarray):
        if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
            raise RLEError("counts", f"expected a 1-D integer array, found shape "
                                     f"{counts.shape} dtype {counts.dtype}", source=source)
        return counts.astype(np.int64)
    if isinstance(counts, Sequence):
        bad = [i for i, v in enumerate(counts) if not _is_int(v)]
        if bad:
            raise RLEError("counts", f"expected a list of ints, found {counts[bad[0]]!r} "
                                     f"({type(counts[bad[0]]).__name__}) at index {bad[0]}",
                           source=source)
        try:
            return np.array([int(v) for v in counts], dtype=np.int64)
        except OverflowError:
            raise RLEError("counts", "a run length does not fit in 64 bits",
                           source=source) from None
    raise RLEError("counts", f"expected a str, bytes or list of ints, found "
                             f"{type(counts).__name__}", source=source)


def validate(rle: Mapping, expected_size: Sequence[int] | None = None, *,
             source: str | None = None) -> list[int]:
    """Check an RLE and return its run lengths.

    Checks: ``size`` is two non-negative ints; ``counts`` is a well-formed string/bytes or a
    list of ints; every run length is ``>= 0``; ``sum(counts) == H*W`` (short and long both
    refused); ``size == expected_size`` when given. ``source`` prefixes error messages."""
    return _validate(rle, expected_size, source)[2].tolist()


def _validate(rle: Mapping, expected_size: Sequence[int] | None,
              source: str | None) -> tuple[int, int, np.ndarray]:
    h, w = _size(rle, source)
    if expected_size is not None and [h, w] != [int(v) for v in expected_size]:
        raise RLEError("size", f"expected [H, W] = {[int(v) for v in expected_size]}, "
                               f"found [{h}, {w}]", source=source)
    arr = _counts(rle, source)
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        i = int(neg[0])
        raise RLEError("counts", f"run lengths must be >= 0, found {int(arr[i])} at index {i}",
                       source=source)
    if arr.size and int(arr.max()) > h * w:  # checked first so that the sum stays in int64
        i = int(np.argmax(arr))
        raise RLEError("counts", f"run {i} has length {int(arr[i])}, more than the whole mask "
                                 f"(H*W = {h}*{w} = {h * w}); re-encode the mask",
                       source=source)
    # each run is <= H*W < 2**63, so int64 can only overflow when H*W * len(counts) is large
    total = int(arr.sum()) if h * w * arr.size <= _INT64_MAX else sum(arr.tolist())
    if total != h * w:
        what = "short" if total < h * w else "long"
        raise RLEError("counts", f"run lengths sum to {total}, expected H*W = {h}*{w} = "
                                 f"{h * w} ({what} by {abs(h * w - total)} pixels); re-encode "
                                 f"the mask", source=source)
    return h, w, arr


# ---------------------------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------------------------


def _mask_runs(mask: np.ndarray) -> np.ndarray:
    if mask.ndim != 2:
        raise RLEError("mask", f"expected a 2-D (H, W) mask, found shape {mask.shape}")
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
        raise RLEError("mask", f"expected a bool or integer mask, found dtype {mask.dtype}")
    flat = mask.ravel(order="F") != 0
    if flat.size == 0:
        return np.zeros(1, dtype=np.int64)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], edges, [flat.size]))
    runs = np.diff(bounds)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs


def encode(mask: np.ndarray) -> dict:
    """Binary mask ``(H, W)`` (bool or integer; any nonzero pixel is foreground) ->
    ``{"size": [H, W], "counts": str}``, identical to ``pycocotools.mask.encode`` (whose counts
    are the same characters as ``bytes``)."""
    mask = np.asarray(mask)
    runs = _mask_runs(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(runs)}


def _decode_counts(counts: np.ndarray, h: int, w: int) -> np.ndarray:
    values = (np.arange(counts.size) & 1).astype(np.uint8)
    return np.repeat(values, counts).reshape((h, w), order="F")


def _check_decode_size(h: int, w: int, max_pixels: int | None, source: str | None) -> None:
    limit = MAX_DECODE_PIXELS if max_pixels is None else max_pixels
    if h * w > limit:
        raise RLEError("size", f"refusing to decode a {h}x{w} mask: H*W = {h}*{w} = {h * w} "
                               f"pixels is more than max_pixels={limit} (MAX_DECODE_PIXELS); "
                               f"a corrupt size, or pass max_pixels= to decode a mask this big "
                               f"(area/to_bbox/iou/merge need no decoding)", source=source)


def decode(rle: Mapping, *, expected_size: Sequence[int] | None = None,
           source: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """RLE (counts as str, bytes or list of ints) -> ``uint8`` mask ``(H, W)`` of 0/1, after
    :func:`validate`. Like pycocotools, the array is Fortran-ordered. Masks of more than
    ``max_pixels`` (default :data:`MAX_DECODE_PIXELS`) pixels are refused with
    :class:`RLEError` (field ``size``) before anything is allocated."""
    h, w, counts = _validate(rle, expected_size, source)
    _check_decode_size(h, w, max_pixels, source)
    return _decode_counts(counts, h, w)


# ---------------------------------------------------------------------------------------------
# measures
# ---------------------------------------------------------------------------------------------


def area(rle: Mapping, *, source: str | None = None) -> int:
    """Number of foreground pixels (sum of the odd-indexed runs), as ``rleArea``."""
    return int(_validate(rle, None, source)[2][1::2].sum())


def _fg_intervals(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-open ``[start, end)`` flat (column-major) intervals of the non-empty 1-runs."""
    bounds = np.concatenate(([0], np.cumsum(counts)))
    starts, ends = bounds[1:-1:2], bounds[2::2]
    keep = ends > starts
    return starts[keep], ends[keep]


def to_bbox(rle: Mapping, *, source: str | None = None) -> list[float]:
    """``[x, y, w, h]`` (floats) of the foreground, ``[0, 0, 0, 0]`` when empty, as
    ``rleToBbox``: a run that crosses a column boundary widens the box to all rows.

    Equal to ``rleToBbox`` on every RLE whose inner runs are non-empty (all that :func:`encode`
    produces); ``rleToBbox`` mis-handles empty 1-runs, this function skips them."""
    h, _, counts = _validate(rle, None, source)
    starts, ends = _fg_intervals(counts)
    if starts.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    last = ends - 1
    xs, xe = starts // h, last // h
    ys, ye = starts % h, last % h
    spans = xs < xe  # the run wraps into the next column, so it touches every row
    y0 = 0 if spans.any() else int(ys.min())
    y1 = h - 1 if spans.any() else int(ye.max())
    x0, x1 = int(xs.min()), int(xe.max())
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def _intersection(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """Pixels in both interval sets (each sorted and disjoint)."""
    (sa, ea), (sb, eb) = a, b
    if sa.size == 0 or sb.size == 0:
        return 0
    # For every a-interval, the b-intervals that overlap it are a contiguous index range.
    lo = np.searchsorted(eb, sa, side="right")  # first b ending after a starts
    hi = np.searchsorted(sb, ea, side="left")  # first b starting at/after a ends
    n = np.maximum(hi - lo, 0)
    if n.sum() == 0:
        return 0
    ia = np.repeat(np.arange(sa.size), n)
    ib = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
    return int((np.minimum(ea[ia], eb[ib]) - np.maximum(sa[ia], sb[ib])).sum())


def iou(dt: Sequence[Mapping], gt: Sequence[Mapping],
        iscrowd: Sequence[bool] | None = None) -> np.ndarray:
    """IoU matrix ``(len(dt), len(gt))`` (float64), as ``rleIou``: ``|d & g| / |d | g|``, or
    ``|d & g| / |d|`` when ``iscrowd[g]``; 0 where the intersection is empty.

    All RLEs must have the same size (pycocotools returns -1 for a mismatch; this raises
    :class:`RLEError`). ``iscrowd`` defaults to all False."""
    if iscrowd is None:
        iscrowd = [False] * len(gt)
    if len(iscrowd) != len(gt):
        raise RLEError("iscrowd", f"expected one flag per gt ({len(gt)}), found "
                                  f"{len(iscrowd)}")
    out = np.zeros((len(dt), len(gt)), dtype=np.float64)
    if not len(dt) or not len(gt):
        return out
    size = None
    parsed = []
    for role, rles in (("dt", dt), ("gt", gt)):
        runs = []
        for j, r in enumerate(rles):
            src = f"{role}[{j}]"
            h, w, counts = _validate(r, size, src)
            size = size if size is not None else (h, w)
            runs.append((_fg_intervals(counts), int(counts[1::2].sum())))
        parsed.append(runs)
    for d, (dint, darea) in enumerate(parsed[0]):
        for g, (gint, garea) in enumerate(parsed[1]):
            inter = _intersection(dint, gint)
            if inter:
                union = darea if iscrowd[g] else darea + garea - inter
                out[d, g] = inter / union
    return out


def _union(intervals: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Union of interval sets, as sorted disjoint non-adjacent half-open intervals."""
    starts = np.concatenate([s for s, _ in intervals])
    ends = np.concatenate([e for _, e in intervals])
    if starts.size == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)  # furthest end so far
    new = np.concatenate(([True], starts[1:] > reach[:-1]))  # a gap before this interval
    first = np.flatnonzero(new)
    last = np.concatenate((first[1:] - 1, [starts.size - 1]))
    return starts[first], reach[last]


def _intersect(a: tuple[np.ndarray, np.ndarray],
               b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Intersection of two sorted disjoint interval sets (sorted, disjoint; may touch)."""
    (sa, ea), (sb, eb) = a, b
    if sa.size == 0 or sb.size == 0:
        return sa[:0], ea[:0]
    lo = np.searchsorted(eb, sa, side="right")
    hi = np.searchsorted(sb, ea, side="left")
    n = np.maximum(hi - lo, 0)
    ia = np.repeat(np.arange(sa.size), n)
    ib = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
    s, e = np.maximum(sa[ia], sb[ib]), np.minimum(ea[ia], eb[ib])
    keep = e > s
    return s[keep], e[keep]


def _runs_of_intervals(starts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Canonical run lengths (as :func:`encode` writes them) of a mask of ``n`` pixels whose
    foreground is the sorted disjoint non-adjacent intervals ``[starts, ends)``."""
    bounds = np.concatenate(([0], np.column_stack((starts, ends)).reshape(-1), [n]))
    runs = np.diff(bounds)
    if runs.size > 1 and runs[-1] == 0:  # the foreground reaches the last pixel
        runs = runs[:-1]
    return runs


def merge(rles: Sequence[Mapping], intersect: bool = False) -> dict:
    """Union (or intersection with ``intersect=True``) of same-size RLEs, as ``rleMerge``.

    One RLE comes back with its own run lengths (re-written as a string); two or more give the
    canonical encoding of the merged mask, computed on the runs (no mask of size ``H*W`` is
    built, so giant sizes cost nothing). Raises :class:`RLEError` for no RLEs or mixed sizes."""
    if len(rles) == 0:
        raise RLEError("size", "merge needs at least one RLE, found none")
    size = list(_size(rles[0], "rles[0]"))
    if len(rles) == 1:
        return {"size": size, "counts": counts_to_string(_validate(rles[0], None, "rles[0]")[2])}
    sets = [_fg_intervals(_validate(r, size, f"rles[{j}]")[2]) for j, r in enumerate(rles)]
    if intersect:
        acc = sets[0]
        for other in sets[1:]:
            acc = _intersect(acc, other)
        acc = _union([acc])  # coalesce touching pieces
    else:
        acc = _union(sets)
    return {"size": size, "counts": counts_to_string(_runs_of_intervals(*acc, size[0] * size[1]))}
