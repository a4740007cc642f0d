"""Mutation strategies shared by the fuzz tests (``test_fuzz_*.py``): byte-level damage to a
file, text damage to a caption, and structural damage to a JSON document (wrong types, huge
numbers, NaN/Infinity, deep nesting, wrong list lengths, missing keys, lone surrogates).

A hypothesis settings profile pair is defined here too: ``FAST`` for the default run (derandomized,
so CI is reproducible) and ``SLOW`` for the ``@pytest.mark.slow`` variants.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from vgen_core.formats.errors import SampleError

_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
#: Default run: fast and reproducible.
FAST = settings(max_examples=60, **_COMMON)
#: ``-m slow``: many more examples, still derandomized (a failure reproduces).
SLOW = settings(max_examples=1500, **_COMMON)

# ---------------------------------------------------------------------------------------------
# bytes
# ---------------------------------------------------------------------------------------------

BYTE_MUTATIONS = ("truncate", "flip_bit", "flip_bytes", "insert", "delete", "overwrite",
                  "empty", "append", "duplicate_range", "zero_range", "swap_halves")


@st.composite
def mutated_bytes(draw, data: bytes) -> tuple[str, bytes]:
    """(description, damaged copy of ``data``). The copy may, rarely, equal ``data``."""
    kind = draw(st.sampled_from(BYTE_MUTATIONS))
    n = len(data)
    pos = draw(st.integers(0, max(n - 1, 0)))
    if kind == "truncate":
        return f"truncate at {pos}/{n}", data[:pos]
    if kind == "flip_bit":
        bit = draw(st.integers(0, 7))
        b = bytearray(data)
        if n:
            b[pos] ^= 1 << bit
        return f"flip bit {bit} of byte {pos}", bytes(b)
    if kind == "flip_bytes":
        b = bytearray(data)
        k = draw(st.integers(1, 8))
        for _ in range(k):
            i = draw(st.integers(0, max(n - 1, 0)))
            if n:
                b[i] = draw(st.integers(0, 255))
        return f"{k} random bytes", bytes(b)
    if kind == "insert":
        junk = draw(st.binary(min_size=1, max_size=16))
        return f"insert {junk!r} at {pos}", data[:pos] + junk + data[pos:]
    if kind == "delete":
        k = draw(st.integers(1, 64))
        return f"delete {k} bytes at {pos}", data[:pos] + data[pos + k:]
    if kind == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=32))
        return f"overwrite with {junk!r} at {pos}", data[:pos] + junk + data[pos + len(junk):]
    if kind == "empty":
        return "empty file", b""
    if kind == "append":
        junk = draw(st.binary(min_size=1, max_size=64))
        return f"append {junk!r}", data + junk
    if kind == "duplicate_range":
        k = draw(st.integers(1, 256))
        return f"duplicate {k} bytes at {pos}", data[:pos + k] + data[pos:]
    if kind == "zero_range":
        k = draw(st.integers(1, 256))
        return f"zero {k} bytes at {pos}", data[:pos] + bytes(len(data[pos:pos + k])) + \
            data[pos + k:]
    half = n // 2
    return "swap halves", data[half:] + data[:half]


#: Fragments that stress caption parsers: tag punctuation, void/unknown/huge ids, control and
#: format characters, and a 5000-digit id (past CPython's int-from-string limit).
CAPTION_FRAGMENTS = ("<", ">", ":", ",", "<>", "<:>", "<1,>", "<,1: x>", "< 1 : >",
                     "<0: void>", "<255: far>", "<99999999999999999999999: huge>",
                     "<" + "9" * 5000 + ": enormous>", "<1: a <2: b> c>", "<1 2: x>",
                     "<1:\n>", "\x00", "\ufeff", "\u2028", "\r\n", "ÿ", "<１: fullwidth digit>",
                     "[a]<mask_1>", "[", "]", "<mask_?>", "[x]<mask_" + "7" * 5000 + ">",
                     "[x]<mask_>", "[x]<mask_1,,2>", "[x]<mask_-1>", "？", "，")


@st.composite
def mutated_text(draw, text: str) -> tuple[str, bytes]:
    """(description, UTF-8-or-not bytes) of a damaged caption."""
    kind = draw(st.sampled_from(("fragment", "random_text", "non_utf8", "bom", "delete_char",
                                 "replace_all")))
    pos = draw(st.integers(0, len(text)))
    if kind == "fragment":
        frag = draw(st.sampled_from(CAPTION_FRAGMENTS))
        return f"insert {frag[:30]!r} at {pos}", (text[:pos] + frag + text[pos:]).encode()
    if kind == "random_text":
        frag = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                            max_size=12))
        return f"insert {frag!r} at {pos}", (text[:pos] + frag + text[pos:]).encode()
    if kind == "non_utf8":
        raw = draw(st.sampled_from((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xfe\xff")))
        enc = text.encode()
        p = len(text[:pos].encode())
        return f"insert non-UTF-8 {raw!r} at byte {p}", enc[:p] + raw + enc[p:]
    if kind == "bom":
        return "UTF-8 BOM + UTF-16", b"\xef\xbb\xbf" + text.encode("utf-16")
    if kind == "delete_char":
        return f"delete char {pos}", (text[:pos] + text[pos + 1:]).encode()
    frag = draw(st.sampled_from(("", " ", "\n\n", "<", ">", "<1: only a tag>")))
    return f"replace everything by {frag!r}", frag.encode()


# ---------------------------------------------------------------------------------------------
# JSON structure
# ---------------------------------------------------------------------------------------------

#: Raw JSON texts substituted for placeholder strings after ``json.dumps`` (things
#: ``json.dumps`` cannot write or that must stay raw): huge literals, NaN/Infinity as Python's
#: ``json`` writes them, deep nesting, a lone surrogate escape.
RAW_VALUES = {
    "nan": "NaN", "inf": "Infinity", "-inf": "-Infinity", "1e400": "1e400", "-1e400": "-1e400",
    "int5000": "9" * 5000, "-int5000": "-" + "8" * 5000,
    "deep50": "[" * 50 + "1" + "]" * 50, "deep5000": "[" * 5000 + "]" * 5000,
    "deepobj3000": '{"a":' * 3000 + "1" + "}" * 3000,
    "surrogate": '"\\udc80bad"', "surrogate_hi": '"\\ud800x"', "nul": '"a\\u0000b"',
}
#: Raw values that make the whole file unparseable for Python's ``json`` (recursion limit,
#: int-from-string digit limit): only a file-level error can be expected then.
UNPARSEABLE = ("deep5000", "deepobj3000", "int5000")
_PLACEHOLDER = "\x01RAW:{}\x01"
_PLACEHOLDER_RE = re.compile(r'"\\u0001RAW:([^\\"]+)\\u0001"')

weird_values = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, 1, 2**31, -2**31 - 1, 2**53 + 1, 2**63, -2**63 - 1, 10**30,
                     -10**30, 0.5, -0.0, 1e308, 12.0]),
    st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "0", "1", "true", "null", "NaN", "[]", "{}"]),
    st.lists(st.integers(-5, 2**40), max_size=4),
    st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(-3, 3), max_size=3),
    st.sampled_from([_PLACEHOLDER.format(k) for k in RAW_VALUES]),
)


def dumps(doc: Any) -> bytes:
    """``json.dumps`` (NaN written as ``NaN``, like Python's writer) with placeholders replaced by
    their raw JSON text."""
    text = json.dumps(doc, allow_nan=True)
    return _PLACEHOLDER_RE.sub(lambda m: RAW_VALUES[m.group(1)], text).encode("utf-8")


def _children(node: Any) -> list:
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(len(node)))
    return []


@st.composite
def json_path(draw, doc: Any, *, first: tuple = ()) -> tuple:
    """A path (keys / indices) to a node of ``doc``: walks down from ``first``, stopping at
    each container with probability ~1/3."""
    path, node = list(first), doc
    for k in first:
        node = node[k]
    while True:
        kids = _children(node)
        if not kids or (path and draw(st.integers(0, 2)) == 0):
            return tuple(path)
        k = draw(st.sampled_from(kids))
        path.append(k)
        node = node[k]


JSON_OPS = ("delete", "replace", "replace", "retype", "wrap", "nest_raw", "list_drop",
            "list_dup", "list_append", "list_clear", "add_key")


@st.composite
def mutated_json(draw, doc: Any, *, first: tuple = ()) -> tuple[str, tuple, Any]:
    """(description, path, mutated deep copy) of ``doc``: one structural mutation at one node."""
    path = draw(json_path(doc, first=first))
    doc = copy.deepcopy(doc)
    if not path:
        v = draw(weird_values)
        return f"whole document -> {v!r:.60}", path, v
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key, value = path[-1], parent[path[-1]]
    op = draw(st.sampled_from(JSON_OPS))
    if op == "delete":
        del parent[key]
        return f"delete {path}", path, doc
    if op == "retype":
        new = _retype(value, draw(st.integers(0, 5)))
        parent[key] = new
        return f"retype {path}: {value!r:.40} -> {new!r:.40}", path, doc
    if op == "wrap":
        parent[key] = [value]
        return f"wrap {path} in a list", path, doc
    if op == "nest_raw":
        name = draw(st.sampled_from(["deep50", "deep5000", "deepobj3000"]))
        parent[key] = _PLACEHOLDER.format(name)
        return f"{path} -> {name}", path, doc
    if op.startswith("list_") and isinstance(value, list):
        if op == "list_drop" and value:
            i = draw(st.integers(0, len(value) - 1))
            del value[i]
            return f"drop item {i} of {path}", path, doc
        if op == "list_dup" and value:
            i = draw(st.integers(0, len(value) - 1))
            value.insert(i, copy.deepcopy(value[i]))
            return f"duplicate item {i} of {path}", path, doc
        if op == "list_clear":
            value.clear()
            return f"clear {path}", path, doc
        v = draw(weird_values)
        value.append(v)
        return f"append {v!r:.40} to {path}", path, doc
    if op == "add_key" and isinstance(value, dict):
        k = draw(st.sampled_from(["bbox", "extra", "", "id", "segments_info", "\udc80"]))
        value[k] = draw(weird_values)
        return f"set key {k!r} of {path}", path, doc
    v = draw(weird_values)
    parent[key] = v
    return f"{path}: {value!r:.40} -> {v!r:.60}", path, doc


def _retype(value: Any, how: int) -> Any:
    """The same content in another JSON type."""
    if isinstance(value, bool):
        return [int(value), str(value).lower(), None, float(value), [value], {}][how]
    if isinstance(value, int):
        return [str(value), float(value), bool(value), [value], -value, value + 0.5][how]
    if isinstance(value, float):
        return [str(value), int(value) if abs(value) < 1e18 else 0, [value],  # NaN: abs False
                None, -value, value * 1e300][how]
    if isinstance(value, str):
        return [value.encode("utf-8", "replace").decode("latin-1"), len(value), [value],
                value[: len(value) // 2], value + "\udc80", {"text": value}][how]
    if isinstance(value, list):
        return [{str(i): v for i, v in enumerate(value)}, tuple(value)[:1], len(value),
                json.dumps(value), list(reversed(value)), value * 2][how]
    if isinstance(value, dict):
        return [list(value.values()), list(value), json.dumps(value, allow_nan=True), None,
                {k.upper(): v for k, v in value.items()}, [value]][how]
    return [0, "", [], {}, False, 1.5][how]


class Quiet(tuple):
    """A tuple whose repr stays short (hypothesis prints fixtures of failing examples)."""

    def __repr__(self) -> str:
        return f"<{len(self)} fixture parts>"


# ---------------------------------------------------------------------------------------------
# the property
# ---------------------------------------------------------------------------------------------

_CHECK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def assert_sample_error(e: BaseException, sample_id: str | None, what: str) -> None:
    """``e`` is the documented per-sample error with a usable reason."""
    assert isinstance(e, SampleError), (
        f"{what}: expected SampleError, got {type(e).__name__}: {e}")
    assert _CHECK_NAME.match(e.check or ""), f"{what}: bad check name {e.check!r}"
    assert e.reason and e.reason.strip(), f"{what}: empty reason"
    assert len(e.reason) < 20_000, f"{what}: reason of {len(e.reason)} chars"
    if sample_id is not None:
        assert e.sample_id == sample_id, f"{what}: error names {e.sample_id!r}, not {sample_id!r}"
    assert e.source, f"{what}: the error names no file"
    str(e)  # formats
