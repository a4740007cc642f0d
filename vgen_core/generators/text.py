"""Byte-level text tokenizer and a CLIP-style causal text encoder, built here (nothing downloaded).

Spec: methods.md §2.2 (MaskGen conditions on CLIP ViT-L/14 text features: the *penultimate*
layer's 77 tokens as context, the pooled EOT vector for adaLN); reference: open_clip
`TextTransformer` (token + learned position embeddings, causal mask, pre-norm residual blocks,
`ln_final`, pooling at the end-of-text token, `text_projection`) as called by bytedance/1d-tokenizer
`modeling/maskgen.py::open_clip_text_encoding`.

Deviations from CLIP, on purpose: the tokenizer is byte level (UTF-8 bytes 0..255 plus BOS, EOS
and PAD ids, 259 in all) instead of CLIP's 49,408 BPE merges, so no vocabulary file is needed; the
pooled token is found as the (only) EOS id rather than by `argmax` over ids; GELU, not QuickGELU.
OpenAI CLIP weights therefore do not load into it; it is trained (or frozen at random init) here.

Shape legend: B batch, T context length (77), E width.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from vgen_core.families import FamilySpec, sized_config
from vgen_core.generators.common import attention

__all__ = [
    "BOS_ID",
    "CONTEXT_LEN",
    "EOS_ID",
    "PAD_ID",
    "TEXT_ENCODER_SIZES",
    "TEXT_VOCAB_SIZE",
    "TextEncoder",
    "TextEncoderConfig",
    "decode_text",
    "encode_text",
    "text_encoder_config",
]

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
TEXT_VOCAB_SIZE = 259
CONTEXT_LEN = 77


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _truncate_utf8(data: bytes, limit: int) -> bytes:
    """Longest prefix of `data` with at most `limit` bytes that ends on a character boundary."""
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] continues a multi-byte character
        cut -= 1
    return data[:cut]


def encode_text(captions: list[str], max_len: int = CONTEXT_LEN) -> Tensor:
    """Captions -> int64 ids (B, max_len): [BOS, UTF-8 bytes..., EOS, PAD...].

    A caption longer than max_len - 2 bytes is truncated to the longest prefix of whole characters
    that fits, so every row holds exactly one BOS and one EOS and decodes to a prefix of its text.
    """
    if isinstance(captions, str):
        raise TypeError("encode_text: expected a list of captions, got a single str; wrap it.")
    if max_len < 2:
        raise ValueError(f"encode_text: max_len must be >= 2 (BOS + EOS), got {max_len}.")
    ids = torch.full((len(captions), max_len), PAD_ID, dtype=torch.int64)
    for i, caption in enumerate(captions):
        data = _truncate_utf8(caption.encode("utf-8"), max_len - 2)
        row = [BOS_ID, *data, EOS_ID]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return ids


def decode_text(ids_BT: Tensor) -> list[str]:
    """Inverse of `encode_text`: the bytes between BOS and the first EOS, decoded as UTF-8."""
    out = []
    for row in ids_BT.tolist():
        start = 1 if row and row[0] == BOS_ID else 0
        end = row.index(EOS_ID) if EOS_ID in row else len(row)
        out.append(bytes(t for t in row[start:end] if t < 256).decode("utf-8", errors="replace"))
    return out


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


class TextEncoderConfig(BaseModel):
    """CLIP-style causal text transformer; `build()` makes the model. Defaults = CLIP-L text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    context_len: int = Field(CONTEXT_LEN, ge=2)
    width: int = Field(768, ge=1)
    layers: int = Field(12, ge=1)
    heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    layer_norm_eps: float = Field(1e-5, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> TextEncoderConfig:
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}.")
        return self

    def build(self) -> TextEncoder:
        return TextEncoder(self)


TEXT_ENCODER_SIZES: dict[str, TextEncoderConfig] = {
    # CPU-test size.
    "tiny": TextEncoderConfig(width=32, layers=2, heads=2),
    # open_clip ViT-L-14 text tower: 768 wide, 12 layers, 12 heads, MLP 3072, 77 tokens.
    "clip-l": TextEncoderConfig(width=768, layers=12, heads=12),
}


text_encoder_config = sized_config("text encoder", TextEncoderConfig, TEXT_ENCODER_SIZES)


class _CausalBlock(nn.Module):
    """open_clip ResidualAttentionBlock with the causal mask: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(cfg.width * cfg.mlp_ratio), cfg.width)

    def forward(self, x_BTE: Tensor) -> Tensor:
        B, T, E = x_BTE.shape
        qkv = self.qkv(self.ln_1(x_BTE)).view(B, T, 3, self.heads, E // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a_BTE = attention(q, k, v, causal=True).transpose(1, 2)
        x_BTE = x_BTE + self.proj(a_BTE.reshape(B, T, E))
        return x_BTE + self.fc2(F.gelu(self.fc1(self.ln_2(x_BTE))))


class TextEncoder(nn.Module):
    """Byte ids (B, T) -> (penultimate-layer tokens (B, T, E), pooled EOS vector (B, E)).

    As MaskGen uses CLIP: the context tokens are the residual stream after all but the last block
    (no final LayerNorm); the pooled vector is `text_projection(ln_final(last block output))` at the
    EOS position.
    """

    family: ClassVar[str] = "byte_clip_text"
    config_class: ClassVar[type[BaseModel]] = TextEncoderConfig

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        E = config.width
        self.token_embedding = nn.Embedding(TEXT_VOCAB_SIZE, E)
        self.positional_embedding = nn.Parameter(torch.zeros(config.context_len, E))
        self.blocks = nn.ModuleList([_CausalBlock(config) for _ in range(config.layers)])
        self.ln_final = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(E, E, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """open_clip TextTransformer.init_parameters."""
        E, n = self.config.width, self.config.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = E**-0.5 * (2 * n) ** -0.5, E**-0.5, (2 * E) ** -0.5
        for blk in self.blocks:
            assert isinstance(blk, _CausalBlock)  # self.blocks holds only these
            for lin, std in ((blk.qkv, attn_std), (blk.proj, proj_std), (blk.fc1, fc_std),
                             (blk.fc2, proj_std)):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.text_projection.weight, std=E**-0.5)

    @property
    def width(self) -> int:
        return self.config.width

    def forward(self, ids_BT: Tensor) -> tuple[Tensor, Tensor]:
        """ids_BT (B, T) int64 from `encode_text` (T = context_len, one EOS per row)."""
        if ids_BT.ndim != 2 or ids_BT.shape[1] != self.config.context_len:
            raise ValueError(
                f"TextEncoder expects ids (B, {self.config.context_len}), got "
                f"{tuple(ids_BT.shape)}; build them with encode_text(captions, "
                f"max_len={self.config.context_len})."
            )
        is_eos_BT = ids_BT == EOS_ID
        if not bool(is_eos_BT.any(-1).all()):
            raise ValueError("TextEncoder: every row needs an EOS id; use encode_text.")
        x_BTE = self.token_embedding(ids_BT) + self.positional_embedding
        for blk in self.blocks[:-1]:
            x_BTE = blk(x_BTE)
        penultimate_BTE = x_BTE
        last_BTE = self.ln_final(self.blocks[-1](x_BTE))
        eos_B = is_eos_BT.int().argmax(-1)
        pooled_BE = self.text_projection(last_BTE[torch.arange(ids_BT.shape[0]), eos_B])
        return penultimate_BTE, pooled_BE

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Convenience: `encode_text` then forward, on this module's device."""
        ids = encode_text(captions, self.config.context_len).to(self.positional_embedding.device)
        return self(ids)




SPEC = FamilySpec(
    name="byte_clip_text", role="component", config_class=TextEncoderConfig,
    sizes=TEXT_ENCODER_SIZES, model_class=TextEncoder,
    summary="byte-level CLIP-style text encoder (MaskGen's text conditioning)",
)
