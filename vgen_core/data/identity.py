"""Sample identity: stable ``sample_id`` strings and ``content_digest`` hashes.

Sample ids
==========

``make_sample_id(dataset, key)`` returns ``"<dataset>/<key>"``, for example
``pancap/000000123456`` (a COCO image id zero-padded to 12 digits with ``width=12``) or
``vicas/990001``. The id depends only on the dataset name and the sample's own key, never on
how many workers read the data or in which order, so every stage and every re-run agrees on it.

* ``dataset`` matches ``[a-z0-9_-]+``.
* ``key`` is a non-negative int (zero-padded to ``width`` digits when ``width`` is given; a
  longer number is kept whole, never truncated) or a non-empty str without ``/``, whitespace or
  control characters. A str key made only of ASCII digits is padded like an int when ``width``
  is given; any other str key with ``width`` is an error.

Content digests
===============

``content_digest(*parts)`` is a 32-character lowercase hex string: BLAKE2b with
``digest_size=16`` and ``person=b"vgen-digest-v1"`` (no key, no salt) over the concatenation of
one *frame* per part, in order. ``Digest`` computes the same value incrementally
(``Digest().update(a).update(b).hexdigest() == content_digest(a, b)``).

A frame is::

    tag (1 ASCII byte) || length (8 bytes, unsigned big-endian) || payload (length bytes)

Every frame says where it ends, so the framing is injective: ``("ab", "c")`` and
``("a", "bc")`` give different digests, and so do ``("a",)`` and ``(b"a",)`` (different tags).
Tags and payloads:

==========================  ===  ===============================================================
part type                   tag  payload
==========================  ===  ===============================================================
``None``                    N    empty
``bool``                    T    one byte, ``0x01`` for True, ``0x00`` for False
``int``                     I    ASCII decimal of the value (``-`` sign, no leading zeros);
                                 any size
``float``                   F    8 bytes, IEEE-754 binary64 big-endian; every NaN is written as
                                 ``0x7ff8000000000000``; ``-0.0`` and ``0.0`` differ
``str``                     S    UTF-8 bytes (strict: lone surrogates are an error)
``bytes``, ``bytearray``,   B    the bytes as they are (a memoryview must be C-contiguous)
``memoryview``
``numpy.ndarray`` and       A    ``ndim`` (8 bytes BE) || each dimension (8 bytes BE each) ||
numpy scalars                    ``len(dtype)`` (8 bytes BE) || ``dtype`` (ASCII) || data, where
                                 ``dtype`` is numpy's ``dtype.str`` of the little-endian form
                                 (``"<f4"``, ``"|u1"``, ``"|b1"``, ``"<M8[ns]"``, ``"<U5"``) and
                                 data is the array's bytes in C order, little-endian.
                                 Object and structured (void) dtypes are refused.
``dict``, ``list``,         J    canonical JSON, UTF-8: ``json.dumps(obj, sort_keys=True,
``tuple``                        separators=(",", ":"), ensure_ascii=False, allow_nan=False)``.
                                 Dict keys must be str (an int key would silently collide with
                                 its string form, so it is refused). numpy scalars and arrays
                                 inside are written as their Python values / nested lists.
                                 Tuples are JSON arrays (a tuple and a list with the same items
                                 give the same digest).
==========================  ===  ===============================================================

Any other type raises ``TypeError``. A numpy scalar is framed as a 0-d array, so
``np.float32(1)``, ``np.float64(1)`` and ``1.0`` all differ; convert first if you want them to agree.

This encoding must never change: stored digests in every table depend on it. A change in
meaning means a new ``DIGEST_VERSION``, a new ``person`` string and a re-digest of the data.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import re
import struct
from typing import Any

import numpy as np

__all__ = [
    "DIGEST_VERSION",
    "DIGEST_PERSON",
    "DIGEST_SIZE",
    "Digest",
    "content_digest",
    "make_sample_id",
    "parse_sample_id",
    "canonical_json",
]

#: Version of the digest encoding documented above. Never reuse a number.
DIGEST_VERSION = 1
#: BLAKE2b personalisation string of version 1.
DIGEST_PERSON = b"vgen-digest-v1"
#: Digest size in bytes (hex string is twice as long).
DIGEST_SIZE = 16

_DATASET_RE = re.compile(r"^[a-z0-9_-]+$")
_LEN = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_CANONICAL_NAN = bytes.fromhex("7ff8000000000000")


# --------------------------------------------------------------------------------------------
# sample ids
# --------------------------------------------------------------------------------------------


def make_sample_id(dataset: str, key: str | int, *, width: int | None = None) -> str:
    """Stable id ``"<dataset>/<key>"`` of one sample.

    >>> make_sample_id("pancap", 123456, width=12)
    'pancap/000000123456'
    >>> make_sample_id("vicas", 990001)
    'vicas/990001'
    """
    if not isinstance(dataset, str) or not _DATASET_RE.match(dataset):
        raise ValueError(f"dataset name must match [a-z0-9_-]+, got {dataset!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int, got {width!r}")
    if isinstance(key, bool):
        raise TypeError(f"sample key must be an int or str, not bool ({key!r})")
    if isinstance(key, str):
        if not key:
            raise ValueError("sample key must not be empty")
        bad = [c for c in key if c == "/" or c.isspace() or not c.isprintable()]
        if bad:
            raise ValueError(
                f"sample key {key!r} must not contain '/', whitespace or control characters "
                f"(found {''.join(sorted(set(bad)))!r})"
            )
        if width is not None:
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"width= only applies to numeric keys, got {key!r}")
            return f"{dataset}/{key.zfill(width)}"
        return f"{dataset}/{key}"
    try:
        value = operator.index(key)  # int and numpy integers
    except TypeError:
        raise TypeError(f"sample key must be an int or str, got {type(key).__name__}") from None
    if value < 0:
        raise ValueError(f"numeric sample key must be >= 0, got {value}")
    text = str(value)
    if width is not None:
        text = text.zfill(width)
    return f"{dataset}/{text}"


def parse_sample_id(sample_id: str) -> tuple[str, str]:
    """Split ``"<dataset>/<key>"`` into ``(dataset, key)``; validates both halves."""
    if not isinstance(sample_id, str) or sample_id.count("/") != 1:
        raise ValueError(f"not a sample id (expected '<dataset>/<key>'): {sample_id!r}")
    dataset, key = sample_id.split("/")
    if make_sample_id(dataset, key) != sample_id:  # validates
        raise ValueError(f"not a sample id: {sample_id!r}")
    return dataset, key


# --------------------------------------------------------------------------------------------
# digests
# --------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot encode {type(obj).__name__} in canonical JSON")


def _check_keys(obj: Any) -> None:
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for k, v in cur.items():
                if not isinstance(k, str):
                    raise TypeError(
                        f"canonical JSON needs str dict keys, got {type(k).__name__} key {k!r}"
                    )
                if isinstance(v, (dict, list, tuple)):
                    stack.append(v)
        elif isinstance(cur, (list, tuple)):
            stack.extend(v for v in cur if isinstance(v, (dict, list, tuple)))


def canonical_json(obj: Any) -> str:
    """The canonical JSON text used for dict/list parts (sorted keys, no whitespace)."""
    _check_keys(obj)
    return json.dumps(
        obj,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    )


def _array_frame(arr: np.ndarray) -> tuple[bytes, memoryview | bytes]:
    """(header, data) of the payload of an ``A`` frame."""
    if arr.dtype.hasobject:
        raise TypeError("cannot digest a numpy array of dtype object")
    if arr.dtype.kind == "V":
        raise TypeError(f"cannot digest a structured/void numpy array (dtype {arr.dtype})")
    # little-endian, C order; astype keeps 0-d arrays 0-d (ascontiguousarray would not)
    a = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
    dtype_str = a.dtype.str.encode("ascii")
    header = _LEN.pack(a.ndim) + b"".join(_LEN.pack(d) for d in a.shape)
    header += _LEN.pack(len(dtype_str)) + dtype_str
    data = a.reshape(-1).view(np.uint8).data if a.size else b""
    return header, data


class Digest:
    """Streaming form of :func:`content_digest`: ``update(part)`` once per part.

    >>> Digest().update("a").update(1).hexdigest() == content_digest("a", 1)
    True
    """

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=DIGEST_PERSON)

    def _frame(self, tag: bytes, *chunks: bytes | memoryview) -> None:
        n = sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)
        self._h.update(tag + _LEN.pack(n))
        for c in chunks:
            self._h.update(c)

    def update(self, part: Any) -> Digest:
        """Add one part (see the module docs for the encoding of each type). Returns self."""
        if part is None:
            self._frame(b"N")
        elif isinstance(part, bool):
            self._frame(b"T", b"\x01" if part else b"\x00")
        elif isinstance(part, int):
            self._frame(b"I", str(int(part)).encode("ascii"))
        elif isinstance(part, float):
            self._frame(b"F", _CANONICAL_NAN if math.isnan(part) else _F64.pack(part))
        elif isinstance(part, str):
            self._frame(b"S", part.encode("utf-8"))
        elif isinstance(part, (bytes, bytearray)):
            self._frame(b"B", bytes(part) if isinstance(part, bytearray) else part)
        elif isinstance(part, memoryview):
            if not part.c_contiguous:
                raise ValueError("cannot digest a non-contiguous memoryview; copy it first")
            self._frame(b"B", part.cast("B") if part.format != "B" or part.ndim != 1 else part)
        elif isinstance(part, (np.ndarray, np.generic)):
            header, data = _array_frame(np.asarray(part))
            self._frame(b"A", header, data)
        elif isinstance(part, (dict, list, tuple)):
            self._frame(b"J", canonical_json(part).encode("utf-8"))
        else:
            raise TypeError(
                f"cannot digest a part of type {type(part).__name__}; use bytes, str, int, "
                "float, None, a numpy array, or a dict/list"
            )
        return self

    def update_many(self, *parts: Any) -> Digest:
        """``update`` each part in order. Returns self."""
        for p in parts:
            self.update(p)
        return self

    def copy(self) -> Digest:
        d = Digest.__new__(Digest)
        d._h = self._h.copy()
        return d

    def digest(self) -> bytes:
        return self._h.digest()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def content_digest(*parts: Any) -> str:
    """BLAKE2b-128 hex digest of ``parts`` under the framing of :data:`DIGEST_VERSION`."""
    return Digest().update_many(*parts).hexdigest()
