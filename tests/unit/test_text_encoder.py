"""Byte-level tokenizer and CLIP-style causal text encoder (MaskGen's text condition)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vgen_core.generators.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TEXT_ENCODER_SIZES,
    TextEncoder,
    TextEncoderConfig,
    decode_text,
    encode_text,
    text_encoder_config,
)
from vgen_core.tokenizers.io import load_pretrained, register_family, save_pretrained


def _tiny(**overrides) -> TextEncoder:
    torch.manual_seed(0)
    return text_encoder_config("tiny", **overrides).build().eval()


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def test_encode_layout_exact():
    ids = encode_text(["hi", "", "é"], max_len=8)
    assert ids.dtype == torch.int64 and ids.shape == (3, 8)
    assert ids.tolist() == [
        [BOS_ID, 104, 105, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
        [BOS_ID, EOS_ID] + [PAD_ID] * 6,
        [BOS_ID, 0xC3, 0xA9, EOS_ID] + [PAD_ID] * 4,
    ]
    assert encode_text(["x"]).shape == (1, 77)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_round_trip_and_truncation_property(caption):
    ids = encode_text([caption])
    row = ids[0].tolist()
    assert row[0] == BOS_ID and row.count(EOS_ID) == 1 and row.count(BOS_ID) == 1
    end = row.index(EOS_ID)
    assert all(t == PAD_ID for t in row[end + 1:]) and all(t < 256 for t in row[1:end])
    decoded = decode_text(ids)[0]
    n_bytes = len(caption.encode("utf-8"))
    if n_bytes <= 75:
        assert decoded == caption
    else:  # longest whole-character prefix within 75 bytes
        assert caption.startswith(decoded)
        assert len(decoded.encode("utf-8")) <= 75
        assert len(caption[: len(decoded) + 1].encode("utf-8")) > 75


def test_truncation_exact_values():
    assert decode_text(encode_text(["a" * 100]))[0] == "a" * 75
    # 2-byte characters: 37 fit in 75 bytes (74), the 38th would be split -> dropped whole
    assert decode_text(encode_text(["é" * 50]))[0] == "é" * 37
    # 4-byte emoji after 73 ASCII bytes: 73 + 4 > 75 -> emoji dropped, EOS right after
    ids = encode_text(["a" * 73 + "😀"])
    assert ids[0, 74].item() == EOS_ID and decode_text(ids)[0] == "a" * 73
    assert decode_text(encode_text(["abcdef"], max_len=5))[0] == "abc"


def test_encode_rejects_bad_input():
    with pytest.raises(TypeError, match="list of captions"):
        encode_text("a caption")
    with pytest.raises(ValueError, match="max_len"):
        encode_text(["a"], max_len=1)


# --------------------------------------------------------------------------------------------------
# encoder
# --------------------------------------------------------------------------------------------------


def test_sizes_and_validation():
    clip = TEXT_ENCODER_SIZES["clip-l"]
    assert (clip.width, clip.layers, clip.heads, clip.context_len) == (768, 12, 12, 77)
    with pytest.raises(ValueError, match="divisible by heads"):
        TextEncoderConfig(width=100, heads=12)
    with pytest.raises(ValueError, match="known: tiny"):
        text_encoder_config("clip-g")


def test_outputs_penultimate_tokens_and_pooled_eos():
    model = _tiny(layers=3)
    ids = encode_text(["a red cube", "two cats"])
    with torch.no_grad():
        tokens, pooled = model(ids)
        x = model.token_embedding(ids) + model.positional_embedding
        for blk in model.blocks[:2]:
            x = blk(x)
        last = model.ln_final(model.blocks[2](x))
        eos = [(r == EOS_ID).nonzero().item() for r in ids]
        expect_pooled = model.text_projection(last[torch.arange(2), eos])
    assert tokens.shape == (2, 77, 32) and pooled.shape == (2, 32)
    torch.testing.assert_close(tokens, x)
    torch.testing.assert_close(pooled, expect_pooled)


def test_causal_mask_prefix_unchanged():
    """Changing the byte at position j leaves every token output before j unchanged."""
    model = _tiny()
    a = encode_text(["abcdefgh"])
    b = a.clone()
    j = 5
    b[0, j] = ord("z")
    with torch.no_grad():
        ta, pa = model(a)
        tb, pb = model(b)
    torch.testing.assert_close(ta[:, :j], tb[:, :j], rtol=0, atol=0)
    assert not torch.allclose(ta[:, j:], tb[:, j:])
    assert not torch.allclose(pa, pb)  # the EOS (after j) sees the change


def test_padding_after_eos_is_irrelevant_and_missing_eos_rejected():
    model = _tiny()
    a = encode_text(["cat"])
    b = a.clone()
    b[0, 10:] = 65  # junk after EOS
    with torch.no_grad():
        ta, pa = model(a)
        tb, pb = model(b)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    torch.testing.assert_close(ta[:, :10], tb[:, :10], rtol=0, atol=0)
    with pytest.raises(ValueError, match="EOS"):
        model(torch.full((1, 77), 65))
    with pytest.raises(ValueError, match=r"\(B, 77\)"):
        model(torch.zeros(1, 10, dtype=torch.long))


def test_save_load_round_trip(tmp_path):
    register_family(TextEncoder.family, TextEncoder)
    model = _tiny()
    out = save_pretrained(model, tmp_path / "te")
    loaded = load_pretrained(out, expected_family="byte_clip_text")
    ids = encode_text(["round trip"])
    with torch.no_grad():
        for x, y in zip(model(ids), loaded(ids)):
            assert torch.equal(x, y)
