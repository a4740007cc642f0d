"""TiTok and TA-TiTok: 1D tokenizers (ViT encoder -> K latent tokens -> VQ or VAE -> ViT decoder).

Spec: methods.md §1.1, §1.2, §1.6; reference: bytedance/1d-tokenizer `modeling/titok.py`,
`modeling/tatitok.py`, `modeling/modules/blocks.py` (TiTokEncoder, TiTokDecoder, TATiTokDecoder),
`modeling/quantizer/quantizer.py` (VectorQuantizer, DiagonalGaussianDistribution),
`configs/infer/**`.

Image convention (official): images are RGB in **[0, 1]** (the official demo divides uint8 by 255,
its losses say "inputs and reconstructions are in range [0, 1]"); decoded images are unbounded,
clamp them to [0, 1] for display (official demo_util.py `torch.clamp(generated_image, 0.0, 1.0)`).

Legacy (two-stage) TiTok (`is_legacy: True`; L-32 / B-64 / S-128): the ViT decoder's head returns
V = 1024 logits per patch over the MaskGIT-VQGAN codes, and the model also holds the stage-2 pixel
decoder exactly as the official TiTok with `finetune_decoder: True` does: `pixel_quantize` (the
MaskGIT-VQGAN codebook, V x D = 1024 x 256) and `pixel_decoder` (the MaskGIT-VQGAN conv Decoder,
`maskgit_vqgan.py`, config `TiTokConfig.pixel_decoder`). `decode` is the official `TiTok.decode`:

    logits (B, V, g, g) -> softmax over V -> einsum('nchw,cd->ndhw', p, codebook) (B, D, g, g)
    -> pixel_decoder -> RGB (B, 3, H, W), unclamped

(`model.decoder(z)` alone gives the logits, the stage-1 proxy-code target space.)

Latent layout (official "fake 2D"): z is (B, C, 1, K), C = token_size channels, K latent tokens.
Token ids are (B, K) int64 here (official: (B, 1, K); `decode_tokens` accepts both).

Shape legend: B batch, K latent tokens, C token_size, W transformer width, P = (H/p)**2 patches,
S sequence length, T text tokens (77), E text feature width, V codebook size, N = B*K, g = H/p
decoder patch grid, D MaskGIT-VQGAN code dimension.

`is_legacy` (official flag, default True there) selects two things at once, as in the official
code: the legacy 1024-logit head, and the legacy encoder output reshape, which reinterprets the
(B, K, W) latent outputs as (B, W, K) without a transpose (so a checkpoint trained that way only
works with it). Single-stage models (`is_legacy: False`) transpose properly and predict RGB.

Official checkpoint key mapping (`official_key_map`; `inverse_official_key_map` undoes it). Pure
renames, every shape is unchanged. `{m}` is `encoder` or `decoder`, `{i}` a block index:

    official key                                  vgen key
    latent_tokens                                 encoder.latent_tokens
    encoder.patch_embed.{weight,bias}             encoder.patch_embed.{weight,bias}
    encoder.class_embedding                       encoder.cls_token
    encoder.positional_embedding                  encoder.patch_pos
    encoder.latent_token_positional_embedding     encoder.latent_pos
    encoder.conv_out.*                            encoder.to_tokens.*
    {m}.ln_pre.* / {m}.ln_post.*                  {m}.ln_pre.* / {m}.ln_post.*
    {m}.transformer.{i}.ln_1.*                    {m}.blocks.{i}.norm1.*
    {m}.transformer.{i}.attn.in_proj_weight       {m}.blocks.{i}.attn.qkv.weight
    {m}.transformer.{i}.attn.in_proj_bias         {m}.blocks.{i}.attn.qkv.bias
    {m}.transformer.{i}.attn.out_proj.*           {m}.blocks.{i}.attn.proj.*
    {m}.transformer.{i}.ln_2.*                    {m}.blocks.{i}.norm2.*
    {m}.transformer.{i}.mlp.c_fc.*                {m}.blocks.{i}.mlp.fc1.*
    {m}.transformer.{i}.mlp.c_proj.*              {m}.blocks.{i}.mlp.fc2.*
    quantize.embedding.weight                     quantizer.codebook.weight
    quantize.embed_prob                           quantizer.code_usage      (clustering_vq only)
    decoder.decoder_embed.*                       decoder.token_embed.*
    decoder.class_embedding                       decoder.cls_token
    decoder.positional_embedding                  decoder.patch_pos
    decoder.mask_token                            decoder.mask_token
    decoder.latent_token_positional_embedding     decoder.latent_pos
    decoder.ffn.0.*                               decoder.head.proj.*
    decoder.ffn.2.*                               decoder.head.logits.*     (legacy head)
    decoder.conv_out.*                            decoder.head.conv_out.*   (RGB head)
    decoder.text_guidance_proj.*                  decoder.text_proj.*       (TA-TiTok)
    decoder.text_guidance_positional_embedding    decoder.text_pos          (TA-TiTok)
    pixel_quantize.embedding.weight               pixel_quantize.embedding.weight  (legacy, V x D)
    pixel_decoder.*                               pixel_decoder.*  (legacy; MaskGIT-VQGAN Decoder
                                                  names, see maskgit_vqgan.py)

Nothing is dropped. Stage-1 legacy checkpoints (`finetune_decoder: False`) carry no `pixel_*`
tensors and so do not load into a legacy config (the loader names the first missing key).

Checkpoints are read from safetensors only. The HF Hub repos (`yucornetto/tokenizer_titok_*`,
`turkeyju/tokenizer_tatitok_*`) ship `model.safetensors`; the `.bin` files (e.g. fun-research/TiTok)
are pickles and must be converted once, in a trusted environment, before `load_official`:

    import torch; from safetensors.torch import save_file
    sd = torch.load("tokenizer_titok_l32.bin", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, "tokenizer_titok_l32.safetensors")

Deviations from the official code, on purpose:
- Attention is a fused qkv Linear + `scaled_dot_product_attention` (same weights and math as
  `nn.MultiheadAttention`); no einops.
- Clustering VQ (CVQ-VAE dead-code update) uses the local batch unless a trainer sets
  `quantizer.gather_fn` (the official all-gathers with accelerate).
- The VAE posterior is returned as tensors (mean, logvar) plus `kl_loss` (sum / B, as the official
  loss reduces it) and `quantizer_loss = kl_weight * kl_loss`, so trainers add `quantizer_loss` in
  both modes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file
from torch import Tensor, nn

from vgen_core.families import FamilySpec
from vgen_core.tokenizers.maskgit_vqgan import (
    Decoder as PixelDecoder,
    MaskGITVQGANConfig,
    VectorQuantizer as PixelQuantizer,
    maskgit_vqgan_config,
)

from ._vit import Attention as _Attention, Block as _Block


__all__ = [
    "TATiTok",
    "TATiTokConfig",
    "TITOK_SIZES",
    "TiTok",
    "TiTokConfig",
    "VectorQuantizer",
    "config_from_official",
    "inverse_official_key_map",
    "load_official",
    "official_key_map",
    "titok_config",
]

# --------------------------------------------------------------------------------------------------
# Config and size registry
# --------------------------------------------------------------------------------------------------


class TiTokConfig(BaseModel):
    """TiTok config; `build()` makes the model. Defaults = TiTok-L-32 (official titok_l32.yaml)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(256, ge=1)  # official dataset.preprocessing.crop_size
    enc_patch_size: int = Field(16, ge=1)
    dec_patch_size: int = Field(16, ge=1)
    enc_width: int = Field(1024, ge=1)
    enc_layers: int = Field(24, ge=1)
    enc_heads: int = Field(16, ge=1)
    dec_width: int = Field(1024, ge=1)
    dec_layers: int = Field(24, ge=1)
    dec_heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    num_latent_tokens: int = Field(32, ge=1)
    token_size: int = Field(12, ge=1)
    quantize_mode: Literal["vq", "vae"] = "vq"
    codebook_size: int = Field(4096, ge=2)
    use_l2_norm: bool = True
    commitment_cost: float = Field(0.25, ge=0.0)
    clustering_vq: bool = False
    clustering_decay: float = Field(0.99, gt=0.0, lt=1.0)
    kl_weight: float = Field(1e-6, ge=0.0)
    is_legacy: bool = True
    legacy_num_logits: int = Field(1024, ge=2)  # MaskGIT-VQGAN codebook (proxy codes)
    # legacy only: the stage-2 MaskGIT-VQGAN pixel decoder (official: TiTok.pixel_decoder, the
    # f16-256 config); left unset, a legacy config gets the official one, a single-stage none
    pixel_decoder: MaskGITVQGANConfig | None = None
    scale_factor: float = Field(1.0, gt=0.0)  # generator-side latent scale (MaskGen-KL: 0.7525)

    @model_validator(mode="before")
    @classmethod
    def _default_pixel_decoder(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("pixel_decoder") is None:
            legacy = data.get("is_legacy", cls.model_fields["is_legacy"].default)
            if legacy:
                data = {**data, "pixel_decoder": _OFFICIAL_PIXEL_DECODER}
        return data

    @model_validator(mode="after")
    def _check(self) -> TiTokConfig:
        for name in ("enc_patch_size", "dec_patch_size"):
            p = getattr(self, name)
            if self.image_size % p:
                raise ValueError(f"image_size={self.image_size} is not a multiple of {name}={p}.")
        for part in ("enc", "dec"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if width % heads:
                raise ValueError(f"{part}_width={width} must be divisible by {part}_heads={heads}.")
        if self.clustering_vq and self.quantize_mode != "vq":
            raise ValueError("clustering_vq needs quantize_mode='vq'; set clustering_vq=False.")
        self._check_pixel_decoder()
        return self

    def _check_pixel_decoder(self) -> None:
        pd = self.pixel_decoder
        if not self.is_legacy:
            if pd is not None:
                raise ValueError("pixel_decoder is the legacy (is_legacy: true) stage-2 decoder; "
                                 "a single-stage TiTok has none: drop pixel_decoder.")
            return
        assert pd is not None  # filled in by _default_pixel_decoder
        if pd.codebook_size != self.legacy_num_logits:
            raise ValueError(f"pixel_decoder.codebook_size={pd.codebook_size} must equal "
                             f"legacy_num_logits={self.legacy_num_logits} (the head's softmax is "
                             "over the pixel decoder's codes).")
        if pd.downsample_factor != self.dec_patch_size:  # (its image_size is nominal: conv)
            raise ValueError(
                f"pixel_decoder upsamples {pd.downsample_factor}x but must turn each decoder "
                f"patch into dec_patch_size={self.dec_patch_size} pixels (2 ** (len(channel_mult) "
                "- 1) must equal dec_patch_size)."
            )

    @property
    def enc_grid(self) -> int:
        return self.image_size // self.enc_patch_size

    @property
    def dec_grid(self) -> int:
        return self.image_size // self.dec_patch_size

    @property
    def latent_channels(self) -> int:
        """Encoder output channels: token_size, or 2 * token_size (mean, logvar) in VAE mode."""
        return self.token_size * (2 if self.quantize_mode == "vae" else 1)

    def build(self) -> TiTok:
        return TiTok(self)


class TATiTokConfig(TiTokConfig):
    """TA-TiTok config: TiTok plus text features fed to the decoder (CLIP ViT-L/14: 77 x 768)."""

    text_context_length: int = Field(77, ge=1)
    text_embed_dim: int = Field(768, ge=1)
    is_legacy: bool = False

    def build(self) -> TATiTok:
        return TATiTok(self)


# modeling/titok.py TiTok.__init__ (finetune_decoder): Pixel_Decoder(f16-256), 1024 x 256 codes.
_OFFICIAL_PIXEL_DECODER = maskgit_vqgan_config("maskgit-vqgan-f16-256")

# width, layers, heads of the official "small" / "base" / "large" ViTs (blocks.py).
_VIT = {"S": (512, 8, 8), "B": (768, 12, 12), "L": (1024, 24, 16)}


def _arch(enc: str, dec: str) -> dict[str, int]:
    (ew, el, eh), (dw, dl, dh) = _VIT[enc], _VIT[dec]
    return dict(
        enc_width=ew, enc_layers=el, enc_heads=eh, dec_width=dw, dec_layers=dl, dec_heads=dh
    )


_LEGACY = dict(codebook_size=4096, token_size=12, use_l2_norm=True, is_legacy=True)
_VQ8K = dict(codebook_size=8192, token_size=64, use_l2_norm=False, is_legacy=False)
_VAE16 = dict(quantize_mode="vae", token_size=16, is_legacy=False)
_TINY = dict(
    image_size=32, enc_patch_size=8, dec_patch_size=8, enc_width=32, enc_layers=2, enc_heads=2,
    dec_width=32, dec_layers=2, dec_heads=2, num_latent_tokens=8, token_size=8,
    codebook_size=64, use_l2_norm=False, is_legacy=False,
)  # fmt: skip
_TINY_TEXT = dict(text_context_length=8, text_embed_dim=16)

TITOK_SIZES: dict[str, TiTokConfig] = {
    # CPU-test sizes: 32x32 images, 4x4 patches of 8 px, width 32, 2 layers, K=8 tokens.
    "tiny": TiTokConfig(**_TINY),
    "tiny-vae": TiTokConfig(**{**_TINY, "quantize_mode": "vae"}),
    "tiny-legacy": TiTokConfig(**{**_TINY, "is_legacy": True, "use_l2_norm": True},
                               pixel_decoder=maskgit_vqgan_config("tiny-f8")),
    "tatitok-tiny": TATiTokConfig(**_TINY, **_TINY_TEXT, clustering_vq=True),
    "tatitok-tiny-vae": TATiTokConfig(**{**_TINY, "quantize_mode": "vae"}, **_TINY_TEXT),
    # Two-stage TiTok (configs/infer/TiTok/titok_{l32,b64,s128}.yaml): 4096 x 12, l2-norm, legacy.
    "titok-l32": TiTokConfig(num_latent_tokens=32, **_arch("L", "L"), **_LEGACY),
    "titok-b64": TiTokConfig(num_latent_tokens=64, **_arch("B", "B"), **_LEGACY),
    "titok-s128": TiTokConfig(num_latent_tokens=128, **_arch("S", "S"), **_LEGACY),
    # Single-stage TiTok, RGB head (titok_{bl64,bl128,sl256}_vq8k.yaml, titok_*_vae_c16.yaml).
    "titok-bl64-vq": TiTokConfig(num_latent_tokens=64, **_arch("B", "L"), **_VQ8K),
    "titok-bl128-vq": TiTokConfig(num_latent_tokens=128, **_arch("B", "L"), **_VQ8K),
    "titok-sl256-vq": TiTokConfig(num_latent_tokens=256, **_arch("S", "L"), **_VQ8K),
    "titok-ll32-vae": TiTokConfig(num_latent_tokens=32, **_arch("L", "L"), **_VAE16),
    "titok-bl64-vae": TiTokConfig(num_latent_tokens=64, **_arch("B", "L"), **_VAE16),
    "titok-bl128-vae": TiTokConfig(num_latent_tokens=128, **_arch("B", "L"), **_VAE16),
    # TA-TiTok (configs/infer/TA-TiTok/*.yaml): VQ 8192 x 64, or VAE 16 ch. The released VQ
    # checkpoints (tatitok_bl{32,64,128}_vq) have no `quantize.embed_prob`: their inference configs
    # set clustering_vq: False (since 1d-tokenizer@1825229), only the training configs
    # (configs/training/TA-TiTok/tatitok_bl*_vq.yaml) use True. To train as officially, pass
    # titok_config("tatitok-bl128-vq", clustering_vq=True).
    **{
        f"tatitok-bl{k}-vq": TATiTokConfig(num_latent_tokens=k, **_arch("B", "L"), **_VQ8K)
        for k in (32, 64, 128)
    },
    # MaskGen-KL uses tatitok-bl32-vae latents x 0.7525 (configs/infer/MaskGen/maskgen_kl_*.yaml).
    "tatitok-bl32-vae": TATiTokConfig(
        num_latent_tokens=32, scale_factor=0.7525, **_arch("B", "L"), **_VAE16
    ),
    "tatitok-bl64-vae": TATiTokConfig(num_latent_tokens=64, **_arch("B", "L"), **_VAE16),
    "tatitok-sl128-vae": TATiTokConfig(num_latent_tokens=128, **_arch("S", "L"), **_VAE16),
}


def titok_config(size: str, **overrides: Any) -> TiTokConfig:
    """Config for a registered size, with field overrides (validated); keeps TiTok vs TA-TiTok."""
    if size not in TITOK_SIZES:
        raise ValueError(f"TiTok size '{size}' not found; known: {', '.join(TITOK_SIZES)}.")
    base = TITOK_SIZES[size]
    return type(base).model_validate({**base.model_dump(), **overrides})


def config_from_official(official: Mapping[str, Any], *, text_aware: bool = False) -> TiTokConfig:
    """Official OmegaConf dict ({'model': {'vq_model': ...}, 'dataset': ...}) -> config.

    `text_aware=True` gives a TATiTokConfig (the official config does not say which class it is).
    Missing keys take the official defaults (quantize_mode 'vq', is_legacy True, ...).
    """
    vq = dict(official["model"]["vq_model"])
    crop = official.get("dataset", {}).get("preprocessing", {}).get("crop_size", 256)
    mode = vq.get("quantize_mode", "vq")
    sizes = {"small": "S", "base": "B", "large": "L"}
    fields: dict[str, Any] = dict(
        image_size=crop,
        enc_patch_size=vq["vit_enc_patch_size"],
        dec_patch_size=vq["vit_dec_patch_size"],
        num_latent_tokens=vq["num_latent_tokens"],
        token_size=vq["token_size"],
        quantize_mode=mode,
        is_legacy=vq.get("is_legacy", True),
        scale_factor=vq.get("scale_factor", 1.0),
        **_arch(sizes[vq["vit_enc_model_size"]], sizes[vq["vit_dec_model_size"]]),
    )
    if mode == "vq":
        fields.update(
            codebook_size=vq["codebook_size"],
            use_l2_norm=vq["use_l2_norm"],
            commitment_cost=vq.get("commitment_cost", 0.25),
            clustering_vq=vq.get("clustering_vq", False),
        )
    if text_aware:
        fields.update(
            text_context_length=vq.get("text_context_length", 77),
            text_embed_dim=vq.get("text_embed_dim", 768),
        )
        return TATiTokConfig(**fields)
    return TiTokConfig(**fields)


# --------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------


class _ViT(nn.Module):
    """ln_pre -> blocks -> (caller slices) -> ln_post, shared by encoder and decoder."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([_Block(width, heads, mlp_ratio) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)

    def _run(self, x_BSW: Tensor) -> Tensor:
        x_BSW = self.ln_pre(x_BSW)
        for block in self.blocks:
            x_BSW = block(x_BSW)
        return x_BSW


def _param(*shape: int, width: int) -> nn.Parameter:
    return nn.Parameter(width**-0.5 * torch.randn(*shape))


class _Encoder(_ViT):
    """Images (B, 3, H, W) in [0, 1] -> pre-quantization latents (B, latent_channels, 1, K)."""

    def __init__(self, cfg: TiTokConfig) -> None:
        W, K, P = cfg.enc_width, cfg.num_latent_tokens, cfg.enc_grid**2
        super().__init__(W, cfg.enc_layers, cfg.enc_heads, cfg.mlp_ratio)
        self.is_legacy = cfg.is_legacy
        self.patch_embed = nn.Conv2d(3, W, cfg.enc_patch_size, stride=cfg.enc_patch_size)
        self.cls_token = _param(1, W, width=W)
        self.patch_pos = _param(P + 1, W, width=W)
        self.latent_tokens = _param(K, W, width=W)
        self.latent_pos = _param(K, W, width=W)
        self.to_tokens = nn.Conv2d(W, cfg.latent_channels, 1)

    def forward(self, images_BCHW: Tensor) -> Tensor:
        B = images_BCHW.shape[0]
        x_BPW = self.patch_embed(images_BCHW).flatten(2).transpose(1, 2)
        W, K = x_BPW.shape[-1], self.latent_tokens.shape[0]
        x_BSW = torch.cat([self.cls_token.expand(B, 1, W).to(x_BPW.dtype), x_BPW], dim=1)
        x_BSW = x_BSW + self.patch_pos.to(x_BSW.dtype)
        lat_BKW = (self.latent_tokens + self.latent_pos).to(x_BSW.dtype).expand(B, K, W)
        x_BSW = self._run(torch.cat([x_BSW, lat_BKW], dim=1))
        lat_BKW = self.ln_post(x_BSW[:, -K:])
        if self.is_legacy:  # official legacy: reinterpret memory, no transpose
            h_BWK1 = lat_BKW.reshape(B, W, K, 1)
        else:
            h_BWK1 = lat_BKW.transpose(1, 2).unsqueeze(-1)
        return self.to_tokens(h_BWK1).reshape(B, -1, 1, K)


class _LegacyHead(nn.Module):
    """1x1 conv -> tanh -> 1x1 conv to `num_logits` MaskGIT-VQGAN code logits per patch."""

    def __init__(self, width: int, num_logits: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(width, 2 * width, 1)
        self.logits = nn.Conv2d(2 * width, num_logits, 1)

    def forward(self, x_BWgg: Tensor) -> Tensor:
        return self.logits(torch.tanh(self.proj(x_BWgg)))


class _PixelHead(nn.Module):
    """1x1 conv to p*p*3, unpatchify with channel order (p1 p2 c) as the official einops
    'b (p1 p2 c) h w -> b c (h p1) (w p2)' (not torch.pixel_shuffle's (c p1 p2)), 3x3 conv."""

    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(width, patch * patch * 3, 1)
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x_BWgg: Tensor) -> Tensor:
        y = self.proj(x_BWgg)
        B, _, g, _ = y.shape
        p = self.patch
        y = y.view(B, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2).reshape(B, 3, g * p, g * p)
        return self.conv_out(y)


class _Decoder(_ViT):
    """Latents (B, C, 1, K) [+ text (B, T, E)] -> RGB (B, 3, H, W) or logits (B, 1024, g, g)."""

    def __init__(self, cfg: TiTokConfig) -> None:
        W, K, P = cfg.dec_width, cfg.num_latent_tokens, cfg.dec_grid**2
        super().__init__(W, cfg.dec_layers, cfg.dec_heads, cfg.mlp_ratio)
        self.grid = cfg.dec_grid
        self.token_embed = nn.Linear(cfg.token_size, W)
        self.cls_token = _param(1, W, width=W)
        self.patch_pos = _param(P + 1, W, width=W)
        self.mask_token = _param(1, 1, W, width=W)
        self.latent_pos = _param(K, W, width=W)
        self.head: nn.Module = (
            _LegacyHead(W, cfg.legacy_num_logits)
            if cfg.is_legacy
            else _PixelHead(W, cfg.dec_patch_size)
        )
        if isinstance(cfg, TATiTokConfig):
            self.text_proj = nn.Linear(cfg.text_embed_dim, W)
            self.text_pos = _param(cfg.text_context_length, W, width=W)

    def forward(self, z_BC1K: Tensor, text_BTE: Tensor | None = None) -> Tensor:
        B, C, _, K = z_BC1K.shape
        x_BKW = self.token_embed(z_BC1K.reshape(B, C, K).transpose(1, 2))
        W, P = x_BKW.shape[-1], self.grid**2
        slots_BSW = torch.cat(
            [self.cls_token.expand(B, 1, W), self.mask_token.expand(B, P, W)], dim=1
        ).to(x_BKW.dtype) + self.patch_pos.to(x_BKW.dtype)
        parts = [slots_BSW, x_BKW + self.latent_pos[:K].to(x_BKW.dtype)]
        if text_BTE is not None:
            parts.append(self.text_proj(text_BTE.to(x_BKW.dtype)) + self.text_pos.to(x_BKW.dtype))
        x_BSW = self._run(torch.cat(parts, dim=1))
        x_BPW = self.ln_post(x_BSW[:, 1 : 1 + P])
        x_BWgg = x_BPW.transpose(1, 2).reshape(B, W, self.grid, self.grid)
        return self.head(x_BWgg.contiguous())


# --------------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """VQ with fp32 L2 argmin, optional l2-normalised (cosine) codes and clustering VQ.

    Losses, as the official quantizer writes them (z, q l2-normalised first when use_l2_norm):
        commitment_loss = commitment_cost * mean((sg(q) - z)**2)
        codebook_loss   = mean((q - sg(z))**2)
        quantizer_loss  = commitment_loss + codebook_loss
    and the output is z + sg(q - z) (straight-through). With `clustering_vq`, in training mode each
    code's usage is tracked by EMA(decay) and rarely used codes are pulled toward their nearest
    batch feature (CVQ-VAE). `gather_fn`, if a trainer sets it, all-gathers across ranks first.
    """

    gather_fn: Callable[[Tensor], Tensor] | None
    code_usage: Tensor  # buffer, registered only when clustering_vq

    def __init__(
        self,
        codebook_size: int,
        token_size: int,
        commitment_cost: float = 0.25,
        use_l2_norm: bool = False,
        clustering_vq: bool = False,
        clustering_decay: float = 0.99,
    ) -> None:
        super().__init__()
        self.codebook_size, self.token_size = codebook_size, token_size
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.clustering_vq, self.clustering_decay = clustering_vq, clustering_decay
        self.codebook = nn.Embedding(codebook_size, token_size)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if clustering_vq:
            self.register_buffer("code_usage", torch.zeros(codebook_size))
        self.gather_fn = None

    def codes(self, ids: Tensor) -> Tensor:
        """Code vectors for int64 ids (...,) -> (..., C); l2-normalised when use_l2_norm."""
        q = self.codebook(ids)
        return F.normalize(q, dim=-1) if self.use_l2_norm else q

    def forward(self, z_BC1K: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """z (B, C, 1, K) -> (z_quantized (B, C, 1, K) fp32, dict).

        dict: 'min_encoding_indices' (B, K) int64, 'quantizer_loss', 'commitment_loss',
        'codebook_loss' (scalars, fp32).
        """
        B, C, _, K = z_BC1K.shape
        with _no_autocast(z_BC1K.device):
            z_NC = z_BC1K.float().reshape(B, C, K).transpose(1, 2).reshape(B * K, C)
            unnormed_z_NC = z_NC
            emb_VC = self.codebook.weight.float()
            if self.use_l2_norm:
                z_NC, emb_VC = F.normalize(z_NC, dim=-1), F.normalize(emb_VC, dim=-1)
            with torch.no_grad():  # distances need no graph (N x V would be kept for backward)
                d_NV = (
                    z_NC.pow(2).sum(1, keepdim=True) + emb_VC.pow(2).sum(1) - 2.0 * z_NC @ emb_VC.T
                )
                ids_N = d_NV.argmin(dim=1)
            q_NC = emb_VC[ids_N]  # = official get_codebook_entry (row-wise normalise commutes)
            commitment = self.commitment_cost * torch.mean((q_NC.detach() - z_NC) ** 2)
            codebook = torch.mean((q_NC - z_NC.detach()) ** 2)
            if self.clustering_vq and self.training:
                self._cluster_update(ids_N, d_NV, unnormed_z_NC.detach())
            q_NC = z_NC + (q_NC - z_NC).detach()
        z_q = q_NC.reshape(B, K, C).transpose(1, 2).reshape(B, C, 1, K)
        return z_q, {
            "quantizer_loss": commitment + codebook,
            "commitment_loss": commitment,
            "codebook_loss": codebook,
            "min_encoding_indices": ids_N.reshape(B, K),
        }

    @torch.no_grad()
    def _cluster_update(self, ids_N: Tensor, d_NV: Tensor, z_NC: Tensor) -> None:
        gather = self.gather_fn or (lambda t: t)
        ids_N, d_NV, z_NC = gather(ids_N), gather(d_NV), gather(z_NC)
        V, decay = self.codebook_size, self.clustering_decay
        usage_V = torch.zeros(V, device=ids_N.device).index_add_(
            0, ids_N, torch.ones(ids_N.shape, device=ids_N.device)
        ) / ids_N.numel()
        self.code_usage.mul_(decay).add_(usage_V, alpha=1.0 - decay)
        nearest_VC = z_NC[d_NV.argmin(dim=0)]
        w_V1 = torch.exp(-(self.code_usage * V * 10) / (1 - decay) - 1e-3).unsqueeze(1)
        # `.data`: the official overwrites the weight outside autograd's version tracking.
        w = self.codebook.weight.data
        w.copy_(w * (1 - w_V1) + nearest_VC.to(w.dtype) * w_V1)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast off (quantization runs in fp32); a no-op on devices without autocast (meta)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _gaussian_posterior(
    moments_B2C1K: Tensor, kl_weight: float, sample: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diagonal Gaussian over (mean, logvar) channel halves; logvar clamped to [-30, 20] (fp32)."""
    mean, logvar = torch.chunk(moments_B2C1K.float(), 2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
    kl_BK = 0.5 * torch.sum(mean**2 + logvar.exp() - 1.0 - logvar, dim=[1, 2])
    kl_loss = kl_BK.sum() / kl_BK.shape[0]
    return z, {
        "posterior_mean": mean,
        "posterior_logvar": logvar,
        "kl_loss": kl_loss,
        "quantizer_loss": kl_weight * kl_loss,
    }


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class TiTok(nn.Module):
    """TiTok: images (B, 3, H, W) in [0, 1] <-> K 1D tokens (VQ ids or VAE latents).

    A legacy TiTok also holds the stage-2 MaskGIT-VQGAN pixel decoder (`pixel_quantize`,
    `pixel_decoder`; see the module docstring), so every TiTok decodes to RGB.
    Reconstruction / perceptual / GAN / proxy-code losses belong to the training step.
    """

    family: ClassVar[str] = "titok"
    config_class: ClassVar[type[BaseModel]] = TiTokConfig

    def __init__(self, config: TiTokConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.apply(_init_weights)
        self.quantizer: VectorQuantizer | None = None
        if config.quantize_mode == "vq":
            self.quantizer = VectorQuantizer(
                config.codebook_size,
                config.token_size,
                commitment_cost=config.commitment_cost,
                use_l2_norm=config.use_l2_norm,
                clustering_vq=config.clustering_vq,
                clustering_decay=config.clustering_decay,
            )
        # official: created after _init_weights, so they keep their own init (uniform codebook)
        self.pixel_quantize: PixelQuantizer | None = None
        self.pixel_decoder: PixelDecoder | None = None
        if config.is_legacy:
            pd = config.pixel_decoder
            assert pd is not None  # TiTokConfig fills it in for legacy configs
            self.pixel_quantize = PixelQuantizer(
                pd.codebook_size, pd.z_channels, pd.commitment_cost
            )
            self.pixel_decoder = PixelDecoder(pd)

    @property
    def num_latent_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def encode(
        self, images_BCHW: Tensor, *, sample_posterior: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Images (B, 3, H, W) in [0, 1] -> (z (B, C, 1, K) fp32, dict).

        VQ: z is quantized (straight-through); dict holds 'min_encoding_indices' (B, K) int64 and
        'quantizer_loss', 'commitment_loss', 'codebook_loss'. VAE: z is a posterior sample (the
        mean when `sample_posterior=False`); dict holds 'posterior_mean', 'posterior_logvar'
        (B, C, 1, K), 'kl_loss' (sum / B) and 'quantizer_loss' = kl_weight * kl_loss.
        """
        cfg = self.config
        want = (3, cfg.image_size, cfg.image_size)
        if images_BCHW.ndim != 4 or tuple(images_BCHW.shape[1:]) != want:
            raise ValueError(
                f"encode expects images (B, 3, {cfg.image_size}, {cfg.image_size}) in [0, 1], got "
                f"{tuple(images_BCHW.shape)}; resize or crop to image_size first."
            )
        moments = self.encoder(images_BCHW)
        if self.quantizer is not None:
            return self.quantizer(moments)
        return _gaussian_posterior(moments, cfg.kl_weight, sample_posterior)

    def _check_latents(self, z_BC1K: Tensor) -> Tensor:
        want = (self.config.token_size, 1, self.config.num_latent_tokens)
        if z_BC1K.ndim != 4 or tuple(z_BC1K.shape[1:]) != want:
            raise ValueError(
                f"decode expects z (B, {', '.join(map(str, want))}), got {tuple(z_BC1K.shape)}."
            )
        return z_BC1K.to(self.decoder.token_embed.weight.dtype)

    def logits_to_pixels(self, logits_BVgg: Tensor) -> Tensor:
        """Legacy: proxy-code logits (B, V, g, g) -> RGB (B, 3, H, W), unclamped, as the official
        `TiTok.decode`: softmax over V, einsum with the pixel codebook (V, D) -> soft codes
        (B, D, g, g), MaskGIT-VQGAN pixel decoder."""
        if self.pixel_quantize is None or self.pixel_decoder is None:
            raise ValueError("logits_to_pixels needs a legacy TiTok (is_legacy: true); a "
                             "single-stage TiTok's decoder already returns RGB.")
        codes_BDgg = torch.einsum(
            "nchw,cd->ndhw", logits_BVgg.softmax(1), self.pixel_quantize.embedding.weight
        )
        return self.pixel_decoder(codes_BDgg)

    def _head_to_pixels(self, decoded: Tensor) -> Tensor:
        return self.logits_to_pixels(decoded) if self.pixel_decoder is not None else decoded

    def decode(self, z_BC1K: Tensor) -> Tensor:
        """z (B, C, 1, K) -> RGB (B, 3, H, W), ~[0, 1] unclamped (legacy: through the pixel
        decoder, see `logits_to_pixels`; `self.decoder(z)` gives the (B, V, g, g) logits)."""
        return self._head_to_pixels(self.decoder(self._check_latents(z_BC1K)))

    def tokens_to_latents(self, tokens: Tensor) -> Tensor:
        """VQ ids (B, K) or official (B, 1, K) int -> z (B, C, 1, K); VAE: latents pass through."""
        if self.quantizer is None:
            return tokens
        ids_BK = tokens.squeeze(1) if tokens.ndim == 3 else tokens
        K, V = self.config.num_latent_tokens, self.config.codebook_size
        if ids_BK.ndim != 2 or ids_BK.shape[1] != K or ids_BK.dtype.is_floating_point:
            raise ValueError(
                f"decode_tokens expects int ids (B, {K}), got {ids_BK.dtype} {tuple(tokens.shape)}."
            )
        checkable = ids_BK.numel() and ids_BK.device.type != "meta"  # meta: shapes only
        if checkable and (int(ids_BK.min()) < 0 or int(ids_BK.max()) >= V):
            raise ValueError(
                f"decode_tokens: ids must lie in [0, {V}), got [{int(ids_BK.min())}, "
                f"{int(ids_BK.max())}]; were they made by a tokenizer with this codebook?"
            )
        return self.quantizer.codes(ids_BK.long()).transpose(1, 2).unsqueeze(2)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """VQ ids (B, K) int64 (or VAE latents (B, C, 1, K)) -> decoder output, as `decode`."""
        return self.decode(self.tokens_to_latents(tokens))

    def forward(self, images_BCHW: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruct: images (B, 3, H, W) in [0, 1] -> (decoder output, encode's dict)."""
        z, result = self.encode(images_BCHW)
        return self.decode(z), result


class TATiTok(TiTok):
    """TA-TiTok: TiTok whose decoder also attends to text features (B, T=77, E=768) (CLIP
    ViT-L/14 final-layer features after ln_final), appended after the latent tokens."""

    family: ClassVar[str] = "tatitok"
    config_class: ClassVar[type[BaseModel]] = TATiTokConfig
    config: TATiTokConfig

    def _check_text(self, text_BTE: Tensor, batch: int) -> Tensor:
        cfg = self.config
        want = (batch, cfg.text_context_length, cfg.text_embed_dim)
        if tuple(text_BTE.shape) != want:
            raise ValueError(f"TA-TiTok expects text features {want}, got {tuple(text_BTE.shape)}.")
        return text_BTE

    def decode(self, z_BC1K: Tensor, text_BTE: Tensor) -> Tensor:  # type: ignore[override]
        """z (B, C, 1, K), text (B, T, E) -> RGB (B, 3, H, W)."""
        z_BC1K = self._check_latents(z_BC1K)
        decoded = self.decoder(z_BC1K, self._check_text(text_BTE, z_BC1K.shape[0]))
        return self._head_to_pixels(decoded)

    def decode_tokens(self, tokens: Tensor, text_BTE: Tensor) -> Tensor:  # type: ignore[override]
        return self.decode(self.tokens_to_latents(tokens), text_BTE)

    def forward(  # type: ignore[override]
        self, images_BCHW: Tensor, text_BTE: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        z, result = self.encode(images_BCHW)
        return self.decode(z, text_BTE), result


def _init_weights(m: nn.Module) -> None:
    """Official init: trunc-normal(0.02) Linear/Conv weights, zero biases, unit LayerNorms; the
    attention in-projection keeps nn.MultiheadAttention's xavier-uniform."""
    if isinstance(m, _Attention):
        nn.init.xavier_uniform_(m.qkv.weight)
    elif isinstance(m, (nn.Linear, nn.Conv2d)):  # apply() visits children before _Attention
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------------

# (official, vgen): exact keys, or prefixes when ending in '.'; block keys are handled by _BLOCK_RE.
_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("latent_tokens", "encoder.latent_tokens"),
    ("encoder.patch_embed.", "encoder.patch_embed."),
    ("encoder.class_embedding", "encoder.cls_token"),
    ("encoder.positional_embedding", "encoder.patch_pos"),
    ("encoder.latent_token_positional_embedding", "encoder.latent_pos"),
    ("encoder.conv_out.", "encoder.to_tokens."),
    ("encoder.ln_pre.", "encoder.ln_pre."),
    ("encoder.ln_post.", "encoder.ln_post."),
    ("quantize.embedding.weight", "quantizer.codebook.weight"),
    ("quantize.embed_prob", "quantizer.code_usage"),
    ("decoder.decoder_embed.", "decoder.token_embed."),
    ("decoder.class_embedding", "decoder.cls_token"),
    ("decoder.positional_embedding", "decoder.patch_pos"),
    ("decoder.mask_token", "decoder.mask_token"),
    ("decoder.latent_token_positional_embedding", "decoder.latent_pos"),
    ("decoder.ln_pre.", "decoder.ln_pre."),
    ("decoder.ln_post.", "decoder.ln_post."),
    ("decoder.ffn.0.", "decoder.head.proj."),
    ("decoder.ffn.2.", "decoder.head.logits."),
    ("decoder.conv_out.", "decoder.head.conv_out."),
    ("decoder.text_guidance_proj.", "decoder.text_proj."),
    ("decoder.text_guidance_positional_embedding", "decoder.text_pos"),
    ("pixel_quantize.", "pixel_quantize."),
    ("pixel_decoder.", "pixel_decoder."),
)
_BLOCK_TABLE: tuple[tuple[str, str], ...] = (
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_OFFICIAL_BLOCK_RE = re.compile(r"^(encoder|decoder)\.transformer\.(\d+)\.(.+)$")
_VGEN_BLOCK_RE = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)$")


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for src, dst in table:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
    return None


def _map_key(key: str, inverse: bool) -> str | None:
    block_re, block_fmt = (
        (_VGEN_BLOCK_RE, "{}.transformer.{}.") if inverse else (_OFFICIAL_BLOCK_RE, "{}.blocks.{}.")
    )
    flip = (lambda t: tuple((b, a) for a, b in t)) if inverse else (lambda t: t)
    m = block_re.match(key)
    if m:
        rest = _rename(m.group(3), flip(_BLOCK_TABLE))
        return None if rest is None else block_fmt.format(m.group(1), m.group(2)) + rest
    return _rename(key, flip(_KEY_TABLE))


def official_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official TiTok / TA-TiTok state dict -> this module's key names (tensors unchanged; meta
    tensors work). The stage-2 MaskGIT-VQGAN keys (`pixel_quantize.*`, `pixel_decoder.*`) keep
    their names. Raises ValueError naming the first key that is not a TiTok key.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = _map_key(key, inverse=False)
        if new is None:
            raise ValueError(
                f"official_key_map: '{key}' is not a TiTok/TA-TiTok checkpoint key; is this a "
                "1d-tokenizer TiTok checkpoint (not a generator or an EMA/optimizer file)?"
            )
        out[new] = value
    return out


def inverse_official_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """This module's state dict -> official key names (inverse of `official_key_map`)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = _map_key(key, inverse=True)
        if new is None:
            raise ValueError(f"inverse_official_key_map: '{key}' is not a vgen TiTok key.")
        out[new] = value
    return out


def _read_official(source: str | Path | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors":
        raise ValueError(
            f"load_official: {path} is not a .safetensors file. Official .bin/.pt files are "
            "pickles and are never unpickled here; convert once in a trusted environment: "
            "sd = torch.load(path, map_location='cpu', weights_only=True); "
            "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, out)."
        )
    if not path.is_file():
        raise FileNotFoundError(f"load_official: {path} not found.")
    return load_file(str(path), device="cpu")


def load_official(
    source: str | Path | Mapping[str, Tensor],
    config: TiTokConfig | str,
    *,
    device: str | torch.device = "cpu",
) -> TiTok:
    """Build `config` (or a TITOK_SIZES name) and load an official checkpoint into it.

    `source`: a .safetensors file, a directory holding `model.safetensors` (an HF Hub snapshot),
    or an in-memory official state dict. Returns the model in eval mode on `device`. Raises
    ValueError naming the first key that is missing, unexpected or of the wrong shape (with both
    shapes), so a config/checkpoint mismatch is caught before any weight is copied.
    """
    cfg = titok_config(config) if isinstance(config, str) else config
    official = _read_official(source)
    state = official_key_map(official)
    model = cfg.build()
    expected = model.state_dict()
    for key, want in expected.items():
        name = _map_key(key, inverse=True)
        if key not in state:
            raise ValueError(
                f"load_official: checkpoint has no '{name}' (vgen '{key}', shape "
                f"{tuple(want.shape)}); the config does not match the checkpoint "
                "(check quantize_mode, clustering_vq, is_legacy, TiTok vs TA-TiTok; a legacy "
                "TiTok holds the stage-2 pixel decoder pixel_quantize.*/pixel_decoder.*, which "
                "stage-1 checkpoints (finetune_decoder: false) lack)."
            )
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"load_official: '{name}' (vgen '{key}') has shape {tuple(got.shape)} in the "
                f"checkpoint but {tuple(want.shape)} in the model built from the config; check "
                "codebook_size, token_size, num_latent_tokens, widths, patch sizes and "
                "pixel_decoder."
            )
    for key in state:
        if key not in expected:
            raise ValueError(
                f"load_official: checkpoint key '{_map_key(key, inverse=True)}' (vgen '{key}') "
                "has no place in a model built from this config (check clustering_vq, "
                "is_legacy, TiTok vs TA-TiTok)."
            )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()




# --------------------------------------------------------------------------------------------------
# Family specs
# --------------------------------------------------------------------------------------------------


def titok_loss(model: TiTok, batch: dict[str, Tensor], step: int, **_: Any):
    """Single-stage TiTok (RGB head): L2 in [0, 1] pixels + the quantizer (VQ) or KL term."""
    from vgen_core.families import to_model_pixels

    if model.config.is_legacy:
        raise ValueError("TiTok training here needs the RGB head (is_legacy: false); a legacy "
                         "TiTok follows the two-stage recipe (proxy-code cross-entropy, then a "
                         "frozen encoder with the MaskGIT-VQGAN pixel decoder), not built here")
    images = to_model_pixels(batch["image"], "unit")
    recon, info = model(images)
    mse = F.mse_loss(recon, images)
    return mse + info["quantizer_loss"], {"mse": mse.detach(),
                                         "quantizer": info["quantizer_loss"].detach()}


def _produces(config: TiTokConfig) -> str:
    return "id_tokens" if config.quantize_mode == "vq" else "latents"


def _encode(model: TiTok, x_BCHW: Tensor) -> dict[str, Tensor]:
    """VQ: ``indices`` (B, K); VAE: ``moments`` (B, 2C, 1, K) = posterior mean || logvar."""
    if model.config.quantize_mode == "vq":
        _, info = model.encode(x_BCHW)
        return {"indices": info["min_encoding_indices"].reshape(x_BCHW.shape[0], -1)}
    _, info = model.encode(x_BCHW, sample_posterior=False)
    return {"moments": torch.cat([info["posterior_mean"], info["posterior_logvar"]], dim=1)}


def _decode(model: TiTok, out: Tensor, grid_hw: Any = None) -> Tensor:
    """Generated VQ ids (B, K), or latents (B, C, 1, K) / (B, K, C) (generator space, already
    multiplied by ``scale_factor``) -> RGB (B, 3, H, W), ~[0, 1] unclamped (legacy: through the
    MaskGIT-VQGAN pixel decoder, as the official ``TiTok.decode_tokens``)."""
    if model.config.quantize_mode == "vq":
        return model.decode_tokens(out)
    C, K = model.config.token_size, model.config.num_latent_tokens
    z = out.float()
    if z.ndim == 3 and tuple(z.shape[1:]) == (K, C):
        z = z.transpose(1, 2)
    z = z.reshape(z.shape[0], C, 1, K) / float(getattr(model.config, "scale_factor", 1.0) or 1.0)
    return model.decode(z)


def _sizes(config_class: type) -> dict[str, TiTokConfig]:
    return {k: v for k, v in TITOK_SIZES.items() if type(v) is config_class}


SPECS = (
    FamilySpec(
        name="titok", role="tokenizer", config_class=TiTokConfig, sizes=_sizes(TiTokConfig),
        model_class=TiTok, data="images", data_fields=("image_size",), loss=titok_loss,
        produces=("id_tokens", "latents"), produces_for=_produces, pixel_range="unit",
        encode=_encode, decode=_decode, load_official=load_official,
        default_for=("tokenize.titok",),
        summary="TiTok: K 1D tokens per image (VQ ids or KL latents), ViT encoder/decoder",
    ),
    FamilySpec(
        name="tatitok", role="tokenizer", config_class=TATiTokConfig,
        sizes=_sizes(TATiTokConfig), model_class=TATiTok, data="images",
        data_fields=("image_size",), loss=None, produces=("id_tokens", "latents"),
        produces_for=_produces, pixel_range="unit", encode=_encode, decode=None,
        load_official=load_official,
        summary="TA-TiTok: TiTok whose decoder reads CLIP text features (decoding needs them)",
    ),
)
