"""The released TA-TiTok VQ checkpoints load by size name.

bytedance/1d-tokenizer ships tatitok_bl{32,64,128}_vq with the inference configs
configs/infer/TA-TiTok/tatitok_bl{32,64,128}_vq.yaml, which set `clustering_vq: False` (changed from
True in 1d-tokenizer@1825229, after 28d0974 "Update TA-TiTok VQ model weights"); only the
training configs keep True. With clustering_vq False the official VectorQuantizer registers no `embed_prob` buffer, so the
released state dicts hold no `quantize.embed_prob`. The state dicts below list the released keys
and shapes from the official module definitions (modeling/tatitok.py TATiTok, modeling/modules/
blocks.py TiTokEncoder / TATiTokDecoder, modeling/quantizer/quantizer.py VectorQuantizer), computed
from the inference config alone (not from vgen's model), with random values.
"""

from __future__ import annotations

import pytest
import torch

from vgen_core.tokenizers.titok import (
    TITOK_SIZES,
    TATiTok,
    TATiTokConfig,
    config_from_official,
    inverse_official_key_map,
    load_official,
    titok_config,
)

# model.vq_model of configs/infer/TA-TiTok/tatitok_bl{32,64,128}_vq.yaml (1d-tokenizer @942a96f);
# dataset.preprocessing.crop_size is 256 in all three.
_RELEASED_VQ = {
    f"tatitok-bl{k}-vq": dict(
        quantize_mode="vq", codebook_size=8192, token_size=64, use_l2_norm=False,
        commitment_cost=0.25, clustering_vq=False, vit_enc_model_size="base",
        vit_dec_model_size="large", vit_enc_patch_size=16, vit_dec_patch_size=16,
        num_latent_tokens=k, finetune_decoder=False, is_legacy=False,
    )
    for k in (32, 64, 128)
}  # fmt: skip
_CROP = 256
# width, layers of the official ViTs (blocks.py); mlp width is 4x.
_VIT = {"small": (512, 8), "base": (768, 12), "large": (1024, 24)}
_TEXT_T, _TEXT_E = 77, 768  # TATiTokDecoder defaults (CLIP ViT-L/14)


def _official(name: str) -> dict:
    return {"model": {"vq_model": dict(_RELEASED_VQ[name])},
            "dataset": {"preprocessing": {"crop_size": _CROP}}}  # fmt: skip


def _released_shapes(vq: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official TATiTok state dict for a non-legacy VQ inference config."""
    (We, Le), (Wd, Ld) = _VIT[vq["vit_enc_model_size"]], _VIT[vq["vit_dec_model_size"]]
    pe, pd, K, C = vq["vit_enc_patch_size"], vq["vit_dec_patch_size"], vq["num_latent_tokens"], \
        vq["token_size"]
    ge, gd = _CROP // pe, _CROP // pd
    s: dict[str, tuple[int, ...]] = {"latent_tokens": (K, We)}

    def vit(m: str, W: int, layers: int) -> None:
        s[f"{m}.ln_pre.weight"] = s[f"{m}.ln_pre.bias"] = (W,)
        for i in range(layers):
            p = f"{m}.transformer.{i}."
            s[p + "ln_1.weight"] = s[p + "ln_1.bias"] = (W,)
            s[p + "attn.in_proj_weight"], s[p + "attn.in_proj_bias"] = (3 * W, W), (3 * W,)
            s[p + "attn.out_proj.weight"], s[p + "attn.out_proj.bias"] = (W, W), (W,)
            s[p + "ln_2.weight"] = s[p + "ln_2.bias"] = (W,)
            s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"] = (4 * W, W), (4 * W,)
            s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"] = (W, 4 * W), (W,)
        s[f"{m}.ln_post.weight"] = s[f"{m}.ln_post.bias"] = (W,)

    s["encoder.patch_embed.weight"], s["encoder.patch_embed.bias"] = (We, 3, pe, pe), (We,)
    s["encoder.class_embedding"] = (1, We)
    s["encoder.positional_embedding"] = (ge * ge + 1, We)
    s["encoder.latent_token_positional_embedding"] = (K, We)
    vit("encoder", We, Le)
    s["encoder.conv_out.weight"], s["encoder.conv_out.bias"] = (C, We, 1, 1), (C,)
    s["quantize.embedding.weight"] = (vq["codebook_size"], C)
    if vq["clustering_vq"]:
        s["quantize.embed_prob"] = (vq["codebook_size"],)
    s["decoder.decoder_embed.weight"], s["decoder.decoder_embed.bias"] = (Wd, C), (Wd,)
    s["decoder.class_embedding"] = (1, Wd)
    s["decoder.positional_embedding"] = (gd * gd + 1, Wd)
    s["decoder.mask_token"] = (1, 1, Wd)
    s["decoder.latent_token_positional_embedding"] = (K, Wd)
    vit("decoder", Wd, Ld)
    s["decoder.ffn.0.weight"], s["decoder.ffn.0.bias"] = (pd * pd * 3, Wd, 1, 1), (pd * pd * 3,)
    s["decoder.conv_out.weight"], s["decoder.conv_out.bias"] = (3, 3, 3, 3), (3,)
    s["decoder.text_guidance_proj.weight"] = (Wd, _TEXT_E)
    s["decoder.text_guidance_proj.bias"] = (Wd,)
    s["decoder.text_guidance_positional_embedding"] = (_TEXT_T, Wd)
    return s


@pytest.mark.parametrize("name", sorted(_RELEASED_VQ))
def test_size_matches_released_inference_config(name):
    cfg = TITOK_SIZES[name]
    assert isinstance(cfg, TATiTokConfig)
    assert cfg == config_from_official(_official(name), text_aware=True)
    assert cfg.clustering_vq is False
    # The expected key set (meta device, no memory) is exactly the released one: no embed_prob.
    with torch.device("meta"):
        model = cfg.build()
    keys = {k: tuple(v.shape) for k, v in inverse_official_key_map(model.state_dict()).items()}
    assert keys == _released_shapes(_RELEASED_VQ[name])
    assert "quantize.embed_prob" not in keys


def test_clustering_vq_stays_selectable_for_training():
    """The official training configs use clustering_vq: True; an override gives it back."""
    cfg = titok_config("tatitok-bl128-vq", clustering_vq=True)
    assert isinstance(cfg, TATiTokConfig) and cfg.clustering_vq
    with torch.device("meta"):
        keys = inverse_official_key_map(cfg.build().state_dict())
    assert keys["quantize.embed_prob"].shape == (8192,)


@pytest.mark.parametrize("name", sorted(_RELEASED_VQ))
def test_released_checkpoint_loads_by_size_name(name):
    vq = _RELEASED_VQ[name]
    g = torch.Generator().manual_seed(0)
    official = {
        k: torch.randn(shape, generator=g) * 0.02 for k, shape in _released_shapes(vq).items()
    }
    model = load_official(official, name)  # raises on any missing / unexpected / mis-shaped key
    assert isinstance(model, TATiTok) and not model.training
    loaded = inverse_official_key_map(model.state_dict())
    assert loaded.keys() == official.keys()  # strict: no missing, no unexpected keys
    for key in ("quantize.embedding.weight", "decoder.text_guidance_positional_embedding"):
        torch.testing.assert_close(loaded[key], official[key], rtol=0, atol=0)
    K = vq["num_latent_tokens"]
    with torch.no_grad():
        z, info = model.encode(torch.rand(1, 3, _CROP, _CROP))
    assert z.shape == (1, vq["token_size"], 1, K)
    ids = info["min_encoding_indices"].reshape(1, -1)
    assert ids.shape == (1, K) and ids.dtype == torch.int64
    assert 0 <= int(ids.min()) and int(ids.max()) < vq["codebook_size"]


def test_no_missing_embed_prob_error_regression():
    """The released keys used to fail by size name with "checkpoint has no
    'quantize.embed_prob'" (sizes had clustering_vq=True). A tiny stand-in with the same keys
    (no embed_prob) now loads; asking for clustering_vq explicitly still names the buffer."""
    cfg = titok_config("tatitok-tiny", clustering_vq=False)
    with torch.device("meta"):
        shapes = inverse_official_key_map(cfg.build().state_dict())
    official = {k: torch.randn(tuple(v.shape)) for k, v in shapes.items()}
    assert "quantize.embed_prob" not in official
    load_official(official, cfg)
    for name in _RELEASED_VQ:
        assert not titok_config(name).clustering_vq
    with pytest.raises(ValueError, match=r"checkpoint has no 'quantize\.embed_prob'"):
        load_official(official, titok_config("tatitok-tiny", clustering_vq=True))
