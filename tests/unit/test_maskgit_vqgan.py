"""MaskGIT-VQGAN (and the legacy TiTok's stage-2 pixel decoder built from it): released names and
shapes, numerics against the official forward, legacy TiTok tokens -> uint8 RGB, bad inputs.

`official_vqgan_shapes` lists the released state-dict names and shapes as the official module
definitions create them (bytedance/1d-tokenizer @942a96f modeling/modules/maskgit_vqgan.py
Encoder / Decoder / ResnetBlock / Down- and UpsamplingBlock / VectorQuantizer, and
modeling/titok.py PretrainedTokenizer (encoder / decoder / quantize) and TiTok (pixel_quantize /
pixel_decoder)), computed from the official config dict alone. `_ref_*` re-state the official
forward passes (Conv2dSame padding, GroupNorm(32, eps 1e-6), the output-side nin_shortcut, the
addmm distances and one-hot matmul of the quantizer, the clamp of PretrainedTokenizer.decode,
TiTok.decode's softmax + einsum) on a state dict, so loading is checked numerically.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vgen_core import families
from vgen_core.families import from_model_pixels, to_model_pixels
from vgen_core.tokenizers import titok
from vgen_core.tokenizers.io import load_pretrained, save_pretrained, weights_digest
from vgen_core.tokenizers.maskgit_vqgan import (
    MASKGIT_VQGAN_SIZES,
    OFFICIAL_DROPPED,
    MaskGITVQGAN,
    MaskGITVQGANConfig,
    config_from_official,
    load_official,
    maskgit_vqgan_config,
    official_key_map,
)

# modeling/titok.py PretrainedTokenizer / TiTok.pixel_decoder: the released f16-256 config.
OFFICIAL_CONF = {"channel_mult": [1, 1, 2, 2, 4], "num_resolutions": 5, "dropout": 0.0,
                 "hidden_channels": 128, "num_channels": 3, "num_res_blocks": 2,
                 "resolution": 256, "z_channels": 256}  # fmt: skip
OFFICIAL_CODEBOOK = 1024  # Pixel_Quantizer(num_embeddings=1024, embedding_dim=256, ...)


def official_conf(cfg: MaskGITVQGANConfig) -> dict:
    """The official OmegaConf dict of a config (the names maskgit_vqgan.py reads)."""
    return {"channel_mult": list(cfg.channel_mult), "num_resolutions": len(cfg.channel_mult),
            "dropout": cfg.dropout, "hidden_channels": cfg.hidden_channels,
            "num_channels": cfg.num_channels, "num_res_blocks": cfg.num_res_blocks,
            "resolution": cfg.image_size, "z_channels": cfg.z_channels}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Official names and shapes (transcribed from modeling/modules/maskgit_vqgan.py)
# --------------------------------------------------------------------------------------------------


def _res_shapes(s: dict, p: str, c_in: int, c_out: int) -> None:
    s[p + "norm1.weight"] = s[p + "norm1.bias"] = (c_in,)
    s[p + "conv1.weight"] = (c_out, c_in, 3, 3)  # Conv2dSame(..., bias=False)
    s[p + "norm2.weight"] = s[p + "norm2.bias"] = (c_out,)
    s[p + "conv2.weight"] = (c_out, c_out, 3, 3)
    if c_in != c_out:  # Conv2dSame(out_channels_, out_channels_, kernel_size=1, bias=False)
        s[p + "nin_shortcut.weight"] = (c_out, c_out, 1, 1)


def _encoder_shapes(conf: dict, p: str = "encoder.") -> dict[str, tuple[int, ...]]:
    hc, mult, n, nrb = (conf["hidden_channels"], conf["channel_mult"], conf["num_resolutions"],
                        conf["num_res_blocks"])  # fmt: skip
    s: dict[str, tuple[int, ...]] = {p + "conv_in.weight": (hc, conf["num_channels"], 3, 3)}
    in_mult = (1, *mult)
    for i in range(n):
        c_in, c_out = hc * in_mult[i], hc * mult[i]
        for j in range(nrb):
            _res_shapes(s, f"{p}down.{i}.block.{j}.", c_in, c_out)
            c_in = c_out
    mid = hc * mult[-1]
    for j in range(nrb):
        _res_shapes(s, f"{p}mid.{j}.", mid, mid)
    s[p + "norm_out.weight"] = s[p + "norm_out.bias"] = (mid,)
    s[p + "conv_out.weight"], s[p + "conv_out.bias"] = (conf["z_channels"], mid, 1, 1), (
        conf["z_channels"],)  # fmt: skip
    return s


def _decoder_shapes(conf: dict, p: str = "decoder.") -> dict[str, tuple[int, ...]]:
    hc, mult, n, nrb = (conf["hidden_channels"], conf["channel_mult"], conf["num_resolutions"],
                        conf["num_res_blocks"])  # fmt: skip
    block_in = hc * mult[n - 1]
    s: dict[str, tuple[int, ...]] = {p + "conv_in.weight": (block_in, conf["z_channels"], 3, 3),
                                     p + "conv_in.bias": (block_in,)}  # fmt: skip
    for j in range(nrb):
        _res_shapes(s, f"{p}mid.{j}.", block_in, block_in)
    for i in range(n):  # up[i] = UpsamplingBlock(block_idx=i) after the official double reverse
        c_in = hc * (mult[-1] if i == n - 1 else mult[i + 1])
        c_out = hc * mult[i]
        for j in range(nrb):
            _res_shapes(s, f"{p}up.{i}.block.{j}.", c_in, c_out)
            c_in = c_out
        if i != 0:
            s[f"{p}up.{i}.upsample_conv.weight"] = (c_out, c_out, 3, 3)
            s[f"{p}up.{i}.upsample_conv.bias"] = (c_out,)
    c_out = hc * mult[0]
    s[p + "norm_out.weight"] = s[p + "norm_out.bias"] = (c_out,)
    s[p + "conv_out.weight"] = (conf["num_channels"], c_out, 3, 3)
    s[p + "conv_out.bias"] = (conf["num_channels"],)
    return s


def official_vqgan_shapes(conf: dict, codebook_size: int) -> dict[str, tuple[int, ...]]:
    """PretrainedTokenizer's state dict: encoder.*, decoder.*, quantize.embedding.weight."""
    return {**_encoder_shapes(conf), **_decoder_shapes(conf),
            "quantize.embedding.weight": (codebook_size, conf["z_channels"])}  # fmt: skip


def official_pixel_shapes(conf: dict, codebook_size: int) -> dict[str, tuple[int, ...]]:
    """A stage-2 TiTok's pixel_quantize.* and pixel_decoder.* entries."""
    return {"pixel_quantize.embedding.weight": (codebook_size, conf["z_channels"]),
            **_decoder_shapes(conf, "pixel_decoder.")}  # fmt: skip


def _random_state_dict(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Values that keep activations O(1): conv weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if "norm" in k and k.endswith("weight"):
            t = 1.0 + 0.1 * t
        elif "norm" in k or k.endswith("bias"):
            t = 0.1 * t
        elif len(shape) == 4:
            t = t / math.sqrt(shape[1] * shape[2] * shape[3])
        sd[k] = t
    return sd


# --------------------------------------------------------------------------------------------------
# Official forward passes, re-stated on a state dict
# --------------------------------------------------------------------------------------------------


def _conv_same(sd, name, x, k):
    """Conv2dSame (stride 1, dilation 1): pad max((ceil(i/s)-1)*s + (k-1)*d + 1 - i, 0)."""
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / 1) - 1) * 1 + (k - 1) * 1 + 1 - ih, 0)
    pad_w = max((math.ceil(iw / 1) - 1) * 1 + (k - 1) * 1 + 1 - iw, 0)
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    return F.conv2d(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _gn(sd, name, x):
    return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _ref_res(sd, p, x):
    c_in, c_out = x.shape[1], sd[p + "conv1.weight"].shape[0]
    residual = x
    h = _conv_same(sd, p + "conv1", F.silu(_gn(sd, p + "norm1", x)), 3)
    h = _conv_same(sd, p + "conv2", F.silu(_gn(sd, p + "norm2", h)), 3)  # dropout 0 / eval
    if c_in != c_out:
        residual = _conv_same(sd, p + "nin_shortcut", h, 1)  # the official: on hidden_states
    return h + residual


def _ref_encoder(sd, conf, x, p="encoder."):
    n, nrb = conf["num_resolutions"], conf["num_res_blocks"]
    h = _conv_same(sd, p + "conv_in", x, 3)
    for i in range(n):
        for j in range(nrb):
            h = _ref_res(sd, f"{p}down.{i}.block.{j}.", h)
        if i != n - 1:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
    for j in range(nrb):
        h = _ref_res(sd, f"{p}mid.{j}.", h)
    return _conv_same(sd, p + "conv_out", F.silu(_gn(sd, p + "norm_out", h)), 1)


def _ref_decoder(sd, conf, z, p="decoder."):
    n, nrb = conf["num_resolutions"], conf["num_res_blocks"]
    h = _conv_same(sd, p + "conv_in", z, 3)
    for j in range(nrb):
        h = _ref_res(sd, f"{p}mid.{j}.", h)
    for i in reversed(range(n)):  # `for block in reversed(self.up)`
        for j in range(nrb):
            h = _ref_res(sd, f"{p}up.{i}.block.{j}.", h)
        if i != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = _conv_same(sd, f"{p}up.{i}.upsample_conv", h, 3)
    return _conv_same(sd, p + "conv_out", F.silu(_gn(sd, p + "norm_out", h)), 3)


def _ref_quantize(emb_VD, z_BDhw):
    """VectorQuantizer.forward (no loss): (z_q (B, D, h, w), ids (B, h*w))."""
    hs = z_BDhw.permute(0, 2, 3, 1).contiguous()
    flat = hs.reshape((-1, emb_VD.shape[1]))
    e = emb_VD.t()
    d = torch.addmm(flat.pow(2.0).sum(dim=1, keepdim=True) + e.pow(2.0).sum(dim=0, keepdim=True),
                    flat, e, alpha=-2.0)  # fmt: skip
    idx = torch.argmin(d, axis=1).unsqueeze(1)
    onehot = torch.zeros(idx.shape[0], emb_VD.shape[0]).to(hs)
    onehot.scatter_(1, idx, 1)
    z_q = torch.matmul(onehot, emb_VD).view(hs.shape)
    return z_q.permute(0, 3, 1, 2).contiguous(), idx.reshape(hs.shape[0], -1)


def _ref_get_codebook_entry(emb_VD, ids_BL):
    B, L = ids_BL.shape
    side = int(math.sqrt(L))
    return F.embedding(ids_BL, emb_VD).reshape(B, side, side, -1).permute(0, 3, 1, 2)


def _ref_pretrained_tokenizer(sd, conf, x):
    """PretrainedTokenizer.encode and .decode: (ids (B, L), clamped reconstruction)."""
    _, ids = _ref_quantize(sd["quantize.embedding.weight"], _ref_encoder(sd, conf, x))
    q = _ref_get_codebook_entry(sd["quantize.embedding.weight"], ids)
    return ids, torch.clamp(_ref_decoder(sd, conf, q), 0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Registry, names and shapes
# --------------------------------------------------------------------------------------------------


def test_registered_size_is_the_released_config():
    cfg = MASKGIT_VQGAN_SIZES["maskgit-vqgan-f16-256"]
    assert config_from_official(OFFICIAL_CONF) == cfg
    assert (cfg.codebook_size, cfg.z_channels, cfg.downsample_factor, cfg.grid) == (1024, 256,
                                                                                  16, 16)
    # the legacy TiTok's stage-2 pixel decoder defaults to the same config (titok.py TiTok)
    for size in ("titok-l32", "titok-b64", "titok-s128"):
        assert titok.TITOK_SIZES[size].pixel_decoder == cfg
    assert titok.TITOK_SIZES["titok-bl64-vq"].pixel_decoder is None
    spec = families.get("maskgit-vqgan")
    assert spec.pixel_range == "unit" and spec.produces == ("id_tokens",)
    assert spec.model_class is MaskGITVQGAN and MaskGITVQGAN.family == "maskgit-vqgan"
    assert {"encode", "decode", "load_released"} <= set(spec.capabilities)
    assert families.get("maskgit_vqgan") is spec  # alias
    with pytest.raises(ValueError, match="known: maskgit-vqgan-f16-256"):
        maskgit_vqgan_config("f8")
    with pytest.raises(ValueError, match="multiple of the downsampling factor 16"):
        maskgit_vqgan_config("maskgit-vqgan-f16-256", image_size=200)
    with pytest.raises(ValueError, match="multiple of 32"):
        maskgit_vqgan_config("tiny", hidden_channels=48)
    with pytest.raises(ValueError, match="num_resolutions=4"):
        config_from_official({**OFFICIAL_CONF, "num_resolutions": 4})


@pytest.mark.parametrize("size", list(MASKGIT_VQGAN_SIZES))
def test_every_size_on_meta_device_has_official_names_and_shapes(size):
    cfg = MASKGIT_VQGAN_SIZES[size]
    with torch.device("meta"):
        model = MaskGITVQGAN(cfg)
        images = torch.empty(2, 3, cfg.image_size, cfg.image_size)
        ids = model.encode(images)
        rec = model.decode(ids)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_vqgan_shapes(official_conf(cfg), cfg.codebook_size)
    assert ids.shape == (2, cfg.grid**2) and ids.dtype == torch.int64
    assert rec.shape == (2, 3, cfg.image_size, cfg.image_size)


def test_released_f16_state_dict_converts_and_loads_strictly():
    """(a) exactly the released names and shapes: meta tensors through official_key_map and a
    strict meta load, then the same with random values for real (54.5M parameters)."""
    shapes = official_vqgan_shapes(OFFICIAL_CONF, OFFICIAL_CODEBOOK)
    assert len(shapes) == 79 + 88 + 1  # encoder, decoder (2 nin_shortcuts each), codebook
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    mapped = official_key_map(meta)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == shapes
    assert OFFICIAL_DROPPED == {}
    with torch.device("meta"):
        on_meta = load_official(meta, "maskgit-vqgan-f16-256", device="meta")
    assert not on_meta.training
    sd = _random_state_dict(shapes, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_official(sd, "maskgit-vqgan-f16-256")
    own = model.state_dict()
    assert own.keys() == sd.keys() and all(torch.equal(own[k], sd[k]) for k in sd)
    # full size numerics on a small input (the model is fully convolutional): 64x64 -> 4x4 ids
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = model.encode(x)
        want_ids, want_rec = _ref_pretrained_tokenizer(sd, OFFICIAL_CONF, x)
        torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
        torch.testing.assert_close(model.decode(ids), want_rec, rtol=1e-4, atol=1e-4)


def test_load_official_from_safetensors_and_refuses_pickles(tmp_path):
    cfg = MASKGIT_VQGAN_SIZES["tiny"]
    sd = _random_state_dict(official_vqgan_shapes(official_conf(cfg), cfg.codebook_size))
    save_file(sd, str(tmp_path / "maskgit.safetensors"))
    from_file = load_official(tmp_path / "maskgit.safetensors", cfg)
    assert weights_digest(from_file) == weights_digest(load_official(sd, "tiny"))
    torch.save(sd, tmp_path / "maskgit-vqgan-imagenet-f16-256.bin")
    with pytest.raises(ValueError, match="pickle checkpoint.*weights_only=True"):
        load_official(tmp_path / "maskgit-vqgan-imagenet-f16-256.bin", cfg)
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "missing.safetensors", cfg)


# --------------------------------------------------------------------------------------------------
# Numerics against the official forward (tiny configs)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "tiny-f8"])
def test_tiny_numerics_match_official_forward(size):
    """(b) same weights -> same encoder output, ids, quantized codes, decoded images."""
    cfg = MASKGIT_VQGAN_SIZES[size]
    conf = official_conf(cfg)
    sd = _random_state_dict(official_vqgan_shapes(conf, cfg.codebook_size), seed=1)
    # codes near the encoder outputs, so the argmin is not decided by rounding
    sd["quantize.embedding.weight"] = torch.randn(cfg.codebook_size, cfg.z_channels,
                                                  generator=torch.Generator().manual_seed(2))
    model = load_official(sd, cfg)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.encode_latents(x)
        torch.testing.assert_close(z, _ref_encoder(sd, conf, x), rtol=1e-5, atol=1e-5)
        emb = sd["quantize.embedding.weight"]
        want_q, want_ids = _ref_quantize(emb, z)
        z_q, ids, _ = model.quantize(z)
        assert torch.equal(ids, want_ids) and torch.equal(model.encode(x), want_ids)
        torch.testing.assert_close(z_q, want_q)
        assert len(ids.unique()) > 1
        ref_ids, ref_rec = _ref_pretrained_tokenizer(sd, conf, x)
        assert torch.equal(ids, ref_ids)
        rec = model.decode(ids)
        torch.testing.assert_close(rec, ref_rec, rtol=1e-5, atol=1e-5)
        assert 0.0 <= float(rec.min()) and float(rec.max()) <= 1.0
        g = cfg.grid
        torch.testing.assert_close(model.decode(ids.reshape(3, g, g)), rec)  # (B, h, w) ids
        raw = model.decode_latents(want_q)
        torch.testing.assert_close(raw, _ref_decoder(sd, conf, want_q), rtol=1e-5, atol=1e-5)
    # forward: straight-through codes, official loss weighting, gradients reach the encoder
    recon, info = model.train()(x)
    want_loss = torch.mean((want_q - z) ** 2) + 0.25 * torch.mean((want_q - z) ** 2)
    torch.testing.assert_close(info["quantizer_loss"], want_loss)
    (recon.square().mean() + info["quantizer_loss"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_family_hooks_encode_and_decode_unit_pixels():
    spec = families.get("maskgit-vqgan")
    torch.manual_seed(0)
    model = spec.build("tiny").eval()
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = to_model_pixels(images, spec.pixel_range)
    with torch.inference_mode():
        ids = spec.encode(model, x)["indices"]
        assert ids.shape == (2, 64) and ids.dtype == torch.int64
        rec = spec.decode(model, ids, (8, 8))
        torch.testing.assert_close(rec, spec.decode(model, ids, None))
        with pytest.raises(ValueError, match="do not fill the token grid 4x4"):
            spec.decode(model, ids, (4, 4))
    pixels = from_model_pixels(rec, spec.pixel_range)
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == torch.uint8


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MaskGITVQGAN(MASKGIT_VQGAN_SIZES["tiny"]).eval()
    loaded = load_pretrained(save_pretrained(model, tmp_path / "m"), expected_family="maskgit-vqgan")
    assert type(loaded) is MaskGITVQGAN and loaded.config == model.config
    assert weights_digest(loaded) == weights_digest(model)


# --------------------------------------------------------------------------------------------------
# Legacy TiTok: tokens -> pixels through the stage-2 pixel decoder
# --------------------------------------------------------------------------------------------------


def _titok_official_state_dict(cfg, seed=0):
    from tests.unit.test_titok import _official_state_dict  # official TiTok names (+ pixel_*)

    sd = _official_state_dict(cfg, seed=seed)
    pd = cfg.pixel_decoder
    pixel = _random_state_dict(official_pixel_shapes(official_conf(pd), pd.codebook_size), seed)
    return {**sd, **pixel}


def test_legacy_titok_decodes_tokens_as_official():
    """(c) softmax over the 1024 logits, einsum with the pixel codebook, pixel decoder; the
    family's decode hook and the evaluate stage's decode_to_uint8 give uint8 RGB (B, H, W, 3)."""
    from pipelines.stages.evaluate_generation import decode_to_uint8

    cfg = titok.TITOK_SIZES["tiny-legacy"]
    pd = cfg.pixel_decoder
    assert cfg.is_legacy and pd == MASKGIT_VQGAN_SIZES["tiny-f8"]
    sd = _titok_official_state_dict(cfg, seed=4)
    model = titok.load_official(sd, cfg)
    tokens = torch.randint(0, cfg.codebook_size, (3, cfg.num_latent_tokens),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.tokens_to_latents(tokens)
        logits = model.decoder(z)
        assert logits.shape == (3, 1024, cfg.dec_grid, cfg.dec_grid)
        codes = torch.einsum("nchw,cd->ndhw", logits.softmax(1),
                             sd["pixel_quantize.embedding.weight"])  # official TiTok.decode
        want = _ref_decoder(sd, official_conf(pd), codes, p="pixel_decoder.")
        got = model.decode_tokens(tokens)
        assert got.shape == (3, 3, cfg.image_size, cfg.image_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert model(torch.rand(3, 3, 32, 32))[0].shape == want.shape  # forward = decode too
    spec = families.get("titok")
    with torch.inference_mode():
        rec = spec.decode(model, tokens, None)
    torch.testing.assert_close(rec, want, rtol=1e-5, atol=1e-5)
    images = decode_to_uint8(model, tokens, None)
    assert images.shape == (3, cfg.image_size, cfg.image_size, 3) and str(images.dtype) == "uint8"
    expect = from_model_pixels(want, "unit").numpy()
    assert abs(images.astype(int) - expect.astype(int)).max() <= 1


def test_released_titok_l32_state_dict_loads_with_nothing_dropped():
    """(c) TiTok-L-32 as released (stage 2: pixel_quantize.*, pixel_decoder.* included): names
    and shapes on meta tensors, a strict load on the meta device, no warning, no key left out."""
    from tests.unit.test_titok import _official_shapes

    cfg = titok.TITOK_SIZES["titok-l32"]
    shapes = _official_shapes(cfg)
    pixel = official_pixel_shapes(OFFICIAL_CONF, OFFICIAL_CODEBOOK)
    assert pixel.items() <= shapes.items() and len(pixel) == 1 + 88
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    mapped = titok.official_key_map(meta)
    assert len(mapped) == len(meta)
    assert {k: tuple(mapped[k].shape) for k in pixel} == pixel  # same names as released
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("error")
        model = titok.load_official(meta, "titok-l32", device="meta")
        out = model.decode_tokens(torch.zeros(2, 32, dtype=torch.long))
    assert out.shape == (2, 3, 256, 256)
    back = titok.inverse_official_key_map(model.state_dict())
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes


def test_legacy_titok_without_pixel_decoder_keys_is_refused():
    cfg = titok.TITOK_SIZES["tiny-legacy"]
    sd = _titok_official_state_dict(cfg)
    stage1 = {k: v for k, v in sd.items() if not k.startswith("pixel_")}
    with pytest.raises(ValueError, match="has no 'pixel_quantize.embedding.weight'.*finetune_decoder: false"):
        titok.load_official(stage1, cfg)
    bad = {**sd, "pixel_quantize.embedding.weight": torch.zeros(512, 16)}
    with pytest.raises(ValueError, match=r"'pixel_quantize.embedding.weight'.*\(512, 16\)"):
        titok.load_official(bad, cfg)
    with pytest.raises(ValueError, match="legacy_num_logits=1024"):
        titok.titok_config("tiny-legacy", pixel_decoder=maskgit_vqgan_config("tiny"))
    with pytest.raises(ValueError, match="upsamples 4x but.*dec_patch_size=8"):
        titok.titok_config("tiny-legacy",
                           pixel_decoder=maskgit_vqgan_config("tiny", codebook_size=1024))
    with pytest.raises(ValueError, match="single-stage TiTok has none"):
        titok.titok_config("tiny", pixel_decoder=maskgit_vqgan_config("tiny-f8"))


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def test_bad_state_dicts_name_the_key():
    """(d) another family's names, a missing key, a wrong shape, an empty dict."""
    cfg = MASKGIT_VQGAN_SIZES["tiny"]
    sd = _random_state_dict(official_vqgan_shapes(official_conf(cfg), cfg.codebook_size))
    titok_sd = _titok_official_state_dict(titok.TITOK_SIZES["tiny-legacy"])
    with pytest.raises(ValueError, match="'latent_tokens' is not a MaskGIT-VQGAN checkpoint key"):
        load_official(titok_sd, cfg)
    with pytest.raises(ValueError, match="'encoder.down.0.downsample.conv.weight' is not"):
        official_key_map({**sd, "encoder.down.0.downsample.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="empty"):
        official_key_map({})
    missing = {k: v for k, v in sd.items() if k != "decoder.up.1.upsample_conv.bias"}
    with pytest.raises(ValueError, match="'decoder.up.1.upsample_conv.bias' has no source"):
        load_official(missing, cfg)
    wrong = {**sd, "quantize.embedding.weight": torch.zeros(1024, 16)}
    with pytest.raises(ValueError, match=r"'quantize.embedding.weight'.*\(1024, 16\).*\(64, 16\)"):
        load_official(wrong, cfg)
    extra = {**sd, "encoder.down.9.block.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="'encoder.down.9.block.0.conv1.weight'"):
        load_official(extra, cfg)


def test_bad_images_and_ids_are_refused():
    model = MaskGITVQGAN(MASKGIT_VQGAN_SIZES["tiny"]).eval()
    with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 64\)"):
        model.decode(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match="square L"):
        model.decode(torch.zeros(1, 60, dtype=torch.long))
    with pytest.raises(ValueError, match="integer ids"):
        model.decode(torch.zeros(1, 64))
