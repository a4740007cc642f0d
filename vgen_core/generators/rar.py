"""Randomized autoregressive generation (RAR): causal decoder, order annealing, KV-cached sampler.

Spec: methods.md §2.3; reference: bytedance/1d-tokenizer `modeling/rar.py` (RAR, Block, Attention,
FinalLayer), `modeling/modules/losses.py` (ARLoss), `utils/train_utils.py` (get_rar_random_ratio),
`configs/training/generator/rar.yaml`, README (per-size sampling settings).

The model, its training loss and its sampler are separate: `RAR` maps (tokens, class labels, order)
to next-token logits; `rar_loss` draws the orders (`sample_orders` with probability
`rar_permutation_prob(step)`) and does the class dropout; `sample` runs raster decoding with a KV
cache and the power-cosine guidance schedule `power_cosine_guidance`.

Shape legend: B batch, L image tokens per sample, N tokens given so far (N <= L), S input slots
(S = N + 2: [cls, condition, N tokens in generation order]), D hidden width, V codebook size,
H heads, d head width.

Mechanics copied from the official code:
- one embedding table of V + 1 + C + 1 rows (tokens, an unused mask id, classes, the null class);
  the condition slot holds the class embedding, and every slot's adaLN condition is that
  embedding plus a learned per-slot `timesteps_embeddings` row;
- absolute positions: cls and condition slots get rows 0 and 1 of `pos_embed`, the token generated
  at step i gets row 2 + orders[i] (the embedding of where it sits);
- target-aware positions: slot 1 + i (the condition for i = 0, the token of step i - 1 otherwise)
  gets `target_aware_pos_embed[orders[i]]`, the position it must predict; the cls slot and the
  last token slot get 0;
- logits come from slots 1 .. L (slot 1 + i predicts orders[i]); CE without label smoothing.
Tables are sized to what is used: the official `pos_embed` has L + 1024 rows (we keep its first
L + 2), `target_aware_pos_embed` L + 1024 (we keep rows 2 .. L + 1, so our row j = target j) and
`timesteps_embeddings` L + 100 (we keep L + 2). Other parameter names match the official ones.

Released weights (yucornetto/RAR `rar_{b,l,xl,xxl}.bin`, converted once to safetensors):
`load_official(path, "B")` (or "rar_b"); the key table and the dropped rows are in `rar_keys.py`.
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
from vgen_core.generators.common import (
    AdaLNFinalLayer,
    CausalAdaLNBlock,
    KVCache,
    Mlp,
    trunc_normal_init,
    zero_adaln,
)
from vgen_core.generators.rar_keys import (
    OFFICIAL_DROPPED,
    official_key_map,
    released_seq_len,
    released_shape,
)
from vgen_core.generators.schedules import power_cosine_guidance
from vgen_core.tokenizers.io import load_mapped_state_dict, read_state_dict

__all__ = [
    "KVCache",
    "OFFICIAL_DROPPED",
    "RAR",
    "RARConfig",
    "RAR_RELEASES",
    "RAR_SAMPLING",
    "RAR_SIZES",
    "check_orders",
    "load_official",
    "official_key_map",
    "power_cosine_guidance",
    "rar_config",
    "rar_loss",
    "rar_permutation_prob",
    "raster_orders",
    "sample",
    "sample_orders",
    "unshuffle",
]


class RARConfig(BaseModel):
    """RAR generator config; `build()` makes the model. Defaults = RAR-B on MaskGIT-VQGAN 16x16."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    codebook_size: int = Field(1024, ge=2)
    seq_len: int = Field(256, ge=1)
    num_classes: int = Field(1000, ge=1)
    hidden: int = Field(768, ge=1)
    depth: int = Field(24, ge=1)
    heads: int = Field(16, ge=1)
    mlp_dim: int = Field(3072, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attn_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_norm_eps: float = Field(1e-6, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> RARConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}.")
        return self

    def build(self) -> RAR:
        return RAR(self)


RAR_SIZES: dict[str, RARConfig] = {
    # CPU-test size; pairs with the `tiny` LFQ tokenizer (8x8 tokens, K=8 -> V=256).
    "tiny": RARConfig(
        codebook_size=256, seq_len=64, num_classes=10, hidden=64, depth=2, heads=4, mlp_dim=256,
        dropout=0.0, attn_dropout=0.0,
    ),
    # Released RAR-B/L/XL/XXL (README_RAR.md; rar.yaml for the rest: MaskGIT-VQGAN V = 1024,
    # L = 256, C = 1000, LayerNorm eps 1e-6, dropout 0.1): width/layers/MLP, 16 heads;
    # 261M / 461M / 955M / 1.5B parameters.
    "B": RARConfig(hidden=768, depth=24, heads=16, mlp_dim=3072),
    "L": RARConfig(hidden=1024, depth=24, heads=16, mlp_dim=4096),
    "XL": RARConfig(hidden=1280, depth=32, heads=16, mlp_dim=5120),
    "XXL": RARConfig(hidden=1408, depth=40, heads=16, mlp_dim=6144),
}

#: Official sampling settings per size (README): `sample(model, labels, **RAR_SAMPLING["B"])`.
RAR_SAMPLING: dict[str, dict[str, float]] = {
    "B": {"guidance_scale": 16.0, "guidance_power": 2.75, "temperature": 1.0},
    "L": {"guidance_scale": 15.5, "guidance_power": 2.5, "temperature": 1.02},
    "XL": {"guidance_scale": 6.9, "guidance_power": 1.5, "temperature": 1.02},
    "XXL": {"guidance_scale": 8.0, "guidance_power": 1.2, "temperature": 1.02},
}


rar_config = sized_config("RAR", RARConfig, RAR_SIZES)

#: released checkpoint names (README_RAR.md model zoo) -> size
RAR_RELEASES: dict[str, str] = {"rar_b": "B", "rar_l": "L", "rar_xl": "XL", "rar_xxl": "XXL"}


# --------------------------------------------------------------------------------------------------
# Generation orders (shared with bar.py; the blocks are in common.py)
# --------------------------------------------------------------------------------------------------


def raster_orders(batch: int, seq_len: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, L) int64 raster orders: every row is arange(L)."""
    return torch.arange(seq_len, device=device).expand(batch, seq_len)


def unshuffle(x_BLX: Tensor, orders_BL: Tensor) -> Tensor:
    """x in generation order (row i belongs to position orders[i]) -> x in position order."""
    inverse_BL = orders_BL.argsort(dim=1)
    return x_BLX.gather(1, inverse_BL[..., None].expand_as(x_BLX))


def check_orders(orders_BL: Tensor, batch: int, seq_len: int) -> None:
    """Raise unless orders_BL is (batch, seq_len)."""
    if orders_BL.shape != (batch, seq_len):
        raise ValueError(
            f"orders must be (B, L) = ({batch}, {seq_len}), got {tuple(orders_BL.shape)}."
        )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class RAR(nn.Module):
    """Causal decoder over [cls, condition, L tokens in generation order] -> next-token logits.

    Labels are in [0, num_classes) or `null_class_id` (= num_classes, the unconditional label for
    classifier-free guidance). Orders are per-sample permutations of range(L) (raster = arange).
    """

    family: ClassVar[str] = "rar"
    config_class: ClassVar[type[BaseModel]] = RARConfig

    def __init__(self, config: RARConfig) -> None:
        super().__init__()
        self.config = config
        D, L, V, C = config.hidden, config.seq_len, config.codebook_size, config.num_classes

        def norm(dim: int) -> nn.Module:
            return nn.LayerNorm(dim, eps=config.layer_norm_eps)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.embeddings = nn.Embedding(V + 1 + C + 1, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 2, D))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, L, D))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, L + 2, D))
        self.blocks = nn.ModuleList(
            CausalAdaLNBlock(D, config.heads, Mlp(D, config.mlp_dim, drop=config.dropout), norm,
                             config.attn_dropout, config.dropout)
            for _ in range(config.depth)
        )
        self.adaln_before_head = AdaLNFinalLayer(
            D, nn.LayerNorm(D, eps=config.layer_norm_eps, elementwise_affine=False)
        )
        self.lm_head = nn.Linear(D, V)
        self.apply(lambda m: trunc_normal_init(m, config.init_std))
        for p in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(p, std=config.init_std)
        for m in [*self.blocks, self.adaln_before_head]:
            zero_adaln(m)

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.depth)

    def slot_inputs(
        self, tokens_BN: Tensor, labels_B: Tensor, orders_BL: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Input embeddings and adaLN conditions of the S = N + 2 slots.

        Args:
            tokens_BN: (B, N) int64, the first N tokens in generation order (N <= L).
            labels_B: (B,) int64 class labels (null class allowed).
            orders_BL: (B, L) int64 generation orders (position generated at each step).
        Returns:
            x_BSD (token + absolute + target-aware position embeddings), c_BSD (conditions).
        """
        B, N = tokens_BN.shape
        V = self.config.codebook_size
        e_BSD = self.embeddings(torch.cat([labels_B[:, None] + V + 1, tokens_BN], dim=1))
        x_BSD = torch.cat([self.cls_token.expand(B, -1, -1), e_BSD], dim=1)
        pos_BSD = torch.cat(
            [self.pos_embed[:, :2].expand(B, -1, -1), self.pos_embed[0, 2:][orders_BL[:, :N]]], 1
        )
        zero_B1D = x_BSD.new_zeros(B, 1, x_BSD.shape[-1])
        target_BSD = torch.cat(
            [zero_B1D, self.target_aware_pos_embed[0][orders_BL], zero_B1D], dim=1
        )[:, : N + 2]
        c_BSD = e_BSD[:, :1] + self.timesteps_embeddings[:, : N + 2]
        return x_BSD + pos_BSD + target_BSD, c_BSD

    def _blocks(self, x_BSD: Tensor, c_BSD: Tensor, cache: KVCache | None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x_BSD = block(x_BSD, c_BSD, None if cache is None else cache.layers[i])
        return x_BSD

    def _logits(self, h_BSD: Tensor, c_BSD: Tensor) -> Tensor:
        return self.lm_head(self.adaln_before_head(h_BSD, c_BSD))

    def _check(self, tokens_BN: Tensor, labels_B: Tensor, max_len: int) -> None:
        if tokens_BN.ndim != 2 or tokens_BN.shape[1] > max_len:
            raise ValueError(
                f"RAR expects tokens (B, N) with N <= {max_len}, got {tuple(tokens_BN.shape)}."
            )
        if labels_B.shape != tokens_BN.shape[:1]:
            raise ValueError(
                f"labels must be (B,) = {tuple(tokens_BN.shape[:1])}, got {tuple(labels_B.shape)}."
            )

    def forward(
        self, tokens_BL: Tensor, labels_B: Tensor, orders_BL: Tensor | None = None
    ) -> Tensor:
        """Teacher-forced logits for every position, in position order.

        Args:
            tokens_BL: (B, L) int64 token ids in [0, V), in position (raster) order.
            labels_B: (B,) int64 class labels (null class allowed).
            orders_BL: (B, L) generation orders; None = raster.
        Returns:
            logits_BLV (B, L, V): row p predicts the token at position p from the class and the
            tokens generated before p in the given order.
        """
        B, L = tokens_BL.shape
        if L != self.seq_len:
            raise ValueError(
                f"RAR expects tokens (B, {self.seq_len}), got {tuple(tokens_BL.shape)}."
            )
        self._check(tokens_BL, labels_B, L)
        orders_BL = raster_orders(B, L, tokens_BL.device) if orders_BL is None else orders_BL
        check_orders(orders_BL, B, L)
        x_BSD, c_BSD = self.slot_inputs(tokens_BL.gather(1, orders_BL), labels_B, orders_BL)
        h_BSD = self._blocks(x_BSD, c_BSD, None)
        return unshuffle(self._logits(h_BSD[:, 1 : L + 1], c_BSD[:, 1 : L + 1]), orders_BL)

    def next_token_logits(
        self, tokens_BN: Tensor, labels_B: Tensor, cache: KVCache | None = None
    ) -> Tensor:
        """Logits (B, V) of raster position N given the first N tokens (N < L).

        With a cache, only the slots not cached yet are computed (the first call computes cls,
        condition and any given tokens; later calls typically one slot) and the cache is extended.
        The cache must have been built from the same prefix.
        """
        B, N = tokens_BN.shape
        self._check(tokens_BN, labels_B, self.seq_len - 1)
        start = 0 if cache is None else cache.length
        if start > N + 1:
            raise ValueError(f"KV cache holds {start} slots but only {N + 2} are given.")
        x_BSD, c_BSD = self.slot_inputs(
            tokens_BN, labels_B, raster_orders(B, self.seq_len, tokens_BN.device)
        )
        h_BSD = self._blocks(x_BSD[:, start:], c_BSD[:, start:], cache)
        return self._logits(h_BSD[:, -1], c_BSD[:, -1])


# --------------------------------------------------------------------------------------------------
# Schedules, loss, sampler
# --------------------------------------------------------------------------------------------------


def rar_permutation_prob(
    step: int, anneal_start: int = 125_000, anneal_end: int = 187_500
) -> float:
    """Probability r that a training sample uses a random order (official get_rar_random_ratio).

    1 until `anneal_start`, linear to 0 at `anneal_end`, 0 afterwards.
    """
    if step < anneal_start:
        return 1.0
    if step >= anneal_end:
        return 0.0
    return 1.0 - (step - anneal_start) / (anneal_end - anneal_start)


def sample_orders(
    batch: int, seq_len: int, prob: float, *, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, L) int64 orders: per sample a uniform random permutation w.p. `prob`, else raster."""
    random_BL = torch.rand(batch, seq_len, device=device, generator=generator).argsort(dim=1)
    pick_B = torch.rand(batch, device=device, generator=generator) < prob
    return torch.where(pick_B[:, None], random_BL, raster_orders(batch, seq_len, device))


def rar_loss(
    model: RAR,
    tokens_BL: Tensor,
    labels_B: Tensor,
    step: int,
    *,
    anneal_start: int = 125_000,
    anneal_end: int = 187_500,
    class_drop: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RAR training loss for one batch at optimizer step `step`.

    Each sample gets a random order with probability `rar_permutation_prob(step, ...)` (else
    raster) and the null class with probability `class_drop`; loss = mean next-token CE over all
    B * L predictions (official ARLoss, no label smoothing).

    Args:
        tokens_BL: (B, L) int64 token ids in [0, V), position (raster) order.
        labels_B: (B,) int64 class labels in [0, num_classes).
        generator: torch.Generator on the tokens' device for orders and class drop.
    Returns:
        loss (scalar) and metrics: 'loss', 'accuracy', 'permutation_prob' (all detached).
    """
    B, L = tokens_BL.shape
    dev = tokens_BL.device
    prob = rar_permutation_prob(step, anneal_start, anneal_end)
    orders_BL = sample_orders(B, L, prob, device=dev, generator=generator)
    drop_B = torch.rand(B, device=dev, generator=generator) < class_drop
    labels_B = torch.where(drop_B, model.null_class_id, labels_B)
    logits_BLV = model(tokens_BL, labels_B, orders_BL)
    loss = F.cross_entropy(logits_BLV.transpose(1, 2).float(), tokens_BL)
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "accuracy": (logits_BLV.argmax(-1) == tokens_BL).float().mean(),
            "permutation_prob": torch.tensor(prob, device=dev),
        }
    return loss, metrics


@torch.no_grad()
def sample(
    model: RAR,
    labels_B: Tensor,
    *,
    guidance_scale: float = 16.0,
    guidance_power: float = 2.75,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
) -> Tensor:
    """Raster autoregressive sampling (official RAR.generate).

    At step t: logits = u + s_t (c - u) with s_t = `power_cosine_guidance(t, L, g, p)` (g = 0 or 1
    skips the unconditional pass: conditional logits only); next token ~ softmax(logits / T).
    The model runs in eval mode (restored afterwards).

    Args:
        labels_B: (B,) int64 class labels (the null class gives unconditional samples).
        generator: torch.Generator on the labels' device; fixed seed -> identical tokens.
        use_kv_cache: False recomputes every slot at every step (same result, slower).
    Returns:
        tokens_BL: (B, L) int64 in [0, V).
    """
    if temperature <= 0:
        raise ValueError(f"sample: temperature must be > 0, got {temperature}.")
    was_training = model.training
    model.eval()
    B, L, dev = labels_B.shape[0], model.seq_len, labels_B.device
    use_cfg = guidance_scale not in (0.0, 1.0)
    cond_labels = labels_B
    if use_cfg:
        cond_labels = torch.cat([labels_B, torch.full_like(labels_B, model.null_class_id)])
    cache = model.new_kv_cache() if use_kv_cache else None
    ids_BN = torch.zeros(B, 0, dtype=torch.long, device=dev)
    try:
        for step in range(L):
            inputs = torch.cat([ids_BN, ids_BN]) if use_cfg else ids_BN
            logits_BV = model.next_token_logits(inputs, cond_labels, cache).float()
            if use_cfg:
                cond, uncond = logits_BV.chunk(2)
                scale = power_cosine_guidance(step, L, guidance_scale, guidance_power)
                logits_BV = uncond + scale * (cond - uncond)
            probs_BV = F.softmax(logits_BV / temperature, dim=-1)
            next_B1 = torch.multinomial(probs_BV, 1, generator=generator)
            ids_BN = torch.cat([ids_BN, next_B1], dim=1)
    finally:
        model.train(was_training)
    return ids_BN


def rar_batch_loss(model: RAR, batch: dict[str, Tensor], step: int, **options: Any):
    """Batch-level loss (``tokens`` (B, L), ``label`` (B,)): :func:`rar_loss`."""
    return rar_loss(model, batch["tokens"].long(), batch["label"].long(), step, **options)


# --------------------------------------------------------------------------------------------------
# Released weights
# --------------------------------------------------------------------------------------------------


def _resolve_config(config_or_size: RARConfig | str) -> tuple[RARConfig, str]:
    if isinstance(config_or_size, RARConfig):
        return config_or_size, "custom config"
    name = config_or_size.replace("-", "_")
    size = RAR_RELEASES.get(name.lower(), config_or_size)
    return rar_config(size), config_or_size


def load_official(
    source: str | Path | Mapping[str, Tensor], config_or_size: RARConfig | str
) -> RAR:
    """Build `config_or_size` and load a released RAR checkpoint into it, strictly; eval mode.

    Args:
        source: a `.safetensors` file or a state dict with the released names (official
            bytedance/1d-tokenizer@942a96f `modeling/rar.py` RAR; pickles are refused, see
            `read_state_dict`). Meta tensors work when the model is built on meta.
        config_or_size: an `RAR_SIZES` name ("B", "L", "XL", "XXL"), a release name ("rar_b",
            "rar-xl", ...) or a config.
    Every model tensor must come from the checkpoint and every released tensor is used
    (`official_key_map`; the table rows it drops are listed in `OFFICIAL_DROPPED`). Raises
    ValueError naming the first released key that is foreign, missing or of the wrong shape
    (with the shape this config expects).
    """
    config, label = _resolve_config(config_or_size)
    what = f"rar.load_official({label})"
    released = read_state_dict(source, what=what)
    try:
        state = official_key_map(released)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    seq_len = released_seq_len(released)
    model = RAR(config)
    expected = model.state_dict()
    for key, want in expected.items():
        shape = released_shape(key, tuple(want.shape), config.seq_len)
        if key not in state:
            raise ValueError(f"{what}: the checkpoint has no '{key}' (expected shape {shape}); "
                             "it does not match this size (check depth).")
        got = tuple(state[key].shape)
        if got != tuple(want.shape):
            raise ValueError(
                f"{what}: '{key}' has shape {released_shape(key, got, seq_len)} in the checkpoint "
                f"but this config expects {shape} (hidden={config.hidden}, heads={config.heads}, "
                f"mlp_dim={config.mlp_dim}, seq_len={config.seq_len}, codebook_size="
                f"{config.codebook_size}, num_classes={config.num_classes})."
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{what}: checkpoint key '{extra[0]}' has no place in this config "
                         f"({len(extra)} such keys; check depth).")
    load_mapped_state_dict(model, state, {k: k for k in state}, what=what)
    return model.eval()


SPEC = FamilySpec(
    name="rar", role="generator", config_class=RARConfig, sizes=RAR_SIZES, model_class=RAR,
    data="id_tokens", data_fields=("codebook_size", "seq_len", "num_classes"),
    loss=rar_batch_loss, conditioning="labels", sampler=sample, output="tokens",
    sampling=RAR_SAMPLING, load_official=load_official,
    summary="RAR: randomized-order autoregression with target-aware positions, annealed to raster",
)
