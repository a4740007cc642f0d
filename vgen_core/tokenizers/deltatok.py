"""DeltaTok: one continuous token per frame pair, over frozen DINOv3-style ViT features.

Spec: methods.md §1.5; reference: amazon-far/deltatok `models/deltatok.py` (DeltaTok),
`training/base.py` (LogCoshLoss, checkpoint hooks); the layer is transformers' `DINOv3ViTLayer`
(`models/dinov3_vit/modeling_dinov3_vit.py`) patched by the repo's `models/qk_norm.py` and
`models/gated_attn.py` (read from the deltawam/DeltaWAM copy; the index lacks the official files).

    encoder([z, x + e0, y + e1]) -> slot z -> LayerNorm = delta (B, D), continuous, no quantizer
    decoder([delta, x])          -> y_hat at the x slots;  loss = log-cosh(y_hat, y) in fp32

x are the previous frame's patch features, y the current frame's; both frames use the same RoPE
table (token i of x and token i of y sit at the same image position), the z / delta slot is not
rotated. 512px frames through the ViT-B/16 VFM give N = 1024 tokens -> 1 delta token.

Shape legend: B batch, T frames, N patch tokens per frame (h*w), D width, L sequence length,
H heads, K head dim, C image channels.

Deviations from the official code, on purpose:
- The VFM is its own family (`FrozenViT`, "vfm_vit") and not a submodule of `DeltaTok`, which maps
  features to features; an exported DeltaTok holds only its trainable weights (the official
  checkpoint hook also drops the frozen backbone). Parameter names follow the official module
  (`z_embed`, `xy_embed`, `encoder_blocks.i.attention.attn_gate`, ...), so an official state dict
  converted to safetensors loads with `load_deltatok`.
- The DINOv3 layer is written natively (no transformers import) with the same math: RoPE on patch
  tokens only, then per-head LayerNorm (no bias) on q and k, SDPA, a per-head sigmoid gate computed
  from the attention input (after norm1), output projection; SwiGLU MLP; layer scale.
- `FrozenViT` stays in eval mode even when a parent module calls `.train()`, so the backbone never
  applies RoPE augmentation (the official code only calls `.eval()` on it at construction).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

__all__ = [
    "DELTATOK_SIZES",
    "DeltaTok",
    "DeltaTokConfig",
    "FrozenViT",
    "VFMConfig",
    "VFM_SIZES",
    "deltatok_config",
    "dinov3_to_vgen",
    "load_deltatok",
    "load_vfm",
    "log_cosh_loss",
    "patch_coords",
    "vfm_config",
    "vgen_to_dinov3",
]

Rope = tuple[Tensor, Tensor]  # (cos_NK, sin_NK), fp32


# --------------------------------------------------------------------------------------------------
# Loss and rotary position helpers
# --------------------------------------------------------------------------------------------------


def log_cosh_loss(pred: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """log(cosh(pred - target)) in fp32, written overflow-free as |d| + softplus(-2|d|) - log 2.

    Args:
        pred, target: same shape, any float dtype (both are cast to fp32; target is detached).
        reduction: "mean" (a scalar, as the official training step) or "none".
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"log_cosh_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ."
        )
    d = (pred.float() - target.detach().float()).abs()
    loss = d + F.softplus(-2.0 * d) - math.log(2.0)
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"log_cosh_loss: reduction must be 'mean' or 'none', got '{reduction}'.")


def patch_coords(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Patch-centre coordinates of an h x w grid, raster order, (row, col) in [-1, 1] -> (h*w, 2).

    Each axis is normalised separately (DINOv3 `normalize_coords="separate"`).
    """
    rows = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    cols = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * grid - 1.0


def _rope_tables(coords_N2: Tensor, head_dim: int, theta: float) -> Rope:
    """DINOv3 2-D RoPE: head_dim/4 frequencies per axis, angles 2*pi*coord*theta**(-4i/K)."""
    inv_freq = theta ** -torch.arange(0, 1, 4 / head_dim, dtype=torch.float32,
                                      device=coords_N2.device)
    angles = 2 * math.pi * coords_N2.float()[:, :, None] * inv_freq[None, None, :]
    angles = angles.flatten(1, 2).tile(2)  # (N, K)
    return angles.cos(), angles.sin()


def _rotate_half(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _apply_rope(t_BHLK: Tensor, rope: Rope) -> Tensor:
    """Rotate the last N tokens (the patches); the leading prefix tokens are left unrotated."""
    cos, sin = rope
    n = cos.shape[0]
    prefix, patches = t_BHLK[..., :-n, :], t_BHLK[..., -n:, :].float()
    rotated = (patches * cos + _rotate_half(patches) * sin).to(t_BHLK.dtype)
    return torch.cat((prefix, rotated), dim=-2)


def _default_coords(n: int, device: torch.device) -> Tensor:
    h = math.isqrt(n)
    if h * h != n:
        raise ValueError(
            f"{n} patch tokens do not form a square grid; pass coords_N2=patch_coords(h, w) "
            "for non-square frames."
        )
    return patch_coords(h, h, device=device)


# --------------------------------------------------------------------------------------------------
# DINOv3-style transformer layer (names follow transformers' DINOv3ViTLayer)
# --------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float, *, qk_norm: bool, gated: bool,
                 query_bias: bool, key_bias: bool, value_bias: bool, proj_bias: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=query_bias)
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim, bias=value_bias)
        self.o_proj = nn.Linear(dim, dim, bias=proj_bias)
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=eps, bias=False)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=eps, bias=False)
        self.attn_gate = nn.Linear(dim, heads) if gated else None

    def forward(self, h_BLD: Tensor, rope: Rope) -> Tensor:
        B, L, D = h_BLD.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, L, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(h_BLD)), heads(self.k_proj(h_BLD)), heads(self.v_proj(h_BLD))
        q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        if hasattr(self, "q_norm"):  # after RoPE, as in the official patch
            q, k = self.q_norm(q), self.k_norm(k)
        out_BHLK = F.scaled_dot_product_attention(q, k, v)
        if self.attn_gate is not None:
            out_BHLK = out_BHLK * self.attn_gate(h_BLD).transpose(1, 2).unsqueeze(-1).sigmoid()
        return self.o_proj(out_BHLK.transpose(1, 2).reshape(B, L, D))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, gated: bool, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias) if gated else None
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, h: Tensor) -> Tensor:
        if self.gate_proj is None:
            return self.down_proj(F.gelu(self.up_proj(h)))
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), init))

    def forward(self, h: Tensor) -> Tensor:
        return h * self.lambda1


class _Block(nn.Module):
    """Pre-norm block: h + ls1(attn(norm1(h))), then + ls2(mlp(norm2(h)))."""

    def __init__(self, cfg: VFMConfig | DeltaTokConfig, *, qk_norm: bool, gated_attn: bool,
                 gated_mlp: bool, layer_scale: float) -> None:
        super().__init__()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.norm1 = nn.LayerNorm(D, eps=eps)
        self.attention = _Attention(
            D, cfg.num_heads, eps, qk_norm=qk_norm, gated=gated_attn, query_bias=cfg.query_bias,
            key_bias=cfg.key_bias, value_bias=cfg.value_bias, proj_bias=cfg.proj_bias,
        )
        self.layer_scale1 = _LayerScale(D, layer_scale)
        self.norm2 = nn.LayerNorm(D, eps=eps)
        self.mlp = _MLP(D, cfg.intermediate_size, gated_mlp, cfg.mlp_bias)
        self.layer_scale2 = _LayerScale(D, layer_scale)

    def forward(self, h_BLD: Tensor, rope: Rope) -> Tensor:
        h_BLD = h_BLD + self.layer_scale1(self.attention(self.norm1(h_BLD), rope))
        return h_BLD + self.layer_scale2(self.mlp(self.norm2(h_BLD)))


def _init_linears(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _ViTCommon(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(768, ge=4)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=1)
    layer_norm_eps: float = Field(1e-5, gt=0.0)
    rope_theta: float = Field(100.0, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True

    @model_validator(mode="after")
    def _check_heads(self) -> _ViTCommon:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads "
                "whose size is a multiple of 4 (2-D RoPE uses head_dim/4 frequencies per axis)."
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------------------------------
# Frozen VFM
# --------------------------------------------------------------------------------------------------


class VFMConfig(_ViTCommon):
    """DINOv3-style ViT feature extractor; `build()` makes it. Defaults = DINOv3 ViT-B/16.

    Without a checkpoint (`load_vfm`) the weights are a seeded random init (`init_seed`), so the
    features are fixed random projections of the image: reproducible across processes and fine for
    tests and demos, meaningless for the paper's task heads.
    """

    patch_size: int = Field(16, ge=1)
    num_channels: int = Field(3, ge=1)
    num_register_tokens: int = Field(4, ge=0)
    gated_mlp: bool = False  # ViT-S/B/L: GELU MLP; ViT-S+/H+/7B: SwiGLU
    layerscale_value: float = 1.0
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    init_seed: int = 0

    @model_validator(mode="after")
    def _check_norm(self) -> VFMConfig:
        if not len(self.image_mean) == len(self.image_std) == self.num_channels:
            raise ValueError(
                f"image_mean/image_std need {self.num_channels} values (num_channels), got "
                f"{len(self.image_mean)}/{len(self.image_std)}."
            )
        return self

    def build(self) -> FrozenViT:
        return FrozenViT(self)


VFM_SIZES: dict[str, VFMConfig] = {
    # facebook/dinov3-vitb16-pretrain-lvd1689m (86M): 768 x 12, 12 heads, MLP 3072, 4 registers.
    "dinov3-vitb16": VFMConfig(),
    # CPU-test size: patch 8, 64 x 2, 4 heads (~0.1M params); 64px crops -> 8x8 tokens.
    "tiny": VFMConfig(patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128),
}


vfm_config = sized_config("VFM", VFMConfig, VFM_SIZES)


class _Embeddings(nn.Module):
    def __init__(self, cfg: VFMConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))  # unused at inference; kept for keys
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, D))
        self.patch_embeddings = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, cfg.patch_size)


class FrozenViT(nn.Module):
    """Frozen DINOv3-style ViT: images -> last-layer patch tokens (after the final LayerNorm).

    Always in eval mode with `requires_grad=False`; forward runs under `no_grad`. Module names
    follow transformers' `DINOv3ViTModel`, so a transformers `model.safetensors` loads as is and
    Meta's original checkpoint names load through `dinov3_to_vgen` (see `load_vfm`).
    """

    family: ClassVar[str] = "vfm_vit"
    config_class: ClassVar[type[BaseModel]] = VFMConfig
    image_mean: Tensor  # buffers
    image_std: Tensor

    def __init__(self, config: VFMConfig) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.embeddings = _Embeddings(config)
            self.layer = nn.ModuleList(
                _Block(config, qk_norm=False, gated_attn=False, gated_mlp=config.gated_mlp,
                       layer_scale=config.layerscale_value)
                for _ in range(config.num_layers)
            )
            self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            _init_linears(self, config.init_std)
            nn.init.trunc_normal_(self.embeddings.cls_token, std=config.init_std)
            nn.init.trunc_normal_(self.embeddings.register_tokens, std=config.init_std)
        mean = torch.tensor(config.image_mean).view(-1, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(-1, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenViT:
        return super().train(False)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Patch features of images (B, C, H, W) or clips (B, T, C, H, W).

        Images are float in [0, 1] (or uint8 in [0, 255]), normalised here with the config's
        mean/std. H and W must be multiples of `patch_size`. Returns (B, N, D) or (B, T, N, D)
        with N = (H / patch_size) * (W / patch_size), raster order.
        """
        cfg = self.config
        lead = images.shape[:-3]
        if images.ndim not in (4, 5) or images.shape[-3] != cfg.num_channels:
            raise ValueError(
                f"FrozenViT expects (B, {cfg.num_channels}, H, W) or (B, T, {cfg.num_channels}, "
                f"H, W), got {tuple(images.shape)}."
            )
        H, W = images.shape[-2:]
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(
                f"FrozenViT: image size {(H, W)} is not a multiple of patch_size={cfg.patch_size}; "
                "resize or crop the frames first."
            )
        emb = self.embeddings
        x = images.reshape(-1, *images.shape[-3:])
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        x = ((x - self.image_mean) / self.image_std).to(emb.patch_embeddings.weight.dtype)
        patches_BND = emb.patch_embeddings(x).flatten(2).transpose(1, 2)
        B = patches_BND.shape[0]
        h_BLD = torch.cat(
            (emb.cls_token.expand(B, -1, -1), emb.register_tokens.expand(B, -1, -1), patches_BND),
            dim=1,
        )
        coords = patch_coords(H // cfg.patch_size, W // cfg.patch_size, device=x.device)
        rope = _rope_tables(coords, cfg.head_dim, cfg.rope_theta)
        for blk in self.layer:
            h_BLD = blk(h_BLD, rope)
        out_BND = self.norm(h_BLD)[:, self.num_prefix_tokens:]
        return out_BND.reshape(*lead, *out_BND.shape[1:])


# --------------------------------------------------------------------------------------------------
# Weight loading: Meta DINOv3 / transformers names -> ours, strict, safetensors only
# --------------------------------------------------------------------------------------------------

# Meta's original DINOv3 names (facebookresearch/dinov3 `vision_transformer.py`) -> ours, which are
# transformers' DINOv3ViTModel names. Applied in order, first match wins. Besides the renames:
#   blocks.i.attn.qkv.weight (3D, D)  -> q_proj / k_proj / v_proj weights (split in thirds)
#   blocks.i.attn.qkv.bias   (3D,)    -> q_proj / v_proj biases; the k third is dropped when the
#                                         config has key_bias=False (Meta masks it: qkv.bias_mask)
#   blocks.i.attn.qkv.bias_mask       -> dropped
#   rope_embed.periods (K/4,)         -> dropped after checking it equals theta ** (4i/K)
#   mask_token (1, D)                 -> embeddings.mask_token (1, 1, D)
_DINOV3_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^mask_token$", "embeddings.mask_token"),
    (r"^storage_tokens$", "embeddings.register_tokens"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layer.\1.mlp.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layer.\1.mlp.down_proj."),
    (r"^blocks\.(\d+)\.mlp\.w1\.", r"layer.\1.mlp.gate_proj."),
    (r"^blocks\.(\d+)\.mlp\.w2\.", r"layer.\1.mlp.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.w3\.", r"layer.\1.mlp.down_proj."),
    (r"^blocks\.(\d+)\.norm([12])\.", r"layer.\1.norm\2."),
    (r"^norm\.", "norm."),
)
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias|bias_mask)$")


def _periods(config: VFMConfig) -> Tensor:
    K = config.head_dim
    return config.rope_theta ** (4 * torch.arange(K // 4, dtype=torch.float32) / K)


def dinov3_to_vgen(state: dict[str, Tensor], config: VFMConfig) -> dict[str, Tensor]:
    """Rename a state dict with Meta's original DINOv3 names to `FrozenViT` names (see the table
    above `_DINOV3_RENAMES`). Unknown keys are passed through unchanged, so the strict check in
    `load_vfm` reports them."""
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        m = _QKV.match(key)
        if m:
            i, kind = m.groups()
            if kind == "bias_mask":
                continue
            q, k, v = t.chunk(3, dim=0)
            pre = f"layer.{i}.attention."
            out[pre + "q_proj." + kind], out[pre + "v_proj." + kind] = q, v
            if kind == "weight" or config.key_bias:
                out[pre + "k_proj." + kind] = k
            continue
        if key == "rope_embed.periods":
            want = _periods(config)
            if t.shape != want.shape or not torch.allclose(t.float().cpu(), want, rtol=1e-4):
                raise ValueError(
                    f"rope_embed.periods in the checkpoint do not match rope_theta="
                    f"{config.rope_theta}, head_dim={config.head_dim}; set them in the VFMConfig."
                )
            continue
        for pattern, repl in _DINOV3_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        if key == "embeddings.mask_token" and t.ndim == 2:
            t = t.unsqueeze(0)
        out[key] = t
    return out


def vgen_to_dinov3(state: dict[str, Tensor], config: VFMConfig) -> dict[str, Tensor]:
    """Inverse of `dinov3_to_vgen`: `FrozenViT` names -> Meta's original DINOv3 names and shapes
    (fused qkv with a zero k-bias third and its `bias_mask`, `rope_embed.periods`)."""
    out: dict[str, Tensor] = {"rope_embed.periods": _periods(config)}
    fixed = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
             "embeddings.register_tokens": "storage_tokens"}
    for key, t in state.items():
        if key in fixed:
            out[fixed[key]] = t.reshape(1, -1) if key == "embeddings.mask_token" else t
            continue
        m = re.match(r"^layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            i, which, kind = m.groups()
            if which != "q":
                continue
            pre = f"layer.{i}.attention."
            q, v = t, state[pre + "v_proj." + kind]
            k = state.get(pre + "k_proj." + kind, torch.zeros_like(q))
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat((q, k, v))
            if kind == "bias":
                mask = torch.ones_like(torch.cat((q, k, v)))
                if not config.key_bias:
                    mask[q.shape[0]: 2 * q.shape[0]] = 0
                out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
            continue
        key = re.sub(r"^embeddings\.patch_embeddings\.", "patch_embed.proj.", key)
        key = re.sub(r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj.", key)
        key = re.sub(r"^layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma", key)
        if config.gated_mlp:
            key = re.sub(r"^layer\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.w1.", key)
            key = re.sub(r"^layer\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.w2.", key)
            key = re.sub(r"^layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.w3.", key)
        else:
            key = re.sub(r"^layer\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.fc1.", key)
            key = re.sub(r"^layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2.", key)
        key = re.sub(r"^layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2.", key)
        out[key] = t
    return out


def _load_strict(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Assign `state` (cast to fp32) to a model built on the meta device, naming the first
    missing / unexpected / mis-shaped key on failure."""
    own = model.state_dict()
    for key in own:
        if key not in state:
            n = sum(k not in state for k in own)
            raise ValueError(f"{where}: weight '{key}' is missing from the file ({n} missing).")
    for key, t in state.items():
        if key not in own:
            raise ValueError(
                f"{where}: unexpected weight '{key}' {tuple(t.shape)}; the file holds a different "
                "architecture (check num_layers, gated_mlp, qk_norm, gated_attn, key_bias)."
            )
        if tuple(t.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{where}: '{key}' has shape {tuple(t.shape)} in the file but "
                f"{tuple(own[key].shape)} in the model built from the config; pass the config "
                "that matches the checkpoint."
            )
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


#: released key prefixes not loaded -> why (``vgen weights convert`` reports them)
OFFICIAL_DROPPED = {
    "backbone.": "the frozen vision foundation model (loaded from its own file: vfm_weights)",
    "rope_embeddings.": "RoPE frequencies, recomputed from the config",
}


def _label(path: str | Path | Mapping[str, Tensor]) -> str:
    return "a state dict" if isinstance(path, Mapping) else str(path)


def _read(path: str | Path | Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if isinstance(path, Mapping):  # an in-memory state dict (``vgen weights convert``)
        return {k[len(prefix):]: v for k, v in path.items() if k.startswith(prefix)}
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path}: only .safetensors files are read (never pickle); convert a .pth once with "
            "safetensors.torch.save_file(torch.load(p, weights_only=True), out) in a trusted "
            "environment."
        )
    state = load_file(str(path), device="cpu")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_vfm(
    path: str | Path | Mapping[str, Tensor], config: VFMConfig, prefix: str = ""
) -> FrozenViT:
    """Build a `FrozenViT` from `config` and load a local safetensors DINOv3 checkpoint into it.

    Accepts transformers names (`embeddings.*`, `layer.i.*`, `norm.*`: the `model.safetensors` of
    facebook/dinov3-vitb16-pretrain-lvd1689m) or Meta's original names (`blocks.i.attn.qkv.*`,
    `storage_tokens`, ...: mapped by `dinov3_to_vgen`); or such a state dict. Only keys
    starting with `prefix` are used, with the prefix removed. Raises ValueError naming the first
    missing, unexpected or mis-shaped key.
    """
    state = _read(path, prefix)
    if any(k.startswith("blocks.") or k == "storage_tokens" for k in state):
        state = dinov3_to_vgen(state, config)
    with torch.device("meta"):  # skip the random init of weights about to be replaced
        model = FrozenViT(config)
    _load_strict(model, state, f"load_vfm({_label(path)})")
    model.image_mean = torch.tensor(config.image_mean).view(-1, 1, 1)
    model.image_std = torch.tensor(config.image_std).view(-1, 1, 1)
    return model


# --------------------------------------------------------------------------------------------------
# DeltaTok
# --------------------------------------------------------------------------------------------------


class DeltaTokConfig(_ViTCommon):
    """DeltaTok config; `build()` makes the model. Defaults = the paper's ViT-B DeltaTok.

    `hidden_size` must equal the VFM width. `num_layers` is per stack (encoder and decoder each).
    `intermediate_size` = 2 * 3072 // 3 = 2048 keeps the SwiGLU MLP at the GELU MLP's parameters.
    `rope_rescale`: in training mode the patch coordinates of both frames are multiplied by one
    log-uniform factor in [1/r, r] per call (DINOv3 `pos_embed_rescale`; None disables).
    """

    intermediate_size: int = Field(2048, ge=1)
    layer_scale_init: float = 1e-5
    rope_rescale: float | None = Field(2.0, gt=1.0)
    qk_norm: bool = True
    gated_attn: bool = True
    swiglu: bool = True

    def build(self) -> DeltaTok:
        return DeltaTok(self)


DELTATOK_SIZES: dict[str, DeltaTokConfig] = {
    # Paper / configs/deltatok_vitb_dinov3_vitb_kinetics.yaml: 12 enc + 12 dec layers, width 768.
    "deltatok-b16": DeltaTokConfig(),
    # CPU-test size, matches VFM_SIZES["tiny"] (width 64).
    "tiny": DeltaTokConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
}


deltatok_config = sized_config("DeltaTok", DeltaTokConfig, DELTATOK_SIZES)


class _Table(nn.Module):
    """A learned (rows, D) table named like nn.Embedding (`.weight`); indexed directly."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, dim))


class DeltaTok(nn.Module):
    """Frame-pair features (x previous, y current) <-> one continuous delta token.

    All methods take VFM patch features (B, N, D) in raster order; `coords_N2` (from
    `patch_coords(h, w)`) is needed only for non-square grids.
    """

    family: ClassVar[str] = "deltatok"
    config_class: ClassVar[type[BaseModel]] = DeltaTokConfig

    def __init__(self, config: DeltaTokConfig) -> None:
        super().__init__()
        self.config = config
        D, std = config.hidden_size, config.init_std
        self.z_embed = _Table(1, D)  # learned query z
        self.xy_embed = _Table(2, D)  # row 0 added to x (previous), row 1 to y (current)

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                _Block(config, qk_norm=config.qk_norm, gated_attn=config.gated_attn,
                       gated_mlp=config.swiglu, layer_scale=config.layer_scale_init)
                for _ in range(config.num_layers)
            )

        self.encoder_blocks, self.decoder_blocks = stack(), stack()
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        _init_linears(self, std)
        nn.init.trunc_normal_(self.z_embed.weight, std=std)
        nn.init.trunc_normal_(self.xy_embed.weight, std=std)

    # ---- internals (rope is computed once per call and shared by encoder and decoder) ----

    def _rope(self, n: int, coords_N2: Tensor | None, device: torch.device) -> Rope:
        coords = _default_coords(n, device) if coords_N2 is None else coords_N2.to(device)
        if coords.shape != (n, 2):
            raise ValueError(
                f"coords_N2 must be ({n}, 2) for {n} tokens, got {tuple(coords.shape)}."
            )
        r = self.config.rope_rescale
        if self.training and r is not None:
            scale = torch.empty(1, device=device).uniform_(-math.log(r), math.log(r)).exp()
            coords = coords * scale
        return _rope_tables(coords, self.config.head_dim, self.config.rope_theta)

    def _check(self, name: str, t: Tensor, ndim: int) -> None:
        if t.ndim != ndim or t.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"DeltaTok.{name}: expected {ndim}-d features with last dim "
                f"{self.config.hidden_size} (the VFM width), got {tuple(t.shape)}."
            )

    @staticmethod
    def _run(blocks: nn.ModuleList, h_BLD: Tensor, rope: Rope) -> Tensor:
        for blk in blocks:
            h_BLD = blk(h_BLD, rope)
        return h_BLD

    def _encode(self, x_BND: Tensor, y_BND: Tensor, rope: Rope) -> Tensor:
        B = x_BND.shape[0]
        z_B1D = self.z_embed.weight[None].expand(B, -1, -1)
        h = torch.cat((z_B1D, x_BND + self.xy_embed.weight[0], y_BND + self.xy_embed.weight[1]), 1)
        shared = (torch.cat((rope[0], rope[0])), torch.cat((rope[1], rope[1])))
        return self.norm(self._run(self.encoder_blocks, h, shared)[:, 0])

    def _decode(self, delta_BD: Tensor, x_BND: Tensor, rope: Rope) -> Tensor:
        h = torch.cat((delta_BD[:, None].to(x_BND.dtype), x_BND), 1)
        return self._run(self.decoder_blocks, h, rope)[:, 1:]

    # ---- public API ----

    def encode(self, x_BND: Tensor, y_BND: Tensor, coords_N2: Tensor | None = None) -> Tensor:
        """Previous (B, N, D) and current (B, N, D) features -> delta token (B, D)."""
        self._check("encode", x_BND, 3)
        if y_BND.shape != x_BND.shape:
            raise ValueError(
                f"DeltaTok.encode: x {tuple(x_BND.shape)} and y {tuple(y_BND.shape)} differ."
            )
        return self._encode(x_BND, y_BND, self._rope(x_BND.shape[1], coords_N2, x_BND.device))

    def decode(self, delta_BD: Tensor, x_BND: Tensor, coords_N2: Tensor | None = None) -> Tensor:
        """Delta token (B, D) and previous features (B, N, D) -> predicted current (B, N, D)."""
        self._check("decode", x_BND, 3)
        self._check("decode", delta_BD, 2)
        return self._decode(delta_BD, x_BND, self._rope(x_BND.shape[1], coords_N2, x_BND.device))

    def forward(self, x_BND: Tensor, y_BND: Tensor,
                coords_N2: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Training step: returns (y_hat (B, N, D), scalar fp32 log-cosh loss against y)."""
        self._check("forward", x_BND, 3)
        rope = self._rope(x_BND.shape[1], coords_N2, x_BND.device)
        y_hat = self._decode(self._encode(x_BND, y_BND, rope), x_BND, rope)
        return y_hat, log_cosh_loss(y_hat, y_BND)

    def tokenize_clip(self, features_BTND: Tensor, coords_N2: Tensor | None = None) -> Tensor:
        """Clip features (B, T, N, D) -> deltas (B, T-1, D), all pairs (t, t+1) in one batch.

        Teacher-forced (x = true previous features), as the official `tokenize_offline`.
        """
        self._check("tokenize_clip", features_BTND, 4)
        B, T = features_BTND.shape[:2]
        if T < 2:
            raise ValueError(f"DeltaTok.tokenize_clip: need T >= 2 frames, got T={T}.")
        x = features_BTND[:, :-1].flatten(0, 1)
        y = features_BTND[:, 1:].flatten(0, 1)
        return self.encode(x, y, coords_N2).unflatten(0, (B, T - 1))

    def rollout(self, first_BND: Tensor, deltas_BTD: Tensor,
                coords_N2: Tensor | None = None) -> Tensor:
        """Decode deltas (B, T, D) from first-frame features (B, N, D) -> (B, T, N, D).

        Step t decodes on the previous reconstruction (x = y_hat_{t-1}, detached as in the
        official `rollout_step`), so output t predicts frame t + 1 of the clip.
        """
        self._check("rollout", first_BND, 3)
        self._check("rollout", deltas_BTD, 3)
        rope = self._rope(first_BND.shape[1], coords_N2, first_BND.device)
        x, outs = first_BND, []
        for t in range(deltas_BTD.shape[1]):
            x = self._decode(deltas_BTD[:, t], x, rope).detach()
            outs.append(x)
        return torch.stack(outs, 1)

    def tokenize_closed_loop(self, features_BTND: Tensor,
                             coords_N2: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Official evaluation rollout: delta_t = encode(y_hat_{t-1}, y_t), y_hat_0 = frame 0.

        Returns deltas (B, T-1, D) and reconstructions (B, T-1, N, D) of frames 1..T-1; the deltas
        decode exactly to these reconstructions with `rollout(features[:, 0], deltas)`.
        """
        self._check("tokenize_closed_loop", features_BTND, 4)
        rope = self._rope(features_BTND.shape[2], coords_N2, features_BTND.device)
        x, deltas, recons = features_BTND[:, 0], [], []
        for t in range(1, features_BTND.shape[1]):
            delta = self._encode(x, features_BTND[:, t], rope)
            x = self._decode(delta, x, rope).detach()
            deltas.append(delta)
            recons.append(x)
        return torch.stack(deltas, 1), torch.stack(recons, 1)


def deltatok_key_map(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official DeltaTok (Lightning) state dict under this module's names: ``network.`` /
    ``_orig_mod.`` prefixes stripped, the frozen backbone and RoPE tables left out
    (``OFFICIAL_DROPPED``); ValueError when no key carries the prefixes or names of a DeltaTok
    checkpoint (``vgen weights`` then compares the names as they are)."""
    out: dict[str, Tensor] = {}
    prefixed = False
    for key, t in state_dict.items():
        new = key.replace("_orig_mod.", "").removeprefix("network.")
        prefixed = prefixed or new != key
        if not new.startswith(("backbone.", "rope_embeddings.")):
            out[new] = t
    if not prefixed and len(out) == len(state_dict):
        raise ValueError("deltatok_key_map: no 'network.' / '_orig_mod.' prefix and no "
                         "backbone key: not an official DeltaTok checkpoint")
    return out


def load_deltatok(path: str | Path | Mapping[str, Tensor], config: DeltaTokConfig) -> DeltaTok:
    """Load an official DeltaTok state dict saved as safetensors (keys as in the Lightning
    checkpoint: `network.` / `_orig_mod.` prefixes are stripped, `backbone.*` keys dropped)."""
    raw = _read(path, "")
    try:
        state = deltatok_key_map(raw)
    except ValueError:  # already without prefixes (e.g. a re-saved state dict)
        state = dict(raw)
    with torch.device("meta"):
        model = DeltaTok(config)
    _load_strict(model, state, f"load_deltatok({_label(path)})")
    return model




# --------------------------------------------------------------------------------------------------
# Family specs
# --------------------------------------------------------------------------------------------------


def _encode_clip(model: DeltaTok, features_BTND: Tensor) -> dict[str, Tensor]:
    """Frozen-VFM features of T frames (B, T, N, D) -> ``delta`` (B, T-1, D) (teacher-forced)."""
    return {"delta": model.tokenize_clip(features_BTND)}


SPECS = (
    FamilySpec(
        name="deltatok", role="tokenizer", config_class=DeltaTokConfig, sizes=DELTATOK_SIZES,
        model_class=DeltaTok, produces=("delta_tokens",), pixel_range="unit",
        encode=_encode_clip, load_official=load_deltatok, default_for=("tokenize.deltatok",),
        resolution_free=True,
        summary="DeltaTok: one continuous delta token per frame pair over frozen VFM features",
    ),
    FamilySpec(
        name="vfm_vit", role="component", config_class=VFMConfig, sizes=VFM_SIZES,
        model_class=FrozenViT, pixel_range="unit", load_official=load_vfm,
        summary="frozen DINOv3-style ViT feature extractor (DeltaTok's VFM)",
    ),
)
