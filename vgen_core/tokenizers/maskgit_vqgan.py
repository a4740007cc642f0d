"""MaskGIT-VQGAN: the f16 conv VQ tokenizer (1024 codes x 256) that TiTok and RAR build on.

Spec: methods.md §1.1 (TiTok two-stage recipe: proxy codes and the stage-2 pixel decoder), §1.7
(RAR/TiTok pretokenization), §2 (RAR operates on MaskGIT-VQGAN ids 16x16, C=1024). Reference:
bytedance/1d-tokenizer @942a96f `modeling/modules/maskgit_vqgan.py` (Encoder, Decoder,
VectorQuantizer; itself from huggingface/open-muse `modeling_maskgit_vqgan.py`) and
`modeling/titok.py` (`PretrainedTokenizer`, which builds the released tokenizer with the config of
`MASKGIT_VQGAN_SIZES["maskgit-vqgan-f16-256"]` and loads `maskgit-vqgan-imagenet-f16-256.bin`
with `strict=True`).

    images (B, 3, H, W) in [0, 1] -> Encoder -> z (B, D, h, w) -> nearest code (L2) -> ids (B, h*w)
    ids -> codebook rows (B, D, h, w) -> Decoder -> images (B, 3, H, W), clamped to [0, 1]

Pixel range (official): **[0, 1]** both ways. `scripts/pretokenization.py` feeds the tokenizer
`transforms.ToTensor()` images with `# transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])`
commented out, and `PretrainedTokenizer.decode` ends with `torch.clamp(rec_images, 0.0, 1.0)`.

Shape legend: B batch, H/W image size, f = 2 ** (len(channel_mult) - 1) downsampling factor,
h/w = H/f, W/f code grid, L = h*w tokens, D z_channels (= code dimension), V codebook size,
N = B*L flattened tokens, Ch conv channels.

Module names are the official ones (`encoder`, `decoder`, `quantize` as in `PretrainedTokenizer`;
`conv_in`, `down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}`, `mid.{j}`,
`up.{i}.block.{j}`, `up.{i}.upsample_conv`, `norm_out`, `conv_out`; `quantize.embedding`), so the
released state dict loads by the same names: `official_key_map` is the identity after checking
that every key is a MaskGIT-VQGAN key. `OFFICIAL_DROPPED` is empty (the official loader is strict).

The release is a pickle (`maskgit-vqgan-imagenet-f16-256.bin`); checkpoints are read from
safetensors only, so convert it once in a trusted environment (see `io.read_state_dict`):

    sd = torch.load("maskgit-vqgan-imagenet-f16-256.bin", map_location="cpu", weights_only=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "maskgit.safetensors")

Kept from the official code on purpose (checkpoint compatibility):
- A channel-changing ResnetBlock's `nin_shortcut` is a bias-free (out, out) 1x1 conv applied to
  the block OUTPUT (`residual = self.nin_shortcut(hidden_states)`): the block returns h + W h and
  its input reaches the output only through the conv branch.
- The quantizer loss weights are the official ones (mean((sg(q) - z)^2) + beta * mean((q -
  sg(z))^2)), the reverse of the usual VQ-VAE weighting.
Deviations: `Conv2dSame` is `nn.Conv2d(padding=k // 2)` (identical for the odd kernels and stride
1 used here); the code distances run in fp32 under autocast.
"""

from __future__ import annotations

import contextlib
import math
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
    "MASKGIT_VQGAN_SIZES",
    "OFFICIAL_DROPPED",
    "Decoder",
    "Encoder",
    "MaskGITVQGAN",
    "MaskGITVQGANConfig",
    "VectorQuantizer",
    "config_from_official",
    "load_official",
    "maskgit_vqgan_config",
    "official_key_map",
]

_GROUPS = 32  # official GroupNorm(num_groups=32, eps=1e-6) everywhere

# --------------------------------------------------------------------------------------------------
# Config and size registry
# --------------------------------------------------------------------------------------------------


class MaskGITVQGANConfig(BaseModel):
    """MaskGIT-VQGAN config; defaults = the released f16 tokenizer (`PretrainedTokenizer`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(256, ge=1)  # official `resolution` (only sets the decoder's z_shape)
    num_channels: int = Field(3, ge=1)
    hidden_channels: int = Field(128, ge=_GROUPS, multiple_of=_GROUPS)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # official num_resolutions = len(channel_mult)
    num_res_blocks: int = Field(2, ge=1)
    z_channels: int = Field(256, ge=1)  # = code dimension D
    codebook_size: int = Field(1024, ge=2)
    commitment_cost: float = Field(0.25, ge=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> MaskGITVQGANConfig:
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be positive ints, got {self.channel_mult}.")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of the downsampling factor "
                f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))."
            )
        return self

    @property
    def num_resolutions(self) -> int:
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> int:
        """Code grid side h = w at `image_size`."""
        return self.image_size // self.downsample_factor

    def build(self) -> MaskGITVQGAN:
        return MaskGITVQGAN(self)


MASKGIT_VQGAN_SIZES: dict[str, MaskGITVQGANConfig] = {
    # modeling/titok.py PretrainedTokenizer / TiTok.pixel_decoder (maskgit-vqgan-imagenet-f16-256)
    "maskgit-vqgan-f16-256": MaskGITVQGANConfig(),
    # CPU-test sizes (32 x 32 images): f4 with a channel change in both stacks, and an f8 pixel
    # decoder for the tiny legacy TiTok (4 x 4 patches of 8 px, 1024 proxy codes).
    "tiny": MaskGITVQGANConfig(
        image_size=32, hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
        z_channels=16, codebook_size=64,
    ),
    "tiny-f8": MaskGITVQGANConfig(
        image_size=32, hidden_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1,
        z_channels=16, codebook_size=1024,
    ),
}  # fmt: skip

maskgit_vqgan_config = sized_config("MaskGIT-VQGAN", MaskGITVQGANConfig, MASKGIT_VQGAN_SIZES)


def config_from_official(conf: Mapping[str, Any], *, codebook_size: int = 1024,
                         commitment_cost: float = 0.25) -> MaskGITVQGANConfig:
    """Official OmegaConf dict (`channel_mult`, `num_resolutions`, `hidden_channels`,
    `num_channels`, `num_res_blocks`, `resolution`, `z_channels`, `dropout`) -> config. The
    quantizer's size is not in that dict (`Pixel_Quantizer(num_embeddings=1024, ...)`)."""
    mult = tuple(conf["channel_mult"])
    if int(conf.get("num_resolutions", len(mult))) != len(mult):
        raise ValueError(f"num_resolutions={conf['num_resolutions']} but channel_mult={mult} "
                         f"has {len(mult)} levels; the official code indexes channel_mult by it.")
    return MaskGITVQGANConfig(
        image_size=conf["resolution"], num_channels=conf["num_channels"],
        hidden_channels=conf["hidden_channels"], channel_mult=mult,
        num_res_blocks=conf["num_res_blocks"], z_channels=conf["z_channels"],
        dropout=conf.get("dropout", 0.0), codebook_size=codebook_size,
        commitment_cost=commitment_cost,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Conv stacks (official names)
# --------------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, k: int, bias: bool = True) -> nn.Conv2d:
    """Official `Conv2dSame` for odd k, stride 1: symmetric zero padding (k - 1) / 2."""
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1-silu-conv1-norm2-silu-dropout-conv2; residual x, or nin_shortcut(h) (see module
    docstring) when the channel count changes. (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = _conv(c_in, c_out, 3, bias=False)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(c_out, c_out, 3, bias=False)
        self.nin_shortcut = _conv(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x_BChHW: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChHW)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        residual = self.nin_shortcut(h) if self.nin_shortcut is not None else x_BChHW
        return h + residual


def _res_blocks(c_in: int, c_out: int, cfg: MaskGITVQGANConfig) -> nn.ModuleList:
    return nn.ModuleList(
        [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout)
         for j in range(cfg.num_res_blocks)]
    )


class DownsamplingBlock(nn.Module):
    """Level i: res blocks to hidden * channel_mult[i], then 2x2 average pooling (not the last)."""

    def __init__(self, cfg: MaskGITVQGANConfig, block_idx: int) -> None:
        super().__init__()
        in_mult = (1, *cfg.channel_mult)
        c_in = cfg.hidden_channels * in_mult[block_idx]
        c_out = cfg.hidden_channels * cfg.channel_mult[block_idx]
        self.block = _res_blocks(c_in, c_out, cfg)
        self.downsample = block_idx != cfg.num_resolutions - 1

    def forward(self, x_BChHW: Tensor) -> Tensor:
        for res_block in self.block:
            x_BChHW = res_block(x_BChHW)
        return F.avg_pool2d(x_BChHW, kernel_size=2, stride=2) if self.downsample else x_BChHW


class UpsamplingBlock(nn.Module):
    """Level i: res blocks to hidden * channel_mult[i], then nearest 2x + 3x3 conv (not level 0)."""

    def __init__(self, cfg: MaskGITVQGANConfig, block_idx: int) -> None:
        super().__init__()
        last = block_idx == cfg.num_resolutions - 1
        c_in = cfg.hidden_channels * cfg.channel_mult[-1 if last else block_idx + 1]
        c_out = cfg.hidden_channels * cfg.channel_mult[block_idx]
        self.block = _res_blocks(c_in, c_out, cfg)
        self.upsample_conv = _conv(c_out, c_out, 3) if block_idx != 0 else None

    def forward(self, x_BChHW: Tensor) -> Tensor:
        for res_block in self.block:
            x_BChHW = res_block(x_BChHW)
        if self.upsample_conv is not None:
            x_BChHW = self.upsample_conv(F.interpolate(x_BChHW, scale_factor=2.0, mode="nearest"))
        return x_BChHW


class Encoder(nn.Module):
    """Images (B, num_channels, H, W) -> z (B, D, H/f, W/f) (before quantization)."""

    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        self.conv_in = _conv(cfg.num_channels, cfg.hidden_channels, 3, bias=False)
        self.down = nn.ModuleList([DownsamplingBlock(cfg, i) for i in range(cfg.num_resolutions)])
        mid = cfg.hidden_channels * cfg.channel_mult[-1]
        self.mid = _res_blocks(mid, mid, cfg)
        self.norm_out = _norm(mid)
        self.conv_out = _conv(mid, cfg.z_channels, 1)

    def forward(self, pixel_values: Tensor) -> Tensor:
        h = self.conv_in(pixel_values)
        for block in self.down:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Code vectors z (B, D, h, w) -> images (B, num_channels, h*f, w*f), unclamped (~[0, 1])."""

    def __init__(self, cfg: MaskGITVQGANConfig) -> None:
        super().__init__()
        c = cfg.hidden_channels * cfg.channel_mult[-1]
        self.conv_in = _conv(cfg.z_channels, c, 3)
        self.mid = _res_blocks(c, c, cfg)
        # up[i] is level i (official: built in reverse, then reversed back); run from the top
        self.up = nn.ModuleList([UpsamplingBlock(cfg, i) for i in range(cfg.num_resolutions)])
        c_out = cfg.hidden_channels * cfg.channel_mult[0]
        self.norm_out = _norm(c_out)
        self.conv_out = _conv(c_out, cfg.num_channels, 3)

    def forward(self, z_BDhw: Tensor) -> Tensor:
        h = self.conv_in(z_BDhw)
        for block in self.mid:
            h = block(h)
        for block in reversed(self.up):
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------------


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast off (code distances in fp32); a no-op on devices without autocast (meta)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class VectorQuantizer(nn.Module):
    """Nearest-code (L2) quantizer over `embedding` (V, D), as the official VectorQuantizer."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost = commitment_cost
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def compute_distances(self, z_NDf: Tensor) -> Tensor:
        """Squared L2 distances (N, V) as the official: |z|^2 + |e|^2 - 2 z.e (one addmm)."""
        emb_DV = self.embedding.weight.to(z_NDf.dtype).t()
        return torch.addmm(
            z_NDf.pow(2.0).sum(dim=1, keepdim=True) + emb_DV.pow(2.0).sum(dim=0, keepdim=True),
            z_NDf, emb_DV, alpha=-2.0,
        )  # fmt: skip

    def get_code(self, z_BDhw: Tensor) -> Tensor:
        """z (B, D, h, w) -> int64 ids (B, h*w), row-major over (h, w)."""
        B, D = z_BDhw.shape[:2]
        with _no_autocast(z_BDhw.device), torch.no_grad():
            z_ND = z_BDhw.permute(0, 2, 3, 1).reshape(-1, D).float()
            return self.compute_distances(z_ND).argmin(dim=1).reshape(B, -1)

    def get_codebook_entry(self, ids: Tensor) -> Tensor:
        """ids (B, L) with L a square (official) or (B, h, w) -> code vectors (B, D, h, w)."""
        if ids.ndim == 2:
            side = math.isqrt(ids.shape[1])
            if side * side != ids.shape[1]:
                raise ValueError(
                    f"MaskGIT-VQGAN: ids (B, L) need a square L (official get_codebook_entry), got "
                    f"L={ids.shape[1]}; pass ids (B, h, w) for a non-square grid."
                )
            ids = ids.reshape(ids.shape[0], side, side)
        if ids.ndim != 3:
            raise ValueError(
                f"MaskGIT-VQGAN: ids must be (B, L) or (B, h, w), got {tuple(ids.shape)}."
            )
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()

    def forward(
        self, z_BDhw: Tensor, return_loss: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """z (B, D, h, w) -> (z_q (B, D, h, w), ids (B, h*w) int64, loss or None).

        With `return_loss`: loss = mean((sg(q) - z)^2) + commitment_cost * mean((q - sg(z))^2)
        (official weighting) and z_q = z + sg(q - z) (straight-through).
        """
        ids_BL = self.get_code(z_BDhw)
        q_BDhw = self.get_codebook_entry(ids_BL.reshape(z_BDhw.shape[0], *z_BDhw.shape[2:]))
        q_BDhw = q_BDhw.to(z_BDhw.dtype)
        if not return_loss:
            return q_BDhw, ids_BL, None
        loss = torch.mean((q_BDhw.detach() - z_BDhw) ** 2) + self.commitment_cost * torch.mean(
            (q_BDhw - z_BDhw.detach()) ** 2
        )
        return z_BDhw + (q_BDhw - z_BDhw).detach(), ids_BL, loss


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class MaskGITVQGAN(nn.Module):
    """MaskGIT-VQGAN: images (B, 3, H, W) in [0, 1] <-> code ids (B, h*w), h = H / f.

    H and W must be multiples of f (the model is fully convolutional; the release is 256 x 256).
    Frozen in the official pipelines; the adversarial / perceptual training losses are not here.
    """

    family: ClassVar[str] = "maskgit-vqgan"
    config_class: ClassVar[type[BaseModel]] = MaskGITVQGANConfig

    def __init__(self, config: MaskGITVQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(
            config.codebook_size, config.z_channels, config.commitment_cost
        )

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _check_images(self, images_BCHW: Tensor) -> None:
        cfg, f = self.config, self.config.downsample_factor
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != cfg.num_channels:
            raise ValueError(f"MaskGIT-VQGAN encode expects images (B, {cfg.num_channels}, H, W) "
                             f"in [0, 1], got {tuple(images_BCHW.shape)}.")
        if images_BCHW.shape[-2] % f or images_BCHW.shape[-1] % f:
            raise ValueError(f"MaskGIT-VQGAN encode: image size {tuple(images_BCHW.shape[-2:])} "
                             f"is not a multiple of the downsampling factor {f}; resize or crop "
                             "first.")

    def encode_latents(self, images_BCHW: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> encoder output z (B, D, h, w), before quantization."""
        self._check_images(images_BCHW)
        return self.encoder(images_BCHW)

    def encode(self, images_BCHW: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> int64 ids (B, h*w), row-major (official `encode`)."""
        return self.quantize.get_code(self.encode_latents(images_BCHW))

    def decode_latents(self, z_BDhw: Tensor) -> Tensor:
        """Code vectors (B, D, h, w) (or soft codes) -> images (B, 3, h*f, w*f), unclamped."""
        return self.decoder(z_BDhw)

    def decode(self, ids: Tensor) -> Tensor:
        """ids (B, L) with L = side**2, or (B, h, w), int in [0, V) -> images (B, 3, H, W) clamped
        to [0, 1] (official `PretrainedTokenizer.decode`)."""
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"MaskGIT-VQGAN decode expects integer ids, got {ids.dtype}.")
        V = self.config.codebook_size
        checkable = ids.numel() and ids.device.type != "meta"
        if checkable and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(
                f"MaskGIT-VQGAN decode: ids must lie in [0, {V}), got [{int(ids.min())}, "
                f"{int(ids.max())}]; were they made by a tokenizer with this codebook?"
            )
        q_BDhw = self.quantize.get_codebook_entry(ids.long())
        return self.decoder(q_BDhw.to(self.decoder.conv_in.weight.dtype)).clamp(0.0, 1.0)

    def forward(self, images_BCHW: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruct: images (B, 3, H, W) -> (unclamped reconstruction, {'indices' (B, h*w),
        'quantizer_loss'}), through the straight-through quantizer."""
        z_q, ids_BL, loss = self.quantize(self.encode_latents(images_BCHW), return_loss=True)
        assert loss is not None
        return self.decoder(z_q), {"indices": ids_BL, "quantizer_loss": loss}


# --------------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------------

#: released key prefixes not loaded -> why (none: the official loader is strict)
OFFICIAL_DROPPED: dict[str, str] = {}

_RES_PARAM = r"(?:norm[12]\.(?:weight|bias)|conv[12]\.weight|nin_shortcut\.weight)"
_OFFICIAL_KEY_RE = re.compile(
    r"^(?:encoder\.conv_in\.weight"
    rf"|encoder\.down\.\d+\.block\.\d+\.{_RES_PARAM}"
    rf"|(?:encoder|decoder)\.mid\.\d+\.{_RES_PARAM}"
    r"|(?:encoder|decoder)\.(?:norm_out|conv_out)\.(?:weight|bias)"
    r"|decoder\.conv_in\.(?:weight|bias)"
    rf"|decoder\.up\.\d+\.block\.\d+\.{_RES_PARAM}"
    r"|decoder\.up\.\d+\.upsample_conv\.(?:weight|bias)"
    r"|quantize\.embedding\.weight)$"
)


def official_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Released MaskGIT-VQGAN state dict -> this module's state dict (same names, same tensors;
    works on meta tensors). Raises ValueError naming the first key that is not a MaskGIT-VQGAN
    (`PretrainedTokenizer`) key, or when the dict is empty."""
    if not state_dict:
        raise ValueError("official_key_map: the state dict is empty; expected the MaskGIT-VQGAN "
                         "keys encoder.*, decoder.*, quantize.embedding.weight.")
    for key in state_dict:
        if not _OFFICIAL_KEY_RE.match(key):
            raise ValueError(
                f"official_key_map: '{key}' is not a MaskGIT-VQGAN checkpoint key (expected "
                "encoder.*, decoder.* and quantize.embedding.weight as in 1d-tokenizer's "
                "PretrainedTokenizer); is this another family's checkpoint, or a TiTok one "
                "(load that with titok.load_official)?"
            )
    return dict(state_dict)


def load_official(
    source: str | Path | Mapping[str, Tensor],
    config: MaskGITVQGANConfig | str = "maskgit-vqgan-f16-256",
    *,
    device: str | torch.device = "cpu",
) -> MaskGITVQGAN:
    """Build `config` (or a MASKGIT_VQGAN_SIZES name) and load a released state dict, strictly.

    `source`: a `.safetensors` file or an in-memory state dict with the official names (pickles
    are refused; see the module docstring). Returns the model in eval mode on `device`. Raises
    ValueError naming the first unknown key, the first key whose shape does not fit (with both
    shapes), or the first model key the checkpoint lacks.
    """
    cfg = maskgit_vqgan_config(config) if isinstance(config, str) else config
    label = config if isinstance(config, str) else "custom config"
    what = f"maskgit_vqgan.load_official({label})"
    state = official_key_map(read_state_dict(source, what=what))
    model = MaskGITVQGAN(cfg)
    load_mapped_state_dict(model, state, {k: k for k in state}, what=what)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Family spec
# --------------------------------------------------------------------------------------------------


def _encode(model: MaskGITVQGAN, x_BCHW: Tensor) -> dict[str, Tensor]:
    """x (B, 3, H, W) in [0, 1] -> ``indices`` (B, h*w) int64."""
    return {"indices": model.encode(x_BCHW)}


def _decode(model: MaskGITVQGAN, out: Tensor, grid_hw: tuple[int, int] | None = None) -> Tensor:
    """ids (B, L) (a square grid unless ``grid_hw`` = (h, w) is given) -> RGB (B, 3, H, W) in
    [0, 1]."""
    if grid_hw is not None:
        h, w = grid_hw
        if out.ndim != 2 or out.shape[1] != h * w:
            raise ValueError(f"MaskGIT-VQGAN decode: ids {tuple(out.shape)} do not fill the token "
                             f"grid {h}x{w}; expected (B, {h * w}).")
        out = out.reshape(out.shape[0], h, w)
    return model.decode(out)


SPEC = FamilySpec(
    name="maskgit-vqgan", role="tokenizer", config_class=MaskGITVQGANConfig,
    sizes=MASKGIT_VQGAN_SIZES, model_class=MaskGITVQGAN, produces=("id_tokens",),
    pixel_range="unit", encode=_encode, decode=_decode, load_official=load_official,
    aliases=("maskgit_vqgan",),
    summary="MaskGIT-VQGAN: f16 conv VQ, 16x16 ids over 1024 codes (RAR's tokenizer, TiTok's "
            "proxy codes and stage-2 pixel decoder)",
)  # fmt: skip
