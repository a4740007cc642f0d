"""MaskBit lookup-free quantization (LFQ): bit tokens from a VQGAN+ conv autoencoder.

Spec: methods.md §1.3; reference: markweberdev/maskbit `modeling/quantizer/lookup_free.py`,
`modeling/modules/autoencoder.py`, `modeling/modules/losses.py` (entropy annealing).

Encoder -> K channels -> sign(z) in {-1,+1} (straight-through) -> decoder. Each spatial position is
one token of K bits; its index is sum_k [bit_k] * 2**k (LSB first), so the implicit codebook is all
2**K sign vectors and never has to be stored. These bit conventions live in `kernels.lfq`: the
quantizer calls its `lfq_quantize` (signs with the straight-through gradient, bits, indices; the
fused Triton kernel on CUDA, its PyTorch reference elsewhere), and `bits_to_indices` /
`indices_to_bits` are its helpers, re-exported here. The entropy losses stay in this module.

Shape legend: B batch, C image channels, H/W image size, h/w token grid, K bits per token,
D conv channels, N = B*h*w flattened tokens, V = 2**K implicit codes.

Deviations from the official code, on purpose:
- Entropies are exact Shannon entropies (nats) instead of `-sum p*log(p + 1e-5)`.
- The per-sample entropy is computed in closed form (the softmax over all 2**K codes factorises into
  K independent bits), and the entropy of the batch-mean distribution is computed over the codebook
  in chunks of `entropy_chunk_size` codes with a hand-written backward, so memory stays O(N * chunk)
  for any K (the official code materialises an N x 2**K matrix). Both are exact, not approximations.
- Only when asked: `shortcut="input"`. The default `shortcut="official"` (every registered size)
  builds the official channel-changing residual block exactly: `nin_shortcut`, a bias-free
  (out, out) 1x1 conv on the block OUTPUT (the block returns h + W h; its input reaches the output
  only through the conv branch), so released MaskBit checkpoints load by a pure rename
  (maskbit_keys.py). `shortcut="input"` is the textbook projection instead: `shortcut`, an
  (out, in) 1x1 conv on the block INPUT (W x + h). It is what this module built before the field
  existed, so a checkpoint saved then needs `"shortcut": "input"` added to its config.json. Blocks
  that keep the channel count are x + h in both modes.
- GroupNorm's group count is configurable (`norm_groups`, official: 32) so tiny models can exist.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kernels.lfq import MAX_TOKEN_BITS, bits_to_indices, indices_to_bits, lfq_quantize
from vgen_core.families import FamilySpec, sized_config

__all__ = [
    "LFQ_SIZES",
    "LFQConfig",
    "LFQTokenizer",
    "LookupFreeQuantizer",
    "avg_entropy",
    "bits_to_indices",
    "entropy_anneal_multiplier",
    "indices_to_bits",
    "lfq_config",
    "pack_bits",
    "per_sample_entropy",
    "unpack_bits",
]

# --------------------------------------------------------------------------------------------------
# Pure bit helpers
# --------------------------------------------------------------------------------------------------

# bits_to_indices / indices_to_bits (the LSB-first index convention) are kernels.lfq's, imported
# above and re-exported. pack_bits / unpack_bits are the numpy storage codec in the byte order of
# the kernel's `packed` output, for any K and numpy or CPU tensors; kernels.lfq has no equivalent.


def pack_bits(bits_NK: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Pack (..., K) bool bits into (..., ceil(K/8)) uint8 bytes, little-endian bit order.

    Bit k goes to byte k // 8 at bit position k % 8 (LSB first), the same order as the token index:
    for K <= 8 the byte equals the index, for K <= 16 the bytes read as a little-endian uint16 do.
    A torch tensor in gives a (CPU) torch tensor out; a numpy array in gives numpy out.
    """
    is_torch = isinstance(bits_NK, Tensor)
    arr = bits_NK.detach().cpu().numpy() if isinstance(bits_NK, Tensor) else np.asarray(bits_NK)
    if arr.dtype != np.bool_:
        raise TypeError(f"pack_bits: expected bool bits, got dtype {arr.dtype}.")
    if arr.ndim == 0 or arr.shape[-1] == 0:
        raise ValueError(f"pack_bits: expected shape (..., K) with K >= 1, got {arr.shape}.")
    packed = np.packbits(arr, axis=-1, bitorder="little")
    return torch.from_numpy(packed) if is_torch else packed


def unpack_bits(packed_NB: np.ndarray | Tensor, token_bits: int) -> np.ndarray | Tensor:
    """Inverse of `pack_bits`: (..., ceil(K/8)) uint8 -> (..., K) bool (same array type as in)."""
    is_torch = isinstance(packed_NB, Tensor)
    arr = (packed_NB.detach().cpu().numpy() if isinstance(packed_NB, Tensor)
           else np.asarray(packed_NB))
    if arr.dtype != np.uint8:
        raise TypeError(f"unpack_bits: expected uint8 bytes, got dtype {arr.dtype}.")
    n_bytes = (token_bits + 7) // 8
    if token_bits < 1 or arr.ndim == 0 or arr.shape[-1] != n_bytes:
        raise ValueError(
            f"unpack_bits: {token_bits} bits need a last axis of {n_bytes} bytes, got shape "
            f"{arr.shape}; pass the K used by pack_bits."
        )
    bits = np.unpackbits(arr, axis=-1, count=token_bits, bitorder="little").astype(bool)
    return torch.from_numpy(bits) if is_torch else bits


def entropy_anneal_multiplier(step: int, factor: float = 2.0, anneal_steps: int = 2000) -> float:
    """Multiplier on the entropy loss: 1 + factor * max(0, 1 - step / anneal_steps).

    MaskBit adds an extra `factor` x entropy term that decays linearly to 0 over the first
    `anneal_steps` optimizer steps (losses.py `entropy_annealing_factor/steps`).
    """
    if anneal_steps <= 0 or factor == 0.0:
        return 1.0
    return 1.0 + factor * max(0.0, 1.0 - step / anneal_steps)


# --------------------------------------------------------------------------------------------------
# Entropy terms over the implicit codebook
# --------------------------------------------------------------------------------------------------


def _code_log_probs(z_NK: Tensor, codes01_VK: Tensor, temperature: float) -> Tensor:
    """log softmax_c(2 z.c / T) for the codes given as {0,1} bits -> (N, V).

    The softmax over {-1,+1}^K factorises: P(c | z) = prod_k sigmoid(4 z_k c_k / T), hence
    log P = sum_k b_k * 4 z_k / T + sum_k logsigmoid(-4 z_k / T) with b = (c + 1) / 2.
    """
    x_NK = z_NK * (4.0 / temperature)
    return x_NK @ codes01_VK.T + F.logsigmoid(-x_NK).sum(-1, keepdim=True)


def _codes01(start: int, stop: int, token_bits: int, like: Tensor) -> Tensor:
    """{0,1} bits of codes [start, stop) -> (stop - start, K) in the dtype/device of `like`."""
    idx_V = torch.arange(start, stop, device=like.device)
    return indices_to_bits(idx_V, token_bits).to(like.dtype)


def per_sample_entropy(z_NK: Tensor, temperature: float) -> Tensor:
    """Mean over tokens of H(softmax_c(2 z.c / T)) over all 2**K codes, in nats (exact, O(N K)).

    Because the distribution is a product of K independent bits with P(bit_k) = sigmoid(4 z_k / T),
    its entropy is the sum of the K binary entropies.
    """
    x_NK = z_NK * (4.0 / temperature)
    p_NK = torch.sigmoid(x_NK)
    h_NK = -(p_NK * F.logsigmoid(x_NK) + (1.0 - p_NK) * F.logsigmoid(-x_NK))
    return h_NK.sum(-1).mean()


def _avg_entropy_dense(z_NK: Tensor, temperature: float) -> Tensor:
    """Entropy of the batch-mean code distribution, materialising (N, 2**K). Reference path."""
    K = z_NK.shape[-1]
    logp_NV = _code_log_probs(z_NK, _codes01(0, 1 << K, K, z_NK), temperature)
    avg_V = logp_NV.exp().mean(0)
    return -(avg_V * avg_V.clamp_min(torch.finfo(avg_V.dtype).tiny).log()).sum()


class _AvgEntropyChunked(torch.autograd.Function):
    """H(mean_n softmax_c(2 z_n.c / T)) over codes in chunks; memory O(N * chunk + 2**K).

    Backward (a = batch-mean distribution, g_c = -log a_c, m_nk = E_p[c_k] = tanh(2 z_nk / T)):
        dH/dz_nk = 2 / (N T) * (sum_c p_nc g_c c_k - m_nk * sum_c p_nc g_c)
    computed with a second pass over the same chunks.
    """

    @staticmethod
    def forward(
        ctx: Any, z_NK: Tensor, temperature: float, chunk_size: int
    ) -> Tensor:
        N, K = z_NK.shape
        V = 1 << K
        avg_V = torch.empty(V, dtype=z_NK.dtype, device=z_NK.device)
        for start in range(0, V, chunk_size):
            stop = min(start + chunk_size, V)
            logp_NC = _code_log_probs(z_NK, _codes01(start, stop, K, z_NK), temperature)
            avg_V[start:stop] = logp_NC.exp().mean(0)
        log_avg_V = avg_V.clamp_min(torch.finfo(avg_V.dtype).tiny).log()
        ctx.save_for_backward(z_NK, log_avg_V)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return -(avg_V * log_avg_V).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        z_NK, log_avg_V = ctx.saved_tensors
        T, chunk_size = ctx.temperature, ctx.chunk_size
        N, K = z_NK.shape
        g_V = -log_avg_V
        e_N = torch.zeros(N, dtype=z_NK.dtype, device=z_NK.device)
        s_NK = torch.zeros_like(z_NK)
        for start in range(0, g_V.numel(), chunk_size):
            stop = min(start + chunk_size, g_V.numel())
            codes01_CK = _codes01(start, stop, K, z_NK)
            pg_NC = _code_log_probs(z_NK, codes01_CK, T).exp() * g_V[start:stop]
            e_N += pg_NC.sum(-1)
            s_NK += pg_NC @ (2.0 * codes01_CK - 1.0)
        m_NK = torch.tanh(z_NK * (2.0 / T))
        grad_NK = (2.0 / (N * T)) * (s_NK - e_N[:, None] * m_NK)
        return grad_out * grad_NK, None, None


def avg_entropy(z_NK: Tensor, temperature: float, chunk_size: int = 4096) -> Tensor:
    """Entropy (nats) of the batch-mean distribution over all 2**K codes; exact for any K.

    Uses plain autograd over the full (N, 2**K) matrix when 2**K <= chunk_size, otherwise the
    chunked function with a hand-written backward (memory O(N * chunk_size)).
    """
    if (1 << z_NK.shape[-1]) <= chunk_size:
        return _avg_entropy_dense(z_NK, temperature)
    return _AvgEntropyChunked.apply(z_NK, temperature, chunk_size)


# --------------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------------


class LookupFreeQuantizer(nn.Module):
    """sign(z) quantizer with an implicit {-1,+1}^K codebook, commitment and entropy losses.

    Loss terms (weights from methods.md §1.3):
        commitment = commitment_weight * mean((sg(q) - z)**2)
        entropy    = entropy_weight * (per-sample entropy - gamma * entropy of the batch mean)
    over softmax_c(2 z.c / temperature). As in the official code the entropy term is computed only
    in training mode (it is 0 in eval mode) and over the local batch (no cross-device gather).
    """

    def __init__(
        self,
        token_bits: int,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.02,
        entropy_gamma: float = 1.0,
        entropy_temperature: float = 0.01,
        entropy_chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        if not 1 <= token_bits <= MAX_TOKEN_BITS:
            raise ValueError(
                f"LookupFreeQuantizer: token_bits must be in [1, {MAX_TOKEN_BITS}] (kernels.lfq), "
                f"got {token_bits}."
            )
        self.token_bits = token_bits
        self.codebook_size = 1 << token_bits
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.entropy_gamma = entropy_gamma
        self.entropy_temperature = entropy_temperature
        self.entropy_chunk_size = entropy_chunk_size

    def forward(self, z_BKhw: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Quantize encoder output.

        Args:
            z_BKhw: (B, K, h, w) pre-quantization features.
        Returns:
            quantized_BKhw: (B, K, h, w) in {-1,+1}, gradient passed straight through to z.
            bits_BhwK: (B, h, w, K) bool, bit k set iff z_k > 0.
            indices_Bhw: (B, h, w) int64 code indices (LSB first).
            losses: 'commitment', 'entropy' (weighted), 'per_sample_entropy', 'avg_entropy' (nats).
        """
        if z_BKhw.ndim != 4 or z_BKhw.shape[1] != self.token_bits:
            raise ValueError(
                f"LookupFreeQuantizer expects (B, {self.token_bits}, h, w), "
                f"got {tuple(z_BKhw.shape)}."
            )
        B, _, h, w = z_BKhw.shape
        z_BNK = z_BKhw.flatten(2).transpose(1, 2)  # (B, h*w, K) view: the kernel reads it in place
        out = lfq_quantize(z_BNK, self.entropy_temperature)  # signs come back in z's layout
        quantized_BKhw = out.signs.transpose(1, 2).unflatten(2, (h, w))
        bits_BhwK = out.signs.detach().unflatten(1, (h, w)) > 0
        indices_Bhw = out.indices.view(B, h, w)

        # Gradients reach z as (straight-through + entropy) + commitment: the entropy reads z_BNK,
        # the commitment z_BKhw. That is the summation order from before this used kernels.lfq,
        # so training is unchanged bit for bit.
        commitment = self.commitment_weight * torch.mean((quantized_BKhw.detach() - z_BKhw) ** 2)
        zero = z_BKhw.new_zeros((), dtype=torch.float32)
        ent_ps, ent_avg, entropy = zero, zero, zero
        if self.training and self.entropy_weight != 0.0:
            z_NK = z_BNK.reshape(-1, self.token_bits).float()
            ent_ps = per_sample_entropy(z_NK, self.entropy_temperature)
            ent_avg = avg_entropy(z_NK, self.entropy_temperature, self.entropy_chunk_size)
            entropy = self.entropy_weight * (ent_ps - self.entropy_gamma * ent_avg)

        losses = {
            "commitment": commitment,
            "entropy": entropy,
            "per_sample_entropy": ent_ps.detach(),
            "avg_entropy": ent_avg.detach(),
        }
        return quantized_BKhw.contiguous(), bits_BhwK, indices_Bhw, losses


# --------------------------------------------------------------------------------------------------
# Config and size registry
# --------------------------------------------------------------------------------------------------


class LFQConfig(BaseModel):
    """LFQ tokenizer config; `build()` makes the model. Defaults = MaskBit 12-bit tokenizer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    in_channels: int = Field(3, ge=1)
    hidden: int = Field(128, ge=1)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = Field(2, ge=0)
    token_bits: int = Field(12, ge=1, le=30)
    norm_groups: int = Field(32, ge=1)
    sample_with_conv: bool = True
    # Channel-changing residual skip (see `_ResBlock`): "official" = MaskBit's (out, out) conv on
    # the block output (loads released checkpoints), "input" = (out, in) conv on the block input.
    shortcut: Literal["official", "input"] = "official"
    commitment_weight: float = Field(0.25, ge=0.0)
    entropy_weight: float = 0.02
    entropy_gamma: float = 1.0
    entropy_temperature: float = Field(0.01, gt=0.0)
    entropy_anneal_factor: float = Field(2.0, ge=0.0)
    entropy_anneal_steps: int = Field(2000, ge=0)
    entropy_chunk_size: int = Field(4096, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LFQConfig:
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(
                f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}."
            )
        for m in self.ch_mult:
            if (self.hidden * m) % self.norm_groups:
                raise ValueError(
                    f"hidden*ch_mult = {self.hidden * m} channels is not divisible by "
                    f"norm_groups={self.norm_groups}; pick hidden/norm_groups so every level "
                    "divides."
                )
        return self

    @property
    def downsample_factor(self) -> int:
        """Image pixels per token along each axis: 2 ** (len(ch_mult) - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return 1 << self.token_bits

    def build(self) -> LFQTokenizer:
        return LFQTokenizer(self)


_MASKBIT = dict(hidden=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, norm_groups=32)

LFQ_SIZES: dict[str, LFQConfig] = {
    # CPU-test size: 32x32 images -> 8x8 tokens of 8 bits, ~0.15M params. Official shortcut like
    # the MaskBit sizes: on the 150-step golden curve (tests/unit/test_lfq.py, seeds 0-4) it ends at
    # eval MSE 0.011-0.023 vs 0.011-0.019 for "input", well inside that test's 0.05 bound, so the
    # CPU tests exercise the same block as the released weights.
    "tiny": LFQConfig(hidden=16, ch_mult=(1, 2, 2), num_res_blocks=1, token_bits=8, norm_groups=8),
    # MaskBit tokenizers (configs/tokenizer/maskbit_tokenizer_{K}bit.yaml): 256px -> 16x16 tokens.
    **{f"maskbit-k{k}": LFQConfig(token_bits=k, **_MASKBIT) for k in (10, 12, 14, 16, 18)},
}


lfq_config = sized_config("LFQ", LFQConfig, LFQ_SIZES)


# --------------------------------------------------------------------------------------------------
# VQGAN+ conv autoencoder
# --------------------------------------------------------------------------------------------------


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus a skip; the skip differs only when c_in != c_out.

    shortcut="official" (MaskBit `ResidualBlock`): `nin_shortcut`, a bias-free (c_out, c_out) 1x1
    conv applied to the residual-branch OUTPUT h, so the block returns h + W h and its input
    reaches the output only through the conv branch. shortcut="input": `shortcut`, a bias-free
    (c_out, c_in) 1x1 conv on the block INPUT x, returning W x + h (the usual ResNet projection).
    With c_in == c_out both return x + h and hold the same parameters.
    """

    def __init__(self, c_in: int, c_out: int, groups: int, shortcut: str = "official") -> None:
        super().__init__()
        if shortcut not in ("official", "input"):
            raise ValueError(
                f"_ResBlock: shortcut must be 'official' or 'input', got {shortcut!r}."
            )
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.nin_shortcut: nn.Module | None = None
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out and shortcut == "official":
            self.nin_shortcut = nn.Conv2d(c_out, c_out, 1, bias=False)
        elif c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x_BDHW: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x_BDHW)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            return h + self.nin_shortcut(h)
        return self.shortcut(x_BDHW) + h


def _res_stage(c_in: int, c_out: int, cfg: LFQConfig) -> nn.Sequential:
    return nn.Sequential(
        *[
            _ResBlock(c_in if i == 0 else c_out, c_out, cfg.norm_groups, cfg.shortcut)
            for i in range(cfg.num_res_blocks)
        ]
    )


class _Downsample(nn.Module):
    """3x3 stride-2 conv with TF 'SAME' padding (pad right/bottom by 1), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x_BDHW: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x_BDHW, 2)
        return self.conv(F.pad(x_BDHW, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BDHW: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BDHW, scale_factor=2.0, mode="nearest"))


def _encoder(cfg: LFQConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.hidden, 3, padding=1, bias=False)]
    c = cfg.hidden
    for level, mult in enumerate(cfg.ch_mult):
        c_out = cfg.hidden * mult
        layers.append(_res_stage(c, c_out, cfg))
        c = c_out
        if level < len(cfg.ch_mult) - 1:
            layers.append(_Downsample(c, cfg.sample_with_conv))
    layers += [
        _res_stage(c, c, cfg),  # middle
        nn.GroupNorm(cfg.norm_groups, c, eps=1e-6),
        nn.SiLU(),
        nn.Conv2d(c, cfg.token_bits, 1),
    ]
    return nn.Sequential(*layers)


def _decoder(cfg: LFQConfig) -> nn.Sequential:
    c = cfg.hidden * cfg.ch_mult[-1]
    layers: list[nn.Module] = [
        nn.Conv2d(cfg.token_bits, c, 3, padding=1),
        _res_stage(c, c, cfg),  # middle
    ]
    for level in reversed(range(len(cfg.ch_mult))):
        c_out = cfg.hidden * cfg.ch_mult[level]
        layers.append(_res_stage(c, c_out, cfg))
        c = c_out
        if level > 0:
            layers.append(_Upsample(c))
    layers += [
        nn.GroupNorm(cfg.norm_groups, c, eps=1e-6),
        nn.SiLU(),
        nn.Conv2d(c, cfg.in_channels, 3, padding=1),
    ]
    return nn.Sequential(*layers)


class LFQTokenizer(nn.Module):
    """MaskBit LFQ tokenizer: images (B, C, H, W) in [0, 1] <-> bit tokens (B, H/f, W/f, K).

    The decoder output is unbounded (no tanh, as in the official code); clamp to [0, 1] for
    display.
    Reconstruction, perceptual and GAN losses belong to the training step, not to this module.
    """

    family: ClassVar[str] = "lfq"
    config_class: ClassVar[type[BaseModel]] = LFQConfig

    def __init__(self, config: LFQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.quantizer = LookupFreeQuantizer(
            config.token_bits,
            commitment_weight=config.commitment_weight,
            entropy_weight=config.entropy_weight,
            entropy_gamma=config.entropy_gamma,
            entropy_temperature=config.entropy_temperature,
            entropy_chunk_size=config.entropy_chunk_size,
        )
        self.decoder = _decoder(config)

    @property
    def token_bits(self) -> int:
        return self.config.token_bits

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def encode(self, images_BCHW: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Images (B, C, H, W) in [0, 1] -> (quantized_BKhw, bits_BhwK, indices_Bhw, losses).

        bits_BhwK is bool, indices_Bhw int64. H and W must be multiples of
        `config.downsample_factor`; h = H / f, w = W / f.
        `losses` holds the quantizer terms (see `LookupFreeQuantizer.forward`).
        """
        f = self.config.downsample_factor
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != self.config.in_channels:
            raise ValueError(
                f"encode expects (B, {self.config.in_channels}, H, W), "
                f"got {tuple(images_BCHW.shape)}."
            )
        if images_BCHW.shape[-2] % f or images_BCHW.shape[-1] % f:
            raise ValueError(
                f"encode: image size {tuple(images_BCHW.shape[-2:])} is not a multiple of the "
                f"downsample factor {f}; resize or crop the images first."
            )
        return self.quantizer(self.encoder(images_BCHW))

    def decode(self, quantized_BKhw: Tensor) -> Tensor:
        """Quantized (or any real) (B, K, h, w) -> images (B, C, h*f, w*f)."""
        return self.decoder(quantized_BKhw)

    def decode_bits(self, bits_BhwK: Tensor) -> Tensor:
        """Bool bits (B, h, w, K) -> images (B, C, h*f, w*f)."""
        if bits_BhwK.dtype != torch.bool or bits_BhwK.shape[-1] != self.token_bits:
            raise ValueError(
                f"decode_bits expects bool (B, h, w, {self.token_bits}), got "
                f"{bits_BhwK.dtype} {tuple(bits_BhwK.shape)}."
            )
        dtype = next(self.parameters()).dtype
        signs_BhwK = bits_BhwK.to(dtype) * 2.0 - 1.0
        return self.decode(signs_BhwK.permute(0, 3, 1, 2).contiguous())

    def decode_indices(self, indices_Bhw: Tensor) -> Tensor:
        """int64 indices (B, h, w) in [0, 2**K) -> images (B, C, h*f, w*f)."""
        return self.decode_bits(indices_to_bits(indices_Bhw, self.token_bits))

    def forward(self, images_BCHW: Tensor, step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruct images; `step` (optimizer step) drives the entropy-loss annealing.

        Returns:
            recon_BCHW: (B, C, H, W).
            losses: quantizer terms plus 'total_quant' = commitment + multiplier * entropy, where
                multiplier = 1 + entropy_anneal_factor * max(0, 1 - step / entropy_anneal_steps),
                and 'entropy_multiplier'.
        """
        quantized_BKhw, _, _, losses = self.encode(images_BCHW)
        mult = entropy_anneal_multiplier(
            step, self.config.entropy_anneal_factor, self.config.entropy_anneal_steps
        )
        losses["total_quant"] = losses["commitment"] + mult * losses["entropy"]
        losses["entropy_multiplier"] = losses["commitment"].new_tensor(mult).detach()
        return self.decode(quantized_BKhw), losses



# --------------------------------------------------------------------------------------------------
# Family spec
# --------------------------------------------------------------------------------------------------


#: SPEC.pixel_range (typed as str for the loss): official MaskBit trains and evaluates on [0, 1]
#: images (data/webdataset_reader.py: ToTensor, no Normalize; scripts/eval_tokenizer.py clamps
#: reconstructions to [0, 1]), so released weights and vgen-trained ones both take "unit"
_PIXEL_RANGE = "unit"


def lfq_loss(model: LFQTokenizer, batch: dict[str, Tensor], step: int, **_: Any):
    """Training loss on curated images (uint8 ``image`` (B, H, W, 3)): MSE in the family's pixel
    range ([0, 1], as tokenize/evaluate feed it) plus the quantizer's commitment + annealed
    entropy terms."""
    from vgen_core.families import to_model_pixels

    images = to_model_pixels(batch["image"], _PIXEL_RANGE)
    recon, losses = model(images, step=step)
    mse = F.mse_loss(recon, images)
    total = mse + losses["total_quant"]
    return total, {"mse": mse.detach(), "commitment": losses["commitment"].detach(),
                   "entropy": losses["entropy"].detach()}


def _encode(model: LFQTokenizer, x_BCHW: Tensor) -> dict[str, Tensor]:
    _, bits_BhwK, indices_Bhw, _ = model.encode(x_BCHW)
    return {"bits": bits_BhwK, "indices": indices_Bhw}


def _decode(model: LFQTokenizer, tokens: Tensor, grid_hw: tuple[int, int] | None) -> Tensor:
    if grid_hw is None:
        raise ValueError("LFQ decoding needs the token grid (grid_h, grid_w) of the side table")
    return model.decode_indices(tokens.view(-1, *grid_hw))


def _load_official(path: Any, config: LFQConfig) -> LFQTokenizer:
    from vgen_core.tokenizers.maskbit_keys import load_official_maskbit

    return load_official_maskbit(path, config)


SPEC = FamilySpec(
    name="lfq", role="tokenizer", config_class=LFQConfig, sizes=LFQ_SIZES,
    model_class=LFQTokenizer, data="images", loss=lfq_loss, produces=("bit_tokens",),
    pixel_range=_PIXEL_RANGE, encode=_encode, decode=_decode, load_official=_load_official,
    resolution_free=True, default_for=("tokenize.lfq", "train.tokenizer", "evaluate.tokenizer"),
    summary="MaskBit lookup-free quantization: K sign bits per conv-grid position",
)
