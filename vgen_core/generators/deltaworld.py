"""DeltaWorld: a best-of-many world model over DeltaTok delta tokens (one token per frame).

Spec: methods.md §2.11, §1.5; reference: amazon-far/deltatok `models/deltaworld.py`,
`models/world.py` (causal_mask, _bom_queries, rollout), `training/world.py`, `training/base.py`
(LogCoshLoss); the predictor module is `models/predictor.py` (read from the deltawam/DeltaWAM copy,
where it carries extra task/action conditioning that is off by default and not built here).

Predictor: a stack of pre-norm *cross-attention* blocks. The queries are random noise vectors
q ~ N(0, init_std^2) of the predictor width P (one per hypothesis and target frame); at every
block they attend to the delta tokens of the earlier frames (keys/values projected from D to P),
with 1D rotary embeddings of the frames' timestamps on q and k (the first `rope_axis_size` dims
of each head rotated, the rest left alone), then an MLP; both residuals carry layer scale.
Queries never attend to each other, so hypotheses and target frames are independent given the
context. Output: LayerNorm -> Linear(P -> D), the predicted delta token.

Causality (training, teacher forced): the query for frame i (1 <= i < T) sees the delta tokens of
frames 0..i-1 and predicts frame i; the last frame is never a key.

Best of many (`deltaworld_loss`): per target frame draw H noise queries, predict all H without
gradient, keep the query whose prediction has the lowest loss (mean over D), and run the predictor
again on the kept queries with gradient: only the selected hypothesis is supervised.
Sampling (`sample`): N noise queries per future frame, rolled out autoregressively (each
hypothesis appends its own prediction to its context).

Shape legend: B batch, T frames, D delta-token width, P predictor width, H hypotheses,
Q queries, K keys, N samples.

Criterion (config `loss`): default smooth-L1 with beta 0.1, elementwise, as the official
`training/world.py` `World(loss_fn="smooth_l1", loss_beta=1e-1)` builds it in `training/base.py`
`Base.__init__` (`nn.SmoothL1Loss(reduction="none", beta=loss_beta)`); the training loss is its
mean over all elements in fp32 (`Base.training_step`), the hypothesis selection its mean over D
(`_bom_queries`). `loss="log_cosh"` selects the DeltaTok criterion (`LogCoshLoss`) instead.

Deviation, on purpose: the input is delta tokens (the frozen VFM + DeltaTok that produce them live
in `vgen_core.tokenizers.deltatok`).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config

from vgen_core.generators.common import apply_rope_half, attention, rope_1d_angles
from vgen_core.tokenizers.deltatok import log_cosh_loss

__all__ = [
    "DELTAWORLD_SIZES",
    "DeltaWorld",
    "DeltaWorldConfig",
    "best_of_many_loss",
    "causal_mask",
    "deltaworld_config",
    "deltaworld_loss",
    "elementwise_loss",
    "sample",
]


class DeltaWorldConfig(BaseModel):
    """DeltaWorld predictor config; `build()` makes the model. Defaults = ViT-B predictor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_dim: int = Field(768, ge=1)
    hidden: int = Field(768, ge=1)
    depth: int = Field(12, ge=1)
    heads: int = Field(12, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    rope_axis_size: int = Field(60, ge=0)
    layer_scale_init: float = Field(1e-5, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)
    num_hypotheses_train: int = Field(256, ge=1)
    num_samples_eval: int = Field(20, ge=1)
    # official World default: smooth-L1, beta 0.1; "log_cosh" = the DeltaTok criterion
    loss: Literal["smooth_l1", "log_cosh"] = "smooth_l1"
    smooth_l1_beta: float = Field(0.1, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> DeltaWorldConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        head_dim = self.hidden // self.heads
        if self.rope_axis_size % 2 or self.rope_axis_size > head_dim:
            raise ValueError(
                f"rope_axis_size={self.rope_axis_size} must be even and <= head dim {head_dim} "
                "(the official split is 60 rotated + 4 unrotated of 64)."
            )
        return self

    def build(self) -> DeltaWorld:
        return DeltaWorld(self)


DELTAWORLD_SIZES: dict[str, DeltaWorldConfig] = {
    # CPU-test size: 16-dim tokens, head dim 16 = 12 rotated + 4 unrotated.
    "tiny": DeltaWorldConfig(
        token_dim=16, hidden=32, depth=2, heads=2, rope_axis_size=12, layer_scale_init=0.1,
        num_hypotheses_train=8, num_samples_eval=4,
    ),
    # Official DeltaWorld: ViT-B predictor 768 x 12, 12 heads, MLP x4, RoPE 60 + 4, 256 / 20.
    "B": DeltaWorldConfig(),
}


deltaworld_config = sized_config("DeltaWorld", DeltaWorldConfig, DELTAWORLD_SIZES)


# --------------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------------


def causal_mask(q_index_Q: Tensor, k_index_K: Tensor) -> Tensor:
    """(Q, K) bool, True where query i may attend to key j: frame(j) < frame(i) (official
    `causal_mask` blocks k >= q)."""
    return k_index_K[None, :] < q_index_Q[:, None]


def _rope_time(x_BHSd: Tensor, t_BS: Tensor, axis: int) -> Tensor:
    """Rotate the first `axis` dims of each head by angle 2 pi t f, f = 10^linspace(2, -2, axis/2)
    (official `_apply_rope_axis`: halves, not interleaved pairs, so `common.apply_rope_half`;
    angles in >= fp32, cos/sin then cast to x's dtype)."""
    if axis == 0:
        return x_BHSd
    half = axis // 2
    dtype = torch.promote_types(x_BHSd.dtype, torch.float32)  # angles in >= fp32
    inv_freq = 1.0 / (10.0 ** torch.linspace(-2, 2, half, device=x_BHSd.device, dtype=dtype))
    angle_B1SF = rope_1d_angles((2 * math.pi) * t_BS[:, None, :].to(dtype), inv_freq)
    cos = angle_B1SF.cos().to(x_BHSd.dtype).repeat(1, 1, 1, 2)
    sin = angle_B1SF.sin().to(x_BHSd.dtype).repeat(1, 1, 1, 2)
    rotated = apply_rope_half(x_BHSd[..., :axis], cos, sin)
    return torch.cat([rotated, x_BHSd[..., axis:]], dim=-1)


class _CrossAttn(nn.Module):
    def __init__(self, cfg: DeltaWorldConfig) -> None:
        super().__init__()
        self.heads, self.rope = cfg.heads, cfg.rope_axis_size
        self.q_proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.kv_proj = nn.Linear(cfg.token_dim, 2 * cfg.hidden)
        self.out_proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, q_BQP: Tensor, kv_BKD: Tensor, mask_QK: Tensor | None, tq_BQ: Tensor,
                tk_BK: Tensor) -> Tensor:
        B, Q, P = q_BQP.shape
        K, H = kv_BKD.shape[1], self.heads
        q = self.q_proj(q_BQP).view(B, Q, H, P // H).transpose(1, 2)
        k, v = self.kv_proj(kv_BKD).view(B, K, 2, H, P // H).permute(2, 0, 3, 1, 4)
        q, k = _rope_time(q, tq_BQ, self.rope), _rope_time(k, tk_BK, self.rope)
        a = attention(q, k, v, mask=mask_QK)
        return self.out_proj(a.transpose(1, 2).reshape(B, Q, P))


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


class _MLP(nn.Module):
    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, dim * ratio)
        self.down_proj = nn.Linear(dim * ratio, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class _Block(nn.Module):
    """q += LS(CrossAttn(LN(q), kv)); q += LS(MLP(LN(q)))."""

    def __init__(self, cfg: DeltaWorldConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.attention = _CrossAttn(cfg)
        self.layer_scale1 = _LayerScale(cfg.hidden, cfg.layer_scale_init)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.mlp = _MLP(cfg.hidden, cfg.mlp_ratio)
        self.layer_scale2 = _LayerScale(cfg.hidden, cfg.layer_scale_init)

    def forward(self, q_BQP: Tensor, kv_BKD: Tensor, mask_QK: Tensor | None, tq_BQ: Tensor,
                tk_BK: Tensor) -> Tensor:
        q_BQP = q_BQP + self.layer_scale1(
            self.attention(self.norm1(q_BQP), kv_BKD, mask_QK, tq_BQ, tk_BK)
        )
        return q_BQP + self.layer_scale2(self.mlp(self.norm2(q_BQP)))


class _Predictor(nn.Module):
    def __init__(self, cfg: DeltaWorldConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.token_dim)


class DeltaWorld(nn.Module):
    """Noise queries + earlier delta tokens -> predicted delta tokens (see module docstring).

    State-dict keys follow the official module under `predictor.` (blocks.i.attention.q_proj,
    .kv_proj, .out_proj, layer_scale1.lambda1, mlp.up_proj/down_proj, norm, head).
    """

    family: ClassVar[str] = "deltaworld"
    config_class: ClassVar[type[BaseModel]] = DeltaWorldConfig

    def __init__(self, config: DeltaWorldConfig) -> None:
        super().__init__()
        self.config = config
        self.predictor = _Predictor(config)
        for m in self.predictor.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=config.init_std)
                nn.init.zeros_(m.bias)

    def forward(
        self,
        queries_BQP: Tensor,
        context_BKD: Tensor,
        q_time_BQ: Tensor,
        k_time_BK: Tensor,
        mask_QK: Tensor | None = None,
    ) -> Tensor:
        """queries (B, Q, P), context delta tokens (B, K, D), timestamps (B, Q) / (B, K), optional
        bool mask (Q, K) (True = may attend) -> predicted delta tokens (B, Q, D)."""
        cfg = self.config
        if queries_BQP.shape[-1] != cfg.hidden or context_BKD.shape[-1] != cfg.token_dim:
            raise ValueError(
                f"DeltaWorld expects queries (..., {cfg.hidden}) and context (..., "
                f"{cfg.token_dim}), got {tuple(queries_BQP.shape)} and {tuple(context_BKD.shape)}."
            )
        q = queries_BQP
        for blk in self.predictor.blocks:
            q = blk(q, context_BKD, mask_QK, q_time_BQ, k_time_BK)
        return self.predictor.head(self.predictor.norm(q))

    def draw_queries(self, *shape: int, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """Noise queries (*shape, P) ~ N(0, init_std^2) (official `_sample_queries`)."""
        noise = torch.randn(*shape, self.config.hidden, device=device, generator=generator)
        return noise * self.config.init_std

    def teacher_forced(self, delta_BTD: Tensor, time_BT: Tensor, queries_BTHP: Tensor) -> Tensor:
        """Predictions for frames 1..T-1 from their own earlier frames, H hypotheses each.

        queries_BTHP: (B, T-1, H, P). Returns (B, T-1, H, D); hypothesis h for frame i uses
        only delta tokens 0..i-1.
        """
        B, T, _ = delta_BTD.shape
        if T < 2:
            raise ValueError(f"DeltaWorld needs >= 2 frames to predict one, got T={T}.")
        if queries_BTHP.shape[:2] != (B, T - 1):
            raise ValueError(
                f"queries must be (B, T-1, H, P) = ({B}, {T - 1}, H, P), got "
                f"{tuple(queries_BTHP.shape)}."
            )
        H = queries_BTHP.shape[2]
        dev = delta_BTD.device
        q_index = torch.arange(1, T, device=dev).repeat_interleave(H)
        mask = causal_mask(q_index, torch.arange(T - 1, device=dev))
        tq = time_BT[:, 1:].repeat_interleave(H, dim=1)
        out = self(queries_BTHP.flatten(1, 2), delta_BTD[:, :-1], tq, time_BT[:, :-1], mask)
        return out.view(B, T - 1, H, -1)


# --------------------------------------------------------------------------------------------------
# Loss and sampler
# --------------------------------------------------------------------------------------------------


def elementwise_loss(pred: Tensor, target: Tensor, config: DeltaWorldConfig) -> Tensor:
    """Unreduced criterion in fp32: smooth-L1 with beta `smooth_l1_beta` (default; official World
    `nn.SmoothL1Loss(reduction="none", beta=0.1)`) or log-cosh (DeltaTok)."""
    if config.loss == "log_cosh":
        return log_cosh_loss(pred, target, reduction="none")
    return F.smooth_l1_loss(pred.float(), target.detach().float(), reduction="none",
                            beta=config.smooth_l1_beta)


def best_of_many_loss(preds_BTHD: Tensor, target_BTD: Tensor, config: DeltaWorldConfig
                      ) -> tuple[Tensor, Tensor]:
    """Single-pass reference of the best-of-many objective.

    Per (sample, frame) the hypothesis with the lowest mean-over-D loss is selected; the loss is
    the mean over (B, T, D) of the selected hypotheses' elementwise loss, so gradient reaches only
    them. Returns (loss, best index (B, T)).
    """
    per_BTHD = elementwise_loss(preds_BTHD, target_BTD[:, :, None].expand_as(preds_BTHD), config)
    best_BT = per_BTHD.detach().mean(-1).argmin(-1)
    chosen = per_BTHD.gather(2, best_BT[:, :, None, None].expand(-1, -1, 1, per_BTHD.shape[-1]))
    return chosen.mean(), best_BT


def deltaworld_loss(
    model: DeltaWorld,
    batch: dict[str, Tensor],
    step: int = 0,
    *,
    num_hypotheses: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Best-of-many training loss for one batch (official `_bom_queries` + `_forward_train`).

    Batch keys: `delta` float (B, T, D) delta tokens; `timestamps` float (B, T) seconds.
    Draws H = `num_hypotheses` (default `config.num_hypotheses_train`) noise queries per target
    frame, predicts all of them without gradient, keeps the lowest-loss query per (sample, frame),
    and returns the criterion of the kept queries' predictions (second pass, with gradient), mean
    over (B, T-1, D). `step` is unused. Metrics: 'loss', 'best_index_mean', 'hypothesis_spread'.
    """
    delta_BTD = batch["delta"].float()
    time_BT = batch["timestamps"].float().to(delta_BTD.device)
    if delta_BTD.ndim != 3 or time_BT.shape != delta_BTD.shape[:2]:
        raise ValueError(
            f"deltaworld_loss: expected delta (B, T, D) and timestamps (B, T), got "
            f"{tuple(delta_BTD.shape)} and {tuple(time_BT.shape)}."
        )
    B, T, _ = delta_BTD.shape
    H = num_hypotheses or model.config.num_hypotheses_train
    target_BTD = delta_BTD[:, 1:]
    q_BTHP = model.draw_queries(B, T - 1, H, device=delta_BTD.device, generator=generator)
    with torch.no_grad():
        preds_BTHD = model.teacher_forced(delta_BTD, time_BT, q_BTHP)
        per_BTH = elementwise_loss(preds_BTHD, target_BTD[:, :, None].expand_as(preds_BTHD),
                                   model.config).mean(-1)
        best_BT = per_BTH.argmin(-1)
    q_best_BT1P = q_BTHP.gather(2, best_BT[:, :, None, None].expand(-1, -1, 1, q_BTHP.shape[-1]))
    pred_BTD = model.teacher_forced(delta_BTD, time_BT, q_best_BT1P)[:, :, 0]
    loss = elementwise_loss(pred_BTD, target_BTD, model.config).mean()
    metrics = {
        "loss": loss.detach(),
        "best_index_mean": best_BT.float().mean(),
        "hypothesis_spread": (per_BTH.max(-1).values - per_BTH.min(-1).values).mean(),
    }
    return loss, metrics


@torch.no_grad()
def sample(
    model: DeltaWorld,
    context_BTD: Tensor,
    timestamps_BT: Tensor,
    *,
    horizon: int = 1,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw N future hypotheses per sample, rolled out `horizon` frames (official rollout_step).

    Args:
        context_BTD: (B, Tc, D) observed delta tokens.
        timestamps_BT: (B, Tc + horizon) timestamps of the context and the frames to predict.
        num_samples: N (default `config.num_samples_eval`, 20 for the official model).
        generator: torch.Generator on the context's device; a fixed seed gives identical samples.
    Returns:
        (B, N, horizon, D): each hypothesis conditions its later frames on its own predictions.
    """
    B, Tc, D = context_BTD.shape
    if timestamps_BT.shape != (B, Tc + horizon):
        raise ValueError(
            f"sample: timestamps must be (B, Tc + horizon) = ({B}, {Tc + horizon}), got "
            f"{tuple(timestamps_BT.shape)}."
        )
    N = num_samples or model.config.num_samples_eval
    was_training = model.training
    model.eval()
    kv = context_BTD.float().repeat_interleave(N, dim=0)
    time = timestamps_BT.float().repeat_interleave(N, dim=0)
    preds = []
    try:
        for _ in range(horizon):
            q = model.draw_queries(B * N, 1, device=context_BTD.device, generator=generator)
            k_len = kv.shape[1]
            z = model(q, kv, time[:, k_len: k_len + 1], time[:, :k_len])
            preds.append(z)
            kv = torch.cat([kv, z], dim=1)
    finally:
        model.train(was_training)
    return torch.cat(preds, dim=1).view(B, N, horizon, D)




SPEC = FamilySpec(
    name="deltaworld", role="generator", config_class=DeltaWorldConfig, sizes=DELTAWORLD_SIZES,
    model_class=DeltaWorld, data="delta_tokens", data_fields=("token_dim",),
    loss=deltaworld_loss, conditioning="context", sampler=sample, output="delta_tokens",
    summary="DeltaWorld: world model predicting the next delta tokens (best-of-many)",
)
