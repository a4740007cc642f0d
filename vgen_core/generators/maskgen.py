"""MaskGen-VQ: text-conditioned masked-token generator with MMDiT joint blocks.

Spec: methods.md §2.2; reference: bytedance/1d-tokenizer `modeling/maskgen.py` (MaskGen_VQ),
`configs/training/MaskGen/maskgen_vq_{l,xl}_stage1.yaml`; the block is diffusers'
`JointTransformerBlock` (SD3 MMDiT) with `AdaLayerNormZero` / `AdaLayerNormContinuous`.

    text ids -> TextEncoder -> penultimate tokens (B, 77, E) -> Linear -> context stream
                            -> pooled (B, E) ‖ sinusoid(aesthetic * 100, 256) -> Linear -> c
    image ids (mask id allowed) -> tied embedding + learned positions -> image stream
    depth x JointBlock(image, context, c)  (joint attention over [image, context]; adaLN-Zero
    on both streams; the last block updates only the image stream) -> AdaLN-continuous(c)
    -> logits = x @ embedding[:V].T  (weight-tied head)

The text encoder is a submodule (`text_encoder`), so one safetensors file holds everything; it is
frozen unless `train_text_encoder`. Training (`maskgen_loss`): arccos masking, label smoothing 0.1,
unmasked positions weighted 0.1, captions replaced by the empty caption's features with
probability `text_drop`. Sampling (`sample`): MaskGIT-style confidence decoding with Gumbel
temperature annealing, softmax temperature 0.5 + 0.8 (1 - r), CFG c + s (c - u) with a cosine
guidance schedule (`cfg_scale_schedule`).

Shape legend: B batch, L image tokens, T text tokens (77), E text width, D model width,
V codebook size.

Deviations from the official code: the text encoder is the byte-level CLIP-shaped encoder of
`generators.text` (trained or frozen here; OpenAI CLIP-L weights cannot be loaded into it); the
tied head reads `embeddings.weight[:V]` directly instead of holding a second reference to it
(safetensors refuses shared tensors); the sampler uses the aesthetic score it is given (the
official `generate` substitutes the config's default). MaskGen-KL (continuous tokens + DiffLoss
head) is not built here.

Released weights (`maskgen_vq_l.bin`, `maskgen_vq_xl.bin`; README_MaskGen.md):
`load_official(path, "maskgen-vq-l")` (or "maskgen_vq_xl", ...) into the sizes "maskgen-vq-l" /
"maskgen-vq-xl", whose `text_encoder` is None; key table in `maskgen_keys.py`. The release holds
the generator only; its text condition came from OpenAI CLIP through open_clip, which vgen does
not have. To run a release the caller supplies, per caption (official `open_clip_text_encoding`
with `utils/train_utils.py::create_clip_model`):

  * ids (B, 77) int64 = `open_clip.get_tokenizer("ViT-L-14-336")(captions)`: BPE ids
    [49406 (start), caption tokens, 49407 (end), 0 padding], cut to 77 with the end id kept;
  * `clip = open_clip.create_model_and_transforms("ViT-L-14-336", pretrained="openai")[0]`
    (its text tower: 768 wide, 12 blocks, 12 heads, QuickGELU, causal mask), in eval mode;
  * text_BTE (B, 77, 768): `clip.token_embedding(ids) + clip.positional_embedding`, then the
    first 11 of the 12 `clip.transformer.resblocks` (attn_mask=`clip.attn_mask`), no `ln_final`;
  * pooled_BE (B, 768): `clip.ln_final(resblocks[11](text_BTE))` at the position of the largest
    id (the end token), `@ clip.text_projection`;
  * the same two for the empty caption `[""]` (the CFG condition), and aesthetic 6.5
    (configs/infer/MaskGen/maskgen_vq_*.yaml `sample_aesthetic_score`).

Then `model(tokens, text_BTE, pooled_BE, aesthetic)` or `sample_from_features(...)`. What vgen
cannot reproduce without open_clip: the BPE tokenizer (its 49,408-entry merges file
`bpe_simple_vocab_16e6.txt.gz`, ftfy / whitespace cleaning, lower-casing), the CLIP-L/14@336
text weights (not in the release), QuickGELU (vgen's `TextEncoder` uses GELU) and end-token
pooling by argmax over BPE ids; so `encode_text`, `sample` and `maskgen_loss`, which take vgen's
byte ids, refuse a model without a text encoder, and a release cannot be trained further here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from vgen_core.generators.common import Mlp, attention, gumbel_noise, modulate
from vgen_core.generators.maskgen_keys import (
    CLIP_TEXT_WIDTH,
    OFFICIAL_DROPPED,
    check_released_names,
    official_key_map,
    released_shapes,
)
from vgen_core.generators.schedules import (
    arccos_mask_ratio,
    constant_guidance,
    gumbel_temperature,
    linear_guidance,
    power_cosine_guidance,
    remask_count,
    softmax_temperature,
)
from vgen_core.generators.text import (
    TextEncoder,
    TextEncoderConfig,
    encode_text,
    text_encoder_config,
)
from vgen_core.tokenizers.io import (
    check_released_shapes,
    load_mapped_state_dict,
    read_state_dict,
)

__all__ = [
    "CLIP_TEXT_WIDTH",
    "MASKGEN_RELEASES",
    "MASKGEN_SAMPLING",
    "MASKGEN_SIZES",
    "MaskGen",
    "MaskGenConfig",
    "OFFICIAL_DROPPED",
    "aesthetic_embedding",
    "cfg_scale_schedule",
    "load_official",
    "maskgen_config",
    "maskgen_loss",
    "official_key_map",
    "sample",
    "sample_from_features",
]


class MaskGenConfig(BaseModel):
    """MaskGen-VQ config; `build()` makes the model. Defaults = MaskGen-VQ-L on TA-TiTok-VQ 128."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    codebook_size: int = Field(8192, ge=2)
    seq_len: int = Field(128, ge=1)
    hidden: int = Field(1024, ge=1)
    depth: int = Field(16, ge=1)
    heads: int = Field(16, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    #: None: no text encoder inside; the caller passes CLIP ViT-L/14 features (E = 768), as for
    #: the released weights (module docstring)
    text_encoder: TextEncoderConfig | None = TextEncoderConfig()
    train_text_encoder: bool = False
    micro_condition: bool = True
    micro_condition_dim: int = Field(256, ge=2)
    #: unused embedding rows kept for the official layout (1000 classes + 1 drop label)
    legacy_class_rows: int = Field(1001, ge=0)
    text_drop: float = Field(0.1, ge=0.0, le=1.0)
    default_aesthetic: float = 6.0
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> MaskGenConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        if self.micro_condition_dim % 2:
            raise ValueError(f"micro_condition_dim={self.micro_condition_dim} must be even.")
        if self.text_encoder is None and self.train_text_encoder:
            raise ValueError("train_text_encoder=True needs a text_encoder config.")
        return self

    @property
    def text_width(self) -> int:
        """E: the text encoder's width, or CLIP ViT-L/14's 768 for external features."""
        return CLIP_TEXT_WIDTH if self.text_encoder is None else self.text_encoder.width

    def build(self) -> MaskGen:
        return MaskGen(self)


MASKGEN_SIZES: dict[str, MaskGenConfig] = {
    # CPU-test size; pairs with a 256-entry codebook and the tiny text encoder.
    "tiny": MaskGenConfig(
        codebook_size=256, seq_len=16, hidden=64, depth=2, heads=4, legacy_class_rows=0,
        micro_condition_dim=16, text_encoder=text_encoder_config("tiny"),
    ),
    # maskgen_vq_l_stage1.yaml: 1024 x 16, 16 heads; TA-TiTok-VQ 128 tokens, C = 8192.
    "L": MaskGenConfig(hidden=1024, depth=16, heads=16),
    # maskgen_vq_xl_stage1.yaml: 1280 x 20, 16 heads.
    "XL": MaskGenConfig(hidden=1280, depth=20, heads=16),
    # The releases (configs/infer/MaskGen/maskgen_vq_{l,xl}.yaml): L / XL over external CLIP
    # ViT-L/14 text features (no text encoder inside), default aesthetic 6.5
    # (`sample_aesthetic_score`, which the official `generate` always uses).
    "maskgen-vq-l": MaskGenConfig(hidden=1024, depth=16, heads=16, text_encoder=None,
                                  default_aesthetic=6.5),
    "maskgen-vq-xl": MaskGenConfig(hidden=1280, depth=20, heads=16, text_encoder=None,
                                   default_aesthetic=6.5),
}

#: release names (README_MaskGen.md, configs/infer/MaskGen/*.yaml `generator_checkpoint`) -> size
MASKGEN_RELEASES: dict[str, str] = {
    "maskgen_vq_l": "maskgen-vq-l", "generator_maskgen_vq_l": "maskgen-vq-l",
    "maskgen_vq_xl": "maskgen-vq-xl", "generator_maskgen_vq_xl": "maskgen-vq-xl",
}

#: Released inference settings (configs/infer/MaskGen/maskgen_vq_{l,xl}.yaml: cfg 12.0, num_iter
#: 16, temperature 2.0, sample_aesthetic_score 6.5; README_MaskGen.md calls
#: `generate(guidance_scale=12.0, randomize_temperature=2.0, sample_aesthetic_score=6.5)` with
#: generate's defaults guidance_decay "cosine", guidance_decay_scale_pow 1.0,
#: softmax_temperature_annealing True, num_sample_steps 16). `sample`'s own defaults are the
#: stage-1 training configs' (the same with sample_aesthetic_score 6.0), which L / XL keep.
_RELEASED_SAMPLING: dict[str, Any] = {
    "steps": 16, "guidance_scale": 12.0, "guidance_decay": "cosine", "guidance_scale_pow": 1.0,
    "randomize_temperature": 2.0, "softmax_temperature_annealing": True, "aesthetic": 6.5,
}
MASKGEN_SAMPLING: dict[str, dict[str, Any]] = {
    size: dict(_RELEASED_SAMPLING) for size in ("maskgen-vq-l", "maskgen-vq-xl")
}


maskgen_config = sized_config("MaskGen", MaskGenConfig, MASKGEN_SIZES)


# --------------------------------------------------------------------------------------------------
# MMDiT joint block (diffusers JointTransformerBlock)
# --------------------------------------------------------------------------------------------------


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class _AdaLNZero(nn.Module):
    """c -> (shift, scale, gate) for attention and MLP; returns modulated LN(x) and the rest."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, x_BSD: Tensor, c_BD: Tensor) -> tuple[Tensor, ...]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.linear(F.silu(c_BD)).chunk(6, -1)
        x_BSD = modulate(_ln(x_BSD), shift_a[:, None], scale_a[:, None])
        return x_BSD, gate_a, shift_m, scale_m, gate_m


class _AdaLNContinuous(nn.Module):
    """LN(x) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(c)); zero-initialised."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x_BSD: Tensor, c_BD: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(c_BD)).chunk(2, -1)
        return modulate(_ln(x_BSD), shift[:, None], scale[:, None])


class _JointBlock(nn.Module):
    """SD3 MMDiT block: separate weights per stream, one attention over [image; context]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_pre_only: bool) -> None:
        super().__init__()
        self.heads = heads
        self.context_pre_only = context_pre_only
        self.norm1 = _AdaLNZero(dim)
        self.norm1_context = _AdaLNContinuous(dim) if context_pre_only else _AdaLNZero(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.add_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.ff = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")
        if not context_pre_only:
            self.to_add_out = nn.Linear(dim, dim)
            self.ff_context = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")

    def _heads(self, t: Tensor) -> Tensor:
        """(B, S, 3D) -> (3, B, heads, S, D // heads): unpacks into q, k, v."""
        B, S, three_d = t.shape
        return t.view(B, S, 3, self.heads, three_d // (3 * self.heads)).permute(2, 0, 3, 1, 4)

    def forward(self, x_BLD: Tensor, ctx_BTD: Tensor, c_BD: Tensor) -> tuple[Tensor, Tensor | None]:
        B, L, D = x_BLD.shape
        nx, gate_a, shift_m, scale_m, gate_m = self.norm1(x_BLD, c_BD)
        if self.context_pre_only:
            nctx = self.norm1_context(ctx_BTD, c_BD)
        else:
            nctx, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.norm1_context(ctx_BTD, c_BD)
        qx, kx, vx = self._heads(self.to_qkv(nx))
        qc, kc, vc = self._heads(self.add_qkv(nctx))
        a = attention(torch.cat([qx, qc], 2), torch.cat([kx, kc], 2), torch.cat([vx, vc], 2))
        a = a.transpose(1, 2).reshape(B, -1, D)
        x_BLD = x_BLD + gate_a[:, None] * self.to_out(a[:, :L])
        h = modulate(_ln(x_BLD), shift_m[:, None], scale_m[:, None])
        x_BLD = x_BLD + gate_m[:, None] * self.ff(h)
        if self.context_pre_only:
            return x_BLD, None
        ctx_BTD = ctx_BTD + c_gate_a[:, None] * self.to_add_out(a[:, L:])
        h = modulate(_ln(ctx_BTD), c_shift_m[:, None], c_scale_m[:, None])
        return x_BLD, ctx_BTD + c_gate_m[:, None] * self.ff_context(h)


def aesthetic_embedding(score_B: Tensor, dim: int = 256, max_period: float = 1000.0) -> Tensor:
    """Micro-condition: sinusoid of score * 100 (official `get_sinusoidal_encoding`).

    freqs_k = exp(-ln(max_period) * k / (dim/2)), k < dim/2; returns [sin(t f), cos(t f)] (B, dim)
    with t = 100 * score.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=score_B.device) / half
    )
    arg = (score_B.float() * 100.0)[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class MaskGen(nn.Module):
    """MaskGen-VQ: (image ids with mask id V, text features, aesthetic) -> logits (B, L, V)."""

    family: ClassVar[str] = "maskgen_vq"
    config_class: ClassVar[type[BaseModel]] = MaskGenConfig

    def __init__(self, config: MaskGenConfig) -> None:
        super().__init__()
        self.config = config
        D, E = config.hidden, config.text_width
        self.text_encoder = (None if config.text_encoder is None
                             else TextEncoder(config.text_encoder))
        self.text_embed_proj = nn.Linear(E, D)
        cond_in = E + (config.micro_condition_dim if config.micro_condition else 0)
        self.cond_pooled_proj = nn.Linear(cond_in, D)
        self.blocks = nn.ModuleList([
            _JointBlock(D, config.heads, config.mlp_ratio, context_pre_only=i == config.depth - 1)
            for i in range(config.depth)
        ])
        self.norm = _AdaLNContinuous(D)
        self.embeddings = nn.Embedding(config.codebook_size + 1 + config.legacy_class_rows, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.seq_len, D))
        self._init_weights()
        if self.text_encoder is not None:
            self.text_encoder.requires_grad_(config.train_text_encoder)

    def _init_weights(self) -> None:
        std = self.config.init_std
        for name, m in self.named_modules():
            if name.startswith("text_encoder"):
                continue  # keeps its own (open_clip) init
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, _AdaLNContinuous):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
        nn.init.trunc_normal_(self.pos_embed, std=std)

    def train(self, mode: bool = True) -> MaskGen:
        super().train(mode)
        if self.text_encoder is not None and not self.config.train_text_encoder:
            self.text_encoder.eval()
        return self

    @property
    def mask_token_id(self) -> int:
        return self.config.codebook_size

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def _own_text_encoder(self) -> TextEncoder:
        if self.text_encoder is None or self.config.text_encoder is None:
            raise ValueError(
                "MaskGen: this model has no text encoder (config.text_encoder is None, as for "
                "the released maskgen-vq-l / -xl); pass CLIP ViT-L/14 text features to "
                "forward / sample_from_features instead of byte ids (see the maskgen module "
                "docstring for how to compute them with open_clip).")
        return self.text_encoder

    def encode_text(self, text_ids_BT: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 77) byte ids -> (penultimate tokens (B, 77, E), pooled (B, E)); no grad if frozen.

        ValueError for a model without a text encoder (features come from the caller)."""
        encoder = self._own_text_encoder()
        with torch.set_grad_enabled(self.config.train_text_encoder and torch.is_grad_enabled()):
            return encoder(text_ids_BT)

    def null_text(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Features of the empty caption, repeated `batch` times (the CFG / text-drop condition)."""
        ids = encode_text([""], self._own_text_encoder().config.context_len).to(device)
        tokens, pooled = self.encode_text(ids)
        return tokens.expand(batch, -1, -1), pooled.expand(batch, -1)

    def forward(
        self,
        tokens_BL: Tensor,
        text_BTE: Tensor,
        pooled_BE: Tensor,
        aesthetic_B: Tensor | None = None,
    ) -> Tensor:
        """tokens_BL int64 (mask id allowed), text features from `encode_text` -> logits (B, L, V).

        aesthetic_B: (B,) float scores; None -> `default_aesthetic` for every sample.
        """
        B = tokens_BL.shape[0]
        if tokens_BL.ndim != 2 or tokens_BL.shape[1] != self.config.seq_len:
            raise ValueError(
                f"MaskGen expects tokens (B, {self.config.seq_len}), got {tuple(tokens_BL.shape)}."
            )
        if text_BTE.shape[0] != B or pooled_BE.shape[0] != B:
            raise ValueError(
                f"MaskGen: text features batch {text_BTE.shape[0]}/{pooled_BE.shape[0]} != {B}."
            )
        ctx_BTD = self.text_embed_proj(text_BTE)
        cond_BX = pooled_BE
        if self.config.micro_condition:
            if aesthetic_B is None:
                aesthetic_B = torch.full((B,), self.config.default_aesthetic,
                                         device=tokens_BL.device)
            emb = aesthetic_embedding(aesthetic_B, self.config.micro_condition_dim)
            cond_BX = torch.cat([pooled_BE, emb.to(pooled_BE.dtype)], dim=-1)
        c_BD = self.cond_pooled_proj(cond_BX)
        x_BLD = self.embeddings(tokens_BL) + self.pos_embed
        for blk in self.blocks:
            x_BLD, ctx_BTD = blk(x_BLD, ctx_BTD, c_BD)
        x_BLD = self.norm(x_BLD, c_BD)
        return x_BLD @ self.embeddings.weight[: self.config.codebook_size].T


# --------------------------------------------------------------------------------------------------
# Loss, CFG schedule, sampler
# --------------------------------------------------------------------------------------------------


def maskgen_loss(
    model: MaskGen,
    batch: dict[str, Tensor],
    step: int = 0,
    *,
    label_smoothing: float = 0.1,
    unmasked_weight: float = 0.1,
    text_drop: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MaskGen-VQ training loss for one batch.

    Batch keys: `tokens` int64 (B, L) ids in [0, V); `text_ids` int64 (B, 77) from `encode_text`;
    optional `aesthetic` float (B,) (default `config.default_aesthetic`).
    Per sample: r ~ U(0, 1), max(1, round(L * arccos_mask_ratio(r))) positions masked at random;
    with probability `config.text_drop` both text features are replaced by the empty caption's.
    Loss = label-smoothed CE, weight 1 on masked and `unmasked_weight` on visible positions,
    normalised by the weight sum (official MLMLoss). `step` is unused (the schedule is stateless).
    Returns the loss and detached metrics 'loss', 'masked_accuracy', 'mask_ratio', 'text_drop'.
    """
    tokens_BL = batch["tokens"].long()
    B, L = tokens_BL.shape
    dev = tokens_BL.device
    ratio_B = arccos_mask_ratio(torch.rand(B, device=dev, generator=generator)).clamp(1e-6, 1.0)
    num_masked_B = (L * ratio_B).round().clamp(min=1)
    ranks_BL = torch.rand(B, L, device=dev, generator=generator).argsort(-1).argsort(-1)
    mask_BL = ranks_BL < num_masked_B[:, None]
    inputs_BL = torch.where(mask_BL, model.mask_token_id, tokens_BL)

    text_ids = batch["text_ids"].long().to(dev)
    null_ids = encode_text([""], text_ids.shape[1]).to(dev)
    text_BTE, pooled_BE = model.encode_text(torch.cat([text_ids, null_ids]))
    p_drop = model.config.text_drop if text_drop is None else text_drop
    drop_B = torch.rand(B, device=dev, generator=generator) < p_drop
    text_BTE = torch.where(drop_B[:, None, None], text_BTE[-1:], text_BTE[:-1])
    pooled_BE = torch.where(drop_B[:, None], pooled_BE[-1:], pooled_BE[:-1])
    aesthetic_B = batch.get("aesthetic")
    if aesthetic_B is not None:
        aesthetic_B = aesthetic_B.float().to(dev)

    logits_BLV = model(inputs_BL, text_BTE, pooled_BE, aesthetic_B)
    ce_BL = F.cross_entropy(
        logits_BLV.transpose(1, 2).float(), tokens_BL, label_smoothing=label_smoothing,
        reduction="none",
    )
    w_BL = torch.where(mask_BL, 1.0, unmasked_weight).to(ce_BL.dtype)
    loss = (ce_BL * w_BL).sum() / w_BL.sum().clamp_min(1e-8)
    with torch.no_grad():
        correct_BL = (logits_BLV.argmax(-1) == tokens_BL) & mask_BL
        metrics = {
            "loss": loss.detach(),
            "masked_accuracy": correct_BL.sum() / mask_BL.sum(),
            "mask_ratio": mask_BL.float().mean(),
            "text_drop": drop_B.float().mean(),
        }
    return loss, metrics


def cfg_scale_schedule(
    step: int,
    steps: int,
    guidance_scale: float,
    decay: Literal["cosine", "linear", "none"] = "cosine",
    scale_pow: float = 1.0,
) -> float:
    """Guidance scale s at sampling step `step` (0-based) for logits = c + s (c - u).

    With progress r = (step + 1) / steps (official MaskGen `generate`):
      cosine: 1 + (g - 1) (1 - cos(r^p pi)) / 2   (1 at r = 0, g at r = 1)
      linear: 1 + (g - 1) r
      none:   g
    (`schedules.power_cosine_guidance`, `linear_guidance`, `constant_guidance`.)
    """
    r = (step + 1) / steps
    if decay == "cosine":
        return power_cosine_guidance(step + 1, steps, guidance_scale, scale_pow)
    if decay == "linear":
        return linear_guidance(r, 1.0, guidance_scale)
    if decay == "none":
        return constant_guidance(step, steps, guidance_scale)
    raise ValueError(f"cfg_scale_schedule: decay must be cosine, linear or none, got {decay!r}.")


@torch.no_grad()
def sample(
    model: MaskGen,
    text_ids_BT: Tensor,
    *,
    steps: int = 16,
    guidance_scale: float = 12.0,
    guidance_decay: Literal["cosine", "linear", "none"] = "cosine",
    guidance_scale_pow: float = 1.0,
    randomize_temperature: float = 2.0,
    softmax_temperature_annealing: bool = True,
    aesthetic: float | None = 6.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Text-to-image token sampling from an all-mask sequence (official `MaskGen_VQ.generate`).

    Encodes `text_ids_BT` (B, 77) int64 from `encode_text` and the empty caption with the
    model's text encoder, then runs `sample_from_features` (the decoding rule is there).
    ValueError for a model without a text encoder (a release): call `sample_from_features`.
    Returns tokens_BL (B, L) int64 in [0, V).
    """
    was_training = model.training
    model.eval()
    try:
        text, pooled = model.encode_text(text_ids_BT)
        null_text, null_pooled = model.null_text(text_ids_BT.shape[0], text_ids_BT.device)
        return sample_from_features(
            model, text, pooled, null_text, null_pooled, steps=steps,
            guidance_scale=guidance_scale, guidance_decay=guidance_decay,
            guidance_scale_pow=guidance_scale_pow, randomize_temperature=randomize_temperature,
            softmax_temperature_annealing=softmax_temperature_annealing, aesthetic=aesthetic,
            generator=generator)
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_from_features(
    model: MaskGen,
    text_BTE: Tensor,
    pooled_BE: Tensor,
    null_text_BTE: Tensor,
    null_pooled_BE: Tensor,
    *,
    steps: int = 16,
    guidance_scale: float = 12.0,
    guidance_decay: Literal["cosine", "linear", "none"] = "cosine",
    guidance_scale_pow: float = 1.0,
    randomize_temperature: float = 2.0,
    softmax_temperature_annealing: bool = True,
    aesthetic: float | None = 6.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Token sampling from given text features (e.g. CLIP's, for a released model).

    At step t (progress r = (t + 1) / N): logits = c + s(c - u) with s = `cfg_scale_schedule`
    (u = the null caption's features, same aesthetic); logits /= 0.5 + 0.8 (1 - r) when annealing
    the softmax temperature; ids = argmax(logits + tau Gumbel) at masked positions,
    tau = randomize_temperature (1 - r); confidence = sampled logit + tau * fresh Gumbel; the
    `remask_count` least confident are masked again; the last step keeps everything. Runs in
    eval mode (restored afterwards).

    Args:
        text_BTE, pooled_BE: (B, T, E) context tokens and (B, E) pooled vector of the captions.
        null_text_BTE, null_pooled_BE: the empty caption's, (1 or B, T, E) and (1 or B, E).
        aesthetic: score for the micro-condition (None -> config default).
        generator: torch.Generator on the features' device; a fixed seed gives identical tokens.
    Returns:
        tokens_BL: (B, L) int64 in [0, V).
    """
    if steps < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}.")
    was_training = model.training
    model.eval()
    B, L, dev = text_BTE.shape[0], model.seq_len, text_BTE.device
    null_text_BTE = null_text_BTE.expand(B, -1, -1)
    null_pooled_BE = null_pooled_BE.expand(B, -1)
    score = model.config.default_aesthetic if aesthetic is None else aesthetic
    aes_B = torch.full((B,), float(score), device=dev)
    both_text = torch.cat([text_BTE, null_text_BTE])
    both_pooled = torch.cat([pooled_BE, null_pooled_BE])
    ids_BL = torch.full((B, L), model.mask_token_id, dtype=torch.long, device=dev)
    try:
        for step in range(steps):
            r = (step + 1) / steps
            tau = gumbel_temperature(r, randomize_temperature)
            is_mask_BL = ids_BL == model.mask_token_id
            s = cfg_scale_schedule(step, steps, guidance_scale, guidance_decay, guidance_scale_pow)
            if s != 0.0:
                both = model(torch.cat([ids_BL, ids_BL]), both_text, both_pooled,
                             torch.cat([aes_B, aes_B])).float()
                cond, uncond = both.chunk(2)
                logits_BLV = cond + s * (cond - uncond)
            else:
                logits_BLV = model(ids_BL, text_BTE, pooled_BE, aes_B).float()
            if softmax_temperature_annealing:
                logits_BLV = logits_BLV / softmax_temperature(r, 0.5, 0.8)
            noise_BLV = gumbel_noise(logits_BLV.shape, device=dev, generator=generator)
            sampled_BL = (logits_BLV + tau * noise_BLV).argmax(-1)
            sampled_BL = torch.where(is_mask_BL, sampled_BL, ids_BL)
            if step == steps - 1:
                ids_BL = sampled_BL
                break
            conf_BL = logits_BLV.gather(-1, sampled_BL[..., None]).squeeze(-1)
            conf_BL = conf_BL + tau * gumbel_noise(conf_BL.shape, device=dev, generator=generator)
            conf_BL = torch.where(is_mask_BL, conf_BL, torch.inf)
            n_remask = remask_count(step, steps, L, int(is_mask_BL.sum(-1).min()))
            lowest_Bn = conf_BL.topk(n_remask, dim=-1, largest=False).indices
            remask_BL = torch.zeros_like(is_mask_BL).scatter_(-1, lowest_Bn, True)
            ids_BL = torch.where(remask_BL, model.mask_token_id, sampled_BL)
    finally:
        model.train(was_training)
    return ids_BL


# --------------------------------------------------------------------------------------------------
# Released weights
# --------------------------------------------------------------------------------------------------


def _resolve_config(config_or_size: MaskGenConfig | str) -> tuple[MaskGenConfig, str]:
    if isinstance(config_or_size, MaskGenConfig):
        return config_or_size, "custom config"
    name = config_or_size.removesuffix(".bin").removesuffix(".safetensors").lower()
    size = MASKGEN_RELEASES.get(name.replace("-", "_"), config_or_size)
    return maskgen_config(size), config_or_size


def load_official(
    source: str | Path | Mapping[str, Tensor], config_or_size: MaskGenConfig | str
) -> MaskGen:
    """Build `config_or_size` and load a released MaskGen-VQ generator into it, strictly; eval
    mode.

    Args:
        source: a `.safetensors` file or a state dict with the released names (official
            bytedance/1d-tokenizer@942a96f `modeling/maskgen.py` MaskGen_VQ; pickles are
            refused, see `read_state_dict`). Meta tensors work when the model is built on meta.
        config_or_size: "maskgen-vq-l" / "maskgen-vq-xl", a release name ("maskgen_vq_l",
            "generator_maskgen_vq_xl", ...) or a config with `text_encoder=None` (the release
            holds no text encoder; text features come from CLIP, see the module docstring).
    Every model tensor comes from the checkpoint and every released tensor is used
    (`official_key_map`; the tied `lm_head.weight` alias is checked and dropped,
    `OFFICIAL_DROPPED`). Raises ValueError naming the first released key that is foreign,
    missing or of the wrong shape (with the shape this config expects).
    """
    config, label = _resolve_config(config_or_size)
    what = f"maskgen.load_official({label})"
    if config.text_encoder is not None:
        raise ValueError(
            f"{what}: this config has vgen's byte-level text encoder, which a released "
            "MaskGen-VQ does not contain (it was trained on OpenAI CLIP ViT-L/14 features); use "
            "the size 'maskgen-vq-l' / 'maskgen-vq-xl' or set text_encoder=None.")
    released = read_state_dict(source, what=what)
    try:
        check_released_names(released)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    note = (
        f"hidden={config.hidden}, mlp_ratio={config.mlp_ratio}, seq_len="
        f"{config.seq_len}, codebook_size={config.codebook_size}, legacy_class_rows="
        f"{config.legacy_class_rows}, micro_condition_dim="
        f"{config.micro_condition_dim}, text width {CLIP_TEXT_WIDTH}"
    )
    check_released_shapes(released, released_shapes(config), OFFICIAL_DROPPED, what=what,
                          depth=config.depth, config_note=note)
    try:
        state = official_key_map(released)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    model = MaskGen(config)
    load_mapped_state_dict(model, state, {k: k for k in state}, what=what)
    return model.eval()


SPEC = FamilySpec(
    name="maskgen_vq", role="generator", config_class=MaskGenConfig, sizes=MASKGEN_SIZES,
    model_class=MaskGen, data="id_tokens", data_fields=("codebook_size", "seq_len"),
    loss=maskgen_loss, conditioning="text", sampler=sample, output="tokens", needs_text=True,
    aliases=("maskgen",), sampling=MASKGEN_SAMPLING, load_official=load_official,
    summary="MaskGen (VQ): text-to-image masked generation on 1D tokens, MM-DiT blocks",
)
