"""SD / MAR KL autoencoder (LDM `AutoencoderKL`): images <-> continuous latents.

Spec: methods.md §1.6 (latents used by generators) and §1.7 (moments cache). Reference:
LTH14/mar `models/vae.py` (a copy of CompVis/latent-diffusion's KL-VAE), and for the diffusers
names huggingface/diffusers `scripts/convert_diffusers_to_original_stable_diffusion.py`.

    encoder (conv stack) -> quant_conv -> moments (2z channels) = mean || logvar
    logvar clamped to [-30, 20]; z = mean + exp(logvar / 2) * eps
    z -> post_quant_conv -> decoder (conv stack) -> image
Generators see `z * scale_factor` (`encode_latents`) and hand back the same (`decode_latents`).

Shape legend: B batch, C image channels, H/W image size, Z latent channels, h/w latent grid
(H / f with f = 2 ** (len(ch_mult) - 1)), D conv channels.

Module names are the LDM / MAR names, so LDM, CompVis-SD and MAR checkpoints load with the
identity map. `official_key_map` also accepts diffusers names (`stabilityai/sd-vae-ft-ema`):

    diffusers (L levels, i level index, j block index)       here (LDM / MAR)
    ----------------------------------------------------     -------------------------------------
    {enc,dec}.conv_in / conv_out                             same
    {enc,dec}.conv_norm_out                                  {enc,dec}.norm_out
    encoder.down_blocks.i.resnets.j.*                        encoder.down.i.block.j.*
    encoder.down_blocks.i.downsamplers.0.conv                encoder.down.i.downsample.conv
    decoder.up_blocks.i.resnets.j.*                          decoder.up.(L-1-i).block.j.*
    decoder.up_blocks.i.upsamplers.0.conv                    decoder.up.(L-1-i).upsample.conv
    *.resnets.j.conv_shortcut                                *.block.j.nin_shortcut
    {enc,dec}.mid_block.resnets.{0,1}                        {enc,dec}.mid.block_{1,2}
    {enc,dec}.mid_block.attentions.0.group_norm              {enc,dec}.mid.attn_1.norm
    ....attentions.0.{to_q,to_k,to_v} / {query,key,value}    ....attn_1.{q,k,v}  (Linear (D, D) ->
    ....attentions.0.to_out.0 / proj_attn                    ....attn_1.proj_out  Conv (D, D, 1, 1))
    quant_conv / post_quant_conv                             same
    first_stage_model.* (full SD checkpoint)                 prefix stripped
    loss.*, model_ema.* (LDM/MAR training state)             dropped

Attention inside the encoder levels (MAR KL-16 has it at level 4, the 16x16 resolution) has no
diffusers equivalent; such checkpoints only exist with LDM names.

Checkpoints are read from safetensors only. `.ckpt` / `.bin` / `.pth` files are pickles: convert
them once, in an environment you trust, with `torch.load(path, weights_only=True)` and
`safetensors.torch.save_file` (see `read_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from vgen_core.tokenizers.io import load_mapped_state_dict, read_state_dict

__all__ = [
    "KL_VAE_SIZES",
    "LOGVAR_MAX",
    "LOGVAR_MIN",
    "AutoencoderKL",
    "KLVAEConfig",
    "diag_gaussian_kl",
    "kl_vae_config",
    "load_mapped_state_dict",
    "load_official",
    "official_key_map",
    "read_state_dict",
    "sample_diag_gaussian",
    "split_moments",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# --------------------------------------------------------------------------------------------------
# Gaussian posterior helpers (LDM DiagonalGaussianDistribution)
# --------------------------------------------------------------------------------------------------


def split_moments(moments_B2Zhw: Tensor) -> tuple[Tensor, Tensor]:
    """Moments (B, 2Z, h, w) = mean || logvar -> (mean, logvar clamped to [-30, 20]).

    This is also how a cached `moments` array (MAR `main_cache.py`, methods.md §1.7) is read back:
    the cache stores the raw quant_conv output, the clamp happens here.
    """
    mean_BZhw, logvar_BZhw = torch.chunk(moments_B2Zhw, 2, dim=1)
    return mean_BZhw, torch.clamp(logvar_BZhw, LOGVAR_MIN, LOGVAR_MAX)


def sample_diag_gaussian(
    mean_BZhw: Tensor, logvar_BZhw: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) drawn from `generator` if given."""
    eps = torch.randn(
        mean_BZhw.shape, generator=generator, dtype=mean_BZhw.dtype, device=mean_BZhw.device
    )
    return mean_BZhw + torch.exp(0.5 * logvar_BZhw) * eps


def diag_gaussian_kl(mean_BZhw: Tensor, logvar_BZhw: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over (Z, h, w) -> (B,), as in LDM."""
    return 0.5 * torch.sum(mean_BZhw**2 + torch.exp(logvar_BZhw) - 1.0 - logvar_BZhw, dim=[1, 2, 3])


# --------------------------------------------------------------------------------------------------
# Config and size registry
# --------------------------------------------------------------------------------------------------


class KLVAEConfig(BaseModel):
    """KL autoencoder config; `build()` makes the model. Defaults = SD VAE (f8, 4 channels).

    `encoder_attn_levels` / `decoder_attn_levels` list the resolution levels (0 = full resolution)
    whose residual blocks are each followed by self-attention; LDM expresses the same with
    `attn_resolutions` relative to `resolution`. The middle blocks always have one attention.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    in_channels: int = Field(3, ge=1)
    ch: int = Field(128, ge=1)
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = Field(2, ge=1)
    z_channels: int = Field(4, ge=1)
    encoder_attn_levels: tuple[int, ...] = ()
    decoder_attn_levels: tuple[int, ...] = ()
    norm_groups: int = Field(32, ge=1)
    resamp_with_conv: bool = True
    scale_factor: float = Field(0.18215, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> KLVAEConfig:
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be non-empty positive ints, got {self.ch_mult}.")
        for m in (1, *self.ch_mult):
            if (self.ch * m) % self.norm_groups:
                raise ValueError(
                    f"ch*mult = {self.ch * m} channels is not divisible by norm_groups="
                    f"{self.norm_groups}; pick ch/norm_groups so every level divides."
                )
        for name in ("encoder_attn_levels", "decoder_attn_levels"):
            bad = [lvl for lvl in getattr(self, name) if not 0 <= lvl < len(self.ch_mult)]
            if bad:
                raise ValueError(f"{name} {bad} out of range [0, {len(self.ch_mult)}).")
        return self

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent position along each axis: 2 ** (len(ch_mult) - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    def build(self) -> AutoencoderKL:
        return AutoencoderKL(self)


KL_VAE_SIZES: dict[str, KLVAEConfig] = {
    # CPU-test size: 16x16 images -> 8x8x4 latents.
    "tiny": KLVAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, scale_factor=1.0),
    # CompVis SD first stage (`stabilityai/sd-vae-ft-ema`, DeepFlow; SD autoencoder_kl_ema, DiMR).
    "sd-vae-f8c4": KLVAEConfig(),
    # MAR KL-16 (LTH14/mar AutoencoderKL(embed_dim=16, ch_mult=(1,1,2,2,4)); used by xAR):
    # encoder attn_resolutions=(16,) at resolution 256 -> attention at level 4.
    "mar-kl16-f16c16": KLVAEConfig(
        ch_mult=(1, 1, 2, 2, 4), z_channels=16, encoder_attn_levels=(4,), scale_factor=0.2325
    ),
}


kl_vae_config = sized_config("KL-VAE", KLVAEConfig, KL_VAE_SIZES)


# --------------------------------------------------------------------------------------------------
# Building blocks (LDM names)
# --------------------------------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class _ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x_BDHW: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x_BDHW)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x_BDHW if self.nin_shortcut is None else self.nin_shortcut(x_BDHW)
        return skip + h


class _AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (LDM AttnBlock)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BDHW: Tensor) -> Tensor:
        B, D, H, W = x_BDHW.shape
        h = self.norm(x_BDHW)
        q, k, v = (
            t.reshape(B, 1, D, H * W).transpose(-1, -2) for t in (self.q(h), self.k(h), self.v(h))
        )
        out_B1ND = F.scaled_dot_product_attention(q, k, v)
        return x_BDHW + self.proj_out(out_B1ND.transpose(-1, -2).reshape(B, D, H, W))


class _Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (LDM), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x_BDHW: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x_BDHW, 2)
        return self.conv(F.pad(x_BDHW, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x_BDHW: Tensor) -> Tensor:
        x = F.interpolate(x_BDHW, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = _ResnetBlock(channels, channels, groups)
        self.attn_1 = _AttnBlock(channels, groups)
        self.block_2 = _ResnetBlock(channels, channels, groups)

    def forward(self, x_BDHW: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BDHW)))


class _Level(nn.Module):
    """One resolution level: `block` (res blocks), `attn` (one per block, or none), resampler."""

    downsample: _Downsample  # set on encoder levels that downsample (all but the last)
    upsample: _Upsample  # set on decoder levels that upsample (all but level 0)

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attn: bool, groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            _ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_blocks)
        )
        self.attn = nn.ModuleList(_AttnBlock(c_out, groups) for _ in range(n_blocks if attn else 0))

    def run_blocks(self, x_BDHW: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x_BDHW = block(x_BDHW)
            if len(self.attn):
                x_BDHW = self.attn[i](x_BDHW)
        return x_BDHW


class _Encoder(nn.Module):
    def __init__(self, cfg: KLVAEConfig) -> None:
        super().__init__()
        g, L = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            lvl = _Level(c, cfg.ch * mult, cfg.num_res_blocks, level in cfg.encoder_attn_levels, g)
            c = cfg.ch * mult
            if level != L - 1:
                lvl.downsample = _Downsample(c, cfg.resamp_with_conv)
            self.down.append(lvl)
        self.mid = _Mid(c, g)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h = self.conv_in(x_BCHW)
        for lvl in self.down:
            assert isinstance(lvl, _Level)  # self.down holds only these
            h = lvl.run_blocks(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, cfg: KLVAEConfig) -> None:
        super().__init__()
        g, L = cfg.norm_groups, len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, g)
        levels: list[_Level] = []
        for level in reversed(range(L)):
            c_out = cfg.ch * cfg.ch_mult[level]
            lvl = _Level(c, c_out, cfg.num_res_blocks + 1, level in cfg.decoder_attn_levels, g)
            c = c_out
            if level != 0:
                lvl.upsample = _Upsample(c, cfg.resamp_with_conv)
            levels.insert(0, lvl)  # up[level], as in LDM
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z_BZhw: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z_BZhw))
        for lvl in reversed(self.up):
            assert isinstance(lvl, _Level)  # self.up holds only these
            h = lvl.run_blocks(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """KL-regularised conv autoencoder: images (B, C, H, W) in [-1, 1] <-> latents (B, Z, h, w).

    `encode`/`decode` work on unscaled latents; `encode_latents`/`decode_latents` apply
    `config.scale_factor` (0.18215 SD, 0.2325 MAR KL-16), which is what generators train on.
    Reconstruction, perceptual and GAN losses belong to the training step, not to this module.
    """

    family: ClassVar[str] = "kl_vae"
    config_class: ClassVar[type[BaseModel]] = KLVAEConfig

    def __init__(self, config: KLVAEConfig) -> None:
        super().__init__()
        self.config = config
        z = config.z_channels
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    def _check_images(self, images_BCHW: Tensor) -> None:
        f, c = self.config.downsample_factor, self.config.in_channels
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != c:
            raise ValueError(f"expected images (B, {c}, H, W), got {tuple(images_BCHW.shape)}.")
        if images_BCHW.shape[-2] % f or images_BCHW.shape[-1] % f:
            raise ValueError(
                f"image size {tuple(images_BCHW.shape[-2:])} is not a multiple of the downsample "
                f"factor {f}; resize or crop the images first."
            )

    def encode_moments(self, images_BCHW: Tensor) -> Tensor:
        """Images (B, C, H, W) -> raw moments (B, 2Z, h, w) = mean || logvar (not clamped).

        This is the array MAR/xAR caches per image (methods.md §1.7); read it with
        `split_moments`.
        """
        self._check_images(images_BCHW)
        return self.quant_conv(self.encoder(images_BCHW))

    def encode(self, images_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) -> posterior (mean, logvar), each (B, Z, h, w), logvar clamped."""
        return split_moments(self.encode_moments(images_BCHW))

    @staticmethod
    def sample(
        mean_BZhw: Tensor, logvar_BZhw: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Reparameterised posterior sample (unscaled), same shape as `mean_BZhw`."""
        return sample_diag_gaussian(mean_BZhw, logvar_BZhw, generator)

    @staticmethod
    def kl(mean_BZhw: Tensor, logvar_BZhw: Tensor) -> Tensor:
        """KL to N(0, I) per sample, (B,)."""
        return diag_gaussian_kl(mean_BZhw, logvar_BZhw)

    def decode(self, z_BZhw: Tensor) -> Tensor:
        """Unscaled latents (B, Z, h, w) -> images (B, C, h*f, w*f) (unbounded; clamp to show)."""
        if z_BZhw.ndim != 4 or z_BZhw.shape[1] != self.config.z_channels:
            raise ValueError(
                f"decode expects (B, {self.config.z_channels}, h, w), got {tuple(z_BZhw.shape)}."
            )
        return self.decoder(self.post_quant_conv(z_BZhw))

    def encode_latents(
        self,
        images_BCHW: Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images -> generator-space latents: (posterior sample or mean) * scale_factor."""
        mean, logvar = self.encode(images_BCHW)
        z = self.sample(mean, logvar, generator) if sample else mean
        return z * self.config.scale_factor

    def decode_latents(self, latents_BZhw: Tensor) -> Tensor:
        """Generator-space latents (already multiplied by scale_factor) -> images."""
        return self.decode(latents_BZhw / self.config.scale_factor)

    def forward(
        self,
        images_BCHW: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruct images. Returns (recon_BCHW, {'mean', 'logvar', 'kl' (B,)})."""
        mean, logvar = self.encode(images_BCHW)
        z = self.sample(mean, logvar, generator) if sample_posterior else mean
        return self.decode(z), {"mean": mean, "logvar": logvar, "kl": self.kl(mean, logvar)}




# --------------------------------------------------------------------------------------------------
# Official checkpoints (shared helpers used by the other official-weight loaders too)
# --------------------------------------------------------------------------------------------------


_DROPPED_PREFIXES = ("loss.", "model_ema.")
#: released key prefixes not loaded -> why (``vgen weights convert`` reports them)
OFFICIAL_DROPPED = {
    "loss.": "LPIPS / discriminator of the training loss (not part of the autoencoder)",
    "model_ema.": "LDM's EMA copy of the weights (the checkpoint's own weights are loaded)",
}
_DIFFUSERS_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RE_DOWN_RES = re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_RE_DOWN_SAMPLE = re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)$")
_RE_UP_RES = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_RE_UP_SAMPLE = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$")
_RE_MID_RES = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$")
_RE_MID_ATTN = re.compile(
    r"^(encoder|decoder)\.mid_block\.attentions\.0\."
    r"(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.(.+)$"
)


def _diffusers_to_ldm(key: str, n_levels: int) -> str:
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := _RE_DOWN_RES.match(key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := _RE_DOWN_SAMPLE.match(key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := _RE_UP_RES.match(key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := _RE_UP_SAMPLE.match(key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := _RE_MID_RES.match(key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := _RE_MID_ATTN.match(key):
        return f"{m[1]}.mid.attn_1.{_DIFFUSERS_ATTN[m[2]]}.{m[3]}"
    return key


def official_key_map(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """Checkpoint key -> `AutoencoderKL` key, for LDM/MAR/CompVis-SD or diffusers names.

    LDM and MAR names are ours already (identity). In a full SD checkpoint (any key starting with
    `first_stage_model.`) only those keys are kept, prefix stripped (UNet / text encoder are left
    out). `loss.*` / `model_ema.*` entries are left out. Diffusers names are translated with the
    table in the module docstring (up_blocks are numbered in reverse). Unknown keys map to
    themselves, so a loader reports them as unexpected.
    """
    prefix = "first_stage_model."
    originals = list(state_dict)
    if any(k.startswith(prefix) for k in originals):
        originals = [k for k in originals if k.startswith(prefix)]
    keys = [k.removeprefix(prefix) for k in originals]
    markers = (".down_blocks.", ".up_blocks.", ".mid_block.")
    is_diffusers = any(s in k for k in keys for s in markers)
    up_levels = {int(m[1]) for k in keys if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))}
    n_levels = max(up_levels) + 1 if up_levels else 0
    out: dict[str, str] = {}
    for orig, key in zip(originals, keys):
        if key.startswith(_DROPPED_PREFIXES):
            continue
        out[orig] = _diffusers_to_ldm(key, n_levels) if is_diffusers else key
    return out


def load_official(
    source: str | Path | Mapping[str, Tensor], size: str | KLVAEConfig = "sd-vae-f8c4"
) -> AutoencoderKL:
    """Build `size` (a registered name or a config) and load official weights into it.

    `source` is a `.safetensors` path or a state dict with LDM/MAR/CompVis-SD or diffusers names.
    Returns the model in eval mode. Raises ValueError naming the first key whose shape does not
    match (with both shapes), or the first missing/unexpected key.
    """
    config = size if isinstance(size, KLVAEConfig) else kl_vae_config(size)
    label = size if isinstance(size, str) else "custom config"
    what = f"kl_vae.load_official({label})"
    state = read_state_dict(source, what=what)
    model = AutoencoderKL(config)
    load_mapped_state_dict(
        model, state, official_key_map(state), what=what, reshape_to_target=True
    )
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Family spec
# --------------------------------------------------------------------------------------------------


_PIXEL_RANGE = "signed"  # SPEC.pixel_range, typed as str for the loss


def kl_vae_loss(model: AutoencoderKL, batch: dict[str, Tensor], step: int, *,
                kl_weight: float = 1e-6, **_: Any):
    """LDM autoencoder: L1 reconstruction + kl_weight x KL (per sample, summed over latents)."""
    from vgen_core.families import to_model_pixels

    images = to_model_pixels(batch["image"], _PIXEL_RANGE)
    recon, d = model(images)
    l1 = F.l1_loss(recon, images)
    kl = d["kl"].mean()
    return l1 + kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach(),
                                 "mse": F.mse_loss(recon, images).detach()}


def _encode(model: AutoencoderKL, x_BCHW: Tensor) -> dict[str, Tensor]:
    return {"moments": model.encode_moments(x_BCHW)}  # (B, 2Z, h, w): mean || logvar, raw


def _decode(model: AutoencoderKL, latents: Tensor, grid_hw: Any = None) -> Tensor:
    return model.decode_latents(latents)


SPEC = FamilySpec(
    name="kl_vae", role="tokenizer", config_class=KLVAEConfig, sizes=KL_VAE_SIZES,
    model_class=AutoencoderKL, data="images", loss=kl_vae_loss, produces=("latents",),
    pixel_range=_PIXEL_RANGE, encode=_encode, decode=_decode, load_official=load_official,
    resolution_free=True, default_for=("cache.latents",),
    summary="SD / MAR KL autoencoder: posterior moments cached as latents",
)
