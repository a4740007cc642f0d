"""Pre-norm ViT block shared by the ViT-based tokenizers (TiTok, BAR's FSQ decoder).

Parameter names follow timm / open_clip after the key maps: ``norm1``, ``attn.qkv`` (q, k, v row
blocks, as ``nn.MultiheadAttention.in_proj_weight``), ``attn.proj``, ``norm2``, ``mlp.fc1``,
``mlp.fc2``. Shapes: x_BSW = (batch, sequence, width).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "MLP", "Block"]


class Attention(nn.Module):
    """Self-attention with the `nn.MultiheadAttention` parameter layout (q, k, v row blocks)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BSW: Tensor) -> Tensor:
        B, S, W = x_BSW.shape
        q, k, v = self.qkv(x_BSW).view(B, S, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a_BHSd = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a_BHSd.transpose(1, 2).reshape(B, S, W))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block (open_clip ResidualAttentionBlock): x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x_BSW: Tensor) -> Tensor:
        x_BSW = x_BSW + self.attn(self.norm1(x_BSW))
        return x_BSW + self.mlp(self.norm2(x_BSW))
