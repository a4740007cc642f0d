"""Sample ids and content digests: pinned values, the documented framing, properties."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgen_core.data.identity import (
    DIGEST_PERSON,
    DIGEST_VERSION,
    Digest,
    canonical_json,
    content_digest,
    make_sample_id,
    parse_sample_id,
)

# ---------------------------------------------------------------------------------------------
# the documented encoding, rebuilt by hand with hashlib
# ---------------------------------------------------------------------------------------------


def frame(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack(">Q", len(payload)) + payload


def by_hand(*frames: bytes) -> str:
    h = hashlib.blake2b(digest_size=16, person=b"vgen-digest-v1")
    for f in frames:
        h.update(f)
    return h.hexdigest()


def test_version_constants_are_frozen():
    assert DIGEST_VERSION == 1
    assert DIGEST_PERSON == b"vgen-digest-v1"


def test_pinned_digests():
    # These values are stored in tables; if this test fails the encoding changed: don't "fix" the
    # numbers, bump DIGEST_VERSION instead (see the module docs).
    assert content_digest() == "aae0575df0591116a177a08bdc65ca15"
    assert content_digest("ab", "c") == "59919ceedad9d0d050861564ddd407bc"
    assert content_digest("a", "bc") == "e00312404c9750c91137b1ad17f50924"
    assert (
        content_digest(b"\x89PNG", "a caption", {"b": [1, 2], "a": "é"}, None, 7, 1.5, True)
        == "6791edd71de9f41000b3c31f37c59f7f"
    )
    assert (
        content_digest(np.arange(6, dtype=np.uint8).reshape(2, 3))
        == "0fe8b6dffc41da96c7f4e67fe1348a4b"
    )


def test_pinned_digests_match_the_documented_framing():
    assert content_digest() == by_hand()
    assert content_digest("ab", "c") == by_hand(frame(b"S", b"ab"), frame(b"S", b"c"))
    mixed = by_hand(
        frame(b"B", b"\x89PNG"),
        frame(b"S", b"a caption"),
        frame(b"J", '{"a":"é","b":[1,2]}'.encode()),
        frame(b"N", b""),
        frame(b"I", b"7"),
        frame(b"F", struct.pack(">d", 1.5)),
        frame(b"T", b"\x01"),
    )
    assert content_digest(b"\x89PNG", "a caption", {"b": [1, 2], "a": "é"}, None, 7, 1.5, True) == mixed
    arr_payload = (
        struct.pack(">Q", 2)
        + struct.pack(">Q", 2)
        + struct.pack(">Q", 3)
        + struct.pack(">Q", 3)
        + b"|u1"
        + bytes(range(6))
    )
    assert content_digest(np.arange(6, dtype=np.uint8).reshape(2, 3)) == by_hand(frame(b"A", arr_payload))


def test_scalar_encodings():
    assert content_digest(-12) == by_hand(frame(b"I", b"-12"))
    assert content_digest(2**100) == by_hand(frame(b"I", str(2**100).encode()))
    assert content_digest(False) == by_hand(frame(b"T", b"\x00"))
    assert content_digest(float("nan")) == by_hand(frame(b"F", bytes.fromhex("7ff8000000000000")))
    # every NaN is the same NaN
    other_nan = struct.unpack(">d", bytes.fromhex("7ff8000000000001"))[0]
    assert content_digest(other_nan) == content_digest(float("nan"))
    assert content_digest(-0.0) != content_digest(0.0)
    assert content_digest(bytearray(b"xy")) == content_digest(b"xy") == content_digest(memoryview(b"xy"))


def test_types_are_distinguished():
    values = [None, True, 1, 1.0, "1", b"1", [1], {"1": 1}, np.array(1), np.array([1])]
    digests = {content_digest(v) for v in values}
    assert len(digests) == len(values)
    assert content_digest(0) != content_digest(False)


def test_numpy_arrays_dtype_shape_order():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert content_digest(a) != content_digest(a.reshape(4, 3))  # shape counts
    assert content_digest(a) != content_digest(a.astype(np.int64))  # dtype counts
    assert content_digest(a) == content_digest(a.astype(">i4"))  # byte order does not
    assert content_digest(a.T) == content_digest(np.ascontiguousarray(a.T))  # memory layout does not
    assert content_digest(a[:, ::2]) == content_digest(a[:, ::2].copy())
    assert content_digest(np.float32(1)) == content_digest(np.array(1, dtype=np.float32))
    assert content_digest(np.float32(1)) != content_digest(np.array([1], dtype=np.float32))
    assert content_digest(np.zeros((0, 3), np.uint8)) != content_digest(np.zeros((3, 0), np.uint8))
    assert content_digest(np.array([True, False])) != content_digest(np.array([1, 0], np.uint8))
    with pytest.raises(TypeError):
        content_digest(np.array([object()]))
    with pytest.raises(TypeError):
        content_digest(np.zeros(2, dtype=[("a", "i4")]))


def test_json_parts():
    assert canonical_json({"b": 1, "a": [1, 2.5, None, "é"]}) == '{"a":[1,2.5,null,"é"],"b":1}'
    assert content_digest({"k": np.int64(3), "v": np.array([1, 2])}) == content_digest({"k": 3, "v": [1, 2]})
    assert content_digest((1, 2)) == content_digest([1, 2])
    with pytest.raises(TypeError, match="str dict keys"):
        content_digest({1: "a"})
    with pytest.raises(TypeError, match="str dict keys"):
        content_digest([{"a": {2: 1}}])
    with pytest.raises(ValueError):
        content_digest({"x": float("nan")})


def test_unsupported_types():
    with pytest.raises(TypeError, match="set"):
        content_digest({1, 2})
    with pytest.raises(TypeError):
        content_digest(object())
    with pytest.raises(UnicodeEncodeError):
        content_digest("\ud800")


def test_streaming_matches_one_shot_and_copy():
    d = Digest().update(b"img").update("caption")
    fork = d.copy()
    d.update({"a": 1})
    assert d.hexdigest() == content_digest(b"img", "caption", {"a": 1})
    assert fork.hexdigest() == content_digest(b"img", "caption")
    assert Digest().update_many(1, 2).digest() == bytes.fromhex(content_digest(1, 2))


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


def _split(s, cuts):
    cuts = sorted(set(c % (len(s) + 1) for c in cuts))
    bounds = [0, *cuts, len(s)]
    return tuple(s[a:b] for a, b in zip(bounds, bounds[1:]))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(max_size=20), st.binary(max_size=20)),
    st.lists(st.integers(0, 40), max_size=5),
    st.lists(st.integers(0, 40), max_size=5),
)
def test_framing_is_injective_on_splits(s, cuts1, cuts2):
    p1, p2 = _split(s, cuts1), _split(s, cuts2)
    assert (content_digest(*p1) == content_digest(*p2)) == (p1 == p2)


_atoms = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.binary(max_size=8)
)


def _typed(parts):
    return [(type(p).__name__, p) for p in parts]


@settings(max_examples=300, deadline=None)
@given(st.lists(_atoms, max_size=5), st.lists(_atoms, max_size=5))
def test_distinct_part_sequences_give_distinct_digests(a, b):
    assert (content_digest(*a) == content_digest(*b)) == (_typed(a) == _typed(b))


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def _reorder(obj):
    if isinstance(obj, dict):
        return {k: _reorder(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [_reorder(v) for v in obj]
    return obj


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), _json, max_size=6))
def test_dict_key_order_is_irrelevant(d):
    r = _reorder(d)
    assert canonical_json(r) == canonical_json(d)
    assert content_digest(r) == content_digest(d)
    assert json.loads(canonical_json(d)) == d


@settings(max_examples=100, deadline=None)
@given(st.lists(_atoms, max_size=6))
def test_streaming_equals_one_shot(parts):
    d = Digest()
    for p in parts:
        d.update(p)
    assert d.hexdigest() == content_digest(*parts)


# ---------------------------------------------------------------------------------------------
# sample ids
# ---------------------------------------------------------------------------------------------


def test_make_sample_id_examples():
    assert make_sample_id("pancap", 123456, width=12) == "pancap/000000123456"
    assert make_sample_id("pancap", "123456", width=12) == "pancap/000000123456"
    assert make_sample_id("vicas", 990001) == "vicas/990001"
    assert make_sample_id("vicas", np.int64(990001)) == "vicas/990001"
    assert make_sample_id("my_set-2", "clip_0007.a") == "my_set-2/clip_0007.a"
    assert make_sample_id("pancap", 10**13, width=12) == "pancap/10000000000000"  # never truncated


@pytest.mark.parametrize(
    "dataset,key,kw,exc",
    [
        ("PanCap", 1, {}, ValueError),
        ("pan cap", 1, {}, ValueError),
        ("pan/cap", 1, {}, ValueError),
        ("", 1, {}, ValueError),
        ("pancap", "a/b", {}, ValueError),
        ("pancap", "a b", {}, ValueError),
        ("pancap", "a\tb", {}, ValueError),
        ("pancap", "a\x00", {}, ValueError),
        ("pancap", "", {}, ValueError),
        ("pancap", -1, {}, ValueError),
        ("pancap", True, {}, TypeError),
        ("pancap", 1.0, {}, TypeError),
        ("pancap", "abc", {"width": 12}, ValueError),
        ("pancap", 1, {"width": 0}, ValueError),
    ],
)
def test_make_sample_id_rejects(dataset, key, kw, exc):
    with pytest.raises(exc):
        make_sample_id(dataset, key, **kw)


def test_parse_sample_id_round_trip():
    assert parse_sample_id("pancap/000000123456") == ("pancap", "000000123456")
    for bad in ["pancap", "a/b/c", "Pan/1", "x/ y"]:
        with pytest.raises(ValueError):
            parse_sample_id(bad)
