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

Escaped keys
------------

A key made from an arbitrary name (a file's path relative to its dataset root, say) goes
through ``escape_key(text)`` first: ``%``, ``/``, whitespace and every non-printable character
(control, format, unassigned, lone surrogates) are replaced by the percent-encoding of their
UTF-8 bytes (``%XX``, uppercase hex; lone surrogates as ``surrogatepass`` bytes, so file names
that are not valid UTF-8 survive too); everything else, printable non-ASCII included, is kept.
So ``escape_key("a/my photo 100%.png") == "a%2Fmy%20photo%20100%25.png"``.
``unescape_key`` is its exact inverse. ``escape_key`` is injective (``%`` itself is always
escaped, so decoding is unambiguous), its output is always a valid str key for
``make_sample_id``, and a name that needs no escaping is its own key. Only the empty string
is refused (there is no empty key). ``unescape_key`` accepts only the canonical form
(``escape_key(unescape_key(k)) == k``): ``%2f`` or ``%41`` are errors, so one text never has
two keys. "Printable" is Python's ``str.isprintable`` (as in ``make_sample_id``), so it follows
the interpreter's Unicode database: a character that a later Unicode version assigns (a new
emoji) is escaped under an older Python and kept under a newer one. Everything else is fixed.

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
``np.float32(1)``, ``np.float64(1)`` and ``1.0`` all differ; convert first if you want them to
agree.

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
    "escape_key",
    "unescape_key",
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


def _needs_escape(c: str) -> bool:
    return c == "%" or c == "/" or c.isspace() or not c.isprintable()


def escape_key(text: str) -> str:
    """Reversible escape of any non-empty ``text`` into a valid sample key (see the module docs).

    >>> escape_key("cats/my photo.png")
    'cats%2Fmy%20photo.png'
    >>> escape_key("100%.png")
    '100%25.png'
    >>> escape_key("été.jpg")
    'été.jpg'
    """
    if not isinstance(text, str):
        raise TypeError(f"escape_key needs a str, got {type(text).__name__}")
    if not text:
        raise ValueError("cannot escape the empty string: a sample key must not be empty")
    # fast path: only " " is both whitespace and printable
    if text.isprintable() and "%" not in text and "/" not in text and " " not in text:
        return text
    return "".join(
        "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")) if _needs_escape(c)
        else c
        for c in text
    )


_ESCAPE_RUN = re.compile(r"(?:%[0-9A-F]{2})+")


def unescape_key(key: str) -> str:
    """Inverse of :func:`escape_key`: ``unescape_key(escape_key(t)) == t`` for every ``t``.

    Raises ``ValueError`` for a string ``escape_key`` never returns (a bare ``%``, lowercase or
    unneeded escapes, bytes that are not UTF-8, an unescaped character that needs escaping).

    >>> unescape_key("cats%2Fmy%20photo.png")
    'cats/my photo.png'
    """
    if not isinstance(key, str):
        raise TypeError(f"unescape_key needs a str, got {type(key).__name__}")
    if not key:
        raise ValueError("not an escaped key: the empty string")

    def decode(m: re.Match[str]) -> str:
        try:
            return bytes.fromhex(m.group(0).replace("%", "")).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise ValueError(f"not an escaped key (bad UTF-8 escape {m.group(0)!r}): "
                             f"{key!r}") from None

    text = _ESCAPE_RUN.sub(decode, key)
    canonical = escape_key(text)  # text is not empty: key was not
    if canonical != key:
        raise ValueError(f"not an escaped key (escape_key would give {canonical!r}): {key!r}")
    return text


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
