"""FlowTok: direct flow from projected text tokens to 1D image tokens (no noise source).

Spec: methods.md §2.6 [P]: the official code was not fetchable, so this follows the paper
(arXiv 2503.10772 §4.1, §4.2, §5.1, Table 1); choices marked [I] are ours.

    text -> text features T_init (B, N, E) -> text projector (6 pre-norm transformer blocks)
         -> mean || logvar (B, N, 2C) -> z_T ~ N(mean, exp(logvar))      (KL to N(0, I))
    z_T (source, t = 1) --flow matching, DiT blocks conditioned on t only--> z_I (target, t = 0)
        x_t = (1 - t) z_I + t z_T,  v = z_T - z_I      (z_T takes the noise's place; CrossFlow)
    loss = FM + gamma1 * KL + gamma2 * align,  gamma1 = 1e-4, gamma2 = 1 (paper defaults)

Alignment (paper §4.1): a light MLP maps T_init to T_P (B, N, C); T_P and z_T are flattened,
L2-normalised and compared CLIP-style, logits = exp(tau) T_P z_T^T with a learnable tau (init
log(1/0.07), exp(tau) capped at 100 as in CLIP), symmetric cross-entropy over the batch.
`align_with="image_tokens"` instead contrasts z_T with the flattened image tokens of the pair.

Text input [I] (no CLIP download is possible here), chosen by `text_input`:
  - "features": precomputed features (B, N, E), e.g. CLIP ViT-L/14 final-layer text features
    (77 x 768), under the batch key `text_features`;
  - "bytes": a small byte-level transformer encoder inside the model reads UTF-8 bytes
    (`encode_text_bytes`, batch key `text_bytes` (B, N) int64, 0 = padding, byte b -> b + 1).
Image tokens are continuous (B, N, C) (TA-TiTok KL tokens, N = 77, C = 16, already sampled and
scaled), batch key `image_tokens`. N must equal the text length (K = N = 77 in the paper).

Classifier-free guidance [I]: the flow model has no text input (the text is the source), so the
usual "drop the caption" gives it nothing to tell the two cases apart. FlowTok's code is not
public and the paper text available here does not spell its CFG out; we follow CrossFlow (same
authors' group; the public re-implementation's `diffusion/flow_matching.py` and
`libs/model/dit_t2i.py`): a learned 2-entry indicator embedding (0 = conditional, 1 = null) is
added to the time embedding; in training each sample is null with probability `cfg_dropout`
(CrossFlow's `cfg_indicator` = 0.1), and the null samples' image targets are rotated among
themselves (`torch.cat((t[1:], t[:1]))`), so a null sample flows from its text latent to some
other image: the unconditional flow. When fewer than two samples are drawn null there is nothing
to rotate and none is null (as CrossFlow). The sampler forms v = v_u + s (v_c - v_u) with
`guidance_scale` s; s = 1 runs the conditional model alone, exactly the unguided sampler.

Not built: the text decoder that turns z_T back into CLIP token ids (so `reverse_sample` returns
text latents, not captions).

Shape legend: B batch, N tokens (text length = image tokens), C token dim, E text feature width,
P projector width, D flow-model width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from vgen_core.generators.common import adaln_modulation, attention, linear_at, modulate
from vgen_core.generators.deepflow import DiTBlock
from vgen_core.generators.flow import (
    TimestepEmbedder,
    euler_sample,
    flow_path,
    flow_target,
    logit_normal_t,
    ode_time_grid,
)

__all__ = [
    "FLOWTOK_SIZES",
    "FlowTok",
    "FlowTokConfig",
    "cfg_null_mask",
    "clip_contrastive_loss",
    "encode_text_bytes",
    "flowtok_config",
    "flowtok_loss",
    "gaussian_kl",
    "reverse_sample",
    "rotate_null_targets",
    "sample",
]


class FlowTokConfig(BaseModel):
    """FlowTok config; `build()` makes the model. Defaults = FlowTok-XL on 77x16 tokens with CLIP
    ViT-L/14 text features."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_tokens: int = Field(77, ge=1)
    token_dim: int = Field(16, ge=1)
    # text side
    text_input: Literal["features", "bytes"] = "features"
    text_dim: int = Field(768, ge=1)  # E: feature width, or the byte encoder's width
    byte_encoder_depth: int = Field(4, ge=1)  # [I] used only with text_input="bytes"
    projector_hidden: int = Field(768, ge=1)  # [I] width of the 6-block text projector
    projector_depth: int = Field(6, ge=1)
    text_heads: int = Field(12, ge=1)  # heads of the byte encoder and the projector
    # flow model (DiT blocks, t conditioning only)
    hidden: int = Field(1152, ge=1)
    depth: int = Field(28, ge=1)
    heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    # loss
    kl_weight: float = Field(1e-4, ge=0.0)  # gamma1
    align_weight: float = Field(1.0, ge=0.0)  # gamma2
    align_with: Literal["text_features", "image_tokens"] = "text_features"
    logit_scale_init: float = math.log(1 / 0.07)
    t_mean: float = 0.0  # [I] logit-normal t; the paper does not state its t sampling
    t_std: float = Field(1.0, gt=0.0)
    # [I] CrossFlow's CFG indicator: P(null) per sample; 0 = no indicator, no guidance
    cfg_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # generator-space scale of cached image-token latents (the tokenizer's; pipeline-side)
    scale_factor: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> FlowTokConfig:
        for width, heads, what in (
            (self.hidden, self.heads, "hidden/heads"),
            (self.projector_hidden, self.text_heads, "projector_hidden/text_heads"),
        ):
            if width % heads:
                raise ValueError(f"{what} = {width}/{heads} must divide evenly.")
        if self.text_input == "bytes" and self.text_dim % self.text_heads:
            raise ValueError(
                f"text_dim={self.text_dim} must be divisible by text_heads={self.text_heads} "
                "for the byte encoder."
            )
        return self

    def build(self) -> FlowTok:
        return FlowTok(self)


_TINY = dict(
    num_tokens=8, token_dim=4, text_input="bytes", text_dim=32, byte_encoder_depth=1,
    projector_hidden=32, projector_depth=1, text_heads=2, hidden=32, depth=2, heads=2,
    cfg_dropout=0.0,
)  # fmt: skip

FLOWTOK_SIZES: dict[str, FlowTokConfig] = {
    # CPU-test size: 8 tokens x 4 dims, byte-level text, no CFG indicator (cfg_dropout=0.1 to add).
    "tiny": FlowTokConfig(**_TINY),
    # Paper Table 1 (DiT blocks): B 12 x 768 (MLP 3072, 12 heads, 153M),
    # XL 28 x 1152 (4608, 16 heads, 698M), H 36 x 1280 (5120, 20 heads, 1.1B).
    "B": FlowTokConfig(hidden=768, depth=12, heads=12),
    "XL": FlowTokConfig(hidden=1152, depth=28, heads=16),
    "H": FlowTokConfig(hidden=1280, depth=36, heads=20),
}


flowtok_config = sized_config("FlowTok", FlowTokConfig, FLOWTOK_SIZES)


def encode_text_bytes(texts: Sequence[str], length: int) -> Tensor:
    """Captions -> (B, length) int64 UTF-8 bytes shifted by one (0 = padding), truncated."""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        data = list(text.encode("utf-8"))[:length]
        out[i, : len(data)] = torch.tensor(data, dtype=torch.long) + 1
    return out


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class _PreNormBlock(nn.Module):
    """x + Attn(LN(x)); x + MLP(LN(x)) (GELU, 4x)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        q, k, v = self.qkv(self.norm1(x_BND)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x_BND = x_BND + self.proj(a)
        return x_BND + self.fc2(F.gelu(self.fc1(self.norm2(x_BND))))


class _ByteEncoder(nn.Module):
    """Byte ids (B, N) in [0, 256] -> features (B, N, E): embedding + learned pos + blocks + LN."""

    def __init__(self, cfg: FlowTokConfig) -> None:
        super().__init__()
        E = cfg.text_dim
        self.embed = nn.Embedding(257, E)
        self.pos = nn.Parameter(torch.randn(1, cfg.num_tokens, E) * 0.02)
        self.blocks = nn.ModuleList(
            [_PreNormBlock(E, cfg.text_heads) for _ in range(cfg.byte_encoder_depth)]
        )
        self.norm = nn.LayerNorm(E)

    def forward(self, ids_BN: Tensor) -> Tensor:
        x = self.embed(ids_BN) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class FlowTok(nn.Module):
    """Text projector (Gaussian text tokens) + alignment MLP + DiT velocity model on (B, N, C)."""

    family: ClassVar[str] = "flowtok"
    config_class: ClassVar[type[BaseModel]] = FlowTokConfig

    def __init__(self, config: FlowTokConfig) -> None:
        super().__init__()
        self.config = config
        N, C, E, P, D = (
            config.num_tokens, config.token_dim, config.text_dim, config.projector_hidden,
            config.hidden,
        )  # fmt: skip
        self.byte_encoder = _ByteEncoder(config) if config.text_input == "bytes" else None
        # text projector
        self.proj_in = nn.Linear(E, P)
        self.proj_blocks = nn.ModuleList(
            [_PreNormBlock(P, config.text_heads) for _ in range(config.projector_depth)]
        )
        self.proj_norm = nn.LayerNorm(P)
        self.proj_out = nn.Linear(P, 2 * C)
        # alignment
        self.align_mlp = nn.Sequential(nn.Linear(E, E), nn.GELU(), nn.Linear(E, C))
        # shape (1,), not 0-dim: DeepSpeed broadcasts every parameter as bytes, which a 0-dim
        # tensor cannot be viewed as
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        # flow model
        self.x_embed = nn.Linear(C, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, N, D))
        self.t_embedder = TimestepEmbedder(D)
        # CFG indicator (CrossFlow's `y_embedder`, 2 classes): row 0 conditional, row 1 null
        self.cfg_embed = nn.Embedding(2, D) if config.cfg_dropout > 0 else None
        self.blocks = nn.ModuleList(
            [DiTBlock(D, config.heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = adaln_modulation(D, 2)
        self.final_linear = nn.Linear(D, C)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(linear_at(self.t_embedder.mlp, 0).weight, std=0.02)
        nn.init.normal_(linear_at(self.t_embedder.mlp, 2).weight, std=0.02)
        zero = [linear_at(b.adaLN_modulation, -1) for b in self.blocks]
        zero += [linear_at(self.final_adaLN, -1), self.final_linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.byte_encoder is not None:
            nn.init.normal_(self.byte_encoder.embed.weight, std=0.02)
        if self.cfg_embed is not None:
            nn.init.normal_(self.cfg_embed.weight, std=0.02)  # DiT label-table init

    def text_features(self, text: Tensor) -> Tensor:
        """(B, N, E) features: `text` is (B, N, E) features, or (B, N) byte ids in bytes mode."""
        cfg = self.config
        if cfg.text_input == "bytes":
            if text.ndim != 2 or text.dtype != torch.long or text.shape[1] != cfg.num_tokens:
                raise ValueError(
                    f"FlowTok(text_input='bytes') expects int64 byte ids (B, {cfg.num_tokens}) "
                    f"(encode_text_bytes), got {tuple(text.shape)} {text.dtype}."
                )
            if self.byte_encoder is None:
                raise RuntimeError("FlowTok: text_input='bytes' but the model has no byte_encoder.")
            return self.byte_encoder(text)
        if text.ndim != 3 or text.shape[1:] != (cfg.num_tokens, cfg.text_dim):
            raise ValueError(
                f"FlowTok(text_input='features') expects features (B, {cfg.num_tokens}, "
                f"{cfg.text_dim}), got {tuple(text.shape)}."
            )
        return text.float()

    def encode_text(self, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Text -> (mean (B, N, C), logvar (B, N, C) clamped to [-30, 20], features (B, N, E))."""
        feats = self.text_features(text)
        h = self.proj_in(feats)
        for blk in self.proj_blocks:
            h = blk(h)
        mean, logvar = self.proj_out(self.proj_norm(h)).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0), feats

    def forward(self, x_BNC: Tensor, t_B: Tensor, *, null: Tensor | None = None) -> Tensor:
        """Velocity v(x_t, t) (B, N, C); no text conditioning (the text is the source).

        null: (B,) bool, True = the unconditional flow (CFG indicator); None = all conditional.
        Only a model with `cfg_dropout > 0` has the indicator.
        """
        cfg = self.config
        if x_BNC.shape[1:] != (cfg.num_tokens, cfg.token_dim):
            raise ValueError(
                f"FlowTok expects tokens (B, {cfg.num_tokens}, {cfg.token_dim}), got "
                f"{tuple(x_BNC.shape)}."
            )
        c = self.t_embedder(t_B)
        if self.cfg_embed is not None:
            idx = torch.zeros_like(t_B, dtype=torch.long) if null is None else null.long()
            c = c + self.cfg_embed(idx)
        elif null is not None and bool(null.any()):
            raise ValueError("FlowTok: null (unconditional) velocities need a model trained with "
                             "cfg_dropout > 0 (it has no CFG indicator).")
        h = self.x_embed(x_BNC) + self.pos_embed
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)
        return self.final_linear(modulate(self.final_norm(h), shift[:, None], scale[:, None]))


# --------------------------------------------------------------------------------------------------
# Loss, samplers
# --------------------------------------------------------------------------------------------------


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all non-batch dims -> (B,) (LDM style)."""
    return 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def clip_contrastive_loss(a_BF: Tensor, b_BF: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric CLIP loss: rows L2-normalised, logits = exp(s) a b^T (exp(s) <= 100),
    (CE(logits, arange) + CE(logits^T, arange)) / 2."""
    a = F.normalize(a_BF.flatten(1).float(), dim=-1)
    b = F.normalize(b_BF.flatten(1).float(), dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=a.dtype, device=a.device).exp().clamp(max=100.0)
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def cfg_null_mask(
    n: int,
    p: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n,) bool: which samples train the unconditional flow (CrossFlow `null_indicator`).

    Each is null with probability p (one uniform draw per sample; none drawn when p = 0). Fewer
    than two nulls cannot be rotated (`rotate_null_targets`), so then none is null, as CrossFlow.
    """
    if p <= 0.0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    null = torch.rand(n, generator=generator, device=device) < p
    return null if int(null.sum()) > 1 else torch.zeros_like(null)


def rotate_null_targets(x_B: Tensor, null_B: Tensor) -> Tensor:
    """x with the null rows' targets rotated by one among themselves (row i gets the next null
    row's, the last the first's: CrossFlow's `torch.cat((t[1:], t[:1]))`); others unchanged."""
    if not bool(null_B.any()):
        return x_B
    out = x_B.clone()
    out[null_B] = torch.roll(x_B[null_B], shifts=-1, dims=0)
    return out


def _text_input(model: FlowTok, batch: dict[str, Tensor]) -> Tensor:
    key = "text_bytes" if model.config.text_input == "bytes" else "text_features"
    if key not in batch:
        raise KeyError(
            f"FlowTok(text_input='{model.config.text_input}') needs batch key '{key}'; got keys "
            f"{sorted(batch)}."
        )
    return batch[key]


def flowtok_loss(
    model: FlowTok,
    batch: dict[str, Tensor],
    step: int = 0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """FM + kl_weight * KL + align_weight * align for one batch.

    Batch keys: `image_tokens` float (B, N, C); `text_features` float (B, N, E) (features mode)
    or `text_bytes` int64 (B, N) (bytes mode). `step` is unused (the trainer's loss signature).
    z_T ~ N(mean, exp(logvar)) (reparameterised, so FM also trains the projector); t ~
    logit-normal; FM = mean |v(x_t, t) - (z_T - z_I)|^2; KL = `gaussian_kl` averaged over the
    batch; align = `clip_contrastive_loss(T_P or z_I, z_T)`. Metrics (detached): 'loss',
    'fm_loss', 'kl_loss', 'align_loss', 'logit_scale' (+ 'null_frac' with CFG).

    With cfg_dropout > 0 (drawn after t): `cfg_null_mask` picks the null samples, whose FM
    targets z_I are rotated among themselves (`rotate_null_targets`) and whose velocity is
    asked with the null indicator. KL and alignment keep the true pairs.
    """
    cfg = model.config
    x_img = batch["image_tokens"].float()
    B, dev = x_img.shape[0], x_img.device
    mean, logvar, feats = model.encode_text(_text_input(model, batch))
    eps = torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype)
    z_text = mean + (0.5 * logvar).exp() * eps
    kl = gaussian_kl(mean, logvar).mean()
    anchor = model.align_mlp(feats) if cfg.align_with == "text_features" else x_img
    align = clip_contrastive_loss(anchor, z_text, model.logit_scale)
    t_B = logit_normal_t(B, mean=cfg.t_mean, std=cfg.t_std, generator=generator, device=dev)
    if cfg.cfg_dropout > 0:
        null = cfg_null_mask(B, cfg.cfg_dropout, generator=generator, device=dev)
        x_tgt = rotate_null_targets(x_img, null)
        v = model(flow_path(x_tgt, z_text, t_B), t_B, null=null)
    else:
        null, x_tgt = None, x_img
        v = model(flow_path(x_img, z_text, t_B), t_B)
    fm = ((v.float() - flow_target(x_tgt, z_text)) ** 2).mean()
    loss = fm + cfg.kl_weight * kl + cfg.align_weight * align
    metrics = {
        "loss": loss.detach(), "fm_loss": fm.detach(), "kl_loss": kl.detach(),
        "align_loss": align.detach(), "logit_scale": model.logit_scale.detach()[0].clone(),
    }  # fmt: skip
    if null is not None:
        metrics["null_frac"] = null.float().mean()
    return loss, metrics


@torch.no_grad()
def sample(
    model: FlowTok,
    text: Tensor,
    *,
    num_steps: int = 25,
    sample_text: bool = True,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Text -> image tokens (B, N, C): z_T from the projector, then Euler ODE from t = 1 to 0.

    `sample_text` draws z_T ~ N(mean, exp(logvar)) (the source of sample diversity), else uses the
    mean. num_steps = 25 uniform Euler steps is our default [I]. `guidance_scale` s != 1 steps
    with v_u + s (v_c - v_u) (`flow.cfg_combine`; v_u = the null-indicator velocity at the same
    x_t, needs cfg_dropout > 0; CrossFlow samples with 7); s = 1 is the conditional flow alone.
    Eval mode, restored afterwards.
    """
    if guidance_scale != 1.0 and model.cfg_embed is None:
        raise ValueError("FlowTok: guidance_scale != 1 needs a model trained with cfg_dropout > 0 "
                         "(it has no CFG indicator); sample with guidance_scale=1.")
    was_training = model.training
    model.eval()
    try:
        mean, logvar, _ = model.encode_text(text)
        z = mean
        if sample_text:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device)
            z = mean + (0.5 * logvar).exp() * eps
        B = z.shape[0]

        def velocity(x_N: Tensor, t_N: Tensor) -> Tensor:
            if x_N.shape[0] == B:
                return model(x_N, t_N)
            null = torch.arange(x_N.shape[0], device=x_N.device) >= B  # [cond; null]
            return model(x_N, t_N, null=null)

        return euler_sample(velocity, z, ode_time_grid(num_steps), cfg_scale=guidance_scale)
    finally:
        model.train(was_training)


@torch.no_grad()
def reverse_sample(model: FlowTok, image_tokens: Tensor, *, num_steps: int = 25) -> Tensor:
    """Image tokens -> text latents (B, N, C): the same flow run from t = 0 to 1.

    With s = 1 - t the reversed flow has velocity dx/ds = -v(x, 1 - s) and starts from the image
    at s = 1, so it reuses the decreasing-grid Euler sampler. No text decoder is built, so this
    returns z_T, not a caption.
    """
    was_training = model.training
    model.eval()
    try:
        return euler_sample(
            lambda x, s: -model(x, 1.0 - s), image_tokens.float(), ode_time_grid(num_steps)
        )
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Pipeline adapters and family spec
# --------------------------------------------------------------------------------------------------


def text_ids_to_bytes(text_ids_BT: Tensor, length: int) -> Tensor:
    """MaskGen-style byte ids (B, T) = [BOS, bytes..., EOS, PAD...] (`text.encode_text`) ->
    FlowTok's byte input (B, length): byte b -> b + 1, 0 = padding (`encode_text_bytes`)."""
    out = torch.zeros(text_ids_BT.shape[0], length, dtype=torch.long, device=text_ids_BT.device)
    for i, row in enumerate(text_ids_BT.tolist()):
        data = [t + 1 for t in row if t < 256][:length]
        if data:
            out[i, : len(data)] = torch.tensor(data, dtype=torch.long)
    return out


def _image_tokens(model: FlowTok, batch: dict[str, Tensor], generator: torch.Generator | None,
                  scale: float) -> Tensor:
    """Cached 1D-token moments (B, 2C, 1, N) (TiTok / TA-TiTok VAE, `cache.latents`) -> sampled,
    scaled image tokens (B, N, C)."""
    from vgen_core.generators.flow import latents_from_moments

    z = latents_from_moments(batch["moments"].float(), scale, generator)
    B, C = z.shape[:2]
    z_BNC = z.reshape(B, C, -1).transpose(1, 2)
    want = (model.config.num_tokens, model.config.token_dim)
    if tuple(z_BNC.shape[1:]) != want:
        raise ValueError(f"FlowTok expects image tokens (B, {want[0]}, {want[1]}), the latents "
                         f"give {tuple(z_BNC.shape)}; set num_tokens / token_dim to the "
                         "tokenizer's")
    return z_BNC


def flowtok_batch_loss(model: FlowTok, batch: dict[str, Tensor], step: int = 0, *,
                       generator: torch.Generator | None = None, **_: Any):
    """The train stage's batch (``moments`` of a 1D-token latent cache, ``text_ids`` of the
    captions) -> :func:`flowtok_loss` (byte-level text input)."""
    if "image_tokens" not in batch:
        if model.config.text_input != "bytes":
            raise ValueError("FlowTok trains from captions only with text_input='bytes' (CLIP "
                             "text features cannot be computed here)")
        batch = {"image_tokens": _image_tokens(model, batch, generator, model.config.scale_factor),
                 "text_bytes": text_ids_to_bytes(batch["text_ids"], model.config.num_tokens)}
    return flowtok_loss(model, batch, step, generator=generator)


@torch.no_grad()
def text_sample(model: FlowTok, text_ids_BT: Tensor, *, num_steps: int = 25,
                sample_text: bool = True, guidance_scale: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """:func:`sample` from MaskGen-style caption ids (B, T): image tokens (B, N, C)."""
    if model.config.text_input != "bytes":
        raise ValueError("FlowTok samples from captions only with text_input='bytes'")
    text = text_ids_to_bytes(text_ids_BT, model.config.num_tokens)
    return sample(model, text, num_steps=num_steps, sample_text=sample_text,
                  guidance_scale=guidance_scale, generator=generator)


SPEC = FamilySpec(
    name="flowtok", role="generator", config_class=FlowTokConfig, sizes=FLOWTOK_SIZES,
    model_class=FlowTok, data="latents", data_fields=("num_tokens", "token_dim", "scale_factor"),
    loss=flowtok_batch_loss, conditioning="text", sampler=text_sample, output="latents",
    needs_text=True,
    summary="FlowTok: flow from projected text tokens straight to 1D image tokens",
)
