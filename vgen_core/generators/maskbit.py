"""MaskBit generator: embedding-free masked modelling over LFQ bit tokens with grouped heads.

Spec: methods.md §2.4; reference: markweberdev/maskbit `modeling/bert.py` (LFQBert),
`modeling/modules/masking.py` (get_mask_tokens), `modeling/modules/factorization.py`
(split/combine_factorized_tokens), `modeling/modules/sampling.py` (sample),
`modeling/modules/losses.py` (MLMLoss), `configs/generator/maskbit_generator_12bit.yaml`.

A K-bit token index is split into G = `codebook_splits` groups of K/G bits (group g holds bits
[g K/G, (g+1) K/G), LSB first, so group ids are `(index >> g K/G) & (2^(K/G) - 1)`). The input is
not looked up in a table: each group's bits become {-1, +1} (bit k = (id >> k) & 1), a masked
group's bits are 0, the K values per position go through Linear(K -> D). Sequence =
[L tokens, class token] (class last, as the official code) + learned positions -> LayerNorm,
dropout -> post-norm BERT -> Linear, GELU, LayerNorm -> Linear(D -> G * 2^(K/G)): one softmax per
group.

Training (`maskbit_loss`): r ~ U(0, 1) per sample; every (position, group) is masked independently
with probability arccos(r) / (pi/2); class label -> null class with probability `class_drop`;
label-smoothed CE (0.1) averaged over all (position, group) pairs, masked or not, as the official
MLMLoss (`unmasked_weight` = 1). Sampling (`sample`): per step sample each masked group from
softmax(logits / T), confidence = log p(sampled) + Gumbel * randomize_temperature * (1 - r), keep
the most confident over all L * G groups; CFG c + s (c - u) with the power-cosine ramp
s = g (1 - cos((t/N)^p pi)) / 2 (`cfg_scale_schedule`, p = 3).

Shape legend: B batch, L positions, G groups, C = 2^(K/G) ids per group, K bits per token,
D width.

Released generators (markweberdev/maskbit README model zoo, `maskbit_generator_{K}bit`, converted
once to safetensors): `load_official(path, "L-k14")`; the key table is in `maskbit_keys.py`, the
released sampling settings in `MASKBIT_SAMPLING`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from vgen_core.generators.common import BertBlock, gumbel_noise
from vgen_core.generators.maskbit_keys import (
    OFFICIAL_DROPPED,
    official_key_map,
    released_name,
)
from vgen_core.generators.schedules import (
    arccos_mask_ratio,
    gumbel_temperature,
    power_cosine_guidance,
    remask_count,
)
from vgen_core.tokenizers.io import load_mapped_state_dict, read_state_dict

__all__ = [
    "MASKBIT_RELEASES",
    "MASKBIT_SAMPLING",
    "MASKBIT_SIZES",
    "MaskBit",
    "MaskBitConfig",
    "OFFICIAL_DROPPED",
    "cfg_scale_schedule",
    "combine_groups",
    "group_bits",
    "load_official",
    "maskbit_config",
    "maskbit_loss",
    "official_key_map",
    "sample",
    "split_groups",
]


class MaskBitConfig(BaseModel):
    """MaskBit generator config; `build()` makes the model. Defaults = the paper's 12-bit model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_bits: int = Field(12, ge=1, le=62)
    codebook_splits: int = Field(2, ge=1)
    seq_len: int = Field(256, ge=1)
    num_classes: int = Field(1000, ge=1)
    hidden: int = Field(1024, ge=1)
    depth: int = Field(24, ge=1)
    heads: int = Field(16, ge=1)
    mlp_dim: int = Field(4096, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    class_drop: float = Field(0.1, ge=0.0, le=1.0)
    layer_norm_eps: float = Field(1e-12, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> MaskBitConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        if self.token_bits % self.codebook_splits:
            raise ValueError(
                f"token_bits={self.token_bits} must be divisible by "
                f"codebook_splits={self.codebook_splits}."
            )
        if self.group_bits > 20:
            raise ValueError(
                f"{self.group_bits} bits per group means a 2^{self.group_bits}-way head; raise "
                "codebook_splits."
            )
        return self

    @property
    def group_bits(self) -> int:
        return self.token_bits // self.codebook_splits

    @property
    def group_size(self) -> int:
        return 1 << self.group_bits

    def build(self) -> MaskBit:
        return MaskBit(self)


MASKBIT_SIZES: dict[str, MaskBitConfig] = {
    # CPU-test size; pairs with the `tiny` LFQ tokenizer (8x8 tokens, K = 8 -> 2 groups of 16).
    "tiny": MaskBitConfig(
        token_bits=8, codebook_splits=2, seq_len=64, num_classes=10, hidden=64, depth=2, heads=4,
        mlp_dim=256, dropout=0.0,
    ),
    # The released generators (configs/generator/maskbit_generator_{K}bit.yaml `mlm_model`, all
    # `lfq_bert`, post-norm): 1024 x 24, 16 heads, MLP 4096, dropout 0.1, 2 splits, 256px with
    # stride 16 -> L = 256, 1000 classes; they differ only in K. "L" is the 12-bit one.
    "L": MaskBitConfig(hidden=1024, depth=24, heads=16, mlp_dim=4096),
    **{f"L-k{k}": MaskBitConfig(token_bits=k, hidden=1024, depth=24, heads=16, mlp_dim=4096)
       for k in (10, 14, 16, 18)},
}

#: Released inference settings, keyed by config file (configs/generator/<name>.yaml `mlm_model`,
#: as scripts/eval_maskbit.py passes them: guidance_annealing "cosine" = `cfg_scale_schedule`,
#: arccos mask schedule, use_sampling_annealing False): `sample(model, labels, **MASKBIT_SAMPLING[
#: "maskbit_generator_14bit"])`. The 14-bit checkpoint has 64 / 128 / 256-step settings.
MASKBIT_SAMPLING: dict[str, dict[str, Any]] = {
    f"maskbit_generator_{name}": {"steps": steps, "guidance_scale": g, "scale_pow": p,
                                  "randomize_temperature": t, "softmax_temperature": 1.0}
    for name, steps, g, p, t in (
        ("10bit", 64, 6.4, 2.5, 10.5),
        ("12bit", 64, 7.1, 3.0, 8.2),
        ("14bit", 64, 7.1, 3.0, 7.8),
        ("14bit_128steps", 128, 7.1, 3.0, 9.0),
        ("14bit_256steps", 256, 5.8, 3.0, 10.3),
        ("16bit", 64, 6.5, 2.5, 7.5),
        ("18bit", 64, 5.7, 2.5, 8.5),
    )
}

#: size -> its release's config name (the 64-step settings are the family's `sampling`)
MASKBIT_RELEASES: dict[str, str] = {
    "L-k10": "maskbit_generator_10bit", "L": "maskbit_generator_12bit",
    "L-k14": "maskbit_generator_14bit", "L-k16": "maskbit_generator_16bit",
    "L-k18": "maskbit_generator_18bit",
}


maskbit_config = sized_config("MaskBit", MaskBitConfig, MASKBIT_SIZES)


# --------------------------------------------------------------------------------------------------
# Bit helpers
# --------------------------------------------------------------------------------------------------


def split_groups(tokens_BL: Tensor, token_bits: int, splits: int) -> Tensor:
    """Token indices (..., ) -> group ids (..., G): group g = (index >> g K/G) & (2^(K/G) - 1)."""
    e = token_bits // splits
    shifts_G = torch.arange(splits, device=tokens_BL.device) * e
    return (tokens_BL.long()[..., None] >> shifts_G) & ((1 << e) - 1)


def combine_groups(groups_BLG: Tensor, token_bits: int) -> Tensor:
    """Inverse of `split_groups`: sum_g group_g << (g K/G)."""
    G = groups_BLG.shape[-1]
    shifts_G = torch.arange(G, device=groups_BLG.device) * (token_bits // G)
    return (groups_BLG.long() << shifts_G).sum(-1)


def group_bits(groups_BLG: Tensor, bits_per_group: int) -> Tensor:
    """Group ids -> bits in {-1, +1} (..., G * K/G), LSB first per group; mask ids (>= 2^(K/G))
    give 0 for every bit of their group (official `LFQBert.preprocess_tokens`)."""
    shifts = torch.arange(bits_per_group, device=groups_BLG.device)
    bits = ((groups_BLG[..., None] >> shifts) & 1).float() * 2.0 - 1.0
    bits = bits.masked_fill((groups_BLG >= (1 << bits_per_group))[..., None], 0.0)
    return bits.flatten(-2)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class MaskBit(nn.Module):
    """Bits-in BERT: group ids (B, L, G) (mask id C allowed) + labels (B,) -> logits (B, L, G, C).

    Labels in [0, num_classes) or `null_class_id` (= num_classes) for classifier-free guidance.
    """

    family: ClassVar[str] = "maskbit"
    config_class: ClassVar[type[BaseModel]] = MaskBitConfig

    def __init__(self, config: MaskBitConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden
        self.class_emb = nn.Embedding(config.num_classes + 1, D)
        self.input_proj = nn.Linear(config.token_bits, D)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.seq_len + 1, D))
        self.emb_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([
            BertBlock(D, config.heads, config.mlp_dim, eps=config.layer_norm_eps,
                      dropout=config.dropout, attn_dropout=config.dropout)
            for _ in range(config.depth)
        ])
        self.last_fc = nn.Linear(D, D)
        self.last_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.head = nn.Linear(D, config.codebook_splits * config.group_size)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=config.init_std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_emb, std=config.init_std)

    @property
    def mask_token_id(self) -> int:
        """Group-level mask id (= 2^(K/G), one past the last group id)."""
        return self.config.group_size

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def forward(self, groups_BLG: Tensor, labels_B: Tensor) -> Tensor:
        cfg = self.config
        if groups_BLG.shape[1:] != (cfg.seq_len, cfg.codebook_splits):
            raise ValueError(
                f"MaskBit expects group ids (B, {cfg.seq_len}, {cfg.codebook_splits}), got "
                f"{tuple(groups_BLG.shape)}; use split_groups(tokens, token_bits, splits)."
            )
        if labels_B.shape != groups_BLG.shape[:1]:
            raise ValueError(
                f"labels must be (B,) = {tuple(groups_BLG.shape[:1])}, got {tuple(labels_B.shape)}."
            )
        bits_BLK = group_bits(groups_BLG.long(), cfg.group_bits)
        x = torch.cat([self.input_proj(bits_BLK), self.class_emb(labels_B)[:, None]], dim=1)
        x = self.emb_drop(self.emb_norm(x + self.pos_emb))
        for blk in self.blocks:
            x = blk(x)
        x = self.last_norm(F.gelu(self.last_fc(x)))
        logits = self.head(x[:, : cfg.seq_len])
        return logits.view(*logits.shape[:2], cfg.codebook_splits, cfg.group_size)


# --------------------------------------------------------------------------------------------------
# Loss, CFG schedule, sampler
# --------------------------------------------------------------------------------------------------


def maskbit_loss(
    model: MaskBit,
    batch: dict[str, Tensor],
    step: int = 0,
    *,
    label_smoothing: float = 0.1,
    unmasked_weight: float = 1.0,
    class_drop: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MaskBit training loss for one batch.

    Batch keys: `tokens` int64 (B, L) indices in [0, 2^K); `label` int64 (B,).
    Every (position, group) is masked with probability arccos_mask_ratio(r), r ~ U(0, 1) per
    sample (Bernoulli, official `get_mask_tokens`); labels -> null class w.p. `class_drop`
    (None -> `config.class_drop`).
    Loss = label-smoothed CE per (position, group), weighted 1 on masked and `unmasked_weight` on
    visible groups (1 = the official plain mean), normalised by the weight sum. `step` is unused.
    Returns the loss and detached metrics 'loss', 'masked_loss', 'masked_accuracy', 'mask_ratio'.
    """
    cfg = model.config
    tokens_BL = batch["tokens"].long()
    labels_B = batch["label"].long().to(tokens_BL.device)
    B, L = tokens_BL.shape
    dev = tokens_BL.device
    groups_BLG = split_groups(tokens_BL, cfg.token_bits, cfg.codebook_splits)
    ratio_B = arccos_mask_ratio(torch.rand(B, device=dev, generator=generator))
    u_BLG = torch.rand(groups_BLG.shape, device=dev, generator=generator)
    mask_BLG = u_BLG < ratio_B[:, None, None]
    inputs_BLG = torch.where(mask_BLG, model.mask_token_id, groups_BLG)
    p_drop = cfg.class_drop if class_drop is None else class_drop
    drop_B = torch.rand(B, device=dev, generator=generator) < p_drop
    labels_B = torch.where(drop_B, model.null_class_id, labels_B)

    logits_BLGC = model(inputs_BLG, labels_B)
    ce_BLG = F.cross_entropy(
        logits_BLGC.flatten(0, 2).float(), groups_BLG.flatten(), label_smoothing=label_smoothing,
        reduction="none",
    ).view(groups_BLG.shape)
    w_BLG = torch.where(mask_BLG, 1.0, unmasked_weight).to(ce_BLG.dtype)
    loss = (ce_BLG * w_BLG).sum() / w_BLG.sum().clamp_min(1e-8)
    with torch.no_grad():
        n_masked = mask_BLG.sum().clamp_min(1)
        correct_BLG = (logits_BLGC.argmax(-1) == groups_BLG) & mask_BLG
        metrics = {
            "loss": loss.detach(),
            "masked_loss": (ce_BLG * mask_BLG).sum() / n_masked,
            "masked_accuracy": correct_BLG.sum() / n_masked,
            "mask_ratio": mask_BLG.float().mean(),
        }
    return loss, metrics


def cfg_scale_schedule(
    step: int, steps: int, guidance_scale: float, scale_pow: float = 3.0
) -> float:
    """Power-cosine guidance s at step `step` (0-based) for logits = c + s (c - u).

    s = g (1 - cos((step / N)^p pi)) / 2 (official `sample`, guidance_annealing="cosine"): 0 at the
    first step, rising to g as step / N -> 1; `schedules.power_cosine_guidance` with start 0.
    """
    return power_cosine_guidance(step, steps, guidance_scale, scale_pow, start=0.0)


@torch.no_grad()
def sample(
    model: MaskBit,
    labels_B: Tensor,
    *,
    steps: int = 64,
    guidance_scale: float = 7.1,
    scale_pow: float = 3.0,
    randomize_temperature: float = 8.2,
    softmax_temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Iterative group-level decoding from all-mask (official `modeling/modules/sampling.py`).

    At step t (progress r = (t + 1) / N): logits = c + s(c - u), s = `cfg_scale_schedule` (skipped
    when guidance_scale = 0); each masked group is drawn from softmax(logits / T) (as Gumbel-argmax
    with `generator`); confidence = log p(drawn) + randomize_temperature (1 - r) Gumbel, +inf for
    fixed groups; the `remask_count(t, N, L * G, ...)` least confident groups are masked again.
    Defaults = maskbit_generator_12bit.yaml (64 steps, g = 7.1, p = 3, temperature 8.2).

    Args:
        labels_B: (B,) int64 class labels (the null class gives unconditional samples).
        generator: torch.Generator on the labels' device; a fixed seed gives identical tokens.
    Returns:
        tokens_BL: (B, L) int64 indices in [0, 2^K).
    """
    if steps < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}.")
    cfg = model.config
    was_training = model.training
    model.eval()
    B, L, G, dev = labels_B.shape[0], cfg.seq_len, cfg.codebook_splits, labels_B.device
    ids_BN = torch.full((B, L * G), model.mask_token_id, dtype=torch.long, device=dev)
    null_B = torch.full_like(labels_B, model.null_class_id)
    try:
        for step in range(steps):
            r = (step + 1) / steps
            is_mask_BN = ids_BN == model.mask_token_id
            ids_BLG = ids_BN.view(B, L, G)
            s = cfg_scale_schedule(step, steps, guidance_scale, scale_pow)
            if guidance_scale != 0.0:
                both = model(torch.cat([ids_BLG, ids_BLG]), torch.cat([labels_B, null_B])).float()
                cond, uncond = both.chunk(2)
                logits = cond + s * (cond - uncond)
            else:
                logits = model(ids_BLG, labels_B).float()
            logp_BNC = (logits / softmax_temperature).log_softmax(-1).flatten(1, 2)
            noise_BNC = gumbel_noise(logp_BNC.shape, device=dev, generator=generator)
            drawn_BN = (logp_BNC + noise_BNC).argmax(-1)
            drawn_BN = torch.where(is_mask_BN, drawn_BN, ids_BN)
            if step == steps - 1:
                ids_BN = drawn_BN
                break
            conf_BN = logp_BNC.gather(-1, drawn_BN.clamp_max(cfg.group_size - 1)[..., None])[..., 0]
            conf_BN = conf_BN + gumbel_temperature(r, randomize_temperature) * gumbel_noise(
                conf_BN.shape, device=dev, generator=generator
            )
            conf_BN = torch.where(is_mask_BN, conf_BN, torch.inf)
            n_remask = remask_count(step, steps, L * G, int(is_mask_BN.sum(-1).min()))
            lowest_Bn = conf_BN.topk(n_remask, dim=-1, largest=False).indices
            remask_BN = torch.zeros_like(is_mask_BN).scatter_(-1, lowest_Bn, True)
            ids_BN = torch.where(remask_BN, model.mask_token_id, drawn_BN)
    finally:
        model.train(was_training)
    return combine_groups(ids_BN.view(B, L, G), cfg.token_bits)


# --------------------------------------------------------------------------------------------------
# Released weights
# --------------------------------------------------------------------------------------------------


def _resolve_config(config_or_size: MaskBitConfig | str) -> tuple[MaskBitConfig, str]:
    if isinstance(config_or_size, MaskBitConfig):
        return config_or_size, "custom config"
    by_release = {v: k for k, v in MASKBIT_RELEASES.items()}
    return maskbit_config(by_release.get(config_or_size, config_or_size)), config_or_size


def load_official(
    source: str | Path | Mapping[str, Tensor], config_or_size: MaskBitConfig | str
) -> MaskBit:
    """Build `config_or_size` and load a released MaskBit generator into it, strictly; eval mode.

    Args:
        source: a `.safetensors` file or a state dict with the released names (official
            markweberdev/maskbit@5ea3d73 `modeling/bert.py` LFQBert, input projection named
            `token_emb` or `input_proj`; pickles are refused, see `read_state_dict`). Meta tensors
            work when the model is built on meta (then `bits_to_indices` values are not checked).
        config_or_size: a `MASKBIT_SIZES` name ("L-k10", "L" = 12 bits, "L-k14", "L-k16",
            "L-k18"), a release name ("maskbit_generator_14bit") or a config.
    Every model tensor comes from a released tensor and every released tensor is used or, for
    `bits_to_indices`, checked (`OFFICIAL_DROPPED`). Raises ValueError naming the first released
    key that is foreign, missing or of the wrong shape (with the shape this config expects).
    """
    config, label = _resolve_config(config_or_size)
    what = f"maskbit.load_official({label})"
    released = read_state_dict(source, what=what)
    try:
        state = official_key_map(released)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    prefix = "input_proj." if "input_proj.weight" in released else "token_emb."
    buf = released["bits_to_indices"]
    if tuple(buf.shape) != (config.group_bits,):
        raise ValueError(
            f"{what}: 'bits_to_indices' has shape {tuple(buf.shape)} but this config expects "
            f"({config.group_bits},) (token_bits={config.token_bits} / codebook_splits="
            f"{config.codebook_splits}); the checkpoint is of another bit width."
        )
    model = MaskBit(config)
    expected = model.state_dict()
    for key, want in expected.items():
        name = released_name(key, prefix)
        if key not in state:
            raise ValueError(f"{what}: the checkpoint has no '{name}' (vgen '{key}', expected "
                             f"shape {tuple(want.shape)}); it does not match this size (depth).")
        if tuple(state[key].shape) != tuple(want.shape):
            raise ValueError(
                f"{what}: '{name}' (vgen '{key}') has shape {tuple(state[key].shape)} in the "
                f"checkpoint but this config expects {tuple(want.shape)} (hidden={config.hidden}, "
                f"mlp_dim={config.mlp_dim}, token_bits={config.token_bits}, codebook_splits="
                f"{config.codebook_splits}, seq_len={config.seq_len}, num_classes="
                f"{config.num_classes})."
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{what}: checkpoint key '{released_name(extra[0], prefix)}' has no "
                         f"place in this config ({len(extra)} such keys; check depth).")
    load_mapped_state_dict(model, state, {k: k for k in state}, what=what)
    return model.eval()


SPEC = FamilySpec(
    name="maskbit", role="generator", config_class=MaskBitConfig, sizes=MASKBIT_SIZES,
    model_class=MaskBit, data="bit_tokens", data_fields=("token_bits", "seq_len", "num_classes"),
    loss=maskbit_loss, conditioning="labels", sampler=sample, output="tokens",
    sampling={size: MASKBIT_SAMPLING[name] for size, name in MASKBIT_RELEASES.items()},
    load_official=load_official,
    summary="MaskBit: masked modeling of bit groups (embedding-free bit tokens)",
)
