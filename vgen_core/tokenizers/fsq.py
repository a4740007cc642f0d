"""BAR binary-FSQ tokenizer: ViT encoder -> K binary channels per patch -> ViT decoder -> RGB.

Spec: methods.md §1.4; reference: undefined443/BAR (fork of amazon-far/BAR, author commits
11b27f7/faf903f) `modeling/quantizer.py` (FSQ), `modeling/tokenizer.py` (BAR_FSQ),
`modeling/modules/blocks.py` (SigLIP2Encoder, SigLIP2Decoder, Block), and
`configs/tokenizer/bar_fsq_16bits.yaml` / `bar_fsq_10bits_res512.yaml`.

Quantizer, exactly as the official FSQ with 2 levels per channel (eps = 1e-3):
    z = in_proj(features)                                 Linear(enc_width -> K), in fp32
    b = tanh(z + shift) * half_l - offset                 half_l = (1 + eps) / 2, offset = 1/2,
                                                          shift = atanh(offset / half_l) ~ 3.8007
    q = round(b) with a straight-through gradient         q in {-1, 0}
    code = 2 q + 1                                        {-1, +1}
    decoder input = out_proj(code)                        Linear(K -> dec_width)
A channel's bit is set (code +1) iff z >= -shift (~ -3.80), not z >= 0: the even-level offset of
FSQ puts z = 0 on the upper grid point. Token index = sum_k bit_k * 2**k (LSB first), the official
`_basis` order and the same convention as `lfq.py`, whose bit helpers this module re-exports.

Encoder. The official encoder is the pretrained SigLIP2 `google/siglip2-so400m-patch16-naflex`
vision tower (a trainable copy, lr x 0.1, plus a frozen copy that produces the CLIP-alignment
targets). Its weights cannot be downloaded here, so `_SigLIP2Encoder` rebuilds the architecture
from the config with the Hugging Face SigLIP2 module names: random init (trunc-normal 0.02), or
weights from a local safetensors file via `load_encoder_weights` (HF `vision_model.*` names or an
official BAR checkpoint). Only the trainable path is built; the frozen teacher belongs to the
training step. Patches are flattened (p1 p2 c) as BAR does for the naflex embedding, and the
learned position grid is resized bilinearly (antialias) when the token grid differs.

Decoder: the official `SigLIP2Decoder` (ViT, LayerNorm, GELU MLP, cls token, learned positions,
1x1 conv to p*p*3 + unpatchify + 3x3 conv; optional CLIP-feature projector at layer 2) with the
official module names, so official decoder/quantizer weights load unchanged.

Shape legend: B batch, C=3 image channels, H=W image size, p patch, g = H / p token grid,
L = g*g tokens, K bits per token, E encoder width, W decoder width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from ._vit import Block as _Block

from vgen_core.tokenizers.io import load_mapped_state_dict, read_state_dict
from vgen_core.tokenizers.lfq import bits_to_indices, indices_to_bits, pack_bits, unpack_bits

__all__ = [
    "BAR_FSQ_SIZES",
    "BinaryFSQ",
    "BinaryFSQConfig",
    "BinaryFSQTokenizer",
    "bar_fsq_config",
    "binary_fsq_threshold",
    "bits_to_indices",
    "indices_to_bits",
    "load_encoder_weights",
    "load_official_bar_fsq",
    "official_key_map",
    "pack_bits",
    "unpack_bits",
]

_LEVELS = 2  # binary FSQ: 2 levels per channel, always (official `levels_per_channel = 2`)


# --------------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------------


def binary_fsq_threshold(eps: float = 1e-3) -> float:
    """Value of z (after in_proj) at which a channel flips to +1: -atanh(0.5 / ((1 + eps) / 2))."""
    return -math.atanh(0.5 / ((1.0 + eps) / 2.0))


class BinaryFSQ(nn.Module):
    """Official BAR FSQ, 2 levels per channel: Linear -> tanh bound -> round (STE) -> +-1 -> Linear.

    No loss terms (the official returns none). Names `in_proj` / `out_proj` are the official ones.
    """

    def __init__(self, in_channels: int, out_channels: int, token_bits: int, eps: float = 1e-3):
        super().__init__()
        self.token_bits = token_bits
        self.eps = eps
        self.in_proj = nn.Linear(in_channels, token_bits)
        self.out_proj = nn.Linear(token_bits, out_channels)

    def _levels(self, like: Tensor) -> Tensor:
        return torch.full((self.token_bits,), _LEVELS, dtype=torch.int64, device=like.device)

    def bound(self, z_BLK: Tensor) -> Tensor:
        """tanh-bound to (-1 - eps/2, eps/2) so rounding gives {-1, 0}; float32 as official."""
        levels = self._levels(z_BLK)
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z_BLK + shift).tanh() * half_l - offset

    def quantize(self, z_BLK: Tensor) -> Tensor:
        """Pre-quantization z (B, L, K) -> codes in {-1, +1}, straight-through gradient."""
        bounded = self.bound(z_BLK)
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = self._levels(z_BLK) // 2
        return (rounded / half_width) * 2 + 1

    def forward(self, features_BLE: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder features (B, L, E) -> (codes_BLK in {-1,+1} with STE grad, bits_BLK bool).

        in_proj runs in the weights' dtype with autocast off (fp32 for an fp32 model, as official).
        """
        device_type = "cuda" if features_BLE.is_cuda else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            z_BLK = self.in_proj(features_BLE.to(self.in_proj.weight.dtype))
            codes_BLK = self.quantize(z_BLK)
        # official codes_to_indices_per_level: round((code + 1) / 2) clamped to {0, 1}
        bits_BLK = torch.round((codes_BLK.detach() + 1) / 2).clamp(0, 1).to(torch.bool)
        return codes_BLK, bits_BLK


# --------------------------------------------------------------------------------------------------
# Config and size registry
# --------------------------------------------------------------------------------------------------


class BinaryFSQConfig(BaseModel):
    """BAR-FSQ tokenizer config; `build()` makes the model. Defaults = `bar_fsq_16bits`.

    Encoder fields describe SigLIP2 so400m-patch16 (width 1152, 27 layers, 16 heads, MLP 4304,
    a 16x16 learned position grid); decoder fields the official ViT-L decoder (1024 x 24,
    16 heads, MLP x4). The official encoder and decoder patch sizes must agree (one token per
    patch), so there is one `patch_size`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(256, ge=1)
    patch_size: int = Field(16, ge=1)
    token_bits: int = Field(16, ge=1, le=62)
    fsq_eps: float = Field(1e-3, gt=0.0)
    enc_width: int = Field(1152, ge=1)
    enc_layers: int = Field(27, ge=1)
    enc_heads: int = Field(16, ge=1)
    enc_mlp_dim: int = Field(4304, ge=1)
    enc_pos_grid: int = Field(16, ge=1)
    enc_ln_eps: float = Field(1e-6, gt=0.0)
    dec_width: int = Field(1024, ge=1)
    dec_layers: int = Field(24, ge=1)
    dec_heads: int = Field(16, ge=1)
    dec_mlp_ratio: float = Field(4.0, gt=0.0)
    clip_align: bool = True
    clip_align_layer_id: int = Field(2, ge=0)
    clip_hidden: int = Field(2048, ge=1)

    @model_validator(mode="after")
    def _check(self) -> BinaryFSQConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )
        pairs = ((self.enc_width, self.enc_heads, "enc"), (self.dec_width, self.dec_heads, "dec"))
        for w, h, side in pairs:
            if w % h:
                raise ValueError(f"{side}_width {w} is not divisible by {side}_heads {h}.")
        if self.clip_align and self.clip_align_layer_id >= self.dec_layers:
            raise ValueError(
                f"clip_align_layer_id {self.clip_align_layer_id} >= dec_layers {self.dec_layers}."
            )
        return self

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def codebook_size(self) -> int:
        return 1 << self.token_bits

    def build(self) -> BinaryFSQTokenizer:
        return BinaryFSQTokenizer(self)


BAR_FSQ_SIZES: dict[str, BinaryFSQConfig] = {
    # CPU-test size: 32x32 images -> 4x4 tokens of 8 bits, ~65k params.
    "tiny": BinaryFSQConfig(
        image_size=32, patch_size=8, token_bits=8, enc_width=32, enc_layers=2, enc_heads=2,
        enc_mlp_dim=64, enc_pos_grid=4, dec_width=32, dec_layers=2, dec_heads=2,
        clip_align_layer_id=0, clip_hidden=64,
    ),
    # configs/tokenizer/bar_fsq_16bits.yaml: 256px -> 16x16 tokens x 16 bits (C = 65,536).
    "bar-fsq-16bits": BinaryFSQConfig(),
    # configs/tokenizer/bar_fsq_10bits_res512.yaml: 512px -> 32x32 tokens x 10 bits.
    "bar-fsq-10bits-res512": BinaryFSQConfig(image_size=512, token_bits=10),
}


bar_fsq_config = sized_config("BAR-FSQ", BinaryFSQConfig, BAR_FSQ_SIZES)


# --------------------------------------------------------------------------------------------------
# Encoder: SigLIP2 vision tower (HF module names)
# --------------------------------------------------------------------------------------------------


class _SiglipAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x_BNE: Tensor) -> Tensor:
        B, N, E = x_BNE.shape
        q, k, v = (
            p(x_BNE).view(B, N, self.heads, E // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, E))


class _SiglipMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # gelu_pytorch_tanh


class _SiglipLayer(nn.Module):
    def __init__(self, cfg: BinaryFSQConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.enc_width, eps=cfg.enc_ln_eps)
        self.self_attn = _SiglipAttention(cfg.enc_width, cfg.enc_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.enc_width, eps=cfg.enc_ln_eps)
        self.mlp = _SiglipMLP(cfg.enc_width, cfg.enc_mlp_dim)

    def forward(self, x_BNE: Tensor) -> Tensor:
        x_BNE = x_BNE + self.self_attn(self.layer_norm1(x_BNE))
        return x_BNE + self.mlp(self.layer_norm2(x_BNE))


class _SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: BinaryFSQConfig) -> None:
        super().__init__()
        self.pos_grid = cfg.enc_pos_grid
        self.patch_embedding = nn.Linear(3 * cfg.patch_size**2, cfg.enc_width)
        self.position_embedding = nn.Embedding(cfg.enc_pos_grid**2, cfg.enc_width)

    def forward(self, patches_BLP: Tensor, grid: int) -> Tensor:
        pos_GGE = self.position_embedding.weight.reshape(self.pos_grid, self.pos_grid, -1)
        if grid != self.pos_grid:  # HF Siglip2 naflex resize; same-size bilinear/AA is identity
            pos_1EGG = pos_GGE.permute(2, 0, 1).unsqueeze(0).float()
            pos_1EGG = F.interpolate(
                pos_1EGG, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True
            )
            pos_GGE = pos_1EGG[0].permute(1, 2, 0).to(pos_GGE.dtype)
        patch = self.patch_embedding(patches_BLP.to(self.patch_embedding.weight.dtype))
        return patch + pos_GGE.reshape(grid * grid, -1)


class _SigLIP2Encoder(nn.Module):
    def __init__(self, cfg: BinaryFSQConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.embeddings = _SiglipEmbeddings(cfg)
        self.layers = nn.ModuleList(_SiglipLayer(cfg) for _ in range(cfg.enc_layers))
        self.post_layernorm = nn.LayerNorm(cfg.enc_width, eps=cfg.enc_ln_eps)

    def forward(self, images_BCHW: Tensor) -> Tensor:
        B, C, H, W = images_BCHW.shape
        p, g = self.patch_size, H // self.patch_size
        # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', as BAR feeds the naflex embedding
        patches = images_BCHW.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        x = self.embeddings(patches.reshape(B, g * g, p * p * C), g)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


# --------------------------------------------------------------------------------------------------
# Decoder: official SigLIP2Decoder (BAR module names)
# --------------------------------------------------------------------------------------------------


class _Unpatchify(nn.Module):
    """'b (p1 p2 c) h w -> b c (h p1) (w p2)'."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch

    def forward(self, x: Tensor) -> Tensor:
        B, _, g, _ = x.shape
        p = self.patch
        x = x.reshape(B, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(B, 3, g * p, g * p)


class _ViTDecoder(nn.Module):
    def __init__(self, cfg: BinaryFSQConfig) -> None:
        super().__init__()
        W, g = cfg.dec_width, cfg.grid_size
        self.grid = g
        scale = W**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, W))
        self.positional_embedding = nn.Parameter(scale * torch.randn(g * g + 1, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList(
            _Block(W, cfg.dec_heads, cfg.dec_mlp_ratio) for _ in range(cfg.dec_layers)
        )
        self.ln_post = nn.LayerNorm(W)
        self.ffn = nn.Sequential(
            nn.Conv2d(W, cfg.patch_size**2 * 3, 1, padding=0, bias=True),
            _Unpatchify(cfg.patch_size),
        )
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1, bias=True)
        self.clip_layer = cfg.clip_align_layer_id
        self.clip_projector = (
            nn.Sequential(
                nn.Linear(W, cfg.clip_hidden),
                nn.SiLU(),
                nn.Linear(cfg.clip_hidden, cfg.clip_hidden),
                nn.SiLU(),
                nn.Linear(cfg.clip_hidden, cfg.enc_width),
            )
            if cfg.clip_align
            else None
        )

    def forward(self, x_BLW: Tensor) -> tuple[Tensor, Tensor | None]:
        B, L, W = x_BLW.shape
        cls = self.class_embedding.to(x_BLW.dtype).unsqueeze(0).expand(B, -1, -1)
        x = torch.cat([cls, x_BLW], dim=1) + self.positional_embedding.to(x_BLW.dtype)
        x = self.ln_pre(x)
        clip_pred = None
        for i, block in enumerate(self.transformer):
            x = block(x)
            if self.clip_projector is not None and i == self.clip_layer:
                clip_pred = self.clip_projector(x)[:, 1 : 1 + L]
        x = self.ln_post(x[:, 1 : 1 + L])
        x = x.permute(0, 2, 1).reshape(B, W, self.grid, self.grid)
        return self.conv_out(self.ffn(x.contiguous())), clip_pred


def _init_weights(module: nn.Module) -> None:
    """Official `BAR_FSQ._init_weights`: trunc-normal(0.02) weights, zero bias, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
        bias = getattr(module, "bias", None)  # nn.Embedding has none
        if bias is not None:
            nn.init.zeros_(bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


class BinaryFSQTokenizer(nn.Module):
    """BAR-FSQ tokenizer: images (B, 3, H, H) in [-1, 1] <-> bit tokens (B, L, K).

    Module names follow the official checkpoint (`encoder` excepted, see `official_key_map`).
    The decoder output is unbounded (no tanh, as official); clamp to [-1, 1] to display.
    Reconstruction, perceptual, CLIP-alignment, Gram and GAN losses belong to the training step.
    """

    family: ClassVar[str] = "bar_fsq"
    config_class: ClassVar[type[BaseModel]] = BinaryFSQConfig

    def __init__(self, config: BinaryFSQConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = _ViTDecoder(config)
        self.decoder.apply(_init_weights)  # official order: decoder init, then encoder, quantizer
        self.encoder = _SigLIP2Encoder(config)
        self.encoder.apply(_init_weights)  # official: pretrained SigLIP2 (see module docstring)
        self.quantize = BinaryFSQ(
            config.enc_width, config.dec_width, config.token_bits, config.fsq_eps
        )

    @property
    def token_bits(self) -> int:
        return self.config.token_bits

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def encode(self, images_BCHW: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images (B, 3, H, H), H = config.image_size -> (codes_BLK, bits_BLK, indices_BL).

        codes are {-1,+1} floats with a straight-through gradient; bits bool; indices int64 in
        [0, 2**K), LSB first. Token l is patch (l // g, l % g) in raster order.
        """
        s = self.config.image_size
        if images_BCHW.ndim != 4 or tuple(images_BCHW.shape[1:]) != (3, s, s):
            raise ValueError(
                f"encode expects (B, 3, {s}, {s}) for this config, got {tuple(images_BCHW.shape)}; "
                "resize/crop to config.image_size."
            )
        codes_BLK, bits_BLK = self.quantize(self.encoder(images_BCHW))
        return codes_BLK, bits_BLK, bits_to_indices(bits_BLK)

    def decode_with_clip(self, codes_BLK: Tensor) -> tuple[Tensor, Tensor | None]:
        """Codes (B, L, K) -> (images (B, 3, H, H), CLIP-feature prediction (B, L, E) or None)."""
        expected = (self.config.num_tokens, self.token_bits)
        if codes_BLK.ndim != 3 or tuple(codes_BLK.shape[1:]) != expected:
            raise ValueError(
                f"decode expects (B, {self.config.num_tokens}, {self.token_bits}), "
                f"got {tuple(codes_BLK.shape)}."
            )
        device_type = "cuda" if codes_BLK.is_cuda else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            x_BLW = self.quantize.out_proj(codes_BLK.to(self.quantize.out_proj.weight.dtype))
        return self.decoder(x_BLW)

    def decode(self, codes_BLK: Tensor) -> Tensor:
        """Codes (B, L, K) in {-1,+1} (or any reals) -> images (B, 3, H, H)."""
        return self.decode_with_clip(codes_BLK)[0]

    def decode_bits(self, bits_BLK: Tensor) -> Tensor:
        """Bool bits (B, L, K) -> images. (BAR's pretokenized uint8 bits: pass `bits.bool()`.)"""
        if bits_BLK.dtype != torch.bool:
            raise ValueError(f"decode_bits expects bool bits, got {bits_BLK.dtype}.")
        return self.decode(bits_BLK.float() * 2.0 - 1.0)

    def decode_indices(self, indices_BL: Tensor) -> Tensor:
        """int64 indices (B, L) in [0, 2**K) -> images."""
        return self.decode_bits(indices_to_bits(indices_BL, self.token_bits))

    def forward(self, images_BCHW: Tensor) -> tuple[Tensor, dict[str, Tensor | None]]:
        """Reconstruct. Returns (recon_BCHW, {'clip_pred', 'codes', 'bits', 'indices'})."""
        codes, bits, indices = self.encode(images_BCHW)
        recon, clip_pred = self.decode_with_clip(codes)
        return recon, {"clip_pred": clip_pred, "codes": codes, "bits": bits, "indices": indices}




# --------------------------------------------------------------------------------------------------
# Official / SigLIP2 weights
# --------------------------------------------------------------------------------------------------

# (checkpoint prefix, our prefix); first match wins.
_RENAMES = (
    ("encoder.siglip.embeddings.", "encoder.embeddings."),  # BAR: shared by both copies
    ("encoder.trainable_encoder.layers.", "encoder.layers."),
    ("encoder.trainable_post_layernorm.", "encoder.post_layernorm."),
    ("vision_model.embeddings.", "encoder.embeddings."),  # HF SigLIP2 (google/siglip2-*)
    ("vision_model.encoder.layers.", "encoder.layers."),
    ("vision_model.post_layernorm.", "encoder.post_layernorm."),
)
# Frozen SigLIP2 teacher (CLIP-alignment targets), its unused pooling head, the HF text tower.
_DROPPED = (
    "encoder.siglip.encoder.",
    "encoder.siglip.post_layernorm.",
    "encoder.siglip.head.",
    "encoder.frozen_encoder.",
    "encoder.frozen_post_layernorm.",
    "vision_model.head.",
    "text_model.",
    "logit_scale",
    "logit_bias",
)
#: released key prefixes not loaded -> why (``vgen weights convert`` reports them)
OFFICIAL_DROPPED = {
    **dict.fromkeys(_DROPPED[:5], "frozen SigLIP2 teacher of the CLIP-alignment loss"),
    **dict.fromkeys(_DROPPED[5:], "SigLIP2 pooling head / text tower (unused by the tokenizer)"),
}


def official_key_map(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """Official BAR_FSQ (or HF SigLIP2) key -> `BinaryFSQTokenizer` key.

        official BAR_FSQ                          here
        decoder.*, quantize.*                     same
        encoder.siglip.embeddings.*               encoder.embeddings.*
        encoder.trainable_encoder.layers.*        encoder.layers.*
        encoder.trainable_post_layernorm.*        encoder.post_layernorm.*
        encoder.{siglip.encoder, siglip.post_layernorm, siglip.head, frozen_encoder,
                 frozen_post_layernorm}.*         dropped (frozen teacher, unused head)
        HF vision_model.{embeddings, encoder.layers, post_layernorm}.* -> encoder.* as above

    Unknown keys map to themselves so a loader reports them as unexpected.
    """
    out: dict[str, str] = {}
    for key in state_dict:
        if key.startswith(_DROPPED):
            continue
        for src, dst in _RENAMES:
            if key.startswith(src):
                out[key] = dst + key[len(src) :]
                break
        else:
            out[key] = key
    return out


def load_official_bar_fsq(
    source: str | Path | Mapping[str, Tensor], size: str | BinaryFSQConfig = "bar-fsq-16bits"
) -> BinaryFSQTokenizer:
    """Build `size` and load a full official BAR_FSQ state dict (safetensors path or dict).

    The official `pytorch_model.bin` is a pickle: convert it once (see
    `io.read_state_dict`). A checkpoint trained without CLIP alignment has no
    `decoder.clip_projector.*`: pass a config with `clip_align=False`. Returns the model in eval
    mode.
    """
    config = size if isinstance(size, BinaryFSQConfig) else bar_fsq_config(size)
    what = f"fsq.load_official_bar_fsq({size if isinstance(size, str) else 'custom config'})"
    state = read_state_dict(source, what=what)
    model = BinaryFSQTokenizer(config)
    load_mapped_state_dict(model, state, official_key_map(state), what=what)
    return model.eval()


def load_encoder_weights(
    model: BinaryFSQTokenizer, source: str | Path | Mapping[str, Tensor]
) -> BinaryFSQTokenizer:
    """Load only the encoder from a local SigLIP2 (`vision_model.*`) or BAR checkpoint; strict.

    Every `encoder.*` parameter must be provided; other keys in the file are ignored.
    """
    what = "fsq.load_encoder_weights"
    state = read_state_dict(source, what=what)
    key_map = {k: v for k, v in official_key_map(state).items() if v.startswith("encoder.")}
    key_map = {k: v.removeprefix("encoder.") for k, v in key_map.items()}
    load_mapped_state_dict(model.encoder, state, key_map, what=what)
    return model


# --------------------------------------------------------------------------------------------------
# Family spec
# --------------------------------------------------------------------------------------------------


_PIXEL_RANGE = "signed"  # SPEC.pixel_range, typed as str for the loss


def bar_fsq_loss(model: BinaryFSQTokenizer, batch: dict[str, Tensor], step: int, **_: Any):
    """BAR-FSQ: L1 x 0.1 + L2 x 1.0 in [-1, 1] pixels (official weights)."""
    from vgen_core.families import to_model_pixels

    images = to_model_pixels(batch["image"], _PIXEL_RANGE)
    recon, _ = model(images)
    l1, mse = F.l1_loss(recon, images), F.mse_loss(recon, images)
    return 0.1 * l1 + mse, {"mse": mse.detach(), "l1": l1.detach()}


def _encode(model: BinaryFSQTokenizer, x_BCHW: Tensor) -> dict[str, Tensor]:
    _, bits_BLK, indices_BL = model.encode(x_BCHW)
    g = model.config.grid_size
    B, _, K = bits_BLK.shape
    return {"bits": bits_BLK.reshape(B, g, g, K), "indices": indices_BL.reshape(B, g, g)}


def _decode(model: BinaryFSQTokenizer, tokens: Tensor, grid_hw: Any = None) -> Tensor:
    return model.decode_indices(tokens.reshape(tokens.shape[0], -1))


SPEC = FamilySpec(
    name="bar_fsq", role="tokenizer", config_class=BinaryFSQConfig, sizes=BAR_FSQ_SIZES,
    model_class=BinaryFSQTokenizer, data="images", data_fields=("image_size",),
    loss=bar_fsq_loss, produces=("bit_tokens",), pixel_range=_PIXEL_RANGE, encode=_encode,
    decode=_decode, load_official=load_official_bar_fsq, default_for=("tokenize.fsq",),
    summary="BAR binary FSQ: one K-bit token per SigLIP2 patch, ViT decoder",
)
