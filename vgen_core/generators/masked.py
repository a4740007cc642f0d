"""Masked-token generation (MaskGIT): bidirectional transformer, arccos-masked training, sampler.

Spec: methods.md §2.1; reference: bytedance/1d-tokenizer `modeling/maskgit.py` (ImageBert),
`modeling/modules/losses.py` (MLMLoss), `configs/training/generator/maskgit.yaml`.

The model, its training loss and its sampler are separate: `MaskGIT` maps (tokens with mask ids,
class labels) to logits; `masked_token_loss` does the masking and class dropout; `sample` runs the
confidence-based iterative decoding. `arccos_mask_ratio` is the mask schedule shared by both.

Shape legend: B batch, L image tokens per sample, S = L + 1 (class token first), D hidden width,
V codebook size (the head predicts V classes; the input vocabulary is V + 1 with the mask id V).

Architecture follows HF BertModel as used by the official code (post-norm blocks, GELU MLP, learned
absolute positions, embedding LayerNorm, N(0, 0.02) init) written with
`scaled_dot_product_attention`.
The class token has its own table of num_classes + 1 rows (the last one is the null class used for
classifier-free guidance) instead of sharing the image-token vocabulary; that is equivalent.
BERT's token-type row 0, which HF adds to every slot, lives inside `pos_emb` (same sum before the
LayerNorm).

Released weights (bytedance/1d-tokenizer TiTok generators `generator_titok_l32.bin`,
`generator_titok_b64.bin`, converted once to safetensors or read by `vgen weights convert`):
`load_official(path, "titok-l32")` (or "generator_titok_b64", ...); the key table and what is not
loaded are in `maskgit_keys.py`. TiTok-S-128's generator is a UViT (`UViTBert`), not built here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config
from vgen_core.generators.common import BertBlock, gumbel_noise
from vgen_core.generators.maskgit_keys import (
    OFFICIAL_DROPPED,
    check_released_names,
    official_key_map,
    released_shapes,
)
from vgen_core.generators.schedules import (
    arccos_mask_ratio,
    gumbel_temperature,
    maskgit_guidance,
    remask_count,
    softmax_temperature,
)
from vgen_core.tokenizers.io import (
    check_released_shapes,
    load_mapped_state_dict,
    read_state_dict,
)

__all__ = [
    "MASKGIT_RELEASES",
    "MASKGIT_SAMPLING",
    "MASKGIT_SIZES",
    "MaskGIT",
    "MaskGITConfig",
    "OFFICIAL_DROPPED",
    "arccos_mask_ratio",
    "load_official",
    "maskgit_config",
    "masked_token_loss",
    "official_key_map",
    "remask_count",
    "sample",
]


class MaskGITConfig(BaseModel):
    """MaskGIT generator config; `build()` makes the model. Defaults = TiTok-B-64 MaskGIT."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    codebook_size: int = Field(4096, ge=2)
    seq_len: int = Field(64, ge=1)
    num_classes: int = Field(1000, ge=1)
    hidden: int = Field(768, ge=1)
    depth: int = Field(24, ge=1)
    heads: int = Field(16, ge=1)
    mlp_dim: int = Field(3072, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attn_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_norm_eps: float = Field(1e-12, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> MaskGITConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        return self

    def build(self) -> MaskGIT:
        return MaskGIT(self)


_TINY = dict(hidden=64, depth=2, heads=4, mlp_dim=256, dropout=0.0, attn_dropout=0.0)

MASKGIT_SIZES: dict[str, MaskGITConfig] = {
    # CPU-test size (~0.1M params); pairs with the `tiny` LFQ tokenizer (8x8 tokens, K=8).
    "tiny": MaskGITConfig(codebook_size=256, seq_len=64, num_classes=10, **_TINY),
    # TiTok MaskGIT generator (configs/training/generator/maskgit.yaml): 768x24, 16 heads, MLP 3072.
    "B": MaskGITConfig(hidden=768, depth=24, heads=16, mlp_dim=3072),
    # BERT-large width used by MaskBit's generator backbone (1024x24, 16 heads, MLP 4096), here
    # with index tokens instead of MaskBit's bit-embedding input.
    "L": MaskGITConfig(hidden=1024, depth=24, heads=16, mlp_dim=4096),
    # Released TiTok generators (configs/infer/TiTok/titok_{l32,b64}.yaml `model.generator`,
    # model_type "ViT"): 768 x 24, 16 heads, MLP 3072, dropout 0.1 / 0.1, over the tokenizer's
    # L = 32 / 64 ids (V = 4096), 1000 classes. "titok-b64" equals "B".
    "titok-l32": MaskGITConfig(codebook_size=4096, seq_len=32, num_classes=1000, hidden=768,
                               depth=24, heads=16, mlp_dim=3072),
    "titok-b64": MaskGITConfig(codebook_size=4096, seq_len=64, num_classes=1000, hidden=768,
                               depth=24, heads=16, mlp_dim=3072),
}

#: release names (README_TiTok.md, configs/infer/TiTok/*.yaml `generator_checkpoint`) -> size
MASKGIT_RELEASES: dict[str, str] = {
    "generator_titok_l32": "titok-l32", "titok_l32": "titok-l32",
    "generator_titok_b64": "titok-b64", "titok_b64": "titok-b64",
}


#: Released TiTok generator inference settings (bytedance/1d-tokenizer configs/infer/TiTok/
#: titok_{l32,b64,s128}.yaml `model.generator` + sample_imagenet_titok.py, which passes
#: softmax_temperature_annealing=True and leaves guidance_scale_pow at demo_util.sample_fn's 3.0):
#: `sample(model, labels, **MASKGIT_SAMPLING["titok_b64"])`. L-32 and B-64 are the sizes
#: "titok-l32" / "titok-b64" (B-64 = "B", this family's default config); S-128's generator is a
#: UViT (1024x20), which vgen does not build. `sample`'s own defaults stay the training config's
#: (configs/training/generator/maskgit.yaml: constant 4.5, randomize_temperature 1.0, 8 steps).
MASKGIT_SAMPLING: dict[str, dict[str, Any]] = {
    "titok_l32": {"steps": 8, "guidance_scale": 4.5, "guidance_decay": "linear",
                  "guidance_scale_pow": 3.0, "randomize_temperature": 9.5,
                  "softmax_temperature_annealing": True},
    "titok_b64": {"steps": 8, "guidance_scale": 3.0, "guidance_decay": "linear",
                  "guidance_scale_pow": 3.0, "randomize_temperature": 11.0,
                  "softmax_temperature_annealing": True},
    "titok_s128": {"steps": 64, "guidance_scale": 6.9, "guidance_decay": "power-cosine",
                   "guidance_scale_pow": 3.0, "randomize_temperature": 2.8,
                   "softmax_temperature_annealing": True},
}


maskgit_config = sized_config("MaskGIT", MaskGITConfig, MASKGIT_SIZES)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class MaskGIT(nn.Module):
    """Bidirectional transformer over [class token, L image tokens] -> logits over the codebook.

    Input ids: image tokens in [0, V) or `mask_token_id` (= V); labels in [0, num_classes) or
    `null_class_id` (= num_classes, the unconditional label for classifier-free guidance).
    """

    family: ClassVar[str] = "maskgit"
    config_class: ClassVar[type[BaseModel]] = MaskGITConfig

    def __init__(self, config: MaskGITConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden
        self.token_emb = nn.Embedding(config.codebook_size + 1, D)
        self.class_emb = nn.Embedding(config.num_classes + 1, D)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.seq_len + 1, D))
        self.emb_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([
            BertBlock(config.hidden, config.heads, config.mlp_dim, eps=config.layer_norm_eps,
                      dropout=config.dropout, attn_dropout=config.attn_dropout)
            for _ in range(config.depth)
        ])
        self.head = nn.Linear(D, config.codebook_size)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=config.init_std)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def mask_token_id(self) -> int:
        return self.config.codebook_size

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def forward(self, tokens_BL: Tensor, labels_B: Tensor) -> Tensor:
        """tokens_BL (B, L) int64 (mask id allowed), labels_B (B,) int64 -> logits (B, L, V)."""
        if tokens_BL.ndim != 2 or tokens_BL.shape[1] != self.config.seq_len:
            raise ValueError(
                f"MaskGIT expects tokens (B, {self.config.seq_len}), got {tuple(tokens_BL.shape)}."
            )
        if labels_B.shape != tokens_BL.shape[:1]:
            raise ValueError(
                f"labels must be (B,) = {tuple(tokens_BL.shape[:1])}, got {tuple(labels_B.shape)}."
            )
        x_BSD = torch.cat([self.class_emb(labels_B)[:, None], self.token_emb(tokens_BL)], dim=1)
        x_BSD = self.emb_drop(self.emb_norm(x_BSD + self.pos_emb))
        for block in self.blocks:
            x_BSD = block(x_BSD)
        return self.head(x_BSD[:, 1:])


# --------------------------------------------------------------------------------------------------
# Schedule, loss, sampler
# --------------------------------------------------------------------------------------------------


def masked_token_loss(
    model: MaskGIT,
    tokens_BL: Tensor,
    labels_B: Tensor,
    *,
    label_smoothing: float = 0.1,
    unmasked_weight: float = 0.1,
    class_drop: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MaskGIT training loss for one batch.

    Per sample: r ~ U(0, 1), ratio = arccos_mask_ratio(r) (clamped to >= 1e-6), mask
    max(1, round(L * ratio)) uniformly chosen positions; the class label becomes the null class with
    probability `class_drop`. Loss = label-smoothed CE on every position, weighted 1 on masked and
    `unmasked_weight` on visible positions, normalised by the weight sum (official MLMLoss).

    Args:
        tokens_BL: (B, L) int64 target ids in [0, V).
        labels_B: (B,) int64 class labels in [0, num_classes).
        generator: torch.Generator on the tokens' device for the masking and class-drop randomness.
    Returns:
        loss (scalar) and metrics: 'loss', 'masked_accuracy', 'mask_ratio' (all detached).
    """
    B, L = tokens_BL.shape
    dev = tokens_BL.device
    ratio_B = arccos_mask_ratio(torch.rand(B, device=dev, generator=generator)).clamp(1e-6, 1.0)
    num_masked_B = (L * ratio_B).round().clamp(min=1)
    ranks_BL = torch.rand(B, L, device=dev, generator=generator).argsort(dim=-1).argsort(dim=-1)
    mask_BL = ranks_BL < num_masked_B[:, None]
    inputs_BL = torch.where(mask_BL, model.mask_token_id, tokens_BL)
    drop_B = torch.rand(B, device=dev, generator=generator) < class_drop
    labels_B = torch.where(drop_B, model.null_class_id, labels_B)

    logits_BLV = model(inputs_BL, labels_B)
    ce_BL = F.cross_entropy(
        logits_BLV.transpose(1, 2).float(),
        tokens_BL,
        label_smoothing=label_smoothing,
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
        }
    return loss, metrics


@torch.no_grad()
def sample(
    model: MaskGIT,
    labels_B: Tensor,
    *,
    steps: int = 8,
    guidance_scale: float = 4.5,
    guidance_decay: Literal["constant", "linear", "power-cosine", "power_cosine"] = "constant",
    guidance_scale_pow: float = 3.0,
    randomize_temperature: float = 1.0,
    softmax_temperature_annealing: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Iterative confidence-based decoding from an all-mask sequence (official
    bytedance/1d-tokenizer `modeling/maskgit.py` `ImageBert.generate`).

    At step t (0-based, progress r = (t + 1) / N as in the official code):
      s = `schedules.maskgit_guidance(t, N, guidance_scale, guidance_decay, guidance_scale_pow)`;
      logits = c + s * (c - u) (constant, linear) or u + s * (c - u) (power-cosine); s = 0 runs
        the conditional pass alone (constant with scale 0, linear at t = 0);
      logits /= 0.5 + 0.8 * (1 - r) when `softmax_temperature_annealing`;
      sample ids = argmax(logits + tau * Gumbel) for masked positions,
        tau = randomize_temperature * (1 - r);
      confidence = logit of the sampled id + tau * fresh Gumbel (+inf for already fixed positions);
      re-mask the `remask_count` least confident positions; the last step keeps every sample.
    The model is run in eval mode (restored afterwards).

    Args:
        labels_B: (B,) int64 class labels (the null class gives unconditional samples).
        generator: torch.Generator on the labels' device; fixed seed -> identical tokens.
    Returns:
        tokens_BL: (B, L) int64 in [0, V).
    """
    if steps < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}.")
    maskgit_guidance(0, steps, guidance_scale, guidance_decay, guidance_scale_pow)  # validates
    power_cosine = guidance_decay in ("power-cosine", "power_cosine")
    was_training = model.training
    model.eval()
    B, L, dev = labels_B.shape[0], model.seq_len, labels_B.device
    ids_BL = torch.full((B, L), model.mask_token_id, dtype=torch.long, device=dev)
    null_B = torch.full_like(labels_B, model.null_class_id)
    try:
        for step in range(steps):
            r = (step + 1) / steps
            tau = gumbel_temperature(r, randomize_temperature)
            is_mask_BL = ids_BL == model.mask_token_id
            s = maskgit_guidance(step, steps, guidance_scale, guidance_decay, guidance_scale_pow)
            if s != 0.0:
                both = model(torch.cat([ids_BL, ids_BL]), torch.cat([labels_B, null_B])).float()
                cond, uncond = both.chunk(2)
                if power_cosine:
                    logits_BLV = uncond + (cond - uncond) * s
                else:
                    logits_BLV = cond + s * (cond - uncond)
            else:
                logits_BLV = model(ids_BL, labels_B).float()
            if softmax_temperature_annealing:
                logits_BLV = logits_BLV / softmax_temperature(r, 0.5, 0.8)
            noise_BLV = gumbel_noise(logits_BLV.shape, device=dev, generator=generator)
            noisy = logits_BLV + tau * noise_BLV
            sampled_BL = noisy.argmax(-1)
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


def maskgit_loss(model: MaskGIT, batch: dict[str, Tensor], step: int, **options: Any):
    """Batch-level loss (``tokens`` (B, L), ``label`` (B,)): :func:`masked_token_loss`."""
    return masked_token_loss(model, batch["tokens"].long(), batch["label"].long(), **options)


# --------------------------------------------------------------------------------------------------
# Released weights
# --------------------------------------------------------------------------------------------------


def _resolve_config(config_or_size: MaskGITConfig | str) -> tuple[MaskGITConfig, str]:
    if isinstance(config_or_size, MaskGITConfig):
        return config_or_size, "custom config"
    name = config_or_size.removesuffix(".bin").removesuffix(".safetensors").lower()
    if "s128" in name:
        raise ValueError(
            f"maskgit.load_official: '{config_or_size}' is TiTok-S-128's generator, a UViTBert "
            "(configs/infer/TiTok/titok_s128.yaml model_type 'UViT'), which vgen does not build; "
            f"released ViT generators: {', '.join(sorted(set(MASKGIT_RELEASES.values())))}.")
    size = MASKGIT_RELEASES.get(name.replace("-", "_"), config_or_size)
    return maskgit_config(size), config_or_size


def load_official(
    source: str | Path | Mapping[str, Tensor], config_or_size: MaskGITConfig | str
) -> MaskGIT:
    """Build `config_or_size` and load a released TiTok MaskGIT generator into it, strictly;
    eval mode.

    Args:
        source: a `.safetensors` file or a state dict with the released names (official
            bytedance/1d-tokenizer@942a96f `modeling/maskgit.py` ImageBert; pickles are refused,
            see `read_state_dict`). Meta tensors work when the model is built on meta.
        config_or_size: a `MASKGIT_SIZES` name ("titok-l32", "titok-b64"), a release name
            ("generator_titok_l32", "titok_b64", ...) or a config.
    Every model tensor comes from the checkpoint and every released tensor is used
    (`official_key_map`; what it leaves out is listed in `OFFICIAL_DROPPED`). Raises ValueError
    naming the first released key that is foreign, missing or of the wrong shape (with the shape
    this config expects).
    """
    config, label = _resolve_config(config_or_size)
    what = f"maskgit.load_official({label})"
    released = read_state_dict(source, what=what)
    try:
        check_released_names(released)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    note = (
        f"hidden={config.hidden}, mlp_dim={config.mlp_dim}, seq_len="
        f"{config.seq_len}, codebook_size={config.codebook_size}, num_classes="
        f"{config.num_classes}"
    )
    check_released_shapes(released, released_shapes(config), OFFICIAL_DROPPED, what=what,
                          depth=config.depth, config_note=note)
    try:
        state = official_key_map(released)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    model = MaskGIT(config)
    load_mapped_state_dict(model, state, {k: k for k in state}, what=what)
    return model.eval()


SPEC = FamilySpec(
    name="maskgit", role="generator", config_class=MaskGITConfig, sizes=MASKGIT_SIZES,
    model_class=MaskGIT, data="id_tokens", data_fields=("codebook_size", "seq_len", "num_classes"),
    loss=maskgit_loss, conditioning="labels", sampler=sample, output="tokens",
    default_for=("train.generator",),
    sampling={"B": MASKGIT_SAMPLING["titok_b64"], "titok-b64": MASKGIT_SAMPLING["titok_b64"],
              "titok-l32": MASKGIT_SAMPLING["titok_l32"]},
    load_official=load_official,
    summary="MaskGIT: bidirectional transformer, arccos masking, confidence-based decoding",
)
